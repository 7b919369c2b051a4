"""Trained weights (torch) -> what the writers consume: the quantization step of export.

Ternary codes and scales come from `bitnet_train.quant.weight_quant`, the function the training
forward uses, so the file holds exactly the weights the model computed with.

    QuantizedTensors   a state dict of LazyTensors (a checkpoint not read yet, or a model's own
                       tensors), quantized one tensor at a time as a writer asks (model_tensors)
    model_arrays       a BitNetModel -> ModelArrays, every array in memory (tests, small models)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..errors import CheckpointError
from ..model import BitNetModel, ModelConfig, QuantConfig
from ..quant import learned_weight_quant, learned_scale, weight_quant, weight_scale
from ..tensor_files import LazyTensor, meta_model
from .schema import DENSE, TERNARY, FormatError, dense_shapes, linear_shapes
from .writer import ModelArrays, cast_dense

CAST_CHUNK = 1 << 22  # elements per slice when a dense tensor is cast to its stored dtype (16 MiB of fp32;
# f32_to_bf16_bits works in uint64: its temporaries are 2-3x the slice)
STORED_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(np.uint16)}  # cast_dense's results


@dataclass(frozen=True)
class LinearSettings:
    """What export needs to know of one BitLinear."""

    quantize: bool  # trained ternary (BitLinear.quantize)
    lam: float  # lambda of the warm-up; export without --ptq needs 1
    eps: float  # its quantizer's eps


class QuantizedTensors:
    """A model's tensors for the writers (model_tensors.ModelTensors), read from `state` and
    quantized when asked for, one at a time: nothing is kept but the scales s_w.

    Without `ptq`, a linear is ternary iff it was trained quantized (BitLinear.quantize), and the
    model must have been trained with quantization at lambda = 1. With `ptq`, every linear not in
    quant.keep_high_precision is ternarized post-training, whatever it was trained as.
    """

    def __init__(self, config: ModelConfig, quant: QuantConfig, linears: Mapping[str, LinearSettings],
                 state: Mapping[str, LazyTensor], *, ptq: bool = False, tokenizer_json: str | None = None,
                 tokenizer_config: dict | None = None, provenance: dict | None = None):
        if quant.method == "none" and not ptq:
            raise CheckpointError(
                "the model was trained without quantization (quant method 'none'); export would change its "
                "function. Pass --ptq to ternarize it post-training"
            )
        self._eps: dict[str, float] = {}  # ternary linear -> eps of its weight_quant
        for name, m in linears.items():
            kept = any(fnmatch.fnmatchcase(name, p) for p in quant.keep_high_precision)
            is_ternary = (not kept) if ptq else m.quantize
            if is_ternary and not ptq and m.lam < 1.0:
                raise CheckpointError(
                    f"{name} has lambda {m.lam:.4g} < 1 (the lambda warm-up did not finish): the file would not "
                    f"compute what the model computes. Train past the warm-up, or pass --ptq"
                )
            if is_ternary:
                self._eps[name] = quant.eps if ptq else m.eps
        self.config = config.to_dict()
        self.eps = float(quant.eps)
        self.tokenizer_json = tokenizer_json
        self.tokenizer_config = tokenizer_config or {}
        self.provenance = provenance or {}
        self._state = state
        self._scales: dict[str, float] = {}

    @classmethod
    def of_model(cls, model: BitNetModel, **kwargs) -> QuantizedTensors:
        """A built model's own tensors (nothing copied)."""
        linears = {n: LinearSettings(m.quantize, float(m.lam), m.eps) for n, m in model.bitlinear_modules().items()}
        state = {k: LazyTensor.of(v) for k, v in model.state_dict().items()}
        return cls(model.config, model.quant_config, linears, state, **kwargs)

    @classmethod
    def of_checkpoint(cls, config: ModelConfig, quant: QuantConfig, state: Mapping[str, LazyTensor],
                      **kwargs) -> QuantizedTensors:
        """A checkpoint's lazy state dict (names and shapes already checked against the model's); each
        BitLinear's settings are the model's (built on the meta device), lambda read from the state."""
        linears = {n: LinearSettings(m.quantize, float(state[f"{n}.lam"].load()), m.eps)
                   for n, m in meta_model(config, quant).bitlinear_modules().items()}
        return cls(config, quant, linears, state, **kwargs)

    def kinds(self) -> dict[str, str]:
        out = {n: (TERNARY if n in self._eps else DENSE) for n in linear_shapes(self.config)}
        out.update({n: DENSE for n in dense_shapes(self.config)})
        return out

    def num_parameters(self) -> int:
        return sum(int(np.prod(s)) for s in {**linear_shapes(self.config), **dense_shapes(self.config)}.values())

    def quantized(self, name: str) -> tuple[np.ndarray, float]:
        w, learned = self._state[f"{name}.weight"].load().detach(), self._learned_scale(name)
        if learned is None:
            codes, s_w = weight_quant(w, self._eps[name])
        else:
            codes, s_w = learned_weight_quant(w, learned, self._eps[name])
        return codes.to(torch.int8).numpy(), self._remember(name, s_w)

    def scale(self, name: str) -> float:
        if name not in self._scales:  # scales stored before codes (t3_b5): the weight is read twice, once for s_w
            learned = self._learned_scale(name)
            self._remember(name, weight_scale(self._state[f"{name}.weight"].load().detach(), self._eps[name])
                           if learned is None else learned_scale(learned, self._eps[name]))
        return self._scales[name]

    def _learned_scale(self, name: str) -> torch.Tensor | None:
        """The trained log s_w of quant.learnable_scale; None where there is none, or where it was never
        set (no forward ran: the first would set it to mean|W|, what absmean gives)."""
        lazy, is_set = self._state.get(f"{name}.log_scale"), self._state.get(f"{name}.scale_set")
        if lazy is None or is_set is None or not bool(is_set.load()):
            return None
        return lazy.load().detach()

    def _remember(self, name: str, s_w: torch.Tensor) -> float:
        scale = float(s_w)
        if not (np.isfinite(np.float32(scale)) and scale > 0):
            raise FormatError(f"tensor {name}: scale {np.float32(scale)} is not a positive finite number")
        self._scales[name] = scale
        return scale

    def dense_stored(self, name: str, dtype: str) -> np.ndarray:
        t = self._state[name].load().detach()
        if t.dim() < 2 or t.numel() <= CAST_CHUNK:
            return cast_dense(name, _np(t), dtype)
        # a slice of rows at a time: one fp32 slice beside the source and the result, not a whole fp32 copy
        out = np.empty(tuple(t.shape), dtype=STORED_DTYPES[dtype])
        step = max(1, CAST_CHUNK // (t.numel() // t.shape[0]))
        for i in range(0, t.shape[0], step):
            out[i:i + step] = cast_dense(name, _np(t[i:i + step]), dtype)
        return out

    def materialize(self) -> ModelArrays:
        """Every tensor in memory, as ModelArrays holds them (dense float32)."""
        kinds = self.kinds()
        ternary = {n: self.quantized(n) for n, k in kinds.items() if k == TERNARY}
        dense = {f"{n}.weight": _np(self._state[f"{n}.weight"].load()) for n in linear_shapes(self.config)
                 if kinds[n] == DENSE}
        dense.update({n: _np(self._state[n].load()) for n in dense_shapes(self.config)})
        return ModelArrays(config=self.config, eps=self.eps, ternary=ternary, dense=dense,
                           tokenizer_json=self.tokenizer_json, tokenizer_config=self.tokenizer_config,
                           provenance=self.provenance)


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
    """Quantize `model`'s ternary linears and collect its dense tensors, all in memory (QuantizedTensors
    says which linears are ternary)."""
    return QuantizedTensors.of_model(model, ptq=ptq, tokenizer_json=tokenizer_json, tokenizer_config=tokenizer_config,
                                     provenance=provenance).materialize()
