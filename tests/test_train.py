"""`python -m bitnet_train` end to end on a tiny model and a small slice of text built here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitnet_train.__main__ import main
from bitnet_train.model_dir import load_model_dir

@pytest.fixture(scope="module")
def corpus(tmp_path_factory, verse_corpus) -> Path:
    """~30 KB of pseudo-verse in 6 documents (deterministic)."""
    return verse_corpus(tmp_path_factory.mktemp("corpus"), docs=6, lines=120, words_per_line=(4, 8))


def tiny_overrides(corpus: Path, run_dir: Path, **extra) -> list[str]:
    o = {
        "run_dir": str(run_dir),
        "logger": "csv",
        "callbacks.progress_bar": "none",
        "data.source": "files",
        "data.paths": f"[{corpus}]",
        "data.val_fraction": 0.2,
        "data.block_size": 32,
        "data.batch_size": 4,
        "data.bpe_vocab_size": 300,
        "data.cache_dir": str(corpus.parent / "cache"),
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_layers": 2,
        "model.num_heads": 4,
        "model.num_kv_heads": 2,
        "model.max_seq_len": 64,
        "trainer.max_steps": 8,
        "trainer.val_check_interval": 4,
        "trainer.limit_val_batches": 2,
        "trainer.log_every_n_steps": 1,
        "trainer.threads": 1,
        "callbacks.checkpoint_every_n_steps": 2,
        "optim.warmup_steps": 2,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def cli(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop("BITNET_RUN_DIR", None)
    return subprocess.run([sys.executable, "-m", "bitnet_train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.slow
def test_tiny_run_writes_model_dir_and_reports(corpus, tmp_path):
    run_dir = tmp_path / "runs" / "a"
    r = cli(tiny_overrides(corpus, run_dir, sample_prompt="Thou", sample_tokens=8, logger="wandb"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    model, tok, meta = load_model_dir(run_dir / "model")
    assert meta["quant"]["method"] == "b1.58" and meta["provenance"]["step"] == 8
    assert meta["provenance"]["tokens"] == 8 * 4 * 32
    assert all(float(m.lam) == 1.0 for m in model.bitlinear_modules().values())
    assert len(tok) <= model.config.vocab_size and model.config.vocab_size % 64 == 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not list((run_dir / "checkpoints").glob("*.tmp-*"))
    assert (run_dir / "logs" / "metrics.csv").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb should log offline by default"
    result = json.loads((tmp_path / "runs" / "results.jsonl").read_text().splitlines()[-1])
    assert result["quant"] == "b1.58" and result["steps"] == 8 and result["val_ppl"] > 1
    assert "val ppl" in r.stdout and "--- sample ---" in r.stdout
    # the saved model reproduces the validation loss the run reported
    assert result["val_loss"] < 6.0


def test_a_run_whose_output_is_a_file_prints_plain_progress_lines(corpus, tmp_path):
    """No terminal (captured output, like nohup or a batch scheduler): the default rich bar gives way
    to a plain line per interval (0 s here: every step) with step, tokens, loss, lr, tok/s, ETA."""
    import re

    r = cli(tiny_overrides(corpus, tmp_path / "runs" / "p", **{"callbacks.progress_bar": "rich",
                                                               "callbacks.progress_interval_s": 0}), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("step ")]
    pattern = (r"step (\d)/8 \(\d+%\) \| tokens ([\d,]+) \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| "
               r"[\d,]+ tok/s \| ETA \d+m\d\ds")
    matches = [re.fullmatch(pattern, x) for x in lines]
    assert lines and all(matches), lines
    assert [int(m.group(1)) for m in matches] == list(range(1, 9))
    assert int(matches[-1].group(2).replace(",", "")) == 8 * 4 * 32  # steps x batch x block


def test_hydra_cfg_job_prints_the_composed_config(tmp_path):
    import yaml

    r = cli(["recipe=shakespeare_tiny", "optim.lr=0.002", "--cfg", "job"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = yaml.safe_load(r.stdout)
    assert cfg["name"] == "shakespeare_tiny" and cfg["optim"]["lr"] == 0.002 and "hydra" not in cfg
    assert not (tmp_path / "runs").exists()  # printing runs nothing
    r = cli(["--help"], tmp_path)
    assert r.returncode == 0 and "recipe: shakespeare_tiny" in r.stdout and "--multirun" in r.stdout
    r = cli(["--info", "defaults"], tmp_path)
    assert r.returncode == 0 and "model/tiny" in r.stdout and "Defaults List" in r.stdout
    r = cli(["--shell-completion", "install=bash"], tmp_path)
    assert r.returncode == 0 and "hydra_bash_completion" in r.stdout


def test_a_hydra_multirun_sweep_leaves_a_run_directory_per_job(corpus, tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_overrides(corpus, tmp_path / "unused", **{"trainer.max_steps": 2,
                                                                        "trainer.val_check_interval": 2})
            if not a.startswith("run_dir=")]
    r = cli(["-m", *args, "optim.lr=0.001,0.003", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for job, lr in ((0, 0.001), (1, 0.003)):
        run_dir = sweep / str(job)
        assert (run_dir / "model" / "model.safetensors").is_file()
        assert json.loads((run_dir / "model" / "config.json").read_text())  # a model directory
        assert (run_dir / ".hydra" / "overrides.yaml").is_file()  # Hydra's own record of the job
        assert f"optim.lr={lr}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    results = [json.loads(x) for x in (sweep / "results.jsonl").read_text().splitlines()]
    assert [Path(x["run_dir"]).name for x in results] == ["0", "1"]  # each job appended


@pytest.mark.slow
def test_an_installed_launcher_runs_the_sweep(corpus, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_overrides(corpus, tmp_path / "unused", **{"trainer.max_steps": 2,
                                                                        "trainer.val_check_interval": 2})
            if not a.startswith("run_dir=")]
    r = cli(["-m", *args, "seed=1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"],
            tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr  # the launcher ran the jobs
    assert all((sweep / str(j) / "model" / "model.safetensors").is_file() for j in (0, 1))


def test_hydra_run_dir_is_honoured(corpus, tmp_path):
    out = tmp_path / "here"
    args = [a for a in tiny_overrides(corpus, tmp_path / "unused", **{"trainer.max_steps": 2,
                                                                        "trainer.val_check_interval": 2})
            if not a.startswith("run_dir=")]
    r = cli([*args, f"hydra.run.dir={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("argv, match", [
    (["-m", "recipe=nope"], "unknown recipe 'nope'"),
    (["-m", "recipe=shakespeare_tiny", "optim.nope=1,2"], "unknown config key 'optim.nope'"),
    (["recipe=shakespeare_tiny", "optim.lr=[", "--cfg", "job"], "optim.lr"),
])
def test_a_bad_override_on_hydras_command_line_is_one_line(tmp_path, argv, match):
    r = cli(argv, tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr


def test_progress_kind():
    from bitnet_train.errors import ConfigError
    from bitnet_train.train import progress_kind

    assert progress_kind("rich", tty=True) == "rich" and progress_kind("tqdm", tty=False) == "plain"
    assert progress_kind("none", tty=False) == "none" and progress_kind("plain", tty=True) == "plain"
    with pytest.raises(ConfigError, match="progress_bar must be one of"):
        progress_kind("fancy", tty=True)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(corpus, tmp_path):
    straight = tmp_path / "straight"
    r = cli(tiny_overrides(corpus, straight), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    r = cli(tiny_overrides(corpus, killed, debug_kill_at_step=5), tmp_path)
    assert r.returncode == 137, r.stderr[-3000:]
    assert not (killed / "model").exists()
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4

    r = cli(tiny_overrides(corpus, killed, resume="auto"), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.slow
def test_ddp_two_cpu_processes(corpus, tmp_path):
    run_dir = tmp_path / "ddp"
    r = cli(tiny_overrides(corpus, run_dir, **{"trainer.strategy": "ddp", "trainer.devices": 2,
                                                "trainer.max_steps": 3}), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _, _, meta = load_model_dir(run_dir / "model")
    assert meta["provenance"]["tokens"] == 3 * 4 * 32 * 2  # two ranks
    assert "world_size=2" in r.stderr + r.stdout or "MEMBER: 2/2" in r.stderr + r.stdout


@pytest.mark.slow
def test_nan_guard_stops_with_one_line_and_keeps_last_good_checkpoint(corpus, tmp_path):
    run_dir = tmp_path / "nan"
    # A huge LR blows the weights up to ~1e30 after one step; the next forward overflows.
    r = cli(tiny_overrides(corpus, run_dir, **{"optim.lr": 1e30, "optim.warmup_steps": 0,
                                                "callbacks.checkpoint_every_n_steps": 1}), tmp_path)
    assert r.returncode == 1
    err_lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and ("loss became" in err_lines[0] or "gradient norm became" in err_lines[0])
    assert "Traceback" not in r.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (run_dir / "model").exists()


# -- bad input: one clear error line, exit 2, nothing written ---------------------------------------

def run_main(args, capsys, cwd, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("BITNET_RUN_DIR", raising=False)
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    ({"data.paths": "[/nonexistent/corpus.txt]"}, "/nonexistent/corpus.txt"),
    ({"data.block_size": 60, "model.max_seq_len": 32}, "block_size 60 is larger than model.max_seq_len 32"),
    ({"data.block_size": 100000, "model.max_seq_len": 200000}, "block_size"),
    ({"model.vocab_size": 64}, "vocab"),
    ({"trainer.max_steps": 0}, "max_steps"),
    ({"model.norm": "layernorm"}, "norm"),
])
def test_bad_input_is_one_clear_error_and_leaves_nothing(corpus, tmp_path, capsys, monkeypatch, extra, needle):
    run_dir = tmp_path / "runs" / "bad"
    code, err = run_main(tiny_overrides(corpus, run_dir, **extra), capsys, tmp_path, monkeypatch)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err
    assert not run_dir.exists()


def test_empty_corpus_is_rejected(tmp_path, capsys, monkeypatch, corpus):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    args = tiny_overrides(corpus, tmp_path / "runs" / "x", **{"data.paths": f"[{empty}]"})
    code, err = run_main(args, capsys, tmp_path, monkeypatch)
    assert code == 2 and "empty" in err.lower()


def test_unknown_recipe_lists_the_recipes(tmp_path, capsys, monkeypatch):
    code, err = run_main(["recipe=shakespeare_huge"], capsys, tmp_path, monkeypatch)
    assert code == 2 and "unknown recipe 'shakespeare_huge'" in err and "shakespeare_tiny" in err


@pytest.mark.slow
def test_resume_from_another_architecture_is_rejected(corpus, tmp_path, capsys, monkeypatch):
    first = tmp_path / "first"
    r = cli(tiny_overrides(corpus, first, **{"trainer.max_steps": 2}), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    other = tmp_path / "other"
    args = tiny_overrides(corpus, other, **{"model.hidden_size": 64, "resume": str(first / "checkpoints" / "last.ckpt")})
    code, err = run_main(args, capsys, tmp_path, monkeypatch)
    assert code == 2 and "another architecture" in err and "hidden_size" in err
    assert not other.exists()


# ---- precision auto, fused AdamW and the module's gradient clipping ----

def test_precision_auto_picks_bf16_on_cpus_with_native_bf16_and_fp32_elsewhere(monkeypatch):
    from bitnet_train import train as train_mod

    assert train_mod.resolve_precision("32-true", "cpu")[0] == "32-true"
    assert train_mod.resolve_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"
    assert train_mod.resolve_precision("auto", "gpu")[0] == "bf16-mixed"
    for native, want in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda native=native: native)
        assert train_mod.resolve_precision("auto", "cpu")[0] == want
    monkeypatch.undo()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        assert train_mod.cpu_has_native_bf16()


def test_the_module_clips_the_global_gradient_norm_as_lightning_would():
    from bitnet_train.lightning_module import BitNetLM, fused_adamw_ok

    model_cfg = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2,
                 "num_kv_heads": 2, "max_seq_len": 8}
    lm = BitNetLM(model=model_cfg, quant={"method": "b1.58"}, optim={}, total_steps=10)
    assert fused_adamw_ok(list(lm.parameters()))
    assert lm.configure_optimizers()["optimizer"].defaults["fused"]
    for p in lm.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in lm.parameters()]))
    lm.grad_clip = 0.5
    lm.on_before_optimizer_step(None)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in lm.parameters()]))
    assert before > 1 and after == pytest.approx(0.5, rel=1e-4)
    lm.grad_clip = 1e9  # above the norm: unchanged
    g0 = [p.grad.clone() for p in lm.parameters()]
    lm.on_before_optimizer_step(None)
    assert all(torch.equal(a, p.grad) for a, p in zip(g0, lm.parameters()))


def test_flip_rate_counts_the_codes_one_step_changes():
    from types import SimpleNamespace

    from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig
    from bitnet_train.train import TernaryFlipRate

    torch.manual_seed(0)
    model = BitNetModel(ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                    num_kv_heads=2, max_seq_len=8), QuantConfig())
    logged = {}
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.update(metrics))
    module = SimpleNamespace(model=model)
    cb = TernaryFlipRate(every=2)
    layers = model.bitlinear_modules()
    total = sum(m.weight.numel() for m in layers.values())
    # negating a layer keeps its scale (mean |W|) and flips every nonzero code of it
    target = layers["layers.0.mlp.up_proj"]
    nonzero = int(TernaryFlipRate.codes(model)["layers.0.mlp.up_proj"].count_nonzero())
    cb.on_before_optimizer_step(SimpleNamespace(global_step=4), module, None)
    with torch.no_grad():
        target.weight.neg_()
    cb.on_train_batch_end(SimpleNamespace(global_step=5, loggers=[logger]), module, None, None, 0)
    assert logged["train/flip_rate"] == pytest.approx(nonzero / total) and 0 < nonzero < total
    # off-cycle steps take no snapshot and log nothing; an unchanged model flips nothing
    logged.clear()
    cb.on_before_optimizer_step(SimpleNamespace(global_step=5), module, None)
    cb.on_train_batch_end(SimpleNamespace(global_step=6, loggers=[logger]), module, None, None, 0)
    assert logged == {}
    cb.on_before_optimizer_step(SimpleNamespace(global_step=6), module, None)
    cb.on_train_batch_end(SimpleNamespace(global_step=7, loggers=[logger]), module, None, None, 0)
    assert logged["train/flip_rate"] == 0


@pytest.mark.slow
def test_a_run_logs_the_flip_rate_and_trains_learnable_scales(corpus, tmp_path):
    """One run for both (the suite's time): the flip rate of the learned scale's codes, and the scales
    trained, saved in model/ and exported as the file's s_w."""
    import csv

    from bitnet_train.export.reader import open_model
    from bitnet_train.model_dir import load_model_dir
    from bitnet_train.quant import weight_scale

    run_dir = tmp_path / "flip"
    r = cli(tiny_overrides(corpus, run_dir, **{"callbacks.flip_rate_every_n_steps": 2, "trainer.max_steps": 6,
                                               "quant.learnable_scale": "true"}), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    rates = {int(x["step"]): float(x["train/flip_rate"]) for x in rows if x.get("train/flip_rate")}
    assert sorted(rates) == [1, 3, 5] and all(0 < v < 0.5 for v in rates.values()), rates  # after steps 0, 2, 4
    model, _, _ = load_model_dir(run_dir / "model")
    bl = model.bitlinear_modules()
    ratios = [float(m.log_scale.exp() / weight_scale(m.weight.detach())) for m in bl.values()]
    assert all(bool(m.scale_set) for m in bl.values()) and max(abs(x - 1) for x in ratios) > 1e-3, ratios
    from bitnet_train.export.cli import main as export_main

    assert export_main([str(run_dir), "-o", str(tmp_path / "m.bitnet")]) == 0
    f = open_model(tmp_path / "m.bitnet")
    assert all(f.scale(n) == m.quantized_weight()[1].item() for n, m in bl.items())
