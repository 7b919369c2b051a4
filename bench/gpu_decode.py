"""GPU decode speed: the CUDA engine vs PyTorch bf16 on the same shapes, and the GEMV's bandwidth.

    .venv/bin/python bench/gpu_decode.py [--shape bitnet-2b] [--context 128 --decode 256] [--json]

Batch 1, random ternary weights (speed, not quality; runtime/bench.py builds them). Prints:
  * ours: prefill tokens/s (--context tokens), decode tokens/s with the on-device greedy loop
    replayed from a CUDA graph (and without the graph, and through the Python forward per token);
  * bytes read per decoded token (ternary + lm_head + embedding row + KV cache at the mean
    context), the roofline tokens/s at the measured copy bandwidth, and our fraction of it;
  * the ternary GEMV alone on each distinct linear shape of the model: GB/s read and the fraction
    of the measured bandwidth (matrices cycled through > L2, so the figure is device memory);
  * PyTorch bf16 (needs torch with CUDA): the same layer shapes as dense bf16 matmuls with a
    static KV cache and SDPA, eager and CUDA-graph decode tokens/s.
Skips with a message (exit 0) without a CUDA build, a GPU, or (for the peer) torch with CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from bitnet_train.runtime import _C
from bitnet_train.runtime.device import CudaEngine, cuda_available, cuda_compiled


def measured_copy_bandwidth(gib: float = 1.0) -> float | None:
    """Device-to-device copy bandwidth, bytes/s (read + write), via torch; None without torch CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = int(gib * (1 << 30))
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    iters = 20
    t = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / iters
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / dt


def ours(cfg: dict, tensors: dict, context: int, decode: int) -> tuple[dict, CudaEngine]:
    eng = CudaEngine(cfg, tensors, {"eps": 1e-5})
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, cfg["vocab_size"], context)
    res = {"device": eng.device_name}

    warm = eng.new_cache(1, context + decode + 1)
    eng.forward(prompt, cache=warm, last_only=True)
    eng.greedy_decode([1], 8, cache=warm)  # compiles nothing, but first launches load modules

    cache = eng.new_cache(1, context + decode + 1)
    t = time.perf_counter()
    first = int(eng.forward(prompt, cache=cache, last_only=True).argmax())
    res["prefill_tok_s"] = context / (time.perf_counter() - t)

    for name, graph in (("decode_tok_s", True), ("decode_nograph_tok_s", False)):
        cache.reset(0)
        eng.forward(prompt, cache=cache, last_only=True)
        t = time.perf_counter()
        eng.greedy_decode([first], decode, cache=cache, use_graph=graph)  # includes graph capture once
        res[name] = decode / (time.perf_counter() - t)

    cache.reset(0)
    eng.forward(prompt, cache=cache, last_only=True)
    steps = min(decode, 64)
    nxt = first
    t = time.perf_counter()
    for _ in range(steps):
        nxt = int(eng.forward([nxt], cache=cache, last_only=True).argmax())
    res["decode_python_loop_tok_s"] = steps / (time.perf_counter() - t)

    hd = cfg["hidden_size"] // cfg["num_heads"]
    kv_per_pos = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * hd * 4  # fp32 K and V
    res["weight_bytes_per_token"] = eng.weight_bytes_per_token
    res["bytes_per_token"] = int(eng.weight_bytes_per_token + kv_per_pos * (context + decode / 2))
    return res, eng


def gemv_bandwidth(cfg: dict, iters: int) -> dict:
    """GB/s of the ternary GEMV (batch 1) per distinct linear shape (out, in)."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = d // cfg["num_heads"]
    shapes = {"q/o": (cfg["num_heads"] * hd, d), "k/v": (cfg["num_kv_heads"] * hd, d), "gate/up": (f, d),
              "down": (d, f), "big 16384x16384": (16384, 16384)}
    out = {}
    for name, (n_out, n_in) in shapes.items():
        sec = _C.cuda_bench_gemv(0, n_out, n_in, 1, iters)
        nbytes = n_out * (-(-n_in // 128) * 32)
        out[name] = {"shape": [n_out, n_in], "us": sec * 1e6, "GB_s": nbytes / sec / 1e9}
    return out


def torch_bf16(cfg: dict, context: int, decode: int) -> dict | None:
    """Batch-1 decode of the same layer shapes in PyTorch bf16 (dense weights), eager and CUDA graph."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dev, dt = "cuda", torch.bfloat16
    L, d, f, V = cfg["num_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_heads"], cfg["num_kv_heads"]
    hd, T = d // nh, context + decode + 1
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*shape):
        return (torch.rand(*shape, generator=g, device=dev, dtype=dt) - 0.5) * 0.05

    layers = [dict(qkv=w((nh + 2 * nkv) * hd, d), o=w(d, nh * hd), gu=w(2 * f, d), down=w(d, f)) for _ in range(L)]
    emb, head = w(V, d), w(V, d)
    kc = torch.zeros(L, 1, nkv, T, hd, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
    ang = torch.arange(T, device=dev, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    pos_ids = torch.arange(T, device=dev)
    relu2 = cfg.get("ffn", "swiglu") == "relu2"

    def rms(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)

    def rope(x, p):  # x (1, heads, 1, hd)
        c, s = cos[p].view(1, 1, 1, hd), sin[p].view(1, 1, 1, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * c + torch.cat([-x2, x1], -1) * s

    def step(tok, pos):  # tok (1,) long, pos (1,) long -> next token (1,)
        x = emb[tok]  # (1, d)
        mask = (pos_ids <= pos).view(1, 1, 1, T)
        for li, lw in enumerate(layers):
            qkv = rms(x) @ lw["qkv"].T
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
            q = rope(q.view(1, 1, nh, hd).transpose(1, 2), pos)
            k = rope(k.view(1, 1, nkv, hd).transpose(1, 2), pos)
            kc[li].index_copy_(2, pos, k)
            vc[li].index_copy_(2, pos, v.view(1, 1, nkv, hd).transpose(1, 2))
            a = F.scaled_dot_product_attention(q, kc[li], vc[li], attn_mask=mask, enable_gqa=True)
            x = x + rms(a.transpose(1, 2).reshape(1, nh * hd)) @ lw["o"].T
            gt, up = (rms(x) @ lw["gu"].T).split([f, f], -1)
            act = torch.relu(gt).square() * up if relu2 else F.silu(gt) * up
            x = x + rms(act) @ lw["down"].T
        return (rms(x) @ head.T).argmax(-1)

    res = {}
    with torch.no_grad():
        tok = torch.zeros(1, dtype=torch.long, device=dev)
        pos = torch.full((1,), context, dtype=torch.long, device=dev)
        for _ in range(3):
            step(tok, pos)
        torch.cuda.synchronize()
        n = min(decode, 64)
        t = time.perf_counter()
        for i in range(n):
            tok = step(tok, pos + i)
        torch.cuda.synchronize()
        res["torch_bf16_eager_tok_s"] = n / (time.perf_counter() - t)

        s_tok, s_pos = tok.clone(), pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(s_tok, s_pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s_tok.copy_(step(s_tok, s_pos))
            s_pos.add_(1)
        s_pos.fill_(context)
        graph.replay()
        torch.cuda.synchronize()
        s_pos.fill_(context)
        t = time.perf_counter()
        for _ in range(decode):
            graph.replay()
        torch.cuda.synchronize()
        res["torch_bf16_graph_tok_s"] = decode / (time.perf_counter() - t)
    res["torch_bf16_weight_bytes_per_token"] = 2 * (sum(t.numel() for lw in layers for t in lw.values()) + V * d + d)
    del layers, emb, head, kc, vc
    torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="bitnet-2b")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--decode", type=int, default=256, help="decode steps")
    ap.add_argument("--gemv-iters", type=int, default=500)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch bf16 peer")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    if not cuda_available():
        why = "this build has no CUDA engine (no nvcc at build time)" if not cuda_compiled() else "no CUDA device found"
        print(f"skipped: {why}", file=sys.stderr)
        return 0

    from bitnet_train.runtime.bench import SHAPES, random_model

    if a.shape not in SHAPES:
        ap.error(f"unknown shape {a.shape!r}; expected one of {sorted(SHAPES)}")
    cfg, tensors = random_model(a.shape, a.context + a.decode + 1)
    res: dict = {"shape": a.shape, "context": a.context, "decode": a.decode}
    r, eng = ours(cfg, tensors, a.context, a.decode)
    res.update(r)
    del eng, tensors
    bw = measured_copy_bandwidth()
    if bw:
        res["copy_bandwidth_GB_s"] = bw / 1e9
        res["roofline_tok_s"] = bw / res["bytes_per_token"]
        res["decode_fraction_of_roofline"] = res["decode_tok_s"] / res["roofline_tok_s"]
    gemv = gemv_bandwidth(cfg, a.gemv_iters)
    if bw:
        for v in gemv.values():
            v["fraction_of_copy_bw"] = v["GB_s"] * 1e9 / bw
    res["gemv"] = gemv
    if not a.no_torch:
        peer = torch_bf16(cfg, a.context, a.decode)
        if peer is None:
            print("PyTorch bf16 peer skipped: torch with CUDA is not installed", file=sys.stderr)
        else:
            res.update(peer)
            res["speedup_vs_torch_bf16_graph"] = res["decode_tok_s"] / peer["torch_bf16_graph_tok_s"]
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            if k == "gemv":
                for name, g in v.items():
                    frac = f"  {g['fraction_of_copy_bw']:.0%} of copy bw" if "fraction_of_copy_bw" in g else ""
                    print(f"{'gemv ' + name:>32}: {g['us']:8.1f} us  {g['GB_s']:7.0f} GB/s{frac}")
            else:
                print(f"{k:>32}: {v:.4g}" if isinstance(v, float) else f"{k:>32}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
