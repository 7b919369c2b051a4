"""The model file's tokenizer: `tokenizers` for text <-> ids, jinja2 for the chat template. No transformers.

    tok = Tokenizer.from_model_file(bitnet_file)          # or Tokenizer(tokenizer_json, tokenizer_config)
    ids = tok.encode("Hello")                             # special tokens as tokenizer.json's post-processor adds
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)      # the template already wrote bos etc.
    tok.eos_ids                                           # ids that end a generation

The chat template is rendered as transformers' `apply_chat_template` renders it: a sandboxed jinja2
environment with trim_blocks and lstrip_blocks, loop controls, a `tojson` that does not escape HTML,
`raise_exception`, `strftime_now`, the special tokens (`bos_token`, `eos_token`, ...) as variables,
and `{% generation %}` blocks rendered as their content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from ..errors import BitNetError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
DEFAULT_EOS = "<|endoftext|>"  # what bitnet_train's own tokenizers use when the config names none


class TokenizerError(BitNetError):
    """A model file without a usable tokenizer or chat template."""


def _token_text(value) -> str | None:
    """tokenizer_config writes a special token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    def __init__(self, tokenizer_json: str, tokenizer_config: Mapping | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises its own Exception type for bad JSON
            raise TokenizerError(f"the model file's tokenizer.json cannot be loaded: {e}") from None
        self.config = dict(tokenizer_config or {})
        self.special_tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(self.config.get(k))) is not None}
        eos = self.special_tokens.get("eos_token")
        if eos is None and self._tok.token_to_id(DEFAULT_EOS) is not None:
            eos = DEFAULT_EOS
        self.eos_ids: set[int] = set()
        if eos is not None:
            i = self._tok.token_to_id(eos)
            if i is None:
                raise TokenizerError(f"tokenizer_config's eos_token {eos!r} is not in the tokenizer's vocabulary")
            self.eos_ids.add(i)
        bos = self.special_tokens.get("bos_token")
        self.bos_id = self._tok.token_to_id(bos) if bos is not None else None
        template = self.config.get("chat_template")
        if isinstance(template, list):  # older configs: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) and template else None
        self._compiled = None

    @classmethod
    def from_model_file(cls, f) -> "Tokenizer":
        """From a BitNetFile or a loaded Engine (anything with .tokenizer_json and .tokenizer_config)."""
        if not getattr(f, "tokenizer_json", None):
            raise TokenizerError(f"{getattr(f, 'path', 'the model file')} has no tokenizer (export it with "
                                 f"`bitnet-export ... --tokenizer DIR`), so it cannot take text")
        return cls(f.tokenizer_json, f.tokenizer_config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- chat -------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as text, with the assistant's header at the end when add_generation_prompt."""
        if self.chat_template is None:
            raise TokenizerError("the model file has no chat template (tokenizer_config.chat_template); "
                                 "use `generate` with a plain prompt instead of `chat`")
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        import jinja2

        variables = {**self.special_tokens, **kwargs}
        try:
            return self._compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template failed: {e}") from None


def _compile(template: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError("chat templates need jinja2 (pip install jinja2)") from None

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse: {e}") from None


class IncrementalDecoder:
    """Text deltas for ids appended one at a time, never splitting a multi-byte character.

    Decodes a short window (a few ids of context + the new ones) so that a tokenizer whose decoding
    depends on the neighbours (SentencePiece's leading space) gives the same text as decoding the
    whole sequence. While the window's text ends in U+FFFD (an incomplete UTF-8 sequence) nothing
    is emitted; `flush` gives whatever is left at the end.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids = [int(i) for i in prompt_ids]
        self.prefix = max(len(self.ids) - self.CONTEXT, 0)  # window start
        self.read = len(self.ids)  # ids before this are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text):]
