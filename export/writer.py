"""Write a .bitnet file (FORMAT.md) from numpy arrays. numpy only: the torch side (`from_model`)
turns a trained model into `ModelArrays`; the GGUF and HF writers consume the same arrays.

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
from .atomic import atomic_file
from .schema import (
    DATA_ALIGN, DENSE, DTYPE_ITEMSIZE, FORMAT_NAME, FORMAT_VERSION, QUANT_FIXED, TERNARY, FormatError,
    dense_shapes, linear_shapes, metadata_crc32, storage_order, stored_tensors, validate_config,
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


def build_tensors(arrays: ModelArrays, packing: str, dense_dtype: str) -> dict[str, np.ndarray]:
    """Stored name -> the exact array written, checked against the schema's expected set."""
    cfg = validate_config(dict(arrays.config))
    kinds = arrays.kinds()
    want = stored_tensors(cfg, kinds, packing, dense_dtype)
    unknown = sorted(set(arrays.ternary) - set(linear_shapes(cfg)))
    if unknown:
        raise FormatError(f"ternary tensors that are not linears of this config: {unknown[:5]}")
    out: dict[str, np.ndarray] = {}
    for name, (codes, scale) in arrays.ternary.items():
        n_out, n_in = linear_shapes(cfg)[name]
        if tuple(codes.shape) != (n_out, n_in):
            raise FormatError(f"tensor {name}: codes have shape {tuple(codes.shape)}, the config gives {(n_out, n_in)}")
        scale = np.float32(scale)
        if not (np.isfinite(scale) and scale > 0):
            raise FormatError(f"tensor {name}: scale {scale} is not a positive finite number")
        try:
            out[f"{name}.qweight"] = packing_mod.pack(codes, packing)
        except ValueError as e:
            raise FormatError(f"tensor {name}: {e}") from None
        out[f"{name}.scale"] = np.array([scale], dtype="<f4")
    for name, x in arrays.dense.items():
        out[name] = cast_dense(name, x, dense_dtype)
    missing, extra = sorted(set(want) - set(out)), sorted(set(out) - set(want))
    if missing or extra:
        raise FormatError(f"tensors do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (dtype, shape) in want.items():
        if tuple(out[name].shape) != shape:
            raise FormatError(f"tensor {name} has shape {tuple(out[name].shape)}, expected {shape}")
    return out


def build_metadata(arrays: ModelArrays, packing: str, dense_dtype: str, tensors: dict[str, np.ndarray]) -> dict[str, str]:
    cfg = arrays.config
    logical = {**linear_shapes(cfg), **dense_shapes(cfg)}
    kinds = arrays.kinds()
    tensors_meta = {
        n: {"kind": kinds[n], "shape": list(s), "dtype": "U8" if kinds[n] == TERNARY else dense_dtype}
        for n, s in logical.items()
    }
    md = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(cfg, sort_keys=True),
        "quant": json.dumps({**QUANT_FIXED, "packing": packing, "eps": float(arrays.eps)}, sort_keys=True),
        "tokenizer": arrays.tokenizer_json or "",
        "tokenizer_config": json.dumps(arrays.tokenizer_config, sort_keys=True),
        "provenance": json.dumps(arrays.provenance, sort_keys=True),
        "tensors": json.dumps(tensors_meta),
    }
    md["checksums"] = json.dumps({
        "algorithm": "crc32",
        "metadata": metadata_crc32(md),
        "tensors": {n: zlib.crc32(t.view(np.uint8).reshape(-1)) for n, t in sorted(tensors.items())},
    })
    return md


def write_bitnet(
    path: str | os.PathLike,
    arrays: ModelArrays,
    packing: str = packing_mod.I2_B128,
    dense_dtype: str = "F16",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write `arrays` as a .bitnet file at `path` (atomically). progress(n) is called with bytes written."""
    if packing not in packing_mod.PACKINGS:
        raise FormatError(f"unknown packing {packing!r}; expected one of {packing_mod.PACKINGS}")
    if dense_dtype not in DTYPE_ITEMSIZE or dense_dtype == "U8":
        raise FormatError(f"unknown dense dtype {dense_dtype!r}")
    tensors = build_tensors(arrays, packing, dense_dtype)
    metadata = build_metadata(arrays, packing, dense_dtype, tensors)
    dtypes = {n: ("U8" if n.endswith(".qweight") else "F32" if n.endswith(".scale") else dense_dtype) for n in tensors}
    order = storage_order({n: (dtypes[n], tensors[n].shape) for n in tensors}, packing)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        nbytes = tensors[name].nbytes
        header[name] = {"dtype": dtypes[name], "shape": list(tensors[name].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * ((-(8 + len(head))) % DATA_ALIGN)  # data section starts DATA_ALIGN-aligned
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for name in order:
                fh.write(np.ascontiguousarray(tensors[name]).view(np.uint8).reshape(-1).data)
                if progress is not None:
                    progress(tensors[name].nbytes)
            fh.flush()
            os.fsync(fh.fileno())
    return path
