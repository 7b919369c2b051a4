"""Read a .bitnet file: validate everything (FORMAT.md section 7), then hand out memory-mapped views.

numpy + the standard library only; never torch (the runtime uses this reader).

    with open_model("model.bitnet") as f:
        f.config["hidden_size"], f.quant["packing"]
        f.ternary_layers()                      # {"layers.0.self_attn.q_proj": (out, in), ...}
        f.tensor("layers.0.self_attn.q_proj.qweight")   # read-only view into the file
        f.dequantize("layers.0.self_attn.q_proj")       # float32 (out, in) = codes * s_w
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import packing as packing_mod
from .schema import (
    DENSE, DENSE_DTYPES, DTYPE_ITEMSIZE, FORMAT_NAME, MAX_HEADER_BYTES, METADATA_KEYS, READ_VERSIONS,
    TERNARY, FormatError, loads_strict, logical_tensor_count, logical_tensors, linear_shapes, metadata_crc32,
    stored_tensors,
    validate_config, validate_quant,
)

# numpy has no bfloat16: BF16 tensors are handed out as their raw uint16 bits (see `dense`).
NP_DTYPES = {"U8": np.dtype("u1"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F32": np.dtype("<f4")}


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class BitNetFile:
    """A validated .bitnet file. Tensors are read-only views into one read-only memory map."""

    def __init__(self, path: Path, header: dict, data_start: int, verify_checksums: bool):
        self.path = path
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self.metadata: dict[str, str] = header["__metadata__"]
        self._validate_metadata()
        self._validate_tensor_set()
        self._data_start = data_start
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if data_start < path.stat().st_size else np.zeros(0, np.uint8)
        if verify_checksums:
            self._verify_checksums()
        self._validate_scales()

    # ---- public API ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Stored tensor names, sorted."""
        return sorted(self._entries)

    def tensor(self, name: str) -> np.ndarray:
        """The stored tensor as a read-only view into the file (BF16 as raw uint16 bits)."""
        e = self._entries.get(name)
        if e is None:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        if self._map is None:
            raise FormatError(f"{self.path}: the file is closed")
        begin, end = e["data_offsets"]
        raw = self._map[self._data_start + begin:self._data_start + end]
        view = raw.view(NP_DTYPES[e["dtype"]]).reshape(e["shape"])
        view.flags.writeable = False
        return view

    def ternary_layers(self) -> dict[str, tuple[int, int]]:
        """Ternary linears -> (out, in) (logical, unpadded), in model order."""
        return {n: s for n, s in linear_shapes(self.config).items() if self.kinds[n] == TERNARY}

    def dense_layers(self) -> dict[str, tuple[int, int]]:
        """High-precision (hybrid) linears -> (out, in)."""
        return {n: s for n, s in linear_shapes(self.config).items() if self.kinds[n] == DENSE}

    def codes(self, name: str) -> np.ndarray:
        """Ternary linear NAME -> int8 codes (out, in). FormatError on invalid or dirty padding codes."""
        shape = self.ternary_layers().get(name)
        if shape is None:
            raise FormatError(f"{self.path}: {name!r} is not a ternary linear")
        try:
            return packing_mod.unpack(self.tensor(f"{name}.qweight"), shape[1], self.quant["packing"])
        except ValueError as e:
            raise FormatError(f"{self.path}: tensor {name}.qweight: {e}") from None

    def scale(self, name: str) -> np.float32:
        return self.tensor(f"{name}.scale")[0]

    def dense(self, name: str) -> np.ndarray:
        """A stored dense tensor as float32 (a copy)."""
        t = self.tensor(name)
        return bf16_bits_to_f32(t) if self.dense_dtype == "BF16" else t.astype(np.float32)

    def dequantize(self, name: str) -> np.ndarray:
        """Logical weight NAME as float32: codes * s_w for a ternary linear (exactly what the training
        forward multiplies with), the stored values for a dense one (`NAME` or `NAME.weight`)."""
        if name in self.kinds and self.kinds[name] == TERNARY:
            return self.codes(name).astype(np.float32) * self.scale(name)
        if name in self._entries:
            return self.dense(name)
        if f"{name}.weight" in self._entries:
            return self.dense(f"{name}.weight")
        raise FormatError(f"{self.path}: no logical weight named {name!r}")

    def close(self) -> None:
        self._map = None  # views handed out keep the mapping alive until they are dropped

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- validation ---------------------------------------------------------------------------

    def _meta_json(self, key: str):
        return loads_strict(self.metadata[key], f"{self.path}: metadata {key!r}")

    def _validate_metadata(self) -> None:
        md, p = self.metadata, self.path
        if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
            raise FormatError(f"{p}: __metadata__ must map strings to strings")
        if md.get("format") != FORMAT_NAME:
            raise FormatError(f"{p}: metadata 'format' is {md.get('format')!r}, expected {FORMAT_NAME!r}")
        if md.get("format_version") not in [str(v) for v in READ_VERSIONS]:
            raise FormatError(f"{p}: format_version {md.get('format_version')!r} is not supported "
                              f"(this reader reads versions {', '.join(map(str, READ_VERSIONS))})")
        self.format_version = int(md["format_version"])
        unknown, missing = sorted(set(md) - set(METADATA_KEYS)), sorted(set(METADATA_KEYS) - set(md))
        if unknown or missing:
            raise FormatError(f"{p}: metadata keys missing {missing}, unexpected {unknown}")
        try:
            self.config = validate_config(self._meta_json("config"))
            self.quant = validate_quant(self._meta_json("quant"), self.format_version)
        except FormatError as e:
            raise FormatError(f"{p}: {e}") from None
        self.tokenizer_json: str | None = md["tokenizer"] or None
        if self.tokenizer_json is not None and not isinstance(self._meta_json("tokenizer"), dict):
            raise FormatError(f"{p}: metadata 'tokenizer' must be a tokenizer.json object or empty")
        self.tokenizer_config = self._meta_json("tokenizer_config")
        self.provenance = self._meta_json("provenance")
        for key in ("tokenizer_config", "provenance"):
            if not isinstance(getattr(self, key), dict):
                raise FormatError(f"{p}: metadata {key!r} must be a JSON object")
        self._validate_tensors_meta(self._meta_json("tensors"))
        ck = self._meta_json("checksums")
        if (not isinstance(ck, dict) or set(ck) != {"algorithm", "metadata", "tensors"} or ck["algorithm"] != "crc32"
                or not _is_u32(ck["metadata"]) or not isinstance(ck["tensors"], dict)
                or not all(_is_u32(v) for v in ck["tensors"].values())):
            raise FormatError(f"{p}: metadata 'checksums' must be {{'algorithm': 'crc32', 'metadata': u32, "
                              f"'tensors': {{name: u32}}}}")
        self.checksums = ck

    def _validate_tensors_meta(self, tensors) -> None:
        p = self.path
        if not isinstance(tensors, dict):
            raise FormatError(f"{p}: metadata 'tensors' must be a JSON object")
        count = logical_tensor_count(self.config)
        if count > 4 * len(tensors) + 64:  # before anything is built per layer: a config may claim 10^12 layers
            raise FormatError(f"{p}: metadata 'tensors' lists {len(tensors)} tensors; the config "
                              f"(num_layers {self.config['num_layers']}, norm {self.config['norm']!r}) needs {count}")
        expected = logical_tensors(self.config)
        missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unknown:
            raise FormatError(f"{p}: metadata 'tensors' does not match the config: missing {missing[:5]}, "
                              f"unexpected {unknown[:5]}")
        linears = linear_shapes(self.config)
        dense_dtypes = set()
        self.kinds: dict[str, str] = {}
        for name, shape in expected.items():
            t = tensors[name]
            if not isinstance(t, dict) or set(t) != {"kind", "shape", "dtype"}:
                raise FormatError(f"{p}: metadata tensors[{name!r}] must have exactly kind, shape, dtype")
            allowed = (TERNARY, DENSE) if name in linears else (DENSE,)
            if t["kind"] not in allowed:
                raise FormatError(f"{p}: tensors[{name!r}].kind is {t['kind']!r}, expected one of {allowed}")
            if t["shape"] != list(shape):
                raise FormatError(f"{p}: tensors[{name!r}].shape is {t['shape']!r}, the config gives {list(shape)}")
            if t["kind"] == TERNARY:
                if t["dtype"] != "U8":
                    raise FormatError(f"{p}: tensors[{name!r}].dtype is {t['dtype']!r}, expected 'U8'")
            else:
                if t["dtype"] not in DENSE_DTYPES:
                    raise FormatError(f"{p}: tensors[{name!r}].dtype is {t['dtype']!r}, expected one of {DENSE_DTYPES}")
                dense_dtypes.add(t["dtype"])
            self.kinds[name] = t["kind"]
        if len(dense_dtypes) != 1:
            raise FormatError(f"{p}: dense tensors must share one dtype, found {sorted(dense_dtypes)}")
        self.dense_dtype = dense_dtypes.pop()

    def _validate_tensor_set(self) -> None:
        p = self.path
        want = stored_tensors(self.config, self.kinds, self.quant["packing"], self.dense_dtype)
        missing, unknown = sorted(set(want) - set(self._entries)), sorted(set(self._entries) - set(want))
        if missing:
            raise FormatError(f"{p}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unknown:
            raise FormatError(f"{p}: unexpected tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        for name, (dtype, shape) in want.items():
            e = self._entries[name]
            if e["dtype"] != dtype or tuple(e["shape"]) != shape:
                raise FormatError(f"{p}: tensor {name} is {e['dtype']} {tuple(e['shape'])}, expected {dtype} {shape}")
        if set(self.checksums["tensors"]) != set(want):
            raise FormatError(f"{p}: metadata checksums.tensors does not list exactly the stored tensors")

    def _verify_checksums(self) -> None:
        """CRC-32 of every tensor, on one thread per core: zlib.crc32 releases the GIL, and a 70B
        file's 17 GB take ~6 s on one thread from the page cache. The first mismatch in file order
        is reported, as a sequential check would."""
        if metadata_crc32(self.metadata) != self.checksums["metadata"]:
            raise FormatError(f"{self.path}: metadata checksum mismatch (the header is corrupt)")
        names = list(self.checksums["tensors"])

        def ok(name: str) -> bool:
            return zlib.crc32(self.tensor(name).view(np.uint8).reshape(-1)) == self.checksums["tensors"][name]

        workers = min(len(names), os.cpu_count() or 1) or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(ok, names))
        for name, good in zip(names, results):
            if not good:
                raise FormatError(f"{self.path}: tensor {name}: checksum mismatch (data is corrupt)")

    def _validate_scales(self) -> None:
        for name in self.ternary_layers():
            s = self.scale(name)
            if not (np.isfinite(s) and s > 0):
                raise FormatError(f"{self.path}: tensor {name}.scale is {s}, expected a positive finite number")


def _is_u32(v) -> bool:
    return type(v) is int and 0 <= v < 2**32


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parse and structurally validate the safetensors header -> (header dict, data section start)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if size < 8 or len(head) < 8:
                raise FormatError(f"{path}: file is {size} bytes, too short for a .bitnet header (>= 8)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise FormatError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            if n > MAX_HEADER_BYTES or n < 2:
                raise FormatError(f"{path}: header length {n} is outside [2, {MAX_HEADER_BYTES}]")
            raw = fh.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise FormatError(f"{path}: file shrank while reading the header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: header is not UTF-8 ({e.reason} at byte {8 + e.start})") from None
    body = text.rstrip(" ")
    if not body.startswith("{") or not body.endswith("}"):
        raise FormatError(f"{path}: header must be one JSON object padded with spaces")
    header = loads_strict(body, f"{path}: header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object")
    if not isinstance(header.get("__metadata__"), dict):
        raise FormatError(f"{path}: header has no __metadata__ object")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{path}: tensor {name}: header entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPE_ITEMSIZE:
            raise FormatError(f"{path}: tensor {name}: dtype {dtype!r} is not one of {sorted(DTYPE_ITEMSIZE)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise FormatError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs):
            raise FormatError(f"{path}: tensor {name}: data_offsets {offs!r} is not [begin, end]")
        begin, end = offs
        nbytes = DTYPE_ITEMSIZE[dtype] * math.prod(shape)
        if not 0 <= begin <= end <= data_len:
            raise FormatError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] are outside the data section "
                              f"(0..{data_len})")
        if end - begin != nbytes:
            raise FormatError(f"{path}: tensor {name}: data_offsets span {end - begin} bytes, "
                              f"{dtype} {tuple(shape)} needs {nbytes}")
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a hole at data offset {pos}"
            raise FormatError(f"{path}: tensor {name}: {what}")
        pos = end
    if pos != data_len:
        raise FormatError(f"{path}: {data_len - pos} bytes after the last tensor (the file is longer than its header says)")
    return header, data_start


def open_model(path: str | os.PathLike, verify_checksums: bool = True) -> BitNetFile:
    """Validate and memory-map a .bitnet file. Raises FormatError naming what is wrong."""
    path = Path(path)
    header, data_start = read_header(path)
    return BitNetFile(path, header, data_start, verify_checksums)
