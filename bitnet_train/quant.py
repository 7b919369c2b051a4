"""BitNet b1.58 quantizers, straight-through estimators and BitLinear.

The quantization contract (shared with export and the runtime, see DESIGN.md):

* weight, per tensor:   s_w = max(mean|W|, eps),  Wt = clamp(round(W / s_w), -1, 1),  W ~ Wt * s_w
  (quant.learnable_scale: s_w = max(exp(log_scale), eps) of a trained parameter instead, LSQ-style gradient)
* activation, per token (last dim): s_x = 127 / max(max|x|, eps),  xq = clamp(round(x * s_x), -128, 127)
* y = (xq @ Wt^T) * s_w / s_x            (integer-exact product, then the scale rule)

Rounding is half to even (torch.round). All quantizer math runs in fp32, also under bf16 autocast.
Gradients pass straight through (identity) the rounding and clamping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5
ACT_MAX = 127.0


def _act_scale(amax: torch.Tensor, eps: float) -> torch.Tensor:
    # A true division 127 / m, as the contract and the C++ runtime write it. (`127.0 / t` in
    # PyTorch is computed as reciprocal(t) * 127, which is 1 ulp off for about a quarter of m.)
    return amax.new_full((), ACT_MAX) / amax.clamp(min=eps)


def weight_quant(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantization of a whole tensor (the reference form).

    Returns (codes, s_w): codes in {-1, 0, 1} (fp32), s_w a 0-dim fp32 tensor; w ~ codes * s_w.
    """
    w = w.float()
    s_w = weight_scale(w, eps)
    codes = (w / s_w).round().clamp(-1, 1)
    return codes, s_w


def weight_scale(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """s_w = max(mean|W|, eps) of a whole tensor, 0-dim fp32: weight_quant's scale, without the codes."""
    return w.float().abs().mean().clamp(min=eps)


def ternary_master_weight(codes: torch.Tensor, scale: float, eps: float = EPS) -> torch.Tensor:
    """Latent fp32 weights W whose absmean quantization gives back (codes, scale).

    An imported ternary checkpoint (HF `bitnet`, a TQ1_0/TQ2_0 GGUF) holds codes and a scale,
    while our BitLinear keeps latent weights and quantizes them every forward. Storing
    codes * scale would not do: weight_quant would find s' = scale * (fraction of nonzero codes).
    With W = codes * c, c = scale / fraction: mean|W| = scale and round(W / scale) = codes / fraction,
    which clamps to the same codes since |codes / fraction| >= 1 where a code is nonzero. The codes
    come back exactly; the scale exactly or within a few float32 ulps (3 at most over 400 random
    tensors: c moves in steps of its own ulp, which can step over the target). All-zero codes give zeros.
    """
    codes = codes.float()
    if scale < eps:
        raise ValueError(f"ternary scale {scale} is below the quantizer's eps {eps}: not representable")
    if codes.numel() == 0 or not bool((codes.abs() <= 1).all()) or not bool((codes == codes.round()).all()):
        raise ValueError("ternary codes must be a non-empty tensor of -1, 0, 1")
    if not (scale > 0 and torch.isfinite(torch.tensor(scale))):
        raise ValueError(f"ternary scale must be a finite positive number, got {scale}")
    nonzero = int(codes.count_nonzero())
    if nonzero == 0:
        return torch.zeros_like(codes)
    target = torch.tensor(scale, dtype=torch.float32)
    c = target * (codes.numel() / nonzero)
    best, best_err = c, float("inf")
    for _ in range(8):  # mean|W| is c * fraction up to float rounding: step c by ulps toward it
        err = float((codes * c).abs().mean() - target)
        if abs(err) < best_err:
            best, best_err = c, abs(err)
        if err == 0:
            break
        c = torch.nextafter(c, c * 2 if err < 0 else c * 0)
    return codes * best


def act_quant(x: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization over the last dim (the reference form).

    Returns (codes, s_x): codes in [-128, 127] (fp32), s_x of shape (..., 1); x ~ codes / s_x.
    """
    x = x.float()
    s_x = _act_scale(x.abs().amax(dim=-1, keepdim=True), eps)
    codes = (x * s_x).round().clamp(-128, 127)
    return codes, s_x


# The training hot path: the same arithmetic as weight_quant / act_quant (bit for bit, tested),
# written to allocate one buffer per quantizer instead of four. On a CPU, fresh allocations cost
# page faults that weigh more than the arithmetic itself. Autograd must be off (as it is inside
# an autograd.Function's forward): the ops run in place and with out=.


def _weight_codes(w32: torch.Tensor, eps: float, log_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log_scale: a learned s_w (quant.learnable_scale) instead of mean|W|, clamped to eps the same way."""
    buf = w32.abs()
    s_w = buf.mean().clamp_(min=eps) if log_scale is None else learned_scale(log_scale, eps)
    codes = torch.div(w32, s_w, out=buf).round_().clamp_(-1, 1)
    return codes, s_w


def learned_scale(log_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """A learnable scale as the quantizer uses it: s_w = max(exp(log_scale), eps), 0-dim fp32, no graph.
    The parameter is the log so that Adam's steps (about lr in the parameter's units) are relative:
    the same fraction of s for a tensor whose scale is 0.002 as for one whose scale is 0.2."""
    return log_scale.detach().float().reshape(()).exp().clamp(min=eps)


def learned_weight_quant(w: torch.Tensor, log_scale: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """weight_quant with a learned scale: codes = clamp(round(W / s), -1, 1), s = learned_scale(log_scale)."""
    s_w = learned_scale(log_scale, eps)
    return (w.detach().float() / s_w).round().clamp(-1, 1), s_w


def _log_scale_grad(grad_weff: torch.Tensor, w: torch.Tensor, s_w: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """dL/d(log s) of w_eff = W + lam * (s * clamp(round(W / s), -1, 1) - W) (LSQ, Esser et al. 2020, with
    round's gradient passed straight through): with v = W / s, dw_q/ds = round(v) - v inside the clip
    range |v| <= 1 and the clamp value sign(v) outside; times s for the log, 0 where s sits on eps.
    grad_weff is dL/dw_eff, which the straight-through estimator also passes to W. LSQ's gradient scale
    1 / sqrt(numel) is left out: Adam divides every parameter's gradient by its own running RMS."""
    if not float(s_w) > eps:
        return torch.zeros((), dtype=torch.float32)
    v = w.detach().float() / s_w
    q = v.round().clamp(-1, 1)
    d = torch.where(v.abs() <= 1, q - v, q)
    return (grad_weff.float() * d).sum() * (lam * s_w)


def _act_codes(x32: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    buf = x32.abs()
    s_x = _act_scale(buf.amax(dim=-1, keepdim=True), eps)
    codes = torch.mul(x32, s_x, out=buf).round_().clamp_(-128, 127)
    return codes, s_x


_HAS_INT_MM = hasattr(torch, "_int_mm")

try:  # csrc/train/quant_ops.cpp: the two quantizers above in one pass each, bit for bit
    from . import _quant_ops
except ImportError:  # a source tree without the built extension: the reference ops above
    _quant_ops = None
# Switch for tests and benchmarks: False runs the reference quantizers on every path.
USE_FUSED = True
_KIND = {torch.float32: 1, torch.bfloat16: 2}


def _fused_ok(x: torch.Tensor, w: torch.Tensor, mm_dtype: torch.dtype) -> bool:
    return (USE_FUSED and _quant_ops is not None and _HAS_INT_MM and x.device.type == "cpu"
            and x.dtype in _KIND and w.dtype == torch.float32 and mm_dtype in _KIND)


def _fused_act(x: torch.Tensor, eps: float, mm_dtype: torch.dtype):
    """-> (int8 codes, s_x (..., 1) fp32, x_eff = codes / s_x in mm_dtype): _act_codes' values, one pass."""
    x = x.contiguous()
    cols = x.shape[-1]
    codes = torch.empty(x.shape, dtype=torch.int8)
    s_x = torch.empty((*x.shape[:-1], 1), dtype=torch.float32)
    x_eff = torch.empty(x.shape, dtype=mm_dtype)
    _quant_ops.act_rows(x.data_ptr(), x.dtype == torch.bfloat16, x.numel() // max(cols, 1), cols, eps,
                        codes.data_ptr(), s_x.data_ptr(), x_eff.data_ptr(), _KIND[mm_dtype])
    return codes, s_x, x_eff


def _fused_weight(w32: torch.Tensor, eps: float, mm_dtype: torch.dtype, log_scale: torch.Tensor | None = None):
    """-> (int8 codes, s_w, w_eff = codes * s_w in mm_dtype): _weight_codes' values; s_w is torch's mean
    (or the learned scale)."""
    w32 = w32.contiguous()
    s_w = weight_scale(w32, eps) if log_scale is None else learned_scale(log_scale, eps)
    codes = torch.empty(w32.shape, dtype=torch.int8)
    w_eff = torch.empty(w32.shape, dtype=mm_dtype)
    _quant_ops.weight_codes(w32.data_ptr(), w32.numel(), float(s_w), codes.data_ptr(), w_eff.data_ptr(), _KIND[mm_dtype])
    return codes, s_w, w_eff


def _integer_product(x_codes: torch.Tensor, w_codes: torch.Tensor, mm_dtype: torch.dtype) -> torch.Tensor:
    """x_codes @ w_codes^T of integer-valued codes (fp32 or int8, int8 range), as exact fp32 sums.

    On the CPU: int8 x int8 -> int32 (torch._int_mm, oneDNN's VNNI/AMX-INT8 kernels), what the
    runtime computes; measured 1,530 GOP/s against 600 bf16 and 170 fp32 GFLOP/s on a 2-core Zen 4
    (bench/README.md). Exact under bf16 autocast as well, where a bf16 matmul would round the sums
    to 8 mantissa bits. Elsewhere the fp32 matmul is exact (|sums| < 2^24 for in_features < 132,000);
    in the autocast dtype the codes are exact but the sums are rounded to it (the GPU recipe)."""
    if x_codes.device.type == "cpu" and _HAS_INT_MM:
        lead = x_codes.shape[:-1]
        acc = torch._int_mm(x_codes.reshape(-1, x_codes.shape[-1]).to(torch.int8), w_codes.to(torch.int8).t())
        return acc.view(*lead, w_codes.shape[0]).float()
    return F.linear(x_codes.to(mm_dtype), w_codes.to(mm_dtype)).float()


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    mm_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        mm_dtype = torch.get_autocast_dtype("cuda")
    return mm_dtype


class _BitLinearFn(torch.autograd.Function):
    """y = q_lam(x) @ q_lam(W)^T with q_lam(v) = v + lam * (q(v) - v); identity gradients (STE).

    At lam == 1 the product is computed in the integer-exact form (xq @ Wt^T) * s_w / s_x, which is
    what the runtime computes with int32 accumulation. Backward needs the dequantized operands
    (x_eff = xq / s_x, w_eff = Wt * s_w): they are made in place in the code buffers once the product
    is done, so a layer allocates one activation-sized buffer, as large as the one saved for
    backward. (Saving int8 codes instead and dequantizing in backward needs a quarter of the
    memory but costs two more passes and allocations: 2-5% of a CPU step, bench/README.md.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, lam: float, eps: float, act: bool = True,
                log_scale: torch.Tensor | None = None):
        mm_dtype = _matmul_dtype(x)
        ctx.in_dtypes = (x.dtype, w.dtype)
        ctx.lam, ctx.eps = lam, eps
        ctx.learned = log_scale is not None
        out_dtype = mm_dtype if mm_dtype != torch.float32 else x.dtype
        if not act:  # weight-only quantization (quant.act_quant_from_step): the input as it is
            w32 = w if w.dtype == torch.float32 else w.float()
            w_codes, s_w = _weight_codes(w32, eps, log_scale)
            w_eff = w_codes.mul_(s_w)
            if lam != 1.0:
                w_eff = w_eff.sub_(w32).mul_(lam).add_(w32)
            x_eff, w_eff = x.to(mm_dtype), w_eff.to(mm_dtype)
            ctx.save_for_backward(x_eff, w_eff, *((w, s_w) if ctx.learned else ()))
            return F.linear(x_eff, w_eff).to(out_dtype)
        if lam == 1.0 and _fused_ok(x, w, mm_dtype):
            x_i8, s_x, x_eff = _fused_act(x, eps, mm_dtype)
            w_i8, s_w, w_eff = _fused_weight(w, eps, mm_dtype, log_scale)
            y = _integer_product(x_i8, w_i8, mm_dtype).mul_(s_w / s_x)
            ctx.save_for_backward(x_eff, w_eff, *((w, s_w) if ctx.learned else ()))
            return y.to(out_dtype)
        x32 = x if x.dtype == torch.float32 else x.float()
        w32 = w if w.dtype == torch.float32 else w.float()
        x_codes, s_x = _act_codes(x32, eps)  # (..., in), (..., 1)
        w_codes, s_w = _weight_codes(w32, eps, log_scale)  # (out, in), ()
        if lam == 1.0:
            acc = _integer_product(x_codes, w_codes, mm_dtype)  # (..., out), the exact integer sums
            y = acc.mul_(s_w / s_x)
            x_eff = x_codes.div_(s_x).to(mm_dtype)
            w_eff = w_codes.mul_(s_w).to(mm_dtype)
        else:
            # x + lam * (q(x) - x), evaluated in that order.
            x_eff = x_codes.div_(s_x).sub_(x32).mul_(lam).add_(x32).to(mm_dtype)
            w_eff = w_codes.mul_(s_w).sub_(w32).mul_(lam).add_(w32).to(mm_dtype)
            y = F.linear(x_eff, w_eff).float()
        ctx.save_for_backward(x_eff, w_eff, *((w, s_w) if ctx.learned else ()))
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_eff, w_eff = ctx.saved_tensors[:2]
        g = grad_y.to(x_eff.dtype)
        grad_x = grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w_eff).to(ctx.in_dtypes[0])  # (..., in)
        want_s = ctx.learned and ctx.needs_input_grad[5]
        if ctx.needs_input_grad[1] or want_s:
            grad_weff = g.reshape(-1, g.shape[-1]).t() @ x_eff.reshape(-1, x_eff.shape[-1])  # dL/dw_eff
            if want_s:
                w, s_w = ctx.saved_tensors[2:]
                grad_s = _log_scale_grad(grad_weff, w, s_w, ctx.lam, ctx.eps)
            if ctx.needs_input_grad[1]:
                grad_w = grad_weff.to(ctx.in_dtypes[1])
        return grad_x, grad_w, None, None, None, grad_s


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class BitLinear(nn.Module):
    """Drop-in for nn.Linear.

    quantize=True:  b1.58 forward (ternary weights, int8 activations, STE); lam < 1 blends the
                    quantized and latent values (lambda warm-up for fine-tuning).
    quantize=False: a plain full-precision linear (quant=none runs and hybrid-precision modules).
    pre_norm=True:  an RMSNorm over the input inside the layer (the original BitNet BitLinear).
    bias=True:      a full-precision bias added after the product (Qwen2's q/k/v), never quantized.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quantize: bool = True,
        pre_norm: bool = False,
        norm_eps: float = 1e-6,
        eps: float = EPS,
        bias: bool = False,
        learnable_scale: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.quantize = quantize
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = RMSNorm(in_features, norm_eps) if pre_norm else None
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # lambda is a buffer so that it is checkpointed and restored on resume.
        self.register_buffer("lam", torch.tensor(1.0), persistent=True)
        # False: weight-only quantization while training (quant.act_quant_from_step; set every step from
        # the step, so not checkpointed). Evaluation always quantizes the activations: the served function.
        self.act_quant = True
        # quant.learnable_scale: the trained s_w = exp(log_scale); scale_set False until the first forward
        # sets it to mean|W| (after any import or conversion has set W). Both are checkpointed; export
        # writes the learned s_w.
        self.log_scale = nn.Parameter(torch.zeros(())) if (learnable_scale and quantize) else None
        self.register_buffer("scale_set", torch.zeros((), dtype=torch.bool) if self.log_scale is not None else None)
        nn.init.normal_(self.weight, std=0.02)

    def set_lambda(self, lam: float) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {lam}")
        self.lam.fill_(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if not self.quantize:
            return F.linear(x, self.weight, self.bias)
        if self.log_scale is not None and not bool(self.scale_set):
            self.init_scale()
        y = _BitLinearFn.apply(x, self.weight, float(self.lam), self.eps, self.act_quant or not self.training,
                               self.log_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def init_scale(self) -> None:
        """The learnable scale's start: mean|W| of the weights as they are now (what absmean would use)."""
        if self.log_scale is not None:
            self.log_scale.copy_(weight_scale(self.weight.detach(), self.eps).log())
            self.scale_set.fill_(True)

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ternary codes as int8, fp32 scale s_w): what export writes (the learned scale where there is one)."""
        if self.log_scale is not None and bool(self.scale_set):
            codes, s_w = learned_weight_quant(self.weight, self.log_scale, self.eps)
        else:
            codes, s_w = weight_quant(self.weight.detach(), self.eps)
        return codes.to(torch.int8), s_w

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quantize={self.quantize}, pre_norm={self.norm is not None}, bias={self.bias is not None}"
        )


def lambda_at(step: int, warmup_steps: int, schedule: str = "linear") -> float:
    """Lambda warm-up: 0 -> 1 over warmup_steps (linear by default; 'none' means always 1)."""
    if schedule == "none" or warmup_steps <= 0:
        return 1.0
    if schedule != "linear":
        raise ValueError(f"unknown lambda schedule {schedule!r}; expected 'linear' or 'none'")
    return min(1.0, max(0.0, step / warmup_steps))


def set_model_act_quant(model: nn.Module, on: bool) -> None:
    """int8 activations on (the contract) or off (weight-only quantization) in training mode."""
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.act_quant = bool(on)


def set_model_lambda(model: nn.Module, lam: float) -> None:
    for m in model.modules():
        if isinstance(m, BitLinear) and m.quantize:
            m.set_lambda(lam)
