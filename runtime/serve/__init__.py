"""`bitnet-run serve`: an OpenAI-compatible server with continuous batching (the `[serve]` extra).

scheduler.py  continuous batching over one Engine (engine thread, KV slots, prefix reuse; no HTTP)
protocol.py   the OpenAI request models (validated at the edge), error and response shapes
app.py        the FastAPI app: endpoints, streaming, auth, body limit, metrics, the chat page
metrics.py    Prometheus metrics
static/       the chat page served at /
"""
