"""Engine speed: prefill and decode tokens/s, bytes per decoded token, fraction of measured bandwidth.

    eng = Engine(*random_model("bitnet-large", max_seq_len=193), threads=2)   # or Engine.load(path)
    figures = measure_speed(eng, prefill=128, decode=64)                        # a flat dict

Random ternary weights for the DESIGN.md bench shapes (speed, not quality): `random_model` builds
them packed in memory (fast, no file); `write_random_model` writes a .bitnet file of the shape.
Shared by `bitnet-run bench` and bench/runtime_cpu.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from . import _C

# DESIGN.md "Runtime principles": bench shapes
SHAPES = {
    "bitnet-large": dict(num_layers=24, hidden_size=1536, intermediate_size=4096, num_heads=16, num_kv_heads=16,
                         vocab_size=32002, ffn="swiglu"),
    "bitnet-2b": dict(num_layers=30, hidden_size=2560, intermediate_size=6912, num_heads=20, num_kv_heads=5,
                      vocab_size=128256, ffn="relu2"),
    "smollm2-135m": dict(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                         vocab_size=49152, ffn="swiglu"),
}


def _dims(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int | None = None, vocab: int = 32002,
          **extra) -> dict:
    return dict(num_layers=layers, hidden_size=hidden, intermediate_size=ffn, num_heads=heads,
                num_kv_heads=heads if kv_heads is None else kv_heads, vocab_size=vocab, ffn="swiglu", **extra)


# bitnet.cpp's dummy-model layouts (utils/generate-dummy-bitnet-model.py: MHA, vocab 32002), by size
for _name, _d in {"125m": (768, 3072, 11, 12), "350m": (1024, 3072, 24, 16), "1b": (2048, 3584, 24, 32),
                  "1.5b": (1536, 9216, 28, 32), "2.7b": (3072, 7680, 24, 32), "3.8b": (3840, 8192, 24, 32),
                  "7b": (4096, 12032, 32, 32), "13b": (5120, 13824, 40, 40), "30b": (6656, 16384, 60, 52),
                  "70b": (8192, 24576, 80, 64), "100b": (8192, 45568, 72, 64)}.items():
    SHAPES[_name] = _dims(*_d)
# Llama 3 layouts (GQA with 8 KV heads, vocab 128256, rope theta 500000)
SHAPES["llama3-8b"] = _dims(4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0)
SHAPES["llama3-70b"] = _dims(8192, 28672, 80, 64, 8, 128256, rope_theta=500000.0)

DIMS_KEYS = {"hidden": "hidden_size", "ffn": "intermediate_size", "layers": "num_layers", "heads": "num_heads",
             "kv_heads": "num_kv_heads", "vocab": "vocab_size", "head_dim": "head_dim"}


def parse_dims(text: str) -> dict:
    """`hidden=2048,ffn=5632,layers=22,heads=32[,kv_heads=4][,vocab=32000][,head_dim=64]` -> a shape dict
    (kv_heads defaults to heads, vocab to 32002). ValueError names the bad part."""
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in DIMS_KEYS:
            raise ValueError(f"--dims: {part!r} is not KEY=N with KEY one of {', '.join(DIMS_KEYS)}")
        if key in values:
            raise ValueError(f"--dims: {key} is given twice")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"--dims: {key}={value!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"--dims: {key} must be >= 1, got {n}")
        values[key] = n
    missing = [k for k in ("hidden", "ffn", "layers", "heads") if k not in values]
    if missing:
        raise ValueError(f"--dims lacks {', '.join(missing)} (needs hidden, ffn, layers, heads; optional kv_heads, "
                         f"vocab, head_dim)")
    shape = _dims(values["hidden"], values["ffn"], values["layers"], values["heads"], values.get("kv_heads"),
                  values.get("vocab", 32002))
    if "head_dim" in values:
        shape["head_dim"] = values["head_dim"]
    if shape["num_heads"] % shape["num_kv_heads"]:
        raise ValueError(f"--dims: heads {shape['num_heads']} is not a multiple of kv_heads {shape['num_kv_heads']}")
    if "head_dim" not in shape and shape["hidden_size"] % shape["num_heads"]:
        raise ValueError(f"--dims: hidden {shape['hidden_size']} is not divisible by heads {shape['num_heads']} "
                         f"(give head_dim=)")
    return shape
BENCH_SCALE = 0.02  # s_w of every random ternary linear


def shape_config(shape: str | dict, max_seq_len: int, tie: bool = False) -> dict:
    """The full model config (FORMAT.md `config`) of a named bench shape, or of a dict of dimensions
    (SHAPES' form, e.g. from parse_dims)."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    s = dict(shape)
    return {"head_dim": s["hidden_size"] // s["num_heads"], "rope_theta": 10000.0, **s,
            "max_seq_len": int(max_seq_len), "norm": "subln", "tie_embeddings": bool(tie), "rms_norm_eps": 1e-5,
            "init_std": 0.02}


def shape_name(shape: str | dict) -> str:
    """A shape's name for provenance and reports ("dims:h2048-f5632-l22-a32-kv4-v32000" for dimensions)."""
    if isinstance(shape, str):
        return shape
    return (f"dims:h{shape['hidden_size']}-f{shape['intermediate_size']}-l{shape['num_layers']}-a{shape['num_heads']}"
            f"-kv{shape['num_kv_heads']}-v{shape['vocab_size']}")


def _linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    from bitnet_train.export.schema import linear_shapes  # numpy only

    return linear_shapes(cfg)


def _dense_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from bitnet_train.export.schema import dense_shapes

    return dense_shapes(cfg)


CHUNK_VALUES = 1 << 24  # random values drawn at a time


def _random_tensor(cfg: dict, name: str, seed: int, packing: str = "i2_b128") -> np.ndarray:
    """The stored array of tensor `name` (FORMAT.md section 2) of a random model: ternary codes
    uniform over {-1, 0, 1} packed, scale BENCH_SCALE, norms 1, other dense tensors uniform in
    [-0.05, 0.05) as fp16; drawn in row chunks of CHUNK_VALUES. Depends only on (seed, name)."""
    import zlib

    from bitnet_train.export import packing as packing_mod

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    base, _, part = name.rpartition(".")
    if part == "scale":
        return np.array([BENCH_SCALE], "<f4")
    if part == "qweight":
        n_out, n_in = _linear_shapes(cfg)[base]
        rows = max(1, CHUNK_VALUES // n_in)
        if packing == packing_mod.T3_B160:
            # t3_b160 drawn as its bytes: a uniform base-3 value per byte is five uniform codes
            # (cpu/t3_b160.h); a partial last block is packed from drawn codes (its padding c = 0)
            full = n_in // packing_mod.T160_BLOCK
            out = np.empty(packing_mod.packed_shape(n_out, n_in, packing), np.uint8)
            for r in range(0, n_out, rows):
                n = min(rows, n_out - r)
                out[r:r + n, :full * 32] = packing_mod.T160_ENCODE[rng.integers(0, 243, size=(n, full * 32))]
                if full * packing_mod.T160_BLOCK < n_in:
                    tail = rng.integers(-1, 2, size=(n, n_in - full * packing_mod.T160_BLOCK), dtype=np.int8)
                    out[r:r + n, full * 32:] = packing_mod.pack_t3_b160(tail)
            return out
        if packing != "i2_b128":
            return np.concatenate([packing_mod.pack(rng.integers(-1, 2, size=(min(rows, n_out - r), n_in), dtype=np.int8),
                                                    packing) for r in range(0, n_out, rows)])
        # i2_b128 drawn as its 2-bit fields q = c + 1 (3x faster than packing drawn codes): field k of
        # byte j in block b is element 128 b + 32 k + j (cpu/i2_b128.h); padding elements get q = 1 (c = 0)
        row_bytes = -(-n_in // 128) * 32
        col = np.arange(row_bytes)[:, None]
        pad = (col // 32) * 128 + np.arange(4)[None, :] * 32 + col % 32 >= n_in  # (row_bytes, 4)
        out = np.empty((n_out, row_bytes), np.uint8)
        for r in range(0, n_out, rows):
            q = rng.integers(0, 3, size=(min(rows, n_out - r), row_bytes, 4), dtype=np.uint8)
            if pad.any():
                q[:, pad] = 1
            out[r:r + rows] = q[..., 0] | q[..., 1] << 2 | q[..., 2] << 4 | q[..., 3] << 6
        return out
    shape = _dense_shapes(cfg)[name]
    if len(shape) == 1:  # norm weights
        return np.ones(shape, "<f2")
    out = np.empty(shape, "<f2")
    rows = max(1, CHUNK_VALUES // shape[1])
    for r in range(0, shape[0], rows):
        block = out[r:r + rows]
        block[...] = (rng.random(block.shape, dtype=np.float32) - 0.5) * 0.1
    return out


def _random_kinds(cfg: dict) -> dict[str, str]:
    from bitnet_train.export.schema import DENSE, TERNARY

    return {**{n: TERNARY for n in _linear_shapes(cfg)}, **{n: DENSE for n in _dense_shapes(cfg)}}


def random_model(shape: str | dict, max_seq_len: int, seed: int = 0, tie: bool = False) -> tuple[dict, dict]:
    """(config, tensors) for Engine(config, tensors): the tensors write_random_model writes (i2_b128)."""
    from bitnet_train.export.schema import stored_tensors

    cfg = shape_config(shape, max_seq_len, tie)
    names = stored_tensors(cfg, _random_kinds(cfg), "i2_b128", "F16")
    return cfg, {n: _random_tensor(cfg, n, seed) for n in names}


def write_random_model(path: str | Path, shape: str | dict, max_seq_len: int = 2048, seed: int = 0, tie: bool = False,
                       packing: str = "i2_b128", tokenizer_json: str | None = None) -> Path:
    """A .bitnet file of a named shape (or dimensions) with random ternary weights (fp16 dense
    tensors), written atomically tensor by tensor (export.writer.write_tensors): each tensor is
    drawn in row chunks as it is written, so the peak memory is about the largest tensor, not the
    file (a 70B file on a 24 GiB machine)."""
    from bitnet_train import __version__
    from bitnet_train.export.writer import write_tensors

    cfg = shape_config(shape, max_seq_len, tie)
    provenance = {"recipe": f"random:{shape_name(shape)}", "step": 0, "source": "bitnet-run random-model", "source_sha256": "",
                  "exporter": f"bitnet_train.runtime {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "ptq": False, "seed": seed}
    return write_tensors(path, cfg, 1e-5, _random_kinds(cfg), lambda name: _random_tensor(cfg, name, seed, packing),
                         packing=packing, dense_dtype="F16", tokenizer_json=tokenizer_json, provenance=provenance)


def cpu_line() -> str:
    """The CPU model, its core count and its avx* / amx* flags: written beside every speed figure."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx"))]
    except OSError:
        pass
    return f"{model or 'unknown CPU'} ({os.cpu_count()} CPUs; {' '.join(flags)})"


def read_bandwidth(threads: int, isa: str = "", mib: int = 1024, repeats: int = 5) -> float:
    """GB/s of a plain streaming read (the roofline): every compute thread sums its share of a `mib`
    MiB buffer with the ISA's widest vector loads, best of `repeats` passes (csrc/cpu/bandwidth.cpp).
    (A dense fp32 GEMV, this function before, topped out below it on some machines: 23 vs 28-32 GB/s.)"""
    gb_s, _ = _C.stream_read(int(mib), int(threads), isa, int(repeats))
    return float(gb_s)


def kv_bytes_per_token(engine, context: float) -> float:
    """Bytes of K and V (fp32, or fp16 with kv_cache="f16") a decode step reads at a given context length."""
    c = engine._model.config
    elem = 2 if engine.kv_cache == "f16" else 4
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * elem * context


def measure_speed(engine, prefill: int = 128, decode: int = 64, bandwidth: bool = True, seed: int = 1) -> dict:
    """Prefill one sequence of `prefill` random tokens, then `decode` greedy steps on its KV cache.
    bandwidth: also measure the machine's streaming-read bandwidth (read_bandwidth) and report decode
    GB/s as a fraction of it (every byte a decode step reads: weights, lm_head, one embedding row, KV)."""
    if prefill < 1 or decode < 1:
        raise ValueError(f"prefill and decode must be >= 1, got {prefill} and {decode}")
    if prefill + decode > engine.max_seq_len:
        raise ValueError(f"prefill {prefill} + decode {decode} tokens exceed the model's context of "
                         f"{engine.max_seq_len}")
    prompt = np.random.default_rng(seed).integers(0, engine.vocab_size, prefill)
    engine.forward(prompt[:8], last_only=True)  # warm-up: page in the weights, start the threads
    cache = engine.new_cache(1, prefill + decode)
    t0, c0 = time.perf_counter(), time.process_time()
    logits = engine.forward(prompt, cache=cache, last_only=True)
    prefill_s, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
    tok = int(logits.argmax())
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(decode):
        tok = int(engine.forward([tok], cache=cache, last_only=True).argmax())
    decode_s, decode_cpu = time.perf_counter() - t0, time.process_time() - c0

    kv = kv_bytes_per_token(engine, prefill + decode / 2)  # mean context over the decode steps
    bytes_per_token = engine.weight_bytes_per_token + kv
    decode_tps = decode / decode_s
    res = {
        "isa": engine.isa(), "threads": engine.threads, "lm_head": engine.lm_head,
        "kv_cache": engine.kv_cache,
        "prefill_tokens": prefill, "prefill_tok_s": round(prefill / prefill_s, 2),
        "decode_tokens": decode, "decode_tok_s": round(decode_tps, 2),
        "weight_bytes_per_token": engine.weight_bytes_per_token, "kv_bytes_per_token": int(kv),
        "decode_gb_s": round(bytes_per_token * decode_tps / 1e9, 2),
        # CPU time of the process (all threads) per token: the energy proxy on a VM.
        "prefill_core_ms_per_token": round(prefill_cpu / prefill * 1e3, 3),
        "decode_core_ms_per_token": round(decode_cpu / decode * 1e3, 3),
    }
    if bandwidth:
        bw = read_bandwidth(engine.threads, engine.isa())
        res["stream_read_gb_s"] = round(bw, 2)
        res["roofline_fraction"] = round(bytes_per_token * decode_tps / 1e9 / bw, 3)
    return res
