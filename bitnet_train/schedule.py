"""The BitNet b1.58 two-stage optimisation schedule, as pure functions of the step.

Stage 1: linear warm-up to the peak LR, then cosine decay towards min_lr_ratio * peak, with
weight decay on. Stage 2 (from stage2_start * total_steps): the LR is multiplied by
stage2_lr_ratio (the "LR drop") and weight decay is 0. Everything derives from the step, so a
resumed run follows the same schedule exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .dict_config import DictSerializable


@dataclass
class OptimConfig(DictSerializable):
    section = "optim"

    lr: float = 1.5e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    stage2_start: float = 0.5
    stage2_lr_ratio: float = 0.5

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if not 0.0 < self.stage2_start <= 1.0:
            raise ValueError(f"optim.stage2_start must be in (0, 1], got {self.stage2_start}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def in_stage2(step: int, total_steps: int, cfg: OptimConfig) -> bool:
    return cfg.stage2_start < 1.0 and step >= int(cfg.stage2_start * total_steps)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cosine * (cfg.stage2_lr_ratio if in_stage2(step, total_steps, cfg) else 1.0)


def weight_decay_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    return 0.0 if in_stage2(step, total_steps, cfg) else cfg.weight_decay
