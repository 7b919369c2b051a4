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
    assert (q["quant_method"], q["linear_class"], q["quantization_mode"]) == ("bitnet", "autobitlinear", "offline")
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
