"""`--format gguf`: a GGUF file for stock llama.cpp, written with the `gguf` package (numpy only).

Architecture (llama.cpp `src/models/*.cpp`):
  * `bitnet` for SubLN models: attn_sub_norm / ffn_sub_norm, NEOX (rotate-half) RoPE, so q/k rows
    keep the Hugging Face order. Its graph ties the output to `token_embd` and needs q/o square
    (num_heads * head_dim == hidden_size): other models are refused.
  * `llama` for norm "none" (converted Llama-family models): interleaved RoPE, so q/k rows are
    permuted as llama.cpp's converter does; SwiGLU only.
  * `qwen2` for norm "none" with q/k/v biases (Qwen2 / Qwen2.5: `attn_{q,k,v}.bias`, F32) and
    `qwen3` for norm "none" with QK-norm (`attn_q_norm` / `attn_k_norm`): NEOX RoPE, rows kept.
    SubLN with either, or both together, has no llama.cpp architecture: refused.
  * norm "bitlinear" (an RMSNorm inside every linear) has no llama.cpp architecture: refused.

Ternary linears are TQ2_0 (2.0625 bits/weight, `--packing 2bit`) or TQ1_0 (1.6875, `1.6bit`),
quantized from codes * s_w, so each 256-block's fp16 scale is s_w (llama.cpp's own BitNet
converter does the same). TQ blocks run along rows: a linear whose row length (in_features) is not
a multiple of 256 falls back to Q8_0 (8.5 bits/weight: every code is +-127 or 0 times a block scale
s_w/127 in fp16) or, if not a multiple of 32 either, to F16 (codes * s_w); the summary names each. 1-D tensors (norms) are F32; embeddings, output and hybrid linears use --dtype.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_file
from .model_tensors import ModelTensors
from .schema import DTYPE_ITEMSIZE, TERNARY, FormatError, dense_shapes, linear_shapes

QK_K = 256  # TQ1_0 / TQ2_0 block: codes along a row
Q8_BLOCK = 32  # Q8_0 block, the fallback

_LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.attn_sub_norm.weight": "attn_sub_norm.weight", "mlp.ffn_sub_norm.weight": "ffn_sub_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_GLOBAL_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    """Our tensor name (logical linear or stored dense) -> llama.cpp's."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    _, i, rest = name.split(".", 2)
    if rest in _LINEAR_NAMES:
        return f"blk.{i}.{_LINEAR_NAMES[rest]}.weight"
    base, _, kind = rest.rpartition(".")
    if kind in ("weight", "bias") and base in _LINEAR_NAMES:
        return f"blk.{i}.{_LINEAR_NAMES[base]}.{kind}"
    return f"blk.{i}.{_LAYER_NAMES[rest]}"


def gguf_architecture(cfg: dict) -> str:
    """The llama.cpp architecture for a config, or FormatError saying why there is none."""
    qkv_bias, qk_norm = cfg.get("qkv_bias", False), cfg.get("qk_norm", False)
    if (qkv_bias or qk_norm) and (cfg["norm"] != "none" or cfg["ffn"] != "swiglu" or (qkv_bias and qk_norm)):
        raise FormatError(
            "llama.cpp has q/k/v biases only in 'qwen2' and QK-norm only in 'qwen3', both with norm 'none' and a "
            f"SwiGLU MLP; this model has norm {cfg['norm']!r}, ffn {cfg['ffn']!r}, qkv_bias {qkv_bias}, "
            f"qk_norm {qk_norm}. Export --format bitnet instead")
    if qkv_bias:
        return "qwen2"
    if qk_norm:
        return "qwen3"
    if cfg["norm"] == "subln":
        if cfg["tie_embeddings"] is not True:
            raise FormatError("GGUF architecture 'bitnet' (SubLN models) takes the output projection from "
                              "token_embd; this model has its own lm_head (tie_embeddings false), which llama.cpp "
                              "would ignore. Export --format bitnet or hf instead")
        if cfg["num_heads"] * cfg["head_dim"] != cfg["hidden_size"]:
            raise FormatError("GGUF architecture 'bitnet' needs num_heads * head_dim == hidden_size, got "
                              f"{cfg['num_heads']} * {cfg['head_dim']} != {cfg['hidden_size']}")
        return "bitnet"
    if cfg["norm"] == "none":
        if cfg["ffn"] != "swiglu":
            raise FormatError(f"GGUF architecture 'llama' computes a SwiGLU MLP; this model uses ffn {cfg['ffn']!r}")
        return "llama"
    raise FormatError("norm 'bitlinear' (an RMSNorm inside every linear) has no llama.cpp architecture; "
                      "export --format bitnet instead")


def permute_rows_for_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half (HF) q/k rows -> llama.cpp's interleaved RoPE order (as its Llama converter)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _token_id(tok, lookup: dict[str, int]) -> int | None:
    if isinstance(tok, dict):
        tok = tok.get("content")
    return lookup.get(tok) if isinstance(tok, str) else None


def add_tokenizer(w, arrays: ModelTensors, notes: list[str]) -> None:
    import gguf

    if not arrays.tokenizer_json:
        w.add_tokenizer_model("none")
        notes.append("no tokenizer in the source: llama.cpp will load the GGUF but cannot tokenize text")
        return
    tj = json.loads(arrays.tokenizer_json)
    model = tj.get("model") or {}
    text = json.dumps(tj.get("pre_tokenizer")) + json.dumps(tj.get("decoder"))
    if model.get("type") != "BPE" or "ByteLevel" not in text:
        w.add_tokenizer_model("none")
        notes.append(f"tokenizer model {model.get('type')!r} is not a byte-level BPE: not written to the GGUF "
                     f"(llama.cpp cannot tokenize)")
        return
    n = arrays.config["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    lookup: dict[str, int] = {}
    for tok, i in model["vocab"].items():
        if i >= n:
            raise FormatError(f"tokenizer token {tok!r} has id {i} >= vocab_size {n}")
        tokens[i], types[i], lookup[tok] = tok, gguf.TokenType.NORMAL, i
    for a in tj.get("added_tokens", []):
        if a["id"] >= n:
            raise FormatError(f"tokenizer added token {a['content']!r} has id {a['id']} >= vocab_size {n}")
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
        lookup[a["content"]] = a["id"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        w.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 byte-level pre-tokenizer
    elif pre.get("type") == "Sequence" and [p.get("type") for p in pre.get("pretokenizers", [])] == ["Digits", "ByteLevel"]:
        w.add_tokenizer_pre("smollm")  # SmolLM / SmolLM2: digits split, then GPT-2 byte level
    else:
        notes.append("pre-tokenizer not recognized: llama.cpp will use its default BPE pre-tokenizer")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tc = arrays.tokenizer_config
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)):
        i = _token_id(tc.get(key), lookup)
        if i is not None:
            add(i)
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])


QUANT_CHUNK = 1 << 20  # weights per slice of rows quantized at once (TQ / Q8_0 blocks run along rows)


def write_gguf(
    path: str | os.PathLike,
    arrays: ModelTensors,
    packing: str = "i2_b128",
    dense_dtype: str = "F16",
    progress: Callable[[int], None] | None = None,
) -> tuple[int, dict[str, str], list[str]]:
    """Write a GGUF, one tensor at a time: every tensor info is computed from the shapes first, then
    each tensor is produced, written and dropped. -> (bytes of ternary tensor data, {tensor:
    fallback reason}, notes)."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    cfg = arrays.config
    arch = gguf_architecture(cfg)
    qtype = gguf.GGMLQuantizationType.TQ2_0 if packing == "i2_b128" else gguf.GGMLQuantizationType.TQ1_0
    ftype = gguf.LlamaFileType.MOSTLY_TQ2_0 if packing == "i2_b128" else gguf.LlamaFileType.MOSTLY_TQ1_0
    q8 = gguf.GGMLQuantizationType.Q8_0
    dense_type = {"F16": gguf.GGMLQuantizationType.F16, "BF16": gguf.GGMLQuantizationType.BF16,
                  "F32": gguf.GGMLQuantizationType.F32}[dense_dtype]
    notes: list[str] = [f"GGUF architecture {arch!r}, {qtype.name} ternary blocks (fp16 block scale = s_w)"]
    fallbacks: dict[str, str] = {}
    kinds = arrays.kinds()
    linears = linear_shapes(cfg)

    def llama_heads(name: str) -> int | None:
        """Heads whose q/k rows llama.cpp's interleaved RoPE wants permuted (llama arch only)."""
        if arch == "llama" and name.endswith(("q_proj", "k_proj")):
            return cfg["num_heads"] if name.endswith("q_proj") else cfg["num_kv_heads"]
        return None

    # (gguf name, add_tensor_info arguments, produce): the order of the file
    plan: list[tuple[str, tuple, Callable[[], np.ndarray]]] = []
    ternary_bytes = 0
    for name, (n_out, n_in) in linears.items():
        heads = llama_heads(name)
        if kinds[name] == TERNARY:
            if n_in % QK_K == 0:
                qt = qtype
            elif n_in % Q8_BLOCK == 0:
                qt = q8
                fallbacks[gguf_name(name)] = f"in_features {n_in} is not a multiple of {QK_K}: Q8_0"
            else:
                qt = None
                fallbacks[gguf_name(name)] = f"in_features {n_in} is not a multiple of {Q8_BLOCK}: F16"
            if qt is None:
                info = ((n_out, n_in), np.float16, 2 * n_out * n_in, None)
            else:
                byte_shape = quant_shape_to_byte_shape((n_out, n_in), qt)
                info = (byte_shape, np.uint8, int(np.prod(byte_shape)), qt)
            ternary_bytes += info[2]
            produce = functools.partial(_ternary_rows, arrays, name, heads, qt, info[0])
        else:
            stored = f"{name}.weight"
            info = ((n_out, n_in), _STORED_NP[dense_dtype], DTYPE_ITEMSIZE[dense_dtype] * n_out * n_in, dense_type)
            produce = functools.partial(_dense_rows, arrays, stored, heads, dense_dtype)
        plan.append((gguf_name(name), info, produce))
    for name, shape in dense_shapes(cfg).items():
        if len(shape) == 1:
            info = (shape, np.float32, 4 * shape[0], None)
            produce = functools.partial(arrays.dense_stored, name, "F32")
        else:
            info = (shape, _STORED_NP[dense_dtype], DTYPE_ITEMSIZE[dense_dtype] * int(np.prod(shape)), dense_type)
            produce = functools.partial(arrays.dense_stored, name, dense_dtype)
        plan.append((gguf_name(name), info, produce))

    path = Path(path)
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(str(arrays.provenance.get("recipe") or path.stem))
        w.add_context_length(cfg["max_seq_len"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(cfg["num_layers"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_heads"])
        w.add_head_count_kv(cfg["num_kv_heads"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_rope_freq_base(cfg["rope_theta"])
        w.add_rope_dimension_count(cfg["head_dim"])
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_vocab_size(cfg["vocab_size"])
        w.add_file_type(ftype)
        if arch == "bitnet" and cfg["ffn"] == "relu2":
            w.add_string(f"{arch}.hidden_activation", "relu2")
            notes.append("ffn relu2: written as bitnet.hidden_activation; llama.cpp builds that do not read it "
                         "compute SiLU")
        add_tokenizer(w, arrays, notes)
        for gname, (shape, np_dtype, nbytes, raw_dtype), _ in plan:
            w.add_tensor_info(gname, shape, np.dtype(np_dtype), nbytes, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, (shape, np_dtype, nbytes, _), produce in plan:
            data = produce()
            if data.dtype != np.dtype(np_dtype) or tuple(data.shape) != tuple(shape):
                raise FormatError(f"tensor {gname}: produced {data.dtype} {tuple(data.shape)}, "
                                  f"its tensor info says {np.dtype(np_dtype)} {tuple(shape)}")
            w.write_tensor_data(data)
            if progress:
                progress(data.nbytes)
            del data
        w.close()
    return ternary_bytes, fallbacks, notes


_STORED_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # writer.cast_dense's results


def _ternary_rows(arrays: ModelTensors, name: str, heads: int | None, qtype, out_shape: tuple[int, ...]) -> np.ndarray:
    """A ternary linear's GGUF data: codes * s_w (rows permuted for llama's RoPE where `heads`),
    quantized to `qtype` (F16 where None) a slice of rows at a time, the slices' bytes being those
    of the whole (its blocks never cross a row)."""
    from gguf.quants import quantize

    codes, s_w = arrays.quantized(name)
    if heads:
        codes = permute_rows_for_llama(codes, heads)  # a row permutation: commutes with the scaling
    out = np.empty(out_shape, dtype=np.uint8 if qtype is not None else np.float16)
    step = max(1, QUANT_CHUNK // codes.shape[1])
    for i in range(0, codes.shape[0], step):
        rows = codes[i:i + step].astype(np.float32) * np.float32(s_w)
        out[i:i + step] = quantize(rows, qtype) if qtype is not None else rows.astype(np.float16)
    return out


def _dense_rows(arrays: ModelTensors, stored: str, heads: int | None, dense_dtype: str) -> np.ndarray:
    data = arrays.dense_stored(stored, dense_dtype)
    return permute_rows_for_llama(data, heads) if heads else data
