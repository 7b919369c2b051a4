"""Write a .bitnet file (FORMAT.md) from numpy arrays. numpy only: the torch side (`from_model`)
turns a trained model into `ModelArrays`, or a checkpoint into `QuantizedTensors` that quantizes a
tensor when asked (both model_tensors.ModelTensors); the GGUF and HF writers consume the same.

The writer refuses anything FORMAT.md does not allow (it validates against `schema`, the same
rules the reader checks), writes the header and tensors in the documented order and alignment,
and renames the file into place only when it is complete.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import packing as packing_mod
from ..atomic import atomic_file
from .model_tensors import ModelTensors
from .schema import (
    DATA_ALIGN, DENSE, DTYPE_ITEMSIZE, FORMAT_NAME, QUANT_FIXED, TERNARY, FormatError,
    dense_shapes, format_version_for, linear_shapes, metadata_crc32, storage_order, stored_tensors, validate_config,
)

DENSE_DTYPE_NAMES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}


@dataclass
class ModelArrays:
    """A model ready to write: ternary linears as codes + scale, everything else dense float32."""

    config: dict  # ModelConfig dict
    eps: float  # quant eps (activation and weight scale floor)
    ternary: dict[str, tuple[np.ndarray, float]]  # linear name -> (int8 codes (out, in), s_w)
    dense: dict[str, np.ndarray]  # stored dense name (incl. hybrid "NAME.weight") -> float32 array
    tokenizer_json: str | None = None
    tokenizer_config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def kinds(self) -> dict[str, str]:
        """Logical weight -> ternary/dense, as metadata `tensors` lists them."""
        out = {n: (TERNARY if n in self.ternary else DENSE) for n in linear_shapes(self.config)}
        out.update({n: DENSE for n in dense_shapes(self.config)})
        return out

    def num_parameters(self) -> int:
        return sum(int(np.prod(s)) for s in {**linear_shapes(self.config), **dense_shapes(self.config)}.values())

    # model_tensors.ModelTensors: what the writers read, one tensor at a time
    def quantized(self, name: str) -> tuple[np.ndarray, float]:
        return self.ternary[name]

    def scale(self, name: str) -> float:
        return self.ternary[name][1]

    def dense_stored(self, name: str, dtype: str) -> np.ndarray:
        return cast_dense(name, self.dense[name], dtype)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (what torch's .to(bfloat16) does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.astype(np.uint16)


def cast_dense(name: str, x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise FormatError(f"tensor {name} has non-finite values")
    if dtype == "F32":
        return np.ascontiguousarray(x, dtype="<f4")
    if dtype == "BF16":
        return f32_to_bf16_bits(x)
    with np.errstate(over="ignore"):
        y = x.astype("<f2")
    if not np.isfinite(y).all():
        raise FormatError(f"tensor {name} has values beyond the float16 range (max |x| = {np.abs(x).max():.4g}); "
                          f"export with --dtype bf16 or fp32")
    return y


def _check_options(packing: str, dense_dtype: str) -> None:
    if packing not in packing_mod.PACKINGS:
        raise FormatError(f"unknown packing {packing!r}; expected one of {packing_mod.PACKINGS}")
    if dense_dtype not in DTYPE_ITEMSIZE or dense_dtype == "U8":
        raise FormatError(f"unknown dense dtype {dense_dtype!r}")


def _check_ternary(cfg: dict, arrays: ModelArrays) -> None:
    unknown = sorted(set(arrays.ternary) - set(linear_shapes(cfg)))
    if unknown:
        raise FormatError(f"ternary tensors that are not linears of this config: {unknown[:5]}")
    for name, (codes, scale) in arrays.ternary.items():
        n_out, n_in = linear_shapes(cfg)[name]
        if tuple(codes.shape) != (n_out, n_in):
            raise FormatError(f"tensor {name}: codes have shape {tuple(codes.shape)}, the config gives {(n_out, n_in)}")
        scale = np.float32(scale)
        if not (np.isfinite(scale) and scale > 0):
            raise FormatError(f"tensor {name}: scale {scale} is not a positive finite number")


def _metadata(cfg: dict, eps: float, kinds: dict[str, str], packing: str, dense_dtype: str, crcs: dict[str, int],
              tokenizer_json: str | None, tokenizer_config: dict, provenance: dict) -> dict[str, str]:
    logical = {**linear_shapes(cfg), **dense_shapes(cfg)}
    tensors_meta = {
        n: {"kind": kinds[n], "shape": list(s), "dtype": "U8" if kinds[n] == TERNARY else dense_dtype}
        for n, s in logical.items()
    }
    md = {
        "format": FORMAT_NAME,
        "format_version": str(format_version_for(packing)),
        "config": json.dumps(cfg, sort_keys=True),
        "quant": json.dumps({**QUANT_FIXED, "packing": packing, "eps": float(eps)}, sort_keys=True),
        "tokenizer": tokenizer_json or "",
        "tokenizer_config": json.dumps(tokenizer_config, sort_keys=True),
        "provenance": json.dumps(provenance, sort_keys=True),
        "tensors": json.dumps(tensors_meta),
    }
    md["checksums"] = json.dumps({"algorithm": "crc32", "metadata": metadata_crc32(md),
                                  "tensors": {n: crcs[n] for n in sorted(crcs)}})
    return md


def _header(metadata: dict[str, str], order: list[str], stored: dict[str, tuple[str, tuple[int, ...]]],
            length: int | None = None) -> bytes:
    """The JSON header, space-padded so the data section starts DATA_ALIGN-aligned (or to `length`)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        dtype, shape = stored[name]
        nbytes = DTYPE_ITEMSIZE[dtype] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if length is None:
        return head + b" " * ((-(8 + len(head))) % DATA_ALIGN)
    if len(head) > length:
        raise AssertionError("the final header outgrew its placeholder")  # CRCs have at most 10 digits
    return head + b" " * (length - len(head))


def write_tensors(
    path: str | os.PathLike,
    config: dict,
    eps: float,
    kinds: dict[str, str],
    produce: Callable[[str], np.ndarray],
    *,
    packing: str = packing_mod.I2_B128,
    dense_dtype: str = "F16",
    tokenizer_json: str | None = None,
    tokenizer_config: dict | None = None,
    provenance: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a .bitnet file tensor by tensor: produce(stored_name) returns the exact stored array
    (packed codes for NAME.qweight, float32 [s_w] for NAME.scale, dense tensors in dense_dtype:
    uint16 bits for F16/BF16), called once per tensor in storage order and dropped once written,
    so the peak memory is one tensor whatever the model's size. The header goes first with
    placeholder checksums of full width and is rewritten in place, same length, at the end; the
    file is renamed into place only when complete. kinds: logical weight -> ternary/dense."""
    _check_options(packing, dense_dtype)
    cfg = validate_config(dict(config))
    stored = stored_tensors(cfg, kinds, packing, dense_dtype)
    order = storage_order(stored, packing)
    extra = (tokenizer_json, dict(tokenizer_config or {}), dict(provenance or {}))
    placeholder = _header(_metadata(cfg, eps, kinds, packing, dense_dtype, {n: 0xFFFFFFFF for n in stored}, *extra),
                          order, stored)
    storage = {"U8": np.uint8, "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.uint16}
    crcs: dict[str, int] = {}
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(placeholder)))
            fh.write(placeholder)
            for name in order:
                dtype, shape = stored[name]
                a = np.asarray(produce(name))
                if tuple(a.shape) != shape:
                    raise FormatError(f"tensor {name} has shape {tuple(a.shape)}, expected {shape}")
                want = np.dtype(storage[dtype])
                if a.dtype != want and not (dtype == "F16" and a.dtype == np.uint16):
                    raise FormatError(f"tensor {name} has dtype {a.dtype}, expected {want} ({dtype})")
                data = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
                crcs[name] = zlib.crc32(data)
                fh.write(data.data)
                if progress is not None:
                    progress(data.nbytes)
                del a, data
            head = _header(_metadata(cfg, eps, kinds, packing, dense_dtype, crcs, *extra), order, stored,
                           length=len(placeholder))
            fh.seek(8)
            fh.write(head)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def write_bitnet(
    path: str | os.PathLike,
    arrays: ModelTensors,
    packing: str = packing_mod.I2_B128,
    dense_dtype: str = "F16",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write `arrays` (ModelArrays, or any model_tensors.ModelTensors) as a .bitnet file at `path`
    (atomically). progress(n) is called with bytes written. Each tensor is produced, packed or cast
    as it is written (write_tensors): the file's bytes are never all in memory at once."""
    _check_options(packing, dense_dtype)
    cfg = validate_config(dict(arrays.config))
    kinds = arrays.kinds()
    want = stored_tensors(cfg, kinds, packing, dense_dtype)
    if isinstance(arrays, ModelArrays):  # its dicts could disagree with its config; a stream is built from it
        _check_ternary(cfg, arrays)
        have = {f"{n}.{part}" for n in arrays.ternary for part in ("qweight", "scale")} | set(arrays.dense)
        missing, extra = sorted(set(want) - have), sorted(have - set(want))
        if missing or extra:
            raise FormatError(f"tensors do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")

    def produce(name: str) -> np.ndarray:
        base, _, part = name.rpartition(".")
        if kinds.get(base) == TERNARY and part == "qweight":
            try:
                return packing_mod.pack(arrays.quantized(base)[0], packing)
            except ValueError as e:
                raise FormatError(f"tensor {base}: {e}") from None
        if kinds.get(base) == TERNARY and part == "scale":
            return np.array([np.float32(arrays.scale(base))], dtype="<f4")
        return arrays.dense_stored(name, dense_dtype)

    return write_tensors(path, cfg, arrays.eps, kinds, produce, packing=packing, dense_dtype=dense_dtype,
                         tokenizer_json=arrays.tokenizer_json, tokenizer_config=arrays.tokenizer_config,
                         provenance=arrays.provenance, progress=progress)
