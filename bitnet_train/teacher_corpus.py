"""A corpus written by the full-precision teacher, to keep the student's general ability.

Data-free QAT (LLM-QAT, Liu et al. 2023; OneBit, Xu et al. 2024): with no general-domain data on
the machine, the teacher samples its own text, and the student trains on it beside the task text
(`data.teacher_corpus.fraction` of the training blocks, data.MixedBlocks).

Sampling: batch j takes one prompt, prefills it once (KV cache, model.KVCache) and samples
`batch_size` continuations from it, each row with its own (temperature, top-p) from the settings
grid, until a special token (eos, and any other) or `max_new_tokens`. Prompts are of three kinds,
drawn with the weights of `prompt_kinds`:
  text   a short English prompt from texts/teacher_prompts.json, continued as plain text;
  chat   a user request from the same file, through the tokenizer's chat template;
  start  a document start alone (the tokenizer's bos, else its eos): unconditioned text.
Each batch draws from its own seeded generators (seed, j), so a corpus of N batches is the first N
batches of any longer one. A document is the prompt's ids (none for "start") and the continuation,
without the stopping token; the stream is doc₀ eos doc₁ eos … like data.token_stream.

Cache: <dir>/<key>/manifest.json and tokens-<sha>.npy (int32 stream). The key hashes the teacher's
weights (distill.model_fingerprint), the tokenizer, every generation setting, the prompt file and
GENERATOR_VERSION; a manifest that does not match is refused with the field named, never reused.
A request for more tokens than cached extends the corpus (same key, later batches). Writes go to a
temporary file renamed into place; the manifest, written last, names the tokens file it belongs to.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_file, atomic_write_text
from .errors import DataError
from .model import BitNetModel, KVCache

FORMAT = "bitnet_train.teacher_corpus/1"
GENERATOR_VERSION = 1  # bump when the sampling code changes what a seed produces
PROMPTS_FILE = Path(__file__).resolve().parent / "texts" / "teacher_prompts.json"
PROMPT_KINDS = ("text", "chat", "start")
# fields of TeacherCorpusConfig that decide what is generated (the rest: how much, where, how often used)
GENERATION_FIELDS = ("seed", "batch_size", "max_new_tokens", "temperatures", "top_p", "prompt_kinds", "dtype")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TeacherCorpusConfig:
    fraction: float = 0.0  # share of the training blocks taken from the teacher corpus; 0: off
    tokens: int = 200_000  # tokens to generate (cached); cycled when the fraction asks for more blocks
    dir: str | None = None  # cache root; None: <data.cache_dir>/teacher_corpus (no cache without both)
    seed: int = 0
    batch_size: int = 32  # continuations sampled together from one prompt (one prefill)
    max_new_tokens: int = 256
    temperatures: list[float] = field(default_factory=lambda: [0.7, 0.9, 1.1])
    top_p: list[float] = field(default_factory=lambda: [0.9, 0.95])
    prompt_kinds: dict[str, float] = field(default_factory=lambda: {"text": 0.4, "chat": 0.4, "start": 0.2})
    # the teacher's dtype while it writes (a copy when it differs from distill.teacher_dtype); bfloat16
    # is about 2x faster on a CPU with native bf16 (AVX-512 BF16, AMX), much slower on one without
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.temperatures, self.top_p = [float(t) for t in self.temperatures], [float(p) for p in self.top_p]
        self.prompt_kinds = {str(k): float(v) for k, v in dict(self.prompt_kinds).items()}
        where = "data.teacher_corpus"
        if not 0.0 <= self.fraction < 1.0:
            raise DataError(f"{where}.fraction must be in [0, 1), got {self.fraction}")
        for name in ("tokens", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise DataError(f"{where}.{name} must be a positive integer, got {getattr(self, name)}")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise DataError(f"{where}.temperatures must be a non-empty list of values > 0, got {self.temperatures}")
        if not self.top_p or any(not 0 < p <= 1 for p in self.top_p):
            raise DataError(f"{where}.top_p must be a non-empty list of values in (0, 1], got {self.top_p}")
        if self.dtype not in DTYPES:
            raise DataError(f"{where}.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        bad = sorted(set(self.prompt_kinds) - set(PROMPT_KINDS))
        if bad or any(w < 0 for w in self.prompt_kinds.values()) or sum(self.prompt_kinds.values()) <= 0:
            raise DataError(f"{where}.prompt_kinds must map some of {list(PROMPT_KINDS)} to weights >= 0 "
                            f"(not all 0), got {self.prompt_kinds}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "TeacherCorpusConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise DataError(f"unknown data.teacher_corpus keys: {sorted(unknown)}")
        return cls(**d)

    def generation_settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in GENERATION_FIELDS}


def load_prompts(path: Path = PROMPTS_FILE) -> dict[str, list[str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {"text": list(data["text"]), "chat": list(data["chat"])}


def prompts_hash(prompts: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:20]


def tokenizer_identity(tokenizer: Any) -> str:
    """The tokenizer's vocabulary, merges, special tokens and chat template, hashed."""
    state = (tokenizer.backend_tokenizer.to_str() + f"|eos={tokenizer.eos_token_id}|bos={tokenizer.bos_token_id}"
             + f"|chat={getattr(tokenizer, 'chat_template', None)}")
    return hashlib.sha256(state.encode()).hexdigest()[:20]


def corpus_key(teacher: str, tokenizer: str, settings: dict, prompts: str) -> str:
    ident = {"format": FORMAT, "generator": GENERATOR_VERSION, "teacher": teacher, "tokenizer": tokenizer,
             "settings": settings, "prompts": prompts}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


# -- sampling --------------------------------------------------------------------------------------

CANDIDATE_TIERS = (128, 2048)  # sample_next: top-k widths tried before a full sort of the vocabulary


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """One token per row: softmax(logits / T) restricted to the smallest set of most likely tokens
    whose mass reaches top_p (nucleus sampling), drawn by inverse CDF with one uniform per row.
    logits (B, V); temperature, top_p (B, 1) -> (B,) int64.

    A row's nucleus is looked for among its 128 most likely tokens, then 2048, then the whole sorted
    vocabulary: a full sort of 49152 logits costs ~3 ms a row on one core, a third of a decode step,
    and most nuclei are small. The result does not depend on the tier that found it."""
    probs = F.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)  # (B, 1)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    for k in (*CANDIDATE_TIERS, probs.shape[-1]):
        k = min(k, probs.shape[-1])
        p, order = probs[rows].topk(k, dim=-1) if k < probs.shape[-1] else probs[rows].sort(dim=-1, descending=True)
        cum = p.cumsum(-1)  # (b, k)
        found = cum[:, -1] >= top_p[rows, 0] if k < probs.shape[-1] else torch.ones_like(rows, dtype=torch.bool)
        if bool(found.any()):
            pf, cf, of, tp = p[found], cum[found], order[found], top_p[rows[found]]
            kept = (cf - pf) < tp  # the first token is always kept; the rest while the mass before is < top_p
            c = (pf * kept).cumsum(-1)  # (f, k)
            target = u[rows[found]] * c[:, -1:]
            idx = torch.searchsorted(c, target, right=True).clamp_(max=k - 1)
            idx = torch.minimum(idx, kept.sum(-1, keepdim=True) - 1)  # float edge: stay inside the nucleus
            out[rows[found]] = of.gather(-1, idx).squeeze(-1)
        rows = rows[~found]
        if rows.numel() == 0:
            break
    return out


@torch.no_grad()
def sample_continuations(model: BitNetModel, prompt: list[int], temperature: list[float], top_p: list[float],
                         max_new_tokens: int, stop_ids: set[int], generator: torch.Generator,
                         vocab: int | None = None) -> list[list[int]]:
    """len(temperature) continuations of one prompt, each cut before its first stop token.

    The prompt is prefilled once and its KV cache repeated per row; a row that stops leaves the batch.
    vocab: sample only ids below it (the tokenizer's length, when the model's vocabulary is padded)."""
    rows = len(temperature)
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    cache = KVCache(model.config, 1, max_len=len(prompt) + max_new_tokens, dtype=dtype, device=device)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[:, -1, :vocab]  # (1, V)
    cache = cache.repeat_rows(rows)
    logits = logits.expand(rows, -1)
    temp = torch.tensor(temperature, device=device).unsqueeze(1)  # (B, 1)
    nucleus = torch.tensor(top_p, device=device).unsqueeze(1)
    stop = torch.tensor(sorted(stop_ids), device=device)
    active = torch.arange(rows, device=device)  # original row of each batch row
    out: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temp, nucleus, generator)  # (b,)
        stopped = torch.isin(nxt, stop)
        for r, t, s in zip(active.tolist(), nxt.tolist(), stopped.tolist()):
            if not s:
                out[r].append(t)
        if step == max_new_tokens - 1 or bool(stopped.all()):
            break
        if bool(stopped.any()):
            keep = (~stopped).nonzero().squeeze(1)
            cache.keep_rows(keep)
            active, nxt, temp, nucleus = active[keep], nxt[keep], temp[keep], nucleus[keep]
        logits = model(nxt.unsqueeze(1), cache=cache)[:, -1, :vocab]
    return out


class Prompter:
    """The prompt of batch j and its rows' (temperature, top-p): a function of (seed, j) only."""

    def __init__(self, tokenizer: Any, cfg: TeacherCorpusConfig, prompts: dict[str, list[str]]):
        self.tokenizer, self.cfg, self.prompts = tokenizer, cfg, prompts
        kinds = [k for k in PROMPT_KINDS if cfg.prompt_kinds.get(k, 0) > 0]
        weights = np.array([cfg.prompt_kinds[k] for k in kinds])
        self.kinds, self.weights = kinds, weights / weights.sum()
        if "chat" in kinds and not getattr(tokenizer, "chat_template", None):
            raise DataError("data.teacher_corpus.prompt_kinds has 'chat' but the teacher's tokenizer has no chat "
                            "template; set data.teacher_corpus.prompt_kinds={text: 0.7, start: 0.3} (no chat)")
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise DataError("the teacher's tokenizer has neither a bos nor an eos token to start a document with")
        self.start_id = start
        self.grid = [(t, p) for t in cfg.temperatures for p in cfg.top_p]

    def batch(self, j: int) -> tuple[str, list[int], bool, list[float], list[float]]:
        """-> (kind, prompt ids, whether the document keeps them, temperatures, top-ps) of batch j."""
        rng = np.random.default_rng([self.cfg.seed, j])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.weights))]
        if kind == "start":
            ids, keep = [self.start_id], False
        else:
            text = self.prompts[kind][int(rng.integers(len(self.prompts[kind])))]
            if kind == "chat":
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, tokenize=False)
            ids, keep = self.tokenizer(text, add_special_tokens=False)["input_ids"], True
        offset = int(rng.integers(len(self.grid)))  # rows walk the grid from a random place
        rows = [self.grid[(offset + r) % len(self.grid)] for r in range(self.cfg.batch_size)]
        return kind, ids, keep, [t for t, _ in rows], [p for _, p in rows]


def generate_batches(model: BitNetModel, tokenizer: Any, cfg: TeacherCorpusConfig, first: int, min_tokens: int,
                     prompts: dict[str, list[str]] | None = None,
                     progress: Callable[[int, int, float], None] | None = None) -> tuple[np.ndarray, int, dict]:
    """Generate batches first, first+1, … until their stream holds >= min_tokens tokens.

    -> (int32 stream doc eos doc eos …, batches generated, stats {documents, new_tokens, seconds, kinds})."""
    prompter = Prompter(tokenizer, cfg, prompts or load_prompts())
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the teacher's tokenizer has no eos token; it is needed to separate documents")
    stop_ids = set(tokenizer.all_special_ids) | {eos}
    limit = model.config.max_seq_len
    parts: list[np.ndarray] = []
    total = new_tokens = documents = 0
    kinds: dict[str, int] = {}
    t0 = time.monotonic()
    j = first
    model.eval()
    while total < min_tokens:
        kind, ids, keep, temps, tops = prompter.batch(j)
        max_new = cfg.max_new_tokens
        if len(ids) + max_new > limit:  # an error, not a shorter sample: the cache key does not know max_seq_len
            raise DataError(f"a teacher-corpus prompt of {len(ids)} tokens + data.teacher_corpus.max_new_tokens "
                            f"{max_new} exceeds the teacher's max_seq_len {limit}; lower max_new_tokens")
        generator = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, j, 1]).integers(2**62)))
        conts = sample_continuations(model, ids, temps, tops, max_new, stop_ids, generator, vocab=len(tokenizer))
        for cont in conts:
            doc = ids + cont if keep else cont
            if not doc:
                continue
            parts.append(np.asarray(doc + [eos], dtype=np.int32))
            total += len(doc) + 1
            new_tokens += len(cont)
            documents += 1
        kinds[kind] = kinds.get(kind, 0) + 1
        j += 1
        if progress is not None:
            progress(total, min_tokens, time.monotonic() - t0)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    stats = {"documents": documents, "new_tokens": new_tokens, "seconds": round(time.monotonic() - t0, 2),
             "kinds": kinds}
    return stream, j - first, stats


# -- the cache ---------------------------------------------------------------------------------------

class TeacherCorpus:
    """The teacher corpus of one (teacher, tokenizer, settings, prompts), on disk under root/<key>/.

    `tokens(n)` returns the first n tokens of the stream, generating (and caching) what is missing.
    root None: nothing is cached (every call generates)."""

    def __init__(self, root: str | os.PathLike | None, *, teacher: str, tokenizer: str, cfg: TeacherCorpusConfig,
                 prompts: dict[str, list[str]] | None = None):
        self.cfg = cfg
        self.prompts = prompts or load_prompts()
        self.meta = {"format": FORMAT, "generator": GENERATOR_VERSION, "teacher": teacher, "tokenizer": tokenizer,
                     "settings": cfg.generation_settings(), "prompts": prompts_hash(self.prompts)}
        self.key = corpus_key(teacher, tokenizer, self.meta["settings"], self.meta["prompts"])
        self.dir = Path(root) / self.key if root is not None else None

    def _read(self) -> tuple[dict, np.ndarray] | None:
        if self.dir is None or not (self.dir / "manifest.json").is_file():
            return None
        manifest_path = self.dir / "manifest.json"
        try:
            saved = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest_path} is not valid JSON ({e}); delete {self.dir}") from None
        for name in ("format", "generator", "teacher", "tokenizer", "settings", "prompts"):
            if saved.get(name) != self.meta[name]:
                raise DataError(f"the teacher corpus cache {self.dir} was made with another {name}: cache "
                                f"{saved.get(name)!r} vs this run {self.meta[name]!r}; delete it or set "
                                "data.teacher_corpus.dir to another directory")
        path = self.dir / str(saved.get("tokens_file"))
        if not path.is_file():
            raise DataError(f"the teacher corpus cache {self.dir} names {path.name}, which is missing; delete {self.dir}")
        tokens = np.load(path, allow_pickle=False)
        if tokens.dtype != np.int32 or tokens.ndim != 1 or _sha(tokens) != saved.get("tokens_sha256"):
            raise DataError(f"the teacher corpus cache file {path} does not match its manifest (dtype, shape or "
                            f"sha256); delete {self.dir}")
        return saved, tokens

    def tokens(self, n: int, model: Callable[[], BitNetModel], tokenizer: Any,
               log: Callable[[str], None] = print) -> np.ndarray:
        """The first n tokens of the corpus (int32); model() gives the teacher, called only to generate."""
        cached = self._read()
        saved, stream = cached if cached is not None else ({}, np.zeros(0, dtype=np.int32))
        if len(stream) >= n:
            log(f"teacher corpus: {n:,} tokens from the cache {self.dir} ({len(stream):,} cached)")
            return stream[:n]
        batches = int(saved.get("batches", 0))
        log(f"teacher corpus: generating {n - len(stream):,} tokens with the teacher"
            + (f" ({len(stream):,} cached in {self.dir})" if len(stream) else "")
            + f", into {self.dir if self.dir else 'memory (no cache directory)'}")
        more, new_batches, stats = generate_batches(model(), tokenizer, self.cfg, batches, n - len(stream),
                                                    self.prompts, progress=_Progress(log))
        stream = np.concatenate([stream, more])
        gen = saved.get("generation", {"documents": 0, "new_tokens": 0, "seconds": 0.0, "kinds": {}})
        kinds = dict(gen["kinds"])
        for k, v in stats["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
        gen = {"documents": gen["documents"] + stats["documents"], "new_tokens": gen["new_tokens"] + stats["new_tokens"],
               "seconds": round(gen["seconds"] + stats["seconds"], 2), "kinds": kinds,
               "threads": torch.get_num_threads()}
        log(f"teacher corpus: {stats['new_tokens']:,} new tokens in {stats['seconds']:.0f} s "
            f"({stats['new_tokens'] / max(stats['seconds'], 1e-9):,.0f} tok/s, {torch.get_num_threads()} threads)")
        if self.dir is not None:
            self._write(stream, batches + new_batches, gen, tokenizer, saved.get("tokens_file"))
        return stream[:n]

    def _write(self, stream: np.ndarray, batches: int, generation: dict, tokenizer: Any, previous: str | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        sha = _sha(stream)
        name = f"tokens-{sha[:16]}.npy"
        with atomic_file(self.dir / name) as tmp, open(tmp, "wb") as f:
            np.save(f, stream, allow_pickle=False)
        manifest = {**self.meta, "tokens_file": name, "tokens_sha256": sha, "tokens": int(len(stream)),
                    "batches": batches, "generation": generation}
        atomic_write_text(self.dir / "manifest.json", json.dumps(manifest, indent=1))
        atomic_write_text(self.dir / "samples.txt", _samples(stream, tokenizer))
        if previous and previous != name:  # the manifest names the new file now
            (self.dir / previous).unlink(missing_ok=True)


class _Progress:
    """One line every 30 s while generating."""

    def __init__(self, log: Callable[[str], None], interval_s: float = 30.0):
        self.log, self.interval_s, self.last = log, interval_s, time.monotonic()

    def __call__(self, done: int, wanted: int, seconds: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            rate = done / max(seconds, 1e-9)
            self.log(f"teacher corpus: {done:,}/{wanted:,} tokens, {rate:,.0f} tok/s, "
                     f"ETA {max(0.0, (wanted - done) / max(rate, 1e-9)) / 60:.1f} min")


def _sha(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def _samples(stream: np.ndarray, tokenizer: Any, count: int = 12) -> str:
    """The first documents, decoded, for a person to read (not used by training)."""
    eos = tokenizer.eos_token_id
    ends = np.flatnonzero(stream == eos)[:count]
    docs, start = [], 0
    for end in ends:
        docs.append(tokenizer.decode(stream[start:end].tolist()))
        start = int(end) + 1
    return "\n\n=====\n\n".join(docs) + "\n"


def teacher_corpus_tokens(cfg: TeacherCorpusConfig, cache_root: str | os.PathLike | None, teacher: BitNetModel,
                          tokenizer: Any, log: Callable[[str], None] = print) -> np.ndarray:
    """The run's teacher-corpus stream: cfg.tokens tokens, from the cache under cache_root or generated
    by `teacher` (by a copy in cfg.dtype when it is in another dtype: the key holds the fingerprint of
    the weights as given and cfg.dtype)."""
    from .distill import model_fingerprint

    corpus = TeacherCorpus(cache_root, teacher=model_fingerprint(teacher), tokenizer=tokenizer_identity(tokenizer),
                           cfg=cfg)
    dtype = DTYPES[cfg.dtype]

    def writer() -> BitNetModel:
        return teacher if teacher.embed_tokens.weight.dtype == dtype else copy.deepcopy(teacher).to(dtype)

    return corpus.tokens(cfg.tokens, writer, tokenizer, log=log)
