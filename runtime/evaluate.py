"""Perplexity of a token stream with strided windows of the model's context. numpy only.

    res = perplexity(engine, ids, window=256, stride=128, progress=lambda done, total: ...)
    res.ppl, res.nll, res.top1, res.tokens

Windows start every `stride` tokens and span `window` tokens (the last one ends at the stream's
end). Each token is scored once, in the first window that predicts it, so a token after the first
window sees at least `window - stride` tokens of context (stride == window: disjoint windows; the
first token of each window is then not scored, as it has no context).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PerplexityResult:
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood, nats/token
    ppl: float  # exp(nll)
    top1: float  # fraction of scored tokens that were the argmax prediction
    windows: int
    window: int
    stride: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) of each window over n tokens; targets [first, end) are scored."""
    out, prev_end, begin = [], 1, 0
    while True:
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end >= n:
            return out
        begin += stride


_SCORE_ROWS = 32  # rows of logits scored at a time (32 x 49152 doubles = 12.6 MB)


def perplexity(
    engine,
    ids: Sequence[int] | np.ndarray,
    window: int | None = None,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """ids: the token stream. window: default (and at most) the model's context; stride: default window // 2.
    progress(tokens scored so far, tokens to score) after each window."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ctx = engine.max_seq_len
    window = ctx if window is None else int(window)
    if not 2 <= window <= ctx:
        raise ValueError(f"window must be in [2, {ctx}] (the model's context), got {window}")
    stride = max(window // 2, 1) if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window = {window}], got {stride}")
    if ids.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.size}")
    spans = windows(ids.size, window, stride)
    total = sum(end - first for _, end, first in spans)
    nll_sum, correct, scored = 0.0, 0, 0
    t0 = time.perf_counter()
    for begin, end, first in spans:
        if first >= end:
            continue
        logits = engine.forward(ids[begin:end])  # (T, vocab) float32
        pred = logits[first - 1 - begin:end - 1 - begin]  # rows predicting targets [first, end)
        targets = ids[first:end]
        # float64 log-softmax in chunks of rows: a whole window at once makes several temporaries of
        # T x vocab doubles (hundreds of MB each), and the page faults of that fresh memory cost more
        # than the arithmetic (a quarter of the eval time in perf)
        for c in range(0, len(targets), _SCORE_ROWS):
            p = pred[c:c + _SCORE_ROWS].astype(np.float64)
            t = targets[c:c + _SCORE_ROWS]
            m = p.max(-1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(p - m).sum(-1))
            nll_sum += float((lse - p[np.arange(len(t)), t]).sum())
            correct += int((p.argmax(-1) == t).sum())
        scored += len(targets)
        if progress is not None:
            progress(scored, total)
    nll = nll_sum / scored
    return PerplexityResult(tokens=scored, nll=nll, ppl=math.exp(nll), top1=correct / scored, windows=len(spans),
                            window=window, stride=stride, seconds=time.perf_counter() - t0)


class DatasetError(ValueError):
    """A dataset that cannot be read for evaluation: the message names the problem."""


def dataset_text(
    name: str,
    *,
    config: str | None = None,
    split: str = "test",
    column: str = "text",
    data_files: Sequence[str] | None = None,
    max_documents: int | None = None,
    separator: str = "\n\n",
) -> str:
    """The documents of a Hugging Face dataset split joined by `separator`, for perplexity.

    name: a Hub dataset ("wikitext" with config "wikitext-2-raw-v1"), a directory written by
    `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a file builder ("json", "parquet", "csv",
    "text") with data_files. Needs the `datasets` package (pip install datasets; the runtime itself
    does not). Offline, Hub names work only from the local cache."""
    try:
        import datasets
    except ImportError as error:
        raise DatasetError("--dataset needs the 'datasets' package (pip install datasets)") from error
    if max_documents is not None and max_documents < 1:
        raise DatasetError(f"max_documents must be >= 1, got {max_documents}")
    from pathlib import Path

    where = f"dataset {name!r}" + (f" ({config})" if config else "")
    try:
        if Path(name).is_dir() and not data_files:
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetError(f"{where} has no split {split!r}; it has {sorted(ds)}")
                ds = ds[split]
        else:
            files = list(data_files) if data_files else None
            if files:
                missing = [f for f in files if not Path(f).is_file()]
                if missing:
                    raise DatasetError(f"data file {missing[0]} does not exist")
            ds = datasets.load_dataset(name, config, data_files=files, split=split)
    except DatasetError:
        raise
    except ValueError as error:  # unknown split and similar: the library's message names it
        raise DatasetError(f"cannot load {where} split {split!r}: {error}") from error
    except Exception as error:  # network, not found, offline, bad files: many types
        offline = " (Hugging Face offline mode is on)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DatasetError(f"cannot load {where} split {split!r}{offline}: {type(error).__name__}: {error}") from error
    if column not in ds.column_names:
        raise DatasetError(f"{where} has no column {column!r}; its columns are {ds.column_names}")
    if max_documents is not None:
        ds = ds.select(range(min(max_documents, len(ds))))
    docs = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    if not docs:
        raise DatasetError(f"{where} split {split!r} has no non-empty text in column {column!r}")
    return separator.join(docs)
