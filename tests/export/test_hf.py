"""--format hf: transformers loads the directory with from_pretrained and computes our logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitnet_train.export.cli import main
from bitnet_train.export.from_model import model_arrays
from bitnet_train.export.hf_writer import pack_hf_rows, unpack_hf_rows, write_hf
from bitnet_train.export.schema import FormatError
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig
from bitnet_train.model_dir import save_model_dir

from tiny_models import TINY, train_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def no_torch_compile():
    # transformers' BitNet quantizers are @torch.compile'd; compiling on a CPU test box is slow.
    with torch._dynamo.config.patch(disable=True):
        yield


def test_packing_matches_transformers():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    codes = np.random.default_rng(0).integers(-1, 2, (12, 7)).astype(np.int8)
    ours = pack_hf_rows(codes)
    theirs = pack_weights(torch.from_numpy(codes.astype(np.int64))).numpy()  # it adds the +1 itself
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(unpack_weights(torch.from_numpy(ours), torch.int8).numpy(), codes)
    np.testing.assert_array_equal(unpack_hf_rows(ours), codes)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_streamed_safetensors_are_the_bytes_save_file_writes(tmp_path, dtype):
    """write_hf lays model.safetensors out from the shapes and writes it tensor by tensor: the file is
    the one safetensors' own save_file writes for the same tensors (its order, header, padding)."""
    from safetensors.torch import load_file, save_file

    model = BitNetModel(ModelConfig(**{**TINY, "qkv_bias": True, "norm": "none"}),
                        QuantConfig(keep_high_precision=["layers.0.mlp.*"]))
    write_hf(tmp_path / "hf", model_arrays(model), dense_dtype=dtype)
    ours = (tmp_path / "hf" / "model.safetensors").read_bytes()
    save_file(load_file(tmp_path / "hf" / "model.safetensors"), str(tmp_path / "ref.safetensors"),
              metadata={"format": "pt"})
    assert ours == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("variant,keep", [
    (dict(norm="subln"), ["layers.1.mlp.down_proj"]),
    (dict(norm="none", ffn="relu2", tie_embeddings=True), []),
    (dict(norm="bitlinear"), []),
])
def test_transformers_loads_and_matches_logits(tmp_path, tokenizer, variant, keep):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelConfig(**{**TINY, **variant})
    model = train_tiny(cfg, QuantConfig(keep_high_precision=keep), steps=2)
    save_model_dir(tmp_path / "model", model, tokenizer)
    out = tmp_path / "hf"
    assert main([str(tmp_path / "model"), "-o", str(out), "--format", "hf", "--dtype", "fp32", "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["linear_class"], q["quantization_mode"]) == ("bitnet", "bitlinear", "offline")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == ("BitNetForCausalLM" if cfg.norm == "subln" else "LlamaForCausalLM")
    idx = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(idx).logits, model(idx)
    # Same math in another op order: an activation that lands on a rounding boundary may round the
    # other way, so allow a rare small deviation but require most logits to agree to fp32 noise.
    diff = (a - b).abs()
    assert diff.max() < 5e-3 and diff.median() < 1e-5, (diff.max(), diff.median())
    tk = AutoTokenizer.from_pretrained(str(out))
    assert tk.encode("To be, or not", add_special_tokens=False) == tokenizer.encode("To be, or not", add_special_tokens=False)


@pytest.fixture(scope="module")
def hf_and_bitnet_f16(trained_model_dir, tmp_path_factory):
    """The same trained model/ exported with fp16 dense tensors as an HF directory and a .bitnet."""
    d = tmp_path_factory.mktemp("f16")
    assert main([str(trained_model_dir[0]), "-o", str(d / "hf"), "--format", "hf", "--dtype", "fp16", "-q"]) == 0
    assert main([str(trained_model_dir[0]), "-o", str(d / "m.bitnet"), "-q"]) == 0
    return d / "hf", d / "m.bitnet"


def test_the_default_dense_dtype_is_bf16_for_hf_and_fp16_for_bitnet(trained_model_dir, tmp_path):
    from bitnet_train.export.reader import open_model

    assert main([str(trained_model_dir[0]), "-o", str(tmp_path / "hf"), "--format", "hf", "-q"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main([str(trained_model_dir[0]), "-o", str(tmp_path / "m.bitnet"), "-q"]) == 0
    assert open_model(tmp_path / "m.bitnet").dense_dtype == "F16"


# (median, max) of |logits - the .bitnet's| as a fraction of the largest logit: float32 is the same
# math as the file (an activation on a rounding boundary may flip), bfloat16 / float16 run
# transformers' BitLinear in that dtype (its int8 codes are computed in it too).
DTYPE_TOLERANCES = {torch.float32: (1e-6, 0.02), torch.bfloat16: (5e-3, 0.06), torch.float16: (3e-3, 0.05)}


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES), ids=lambda d: str(d).removeprefix("torch."))
def test_export_loads_at_any_dtype_with_the_bitnet_files_logits(hf_and_bitnet_f16, dtype):
    """from_pretrained(dtype=...) of an fp16 export: every dtype loads and computes the .bitnet's logits
    (an offline AutoBitLinear layout loaded only at its stored dtype, see hf_writer's docstring)."""
    from transformers import AutoModelForCausalLM

    from bitnet_train.export.reference import build_reference_model

    hf_dir, bitnet = hf_and_bitnet_f16
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    assert {p.dtype for p in hf.parameters()} == {dtype}
    ref = build_reference_model(bitnet)
    idx = torch.randint(0, ref.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = hf(idx).logits.float(), ref(idx)
    scale, (median, worst) = float(want.abs().max()), DTYPE_TOLERANCES[dtype]
    diff = (got - want).abs() / scale
    assert diff.median() < median and diff.max() < worst, (float(diff.median()), float(diff.max()))
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("variant,keep", [
    (dict(norm="subln"), ["layers.1.mlp.down_proj"]),
    (dict(norm="none", ffn="relu2", tie_embeddings=True), []),
    (dict(norm="bitlinear"), []),
])
def test_our_hf_export_imports_back_to_its_bitnet_files_logits(tmp_path, tokenizer, variant, keep):
    """--format hf -> importers (bitnet branch) -> the same function, codes and scales as the .bitnet."""
    from bitnet_train.export.reader import open_model
    from bitnet_train.export.reference import build_reference_model
    from bitnet_train.importers import load_hf_llama

    model = train_tiny(ModelConfig(**{**TINY, **variant}), QuantConfig(keep_high_precision=keep), steps=2)
    save_model_dir(tmp_path / "model", model, tokenizer)
    for fmt, out in (("hf", "hf"), ("bitnet", "m.bitnet")):
        assert main([str(tmp_path / "model"), "-o", str(tmp_path / out), "--format", fmt, "--dtype", "fp32", "-q"]) == 0
    imported, _, info = load_hf_llama(tmp_path / "hf", quant=QuantConfig())
    assert imported.config == model.config and info["exact"] and info["kept_high_precision"] == keep
    assert info["quantization"] == "bitlinear offline"
    f = open_model(tmp_path / "m.bitnet")
    arrays = model_arrays(imported)
    assert sorted(arrays.ternary) == sorted(f.ternary_layers())
    for name, (codes, s_w) in arrays.ternary.items():
        np.testing.assert_array_equal(codes, f.codes(name))
        # s_w -> 1 / s_w (float32) -> its reciprocal -> ternary_master_weight: a few ulps
        assert abs(s_w / float(f.scale(name)) - 1) < 5e-7, name
    idx = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = imported(idx), build_reference_model(tmp_path / "m.bitnet")(idx)
    diff = (got - want).abs()
    assert diff.max() < 0.02 * want.abs().max() and diff.median() < 1e-5, (diff.max(), diff.median())


@pytest.mark.parametrize("variant,keep,match", [
    (dict(norm="subln", head_dim=32), [], "num_heads \\* head_dim"),
    (dict(norm="bitlinear"), ["layers.0.*"], "use_rms_norm"),
    (dict(norm="none", intermediate_size=162), [], "not a multiple of 4"),
])
def test_unsupported_models_are_refused(tmp_path, variant, keep, match):
    arrays = model_arrays(BitNetModel(ModelConfig(**{**TINY, **variant}), QuantConfig(keep_high_precision=keep)))
    with pytest.raises(FormatError, match=match):
        write_hf(tmp_path / "hf", arrays)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variant", [dict(qkv_bias=True, tie_embeddings=True), dict(qk_norm=True, head_dim=32)],
                         ids=["qwen2", "qwen3"])
def test_qwen_exports_load_in_transformers_and_import_back(tmp_path, tokenizer, variant):
    """q/k/v biases / QK-norm: --format hf writes model_type qwen2 / qwen3 with a bitnet
    quantization_config; transformers computes the .bitnet's logits and our importer reads it back."""
    from transformers import AutoModelForCausalLM

    from bitnet_train.export.reference import build_reference_model
    from bitnet_train.importers import load_hf_llama

    torch.manual_seed(0)
    model = BitNetModel(ModelConfig(**{**TINY, "norm": "none", **variant}), QuantConfig()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases and norms away from their zero / one init
                p.uniform_(0.5, 1.5)
    save_model_dir(tmp_path / "model", model, tokenizer)
    for fmt, out in (("hf", "hf"), ("bitnet", "m.bitnet")):
        assert main([str(tmp_path / "model"), "-o", str(tmp_path / out), "--format", fmt, "--dtype", "fp32", "-q"]) == 0
    family = "qwen2" if variant.get("qkv_bias") else "qwen3"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    imported, _, _ = load_hf_llama(tmp_path / "hf", quant=QuantConfig())
    assert imported.config == model.config
    idx = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = build_reference_model(tmp_path / "m.bitnet")(idx)
        for got in (hf(idx).logits, imported(idx)):
            diff = (got - want).abs()
            assert diff.max() < 0.02 * want.abs().max() and diff.median() < 1e-5, (diff.max(), diff.median())


def test_qwen_features_without_a_transformers_family_are_refused(tmp_path, tokenizer):
    model = BitNetModel(ModelConfig(**{**TINY, "norm": "subln", "qkv_bias": True}), QuantConfig())
    save_model_dir(tmp_path / "model", model, tokenizer)
    assert main([str(tmp_path / "model"), "-o", str(tmp_path / "hf"), "--format", "hf", "-q"]) == 2
    assert not (tmp_path / "hf").exists()
