"""`--format hf`: a Hugging Face directory in the transformers BitNet layout (packed BitLinear).

    config.json          model_type "bitnet" (SubLN models), "qwen2" (q/k/v biases), "qwen3" (QK-norm)
                         or "llama" (other norm none / bitlinear models), with
                         quantization_config {quant_method: bitnet, linear_class: bitlinear,
                         quantization_mode: offline, modules_to_not_convert: [lm_head, hybrid linears],
                         use_rms_norm: true for norm "bitlinear"}
    model.safetensors    ternary linear NAME: `model.NAME.weight` uint8 (out/4, in), codes + 1 packed
                         along rows as transformers' `pack_weights` (stored row r, bits 2i..2i+1 hold
                         row r + i*out/4), and `model.NAME.weight_scale` (1,) float32 = 1 / s_w,
                         DIVIDED (BitLinear: y = acc / (s_x * weight_scale), microsoft's 2B4T layout).
                         Written tensor by tensor (`write_safetensors`): the header is computed from
                         the shapes first, in safetensors' own layout (the bytes save_file would
                         write), then each tensor goes to its offset as it is produced.
    tokenizer.json, tokenizer_config.json

Why BitLinear and not offline AutoBitLinear (W = codes * weight_scale, what we wrote before): for
an offline AutoBitLinear checkpoint transformers 5 runs a deserializer on every `*.weight` tensor
and then skips the cast to the requested dtype, so embeddings and norms keep the stored dtype while
the unpacked linears take the requested one; from_pretrained(dtype=...) at any dtype but the
stored one fails at the first matmul ("expected m1 and m2 to have the same dtype"). BitLinear's
packed buffers load through the plain path, which casts every float tensor, so the directory loads
at float32, bfloat16 and float16. The price is float16 arithmetic: BitLinear computes s_x and
s_x * weight_scale = 127 / (max|x| * s_w) in the load dtype, which passes float16's 65504 (and
zeroes the row) once max|x| < 127 / (65504 * s_w), about 0.1 for s_w = 0.02. Right after a SubLN or
in-layer norm max|x| is at least about the norm's gain, so those inputs stay above it unless the
gains are that small; a norm "none" model's o_proj / down_proj inputs often fall below it. bfloat16
has float32's range: prefer it to float16.

What transformers 5.x supports (integrations/bitnet.py, models/bitnet): the BitNet model's SubLN
norms are hidden_size wide (so num_heads * head_dim == hidden_size); packed rows need
out_features % 4 == 0; the in-layer RMSNorm (use_rms_norm) applies to every converted linear, so
norm "bitlinear" cannot be combined with hybrid-precision linears. Other models are refused.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..atomic import atomic_dir
from .model_tensors import ModelTensors, dense_names, ternary_names
from .schema import FormatError, linear_shapes

VALUES_PER_ITEM = 4
TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def pack_hf_rows(codes: np.ndarray) -> np.ndarray:
    """(out, in) codes -> (out/4, in) uint8, transformers' BitNet `pack_weights` layout."""
    out = codes.shape[0]
    rows = out // VALUES_PER_ITEM
    q = (codes.astype(np.int16) + 1).astype(np.uint8).reshape(VALUES_PER_ITEM, rows, codes.shape[1])
    return (q[0] | (q[1] << 2) | (q[2] << 4) | (q[3] << 6)).astype(np.uint8)


def unpack_hf_rows(packed: np.ndarray) -> np.ndarray:
    return np.concatenate([((packed >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(VALUES_PER_ITEM)], axis=0)


_ARCHITECTURES = {"bitnet": "BitNetForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


def hf_family(cfg: dict) -> str:
    """The transformers model_type that computes this config, or FormatError saying why none does.

    transformers' BitLinear adds a linear's bias after its scaled product, as we do, so Qwen2's
    q/k/v biases carry over; Qwen3's q_norm / k_norm are plain modules of its attention."""
    qkv_bias, qk_norm = cfg.get("qkv_bias", False), cfg.get("qk_norm", False)
    if qkv_bias or qk_norm:
        if cfg["norm"] != "none" or cfg["ffn"] != "swiglu" or (qkv_bias and qk_norm):
            raise FormatError(
                "transformers has q/k/v biases only in Qwen2 and QK-norm only in Qwen3, both without SubLN and "
                f"with a SwiGLU MLP; this model has norm {cfg['norm']!r}, ffn {cfg['ffn']!r}, qkv_bias {qkv_bias}, "
                f"qk_norm {qk_norm}. Export --format bitnet instead")
        return "qwen2" if qkv_bias else "qwen3"
    return "bitnet" if cfg["norm"] == "subln" else "llama"


def hf_config(arrays: ModelTensors, dense_dtype: str) -> dict:
    cfg = arrays.config
    if cfg["norm"] == "subln" and cfg["num_heads"] * cfg["head_dim"] != cfg["hidden_size"]:
        raise FormatError("transformers' BitNet model sizes attn_sub_norm by hidden_size: needs num_heads * head_dim "
                          f"== hidden_size, got {cfg['num_heads']} * {cfg['head_dim']} != {cfg['hidden_size']}")
    linears = linear_shapes(cfg)
    ternary = set(ternary_names(arrays))
    dense_linears = [n for n in linears if n not in ternary]
    if cfg["norm"] == "bitlinear" and dense_linears:
        raise FormatError("transformers applies use_rms_norm to converted linears only: norm 'bitlinear' with "
                          f"high-precision linears ({dense_linears[:3]}) has no HF BitNet layout")
    for name, (n_out, _) in linears.items():
        if name in ternary and n_out % VALUES_PER_ITEM:
            raise FormatError(f"{name}: out_features {n_out} is not a multiple of 4 (transformers packs 4 rows per byte)")
    subln = cfg["norm"] == "subln"
    family = hf_family(cfg)
    tc = arrays.tokenizer_config
    vocab = {}
    if arrays.tokenizer_json:
        tj = json.loads(arrays.tokenizer_json)
        vocab = dict((tj.get("model") or {}).get("vocab") or {})
        vocab.update({a["content"]: a["id"] for a in tj.get("added_tokens", [])})

    def token_id(key):
        t = tc.get(key)
        t = t.get("content") if isinstance(t, dict) else t
        return vocab.get(t) if isinstance(t, str) else None

    return {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_layers"],
        "num_attention_heads": cfg["num_heads"],
        "num_key_value_heads": cfg["num_kv_heads"],
        "head_dim": cfg["head_dim"],
        "max_position_embeddings": cfg["max_seq_len"],
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_theta": cfg["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        "hidden_act": "relu2" if cfg["ffn"] == "relu2" else "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg["tie_embeddings"],
        "bos_token_id": token_id("bos_token"),
        "eos_token_id": token_id("eos_token"),
        "pad_token_id": token_id("pad_token"),
        "dtype": TORCH_DTYPES[dense_dtype],
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "bitlinear",
            "quantization_mode": "offline",
            "modules_to_not_convert": ["lm_head"] + [f"model.{n}" for n in dense_linears],
            "use_rms_norm": cfg["norm"] == "bitlinear",
            "rms_norm_eps": cfg["rms_norm_eps"],
        },
    }


def hf_name(name: str) -> str:
    """Our stored dense name -> transformers' state-dict key."""
    if name == "lm_head.weight":
        return name
    if name.endswith(".norm.weight") and name[: -len(".norm.weight")].split(".")[-1].endswith("_proj"):
        name = name[: -len(".norm.weight")] + ".rms_norm.weight"  # AutoBitLinear(use_rms_norm=True)
    return f"model.{name}"


# safetensors' serialization order: dtypes of larger alignment first (its Dtype enum, descending), then by name
_SAFETENSORS_DTYPE_RANK = {"F32": 0, "BF16": 1, "F16": 2, "U8": 3}
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1}


def safetensors_layout(tensors: dict[str, tuple[str, tuple[int, ...]]],
                       metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """{name: (dtype, shape)} -> (the 8-byte length + JSON header, {name: (start, end) in the data
    section}), laid out as safetensors' save_file lays them out (its sort order, space padding to 8)."""
    order = sorted(tensors, key=lambda n: (_SAFETENSORS_DTYPE_RANK[tensors[n][0]], n))
    header: dict = {"__metadata__": metadata}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for name in order:
        dtype, shape = tensors[name]
        end = offset + _ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        spans[name] = (offset, end)
        offset = end
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head, spans


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str],
                      produce: Callable[[], Iterator[tuple[str, np.ndarray]]]) -> None:
    """A safetensors file written tensor by tensor: produce() yields (name, array) once per tensor, in
    any order; each array is written at its offset and dropped. Refuses a wrong shape, size or a
    tensor yielded twice or never."""
    head, spans = safetensors_layout(tensors, metadata)
    written: set[str] = set()
    with open(path, "wb") as fh:
        fh.write(head)
        for name, a in produce():
            dtype, shape = tensors[name]
            start, end = spans[name]
            data = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
            if name in written or tuple(a.shape) != tuple(shape) or data.nbytes != end - start:
                raise FormatError(f"tensor {name}: got {a.dtype} {tuple(a.shape)} ({data.nbytes} bytes)"
                                  f"{' twice' if name in written else ''}, the layout has {dtype} {tuple(shape)}")
            fh.seek(len(head) + start)
            fh.write(data.data)
            written.add(name)
            del a, data
        missing = sorted(set(tensors) - written)
        if missing:
            raise FormatError(f"tensors never produced: {missing[:5]}")
        fh.flush()
        os.fsync(fh.fileno())


def write_hf(path: str | os.PathLike, arrays: ModelTensors, dense_dtype: str = "F16") -> tuple[int, list[str]]:
    """Write the HF directory (atomically), one tensor at a time. -> (bytes of packed ternary weights, notes)."""
    config = hf_config(arrays, dense_dtype)
    ternary = ternary_names(arrays)
    linears = linear_shapes(arrays.config)
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in ternary:
        n_out, n_in = linears[name]
        layout[f"model.{name}.weight"] = ("U8", (n_out // VALUES_PER_ITEM, n_in))
        layout[f"model.{name}.weight_scale"] = ("F32", (1,))
    dense = dense_names(arrays)
    layout.update({hf_name(n): (dense_dtype, shape) for n, shape in dense.items()})
    ternary_bytes = sum(math.prod(layout[f"model.{n}.weight"][1]) for n in ternary)

    def produce() -> Iterator[tuple[str, np.ndarray]]:
        for name in ternary:
            codes, s_w = arrays.quantized(name)
            yield f"model.{name}.weight", pack_hf_rows(codes)
            del codes
            # float64 reciprocal, stored float32 whatever dense_dtype (transformers casts it at load)
            yield f"model.{name}.weight_scale", np.array([1.0 / s_w], dtype=np.float64).astype("<f4")
        for name in dense:
            yield hf_name(name), arrays.dense_stored(name, dense_dtype)

    notes = ["transformers' BitNet integration: weight_scale = 1 / s_w is divided (BitLinear, linear_class "
             "bitlinear); weight_scale stored in float32"]
    if dense_dtype == "F16" and arrays.config["norm"] == "none":
        notes.append("at float16, transformers' BitLinear overflows s_x * weight_scale (a zero row) where a row's "
                     "input max < 127 / (65504 * s_w), as a norm-'none' model's o_proj/down_proj inputs can be: "
                     "load it with dtype=torch.bfloat16")
    if abs(arrays.eps - 1e-5) > 1e-12:
        notes.append(f"quant eps {arrays.eps} differs from transformers' fixed 1e-5 activation clamp")
    with atomic_dir(path) as tmp:
        write_safetensors(tmp / "model.safetensors", layout, {"format": "pt"}, produce)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if arrays.tokenizer_json:
            (tmp / "tokenizer.json").write_text(arrays.tokenizer_json, encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps(arrays.tokenizer_config, indent=2), encoding="utf-8")
        else:
            notes.append("no tokenizer in the source: the directory has no tokenizer files")
        (tmp / "bitnet_export.json").write_text(json.dumps({"provenance": arrays.provenance}, indent=2, sort_keys=True))
    return ternary_bytes, notes
