"""Loading a model maps its file: the t3_b160 (1.6-bit) ternary weights are read in place, with no
second copy in memory (what lets a 100B model load on a 24 GiB machine). Slow: writes ~220 MB."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bitnet_train.export.packing import packed_shape
from bitnet_train.export.schema import linear_shapes
from bitnet_train.runtime.bench import shape_config, write_random_model

DIMS = dict(num_layers=20, hidden_size=2048, intermediate_size=5632, num_heads=16, num_kv_heads=4, vocab_size=4096,
            ffn="swiglu")

# Run in a fresh process: RSS split into anonymous memory (what a copy would add) and file pages
# (the mapped file, which the checksums and the code scan touch once), before and after the load.
PROBE = r"""
import json, sys

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out

from bitnet_train.runtime import Engine
from bitnet_train.export import reader  # noqa: F401 - imported before the first measure, as Engine.load does

before = status()
eng = Engine.load(sys.argv[1], threads=2)
loaded = status()
eng.forward([1, 2, 3])
print(json.dumps({"before": before, "loaded": loaded, "packing": eng.quant["packing"]}))
"""


@pytest.mark.slow
def test_loading_a_t3_b160_file_adds_no_second_copy(tmp_path):
    path = write_random_model(tmp_path / "m.bitnet", DIMS, max_seq_len=64, packing="t3_b160")
    size = path.stat().st_size
    cfg = shape_config(DIMS, 64)
    ternary = sum(math.prod(packed_shape(o, i, "t3_b160")) for o, i in linear_shapes(cfg).values())
    assert ternary > 150 << 20  # most of the file
    run = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["packing"] == "t3_b160"
    anon = out["loaded"]["RssAnon"] - out["before"]["RssAnon"]
    rss = out["loaded"]["VmRSS"] - out["before"]["VmRSS"]
    # a repack (as t3_b5 files get) would add 1.25x the ternary bytes of anonymous memory; in place,
    # only the fp32 norm vectors and bookkeeping are allocated
    assert anon < 32 << 20, f"loading allocated {anon / 2**20:.1f} MiB (ternary weights: {ternary / 2**20:.0f} MiB)"
    assert rss < size + (32 << 20), f"RSS grew by {rss / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
