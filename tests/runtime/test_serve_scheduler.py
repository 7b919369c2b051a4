"""The continuous-batching scheduler without HTTP: batch invariance, chunked prefill, prefix reuse,
cancellation, admission control, and an engine failure that ends one request, not the server."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bitnet_train.runtime import Engine, Generator, SamplingParams
from bitnet_train.runtime.serve.scheduler import (QueueFullError, Scheduler, SchedulerError, SequenceRequest,
                                                  StepOutput)

import tiny_files
from serve_helpers import WrappedEngine

CTX = 256
PROMPTS = ["To be, or not", "Friends, Romans, countrymen, lend me", "O", "The slings and arrows of",
           "Whether 'tis nobler", "And by opposing end them.", "a sea of troubles", "To die: to sleep;"]
SEEDED = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.5,
                        frequency_penalty=0.3, seed=7)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files.build(str(tmp_path_factory.mktemp("tiny_serve")), CTX)


@pytest.fixture(scope="module")
def engine(files):
    return Engine.load(files["model"], threads=1)


@pytest.fixture(scope="module")
def gen(engine):
    return Generator(engine)


@pytest.fixture
def sched(engine):
    s = Scheduler(engine, max_batch=8, step_tokens=16, idle_step_tokens=64).start()
    yield s
    s.stop()


def run(coro):
    return asyncio.run(coro)


async def collect(handle) -> list[list[StepOutput]]:
    outs = [[] for _ in handle.results]
    async for choice, out in handle:
        assert not isinstance(out, SchedulerError), out
        outs[choice].append(out)
    return outs


def generate(sched, seqs) -> list[list[StepOutput]]:
    """Submit inside a fresh event loop and collect every choice."""
    async def main():
        return await collect(sched.submit(seqs))
    return run(main())


def ids_of(gen, prompt: str) -> list[int]:
    return gen.encode_prompt(prompt)


def test_one_request_gives_the_generators_tokens_and_text(sched, gen):
    prompt = ids_of(gen, PROMPTS[0])
    want = gen.generate([prompt], max_new_tokens=24, ignore_eos=True)[0]

    async def main():
        h = sched.submit([SequenceRequest(prompt, max_tokens=24, ignore_eos=True)])
        return h, await collect(h)

    h, outs = run(main())
    assert [o.token_id for o in outs[0]] == want.token_ids
    assert "".join(o.text for o in outs[0]) == want.text == h.results[0].text
    assert outs[0][-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[0][:-1])
    assert h.results[0].prompt_tokens == len(prompt)


@pytest.mark.parametrize("sampling", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
def test_eight_staggered_requests_give_the_tokens_of_eight_sequential_ones(engine, gen, sampling):
    """Batch invariance: each request alone, then all 8 started at different times (each after the
    previous one's 2nd token), sharing steps with different neighbours and prefill chunks."""
    prompts = [ids_of(gen, p) for p in PROMPTS]
    lengths = [12 + 3 * i for i in range(8)]
    sched = Scheduler(WrappedEngine(engine, delay=0.002), max_batch=8, step_tokens=12, idle_step_tokens=12).start()
    try:
        async def alone():
            res = []
            for p, n in zip(prompts, lengths):
                res.append((await collect(sched.submit([SequenceRequest(p, max_tokens=n, sampling=sampling,
                                                                        ignore_eos=True)])))[0])
            return res

        async def staggered():
            started = []
            tasks = []
            for p, n in zip(prompts, lengths):
                overlapping.append(sum(r.results[0].finish_reason is None for r in started))
                h = sched.submit([SequenceRequest(p, max_tokens=n, sampling=sampling, ignore_eos=True)])
                tasks.append(asyncio.ensure_future(collect(h)))
                started.append(h)
                while len(h.results[0].token_ids) < 2:  # the next one joins mid-stream
                    await asyncio.sleep(0.001)
            return [(await t)[0] for t in tasks]

        overlapping: list[int] = []  # requests still running when each one was submitted
        sequential = run(alone())
        concurrent = run(staggered())
    finally:
        sched.stop()
    assert max(overlapping) >= 3, overlapping
    for a, b in zip(sequential, concurrent):
        assert [o.token_id for o in a] == [o.token_id for o in b]
        assert [o.text for o in a] == [o.text for o in b]
    if sampling.greedy:
        want = gen.generate(prompts, max_new_tokens=max(lengths), ignore_eos=True)
        for a, w, n in zip(sequential, want, lengths):
            assert [o.token_id for o in a] == w.token_ids[:n]


def test_choices_of_a_seeded_request_sample_the_generators_streams(sched, gen):
    prompt = ids_of(gen, PROMPTS[1])
    want = gen.generate([prompt] * 3, max_new_tokens=16, sampling=SEEDED, ignore_eos=True)  # streams 0, 1, 2
    seqs = [SequenceRequest(prompt, max_tokens=16, sampling=SEEDED, stream=j, ignore_eos=True) for j in range(3)]
    outs = generate(sched, seqs)
    assert [[o.token_id for o in c] for c in outs] == [w.token_ids for w in want]
    assert len({tuple(w.token_ids) for w in want}) > 1  # the streams differ


def test_a_long_prompt_is_prefilled_in_chunks_while_a_stream_keeps_decoding(sched, gen):
    long_prompt = (ids_of(gen, " ".join(tiny_files.CORPUS)) * 4)[:200]
    want = gen.generate([long_prompt], max_new_tokens=8, ignore_eos=True)[0]
    runner = ids_of(gen, PROMPTS[0])

    async def main():
        a = sched.submit([SequenceRequest(runner, max_tokens=CTX - len(runner), ignore_eos=True)])
        task = asyncio.ensure_future(collect(a))
        while len(a.results[0].token_ids) < 2:
            await asyncio.sleep(0.001)
        before = len(a.results[0].token_ids)
        b = sched.submit([SequenceRequest(long_prompt, max_tokens=8, ignore_eos=True)])
        first_b = None
        async for _, out in b:
            if first_b is None:
                first_b = len(a.results[0].token_ids) - before
            last = out
        a.cancel()
        await task
        return first_b, b.results[0], last

    a_tokens_meanwhile, res, last = run(main())
    # 16-token steps: 1 decode row + 15 prompt tokens, so >= ceil(200 / 15) = 14 steps, each giving A a token
    assert a_tokens_meanwhile >= 14
    assert res.token_ids == want.token_ids  # chunked prefill computes what one whole prefill computes
    assert last.finish_reason == "length"


def test_a_prompt_that_extends_a_finished_one_reuses_its_cache(sched, gen):
    first = ids_of(gen, "To be, or not to be, that is the question:")
    follow = first + ids_of(gen, " Whether 'tis nobler")

    async def main():
        h1 = sched.submit([SequenceRequest(first, max_tokens=4, ignore_eos=True)])
        await collect(h1)
        h2 = sched.submit([SequenceRequest(follow, max_tokens=12, ignore_eos=True)])
        outs = await collect(h2)
        return h1.results[0], h2.results[0], outs

    r1, r2, outs = run(main())
    assert r1.cached_tokens == 0
    assert r2.cached_tokens == len(first)  # the slot held first + 3 generated tokens; first is the common part
    assert sched.reused_tokens >= len(first)
    assert [o.token_id for o in outs[0]] == gen.generate([follow], max_new_tokens=12, ignore_eos=True)[0].token_ids


def test_leaving_the_stream_frees_the_slot_within_a_step(sched, gen):
    prompt = ids_of(gen, PROMPTS[2])

    async def main():
        h = sched.submit([SequenceRequest(prompt, max_tokens=CTX - len(prompt), ignore_eos=True)])
        n = 0
        async for _ in h:
            n += 1
            if n == 3:
                break
        await h.aclose()
        deadline = time.monotonic() + 5
        while sched.slots_used and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return sched.slots_used, sched.steps

    used, _ = run(main())
    assert used == 0


def test_a_full_queue_refuses_with_queue_full_error(engine, gen):
    sched = Scheduler(engine, max_batch=1, max_queue=1).start()
    prompt = ids_of(gen, PROMPTS[0])
    try:
        async def main():
            long = SequenceRequest(prompt, max_tokens=CTX - len(prompt), ignore_eos=True)
            a = sched.submit([long])  # takes the slot
            b = sched.submit([long])  # waits
            with pytest.raises(QueueFullError, match="busy"):
                sched.submit([long])
            a.cancel()
            b.cancel()
        run(main())
    finally:
        sched.stop()


def test_bad_requests_are_refused_before_queueing(sched, gen):
    async def main():
        with pytest.raises(ValueError, match="context"):
            sched.submit([SequenceRequest([1] * (CTX + 1))])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            sched.submit([SequenceRequest([1, 10**6])])
        with pytest.raises(ValueError, match="empty"):
            sched.submit([SequenceRequest([])])
    run(main())
    assert sched.waiting == 0 and sched.running == 0


def test_an_engine_failure_ends_that_request_and_the_scheduler_serves_on(engine, gen):
    sched = Scheduler(WrappedEngine(engine, poison=5), max_batch=2).start()
    good = [t for t in ids_of(gen, PROMPTS[1]) if t != 5]
    try:
        async def main():
            bad = sched.submit([SequenceRequest([5, 6, 7], max_tokens=3)])
            items = [out async for _, out in bad]
            ok = await collect(sched.submit([SequenceRequest(good, max_tokens=3, ignore_eos=True)]))
            return items, ok
        items, ok = run(main())
    finally:
        sched.stop()
    assert len(items) == 1 and isinstance(items[0], SchedulerError) and "injected failure" in items[0].message
    assert len(ok[0]) == 3 and sched.dead is None


def test_logprobs_are_the_log_softmax_of_the_engines_logits(sched, engine, gen):
    prompt = ids_of(gen, PROMPTS[3])
    outs = generate(sched, [SequenceRequest(prompt, max_tokens=1, logprobs=3)])
    logits = engine.forward([prompt], last_only=True)[0].astype(np.float64)
    ref = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    out = outs[0][0]
    assert out.token_id == int(np.argmax(logits))
    assert out.logprob == pytest.approx(ref[out.token_id], abs=1e-9)
    best = np.argsort(-ref, kind="stable")[:3]
    assert [t for t, _ in out.top_logprobs] == best.tolist()
    assert [lp for _, lp in out.top_logprobs] == pytest.approx(ref[best].tolist(), abs=1e-9)


def test_the_prefill_budget_keeps_a_mixed_step_near_the_factor_times_a_decode_step():
    from bitnet_train.runtime.serve.scheduler import PrefillBudget

    def step_time(n_decode, n_prompt):  # a synthetic engine: 10 ms + 2 ms a decode row + 1 ms a prompt token
        return 0.010 + 0.002 * n_decode + 0.001 * n_prompt

    b = PrefillBudget(factor=2.0, min_chunk=4, smoothing=0.5)
    assert b.chunk(7) == 4  # nothing measured yet
    for _ in range(30):
        b.observe(7, 0, step_time(7, 0))
        n = b.chunk(7)
        b.observe(7, n, step_time(7, n))
    assert b.chunk(7) == 24  # (2 - 1) * 24 ms / 1 ms
    assert step_time(7, b.chunk(7)) == pytest.approx(2 * step_time(7, 0))
    assert b.chunk(14) == 48  # an unmeasured larger batch: scaled from the nearest measured one
    assert b.chunk(3) == 24  # smaller: the nearest one's time, a conservative bound
    with pytest.raises(ValueError, match="step_time_factor"):
        PrefillBudget(factor=1.0)
