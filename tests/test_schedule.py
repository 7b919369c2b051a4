import math

import pytest

from bitnet_train.schedule import OptimConfig, lr_multiplier, weight_decay_at


def test_warmup_is_linear_to_peak():
    cfg = OptimConfig(warmup_steps=10, stage2_start=1.0)
    assert [lr_multiplier(s, 100, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_decays_to_min_ratio_without_stage2():
    cfg = OptimConfig(warmup_steps=0, min_lr_ratio=0.1, stage2_start=1.0)
    assert lr_multiplier(0, 100, cfg) == pytest.approx(1.0)
    # halfway through the cosine: min + (1 - min) / 2
    assert lr_multiplier(50, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.1)


def test_stage2_drops_lr_and_zeroes_weight_decay():
    cfg = OptimConfig(warmup_steps=0, min_lr_ratio=0.0, stage2_start=0.5, stage2_lr_ratio=0.25, weight_decay=0.1)
    before, at = lr_multiplier(49, 100, cfg), lr_multiplier(50, 100, cfg)
    cos50 = 0.5 * (1 + math.cos(math.pi * 0.5))
    assert at == pytest.approx(0.25 * cos50)
    assert before > 3 * at
    assert weight_decay_at(49, 100, cfg) == 0.1
    assert weight_decay_at(50, 100, cfg) == 0.0


@pytest.mark.parametrize("bad", [{"lr": 0}, {"stage2_start": 0.0}, {"stage2_start": 1.5}, {"min_lr_ratio": 2}, {"warmup_steps": -1}])
def test_bad_values_are_rejected(bad):
    with pytest.raises(ValueError):
        OptimConfig(**bad)


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="unknown optim config keys"):
        OptimConfig.from_dict({"lr": 1e-3, "lrr": 1})
