"""Session fixtures for the export tests (helpers live in tiny_models.py, a unique module name)."""

from __future__ import annotations

import pytest

from bitnet_train.model import ModelConfig, QuantConfig
from bitnet_train.model_dir import save_model_dir

from tiny_models import TINY, tiny_tokenizer, train_tiny


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, tokenizer):
    """(model/ directory, the trained model): SubLN, one hybrid-precision linear."""
    model = train_tiny(ModelConfig(**TINY), QuantConfig(keep_high_precision=["layers.1.mlp.down_proj"]))
    path = tmp_path_factory.mktemp("run") / "model"
    save_model_dir(path, model, tokenizer, {"recipe": "tiny_test", "step": 5})
    return path, model
