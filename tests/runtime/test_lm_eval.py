"""lm-evaluation-harness with our `bitnet` model type: a local multiple-choice task written here (a
YAML and a JSONL file, loaded offline) scored by lm-eval on our runtime gives the log-likelihoods of
an independent scorer on the same file, and the accuracy of lm-eval's own `hf` model on our HF export
of the same model; the `bitnet-run lm-eval` route gives the same accuracy; rolling log-likelihoods
and generate_until agree with the engine and Generator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

from bitnet_train.runtime import Engine, Generator  # noqa: E402
from bitnet_train.runtime import lm_eval_model  # noqa: E402,F401 - registers the `bitnet` model type
from bitnet_train.runtime.cli import main  # noqa: E402

import tiny_files  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("To be, or not to be, that is", ["the question", "a sea of troubles", "Romans"]),
    ("Friends, Romans, countrymen,", ["lend me your ears", "to sleep", "the slings"]),
    ("The slings and arrows of", ["outrageous fortune", "the mind", "countrymen"]),
    ("Whether 'tis nobler in the", ["mind to suffer", "question", "arrows"]),
    ("Or to take arms against a", ["sea of troubles", "fortune", "me your ears"]),
    ("And by opposing end them. To die:", ["to sleep", "to be", "arms"]),
    ("lend me your", ["ears", "troubles", "question"]),
    ("outrageous", ["fortune", "sleep", "Romans, countrymen"]),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from bitnet_train.export.from_model import model_arrays
    from bitnet_train.export.hf_writer import write_hf
    from bitnet_train.export.writer import write_bitnet

    d = tmp_path_factory.mktemp("lm_eval")
    arrays = model_arrays(tiny_files.make_model(), tokenizer_json=tiny_files.tokenizer_json(),
                          tokenizer_config={"eos_token": "<|im_end|>", "bos_token": None})
    bitnet = write_bitnet(d / "model.bitnet", arrays, dense_dtype="F32")  # one model, fp32 dense tensors in both
    write_hf(d / "hf", arrays, dense_dtype="F32")
    data = d / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": i % 3}) + "\n"
                            for i, (q, c) in enumerate(QUESTIONS)))
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n")
    return {"bitnet": bitnet, "hf": d / "hf", "tasks": tasks, "dir": d}


def evaluate(model, model_args, tasks_dir):
    from lm_eval.tasks import TaskManager

    with torch._dynamo.config.patch(disable=True):  # transformers' BitNet quantizers are torch.compile'd
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc"],
                                       task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                                       batch_size=4, device="cpu")


def own_loglikelihood(engine, tok, context: str, continuation: str) -> float:
    """An independent scorer: one forward over context + continuation, log-softmax summed over the
    continuation tokens (the split lm-eval uses: the whole string tokenized, the context's tokens cut)."""
    whole, ctx = tok.encode(context + continuation, add_special_tokens=False), tok.encode(context, add_special_tokens=False)
    logits = engine.forward(whole[:-1]).astype(np.float64)
    lp = logits - (logits.max(-1, keepdims=True) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)))
    return float(sum(lp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def test_bitnet_model_matches_our_scorer_and_lm_evals_hf_model(setup):
    ours = evaluate("bitnet", f"pretrained={setup['bitnet']},threads=1", setup["tasks"])
    engine = Engine.load(setup["bitnet"], threads=1)
    tok = Generator(engine).tokenizer
    samples = ours["samples"]["tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    correct = 0
    for s in samples:
        q, choices = s["doc"]["question"], s["doc"]["choices"]
        got = [float(r[0][0]) for r in s["resps"]]
        want = [own_loglikelihood(engine, tok, q, " " + c) for c in choices]
        assert got == pytest.approx(want, abs=1e-6)
        correct += int(np.argmax(want)) == s["doc"]["answer"]
    acc = ours["results"]["tiny_mc"]["acc,none"]
    assert acc == pytest.approx(correct / len(QUESTIONS))
    theirs = evaluate("hf", f"pretrained={setup['hf']},dtype=float32", setup["tasks"])
    assert theirs["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
    hf_lls = [[float(r[0][0]) for r in s["resps"]] for s in theirs["samples"]["tiny_mc"]]
    our_lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    assert np.abs(np.array(hf_lls) - np.array(our_lls)).max() < 1e-2  # fp32 op order: tiny differences


def test_the_cli_route_gives_the_same_accuracy(setup, capsys):
    out = setup["dir"] / "cli_out"
    assert main(["lm-eval", "--model", "bitnet", "--model_args", f"pretrained={setup['bitnet']},threads=1",
                 "--tasks", "tiny_mc", "--include_path", str(setup["tasks"]), "--output_path", str(out)]) == 0
    results = json.loads(next(out.rglob("results*.json")).read_text())
    api = evaluate("bitnet", f"pretrained={setup['bitnet']},threads=1", setup["tasks"])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(api["results"]["tiny_mc"]["acc,none"])


def test_rolling_loglikelihood_and_generate_until(setup):
    from lm_eval.api.instance import Instance

    from bitnet_train.runtime.lm_eval_model import BitNetEvalLM

    lm = BitNetEvalLM(str(setup["bitnet"]), threads=1, max_length=16, batch_size=3)
    text = " ".join(tiny_files.CORPUS)
    ids = lm.tok_encode(text)
    assert len(ids) > 40  # several 16-token windows
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    # each token predicted once, the first from eos, each from at most the 16 tokens before it
    engine = lm.engine
    total = 0.0
    seq = [lm.eot_token_id] + ids
    for t in range(1, len(seq)):
        start = max(0, t - 16)
        logits = engine.forward(seq[start:t])[-1].astype(np.float64)
        total += logits[seq[t]] - (logits.max() + math.log(np.exp(logits - logits.max()).sum()))
    # lm-eval's windows give some tokens more than 15 tokens of context and some fewer; the sum is
    # the same only for the windows it makes: check against them directly
    from lm_eval import utils

    windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
        token_list=ids, prefix_token=lm.eot_token_id, max_seq_len=16, context_len=1)]
    direct = 0.0
    for ctx, cont in windows:
        full = ctx + cont
        logits = engine.forward(full[:-1]).astype(np.float64)
        lp = logits - (logits.max(-1, keepdims=True) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)))
        direct += sum(lp[i - 1, full[i]] for i in range(len(ctx), len(full)))
    assert rolling == pytest.approx(direct, abs=1e-6)
    assert rolling == pytest.approx(total, rel=0.1)  # and close to the fixed-window figure
    gens = lm.generate_until([Instance("generate_until", {}, ("To be, or not", {"until": ["\n"], "max_gen_toks": 10}), 0),
                              Instance("generate_until", {}, ("Friends,", {"until": ["\n"], "max_gen_toks": 10}), 1)])
    gen = Generator(engine)
    for prompt, got in zip(["To be, or not", "Friends,"], gens):
        assert got == gen.generate([gen.encode_prompt(prompt, add_special_tokens=False)], max_new_tokens=10,
                                   stop=["\n"])[0].text
