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
import torch.nn.functional as F

IGNORE_INDEX = -100


def _mm_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int):
        mm = _mm_dtype(h)
        with torch.autocast(device_type=h.device.type, enabled=False):
            hm, wm = h.to(mm), w.to(mm)
            n_valid = int((targets != IGNORE_INDEX).sum())
            denom = max(n_valid, 1)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hm) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for r0 in range(0, h.shape[0], chunk):
                hc, tc = hm[r0:r0 + chunk], targets[r0:r0 + chunk]
                logits = (hc @ wm.t()).float()  # (c, V): rounded to the matmul dtype first, as nn.Linear
                valid = tc != IGNORE_INDEX
                safe = torch.where(valid, tc, torch.zeros_like(tc))
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                # log-sum-exp and softmax in place over the chunk (no temporaries of its size)
                mx = logits.amax(dim=-1, keepdim=True)
                e = logits.sub_(mx).exp_()
                s = e.sum(dim=-1, keepdim=True)
                lse = (mx + s.log()).squeeze(1)
                total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
                if not (need_h or need_w):
                    continue
                # d loss / d logits = (softmax - onehot) / n
                g = e.mul_(valid[:, None].to(e.dtype) / (s * denom))
                g[torch.arange(g.shape[0], device=g.device), safe] -= valid.to(g.dtype) / denom
                gm = g.to(mm)
                if need_h:
                    torch.matmul(gm, wm, out=grad_h[r0:r0 + chunk])
                if need_w:
                    grad_w += (gm.t() @ hc).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.in_dtypes = (h.dtype, w.dtype)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out.to(grad_h.dtype)).to(ctx.in_dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.in_dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """mean over targets != -100 of cross_entropy(h @ weight^T, targets), rows in chunks.

    h: (N, d) hidden states, weight: (V, d) the lm_head's, targets: (N,) int64."""
    _check(h, weight, targets, chunk)
    return _ChunkedLinearCE.apply(h, weight, targets, int(chunk))


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)} "
                         f"do not multiply as h @ weight^T")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} for {h.shape[0]} rows")
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")


class _ChunkedLinearCEKD(torch.autograd.Function):
    """ce_weight * CE(h W^T, targets) + kl_weight * T^2 * KL(softmax(teacher / T) || softmax(h W^T / T)),
    the KL summed over the vocabulary and averaged over every row (distill.kl_with_temperature),
    in row chunks as _ChunkedLinearCE. Returns (total, ce, kl); ce and kl are for logging."""

    @staticmethod
    def forward(ctx, h, w, targets, teacher_logits, temperature: float, ce_weight: float, kl_weight: float,
                chunk: int):
        mm = _mm_dtype(h)
        T = float(temperature)
        with torch.autocast(device_type=h.device.type, enabled=False):
            hm, wm = h.to(mm), w.to(mm)
            n_rows = h.shape[0]
            n_valid = int((targets != IGNORE_INDEX).sum())
            ce_denom, kl_denom = max(n_valid, 1), max(n_rows, 1)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hm) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            kl_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            for r0 in range(0, n_rows, chunk):
                hc, tc = hm[r0:r0 + chunk], targets[r0:r0 + chunk]
                z = (hc @ wm.t()).float()  # the student's logits, as nn.Linear rounds them
                valid = tc != IGNORE_INDEX
                safe = torch.where(valid, tc, torch.zeros_like(tc))
                picked = z.gather(1, safe[:, None]).squeeze(1)
                mx = z.amax(dim=-1, keepdim=True)
                p = (z - mx).exp_()
                s = p.sum(dim=-1, keepdim=True)
                lse = (mx + s.log()).squeeze(1)
                ce_sum += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
                p.div_(s)  # softmax(z)
                # the student at temperature T, log_softmax as F.log_softmax(z / T)
                log_s = z.div_(T)
                log_s -= torch.logsumexp(log_s, dim=-1, keepdim=True)
                log_t = F.log_softmax(teacher_logits[r0:r0 + chunk].float() / T, dim=-1)
                p_t = log_t.exp()
                kl_sum += (p_t * (log_t - log_s)).sum()
                if not (need_h or need_w):
                    continue
                # d/dz: ce_weight (softmax(z) - onehot) / n_valid + kl_weight T^2 (softmax(z/T) - p_t) / (T n_rows)
                g = p.mul_(valid[:, None].to(p.dtype) * (ce_weight / ce_denom))
                g[torch.arange(g.shape[0], device=g.device), safe] -= valid.to(g.dtype) * (ce_weight / ce_denom)
                kd = kl_weight * T / kl_denom
                g += log_s.exp_().sub_(p_t).mul_(kd)
                gm = g.to(mm)
                if need_h:
                    torch.matmul(gm, wm, out=grad_h[r0:r0 + chunk])
                if need_w:
                    grad_w += (gm.t() @ hc).float()
        ce, kl = ce_sum / ce_denom, kl_sum / kl_denom
        total = ce_weight * ce + kl_weight * T * T * kl
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


def linear_cross_entropy_kd(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float, ce_weight: float, kl_weight: float, chunk: int = 256):
    """(total, ce, kl): total = ce_weight * CE + kl_weight * T^2 * KL(teacher || student at T), the
    student's logits h @ weight^T made a chunk of rows at a time (never whole). teacher_logits: (N, V).
    ce and kl are detached (for logging); total carries the gradients of h and weight."""
    _check(h, weight, targets, chunk)
    if teacher_logits.shape != (h.shape[0], weight.shape[0]):
        raise ValueError(f"linear_cross_entropy_kd: teacher logits {tuple(teacher_logits.shape)} for "
                         f"{h.shape[0]} rows of a {weight.shape[0]}-word vocabulary")
    if not temperature > 0:
        raise ValueError(f"linear_cross_entropy_kd: temperature must be > 0, got {temperature}")
    return _ChunkedLinearCEKD.apply(h, weight, targets, teacher_logits.detach(), float(temperature),
                                    float(ce_weight), float(kl_weight), int(chunk))
