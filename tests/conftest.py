import importlib.util
import os
from pathlib import Path

import pytest

# Keep tests offline and quiet whatever the machine's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


VERSE_WORDS = ("thou art the king and I the fool of time that speaks in sleep good night sweet prince "
               "my lord the queen doth love thee well enough what light through yonder window breaks").split()


def write_verse_corpus(d: Path, docs: int, lines: int, words_per_line: tuple[int, int] = (6, 6)) -> Path:
    """Deterministic pseudo-verse: `docs` text files of `lines` lines each, words drawn with a fixed seed."""
    import torch

    g = torch.Generator().manual_seed(0)
    lo, hi = words_per_line
    for doc in range(docs):
        out = []
        for _ in range(lines):
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))
            out.append(" ".join(VERSE_WORDS[i] for i in torch.randint(0, len(VERSE_WORDS), (n,), generator=g).tolist()))
        (d / f"doc{doc}.txt").write_text("\n".join(out) + "\n")
    return d


@pytest.fixture(scope="session")
def verse_corpus():
    """verse_corpus(tmp_dir, docs, lines, words_per_line) -> the directory, filled."""
    return write_verse_corpus


@pytest.fixture(scope="session")
def bench_script():
    """bench_script("distill_study") -> bench/distill_study.py loaded as a module (bench/ is no package)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
