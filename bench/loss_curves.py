"""Two training runs' loss curves side by side (e.g. fp32 vs bf16-mixed of one recipe, same seed and data).

    python bench/loss_curves.py runs/lc/32-true runs/lc/bf16-mixed [--png curves.png]

Reads each run's logs/metrics.csv (a staged run: stage1/, stage2/, ... in order; log with
`trainer.log_every_n_steps=1` for a point per step) and prints a markdown table of train/loss per
step, the validation perplexities, and the differences: the mean and largest |a - b| of the step
losses and of their relative difference. Nothing is trained here.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path


def stage_dirs(run: Path) -> list[Path]:
    stages = sorted((p for p in run.glob("stage*") if p.is_dir()), key=lambda p: int(p.name[5:] or 0))
    return stages or [run]


def curves(run: Path) -> tuple[list[tuple[str, int, float]], list[tuple[str, int, str, float]]]:
    """-> ([(stage, step, train loss)], [(stage, step, metric, value)]) of every stage in order."""
    losses, vals = [], []
    for d in stage_dirs(run):
        f = d / "logs" / "metrics.csv"
        if not f.is_file():
            raise SystemExit(f"error: {f} does not exist (a run with logger=csv, the default)")
        for row in csv.DictReader(open(f, newline="")):
            step = int(row["step"])
            if row.get("train/loss"):
                losses.append((d.name, step, float(row["train/loss"])))
            for k in ("val/ppl", "val_general/ppl"):
                if row.get(k):
                    vals.append((d.name, step, k, float(row[k])))
    return losses, vals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--png", type=Path, default=None, help="also plot both curves (matplotlib)")
    args = p.parse_args(argv)
    (la, va), (lb, vb) = curves(args.a), curves(args.b)
    by_b = {(s, t): x for s, t, x in lb}
    both = [(s, t, x, by_b[(s, t)]) for s, t, x in la if (s, t) in by_b]
    if not both:
        print("error: the runs share no logged step", file=sys.stderr)
        return 2
    print(f"| stage | step | {args.a.name} | {args.b.name} | diff |")
    print("|---|---:|---:|---:|---:|")
    for s, t, x, y in both:
        print(f"| {s} | {t} | {x:.4f} | {y:.4f} | {y - x:+.4f} |")
    d = [abs(y - x) for _, _, x, y in both]
    r = [abs(y - x) / abs(x) for _, _, x, y in both if x]
    print(f"\n{len(both)} steps: |diff| mean {sum(d) / len(d):.4f}, max {max(d):.4f}; "
          f"relative mean {100 * sum(r) / len(r):.2f}%, max {100 * max(r):.2f}%")
    vb_by = {(s, t, k): x for s, t, k, x in vb}
    for s, t, k, x in va:
        y = vb_by.get((s, t, k))
        if y is not None:
            print(f"{s} step {t} {k}: {x:.2f} vs {y:.2f} ({100 * (y / x - 1):+.2f}%)"
                  if math.isfinite(x) and x else f"{s} step {t} {k}: {x} vs {y}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, rows in ((args.a.name, la), (args.b.name, lb)):
            ax.plot(range(len(rows)), [x for _, _, x in rows], label=name)
        ax.set_xlabel("logged step (stages in order)")
        ax.set_ylabel("train loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
