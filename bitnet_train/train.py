"""One training run from a composed Hydra config: build, fit, write model/, report.

The CLI (`__main__`) composes the config and calls `run(cfg)`. Everything that can be checked
before training (config values, data, tokenizer vs model, resume checkpoint) is checked before
the run directory is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .atomic import atomic_file
from .conversion import ConvertConfig, convert_model
from .distill import DistillConfig, DistillLM, TopKLogitCache, build_teacher, corpus_fingerprint, model_fingerprint
from .errors import CheckpointError, ConfigError
from .lightning_module import BitNetLM
from .model import BitNetModel, ModelConfig, QuantConfig
from .model_dir import read_model_dir_config, save_model_dir
from .schedule import OptimConfig

RUN_DIR_ENV = "BITNET_RUN_DIR"  # lets DDP worker processes find the run dir rank 0 chose
ARCH_KEYS_FROM_CHECKPOINT = ("norm", "ffn", "max_seq_len")  # keys a recipe may set on an import


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place: a run killed
    mid-write never leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_file(path) as tmp:
            super().save_checkpoint(checkpoint, str(tmp), storage_options)


class KillAtStep(Callback):
    """Crash-recovery testing: exit the process abruptly (as kill -9 would) after a step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os._exit(137)


class TernaryFlipRate(Callback):
    """Logs `train/flip_rate`: the fraction of ternary codes (all quantized BitLinear weights) that one
    optimizer step changes, every `every` steps. Near zero means the learning rate is too low for the
    quantized weights to move at all; the latent weights still change, the function does not. Costs
    two weight quantizations every `every` steps (a snapshot before the step, the codes after it)."""

    def __init__(self, every: int):
        if every < 1:
            raise ConfigError(f"callbacks.flip_rate_every_n_steps must be >= 1 (or 0 to turn it off), got {every}")
        self.every = every
        self._before: dict[str, torch.Tensor] | None = None

    @staticmethod
    def codes(model) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: m.quantized_weight()[0] for n, m in model.bitlinear_modules().items() if m.quantize}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = self.codes(pl_module.model) if trainer.global_step % self.every == 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is None:
            return
        after = self.codes(pl_module.model)
        flips = sum(int((after[n] != c).sum()) for n, c in self._before.items())
        total = sum(c.numel() for c in self._before.values())
        self._before = None
        if total:
            # straight to the loggers: a self.log from this hook is logged again at the next step
            for lg in trainer.loggers:
                lg.log_metrics({"train/flip_rate": flips / total}, step=trainer.global_step)
            pl_module.last_flip_rate = flips / total


class PlainProgress(Callback):
    """Progress where no terminal watches (output redirected to a file, nohup, a batch scheduler, CI):
    one plain line every `interval_s` seconds and at the last step, on rank zero:
    `step 120/1000 (12%) | tokens 245,760 | loss 3.4120 | lr 2.00e-04 | 1,234 tok/s | ETA 12m30s`."""

    def __init__(self, interval_s: float = 30.0, stream=None):
        self.interval_s, self.stream = float(interval_s), stream
        self._t0 = self._step0 = self._last = None

    def on_train_start(self, trainer, pl_module):
        self._t0, self._step0, self._last = time.monotonic(), trainer.global_step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.is_global_zero or self._t0 is None:
            return
        now, step, total = time.monotonic(), trainer.global_step, trainer.max_steps
        if step < total and self._last is not None and now - self._last < self.interval_s:
            return
        self._last = now
        m = trainer.callback_metrics
        parts = [f"step {step}/{total} ({100 * step // max(total, 1)}%)"]
        tokens = float(m["train/tokens"]) if "train/tokens" in m else None
        if tokens is not None:
            parts.append(f"tokens {int(tokens):,}")
        if "train/loss" in m:
            parts.append(f"loss {float(m['train/loss']):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        done, elapsed = step - self._step0, now - self._t0
        if done > 0 and elapsed > 0:
            if tokens is not None and step > 0:
                parts.append(f"{tokens / step * done / elapsed:,.0f} tok/s")
            left = (total - step) * elapsed / done
            parts.append(f"ETA {int(left // 60)}m{int(left % 60):02d}s")
        print(" | ".join(parts), file=self.stream or sys.stdout, flush=True)


def progress_kind(setting: str, tty: bool) -> str:
    """callbacks.progress_bar -> what runs: a bar (rich, tqdm) only on a terminal, else plain lines."""
    if setting not in PROGRESS_BARS:
        raise ConfigError(f"callbacks.progress_bar must be one of {', '.join(PROGRESS_BARS)}, got {setting!r}")
    return "plain" if setting in ("rich", "tqdm") and not tty else setting


PROGRESS_BARS = ("rich", "tqdm", "plain", "none")


# -- config pieces ---------------------------------------------------------------------------------

def _as_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _checked(make, what: str):
    try:
        return make()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {what} config: {e}") from None


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser().resolve()
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{cfg.name}-{cfg.quant.method}" / stamp
    return path.resolve()


def resolve_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        if not cfg.run_dir:
            raise ConfigError("resume=auto needs run_dir=... (the run to resume)")
        last = run_dir / "checkpoints" / "last.ckpt"
        return last if last.is_file() else None
    path = Path(cfg.resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"resume checkpoint not found: {path}")
    return path.resolve()


def check_resume_architecture(ckpt: Path, model_cfg: ModelConfig, quant_cfg: QuantConfig) -> None:
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {e}") from None
    hp = state.get("hyper_parameters") or {}
    saved = hp.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{ckpt} is not a bitnet_train checkpoint (no model config in hyper_parameters)")
    mine = model_cfg.to_dict()
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        parts = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"checkpoint {ckpt} is from another architecture ({parts})")
    saved_q = (hp.get("quant") or {}).get("method")
    if saved_q != quant_cfg.method:
        raise CheckpointError(f"checkpoint {ckpt} was trained with quant {saved_q!r}, the config says {quant_cfg.method!r}")


# -- model source ------------------------------------------------------------------------------------

def build_source_model(mcfg: dict, qcfg: QuantConfig):
    """-> (model or None, tokenizer or None, provenance). None model: build from scratch later."""
    init_from = mcfg.get("init_from")
    if not init_from:
        return None, None, {}
    overrides = {k: mcfg[k] for k in ARCH_KEYS_FROM_CHECKPOINT if mcfg.get(k) is not None}
    from .importers import load_hf_llama, smollm2_gguf_path

    gguf_file = mcfg.get("gguf_file")
    path = smollm2_gguf_path() if init_from == "smollm2" else Path(init_from).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise ConfigError(f"model.init_from: {path} does not exist")
    if (path / "config.json").is_file() and _is_model_dir(path):
        from .model_dir import load_model_dir

        model, tok, meta = load_model_dir(path)
        subln_added = overrides.get("norm") == "subln" and model.config.norm != "subln"
        if overrides:
            cfg = replace(model.config, **overrides)
            fresh = BitNetModel(cfg, qcfg)
            fresh.load_state_dict(model.state_dict(), strict=False)
            model = fresh
        else:
            model = _requantized(model, qcfg)
        return model, tok, {"source": str(path), **meta.get("provenance", {}), "subln_added": subln_added}
    model, tok, info = load_hf_llama(
        path,
        gguf_file=gguf_file,
        quant=qcfg,
        norm=overrides.get("norm"),  # None: the checkpoint's own (none; an HF bitnet directory's subln)
        ffn=overrides.get("ffn"),
        max_seq_len=overrides.get("max_seq_len"),
        subln_init="ones",  # calibrated by run() on training tokens (see importers.calibrate_subln)
    )
    # an HF bitnet checkpoint brings its SubLN gains (its importer says subln_added False)
    return model, tok, {**info, "subln_added": info.get("subln_added", overrides.get("norm") == "subln")}


def _is_model_dir(path: Path) -> bool:
    try:
        read_model_dir_config(path)
        return True
    except Exception:  # noqa: BLE001 - not ours: an HF directory
        return False


def _requantized(model: BitNetModel, qcfg: QuantConfig) -> BitNetModel:
    fresh = BitNetModel(model.config, qcfg)
    fresh.load_state_dict(model.state_dict(), strict=False)
    return fresh


# -- the run -----------------------------------------------------------------------------------------

def run(cfg: DictConfig) -> dict:
    """Train according to cfg. Returns the summary dict (also appended to runs/results.jsonl).

    A config with `stages:` (a list of partial configs, each merged over the rest of cfg, with an
    optional `stage:` label) runs them in order in run_dir/stage1, stage2, ...; stage N+1 starts
    from stage N's model/, distillation teachers stay the original source, and resume=auto skips
    finished stages (those with a model/) and resumes the first unfinished one from its last.ckpt.
    """
    if cfg.get("stages"):
        return _run_stages(cfg)
    return _run_single(cfg)


def _run_stages(cfg: DictConfig) -> dict:
    if cfg.resume not in (None, "auto") or (cfg.resume == "auto" and not cfg.run_dir):
        raise ConfigError(f"a staged recipe resumes with resume=auto and run_dir=... (got resume={cfg.resume!r}, "
                          f"run_dir={cfg.run_dir!r})")
    stages = OmegaConf.to_container(cfg.stages, resolve=True)
    base = cfg.copy()  # struct, as composed: a stage key that the config does not have is an error
    OmegaConf.set_struct(base, True)
    base.stages = None
    run_dir = resolve_run_dir(cfg)
    source = {"teacher": cfg.model.get("init_from"), "teacher_gguf_file": cfg.model.get("gguf_file")}
    previous_model: Path | None = None
    summaries = []
    for i, stage in enumerate(stages, 1):
        if not isinstance(stage, dict):
            raise ConfigError(f"stages[{i - 1}] must be a mapping of config overrides, got {stage!r}")
        label = stage.pop("stage", f"stage{i}")
        stage_dir = run_dir / f"stage{i}"
        try:
            scfg = OmegaConf.merge(base, stage)
        except OmegaConfBaseException as e:
            raise ConfigError(f"stages[{i - 1}] ({label}): {e}".splitlines()[0]) from None
        scfg.run_dir, scfg.resume = str(stage_dir), cfg.resume
        if previous_model is not None:
            scfg.model.init_from, scfg.model.gguf_file = str(previous_model), None
            if "convert" in scfg:  # stage N+1 continues stage N's trained codes: converting again would undo it
                scfg.convert.method, scfg.convert.recon_steps = "round", 0
        if scfg.distill.get("teacher") is None:
            scfg.distill.teacher, scfg.distill.teacher_gguf_file = source["teacher"], source["teacher_gguf_file"]
        if cfg.resume == "auto" and (stage_dir / "model" / "config.json").is_file():
            print(f"stage {i} ({label}): finished earlier, model in {stage_dir / 'model'}")
        else:
            print(f"\n=== stage {i}/{len(stages)}: {label} ({scfg.trainer.max_steps} steps) -> {stage_dir}")
            summaries.append({"stage": label, **_run_single(scfg)})
        previous_model = stage_dir / "model"
    return {**(summaries[-1] if summaries else {}), "stages": summaries, "run_dir": str(run_dir)}


def _calibration_ids(blocks, n: int = 4) -> torch.Tensor:
    """The first n training blocks' inputs, (n, block_size): fixed, whatever the shuffling seed."""
    return torch.stack([blocks[i][0] for i in range(min(n, len(blocks)))])


def _run_single(cfg: DictConfig) -> dict:
    from .data import DataConfig, TextDataModule, check_vocab

    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    qcfg = _checked(lambda: QuantConfig.from_dict(_as_dict(cfg.quant)), "quant")
    ocfg = _checked(lambda: OptimConfig.from_dict(_as_dict(cfg.optim)), "optim")
    mcfg_raw = _as_dict(cfg.model)
    max_steps = int(cfg.trainer.max_steps)
    if max_steps <= 0:
        raise ConfigError(f"trainer.max_steps must be positive, got {max_steps}")

    if qcfg.act_quant_from_step >= max_steps and qcfg.method != "none":
        print(f"note: quant.act_quant_from_step={qcfg.act_quant_from_step} >= trainer.max_steps={max_steps}: this run "
              "trains with full-precision activations throughout (weight-only); its validation and the saved model "
              "quantize them to int8, as the runtime does")
    source_model, tokenizer, provenance = build_source_model(mcfg_raw, qcfg)
    if source_model is not None:  # an HF bitnet import adds the linears its checkpoint keeps dense
        qcfg = source_model.quant_config
    dcfg = _checked(lambda: DataConfig(**_as_dict(cfg.data), seed=int(cfg.seed)), "data")
    distill = _checked(lambda: DistillConfig.from_dict(_as_dict(cfg.get("distill"))), "distill")
    convert = _checked(lambda: ConvertConfig.from_dict(_as_dict(cfg.get("convert") or {})), "convert")
    if convert.enabled:
        what = f"convert.method={convert.method}" + (f" with convert.recon_steps={convert.recon_steps}"
                                                    if convert.recon_steps else "")
        if source_model is None:
            raise ConfigError(f"{what} converts an imported model: set model.init_from")
        if qcfg.method == "none":
            raise ConfigError(f"{what} chooses ternary codes: it needs quant=ternary")
    corpus_teacher = teacher_tokens = convert_seconds = None
    if dcfg.teacher_corpus.fraction > 0:
        max_seq_len = source_model.config.max_seq_len if source_model is not None else int(mcfg_raw["max_seq_len"])
        corpus_teacher, teacher_tokens = _teacher_corpus(dcfg, distill, mcfg_raw, tokenizer, max_seq_len)
    dm = TextDataModule(dcfg, tokenizer=tokenizer, teacher_tokens=teacher_tokens)
    dm.prepare_data()
    dm.setup("fit")
    tokenizer = dm.tokenizer
    if teacher_tokens is not None:
        b = dm.train_blocks
        print(f"train blocks: {len(b.task):,} task + {b.teacher_slots:,} teacher corpus ({b.fraction:.0%}; "
              f"{len(b.teacher):,} distinct teacher blocks, each {b.teacher_repeats:.2f}x per epoch)")

    if source_model is not None:
        model_cfg = source_model.config
    else:
        arch = {k: v for k, v in mcfg_raw.items() if k not in ("init_from", "gguf_file")}
        if arch.get("vocab_size") is None:
            arch["vocab_size"] = int(math.ceil(len(tokenizer) / 64) * 64)
        model_cfg = _checked(lambda: ModelConfig(**arch), "model")
    check_vocab(tokenizer, model_cfg.vocab_size)
    if dcfg.block_size > model_cfg.max_seq_len:
        raise ConfigError(
            f"data.block_size {dcfg.block_size} is larger than model.max_seq_len {model_cfg.max_seq_len}"
        )

    run_dir = resolve_run_dir(cfg)
    resume = resolve_resume(cfg, run_dir)
    if resume is not None:
        check_resume_architecture(resume, model_cfg, qcfg)

    lm_args = dict(model=model_cfg.to_dict(), quant=qcfg.to_dict(), optim=ocfg.to_dict(), total_steps=max_steps)
    lm = DistillLM(**lm_args, distill=distill.to_dict()) if distill.enabled else BitNetLM(**lm_args)
    if source_model is not None and resume is None:
        if provenance.get("subln_added"):
            from .importers import calibrate_subln

            provenance["subln_calibration"] = calibrate_subln(source_model, _calibration_ids(dm.train_blocks))
        if convert.enabled:
            if qcfg.lambda_warmup_steps:
                print(f"note: converting with quant.lambda_warmup_steps={qcfg.lambda_warmup_steps}: the ramp blends "
                      "in latent weights that are no longer the source's")
            mixed = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))[0] == "bf16-mixed"
            provenance["convert"] = convert_model(source_model, _calibration_ids(dm.train_blocks, convert.calib_blocks),
                                                  convert, autocast=torch.bfloat16 if mixed else None)
            convert_seconds = provenance["convert"]["seconds"]
        lm.model.load_state_dict(source_model.state_dict())
    del source_model
    if distill.needs_teacher:
        teacher = build_teacher(distill, mcfg_raw, lm.model, tokenizer, build_source_model, loaded=corpus_teacher)
        cache = None
        if distill.topk_cache_dir:
            cache = TopKLogitCache(distill.topk_cache_dir, teacher=model_fingerprint(teacher),
                                   corpus=corpus_fingerprint(dm.train_blocks.tokens, dcfg.block_size), topk=distill.topk)
        lm.attach_teacher(teacher, cache)
    del corpus_teacher  # the corpus is written; a distillation teacher is held by lm

    # From here on the run directory exists.
    os.environ.setdefault(RUN_DIR_ENV, str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = _make_trainer(cfg, run_dir)
    # Clipping happens in the module (BitNetLM.on_before_optimizer_step, the same point of the step):
    # Lightning refuses its own clipping with a fused optimizer.
    lm.grad_clip = float(cfg.trainer.gradient_clip_val) if cfg.trainer.gradient_clip_val else None
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    t0 = time.time()
    trainer.fit(lm, datamodule=dm, ckpt_path=str(resume) if resume else None)
    train_seconds = time.time() - t0
    val = trainer.validate(lm, datamodule=dm, verbose=False)
    if not trainer.is_global_zero:
        return {}

    val_loss = _validated(val, "val/loss")
    general_loss = _validated(val, "val_general/loss")
    tokens = trainer.global_step * dcfg.batch_size * dcfg.block_size * trainer.world_size * trainer.accumulate_grad_batches
    provenance = {
        **provenance,
        "recipe": cfg.name,
        "step": trainer.global_step,
        "tokens": tokens,
        "seed": int(cfg.seed),
    }
    save_model_dir(run_dir / "model", lm.model, tokenizer, provenance)
    summary = {
        "recipe": cfg.name,
        "quant": qcfg.method,
        "val_loss": round(val_loss, 4),
        "val_ppl": round(math.exp(min(val_loss, 50.0)), 3),
        **({"val_general_loss": round(general_loss, 4), "val_general_ppl": round(math.exp(min(general_loss, 50.0)), 3)}
           if not math.isnan(general_loss) else {}),
        **({"teacher_corpus": {"fraction": dcfg.teacher_corpus.fraction, "tokens": len(teacher_tokens)}}
           if teacher_tokens is not None else {}),
        "steps": trainer.global_step,
        "tokens": tokens,
        "train_seconds": round(train_seconds, 1),
        **({"convert_seconds": convert_seconds} if convert_seconds is not None else {}),  # before training, not in it
        "precision": str(trainer.precision),
        "params": lm.model.num_parameters(),
        "run_dir": str(run_dir),
    }
    _record_and_report(summary, run_dir)
    if cfg.sample_prompt:
        print("\n--- sample ---\n" + _sample(lm.model, tokenizer, cfg.sample_prompt, int(cfg.sample_tokens), int(cfg.seed)))
    return summary


def _validated(results: list[dict], key: str) -> float:
    """A metric from trainer.validate's list (one dict per validation dataloader); nan when absent."""
    return next((float(r[key]) for r in results or [] if key in r), float("nan"))


def _teacher_corpus(dcfg, distill: DistillConfig, mcfg_raw: dict, tokenizer, max_seq_len: int):
    """-> ((teacher, its tokenizer), the teacher corpus's tokens): the distillation teacher (distill.teacher,
    else the run's source model, at quant none) writes the corpus, or its cache gives it."""
    from .distill import check_tokenizers_match, load_teacher
    from .teacher_corpus import teacher_corpus_tokens

    if tokenizer is None:
        raise ConfigError("data.teacher_corpus.fraction > 0 needs the teacher's tokenizer: fine-tune a model "
                          "(model.init_from) with data.tokenizer=model")
    teacher, teacher_tokenizer = load_teacher(distill, mcfg_raw, max_seq_len, build_source_model)
    check_tokenizers_match(teacher_tokenizer, tokenizer)
    tc = dcfg.teacher_corpus
    root = tc.dir or (str(Path(dcfg.cache_dir) / "teacher_corpus") if dcfg.cache_dir else None)
    return (teacher, teacher_tokenizer), teacher_corpus_tokens(tc, root, teacher, tokenizer)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run at 4x (Zen 4, measured) to 8x (AMX) fp32 there."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, accelerator: str) -> tuple[str, str]:
    """trainer.precision -> (what Lightning runs, why). "auto": bf16-mixed on a GPU and on CPUs with
    native bf16, 32-true on other CPUs (emulated bf16 matmuls are slower than fp32 there). bf16-mixed
    keeps the quantization contract: codes and scales are computed in fp32 and the integer products
    are exact in bf16 (bench/README.md, "Training speed")."""
    if precision != "auto":
        return precision, "as configured"
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        return "bf16-mixed", "GPU"
    if cpu_has_native_bf16():
        return "bf16-mixed", "the CPU has native bf16 (AVX-512 BF16 or AMX)"
    return "32-true", "the CPU has no native bf16"


def _make_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    t, c = cfg.trainer, cfg.callbacks
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=int(c.checkpoint_every_n_steps),
            save_top_k=0,  # only last.ckpt: the newest state, replaced atomically
            save_last=True,
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    bar = progress_kind(str(c.progress_bar), sys.stderr.isatty())
    if bar == "rich":
        callbacks.append(RichProgressBar(leave=True))
    elif bar == "tqdm":
        callbacks.append(TQDMProgressBar())
    elif bar == "plain":
        callbacks.append(PlainProgress(float(c.get("progress_interval_s", 30))))
    if c.get("flip_rate_every_n_steps"):
        callbacks.append(TernaryFlipRate(int(c.flip_rate_every_n_steps)))
    if cfg.debug_kill_at_step:
        callbacks.append(KillAtStep(int(cfg.debug_kill_at_step)))

    loggers = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if cfg.logger.kind == "wandb":
        wandb_logger = _wandb_logger(cfg, run_dir)
        if wandb_logger is not None:
            loggers.insert(0, wandb_logger)

    precision, why = resolve_precision(str(t.precision), str(t.accelerator))
    if str(t.precision) == "auto":
        print(f"trainer.precision auto -> {precision} ({why})")
    return L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        max_steps=int(t.max_steps),
        max_epochs=-1,
        val_check_interval=int(t.val_check_interval),
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=int(t.num_sanity_val_steps),
        gradient_clip_val=None,  # done by the module: see train()
        accumulate_grad_batches=int(t.accumulate_grad_batches),
        log_every_n_steps=int(t.log_every_n_steps),
        callbacks=callbacks,
        logger=loggers,
        enable_progress_bar=bar in ("rich", "tqdm"),
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        deterministic=False,
    )


def _wandb_logger(cfg: DictConfig, run_dir: Path):
    try:
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(
            project=cfg.logger.project,
            name=f"{cfg.name}-{cfg.quant.method}",
            save_dir=str(run_dir),
            offline=cfg.logger.mode != "online",
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    except Exception as e:  # noqa: BLE001 - wandb is optional: fall back to CSV
        print(f"warning: wandb logger unavailable ({e}); logging to CSV only")
        return None


def _record_and_report(summary: dict, run_dir: Path) -> None:
    """Append to runs/results.jsonl beside the run and print this recipe's runs side by side
    (ternary vs full precision under the same recipe)."""
    results = _results_file(run_dir)
    with results.open("a") as f:
        f.write(json.dumps(summary) + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    latest: dict[str, dict] = {}
    for r in rows:
        if r.get("recipe") == summary["recipe"]:
            latest[r["quant"]] = r
    print(f"\n{'recipe':<26}{'quant':<8}{'val ppl':>10}{'general ppl':>13}{'tokens':>12}{'train s':>10}")
    for q, r in sorted(latest.items()):
        general = f"{r['val_general_ppl']:>13.2f}" if r.get("val_general_ppl") is not None else f"{'-':>13}"
        print(f"{r['recipe']:<26}{q:<8}{r['val_ppl']:>10.2f}{general}{r['tokens']:>12}{r['train_seconds']:>10.1f}")
    print(f"model written to {run_dir / 'model'}")


def _results_file(run_dir: Path) -> Path:
    # runs/<name>-<quant>/<stamp> -> runs/results.jsonl; an explicit run_dir -> its parent
    parent = run_dir.parent.parent if run_dir.parent.parent.name == "runs" else run_dir.parent
    return parent / "results.jsonl"


def _sample(model: BitNetModel, tokenizer, prompt: str, n: int, seed: int) -> str:
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(ids, n, temperature=0.8, top_k=50, generator=g)
    return tokenizer.decode(out[0].tolist())
