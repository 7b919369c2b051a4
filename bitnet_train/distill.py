"""Distillation from the full-precision source model into the ternary student (BitDistill recipe).

    loss = ce_weight · CE(student, targets)
         + kl_weight · T² · KL(softmax(teacher / T) ‖ softmax(student / T))       (logit KD)
         + attn_weight · Σ_{r in relations} KL(R_r(teacher) ‖ R_r(student))        (attention relations)

The attention-relation term is MiniLM(v2)-style multi-head self-relation distillation at one
layer: the layer's query, key and value projections (all heads concatenated, before RoPE) are
split into `attn_relation_heads` relation heads; for each relation head the relation matrix is
softmax(X Xᵀ / sqrt(d_r)) over positions (causally masked by default: a decoder never sees later
tokens), and the loss is the KL from the teacher's rows to the student's, averaged over rows.
Relation matrices are (T × T) whatever the head width, so the teacher and the student may differ
in width or head count.

Q/K/V are captured with forward hooks on the layer's q_proj / k_proj / v_proj (their outputs are
exactly the projections): the model code needs no change for it.

The teacher is a frozen full-precision BitNetModel (quant none), held outside the module tree so it
is neither trained, nor checkpointed, nor counted as a parameter. Optionally its top-k logits per
training block are cached on disk (`TopKLogitCache`) and reused, which removes the teacher forward
from later epochs and later runs on the same corpus (logit KD only: the relation term needs the
teacher's Q/K/V every step).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_file, atomic_write_text
from .errors import BitNetError, ConfigError
from .lightning_module import BitNetLM
from .losses import linear_cross_entropy_kd
from .model import BitNetModel, QuantConfig

RELATIONS = ("qq", "kk", "vv")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CACHE_FORMAT = "bitnet_train.topk_logits/1"


class DistillError(BitNetError):
    """A teacher, layer or logits cache that does not fit the student or the corpus."""


@dataclass
class DistillConfig:
    enabled: bool = False
    # The teacher: None = the run's source model (model.init_from / model.gguf_file) at quant none
    # with its own norms. Or an HF directory, a .gguf file, "smollm2", or a model/ directory.
    teacher: str | None = None
    teacher_gguf_file: str | None = None
    teacher_dtype: str = "float32"  # "bfloat16" halves the teacher's memory (and is faster on GPUs)
    ce_weight: float = 1.0
    kl_weight: float = 0.0  # alpha
    temperature: float = 1.0  # T
    attn_weight: float = 0.0  # beta
    attn_layer: int = -1  # python-style index into the layers; -1 = the last
    attn_relation_heads: int | None = None  # None: the student's num_kv_heads (divides q, k and v widths)
    attn_relations: list[str] = field(default_factory=lambda: list(RELATIONS))
    attn_causal: bool = True
    # Per-layer hidden-state loss against the teacher's residual stream (TernaryLLM, OneBit): gamma.
    hidden_weight: float = 0.0
    hidden_loss: str = "cosine"  # cosine: 1 - cos per token | nmse: ||s - t||^2 / ||t||^2 per token
    hidden_layers: list[int] | None = None  # python-style layer indices; None: every layer
    # Top-k teacher logits cache (logit KD only). None: no cache, the teacher runs every step.
    topk_cache_dir: str | None = None
    topk: int = 64

    def __post_init__(self):
        self.attn_relations = list(self.attn_relations)
        if self.hidden_layers is not None:
            self.hidden_layers = [int(i) for i in self.hidden_layers]
            if not self.hidden_layers:
                raise ConfigError("distill.hidden_layers must be null (every layer) or a non-empty list of layer indices")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ConfigError(f"distill.hidden_loss must be one of {list(HIDDEN_LOSSES)}, got {self.hidden_loss!r}")
        for name in ("ce_weight", "kl_weight", "attn_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"distill.teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got {self.teacher_dtype!r}")
        bad = [r for r in self.attn_relations if r not in RELATIONS]
        if bad or not self.attn_relations:
            raise ConfigError(f"distill.attn_relations must be a non-empty subset of {list(RELATIONS)}, got {self.attn_relations}")
        if self.attn_relation_heads is not None and self.attn_relation_heads < 1:
            raise ConfigError(f"distill.attn_relation_heads must be >= 1, got {self.attn_relation_heads}")
        if self.topk < 1:
            raise ConfigError(f"distill.topk must be >= 1, got {self.topk}")
        if self.enabled and self.ce_weight == self.kl_weight == self.attn_weight == self.hidden_weight == 0:
            raise ConfigError("distill is enabled but ce_weight, kl_weight, attn_weight and hidden_weight are all 0")

    @property
    def needs_teacher(self) -> bool:
        return self.enabled and (self.kl_weight > 0 or self.attn_weight > 0 or self.hidden_weight > 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DistillConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown distill config keys: {sorted(unknown)}")
        return cls(**d)


# -- loss terms ------------------------------------------------------------------------------------

def kl_with_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) ‖ softmax(student / T)), summed over the vocab, mean over tokens.

    logits: (..., V). Without the T² factor (the caller applies it, so gradients keep their scale
    across temperatures, Hinton et al. 2015). fp32 math.
    """
    if student_logits.shape != teacher_logits.shape:
        raise DistillError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                           f"{tuple(teacher_logits.shape)} differ in shape")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (...)
    return kl.mean()


def topk_kl_with_temperature(student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """KL on the teacher's top-k support: the teacher's k logits renormalised (softmax over the k,
    at temperature T) against the student's full-vocabulary log-probabilities at those ids.

    student_logits (..., V); topk_values / topk_indices (..., k). Mean over tokens, no T².
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, topk_indices.long())  # (..., k)
    log_t = F.log_softmax(topk_values.float() / temperature, dim=-1)  # (..., k)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def split_relation_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, D) all heads concatenated -> (B, heads, T, D / heads)."""
    B, T, D = x.shape
    if D % heads:
        raise DistillError(f"relation heads {heads} do not divide the projection width {D}")
    return x.view(B, T, heads, D // heads).transpose(1, 2)


def relation_log_probs(x: torch.Tensor, heads: int, causal: bool = True) -> torch.Tensor:
    """log softmax(X_r X_rᵀ / sqrt(d_r)) per relation head: (B, T, D) -> (B, heads, T, T), fp32.
    causal: position t relates only to positions <= t (the masked entries are -inf)."""
    xr = split_relation_heads(x.float(), heads)  # (B, R, T, d_r)
    # Under bf16 autocast (trainer.precision=bf16-mixed, the GPU recipe) this matmul would run in bf16,
    # and the relation rows of student and teacher, which differ by little, would differ mostly by its
    # rounding: measured, a KL that goes negative. The relation scores are computed in fp32 always.
    with torch.autocast(device_type=x.device.type, enabled=False):
        scores = xr @ xr.transpose(-1, -2) / math.sqrt(xr.shape[-1])  # (B, R, T, T)
    if causal:
        T = scores.shape[-1]
        future = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return F.log_softmax(scores, dim=-1)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, heads: int, causal: bool = True) -> torch.Tensor:
    """KL(teacher relation rows ‖ student relation rows), summed over a row, mean over (B, heads, T).
    student (B, T, Ds), teacher (B, T, Dt): widths may differ; heads must divide both."""
    if student.shape[:2] != teacher.shape[:2]:
        raise DistillError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in batch or length")
    log_s = relation_log_probs(student, heads, causal)
    log_t = relation_log_probs(teacher, heads, causal)
    # masked entries: p_t = 0 there, and (-inf) - (-inf) would be nan, so they are zeroed.
    term = torch.where(torch.isfinite(log_t), log_t.exp() * (log_t - log_s), torch.zeros_like(log_t))
    return term.sum(-1).mean()


def attention_relation_loss(student_qkv: dict[str, torch.Tensor], teacher_qkv: dict[str, torch.Tensor], heads: int,
                            relations: list[str] = list(RELATIONS), causal: bool = True) -> torch.Tensor:
    """Sum over the chosen relations ("qq", "kk", "vv") of relation_kl on the q / k / v projections."""
    total = None
    for rel in relations:
        part = relation_kl(student_qkv[rel[0]], teacher_qkv[rel[0]], heads, causal)
        total = part if total is None else total + part
    return total


# -- Q/K/V capture -----------------------------------------------------------------------------------

def resolve_layer(index: int, model: BitNetModel, who: str) -> int:
    n = len(model.layers)
    if not -n <= index < n:
        raise DistillError(f"distill.attn_layer {index} is out of range for the {who} ({n} layers: use {-n}..{n - 1})")
    return index % n


HIDDEN_LOSSES = ("cosine", "nmse")


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str = "cosine") -> torch.Tensor:
    """Mean over layers and tokens of a per-token distance between residual streams (..., d), fp32:
    cosine: 1 - cos(s, t); nmse: ||s - t||^2 / ||t||^2 (the teacher's norm, so each layer weighs alike
    whatever its scale)."""
    if len(student) != len(teacher) or not student:
        raise DistillError(f"hidden-state loss: {len(student)} student layers vs {len(teacher)} teacher layers")
    terms = []
    with torch.autocast(device_type=student[0].device.type, enabled=False):
        for s_h, t_h in zip(student, teacher):
            if s_h.shape != t_h.shape:
                raise DistillError(f"hidden-state loss: student hidden states {tuple(s_h.shape)} vs teacher "
                                   f"{tuple(t_h.shape)}")
            s32, t32 = s_h.float(), t_h.detach().float()
            if kind == "cosine":
                terms.append((1 - F.cosine_similarity(s32, t32, dim=-1, eps=1e-8)).mean())
            elif kind == "nmse":
                terms.append(((s32 - t32).pow(2).sum(-1) / t32.pow(2).sum(-1).clamp(min=1e-12)).mean())
            else:
                raise DistillError(f"hidden-state loss must be one of {list(HIDDEN_LOSSES)}, got {kind!r}")
    return torch.stack(terms).mean()


class ResidualCapture:
    """Forward hooks on decoder layers: after a forward, `take()` gives their outputs (the residual
    stream after each chosen layer, (B, T, d)) in layer order."""

    def __init__(self, model: BitNetModel, layers: list[int] | None):
        n = len(model.layers)
        bad = [i for i in (layers or []) if not -n <= i < n]
        if bad:
            raise DistillError(f"distill.hidden_layers {bad} out of range for a {n}-layer model (use {-n}..{n - 1})")
        idx = list(range(n)) if layers is None else sorted({i % n for i in layers})
        self.layers = idx
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = [model.layers[i].register_forward_hook(self._keeper(i)) for i in idx]

    def _keeper(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return [out[i] for i in self.layers if i in out]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class QKVCapture:
    """Forward hooks on one layer's q_proj / k_proj / v_proj: after a forward, `outputs` holds
    {"q": (B, T, n_head·hd), "k": (B, T, n_kv·hd), "v": (B, T, n_kv·hd)} (before RoPE)."""

    def __init__(self, model: BitNetModel, layer: int):
        attn = model.layers[layer].self_attn
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [
            getattr(attn, f"{name}_proj").register_forward_hook(self._keeper(name)) for name in ("q", "k", "v")
        ]

    def _keeper(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# -- teacher -------------------------------------------------------------------------------------------

def check_teacher_fits(teacher: BitNetModel, student: BitNetModel, teacher_tokenizer, student_tokenizer) -> None:
    """The teacher must predict over the same token ids as the student."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise DistillError(f"the teacher's vocabulary differs from the student's: teacher vocab_size {tv} vs student {sv}")
    check_tokenizers_match(teacher_tokenizer, student_tokenizer)


def check_tokenizers_match(teacher_tokenizer, student_tokenizer) -> None:
    if teacher_tokenizer is not None and student_tokenizer is not None:
        t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        if t_vocab != s_vocab:
            differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))
            example = differ[0][0] if differ else "?"
            raise DistillError(
                f"the teacher's tokenizer differs from the student's: {len(t_vocab)} vs {len(s_vocab)} tokens, "
                f"{len(differ)} (token, id) pairs differ (e.g. {example!r}: teacher {t_vocab.get(example)} vs "
                f"student {s_vocab.get(example)})"
            )


def load_teacher(cfg: DistillConfig, model_source: dict, max_seq_len: int, load_source: Callable):
    """-> (the frozen full-precision teacher, its tokenizer), unchecked (build_teacher checks it).

    model_source: the run's `model` config (init_from, gguf_file); cfg.teacher, when set, replaces its
    init_from / gguf_file. load_source(spec, QuantConfig) -> (model, tokenizer, info) is
    train.build_source_model (injected: the teacher loads exactly as a run's source does, with its
    own norms, at quant none)."""
    init_from = cfg.teacher or model_source.get("init_from")
    if not init_from:
        raise ConfigError("distillation needs a teacher: set distill.teacher=PATH (or model.init_from) "
                          "to a full-precision model")
    spec = {
        "init_from": init_from,
        "gguf_file": cfg.teacher_gguf_file if cfg.teacher else model_source.get("gguf_file"),
        "max_seq_len": max_seq_len,
    }
    teacher, tokenizer, _ = load_source(spec, QuantConfig(method="none"))
    return freeze_teacher(teacher, cfg.teacher_dtype), tokenizer


def build_teacher(cfg: DistillConfig, model_source: dict, student: BitNetModel, student_tokenizer,
                  load_source: Callable, loaded: tuple | None = None) -> BitNetModel:
    """The frozen full-precision teacher (load_teacher), checked against the student.

    loaded: (teacher, tokenizer) that load_teacher gave earlier in the run (the teacher corpus needs
    the same teacher before the student exists), instead of loading it again."""
    if loaded is not None and loaded[0].config.max_seq_len < student.config.max_seq_len:
        loaded = None  # its RoPE tables are too short for the student's sequences
    teacher, tokenizer = loaded or load_teacher(cfg, model_source, student.config.max_seq_len, load_source)
    check_teacher_fits(teacher, student, tokenizer, student_tokenizer)
    return teacher


def freeze_teacher(teacher: BitNetModel, dtype: str = "float32") -> BitNetModel:
    if teacher.quant_config.method != "none":
        raise DistillError(f"the teacher must be full precision (quant none), got quant {teacher.quant_config.method!r}")
    teacher.eval().requires_grad_(False)
    return teacher.to(TEACHER_DTYPES[dtype])


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): the teacher's identity for the cache."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too (lam)
    return digest.hexdigest()[:20]


def corpus_fingerprint(tokens: torch.Tensor, block_size: int) -> str:
    """sha256 of the training token stream and the block size (what the cache's rows come from)."""
    digest = hashlib.sha256(f"block_size={block_size}|".encode())
    digest.update(tokens.to(torch.int32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


# -- top-k logits cache ------------------------------------------------------------------------------

class TopKLogitCache:
    """The teacher's top-k logits per training block, kept on disk and reused.

    <dir>/manifest.json  {"format", "teacher", "corpus", "topk", "rows"}
    <dir>/topk.pt        {row key: (values fp16 (T, k), indices int32 (T, k))}
    A row's key is the sha1 of its input ids. A cache made for another teacher, corpus or k is
    refused with the mismatch named (it would silently distil the wrong function).
    """

    def __init__(self, directory: str | os.PathLike, *, teacher: str, corpus: str, topk: int):
        self.dir = Path(directory)
        self.meta = {"format": CACHE_FORMAT, "teacher": teacher, "corpus": corpus, "topk": topk}
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dirty = False
        manifest = self.dir / "manifest.json"
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text())
            except json.JSONDecodeError as e:
                raise DistillError(f"{manifest} is not valid JSON ({e}); delete the cache directory") from None
            for key, what in (("format", "format"), ("teacher", "teacher model"), ("corpus", "corpus"), ("topk", "topk")):
                if saved.get(key) != self.meta[key]:
                    raise DistillError(
                        f"the teacher logits cache {self.dir} is from another {what}: cache {saved.get(key)!r} vs "
                        f"this run {self.meta[key]!r}; delete it or set distill.topk_cache_dir to another directory"
                    )
            data = self.dir / "topk.pt"
            if data.is_file():
                self.rows = torch.load(data, map_location="cpu", weights_only=True)

    @staticmethod
    def row_key(row: torch.Tensor) -> str:
        return hashlib.sha1(row.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x (B, T) -> (values (B, T, k) fp32, indices (B, T, k) int64), or None unless every row is cached."""
        found = [self.rows.get(self.row_key(r)) for r in x]
        if any(f is None for f in found):
            return None
        values = torch.stack([f[0] for f in found]).to(x.device, torch.float32)
        indices = torch.stack([f[1] for f in found]).to(x.device, torch.int64)
        return values, indices

    def store(self, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        for row, v, i in zip(x, values, indices):
            self.rows[self.row_key(row)] = (v.detach().to("cpu", torch.float16), i.detach().to("cpu", torch.int32))
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        with atomic_file(self.dir / "topk.pt") as tmp:  # removed again if the save fails
            torch.save(self.rows, tmp)
        atomic_write_text(self.dir / "manifest.json", json.dumps({**self.meta, "rows": len(self.rows)}, indent=1))
        self.dirty = False


# -- the Lightning module -----------------------------------------------------------------------------

class DistillLM(BitNetLM):
    """BitNetLM whose training loss adds logit KD and attention-relation distillation.

    The teacher is attached after construction (`attach_teacher`), so it is not a hyperparameter,
    not a submodule and not in any checkpoint. Validation stays the student's plain CE (val/ppl
    compares with every other run).
    """

    def __init__(self, model: dict, quant: dict, optim: dict, total_steps: int, distill: dict):
        super().__init__(model=model, quant=quant, optim=optim, total_steps=total_steps)
        self.distill_cfg = DistillConfig.from_dict(distill)
        self._teacher: list[BitNetModel] = []  # a list: keeps the teacher out of the module tree
        self._student_capture: QKVCapture | None = None
        self._teacher_capture: QKVCapture | None = None
        self._student_hidden: ResidualCapture | None = None
        self._teacher_hidden: ResidualCapture | None = None
        self._cache: TopKLogitCache | None = None
        self._relation_heads = 0
        self.last_parts: dict[str, float] = {}

    @property
    def teacher(self) -> BitNetModel | None:
        return self._teacher[0] if self._teacher else None

    def attach_teacher(self, teacher: BitNetModel, cache: TopKLogitCache | None = None) -> None:
        d = self.distill_cfg
        teacher = freeze_teacher(teacher, d.teacher_dtype)
        if teacher.config.vocab_size != self.model.config.vocab_size:
            raise DistillError(f"the teacher's vocabulary differs from the student's: teacher vocab_size "
                               f"{teacher.config.vocab_size} vs student {self.model.config.vocab_size}")
        self._teacher = [teacher]
        if d.attn_weight > 0:
            s_layer = resolve_layer(d.attn_layer, self.model, "student")
            t_layer = resolve_layer(d.attn_layer, teacher, "teacher")
            heads = d.attn_relation_heads or self.model.config.num_kv_heads
            for who, m in (("student", self.model), ("teacher", teacher)):
                c = m.config
                for width in (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim):
                    if width % heads:
                        raise DistillError(f"distill.attn_relation_heads {heads} does not divide the {who}'s "
                                           f"q/k/v width {width}")
            self._relation_heads = heads
            self._student_capture = QKVCapture(self.model, s_layer)
            self._teacher_capture = QKVCapture(teacher, t_layer)
        if d.hidden_weight > 0:
            sc, tc = self.model.config, teacher.config
            if (sc.num_layers, sc.hidden_size) != (tc.num_layers, tc.hidden_size):
                raise DistillError(f"distill.hidden_weight needs a teacher of the student's depth and width: student "
                                   f"{sc.num_layers} layers x {sc.hidden_size}, teacher {tc.num_layers} x {tc.hidden_size}")
            self._student_hidden = ResidualCapture(self.model, d.hidden_layers)
            self._teacher_hidden = ResidualCapture(teacher, d.hidden_layers)
        if cache is not None and (d.attn_weight > 0 or d.hidden_weight > 0):
            raise DistillError("distill.topk_cache_dir works with logit KD only (attn_weight and hidden_weight 0): "
                               "the attention-relation and hidden-state terms need the teacher's forward every step")
        self._cache = cache

    def on_fit_start(self):
        if self.distill_cfg.needs_teacher and self.teacher is None:
            raise DistillError("distillation is enabled but no teacher was attached (DistillLM.attach_teacher)")
        if self.teacher is not None:
            self.teacher.to(self.device)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.distill_cfg
        if not d.needs_teacher:  # CE alone: the chunked head + loss, no logits tensor (losses.py)
            ce = self.model.loss(x, y)
            self._log_part("train/ce", ce)
            return d.ce_weight * ce
        h = self.model.hidden_states(x)  # (B, T, d); the lm_head is applied below
        student_qkv = self._student_capture.take() if self._student_capture else {}
        student_hidden = self._student_hidden.take() if self._student_hidden else []
        t2 = d.temperature ** 2
        cached = self._cache.lookup(x) if self._cache is not None else None
        if cached is None or d.attn_weight > 0 or d.hidden_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            if self._cache is not None:  # with a cache the loss is always the top-k form, hit or miss
                values, indices = teacher_logits.float().topk(d.topk, dim=-1)
                self._cache.store(x, values, indices)
                cached = (values, indices)
        hf, yf = h.reshape(-1, h.shape[-1]), y.reshape(-1)
        if d.kl_weight > 0 and cached is None:
            # CE and the full-vocabulary KL through the head in row chunks (losses.py): no student logits tensor
            total, ce, kl = linear_cross_entropy_kd(hf, self.model.lm_head.weight, yf,
                                                    teacher_logits.reshape(-1, teacher_logits.shape[-1]),
                                                    d.temperature, d.ce_weight, d.kl_weight)
            self._log_part("train/ce", ce)
            self._log_part("train/kl", kl)
        else:
            logits = self.model.lm_head(h)  # (B, T, V)
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), yf)
            total = d.ce_weight * ce
            self._log_part("train/ce", ce)
            if d.kl_weight > 0:
                kl = topk_kl_with_temperature(logits, cached[0], cached[1], d.temperature)
                total = total + d.kl_weight * t2 * kl
                self._log_part("train/kl", kl)
        if d.hidden_weight > 0:
            hs = hidden_state_loss(student_hidden, self._teacher_hidden.take(), d.hidden_loss)
            total = total + d.hidden_weight * hs
            self._log_part("train/hidden", hs)
        if d.attn_weight > 0:
            teacher_qkv = self._teacher_capture.take()
            ar = attention_relation_loss(student_qkv, teacher_qkv, self._relation_heads, d.attn_relations, d.attn_causal)
            total = total + d.attn_weight * ar
            self._log_part("train/attn_rel", ar)
        return total

    def _log_part(self, name: str, value: torch.Tensor) -> None:
        self.last_parts[name] = float(value.detach())
        if self._trainer is not None:  # also usable in a plain loop (tests, benches)
            self.log(name, value)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        loss = super().validation_step(batch, batch_idx, dataloader_idx)
        for c in (self._student_capture, self._teacher_capture, self._student_hidden, self._teacher_hidden):
            if c is not None:
                c.take()  # drop what the validation forward captured
        return loss

    def on_save_checkpoint(self, checkpoint):
        if self._cache is not None:
            self._cache.save()

    def on_train_end(self):
        if self._cache is not None:
            self._cache.save()
