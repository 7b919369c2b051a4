"""QAT training-step speed on CPU: BitLinear (quant b1.58) vs full precision (quant none).

One full training step = forward + backward + AdamW step, on the same model shapes and the same
batch. The variants are timed interleaved (round robin, order rotated each repeat) in one process,
so machine noise hits them alike; medians are reported with the ratio ternary / full precision.

A breakdown follows: the profiler's self CPU time per op, ternary minus full precision (the ops
that make up the overhead), and the quantizers timed on their own with the shapes one step uses.

    python bench/qat_step_speed.py                      # shakespeare_tiny-like shapes
    python bench/qat_step_speed.py --hidden 512 --layers 8 --ffn 1376 --json
    python bench/qat_step_speed.py --compare-quant <(git show REV:bitnet_train/quant.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitnet_train import quant as quant_mod  # noqa: E402
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--bf16", action="store_true", help="run forward under CPU bf16 autocast")
    p.add_argument("--compare-quant", metavar="PATH", help="another quant.py (e.g. an older revision) timed as a third variant")
    p.add_argument("--no-breakdown", action="store_true", help="skip the profiler and quantizer breakdown")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def load_quant_module(path: str):
    # Read once: PATH may be a pipe from process substitution.
    src = Path(path).read_text()
    spec = importlib.util.spec_from_loader("bench_compare_quant", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def build(args, method: str, qmod=None, seed: int = 0):
    cfg = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.heads, max_seq_len=args.seq,
    )
    qcfg = QuantConfig(method=method)
    linear = None
    if qmod is not None:
        def linear(name, fin, fout):
            return qmod.BitLinear(fin, fout, quantize=True, eps=qcfg.eps)
    torch.manual_seed(seed)
    model = BitNetModel(cfg, qcfg, linear=linear)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return model, opt


def train_step(model, opt, idx, tgt, bf16: bool) -> float:
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(idx, tgt)
    loss.backward()
    opt.step()
    return loss.item()


def time_steps(variants: dict, idx, tgt, args) -> dict[str, list[float]]:
    for model, opt in variants.values():
        for _ in range(args.warmup):
            train_step(model, opt, idx, tgt, args.bf16)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            model, opt = variants[n]
            t0 = time.perf_counter()
            train_step(model, opt, idx, tgt, args.bf16)
            times[n].append(time.perf_counter() - t0)
    return times


def profile_self_times(model, opt, idx, tgt, args, steps: int = 2) -> dict[str, float]:
    """Self CPU time per aten op (ms per step), summed over forward, backward and optimizer."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(model, opt, idx, tgt, args.bf16)
    out: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        out[ev.key] += ev.self_cpu_time_total / 1e3 / steps
    return dict(out)


def bitlinear_input_shapes(model, idx) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, weight shape) of every quantized BitLinear call in one forward."""
    shapes = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: shapes.append((tuple(inp[0].shape), tuple(mod.weight.shape))))
        for m in model.modules() if isinstance(m, quant_mod.BitLinear) and m.quantize
    ]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return shapes


def median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def quantizer_times(shapes, repeats: int) -> dict[str, float]:
    """ms per training step spent in act_quant / weight_quant alone (forward side only)."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=gen) for s, _ in shapes]
    ws = [torch.randn(w, generator=gen) * 0.02 for _, w in shapes]
    act = median_ms(lambda: [quant_mod.act_quant(x) for x in xs], repeats)
    wq = median_ms(lambda: [quant_mod.weight_quant(w) for w in ws], repeats)
    # the matmuls the layers do anyway, for scale: y = x @ W^T, forward only
    mm = median_ms(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)], repeats)
    return {"act_quant_ms": act, "weight_quant_ms": wq, "linear_fwd_ms": mm}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    tgt = torch.roll(idx, -1, dims=1)

    variants = {"ternary": build(args, "b1.58"), "fp": build(args, "none")}
    if args.compare_quant:
        variants["ternary_compare"] = build(args, "b1.58", qmod=load_quant_module(args.compare_quant))
    times = time_steps(variants, idx, tgt, args)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    result = {
        "shapes": {k: getattr(args, k) for k in ("hidden", "layers", "ffn", "heads", "vocab", "seq", "batch")},
        "threads": args.threads,
        "bf16": args.bf16,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "median_step_ms": med,
        "all_step_ms": {n: [round(t * 1e3, 3) for t in ts] for n, ts in times.items()},
        "ratio_ternary_over_fp": med["ternary"] / med["fp"],
    }
    if args.compare_quant:
        result["ratio_compare_over_fp"] = med["ternary_compare"] / med["fp"]
        result["ratio_ternary_over_compare"] = med["ternary"] / med["ternary_compare"]

    if not args.no_breakdown:
        prof = {n: profile_self_times(*variants[n], idx, tgt, args) for n in ("ternary", "fp")}
        keys = set(prof["ternary"]) | set(prof["fp"])
        delta = {k: prof["ternary"].get(k, 0.0) - prof["fp"].get(k, 0.0) for k in keys}
        top = sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:12]
        result["profile_overhead_ms_per_step"] = {k: round(v, 3) for k, v in top}
        result["profile_total_ms_per_step"] = {n: round(sum(p.values()), 3) for n, p in prof.items()}
        shapes = bitlinear_input_shapes(variants["ternary"][0], idx)
        result["quantizers_alone_ms_per_step"] = {k: round(v, 3) for k, v in quantizer_times(shapes, args.repeats).items()}
        result["bitlinear_calls_per_step"] = len(shapes)

    if args.json:
        print(json.dumps(result, indent=1))
        return result
    s = result["shapes"]
    print(f"QAT step, CPU, {args.threads} threads, bf16 autocast={args.bf16}, torch {torch.__version__}")
    print(f"shapes: hidden {s['hidden']}, layers {s['layers']}, ffn {s['ffn']}, heads {s['heads']}, "
          f"vocab {s['vocab']}, batch {s['batch']} x seq {s['seq']}; {args.repeats} interleaved repeats")
    for n, m in med.items():
        spread = f"min {min(times[n]) * 1e3:.1f}  max {max(times[n]) * 1e3:.1f}"
        print(f"  {n:<16} median {m:8.1f} ms/step   ({spread})")
    print(f"  ratio ternary / fp: {result['ratio_ternary_over_fp']:.3f}")
    if args.compare_quant:
        print(f"  ratio compare / fp: {result['ratio_compare_over_fp']:.3f}   "
              f"ternary / compare: {result['ratio_ternary_over_compare']:.3f}")
    if not args.no_breakdown:
        tot = result["profile_total_ms_per_step"]
        print(f"profiler self CPU ms/step: ternary {tot['ternary']:.1f}, fp {tot['fp']:.1f}; "
              "largest differences (ternary - fp):")
        for k, v in result["profile_overhead_ms_per_step"].items():
            print(f"  {k:<40} {v:+8.2f}")
        q = result["quantizers_alone_ms_per_step"]
        print(f"quantizers alone, {result['bitlinear_calls_per_step']} BitLinear calls/step: "
              f"act_quant {q['act_quant_ms']:.2f} ms, weight_quant {q['weight_quant_ms']:.2f} ms "
              f"(forward linears alone: {q['linear_fwd_ms']:.2f} ms)")
    return result


if __name__ == "__main__":
    main()
