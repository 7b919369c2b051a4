"""Fuzz the C++ engine's config-sized code with libFuzzer (csrc/tests/fuzz_model.cpp, ASan + UBSan):
Model construction from a fuzzed config and tensor table, a KV cache, one forward pass.

    python bench/fuzz_engine.py --runs 1000000        # the bench figure
    python bench/fuzz_engine.py --seconds 60          # the CI smoke run (tests/runtime/test_fuzz_engine.py)

Builds build/fuzz with clang (Debian: apt-get install clang libclang-rt-14-dev) unless it is
there, writes seeds from the configs of real exports (the runtime tests' tiny models; the format
is the target's header comment), and runs it with -rss_limit_mb=2048 -malloc_limit_mb=2048: a
crash, a sanitizer report, a leak or an allocation over 2 GB is a finding, saved in --artifacts.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "fuzz"
BINARY = BUILD / "bitnet_fuzz_model"
NORMS, FFNS, DTYPES = ("subln", "bitlinear", "none"), ("swiglu", "relu2"), ("F16", "BF16", "F32")


def build() -> Path:
    if shutil.which("clang++") is None:
        raise SystemExit("clang++ not found (Debian: apt-get install clang libclang-rt-14-dev)")
    env = {**os.environ, "CC": "clang", "CXX": "clang++"}
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(BUILD), "-DBITNET_PYTHON=OFF", "-DBITNET_FUZZ=ON",
                    "-DBITNET_CUDA=OFF", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(BUILD), "-j2", "--target", "bitnet_fuzz_model"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return BINARY


def seed_bytes(cfg: dict, dense_dtype: str, tokens: list[int]) -> bytes:
    """A config (FORMAT.md `config`) in the target's input format, every tensor as expected."""
    head = struct.pack("<8I", cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"],
                       cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["max_seq_len"])
    head += bytes([NORMS.index(cfg["norm"]), FFNS.index(cfg["ffn"]), int(cfg["tie_embeddings"]),
                   DTYPES.index(dense_dtype)])
    n_tensors = 3 + cfg["num_layers"] * (2 + 14 + (2 if cfg["norm"] == "subln" else 0)
                                         + (7 if cfg["norm"] == "bitlinear" else 0))
    batch = bytes([1]) + struct.pack("<H", 15) + bytes([len(tokens) - 1]) + struct.pack(f"<{len(tokens)}I", *tokens)
    return head + bytes(n_tensors) + batch


def write_seeds(corpus: Path) -> int:
    """From real exports: the runtime tests' tiny model files (needs torch, as the tests do)."""
    sys.path.insert(0, str(ROOT / "tests" / "runtime"))
    import tiny_files

    from bitnet_train.export.reader import open_model

    corpus.mkdir(parents=True, exist_ok=True)
    n = 0
    with tempfile.TemporaryDirectory() as d:
        for ctx in (64, 256):
            for name, path in tiny_files.build(str(Path(d) / str(ctx)), ctx).items():
                f = open_model(path)
                for variant in ({}, {"norm": "none"}, {"norm": "bitlinear"}, {"tie_embeddings": True}, {"ffn": "relu2"}):
                    cfg = {**f.config, **variant}
                    for dt in DTYPES:
                        (corpus / f"seed-{ctx}-{name}-{n}").write_bytes(seed_bytes(cfg, dt, [1, 2, 3, 4]))
                        n += 1
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--seconds", type=int, default=None)
    p.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    p.add_argument("--corpus", type=Path, default=None, help="default: a temporary directory")
    p.add_argument("--parallel", type=int, default=1, help="independent fuzzer processes (--runs split between them)")
    args = p.parse_args(argv)
    if args.runs is None and args.seconds is None:
        p.error("give --runs N or --seconds S")
    binary = build()
    tmp = tempfile.TemporaryDirectory(prefix="fuzz_engine_")
    corpus = args.corpus or Path(tmp.name) / "corpus"
    seeds = write_seeds(corpus)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    procs = []
    for k in range(max(1, args.parallel)):
        work = corpus if k == 0 else corpus.parent / f"corpus{k}"
        if k:
            shutil.copytree(corpus, work, dirs_exist_ok=True)
        cmd = [str(binary), str(work), f"-artifact_prefix={args.artifacts}/", "-rss_limit_mb=2048",
               "-malloc_limit_mb=2048", "-timeout=20", "-print_final_stats=1", "-max_len=4096", f"-seed={k + 1}"]
        if args.runs is not None:
            cmd.append(f"-runs={args.runs // max(1, args.parallel)}")
        if args.seconds is not None:
            cmd.append(f"-max_total_time={args.seconds}")
        print(f"fuzz_engine: {seeds} seeds from real exports; {' '.join(cmd)}", flush=True)
        log = open(corpus.parent / f"fuzz{k}.log", "w+")  # a file, not a pipe: nobody must block on output
        procs.append((subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    codes, total, peak = [], 0, 0
    for proc, log in procs:
        proc.wait()
        log.seek(0)
        out = log.read()
        codes.append(proc.returncode)
        sys.stdout.write(out[-4000:])
        stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", out))
        total += int(stats.get("number_of_executed_units", 0))
        peak = max(peak, int(stats.get("peak_rss_mb", 0)))
    print(f"stat::number_of_executed_units: {total}\nstat::peak_rss_mb: {peak}")
    print(f"fuzz_engine: exit codes {codes}, {total} executions in all, peak RSS {peak} MB, findings: "
          f"{sorted(x.name for x in args.artifacts.iterdir())}")
    sys.exit(max(codes))


if __name__ == "__main__":
    main()
