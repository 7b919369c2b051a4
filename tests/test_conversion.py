"""GPTQ-style ternary conversion (bitnet_train/conversion.py): against a one-column-at-a-time
reference, by hand, and on a tiny model; then through the recipe CLI."""

from __future__ import annotations

import os

import pytest
import torch

from bitnet_train.conversion import (
    ConvertConfig, convert_model, gptq_codes, output_error, refit_scale, ternary_gptq, ternary_gptq_group,
    ternary_latent,
)
from bitnet_train.errors import ConfigError
from bitnet_train.model import BitNetModel, ModelConfig
from bitnet_train.quant import weight_quant


def _reference_gptq(w, h, s, damp):
    """Optimal Brain Quantization's form, one column at a time with the full inverse Hessian,
    which GPTQ's Cholesky + lazy block updates compute in another order."""
    W = w.double().clone()
    H = h.double().clone()
    H += torch.eye(H.shape[0], dtype=H.dtype) * damp * float(torch.diagonal(H).mean())
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q = (W[:, j] / s).round().clamp(-1, 1)
        Q[:, j] = q
        err = (W[:, j] - q * s) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]  # drop column j from the problem
    return Q


def _correlated(n_tokens, n_in, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n_in // 2, generator=g) @ torch.randn(n_in // 2, n_in, generator=g)
    x += 0.1 * torch.randn(n_tokens, n_in, generator=g)
    return x.double().t() @ x.double()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [3, 128])
def test_gptq_codes_match_the_one_column_at_a_time_reference(act_order, block_size):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 10, generator=g) * 0.05
    h = _correlated(64, 10, seed=1)
    s = float(weight_quant(w)[1])
    codes, comp = gptq_codes(w, h, s, damp=0.01, block_size=block_size, act_order=act_order)
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        ref = _reference_gptq(w[:, perm], h[perm][:, perm], s, 0.01)[:, torch.argsort(perm)]
    else:
        ref = _reference_gptq(w, h, s, 0.01)
    assert torch.equal(codes, ref)
    assert torch.equal(codes, (comp / s).round().clamp(-1, 1))  # each code is its compensated weight rounded


def test_gptq_with_uncorrelated_inputs_is_plain_rounding():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 24, generator=g) * 0.03
    h = torch.diag(torch.rand(24, generator=g).double() + 0.5)  # inputs uncorrelated: nothing to compensate
    codes_ref, s = weight_quant(w)
    codes, _ = gptq_codes(w, h, float(s))
    assert torch.equal(codes.float(), codes_ref)


def test_refit_scale_by_hand():
    w = torch.tensor([[1.0, 0.2]])
    q = torch.tensor([[1.0, 0.0]])
    assert refit_scale(w, q, torch.eye(2)) == pytest.approx(1.0)
    # Q H = [2, 1]: <QH, W> = 2 * 1 + 1 * 0.2 = 2.2, <QH, Q> = 2
    assert refit_scale(w, q, torch.tensor([[2.0, 1.0], [1.0, 2.0]])) == pytest.approx(1.1)
    # and output_error by hand: D = W - 1.1 Q = [-0.1, 0.2]; D H D^T = 2(0.01) + 2(-0.02) + 2(0.04) = 0.06
    assert output_error(w, 1.1 * q, torch.tensor([[2.0, 1.0], [1.0, 2.0]])) == pytest.approx(0.06)


def test_ternary_gptq_lowers_the_output_error_and_its_scale_is_the_least_squares_one():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g) * 0.02
    h = _correlated(512, 64, seed=4)
    r = ternary_gptq(w, h, ConvertConfig(method="gptq"))
    assert set(r.codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert r.error < 0.8 * r.round_error
    assert r.error == pytest.approx(output_error(w, r.codes * r.scale, h))
    for f in (0.99, 1.01):  # the closed form is the minimum over s for these codes
        assert output_error(w, r.codes * r.scale * f, h) > r.error


def test_stacked_gptq_of_linears_sharing_an_input_is_each_ones_own_gptq():
    # q/k/v (and gate/up) read one input: one stacked column loop with per-row scales must give every
    # tensor exactly the codes, scale and positions that rounding it alone gives
    g = torch.Generator().manual_seed(5)
    h = _correlated(256, 40, seed=6)
    ws = [torch.randn(24, 40, generator=g) * 0.02, torch.randn(8, 40, generator=g) * 0.05,
          torch.randn(8, 40, generator=g) * 0.01]
    cfg = ConvertConfig(method="gptq", block_size=16, scale_passes=3)
    results = ternary_gptq_group(ws, h, cfg)
    for got, w in zip(results, ws):
        alone = ternary_gptq(w, h, cfg)
        assert got.codes.shape == w.shape
        assert torch.equal(got.codes, alone.codes)
        assert got.scale == alone.scale and got.error == alone.error and got.round_error == alone.round_error
        assert torch.equal(got.positions, alone.positions)
    # the scales differ by 5x between the tensors: a stacked loop with one scale would not match
    assert len({round(r.scale, 6) for r in results}) == 3


@pytest.mark.parametrize("seed", range(6))
def test_ternary_latent_gives_back_the_codes_and_the_scale(seed):
    g = torch.Generator().manual_seed(seed)
    # positions spread over every regime: mostly zeros (mean|p| < 1 must grow), mostly +-1 far out (must shrink)
    spread = [0.3, 0.6, 1.0, 2.0, 4.0, 0.2][seed]
    p = torch.randn(37, 53, generator=g).double() * spread
    codes = p.round().clamp(-1, 1)
    scale = 0.013 * (seed + 1)
    latent = ternary_latent(codes, p, scale)
    got_codes, got_s = weight_quant(latent)
    assert torch.equal(got_codes.double(), codes)
    assert float(got_s) == pytest.approx(scale, rel=1e-6)
    # the order of magnitudes inside each code is kept (near-threshold weights stay near the threshold)
    nz = codes != 0
    a, b = p.abs()[nz], latent.double().abs()[nz]
    assert torch.equal(torch.argsort(a, stable=True), torch.argsort(b, stable=True)) or spread >= 2.0


def test_convert_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="convert.method"):
        ConvertConfig(method="awq")
    with pytest.raises(ConfigError, match="convert.recon_steps"):
        ConvertConfig(recon_steps=-1)


def _tiny_fp_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=32, norm="subln")
    return BitNetModel(cfg)


def _fp_logits(model, ids):
    lins = [m for m in model.bitlinear_modules().values()]
    for m in lins:
        m.quantize = False
    try:
        return model(ids)
    finally:
        for m in lins:
            m.quantize = True


@torch.no_grad()
def test_convert_model_brings_the_ternary_model_closer_to_the_full_precision_one():
    src = _tiny_fp_model()
    g = torch.Generator().manual_seed(5)
    calib = torch.randint(0, 97, (8, 32), generator=g)
    held = torch.randint(0, 97, (8, 32), generator=g)
    ref_calib, ref_held = _fp_logits(src, calib), _fp_logits(src, held)
    rounded = torch.nn.functional.mse_loss(src(held), ref_held)
    rounded_calib = torch.nn.functional.mse_loss(src(calib), ref_calib)

    gptq = _tiny_fp_model()
    report = convert_model(gptq, calib, ConvertConfig(method="gptq"), log=lambda m: None)
    assert report["layers"] == 14 and report["error_vs_round_mean"] < 1.0
    assert torch.nn.functional.mse_loss(gptq(calib), ref_calib) < 0.9 * rounded_calib
    assert torch.nn.functional.mse_loss(gptq(held), ref_held) < rounded  # also on tokens it never saw
    for m in gptq.bitlinear_modules().values():  # the latent weights quantize to ternary codes as always
        assert set(weight_quant(m.weight)[0].unique().tolist()) <= {-1.0, 0.0, 1.0}

    recon = _tiny_fp_model()
    report = convert_model(recon, calib, ConvertConfig(method="gptq", recon_steps=30, recon_lr=1e-3, recon_batch=4),
                           log=lambda m: None)
    before, after = report["recon_mse_before_after"]
    assert after < before
    assert torch.nn.functional.mse_loss(recon(calib), ref_calib) < torch.nn.functional.mse_loss(gptq(calib), ref_calib)


@torch.no_grad()
def test_reconstruction_from_rounded_codes_needs_no_gptq():
    m = _tiny_fp_model()
    calib = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(6))
    ref = _fp_logits(m, calib)
    rounded = torch.nn.functional.mse_loss(m(calib), ref)
    report = convert_model(m, calib, ConvertConfig(recon_steps=30, recon_lr=1e-3), log=lambda s: None)
    assert report["method"] == "round" and report["layers"] == 14 and "error_vs_round_mean" not in report
    assert torch.nn.functional.mse_loss(m(calib), ref) < rounded


def test_convert_round_changes_nothing():
    m = _tiny_fp_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert convert_model(m, torch.zeros(2, 8, dtype=torch.long), ConvertConfig()) == {"method": "round"}
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# -- through the recipe CLI ------------------------------------------------------------------------

def test_gptq_conversion_needs_an_imported_model(tmp_path, verse_corpus):
    from bitnet_train.config import compose_config
    from bitnet_train.train import run

    corpus = verse_corpus(tmp_path, docs=2, lines=20)
    with pytest.raises(ConfigError, match="convert.method=gptq converts an imported model"):
        run(compose_config(["recipe=shakespeare_tiny", "data.source=files", f"data.paths=[{corpus}]",
                            "convert.method=gptq", f"run_dir={tmp_path / 'r'}", "logger=csv"]))


@pytest.mark.slow
def test_staged_recipe_converts_with_gptq_in_its_first_stage_only(tmp_path, verse_corpus):
    from bitnet_train.config import compose_config
    from bitnet_train.model_dir import load_model_dir
    from bitnet_train.train import run

    from tests.test_distill import STAGES, _overrides

    torch.set_num_threads(1)
    (tmp_path / "corpus").mkdir()
    corpus = verse_corpus(tmp_path / "corpus", docs=4, lines=100)
    teacher_dir = tmp_path / "teacher"
    run(compose_config(_overrides(corpus, teacher_dir, quant="none", **{"model.norm": "none"})))
    os.environ.pop("BITNET_RUN_DIR", None)
    staged = tmp_path / "staged"
    run(compose_config(_overrides(corpus, staged, **{
        "model.init_from": str(teacher_dir / "model"), "model.norm": "subln", "data.tokenizer": "model",
        "distill": "bitdistill", "stages": STAGES, "convert.method": "gptq", "convert.calib_blocks": 4,
        "convert.recon_steps": 2})))
    os.environ.pop("BITNET_RUN_DIR", None)
    _, _, meta1 = load_model_dir(staged / "stage1" / "model")
    _, _, meta2 = load_model_dir(staged / "stage2" / "model")
    conv = meta1["provenance"]["convert"]
    assert conv["method"] == "gptq" and conv["layers"] == 14 and conv["calibration_tokens"] == 4 * 16
    assert "recon_mse_before_after" in conv
    assert "convert" not in meta2["provenance"] or meta2["provenance"]["convert"] == conv  # stage 2 did not convert again
