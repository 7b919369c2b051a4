"""Generator, Tokenizer and perplexity on a tiny exported model (torch only builds the file and the reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bitnet_train.runtime import ChatSession, Engine, Generator, PromptTooLongError, SamplingParams, Tokenizer
from bitnet_train.runtime.evaluate import perplexity, windows
from bitnet_train.runtime.tokenizer import IncrementalDecoder, TokenizerError

import tiny_files

PROMPTS = ["To be, or not", "Friends, Romans, countrymen, lend me", "O"]
SAMPLED = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=11)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files.build(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def gen(files):
    return Generator(Engine.load(files["model"], threads=1))


def test_greedy_tokens_match_the_pytorch_reference(files, gen):
    """32 greedy steps, token for token. (A random tiny model has near-ties: "To be, or not" meets a top-2
    gap of 4e-4 at step 21, where torch's own fp32 rounding, which varies with the sequence length, flips
    an int8 activation code and moves logits by ~0.03; this prompt's 32 steps agree, smallest gap 5e-3.)"""
    torch = pytest.importorskip("torch")
    from bitnet_train.export.reference import build_reference_model

    ref = build_reference_model(files["model"])
    prompt = gen.encode_prompt("The slings and arrows")
    steps = 32
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, ref(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = ids[0, len(prompt):].tolist()
    got = gen.generate(prompt, max_new_tokens=steps, ignore_eos=True)[0]
    assert got.token_ids == want
    assert got.finish_reason == "length"
    assert got.text == gen.tokenizer.decode(want)


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_a_ragged_batch_gives_each_prompt_its_own_tokens(gen, sampling):
    batch = gen.generate(PROMPTS, max_new_tokens=20, sampling=sampling, ignore_eos=True)
    assert len({len(c.prompt_ids) for c in batch}) == 3  # different lengths
    for i, prompt in enumerate(PROMPTS):
        alone = gen.stream([prompt], max_new_tokens=20, sampling=sampling, ignore_eos=True)
        # prompt i alone samples from stream 0; give it stream i by padding the batch position
        if sampling.greedy:
            assert alone.run()[0].token_ids == batch[i].token_ids
        else:
            solo = gen.generate(["O"] * i + [prompt], max_new_tokens=20, sampling=sampling, ignore_eos=True)[i]
            assert solo.token_ids == batch[i].token_ids


def test_seeded_sampling_reproduces(gen):
    a = gen.generate(PROMPTS, max_new_tokens=24, sampling=SAMPLED)
    b = gen.generate(PROMPTS, max_new_tokens=24, sampling=SAMPLED)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    other = gen.generate(PROMPTS, max_new_tokens=24, sampling=SamplingParams(temperature=1.0, seed=12))
    assert [c.token_ids for c in a] != [c.token_ids for c in other]


def test_streaming_yields_the_same_text_as_generate(gen):
    want = gen.generate(PROMPTS, max_new_tokens=30, sampling=SAMPLED)
    seen = []
    stream = gen.stream(PROMPTS, max_new_tokens=30, sampling=SAMPLED, on_token=seen.append)
    events = list(stream)
    assert events == seen  # the callback sees every event, in order
    for i, c in enumerate(want):
        mine = [e for e in events if e.index == i]
        assert [e.token_id for e in mine] == c.token_ids
        assert "".join(e.text for e in mine) == c.text == stream.completions[i].text
    assert stream.stats.generated_tokens == len(events)
    assert stream.stats.prompt_tokens == sum(len(c.prompt_ids) for c in want)


def test_stop_strings_cut_the_text_and_are_never_streamed(gen):
    full = gen.generate(PROMPTS[1], max_new_tokens=40, ignore_eos=True)[0]
    text = full.text
    assert len(text) > 12
    stop = text[6:9]
    cut = text.index(stop)
    stream = gen.stream(PROMPTS[1], max_new_tokens=40, ignore_eos=True, stop=["never there", stop])
    deltas = [e.text for e in stream]
    done = stream.completions[0]
    assert done.finish_reason == "stop"
    assert done.text == text[:cut] == "".join(deltas)
    assert done.token_ids == full.token_ids[:len(done.token_ids)]
    assert gen.tokenizer.decode(done.token_ids).startswith(text[:cut] + stop)


def test_eos_and_max_new_tokens_end_a_sequence(gen):
    full = gen.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True)[0]
    end = full.token_ids[4]
    first = full.token_ids.index(end)
    done = gen.generate(PROMPTS[0], max_new_tokens=10, stop_token_ids=[end])[0]
    assert done.finish_reason == "eos" and done.token_ids == full.token_ids[:first + 1]
    assert done.text == gen.tokenizer.decode(full.token_ids[:first])
    assert len(full.token_ids) == 10 and full.finish_reason == "length"


def test_the_tokenizer_eos_ends_generation(files):
    gen = Generator(Engine.load(files["model"], threads=1))
    eos = next(iter(gen.tokenizer.eos_ids))
    assert eos == gen.tokenizer.token_to_id("<|im_end|>")
    # make the model's favourite first token the eos: then generation ends after one token
    first = gen.generate(PROMPTS[2], max_new_tokens=5, ignore_eos=True)[0].token_ids[0]
    gen.tokenizer.eos_ids = {first}
    done = gen.generate(PROMPTS[2], max_new_tokens=5)[0]
    assert done.token_ids == [first] and done.finish_reason == "eos"


def test_context_limits(gen):
    ctx = gen.engine.max_seq_len
    with pytest.raises(PromptTooLongError, match=f"prompt 1 has {ctx + 1} tokens; the model's context is {ctx}"):
        gen.stream([[5], [5] * (ctx + 1)])
    near = [7] * (ctx - 3)
    done = gen.generate(near, max_new_tokens=50, ignore_eos=True)[0]
    assert done.finish_reason == "length" and len(done.token_ids) == 4  # fills the context, + the last prediction
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.stream([[1, 10_000]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.stream("x", max_new_tokens=0)
    with pytest.raises(ValueError, match="stop strings"):
        gen.stream("x", stop=[""])


def test_incremental_decoding_keeps_multibyte_characters_whole(gen):
    tok = gen.tokenizer
    text = "To be: héllo → 日本語 🙂!"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 2  # mostly single-byte tokens: characters are split
    dec = IncrementalDecoder(tok, tok.encode("Friends"))
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens completed no character


def test_chat_template_renders_like_transformers(files):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    from bitnet_train.export.reader import open_model

    f = open_model(files["model"])
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
        "{% continue %}{% endif %}{% if loop.index0 > 5 %}{{ raise_exception('too long') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n  {{ m['content'] | trim }}{{ {'n': loop.index} | tojson }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ours = Tokenizer(f.tokenizer_json, {**f.tokenizer_config, "chat_template": template, "bos_token": "<|im_start|>"})
    hf = PreTrainedTokenizerFast(tokenizer_object=ours._tok, eos_token="<|im_end|>", bos_token="<|im_start|>")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " Hi <b>there</b> "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "naïve 日本"}]
    for add in (True, False):
        want = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == want
    with pytest.raises(TokenizerError, match="too long"):
        ours.apply_chat_template([{"role": "user", "content": "x"}] * 8)


def test_a_file_without_a_chat_template_refuses_chat(files):
    gen = Generator(Engine.load(files["no_template"], threads=1))
    with pytest.raises(TokenizerError, match="no chat template"):
        gen.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert gen.tokenizer.eos_ids == {gen.tokenizer.token_to_id("<|endoftext|>")}


def test_windows_score_every_token_once():
    for n, w, s in [(10, 4, 2), (10, 4, 4), (64, 64, 32), (65, 64, 32), (100, 16, 5), (3, 64, 32)]:
        scored = [t for _, end, first in windows(n, w, s) for t in range(first, end)]
        assert len(scored) == len(set(scored))
        spans = windows(n, w, s)
        assert spans[-1][1] == n and all(end - begin <= w for begin, end, _ in spans)
        if s < w:
            assert scored == list(range(1, n))


def test_perplexity_matches_a_direct_computation(gen):
    eng = gen.engine
    ids = np.random.default_rng(0).integers(0, eng.vocab_size, 40)
    logits = eng.forward(ids).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -logp[np.arange(39), ids[1:]].mean()
    res = perplexity(eng, ids)
    assert res.tokens == 39 and res.windows == 1
    assert math.isclose(res.nll, nll, rel_tol=1e-6) and math.isclose(res.ppl, math.exp(nll), rel_tol=1e-6)
    calls = []
    long = np.random.default_rng(1).integers(0, eng.vocab_size, 150)
    res = perplexity(eng, long, window=32, stride=16, progress=lambda done, total: calls.append((done, total)))
    assert res.tokens == 149 and calls[-1] == (149, 149) and math.isfinite(res.ppl)
    with pytest.raises(ValueError, match="window must be in"):
        perplexity(eng, long, window=eng.max_seq_len + 1)


def test_chat_session_reuses_the_cache_and_matches_a_fresh_prefill(files):
    gen = Generator(Engine.load(files["model"], threads=1))
    chat = ChatSession(gen, system="be")
    answers = []
    for text in ("hi", "ok"):
        # one token per answer: the tiny model's bytes are no valid UTF-8, and re-encoding their U+FFFD
        # text would (rightly) not reproduce longer answers' tokens, which makes the session start over
        stream = chat.send(text, max_new_tokens=1)
        assert "".join(e.text for e in stream) == stream.completions[0].text
        answers.append(stream.completions[0])
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    first_prompt = len(answers[0].prompt_ids)
    assert chat.reused_tokens == first_prompt  # the second turn prefilled only what the cache lacked
    # the same last turn from scratch gives the same tokens
    ids = gen.tokenizer.encode(gen.tokenizer.apply_chat_template(chat.messages[:-1]), add_special_tokens=False)
    assert ids == answers[1].prompt_ids
    assert gen.generate([ids], max_new_tokens=1)[0].token_ids == answers[1].token_ids
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "be"}]
    again = chat.send("hi", max_new_tokens=3)
    assert again.run()[0].token_ids == gen.generate([answers[0].prompt_ids], max_new_tokens=3)[0].token_ids
    assert chat.reused_tokens == 0  # the cache held a longer conversation: started over
    with pytest.raises(PromptTooLongError, match="the conversation has"):
        chat.send("x " * 80)
    with pytest.raises(TokenizerError, match="no chat template"):
        ChatSession(Generator(Engine.load(files["no_template"], threads=1)))
