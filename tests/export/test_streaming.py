"""bitnet-export streams (one tensor read, quantized, written at a time); its output must be the bytes
the whole-model route writes: the model built by the importers (what training uses), model_arrays,
then the same writer. One case per source kind and writer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bitnet_train.export.cli import PACKING_OF, main
from bitnet_train.export.from_model import model_arrays
from bitnet_train.export.gguf_writer import write_gguf
from bitnet_train.export.hf_writer import write_hf
from bitnet_train.export.reader import open_model
from bitnet_train.export.writer import write_bitnet
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig
from bitnet_train.model_dir import load_model_dir, load_state_checked, save_model_dir

from tiny_models import TINY, train_tiny

pytestmark = pytest.mark.slow


def whole_model(kind: str, path: Path) -> BitNetModel:
    """The source as one BitNetModel in memory, the route bitnet-export took before it streamed."""
    if kind == "model_dir":
        return load_model_dir(path, load_tokenizer=False)[0]
    if kind == "checkpoint":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        hp = ckpt["hyper_parameters"]
        model = BitNetModel(ModelConfig.from_dict(dict(hp["model"])), QuantConfig.from_dict(dict(hp["quant"])))
        state = {k[len("model."):]: v.float() for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        load_state_checked(model, state, str(path))
        return model.eval()
    if kind == "hf_ptq":
        from bitnet_train.importers import load_hf_llama

        return load_hf_llama(path, quant=QuantConfig(method="none"), norm="none")[0]
    if kind == "hf_ternary":
        from bitnet_train.importers import load_hf_llama

        return load_hf_llama(path, quant=QuantConfig())[0]
    if kind == "gguf":
        from bitnet_train.gguf_import import load_ternary_gguf

        return load_ternary_gguf(path)[0]
    raise AssertionError(kind)


def written_metadata(out: Path, fmt: str) -> tuple[str | None, dict, dict]:
    """(tokenizer.json, tokenizer_config, provenance) as the streamed export wrote them."""
    if fmt == "bitnet":
        f = open_model(out)
        return f.tokenizer_json, f.tokenizer_config, f.provenance
    if fmt == "hf":
        tok = out / "tokenizer.json"
        return (tok.read_text() if tok.is_file() else None,
                json.loads((out / "tokenizer_config.json").read_text()) if tok.is_file() else {},
                json.loads((out / "bitnet_export.json").read_text())["provenance"])
    return None, {}, {}


def assert_same_output(new: Path, old: Path) -> None:
    if new.is_dir():
        assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
        for p in new.iterdir():
            assert p.read_bytes() == (old / p.name).read_bytes(), p.name
    else:
        assert new.read_bytes() == old.read_bytes()


def check(tmp_path: Path, kind: str, source: Path, fmt: str, packing: str = "2bit", ptq: bool = False,
          dtype: str = "fp16", tokenizer_from: Path | None = None) -> None:
    name = {"bitnet": "m.bitnet", "gguf": "m.gguf", "hf": "hf"}[fmt]
    new, old = tmp_path / "new" / name, tmp_path / "old" / name
    argv = [str(source), "-o", str(new), "--format", fmt, "--packing", packing, "--dtype", dtype, "-q"]
    assert main(argv + (["--ptq"] if ptq else [])) == 0
    tok_json, tok_cfg, prov = written_metadata(new, fmt)
    if fmt == "gguf":  # a GGUF keeps the tokenizer, not the provenance: take it from a .bitnet export
        tok_json, tok_cfg, _ = written_metadata(tokenizer_from, "bitnet")
    arrays = model_arrays(whole_model(kind, source), ptq=ptq, tokenizer_json=tok_json, tokenizer_config=tok_cfg,
                          provenance=prov)
    dense = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}[dtype]
    if fmt == "bitnet":
        write_bitnet(old, arrays, packing=PACKING_OF[packing], dense_dtype=dense)
    elif fmt == "gguf":
        write_gguf(old, arrays, packing=PACKING_OF[packing], dense_dtype=dense)
    else:
        write_hf(old, arrays, dense_dtype=dense)
    assert_same_output(new, old)
    shutil.rmtree(tmp_path / "old")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, trained_model_dir, tokenizer):
    """Tiny sources of every kind (the ternary HF directory and GGUF are our own exports)."""
    root = tmp_path_factory.mktemp("sources")
    path, model = trained_model_dir  # SubLN, layers.1.mlp.down_proj high precision
    out = {"model_dir": path}
    from bitnet_train.lightning_module import BitNetLM

    lm = BitNetLM(model=model.config.to_dict(), quant=model.quant_config.to_dict(), optim={}, total_steps=10)
    lm.model.load_state_dict(model.state_dict())
    out["checkpoint"] = root / "last.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams), "global_step": 7}, out["checkpoint"])
    # norm none, rows of 256 (TQ blocks), one high-precision linear: GGUF arch llama with q/k permuted
    none = train_tiny(ModelConfig(**{**TINY, "norm": "none", "hidden_size": 256, "intermediate_size": 512}),
                      QuantConfig(keep_high_precision=["layers.0.self_attn.q_proj"]), steps=2)
    out["model_dir_none"] = root / "none"
    save_model_dir(out["model_dir_none"], none, tokenizer)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False))
    out["hf_ptq"] = root / "hf"
    hf.to(torch.bfloat16).save_pretrained(out["hf_ptq"], max_shard_size="100KB")
    tokenizer.save_pretrained(out["hf_ptq"])
    assert len(list(out["hf_ptq"].glob("model-*-of-*.safetensors"))) > 1  # shards walked one at a time
    out["hf_ternary"] = root / "hf_ternary"
    assert main([str(path), "-o", str(out["hf_ternary"]), "--format", "hf", "-q"]) == 0
    out["gguf"] = root / "m.gguf"
    assert main([str(out["model_dir_none"]), "-o", str(out["gguf"]), "--format", "gguf", "-q"]) == 0
    return out


@pytest.mark.parametrize("packing", ["2bit", "1.6bit"])
def test_model_dir_to_bitnet(tmp_path, sources, packing):
    check(tmp_path, "model_dir", sources["model_dir"], "bitnet", packing=packing)


def test_model_dir_to_hf_and_gguf(tmp_path, sources):
    check(tmp_path, "model_dir", sources["model_dir"], "hf", dtype="bf16")
    assert main([str(sources["model_dir_none"]), "-o", str(tmp_path / "tok.bitnet"), "-q"]) == 0
    check(tmp_path, "model_dir", sources["model_dir_none"], "gguf", tokenizer_from=tmp_path / "tok.bitnet")
    check(tmp_path, "model_dir", sources["model_dir_none"], "gguf", packing="1.6bit", dtype="bf16",
          tokenizer_from=tmp_path / "tok.bitnet")


def test_lightning_checkpoint(tmp_path, sources):
    check(tmp_path, "checkpoint", sources["checkpoint"], "bitnet", dtype="fp32")


def test_sharded_hf_directory_with_ptq(tmp_path, sources):
    check(tmp_path, "hf_ptq", sources["hf_ptq"], "bitnet", ptq=True)
    check(tmp_path, "hf_ptq", sources["hf_ptq"], "hf", ptq=True)
    assert main([str(sources["hf_ptq"]), "-o", str(tmp_path / "tok.bitnet"), "--ptq", "-q"]) == 0
    check(tmp_path, "hf_ptq", sources["hf_ptq"], "gguf", ptq=True, tokenizer_from=tmp_path / "tok.bitnet")


def test_ternary_hf_directory_and_gguf(tmp_path, sources):
    check(tmp_path, "hf_ternary", sources["hf_ternary"], "bitnet", dtype="fp32")
    check(tmp_path, "gguf", sources["gguf"], "bitnet", packing="1.6bit")
