"""Peak RSS of `bitnet-export --ptq` on a random sharded Llama HF directory (bf16), beside its size.

    python bench/export_memory.py --dir /work/big/mem                       # ~4 GB source, .bitnet
    python bench/export_memory.py --dir /work/big/mem --format gguf hf --keep

The source is written tensor by tensor (tests/export/tiny_models.write_random_llama_dir), then each
export runs in a child that reports its VmHWM (resident anonymous + file-mapped pages at their peak),
after a tiny export of the same kind (the interpreter, torch, transformers, the tokenizer). Delete
the directory afterwards (it is, without --keep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import sys
from bitnet_train.export.cli import main
rc = main(sys.argv[1:])
print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
sys.exit(rc)
"""
SHAPES = {  # Llama-family shapes: hidden, ffn, layers, vocab, heads, kv heads
    "4gb": dict(hidden=2048, ffn=8192, layers=30, vocab=32000, heads=32, kv_heads=8),
    "400mb": dict(hidden=1024, ffn=2816, layers=18, vocab=320, heads=16, kv_heads=4),
}


def export_peak(source: Path, out: Path, fmt: str) -> tuple[float, float]:
    """(peak RSS MiB, wall s) of one bitnet-export in a child."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, str(source), "-o", str(out), "--ptq", "-q", "--format", fmt],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bitnet-export failed:\n{r.stderr[-3000:]}")
    return int(r.stdout.split()[-1]) / 1024, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="where the source and outputs go (big)")
    p.add_argument("--shape", choices=tuple(SHAPES), default="4gb")
    p.add_argument("--format", nargs="+", default=["bitnet"], choices=("bitnet", "gguf", "hf"))
    p.add_argument("--keep", action="store_true", help="keep the source and outputs")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
    from tiny_models import tiny_tokenizer, write_random_llama_dir

    tok = tiny_tokenizer()
    shape = SHAPES[args.shape]
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        info = write_random_llama_dir(args.dir / "src", **shape, shard_bytes=2 << 30, tokenizer=tok)
        made_s = time.perf_counter() - t0
        write_random_llama_dir(args.dir / "tiny", **{**shape, "hidden": 64, "ffn": 128, "layers": 1, "vocab": 320,
                                                     "heads": 4, "kv_heads": 2}, shard_bytes=2 << 30, tokenizer=tok)
        rows = []
        for fmt in args.format:
            ext = {"bitnet": ".bitnet", "gguf": ".gguf", "hf": ""}[fmt]
            base, _ = export_peak(args.dir / "tiny", args.dir / f"tiny{ext}", fmt)
            peak, wall = export_peak(args.dir / "src", args.dir / f"out{ext}", fmt)
            rows.append({"format": fmt, "peak_rss_mib": round(peak), "tiny_export_rss_mib": round(base),
                         "wall_s": round(wall, 1)})
        print(json.dumps({"shape": shape, "source_mib": round(info["bytes"] / 2**20),
                          "largest_tensor_fp32_mib": round(4 * info["largest"] / 2**20, 1),
                          "source_written_s": round(made_s, 1), "exports": rows}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir / "src", ignore_errors=True)
            shutil.rmtree(args.dir / "tiny", ignore_errors=True)
            for f in ("out.bitnet", "out.gguf", "tiny.bitnet", "tiny.gguf"):
                (args.dir / f).unlink(missing_ok=True)
            for d in ("out", "tiny"):
                shutil.rmtree(args.dir / d, ignore_errors=True)


if __name__ == "__main__":
    main()
