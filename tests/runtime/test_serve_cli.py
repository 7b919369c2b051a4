"""`bitnet-run serve` as users run it: a subprocess on a free loopback port, its options, and its
one-line errors (a bad file, bad options, a missing [serve] extra)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from bitnet_train.runtime.cli import main  # noqa: E402

import tiny_files  # noqa: E402

ENV = {**os.environ, "BITNET_THREADS": "1"}
for k in ("BITNET_TRACEBACK", "BITNET_ISA", "BITNET_API_KEY"):
    ENV.pop(k, None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files.build(str(tmp_path_factory.mktemp("tiny_cli")), 128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_train.runtime.cli", "serve", *map(str, args),
                             "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become healthy")


def test_serve_answers_the_openai_client_and_stops_cleanly(files):
    proc, url = start(files["model"], "--max-batch", "3", "--ctx", "96", "--api-key", "k", "--model-name", "shakes",
                      "--kv-cache", "f16", "--threads", "1")
    try:
        wait_healthy(proc, url)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in c.models.list()] == ["shakes"]
        r = c.chat.completions.create(model="shakes", messages=[{"role": "user", "content": "To be"}], max_tokens=5)
        assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="context is 96"):
            c.completions.create(model="shakes", prompt=[1] * 97, max_tokens=1)
        assert "bitnet_kv_slots_total 3.0" in httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, -15), err  # uvicorn re-raises SIGTERM after its graceful shutdown
    assert "serving" in err and "Traceback" not in err


def test_a_model_that_cannot_be_loaded_stops_the_server_with_one_line(files, tmp_path):
    data = bytearray(files["model"].read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the last tensor: the checksum fails at load
    (tmp_path / "flipped.bitnet").write_bytes(data)
    proc, _ = start(tmp_path / "flipped.bitnet")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "checksum" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("extra, match", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--ctx", "0"], "--ctx must be >= 1"),
    (["--step-tokens", "-1"], "--step-tokens must be >= 1"),
])
def test_bad_serve_options(files, capsys, extra, match):
    assert main(["serve", str(files["model"]), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1


def test_serve_of_a_missing_file(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "absent.bitnet")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_without_the_serve_extra_names_it(files, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", str(files["model"])]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: bitnet-run serve needs uvicorn, which is not installed: pip install 'bitnet-train[serve]'"
