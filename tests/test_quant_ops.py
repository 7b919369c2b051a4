"""The fused quantizers (csrc/train/quant_ops.cpp) against the reference quantizers, bit for bit."""

from __future__ import annotations

import pytest
import torch

from bitnet_train import quant
from bitnet_train.quant import EPS, BitLinear, act_quant, weight_quant

pytestmark = pytest.mark.skipif(quant._quant_ops is None, reason="bitnet_train._quant_ops is not built")


def _activations(rows, cols, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 4
    if rows > 3:
        x[0] = 0.0  # all zero: s_x = 127 / eps
        x[1] = 1e-7 * torch.randn(cols, generator=g)  # below eps
        # x * s_x lands exactly on k + 0.5 (s_x == 1 when max|x| == 127): ties round to even
        x[2] = torch.arange(cols, dtype=torch.float32) % 254 - 126.5
        x[2, 0] = 127.0
        x[3, ::2] = 3.0e38 if cols > 1 else x[3, ::2]  # huge magnitudes
    return x.to(dtype)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (37, 576), (16, 1537)])
def test_fused_activation_quantizer_is_the_reference_bit_for_bit(in_dtype, out_dtype, shape):
    x = _activations(*shape, seed=shape[1], dtype=in_dtype)
    codes, s_x, x_eff = quant._fused_act(x, EPS, out_dtype)
    ref_codes, ref_s = act_quant(x)
    assert codes.dtype == torch.int8 and torch.equal(codes.float(), ref_codes)
    assert torch.equal(s_x, ref_s)
    assert torch.equal(x_eff, (ref_codes / ref_s).to(out_dtype))


def test_fused_activation_quantizer_takes_any_leading_shape_and_propagates_nan():
    x = torch.randn(2, 3, 40)
    x[1, 2, 5] = float("nan")
    codes, s_x, x_eff = quant._fused_act(x, EPS, torch.float32)
    assert codes.shape == (2, 3, 40) and s_x.shape == (2, 3, 1)
    assert torch.isnan(s_x[1, 2]).all() and (codes[1, 2] == 0).all() and torch.isnan(x_eff[1, 2]).all()
    ref_codes, ref_s = act_quant(x[0])
    assert torch.equal(codes[0].float(), ref_codes) and torch.equal(s_x[0], ref_s)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 576), (300, 1001)])
def test_fused_weight_quantizer_is_the_reference_bit_for_bit(out_dtype, shape):
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=g) * 0.02
    s = float(weight_quant(w)[1])
    w.view(-1)[: w.numel() // 4] = s * 0.5  # ties at +-0.5 and +-1.5 round to even: 0 and +-2 -> clamped
    w.view(-1)[w.numel() // 4: w.numel() // 3] = -s * 1.5
    codes, s_w, w_eff = quant._fused_weight(w, EPS, out_dtype)
    ref_codes, ref_s = weight_quant(w)
    assert torch.equal(s_w, ref_s)
    assert torch.equal(codes.float(), ref_codes)
    assert torch.equal(w_eff, (ref_codes * ref_s).to(out_dtype))


@pytest.mark.parametrize("autocast", [False, True])
def test_bitlinear_forward_and_backward_are_unchanged_by_the_fused_quantizers(autocast, monkeypatch):
    torch.manual_seed(0)
    layer = BitLinear(96, 80)
    x = torch.randn(3, 17, 96)

    def run(fused):
        monkeypatch.setattr(quant, "USE_FUSED", fused)
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xi)
        (y.float() * torch.linspace(-1, 1, 80)).sum().backward()
        return y.detach(), xi.grad.clone(), layer.weight.grad.clone()

    calls = []
    real = quant._fused_act
    monkeypatch.setattr(quant, "_fused_act", lambda *a: calls.append(1) or real(*a))
    ref = run(False)
    assert not calls
    fused = run(True)
    assert calls  # the fused path ran
    for a, b in zip(ref, fused):
        assert a.dtype == b.dtype and torch.equal(a, b)
