"""`bitnet-run` end to end on a tiny file: subprocesses for what users run, in-process for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bitnet_train.runtime import Engine, Generator, SamplingParams, _C
from bitnet_train.runtime import bench as bench_mod
from bitnet_train.runtime.cli import main

import tiny_files

ENV = {**os.environ, "BITNET_THREADS": "1"}
ENV.pop("BITNET_TRACEBACK", None)
ENV.pop("BITNET_ISA", None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files.build(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "plays.txt"
    p.write_text("\n".join(tiny_files.CORPUS * 6), encoding="utf-8")
    return p


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitnet_train.runtime.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=ENV, timeout=120)


def test_generate_json_matches_the_api(files):
    r = run_cli("generate", files["model"], "-p", "To be", "-p", "Friends, Romans", "--temperature", "0",
                "--max-new-tokens", "12", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = Generator(Engine.load(files["model"], threads=1)).generate(
        ["To be", "Friends, Romans"], max_new_tokens=12, ignore_eos=True)
    assert [c["token_ids"] for c in out["completions"]] == [c.token_ids for c in want]
    assert [c["text"] for c in out["completions"]] == [c.text for c in want]
    assert out["completions"][0]["finish_reason"] == "length"
    stats = out["stats"]
    assert stats["generated_tokens"] == 24 and stats["threads"] == 1 and stats["decode_tok_s"] > 0


def test_generate_with_the_f16_kv_cache_matches_the_api(files):
    r = run_cli("generate", files["model"], "-p", "To be", "--temperature", "0", "--max-new-tokens", "12",
                "--ignore-eos", "--kv-cache", "f16", "--json")
    assert r.returncode == 0, r.stderr
    want = Generator(Engine.load(files["model"], threads=1, kv_cache="f16")).generate(
        ["To be"], max_new_tokens=12, ignore_eos=True)
    assert [c["token_ids"] for c in json.loads(r.stdout)["completions"]] == [c.token_ids for c in want]


def test_generate_streams_prompt_and_text(files):
    r = run_cli("generate", files["model"], "--prompt", "To be", "--max-new-tokens", "10", "--seed", "3",
                "--ignore-eos")
    assert r.returncode == 0, r.stderr
    gen = Generator(Engine.load(files["model"], threads=1))
    want = gen.generate("To be", max_new_tokens=10, ignore_eos=True,
                        sampling=SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=3))[0]
    assert r.stdout == "To be" + want.text + "\n"
    assert "10 tokens" in r.stderr


def test_chat_reads_piped_stdin_turn_by_turn(files):
    r = run_cli("chat", files["model"], "--temperature", "0", "--max-new-tokens", "4", "--system", "be",
                stdin="hi\n\nok\n")
    assert r.returncode == 0, r.stderr
    # the second turn saw the first answer: same tokens as the API on the rendered conversation
    gen = Generator(Engine.load(files["model"], threads=1))
    tok = gen.tokenizer
    msgs = [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}]
    first = gen.generate([tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)], max_new_tokens=4)[0]
    assert r.stdout.startswith(first.text + "\n") and len(r.stdout) > len(first.text) + 1 and r.stdout.endswith("\n")


def test_eval_json(files, text_file):
    r = run_cli("eval", files["model"], text_file, "--json", "--window", "32", "--stride", "16")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    n = len(Generator(Engine.load(files["model"])).tokenizer.encode(text_file.read_text()))
    assert res["tokens"] == n - 1 and res["window"] == 32 and res["stride"] == 16
    assert np.isfinite(res["ppl"]) and res["ppl"] == pytest.approx(np.exp(res["nll"]))


def test_eval_dataset_matches_the_same_text_as_a_file(files, tmp_path, text_file):
    """--dataset: a save_to_disk directory and a json file builder score what the joined text scores."""
    datasets = pytest.importorskip("datasets")
    docs = [d for d in text_file.read_text().splitlines() if d.strip()]
    assert len(docs) >= 2
    joined = tmp_path / "joined.txt"
    joined.write_text("\n\n".join(docs))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"body": docs})}).save_to_disk(str(tmp_path / "ds"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    want = json.loads(run_cli("eval", files["model"], joined, "--json", "--window", "32").stdout)
    for extra in (["--dataset", tmp_path / "ds"], ["--dataset", "json", "--data-files", rows, "--split", "train"]):
        r = run_cli("eval", files["model"], "--json", "--window", "32", "--text-column", "body", *extra)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["tokens"] == want["tokens"] and got["nll"] == pytest.approx(want["nll"], rel=1e-9)
        assert got["dataset"] == str(extra[1])


def test_eval_dataset_errors(files, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["some text here"]}).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x y"]})}).save_to_disk(str(tmp_path / "dd"))
    capsys.readouterr()  # the progress bars of save_to_disk
    assert_one_line_error(capsys, ["eval", files["model"], "--dataset", tmp_path / "one"], "has no column 'text'")
    assert_one_line_error(capsys, ["eval", files["model"], "--dataset", tmp_path / "dd"], "has no split 'test'")
    assert_one_line_error(capsys, ["eval", files["model"], "--dataset", "json", "--data-files", tmp_path / "nope.jsonl"],
                          "does not exist")
    assert_one_line_error(capsys, ["eval", files["model"]], "eval needs TEXT_FILE or --dataset NAME")


def test_bench_json(files):
    r = run_cli("bench", files["model"], "--prefill", "16", "--decode", "8", "--no-bandwidth", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prefill_tokens"] == 16 and res["decode_tokens"] == 8 and res["threads"] == 1
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["weight_bytes_per_token"] > 0
    assert res["lm_head"] == "fp" and res["kv_cache"] == "f32"
    assert res["load_s"] > 0 and res["peak_rss_mib"] > 0 and res["major_page_faults"] >= 0
    # CPU time per token (process time, all threads): positive, and at most threads x wall time per token
    for phase, n in (("prefill", 16), ("decode", 8)):
        core_ms, wall_ms = res[f"{phase}_core_ms_per_token"], 1e3 / res[f"{phase}_tok_s"]
        assert 0 < core_ms <= 1.5 * wall_ms * res["threads"] + 1.0, (phase, core_ms, wall_ms)
    r8 = run_cli("bench", files["model"], "--prefill", "16", "--decode", "8", "--no-bandwidth", "--json",
                 "--lm-head", "int8", "--kv-cache", "f16")
    assert r8.returncode == 0, r8.stderr
    res8 = json.loads(r8.stdout)
    assert res8["lm_head"] == "int8" and res8["weight_bytes_per_token"] < res["weight_bytes_per_token"]
    assert res8["kv_cache"] == "f16" and res8["kv_bytes_per_token"] * 2 == res["kv_bytes_per_token"]


def test_runtime_and_cli_run_without_torch(files):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from bitnet_train.runtime.cli import main\n"
        f"rc = main(['generate', {str(files['model'])!r}, '-p', 'To be', '--max-new-tokens', '4', '--json'])\n"
        "assert rc == 0 and sys.modules['torch'] is None\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completions"][0]["prompt"] == "To be"


def test_random_model_file_for_a_named_shape(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_mod.SHAPES, "tiny-test", dict(num_layers=1, hidden_size=128, intermediate_size=256,
                                                             num_heads=4, num_kv_heads=2, vocab_size=97, ffn="relu2"))
    path = tmp_path / "r.bitnet"
    assert main(["random-model", "--shape", "bitnet-large", "-o", str(path), "--max-seq-len", "0"]) == 2
    bench_mod.write_random_model(path, "tiny-test", max_seq_len=32, seed=1)
    eng = Engine.load(path, threads=1)
    assert eng.max_seq_len == 32 and eng.vocab_size == 97
    res = bench_mod.measure_speed(eng, prefill=8, decode=4, bandwidth=False)
    assert res["decode_tokens"] == 4
    # the in-memory twin (random_model) has the same config
    cfg, tensors = bench_mod.random_model("tiny-test", 32)
    assert Engine(cfg, tensors, threads=1).weight_bytes_per_token == eng.weight_bytes_per_token


@pytest.mark.parametrize("name, nominal", [  # bitnet.cpp's dummy layouts by their names; Llama 3 by Meta's counts
    ("125m", 0.125), ("350m", 0.35), ("1b", 1.0), ("1.5b", 1.5), ("2.7b", 2.7), ("3.8b", 3.8), ("7b", 7.0),
    ("13b", 13.0), ("30b", 30.0), ("70b", 70.0), ("100b", 100.0), ("llama3-8b", 8.03), ("llama3-70b", 70.55),
])
def test_named_shapes_have_their_sizes(name, nominal):
    from bitnet_train.export.schema import dense_shapes, linear_shapes, validate_config

    cfg = validate_config(bench_mod.shape_config(name, 4096))
    n = sum(int(np.prod(s)) for s in {**linear_shapes(cfg), **dense_shapes(cfg)}.values())
    h, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"], cfg["vocab_size"]
    kv = cfg["num_kv_heads"] * cfg["head_dim"]
    # per layer q, o (h x h), k, v (kv x h), gate, up, down (h x f); 2 norms + 2 sub-norms; embed + head + final norm
    assert n == L * (2 * h * h + 2 * kv * h + 3 * h * f + 2 * h + h + f) + 2 * V * h + h
    assert n / 1e9 == pytest.approx(nominal, rel=0.25 if not name.startswith("llama3") else 0.005)
    if name.startswith("llama3"):
        assert (cfg["num_kv_heads"], cfg["vocab_size"], cfg["rope_theta"]) == (8, 128256, 500000.0)
    else:
        assert cfg["num_kv_heads"] == cfg["num_heads"] and cfg["vocab_size"] == 32002


def test_dims_give_a_shape_and_bench_runs_it(capsys):
    shape = bench_mod.parse_dims("hidden=128, ffn=384,layers=2,heads=4,kv_heads=2,vocab=300")
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_layers"], shape["num_heads"],
            shape["num_kv_heads"], shape["vocab_size"]) == (128, 384, 2, 4, 2, 300)
    assert main(["bench", "--dims", "hidden=128,ffn=384,layers=2,heads=4,kv_heads=2,vocab=300", "--prefill", "8",
                 "--decode", "4", "--no-bandwidth", "--json", "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["shape"] == "dims:h128-f384-l2-a4-kv2-v300" and res["decode_tokens"] == 4


@pytest.mark.parametrize("dims, match", [
    ("hidden=128,ffn=384,layers=2", "lacks heads"),
    ("hidden=128,ffn=384,layers=2,heads=4,depth=3", "'depth=3' is not KEY=N"),
    ("hidden=128,ffn=x,layers=2,heads=4", "ffn='x' is not an integer"),
    ("hidden=128,ffn=384,layers=0,heads=4", "layers must be >= 1"),
    ("hidden=128,ffn=384,layers=2,heads=4,kv_heads=3", "not a multiple of kv_heads"),
    ("hidden=130,ffn=384,layers=2,heads=4", "not divisible by heads"),
    ("hidden=128,hidden=64,ffn=384,layers=2,heads=4", "hidden is given twice"),
])
def test_bad_dims(capsys, dims, match):
    assert_one_line_error(capsys, ["bench", "--dims", dims], match)


def test_random_model_of_dims(tmp_path):
    path = tmp_path / "d.bitnet"
    assert main(["random-model", "--dims", "hidden=128,ffn=256,layers=1,heads=4,kv_heads=1,vocab=97", "-o", str(path),
                 "--max-seq-len", "16"]) == 0
    eng = Engine.load(path, threads=1)
    assert eng.vocab_size == 97 and eng._model.config.num_kv_heads == 1


def test_random_model_1_6bit_is_t3_b160_read_in_place(tmp_path):
    from bitnet_train.export.reader import open_model

    path = tmp_path / "t.bitnet"
    assert main(["random-model", "--dims", "hidden=320,ffn=400,layers=1,heads=4,vocab=97", "-o", str(path),
                 "--max-seq-len", "16", "--packing", "1.6bit"]) == 0
    f = open_model(path)
    assert f.quant["packing"] == "t3_b160" and f.metadata["format_version"] == "2"
    codes = f.codes("layers.0.mlp.down_proj")  # (320, 400): a partial last block, padding checked
    assert set(np.unique(codes)) == {-1, 0, 1}
    eng = Engine.load(path, threads=1)
    assert eng.quant["packing"] == "t3_b160" and np.isfinite(eng.forward([1, 2, 3])).all()


@pytest.mark.slow
def test_random_model_writes_tensor_by_tensor_in_bounded_memory(tmp_path):
    """A 200 MB file (805M ternary weights in 48 layers) written with a peak RSS far below its size:
    the writer holds one tensor (1 MB packed, 16 MB of codes drawn at a time), not the file."""
    path = tmp_path / "deep.bitnet"
    code = (
        "import resource, sys\n"
        "from bitnet_train.runtime import bench\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "shape = bench.parse_dims('hidden=1024,ffn=4096,layers=48,heads=16,vocab=1000')\n"
        f"bench.write_random_model({str(path)!r}, shape, max_seq_len=64)\n"
        "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    base_kb, peak_kb = map(int, r.stdout.split())
    size = path.stat().st_size
    assert size > 200e6
    assert (peak_kb - base_kb) * 1024 < 64 * 2**20, (base_kb, peak_kb)  # + at most 64 MiB while writing 200 MB
    eng = Engine.load(path, threads=1)  # checksums verified
    assert eng._model.config.num_layers == 48 and eng.forward([1, 2, 3], last_only=True).shape == (1000,)


@pytest.mark.parametrize("isa", _C.available_isas())
def test_the_streaming_read_probe_reads_every_byte(isa):
    # the buffer's share of thread t is filled with byte t + 1: the checksum of 64-bit word sums is known
    mib, threads = 4, 2
    share = (mib << 20) // threads
    gb_s, checksum = _C.stream_read(mib, threads, isa, 2)
    want = sum((share // 8) * int.from_bytes(bytes([t + 1]) * 8, "little") for t in range(threads)) % 2**64
    assert checksum == want and gb_s > 0
    with pytest.raises(ValueError, match="mib must be >= 1"):
        _C.stream_read(0, 1, isa, 1)


# ---- bad input: one line `error: ...` on stderr, exit 2 ---------------------------------------------

def assert_one_line_error(capsys, argv, match):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err


@pytest.mark.parametrize("extra,match", [
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-1"], "top_k must be an integer >= 0"),
    (["--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--isa", "bogus"], "unknown ISA 'bogus'"),
    (["--device", "tpu"], "invalid choice"),
    (["--threads", "0"], "threads = 0"),
    (["--lm-head", "int4"], "invalid choice: 'int4'"),
])
def test_bad_generate_options(files, capsys, extra, match):
    assert_one_line_error(capsys, ["generate", files["model"], "-p", "hi", *extra], match)


def test_device_cuda_without_a_usable_gpu(files, capsys):
    from bitnet_train.runtime.device import cuda_available

    if cuda_available():
        pytest.skip("this machine has a usable CUDA build and GPU")
    for argv in (["generate", files["model"], "-p", "hi"], ["bench", "--shape", "smollm2-135m"]):
        assert_one_line_error(capsys, [*argv, "--device", "cuda"], "--device cuda: ")


def test_prompt_longer_than_the_context(files, capsys):
    long = " ".join(tiny_files.CORPUS * 5)
    assert_one_line_error(capsys, ["generate", files["model"], "-p", long], "the model's context is 64 tokens")


def test_forced_isa_the_cpu_lacks(files, capsys):
    missing = [isa for isa in ("avx2", "avx512", "amx") if isa not in _C.available_isas()]
    if not missing:
        pytest.skip("this CPU has every ISA")
    assert_one_line_error(capsys, ["generate", files["model"], "-p", "hi", "--isa", missing[-1]],
                          "not supported by this CPU")


def test_bad_model_files(files, tmp_path, capsys):
    assert_one_line_error(capsys, ["generate", tmp_path / "absent.bitnet", "-p", "hi"], "does not exist")
    data = bytearray(files["model"].read_bytes())
    (tmp_path / "short.bitnet").write_bytes(data[:len(data) // 2])
    assert_one_line_error(capsys, ["generate", tmp_path / "short.bitnet", "-p", "hi"], "short.bitnet")
    data[-100] ^= 0xFF  # a flipped byte in the last tensor
    (tmp_path / "flipped.bitnet").write_bytes(data)
    assert_one_line_error(capsys, ["eval", tmp_path / "flipped.bitnet", files["model"]], "checksum")
    (tmp_path / "text.bitnet").write_text("not a model")
    assert_one_line_error(capsys, ["bench", tmp_path / "text.bitnet"], "text.bitnet")


def test_other_refusals(files, tmp_path, capsys):
    assert_one_line_error(capsys, ["chat", files["no_template"]], "no chat template")
    assert_one_line_error(capsys, ["eval", files["model"], tmp_path / "absent.txt"], "does not exist")
    assert_one_line_error(capsys, ["eval", files["model"], files["model"]], "is not UTF-8 text")
    assert_one_line_error(capsys, ["bench"], "bench needs MODEL, --shape NAME or --dims")
    assert_one_line_error(capsys, ["random-model", "-o", "x.bitnet"], "random-model needs --shape NAME or --dims")
    assert_one_line_error(capsys, ["bench", "--shape", "nope"], "unknown --shape 'nope'")
    assert_one_line_error(capsys, ["generate", files["model"]], "generate needs --prompt")


def test_a_corrupted_file_in_a_subprocess_has_no_traceback(files, tmp_path):
    data = bytearray(files["model"].read_bytes())
    data[9:13] = b"\x00\x01\x02\x03"  # inside the JSON header
    (tmp_path / "bad.bitnet").write_bytes(data)
    r = run_cli("generate", tmp_path / "bad.bitnet", "-p", "hi")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_verify_a_good_file(files):
    r = run_cli("verify", files["model"], "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["ok"] is True and res["bytes"] == os.path.getsize(files["model"]) and res["tensors"] > 10
    assert run_cli("verify", files["model"]).stdout.startswith("ok: ")


def test_verify_names_a_corrupt_tensor_and_an_invalid_code(files, tmp_path, capsys):
    from bitnet_train.export.reader import open_model

    data = bytearray(open(files["model"], "rb").read())
    f = open_model(files["model"])
    name = "layers.1.mlp.down_proj.qweight"
    off = f._data_start + f._entries[name]["data_offsets"][0]
    flipped = bytearray(data)
    flipped[off + 3] ^= 0x01  # 0 <-> 1 or 2 <-> 3 in one 2-bit field
    (tmp_path / "crc.bitnet").write_bytes(flipped)
    assert_one_line_error(capsys, ["verify", tmp_path / "crc.bitnet"], f"tensor {name}: checksum mismatch")
    three = bytearray(data)
    three[off + 3] = 0xFF  # four codes 3; the checksum left stale is skipped below
    (tmp_path / "code.bitnet").write_bytes(three)
    assert_one_line_error(capsys, ["verify", tmp_path / "code.bitnet"], f"tensor {name}: checksum mismatch")
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.qweight' holds the invalid 2-bit code 3"):
        Engine.load(tmp_path / "code.bitnet", verify_checksums=False)
