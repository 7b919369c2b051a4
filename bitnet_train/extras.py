"""Optional features and the extras that install them: a missing one is one line naming the extra.

    require("train", "python -m bitnet_train")   # MissingExtraError: "... pip install 'bitnet-train[train]'"

Modules are looked up with importlib.util.find_spec (nothing is imported), so the check costs
nothing and runs before the first import that would fail with a traceback. No dependencies.
"""

from __future__ import annotations

import importlib.util

from .errors import BitNetError

# extra -> (module, pip name) pairs that the feature imports
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("torch", "torch"), ("lightning", "lightning"), ("hydra", "hydra-core"), ("omegaconf", "omegaconf"),
              ("datasets", "datasets"), ("transformers", "transformers")),
    "serve": (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus-client")),
    "eval": (("datasets", "datasets"), ("lm_eval", "lm-eval")),
    "gguf": (("gguf", "gguf"),),
}
TORCH_NOTE = " (on a CPU-only machine install torch==2.13.0 first: an unpinned torch pulls CUDA packages)"


class MissingExtraError(BitNetError):
    """An optional feature whose packages are not installed."""


def missing(extra: str, only: tuple[str, ...] | None = None) -> list[str]:
    """The pip names of the extra's packages (or of the modules `only`) that are not installed."""
    return [pip for module, pip in EXTRAS[extra]
            if (only is None or module in only) and importlib.util.find_spec(module) is None]


def require(extra: str, feature: str, only: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtraError naming the extra when any of its packages (or of `only`) is missing."""
    absent = missing(extra, only)
    if absent:
        note = TORCH_NOTE if "torch" in absent else ""
        raise MissingExtraError(f"{feature} needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not "
                                f"installed: pip install 'bitnet-train[{extra}]'{note}")
