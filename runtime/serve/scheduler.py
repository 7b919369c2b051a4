"""Continuous batching over one Engine: an engine thread owns the KV-cache slots and the forward;
callers submit requests and read their tokens through asyncio. No HTTP here, no torch.

    sched = Scheduler(Engine.load("model.bitnet"), max_batch=8)
    sched.start()
    handle = sched.submit([SequenceRequest(prompt_ids, max_tokens=32, sampling=SamplingParams(seed=1))])
    async for choice, out in handle:          # inside an event loop
        print(choice, out.token_id, repr(out.text), out.finish_reason)
    handle.cancel()                            # or leave the loop: the slot is freed within one step
    sched.stop()

Every step (one `Engine.forward` with the GIL released) advances each running sequence by one
token and gives a few prompt tokens to the prompts being prefilled, oldest first (chunked
prefill), so a long prompt does not stall the running streams: PrefillBudget sizes the chunk from
measured step times so that a mixed step takes about `step_time_factor` times a decode-only step
(never more than `step_tokens` tokens in all). A step with nothing to decode prefills up to
`idle_step_tokens`. Requests join and leave at token granularity. A new
request takes the free slot whose cached tokens share the longest prefix with its prompt (a
shared system prompt, the previous turn of a chat) and prefills only the rest.

Batch invariance: every engine kernel computes each row on its own (ternary products are exact
integers; norms, attention, the dense head and sampling are per row with a fixed reduction
order), and each sequence samples from its own seeded stream (Sampler(params, stream=index)),
so a request's tokens do not depend on which others share its steps. tests/runtime/serve checks it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ...errors import BitNetError
from ..generate import Completion, PromptTooLongError, RunningSequence
from ..sampling import Sampler, SamplingParams, log_softmax
from ..tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20


class QueueFullError(BitNetError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


class SchedulerClosedError(BitNetError):
    """The scheduler is stopped (or its engine thread died) and takes no requests."""


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate (an OpenAI `choice`)."""

    prompt_ids: Sequence[int]
    max_tokens: int | None = None  # None: up to the context
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: int = 0  # the sampler's stream: choice j of a seeded request samples stream j
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k


class StepOutput(NamedTuple):
    """One generated token of one sequence."""

    token_id: int
    text: str  # the text this token completes ("" while held back or mid-character)
    logprob: float | None  # log-softmax of the model's logits (before sampling settings), when asked
    top_logprobs: list[tuple[int, float]] | None  # (token id, logprob), best first, when asked
    finish_reason: str | None  # on the last token: "eos", "stop" (a stop string) or "length"


class SchedulerError(NamedTuple):
    """Delivered instead of a StepOutput when the engine failed on this sequence's step."""

    message: str


@dataclass
class SequenceResult:
    """What a sequence produced, as it runs (RequestHandle.results): its Completion (generate.py)
    read through, plus what only the scheduler knows."""

    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from a slot's cache (prefix reuse)
    completion: Completion | None = None  # set when the sequence is queued

    @property
    def token_ids(self) -> list[int]:
        return self.completion.token_ids

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def finish_reason(self) -> str | None:
        return self.completion.finish_reason


class _Seq:
    """A sequence inside the scheduler (engine-thread state)."""

    def __init__(self, handle: "RequestHandle", choice: int, req: SequenceRequest, tokenizer, eos: set[int], ctx: int):
        """eos: the token ids that end this sequence (none with ignore_eos)."""
        self.handle, self.choice, self.req = handle, choice, req
        self.text = RunningSequence(choice, list(req.prompt_ids), Sampler(req.sampling, stream=req.stream), tokenizer,
                                    list(req.stop))
        self.eos = eos
        self.max_new = ctx if req.max_tokens is None else req.max_tokens
        self.slot: int | None = None
        self.fed = 0  # tokens of text.ids whose K/V the slot holds
        self.last_token_time = 0.0
        self.result = handle.results[choice]
        self.result.completion = self.text.out

    @property
    def prompt_len(self) -> int:
        return len(self.text.out.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.fed < self.prompt_len


_CANCELLED = object()  # queued by RequestHandle.cancel: the iteration ends


def _put_all(items) -> None:  # on the caller's event loop
    for handle, item in items:
        handle._queue.put_nowait(item)


def _post(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Hand (handle, item) pairs to their event loop in one wake-up (the engine thread's one per step,
    not one per token: fewer interruptions of the compute threads)."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the caller's loop is closed: nobody is listening
        for handle, _ in items:
            handle.cancelled = True


class RequestHandle:
    """The caller's side of a submitted request: an async iterator of (choice, StepOutput | SchedulerError).
    It ends after every choice has finished; leaving it early (or cancel()) frees the slots."""

    def __init__(self, scheduler: "Scheduler", requests: Sequence[SequenceRequest], loop: asyncio.AbstractEventLoop):
        self._scheduler = scheduler
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.results = [SequenceResult(prompt_tokens=len(r.prompt_ids)) for r in requests]
        self._open = len(requests)
        self.cancelled = False
        self.submitted = time.perf_counter()

    def _deliver(self, item) -> None:  # engine thread
        _post(self._loop, [(self, item)])

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._open == 0:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled (a client gone) or closed: give the slots back
            self.cancel()
            raise
        if item is _CANCELLED:
            self._open = 0
            raise StopAsyncIteration
        choice, out = item
        if isinstance(out, SchedulerError) or out.finish_reason is not None:
            self._open -= 1
        return choice, out

    async def aclose(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop generating: the iteration ends, the slots are freed at the start of the next step.
        Idempotent; callable from any thread."""
        if not self.cancelled and self._open:
            self.cancelled = True
            _post(self._loop, [(self, _CANCELLED)])
            self._scheduler._wake()


class PrefillBudget:
    """How many prompt tokens a step may add to n decode rows, from what steps have cost.

    Keeps an exponential average of the decode-only step time per batch size, T(n), and of the
    marginal cost of one prompt token, c, from mixed steps (their time minus T(n) of their decode
    rows, over their prompt tokens). A mixed step may then take (factor - 1) * T(n) more than a
    decode-only one: chunk = (factor - 1) * T(n) / c tokens, at least `min_chunk` so a prompt
    always progresses. Before anything is measured the chunk is `min_chunk`."""

    def __init__(self, factor: float = 2.0, min_chunk: int = 4, smoothing: float = 0.2):
        if not factor > 1:
            raise ValueError(f"step_time_factor must be > 1, got {factor!r}")
        self.factor, self.min_chunk, self.smoothing = factor, min_chunk, smoothing
        self.decode_s: dict[int, float] = {}  # n decode rows -> average seconds of a decode-only step
        self.token_s: float | None = None  # seconds one prompt token adds to a step

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def _decode_time(self, n: int) -> float | None:
        if n in self.decode_s:
            return self.decode_s[n]
        known = [k for k in self.decode_s if k > 0]
        if not known:
            return None
        near = min(known, key=lambda k: abs(k - n))  # scale the nearest measured batch size
        return self.decode_s[near] * max(n, 1) / near if n > near else self.decode_s[near]

    def observe(self, n_decode: int, n_prompt: int, seconds: float) -> None:
        if n_prompt == 0:
            if n_decode:
                self.decode_s[n_decode] = self._avg(self.decode_s.get(n_decode), seconds)
            return
        base = self._decode_time(n_decode) if n_decode else 0.0
        if base is not None:
            self.token_s = self._avg(self.token_s, max(seconds - base, 0.0) / n_prompt)

    def chunk(self, n_decode: int) -> int:
        base = self._decode_time(n_decode)
        if base is None or not self.token_s:
            return self.min_chunk
        return max(self.min_chunk, int((self.factor - 1) * base / self.token_s))


class Scheduler:
    def __init__(self, engine, tokenizer: Tokenizer | None = None, *, max_batch: int = 8, ctx: int | None = None,
                 max_queue: int = 64, step_tokens: int = 256, idle_step_tokens: int = 512,
                 step_time_factor: float = 2.0, metrics=None):
        """engine: a runtime Engine (CPU or CUDA). tokenizer: for text and stop strings (default:
        the engine's file's, or none). max_batch: concurrent sequences (KV-cache slots); ctx: tokens
        per slot (default: the model's context); max_queue: sequences waiting for a slot beyond which
        submit raises QueueFullError; step_tokens: at most this many tokens in a step while sequences
        decode (one each, the rest prefill); step_time_factor: a step that prefills while sequences
        decode should take about this many times a decode-only step (PrefillBudget);
        idle_step_tokens: prefill tokens of a step with nothing to decode.
        metrics: an object with observe_* methods (serve/metrics.py) or None."""
        if tokenizer is None and getattr(engine, "tokenizer_json", None):
            tokenizer = Tokenizer.from_model_file(engine)
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("step_tokens", step_tokens, 1),
                            ("idle_step_tokens", idle_step_tokens, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        ctx = engine.max_seq_len if ctx is None else ctx
        if isinstance(ctx, bool) or not isinstance(ctx, int) or not 1 <= ctx <= engine.max_seq_len:
            raise ValueError(f"ctx must be an integer in [1, {engine.max_seq_len}] (the model's context), got {ctx!r}")
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.max_batch, self.ctx, self.max_queue = max_batch, ctx, max_queue
        self.step_tokens, self.idle_step_tokens = max(step_tokens, max_batch + 1), idle_step_tokens
        self.budget = PrefillBudget(step_time_factor)
        self.cache = engine.new_cache(max_batch, ctx)
        self.vocab_size = engine.vocab_size
        self._eos = set(tokenizer.eos_ids) if tokenizer is not None else set()
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # what each slot's cache holds
        self._slot_used = [0.0] * max_batch  # last use, for least-recently-used choice
        self._free = set(range(max_batch))
        self._running: list[_Seq] = []  # hold a slot: prefilling or decoding, in admission order
        self._waiting: deque[_Seq] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: str | None = None  # why the engine thread died, if it did
        self.steps = 0
        self.reused_tokens = 0  # prompt tokens taken from a slot's cache, over all requests

    # ---- caller side (any thread; submit needs a running event loop) -------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def slots_used(self) -> int:
        return self.max_batch - len(self._free)

    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bitnet-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the step in flight, end every request with SchedulerError, stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self, req: SequenceRequest) -> None:
        """Raise PromptTooLongError / ValueError for a request this scheduler cannot run."""
        ids = req.prompt_ids
        if len(ids) == 0:
            raise ValueError("the prompt is empty")
        if len(ids) > self.ctx:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens; the context is {self.ctx} tokens")
        bad = next((t for t in ids if not 0 <= int(t) < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"the prompt has token id {bad} outside the vocabulary [0, {self.vocab_size})")
        if req.max_tokens is not None and (isinstance(req.max_tokens, bool) or req.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.logprobs}")
        if req.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; the model file has none")

    def submit(self, requests: Sequence[SequenceRequest]) -> RequestHandle:
        """Queue sequences (the choices of one request); raises QueueFullError when the waiting queue
        cannot take them, SchedulerClosedError when stopped, ValueError for a bad request."""
        if not requests:
            raise ValueError("no sequences to generate")
        for r in requests:
            self.check(r)
        handle = RequestHandle(self, requests, asyncio.get_running_loop())
        with self._cond:
            if self._stopping or self.dead:
                raise SchedulerClosedError(f"the engine is not running{': ' + self.dead if self.dead else ''}")
            if len(self._waiting) + len(requests) - len(self._free) > self.max_queue:  # waiting once slots are taken
                raise QueueFullError(f"the server is busy: {len(self._waiting)} sequences are waiting (at most "
                                     f"{self.max_queue}); retry later")
            for i, r in enumerate(requests):
                eos = set() if r.ignore_eos else self._eos | {int(t) for t in r.stop_token_ids}
                self._waiting.append(_Seq(handle, i, r, self.tokenizer, eos, self.ctx))
            self._cond.notify_all()
        return handle

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- engine thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._running and not self._waiting:
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._drop_cancelled()
                    self._admit()
                if self._running:
                    self._step()
        except BaseException as e:  # a bug, not a request: say so to everyone and take no more work
            self.dead = f"{type(e).__name__}: {e}"
        finally:
            with self._cond:
                self._stopping = True
                for s in list(self._running) + list(self._waiting):
                    s.handle._deliver((s.choice, SchedulerError(self.dead or "the server is shutting down")))
                self._running.clear()
                self._waiting.clear()

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._running if s.handle.cancelled]:
            self._release(s, "cancelled")
        if any(s.handle.cancelled for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.handle.cancelled)

    def _admit(self) -> None:
        while self._waiting and self._free:
            s = self._waiting.popleft()
            slot, reuse = self._choose_slot(s.text.ids)
            self._free.discard(slot)
            if reuse:
                self.cache.truncate(slot, reuse)
            else:
                self.cache.reset(slot)
            self._slot_tokens[slot] = self._slot_tokens[slot][:reuse]
            s.slot, s.fed = slot, reuse
            s.result.cached_tokens = reuse
            self.reused_tokens += reuse
            self._running.append(s)
            if self.metrics is not None:
                self.metrics.observe_admitted(s.prompt_len, reuse, time.perf_counter() - s.handle.submitted)

    def _choose_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot sharing the longest prefix with the prompt (at most len - 1 tokens, so one is
        fed and gives logits), ties and misses to the least recently used; and that prefix's length."""
        best, best_len = None, -1
        for slot in sorted(self._free, key=lambda i: self._slot_used[i]):
            held = self._slot_tokens[slot]
            n = 0
            limit = min(len(held), len(prompt) - 1)
            while n < limit and held[n] == prompt[n]:
                n += 1
            if n > best_len:
                best, best_len = slot, n
        return best, best_len

    def _release(self, s: _Seq, reason: str) -> None:
        self._running.remove(s)
        self._free.add(s.slot)
        self._slot_used[s.slot] = time.perf_counter()
        if self.metrics is not None:
            self.metrics.observe_finished(reason)

    def _step(self) -> None:
        decode = [s for s in self._running if not s.prefilling]
        if decode:
            budget = min(self.step_tokens - len(decode), self.budget.chunk(len(decode)))
        else:
            budget = self.idle_step_tokens
        rows, seqs = [], []
        for s in decode:
            rows.append([s.text.ids[-1]])
            seqs.append(s)
        for s in self._running:
            if budget <= 0:
                break
            if s.prefilling:
                n = min(budget, s.prompt_len - s.fed)
                rows.append(s.text.ids[s.fed:s.fed + n])
                seqs.append(s)
                budget -= n
        t0 = time.perf_counter()
        try:
            logits = self.engine.forward(rows, cache=self.cache, seq_ids=[s.slot for s in seqs], last_only=True)
        except Exception as e:  # noqa: BLE001 - the request's failure, not the server's
            for s in seqs:
                self._slot_tokens[s.slot] = []
                self.cache.reset(s.slot)
                s.handle._deliver((s.choice, SchedulerError(f"the engine failed on this request: {e}")))
                self._release(s, "error")
            return
        now = time.perf_counter()
        self.steps += 1
        fed = sum(len(r) for r in rows)
        self.budget.observe(len(decode), fed - len(decode), now - t0)
        if self.metrics is not None:
            self.metrics.observe_step(now - t0, fed)
        outbox: dict[asyncio.AbstractEventLoop, list] = {}
        for row, (s, fed) in enumerate(zip(seqs, rows)):
            s.fed += len(fed)
            self._slot_tokens[s.slot].extend(fed)
            if s.prefilling:
                continue
            item = self._emit(s, logits[row], now)
            if item is not None:
                outbox.setdefault(s.handle._loop, []).append((s.handle, item))
        for loop, items in outbox.items():
            _post(loop, items)

    def _emit(self, s: _Seq, logits: np.ndarray, now: float):
        """Sample s's next token; returns what to deliver to its handle (None when cancelled)."""
        out = s.text.out
        if s.handle.cancelled:
            return None  # dropped at the next step's start
        tok = s.text.sampler.sample(logits, s.text.ids, out.token_ids)
        at_limit = len(out.token_ids) + 1 >= s.max_new or len(s.text.ids) + 1 > self.ctx
        delta = s.text.add(tok, tok in s.eos, at_limit)
        logprob = top = None
        if s.req.logprobs is not None:
            lp = log_softmax(logits)
            logprob = float(lp[tok])
            top = []
            if s.req.logprobs:
                k = s.req.logprobs
                idx = np.argpartition(-lp, k - 1)[:k] if k < lp.size else np.arange(lp.size)
                idx = idx[np.lexsort((idx, -lp[idx]))]  # best first, lower id first on ties
                top = [(int(i), float(lp[i])) for i in idx]
        if self.metrics is not None:
            if len(out.token_ids) == 1:
                self.metrics.observe_first_token(now - s.handle.submitted)
            else:
                self.metrics.observe_token_gap(now - s.last_token_time)
        s.last_token_time = now
        if out.finish_reason is not None:
            self._release(s, out.finish_reason)
        return s.choice, StepOutput(tok, delta, logprob, top, out.finish_reason)

