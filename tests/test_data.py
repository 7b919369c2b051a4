"""TextDataModule: sources, splits, packing, determinism, resume and input errors (tiny corpora)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import huggingface_hub
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bitnet_train.data import (
    BlockSampler,
    DataConfig,
    PackedBlocks,
    TextDataModule,
    check_vocab,
    list_plays,
    load_documents,
    markdown_to_plain,
    shakespeare_dir,
    token_stream,
)
from bitnet_train.errors import DataError
from bitnet_train.tokenizer import load_tokenizer, train_bpe_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls hoot softly at night".split()


def make_documents(count: int, words_per_doc: int = 60, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc{i}: " + " ".join(rng.choice(WORDS, size=words_per_doc)) + "\n" for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small BPE saved to disk, used through data.tokenizer=<path> to skip training in most tests."""
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(make_documents(20) + ["Hamlet Macbeth ACT SCENE"], 300, None).save_pretrained(str(path))
    return path


@pytest.fixture
def text_corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(make_documents(10)):
        (folder / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    return folder


def files_config(tmp_path, tokenizer_dir, paths, **overrides) -> DataConfig:
    options = dict(
        source="files", paths=[str(p) for p in paths], tokenizer=str(tokenizer_dir), block_size=16, batch_size=4,
        val_fraction=0.2, cache_dir=str(tmp_path / "cache"),
    )
    return DataConfig(**{**options, **overrides})


def ready_module(config: DataConfig, **kwargs) -> TextDataModule:
    module = TextDataModule(config, **kwargs)
    module.prepare_data()
    module.setup("fit")
    return module


def first_batches(module: TextDataModule, count: int = 3) -> list[torch.Tensor]:
    loader = module.train_dataloader()
    return [x for x, _ in list(loader)[:count]]


# --- packing -----------------------------------------------------------------------------------


def test_blocks_are_contiguous_overlapping_slices_and_targets_are_shifted():
    tokens = np.arange(23, dtype=np.int32)
    blocks = PackedBlocks(tokens, block_size=5)
    assert len(blocks) == 4  # (23 - 1) // 5; the last 2 tokens do not fill a block
    for i in range(len(blocks)):
        x, y = blocks[i]
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == list(range(5 * i, 5 * i + 5))
        assert y.tolist() == list(range(5 * i + 1, 5 * i + 6))
    # every token after the first is a target exactly once
    targets = torch.cat([blocks[i][1] for i in range(len(blocks))])
    assert targets.tolist() == list(range(1, 21))


def test_token_stream_puts_eos_after_each_document(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    docs = ["first doc", "second one", "third"]
    stream = token_stream(datasets.Dataset.from_dict({"text": docs}), tokenizer, None, "test")
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream.tolist() == expected


def test_module_blocks_cover_the_train_token_stream(tmp_path, tokenizer_dir, text_corpus):
    module = ready_module(files_config(tmp_path, tokenizer_dir, [text_corpus]))
    blocks = module.train_blocks
    stream = blocks.tokens
    for i in (0, 1, len(blocks) - 1):
        x, y = blocks[i]
        assert torch.equal(torch.cat([x, y[-1:]]), stream[i * 16 : i * 16 + 17].long())
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_max_train_tokens_truncates_the_stream(tmp_path, tokenizer_dir, text_corpus):
    module = ready_module(files_config(tmp_path, tokenizer_dir, [text_corpus], max_train_tokens=100))
    assert len(module.train_blocks.tokens) == 101
    assert len(module.train_blocks) == 100 // 16


# --- sources and splits ------------------------------------------------------------------------


def test_text_files_split_by_whole_documents(tmp_path, tokenizer_dir, text_corpus):
    config = files_config(tmp_path, tokenizer_dir, [text_corpus / "*.txt"])
    train, val = load_documents(config, str(tmp_path / "ds"))
    train_texts, val_texts = list(train["text"]), list(val["text"])
    assert len(train_texts) == 8 and len(val_texts) == 2
    assert sorted(train_texts + val_texts) == sorted(make_documents(10))
    assert not set(train_texts) & set(val_texts)


def test_jsonl_and_parquet_read_the_text_field(tmp_path, tokenizer_dir):
    docs = make_documents(6)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(6)), "body": docs}), parquet)
    for path in (jsonl, parquet):
        config = files_config(tmp_path, tokenizer_dir, [path], text_field="body", val_fraction=0.0)
        train, val = load_documents(config, str(tmp_path / "ds"))
        assert list(train["text"]) == docs and val is None
    module = ready_module(files_config(tmp_path, tokenizer_dir, [parquet], text_field="body", val_fraction=0.0))
    assert module.val_dataloader() == []


def test_shakespeare_holds_out_whole_plays(tmp_path):
    assert shakespeare_dir().is_dir() and "hamlet" in list_plays()
    # two small plays for training, Hamlet (the default) held out; the BPE trains on train only
    config = DataConfig(
        plays=["the-comedy-of-errors", "a-midsummer-night-s-dream"], bpe_vocab_size=400, block_size=64,
        batch_size=4, cache_dir=str(tmp_path / "cache"),
    )
    assert config.val_plays == ["hamlet"]
    train, val = load_documents(config, str(tmp_path / "ds"))
    train_text, val_text = "".join(train["text"]), "".join(val["text"])
    assert train_text.startswith("# The Comedy of Errors") and val_text.startswith("# Hamlet")
    assert "To be, or not to be" in val_text and "To be, or not to be" not in train_text
    assert "**HAMLET**" in val_text and "**HAMLET**" not in train_text

    module = ready_module(config)
    train_decoded = module.tokenizer.decode(module.train_blocks.tokens.tolist())
    val_decoded = module.tokenizer.decode(module.val_blocks.tokens.tolist())
    assert "To be, or not to be" not in train_decoded and "To be, or not to be" in val_decoded
    assert "Lysander" in train_decoded


def test_plain_rendering_drops_the_markdown():
    markdown = "# Macbeth\n\n## ACT I\n\n**First Witch**  \nWhen shall we three meet again  \n_Exeunt_\n__\\[Aside]_  \n"
    assert markdown_to_plain(markdown) == "Macbeth\n\nACT I\n\nFirst Witch:\nWhen shall we three meet again\nExeunt\n[Aside]\n"


# --- tokenizers --------------------------------------------------------------------------------


def test_premade_model_tokenizer_is_used_and_checked(tmp_path, tokenizer_dir, text_corpus):
    model_tokenizer = load_tokenizer(tokenizer_dir)
    config = files_config(tmp_path, tokenizer_dir, [text_corpus], tokenizer="model")
    module = ready_module(config, tokenizer=model_tokenizer, model_vocab_size=512)
    assert module.tokenizer is model_tokenizer and module.vocab_size == 300
    with pytest.raises(DataError, match="tokenizer has 300 tokens but the model's vocab_size is 256"):
        ready_module(config, tokenizer=model_tokenizer, model_vocab_size=256)
    with pytest.raises(DataError, match="needs the model's tokenizer passed"):
        TextDataModule(config)
    with pytest.raises(DataError, match="set data.tokenizer='model'"):
        TextDataModule(files_config(tmp_path, tokenizer_dir, [text_corpus]), tokenizer=model_tokenizer)


def test_trained_bpe_is_cached_between_runs(tmp_path, text_corpus, tokenizer_dir):
    config = files_config(tmp_path, tokenizer_dir, [text_corpus], tokenizer="train_bpe", bpe_vocab_size=280)
    first = ready_module(config)
    [entry] = (tmp_path / "cache" / "tokenizers").iterdir()
    mtime = (entry / "tokenizer.json").stat().st_mtime_ns
    second = ready_module(config)
    assert (entry / "tokenizer.json").stat().st_mtime_ns == mtime
    assert first.vocab_size == second.vocab_size == 280
    assert torch.equal(first.train_blocks.tokens, second.train_blocks.tokens)


# --- determinism and resume ---------------------------------------------------------------------


def test_same_seed_same_batches_different_seed_different(tmp_path, tokenizer_dir, text_corpus):
    run_a = first_batches(ready_module(files_config(tmp_path, tokenizer_dir, [text_corpus], seed=7)))
    run_b = first_batches(ready_module(files_config(tmp_path, tokenizer_dir, [text_corpus], seed=7)))
    run_c = first_batches(ready_module(files_config(tmp_path, tokenizer_dir, [text_corpus], seed=8)))
    assert all(torch.equal(a, b) for a, b in zip(run_a, run_b))
    assert not all(torch.equal(a, c) for a, c in zip(run_a, run_c))


def test_order_depends_only_on_seed_and_epoch():
    blocks = PackedBlocks(np.arange(401, dtype=np.int32), block_size=4)  # 100 blocks
    sampler = BlockSampler(blocks, num_replicas=1, rank=0, seed=3)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0 and epoch1 != epoch0
    assert sorted(epoch0) == list(range(100))


def test_ranks_split_one_shared_permutation():
    blocks = PackedBlocks(np.arange(401, dtype=np.int32), block_size=4)
    whole = list(BlockSampler(blocks, num_replicas=1, rank=0, seed=3))
    shards = [list(BlockSampler(blocks, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]


def test_train_loader_shards_by_the_trainers_rank(tmp_path, tokenizer_dir, text_corpus):
    module = ready_module(files_config(tmp_path, tokenizer_dir, [text_corpus], batch_size=2))
    module.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    sampler = module.train_dataloader().sampler
    assert isinstance(sampler, BlockSampler) and (sampler.num_replicas, sampler.rank) == (2, 1)


def test_loader_state_resumes_mid_epoch(tmp_path, tokenizer_dir, text_corpus):
    module = ready_module(files_config(tmp_path, tokenizer_dir, [text_corpus], batch_size=2))
    loader = module.train_dataloader()
    loader.sampler.set_epoch(1)
    full = [x for x, _ in loader]
    interrupted = iter(loader)
    seen = [next(interrupted)[0] for _ in range(3)]
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches_done"] == 3

    resumed = module.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    rest = [x for x, _ in resumed]
    assert len(seen + rest) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, full))
    assert len(list(resumed)) == len(full)  # the skip applies to one pass only


class _BatchRecorder(L.LightningModule):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 4)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        inputs, _ = batch
        self.seen.append(inputs[:, 0].tolist())
        return self.embedding(inputs).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(module: TextDataModule, max_steps: int, root, save_at_step=None, ckpt_path=None) -> _BatchRecorder:
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=save_at_step, save_top_k=-1)] if save_at_step else []
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=bool(callbacks),
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=root,
    )
    model = _BatchRecorder(module.vocab_size)
    trainer.fit(model, datamodule=module, ckpt_path=ckpt_path)
    return model


def test_lightning_resume_sees_the_batches_of_an_uninterrupted_run(tmp_path, tokenizer_dir, text_corpus):
    def module() -> TextDataModule:
        config = files_config(tmp_path, tokenizer_dir, [text_corpus], batch_size=8, val_fraction=0.0)
        return ready_module(config)

    per_epoch = len(module().train_dataloader())
    total, stop = per_epoch + 4, per_epoch + 2  # the run stops in the middle of epoch 1
    uninterrupted = _fit(module(), total, tmp_path / "a")
    # a checkpoint written by ModelCheckpoint during training, as a crashed run leaves behind
    first_part = _fit(module(), stop, tmp_path / "b", save_at_step=stop)
    [checkpoint] = (tmp_path / "b").glob("*.ckpt")
    second_part = _fit(module(), total, tmp_path / "c", ckpt_path=checkpoint)
    assert len(uninterrupted.seen) == total
    assert first_part.seen + second_part.seen == uninterrupted.seen


# --- bad input ------------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path, tokenizer_dir):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(DataError, match=f"data path {missing} does not exist"):
        ready_module(files_config(tmp_path, tokenizer_dir, [missing]))
    with pytest.raises(DataError, match="matches no files"):
        ready_module(files_config(tmp_path, tokenizer_dir, [tmp_path / "*.jsonl"]))


def test_empty_corpus(tmp_path, tokenizer_dir):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus"):
        ready_module(files_config(tmp_path, tokenizer_dir, [tmp_path / "*.txt"]))


def test_block_size_larger_than_corpus_names_both_numbers(tmp_path, tokenizer_dir, text_corpus):
    config = files_config(tmp_path, tokenizer_dir, [text_corpus], block_size=100_000)
    with pytest.raises(DataError, match=r"block_size 100000 needs at least 100001 tokens, but the train split has \d+"):
        ready_module(config)


def test_too_few_blocks_for_one_batch(tmp_path, tokenizer_dir, text_corpus):
    module = ready_module(files_config(tmp_path, tokenizer_dir, [text_corpus], max_train_tokens=40, batch_size=4))
    with pytest.raises(DataError, match="2 blocks of 17 tokens, fewer than batch_size 4"):
        module.train_dataloader()


def test_unknown_source_and_play():
    with pytest.raises(DataError, match="unknown data.source 'web'; expected one of shakespeare, files, hub"):
        DataConfig(source="web")
    with pytest.raises(DataError, match="unknown play.*'hamlett'.*valid names: .*hamlet"):
        load_documents(DataConfig(val_plays=["hamlett"]), "unused")
    with pytest.raises(DataError, match="both data.plays and data.val_plays"):
        load_documents(DataConfig(plays=["hamlet"]), "unused")


def test_missing_text_field_lists_columns(tmp_path, tokenizer_dir):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no column 'text'.*\['body'\]"):
        ready_module(files_config(tmp_path, tokenizer_dir, [path]))


def test_val_fraction_needs_two_documents(tmp_path, tokenizer_dir):
    path = tmp_path / "one.txt"
    path.write_text(make_documents(1)[0], encoding="utf-8")
    with pytest.raises(DataError, match="leaves none for training.*text_sample_by='paragraph'"):
        ready_module(files_config(tmp_path, tokenizer_dir, [path]))


def test_check_vocab():
    tokenizer = ["token"] * 1000  # check_vocab needs only len()
    check_vocab(tokenizer, 1000)
    with pytest.raises(DataError, match="tokenizer has 1000 tokens but the model's vocab_size is 999"):
        check_vocab(tokenizer, 999)


def test_hub_source_offline_is_a_clear_error(tmp_path, monkeypatch, tokenizer_dir):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = DataConfig(
        source="hub", hub_name="someone/some-corpus", tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path)
    )
    with pytest.raises(DataError, match="cannot load hub dataset 'someone/some-corpus'.*offline mode is on"):
        ready_module(config)


def test_vocab_size_before_setup_is_an_error(tmp_path, tokenizer_dir, text_corpus):
    with pytest.raises(DataError, match="call TextDataModule.setup"):
        TextDataModule(files_config(tmp_path, tokenizer_dir, [text_corpus])).vocab_size
