"""bench/distill_study.py: the --tiny pipeline (report, test ppl, --rescore, --plot, checkpoint pruning), arm configs, option errors and seconds per step from earlier studies."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def study(bench_script):
    return bench_script("distill_study")


@pytest.mark.slow
def test_tiny_study_runs_every_arm_for_a_few_steps(study, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert study.main(["--tiny", "--threads", "1", "--out", str(tmp_path / "s")]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets the process's torch threads
    report = json.loads((tmp_path / "s" / "distill_study.json").read_text())
    arms = [r["arm"] for r in report["results"]]
    assert arms == study.DEFAULT_ARMS
    assert {r["steps"] for r in report["results"]} == {study.TINY_STEPS}
    assert all(r["val_ppl"] > 1 and r["curve"] for r in report["results"])
    assert (tmp_path / "s" / "distill_study.png").stat().st_size > 0
    # every arm wrote its model, and the checkpoints (for resuming) went once the arm was done
    for arm in arms:
        assert list((tmp_path / "s" / arm).rglob("model.safetensors")), arm
    assert not list((tmp_path / "s").rglob("*.ckpt"))
    # each arm was scored on held-out blocks after the ones validation reads (4 batches of 4 blocks)
    assert all(r["test_ppl"] > 1 and r["test_first_block"] == 16 and r["test_tokens"] == 64 * 64
               for r in report["results"])
    assert "test ppl" in (tmp_path / "s" / "distill_study.md").read_text()
    # ... and on the whole general English set, beside the untrained source model on the same blocks
    assert all(r["test_general_ppl"] > 1 and r["val_general_ppl"] > 1 for r in report["results"])
    assert len({r["test_general_tokens"] for r in report["results"]}) == 1
    source = report["meta"]["source"]
    assert source["test_general_tokens"] == report["results"][0]["test_general_tokens"]
    assert source["val_ppl"] > 1 and source["test_first_block"] == 16
    assert "general × source" in (tmp_path / "s" / "distill_study.md").read_text()
    # --rescore scores the saved models again, here on fewer blocks, and rewrites the report
    assert study.main(["--rescore", str(tmp_path / "s"), "--test-blocks", "8", "--threads", "1"]) == 0
    torch.set_num_threads(threads)
    again = json.loads((tmp_path / "s" / "distill_study.json").read_text())["results"]
    assert [r["test_tokens"] for r in again] == [8 * 64] * len(arms)
    assert [r["val_ppl"] for r in again] == [r["val_ppl"] for r in report["results"]]
    with pytest.raises(SystemExit, match="at most"):
        study.test_ppl(tmp_path / "s" / "plain_qat", 100_000)
    # --plot draws several studies' curves in one PNG
    assert study.main(["--plot", str(tmp_path / "s"), str(tmp_path / "s"), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 0
    # one colour per arm, one line style per study
    drawn = {}
    monkeypatch.setattr(study, "plot_curves", lambda curves, path, title, styles: drawn.update(curves=curves, styles=styles))
    study.plot_studies([tmp_path / "s", tmp_path / "s"], tmp_path / "styles.png")
    n = len(arms)
    assert [label for label, _ in drawn["curves"]] == [f"s/{a}" for a in arms] * 2
    colours = [st["color"] for st in drawn["styles"]]
    assert colours[:n] == colours[n:] and len(set(colours)) == n
    assert {st["linestyle"] for st in drawn["styles"][:n]} != {st["linestyle"] for st in drawn["styles"][n:]}
    with pytest.raises(SystemExit) as bad_out:
        study.main(["--plot", str(tmp_path / "s"), "--out", str(tmp_path / "both")])
    assert bad_out.value.code == 2 and "--plot needs --out FILE.png" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read its distill_study.json"):
        study.plot_studies([tmp_path], tmp_path / "x.png")


def test_prune_checkpoints_removes_only_checkpoints(study, tmp_path):
    for rel, size in [("stage1/checkpoints/last.ckpt", 300), ("stage2/checkpoints/step=4.ckpt", 200),
                      ("stage2/model/model.safetensors", 50), ("stage2/logs/metrics.csv", 10)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * size)
    assert study.prune_checkpoints(tmp_path) == 500
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["stage2/logs/metrics.csv", "stage2/model/model.safetensors"]
    assert study.prune_checkpoints(tmp_path) == 0


def test_seconds_per_step_from_earlier_results(study, tmp_path):
    f = tmp_path / "distill_study.json"
    f.write_text(json.dumps({"results": [{"arm": "plain_qat", "train_seconds": 50.0, "steps": 20},
                                         {"arm": "full_recipe", "train_seconds": 90.0, "steps": 30}]}))
    got = study.seconds_per_step_from([f], ["plain_qat_no_warmup", "full_recipe"])
    assert got == {"plain_qat_no_warmup": 2.5, "full_recipe": 3.0}
    with pytest.raises(SystemExit, match=r"no result for arm\(s\) \['qat_kd'\]"):
        study.seconds_per_step_from([f], ["qat_kd"])
    f.write_text("[{")
    with pytest.raises(SystemExit, match="cannot read seconds per step"):
        study.seconds_per_step_from([f], ["plain_qat"])


def test_full_recipe_arm_splits_steps_and_sets_stage1_optim(study, tmp_path):
    from bitnet_train.config import compose_config

    cfg = compose_config(study.arm_overrides("full_recipe", 45, tmp_path / "a", [], val_every=9, stage1_fraction=0.2,
                                             stage1_lr=5e-4, stage1_warmup_steps=3))
    s1, s2 = cfg.stages
    assert (s1.trainer.max_steps, s2.trainer.max_steps) == (9, 36)
    assert (s1.optim.lr, s1.optim.warmup_steps) == (5e-4, 3)
    assert s1.distill.enabled is False and "lr" not in s2.optim and s2.optim.warmup_steps == 5
    # without the options, stage 1 keeps the recipe's optimizer settings
    cfg = compose_config(study.arm_overrides("full_recipe", 30, tmp_path / "b", [], val_every=6))
    assert cfg.stages[0].trainer.max_steps == round(30 * study.STAGE1_FRACTION) and "optim" not in cfg.stages[0]
    plain = compose_config(study.arm_overrides("plain_qat_no_warmup", 30, tmp_path / "c", [], val_every=6))
    assert plain.trainer.max_steps == 30 and not plain.get("stages")


def test_every_arm_composes_for_the_gpu(study, tmp_path):
    from bitnet_train.config import compose_config

    common = study.common_overrides(study.parse_args(["--gpu"]), threads=4)
    for arm in study.ARMS:
        cfg = compose_config(study.arm_overrides(arm, 50, tmp_path / arm, common, val_every=10))
        assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed"), arm
        assert cfg.distill.teacher_dtype == "bfloat16" and cfg.data.batch_size == 8, arm
        assert cfg.quant.method == ("none" if arm == "fp_finetune" else "b1.58"), arm
    assert "trainer=gpu" not in study.common_overrides(study.parse_args([]), threads=4)


@pytest.mark.parametrize("argv, message", [(["--stage1-warmup-steps", "-1"], "--stage1-warmup-steps must be >= 0"),
                                           (["--stage1-lr", "0"], "--stage1-lr must be > 0"),
                                           (["--stage1-fraction", "1"], "--stage1-fraction must be in")])
def test_bad_stage1_options_are_named(study, argv, message, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    assert message in capsys.readouterr().err


def test_distill_only_arm_is_one_distillation_stage_with_subln(study, tmp_path):
    from bitnet_train.config import compose_config

    cfg = compose_config(study.arm_overrides("distill_only", 45, tmp_path / "d", [], val_every=9))
    assert not cfg.get("stages") and cfg.trainer.max_steps == 45
    assert cfg.model.norm == "subln" and cfg.distill.enabled and cfg.distill.attn_weight > 0


def test_rescore_names_what_is_missing(study, tmp_path):
    with pytest.raises(SystemExit, match="cannot read its distill_study.json"):
        study.rescore(tmp_path, 8)
    (tmp_path / "distill_study.json").write_text(json.dumps(
        {"meta": {}, "results": [{"arm": "plain_qat", "run_dir": str(tmp_path / "gone")}]}))
    with pytest.raises(SystemExit, match="arm plain_qat has no final model"):
        study.rescore(tmp_path, 8)
    with pytest.raises(SystemExit):
        study.parse_args(["--rescore", str(tmp_path), "--test-blocks", "0"])
    assert study.final_stage_dir(tmp_path) == tmp_path
    for n in (1, 2, 10):
        (tmp_path / f"stage{n}").mkdir()
    assert study.final_stage_dir(tmp_path) == tmp_path / "stage10"


def test_default_split_is_the_recipes(study):
    from bitnet_train.config import compose_config

    cfg = compose_config(["recipe=smollm2_135m_1p58_distill"])
    steps = [s.trainer.max_steps for s in cfg.stages]
    assert sum(steps) == cfg.trainer.max_steps
    assert steps[0] / sum(steps) == study.STAGE1_FRACTION


def test_the_teacher_mix_arm_is_the_staged_recipe_with_its_own_fraction(study, tmp_path):
    from bitnet_train.config import compose_config

    common = ["data.teacher_corpus.fraction=0.9"]  # an override for every arm does not change the arm's own
    cfg = compose_config(study.arm_overrides("full_recipe_mix", 30, tmp_path / "m", common, val_every=6,
                                             teacher_fraction=0.4))
    assert cfg.data.teacher_corpus.fraction == 0.4 and [s.trainer.max_steps for s in cfg.stages] == [6, 24]
    plain = compose_config(study.arm_overrides("full_recipe", 30, tmp_path / "f", [], val_every=6))
    assert plain.data.teacher_corpus.fraction == 0.0
    with pytest.raises(SystemExit):
        study.parse_args(["--teacher-fraction", "1"])


def test_the_fine_tuned_teacher_arm_distils_from_the_fp_arms_model(study, tmp_path):
    from bitnet_train.config import compose_config

    with pytest.raises(SystemExit, match="list fp_finetune before"):
        study.arm_teacher_dir("full_recipe_ft_teacher", tmp_path, None)
    model_dir = tmp_path / "fp_finetune" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    teacher = study.arm_teacher_dir("full_recipe_ft_teacher", tmp_path, None)
    assert teacher == model_dir and study.arm_teacher_dir("full_recipe", tmp_path, None) is None
    cfg = compose_config(study.arm_overrides("full_recipe_ft_teacher", 30, tmp_path / "t", [], val_every=6,
                                             teacher_dir=teacher))
    assert cfg.distill.teacher == str(model_dir) and [s.trainer.max_steps for s in cfg.stages] == [6, 24]
    probe = compose_config(study.arm_overrides("full_recipe_ft_teacher", 30, tmp_path / "p", [], val_every=6))
    assert probe.distill.teacher is None  # a probe times the step with the recipe's own teacher


def test_every_arm_on_the_staged_recipe_takes_the_studys_steps_in_its_two_stages(study, tmp_path):
    from bitnet_train.config import compose_config

    for arm, spec in study.ARMS.items():
        if spec["recipe"] != "smollm2_135m_1p58_distill" or "stages=null" in spec["extra"]:
            continue
        cfg = compose_config(study.arm_overrides(arm, 30, tmp_path / arm, [], val_every=6))
        assert [s.trainer.max_steps for s in cfg.stages] == [6, 24], arm  # not the recipe's own 20 + 80
    gptq = compose_config(study.arm_overrides("full_recipe_gptq_recon", 30, tmp_path / "g", [], val_every=6))
    assert gptq.convert.method == "gptq" and gptq.convert.recon_steps > 0
    wo = compose_config(study.arm_overrides("full_recipe_weight_only_first", 30, tmp_path / "w", [], val_every=6))
    assert wo.stages[0].quant.act_quant_from_step == 6 and "quant" not in wo.stages[1]
    ramp = compose_config(study.arm_overrides("full_recipe_ramp", 30, tmp_path / "r", [], val_every=6))
    assert ramp.stages[0].quant.lambda_warmup_steps == 3 and ramp.quant.lambda_warmup_steps == 0
    learned = compose_config(study.arm_overrides("full_recipe_learned_scale", 30, tmp_path / "l", [], val_every=6))
    assert learned.quant.learnable_scale is True and all("quant" not in s for s in learned.stages)


def test_loss_curves_pairs_the_stages_steps_and_reports_the_differences(bench_script, tmp_path, capsys):
    lc = bench_script("loss_curves")
    header = "epoch,step,train/loss,val/ppl\n"
    for run, losses in (("a", [2.0, 1.5, 1.0, 0.8]), ("b", [2.0, 1.6, 1.0, 0.9])):
        for i, stage in enumerate(("stage1", "stage2")):
            d = tmp_path / run / stage / "logs"
            d.mkdir(parents=True)
            rows = [f",{t},{losses[2 * i + t]}," for t in range(2)] + [f",1,,{10.0 * (i + 1) + (run == 'b')}"]
            (d / "metrics.csv").write_text(header + "\n".join(rows) + "\n")
    assert lc.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| stage2 | 1 | 0.8000 | 0.9000 | +0.1000 |" in out
    assert "4 steps: |diff| mean 0.0500, max 0.1000" in out
    assert "stage1 step 1 val/ppl: 10.00 vs 11.00 (+10.00%)" in out
    with pytest.raises(SystemExit, match="metrics.csv does not exist"):
        lc.main([str(tmp_path / "a"), str(tmp_path / "missing")])
