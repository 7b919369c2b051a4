"""`bitnet-run serve`'s HTTP app with the official `openai` client as the real client: chat and
completions, streaming (== non-streaming), stop strings, finish reasons, usage, typed errors,
concurrency and batch invariance, disconnects, admission control, /health, /metrics, and abuse."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from bitnet_train.runtime import Engine, Generator  # noqa: E402
from bitnet_train.runtime.serve.app import create_app  # noqa: E402

import tiny_files  # noqa: E402
from serve_helpers import ServerThread, WrappedEngine  # noqa: E402

CTX = 256
USER = [{"role": "user", "content": "To be, or not to be"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files.build(str(tmp_path_factory.mktemp("tiny_http")), CTX)


@pytest.fixture(scope="module")
def engine(files):
    return Engine.load(files["model"], threads=1)


@pytest.fixture(scope="module")
def tok(engine):
    return Generator(engine).tokenizer


def serve(engine, **options):
    options.setdefault("model_name", "tiny")
    return ServerThread(create_app(engine, **options))


@pytest.fixture(scope="module")
def server(engine):
    s = serve(engine, max_batch=8, max_body_bytes=2 * 2**20)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(server, name: str) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def chat_text(stream) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason


# ---- the protocol ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=5)],
                         ids=["greedy", "seeded"])
def test_chat_streamed_text_equals_non_streamed_and_usage_counts_tokens(client, tok, sampling):
    full = client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, extra_body={"ignore_eos": True},
                                          **sampling)
    text, reason = chat_text(client.chat.completions.create(model="tiny", messages=USER, max_tokens=24, stream=True,
                                                            extra_body={"ignore_eos": True}, **sampling))
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length" == reason
    assert text == choice.message.content and text
    prompt = tok.encode(tok.apply_chat_template(USER, add_generation_prompt=True), add_special_tokens=False)
    assert full.usage.prompt_tokens == len(prompt)
    assert full.usage.completion_tokens == 24 and full.usage.total_tokens == len(prompt) + 24
    assert full.object == "chat.completion" and full.model == "tiny"


def test_completions_streamed_equals_non_streamed_for_text_and_token_prompts(client, tok, engine):
    ids = tok.encode("Friends, Romans")
    for prompt in ("Friends, Romans", ids):
        full = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True})
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert streamed == full.choices[0].text
        assert full.usage.prompt_tokens == len(ids) and full.usage.completion_tokens == 16
    want = Generator(engine).generate([ids], max_new_tokens=16, ignore_eos=True)[0]
    assert full.choices[0].text == want.text  # what `bitnet-run generate` gives


def test_a_list_of_prompts_with_n_gives_choices_in_order(client):
    seeded = dict(model="tiny", max_tokens=8, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    both = client.completions.create(prompt=["To be", "O"], n=2, **seeded)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for i, p in enumerate(["To be", "O"]):
        alone = client.completions.create(prompt=p, n=2, **seeded)
        assert [c.text for c in alone.choices] == [c.text for c in both.choices[2 * i:2 * i + 2]]
    assert both.choices[0].text != both.choices[1].text  # choice j samples its own stream


def test_a_stop_string_cuts_the_text_and_finishes_with_stop(client):
    free = client.completions.create(model="tiny", prompt="To be", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next(free[i:i + 2] for i in range(4, len(free) - 2) if free[i:i + 2].strip() and free.find(free[i:i + 2]) == i)
    cut = free[:free.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt="To be", max_tokens=40, temperature=0, stop=[stop, "\x00zz"],
                                      stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(r)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")


def test_eos_finishes_with_stop(engine, tok):
    eos = next(iter(tok.eos_ids))
    s = serve(WrappedEngine(engine, eos_at_step=4, eos=eos))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=USER, max_tokens=50, temperature=0)
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4  # EOS counted, not shown
        assert "<|im_end|>" not in r.choices[0].message.content
    finally:
        s.stop()


def test_a_huge_max_tokens_ends_at_the_context_with_length(client, tok):
    r = client.completions.create(model="tiny", prompt="O", max_tokens=10**9, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CTX + 1  # the last token is never fed


def test_stream_chunks_follow_openais_format(server):
    body = {"model": "tiny", "messages": USER, "max_tokens": 6, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    token_chunks = chunks[1:-1]
    assert len(token_chunks) == 6 and token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks[:-1])
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_chat_logprobs_have_one_entry_per_token(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the chosen token is the best
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)


def test_models_and_health(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == CTX
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_health_is_503_while_loading_then_200(engine):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return engine

    s = ServerThread(create_app(slow_loader, model_name="tiny"))
    try:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "O", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "O", "max_tokens": 1}).status_code == 200
    finally:
        s.stop()


def test_a_model_that_fails_to_load_is_reported_by_health():
    def broken():
        raise ValueError("tensor 'layers.0.q.qweight' has the wrong shape")

    s = ServerThread(create_app(broken, model_name="tiny"))
    try:
        deadline = time.monotonic() + 5
        while httpx.get(s.url + "/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "wrong shape" in r.json()["error"]
    finally:
        s.stop()


def test_metrics_count_requests_tokens_and_latencies(server, client):
    before = {n: metric(server, n) for n in ("bitnet_prompt_tokens_total", "bitnet_generation_tokens_total",
                                             "bitnet_time_to_first_token_seconds_count",
                                             "bitnet_inter_token_latency_seconds_count")}
    r = client.completions.create(model="tiny", prompt="Whether 'tis", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert metric(server, "bitnet_prompt_tokens_total") - before["bitnet_prompt_tokens_total"] == r.usage.prompt_tokens
    assert metric(server, "bitnet_generation_tokens_total") - before["bitnet_generation_tokens_total"] == 7
    assert metric(server, "bitnet_time_to_first_token_seconds_count") - before["bitnet_time_to_first_token_seconds_count"] == 1
    assert metric(server, "bitnet_inter_token_latency_seconds_count") - before["bitnet_inter_token_latency_seconds_count"] == 6
    text = httpx.get(server.url + "/metrics").text
    for name in ("bitnet_requests_running", "bitnet_requests_waiting", "bitnet_kv_slots_used", "bitnet_kv_slots_total 8.0"):
        assert name in text


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=5), "temperature"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(extra_body={"top_k": "many"}), "top_k"),
    (dict(extra_body={"max_tokens": "10"}), "max_tokens"),
    (dict(extra_body={"presence_penalty": 3}), "presence_penalty"),
])
def test_bad_fields_raise_bad_request_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, **{"max_tokens": 4, **kwargs})
    assert e.value.body["param"].startswith(param) and param in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"


def test_a_prompt_longer_than_the_context_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=[5] * (CTX + 1), max_tokens=1)


def test_a_wrong_model_name_is_not_found(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="O", max_tokens=1)


def test_a_model_without_a_chat_template_refuses_chat(files):
    s = serve(Engine.load(files["no_template"], threads=1))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="chat template"):
            c.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        assert c.completions.create(model="tiny", prompt="O", max_tokens=2).choices[0].text is not None
    finally:
        s.stop()


def test_the_api_key_is_required_when_set(engine):
    s = serve(engine, api_key="sesame")
    try:
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="open", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="tiny", prompt="O", max_tokens=1)
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "O"}).status_code == 401
        right = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model="tiny", prompt="O", max_tokens=1).usage.completion_tokens == 1
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
    finally:
        s.stop()


def test_queue_overflow_is_429_and_a_disconnect_frees_the_slot(engine):
    s = serve(WrappedEngine(engine, delay=0.01), max_batch=1, max_queue=0)
    try:
        body = {"model": "tiny", "prompt": "O", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError, match="busy"):
                c.completions.create(model="tiny", prompt="O", max_tokens=1)
            assert metric(s, "bitnet_kv_slots_used") == 1
        # the client left mid-stream: its slot is free within a step or two
        deadline = time.monotonic() + 5
        while metric(s, "bitnet_kv_slots_used") != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(s, "bitnet_kv_slots_used") == 0
        assert metric(s, 'bitnet_requests_finished_total{reason="cancelled"}') == 1
        assert c.completions.create(model="tiny", prompt="O", max_tokens=1).usage.completion_tokens == 1
    finally:
        s.stop()


def test_a_non_streaming_client_that_leaves_frees_its_slot(engine):
    s = serve(WrappedEngine(engine, delay=0.01), max_batch=2)
    try:
        body = {"model": "tiny", "prompt": "O", "max_tokens": 200, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json=body, timeout=0.3)  # gives up after ~30 tokens
        deadline = time.monotonic() + 5
        while metric(s, "bitnet_kv_slots_used") != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(s, "bitnet_kv_slots_used") == 0
        assert metric(s, 'bitnet_requests_finished_total{reason="cancelled"}') == 1
        assert metric(s, "bitnet_generation_tokens_total") < 150  # stopped well before its 200 tokens
    finally:
        s.stop()


def test_eight_parallel_staggered_streams_give_the_tokens_of_sequential_requests(engine):
    """Batch invariance through HTTP: 8 streams started 30 ms apart share the engine's steps."""
    s = serve(WrappedEngine(engine, delay=0.01), max_batch=8)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        prompts = [p for p in tiny_files.CORPUS] + ["O", "To"]
        kw = dict(model="tiny", max_tokens=30, temperature=0.8, seed=11, extra_body={"ignore_eos": True})
        sequential = [c.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
        results = [None] * len(prompts)
        peak = []

        def client_thread(i):
            results[i] = "".join(ch.choices[0].text for ch in c.completions.create(prompt=prompts[i], stream=True, **kw))

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
            time.sleep(0.03)
            peak.append(metric(s, "bitnet_requests_running"))
        for t in threads:
            t.join(60)
        assert results == sequential
        assert max(peak) >= 4  # they really ran side by side
    finally:
        s.stop()


# ---- abuse: every request gets an answer, the server keeps serving ----------------------------------

def test_malformed_and_mistyped_bodies_get_openai_shaped_400s(server):
    url = server.url + "/v1/chat/completions"
    cases = [b"{not json", b"[1, 2]", b'"text"', json.dumps({"model": "tiny", "messages": "hi"}).encode(),
             json.dumps({"model": "tiny", "messages": []}).encode(),
             json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
             json.dumps({"model": "tiny", "messages": USER, "stop": [""]}).encode(), b""]
    for body in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, body
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"] and "Traceback" not in err["message"]
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["message"] == "Not Found"
    assert httpx.get(url).status_code == 405


def test_a_megabyte_prompt_and_an_oversized_body(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "to be " * 175_000, "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (3 * 2**20), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b" " * 2**20
    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=60)
    assert r.status_code == 413


def test_a_slow_reader_gets_its_whole_answer(server, client):
    body = {"model": "tiny", "prompt": "O", "max_tokens": 20, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        time.sleep(1.0)  # the engine finishes meanwhile; the text waits in the server's queue
        rest = list(lines)
    events = [x[6:] for x in [first, *rest] if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == client.completions.create(model="tiny", prompt="O", max_tokens=20, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text


def test_a_thousand_sequential_requests(server):
    with httpx.Client(base_url=server.url) as h:
        codes = [h.post("/v1/completions", json={"model": "tiny", "prompt": "O", "max_tokens": 2}).status_code
                 for _ in range(1000)]
    assert codes == [200] * 1000
    assert httpx.get(server.url + "/health").status_code == 200
    assert metric(server, "bitnet_kv_slots_used") == 0
