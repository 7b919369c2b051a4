"""Runtime vs PyTorch-from-file reference on one exported model (issue 4's parity contract).

    python bench/parity_file.py MODEL.bitnet [--tokens 4096] [--window 512] [--greedy 256] [--json]

* top-1 agreement and perplexity over the first --tokens tokens of held-out Hamlet (disjoint
  windows of --window tokens, both sides scoring the same positions);
* greedy: the runtime generates --greedy tokens from a prompt; one reference forward over prompt +
  generation must predict every generated token (the same as greedy agreement step by step).
The reference is export/reference.py's model built from the same file.

--baseline also measures how far the reference is from itself, which bounds what any fp32
implementation can reach on this model: the reference at torch's default thread count vs at 1
thread (2 where the default is 1: only the summation order of its dense ops changes), and the
reference vs the reference with --noise relative noise on its input embeddings. Every comparison reports the mean |logit difference| and the
agreement where the first side's top-2 margin exceeds 0.5 (a near-tie can flip on an ulp).
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


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits (T, V) float -> nll per position (T,)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]


MARGIN_BINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, math.inf)  # side a's top-2 logit margin


def margin_bin_names() -> list[str]:
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(MARGIN_BINS[:-1], MARGIN_BINS[1:])]


def top2_margins(logits: np.ndarray) -> np.ndarray:
    """(T, V) -> (T,): the gap between the largest and the second-largest logit."""
    top2 = np.partition(logits, -2, axis=-1)[:, -2:]  # the second largest, then the largest
    return top2[:, 1] - top2[:, 0]


class Agreement:
    """Top-1 agreement of side b with side a over windows, with the logit differences behind it, and
    how often the top-1 flips at each size of side a's top-2 margin."""

    def __init__(self):
        self.agree = self.scored = self.wide = self.wide_agree = 0
        self.abs_diff = 0.0
        self.worst_margin = 0.0  # the largest top-2 margin (side a) where the two disagree
        self.in_bin = np.zeros(len(MARGIN_BINS) - 1, dtype=np.int64)
        self.flips_in_bin = np.zeros(len(MARGIN_BINS) - 1, dtype=np.int64)

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        margin = top2_margins(a)
        same = a.argmax(-1) == b.argmax(-1)
        bins = np.digitize(margin, MARGIN_BINS[1:-1])
        self.in_bin += np.bincount(bins, minlength=len(self.in_bin))
        self.flips_in_bin += np.bincount(bins[~same], minlength=len(self.in_bin))
        self.agree += int(same.sum())
        self.scored += len(same)
        self.wide += int((margin > 0.5).sum())
        self.wide_agree += int((same & (margin > 0.5)).sum())
        self.abs_diff += float(np.abs(a.astype(np.float64) - b).mean(-1).sum())
        if (~same).any():
            self.worst_margin = max(self.worst_margin, float(margin[~same].max()))

    def summary(self) -> dict:
        return {"top1_agreement": self.agree / self.scored, "mean_abs_logit_diff": self.abs_diff / self.scored,
                "agreement_margin_over_0.5": self.wide_agree / max(1, self.wide),
                "positions_margin_over_0.5": self.wide / self.scored,
                "largest_margin_disagreeing": self.worst_margin,
                "margin_bins": {name: {"positions": int(n), "flips": int(f)}
                                for name, n, f in zip(margin_bin_names(), self.in_bin, self.flips_in_bin)}}


def reference_logits(ref, x: np.ndarray, threads: int | None = None, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """The reference's logits for one window; `threads` sets torch's for this call, `noise` perturbs the
    input embeddings by that relative amount (seeded)."""
    before = torch.get_num_threads()
    hook = None
    if noise:
        g = torch.Generator().manual_seed(seed)
        hook = ref.embed_tokens.register_forward_hook(
            lambda mod, args, out: out * (1 + noise * torch.randn(out.shape, generator=g)))
    try:
        if threads:
            torch.set_num_threads(threads)
        with torch.no_grad():
            return ref(torch.from_numpy(x)[None, :])[0].float().numpy()
    finally:
        torch.set_num_threads(before)
        if hook is not None:
            hook.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--greedy", type=int, default=256)
    ap.add_argument("--prompt", default="**HAMLET**  \n")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="also compare the reference with itself (see above)")
    ap.add_argument("--noise", type=float, default=1e-6, help="--baseline: relative noise on the input embeddings")
    args = ap.parse_args()
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")

    engine = Engine.load(args.model, threads=args.threads)
    tok = Tokenizer.from_model_file(engine)
    ref = build_reference_model(args.model).eval()
    window = min(args.window, engine.config["max_seq_len"])

    ids = np.array(tok.encode(list_plays()["hamlet"].read_text(encoding="utf-8")), dtype=np.int64)[: args.tokens + 1]
    runtime_vs_ref, ref_vs_other_threads, ref_vs_noisy = Agreement(), Agreement(), Agreement()
    other_threads = 1 if torch.get_num_threads() > 1 else 2
    scored = 0
    nll_rt = nll_ref = 0.0
    t0 = time.time()
    for n, begin in enumerate(range(0, len(ids) - 1, window)):
        chunk = ids[begin: begin + window + 1]
        x, y = chunk[:-1], chunk[1:]
        rt_logits = np.asarray(engine.forward(x[None, :]))[0]  # (T, V)
        ref_logits = reference_logits(ref, x)
        runtime_vs_ref.add(ref_logits, rt_logits)
        if args.baseline:
            ref_vs_other_threads.add(ref_logits, reference_logits(ref, x, other_threads))
            ref_vs_noisy.add(ref_logits, reference_logits(ref, x, noise=args.noise, seed=n))
        scored += len(y)
        nll_rt += float(nll(rt_logits, y).sum())
        nll_ref += float(nll(ref_logits, y).sum())
    ppl_rt, ppl_ref = math.exp(nll_rt / scored), math.exp(nll_ref / scored)

    gen = Generator(engine, tok)
    prompt_ids = tok.encode(args.prompt)
    completion = gen.generate([prompt_ids], max_new_tokens=args.greedy, sampling=SamplingParams(temperature=0.0),
                              ignore_eos=True)[0]
    seq = list(prompt_ids) + list(completion.token_ids)
    ref_pred = reference_logits(ref, np.array(seq[:-1], dtype=np.int64)).argmax(-1)
    gen_ref = ref_pred[len(prompt_ids) - 1:]
    gen_rt = np.array(completion.token_ids)
    mismatches = np.nonzero(gen_ref != gen_rt)[0]
    result = {
        "model": args.model,
        "eval_tokens": scored,
        "window": window,
        **runtime_vs_ref.summary(),
        "ppl_runtime": ppl_rt,
        "ppl_reference": ppl_ref,
        "ppl_rel_diff": abs(ppl_rt - ppl_ref) / ppl_ref,
        "greedy_steps": len(gen_rt),
        "greedy_first_divergence": int(mismatches[0]) if len(mismatches) else None,
        "greedy_agreement": float((gen_ref == gen_rt).mean()),
        "isa": engine.isa(),
        "seconds": round(time.time() - t0, 1),
    }
    if args.baseline:
        result["noise"] = args.noise
        result[f"reference_{torch.get_num_threads()}_vs_{other_threads}_threads"] = ref_vs_other_threads.summary()
        result["reference_vs_noisy_reference"] = ref_vs_noisy.summary()
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>26}: {v}")


if __name__ == "__main__":
    main()
