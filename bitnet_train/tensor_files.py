"""Checkpoint tensors read one at a time: the importers' and the exporter's way into weight files.

    LazyTensor          a tensor's shape and dtype now, its values when `load()` is called
    SafetensorsFile     a safetensors file's header (checked against the file), tensors read on demand
    safetensors_state   the tensors of a checkpoint's safetensors files (shards walked one at a time)
    mapped_checkpoint   a Lightning / torch.save checkpoint with its tensors memory-mapped, not read
    load_lazy_state     fill a built model from a lazy state dict, one tensor at a time
    LazyCheckpoint      an imported checkpoint before any tensor is read: config, quant, lazy state

Why not a memory map for safetensors (what safe_open does): a page of a mapped file, once touched,
stays in the process's resident set while the map is open, so walking a mapped 10 GB checkpoint
ends with 10 GB resident. Plain reads leave the file in the page cache, which the kernel reclaims.
A torch.save checkpoint is a zip of pickled records that only torch can unpickle: it is mapped
(torch.load(mmap=True)) and each tensor's pages are handed back once the tensor has been copied.

An importer describes a checkpoint as a dict {our state-dict key: LazyTensor}; building a
BitNetModel and calling load_lazy_state gives the model (training), while bitnet-export reads and
quantizes one tensor at a time from the same dict without building one.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, t) for name, t in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                                              ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, t)},
}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor whose shape and dtype are known and whose values are read by `load()` (each call reads)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @staticmethod
    def of(t: torch.Tensor) -> LazyTensor:
        """An in-memory tensor as a LazyTensor (a model's own state, a constant)."""
        return LazyTensor(tuple(t.shape), t.dtype, lambda: t)

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor], *, shape: tuple[int, ...] | None = None,
             dtype: torch.dtype | None = None) -> LazyTensor:
        """fn applied at load time; shape / dtype: of fn's result where they differ."""
        return LazyTensor(self.shape if shape is None else tuple(shape), self.dtype if dtype is None else dtype,
                          lambda: fn(self.load()))


# ---- safetensors ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # from the start of the data section
    end: int


class SafetensorsFile:
    """A safetensors file: the header parsed and checked (every tensor's bytes inside the file, its
    size what dtype and shape say), tensors read one at a time by `read(name)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    self._bad(f"{size} bytes, less than the 8-byte header length")
                n = int.from_bytes(head, "little")
                if n > min(MAX_HEADER_BYTES, size - 8):
                    self._bad(f"header length {n} exceeds the file ({size} bytes) or {MAX_HEADER_BYTES} bytes")
                raw = fh.read(n)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror or e}") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._bad(f"the header is not JSON ({e})")
        if not isinstance(header, dict):
            self._bad("the header is not a JSON object")
        self.data_start = 8 + n
        data_bytes = size - self.data_start
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, _Entry] = {}
        for name, e in header.items():
            if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                self._bad(f"tensor {name!r}: expected {{dtype, shape, data_offsets}}, got {e!r:.200}")
            dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                self._bad(f"tensor {name!r} has dtype {dtype!r}, expected one of {', '.join(SAFETENSORS_DTYPES)}")
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                self._bad(f"tensor {name!r} has shape {shape!r:.200}, expected a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] <= data_bytes):
                self._bad(f"tensor {name!r} has data_offsets {offsets!r:.200}, outside the {data_bytes}-byte data section")
            entry = _Entry(dtype, tuple(shape), offsets[0], offsets[1])
            want = math.prod(entry.shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
            if entry.end - entry.start != want:
                self._bad(f"tensor {name!r}: {entry.end - entry.start} bytes, but {dtype} {list(shape)} needs {want}")
            self.entries[name] = entry

    def _bad(self, why: str):
        raise CheckpointError(f"{self.path}: not a readable safetensors file: {why}")

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name`, read from the file now (plain reads, not a memory map)."""
        e = self.entries[name]
        buf = torch.empty(e.end - e.start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        try:
            with open(self.path, "rb", buffering=0) as fh:
                fh.seek(self.data_start + e.start)
                done = 0
                while done < len(view):  # one read() returns at most ~2 GiB
                    got = fh.readinto(view[done:])
                    if not got:
                        self._bad(f"tensor {name!r} is truncated (the file shrank after it was opened)")
                    done += got
        except OSError as err:
            raise CheckpointError(f"cannot read {self.path}: {err.strerror or err}") from None
        return buf.view(SAFETENSORS_DTYPES[e.dtype]).reshape(e.shape)

    def lazy(self, name: str) -> LazyTensor:
        e = self.entries[name]
        return LazyTensor(e.shape, SAFETENSORS_DTYPES[e.dtype], lambda: self.read(name))


def safetensors_state(files: list[Path]) -> dict[str, LazyTensor]:
    """{tensor name: LazyTensor} over a checkpoint's safetensors files (one, or the shards of an
    index); only headers are read here. A name in two shards is refused."""
    state: dict[str, LazyTensor] = {}
    for file in files:
        f = SafetensorsFile(file)
        for name in f.entries:
            if name in state:
                raise CheckpointError(f"{file}: tensor {name} also appears in another shard")
            state[name] = f.lazy(name)
    return state


# ---- torch.save checkpoints -------------------------------------------------------------------

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_libc = ctypes.CDLL(None, use_errno=True) if _MADV_DONTNEED is not None and os.name == "posix" else None


def _drop_mapped_pages(t: torch.Tensor) -> None:
    """Hand the pages of a file-mapped tensor back to the kernel. Only for a private mapping of a file
    that is never written (torch.load(mmap=True)): a later access reads the file again."""
    if _libc is None:
        return
    storage = t.untyped_storage()
    start, nbytes = storage.data_ptr(), storage.nbytes()
    if nbytes == 0:
        return
    lo = start // _PAGE * _PAGE
    hi = -(-(start + nbytes) // _PAGE) * _PAGE
    _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)  # best effort


def mapped_checkpoint(path: str | os.PathLike) -> tuple[object, Callable[[torch.Tensor], LazyTensor]]:
    """(the unpickled checkpoint, lazy) for a torch.save file. Its tensors are views of a memory map,
    read by nothing yet; lazy(t) gives a LazyTensor whose load() copies t and drops its mapped pages,
    so a walk over every tensor keeps one resident at a time. A checkpoint is a pickle: load only
    checkpoints you trust. A file torch cannot map (the legacy, non-zip format) is read whole."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        mapped = True
    except Exception:  # legacy format: mmap refused; a bad file fails again below with its own error
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # torch raises many types for a bad file
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
        mapped = False

    def lazy(t: torch.Tensor) -> LazyTensor:
        if not mapped:
            return LazyTensor.of(t)

        def load() -> torch.Tensor:
            out = t.clone(memory_format=torch.contiguous_format)
            _drop_mapped_pages(t)
            return out

        return LazyTensor(tuple(t.shape), t.dtype, load)

    return ckpt, lazy


# ---- models -----------------------------------------------------------------------------------

def state_shapes(state: Mapping[str, torch.Tensor | LazyTensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def load_lazy_state(model: torch.nn.Module, state: Mapping[str, LazyTensor], source: str) -> None:
    """model.load_state_dict(strict) for a lazy state, one tensor read at a time: the names and shapes
    are checked first (errors name the tensor), then each is copied into the model and dropped. A
    LazyTensor given for two keys of one shared parameter (tied embeddings) is read once."""
    from .model_dir import check_state

    own = model.state_dict()
    check_state(state_shapes(own), state_shapes(state), source)
    filled: dict[int, int] = {}  # id(LazyTensor) -> data_ptr of the parameter it filled
    with torch.no_grad():
        for key, target in own.items():
            lazy = state[key]
            if filled.get(id(lazy)) == target.data_ptr():
                continue
            target.copy_(lazy.load())
            filled[id(lazy)] = target.data_ptr()


@dataclass
class LazyCheckpoint:
    """An imported checkpoint with nothing read but headers: the model and quant config, the state
    dict under our names (checked against the model's names and shapes), the tokenizer, and the
    importer's source_info. build_model() reads it into a BitNetModel; bitnet-export reads it tensor
    by tensor instead."""

    config: object  # ModelConfig
    quant: object  # QuantConfig (keep_high_precision included)
    state: dict[str, LazyTensor]
    tokenizer: object | None  # PreTrainedTokenizerFast
    info: dict
    source: str  # names the checkpoint in errors

    def __post_init__(self):
        from .model_dir import check_state

        own = meta_model(self.config, self.quant).state_dict()
        for key, t in own.items():  # quant.learnable_scale: not set, the first forward sets it to mean|W|
            if key.endswith((".log_scale", ".scale_set")) and key not in self.state:
                self.state[key] = LazyTensor.of(torch.zeros(t.shape, dtype=t.dtype))
        check_state(state_shapes(own), state_shapes(self.state), self.source)

    def build_model(self):
        """The BitNetModel on CPU (fp32, eval mode), filled one tensor at a time."""
        from .model import BitNetModel

        model = BitNetModel(self.config, self.quant)
        load_lazy_state(model, self.state, self.source)
        return model.eval()


def meta_model(cfg, quant):
    """A BitNetModel on the meta device (no memory): its state-dict names, shapes and BitLinear settings."""
    from .model import BitNetModel

    with torch.device("meta"):
        return BitNetModel(cfg, quant)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (weight files can be tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
