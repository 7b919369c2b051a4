"""bench/parity_file.py: the agreement statistics, the reference's self-comparison (thread count, noise) and a
whole run on a tiny exported model."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import tiny_files


@pytest.fixture(scope="module")
def parity(bench_script):
    return bench_script("parity_file")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files.build(str(tmp_path_factory.mktemp("tiny")))


def test_agreement_counts_flips_margins_and_differences(parity):
    a = np.array([[0.0, 1.0, 3.0], [2.0, 0.0, 1.85], [0.0, 0.0, 5.0]], dtype=np.float32)  # margins 2, 0.15, 5
    b = np.array([[0.0, 1.0, 3.1], [1.8, 0.0, 2.0], [0.0, 0.0, 5.0]], dtype=np.float32)  # the near-tie flips
    agreement = parity.Agreement()
    agreement.add(a, b)
    agreement.add(a[2:], a[2:])
    s = agreement.summary()
    assert s["top1_agreement"] == pytest.approx(3 / 4)
    assert s["positions_margin_over_0.5"] == pytest.approx(3 / 4) and s["agreement_margin_over_0.5"] == 1.0
    assert s["largest_margin_disagreeing"] == pytest.approx(0.15, abs=1e-6)
    assert s["mean_abs_logit_diff"] == pytest.approx((0.1 / 3 + 0.35 / 3) / 4, rel=1e-5)
    bins = s["margin_bins"]
    assert bins["0.1-0.2"] == {"positions": 1, "flips": 1}
    assert bins["1-inf"] == {"positions": 3, "flips": 0}
    assert sum(b["positions"] for b in bins.values()) == 4 and sum(b["flips"] for b in bins.values()) == 1


def test_reference_logits_noise_and_threads_leave_nothing_behind(parity, files):
    from bitnet_train.export.reference import build_reference_model

    ref = build_reference_model(files["model"])
    x = np.arange(1, 17, dtype=np.int64)
    threads = torch.get_num_threads()
    plain = parity.reference_logits(ref, x)
    assert np.array_equal(plain, parity.reference_logits(ref, x, threads=1))  # the same sum orders here
    assert torch.get_num_threads() == threads
    noisy = parity.reference_logits(ref, x, noise=1e-3, seed=0)
    assert not np.array_equal(noisy, plain) and np.abs(noisy - plain).max() < 0.5
    assert np.array_equal(noisy, parity.reference_logits(ref, x, noise=1e-3, seed=0))  # seeded
    assert not ref.embed_tokens._forward_hooks
    assert np.array_equal(plain, parity.reference_logits(ref, x))


def test_a_whole_run_on_a_tiny_model(parity, files, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["parity_file.py", str(files["model"]), "--tokens", "96", "--window", "48",
                                      "--greedy", "8", "--threads", "1", "--baseline", "--noise", "1e-4", "--json"])
    parity.main()
    r = json.loads(capsys.readouterr().out)
    assert r["eval_tokens"] == 96 and r["greedy_steps"] == 8
    # a random tiny model is not chaotic: the runtime agrees with the reference everywhere
    assert r["top1_agreement"] == 1.0 and r["greedy_agreement"] == 1.0 and r["ppl_rel_diff"] < 1e-4
    assert 0 < r["mean_abs_logit_diff"] < 1e-3
    assert r["reference_vs_noisy_reference"]["mean_abs_logit_diff"] > 0
    threads_key = next(k for k in r if k.startswith("reference_") and k.endswith("_threads"))
    assert r[threads_key]["top1_agreement"] == 1.0


def test_bad_threads_are_named(parity, files, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["parity_file.py", str(files["model"]), "--threads", "0"])
    with pytest.raises(SystemExit):
        parity.main()
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
