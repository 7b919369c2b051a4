"""Python side of the inference engine. Imports without torch.

`Engine` (runtime/engine.py) loads a .bitnet file (or a config + tensors) onto the C++ CPU engine
(`_C`, built from csrc/) and runs forward passes with a KV cache. `Generator` (generate.py) turns
it into text generation (ragged batches, streaming, stop strings) with `SamplingParams`
(sampling.py) and the file's `Tokenizer` (tokenizer.py, chat template included); `ChatSession`
(chat.py) keeps a conversation and its KV cache. `bitnet-run` is cli.py.
"""

from .chat import ChatSession
from .engine import Engine, KVCache
from .generate import Completion, Generator, PromptTooLongError, TokenEvent
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

__all__ = ["ChatSession", "Completion", "Engine", "Generator", "KVCache", "PromptTooLongError", "Sampler", "SamplingParams",
           "TokenEvent", "Tokenizer"]
