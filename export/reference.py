"""The PyTorch forward built from a .bitnet file: the reference the C++ runtime is tested against.

Ternary linears hold the file's codes and scale (not latent weights) and compute the contract of
FORMAT.md section 3 op for op as the training forward does at lambda = 1:

    xq, s_x = act_quant(x);  y = (xq @ codes^T) * (s_w / s_x)

Everything else is `bitnet_train.model.BitNetModel` with the file's dense tensors (converted to
float32 exactly). Given an fp32 export, its logits equal the trained model's bit for bit.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model import BitNetModel, ModelConfig, QuantConfig
from ..quant import BitLinear, RMSNorm, act_quant
from .reader import BitNetFile, open_model
from .schema import FormatError


class TernaryLinear(nn.Module):
    """A linear with fixed ternary codes and a per-tensor scale (multiply convention)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, eps: float, norm: RMSNorm | None = None,
                 bias: bool = False):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.eps = eps
        self.norm = norm
        self.register_buffer("codes", codes.to(torch.float32))  # (out, in) in {-1, 0, 1}
        self.register_buffer("scale", scale.to(torch.float32).reshape(()))  # s_w, 0-dim
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None  # added after the product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        x_codes, s_x = act_quant(x, self.eps)  # (..., in), (..., 1)
        acc = F.linear(x_codes, self.codes)  # integer-exact in fp32
        y = acc * (self.scale / s_x)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pre_norm={self.norm is not None}"


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def build_reference_model(source: str | os.PathLike | BitNetFile) -> BitNetModel:
    """A float32 BitNetModel (eval mode, CPU) computing what the file describes."""
    f = source if isinstance(source, BitNetFile) else open_model(source)
    cfg = ModelConfig.from_dict(dict(f.config))
    eps = float(f.quant["eps"])
    ternary = f.ternary_layers()
    pre_norm = cfg.norm == "bitlinear"

    def factory(name: str, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        if name in ternary:
            if ternary[name] != (out_features, in_features):
                raise FormatError(f"{f.path}: {name} is {ternary[name]} in the file, the model needs "
                                  f"{(out_features, in_features)}")
            norm = RMSNorm(in_features, cfg.rms_norm_eps) if pre_norm else None
            return TernaryLinear(torch.from_numpy(f.codes(name)), _t(f.tensor(f"{name}.scale")), eps, norm, bias)
        return BitLinear(in_features, out_features, quantize=False, pre_norm=pre_norm, norm_eps=cfg.rms_norm_eps, eps=eps,
                         bias=bias)

    model = BitNetModel(cfg, QuantConfig(method="b1.58", eps=eps), linear=factory)
    state = model.state_dict()
    used = set()
    for key in state:
        if key.endswith((".codes", ".scale", ".lam")):
            continue  # codes/scale set above; lam of a dense BitLinear is unused
        stored = "embed_tokens.weight" if key == "lm_head.weight" and cfg.tie_embeddings else key
        state[key] = _t(f.dense(stored))
        used.add(stored)
    model.load_state_dict(state, strict=True)
    unused = {n for n in f.names if not n.endswith((".qweight", ".scale"))} - used
    if unused:
        raise FormatError(f"{f.path}: tensors the model does not use: {sorted(unused)[:5]}")
    return model.eval()
