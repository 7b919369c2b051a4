"""Byte-level BPE tokenizers for training from scratch, and loading saved tokenizers.

A trained tokenizer is cached on disk under `cache_dir/bpe-<key>/`, where the key hashes the
corpus content, the vocabulary size and `BPE_RECIPE_VERSION`, so a second call with the same
corpus loads instead of training. The cache directory is written beside its final name and
renamed into place, so a reader never sees a half-written tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .errors import DataError

EOS_TOKEN = "<|endoftext|>"
# Bump when the training recipe below changes, so old cache entries are not reused.
BPE_RECIPE_VERSION = 1
# 256 byte tokens + the end-of-text token.
MIN_BPE_VOCAB_SIZE = 257


def corpus_hash(texts: Iterable[str]) -> str:
    """sha256 of the texts, each length-prefixed so that document boundaries count."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def bpe_cache_key(content_hash: str, vocab_size: int) -> str:
    key = f"{content_hash}|vocab={vocab_size}|recipe={BPE_RECIPE_VERSION}|tokenizers={tokenizers.__version__}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, cache_dir: Path | None, *, content_hash: str | None = None
) -> PreTrainedTokenizerFast:
    """Train (or load from `cache_dir`) a byte-level BPE with `<|endoftext|>` as eos/bos/pad.

    content_hash: `corpus_hash(texts)` when the caller has it already (saves a pass over the corpus).
    """
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise DataError(
            f"bpe_vocab_size {vocab_size} is too small: a byte-level BPE needs at least {MIN_BPE_VOCAB_SIZE}"
        )
    texts = texts if isinstance(texts, (list, tuple)) else list(texts)
    if not any(texts):
        raise DataError("cannot train a BPE tokenizer on an empty corpus")
    if cache_dir is None:
        return wrap_tokenizer(_train_bpe(texts, vocab_size))

    entry = Path(cache_dir) / f"bpe-{bpe_cache_key(content_hash or corpus_hash(texts), vocab_size)}"
    if (entry / "tokenizer.json").is_file():
        return load_tokenizer(entry)
    tokenizer = wrap_tokenizer(_train_bpe(texts, vocab_size))
    _save_atomically(tokenizer, entry)
    return load_tokenizer(entry)


def _train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over `tokenizer`, with `<|endoftext|>` as eos, bos and pad."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # Byte-level decoding already restores the exact text; "cleanup" would drop spaces.
        clean_up_tokenization_spaces=False,
    )


def _save_atomically(tokenizer: PreTrainedTokenizerFast, entry: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, entry)
        except OSError:
            # Another process renamed its copy into place first; both copies are identical.
            if not (entry / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(spec: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a directory (tokenizer.json [+ tokenizer_config.json]) or a tokenizer.json file."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"tokenizer directory {path} has no tokenizer.json")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    elif path.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), clean_up_tokenization_spaces=False)
    else:
        raise DataError(f"tokenizer path {path} does not exist (expected a directory with tokenizer.json, or the file)")
    _default_eos(tokenizer, path)
    return tokenizer


def _default_eos(tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """A bare tokenizer.json carries no eos setting: fall back to `<|endoftext|>` when it is in the vocab."""
    if tokenizer.eos_token is not None:
        return
    if EOS_TOKEN not in tokenizer.get_vocab():
        raise DataError(
            f"tokenizer {path} has no eos token and no {EOS_TOKEN} token; set eos_token in tokenizer_config.json"
        )
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.bos_token = tokenizer.bos_token or EOS_TOKEN
    tokenizer.pad_token = tokenizer.pad_token or EOS_TOKEN
