"""The loader fuzzer's smoke run (bench/fuzz_loader.py, atheris): 60 s of mutated real exports,
no crash, no finding saved, peak RSS under 2 GB. The 1,000,000-execution run is the bench's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz_loader.py"


@pytest.mark.slow
def test_a_minute_of_fuzzing_the_loader_finds_nothing(tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (the dev extra has it)")
    artifacts = tmp_path / "artifacts"
    r = subprocess.run([sys.executable, str(BENCH), "--seconds", "60", "--artifacts", str(artifacts)],
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert not list(artifacts.iterdir()), out[-3000:]  # no crash-*, oom-*, timeout-*
    runs = int(re.search(r"stat::number_of_executed_units:\s+(\d+)", out).group(1))
    peak = int(re.search(r"stat::peak_rss_mb:\s+(\d+)", out).group(1))
    cov = int(re.findall(r" cov: (\d+)", out)[-1])
    assert runs > 5000 and peak < 2048 and cov > 200, (runs, peak, cov)  # it ran, with coverage feedback
