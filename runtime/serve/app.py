"""The OpenAI-compatible HTTP app (FastAPI): a thin translation of requests into Scheduler calls.

    app = create_app(lambda: Engine.load("model.bitnet"), model_name="model")   # loads in a thread
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (503 while
loading, 200 when ready), GET /metrics (Prometheus), GET / (the chat page). With an API key, the
/v1 endpoints need `Authorization: Bearer KEY`. Every error is answered in OpenAI's shape; no
request can stop the server (an engine failure ends that request with an error, the server serves on).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import PromptTooLongError
from ..tokenizer import Tokenizer, TokenizerError
from . import protocol as P
from .metrics import ServerMetrics
from .scheduler import QueueFullError, Scheduler, SchedulerClosedError, SchedulerError, SequenceRequest

STATIC = Path(__file__).with_name("static")
DEFAULT_MAX_BODY = 8 * 1024 * 1024


class _BodyLimit:
    """ASGI middleware: 413 for a request body over max_bytes (by Content-Length, or counted as it arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = P.APIError(413, f"the request body is larger than {self.max_bytes} bytes", code="body_too_large")
        length = dict(scope.get("headers") or {}).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse(too_big.body(), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_big
            return message

        return await self.app(scope, limited_receive, send)


class ServerState:
    """What the endpoints share: the scheduler once the model is loaded."""

    def __init__(self, model_name: str, api_key: str | None, scheduler_options: dict):
        self.model_name, self.api_key = model_name, api_key
        self.scheduler_options = scheduler_options
        self.metrics = ServerMetrics()
        self.scheduler: Scheduler | None = None
        self.tokenizer: Tokenizer | None = None
        self.load_error: str | None = None

    def install(self, engine) -> None:
        sched = Scheduler(engine, metrics=self.metrics, **self.scheduler_options)
        self.metrics.watch(sched)
        self.tokenizer = sched.tokenizer
        self.scheduler = sched.start()
        logging.getLogger("uvicorn.error").info(
            "model ready: %d slots of %d tokens, KV cache %.0f MiB (%s)", sched.max_batch, sched.ctx,
            sched.cache.nbytes / 2**20, getattr(sched.cache, "dtype", "f32"))

    def load(self, loader: Callable[[], object]) -> None:
        try:
            self.install(loader())
        except Exception as e:  # noqa: BLE001 - reported by /health and every request
            self.load_error = f"{type(e).__name__}: {e}"

    def ready_scheduler(self) -> Scheduler:
        if self.load_error:
            raise P.APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if self.scheduler is None:
            raise P.APIError(503, "the model is still loading; retry shortly", code="model_loading")
        if self.scheduler.dead:
            raise P.APIError(503, f"the engine stopped: {self.scheduler.dead}", code="engine_dead")
        return self.scheduler


def create_app(engine_or_loader, *, model_name: str = "bitnet", api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, **scheduler_options) -> FastAPI:
    """engine_or_loader: an Engine, or a callable returning one (run in a thread at startup, so
    /health answers 503 while it loads). scheduler_options: Scheduler's (max_batch, ctx, max_queue,
    step_tokens, idle_step_tokens, step_time_factor)."""
    state = ServerState(model_name, api_key, scheduler_options)

    @asynccontextmanager
    async def lifespan(app):
        if callable(engine_or_loader) and not hasattr(engine_or_loader, "forward"):
            threading.Thread(target=state.load, args=(engine_or_loader,), name="bitnet-load", daemon=True).start()
        else:
            state.install(engine_or_loader)
        yield
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="bitnet_train", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, e: P.APIError):
        state.metrics.http.labels(endpoint=request.url.path, status=str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(P.APIError(e.status_code, str(e.detail), code="http_error").body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        state.metrics.http.labels(endpoint=request.url.path, status="500").inc()
        err = P.APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), state.api_key.encode()):
            raise P.APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        try:
            state.ready_scheduler()
        except P.APIError as e:  # 503 while loading, or naming why it cannot serve
            body = {"status": "loading"} if e.code == "model_loading" else {"status": "error", "error": e.message}
            return JSONResponse(body, status_code=e.status)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse((STATIC / "chat.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        sched = state.scheduler
        entry = {"id": state.model_name, "object": "model", "created": P.now(), "owned_by": "bitnet_train"}
        if sched is not None:
            entry["max_model_len"] = sched.ctx
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = P.parse(P.ChatCompletionRequest, await request.body())
        sched = _prepare(req)
        if req.tools:
            raise P.APIError(400, "tools (function calling) are not supported by this server", param="tools",
                             code="unsupported")
        tok = _need_tokenizer("chat completions")
        messages = [m.as_template_message() for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except TokenizerError as e:
            raise P.APIError(400, f"{e}; use /v1/completions", param="messages", code="no_chat_template") from None
        ids = await asyncio.to_thread(tok.encode, text, add_special_tokens=False)
        return await _generate(request, sched, req, [ids], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = P.parse(P.CompletionRequest, await request.body())
        sched = _prepare(req)
        prompts = []
        for p in req.prompts():
            if isinstance(p, str):
                tok = _need_tokenizer("text prompts")
                p = await asyncio.to_thread(tok.encode, p)
            prompts.append(p)
        return await _generate(request, sched, req, prompts, chat=False)

    def _prepare(req: P.SamplingFields) -> Scheduler:
        sched = state.ready_scheduler()
        if req.model is not None and req.model != state.model_name:
            raise P.APIError(404, f"model {req.model!r} does not exist; this server serves {state.model_name!r}",
                             param="model", code="model_not_found")
        return sched

    def _need_tokenizer(what: str) -> Tokenizer:
        if state.tokenizer is None:
            raise P.APIError(400, f"{what} need a tokenizer and the model file has none; send token ids as the "
                             f"prompt of /v1/completions", code="no_tokenizer")
        return state.tokenizer

    async def _generate(request: Request, sched: Scheduler, req, prompts: list[list[int]], chat: bool):
        logprobs = req.logprobs_k() if chat else req.logprobs
        try:
            sampling = req.sampling()
        except ValueError as e:
            raise P.APIError(400, str(e), code="invalid_value") from None
        seqs = [SequenceRequest(ids, max_tokens=req.limit, sampling=sampling, stream=j, stop=req.stop_list(),
                                ignore_eos=req.ignore_eos, logprobs=logprobs)
                for ids in prompts for j in range(req.n)]
        try:
            handle = sched.submit(seqs)
        except QueueFullError as e:
            raise P.APIError(429, str(e), code="queue_full") from None
        except SchedulerClosedError as e:
            raise P.APIError(503, str(e), code="engine_stopped") from None
        except PromptTooLongError as e:
            raise P.APIError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded") from None
        except (ValueError, TokenizerError) as e:
            raise P.APIError(400, str(e), code="invalid_value") from None
        render = _Renderer(state, req, prompts, chat, logprobs)
        state.metrics.http.labels(endpoint=request.url.path, status="200").inc()
        if req.stream:
            return StreamingResponse(render.stream(handle), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            outputs = [[] for _ in seqs]
            async for choice, out in handle:
                if isinstance(out, SchedulerError):
                    raise P.APIError(500, out.message, code="engine_error")
                outputs[choice].append(out)
        finally:
            watcher.cancel()
            handle.cancel()
        return JSONResponse(render.response(handle, outputs))

    return app


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """A non-streaming request whose client left frees its slots too."""
    try:
        while not handle.cancelled:
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(0.25)
    except asyncio.CancelledError:
        pass


class _Renderer:
    """Scheduler outputs -> OpenAI JSON (chat.completion / text_completion, and their stream chunks)."""

    def __init__(self, state: ServerState, req, prompts: list[list[int]], chat: bool, logprobs: int | None):
        self.tok, self.req, self.prompts, self.chat, self.k = state.tokenizer, req, prompts, chat, logprobs
        self.model = state.model_name
        self.id = P.new_id("chatcmpl" if chat else "cmpl")
        self.created = P.now()
        self.object = "chat.completion" if chat else "text_completion"

    def _token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False) if self.tok is not None else f"token_id:{token_id}"

    def _chat_logprob(self, out) -> dict:
        def entry(tid, lp):
            s = self._token(tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {**entry(out.token_id, out.logprob), "top_logprobs": [entry(t, lp) for t, lp in out.top_logprobs or []]}

    def _completion_logprobs(self, outs, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for o in outs:
            tokens.append(self._token(o.token_id))
            lps.append(o.logprob)
            tops.append({self._token(t): lp for t, lp in o.top_logprobs or []})
            offsets.append(offset)
            offset += len(o.text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _echo(self, choice: int) -> str:
        if self.chat or not self.req.echo or self.tok is None:
            return ""
        return self.tok.decode(self.prompts[choice // self.req.n])

    def _usage(self, handle) -> dict:
        prompt = sum(handle.results[i * self.req.n].prompt_tokens for i in range(len(self.prompts)))
        cached = sum(handle.results[i * self.req.n].cached_tokens for i in range(len(self.prompts)))
        return P.usage(prompt, sum(len(r.token_ids) for r in handle.results), cached)

    def response(self, handle, outputs: list[list]) -> dict:
        choices = []
        for i, (res, outs) in enumerate(zip(handle.results, outputs)):
            text = "".join(o.text for o in outs)
            c = {"index": i, "finish_reason": P.finish_reason(res.finish_reason), "logprobs": None}
            if self.chat:
                c["message"] = {"role": "assistant", "content": text}
                if self.k is not None:
                    c["logprobs"] = {"content": [self._chat_logprob(o) for o in outs]}
            else:
                echo = self._echo(i)
                c["text"] = echo + text
                if self.k is not None:
                    c["logprobs"] = self._completion_logprobs(outs, len(echo))
            choices.append(c)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(handle)}

    def _chunk(self, choices: list, usage=None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self.req.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, handle):
        """Server-sent events: one chunk per token (the first delta of a chat choice carries the
        role), the last chunk of a choice its finish_reason, then the usage chunk if asked, then [DONE]."""
        offsets = [len(self._echo(i)) for i in range(len(handle.results))]
        try:
            if self.chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(len(handle.results))])
            elif self.req.echo:
                yield self._chunk([{"index": i, "text": self._echo(i), "logprobs": None, "finish_reason": None}
                                   for i in range(len(handle.results))])
            async for choice, out in handle:
                if isinstance(out, SchedulerError):
                    err = P.APIError(500, out.message, code="engine_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                c = {"index": choice, "logprobs": None, "finish_reason": P.finish_reason(out.finish_reason)}
                if self.chat:
                    c["delta"] = {"content": out.text} if out.text or out.finish_reason is None else {}
                    if self.k is not None:
                        c["logprobs"] = {"content": [self._chat_logprob(out)]}
                else:
                    c["text"] = out.text
                    if self.k is not None:
                        c["logprobs"] = self._completion_logprobs([out], offsets[choice])
                offsets[choice] += len(out.text)
                yield self._chunk([c])
            else:
                if self.req.include_usage:
                    yield self._chunk([], usage=self._usage(handle))
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()
