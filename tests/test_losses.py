"""losses.linear_cross_entropy: F.cross_entropy(h @ W^T, targets) in row chunks, without the logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bitnet_train.losses import linear_cross_entropy
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig


def unfused(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


def grads(fn, h, w, t):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, t)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_a_hand_computed_example():
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # logits [[1, 0, 1], [0, 2, 2]]
    t = torch.tensor([0, 1])
    want = ((math.log(math.e + 1 + math.e) - 1) + (math.log(1 + 2 * math.e ** 2) - 2)) / 2
    loss, gh, gw = grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk=1), h, w, t)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # d/d logits = (softmax - onehot) / 2; d/dh = that @ W
    p0 = torch.tensor([math.e, 1, math.e]) / (2 * math.e + 1)
    p1 = torch.tensor([1, math.e ** 2, math.e ** 2]) / (1 + 2 * math.e ** 2)
    g = torch.stack([p0 - torch.tensor([1.0, 0, 0]), p1 - torch.tensor([0, 1.0, 0])]) / 2
    torch.testing.assert_close(gh, g @ w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw, g.t() @ h, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [1, 7, 64, 300, 1000])
def test_matches_f_cross_entropy_in_fp32_for_any_chunk(chunk):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(300, 48, generator=g), torch.randn(500, 48, generator=g) * 0.2
    t = torch.randint(0, 500, (300,), generator=g)
    t[[3, 150, 299]] = -100  # ignored rows, as F.cross_entropy's ignore_index
    want = grads(unfused, h, w, t)
    got = grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk=chunk), h, w, t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    assert got[1][[3, 150, 299]].abs().max() == 0  # no gradient from an ignored row


def test_under_bf16_autocast_the_loss_and_hidden_gradient_are_the_unfused_ones():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(256, 64, generator=g), torch.randn(700, 64, generator=g) * 0.1
    t = torch.randint(0, 700, (256,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = grads(unfused, h, w, t)
        got = grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk=100), h, w, t)
    assert got[0].dtype == torch.float32 and got[1].dtype == h.dtype and got[2].dtype == w.dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)  # the same bf16 logits, fp32 loss
    torch.testing.assert_close(got[1], want[1], rtol=1e-2, atol=1e-6)
    # the head's gradient: chunk products summed in fp32 (the unfused one is one bf16 product):
    # both within bf16 precision of the fp64 truth
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    F.cross_entropy(F.linear(h64.bfloat16().double(), w64.bfloat16().double()), t).backward()
    scale = w64.grad.abs().max().item()
    err_fused = (got[2].double() - w64.grad).abs().max().item() / scale
    err_unfused = (want[2].double() - w64.grad).abs().max().item() / scale
    assert err_fused < 1e-2 and err_fused <= err_unfused * 1.5, (err_fused, err_unfused)


def test_all_rows_ignored_gives_zero_loss_and_zero_gradients():
    h, w = torch.randn(5, 8), torch.randn(11, 8)
    loss, gh, gw = grads(linear_cross_entropy, h, w, torch.full((5,), -100))
    assert loss.item() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_model_loss_is_cross_entropy_of_its_logits_with_tied_and_untied_heads():
    for tie in (False, True):
        cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, max_seq_len=16, tie_embeddings=tie)
        torch.manual_seed(0)
        model = BitNetModel(cfg, QuantConfig())
        idx = torch.randint(0, 97, (3, 16))
        tgt = torch.roll(idx, -1, 1)
        ref = F.cross_entropy(model(idx).reshape(-1, 97), tgt.reshape(-1))
        ref.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        loss = model.loss(idx, tgt)
        loss.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-7, msg=lambda m: f"{n} (tie {tie}): {m}")


def test_bad_shapes_are_refused_with_one_line():
    with pytest.raises(ValueError, match="do not multiply"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk=0)


# ---- CE + KL(teacher || student at T) in chunks (the distillation stage's loss) ----

def unfused_kd(h, w, t, teacher, T, cw, kw):
    from bitnet_train.distill import kl_with_temperature

    z = F.linear(h, w)
    ce, kl = F.cross_entropy(z.float(), t), kl_with_temperature(z, teacher, T)
    return cw * ce + kw * T * T * kl, ce, kl


def test_kd_a_hand_computed_example():
    from bitnet_train.losses import linear_cross_entropy_kd

    h = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # student logits [1, 0]
    teacher = torch.tensor([[0.0, 2.0]])
    T = 2.0
    s = torch.tensor([math.exp(0.5), 1.0]) / (math.exp(0.5) + 1)  # softmax([1, 0] / 2)
    p = torch.tensor([1.0, math.e]) / (1 + math.e)  # softmax([0, 2] / 2)
    kl = float((p * (p.log() - s.log())).sum())
    ce = math.log(math.e + 1) - 1  # target 0
    total, ce_got, kl_got = linear_cross_entropy_kd(h, w, torch.tensor([0]), teacher, T, 0.5, 2.0)
    assert ce_got.item() == pytest.approx(ce, rel=1e-6) and kl_got.item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(0.5 * ce + 2.0 * T * T * kl, rel=1e-5)
    assert not ce_got.requires_grad and not kl_got.requires_grad


@pytest.mark.parametrize("autocast", [False, True])
def test_kd_matches_cross_entropy_plus_kl_with_temperature(autocast):
    from bitnet_train.losses import linear_cross_entropy_kd

    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(300, 48, generator=g), torch.randn(500, 48, generator=g) * 0.3
    t = torch.randint(0, 500, (300,), generator=g)
    teacher = torch.randn(300, 500, generator=g) * 2
    args = (2.0, 0.7, 1.3)
    got, want = [], []
    for fn, out in ((lambda a, b: linear_cross_entropy_kd(a, b, t, teacher, *args, chunk=64), got),
                    (lambda a, b: unfused_kd(a, b, t, teacher, *args), want)):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total, ce, kl = fn(a, b)
        total.backward()
        out.extend([total.detach(), ce.detach(), kl.detach(), a.grad, b.grad])
    for i, (x, y) in enumerate(zip(got, want)):
        # fp32: the same sums in another order; bf16: the same rounded logits, the gradients summed in
        # fp32 here where the unfused path rounds each term's gradient to bf16
        tol = (1e-6 if i < 3 else 1e-2) if autocast else 2e-6
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * y.abs().max().item())


def test_kd_refuses_mismatched_teacher_logits_and_temperature():
    from bitnet_train.losses import linear_cross_entropy_kd

    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher logits"):
        linear_cross_entropy_kd(h, w, t, torch.randn(4, 9), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        linear_cross_entropy_kd(h, w, t, torch.randn(4, 10), 0.0, 1.0, 1.0)
