"""Train -> save model/ -> bitnet-export -> read back: exact weights, exact logits; bad input rejected."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bitnet_train.export.cli import main
from bitnet_train.export.reader import open_model
from bitnet_train.export.reference import build_reference_model
from bitnet_train.export.schema import FormatError
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig
from bitnet_train.model_dir import save_model_dir
from bitnet_train.quant import set_model_lambda

from tiny_models import TINY, tiny_tokenizer, train_tiny

pytestmark = pytest.mark.slow


def tokens(cfg, n=2, t=19, seed=1):
    return torch.randint(0, cfg.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def export_ok(*argv):
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def exported_fp16(trained_model_dir, tmp_path_factory):
    path, _ = trained_model_dir
    out = tmp_path_factory.mktemp("out") / "model.bitnet"
    export_ok(path.parent, "-o", out)  # the run directory: exports run/model
    return out


@pytest.mark.parametrize("packing", ["2bit", "1.6bit"])
def test_dequantized_weights_equal_training_forward_weights_and_logits_match(trained_model_dir, tmp_path, packing):
    path, model = trained_model_dir
    out = tmp_path / "m.bitnet"
    export_ok(path, "-o", out, "--dtype", "fp32", "--packing", packing)
    f = open_model(out)
    assert f.quant["packing"] == {"2bit": "i2_b128", "1.6bit": "t3_b160"}[packing]
    bl = model.bitlinear_modules()
    assert set(f.ternary_layers()) == {n for n, m in bl.items() if m.quantize}
    assert set(f.dense_layers()) == {"layers.1.mlp.down_proj"}
    for name in f.ternary_layers():
        codes, s_w = bl[name].quantized_weight()
        assert torch.equal(torch.from_numpy(f.dequantize(name)), codes.float() * s_w), name
        assert f.scale(name) == s_w.item()
    ref = build_reference_model(f)
    idx = tokens(model.config)
    with torch.no_grad():
        assert torch.equal(ref(idx), model(idx))  # fp32 export: bit-identical logits


def test_fp16_export_logits_equal_model_with_fp16_dense_weights(trained_model_dir, exported_fp16):
    _, model = trained_model_dir
    rounded = BitNetModel(model.config, model.quant_config)
    state = {k: (v.half().float() if v.is_floating_point() and not k.endswith(".lam")
                 and not any(k == f"{n}.weight" for n, m in model.bitlinear_modules().items() if m.quantize) else v)
             for k, v in model.state_dict().items()}
    rounded.load_state_dict(state)
    ref = build_reference_model(exported_fp16)
    idx = tokens(model.config)
    with torch.no_grad():
        assert torch.equal(ref(idx), rounded.eval()(idx))
        assert torch.allclose(ref(idx), model(idx), atol=2e-2, rtol=0)  # and close to the fp32 model


def test_metadata_tokenizer_and_provenance(trained_model_dir, exported_fp16):
    path, model = trained_model_dir
    f = open_model(exported_fp16)
    assert f.config == model.config.to_dict()
    assert f.tokenizer_json == (path / "tokenizer.json").read_text()
    assert f.tokenizer_config.get("eos_token") == "<|endoftext|>"
    p = f.provenance
    assert p["recipe"] == "tiny_test" and p["step"] == 5 and p["source_kind"] == "model_dir" and p["ptq"] is False
    assert len(p["source_sha256"]) == 64 and p["exporter"].startswith("bitnet_train.export")
    from tokenizers import Tokenizer

    assert Tokenizer.from_str(f.tokenizer_json).encode("To be").ids


def test_lightning_checkpoint_source(trained_model_dir, tmp_path):
    from bitnet_train.lightning_module import BitNetLM

    path, model = trained_model_dir
    lm = BitNetLM(model=model.config.to_dict(), quant=model.quant_config.to_dict(), optim={}, total_steps=10)
    lm.model.load_state_dict(model.state_dict())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(path, run / "model")
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams), "global_step": 7}, ckpt)
    out = tmp_path / "c.bitnet"
    export_ok(ckpt, "-o", out, "--dtype", "fp32")
    f = open_model(out)
    assert f.provenance["step"] == 7 and f.provenance["source_kind"] == "checkpoint"
    assert f.tokenizer_json is not None  # found in the run's model/
    with torch.no_grad():
        idx = tokens(model.config)
        assert torch.equal(build_reference_model(f)(idx), model(idx))


@pytest.mark.parametrize("variant", [dict(norm="bitlinear"), dict(norm="none", tie_embeddings=True, ffn="relu2")])
def test_model_variants(tmp_path, variant, tokenizer):
    cfg = ModelConfig(**{**TINY, **variant})
    model = train_tiny(cfg, QuantConfig(), steps=2)
    save_model_dir(tmp_path / "model", model, tokenizer)
    export_ok(tmp_path / "model", "-o", tmp_path / "m.bitnet", "--dtype", "fp32")
    f = open_model(tmp_path / "m.bitnet")
    assert ("lm_head.weight" in f.names) == (not cfg.tie_embeddings)
    with torch.no_grad():
        idx = tokens(cfg)
        assert torch.equal(build_reference_model(f)(idx), model(idx))


def test_learned_scales_are_exported_and_the_engine_computes_with_them(tmp_path, tokenizer):
    from bitnet_train.runtime import Engine
    from bitnet_train.quant import weight_scale

    cfg = ModelConfig(**TINY)
    model = train_tiny(cfg, QuantConfig(learnable_scale=True), steps=4)
    save_model_dir(tmp_path / "model", model, tokenizer)
    export_ok(tmp_path / "model", "-o", tmp_path / "m.bitnet", "--dtype", "fp32")
    f = open_model(tmp_path / "m.bitnet")
    moved = 0
    for name, m in model.bitlinear_modules().items():
        learned = float(m.log_scale.detach().exp())
        assert f.scale(name) == np.float32(learned), name
        moved += abs(learned / float(weight_scale(m.weight.detach())) - 1) > 1e-3  # trained away from mean|W|
    assert moved >= len(f.ternary_layers()) // 2
    idx = tokens(cfg)
    with torch.no_grad():
        want = model(idx)
        assert torch.equal(build_reference_model(f)(idx), want)
    got = Engine.load(tmp_path / "m.bitnet").forward(idx[0].numpy())
    err = np.abs(got - want[0].numpy()).max() / float(want.abs().max())
    assert err < 0.05 and (got.argmax(-1) == want[0].numpy().argmax(-1)).mean() >= 0.9, err


def test_refuses_lambda_below_one_and_unquantized_unless_ptq(tmp_path, tokenizer, capsys):
    cfg = ModelConfig(**TINY)
    model = train_tiny(cfg, QuantConfig(lambda_warmup_steps=100), steps=1)
    set_model_lambda(model, 0.5)
    save_model_dir(tmp_path / "warm", model, tokenizer)
    assert main([str(tmp_path / "warm"), "-o", str(tmp_path / "a.bitnet")]) == 2
    err = capsys.readouterr().err
    assert "lambda 0.5 < 1" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.bitnet").exists()
    export_ok(tmp_path / "warm", "-o", tmp_path / "a.bitnet", "--ptq")
    assert open_model(tmp_path / "a.bitnet").provenance["ptq"] is True

    fp = train_tiny(cfg, QuantConfig(method="none"), steps=1)
    save_model_dir(tmp_path / "fp", fp, tokenizer)
    assert main([str(tmp_path / "fp"), "-o", str(tmp_path / "b.bitnet")]) == 2
    assert "quant method 'none'" in capsys.readouterr().err
    export_ok(tmp_path / "fp", "-o", tmp_path / "b.bitnet", "--ptq")
    f = open_model(tmp_path / "b.bitnet")
    assert len(f.ternary_layers()) == 14  # every linear ternarized post-training
    from bitnet_train.quant import weight_quant

    w = fp.layers[0].self_attn.q_proj.weight
    c, s = weight_quant(w)
    assert torch.equal(torch.from_numpy(f.dequantize("layers.0.self_attn.q_proj")), c * s)


# ---- bad input ------------------------------------------------------------------------------

def test_corrupted_file_every_offset_raises_format_error(exported_fp16, tmp_path):
    raw = exported_fp16.read_bytes()
    n = len(raw)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    rng = np.random.default_rng(0)
    offsets = sorted(set(range(0, 16)) | set(range(header_end - 40, header_end + 40))
                     | set(rng.integers(0, header_end, 250).tolist()) | set(rng.integers(header_end, n, 250).tolist()))
    bad = tmp_path / "bad.bitnet"
    cases = 0
    for cut in sorted(set(rng.integers(0, n, 60).tolist()) | {0, 7, 8, 9, header_end - 1, header_end, n - 1}):
        bad.write_bytes(raw[:cut])
        with pytest.raises(FormatError):
            open_model(bad)
        cases += 1
    for off in offsets:
        for new in (raw[off] ^ 0xFF, raw[off] ^ 0x01, int(rng.integers(0, 256))):
            if new == raw[off]:
                continue
            bad.write_bytes(raw[:off] + bytes([new]) + raw[off + 1:])
            try:
                open_model(bad)
            except FormatError:
                cases += 1
                continue
            pytest.fail(f"flipping byte {off} ({raw[off]:#x} -> {new:#x}) was not detected")
    assert cases > 1000


def test_cli_leaves_no_partial_output(trained_model_dir, exported_fp16, tmp_path, capsys, monkeypatch):
    path, _ = trained_model_dir
    # a damaged source: exit 2, one line, no output
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main([str(broken), "-o", str(out_dir / "m.bitnet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert list(out_dir.iterdir()) == []
    # Ctrl-C in the middle of writing: no output, no temp file, an existing output untouched
    existing = out_dir / "m.bitnet"
    shutil.copy(exported_fp16, existing)
    before = existing.read_bytes()
    import bitnet_train.export.writer as writer

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.os, "fsync", interrupt)
    assert main([str(path), "-o", str(existing)]) == 130
    assert [p.name for p in out_dir.iterdir()] == ["m.bitnet"] and existing.read_bytes() == before
    # usage errors exit 2 too (argparse)
    with pytest.raises(SystemExit) as e:
        main([str(path), "-o", str(existing), "--packing", "3bit"])
    assert e.value.code == 2


def test_cli_json_summary(trained_model_dir, tmp_path, capsys):
    path, _ = trained_model_dir
    export_ok(path, "-o", tmp_path / "m.bitnet", "--json", "--packing", "1.6bit")
    s = json.loads(capsys.readouterr().out)
    assert s["packing"] == "t3_b160" and s["ternary_parameters"] > 0
    # 1.6 bits per weight plus each row's padding to 160 codes (a lot on this tiny model's rows)
    f = open_model(tmp_path / "m.bitnet")
    rows = f.ternary_layers().values()
    want = 1.6 * sum(o * -(-i // 160) * 160 for o, i in rows) / sum(o * i for o, i in rows)
    assert s["ternary_bits_per_weight"] == round(want, 4) and s["ternary_bits_per_weight"] >= 1.6
    assert s["file_bytes"] == (tmp_path / "m.bitnet").stat().st_size < s["fp16_bytes"]
    assert s["scales"]["layers.*.self_attn.q_proj"]["count"] == 2


def test_a_staged_run_directory_exports_its_last_stage(trained_model_dir, tmp_path, capsys):
    """A staged recipe writes RUN_DIR/stage1/model .. stageN/model: the run exports the final stage."""
    import shutil

    path, model = trained_model_dir
    run = tmp_path / "staged"
    shutil.copytree(path, run / "stage2" / "model")
    first = BitNetModel(model.config, model.quant_config)  # another model: stage 1's weights differ
    save_model_dir(run / "stage1" / "model", first, tiny_tokenizer(), {"recipe": "tiny_test", "step": 1})
    out = tmp_path / "m.bitnet"
    export_ok(run, "-o", out, "--dtype", "fp32")
    f = open_model(out)
    assert f.provenance["step"] == 5
    codes, s_w = model.bitlinear_modules()["layers.0.self_attn.q_proj"].quantized_weight()
    assert torch.equal(torch.from_numpy(f.dequantize("layers.0.self_attn.q_proj")), codes.float() * s_w)
    (run / "stage3").mkdir()  # a stage that has not finished
    assert main([str(run), "-o", str(tmp_path / "n.bitnet")]) == 2
    err = capsys.readouterr().err
    assert "last stage stage3 has no model/" in err and "stage2" in err and not (tmp_path / "n.bitnet").exists()
