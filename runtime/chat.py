"""A multi-turn conversation with the model file's chat template, keeping the KV cache between turns.

    chat = ChatSession(Generator(Engine.load("model.bitnet")), system="Be brief.")
    for event in chat.send("Hello!", sampling=SamplingParams(temperature=0.7, seed=0)):
        print(event.text, end="")
    chat.messages       # [system, user, assistant]

Each turn renders the whole conversation (as transformers' apply_chat_template with
add_generation_prompt) and tokenizes it without adding special tokens (the template writes them).
When the tokens already in the cache are a prefix of the new conversation's tokens, only the rest
is prefilled; otherwise (the template or the tokenizer rewrote earlier text) the cache starts over.
"""

from __future__ import annotations

from .generate import GenerationStream, Generator, PromptTooLongError
from .tokenizer import TokenizerError


class ChatSession:
    def __init__(self, generator: Generator, system: str | None = None):
        if generator.tokenizer is None:
            raise TokenizerError("the model file has no tokenizer; chat needs one")
        self.gen = generator
        self.tok = generator.tokenizer
        self.system = system
        self.messages: list[dict] = []
        self.reset()
        self.tok.apply_chat_template(self.messages + [{"role": "user", "content": "hi"}])  # no template: fail now
        self.cache = generator.engine.new_cache(1)
        self._cached: list[int] = []  # the tokens whose K/V slot 0 holds
        self.reused_tokens = 0  # of the last turn's prompt, how many came from the cache

    def reset(self) -> None:
        """Forget the conversation (keeps the system message)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, max_new_tokens: int = 512, **kwargs) -> GenerationStream:
        """Add a user message and stream the assistant's answer (appended to messages when the stream
        ends). kwargs: Generator.stream's (sampling, stop, ...)."""
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.tok.encode(self.tok.apply_chat_template(messages, add_generation_prompt=True),
                              add_special_tokens=False)
        ctx = self.gen.engine.max_seq_len
        if len(ids) > ctx:
            raise PromptTooLongError(f"the conversation has {len(ids)} tokens; the model's context is {ctx} tokens "
                                     f"(reset to start over)")
        n = self.cache.length(0)
        if not (n < len(ids) and self._cached[:n] == ids[:n]):
            self.cache.reset(0)
            n = 0
        self.reused_tokens = n
        stream = self.gen.stream([ids], max_new_tokens=min(max_new_tokens, ctx - len(ids) + 1), cache=self.cache,
                                 add_special_tokens=False, **kwargs)
        done = stream.completions[0]
        self.messages = messages

        def events():
            yield from stream
            self._cached = (ids + done.token_ids)[:self.cache.length(0)]
            self.messages = messages + [{"role": "assistant", "content": done.text}]

        return GenerationStream(events(), stream.completions, stream.stats)
