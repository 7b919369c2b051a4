"""What the writers (.bitnet, GGUF, HF) consume: a model's config and metadata, and its tensors
produced one at a time, so that no writer needs the whole model in memory.

Two kinds of object satisfy `ModelTensors`:
  * writer.ModelArrays: every array already in memory (tests, tiny models, `model_arrays`);
  * from_model.QuantizedTensors: each tensor read from the source and quantized when asked for,
    then dropped (`bitnet-export`: the peak is one tensor, whatever the model's size).

numpy only, like the writers.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .schema import DENSE, TERNARY, dense_shapes, linear_shapes


class ModelTensors(Protocol):
    config: dict  # ModelConfig dict
    eps: float  # quant eps (activation and weight scale floor)
    tokenizer_json: str | None
    tokenizer_config: dict
    provenance: dict

    def kinds(self) -> dict[str, str]:
        """Logical weight -> ternary/dense, as metadata `tensors` lists them."""

    def num_parameters(self) -> int: ...

    def quantized(self, name: str) -> tuple[np.ndarray, float]:
        """Ternary linear `name` -> (int8 codes (out, in), s_w). May read and quantize it now."""

    def scale(self, name: str) -> float:
        """s_w of ternary linear `name` (remembered once `quantized(name)` has run)."""

    def dense_stored(self, name: str, dtype: str) -> np.ndarray:
        """Stored dense tensor `name` (NAME.weight for a high-precision linear) as the .bitnet format
        stores it in `dtype`: F32 '<f4', F16 '<f2', BF16 uint16 bits (writer.cast_dense)."""


def ternary_names(m: ModelTensors) -> list[str]:
    """The ternary linears, in model order."""
    return [n for n, k in m.kinds().items() if k == TERNARY]


def dense_names(m: ModelTensors) -> dict[str, tuple[int, ...]]:
    """Every stored dense tensor -> shape: high-precision linears (NAME.weight) in model order, then
    embeddings, norms, biases, lm_head (schema.dense_shapes order)."""
    kinds = m.kinds()
    out = {f"{n}.weight": s for n, s in linear_shapes(m.config).items() if kinds[n] == DENSE}
    out.update(dense_shapes(m.config))
    return out
