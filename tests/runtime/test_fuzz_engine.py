"""The C++ engine's libFuzzer smoke run (bench/fuzz_engine.py: csrc/tests/fuzz_model.cpp under ASan +
UBSan, seeded from real exports): 60 s, no finding. The 1,000,000-execution run is the bench's."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz_engine.py"


@pytest.mark.slow
def test_a_minute_of_fuzzing_the_engine_finds_nothing(tmp_path):
    if shutil.which("clang++") is None:
        pytest.skip("clang++ is not installed (Debian: apt-get install clang libclang-rt-14-dev; .ci/run does)")
    artifacts = tmp_path / "artifacts"
    r = subprocess.run([sys.executable, str(BENCH), "--seconds", "60", "--artifacts", str(artifacts)],
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert not list(artifacts.iterdir()), out[-4000:]
    runs = int(re.search(r"stat::number_of_executed_units:\s+(\d+)", out).group(1))
    peak = int(re.search(r"stat::peak_rss_mb:\s+(\d+)", out).group(1))
    assert runs > 1000 and peak < 2048, (runs, peak)
