"""Runtime vs PyTorch-from-file reference on one exported model (issue 4's parity contract).

    python bench/parity_file.py MODEL.bitnet [--tokens 4096] [--window 512] [--greedy 256] [--json]

* top-1 agreement and perplexity over the first --tokens tokens of held-out Hamlet (disjoint
  windows of --window tokens, both sides scoring the same positions);
* greedy: the runtime generates --greedy tokens from a prompt; one reference forward over prompt +
  generation must predict every generated token (the same as greedy agreement step by step).
The reference is export/reference.py's model built from the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from bitnet_train.data import list_plays
from bitnet_train.export.reference import build_reference_model
from bitnet_train.runtime import Engine
from bitnet_train.runtime.generate import Generator
from bitnet_train.runtime.sampling import SamplingParams
from bitnet_train.runtime.tokenizer import Tokenizer


def nll_and_argmax(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits (T, V) float -> (nll per position (T,), argmax (T,))."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets], logits.argmax(axis=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--greedy", type=int, default=256)
    ap.add_argument("--prompt", default="**HAMLET**  \n")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    engine = Engine.load(args.model, threads=args.threads)
    tok = Tokenizer.from_model_file(engine)
    ref = build_reference_model(args.model).eval()
    window = min(args.window, engine.config["max_seq_len"])

    ids = np.array(tok.encode(list_plays()["hamlet"].read_text(encoding="utf-8")), dtype=np.int64)[: args.tokens + 1]
    agree = scored = 0
    nll_rt = nll_ref = 0.0
    t0 = time.time()
    for begin in range(0, len(ids) - 1, window):
        chunk = ids[begin: begin + window + 1]
        x, y = chunk[:-1], chunk[1:]
        rt_logits = np.asarray(engine.forward(x[None, :]))[0]  # (T, V)
        with torch.no_grad():
            ref_logits = ref(torch.from_numpy(x)[None, :])[0].float().numpy()
        n_rt, a_rt = nll_and_argmax(rt_logits, y)
        n_ref, a_ref = nll_and_argmax(ref_logits, y)
        agree += int((a_rt == a_ref).sum())
        scored += len(y)
        nll_rt += float(n_rt.sum())
        nll_ref += float(n_ref.sum())
    ppl_rt, ppl_ref = math.exp(nll_rt / scored), math.exp(nll_ref / scored)

    gen = Generator(engine, tok)
    prompt_ids = tok.encode(args.prompt)
    completion = gen.generate([prompt_ids], max_new_tokens=args.greedy, sampling=SamplingParams(temperature=0.0),
                              ignore_eos=True)[0]
    seq = list(prompt_ids) + list(completion.token_ids)
    with torch.no_grad():
        ref_pred = ref(torch.tensor(seq[:-1])[None, :])[0].argmax(-1).numpy()
    gen_ref = ref_pred[len(prompt_ids) - 1:]
    gen_rt = np.array(completion.token_ids)
    mismatches = np.nonzero(gen_ref != gen_rt)[0]
    result = {
        "model": args.model,
        "eval_tokens": scored,
        "window": window,
        "top1_agreement": agree / scored,
        "ppl_runtime": ppl_rt,
        "ppl_reference": ppl_ref,
        "ppl_rel_diff": abs(ppl_rt - ppl_ref) / ppl_ref,
        "greedy_steps": len(gen_rt),
        "greedy_first_divergence": int(mismatches[0]) if len(mismatches) else None,
        "greedy_agreement": float((gen_ref == gen_rt).mean()),
        "isa": engine.isa(),
        "seconds": round(time.time() - t0, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>26}: {v}")


if __name__ == "__main__":
    main()
