"""Device choice for the runtime: is CUDA usable here, and the CUDA engine's Python face. No torch.

    from bitnet_train.runtime.device import cuda_available, load_engine, DeviceError
    eng = load_engine("model.bitnet", device="cuda")   # DeviceError with a clear reason if not usable

`CudaEngine` is `Engine` (runtime/engine.py) with the model on the GPU (`_C.CudaModel`, built from
csrc/cuda/ when the build found nvcc): same `forward`, `new_cache`, properties, so `Generator` and
the CLI work on it unchanged; logits come back to host memory as float32. It adds
`greedy_decode`, which keeps the whole decode loop on the device (a CUDA graph per step).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import BitNetError
from . import _C
from .engine import Engine, _engine_config

DEVICES = ("cpu", "cuda")


class DeviceError(BitNetError):
    """A requested device that this build or machine cannot serve."""


def cuda_compiled() -> bool:
    """Whether this build of the engine includes the CUDA backend."""
    return bool(_C.cuda_compiled())


def cuda_device_count() -> int:
    """Usable CUDA devices (0 without a CUDA build, a driver or a device)."""
    return int(_C.cuda_device_count())


def cuda_available() -> bool:
    """Compiled with CUDA and at least one device present."""
    return cuda_compiled() and cuda_device_count() > 0


def require_device(device: str, index: int = 0) -> None:
    """Raise DeviceError unless `device` ("cpu" or "cuda") can run here."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return
    if not cuda_compiled():
        raise DeviceError("--device cuda: CUDA support not compiled into this build (rebuild where nvcc is on PATH, "
                          "e.g. pip install -e . with CMAKE_ARGS=-DBITNET_CUDA=ON); use --device cpu")
    n = cuda_device_count()
    if n == 0:
        raise DeviceError("--device cuda: no CUDA device found (the build has CUDA support, but no GPU or driver "
                          "is visible); use --device cpu")
    if not 0 <= index < n:
        raise DeviceError(f"--device cuda: device index {index} out of range 0 .. {n - 1}")


class CudaEngine(Engine):
    """A loaded model on the CUDA engine (one GPU)."""

    def __init__(
        self,
        config: Mapping,
        tensors: Mapping[str, np.ndarray],
        quant: Mapping | None = None,
        *,
        isa: str | None = None,
        threads: int | None = None,
        lm_head: str = "fp",
        kv_cache: str = "f32",
        device_index: int | None = None,
    ):
        """As Engine; isa and threads are accepted for the same call shape and ignored (the host
        only launches kernels); lm_head must be "fp" and kv_cache "f32" (the int8 lm_head and the
        f16 KV cache are CPU options). device_index: default BITNET_CUDA_DEVICE or 0."""
        if lm_head != "fp":
            raise DeviceError(f"lm_head={lm_head!r} is a CPU engine option; the CUDA engine runs the stored lm_head")
        if kv_cache != "f32":
            raise DeviceError(f"kv_cache={kv_cache!r} is a CPU engine option; the CUDA engine keeps an fp32 KV cache")
        self.kv_cache = "f32"
        index = int(os.environ.get("BITNET_CUDA_DEVICE", 0)) if device_index is None else int(device_index)
        require_device("cuda", index)
        entries = self._adopt(config, tensors, quant)
        self._model = _C.CudaModel(_engine_config(self.config, self.quant), entries, index)

    def isa(self) -> str:
        return "cuda"

    def new_cache(self, n_seqs: int = 1, max_len: int | None = None, dtype: str | None = None):
        """A device KV cache (fp32 only)."""
        if dtype not in (None, "f32"):
            raise DeviceError(f"KV cache dtype {dtype!r} is a CPU engine option; the CUDA engine keeps an fp32 KV cache")
        return self._model.new_cache(int(n_seqs), int(max_len or 0))

    @property
    def device_name(self) -> str:
        return str(self._model.device_name)

    def greedy_decode(self, first_tokens: Sequence[int], n_steps: int, cache=None, *,
                      seq_ids: Sequence[int] | None = None, use_graph: bool = True) -> np.ndarray:
        """Feed first_tokens[i] to sequence seq_ids[i] (default 0..B-1), then keep decoding greedily on
        the device; returns the (n_steps, B) argmax tokens (step s's token is the input of step s+1)."""
        first = np.asarray(first_tokens, dtype=np.int64).reshape(-1)
        if cache is None:
            cache = self.new_cache(len(first), n_steps)
        ids = list(range(len(first))) if seq_ids is None else [int(i) for i in seq_ids]
        return self._model.greedy_decode(cache, ids, first.astype(np.int32), int(n_steps), bool(use_graph))


def load_engine(path, device: str = "cpu", *, isa: str | None = None, threads: int | None = None,
                verify_checksums: bool = True, lm_head: str = "fp", kv_cache: str = "f32") -> Engine:
    """Engine.load on the requested device ("cpu" or "cuda"); DeviceError when it is not usable."""
    require_device(device)
    cls = CudaEngine if device == "cuda" else Engine
    return cls.load(path, isa=isa, threads=threads, verify_checksums=verify_checksums, lm_head=lm_head,
                    kv_cache=kv_cache)
