"""Tiny trained models for the export tests (built once per session, a few optimizer steps)."""

from __future__ import annotations

import pytest
import torch

from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig
from bitnet_train.model_dir import save_model_dir

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8


def tiny_tokenizer():
    from bitnet_train.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([TEXT], vocab_size=300, cache_dir=None)


def train_tiny(cfg: ModelConfig, quant: QuantConfig, steps: int = 5, seed: int = 0) -> BitNetModel:
    """A plain torch loop: enough steps that latent weights move away from their init."""
    torch.manual_seed(seed)
    model = BitNetModel(cfg, quant)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(steps):
        loss = model.loss(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
            max_seq_len=64)


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
