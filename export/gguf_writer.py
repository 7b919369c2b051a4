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

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_file
from .schema import FormatError, linear_shapes
from .writer import ModelArrays, f32_to_bf16_bits

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


def add_tokenizer(w, arrays: ModelArrays, notes: list[str]) -> None:
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


def write_gguf(
    path: str | os.PathLike,
    arrays: ModelArrays,
    packing: str = "i2_b128",
    dense_dtype: str = "F16",
    progress: Callable[[int], None] | None = None,
) -> tuple[int, dict[str, str], list[str]]:
    """Write a GGUF. -> (bytes of ternary tensor data, {tensor: fallback reason}, notes)."""
    import gguf
    from gguf.quants import quantize

    cfg = arrays.config
    arch = gguf_architecture(cfg)
    qtype = gguf.GGMLQuantizationType.TQ2_0 if packing == "i2_b128" else gguf.GGMLQuantizationType.TQ1_0
    ftype = gguf.LlamaFileType.MOSTLY_TQ2_0 if packing == "i2_b128" else gguf.LlamaFileType.MOSTLY_TQ1_0
    dense_type = {"F16": gguf.GGMLQuantizationType.F16, "BF16": gguf.GGMLQuantizationType.BF16,
                  "F32": gguf.GGMLQuantizationType.F32}[dense_dtype]
    notes: list[str] = [f"GGUF architecture {arch!r}, {qtype.name} ternary blocks (fp16 block scale = s_w)"]
    fallbacks: dict[str, str] = {}
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

        ternary_bytes = 0
        linears = linear_shapes(cfg)
        for name in linears:
            if name in arrays.ternary:
                codes, s_w = arrays.ternary[name]
                wq = codes.astype(np.float32) * np.float32(s_w)
            else:
                wq = None
            dense_w = arrays.dense.get(f"{name}.weight")
            for_rows = wq if wq is not None else dense_w
            if arch == "llama" and name.endswith(("q_proj", "k_proj")):
                heads = cfg["num_heads"] if name.endswith("q_proj") else cfg["num_kv_heads"]
                for_rows = permute_rows_for_llama(for_rows, heads)
            if wq is not None and linears[name][1] % QK_K == 0:
                data = quantize(for_rows, qtype)
                w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
                ternary_bytes += data.nbytes
            elif wq is not None and linears[name][1] % Q8_BLOCK == 0:
                fallbacks[gguf_name(name)] = f"in_features {linears[name][1]} is not a multiple of {QK_K}: Q8_0"
                data = quantize(for_rows, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(gguf_name(name), data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                ternary_bytes += data.nbytes
            elif wq is not None:
                fallbacks[gguf_name(name)] = f"in_features {linears[name][1]} is not a multiple of {Q8_BLOCK}: F16"
                data = for_rows.astype(np.float16)
                w.add_tensor(gguf_name(name), data)
                ternary_bytes += data.nbytes
            else:
                data = _dense(for_rows, dense_type)
                w.add_tensor(gguf_name(name), data, raw_dtype=dense_type)
            if progress:
                progress(data.nbytes)
        for name, x in arrays.dense.items():
            if name.endswith(".weight") and name[: -len(".weight")] in linears:
                continue
            if x.ndim == 1:
                data = np.ascontiguousarray(x, dtype=np.float32)
                w.add_tensor(gguf_name(name), data)
            else:
                data = _dense(x, dense_type)
                w.add_tensor(gguf_name(name), data, raw_dtype=dense_type)
            if progress:
                progress(data.nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    return ternary_bytes, fallbacks, notes


def _dense(x: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(x, dtype=np.float16)
    return f32_to_bf16_bits(x)  # BF16 as raw uint16 bits, raw_dtype=BF16
