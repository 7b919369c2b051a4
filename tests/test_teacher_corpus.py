"""The teacher-written corpus: the KV cache against the full forward, nucleus sampling against a
full-sort reference, generation determinism, the on-disk cache (hit, extension, miss, mismatch, atomic
writes), mixing at the asked fraction, and a tiny run that trains on it and reports the general set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet_train import teacher_corpus as tc
from bitnet_train.data import DataConfig, MixedBlocks, PackedBlocks, TextDataModule
from bitnet_train.errors import DataError
from bitnet_train.model import BitNetModel, KVCache, ModelConfig, QuantConfig
from bitnet_train.tokenizer import train_bpe_tokenizer

WORDS = "the a of and to in is was for on with as by at from that this it he she they we you".split()
CHAT_TEMPLATE = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                max_seq_len=256, norm="none")
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tokenizer():
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 40)) + "." for _ in range(30)]
    texts += [p for kind in tc.load_prompts().values() for p in kind]  # the prompts' letters and words
    tok = train_bpe_tokenizer(texts, 300, None)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = BitNetModel(tiny_config(), QuantConfig(method="none"))
    return model.eval().requires_grad_(False)


def small_cfg(**kw) -> tc.TeacherCorpusConfig:
    base = dict(fraction=0.25, tokens=600, batch_size=4, max_new_tokens=24, seed=3)
    return tc.TeacherCorpusConfig(**{**base, **kw})


# -- the KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [
    dict(),
    dict(norm="subln", qk_norm=True, qkv_bias=True),
    dict(num_kv_heads=4),
    dict(quant="b1.58", norm="subln"),
])
def test_incremental_forward_with_the_cache_matches_the_full_forward(arch):
    arch = dict(arch)
    quant = QuantConfig(method=arch.pop("quant", "none"))
    torch.manual_seed(1)
    model = BitNetModel(tiny_config(**arch), quant).eval()
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        full = model(ids)  # (2, 12, V)
        cache = KVCache(model.config, 2, max_len=16)
        parts = [model(ids[:, :5], cache=cache),  # prefill (causal, from 0)
                 model(ids[:, 5:8], cache=cache)]  # a chunk after cached positions (explicit mask)
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(8, 12)]  # one token at a time
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-4)


def test_repeated_and_dropped_cache_rows_continue_like_separate_sequences(teacher):
    prompt = torch.randint(0, 320, (1, 6))
    nexts = torch.tensor([[5], [9], [17]])
    with torch.no_grad():
        cache = KVCache(teacher.config, 1, max_len=10)
        teacher(prompt, cache=cache)
        cache = cache.repeat_rows(3)
        step = teacher(nexts, cache=cache)[:, -1]  # (3, V)
        cache.keep_rows(torch.tensor([0, 2]))
        after = teacher(torch.tensor([[40], [41]]), cache=cache)[:, -1]  # rows 0 and 2 go on
        for r in range(3):
            seq = torch.cat([prompt[0], nexts[r]]).unsqueeze(0)
            torch.testing.assert_close(step[r], teacher(seq)[0, -1], atol=2e-5, rtol=1e-4)
        for i, (r, t) in enumerate(((0, 40), (2, 41))):
            seq = torch.cat([prompt[0], nexts[r], torch.tensor([t])]).unsqueeze(0)
            torch.testing.assert_close(after[i], teacher(seq)[0, -1], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="length 11 exceeds the KV cache.s length 10"):
        teacher(torch.zeros(2, 3, dtype=torch.long), cache=cache)


# -- sampling --------------------------------------------------------------------------------------

def reference_nucleus_sample(logits, temperature, top_p, u):
    """Full sort of the vocabulary, the smallest prefix with mass >= top_p, inverse CDF at u."""
    out = []
    for row in range(logits.shape[0]):
        p = torch.softmax(logits[row].double() / temperature[row, 0], -1)
        sp, order = p.sort(descending=True)
        before = sp.cumsum(0) - sp
        kept = sp[before < top_p[row, 0]]
        c = kept.cumsum(0)
        idx = int((c <= u[row, 0] * c[-1]).sum().clamp(max=len(kept) - 1))
        out.append(int(order[idx]))
    return out


@pytest.mark.parametrize("scale,top_p", [(8.0, 0.9), (1.0, 0.95), (0.01, 0.99), (3.0, 1.0)])
def test_nucleus_sampling_matches_a_full_sort_whatever_tier_finds_it(scale, top_p):
    # scale 8: peaked (the 128-candidate tier); 0.01: nearly flat over 5000 tokens (the full sort)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * scale
    temperature = torch.tensor([[0.7], [1.0], [1.1], [0.9], [1.0], [1.3]])
    tp = torch.full((6, 1), top_p)
    got = tc.sample_next(logits, temperature, tp, torch.Generator().manual_seed(42)).tolist()
    u = torch.rand(6, 1, generator=torch.Generator().manual_seed(42))  # what sample_next drew
    assert got == reference_nucleus_sample(logits, temperature, tp, u)


def test_a_tiny_top_p_is_greedy():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    got = tc.sample_next(logits, torch.ones(5, 1), torch.full((5, 1), 1e-6), torch.Generator().manual_seed(0))
    assert got.tolist() == logits.argmax(-1).tolist()


# -- generation --------------------------------------------------------------------------------------

def test_generation_is_deterministic_under_a_seed_and_batches_are_prefixes(teacher, tokenizer, tmp_path):
    def gen(seed, n, root):
        corpus = tc.TeacherCorpus(root, teacher="t", tokenizer="k", cfg=small_cfg(seed=seed))
        return corpus.tokens(n, lambda: teacher, tokenizer, log=lambda m: None)

    a, b = gen(3, 600, tmp_path / "a"), gen(3, 600, tmp_path / "b")
    assert a.dtype == np.int32 and len(a) == 600 and np.array_equal(a, b)
    assert not np.array_equal(a, gen(4, 600, tmp_path / "c"))
    longer = gen(3, 1500, None)  # no cache: generated from batch 0 again
    assert np.array_equal(longer[:600], a)
    # documents are separated by eos; every kind of prompt was used, chat through the template
    text = tokenizer.decode(longer.tolist())
    assert "Q: " in text and "\nA:" in text
    stream, batches, stats = tc.generate_batches(teacher, tokenizer, small_cfg(seed=3), 0, 1500)
    assert set(stats["kinds"]) == {"text", "chat", "start"} and stats["documents"] == 4 * batches
    assert np.array_equal(stream[:1500], longer)


def test_rows_sample_with_their_own_settings_from_one_prompt(teacher, tokenizer):
    prompter = tc.Prompter(tokenizer, small_cfg(batch_size=6), tc.load_prompts())
    kind, ids, keep, temps, tops = prompter.batch(0)
    assert len(temps) == len(tops) == 6 and len(set(zip(temps, tops))) == 6  # the 3 x 2 grid, once each
    conts = tc.sample_continuations(teacher, ids, temps, tops, 10, {tokenizer.eos_token_id},
                                    torch.Generator().manual_seed(0))
    assert len(conts) == 6 and all(len(c) <= 10 for c in conts)


def test_chat_prompts_need_a_chat_template(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="has 'chat' but the teacher's tokenizer has no chat template"):
        tc.Prompter(plain, small_cfg(), tc.load_prompts())
    tc.Prompter(plain, small_cfg(prompt_kinds={"text": 1.0, "start": 1.0}), tc.load_prompts())


def test_a_prompt_plus_new_tokens_longer_than_the_teacher_is_refused(teacher, tokenizer):
    with pytest.raises(DataError, match="exceeds the teacher's max_seq_len 256; lower max_new_tokens"):
        tc.generate_batches(teacher, tokenizer, small_cfg(max_new_tokens=250), 0, 10)


@pytest.mark.parametrize("bad,needle", [
    ({"fraction": 1.0}, "fraction must be in"),
    ({"temperatures": [0.0]}, "temperatures"),
    ({"top_p": [1.5]}, "top_p"),
    ({"prompt_kinds": {"poems": 1.0}}, "prompt_kinds"),
    ({"dtype": "float16"}, "dtype"),
    ({"tokenz": 5}, "unknown data.teacher_corpus keys"),
])
def test_bad_settings_are_one_clear_error(bad, needle):
    with pytest.raises(DataError, match=needle):
        tc.TeacherCorpusConfig.from_dict(bad)


# -- the cache ---------------------------------------------------------------------------------------

def no_model():
    raise AssertionError("the cache should have answered without the teacher")


def test_cache_hit_extension_and_settings_kept_apart(teacher, tokenizer, tmp_path):
    quiet = {"log": lambda m: None}
    first = tc.TeacherCorpus(tmp_path, teacher="t", tokenizer="k", cfg=small_cfg())
    a = first.tokens(600, lambda: teacher, tokenizer, **quiet)
    manifest = json.loads((first.dir / "manifest.json").read_text())
    assert manifest["tokens"] >= 600 and manifest["settings"]["temperatures"] == [0.7, 0.9, 1.1]
    assert (first.dir / "samples.txt").read_text().strip()
    again = tc.TeacherCorpus(tmp_path, teacher="t", tokenizer="k", cfg=small_cfg(fraction=0.5, tokens=9))
    assert again.key == first.key  # how much and how often are not generation settings
    assert np.array_equal(again.tokens(600, no_model, tokenizer, **quiet), a)  # a hit: no teacher
    assert np.array_equal(again.tokens(300, no_model, tokenizer, **quiet), a[:300])
    # more tokens than cached: the cache grows by later batches, and keeps one tokens file
    more = again.tokens(1000, lambda: teacher, tokenizer, **quiet)
    assert np.array_equal(more[:600], a) and len(more) == 1000
    assert len(list(first.dir.glob("tokens-*.npy"))) == 1
    assert np.array_equal(tc.TeacherCorpus(None, teacher="t", tokenizer="k", cfg=small_cfg()).tokens(
        1000, lambda: teacher, tokenizer, **quiet), more)  # as if generated at once
    # other settings, teacher or tokenizer: another key, another directory; the first stays
    keys = {tc.TeacherCorpus(tmp_path, teacher=t, tokenizer=k, cfg=c).key
            for t, k, c in [("t", "k", small_cfg()), ("t", "k", small_cfg(temperatures=[0.5])),
                            ("t2", "k", small_cfg()), ("t", "k2", small_cfg()), ("t", "k", small_cfg(seed=4)),
                            ("t", "k", small_cfg(dtype="bfloat16"))]}
    assert len(keys) == 6
    other = tc.TeacherCorpus(tmp_path, teacher="t", tokenizer="k", cfg=small_cfg(temperatures=[0.5]))
    other.tokens(100, lambda: teacher, tokenizer, **quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.key, other.key])


def test_a_cache_that_does_not_match_is_refused(teacher, tokenizer, tmp_path):
    corpus = tc.TeacherCorpus(tmp_path, teacher="t", tokenizer="k", cfg=small_cfg())
    corpus.tokens(300, lambda: teacher, tokenizer, log=lambda m: None)
    manifest_path = corpus.dir / "manifest.json"
    good = manifest_path.read_text()
    manifest_path.write_text(good.replace('"teacher": "t"', '"teacher": "other"'))
    with pytest.raises(DataError, match="made with another teacher: cache 'other' vs this run 't'"):
        corpus.tokens(300, no_model, tokenizer)
    manifest_path.write_text(good)
    [tokens_file] = corpus.dir.glob("tokens-*.npy")
    data = np.load(tokens_file)
    data[0] += 1
    np.save(tokens_file, data)
    with pytest.raises(DataError, match="does not match its manifest"):
        corpus.tokens(300, no_model, tokenizer)
    tokens_file.unlink()
    with pytest.raises(DataError, match="which is missing"):
        corpus.tokens(300, no_model, tokenizer)


def test_a_write_that_fails_leaves_no_cache_and_the_next_run_generates(teacher, tokenizer, tmp_path, monkeypatch):
    corpus = tc.TeacherCorpus(tmp_path, teacher="t", tokenizer="k", cfg=small_cfg())

    def fail(f, arr, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(tc.np, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        corpus.tokens(300, lambda: teacher, tokenizer, log=lambda m: None)
    monkeypatch.undo()
    assert list(corpus.dir.iterdir()) == []  # no manifest, no tokens file, no temporary file
    got = corpus.tokens(300, lambda: teacher, tokenizer, log=lambda m: None)
    assert len(got) == 300 and (corpus.dir / "manifest.json").is_file()


def test_the_key_follows_the_teachers_weights(teacher, tokenizer, tmp_path):
    from bitnet_train.distill import model_fingerprint

    changed = BitNetModel(teacher.config, QuantConfig(method="none"))
    changed.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        changed.norm.weight[0] += 1e-3
    keys = [tc.TeacherCorpus(tmp_path, teacher=model_fingerprint(m), tokenizer=tc.tokenizer_identity(tokenizer),
                             cfg=small_cfg()).key for m in (teacher, changed)]
    assert keys[0] != keys[1]
    logs = []
    a = tc.teacher_corpus_tokens(small_cfg(), tmp_path, teacher, tokenizer, log=logs.append)
    b = tc.teacher_corpus_tokens(small_cfg(), tmp_path, teacher, tokenizer, log=logs.append)
    assert np.array_equal(a, b) and "generating" in logs[0] and "from the cache" in logs[-1]
    # another dtype for writing: a copy writes, the teacher itself is left as it was
    tc.teacher_corpus_tokens(small_cfg(dtype="bfloat16", tokens=100), tmp_path, teacher, tokenizer, log=logs.append)
    assert teacher.embed_tokens.weight.dtype == torch.float32 and len(list(tmp_path.iterdir())) == 2


# -- mixing ------------------------------------------------------------------------------------------

def test_mixed_blocks_give_the_asked_fraction_of_teacher_tokens():
    task = PackedBlocks(np.arange(10 * 8 + 1, dtype=np.int32), 8)  # 10 blocks
    teacher = PackedBlocks(np.arange(1000, 1000 + 3 * 8 + 1, dtype=np.int32), 8)  # 3 blocks, cycled
    for fraction in (0.1, 0.25, 0.5, 0.75):
        mixed = MixedBlocks(task, teacher, fraction)
        from_teacher = sum(int(mixed[i][0][0]) >= 1000 for i in range(len(mixed)))
        assert from_teacher == mixed.teacher_slots
        assert abs(from_teacher / len(mixed) - fraction) <= 0.5 / len(mixed) + 1e-9  # within rounding
    mixed = MixedBlocks(task, teacher, 0.5)
    assert [int(mixed[10 + j][0][0]) for j in range(6)] == [1000, 1008, 1016, 1000, 1008, 1016]
    assert mixed.teacher_repeats == pytest.approx(10 / 3)


def test_the_data_module_mixes_teacher_tokens_into_train_only(tmp_path, tokenizer):
    folder = tmp_path / "texts"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        (folder / f"{i}.txt").write_text(" ".join(rng.choice(WORDS, 200)) + "\n")
    teacher_tokens = np.full(20 * 17, 7, dtype=np.int32)  # a stream of one id: easy to count
    cfg = DataConfig(source="files", paths=[str(folder)], tokenizer="model", block_size=16, batch_size=4,
                     val_fraction=0.2, teacher_corpus={"fraction": 0.3}, general_val=False)
    dm = TextDataModule(cfg, tokenizer=tokenizer, teacher_tokens=teacher_tokens)
    dm.setup()
    blocks = dm.train_blocks
    assert isinstance(blocks, MixedBlocks)
    seen = [x for batch, _ in dm.train_dataloader() for x in batch]
    teacher_seen = sum(bool((x == 7).all()) for x in seen)
    # a full epoch (drop_last aside) sees the asked fraction; validation has no teacher text
    assert abs(teacher_seen / len(seen) - 0.3) < 0.05
    assert not any(bool((x == 7).all()) for x, _ in (dm.val_blocks[i] for i in range(len(dm.val_blocks))))
    with pytest.raises(DataError, match="needs the teacher corpus's tokens"):
        TextDataModule(cfg, tokenizer=tokenizer).setup()
    with pytest.raises(DataError, match="token ids outside the tokenizer's 300"):
        TextDataModule(cfg, tokenizer=tokenizer, teacher_tokens=np.full(400, 999, dtype=np.int32)).setup()


# -- a tiny run end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_trains_on_the_teacher_corpus_and_reports_the_general_set(tmp_path, tokenizer, verse_corpus, capsys):
    import csv

    from bitnet_train.config import compose_config
    from bitnet_train.model_dir import save_model_dir
    from bitnet_train.train import run

    torch.set_num_threads(1)
    torch.manual_seed(0)
    source = save_model_dir(tmp_path / "source", BitNetModel(tiny_config(max_seq_len=64), QuantConfig(method="none")),
                            tokenizer)
    (tmp_path / "corpus").mkdir()
    corpus = verse_corpus(tmp_path / "corpus", 4, 60)

    def overrides(run_dir, **extra):
        o = {"run_dir": str(run_dir), "logger": "csv", "callbacks.progress_bar": "none", "sample_prompt": "null",
             "data.source": "files", "data.paths": f"[{corpus}]", "data.val_fraction": 0.25,
             "data.block_size": 16, "data.batch_size": 2, "data.tokenizer": "model",
             "data.cache_dir": str(tmp_path / "cache"), "model.init_from": str(source), "model.max_seq_len": 64,
             "data.max_general_val_tokens": 200, "trainer.max_steps": 3, "trainer.val_check_interval": 3,
             "trainer.limit_val_batches": 2, "trainer.threads": 1, "optim.warmup_steps": 1,
             "quant.lambda_warmup_steps": 0, "callbacks.checkpoint_every_n_steps": 10}
        o.update(extra)
        return [f"{k}={v}" for k, v in o.items()]

    mix = {"data.teacher_corpus.fraction": 0.3, "data.teacher_corpus.tokens": 300,
           "data.teacher_corpus.max_new_tokens": 8, "data.teacher_corpus.batch_size": 4}
    summary = run(compose_config(overrides(tmp_path / "mixed", **mix)))
    os.environ.pop("BITNET_RUN_DIR", None)
    out = capsys.readouterr().out
    assert "teacher corpus: generating 300 tokens" in out and "teacher corpus (30%" in out
    assert summary["teacher_corpus"] == {"fraction": 0.3, "tokens": 300}
    assert summary["val_general_ppl"] > 1 and summary["val_ppl"] > 1
    rows = list(csv.DictReader((tmp_path / "mixed" / "logs" / "metrics.csv").open()))
    assert any(r.get("val_general/ppl") for r in rows) and any(r.get("val/ppl") for r in rows)
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert results[-1]["val_general_ppl"] == summary["val_general_ppl"]
    [entry] = (tmp_path / "cache" / "teacher_corpus").iterdir()
    assert (entry / "manifest.json").is_file()

    # the same run again reads the corpus from the cache; the general set leaves the held-out numbers alone
    run(compose_config(overrides(tmp_path / "again", **mix)))
    os.environ.pop("BITNET_RUN_DIR", None)
    assert "teacher corpus: 300 tokens from the cache" in capsys.readouterr().out
    with_general = run(compose_config(overrides(tmp_path / "plain")))
    os.environ.pop("BITNET_RUN_DIR", None)
    without = run(compose_config(overrides(tmp_path / "plain_nogeneral", **{"data.general_val": "false"})))
    os.environ.pop("BITNET_RUN_DIR", None)
    assert with_general["val_loss"] == without["val_loss"] and "val_general_ppl" not in without


def test_the_data_config_yaml_lists_the_dataclass_defaults():
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from bitnet_train.config import config_dir

    data = OmegaConf.to_container(OmegaConf.load(config_dir() / "data" / "shakespeare.yaml"))
    assert data["teacher_corpus"] == asdict(tc.TeacherCorpusConfig())
    defaults = DataConfig()
    assert (data["general_val"], data["max_general_val_tokens"]) == (defaults.general_val,
                                                                      defaults.max_general_val_tokens)
