"""The server's Prometheus metrics (prometheus_client), one registry per app so several apps (tests)
can live in one process. The scheduler calls the observe_* methods from its engine thread.

    bitnet_requests_running / bitnet_requests_waiting    sequences holding a slot / queued for one
    bitnet_kv_slots_used / bitnet_kv_slots_total         KV-cache slots
    bitnet_prompt_tokens_total                           prompt tokens admitted (reused ones included)
    bitnet_prompt_tokens_reused_total                    of those, taken from a slot's cache
    bitnet_generation_tokens_total                       tokens generated
    bitnet_requests_finished_total{reason}               eos, stop, length, cancelled, error
    bitnet_time_to_first_token_seconds                   submit -> first token, per sequence
    bitnet_inter_token_latency_seconds                   gap between a sequence's tokens
    bitnet_queue_time_seconds                            submit -> slot
    bitnet_step_seconds, bitnet_step_tokens              engine steps
    bitnet_http_requests_total{endpoint,status}          HTTP answers
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("bitnet_requests_running", "Sequences holding a KV-cache slot", registry=r)
        self.waiting = Gauge("bitnet_requests_waiting", "Sequences waiting for a KV-cache slot", registry=r)
        self.slots_used = Gauge("bitnet_kv_slots_used", "KV-cache slots in use", registry=r)
        self.slots_total = Gauge("bitnet_kv_slots_total", "KV-cache slots (--max-batch)", registry=r)
        self.prompt_tokens = Counter("bitnet_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.reused_tokens = Counter("bitnet_prompt_tokens_reused", "Prompt tokens reused from a slot's cache",
                                     registry=r)
        self.generation_tokens = Counter("bitnet_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("bitnet_requests_finished", "Sequences ended, by reason", ["reason"], registry=r)
        self.ttft = Histogram("bitnet_time_to_first_token_seconds", "Submit to first token, per sequence",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("bitnet_inter_token_latency_seconds", "Time between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("bitnet_queue_time_seconds", "Submit to KV-cache slot", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.step_seconds = Histogram("bitnet_step_seconds", "Engine step time", buckets=LATENCY_BUCKETS, registry=r)
        self.step_tokens = Counter("bitnet_step_tokens", "Tokens fed to the engine", registry=r)
        self.http = Counter("bitnet_http_requests", "HTTP answers", ["endpoint", "status"], registry=r)

    def watch(self, scheduler) -> None:
        """Read the gauges from the scheduler at scrape time."""
        self.running.set_function(lambda: scheduler.running)
        self.waiting.set_function(lambda: scheduler.waiting)
        self.slots_used.set_function(lambda: scheduler.slots_used)
        self.slots_total.set(scheduler.max_batch)

    # ---- called by the scheduler (engine thread) -----------------------------------------------------

    def observe_admitted(self, prompt_tokens: int, reused: int, queue_seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.reused_tokens.inc(reused)
        self.queue_time.observe(queue_seconds)

    def observe_step(self, seconds: float, tokens: int) -> None:
        self.step_seconds.observe(seconds)
        self.step_tokens.inc(tokens)

    def observe_first_token(self, seconds: float) -> None:
        self.generation_tokens.inc()
        self.ttft.observe(seconds)

    def observe_token_gap(self, seconds: float) -> None:
        self.generation_tokens.inc()
        self.itl.observe(seconds)

    def observe_finished(self, reason: str) -> None:
        self.finished.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
