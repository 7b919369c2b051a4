"""A trained BitNetModel (torch) -> ModelArrays (numpy): the quantization step of export.

Ternary codes and scales come from `bitnet_train.quant.weight_quant`, the function the training
forward uses, so the file holds exactly the weights the model computed with.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import torch

from ..errors import CheckpointError
from ..model import BitNetModel
from ..quant import weight_quant
from .schema import dense_shapes
from .writer import ModelArrays


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def model_arrays(
    model: BitNetModel,
    *,
    ptq: bool = False,
    tokenizer_json: str | None = None,
    tokenizer_config: dict | None = None,
    provenance: dict | None = None,
) -> ModelArrays:
    """Quantize `model`'s ternary linears and collect its dense tensors.

    Without `ptq`, a linear is ternary iff it was trained quantized (BitLinear.quantize), and the
    model must have been trained with quantization at lambda = 1. With `ptq`, every linear not in
    quant.keep_high_precision is ternarized post-training, whatever it was trained as.
    """
    qcfg = model.quant_config
    if qcfg.method == "none" and not ptq:
        raise CheckpointError(
            "the model was trained without quantization (quant method 'none'); export would change its "
            "function. Pass --ptq to ternarize it post-training"
        )
    ternary: dict[str, tuple[np.ndarray, float]] = {}
    dense: dict[str, np.ndarray] = {}
    for name, m in model.bitlinear_modules().items():
        kept = any(fnmatch.fnmatchcase(name, p) for p in qcfg.keep_high_precision)
        is_ternary = (not kept) if ptq else m.quantize
        if is_ternary and not ptq and float(m.lam) < 1.0:
            raise CheckpointError(
                f"{name} has lambda {float(m.lam):.4g} < 1 (the lambda warm-up did not finish): the file would not "
                f"compute what the model computes. Train past the warm-up, or pass --ptq"
            )
        if is_ternary:
            codes, s_w = weight_quant(m.weight.detach(), qcfg.eps if ptq else m.eps)
            ternary[name] = (codes.to(torch.int8).cpu().numpy(), float(s_w))
        else:
            dense[f"{name}.weight"] = _np(m.weight)
    state = model.state_dict()
    for name in dense_shapes(model.config.to_dict()):
        dense[name] = _np(state[name])
    return ModelArrays(
        config=model.config.to_dict(),
        eps=float(qcfg.eps),
        ternary=ternary,
        dense=dense,
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config or {},
        provenance=provenance or {},
    )
