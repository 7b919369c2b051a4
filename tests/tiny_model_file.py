"""A tiny .bitnet file for tests that run the runtime elsewhere (another venv): the runtime tests'
tokenizer and model (tests/runtime/tiny_files.py)."""

from __future__ import annotations

import sys
from pathlib import Path


def write(directory: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent / "runtime"))
    import tiny_files

    return tiny_files.build(str(directory))["model"]
