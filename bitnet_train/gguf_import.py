"""Import a llama.cpp ternary GGUF (TQ1_0 / TQ2_0 linears) into a BitNetModel, with its tokenizer.

    model, tokenizer, info = load_ternary_gguf("model.gguf")      # `bitnet-export model.gguf -o m.bitnet`

Reading the file
----------------
A small strict parser of its own (GGUF v2/v3, little-endian), not gguf-py's GGUFReader: that reader
builds numpy arrays straight from the counts in the file, so a lying tensor count, array length or
string length becomes a MemoryError or a hang before anything can be checked. Here every count and
size is bounded by the bytes left in the file before anything is allocated from it (a tensor info
takes at least 24 bytes, a key/value pair 13, an array element its width or 8 for a string), every
tensor's [offset, offset + size) must lie inside the data section, and a bad file gives one
CheckpointError line naming the key or tensor. The header is parsed from a numpy memmap; tensor data
is read with plain reads (a mapped page, once touched, stays resident while the map is open), one
tensor at a time, once everything is checked: into the model (load_ternary_gguf, peak: the fp32
model plus one tensor) or by bitnet-export straight from `open_ternary_gguf`'s lazy state (peak: one
tensor). gguf-py only names (and sizes, for the offset checks) ggml types this module does not read.

Block layouts (gguf-py `quants.py`, ggml `dequantize_row_tq*`): 256 weights per block along a row,
an fp16 `d` last in each block, weight = (q - 1) * d with a digit q in {0, 1, 2}:
  TQ2_0 (66 bytes): qs[64], d. Element 128h + 32k + j is bits 2k..2k+1 of qs[32h + j] (h < 2, k < 4).
        q = 3 would be weight 2d: not ternary, refused.
  TQ1_0 (54 bytes): qs[48], qh[4], d. Base-3 digits, most significant first, as a fixed-point
        fraction of the byte: digit k of byte b is ((b * 3^k) mod 256) * 3 >> 8. Elements 32k + j
        from qs[j] (j < 32, k < 5), 160 + 16k + j from qs[32 + j] (j < 16, k < 5), 240 + 4k + j
        from qh[j] (j < 4, k < 4).

Scales: our format keeps ONE scale per tensor (W ~ codes * s_w). BitNet conversions (llama.cpp's
converter, our gguf_writer) write s_w as every block's d, so the scale is the d shared by every
block that has a nonzero code (an all-zero block says nothing: gguf-py writes d = 0 for it). Blocks
with different d are not our quantization contract: refused, naming the tensor; with --ptq the
dequantized weights are kept instead and re-ternarized per tensor at export. An optional
`blk.N.<linear>.scale` tensor (one float; llama.cpp multiplies the product by it, `build_lora_mm`)
multiplies the scale. Codes and scale become latent fp32 weights with
`quant.ternary_master_weight`, which our absmean quantizer maps back to exactly those codes and
that scale (to a float32 ulp or two: the rounding of its fp32 mean).

Other tensor types: F32, F16, BF16 and Q8_0 are dequantized to fp32; a linear stored so stays a
high-precision linear (QuantConfig.keep_high_precision). Embeddings, output and norms are always
dense (a ternary-typed one is dequantized). Any other type (Q4_K, ...) is refused, naming the tensor
and its type; with --ptq it is dequantized by gguf-py (a linear then re-ternarized per tensor). A GGUF
with no ternary tensor at all goes through transformers (--ptq, export/sources.py).

Architectures (llama.cpp src/models/*.cpp; consistent with export/gguf_writer.py):
  llama   norm "none", SwiGLU (LLM_FFN_SILU, LLM_FFN_PAR). Interleaved RoPE (ROPE_TYPE_NORM): the
          converter permutes q/k rows per head from the rotate-half order; undone here, per
          `n_head` for q and `n_head_kv` for k. output.weight optional (absent: tied embeddings).
  bitnet  norm "subln": attn_sub_norm before attn_output, ffn_sub_norm before ffn_down. NEOX RoPE
          (rotate-half): q/k rows are not permuted. The graph always computes logits with
          token_embd (tied); a file with output.weight is refused, as llama.cpp's loader refuses
          it. The activation is `bitnet.hidden_activation`: absent or silu/swish/swiglu: SwiGLU;
          "relu2": squared ReLU (what our gguf_writer writes for relu2 models and the HF config
          says; llama.cpp builds whose table lacks "relu2" fall back to SiLU); others refused.
Config: `{arch}.block_count`, `embedding_length`, `feed_forward_length`, `attention.head_count`,
`attention.head_count_kv` (default head_count), `attention.key_length` (default hidden/heads),
`rope.freq_base` (default 10000), `attention.layer_norm_rms_epsilon`, `context_length`; vocab size
from `tokenizer.ggml.tokens` (or token_embd without a token list). RoPE scaling other than none or
linear x1, experts, a custom attention scale, partial RoPE and biases are refused.

Tokenizer: transformers' GGUF tokenizer converter (`convert_gguf_tokenizer`), fed the
tokenizer.ggml.* values parsed here. AutoTokenizer.from_pretrained(gguf_file=...) is not used: it
reads the config first and refuses architectures transformers lacks, `bitnet` among them. The chat
template is `tokenizer.chat_template`.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .model import ModelConfig, QuantConfig
from .quant import EPS, ternary_master_weight
from .tensor_files import LazyCheckpoint, LazyTensor, meta_model
from .tensor_files import sha256_file as _sha256_file  # the name the importers share

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp no longer reads it
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_CONTEXT = 1 << 20  # the engine's limit (export/schema.py MAX_SEQ_LEN)
ARCHITECTURES = ("llama", "bitnet")

# ggml type ids this module decodes -> (name, weights per block, bytes per block)
F32, F16, Q8_0, BF16, TQ1_0, TQ2_0 = 0, 1, 8, 30, 34, 35
GGML_TYPES = {
    F32: ("F32", 1, 4), F16: ("F16", 1, 2), BF16: ("BF16", 1, 2),
    Q8_0: ("Q8_0", 32, 34),  # fp16 d, int8 qs[32]
    TQ1_0: ("TQ1_0", 256, 54),  # qs[48], qh[4], fp16 d: 1.6875 bits/weight
    TQ2_0: ("TQ2_0", 256, 66),  # qs[64], fp16 d: 2.0625 bits/weight
}
TERNARY_TYPES = (TQ1_0, TQ2_0)
DENSE_TYPES = (F32, F16, BF16, Q8_0)
QK_K = 256

# GGUF metadata value types: fixed-size ones -> (struct format, numpy dtype); 8 string, 9 array
_STRING, _ARRAY = 8, 9
_SCALAR_TYPES = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
                 5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
                 12: ("<d", "<f8")}
_INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
_FLOAT_TYPES = (6, 12)
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

# llama.cpp tensor names (blk.N.<name>.weight) -> ours (layers.N.<name>)
LINEAR_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NORM_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_sub_norm": "self_attn.attn_sub_norm", "ffn_sub_norm": "mlp.ffn_sub_norm"}
_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "swiglu": "swiglu", "relu2": "relu2"}


def ggml_type_name(t: int) -> str:
    if t in GGML_TYPES:
        return GGML_TYPES[t][0]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(t).name
    except (ImportError, ValueError):
        return f"ggml type {t}"


def _ggml_type_size(t: int) -> tuple[int, int] | None:
    """(weights per block, bytes per block), or None for a type id no one knows."""
    if t in GGML_TYPES:
        return GGML_TYPES[t][1:]
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType(t)]
    except (ImportError, ValueError, KeyError):
        return None


# ---- the strict parser ------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length (in_features of a weight)
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / torch order: (out, in) for a weight."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise CheckpointError(f"{self.path}: truncated: {what} needs {n} bytes at offset {self.pos}, "
                                  f"the file has {self.left()} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} is not valid UTF-8") from None


class GGUFFile:
    """A parsed GGUF: `metadata` {key: value}, `value_types` {key: GGUF type id}, `tensors` {name:
    TensorInfo}, and each tensor's bytes through `raw(name)` (read from the file at each call).

    Values: ints, floats, bools and strings as Python objects; arrays of strings as lists; numeric
    arrays as numpy arrays (their element type in `array_types`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            if size < 24:  # magic, version, tensor count, kv count
                raise CheckpointError(f"{self.path}: truncated: {size} bytes, a GGUF header alone is 24")
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror or e}") from None
        self.size = size
        self.metadata: dict[str, object] = {}
        self.value_types: dict[str, int] = {}
        self.array_types: dict[str, int] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse(_Cursor(memoryview(self._map), self.path))

    def _parse(self, c: _Cursor) -> None:
        if bytes(c.buf[:4]) != GGUF_MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (magic {bytes(c.buf[:4])!r}, expected b'GGUF')")
        c.pos = 4
        version = c.unpack("<I", "the version")
        if version not in GGUF_VERSIONS:
            hint = " (a big-endian GGUF?)" if version >= 1 << 16 else ""
            raise CheckpointError(f"{self.path}: GGUF version {version}{hint}, expected one of {GGUF_VERSIONS}")
        self.version = version
        n_tensors = c.unpack("<Q", "the tensor count")
        n_kv = c.unpack("<Q", "the key/value count")
        if n_kv > c.left() // _MIN_KV_BYTES:
            raise CheckpointError(f"{self.path}: header claims {n_kv} key/value pairs; the file's {c.left()} "
                                  f"remaining bytes hold at most {c.left() // _MIN_KV_BYTES}")
        if n_tensors > c.left() // _MIN_TENSOR_INFO_BYTES:
            raise CheckpointError(f"{self.path}: header claims {n_tensors} tensors; the file's {c.left()} "
                                  f"remaining bytes hold at most {c.left() // _MIN_TENSOR_INFO_BYTES} tensor infos")
        for i in range(n_kv):
            key = c.string(f"the name of key/value pair {i}")
            if key in self.metadata:
                raise CheckpointError(f"{self.path}: key {key!r} appears twice")
            vtype = c.unpack("<I", f"the type of key {key!r}")
            self.value_types[key] = vtype
            self.metadata[key] = self._value(c, key, vtype)

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (self.value_types.get("general.alignment", 4) != 4 or not isinstance(alignment, int)
                or alignment <= 0 or alignment & (alignment - 1)):
            raise CheckpointError(f"{self.path}: general.alignment must be a power-of-two u32, got {alignment!r}")

        infos: dict[str, TensorInfo] = {}
        for i in range(n_tensors):
            name = c.string(f"the name of tensor {i}")
            if name in infos:
                raise CheckpointError(f"{self.path}: tensor {name!r} appears twice")
            n_dims = c.unpack("<I", f"the dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
            ne = tuple(c.unpack("<Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
            gtype = c.unpack("<I", f"the type of tensor {name!r}")
            offset = c.unpack("<Q", f"the data offset of tensor {name!r}")
            if any(n == 0 for n in ne):
                raise CheckpointError(f"{self.path}: tensor {name!r} has an empty dimension: {list(ne)}")
            block = _ggml_type_size(gtype)
            if block is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unknown ggml type id {gtype}")
            if ne[0] % block[0]:
                raise CheckpointError(f"{self.path}: tensor {name!r} ({ggml_type_name(gtype)}) has rows of {ne[0]} "
                                      f"weights, not a multiple of its block of {block[0]}")
            if offset % alignment:
                raise CheckpointError(f"{self.path}: tensor {name!r} data offset {offset} is not a multiple of "
                                      f"the alignment {alignment}")
            nbytes = int(np.prod(ne, dtype=object)) // block[0] * block[1]  # Python ints: no overflow
            infos[name] = TensorInfo(name, ne, gtype, offset, nbytes)
        self.data_start = -(-c.pos // alignment) * alignment
        data_bytes = self.size - self.data_start
        for t in infos.values():
            if t.offset + t.nbytes > data_bytes:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} data [{t.offset}, {t.offset + t.nbytes}) runs "
                                      f"past the end of the data section ({max(data_bytes, 0)} bytes): "
                                      f"truncated or a lying offset")
            self.tensors[t.name] = t

    def _value(self, c: _Cursor, key: str, vtype: int):
        if vtype in _SCALAR_TYPES:
            v = c.unpack(_SCALAR_TYPES[vtype][0], f"the value of key {key!r}")
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return c.string(f"the value of key {key!r}")
        if vtype != _ARRAY:
            raise CheckpointError(f"{self.path}: key {key!r} has unknown value type {vtype}")
        etype = c.unpack("<I", f"the element type of array {key!r}")
        count = c.unpack("<Q", f"the length of array {key!r}")
        self.array_types[key] = etype
        if etype == _STRING:
            if count > c.left() // 8:
                raise CheckpointError(f"{self.path}: array {key!r} claims {count} strings; the file's {c.left()} "
                                      f"remaining bytes hold at most {c.left() // 8}")
            return [c.string(f"element {i} of array {key!r}") for i in range(count)]
        if etype not in _SCALAR_TYPES:
            raise CheckpointError(f"{self.path}: array {key!r} has element type {etype}; expected a number or "
                                  f"string type (nested arrays are not read)")
        dtype = np.dtype(_SCALAR_TYPES[etype][1])
        if count > c.left() // dtype.itemsize:
            raise CheckpointError(f"{self.path}: array {key!r} claims {count} elements of {dtype.itemsize} bytes; "
                                  f"the file has {c.left()} bytes left")
        a = np.frombuffer(c.buf, dtype=dtype, count=count, offset=c.pos).copy()
        c.pos += count * dtype.itemsize
        return a.astype(bool) if etype == 7 else a

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.data_start + t.offset)
                out = np.fromfile(fh, dtype=np.uint8, count=t.nbytes)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror or e}") from None
        if out.size != t.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated (the file shrank after it was parsed)")
        return out

    # typed metadata access: a wrong type is an error naming the key

    def get_int(self, key: str, default: int | None = None) -> int:
        if key not in self.metadata:
            if default is None:
                raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
            return default
        if self.value_types[key] not in _INT_TYPES:
            raise CheckpointError(f"{self.path}: metadata key {key!r} must be an integer, got "
                                  f"{_type_word(self.value_types[key])}")
        return int(self.metadata[key])

    def get_float(self, key: str, default: float | None = None) -> float:
        if key not in self.metadata:
            if default is None:
                raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
            return default
        if self.value_types[key] not in _FLOAT_TYPES + _INT_TYPES:
            raise CheckpointError(f"{self.path}: metadata key {key!r} must be a number, got "
                                  f"{_type_word(self.value_types[key])}")
        v = self.metadata[key]
        # an f32 value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07): what was written
        v = float(str(np.float32(v))) if self.value_types[key] == 6 else float(v)
        if not np.isfinite(v):
            raise CheckpointError(f"{self.path}: metadata key {key!r} is {v}, expected a finite number")
        return v

    def get_bool(self, key: str) -> bool:
        if self.value_types.get(key) != 7:
            raise CheckpointError(f"{self.path}: metadata key {key!r} must be a bool, got "
                                  f"{_type_word(self.value_types[key]) if key in self.value_types else 'nothing'}")
        return self.metadata[key]

    def get_str(self, key: str, default: str | None = None) -> str | None:
        if key not in self.metadata:
            return default
        if self.value_types[key] != _STRING:
            raise CheckpointError(f"{self.path}: metadata key {key!r} must be a string, got "
                                  f"{_type_word(self.value_types[key])}")
        return self.metadata[key]

    def get_strings(self, key: str) -> list[str] | None:
        if key not in self.metadata:
            return None
        if self.value_types[key] != _ARRAY or self.array_types[key] != _STRING:
            raise CheckpointError(f"{self.path}: metadata key {key!r} must be an array of strings")
        return self.metadata[key]

    def get_numbers(self, key: str, length: int) -> list | None:
        if key not in self.metadata:
            return None
        if self.value_types[key] != _ARRAY or self.array_types[key] not in _INT_TYPES + _FLOAT_TYPES:
            raise CheckpointError(f"{self.path}: metadata key {key!r} must be an array of numbers")
        if len(self.metadata[key]) != length:
            raise CheckpointError(f"{self.path}: metadata key {key!r} has {len(self.metadata[key])} entries, "
                                  f"expected {length} (one per token)")
        return self.metadata[key].tolist()


def _type_word(vtype: int) -> str:
    if vtype == _STRING:
        return "a string"
    if vtype == _ARRAY:
        return "an array"
    return "a bool" if vtype == 7 else "a float" if vtype in _FLOAT_TYPES else f"value type {vtype}"


# ---- tensor decoding (numpy; each checked against gguf-py's dequantize in the tests) ----------

def ternary_blocks(f: GGUFFile, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A TQ1_0 / TQ2_0 tensor -> (q - 1 as int8 (rows, in), values -1..2; d as float32 (rows, in/256))."""
    t = f.tensors[name]
    rows, n_in = int(np.prod(t.ne[1:], dtype=np.int64)), t.ne[0]
    nb = n_in // QK_K
    _, _, block_bytes = GGML_TYPES[t.ggml_type]
    blocks = np.asarray(f.raw(name)).reshape(rows, nb, block_bytes)
    d = np.ascontiguousarray(blocks[..., -2:]).view("<f2")[..., 0].astype(np.float32)  # (rows, nb)
    if t.ggml_type == TQ2_0:
        qs = blocks[..., :64].reshape(rows, nb, 2, 1, 32)  # [row, block, half h, -, byte j]
        shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
        q = (qs >> shifts) & 3  # (rows, nb, 2, 4, 32): element 128h + 32k + j
    else:
        pow3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)

        def digits(b: np.ndarray, k: int) -> np.ndarray:  # (rows, nb, n) bytes -> (rows, nb, k, n) digits
            frac = b[:, :, None, :] * pow3[:k].reshape(1, 1, k, 1)  # uint8: wraps mod 256, as ggml's
            return (frac.astype(np.uint16) * 3 >> 8).astype(np.uint8)

        q = np.concatenate([digits(blocks[..., 0:32], 5).reshape(rows, nb, 160),
                            digits(blocks[..., 32:48], 5).reshape(rows, nb, 80),
                            digits(blocks[..., 48:52], 4).reshape(rows, nb, 16)], axis=-1)
    codes = q.reshape(rows, n_in).astype(np.int8) - 1
    return codes, d


def dense_tensor(f: GGUFFile, name: str, *, any_type: bool = False) -> np.ndarray:
    """A tensor of a type this module reads -> float32 in numpy order. any_type: other types through
    gguf-py's dequantize (the --ptq route: the weights are re-ternarized anyway)."""
    t = f.tensors[name]
    raw = np.asarray(f.raw(name))
    if t.ggml_type == F32:
        out = raw.view("<f4")
    elif t.ggml_type == F16:
        out = raw.view("<f2").astype(np.float32)
    elif t.ggml_type == BF16:
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif t.ggml_type == Q8_0:
        blocks = raw.reshape(-1, 34)
        d = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)  # (n, 1)
        out = d * blocks[:, 2:].view(np.int8).astype(np.float32)
    elif t.ggml_type in TERNARY_TYPES:
        codes, d = ternary_blocks(f, name)
        out = codes.reshape(codes.shape[0], -1, QK_K).astype(np.float32) * d[..., None]
    elif any_type:
        try:
            from gguf.quants import dequantize

            out = dequantize(raw.reshape(*t.shape[:-1], -1), t.ggml_type)
        except (ImportError, NotImplementedError, ValueError, KeyError) as e:
            raise CheckpointError(f"{f.path}: tensor {name} is {t.type_name}, which gguf-py cannot dequantize "
                                  f"({type(e).__name__})") from None
    else:
        raise CheckpointError(f"{f.path}: tensor {name} is {t.type_name}; a ternary GGUF import reads "
                              f"TQ1_0/TQ2_0 and F32/F16/BF16/Q8_0 only (--ptq dequantizes other types)")
    return out.astype(np.float32, copy=False).reshape(t.shape)


def tensor_scale(f: GGUFFile, name: str) -> np.ndarray:
    """The per-tensor factor of linear `name` (`... .scale`, one float), 1 without one."""
    scale_name = name.removesuffix(".weight") + ".scale"
    if scale_name not in f.tensors:
        return np.float32(1.0)
    t = f.tensors[scale_name]
    if t.ggml_type not in (F32, F16, BF16) or int(np.prod(t.ne)) != 1:
        raise CheckpointError(f"{f.path}: tensor {scale_name} must be one F32/F16/BF16 value, got {t.type_name} "
                              f"of shape {list(t.ne)}")
    s = dense_tensor(f, scale_name).reshape(())
    if not (np.isfinite(s) and s > 0):
        raise CheckpointError(f"{f.path}: tensor {scale_name} is {float(s)}, expected a finite positive factor")
    return s


def tensor_ternary(f: GGUFFile, name: str) -> tuple[np.ndarray, float]:
    """A TQ tensor whose blocks share one d -> (codes int8 (rows, in), scale d * .scale), or the error."""
    t = f.tensors[name]
    codes, d = ternary_blocks(f, name)
    bad = np.argwhere(codes > 1)
    if bad.size:
        r, e = bad[0]
        raise CheckpointError(f"{f.path}: tensor {name} (TQ2_0) has the code 3 (weight 2*d) at row {r}, element {e}; "
                              f"expected ternary digits 0..2")
    active = (codes.reshape(d.shape[0], d.shape[1], QK_K) != 0).any(-1)  # (rows, nb) blocks with a weight
    ds = np.unique(d[active])
    if ds.size == 0:
        return codes, 0.0  # all zero
    if ds.size > 1:
        raise CheckpointError(
            f"{f.path}: tensor {name} ({t.type_name}) has {ds.size} different block scales d (e.g. {ds[0]:.6g} and "
            f"{ds[-1]:.6g}); the .bitnet format keeps one scale per tensor: pass --ptq to re-ternarize the "
            f"dequantized weights per tensor")
    scale = np.float32(ds[0]) * tensor_scale(f, name)
    if not (np.isfinite(scale) and scale >= EPS):
        raise CheckpointError(f"{f.path}: tensor {name} has scale {float(scale):.6g}; expected a finite scale of at "
                              f"least the quantizer's eps {EPS}")
    return codes, float(scale)


# ---- architecture -----------------------------------------------------------------------------

def _refuse_unsupported_keys(f: GGUFFile, arch: str) -> None:
    p = f.path
    rope_type = f.get_str(f"{arch}.rope.scaling.type", "none")
    factor = f.get_float(f"{arch}.rope.scaling.factor", 1.0)
    if rope_type not in ("none", "linear") or (rope_type == "linear" and factor != 1.0):
        raise CheckpointError(f"{p}: {arch}.rope.scaling.type {rope_type!r} (factor {factor}) is not supported; "
                              f"expected plain RoPE (none, or linear with factor 1)")
    if f.get_float(f"{arch}.rope.scale_linear", 1.0) != 1.0:
        raise CheckpointError(f"{p}: {arch}.rope.scale_linear must be 1 (plain RoPE)")
    if f.get_int(f"{arch}.expert_count", 0):
        raise CheckpointError(f"{p}: {arch}.expert_count is {f.get_int(f'{arch}.expert_count')}: mixture-of-experts "
                              f"models are not supported")
    if f.get_float(f"{arch}.attention.scale", 0.0) != 0.0:
        raise CheckpointError(f"{p}: {arch}.attention.scale is set; only the standard 1/sqrt(head_dim) is supported")


def model_config(f: GGUFFile) -> tuple[str, ModelConfig]:
    """(architecture, ModelConfig) from the metadata, or a CheckpointError naming the key."""
    p = f.path
    arch = f.get_str("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{p}: general.architecture {arch!r} is not a ternary architecture we import "
                              f"(expected one of {', '.join(ARCHITECTURES)})")
    _refuse_unsupported_keys(f, arch)
    hidden = f.get_int(f"{arch}.embedding_length")
    n_head = f.get_int(f"{arch}.attention.head_count")
    if n_head <= 0:
        raise CheckpointError(f"{p}: {arch}.attention.head_count must be positive, got {n_head}")
    n_kv = f.get_int(f"{arch}.attention.head_count_kv", n_head)
    if f"{arch}.attention.key_length" not in f.metadata and hidden % n_head:
        raise CheckpointError(f"{p}: {arch}.embedding_length {hidden} is not a multiple of head_count {n_head} "
                              f"and no {arch}.attention.key_length is given")
    head_dim = f.get_int(f"{arch}.attention.key_length", hidden // n_head)
    for key in ("attention.value_length", "rope.dimension_count"):
        v = f.get_int(f"{arch}.{key}", head_dim)
        if v != head_dim:
            raise CheckpointError(f"{p}: {arch}.{key} is {v}, expected the head size {head_dim} "
                                  f"(partial RoPE / different value heads are not supported)")
    ctx = f.get_int(f"{arch}.context_length")
    if not 0 < ctx <= MAX_CONTEXT:
        raise CheckpointError(f"{p}: {arch}.context_length is {ctx}, expected 1 to {MAX_CONTEXT}")
    tokens = f.get_strings("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens)
    elif "token_embd.weight" in f.tensors:
        vocab = f.tensors["token_embd.weight"].ne[-1]
    else:
        raise CheckpointError(f"{p}: tensor token_embd.weight is missing")
    if f.get_int(f"{arch}.vocab_size", vocab) != vocab:
        raise CheckpointError(f"{p}: {arch}.vocab_size {f.get_int(f'{arch}.vocab_size')} differs from the "
                              f"{vocab} tokens of tokenizer.ggml.tokens")
    ffn = "swiglu"
    if arch == "bitnet":
        act = f.get_str("bitnet.hidden_activation", "silu")
        if act not in _ACTIVATIONS:
            raise CheckpointError(f"{p}: bitnet.hidden_activation {act!r} is not supported "
                                  f"(expected one of {', '.join(_ACTIVATIONS)})")
        ffn = _ACTIVATIONS[act]
        if n_head * head_dim != hidden:
            raise CheckpointError(f"{p}: llama.cpp's bitnet graph needs head_count * key_length == embedding_length, "
                                  f"got {n_head} * {head_dim} != {hidden}")
    try:
        cfg = ModelConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=f.get_int(f"{arch}.feed_forward_length"),
            num_layers=f.get_int(f"{arch}.block_count"), num_heads=n_head, num_kv_heads=n_kv, head_dim=head_dim,
            max_seq_len=ctx, rope_theta=f.get_float(f"{arch}.rope.freq_base", 10000.0),
            rms_norm_eps=f.get_float(f"{arch}.attention.layer_norm_rms_epsilon"),
            tie_embeddings=arch == "bitnet" or "output.weight" not in f.tensors,
            norm="subln" if arch == "bitnet" else "none", ffn=ffn,
        )
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{p}: the {arch} metadata does not give a valid model: {e}") from None
    if cfg.head_dim <= 0 or cfg.num_kv_heads <= 0 or cfg.rope_theta <= 0 or cfg.rms_norm_eps <= 0:
        raise CheckpointError(f"{p}: the {arch} metadata gives a non-positive head size, kv head count, "
                              f"rope.freq_base or rms epsilon")
    return arch, cfg


def expected_tensors(arch: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """llama.cpp name -> numpy shape of every tensor the model needs (output.weight only if untied)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["output.weight"] = (cfg.vocab_size, d)
    linear = {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
              "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    norms = {"attn_norm": (d,), "ffn_norm": (d,)}
    if arch == "bitnet":
        norms.update({"attn_sub_norm": (q,), "ffn_sub_norm": (f,)})
    for i in range(cfg.num_layers):
        out.update({f"blk.{i}.{n}.weight": s for n, s in {**linear, **norms}.items()})
    return out


def _our_name(gguf_linear: str) -> str:
    """blk.N.attn_q.weight -> layers.N.self_attn.q_proj"""
    _, i, gname, _ = gguf_linear.split(".")
    return f"layers.{i}.{LINEAR_NAMES[gname]}"


def _permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved q/k row order -> rotate-half (HF) order; inverse of gguf_writer's permute."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def has_ternary_linears(path: str | os.PathLike) -> bool:
    """Whether a GGUF has TQ1_0 / TQ2_0 tensors (parsed strictly: a bad file raises CheckpointError)."""
    return any(t.ggml_type in TERNARY_TYPES for t in GGUFFile(path).tensors.values())


def load_ternary_gguf(path: str | os.PathLike, *, ptq: bool = False):
    """-> (BitNetModel in eval mode, PreTrainedTokenizerFast or None, info dict).

    ptq: what is not our ternary contract is kept as dequantized weights (the export re-ternarizes
    the linears per tensor) instead of being refused: TQ blocks with different d, and tensors of
    other types (Q4_K, ...; dequantized by gguf-py).
    """
    ck = open_ternary_gguf(path, ptq=ptq)
    return ck.build_model(), ck.tokenizer, ck.info


def open_ternary_gguf(path: str | os.PathLike, *, ptq: bool = False) -> LazyCheckpoint:
    """load_ternary_gguf's checkpoint with every check made and no tensor kept: the state dict under
    our names as LazyTensors decoding one tensor each. The TQ tensors are decoded once here too:
    whether their blocks share one scale decides what they become (an error, or with ptq the
    dequantized weights named in info["dequantized"])."""
    f = GGUFFile(path)
    p = f.path
    arch, cfg = model_config(f)
    if arch == "bitnet" and "output.weight" in f.tensors:
        raise CheckpointError(f"{p}: tensor output.weight: llama.cpp's bitnet graph computes the logits with "
                              f"token_embd and refuses a file that also has output.weight")
    if cfg.num_layers > len(f.tensors) // 9:  # every layer has 7 linears and 2 norms
        raise CheckpointError(f"{p}: {arch}.block_count {cfg.num_layers} needs at least {9 * cfg.num_layers} tensors, "
                              f"the file has {len(f.tensors)}")
    want = expected_tensors(arch, cfg)
    for name, shape in want.items():
        if name not in f.tensors:
            raise CheckpointError(f"{p}: tensor {name} is missing (needed by the {arch} architecture)")
        if f.tensors[name].shape != shape:
            raise CheckpointError(f"{p}: tensor {name} has shape {list(f.tensors[name].ne)} (ggml order), "
                                  f"expected {list(reversed(shape))} from the metadata")
    linear_weights = {n for n in want if n.startswith("blk.") and n.split(".")[2] in LINEAR_NAMES}
    scales = {n.removesuffix(".weight") + ".scale" for n in linear_weights}
    extra = sorted(set(f.tensors) - set(want) - scales)
    if extra:
        raise CheckpointError(f"{p}: tensor {extra[0]} is not part of the {arch} architecture as we import it "
                              f"({len(extra)} such tensors)")

    high_precision: list[str] = []  # our names of the linears stored dense
    for name in want:
        t = f.tensors[name]
        if name in linear_weights and t.ggml_type in DENSE_TYPES:
            high_precision.append(_our_name(name))
        elif ptq:
            continue  # any other type is dequantized (a linear then re-ternarized)
        elif name in linear_weights and t.ggml_type not in TERNARY_TYPES:
            raise CheckpointError(f"{p}: tensor {name} is {t.type_name}; a ternary GGUF's linears must be "
                                  f"TQ1_0/TQ2_0 (or F32/F16/BF16/Q8_0, kept high precision)")
        elif t.ggml_type not in DENSE_TYPES + TERNARY_TYPES:
            raise CheckpointError(f"{p}: tensor {name} is {t.type_name}; embeddings, output and norms must be "
                                  f"F32/F16/BF16/Q8_0")

    quant = QuantConfig(method="b1.58", keep_high_precision=high_precision)
    tokenizer = gguf_tokenizer(f)

    state: dict[str, LazyTensor] = {}
    dequantized: list[str] = []
    for name in want:
        t = f.tensors[name]
        if name in linear_weights:
            gname = name.split(".")[2]
            n_head = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(gname) if arch == "llama" else None
            ternary = False
            if t.ggml_type in TERNARY_TYPES:
                try:
                    tensor_ternary(f, name)
                    ternary = True
                except CheckpointError:
                    if not ptq:
                        raise
                    dequantized.append(name)  # kept as dequantized weights, re-ternarized by the export
            if not ternary and t.ggml_type not in DENSE_TYPES + TERNARY_TYPES:
                dequantized.append(name)
            state[f"{_our_name(name)}.weight"] = LazyTensor(
                t.shape, torch.float32, functools.partial(_linear_weight, f, name, n_head, ternary, ptq))
        else:
            ours = {"token_embd.weight": "embed_tokens.weight", "output.weight": "lm_head.weight",
                    "output_norm.weight": "norm.weight"}.get(name)
            if ours is None:
                _, i, gname, _ = name.split(".")
                ours = f"layers.{i}.{NORM_NAMES[gname]}.weight"
            state[ours] = LazyTensor(t.shape, torch.float32,
                                     functools.partial(_dense_weight, f, name, ptq))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # the same parameter
    for key, own in meta_model(cfg, quant).state_dict().items():
        if key.endswith(".lam"):
            state[key] = LazyTensor.of(torch.ones(own.shape))  # lambda 1, as a fresh model's
    info = {"source": str(p), "architecture": arch, "gguf_version": f.version,
            "sha256": _sha256_file(p), "high_precision": high_precision, "dequantized": dequantized,
            "types": sorted({f.tensors[n].type_name for n in linear_weights})}
    return LazyCheckpoint(cfg, quant, state, tokenizer, info, str(p))


def _linear_weight(f: GGUFFile, name: str, n_head: int | None, ternary: bool, ptq: bool) -> torch.Tensor:
    """A linear's fp32 weight in our row order: latent weights that quantize back to its codes and
    scale (ternary), else its dequantized weights times its .scale factor."""
    if ternary:
        codes, scale = tensor_ternary(f, name)
        rows = codes
    else:
        rows = dense_tensor(f, name, any_type=ptq) * tensor_scale(f, name)
    rows = torch.from_numpy(_permute_back(rows, n_head) if n_head else rows)
    if ternary:
        rows = ternary_master_weight(rows, scale) if scale else torch.zeros(rows.shape)
    return rows


def _dense_weight(f: GGUFFile, name: str, ptq: bool) -> torch.Tensor:
    return torch.from_numpy(dense_tensor(f, name, any_type=ptq))


# ---- tokenizer --------------------------------------------------------------------------------

_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def _gguf_tokenizer_converter():
    try:  # transformers >= 5
        from transformers.integrations.gguf import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import convert_gguf_tokenizer
    return convert_gguf_tokenizer


def gguf_tokenizer(f: GGUFFile):
    """The file's tokenizer as a transformers fast tokenizer (chat template included), or None when
    the file has none (tokenizer.ggml.model absent or "none")."""
    p = f.path
    kind = f.get_str("tokenizer.ggml.model")
    tokens = f.get_strings("tokenizer.ggml.tokens")
    if kind in (None, "none") or not tokens:
        return None
    spec: dict = {"tokenizer_type": kind, "tokens": tokens}
    pre = f.get_str("tokenizer.ggml.pre")
    if pre is not None:
        spec["pre_tokenizer_type"] = pre
    merges = f.get_strings("tokenizer.ggml.merges")
    if merges is not None:
        spec["merges"] = merges
    for key in ("scores", "token_type"):  # the names transformers' converter reads them under
        values = f.get_numbers(f"tokenizer.ggml.{key}", len(tokens))
        if values is not None:
            spec[key] = values
    if "tokenizer.ggml.add_space_prefix" in f.metadata:
        spec["add_prefix_space"] = f.get_bool("tokenizer.ggml.add_space_prefix")
    config: dict = {}
    for name, key in _SPECIAL_IDS.items():
        i = f.get_int(f"tokenizer.ggml.{key}", -1)
        if i >= len(tokens):
            raise CheckpointError(f"{p}: tokenizer.ggml.{key} {i} is not a token id (the vocabulary has {len(tokens)})")
        config[name] = tokens[i] if i >= 0 else None
    for key in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{key}" in f.metadata:
            config[key] = f.get_bool(f"tokenizer.ggml.{key}")
    if kind == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
        config.setdefault("add_bos_token", True)
    template = f.get_str("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template

    from transformers import PreTrainedTokenizerFast

    try:
        backend, extra = _gguf_tokenizer_converter()(f.get_str("general.architecture"), spec)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
    except Exception as e:  # tokenizers raises its own Exception type (a merge naming no token, ...)
        raise CheckpointError(f"{p}: tokenizer.ggml.model {kind!r}: transformers cannot build this tokenizer: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


