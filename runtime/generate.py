"""Text generation over an Engine: ragged batches, streaming, stop strings, EOS. No torch.

    gen = Generator(Engine.load("model.bitnet"))            # tokenizer from the file
    for index, token_id, text in gen.stream(["Once upon", "To be"], max_new_tokens=32):
        print(index, repr(text))                             # as each token is produced
    done = gen.generate(["Once upon"], sampling=SamplingParams(temperature=0.8, seed=1), stop=["\\n\\n"])
    done[0].text, done[0].finish_reason                      # "eos" | "stop" | "length"

All prompts share one KV cache with one slot each: one ragged prefill, then one decode step per
token for every sequence still running. Each sequence samples from its own seeded stream
(Sampler(params, stream=prompt index)), so a batch gives each prompt the tokens it gets alone.
Text is decoded incrementally (IncrementalDecoder): a character split over several byte tokens
appears once it is complete; text that may be the start of a stop string is held back until it
is known not to be one, and the stop string itself is never emitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import BitNetError
from .sampling import Sampler, SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer, TokenizerError


class PromptTooLongError(BitNetError, ValueError):
    """A prompt that does not fit the model's context."""


class TokenEvent(NamedTuple):
    index: int  # which prompt
    token_id: int
    text: str  # the text this token completes ("" while held back or mid-character)


@dataclass
class Completion:
    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids, EOS included when it ended the run
    text: str = ""  # generated text, special tokens skipped, cut before a stop string
    finish_reason: str | None = None  # "eos", "stop" (a stop string) or "length" (max_new_tokens or context)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # time of the decode steps (all sequences of a step together)
    decode_tokens: int = 0  # tokens fed by decode steps (the first token of each sequence comes from prefill)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
            "prefill_tok_s": round(self.prompt_tokens / self.prefill_s, 2) if self.prefill_s else None,
            "decode_tok_s": round(self.decode_tokens / self.decode_s, 2) if self.decode_s else None,
        }


class RunningSequence:
    """One prompt's running state: its ids, sampler, incremental text and stop strings (the Generator's
    and the server's scheduler's)."""

    def __init__(self, index: int, prompt_ids: list[int], sampler: Sampler, tokenizer: Tokenizer | None,
                 stop: Sequence[str]):
        self.out = Completion(index, prompt_ids)
        self.ids = list(prompt_ids)  # prompt + generated: the repetition penalty's context
        self.sampler = sampler
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids) if tokenizer is not None else None
        self.stop = stop
        self.text = ""  # decoded so far (may run past the emitted part)
        self.emitted = 0  # chars of self.text already handed out

    def add(self, token_id: int, is_eos: bool, at_limit: bool) -> str:
        """Append a sampled token; returns the text delta to emit and sets finish_reason when done."""
        out = self.out
        out.token_ids.append(token_id)
        self.ids.append(token_id)
        if self.decoder is None:
            if is_eos or at_limit:
                out.finish_reason = "eos" if is_eos else "length"
            return ""
        searched = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        if not is_eos:
            self.text += self.decoder.push(token_id)
        if is_eos or at_limit:
            self.text += self.decoder.flush()
        hit = min((i for s in self.stop if (i := self.text.find(s, searched)) >= 0), default=None)
        if hit is not None:
            self.text = self.text[:hit]
            out.finish_reason = "stop"
        elif is_eos or at_limit:
            out.finish_reason = "eos" if is_eos else "length"
        end = len(self.text) if out.finish_reason else len(self.text) - self._held_back()
        delta = self.text[self.emitted:end]
        self.emitted = end
        out.text = self.text[:end] if not out.finish_reason else self.text
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held


class GenerationStream:
    """Iterator of TokenEvent; `completions` (one per prompt, in prompt order) and `stats` fill as it runs."""

    def __init__(self, events: Iterator[TokenEvent], completions: list[Completion], stats: GenerationStats):
        self._events = events
        self.completions = completions
        self.stats = stats

    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def run(self) -> list[Completion]:
        for _ in self._events:
            pass
        return self.completions


class Generator:
    def __init__(self, engine, tokenizer: Tokenizer | None = None):
        """engine: a runtime Engine. tokenizer: default from the engine's file (None if it has none:
        then prompts must be token ids and no text is produced)."""
        self.engine = engine
        if tokenizer is None and getattr(engine, "tokenizer_json", None):
            tokenizer = Tokenizer.from_model_file(engine)
        self.tokenizer = tokenizer

    def encode_prompt(self, prompt: str | Sequence[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenizerError("the model file has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = [int(i) for i in np.asarray(prompt, dtype=np.int64).reshape(-1)]
        if not ids and self.tokenizer is not None and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]
        return ids

    def stream(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        add_special_tokens: bool = True,
        on_token: Callable[[TokenEvent], None] | None = None,
        cache=None,
    ) -> GenerationStream:
        """Start generating for one prompt (a string or a list of ids) or several; nothing runs until
        the stream is iterated. Raises PromptTooLongError / ValueError before any work.

        cache: a KVCache to continue (prompt i in slot i) instead of a fresh one: slot i must hold
        the first cache.length(i) tokens of prompt i (fewer than all of them), which are not fed
        again; afterwards it holds prompt + generated tokens but the last. ChatSession uses this."""
        if isinstance(prompts, str) or (isinstance(prompts, np.ndarray) and prompts.ndim == 1) or (
                len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        sampling = sampling or SamplingParams()
        stop = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        if stop and self.tokenizer is None:
            raise TokenizerError("stop strings need a tokenizer; the model file has none")
        ctx, vocab = self.engine.max_seq_len, self.engine.vocab_size
        encoded = [self.encode_prompt(p, add_special_tokens) for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i} is empty (and the tokenizer has no bos token to start from)")
            if len(ids) > ctx:
                raise PromptTooLongError(f"prompt {i} has {len(ids)} tokens; the model's context is {ctx} tokens")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
        if cache is not None:
            if cache.n_seqs < len(encoded):
                raise ValueError(f"the cache has {cache.n_seqs} slots for {len(encoded)} prompts")
            for i, ids in enumerate(encoded):
                if cache.length(i) >= len(ids):
                    raise ValueError(f"cache slot {i} holds {cache.length(i)} tokens; prompt {i} has only {len(ids)}")
        eos = set() if ignore_eos else set(self.tokenizer.eos_ids if self.tokenizer else ()) | set(stop_token_ids)
        seqs = [RunningSequence(i, ids, Sampler(sampling, stream=i), self.tokenizer, stop) for i, ids in enumerate(encoded)]
        stats = GenerationStats(prompt_tokens=sum(len(ids) for ids in encoded))
        events = self._run(seqs, int(max_new_tokens), eos, stats, on_token, cache)
        return GenerationStream(events, [s.out for s in seqs], stats)

    def generate(self, prompts, **kwargs) -> list[Completion]:
        """Like `stream`, run to the end: one Completion per prompt, in prompt order."""
        return self.stream(prompts, **kwargs).run()

    def _run(self, seqs: list[RunningSequence], max_new: int, eos: set[int], stats: GenerationStats,
             on_token: Callable[[TokenEvent], None] | None, cache) -> Iterator[TokenEvent]:
        eng = self.engine
        if cache is None:
            # the last sampled token is never fed, so a sequence needs room for prompt + max_new - 1 tokens
            max_len = min(eng.max_seq_len, max(len(s.ids) for s in seqs) + max_new - 1)
            cache = eng.new_cache(len(seqs), max_len)
        max_len = cache.max_len
        t0 = time.perf_counter()
        new = [s.ids[cache.length(i):] for i, s in enumerate(seqs)]
        stats.prompt_tokens = sum(len(t) for t in new)  # tokens actually prefilled
        logits = eng.forward(new, cache=cache, last_only=True)  # (B, vocab)
        stats.prefill_s = time.perf_counter() - t0
        live = list(range(len(seqs)))
        while True:
            feed = []
            for row, i in enumerate(live):
                s = seqs[i]
                tok = s.sampler.sample(logits[row], s.ids, s.out.token_ids)
                at_limit = len(s.out.token_ids) + 1 >= max_new or len(s.ids) + 1 > max_len
                delta = s.add(tok, tok in eos, at_limit)
                stats.generated_tokens += 1
                event = TokenEvent(i, tok, delta)
                if on_token is not None:
                    on_token(event)
                yield event
                if s.out.finish_reason is None:
                    feed.append(i)
            if not feed:
                return
            t0 = time.perf_counter()
            logits = eng.forward([[seqs[i].ids[-1]] for i in feed], cache=cache, seq_ids=feed, last_only=True)
            stats.decode_s += time.perf_counter() - t0
            stats.decode_tokens += len(feed)
            live = feed
