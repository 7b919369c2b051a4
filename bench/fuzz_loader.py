"""Fuzz the .bitnet loader with atheris (libFuzzer for Python): the reader, then Engine construction
and one forward pass on whatever the reader accepts. Seeded with real exports.

    python bench/fuzz_loader.py --runs 1000000            # the bench figure: executions, crashes, peak RSS
    python bench/fuzz_loader.py --seconds 60              # the CI smoke run (tests/export/test_fuzz.py)

Each input is written to a file in a tmpfs (/dev/shm when there is one) and opened as a user's file
would be. A typed error (FormatError, the engine's ValueError, TokenizerError) is the expected answer
to a bad file; anything else -- another exception, a crash, an abort, a hang, running out of memory
-- is a finding, and libFuzzer saves the input as crash-*/oom-*/timeout-* in --artifacts. Half the
inputs are read with checksums verified (what users get), half without (so mutations reach the
checks behind the CRC). libFuzzer's -rss_limit_mb (2048) makes a peak RSS over 2 GB a finding.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

SEED_CONTEXTS = (64, 256)


def write_seeds(directory: Path) -> list[Path]:
    """Real exports to start from: the runtime tests' tiny model (ChatML tokenizer), its no-template
    twin, a t3_b160 and a t3_b5 (1.6-bit, versions 2 and 1) file and an fp32/tied one (needs torch,
    like the tests)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime"))
    import tiny_files

    from bitnet_train.export.from_model import model_arrays
    from bitnet_train.export.writer import write_bitnet

    out = []
    for ctx in SEED_CONTEXTS:
        out += list(tiny_files.build(str(directory / f"ctx{ctx}"), ctx).values())
    model = tiny_files.make_model()
    arrays = model_arrays(model, tokenizer_json=tiny_files.tokenizer_json(), tokenizer_config={"eos_token": "<|im_end|>"})
    out.append(write_bitnet(directory / "t160.bitnet", arrays, packing="t3_b160", dense_dtype="F16"))
    out.append(write_bitnet(directory / "t3.bitnet", arrays, packing="t3_b5", dense_dtype="BF16"))
    out.append(write_bitnet(directory / "f32.bitnet", arrays, packing="i2_b128", dense_dtype="F32"))
    corpus = directory / "corpus"
    corpus.mkdir(exist_ok=True)
    for i, p in enumerate(out):
        (corpus / f"seed{i}").write_bytes(p.read_bytes())
    return out


def make_target(scratch: Path):
    from bitnet_train.errors import BitNetError
    from bitnet_train.runtime.engine import Engine  # instrumented by main

    path = scratch / "input.bitnet"
    count = [0]

    def test_one_input(data: bytes) -> None:
        count[0] += 1
        path.write_bytes(data)
        try:
            eng = Engine.load(path, threads=1, verify_checksums=bool(count[0] % 2))
        except (BitNetError, ValueError):  # a typed, named refusal: the expected answer
            return
        try:
            eng.forward([0, 1], last_only=True)
        except ValueError:
            pass

    return test_one_input


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=None, help="executions (default: until --seconds)")
    p.add_argument("--seconds", type=int, default=None, help="stop after this many seconds")
    p.add_argument("--workdir", type=Path, default=None, help="seeds and corpus (default: a temporary directory)")
    p.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"), help="where findings are saved")
    p.add_argument("--rss-limit-mb", type=int, default=2048)
    p.add_argument("--write-seeds", type=Path, help=argparse.SUPPRESS)  # (the torch-side step, in a child)
    args = p.parse_args(argv)
    if args.write_seeds is not None:
        write_seeds(args.write_seeds)
        return
    if args.runs is None and args.seconds is None:
        p.error("give --runs N or --seconds S")
    import atheris

    import subprocess

    tmp = tempfile.TemporaryDirectory(prefix="fuzz_loader_")
    work = args.workdir or Path(tmp.name)
    # seeds are written by a child process: torch never loads here, and the modules under test are
    # first imported below, instrumented
    subprocess.run([sys.executable, __file__, "--write-seeds", str(work)], check=True)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    scratch = Path(tempfile.mkdtemp(prefix="fuzz_loader_", dir=shm))
    args.artifacts.mkdir(parents=True, exist_ok=True)
    libfuzzer = [sys.argv[0], str(work / "corpus"), f"-artifact_prefix={args.artifacts}/",
                 f"-rss_limit_mb={args.rss_limit_mb}", "-timeout=20", "-print_final_stats=1", "-max_len=1048576"]
    if args.runs is not None:
        libfuzzer.append(f"-runs={args.runs}")
    if args.seconds is not None:
        libfuzzer.append(f"-max_total_time={args.seconds}")
    import bitnet_train.export.packing  # noqa: F401 - the modules Engine.load imports when called
    import bitnet_train.export.reader  # noqa: F401
    import bitnet_train.runtime.tokenizer  # noqa: F401
    target = make_target(scratch)
    atheris.instrument_all()  # coverage feedback from every loaded Python function (the editable
    # install's import hook hides bitnet_train from atheris.instrument_imports)
    t0 = time.time()

    def report():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"fuzz_loader: {time.time() - t0:.0f} s, peak RSS {peak:.0f} MB (libFuzzer's stats above: "
              f"stat::number_of_executed_units is the execution count)", file=sys.stderr)

    import atexit

    atexit.register(report)
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
