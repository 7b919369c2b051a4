"""The OpenAI HTTP protocol as typed models, in one place: requests are validated here (strict JSON:
a string is not a number), responses and stream chunks are built here.

Supported request fields (anything else is ignored, as OpenAI-compatible servers do):
  chat:        model, messages (content: a string or a list of text parts), max_tokens /
               max_completion_tokens, temperature, top_p, top_k, seed, stop, presence_penalty,
               frequency_penalty, repetition_penalty, logprobs + top_logprobs, n, stream,
               stream_options.include_usage, ignore_eos (extension, for benchmarks)
  completions: model, prompt (a string, a list of strings, a list of token ids or of such lists),
               the same sampling fields, logprobs (an integer: top alternatives), echo
finish_reason: "stop" (EOS or a stop string) or "length" (max_tokens or the context).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..sampling import SamplingParams
from .scheduler import MAX_TOP_LOGPROBS

MAX_N = 16
MAX_STOP = 16
Number = StrictFloat | StrictInt


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Model):
    include_usage: StrictBool = False


class SamplingFields(_Model):
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # -1 or 0: off
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=float(1.0 if self.temperature is None else self.temperature),
            top_k=max(0, self.top_k or 0), top_p=float(1.0 if self.top_p is None else self.top_p),
            repetition_penalty=float(self.repetition_penalty or 1.0), seed=self.seed,
            presence_penalty=float(self.presence_penalty or 0.0), frequency_penalty=float(self.frequency_penalty or 0.0))

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop] if self.stop else []
        return list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(_Model):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Any] | None = None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: StrictStr | TokenIds | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: StrictBool = False

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


# ---- errors ------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or self.TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc) -> str:
    """A pydantic error location without its union-branch tags: ("stop", "list[...]", 0) -> "stop.0"."""
    return ".".join(str(x) for x in loc if not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x
                                                                          or x.startswith(("constrained-", "function-")))))


def validation_error(e: ValidationError) -> APIError:
    """One line naming the field. A union field fails once per branch: the deepest failure (a
    constraint before a type mismatch) says the most."""
    errors = e.errors(include_url=False)
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if first.get("type") == "model_type" and not first.get("loc"):
        return APIError(400, "the request body must be a JSON object", code="invalid_request")
    group = [err for err in errors if err.get("loc", ())[:1] == first.get("loc", ())[:1]]
    err = max(group, key=lambda x: (len(x.get("loc", ())), not str(x.get("type", "")).endswith("_type")))
    loc = _field_path(err.get("loc", ()))
    return APIError(400, f"{loc or 'body'}: {err.get('msg', 'invalid value')}", param=loc or None, code="invalid_value")


def parse(model: type[_Model], raw: bytes) -> _Model:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None


# ---- responses -----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finish_reason(reason: str | None) -> str | None:
    """Ours ("eos", "stop", "length") -> OpenAI's ("stop", "length")."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason) if reason else None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
