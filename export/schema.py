"""What a .bitnet file must contain (FORMAT.md sections 2, 4, 6, 7): names, shapes, metadata schema.

Shared by the writer (which must never emit anything else) and the reader (which rejects anything
else). numpy-free and torch-free: plain dicts in, plain dicts out.
"""

from __future__ import annotations

import json
import math
import zlib

from ..errors import BitNetError
from .packing import I2_B128, PACKINGS, T3_B160, packed_shape

FORMAT_NAME = "bitnet"
FORMAT_VERSION = 2  # the newest version this code reads and writes (FORMAT.md section 6)
READ_VERSIONS = (1, 2)
# Packings by the version that introduced them: version 2 = version 1 + t3_b160.
PACKING_SINCE = {"i2_b128": 1, "t3_b5": 1, T3_B160: 2}
# Ternary qweights that begin 32-byte aligned in the data section (read in place), placed first.
IN_PLACE_PACKINGS = (I2_B128, T3_B160)


def format_version_for(packing: str) -> int:
    """The version a writer stamps: the lowest one that has everything the file uses, so files in
    the version-1 packings stay readable by version-1 readers."""
    return PACKING_SINCE[packing]
MAX_HEADER_BYTES = 100 * 1024 * 1024
DATA_ALIGN = 64  # the writer pads the header so the data section starts at a multiple of this

METADATA_KEYS = (
    "format", "format_version", "config", "quant", "tokenizer", "tokenizer_config",
    "provenance", "tensors", "checksums",
)

DTYPE_ITEMSIZE = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}
DENSE_DTYPES = ("F16", "BF16", "F32")

QUANT_FIXED = {
    "method": "b1.58",
    "weight_scale": "multiply",
    "rounding": "half_to_even",
    "activation": "int8_per_token_absmax",
}
QUANT_KEYS = set(QUANT_FIXED) | {"packing", "eps"}

_POS_INT = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "max_seq_len")
_POS_NUM = ("rope_theta", "rms_norm_eps")
MAX_SEQ_LEN = 1 << 20  # the engine's kMaxSeqLen (csrc/engine.h)
# Keys added within v1 (Qwen2 q/k/v biases, Qwen3 QK-norm): a file without them has them false.
OPTIONAL_CONFIG_KEYS = {"qkv_bias": False, "qk_norm": False}
CONFIG_KEYS = set(_POS_INT) | set(_POS_NUM) | {"tie_embeddings", "norm", "ffn", "init_std"} | set(OPTIONAL_CONFIG_KEYS)
NORMS = ("subln", "bitlinear", "none")
FFNS = ("swiglu", "relu2")

TERNARY, DENSE = "ternary", "dense"


class FormatError(BitNetError):
    """A .bitnet file (or what is about to be written as one) breaks FORMAT.md."""


def _is_int(v) -> bool:
    return type(v) is int


def _is_num(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def validate_config(cfg) -> dict:
    """The `config` metadata object -> the dict with optional keys filled in, or FormatError naming the key."""
    if not isinstance(cfg, dict):
        raise FormatError("metadata 'config' must be a JSON object")
    cfg = {**OPTIONAL_CONFIG_KEYS, **cfg}
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise FormatError(f"metadata 'config' has keys the format does not define: {unknown}")
    missing = sorted(CONFIG_KEYS - set(cfg))
    if missing:
        raise FormatError(f"metadata 'config' is missing keys {missing}")
    for k in _POS_INT:
        if not _is_int(cfg[k]) or cfg[k] <= 0:
            raise FormatError(f"config.{k} must be a positive integer, got {cfg[k]!r}")
    if cfg["max_seq_len"] > MAX_SEQ_LEN:
        raise FormatError(f"config.max_seq_len must be at most {MAX_SEQ_LEN} (2^20), got {cfg['max_seq_len']}")
    for k in _POS_NUM:
        if not _is_num(cfg[k]) or cfg[k] <= 0:
            raise FormatError(f"config.{k} must be a positive number, got {cfg[k]!r}")
    if not _is_num(cfg["init_std"]):
        raise FormatError(f"config.init_std must be a number, got {cfg['init_std']!r}")
    for k in ("tie_embeddings", *OPTIONAL_CONFIG_KEYS):
        if type(cfg[k]) is not bool:
            raise FormatError(f"config.{k} must be true or false, got {cfg[k]!r}")
    if cfg["norm"] not in NORMS:
        raise FormatError(f"config.norm must be one of {NORMS}, got {cfg['norm']!r}")
    if cfg["ffn"] not in FFNS:
        raise FormatError(f"config.ffn must be one of {FFNS}, got {cfg['ffn']!r}")
    if cfg["num_heads"] % cfg["num_kv_heads"]:
        raise FormatError(f"config.num_heads {cfg['num_heads']} is not a multiple of num_kv_heads {cfg['num_kv_heads']}")
    return cfg


def validate_quant(quant, version: int = FORMAT_VERSION) -> dict:
    """The `quant` metadata object of a file of format `version`, or FormatError naming the key."""
    if not isinstance(quant, dict):
        raise FormatError("metadata 'quant' must be a JSON object")
    if set(quant) != QUANT_KEYS:
        raise FormatError(f"metadata 'quant' must have exactly the keys {sorted(QUANT_KEYS)}, got {sorted(quant)}")
    for k, v in QUANT_FIXED.items():
        if quant[k] != v:
            raise FormatError(f"quant.{k} must be {v!r}, got {quant[k]!r}")
    if quant["packing"] not in PACKINGS:
        raise FormatError(f"quant.packing must be one of {PACKINGS}, got {quant['packing']!r}")
    if PACKING_SINCE[quant["packing"]] > version:
        raise FormatError(f"quant.packing {quant['packing']!r} needs format_version "
                          f"{PACKING_SINCE[quant['packing']]}; this file says {version}")
    if not _is_num(quant["eps"]) or quant["eps"] <= 0:
        raise FormatError(f"quant.eps must be a positive number, got {quant['eps']!r}")
    return quant


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """Every linear of the model -> (out, in), in model order."""
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_heads"] * hd, cfg["num_kv_heads"] * hd
    out = {}
    for i in range(cfg["num_layers"]):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        out.update({
            f"{a}.q_proj": (q, d), f"{a}.k_proj": (kv, d), f"{a}.v_proj": (kv, d), f"{a}.o_proj": (d, q),
            f"{m}.gate_proj": (f, d), f"{m}.up_proj": (f, d), f"{m}.down_proj": (d, f),
        })
    return out


def dense_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every logical tensor that is always dense (embeddings, lm_head, norms) -> shape."""
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (v, d)}
    q, kv = cfg["num_heads"] * cfg["head_dim"], cfg["num_kv_heads"] * cfg["head_dim"]
    for i in range(cfg["num_layers"]):
        a = f"layers.{i}.self_attn"
        out[f"layers.{i}.input_layernorm.weight"] = (d,)
        out[f"layers.{i}.post_attention_layernorm.weight"] = (d,)
        if cfg.get("qkv_bias"):
            out.update({f"{a}.q_proj.bias": (q,), f"{a}.k_proj.bias": (kv,), f"{a}.v_proj.bias": (kv,)})
        if cfg.get("qk_norm"):
            out.update({f"{a}.q_norm.weight": (cfg["head_dim"],), f"{a}.k_norm.weight": (cfg["head_dim"],)})
        if cfg["norm"] == "subln":
            out[f"layers.{i}.self_attn.attn_sub_norm.weight"] = (cfg["num_heads"] * cfg["head_dim"],)
            out[f"layers.{i}.mlp.ffn_sub_norm.weight"] = (cfg["intermediate_size"],)
    if cfg["norm"] == "bitlinear":
        for name, (_, n_in) in linear_shapes(cfg).items():
            out[f"{name}.norm.weight"] = (n_in,)
    out["norm.weight"] = (d,)
    if not cfg["tie_embeddings"]:
        out["lm_head.weight"] = (v, d)
    return out


def logical_tensor_count(cfg: dict) -> int:
    """len(logical_tensors(cfg)), by arithmetic: what a reader compares with a file's tensor list
    before it builds anything per layer (a config may claim 10^12 layers)."""
    per_layer = (7 + 2 + {"subln": 2, "bitlinear": 7}.get(cfg["norm"], 0)
                 + 3 * bool(cfg.get("qkv_bias")) + 2 * bool(cfg.get("qk_norm")))
    return cfg["num_layers"] * per_layer + 2 + (0 if cfg["tie_embeddings"] else 1)


def logical_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The keys `tensors` must list exactly: linears (ternary or dense) + always-dense tensors."""
    return {**linear_shapes(cfg), **dense_shapes(cfg)}


def stored_tensors(cfg: dict, kinds: dict[str, str], packing: str, dense_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The exact set of stored tensors -> (dtype, shape), given each linear's kind."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, (n_out, n_in) in linear_shapes(cfg).items():
        if kinds[name] == TERNARY:
            out[f"{name}.qweight"] = ("U8", packed_shape(n_out, n_in, packing))
            out[f"{name}.scale"] = ("F32", (1,))
        else:
            out[f"{name}.weight"] = (dense_dtype, (n_out, n_in))
    for name, shape in dense_shapes(cfg).items():
        out[name] = (dense_dtype, shape)
    return out


def storage_order(stored: dict[str, tuple[str, tuple[int, ...]]], packing: str) -> list[str]:
    """Data-section order that aligns every tensor without holes (FORMAT.md section 1)."""
    def rank(name: str) -> tuple:
        dtype, _ = stored[name]
        if name.endswith(".qweight"):
            return (0 if packing in IN_PLACE_PACKINGS else 3, 0)
        if name.endswith(".scale"):
            return (1, 0)
        return (2, -DTYPE_ITEMSIZE[dtype])
    return sorted(stored, key=lambda n: (*rank(n), n))


def metadata_crc32(metadata: dict[str, str]) -> int:
    """CRC-32 of `key NUL value NUL` over every metadata key but `checksums`, in sorted key order."""
    crc = 0
    for k in sorted(metadata):
        if k == "checksums":
            continue
        crc = zlib.crc32(k.encode("utf-8") + b"\0" + metadata[k].encode("utf-8") + b"\0", crc)
    return crc


def loads_strict(text: str, what: str):
    """json.loads that rejects duplicate keys, NaN/Infinity and pathological nesting."""
    def no_dupes(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise FormatError(f"{what}: duplicate key {dup!r}")
        return dict(pairs)

    def no_constants(c):
        raise FormatError(f"{what}: {c} is not allowed")

    try:
        return json.loads(text, object_pairs_hook=no_dupes, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise FormatError(f"{what} is not valid JSON: {e}") from None
