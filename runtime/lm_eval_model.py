"""lm-evaluation-harness's `bitnet` model type: our runtime on a .bitnet file (no torch in the forward).

    bitnet-run lm-eval --model bitnet --model_args pretrained=model.bitnet --tasks TASK [--include_path DIR]
    import lm_eval; from bitnet_train.runtime.lm_eval_model import BitNetEvalLM
    lm_eval.simple_evaluate(model=BitNetEvalLM("model.bitnet"), tasks=[...])       # or model="bitnet"

model_args: pretrained (the file), batch_size (sequences per engine call, default 8), threads, isa,
lm_head (fp|int8), kv_cache (f32|f16), max_length (default: the model's context), max_gen_toks (256).

- loglikelihood: context + continuation tokenized together (lm-eval's TemplateLM does the split),
  left-truncated to the context; the log-softmax of the engine's logits summed over the continuation,
  and whether greedy decoding would have produced it; requests go to the engine as ragged batches.
- loglikelihood_rolling: lm-eval's rolling windows (each token predicted once, with the longest context
  the model takes), the first conditioned on the eos token.
- generate_until: greedy (or the request's temperature/top_k/top_p/seed), stopping at `until` strings,
  batched through Generator.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401 - lm-eval's own model types first: its registry loads them only while empty
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .engine import Engine
from .generate import Generator
from .sampling import SamplingParams, log_softmax
from .tokenizer import Tokenizer


@register_model("bitnet")
class BitNetEvalLM(TemplateLM):
    def __init__(self, pretrained: str, batch_size: int | str = 8, threads: int | None = None, isa: str | None = None,
                 lm_head: str = "fp", kv_cache: str = "f32", max_length: int | None = None, max_gen_toks: int = 256,
                 **unused):
        super().__init__()
        self.engine = Engine.load(pretrained, threads=None if threads is None else int(threads), isa=isa,
                                  lm_head=lm_head, kv_cache=kv_cache)
        self.tok = Tokenizer.from_model_file(self.engine)
        self.gen = Generator(self.engine, self.tok)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length) if max_length else self.engine.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        eos = sorted(self.tok.eos_ids)
        self._eot = eos[0] if eos else (self.tok.bos_id if self.tok.bos_id is not None else 0)

    # ---- tokenization (TemplateLM) ----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    # ---- scoring ----------------------------------------------------------------------------------

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of the continuation's log-probabilities, greedy?).
        Ragged batches of up to self.batch_size sequences (and ~512 MiB of logits); each batch first
        prefills the contexts (last-token logits only), then feeds the continuations with every
        row's logits: the same numbers as one pass (the engine is batch- and chunk-invariant)."""
        out: list[tuple[float, bool]] = []
        budget_rows = max(1, (512 << 20) // (4 * self.engine.vocab_size))
        i = 0
        while i < len(pairs):
            batch, rows = [], 0
            while i < len(pairs) and len(batch) < self.batch_size:
                ctx, cont = pairs[i]
                if not cont:
                    raise ValueError("a continuation with no tokens")
                full = (list(ctx) + list(cont))[-(self.max_length + 1):]
                n = len(cont)
                if batch and rows + n > budget_rows:
                    break
                batch.append((full[:-1], n, full[-n:]))
                rows += n
                i += 1
            cache = self.engine.new_cache(len(batch), max(len(inp) for inp, _, _ in batch))
            heads = [(k, inp[:len(inp) - n]) for k, (inp, n, _) in enumerate(batch) if len(inp) > n]
            if heads:
                self.engine.forward([h for _, h in heads], cache=cache, seq_ids=[k for k, _ in heads], last_only=True)
            tails = [inp[len(inp) - n:] for inp, n, _ in batch]
            logits = self.engine.forward(tails, cache=cache, last_only=False)
            if isinstance(logits, np.ndarray):  # rectangular: (B, T, vocab)
                logits = list(logits)
            for lg, (_, n, cont) in zip(logits, batch):
                lp = log_softmax(lg)
                out.append((float(lp[np.arange(n), cont].sum()), bool((lp.argmax(axis=-1) == np.asarray(cont)).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (text,) in [r.args for r in requests]:
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(lp for lp, _ in self._score(windows)))
        return out

    # ---- generation -------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings go through Generator together, batch_size at a time."""
        jobs = []
        for context, kwargs in [r.args for r in requests]:
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = tuple(u for u in ([until] if isinstance(until, str) else until) if u)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False)) or float(kwargs.get("temperature", 0) or 0) > 0
            params = SamplingParams(temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                                    top_k=int(kwargs.get("top_k", 0) or 0), top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                                    seed=kwargs.get("seed"))
            ids = self.tok_encode(context)[-(self.max_length - 1):] or [self._eot]
            jobs.append((ids, min(max_new, self.max_length - len(ids) + 1), until, params))
        out: list[str | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for k, (_, max_new, until, params) in enumerate(jobs):
            groups.setdefault((max_new, until, params), []).append(k)
        for (max_new, until, params), members in groups.items():
            for b in range(0, len(members), self.batch_size):
                part = members[b:b + self.batch_size]
                done = self.gen.generate([jobs[k][0] for k in part], max_new_tokens=max(1, max_new), sampling=params,
                                         stop=list(until))
                for k, c in zip(part, done):
                    out[k] = c.text
        return out
