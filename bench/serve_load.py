"""Load benchmark of `bitnet-run serve`: N concurrent streaming clients (asyncio + httpx) on loopback.

    python bench/serve_load.py --shape bitnet-large --threads 2 --kv-cache f16        # random weights
    python bench/serve_load.py --model model.bitnet --clients 1,2,4,8,16 --json

Starts the server as a subprocess (random ternary weights of --shape written to a temp file, or
--model), then:
  1. for each N in --clients: N clients, each sending --requests-per-client streaming completions
     of --prompt-tokens random token ids and --max-tokens generated tokens (ignore_eos); reports
     aggregate generated tokens/s (all tokens / wall time), time to first token p50/p99,
     inter-token latency p50/p99, errors, and the server's RSS before and after;
  2. a long prompt among running streams: 7 streams decode, then one --long-prompt-tokens prompt
     arrives; the 7 streams' inter-token p50/p99 while it is prefilled, against their p50 before;
  3. --sequential requests one after another (max_tokens 4): errors and RSS growth.
Every loop is bounded in count and time (--timeout per request); the server only listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bitnet_train.runtime.bench import cpu_line


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def step_stats(url: str) -> tuple[float, float]:
    """(sum of engine step seconds, step count) from the server's /metrics."""
    import httpx

    total = count = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("bitnet_step_seconds_sum "):
            total = float(line.split()[1])
        elif line.startswith("bitnet_step_seconds_count "):
            count = float(line.split()[1])
    return total, count


def pct(xs, q) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if len(xs) else None


class Server:
    def __init__(self, model: Path, args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "bitnet_train.runtime.cli", "serve", str(model), "--port", str(self.port),
               "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--ctx", str(args.ctx),
               "--kv-cache", args.kv_cache, "--log-level", "warning", "--model-name", "bench", "--max-queue", str(4 * args.max_batch)]
        if args.step_tokens:
            cmd += ["--step-tokens", str(args.step_tokens)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def stream_one(client, url: str, prompt: list[int], max_tokens: int, timeout: float) -> dict:
    """One streaming completion: arrival times of its tokens (one chunk per token)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    times = []

    async def read() -> str | None:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return f"HTTP {r.status_code}: {r.text[:200]}"
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return chunk["error"]["message"]
                    if chunk["choices"]:
                        times.append(time.perf_counter())
        return None

    try:
        err = await asyncio.wait_for(read(), timeout)
    except Exception as e:  # noqa: BLE001 - counted as an error of the run
        err = f"{type(e).__name__}: {e}"
    if err is not None:
        return {"error": err, "start": t0, "times": times}
    err = None if len(times) == max_tokens else f"{len(times)} tokens of {max_tokens}"
    return {"error": err, "start": t0, "times": times}


def summarize(results: list[dict], wall: float) -> dict:
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in results)
    errors = [r["error"] for r in results if r["error"] is not None]
    return {"requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 2),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


async def run_clients(url: str, n: int, per_client: int, prompt_tokens: int, max_tokens: int, vocab: int,
                      timeout: float) -> dict:
    import httpx

    rng = random.Random(n)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n + 4)) as client:
        async def client_loop(i):
            out = []
            for _ in range(per_client):
                prompt = [rng.randrange(vocab) for _ in range(prompt_tokens)]
                out.append(await stream_one(client, url, prompt, max_tokens, timeout))
            return out
        t0 = time.perf_counter()
        per = await asyncio.gather(*(client_loop(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return summarize([r for rs in per for r in rs], wall)


async def run_long_prompt(url: str, streams: int, long_tokens: int, max_tokens: int, vocab: int, timeout: float) -> dict:
    """`streams` running decodes, then one long prompt: their gaps before it and while it prefills."""
    import httpx

    rng = random.Random(99)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=streams + 4)) as client:
        tasks = [asyncio.create_task(stream_one(client, url, [rng.randrange(vocab) for _ in range(20)], max_tokens,
                                                timeout)) for _ in range(streams)]
        await asyncio.sleep(3.0)  # all decoding
        t_long = time.perf_counter()
        long = await stream_one(client, url, [rng.randrange(vocab) for _ in range(long_tokens)], 8, timeout)
        t_first = long["times"][0] if long["times"] else time.perf_counter()
        runs = await asyncio.gather(*tasks)
    before, during = [], []
    for r in runs:
        for a, b in zip(r["times"], r["times"][1:]):
            if b < t_long:
                before.append(b - a)
            elif b <= t_first:
                during.append(b - a)
    return {"streams": streams, "long_prompt_tokens": long_tokens, "long_ttft_s": round(t_first - t_long, 3),
            "long_error": long["error"], "stream_errors": sum(r["error"] is not None for r in runs),
            "itl_p50_before": pct(before, 50), "itl_p99_before": pct(before, 99),
            "itl_p50_during": pct(during, 50), "itl_p99_during": pct(during, 99), "gaps_during": len(during),
            "itl_p99_during_over_p50_before": round(pct(during, 99) / pct(before, 50), 2) if before and during else None}


async def run_sequential(url: str, count: int, vocab: int, timeout: float) -> dict:
    import httpx

    rng = random.Random(7)
    errors = 0
    async with httpx.AsyncClient(timeout=timeout) as client:
        t0 = time.perf_counter()
        for _ in range(count):
            body = {"model": "bench", "prompt": [rng.randrange(vocab) for _ in range(16)], "max_tokens": 4,
                    "ignore_eos": True}
            try:
                r = await client.post(url + "/v1/completions", json=body)
                errors += r.status_code != 200
            except httpx.HTTPError:
                errors += 1
        wall = time.perf_counter() - t0
    return {"requests": count, "errors": errors, "wall_s": round(wall, 2)}


def static_batches(model: Path, args, sizes: list[int]) -> dict[int, float]:
    """The engine without the server, side by side: Generator with a static batch of B prompts
    (--prompt-tokens random ids each, --max-tokens generated, ignore_eos), aggregate tokens/s of
    the whole call (prefill included, as the clients measure). Continuous batching can at best
    reach these figures; the server's rows are also given as a fraction of them."""
    from bitnet_train.runtime import Engine, Generator

    eng = Engine.load(model, threads=args.threads, kv_cache=args.kv_cache, verify_checksums=False)
    gen = Generator(eng)
    rng = random.Random(5)
    vocab = eng.vocab_size
    out = {}
    gen.generate([[1] * args.prompt_tokens], max_new_tokens=8, ignore_eos=True)  # warm-up
    for b in sizes:
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(b)]
        t0 = time.perf_counter()
        done = gen.generate(prompts, max_new_tokens=args.max_tokens, ignore_eos=True)
        out[b] = round(sum(len(c.token_ids) for c in done) / (time.perf_counter() - t0), 2)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a .bitnet file (default: random weights of --shape)")
    p.add_argument("--shape", default="bitnet-large")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", choices=("f32", "f16"), default="f16")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=1280)
    p.add_argument("--step-tokens", type=int, default=None, help="the server's --step-tokens (default: its own)")
    p.add_argument("--clients", default="1,2,4,8,16")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--long-prompt-tokens", type=int, default=1000)
    p.add_argument("--sequential", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--skip", default="", help="comma list of parts to skip: static, clients, long, sequential")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    tmp = None
    model = args.model
    if model is None:
        from bitnet_train.runtime.bench import write_random_model

        tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
        model = write_random_model(Path(tmp.name) / f"{args.shape}.bitnet", args.shape, max_seq_len=args.ctx)
    from bitnet_train.export.reader import open_model

    vocab = int(open_model(model, verify_checksums=False).config["vocab_size"])
    sizes = [int(x) for x in args.clients.split(",")]
    static = {} if "static" in skip else static_batches(model, args, sizes)
    if static and not args.json:
        print("static batches (Generator, no server):", static, flush=True)
    server = Server(model, args)
    report = {"cpu": cpu_line(), "model": str(args.model or f"random {args.shape}"), "threads": args.threads,
              "kv_cache": args.kv_cache, "max_batch": args.max_batch, "step_tokens": args.step_tokens,
              "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "static_tok_s": static,
              "clients": [], "long": None,
              "sequential": None}
    try:
        server.wait_ready()
        url = server.url
        asyncio.run(run_clients(url, 1, 1, args.prompt_tokens, 8, vocab, args.timeout))  # warm-up
        if "clients" not in skip:
            for n in sizes:
                rss0, (busy0, steps0) = rss_mb(server.proc.pid), step_stats(url)
                row = asyncio.run(run_clients(url, n, args.requests_per_client, args.prompt_tokens, args.max_tokens,
                                              vocab, args.timeout))
                busy1, steps1 = step_stats(url)
                row = {"clients": n, **row, "rss_mb_before": round(rss0, 1), "rss_mb_after": round(rss_mb(server.proc.pid), 1),
                       "step_ms": round(1000 * (busy1 - busy0) / max(steps1 - steps0, 1), 2),
                       "engine_busy": round((busy1 - busy0) / row["wall_s"], 3)}
                report["clients"].append(row)
                if not args.json:
                    print(row, flush=True)
        if "long" not in skip:
            report["long"] = asyncio.run(run_long_prompt(url, 7, args.long_prompt_tokens, 160, vocab, args.timeout))
            if not args.json:
                print(report["long"], flush=True)
        if "sequential" not in skip and args.sequential:
            rss0 = rss_mb(server.proc.pid)
            seq = asyncio.run(run_sequential(url, args.sequential, vocab, args.timeout))
            report["sequential"] = {**seq, "rss_mb_before": round(rss0, 1), "rss_mb_after": round(rss_mb(server.proc.pid), 1)}
            if not args.json:
                print(report["sequential"], flush=True)
    finally:
        server.stop()
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print(json.dumps(report))
        return
    print(f"\n{report['cpu']}; {report['model']}, {args.threads} threads, KV {args.kv_cache}, max batch {args.max_batch}, "
          f"step tokens {args.step_tokens or 'default'}; prompts {args.prompt_tokens} tokens, {args.max_tokens} generated")
    print("| clients | tok/s | × 1 client | static batch tok/s | of static | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
          "errors | RSS MB before → after |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    base = report["clients"][0]["tok_s"] if report["clients"] else None
    base = base or float("nan")
    for r in report["clients"]:
        st = static.get(r["clients"])
        frac = f"{r['tok_s'] / st:.0%}" if st else "-"
        print(f"| {r['clients']} | {r['tok_s']} | {r['tok_s'] / base:.2f} | {st or '-'} | {frac} | {r['ttft_p50']} | "
              f"{r['ttft_p99']} | {r['itl_p50']} | {r['itl_p99']} | {r['errors']} | {r['rss_mb_before']} → "
              f"{r['rss_mb_after']} |")
    if report["long"]:
        lg = report["long"]
        print(f"\nlong prompt ({lg['long_prompt_tokens']} tokens) among {lg['streams']} streams: their ITL p50/p99 "
              f"before {lg['itl_p50_before']}/{lg['itl_p99_before']} s, while it prefills {lg['itl_p50_during']}/"
              f"{lg['itl_p99_during']} s (p99 = {lg['itl_p99_during_over_p50_before']}x the p50 before); its TTFT "
              f"{lg['long_ttft_s']} s")
    if report["sequential"]:
        sq = report["sequential"]
        print(f"{sq['requests']} sequential requests: {sq['errors']} errors, {sq['wall_s']} s, server RSS "
              f"{sq['rss_mb_before']} → {sq['rss_mb_after']} MB")


if __name__ == "__main__":
    main()
