"""A better start than rounding: choose a full-precision model's ternary codes on calibration data.

QAT from an imported model starts from absmean rounding of each weight tensor. On the same served
format (per-tensor codes in {-1, 0, +1}, one scale s) the codes can be chosen better before any
training (issue 17, section 1.3):

* **Error-compensated rounding** (GPTQ, Frantar et al. 2022, on the fixed grid {-s, 0, +s}): the
  columns of W are rounded one at a time and each column's rounding error is spread over the columns
  not yet rounded, through the inverse Hessian of the layer's output error on calibration
  activations, H = X^T X (X: the layer's int8-quantized inputs). The scale is then refit in closed
  form for the chosen codes, s = <Q H, W> / <Q H, Q> (least squares of the output error), and the
  rounding run again with it; the best of the passes and of plain rounding is kept (never worse than
  rounding on the calibration activations). Layers go block by block and, inside a block, in the order
  their inputs are computed (q/k/v, o, gate/up, down), each on inputs that already pass through the
  quantized layers before it.
* **Block-wise reconstruction** (EfficientQAT's Block-AP, Chen et al. 2024): then each block's latent
  weights and norms train for `recon_steps` Adam steps (straight-through, as in QAT) to reproduce the
  full-precision block's output on the cached calibration inputs; no lm_head, so each step is cheap.

Our BitLinear holds latent weights and quantizes them every forward (s = mean|W|, codes = round(W/s)),
so the chosen (codes, s) are written back as latent weights whose absmean quantization gives exactly
those codes and that scale (`ternary_latent`), keeping each weight's compensated value inside its
code's rounding interval so that training can still flip the codes that sit near a threshold.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dict_config import DictSerializable
from .errors import ConfigError
from .quant import BitLinear, act_quant, ternary_master_weight, weight_quant, weight_scale

METHODS = ("round", "gptq")
# Inside a block, the order in which a Llama-style block computes its linears' inputs.
LINEAR_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# ternary_latent keeps every latent weight this far (relative) inside its code's rounding interval.
MARGIN = 1e-3


@dataclass
class ConvertConfig(DictSerializable):
    section = "convert"

    method: str = "round"  # round: absmean rounding at the first forward (as before) | gptq
    calib_blocks: int = 16  # training blocks the calibration activations come from
    damp: float = 0.01  # GPTQ: added to H's diagonal, as a fraction of its mean
    act_order: bool = True  # GPTQ: round the columns with the largest H diagonal first
    block_size: int = 32  # GPTQ: columns per lazy update (the loop inside a block costs out x block per column)
    scale_passes: int = 2  # GPTQ passes, each with the scale refit from the last one's codes
    recon_steps: int = 0  # block-wise reconstruction: Adam steps per block (0: none)
    recon_lr: float = 5e-4
    recon_batch: int = 4  # calibration blocks per reconstruction step

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"convert.method must be one of {list(METHODS)}, got {self.method!r}")
        for name in ("calib_blocks", "block_size", "scale_passes", "recon_batch"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"convert.{name} must be >= 1, got {getattr(self, name)}")
        if self.recon_steps < 0:
            raise ConfigError(f"convert.recon_steps must be >= 0, got {self.recon_steps}")
        if not self.damp > 0:
            raise ConfigError(f"convert.damp must be > 0, got {self.damp}")
        if self.recon_steps and not self.recon_lr > 0:
            raise ConfigError(f"convert.recon_lr must be > 0, got {self.recon_lr}")

    @property
    def enabled(self) -> bool:
        """Anything to do before training (round without reconstruction is QAT's own first forward)."""
        return self.method != "round" or self.recon_steps > 0


# -- one layer ----------------------------------------------------------------------------------------

def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the summed squared output error over the calibration inputs."""
    d = (w.double() - wq.double())
    return float(((d @ h.double()) * d).sum())


def refit_scale(w: torch.Tensor, codes: torch.Tensor, h: torch.Tensor) -> float:
    """The s minimising output_error(W, s * Q, H): <Q H, W> / <Q H, Q> (0 codes: absmean)."""
    q, hd = codes.double(), h.double()
    qh = q @ hd
    den = float((qh * q).sum())
    if den <= 0:
        return float(weight_scale(w))
    return float((qh * w.double()).sum()) / den


def gptq_codes(w: torch.Tensor, h: torch.Tensor, s: float | torch.Tensor, *, damp: float = 0.01,
               block_size: int = 32, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of W (out, in) to s * {-1, 0, 1} given H (in, in). -> (codes, compensated).

    s: one scale, or one per row (out,): GPTQ treats every row on its own given H, so the linears
    that read one input (q/k/v, gate/up) are rounded as one stacked W with their own scales, one
    column loop and one factorisation for all of them (`ternary_gptq_group`).

    codes: float64 in {-1, 0, 1}; compensated: each weight's value at the moment it was rounded
    (the original weight plus the error spread onto it), so codes == clamp(round(compensated / s)).
    Columns whose inputs never fired (H diagonal 0) are rounded as they are and spread nothing."""
    W = w.double().clone()
    H = h.double().clone()
    n = W.shape[1]
    s = torch.as_tensor(s, dtype=torch.float32).expand(W.shape[0])
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H += torch.eye(n, dtype=H.dtype) * (damp * float(torch.diagonal(H).mean()))
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    # the factorisations in fp64; the column loop in fp32, as GPTQ runs it (half the memory traffic)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    W = W.float()
    Q, C = torch.zeros_like(W), torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            q = (col / s).round().clamp(-1, 1)
            Q[:, i1 + i], C[:, i1 + i] = q, col
            err = (col - q * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    return Q[:, inv].double(), C[:, inv].double()


@dataclass
class LayerResult:
    codes: torch.Tensor  # float64 {-1, 0, 1}
    scale: float
    positions: torch.Tensor  # float64: latent weights / scale before ternary_latent's adjustment
    error: float  # output_error of the kept (codes, scale)
    round_error: float  # output_error of absmean rounding


def ternary_gptq(w: torch.Tensor, h: torch.Tensor, cfg: ConvertConfig | None = None) -> LayerResult:
    """Codes and scale for one weight tensor: `scale_passes` GPTQ passes (each with the scale refit in
    closed form from the previous codes), and absmean rounding; the lowest output error is kept."""
    return ternary_gptq_group([w], h, cfg)[0]


def ternary_gptq_group(ws: list[torch.Tensor], h: torch.Tensor, cfg: ConvertConfig | None = None) -> list[LayerResult]:
    """`ternary_gptq` of several weight tensors (out_i, in) that read the same input (one H): each pass
    rounds them stacked, each row with its own tensor's scale, and each tensor keeps its own best pass,
    so every result is the one `ternary_gptq` gives that tensor alone (the same per-row operations)."""
    cfg = cfg or ConvertConfig(method="gptq")
    rows = [int(w.shape[0]) for w in ws]
    best, scale, live = [], [], []
    for w in ws:
        codes, s_w = weight_quant(w)
        s0 = float(s_w)
        r = LayerResult(codes.double(), s0, w.double() / s0, output_error(w, codes.double() * s0, h), 0.0)
        r.round_error = r.error
        best.append(r)
        scale.append(s0)
        live.append(True)
    stacked = torch.cat([w.detach() for w in ws]) if len(ws) > 1 else ws[0]
    for _ in range(cfg.scale_passes):
        if not any(live):
            break
        s_rows = torch.cat([torch.full((n,), s_i, dtype=torch.float32) for n, s_i in zip(rows, scale)])
        q_all, comp_all = gptq_codes(stacked, h, s_rows, damp=cfg.damp, block_size=cfg.block_size,
                                     act_order=cfg.act_order)
        for i, (w, q, comp) in enumerate(zip(ws, q_all.split(rows), comp_all.split(rows))):
            if not live[i]:  # its passes ended (as ternary_gptq's loop breaks); its rows ride along
                continue
            s_fit = refit_scale(w, q, h)
            if not s_fit > 0:
                live[i] = False
                continue
            err = output_error(w, q * s_fit, h)
            if err < best[i].error:
                # comp / s rounds to q; rescaled to s_fit the positions keep their place in the intervals
                best[i] = LayerResult(q, s_fit, comp / scale[i], err, best[i].round_error)
            scale[i] = s_fit
    return best


def ternary_latent(codes: torch.Tensor, positions: torch.Tensor, scale: float, eps: float = 1e-5) -> torch.Tensor:
    """fp32 latent weights W with weight_quant(W) == (codes, scale): codes exactly, the scale to float ulps.

    positions: where each weight sits relative to the scale (codes == clamp(round(positions))). Each is
    moved by as little as needed: into its code's interval with a MARGIN, then the nonzero codes'
    magnitudes scaled (or, when that cannot reach it, the zeros') so that mean|positions| == 1, which
    makes absmean's s equal `scale`. Falls back to `ternary_master_weight` if float rounding ever
    moved a code."""
    q = codes.double()
    p = positions.double().clone()
    nz = q != 0
    hi, lo = 0.5 * (1 + MARGIN), 0.5 * (1 - MARGIN)
    a = torch.where(nz, p.abs().clamp(min=hi), torch.zeros_like(p))  # nonzero codes' magnitudes
    z = torch.where(nz, torch.zeros_like(p), p.abs().clamp(max=lo))  # zero codes' magnitudes
    n = p.numel()
    sa, sz = float(a.sum()), float(z.sum())
    if sa + sz <= n:  # grow the nonzero magnitudes (sa > 0 unless every code is 0)
        if sa > 0:
            a = a * ((n - sz) / sa)
    else:
        n1 = int(nz.sum())
        if sz + n1 * hi <= n:  # shrink them, none below the threshold: bisect k in a' = max(k a, hi)
            k_lo, k_hi = 0.0, 1.0
            for _ in range(80):
                k = 0.5 * (k_lo + k_hi)
                if sz + float((a * k).clamp(min=hi)[nz].sum()) > n:
                    k_hi = k
                else:
                    k_lo = k
            a = torch.where(nz, (a * k_lo).clamp(min=hi), a)
            rest = n - sz - float(a[nz].sum())
            grow = a[nz] > hi  # the ones above the floor take the bisection's remainder
            if rest > 0 and bool(grow.any()):
                a[nz] = torch.where(grow, a[nz] * (1 + rest / float(a[nz][grow].sum())), a[nz])
        else:  # even at the threshold the zeros weigh too much: shrink them
            a = torch.where(nz, torch.full_like(p, hi), a)
            z = z * max(0.0, (n - n1 * hi) / sz)
    sign = torch.where(nz, q.sign(), p.sign())
    latent = (sign * (a + z) * scale).float()
    got_codes, got_s = weight_quant(latent, eps)
    if torch.equal(got_codes, q.float()) and abs(float(got_s) - scale) <= 1e-5 * scale:
        return latent
    return ternary_master_weight(q.float(), float(scale), eps)


# -- a model ------------------------------------------------------------------------------------------

@contextmanager
def _fp(linears):
    """The given BitLinears run in full precision inside the block."""
    saved = [m.quantize for m in linears]
    try:
        for m in linears:
            m.quantize = False
        yield
    finally:
        for m, q in zip(linears, saved):
            m.quantize = q


def _groups(block) -> list[list[tuple[str, BitLinear]]]:
    lins = [(n, m) for n, m in block.named_modules() if isinstance(m, BitLinear) and m.quantize]
    groups, seen = [], set()
    for suffixes in LINEAR_GROUPS:
        g = [(n, m) for n, m in lins if n.rsplit(".", 1)[-1] in suffixes]
        if g:
            groups.append(g)
            seen.update(n for n, _ in g)
    rest = [(n, m) for n, m in lins if n not in seen]
    return groups + ([rest] if rest else [])


def _collect_hessians(block, group, x, cos, sin) -> dict[str, torch.Tensor]:
    """H = X^T X of each group linear's int8-quantized inputs (dequantized) over the calibration tokens."""
    hs: dict[str, torch.Tensor] = {}
    shared: dict[tuple, torch.Tensor] = {}  # q/k/v (and gate/up) read one input: one product for them

    def hook(name, module, args):
        inp = args[0]
        key = (inp.data_ptr(), tuple(inp.shape), module.norm is None)
        if key not in shared:
            x = module.norm(inp) if module.norm is not None else inp
            codes, s_x = act_quant(x)
            xd = (codes / s_x).reshape(-1, x.shape[-1])
            shared[key] = (xd.t() @ xd).double()  # fp32 product (4k-token sums), fp64 for the factorisations
        hs[name] = hs[name] + shared[key] if name in hs else shared[key]

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, mod, args)) for n, m in group]
    try:
        block(x, cos, sin)
    finally:
        for h in handles:
            h.remove()
    return hs


def _reconstruct(block, x_q, y_fp, cos, sin, cfg: ConvertConfig, seed: int,
                 autocast: torch.dtype | None) -> tuple[float, float]:
    """Train the block (latent weights + norms, STE) toward y_fp on x_q. -> (mse before, after).
    autocast: the training's CPU autocast dtype (bf16-mixed), for the steps; the MSEs are fp32."""
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.recon_lr)
    g = torch.Generator().manual_seed(seed)
    n = x_q.shape[0]

    def mse() -> float:
        with torch.no_grad():
            return float(F.mse_loss(block(x_q, cos, sin), y_fp))

    before = mse()
    for _ in range(cfg.recon_steps):
        idx = torch.randperm(n, generator=g)[: min(cfg.recon_batch, n)]
        with torch.enable_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = F.mse_loss(block(x_q[idx], cos, sin).float(), y_fp[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    return before, mse()


@torch.no_grad()
def convert_model(model, ids: torch.Tensor, cfg: ConvertConfig, log=print, autocast: torch.dtype | None = None) -> dict:
    """Choose the ternary codes of every quantized BitLinear of `model` (a BitNetModel whose latent
    weights are the full-precision source's) on calibration token ids (B, T), in place. -> report.
    method round with recon_steps: reconstruction from absmean rounding's codes (no GPTQ)."""
    if not cfg.enabled:
        return {"method": "round"}
    if ids.dim() != 2:
        raise ConfigError(f"calibration ids must be (batch, tokens), got {tuple(ids.shape)}")
    t0 = time.time()
    was_training = model.training
    model.eval()
    T = ids.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x_fp = model.embed_tokens(ids.long()).float()
    x_q = x_fp.clone()
    ratios, layers, recon = [], 0, []
    try:
        for bi, block in enumerate(model.layers):
            groups = _groups(block)
            all_lins = [m for g in groups for _, m in g]
            layers += len(all_lins)
            with _fp(all_lins):
                y_fp = block(x_fp, cos, sin)
            pending = list(all_lins)
            for group in groups if cfg.method == "gptq" else ():  # round: reconstruction from rounding's codes
                with _fp(pending):  # this group and the later ones full precision; the earlier ones ternary
                    hs = _collect_hessians(block, group, x_q, cos, sin)
                by_input: dict[int, list] = {}  # the linears that read one input share one H: one stacked GPTQ
                for name, m in group:
                    by_input.setdefault(id(hs[name]), []).append((name, m))
                for members in by_input.values():
                    results = ternary_gptq_group([m.weight.detach() for _, m in members], hs[members[0][0]], cfg)
                    for (name, m), r in zip(members, results):
                        m.weight.copy_(ternary_latent(r.codes, r.positions, r.scale, m.eps).to(m.weight.dtype))
                        m.init_scale()  # quant.learnable_scale: starts from the chosen scale, not the source's
                        ratios.append(r.error / r.round_error if r.round_error > 0 else 1.0)
                        pending.remove(m)
            if cfg.recon_steps:
                model.train()
                recon.append(_reconstruct(block, x_q, y_fp, cos, sin, cfg, seed=bi, autocast=autocast))
                model.eval()
            x_q, x_fp = block(x_q, cos, sin), y_fp
    finally:
        model.train(was_training)
    report = {"method": cfg.method, "layers": layers, "calibration_tokens": int(ids.numel()),
              "seconds": round(time.time() - t0, 1)}
    if ratios:
        report["error_vs_round_mean"] = sum(ratios) / len(ratios)
    if recon:
        report["recon_mse_before_after"] = [sum(b for b, _ in recon) / len(recon), sum(a for _, a in recon) / len(recon)]
    msg = (f"convert {cfg.method}: {layers} linears on {ids.numel():,} calibration tokens" +
           (f", output error {report['error_vs_round_mean']:.3f}x rounding's (mean over layers)" if ratios else ""))
    if recon:
        b, a = report["recon_mse_before_after"]
        msg += f"; block reconstruction ({cfg.recon_steps} steps/block): block MSE {b:.3g} -> {a:.3g}"
    log(msg + f" ({report['seconds']} s)")
    return report
