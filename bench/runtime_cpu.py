"""CPU engine speed on the DESIGN.md shapes with random ternary weights (no file needed).

    .venv/bin/python bench/runtime_cpu.py --shape bitnet-large --threads 2 [--isa avx2] [--json]

Prints prefill tokens/s (one sequence of --prefill tokens), decode tokens/s (--decode steps after
the prefill, one token at a time, KV cache), bytes read per decoded token (weights + KV cache at
the mean decode context) and the fraction of a plain streaming read (every thread, the widest
vector loads, a 1 GiB buffer, best of 5: runtime.bench.read_bandwidth) that decode reaches. Random weights: speed, not quality.
The measuring code is bitnet_train.runtime.bench (also behind `bitnet-run bench --shape NAME`).
"""

from __future__ import annotations

import argparse
import json

from bitnet_train.runtime import Engine
from bitnet_train.runtime.bench import SHAPES, measure_speed, random_model


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
    res = {"shape": a.shape, **measure_speed(eng, a.prefill, a.decode)}
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
