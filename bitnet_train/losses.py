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
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)} "
                         f"do not multiply as h @ weight^T")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} for {h.shape[0]} rows")
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")
    return _ChunkedLinearCE.apply(h, weight, targets, int(chunk))
