"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition, presence and
frequency penalties. numpy only.

    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=0)
    sampler = Sampler(params, stream=0)            # one per sequence: its own seeded generator
    tok = sampler.sample(logits, context=ids, generated=out)  # logits (vocab,), context: prompt + generated ids

The order and semantics follow transformers' logits processors: repetition penalty on the raw
logits (a seen token's logit is divided by the penalty when positive, multiplied when negative),
then OpenAI's presence and frequency penalties over the generated tokens only (a token generated
c times loses c * frequency_penalty + presence_penalty), then temperature, then top-k (ties with the k-th logit are kept), then top-p (the smallest set of
most probable tokens whose mass reaches top_p; the most probable token is always kept).
temperature == 0 is greedy (argmax of the penalized logits; the lowest id wins a tie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None  # None: fresh entropy, not reproducible
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]; 0: off
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]; 0: off

    def __post_init__(self):
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and -2 <= v <= 2):
                raise ValueError(f"{name} must be a number in [-2, 2] (0 = off), got {v!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, context: Sequence[int] | np.ndarray, penalty: float) -> np.ndarray:
    """A copy of logits (vocab,) with every token seen in context penalized once (CTRL's rule)."""
    logits = np.asarray(logits)
    out = np.array(logits, dtype=np.promote_types(logits.dtype, np.float32), copy=True)
    if penalty == 1.0 or len(context) == 0:
        return out
    seen = np.unique(np.asarray(context, dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < out.shape[-1])]
    v = out[seen]
    out[seen] = np.where(v > 0, v / penalty, v * penalty)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis (the serve API's and lm-eval's logprobs)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def apply_penalties(logits: np.ndarray, params: SamplingParams, context: Sequence[int] | np.ndarray = (),
                    generated: Sequence[int] | np.ndarray = ()) -> np.ndarray:
    """A copy of logits with the repetition penalty (over context) and then the presence and
    frequency penalties (over the generated tokens) applied."""
    out = apply_repetition_penalty(logits, context, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and len(generated):
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        keep = (ids >= 0) & (ids < out.shape[-1])
        ids, counts = ids[keep], counts[keep]
        out[ids] -= counts * params.frequency_penalty + params.presence_penalty
    return out


def probabilities(logits: np.ndarray, params: SamplingParams, context: Sequence[int] | np.ndarray = (),
                  generated: Sequence[int] | np.ndarray = ()) -> np.ndarray:
    """The distribution (vocab,) float64 that `Sampler.sample` draws from (one-hot for greedy)."""
    x = apply_penalties(np.asarray(logits, np.float64), params, context, generated)
    probs = np.zeros_like(x)
    if params.greedy:
        probs[int(np.argmax(x))] = 1.0
        return probs
    x = x / params.temperature
    keep = x > -np.inf
    if params.top_k and params.top_k < x.size:
        kth = np.partition(x, x.size - params.top_k)[x.size - params.top_k]
        keep &= x >= kth
    x = np.where(keep, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        mass_before = np.cumsum(sorted_p) - sorted_p  # mass of the strictly more probable tokens
        drop = order[mass_before >= params.top_p]
        p[drop] = 0.0
        p /= p.sum()
    probs[:] = p
    return probs


class Sampler:
    """Chooses tokens for one sequence. `stream` separates the random streams of the sequences of a
    batch: (seed, stream) fixes every draw, so a prompt samples the same tokens alone or in a batch."""

    def __init__(self, params: SamplingParams, stream: int = 0):
        self.params = params
        seed = params.seed if params.seed is not None else np.random.SeedSequence().entropy
        self.rng = np.random.default_rng([int(seed), int(stream)])

    def sample(self, logits: np.ndarray, context: Sequence[int] | np.ndarray = (),
               generated: Sequence[int] | np.ndarray = ()) -> int:
        """context: prompt + generated ids (the repetition penalty's); generated: the generated ids
        alone (the presence and frequency penalties')."""
        logits = np.asarray(logits)
        if logits.ndim != 1:
            raise ValueError(f"logits must be 1-D (vocab,), got shape {logits.shape}")
        if self.params.greedy:
            p = self.params
            if p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty:
                return int(np.argmax(logits))  # nothing to penalize: no copy
            return int(np.argmax(apply_penalties(logits, p, context, generated)))
        p = probabilities(logits, self.params, context, generated)
        cdf = np.cumsum(p)
        # inverse CDF with one uniform draw per token: the same draws whatever the distribution
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        i = min(i, p.size - 1)
        while p[i] == 0.0:  # rounding at the top end of the cdf: step back to a token that has mass
            i -= 1
        return i
