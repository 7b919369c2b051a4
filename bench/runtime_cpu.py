"""CPU engine speed on the DESIGN.md shapes with random ternary weights (no file needed).

    .venv/bin/python bench/runtime_cpu.py --shape bitnet-large --threads 2 [--isa avx2] [--json]

Prints prefill tokens/s (one sequence of --prefill tokens), decode tokens/s (--decode steps after
the prefill, one token at a time, KV cache), bytes read per decoded token (weights + KV cache at
the mean decode context) and the fraction of a measured read bandwidth (a dense fp32 GEMV over a
512 MiB matrix on the same threads) that decode reaches. Random weights: speed, not quality.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bitnet_train.runtime import Engine, _C

SHAPES = {
    "bitnet-large": dict(num_layers=24, hidden_size=1536, intermediate_size=4096, num_heads=16, num_kv_heads=16,
                         vocab_size=32002),
    "bitnet-2b": dict(num_layers=30, hidden_size=2560, intermediate_size=6912, num_heads=20, num_kv_heads=5,
                      vocab_size=128256),
    "smollm2-135m": dict(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                         vocab_size=49152),
}


def random_model(shape: str, max_seq_len: int, seed: int = 0, tie: bool = False) -> tuple[dict, dict]:
    cfg = dict(SHAPES[shape], max_seq_len=max_seq_len, norm="subln", ffn="relu2" if shape == "bitnet-2b" else "swiglu",
               tie_embeddings=tie, rope_theta=10000.0, rms_norm_eps=1e-5)
    rng = np.random.default_rng(seed)
    d, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_heads"]
    qd, kvd = cfg["num_heads"] * hd, cfg["num_kv_heads"] * hd

    def dense(*shape):
        return ((rng.random(shape, dtype=np.float32) - 0.5) * 0.1).astype(np.float16)

    def ternary(out, n):
        # random bytes with every 2-bit field in {0, 1, 2}: q = byte-wise sum of three random fields
        q = rng.integers(0, 3, size=(out, -(-n // 128) * 32, 4), dtype=np.uint8)
        return (q[..., 0] | q[..., 1] << 2 | q[..., 2] << 4 | q[..., 3] << 6).astype(np.uint8)

    t = {"embed_tokens.weight": dense(V, d), "norm.weight": np.ones(d, np.float16)}
    if not tie:
        t["lm_head.weight"] = dense(V, d)
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(d, np.float16)
        t[p + "post_attention_layernorm.weight"] = np.ones(d, np.float16)
        t[p + "self_attn.attn_sub_norm.weight"] = np.ones(qd, np.float16)
        t[p + "mlp.ffn_sub_norm.weight"] = np.ones(f, np.float16)
        for name, (o, n) in {"self_attn.q_proj": (qd, d), "self_attn.k_proj": (kvd, d), "self_attn.v_proj": (kvd, d),
                             "self_attn.o_proj": (d, qd), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
                             "mlp.down_proj": (d, f)}.items():
            t[p + name + ".qweight"] = ternary(o, n)
            t[p + name + ".scale"] = np.array([0.02], np.float32)
    return cfg, t


def read_bandwidth(threads: int, isa: str) -> float:
    """GB/s of a dense fp32 GEMV over 512 MiB (memory-bound) on the engine's own kernels."""
    w = np.ones((8192, 16384), np.float32)
    x = np.ones((1, 16384), np.float32)
    _C.dense_matmul(w, "f32", x, isa, threads)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        _C.dense_matmul(w, "f32", x, isa, threads)
        best = min(best, time.perf_counter() - t0)
    return w.nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="bitnet-large")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", default="")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the embedding (saves memory)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    cfg, tensors = random_model(a.shape, a.prefill + a.decode + 1, tie=a.tie)
    eng = Engine(cfg, tensors, {"eps": 1e-5}, isa=a.isa or None, threads=a.threads)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, cfg["vocab_size"], a.prefill)

    eng.forward(prompt[:8], last_only=True)  # warm-up (page in weights, spin up threads)
    cache = eng.new_cache(1)
    t0 = time.perf_counter()
    logits = eng.forward(prompt, cache=cache, last_only=True)
    prefill_s = time.perf_counter() - t0
    tok = int(logits.argmax())
    t0 = time.perf_counter()
    for _ in range(a.decode):
        tok = int(eng.forward([tok], cache=cache, last_only=True).argmax())
    decode_s = time.perf_counter() - t0

    hd = cfg["hidden_size"] // cfg["num_heads"]
    mean_ctx = a.prefill + a.decode / 2
    kv_bytes = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * hd * 4 * mean_ctx  # fp32 K and V read per token
    bytes_per_token = eng.weight_bytes_per_token + kv_bytes
    bw = read_bandwidth(a.threads, eng.isa())
    decode_tps = a.decode / decode_s
    res = {
        "shape": a.shape, "isa": eng.isa(), "threads": a.threads,
        "prefill_tokens": a.prefill, "prefill_tok_s": round(a.prefill / prefill_s, 2),
        "decode_tokens": a.decode, "decode_tok_s": round(decode_tps, 2),
        "weight_bytes_per_token": eng.weight_bytes_per_token, "kv_bytes_per_token": int(kv_bytes),
        "measured_read_gb_s": round(bw, 2), "decode_gb_s": round(bytes_per_token * decode_tps / 1e9, 2),
        "roofline_fraction": round(bytes_per_token * decode_tps / 1e9 / bw, 3),
    }
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
