"""Helpers of the serve tests: an in-process uvicorn server on a free loopback port, and an engine
wrapper that slows steps down, injects failures or forces EOS."""

from __future__ import annotations

import threading
import time

import numpy as np


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a thread; .url, .stop()."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def state(self):
        return self.app.state.server

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class WrappedEngine:
    """The real engine, except: a batch holding token `poison` raises; each step takes at least
    `delay` seconds (the tiny model's steps take ~0.1 ms, too fast for requests to overlap); and
    from the `eos_at_step`-th forward call on, `eos` is every row's clear argmax."""

    def __init__(self, engine, poison: int | None = None, delay: float = 0.0, eos_at_step: int | None = None,
                 eos: int | None = None):
        self._e, self.poison, self.delay, self.eos_at_step, self.eos = engine, poison, delay, eos_at_step, eos
        self.max_seq_len, self.vocab_size = engine.max_seq_len, engine.vocab_size
        self.tokenizer_json, self.tokenizer_config = engine.tokenizer_json, engine.tokenizer_config
        self.calls = 0

    def new_cache(self, *a, **k):
        return self._e.new_cache(*a, **k)

    def forward(self, rows, **kw):
        if self.poison is not None and any(self.poison in r for r in rows):
            raise RuntimeError("injected failure")
        time.sleep(self.delay)
        out = self._e.forward(rows, **kw)
        self.calls += 1
        if self.eos_at_step is not None and self.calls >= self.eos_at_step:
            out = np.array(out)
            out[..., self.eos] = out.max() + 100.0
        return out
