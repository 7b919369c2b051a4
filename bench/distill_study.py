"""Fidelity study: how much of the full-precision quality each fine-tuning recipe recovers.

Arms (all from the same full-precision source, same data, same validation on held-out plays):
  plain_qat    ternary QAT with plain CE                     (recipe smollm2_135m_1p58)
  qat_kd       ternary QAT with CE + logit KD                (same + distill=kd)
  full_recipe  SubLN + continued pretraining, then KD + attention relations
                                                             (recipe smollm2_135m_1p58_distill)
  fp_finetune  the same fine-tune in full precision          (smollm2_135m_1p58 with quant=none)
Not in the default set: plain_qat_no_warmup and qat_kd_no_warmup (no lambda warm-up), distill_only
(the full recipe without its CE stage: distillation from the first step), and full_recipe_mix (the full
recipe with --teacher-fraction of its training blocks from the teacher-written corpus,
data.teacher_corpus; generated once and cached, the generation is not in its train seconds),
full_recipe_ft_teacher (distils from the fp_finetune arm's model), full_recipe_hidden (+ hidden-state
loss), full_recipe_gptq / full_recipe_gptq_recon (GPTQ-style ternary codes before training, then
block-wise reconstruction; the conversion's seconds count in the arm's train seconds; _mix: with the
teacher corpus as full_recipe_mix), and
full_recipe_lr5e-4 / full_recipe_lr2e-3 / full_recipe_wd0 / full_recipe_ramp (a lambda ramp over half the CE
stage instead of quantized from step 0) / full_recipe_weight_only_first (the CE stage with ternary weights and
full-precision activations) / full_recipe_learned_scale (quant.learnable_scale: a trained s_w per tensor).

Modes:
  --mode tokens  every arm trains the same number of steps (same tokens): the number of steps
                 the slowest arm fits into --budget-minutes;
  --mode time    every arm trains for about --budget-minutes: steps = budget / its own s/step.
Seconds per step come from a short probe run of each arm (--probe-steps), unless --steps is given.

Writes <out>/distill_study.md, .json (val ppl on the held-out plays, tokens, wall time per arm)
and distill_study.png (val ppl against training tokens, from each run's logs/metrics.csv). Each
final model is also scored on --test-blocks held-out blocks that validation never reads ("test
ppl"): settings picked on validation can't flatter that figure; and on the whole held-out general
English set (bitnet_train/general_set.py, "general ppl"), beside the full-precision source model's
figures on the same blocks (the "source" line; --no-source skips it). `--rescore DIR` adds them to an
earlier study, and `--plot DIR... --out FILE.png` draws several studies in one plot. Finished
arms' checkpoints are removed unless --keep-checkpoints.

    python bench/distill_study.py --budget-minutes 25            # the real study (SmolLM2, CPU)
    python bench/distill_study.py --budget-minutes 30 --gpu      # on a GPU
    python bench/distill_study.py --tiny                         # ~20 s: tiny teacher, 12 steps per arm

--tiny first trains a tiny full-precision "source" (no SubLN) from scratch on the plays, then runs
the four arms from it: it checks the pipeline, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

ARMS = {
    "plain_qat": {"recipe": "smollm2_135m_1p58", "extra": []},
    "qat_kd": {"recipe": "smollm2_135m_1p58", "extra": ["distill=kd"]},
    "full_recipe": {"recipe": "smollm2_135m_1p58_distill", "extra": []},
    "fp_finetune": {"recipe": "smollm2_135m_1p58", "extra": ["quant=none"]},
    # not in the default set: plain QAT without the recipe's lambda warm-up (20 steps), which takes a
    # whole short run to reach full ternary
    "plain_qat_no_warmup": {"recipe": "smollm2_135m_1p58", "extra": ["quant.lambda_warmup_steps=0"]},
    "qat_kd_no_warmup": {"recipe": "smollm2_135m_1p58", "extra": ["distill=kd", "quant.lambda_warmup_steps=0"]},
    # the full recipe without its CE stage: SubLN insertion, then KD + attention relations from the first step
    "distill_only": {"recipe": "smollm2_135m_1p58_distill", "extra": ["stages=null"]},
    # the full recipe, --teacher-fraction of its training blocks from the teacher-written corpus (both stages)
    "full_recipe_mix": {"recipe": "smollm2_135m_1p58_distill", "extra": [], "staged": True, "teacher_mix": True},
    # the full recipe distilling from the fp fine-tune on the same text (BitDistill's task-fine-tuned teacher):
    # the fp_finetune arm's model, run first in the same study, or --teacher-dir
    "full_recipe_ft_teacher": {"recipe": "smollm2_135m_1p58_distill", "extra": [], "staged": True,
                               "teacher_from": "fp_finetune"},
    # the full recipe plus a per-layer hidden-state loss (cosine to the teacher's residual stream, every layer)
    # issue 17, 1.3: GPTQ-style ternary codes on calibration activations, then block-wise reconstruction
    # (the recipe converts with gptq + 20 reconstruction steps since session 10; _round is the recipe before)
    "full_recipe_round": {"recipe": "smollm2_135m_1p58_distill", "extra": ["convert.method=round",
                                                                          "convert.recon_steps=0"], "staged": True},
    "full_recipe_gptq": {"recipe": "smollm2_135m_1p58_distill", "extra": ["convert.recon_steps=0"], "staged": True},
    "full_recipe_gptq_recon": {"recipe": "smollm2_135m_1p58_distill",
                               "extra": ["convert.method=gptq", "convert.recon_steps=20"], "staged": True},
    "full_recipe_gptq_recon_mix": {"recipe": "smollm2_135m_1p58_distill",
                                   "extra": ["convert.method=gptq", "convert.recon_steps=20"], "staged": True,
                                   "teacher_mix": True},
    # issue 17, 1.4: the schedule for tiny budgets (the recipe: lr 1e-3, weight decay 0.05, quantized from step 0)
    "full_recipe_lr5e-4": {"recipe": "smollm2_135m_1p58_distill", "extra": ["optim.lr=5e-4"], "staged": True},
    "full_recipe_lr2e-3": {"recipe": "smollm2_135m_1p58_distill", "extra": ["optim.lr=2e-3"], "staged": True},
    "full_recipe_weight_only_first": {"recipe": "smollm2_135m_1p58_distill", "extra": [], "staged": True,
                                      "weight_only_stage1": True},
    "full_recipe_ramp": {"recipe": "smollm2_135m_1p58_distill", "extra": [], "staged": True, "ramp_stage1": True},
    "full_recipe_wd0": {"recipe": "smollm2_135m_1p58_distill", "extra": ["optim.weight_decay=0"], "staged": True},
    "full_recipe_hidden": {"recipe": "smollm2_135m_1p58_distill", "extra": ["distill.hidden_weight=1.0"],
                           "staged": True},
    # a learnable per-tensor scale (LSQ-style, trained in log space, exported as s_w) instead of mean|W|
    "full_recipe_learned_scale": {"recipe": "smollm2_135m_1p58_distill", "extra": ["quant.learnable_scale=true"],
                                  "staged": True},
}
DEFAULT_ARMS = ["plain_qat", "qat_kd", "full_recipe", "fp_finetune"]
DEFAULT_BUDGET_MINUTES = 25.0
TINY_STEPS = 12  # --tiny without --steps or --budget-minutes
STAGE1_FRACTION = 0.2  # full recipe: continued pretraining share of the steps (as in the recipe); --stage1-fraction
TEACHER_FRACTION = 0.25  # full_recipe_mix: share of the training blocks from the teacher corpus; --teacher-fraction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-minutes", type=float, default=None,
                   help=f"training wall time per arm (default {DEFAULT_BUDGET_MINUTES}; with --tiny and no --steps, "
                        f"{TINY_STEPS} steps per arm instead)")
    p.add_argument("--mode", choices=("tokens", "time"), default="tokens")
    p.add_argument("--steps", type=int, default=None, help="skip the probes: this many steps per arm (tokens mode)")
    p.add_argument("--probe-steps", type=int, default=4)
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated, from " + ",".join(ARMS))
    p.add_argument("--batch-size", type=int, default=8,
                   help="blocks per step for every arm (the recipes differ: 4 and 8), so equal steps are equal tokens")
    p.add_argument("--val-batches", type=int, default=4, help="validation batches (of --batch-size blocks)")
    p.add_argument("--val-points", type=int, default=5, help="validations during each run (the plot's points)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--gpu", action="store_true", help="trainer=gpu precision bf16-mixed, the teacher in bf16")
    p.add_argument("--tiny", action="store_true", help="tiny teacher and model, a few steps: checks the pipeline")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/distill_study/<stamp>)")
    p.add_argument("--stage1-fraction", type=float, default=STAGE1_FRACTION,
                   help="full recipe: the continued-pretraining share of its steps (the rest is distillation)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished arm's Lightning checkpoints (about 1.6 GB per stage for SmolLM2; by "
                        "default they are removed once the arm's model and metrics are written)")
    p.add_argument("--test-blocks", type=int, default=64,
                   help="after each arm, score its final model on this many held-out blocks that validation never "
                        "read (the blocks after validation's; 0: skip)")
    p.add_argument("--teacher-dir", type=Path, default=None,
                   help="full_recipe_ft_teacher: the fp fine-tuned teacher's model/ directory (default: this "
                        "study's fp_finetune arm)")
    p.add_argument("--teacher-fraction", type=float, default=TEACHER_FRACTION,
                   help="full_recipe_mix: the share of its training blocks from the teacher-written corpus")
    p.add_argument("--general-blocks", type=int, default=None,
                   help="score each final model on the first N blocks of the held-out general English set "
                        "(default: all of it; 0: skip)")
    p.add_argument("--no-source", action="store_true",
                   help="do not score the full-precision source model (the reference line of the report)")
    p.add_argument("--rescore", type=Path, default=None, metavar="DIR",
                   help="train nothing: add the --test-blocks figure to the study in DIR (its distill_study.json) "
                        "and write its report again")
    p.add_argument("--plot", type=Path, nargs="+", default=None, metavar="DIR",
                   help="train nothing: draw the curves of the studies in these directories in one PNG (--out FILE)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides for every arm")
    p.add_argument("--stage1-lr", type=float, default=None,
                   help="full recipe: the continued-pretraining stage's peak lr (default: the recipe's optim.lr)")
    p.add_argument("--stage1-warmup-steps", type=int, default=None,
                   help="full recipe: the continued-pretraining stage's lr warm-up steps (default: the recipe's "
                        "optim.warmup_steps; a stage shorter than that never reaches its peak lr)")
    p.add_argument("--seconds-per-step-from", type=Path, nargs="+", default=None, metavar="JSON",
                   help="skip the probes: seconds per step of each arm from earlier studies' distill_study.json "
                        "(train seconds / steps, measured on a quiet machine); an arm NAME_no_warmup that none "
                        "of them ran takes NAME's figure (the warm-up does not change the work per step)")
    args = p.parse_args(argv)
    if args.tiny and args.steps is None and args.budget_minutes is None:
        args.steps = TINY_STEPS  # a pipeline check: the default budget would give tiny arms thousands of steps
    if args.budget_minutes is None:
        args.budget_minutes = DEFAULT_BUDGET_MINUTES
    if args.stage1_lr is not None and not args.stage1_lr > 0:
        p.error(f"--stage1-lr must be > 0, got {args.stage1_lr}")
    if args.test_blocks < 0 or (args.rescore and args.test_blocks == 0):
        p.error(f"--test-blocks must be >= 0 (> 0 with --rescore), got {args.test_blocks}")
    if args.plot and (args.out is None or args.out.suffix != ".png"):
        p.error("--plot needs --out FILE.png")
    if args.stage1_warmup_steps is not None and args.stage1_warmup_steps < 0:
        p.error(f"--stage1-warmup-steps must be >= 0, got {args.stage1_warmup_steps}")
    if not 0.0 < args.teacher_fraction < 1.0:
        p.error(f"--teacher-fraction must be in (0, 1), got {args.teacher_fraction}")
    if args.general_blocks is not None and args.general_blocks < 0:
        p.error(f"--general-blocks must be >= 0, got {args.general_blocks}")
    if not 0.0 < args.stage1_fraction < 1.0:
        p.error(f"--stage1-fraction must be in (0, 1), got {args.stage1_fraction}")
    return args


# -- running arms ----------------------------------------------------------------------------------

def arm_overrides(arm: str, steps: int, run_dir: Path, common: list[str], val_every: int,
                  stage1_fraction: float = STAGE1_FRACTION, stage1_lr: float | None = None,
                  stage1_warmup_steps: int | None = None, teacher_fraction: float = TEACHER_FRACTION,
                  teacher_dir: Path | None = None) -> list[str]:
    """The config overrides of one arm: its recipe, `steps` steps in all (the full recipe split in two stages).
    teacher_dir: the distillation teacher of an arm with "teacher_from" (None: the recipe's own, as in a probe)."""
    spec = ARMS[arm]
    overrides = [f"recipe={spec['recipe']}", *spec["extra"], f"run_dir={run_dir}", *common,
                 f"trainer.val_check_interval={max(1, val_every)}"]
    if spec.get("teacher_from") and teacher_dir is not None:
        overrides.append(f"distill.teacher={teacher_dir}")
    if spec.get("teacher_mix"):  # after `common`: the arm's own fraction wins
        overrides.append(f"data.teacher_corpus.fraction={teacher_fraction}")
    if not spec.get("staged", arm == "full_recipe"):
        return [*overrides, f"trainer.max_steps={steps}"]
    s1 = max(1, round(steps * stage1_fraction))
    s2 = max(1, steps - s1)
    optim1 = {k: v for k, v in {"lr": stage1_lr, "warmup_steps": stage1_warmup_steps}.items() if v is not None}
    optim1_yaml = f", optim: {{{', '.join(f'{k}: {v}' for k, v in optim1.items())}}}" if optim1 else ""
    if spec.get("ramp_stage1"):  # the lambda ramp (HF's fine-tuning recipe) over the first half of the CE stage
        optim1_yaml += f", quant: {{lambda_warmup_steps: {max(1, s1 // 2)}}}"
    if spec.get("weight_only_stage1"):  # full-precision activations through the CE stage, int8 from distillation on
        optim1_yaml += f", quant: {{act_quant_from_step: {s1}}}"
    return [*overrides,
            f"stages=[{{stage: continued_pretraining, trainer: {{max_steps: {s1}, val_check_interval: {max(1, min(val_every, s1))}}},"
            f" distill: {{enabled: false}}{optim1_yaml}}}, {{stage: distillation, trainer: {{max_steps: {s2},"
            f" val_check_interval: {max(1, min(val_every, s2))}}}, optim: {{warmup_steps: {min(5, s2)}}}}}]"]


def arm_teacher_dir(arm: str, out: Path, teacher_dir: Path | None) -> Path | None:
    """The teacher an arm with "teacher_from" distils from: --teacher-dir, else that arm's model in this study."""
    dep = ARMS[arm].get("teacher_from")
    if not dep:
        return None
    d = teacher_dir or out / dep / "model"
    if not (d / "config.json").is_file() and not (d / "model.safetensors").is_file():
        raise SystemExit(f"error: arm {arm} distils from the {dep} arm's model, and {d} holds none: list {dep} "
                         f"before {arm} in --arms, or pass --teacher-dir DIR")
    return d


def run_arm(arm: str, steps: int, run_dir: Path, common: list[str], val_every: int, **stage1) -> dict:
    """Train one arm (see arm_overrides; `stage1` takes its stage1_* keywords) and collect its figures."""
    from bitnet_train.config import compose_config
    from bitnet_train.train import run

    overrides = arm_overrides(arm, steps, run_dir, common, val_every, **stage1)
    os.environ.pop("BITNET_RUN_DIR", None)
    t0 = time.time()
    summary = run(compose_config(overrides))
    wall = time.time() - t0
    os.environ.pop("BITNET_RUN_DIR", None)
    stages = summary.get("stages") or [summary]
    return {
        "arm": arm,
        "steps": sum(s["steps"] for s in stages),
        "tokens": sum(s["tokens"] for s in stages),
        # the conversion before training (convert.method=gptq) is part of the arm's budget
        "train_seconds": round(sum(s["train_seconds"] + s.get("convert_seconds", 0.0) for s in stages), 1),
        "convert_seconds": sum(s.get("convert_seconds", 0.0) for s in stages),
        "wall_seconds": round(wall, 1),
        "val_loss": summary["val_loss"],
        "val_ppl": summary["val_ppl"],
        "val_general_ppl": summary.get("val_general_ppl"),
        "teacher_corpus": summary.get("teacher_corpus"),
        "curve": val_curve(run_dir, stages),
        "run_dir": str(run_dir),
    }


def val_curve(run_dir: Path, stages: list[dict]) -> list[tuple[int, float]]:
    """(tokens, val ppl) points from each stage's logs/metrics.csv, stages laid end to end."""
    points: dict[int, float] = {}
    offset_tokens = 0
    dirs = [Path(s["run_dir"]) for s in stages] if len(stages) > 1 else [run_dir]
    for stage, d in zip(stages, dirs):
        tokens_per_step = stage["tokens"] / max(1, stage["steps"])
        metrics = d / "logs" / "metrics.csv"
        if metrics.is_file():
            with metrics.open() as f:
                for row in csv.DictReader(f):
                    if row.get("val/ppl"):  # logged at step k-1 after k steps; the final validate at k
                        done = min(int(row["step"]) + 1, stage["steps"])
                        points[int(offset_tokens + done * tokens_per_step)] = float(row["val/ppl"])
        points[offset_tokens + stage["tokens"]] = math.exp(min(stage["val_loss"], 50.0))
        offset_tokens += stage["tokens"]
    return sorted(points.items())


def final_stage_dir(run_dir: Path) -> Path:
    """The directory whose model/ is an arm's final model: run_dir, or its last stageN/ for a staged recipe."""
    stages = sorted(run_dir.glob("stage[0-9]*"), key=lambda p: int(p.name[5:]))
    return stages[-1] if stages else run_dir


def mean_ce(model, blocks, indices: range, batch: int = 8) -> tuple[float, int]:
    """(mean next-token CE, target count) of `model` over blocks[i] for i in indices."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(indices.start, indices.stop, batch):
            xs, ys = zip(*(blocks[i] for i in range(start, min(start + batch, indices.stop))))
            targets = torch.stack(ys)
            total += model.loss(torch.stack(xs), targets).item() * targets.numel()  # mean CE -> sum
            count += targets.numel()
    return total / count, count


def score_model(model, tokenizer, cfg, blocks: int, general_blocks: int | None, val: bool = False) -> dict:
    """A model's figures under an arm's config: test ppl (the `blocks` held-out blocks after the ones
    validation reads), general ppl (the general English set's first `general_blocks` blocks, all for None,
    none for 0) and, with val, the val ppl on the blocks validation reads."""
    from omegaconf import OmegaConf

    from bitnet_train.data import DataConfig, TextDataModule, general_validation_blocks

    seen = int(cfg.trainer.limit_val_batches) * int(cfg.data.batch_size)
    data = {**OmegaConf.to_container(cfg.data, resolve=True), "max_val_tokens": None, "general_val": False,
            "teacher_corpus": {}}
    dm = TextDataModule(DataConfig(**data, seed=int(cfg.seed)), tokenizer=tokenizer)
    dm.setup()
    out = {}
    if blocks:
        available = len(dm.val_blocks) - seen
        if available < blocks:
            raise SystemExit(f"error: --test-blocks {blocks}: the held-out plays have {len(dm.val_blocks)} blocks and "
                             f"validation reads the first {seen}, so at most {max(0, available)} are left")
        ce, count = mean_ce(model, dm.val_blocks, range(seen, seen + blocks))
        out.update({"test_ppl": math.exp(ce), "test_tokens": count, "test_first_block": seen})
    if val:
        ce, count = mean_ce(model, dm.val_blocks, range(min(seen, len(dm.val_blocks))))
        out["val_ppl"] = math.exp(ce)
    if general_blocks != 0:
        general = general_validation_blocks(tokenizer, int(cfg.data.block_size))
        n = len(general) if general_blocks is None else min(general_blocks, len(general))
        ce, count = mean_ce(model, general, range(n))
        out.update({"test_general_ppl": math.exp(ce), "test_general_tokens": count})
    return out


def test_ppl(run_dir: Path, blocks: int, batch: int = 8, general_blocks: int | None = 0) -> dict:
    """Perplexity of an arm's final model on held-out blocks that validation never saw.

    Validation (limit_val_batches × data.batch_size blocks) reads the start of the held-out plays; the
    study picks settings on it. These are the next `blocks` blocks of the same plays, read with the
    arm's own saved config.yaml, so the figure is free of that choice. general_blocks: also score the
    held-out general English set (score_model)."""
    from omegaconf import OmegaConf

    from bitnet_train.model_dir import load_model_dir

    stage = final_stage_dir(run_dir)
    cfg = OmegaConf.load(stage / "config.yaml")
    model, tokenizer, _ = load_model_dir(stage / "model")
    return score_model(model, tokenizer, cfg, blocks, general_blocks)


def source_scores(common: list[str], blocks: int, general_blocks: int | None) -> dict:
    """The full-precision source model, untrained, scored as the arms are: the report's reference line."""
    from omegaconf import OmegaConf

    from bitnet_train.config import compose_config
    from bitnet_train.model import QuantConfig
    from bitnet_train.train import build_source_model

    cfg = compose_config([f"recipe={ARMS['plain_qat']['recipe']}", *common])
    model, tokenizer, _ = build_source_model(OmegaConf.to_container(cfg.model, resolve=True), QuantConfig(method="none"))
    model.eval()
    return {"arm": "source (full precision, untrained)", **score_model(model, tokenizer, cfg, blocks, general_blocks,
                                                                      val=True)}


def seconds_per_step(arm: str, probe_steps: int, out: Path, common: list[str]) -> float:
    """Probe: a short run of the arm (for the full recipe, its costlier distillation stage alone)."""
    r = run_arm("distill_only" if arm == "full_recipe" else arm, probe_steps, out / "probes" / arm,
                [*common, f"callbacks.checkpoint_every_n_steps={probe_steps + 1}"], val_every=probe_steps + 1)
    prune_checkpoints(out / "probes" / arm)
    return per_step(r)


def prune_checkpoints(run_dir: Path) -> int:
    """Remove the *.ckpt files under a finished arm's run_dir (its model/ and metrics stay); return the bytes freed.

    They exist for resuming an interrupted run. A SmolLM2 checkpoint holds the weights and AdamW's two moments,
    about 1.6 GB per stage, so a full study left 4 to 6 GB per arm on disk."""
    freed = 0
    for ckpt in sorted(run_dir.rglob("*.ckpt")):
        freed += ckpt.stat().st_size
        ckpt.unlink()
    return freed


def per_step(result: dict) -> float:
    """Training seconds per step of one arm's result (a run_arm dict or a row of distill_study.json)."""
    return result["train_seconds"] / max(1, result["steps"])


def seconds_per_step_from(paths: list[Path], arms: list[str]) -> dict[str, float]:
    """Seconds per step of each arm from earlier studies' JSON (train seconds / steps)."""
    known: dict[str, float] = {}
    for path in paths:
        try:
            rows = json.loads(path.read_text())
            rows = rows["results"] if isinstance(rows, dict) else rows
            known.update({r["arm"]: per_step(r) for r in rows})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: cannot read seconds per step from {path}: {e}")
    for a in arms:
        base = a.removesuffix("_no_warmup")
        if a not in known and base != a and base in known:
            known[a] = known[base]
    missing = [a for a in arms if a not in known]
    if missing:
        raise SystemExit(f"error: no result for arm(s) {missing} in {[str(p) for p in paths]} (they have {sorted(known)})")
    return {a: known[a] for a in arms}


# -- tiny mode ---------------------------------------------------------------------------------------

def tiny_setup(out: Path, threads: int) -> list[str]:
    """Train a tiny full-precision source (no SubLN) and return the overrides that point every arm at it."""
    from bitnet_train.config import compose_config
    from bitnet_train.train import run

    cache = out / "cache"
    source = out / "tiny_source"
    shape = {"model.hidden_size": 64, "model.intermediate_size": 128, "model.num_layers": 2,
             "model.num_heads": 4, "model.num_kv_heads": 2, "model.max_seq_len": 64}
    data = {"data.block_size": 64, "data.batch_size": 4, "data.cache_dir": str(cache), "data.max_val_tokens": 4096,
            "trainer.threads": threads, "logger": "csv", "callbacks.progress_bar": "none", "sample_prompt": "null"}
    run(compose_config([f"{k}={v}" for k, v in {
        **shape, **data, "name": "tiny_source", "run_dir": str(source), "quant": "none", "model.norm": "none",
        "data.tokenizer": "train_bpe", "data.bpe_vocab_size": 512, "data.max_train_tokens": 50000,
        "trainer.max_steps": 40, "trainer.val_check_interval": 40, "trainer.limit_val_batches": 2,
        "optim.lr": 3e-3, "optim.warmup_steps": 4}.items()]))
    os.environ.pop("BITNET_RUN_DIR", None)
    prune_checkpoints(source)
    arm = {"model.init_from": str(source / "model"), "model.gguf_file": "null", "model.max_seq_len": 64,
           "data.max_train_tokens": 50000, "optim.warmup_steps": 2, "quant.lambda_warmup_steps": 2,
           "callbacks.checkpoint_every_n_steps": 1000}
    return [f"{k}={v}" for k, v in {**data, **arm}.items()]


# -- report ------------------------------------------------------------------------------------------

def write_report(results: list[dict], out: Path, meta: dict) -> None:
    # the baseline: plain QAT without the lambda warm-up where it ran (the warm-up takes a whole short run), else
    # the shipped plain-QAT recipe
    base = next((r for r in results if r["arm"] == "plain_qat_no_warmup"), None) or next(
        (r for r in results if r["arm"] == "plain_qat"), None)
    fp = next((r for r in results if r["arm"] == "fp_finetune"), None)
    lines = [
        f"# Distillation fidelity study ({meta['mode']} mode{', tiny' if meta['tiny'] else ''})",
        "",
        f"{meta['device']}; " + (f"{meta['fixed_steps']} steps per arm (--steps)" if meta.get("fixed_steps")
                                  else f"budget {meta['budget_minutes']} min per arm") + "; validation: held-out plays, "
        f"{meta['val_batches']} batches; command: `{meta['command']}`",
        "",
        f"| arm | steps | tokens | train s | wall s | val ppl | × {base['arm'] if base else 'plain QAT'} | × fp fine-tune "
        f"| test ppl | test × {base['arm'] if base else 'plain QAT'} | general ppl | general × source |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    source = meta.get("source")

    def ratio(r: dict, ref: dict | None, key: str) -> str:
        return f"{r[key] / ref[key]:.3f}" if ref and r.get(key) and ref.get(key) else "-"

    def fmt(r: dict, key: str) -> str:
        return f"{r[key]:.2f}" if r.get(key) else "-"

    if source:
        lines.append(f"| {source['arm']} | 0 | 0 | - | - | {fmt(source, 'val_ppl')} | - | - | {fmt(source, 'test_ppl')} "
                     f"| - | {fmt(source, 'test_general_ppl')} | 1.000 |")
    for r in results:
        lines.append(f"| {r['arm']} | {r['steps']} | {r['tokens']} | {r['train_seconds']} | {r['wall_seconds']} | "
                     f"{r['val_ppl']:.2f} | {ratio(r, base, 'val_ppl')} | {ratio(r, fp, 'val_ppl')} | {fmt(r, 'test_ppl')} | "
                     f"{ratio(r, base, 'test_ppl')} | {fmt(r, 'test_general_ppl')} | "
                     f"{ratio(r, source, 'test_general_ppl')} |")
    tested = next((r for r in results if r.get("test_ppl")), None)
    if tested:
        lines += ["", f"test: {tested['test_tokens']} tokens of the held-out plays from block {tested['test_first_block']}"
                      " on, which validation never read (settings were picked on validation)"]
    general = next((r for r in results if r.get("test_general_tokens")), None)
    if general:
        lines += ["", f"general: {general['test_general_tokens']} tokens of held-out general English (package "
                      "documentation, bitnet_train/texts/general_english.txt), which no arm trains on"]
    (out / "distill_study.md").write_text("\n".join(lines) + "\n")
    (out / "distill_study.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print("\n".join(lines))

    plot_curves([(r["arm"], r["curve"]) for r in results], out / "distill_study.png",
                f"distillation study, {meta['mode']} mode" + (" (tiny)" if meta["tiny"] else ""))
    print(f"\nwrote {out / 'distill_study.md'}, .json, .png")


def plot_curves(curves: list[tuple[str, list]], path: Path, title: str, styles: list[dict] | None = None) -> None:
    """Val ppl against training tokens, one line per (label, [(tokens, ppl), ...]); `styles`: matplotlib line
    keywords per curve (default: a marker, and the colour cycle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5) if len(curves) <= 6 else (9, 5.5))
    for i, (label, curve) in enumerate(curves):
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, label=label, **(styles[i] if styles else {"marker": "o"}))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val perplexity (held-out plays)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_studies(dirs: list[Path], path: Path) -> int:
    """--plot: the curves of several studies in one PNG, labelled DIR_NAME/ARM: one colour per arm, one line
    style and marker per study, so more than ten curves stay apart."""
    curves, styles, arm_colours = [], [], {}
    for n, d in enumerate(dirs):
        try:
            results = json.loads((d / "distill_study.json").read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --plot {d}: cannot read its distill_study.json: {e}")
        for r in results:
            curves.append((f"{d.name}/{r['arm']}", r["curve"]))
            colour = arm_colours.setdefault(r["arm"], f"C{len(arm_colours) % 10}")
            styles.append({"color": colour, "linestyle": ("-", "--", ":", "-.")[n % 4], "marker": "osv^Dpx*"[n % 8]})
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, path, "distillation studies", styles)
    print(f"wrote {path}")
    return 0


def rescore(out: Path, blocks: int, general_blocks: int | None = None) -> int:
    """--rescore: score every arm of an earlier study on the test blocks and the general set, then write its
    report again."""
    try:
        report = json.loads((out / "distill_study.json").read_text())
        results, meta = report["results"], report["meta"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --rescore {out}: cannot read its distill_study.json: {e}")
    for r in results:
        run_dir = Path(r["run_dir"])
        if not (final_stage_dir(run_dir) / "model" / "model.safetensors").is_file():
            raise SystemExit(f"error: --rescore {out}: arm {r['arm']} has no final model under {run_dir}")
        r.update(test_ppl(run_dir, blocks, general_blocks=general_blocks))
        general = f", general ppl {r['test_general_ppl']:.2f}" if r.get("test_general_ppl") else ""
        print(f"{r['arm']}: test ppl {r['test_ppl']:.2f} over {r['test_tokens']} tokens{general}")
    write_report(results, out, meta)
    return 0


def common_overrides(args, threads: int) -> list[str]:
    """The config overrides every arm shares (before --tiny's and the command line's)."""
    common = ["logger=csv", "callbacks.progress_bar=none", f"trainer.threads={threads}", f"data.batch_size={args.batch_size}",
              f"trainer.limit_val_batches={args.val_batches}", "sample_prompt=null"]
    if args.gpu:
        common += ["trainer=gpu", "trainer.precision=bf16-mixed", "distill.teacher_dtype=bfloat16"]
    return common


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.rescore:
        return rescore(args.rescore, args.test_blocks, args.general_blocks)
    if args.plot:
        return plot_studies(args.plot, args.out)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: unknown arm(s) {unknown}; choose from {list(ARMS)}", file=sys.stderr)
        return 2
    out = (args.out or Path("runs") / "distill_study" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    common = common_overrides(args, threads)
    if args.tiny:
        common += tiny_setup(out, threads)  # its data.batch_size (4) wins over --batch-size
    common += args.overrides

    budget_s = args.budget_minutes * 60
    if args.steps:
        steps = {a: args.steps for a in arms}
        probes = {}
    else:
        if args.seconds_per_step_from:
            probes = seconds_per_step_from(args.seconds_per_step_from, arms)
        else:
            probes = {a: seconds_per_step(a, args.probe_steps, out, common) for a in arms}
        print("seconds per step:", {a: round(s, 3) for a, s in probes.items()})
        if args.mode == "tokens":
            n = max(1, int(budget_s / max(probes.values())))
            steps = {a: n for a in arms}
        else:
            steps = {a: max(1, int(budget_s / probes[a])) for a in arms}
    results = []
    for a in arms:
        print(f"\n##### {a}: {steps[a]} steps")
        r = run_arm(a, steps[a], out / a, common, val_every=max(1, steps[a] // max(1, args.val_points)),
                    stage1_fraction=args.stage1_fraction, stage1_lr=args.stage1_lr,
                    stage1_warmup_steps=args.stage1_warmup_steps, teacher_fraction=args.teacher_fraction,
                    teacher_dir=arm_teacher_dir(a, out, args.teacher_dir))
        r["probe_seconds_per_step"] = probes.get(a)
        if args.test_blocks or args.general_blocks != 0:
            r.update(test_ppl(out / a, args.test_blocks, general_blocks=args.general_blocks))
        if not args.keep_checkpoints:
            freed = prune_checkpoints(out / a)
            if freed:
                print(f"removed {freed / 2**30:.2f} GiB of checkpoints under {out / a} (--keep-checkpoints keeps them)")
        results.append(r)
        (out / "distill_study.partial.json").write_text(json.dumps(results, indent=1))

    device = "GPU" if args.gpu else f"CPU, {threads} thread(s)"
    meta = {"mode": args.mode, "tiny": args.tiny, "budget_minutes": args.budget_minutes, "device": device,
            "fixed_steps": args.steps, "stage1_fraction": args.stage1_fraction,
            "stage1_lr": args.stage1_lr, "stage1_warmup_steps": args.stage1_warmup_steps,
            "seconds_per_step_from": [str(p) for p in args.seconds_per_step_from or []] or None,
            "teacher_fraction": args.teacher_fraction if any(ARMS[a].get("teacher_mix") for a in arms) else None,
            "source": None if args.no_source else source_scores(common, args.test_blocks, args.general_blocks),
            "val_batches": args.val_batches, "command": " ".join(["python", "bench/distill_study.py", *(argv or sys.argv[1:])])}
    write_report(results, out, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
