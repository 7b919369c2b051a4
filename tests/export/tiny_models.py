"""Tiny models for the export tests: a BPE tokenizer and a few optimizer steps of a plain torch loop."""

from __future__ import annotations

import torch

from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig

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


