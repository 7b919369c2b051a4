"""Cross-entropy through the lm_head in row chunks, without the (tokens x vocab) logits tensor.

A step of SmolLM2 width (vocab 49,152, 8 x 256 tokens) makes 100M logits: F.cross_entropy on them
(log_softmax forward and backward, the fp32 copies, the zero-filled gradient) took 1.45 s of a
4.7 s bf16 CPU step, more than every matmul of the model together (bench/qat_step_speed.py,
bench/README.md). Here each chunk of rows goes through the head, the log-sum-exp and the softmax
gradient while it is in cache; the gradients of the hidden states and of the head's weight are
made in the forward (the loss is a scalar: backward only scales them).

The arithmetic is the unfused path's: logits = h @ W^T in the matmul dtype (bf16 under CPU/CUDA
bf16 autocast, rounded there as nn.Linear rounds them), the loss in fp32 on those values, the
gradient of the logits (softmax - onehot) / n cast back to the matmul dtype for the two backward
products. Only the summation order of the loss and of the head's gradient over chunks differs.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _mm_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _ChunkedHeadLoss(torch.autograd.Function):
    """ce_weight * CE(h W^T, targets) [+ kl_weight * T^2 * KL(softmax(teacher / T) || softmax(h W^T / T))],
    the KL summed over the vocabulary and averaged over every row (distill.kl_with_temperature), a chunk
    of rows at a time. Returns (total, ce, kl); ce and kl are for logging (kl 0 without a teacher).

    The chunk's work tensors are allocated once and reused: on a CPU a fresh 25-50 MB tensor per op
    costs more in page faults than the arithmetic on it."""

    @staticmethod
    def forward(ctx, h, w, targets, teacher_logits, temperature: float, ce_weight: float, kl_weight: float,
                chunk: int):
        mm = _mm_dtype(h)
        T = float(temperature)
        kd = teacher_logits is not None
        with torch.autocast(device_type=h.device.type, enabled=False):
            hm, wm = h.to(mm), w.to(mm)
            n_rows, vocab = h.shape[0], w.shape[0]
            n_valid = int((targets != IGNORE_INDEX).sum())
            ce_denom, kl_denom = max(n_valid, 1), max(n_rows, 1)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hm) if need_h else None
            ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            kl_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            c_max = max(1, min(chunk, n_rows))
            buf = lambda dt=torch.float32: torch.empty((c_max, vocab), dtype=dt, device=h.device)  # noqa: E731
            z_buf, p_buf = buf(), buf()
            mm_buf = buf(mm) if mm != torch.float32 else None
            if kd:
                zt_buf, tt_buf, pt_buf = buf(), buf(), buf()
            # the head's gradient in a low-precision matmul dtype: every chunk's gradient kept (N x V) and one
            # product at the end; in fp32, added into grad_w chunk by chunk (addmm_, no extra pass)
            g_all = torch.empty((n_rows, vocab), dtype=mm, device=h.device) if need_w and mm_buf is not None else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w and g_all is None else None
            for r0 in range(0, n_rows, chunk):
                hc, tc = hm[r0:r0 + chunk], targets[r0:r0 + chunk]
                c = hc.shape[0]
                # the logits, rounded to the matmul dtype first as nn.Linear rounds them, then fp32
                if mm_buf is not None:
                    torch.matmul(hc, wm.t(), out=mm_buf[:c])
                    z = z_buf[:c].copy_(mm_buf[:c])
                else:
                    z = torch.matmul(hc, wm.t(), out=z_buf[:c])
                valid = tc != IGNORE_INDEX
                safe = torch.where(valid, tc, torch.zeros_like(tc))
                picked = z.gather(1, safe[:, None]).squeeze(1)
                mx = z.amax(dim=-1, keepdim=True)
                p = torch.exp(torch.sub(z, mx, out=p_buf[:c]), out=p_buf[:c])
                s = p.sum(dim=-1, keepdim=True)
                lse = (mx + s.log()).squeeze(1)
                ce_sum += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
                p.div_(s)  # softmax(z)
                if kd:
                    # student and teacher at temperature T: log p = x / T - lse(x / T)
                    zt = torch.div(z, T, out=zt_buf[:c])
                    mxt = zt.amax(dim=-1, keepdim=True)
                    e = torch.exp(torch.sub(zt, mxt, out=z), out=z)  # z is free from here
                    se = e.sum(dim=-1, keepdim=True)
                    lse_s = mxt + se.log()
                    tt = tt_buf[:c].copy_(teacher_logits[r0:r0 + chunk]).div_(T)
                    mtt = tt.amax(dim=-1, keepdim=True)
                    pt = torch.exp(torch.sub(tt, mtt, out=pt_buf[:c]), out=pt_buf[:c])
                    st = pt.sum(dim=-1, keepdim=True)
                    lse_t = mtt + st.log()
                    pt.div_(st)  # softmax(teacher / T)
                    # KL row = sum p_t (log p_t - log p_s) = sum p_t (tt - zt) - (lse_t - lse_s)
                    kl_rows = tt.sub_(zt).mul_(pt).sum(dim=-1, keepdim=True) - (lse_t - lse_s)
                    kl_sum += kl_rows.sum()
                if not (need_h or need_w):
                    continue
                # d/dz: ce_weight (softmax(z) - onehot) / n_valid [+ kl_weight T (softmax(z/T) - p_t) / n_rows]
                g = p.mul_(valid[:, None].to(p.dtype) * (ce_weight / ce_denom))
                g[torch.arange(c, device=g.device), safe] -= valid.to(g.dtype) * (ce_weight / ce_denom)
                if kd:
                    g.add_(e.div_(se).sub_(pt), alpha=kl_weight * T / kl_denom)
                if mm_buf is None:
                    gm = g
                else:
                    gm = (g_all[r0:r0 + c] if g_all is not None else mm_buf[:c]).copy_(g)
                if need_h:
                    torch.matmul(gm, wm, out=grad_h[r0:r0 + chunk])
                if need_w and g_all is None:
                    grad_w.addmm_(gm.t(), hc)
            if g_all is not None:
                grad_w = (g_all.t() @ hm).float()
        ce, kl = ce_sum / ce_denom, kl_sum / kl_denom
        total = ce_weight * ce + kl_weight * T * T * kl if kd else ce_weight * ce
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.in_dtypes = (h.dtype, w.dtype)
        ctx.mark_non_differentiable(ce, kl)
        return total, ce, kl

    @staticmethod
    def backward(ctx, grad_out, _grad_ce, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out.to(grad_h.dtype)).to(ctx.in_dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.in_dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """mean over targets != -100 of cross_entropy(h @ weight^T, targets), rows in chunks.

    h: (N, d) hidden states, weight: (V, d) the lm_head's, targets: (N,) int64."""
    _check(h, weight, targets, chunk)
    return _ChunkedHeadLoss.apply(h, weight, targets, None, 1.0, 1.0, 0.0, int(chunk))[0]


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)} "
                         f"do not multiply as h @ weight^T")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} for {h.shape[0]} rows")
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")


def linear_cross_entropy_kd(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float, ce_weight: float, kl_weight: float, chunk: int = 128):
    """(total, ce, kl): total = ce_weight * CE + kl_weight * T^2 * KL(teacher || student at T), the
    student's logits h @ weight^T made a chunk of rows at a time (never whole). teacher_logits: (N, V).
    ce and kl are detached (for logging); total carries the gradients of h and weight."""
    _check(h, weight, targets, chunk)
    if teacher_logits.shape != (h.shape[0], weight.shape[0]):
        raise ValueError(f"linear_cross_entropy_kd: teacher logits {tuple(teacher_logits.shape)} for "
                         f"{h.shape[0]} rows of a {weight.shape[0]}-word vocabulary")
    if not temperature > 0:
        raise ValueError(f"linear_cross_entropy_kd: temperature must be > 0, got {temperature}")
    return _ChunkedHeadLoss.apply(h, weight, targets, teacher_logits.detach(), float(temperature),
                                  float(ce_weight), float(kl_weight), int(chunk))
