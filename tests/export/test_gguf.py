"""--format gguf: read back with gguf-py (the reference of llama.cpp's block layouts) and, for the
`llama` architecture, load with transformers' GGUF loader and compare logits.

llama.cpp itself is not run here (no binary in the test environment); the tensor names and shapes
are checked against what llama.cpp's loaders request (src/models/bitnet.cpp, llama.cpp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitnet_train.export.cli import main
from bitnet_train.export.from_model import model_arrays
from bitnet_train.export.gguf_writer import gguf_name, write_gguf
from bitnet_train.export.schema import FormatError
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig
from bitnet_train.model_dir import save_model_dir

from tiny_models import train_tiny

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

pytestmark = pytest.mark.slow

BASE = dict(vocab_size=320, hidden_size=256, intermediate_size=320, num_layers=2, num_heads=4, num_kv_heads=2,
            max_seq_len=64)


def tensors_of(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def field(r, key):
    f = r.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


def deq(t) -> np.ndarray:
    """GGUF tensor -> float32 (out, in)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    return dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("packing,qtype", [("2bit", "TQ2_0"), ("1.6bit", "TQ1_0")])
def test_bitnet_arch_tensors_and_values(tmp_path, tokenizer, packing, qtype):
    cfg = ModelConfig(**BASE, norm="subln", tie_embeddings=True)
    model = train_tiny(cfg, QuantConfig(keep_high_precision=["layers.1.mlp.up_proj"]), steps=2)
    save_model_dir(tmp_path / "model", model, tokenizer)
    out = tmp_path / "m.gguf"
    assert main([str(tmp_path / "model"), "-o", str(out), "--format", "gguf", "--packing", packing]) == 0
    r, t = tensors_of(out)
    assert field(r, "general.architecture") == "bitnet"
    assert field(r, "bitnet.block_count") == 2 and field(r, "bitnet.attention.head_count_kv") == 2
    # what llama.cpp's bitnet loader requests (ggml order: ne0 = in_features)
    d, f, kv = 256, 320, 128
    want = {"token_embd.weight": (d, 320), "output_norm.weight": (d,)}
    for i in range(2):
        want.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_sub_norm.weight": (d,),
                     f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (d, kv),
                     f"blk.{i}.attn_v.weight": (d, kv), f"blk.{i}.attn_output.weight": (d, d),
                     f"blk.{i}.ffn_norm.weight": (d,), f"blk.{i}.ffn_sub_norm.weight": (f,),
                     f"blk.{i}.ffn_gate.weight": (d, f), f"blk.{i}.ffn_up.weight": (d, f),
                     f"blk.{i}.ffn_down.weight": (f, d)})
    assert {n: tuple(int(x) for x in v.shape) for n, v in t.items()} == want
    bl = model.bitlinear_modules()
    for name, m in bl.items():
        g = t[gguf_name(name)]
        if not m.quantize:
            assert g.tensor_type == gguf.GGMLQuantizationType.F16
            continue
        codes, s_w = m.quantized_weight()
        exact = codes.float().numpy() * np.float32(np.float16(s_w.item()))
        if name.endswith("down_proj"):  # in_features 320: not a multiple of 256 -> Q8_0 fallback
            assert g.tensor_type == gguf.GGMLQuantizationType.Q8_0
            np.testing.assert_allclose(deq(g), codes.float().numpy() * s_w.item(), rtol=1e-3, err_msg=name)
            assert ((deq(g) == 0) == (codes.numpy() == 0)).all()
        else:
            assert g.tensor_type.name == qtype
            np.testing.assert_array_equal(deq(g), exact, err_msg=name)
    assert t["blk.0.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    toks = r.fields["tokenizer.ggml.tokens"]
    assert len(toks.data) == 320 and field(r, "tokenizer.ggml.model") == "gpt2"
    # llama.cpp's vocab loader refuses unknown pre-tokenizer names ("gpt2" is one; "gpt-2" is right)
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"


def test_llama_arch_loads_in_transformers_with_matching_logits(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelConfig(**BASE, norm="none")
    model = train_tiny(cfg, QuantConfig(), steps=2)
    save_model_dir(tmp_path / "model", model, tokenizer)
    assert main([str(tmp_path / "model"), "-o", str(tmp_path / "m.gguf"), "--format", "gguf", "--dtype", "fp32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    # the same weights in our model, computed without activation quantization (as transformers does)
    arrays = model_arrays(model)
    ref = BitNetModel(cfg, QuantConfig(method="none"))
    state = ref.state_dict()
    for name, (codes, s_w) in arrays.ternary.items():
        state[f"{name}.weight"] = torch.from_numpy(codes.astype(np.float32) * np.float32(np.float16(s_w)))
    for name, x in arrays.dense.items():
        state[name] = torch.from_numpy(x)
    ref.load_state_dict(state)
    idx = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(idx).logits, ref.eval()(idx)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    tk = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "To be, or not to be: 12345"
    assert tk.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("variant,match", [
    (dict(norm="subln"), "own lm_head"),
    (dict(norm="bitlinear"), "no llama.cpp architecture"),
    (dict(norm="none", ffn="relu2"), "SwiGLU"),
])
def test_unsupported_architectures_are_refused(tmp_path, variant, match, tokenizer, capsys):
    cfg = ModelConfig(**{**BASE, **variant})
    arrays = model_arrays(BitNetModel(cfg, QuantConfig()))
    with pytest.raises(FormatError, match=match):
        write_gguf(tmp_path / "x.gguf", arrays)
    save_model_dir(tmp_path / "model", BitNetModel(cfg, QuantConfig()), tokenizer)
    assert main([str(tmp_path / "model"), "-o", str(tmp_path / "x.gguf"), "--format", "gguf"]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))
