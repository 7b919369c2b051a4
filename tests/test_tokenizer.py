"""Byte-level BPE training, caching and loading (tiny corpora, well under a second each)."""

from __future__ import annotations

import pytest

from bitnet_train import tokenizer as tok_module
from bitnet_train.errors import DataError
from bitnet_train.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe_tokenizer

CORPUS = [
    "When shall we three meet again\nIn thunder, lightning, or in rain?\n",
    "Fair is foul, and foul is fair:  \nHover through the fog and filthy air.\n",
    "Ünïcödé ☃, tabs\tand  double  spaces , before punctuation .\r\n",
] * 10
VOCAB = 300


def test_decode_round_trips_text(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS, VOCAB, tmp_path)
    for text in CORPUS[:3] + [" leading space", "trailing space ", "\n\n", "never seen: Zyzzyva ½"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_endoftext_is_eos_bos_and_pad(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS, VOCAB, tmp_path)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == eos_id
    assert len(tokenizer) == VOCAB


def test_save_pretrained_writes_files_that_load_tokenizer_reads(tmp_path):
    tokenizer = train_bpe_tokenizer(CORPUS, VOCAB, None)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert (tmp_path / "tok" / "tokenizer_config.json").is_file()
    text = CORPUS[1]
    expected = tokenizer(text)["input_ids"]
    for spec in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_tokenizer(spec)
        assert loaded(text)["input_ids"] == expected
        assert loaded.eos_token == EOS_TOKEN
        assert loaded.decode(expected) == text


def test_second_call_loads_from_cache_without_training(tmp_path, monkeypatch):
    train_bpe_tokenizer(CORPUS, VOCAB, tmp_path)
    [entry] = tmp_path.iterdir()
    mtime = (entry / "tokenizer.json").stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("the BPE was trained again despite a cache entry")

    monkeypatch.setattr(tok_module, "_train_bpe", must_not_train)
    cached = train_bpe_tokenizer(iter(CORPUS), VOCAB, tmp_path)  # any iterable, same content
    assert (entry / "tokenizer.json").stat().st_mtime_ns == mtime
    assert cached.decode(cached(CORPUS[0])["input_ids"]) == CORPUS[0]
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temp dirs left behind


def test_cache_key_changes_with_corpus_and_vocab_size(tmp_path):
    train_bpe_tokenizer(CORPUS, VOCAB, tmp_path)
    train_bpe_tokenizer(CORPUS, VOCAB + 10, tmp_path)
    train_bpe_tokenizer(CORPUS + ["one more document"], VOCAB, tmp_path)
    assert len(list(tmp_path.glob("bpe-*"))) == 3


def test_bad_inputs_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="bpe_vocab_size 100 is too small.*257"):
        train_bpe_tokenizer(CORPUS, 100, None)
    with pytest.raises(DataError, match="empty corpus"):
        train_bpe_tokenizer(["", ""], VOCAB, None)
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(DataError, match=str(missing)):
        load_tokenizer(missing)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty_dir")
