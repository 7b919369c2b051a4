"""Quantizers, STE and BitLinear against the contract written out independently (DESIGN.md).

Expected values come from Python floats or numpy (float32 where the contract fixes fp32 rounding,
float64 for "close to the exact product"), never from the functions under test; the last tests
check the training hot path against the reference quantizers, bit for bit.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitnet_train import quant
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig
from bitnet_train.quant import BitLinear, act_quant, lambda_at, set_model_lambda, weight_quant

EPS32 = np.float32(1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from threads; on a shared, loaded machine the thread pool's
    # waits made the model test 10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- independent formulas (numpy, float32 where the contract rounds in fp32) ----

def ref_act(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s_x = 127 / max(max|x|, eps) per row, xq = clamp(rint(x * s_x), -128, 127); fp32, ties to even."""
    x = x.astype(np.float32)
    s = np.float32(127.0) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), EPS32)
    return np.clip(np.rint(x * s), -128, 127), s


def ref_weight_codes(w: np.ndarray, s_w: np.float32) -> np.ndarray:
    return np.clip(np.rint(w.astype(np.float32) / s_w), -1, 1)


def t(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype=np.float32))


def layer(w: torch.Tensor, **kw) -> BitLinear:
    m = BitLinear(w.shape[1], w.shape[0], **kw)
    with torch.no_grad():
        m.weight.copy_(w)
    return m


# ---- weight quantizer ----

def test_weight_absmean_scale_and_half_to_even_ternary_codes():
    # W / s_w lands exactly on .5 ties: 0.5 -> 0, 1.5 -> 2 -> clamped 1, -0.5 -> 0, -1.5 -> -1, 2 -> 1
    v = [[0.5, 1.5, -0.5, -1.5], [2.0, 0.0, -1.0, 1.0]]
    w = [[0.25 * a for a in row] for row in v]  # dyadic: every step below is exact in fp32
    flat = [a for row in w for a in row]
    s_expected = sum(abs(a) for a in flat) / len(flat)
    assert s_expected == 0.25
    codes_expected = [[max(-1, min(1, round(a / s_expected))) for a in row] for row in w]  # round(): ties to even
    assert codes_expected == [[0, 1, 0, -1], [1, 0, -1, 1]]

    codes, s_w = weight_quant(t(w))
    assert s_w.dtype == torch.float32 and s_w.dim() == 0 and s_w.item() == s_expected
    assert codes.dtype == torch.float32 and codes.tolist() == codes_expected


def test_weight_scale_on_random_weights_and_ternary_range():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 40)) * 0.05).astype(np.float32)
    codes, s_w = weight_quant(torch.from_numpy(w))
    s64 = np.abs(w.astype(np.float64)).mean()
    assert s_w.item() == pytest.approx(s64, rel=1e-6)
    ratio = w / np.float32(s_w.item())
    away_from_ties = np.abs(np.abs(ratio) - 0.5) > 1e-4
    want = ref_weight_codes(w, np.float32(s_w.item()))
    np.testing.assert_array_equal(codes.numpy()[away_from_ties], want[away_from_ties])
    assert set(np.unique(codes.numpy())) <= {-1.0, 0.0, 1.0}


def test_all_zero_and_tiny_weights_use_eps():
    codes, s_w = weight_quant(torch.zeros(3, 5))
    assert s_w.item() == EPS32 and not codes.any()
    codes, s_w = weight_quant(torch.full((2, 4), 1e-7))  # mean 1e-7 < eps: W / s_w = 0.01 -> 0
    assert s_w.item() == EPS32 and not codes.any()


def test_quantized_weight_is_int8_codes_and_fp32_scale():
    w = t([[0.5, -0.2, 0.0], [0.9, -1.3, 0.1]])
    m = layer(w)
    codes, s_w = m.quantized_weight()
    s = np.abs(w.numpy()).mean(dtype=np.float32)
    assert codes.dtype == torch.int8 and s_w.dtype == torch.float32
    assert s_w.item() == pytest.approx(float(s), rel=1e-6)
    np.testing.assert_array_equal(codes.numpy(), ref_weight_codes(w.numpy(), np.float32(s_w.item())))


# ---- activation quantizer ----

def test_activation_per_token_scale_and_half_to_even_codes():
    x = [
        [127.0, 2.5, -2.5, 3.5, -0.5, 0.5, 1.5],  # max 127 -> s_x = 1: x * s_x is x itself
        [254.0, 5.0, -3.0, 7.0, 1.0, -1.0, 0.0],  # max 254 -> s_x = 0.5: 2.5, -1.5, 3.5, 0.5, -0.5
        [1.0, -2.0, 0.5, 0.25, 0.0, 0.125, -0.375],  # max 2 -> s_x = 63.5
    ]
    s_expected = [127.0 / max(abs(a) for a in row) for row in x]
    assert s_expected == [1.0, 0.5, 63.5]
    codes_expected = [[max(-128, min(127, round(a * s))) for a in row] for row, s in zip(x, s_expected)]
    assert codes_expected[0] == [127, 2, -2, 4, 0, 0, 2] and codes_expected[1] == [127, 2, -2, 4, 0, 0, 0]

    codes, s_x = act_quant(t(x))
    assert s_x.shape == (3, 1) and s_x.dtype == torch.float32
    assert s_x.flatten().tolist() == s_expected
    assert codes.tolist() == codes_expected


def test_activation_scale_is_a_true_division_bit_exact_on_random_rows():
    # The runtime computes 127.0f / max(...) in fp32; PyTorch's `127 / tensor` would be
    # reciprocal(t) * 127, one ulp off for about a quarter of the rows.
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((512, 24)) * rng.uniform(1e-3, 30, (512, 1))).astype(np.float32)
    codes, s_x = act_quant(torch.from_numpy(x))
    want_codes, want_s = ref_act(x)
    np.testing.assert_array_equal(s_x.numpy(), want_s)
    np.testing.assert_array_equal(codes.numpy(), want_codes)


def test_activation_codes_stay_in_int8_range_and_hit_127_at_the_max():
    rng = np.random.default_rng(2)
    m = rng.uniform(1e-4, 1e4, 2000).astype(np.float32)
    x = np.stack([m, -m, m * np.float32(0.999), -m * np.float32(0.5)], axis=1)
    codes, _ = act_quant(torch.from_numpy(x))
    c = codes.numpy()
    assert c.min() >= -128 and c.max() <= 127
    np.testing.assert_array_equal(c[:, 0], 127)
    np.testing.assert_array_equal(c[:, 1], -127)


def test_all_zero_rows_scale_127_over_eps_codes_zero_output_zero_no_nan():
    x = torch.zeros(2, 3, 8)
    x[0, 1] = torch.linspace(-1, 1, 8)
    codes, s_x = act_quant(x)
    zero_rows = [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)]
    for i, j in zero_rows:
        assert s_x[i, j, 0].item() == np.float32(127.0) / EPS32
        assert not codes[i, j].any()

    w = torch.randn(5, 8)
    m = layer(w)
    xg = x.clone().requires_grad_()
    y = m(xg)
    y.sum().backward()
    for i, j in zero_rows:
        assert torch.equal(y[i, j], torch.zeros(5))
    assert torch.isfinite(y).all() and torch.isfinite(xg.grad).all() and torch.isfinite(m.weight.grad).all()


# ---- autocast ----

def test_quantizers_run_in_fp32_under_bf16_autocast():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((4, 6, 32)).astype(np.float32))
    w = torch.from_numpy((rng.standard_normal((16, 32)) * 0.05).astype(np.float32))
    xc, sx = act_quant(x)
    wc, sw = weight_quant(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xc_a, sx_a = act_quant(x)
        wc_a, sw_a = weight_quant(w)
    for a, b in ((xc, xc_a), (sx, sx_a), (wc, wc_a), (sw, sw_a)):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    # a bf16 input is upcast first: the same as quantizing its fp32 value
    xb = x.bfloat16()
    for a, b in zip(act_quant(xb), act_quant(xb.float())):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_bitlinear_under_bf16_autocast_is_close_to_the_fp32_integer_exact_result():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    w = (rng.standard_normal((24, 64)) * 0.05).astype(np.float32)
    m = layer(torch.from_numpy(w))
    xt = torch.from_numpy(x).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(xt)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xt.grad.dtype == torch.float32 and m.weight.grad.dtype == torch.float32
    want = exact_forward(x, w)
    np.testing.assert_allclose(y.float().detach().numpy(), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    # on the CPU the integer product is int8 x int8 -> int32 (exact): the layer's bf16 output is the
    # fp32 contract's result rounded once, bit for bit (a bf16 matmul would round the sums first)
    xq, s_x = ref_act(x)
    s_w = np.float32(m.quantized_weight()[1].item())
    acc = (xq @ ref_weight_codes(w, s_w).T).astype(np.float32)
    want32 = torch.from_numpy(acc * (s_w / s_x))
    assert torch.equal(y.detach(), want32.to(torch.bfloat16))


# ---- BitLinear forward and STE backward ----

def exact_forward(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(xq @ Wt^T) * s_w / s_x in float64 from independently computed codes and scales."""
    xq, s_x = ref_act(x)
    s_w = np.abs(w.astype(np.float64)).mean()
    wt = ref_weight_codes(w, np.float32(s_w))
    return (xq.astype(np.float64) @ wt.T.astype(np.float64)) * s_w / s_x.astype(np.float64)


@pytest.fixture
def xw():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 7, 48)) * rng.uniform(0.1, 10, (2, 7, 1))).astype(np.float32)
    w = (rng.standard_normal((20, 48)) * 0.04).astype(np.float32)
    return x, w


def test_forward_is_the_integer_exact_product_then_the_scale_rule(xw):
    x, w = xw
    m = layer(torch.from_numpy(w))
    y = m(torch.from_numpy(x)).detach().numpy()
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, exact_forward(x, w), rtol=1e-6, atol=1e-7)
    # and bit for bit in fp32: the integer accumulator times (s_w / s_x)
    xq, s_x = ref_act(x)
    s_w = np.float32(m.quantized_weight()[1].item())
    acc = xq @ ref_weight_codes(w, s_w).T  # integers, exact in fp32
    np.testing.assert_array_equal(y, acc.astype(np.float32) * (s_w / s_x))


def test_ste_gradients_at_lambda_one(xw):
    x, w = xw
    m = layer(torch.from_numpy(w))
    xt = torch.from_numpy(x).requires_grad_()
    g = np.random.default_rng(6).standard_normal((2, 7, 20)).astype(np.float32)
    m(xt).backward(torch.from_numpy(g))
    xq, s_x = ref_act(x)
    s_w = np.abs(w.astype(np.float64)).mean()
    wt = ref_weight_codes(w, np.float32(s_w))
    g64 = g.astype(np.float64).reshape(-1, 20)
    want_gx = g64 @ (wt * s_w)
    want_gw = g64.T @ (xq / s_x).reshape(-1, 48)
    np.testing.assert_allclose(xt.grad.numpy().reshape(-1, 48), want_gx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.weight.grad.numpy(), want_gw, rtol=1e-5, atol=1e-5)


def test_backward_twice_with_retained_graph_gives_the_same_gradients(xw):
    x, w = xw
    m = layer(torch.from_numpy(w))
    xt = torch.from_numpy(x).requires_grad_()
    y = m(xt).square().sum()
    y.backward(retain_graph=True)
    g1 = (xt.grad.clone(), m.weight.grad.clone())
    xt.grad = m.weight.grad = None
    y.backward()
    assert torch.equal(g1[0], xt.grad) and torch.equal(g1[1], m.weight.grad)


def test_lambda_zero_is_plain_linear_with_plain_gradients(xw):
    x, w = xw
    m = layer(torch.from_numpy(w))
    m.set_lambda(0.0)
    x1 = torch.from_numpy(x).requires_grad_()
    x2 = torch.from_numpy(x).requires_grad_()
    w2 = torch.from_numpy(w).requires_grad_()
    y1, y2 = m(x1), F.linear(x2, w2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.weight.grad, w2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lam", [0.25, 0.7])
def test_lambda_in_between_blends_latent_and_quantized_values(xw, lam):
    x, w = xw
    m = layer(torch.from_numpy(w))
    m.set_lambda(lam)
    xt = torch.from_numpy(x).requires_grad_()
    y = m(xt)
    g = np.random.default_rng(7).standard_normal(y.shape).astype(np.float32)
    y.backward(torch.from_numpy(g))
    xq, s_x = ref_act(x)
    s_w = np.abs(w.astype(np.float64)).mean()
    wt = ref_weight_codes(w, np.float32(s_w))
    x_eff = x + lam * (xq / s_x.astype(np.float64) - x)
    w_eff = w + lam * (wt * s_w - w)
    np.testing.assert_allclose(y.detach().numpy(), x_eff @ w_eff.T, rtol=1e-5, atol=1e-5)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(xt.grad.numpy(), g64 @ w_eff, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.weight.grad.numpy(), g64.reshape(-1, 20).T @ x_eff.reshape(-1, 48),
                               rtol=1e-5, atol=1e-5)


def test_unquantized_bitlinear_is_f_linear(xw):
    x, w = xw
    m = layer(torch.from_numpy(w), quantize=False)
    x1 = torch.from_numpy(x).requires_grad_()
    x2 = torch.from_numpy(x).requires_grad_()
    w2 = torch.from_numpy(w).requires_grad_()
    y1, y2 = m(x1), F.linear(x2, w2)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(m.weight.grad, w2.grad)


@pytest.mark.parametrize("quantize", [False, True])
def test_pre_norm_applies_rmsnorm_first(xw, quantize):
    x, w = xw
    pre = layer(torch.from_numpy(w), quantize=quantize, pre_norm=True, norm_eps=1e-6)
    plain = layer(torch.from_numpy(w), quantize=quantize)
    with torch.no_grad():
        pre.norm.weight.copy_(torch.linspace(0.5, 1.5, 48))
    y = pre(torch.from_numpy(x)).detach()
    x64 = x.astype(np.float64)
    normed = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 1.5, 48)
    if quantize:
        # the norm runs first, then the quantized layer on its output
        assert torch.equal(y, plain(pre.norm(torch.from_numpy(x))).detach())
        np.testing.assert_allclose(pre.norm(torch.from_numpy(x)).detach().numpy(), normed, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_allclose(y.numpy(), normed @ w.astype(np.float64).T, rtol=1e-5, atol=1e-6)


# ---- lambda schedule ----

def test_lambda_at_linear_schedule():
    assert [lambda_at(s, 100) for s in (-5, 0, 25, 50, 100, 150)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert lambda_at(3, 0) == 1.0 and lambda_at(0, 0) == 1.0
    assert lambda_at(3, 100, "none") == 1.0
    with pytest.raises(ValueError, match="exponential"):
        lambda_at(3, 100, "exponential")


def test_set_lambda_range_and_set_model_lambda():
    m = BitLinear(4, 3)
    for bad in (-0.01, 1.01, 2.0):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            m.set_lambda(bad)
    m.set_lambda(0.0)
    m.set_lambda(1.0)
    assert "lam" in m.state_dict()

    model = torch.nn.Sequential(BitLinear(4, 4), BitLinear(4, 4, quantize=False), BitLinear(4, 2))
    set_model_lambda(model, 0.3)
    assert model[0].lam.item() == pytest.approx(0.3) and model[2].lam.item() == pytest.approx(0.3)
    assert model[1].lam.item() == 1.0


# ---- the training hot path against the reference quantizers ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_quantizers_match_the_reference_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(6, 9, 40, generator=g) * torch.rand(6, 9, 1, generator=g) * 20).to(dtype)
    x[1, 2] = 0
    w = (torch.randn(30, 40, generator=g) * 0.03).to(dtype)
    for fast, ref in ((quant._act_codes(x.float(), 1e-5), act_quant(x)),
                      (quant._weight_codes(w.float(), 1e-5), weight_quant(w))):
        for a, b in zip(fast, ref):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_bitlinear_forward_matches_the_reference_quantizers(xw, lam):
    x, w = xw
    m = layer(torch.from_numpy(w))
    m.set_lambda(lam)
    xt = torch.from_numpy(x)
    xc, s_x = act_quant(xt)
    wc, s_w = weight_quant(m.weight.detach())
    if lam == 1.0:
        want = F.linear(xc, wc) * (s_w / s_x)
    else:
        want = F.linear(xt + lam * (xc / s_x - xt), m.weight.detach() + lam * (wc * s_w - m.weight.detach()))
    assert torch.equal(m(xt).detach(), want)


# ---- model level ----

def test_ternary_model_learns_a_repeated_sequence():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=2, max_seq_len=32)
    model = BitNetModel(cfg, QuantConfig(method="b1.58"))
    assert all(m.quantize for m in model.bitlinear_modules().values())
    seq = torch.arange(8).repeat(4)[None]  # 0..7 four times
    idx, tgt = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss(idx, tgt)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    # below ln 8 = 2.08 (the unigram plateau) with a margin: it uses the previous token
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 1.2, losses


@pytest.mark.parametrize("zero_fraction", [0.0, 0.33, 0.9, 0.999])
def test_ternary_master_weight_quantizes_back_to_its_codes_and_scale(zero_fraction):
    from bitnet_train.quant import ternary_master_weight

    g = torch.Generator().manual_seed(int(zero_fraction * 1000))
    for trial in range(20):
        codes = torch.randint(-1, 2, (48 + trial, 80), generator=g).float()
        codes[torch.rand(codes.shape, generator=g) < zero_fraction] = 0
        if not codes.any():
            codes[0, 0] = 1
        scale = float(torch.rand((), generator=g)) * 0.2 + 1e-4
        got_codes, got_scale = weight_quant(ternary_master_weight(codes, scale))
        assert torch.equal(got_codes, codes)
        want = torch.tensor(scale, dtype=torch.float32)
        assert abs(float(got_scale) - float(want)) <= 4 * float(torch.finfo(torch.float32).eps * want)  # a few ulps


def test_ternary_master_weight_refuses_what_is_not_ternary():
    from bitnet_train.quant import ternary_master_weight

    assert not ternary_master_weight(torch.zeros(3, 4), 0.1).any()
    for codes, scale, needle in ((torch.tensor([[2.0]]), 0.1, "-1, 0, 1"), (torch.tensor([[0.5]]), 0.1, "-1, 0, 1"),
                                 (torch.tensor([[1.0]]), 0.0, "below the quantizer's eps"),
                                 (torch.tensor([[1.0]]), float("nan"), "finite positive")):
        with pytest.raises(ValueError, match=needle):
            ternary_master_weight(codes, scale)


def test_weight_only_quantization_trains_with_the_input_as_it_is_and_evaluates_with_int8():
    from bitnet_train.quant import set_model_act_quant

    torch.manual_seed(0)
    layer = BitLinear(40, 24)
    x = torch.randn(5, 40) * 3
    codes, s_w = weight_quant(layer.weight)
    set_model_act_quant(layer, False)
    layer.train()
    # by hand: ternary weights, full-precision input
    assert torch.allclose(layer(x), x @ (codes * s_w).t(), atol=1e-5)
    xi = x.clone().requires_grad_(True)
    layer(xi).sum().backward()
    assert torch.allclose(xi.grad, (codes * s_w).sum(0).expand(5, 40), atol=1e-5)
    assert torch.allclose(layer.weight.grad, x.sum(0).expand(24, 40), atol=1e-4)  # STE: dW = g^T x
    layer.eval()  # evaluation is the served function: int8 activations whatever the training phase
    xq, s_x = act_quant(x)
    assert torch.equal(layer(x), (xq @ codes.t()) * (s_w / s_x))
    set_model_act_quant(layer, True)
    layer.train()
    assert torch.equal(layer(x), (xq @ codes.t()) * (s_w / s_x))


def test_act_quant_from_step_switches_int8_activations_on_at_that_step():
    from bitnet_train.lightning_module import BitNetLM
    from bitnet_train.model import ModelConfig, QuantConfig

    class _LM(BitNetLM):  # the step and optimizer a Trainer would give on_train_batch_start
        step = 0
        global_step = property(lambda self: self.step)

        def optimizers(self):
            return type("O", (), {"param_groups": []})()

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      max_seq_len=16)
    lm = _LM(cfg.to_dict(), QuantConfig(act_quant_from_step=3).to_dict(), {"lr": 1e-3}, total_steps=10)
    seen = []
    for step in range(5):
        lm.step = step
        lm.on_train_batch_start(None, 0)
        seen.append({m.act_quant for m in lm.model.bitlinear_modules().values()})
    assert seen == [{False}, {False}, {False}, {True}, {True}]
    with pytest.raises(ValueError, match="act_quant_from_step"):
        QuantConfig(act_quant_from_step=-1)


# ---- learnable scale (quant.learnable_scale) ----

def lsq_reference(x: torch.Tensor, w: torch.Tensor, log_s: torch.Tensor, lam: float, act: bool) -> torch.Tensor:
    """An independent autograd formula of the learnable-scale forward: LSQ's w_q = s * round(clamp(W / s))
    with round passed straight through, blended by lambda, int8 activations as act_quant (no gradient to x
    needed here)."""
    s = log_s.exp()
    v = (w / s).clamp(-1, 1)
    q = v + (v.round() - v).detach()
    w_eff = w + lam * (q * s - w)
    if act:
        xq, s_x = act_quant(x)
        x = x + lam * (xq / s_x - x)
    return F.linear(x, w_eff)


@pytest.mark.parametrize("act,lam", [(True, 1.0), (True, 0.5), (False, 1.0)])
def test_learnable_scale_starts_at_absmean_and_its_gradient_is_lsqs(act, lam):
    torch.manual_seed(3)
    m = BitLinear(48, 20, learnable_scale=True)
    m.set_lambda(lam)
    m.act_quant = act
    m.train()
    x = torch.randn(2, 5, 48)
    assert not bool(m.scale_set)
    g = torch.randn(2, 5, 20)
    (m(x) * g).sum().backward()
    assert bool(m.scale_set)
    assert m.log_scale.item() == pytest.approx(float(weight_quant(m.weight)[1].log()), abs=0)  # mean|W| at start
    log_s = m.log_scale.detach().clone().requires_grad_(True)
    w = m.weight.detach().clone().requires_grad_(True)
    (lsq_reference(x, w, log_s, lam, act) * g).sum().backward()
    assert m.log_scale.grad.item() == pytest.approx(log_s.grad.item(), rel=1e-4)
    assert m.log_scale.grad.abs().item() > 0
    # the weights keep the plain straight-through gradient (also outside the clip range): dW = g^T x_eff
    x_eff = x if not act else x + lam * (act_quant(x)[0] / act_quant(x)[1] - x)
    assert torch.allclose(m.weight.grad, g.reshape(-1, 20).t() @ x_eff.reshape(-1, 48), atol=1e-4)


def test_learned_scale_sets_the_codes_and_the_forward():
    torch.manual_seed(4)
    m = BitLinear(40, 24, learnable_scale=True).eval()
    x = torch.randn(3, 40)
    m(x)  # first forward: the scale starts at mean|W|
    with torch.no_grad():
        m.log_scale.add_(0.4)  # as if trained: a larger s zeroes more codes
    codes, s_w = m.quantized_weight()
    assert s_w.item() == pytest.approx(float(weight_quant(m.weight)[1]) * np.exp(0.4), rel=1e-6)
    assert torch.equal(codes.float(), ref_weight_codes_t(m.weight, s_w))
    assert (codes == 0).sum() > (weight_quant(m.weight)[0] == 0).sum()
    xq, s_x = act_quant(x)
    assert torch.equal(m(x), (xq @ codes.float().t()) * (s_w / s_x))  # the integer-exact product, learned s_w


def ref_weight_codes_t(w: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(ref_weight_codes(w.detach().numpy(), np.float32(s_w.item())))


def test_learnable_scale_is_off_by_default_and_only_on_quantized_linears():
    assert BitLinear(8, 4).log_scale is None and "scale_set" not in BitLinear(8, 4).state_dict()
    assert BitLinear(8, 4, quantize=False, learnable_scale=True).log_scale is None
    keys = BitLinear(8, 4, learnable_scale=True).state_dict().keys()
    assert {"log_scale", "scale_set"} <= set(keys)
