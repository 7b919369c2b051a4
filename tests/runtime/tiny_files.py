"""Tiny .bitnet files with a real tokenizer and a chat template, for the generate and CLI tests.

A byte-level BPE (`tokenizers`, trained here in milliseconds) and a random BitNetModel (torch)
exported with the project's writer. `build(dir)` writes model.bitnet (ChatML template) and
no_template.bitnet (same weights, tokenizer without a chat template) once per directory
(max_seq_len: the context, 64 unless given).
"""

from __future__ import annotations

import functools
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
    "Friends, Romans, countrymen, lend me your ears;",
]
VOCAB = 320
MODEL = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=200, num_layers=2, num_heads=4, num_kv_heads=2,
             max_seq_len=64, init_std=0.08, norm="subln", ffn="swiglu")


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() <= VOCAB
    return tok.to_str()


def make_model(seed: int = 3, max_seq_len: int = MODEL["max_seq_len"]):
    import torch

    from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig

    torch.manual_seed(seed)
    model = BitNetModel(ModelConfig(**{**MODEL, "max_seq_len": max_seq_len}), QuantConfig())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


@functools.lru_cache(maxsize=None)
def build(directory: str, max_seq_len: int = MODEL["max_seq_len"]) -> dict[str, Path]:
    from bitnet_train.export.from_model import model_arrays
    from bitnet_train.export.writer import write_bitnet

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model, tok = make_model(max_seq_len=max_seq_len), tokenizer_json()
    cfg = {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML}
    out = {}
    for name, tok_cfg in {"model": cfg, "no_template": {"eos_token": "<|endoftext|>"}}.items():
        arrays = model_arrays(model, tokenizer_json=tok, tokenizer_config=tok_cfg, provenance={"recipe": "tiny"})
        out[name] = write_bitnet(d / f"{name}.bitnet", arrays, dense_dtype="F16")
    return out
