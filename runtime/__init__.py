"""Python side of the inference engine. Imports without torch.

`Engine` (runtime/engine.py) loads a .bitnet file (or a config + tensors) onto the C++ CPU engine
(`_C`, built from csrc/) and runs forward passes with a KV cache.
"""

from .engine import Engine, KVCache

__all__ = ["Engine", "KVCache"]
