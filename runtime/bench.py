"""Engine speed: prefill and decode tokens/s, bytes per decoded token, fraction of measured bandwidth.

    eng = Engine(*random_model("bitnet-large", max_seq_len=193), threads=2)   # or Engine.load(path)
    figures = measure_speed(eng, prefill=128, decode=64)                        # a flat dict

Random ternary weights for the DESIGN.md bench shapes (speed, not quality): `random_model` builds
them packed in memory (fast, no file); `write_random_model` writes a .bitnet file of the shape.
Shared by `bitnet-run bench` and bench/runtime_cpu.py.
"""

from __future__ import annotations

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
BENCH_SCALE = 0.02  # s_w of every random ternary linear


def shape_config(shape: str, max_seq_len: int, tie: bool = False) -> dict:
    """The full model config (FORMAT.md `config`) of a named bench shape."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    s = SHAPES[shape]
    return dict(s, head_dim=s["hidden_size"] // s["num_heads"], max_seq_len=int(max_seq_len), norm="subln",
                tie_embeddings=bool(tie), rope_theta=10000.0, rms_norm_eps=1e-5, init_std=0.02)


def _linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    from bitnet_train.export.schema import linear_shapes  # numpy only

    return linear_shapes(cfg)


def _dense_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from bitnet_train.export.schema import dense_shapes

    return dense_shapes(cfg)


def _dense_value(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1:  # norm weights
        return np.ones(shape, np.float32)
    return (rng.random(shape, dtype=np.float32) - 0.5) * 0.1


def random_model(shape: str, max_seq_len: int, seed: int = 0, tie: bool = False) -> tuple[dict, dict]:
    """(config, tensors) for Engine(config, tensors): i2_b128 codes drawn directly as packed bytes."""
    cfg = shape_config(shape, max_seq_len, tie)
    rng = np.random.default_rng(seed)

    def packed(n_out: int, n_in: int) -> np.ndarray:
        # each 2-bit field uniform over {0, 1, 2} (codes -1, 0, 1), including the padding of the last block
        q = rng.integers(0, 3, size=(n_out, -(-n_in // 128) * 32, 4), dtype=np.uint8)
        return q[..., 0] | q[..., 1] << 2 | q[..., 2] << 4 | q[..., 3] << 6

    tensors = {n: _dense_value(rng, n, s).astype(np.float16) for n, s in _dense_shapes(cfg).items()}
    for name, (n_out, n_in) in _linear_shapes(cfg).items():
        tensors[f"{name}.qweight"] = packed(n_out, n_in)
        tensors[f"{name}.scale"] = np.array([BENCH_SCALE], np.float32)
    return cfg, tensors


def write_random_model(path: str | Path, shape: str, max_seq_len: int = 2048, seed: int = 0, tie: bool = False,
                       packing: str = "i2_b128", tokenizer_json: str | None = None) -> Path:
    """A .bitnet file of a named shape with random ternary weights (fp16 dense tensors), written
    atomically by the exporter's writer."""
    from bitnet_train import __version__
    from bitnet_train.export.writer import ModelArrays, write_bitnet

    cfg = shape_config(shape, max_seq_len, tie)
    rng = np.random.default_rng(seed)
    ternary = {name: (rng.integers(-1, 2, size=s, dtype=np.int8), BENCH_SCALE) for name, s in _linear_shapes(cfg).items()}
    dense = {n: _dense_value(rng, n, s) for n, s in _dense_shapes(cfg).items()}
    provenance = {"recipe": f"random:{shape}", "step": 0, "source": "bitnet-run random-model", "source_sha256": "",
                  "exporter": f"bitnet_train.runtime {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "ptq": False, "seed": seed}
    arrays = ModelArrays(config=cfg, eps=1e-5, ternary=ternary, dense=dense, tokenizer_json=tokenizer_json,
                         provenance=provenance)
    return write_bitnet(path, arrays, packing=packing, dense_dtype="F16")


def read_bandwidth(threads: int, isa: str = "", mib: int = 512) -> float:
    """GB/s of a dense fp32 GEMV over `mib` MiB (memory-bound) on the engine's own kernels, best of 3."""
    cols = 16384
    w = np.ones(((mib << 20) // (4 * cols), cols), np.float32)
    x = np.ones((1, cols), np.float32)
    _C.dense_matmul(w, "f32", x, isa, threads)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        _C.dense_matmul(w, "f32", x, isa, threads)
        best = min(best, time.perf_counter() - t0)
    return w.nbytes / best / 1e9


def kv_bytes_per_token(engine, context: float) -> float:
    """Bytes of K and V (fp32, or fp16 with kv_cache="f16") a decode step reads at a given context length."""
    c = engine._model.config
    elem = 2 if engine.kv_cache == "f16" else 4
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * elem * context


def measure_speed(engine, prefill: int = 128, decode: int = 64, bandwidth: bool = True, seed: int = 1) -> dict:
    """Prefill one sequence of `prefill` random tokens, then `decode` greedy steps on its KV cache.
    bandwidth: also measure the machine's read bandwidth and report the roofline fraction."""
    if prefill < 1 or decode < 1:
        raise ValueError(f"prefill and decode must be >= 1, got {prefill} and {decode}")
    if prefill + decode > engine.max_seq_len:
        raise ValueError(f"prefill {prefill} + decode {decode} tokens exceed the model's context of "
                         f"{engine.max_seq_len}")
    prompt = np.random.default_rng(seed).integers(0, engine.vocab_size, prefill)
    engine.forward(prompt[:8], last_only=True)  # warm-up: page in the weights, start the threads
    cache = engine.new_cache(1, prefill + decode)
    t0 = time.perf_counter()
    logits = engine.forward(prompt, cache=cache, last_only=True)
    prefill_s = time.perf_counter() - t0
    tok = int(logits.argmax())
    t0 = time.perf_counter()
    for _ in range(decode):
        tok = int(engine.forward([tok], cache=cache, last_only=True).argmax())
    decode_s = time.perf_counter() - t0

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
    }
    if bandwidth:
        bw = read_bandwidth(engine.threads, engine.isa())
        res["measured_read_gb_s"] = round(bw, 2)
        res["roofline_fraction"] = round(bytes_per_token * decode_tps / 1e9 / bw, 3)
    return res
