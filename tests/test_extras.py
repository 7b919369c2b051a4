"""A core-only install (the runtime's dependencies, none of the extras): each optional feature says in
one line which extra to install, and the runtime itself works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_train.extras import EXTRAS, MissingExtraError, missing, require

CORE = ["numpy", "safetensors", "tokenizers", "rich", "jinja2>=3.1"]  # pyproject's `dependencies`


def test_require_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "hydra") else real(name, *a))
    assert missing("train") == ["torch", "hydra-core"]
    with pytest.raises(MissingExtraError) as e:
        require("train", "training")
    assert str(e.value).startswith("training needs torch, hydra-core, which are not installed: "
                                   "pip install 'bitnet-train[train]'")
    assert "torch==2.13.0" in str(e.value) and "\n" not in str(e.value)
    require("serve", "serving")  # installed here: no error


def test_every_extra_is_declared_in_pyproject():
    import tomllib

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        names = " ".join(declared[extra]).lower().replace("_", "-")
        assert all(pip in names for _, pip in modules), (extra, declared[extra])


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory):
    """A venv with the core dependencies only and this checkout's editable install (its import hook
    and built engine copied in: nothing is rebuilt)."""
    import bitnet_train.runtime._C as built

    site = Path(built.__file__).parents[2]
    finder = sorted(site.glob("_editable_skbc_bitnet_train.*"))
    if len(finder) != 2:
        pytest.skip("bitnet_train is not an editable install here (pip install -e .)")
    venv = tmp_path_factory.mktemp("core") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", *CORE], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"could not install the core dependencies: {r.stderr.strip().splitlines()[-1:]}")
    target = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    for f in finder:
        shutil.copy(f, target / f.name)
    shutil.copytree(site / "bitnet_train", target / "bitnet_train")  # the compiled engine
    return py


def run(py, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("BITNET_TRACEBACK", "PYTHONPATH")}
    return subprocess.run([str(py), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_a_core_install_names_each_missing_extra_and_runs_the_runtime(core_venv, tmp_path):
    import tiny_model_file

    model = tiny_model_file.write(tmp_path)
    r = run(core_venv, "-c", "import torch")
    assert r.returncode != 0  # the venv really lacks the extras
    cases = [
        (["-m", "bitnet_train", "recipe=shakespeare_tiny"], "pip install 'bitnet-train[train]'"),
        (["-m", "bitnet_train.export.cli", tmp_path, "-o", tmp_path / "x.bitnet"], "pip install 'bitnet-train[train]'"),
        (["-m", "bitnet_train.runtime.cli", "serve", model], "pip install 'bitnet-train[serve]'"),
        (["-m", "bitnet_train.runtime.cli", "eval", model, "--dataset", "wikitext"], "pip install 'bitnet-train[eval]'"),
    ]
    for argv, want in cases:
        r = run(core_venv, *argv)
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (argv, r.stderr)
    r = run(core_venv, "-m", "bitnet_train.runtime.cli", "generate", model, "-p", "To be", "--max-new-tokens", "4",
            "--json")
    assert r.returncode == 0, r.stderr  # the runtime needs no extra
