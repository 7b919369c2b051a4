"""The CPU engine's Python face: load a model, run forward passes with a KV cache. No torch.

    eng = Engine.load("model.bitnet")              # validated by bitnet_train.export.reader
    logits = eng.forward([[1, 2, 3]])              # (1, 3, vocab) float32, fresh cache
    cache = eng.new_cache(n_seqs=2)
    last = eng.forward([[5, 6, 7], [8]], cache=cache, last_only=True)   # ragged prefill -> (2, vocab)
    last = eng.forward([[9], [10]], cache=cache, last_only=True)        # one decode step each

Weights are borrowed, not copied: the C++ model keeps pointers into the numpy arrays (memory maps
of the file) and this object keeps the arrays alive. Ternary weights are read in place: i2_b128
(2 bits) and t3_b160 (1.6 bits) alike, so a model needs no second copy in RAM; only a version-1
t3_b5 file is repacked to i2_b128 at load (one copy). Dense matrices stay fp16/bf16/fp32 and are
converted in the kernels; norm vectors are copied to fp32 at load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import _C

KVCache = _C.KVCache

_CONFIG_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "max_seq_len", "rope_theta", "rms_norm_eps", "tie_embeddings", "norm", "ffn", "qkv_bias", "qk_norm",
}
_INFORMATIONAL_KEYS = {"init_std"}


def _dtype_tag(name: str, a: np.ndarray) -> str:
    """numpy dtype -> engine dtype tag. uint16 arrays are bfloat16 bits (how the reader hands BF16 out)."""
    if a.dtype == np.uint8:
        return "u8"
    if a.dtype == np.float32:
        return "f32"
    if a.dtype == np.float16:
        return "f16"
    if a.dtype == np.uint16 or a.dtype.name == "bfloat16":
        return "bf16"
    raise ValueError(f"tensor {name!r} has dtype {a.dtype}; expected uint8 (ternary codes), float32, float16 "
                     f"or uint16 (bfloat16 bits)")


def _engine_config(config: Mapping, quant: Mapping | None) -> _C.ModelConfig:
    unknown = set(config) - _CONFIG_KEYS - _INFORMATIONAL_KEYS
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    quant = dict(quant or {})
    if quant.get("method", "b1.58") != "b1.58":
        raise ValueError(f"quant method {quant.get('method')!r} is not served; expected 'b1.58'")
    if quant.get("weight_scale", "multiply") != "multiply":
        raise ValueError(f"quant weight_scale {quant.get('weight_scale')!r}; the engine computes W = c * s_w ('multiply')")
    c = _C.ModelConfig()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "max_seq_len"):
        if key not in config:
            raise ValueError(f"model config lacks {key!r}")
        setattr(c, key, int(config[key]))
    head_dim = config.get("head_dim")
    if head_dim is None:
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
        head_dim = c.hidden_size // c.num_heads
    c.head_dim = int(head_dim)
    c.rope_theta = float(config.get("rope_theta", 10000.0))
    c.rms_norm_eps = float(config.get("rms_norm_eps", 1e-6))
    c.tie_embeddings = bool(config.get("tie_embeddings", False))
    c.norm = str(config.get("norm", "subln"))
    c.ffn = str(config.get("ffn", "swiglu"))
    c.qkv_bias = bool(config.get("qkv_bias", False))
    c.qk_norm = bool(config.get("qk_norm", False))
    c.act_eps = float(quant.get("eps", 1e-5))
    c.packing = str(quant.get("packing", "i2_b128"))  # i2_b128 | t3_b160 (ValueError for others)
    c.validate()
    return c


LM_HEAD_CHOICES = ("fp", "int8")
IN_PLACE_PACKINGS = ("i2_b128", "t3_b160")  # what the engines read as stored
KV_CACHE_CHOICES = ("f32", "f16")


def _check_kv_cache(kv_cache: str) -> str:
    if kv_cache not in KV_CACHE_CHOICES:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_CHOICES}, got {kv_cache!r}")
    return kv_cache


class Engine:
    """A loaded model on the CPU engine."""

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
    ):
        """config: the model config dict (bitnet_train.model.ModelConfig fields); tensors: stored names
        (FORMAT.md section 2) -> arrays, ternary linears as `NAME.qweight` (uint8, packed as
        quant["packing"]: i2_b128 or t3_b160, both used in place) + `NAME.scale`;
        quant: the file's quant dict (eps, packing). isa: None/"auto" (BITNET_ISA or the best), "scalar",
        "avx2", "avx512", "amx". lm_head: "fp" (as stored) or "int8" (per-row int8 made at load: half the
        bytes of fp16 per decoded token, at the perplexity cost measured in bench/README.md).
        kv_cache: the dtype of the caches new_cache makes by default: "f32" (what training computes)
        or "f16" (half the cache bytes a decode step reads; cost in bench/README.md)."""
        if lm_head not in LM_HEAD_CHOICES:
            raise ValueError(f"lm_head must be one of {LM_HEAD_CHOICES}, got {lm_head!r}")
        self.kv_cache = _check_kv_cache(kv_cache)
        entries = self._adopt(config, tensors, quant)
        self._model = _C.Model(_engine_config(self.config, self.quant), entries, isa or "")
        self.threads = threads if threads is not None else int(os.environ.get("BITNET_THREADS", 0)) or _C.default_threads()
        if lm_head == "int8":
            self._model.use_int8_lm_head()

    def _adopt(self, config: Mapping, tensors: Mapping[str, np.ndarray], quant: Mapping | None) -> list:
        """Keep config/quant and turn tensors into the engine's (name, array, dtype tag) entries.
        Ternary codes are used in place (they must be C-contiguous); other arrays are copied only
        when they are not contiguous."""
        packing = (quant or {}).get("packing", "i2_b128")
        if packing not in IN_PLACE_PACKINGS:
            raise ValueError(f"tensors must be packed {' or '.join(IN_PLACE_PACKINGS)}, got {packing!r} "
                             f"({type(self).__name__}.load repacks t3_b5 files)")
        self.config = dict(config)
        self.quant = dict(quant or {})
        entries = []
        for name, a in tensors.items():
            a = np.asarray(a)
            if a.dtype.name == "bfloat16":
                a = a.view(np.uint16)
            tag = _dtype_tag(name, a)
            if not a.flags.c_contiguous:
                if tag == "u8":
                    raise ValueError(f"tensor {name!r} (ternary codes) must be C-contiguous")
                a = np.ascontiguousarray(a)
            entries.append((name, a, tag))
        return entries

    @classmethod
    def load(cls, path: str | os.PathLike, *, isa: str | None = None, threads: int | None = None,
             verify_checksums: bool = True, lm_head: str = "fp", kv_cache: str = "f32") -> "Engine":
        """Open and validate a .bitnet file (bitnet_train.export.reader) and serve it."""
        from bitnet_train.export import packing as packing_mod  # numpy only
        from bitnet_train.export.reader import open_model

        f = open_model(Path(path), verify_checksums=verify_checksums)
        quant = dict(f.quant)
        tensors = {}
        if quant["packing"] in IN_PLACE_PACKINGS:  # the memory map's bytes, no copy
            tensors = {n: f.tensor(n) for n in f.names}
        else:  # t3_b5 (format version 1, 1.6 bits) -> i2_b128 at load: a second copy of the codes
            for n in f.names:
                tensors[n] = f.tensor(n)
            for name in f.ternary_layers():
                tensors[f"{name}.qweight"] = packing_mod.pack_i2_b128(f.codes(name))
            quant["packing"] = "i2_b128"
        eng = cls(f.config, tensors, quant, isa=isa, threads=threads, lm_head=lm_head, kv_cache=kv_cache)
        eng.tokenizer_json = f.tokenizer_json
        eng.tokenizer_config = f.tokenizer_config
        eng.path = Path(path)
        return eng

    # ---- properties ---------------------------------------------------------------------------

    def isa(self) -> str:
        """The kernel path in use: "scalar", "avx2", "avx512" or "amx"."""
        return self._model.isa

    @property
    def threads(self) -> int:
        return self._model.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self._model.threads = int(n)

    @property
    def lm_head(self) -> str:
        """"int8" when the lm_head runs as per-row int8, else "fp"."""
        return "int8" if getattr(self._model, "int8_lm_head", False) else "fp"

    @property
    def vocab_size(self) -> int:
        return int(self._model.config.vocab_size)

    @property
    def max_seq_len(self) -> int:
        return int(self._model.config.max_seq_len)

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a decode step reads (ternary + dense linears + lm_head + one embedding row)."""
        return int(self._model.weight_bytes_per_token)

    # ---- compute ------------------------------------------------------------------------------

    def new_cache(self, n_seqs: int = 1, max_len: int | None = None, dtype: str | None = None) -> KVCache:
        """A KV cache of n_seqs independent sequences of up to max_len (default max_seq_len) tokens;
        dtype "f32" or "f16" (default: the engine's kv_cache)."""
        return self._model.new_cache(int(n_seqs), int(max_len or 0), _check_kv_cache(dtype or self.kv_cache))

    def forward(
        self,
        tokens,
        cache: KVCache | None = None,
        *,
        seq_ids: Sequence[int] | None = None,
        last_only: bool = False,
    ):
        """Run new tokens through the model.

        tokens: (B, T) or (T,) ints, or a list of B token lists of different lengths (ragged).
        cache: appends to its sequences seq_ids (default 0..B-1); None uses a fresh cache.
        Returns float32 logits: (B, T, vocab) for rectangular input (one row per new token), a list of
        (T_i, vocab) arrays for ragged input, or (B, vocab) for the last new token with last_only.
        A 1-D input gives the same without the B axis.
        """
        squeeze = False
        if isinstance(tokens, np.ndarray) or (isinstance(tokens, Sequence) and tokens and np.isscalar(tokens[0])):
            arr = np.asarray(tokens)
            if arr.ndim == 1:
                arr, squeeze = arr[None, :], True
            if arr.ndim != 2:
                raise ValueError(f"tokens must be 1-D or 2-D, got shape {arr.shape}")
            seqs = list(arr)
            ragged = False
        else:
            seqs = [np.asarray(t) for t in tokens]
            ragged = len({len(s) for s in seqs}) > 1
        if not seqs:
            raise ValueError("tokens is empty")
        for i, s in enumerate(seqs):
            if s.ndim != 1 or not np.issubdtype(s.dtype, np.integer):
                raise ValueError(f"sequence {i} must be a 1-D array of integer token ids")
            if s.size and (s.min() < -(2**31) or s.max() >= 2**31):
                raise ValueError(f"sequence {i} has token ids outside int32")
        if cache is None:
            cache = self.new_cache(len(seqs), max(len(s) for s in seqs))
        ids = list(range(len(seqs))) if seq_ids is None else [int(i) for i in seq_ids]
        out = self._model.forward(cache, ids, [s.astype(np.int32) for s in seqs], not last_only)
        if last_only:
            return out[0] if squeeze else out
        if ragged:
            bounds = np.cumsum([0] + [len(s) for s in seqs])
            return [out[bounds[i]:bounds[i + 1]] for i in range(len(seqs))]
        res = out.reshape(len(seqs), len(seqs[0]), -1)
        return res[0] if squeeze else res
