"""QAT training-step speed on CPU: BitLinear (quant b1.58) vs full precision (quant none).

One full training step = forward + backward + AdamW step, on the same model shapes and the same
batch. The variants are timed interleaved (round robin, order rotated each repeat) in one process,
so machine noise hits them alike; medians are reported with the ratio ternary / full precision.

A breakdown follows: the profiler's self CPU time of each op inside BitLinear's forward and
backward, then the linear calls of one step timed alone (ternary vs F.linear, same shapes) and the
forward quantizers alone.

    python bench/qat_step_speed.py                      # the shakespeare_tiny recipe's shapes
    python bench/qat_step_speed.py --threads 1 --clock cpu   # steadier on a shared, loaded machine
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
    # defaults: configs/recipe/shakespeare_tiny.yaml (hidden 256, 4 layers, ffn 704, 4 heads,
    # BPE vocab 2048, block 128, batch 32), AdamW as in configs/optim/adamw.yaml.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--bf16", action="store_true", help="run forward under CPU bf16 autocast")
    p.add_argument("--compare-quant", metavar="PATH", action="append", default=[],
                   help="another quant.py (e.g. an older revision) timed as one more ternary variant; repeatable")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process CPU time (steadier on a shared, loaded machine, "
                        "but counts idle-spinning worker threads)")
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
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)  # as the recipe
    return model, opt


def train_step(model, opt, idx, tgt, bf16: bool) -> float:
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(idx, tgt)
    loss.backward()
    opt.step()
    return loss.item()


def time_steps(variants: dict, idx, tgt, args) -> dict[str, list[float]]:
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for model, opt in variants.values():
        for _ in range(args.warmup):
            train_step(model, opt, idx, tgt, args.bf16)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            model, opt = variants[n]
            t0 = clock()
            train_step(model, opt, idx, tgt, args.bf16)
            times[n].append(clock() - t0)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def profile_bitlinear_ops(model, opt, idx, tgt, args, steps: int = 2) -> dict[str, float]:
    """Self CPU ms per step of each op run inside _BitLinearFn's forward or backward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(model, opt, idx, tgt, args.bf16)
    out: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        p = ev.cpu_parent
        while p is not None and not p.name.startswith("_BitLinearFn"):
            p = p.cpu_parent
        if p is not None or ev.name.startswith("_BitLinearFn"):
            out[ev.name] += ev.self_cpu_time_total / 1e3 / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


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


def interleaved_ms(fns: dict, repeats: int, clock) -> dict[str, float]:
    """Median ms of each zero-argument function, timed round robin."""
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            ts[k].append(clock() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def layer_breakdown(shapes, repeats: int, clock) -> dict[str, float]:
    """ms per training step in the linear layers alone, and in the quantizers alone.

    linears_*: forward + backward of every linear call of one step (_BitLinearFn vs F.linear) on
    random inputs of the same shapes; *_quant: the forward quantizers the layer runs (the hot-path
    helpers where the module has them, else the reference act_quant / weight_quant).
    """
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=gen).requires_grad_() for s, _ in shapes]
    ws = [(torch.randn(w, generator=gen) * 0.02).requires_grad_() for _, w in shapes]
    gs = [torch.randn(s[:-1] + (w[0],), generator=gen) for s, w in shapes]
    act = getattr(quant_mod, "_act_codes", None) or quant_mod.act_quant
    wq = getattr(quant_mod, "_weight_codes", None) or quant_mod.weight_quant

    def linears(ternary: bool):
        def run():
            for x, w, g in zip(xs, ws, gs):
                y = quant_mod._BitLinearFn.apply(x, w, 1.0, quant_mod.EPS) if ternary else F.linear(x, w)
                y.backward(g)
            for p in xs + ws:
                p.grad = None
        return run

    def quantizers(fn, ts):
        def run():
            with torch.no_grad():
                for v in ts:
                    fn(v, quant_mod.EPS)
        return run

    return interleaved_ms({
        "linears_fp_ms": linears(False),
        "linears_ternary_ms": linears(True),
        "act_quant_ms": quantizers(act, xs),
        "weight_quant_ms": quantizers(wq, ws),
    }, repeats, clock)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    tgt = torch.roll(idx, -1, dims=1)

    variants = {"ternary": build(args, "b1.58"), "fp": build(args, "none")}
    for i, path in enumerate(args.compare_quant):
        variants[f"compare{i}"] = build(args, "b1.58", qmod=load_quant_module(path))
    times = time_steps(variants, idx, tgt, args)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    result = {
        "shapes": {k: getattr(args, k) for k in ("hidden", "layers", "ffn", "heads", "vocab", "seq", "batch")},
        "threads": args.threads,
        "bf16": args.bf16,
        "clock": args.clock,
        "compare_quant": {f"compare{i}": p for i, p in enumerate(args.compare_quant)},
        "repeats": args.repeats,
        "torch": torch.__version__,
        "median_step_ms": med,
        "all_step_ms": {n: [round(t * 1e3, 3) for t in ts] for n, ts in times.items()},
        "ratio_ternary_over_fp": med["ternary"] / med["fp"],
        # each repeat times every variant back to back: the median of those per-repeat ratios is
        # steadier than the ratio of medians when the machine's load drifts
        "paired_ratio_ternary_over_fp": paired_ratio(times["ternary"], times["fp"]),
    }
    for i in range(len(args.compare_quant)):
        result[f"ratio_compare{i}_over_fp"] = med[f"compare{i}"] / med["fp"]
        result[f"paired_ratio_compare{i}_over_fp"] = paired_ratio(times[f"compare{i}"], times["fp"])

    if not args.no_breakdown:
        ops = profile_bitlinear_ops(*variants["ternary"], idx, tgt, args)
        result["profile_bitlinear_ms_per_step"] = {k: round(v, 3) for k, v in list(ops.items())[:12]}
        result["profile_bitlinear_total_ms_per_step"] = round(sum(ops.values()), 3)
        shapes = bitlinear_input_shapes(variants["ternary"][0], idx)
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        result["layers_alone_ms_per_step"] = {k: round(v, 3) for k, v in layer_breakdown(shapes, args.repeats, clock).items()}
        result["bitlinear_calls_per_step"] = len(shapes)

    if args.json:
        print(json.dumps(result, indent=1))
        return result
    s = result["shapes"]
    print(f"QAT step, CPU, {args.threads} threads, bf16 autocast={args.bf16}, {args.clock} clock, torch {torch.__version__}")
    print(f"shapes: hidden {s['hidden']}, layers {s['layers']}, ffn {s['ffn']}, heads {s['heads']}, "
          f"vocab {s['vocab']}, batch {s['batch']} x seq {s['seq']}; {args.repeats} interleaved repeats")
    for n, m in med.items():
        spread = f"min {min(times[n]) * 1e3:.1f}  max {max(times[n]) * 1e3:.1f}"
        print(f"  {n:<16} median {m:8.1f} ms/step   ({spread})")
    print(f"  ratio ternary / fp: {result['ratio_ternary_over_fp']:.3f} "
          f"(median of per-repeat ratios: {result['paired_ratio_ternary_over_fp']:.3f})")
    for i, path in enumerate(args.compare_quant):
        print(f"  ratio compare{i} / fp: {result[f'ratio_compare{i}_over_fp']:.3f} "
              f"(per-repeat: {result[f'paired_ratio_compare{i}_over_fp']:.3f})   compare{i}: {path}")
    if not args.no_breakdown:
        print(f"profiler, ops inside BitLinear forward/backward (self CPU ms/step, "
              f"{result['profile_bitlinear_total_ms_per_step']:.1f} in all):")
        for k, v in result["profile_bitlinear_ms_per_step"].items():
            print(f"  {k:<40} {v:8.2f}")
        q = result["layers_alone_ms_per_step"]
        print(f"the {result['bitlinear_calls_per_step']} linear calls of a step alone (forward + backward): "
              f"ternary {q['linears_ternary_ms']:.1f} ms, fp {q['linears_fp_ms']:.1f} ms "
              f"(+{q['linears_ternary_ms'] - q['linears_fp_ms']:.1f} ms); of which forward quantizers: "
              f"activations {q['act_quant_ms']:.1f} ms, weights {q['weight_quant_ms']:.1f} ms")
    return result


if __name__ == "__main__":
    main()
