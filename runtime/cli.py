"""`bitnet-run generate|chat|eval|bench|random-model ...`: serve a .bitnet file on the CPU engine.

    bitnet-run generate model.bitnet --prompt "ROMEO:" --max-new-tokens 64 [--temperature 0 | --seed 1]
    bitnet-run chat model.bitnet [--system TEXT]          # one user message per stdin line
    bitnet-run eval model.bitnet text.txt [--window N --stride N] [--json]
    bitnet-run bench model.bitnet [--prefill 128 --decode 64] [--json]   # or: bench --shape bitnet-large
    bitnet-run random-model --shape bitnet-large -o large.bitnet          # random ternary weights, for speed runs
    bitnet-run serve model.bitnet [--port 8000 --max-batch 8 --api-key KEY]  # OpenAI-compatible HTTP server

Common options: --device cpu|cuda, --threads N, --isa scalar|avx2|avx512|amx. Errors print one line
`error: ...` on stderr and exit 2 (BITNET_TRACEBACK=1 shows the traceback). No torch needed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from ..errors import BitNetError

EXIT_USER_ERROR = 2


class CLIError(BitNetError):
    """A bad command line (a missing file, an unavailable device)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the tool
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


# ---- shared options -------------------------------------------------------------------------------

def _add_engine_args(p: argparse.ArgumentParser, model_optional: bool = False) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?" if model_optional else None, help="a .bitnet file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: BITNET_THREADS or all cores)")
    p.add_argument("--isa", default=None, help="force a kernel path: scalar, avx2, avx512, amx (default: the best "
                   "this CPU has, or BITNET_ISA)")
    p.add_argument("--lm-head", choices=("fp", "int8"), default="fp",
                   help="int8: a per-row int8 copy of the lm_head made at load (CPU; fewer bytes per token, "
                   "a small perplexity cost: bench/README.md)")
    p.add_argument("--kv-cache", choices=("f32", "f16"), default="f32",
                   help="f16: keep keys and values as fp16 (CPU; half the cache bytes per decoded token, "
                   "a small perplexity cost: bench/README.md)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95, help="in (0, 1]; 1 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")


def _sampling(args):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def _model_file(args) -> Path:
    """MODEL, checked before anything is loaded; --device checked too (DeviceError with the reason)."""
    from .device import require_device

    require_device(args.device)
    path = Path(args.model)
    if not path.is_file():
        raise CLIError(f"model file {path} does not exist" if not path.exists() else f"model {path} is not a file")
    return path


def _load_engine(args):
    """The engine on --device (runtime/device.py: DeviceError with the reason when CUDA is not usable)."""
    from .device import load_engine

    path = _model_file(args)
    return load_engine(path, args.device, isa=args.isa, threads=args.threads, lm_head=args.lm_head,
                       kv_cache=args.kv_cache)


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))


# ---- subcommands ----------------------------------------------------------------------------------

def add_generate_args(p):
    _add_engine_args(p)
    p.add_argument("-p", "--prompt", action="append", default=[], help="prompt text (repeatable: one batch)")
    p.add_argument("--prompt-file", help="a file whose whole text is one more prompt")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before its continuation")
    p.add_argument("--json", action="store_true", help="print completions and speed as one JSON object")
    _add_sampling_args(p, max_new_tokens=128)


def cmd_generate(args) -> None:
    """Complete one or more prompts; one prompt streams to the terminal as it is produced."""
    from .generate import Generator

    prompts = list(args.prompt)
    if args.prompt_file:
        prompts.append(Path(args.prompt_file).read_text(encoding="utf-8"))
    if not prompts:
        raise CLIError("generate needs --prompt TEXT (or --prompt-file FILE)")
    sampling = _sampling(args)
    eng = _load_engine(args)
    gen = Generator(eng)
    stream = gen.stream(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop,
                        ignore_eos=args.ignore_eos)
    if args.json:
        stream.run()
        _print_json({
            "completions": [{"index": c.index, "prompt": prompts[c.index], "text": c.text, "token_ids": c.token_ids,
                             "prompt_tokens": len(c.prompt_ids), "finish_reason": c.finish_reason}
                            for c in stream.completions],
            "stats": {**stream.stats.as_dict(), "isa": eng.isa(), "threads": eng.threads},
        })
        return
    out = sys.stdout
    if len(prompts) == 1:
        if not args.no_echo:
            out.write(prompts[0])
        for event in stream:
            out.write(event.text)
            out.flush()
        out.write("\n")
    else:
        for event in stream:
            c = stream.completions[event.index]
            if c.finish_reason is not None:  # print each prompt's text when it is complete
                head = f"--- [{c.index}] ({c.finish_reason}) ---\n"
                out.write(head + ("" if args.no_echo else prompts[c.index]) + c.text + "\n")
                out.flush()
    s = stream.stats.as_dict()
    print(f"[{s['generated_tokens']} tokens; prefill {s['prefill_tok_s']} tok/s, decode {s['decode_tok_s']} tok/s; "
          f"{eng.isa()}, {eng.threads} threads]", file=sys.stderr)


def add_chat_args(p):
    _add_engine_args(p)
    p.add_argument("--system", help="system message at the start of the conversation")
    _add_sampling_args(p, max_new_tokens=512)


def cmd_chat(args) -> None:
    """Multi-turn chat with the file's chat template: each stdin line is a user message
    (/reset forgets the conversation, /exit ends). Works with piped stdin."""
    from .chat import ChatSession
    from .generate import Generator

    sampling = _sampling(args)
    chat = ChatSession(Generator(_load_engine(args)), system=args.system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            chat.reset()
            continue
        for event in chat.send(line, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop,
                               ignore_eos=args.ignore_eos):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


def add_eval_args(p):
    _add_engine_args(p)
    p.add_argument("text", metavar="TEXT_FILE", nargs="?", help="UTF-8 text file to score (or --dataset)")
    g = p.add_argument_group("dataset (instead of TEXT_FILE; needs the datasets package)")
    g.add_argument("--dataset", metavar="NAME", help="a Hugging Face dataset: a Hub name, a save_to_disk "
                   "directory, or a file builder (json, parquet, csv, text) with --data-files")
    g.add_argument("--dataset-config", default=None, help="the dataset's configuration name")
    g.add_argument("--split", default="test", help="split to score (default: test)")
    g.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    g.add_argument("--data-files", nargs="+", default=None, metavar="FILE", help="files for a builder --dataset")
    g.add_argument("--max-documents", type=int, default=None, help="only the first N rows")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the file")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def cmd_eval(args) -> None:
    """Perplexity of the model over a text file or a dataset split (strided windows of its context)."""
    from .evaluate import DatasetError, dataset_text, perplexity
    from .tokenizer import Tokenizer

    if (args.text is None) == (args.dataset is None):
        raise CLIError("eval needs TEXT_FILE or --dataset NAME (one of them)")
    if args.text is not None:
        path = Path(args.text)
        if not path.is_file():
            raise CLIError(f"text file {path} does not exist")
    else:
        from ..extras import require

        require("eval", "eval --dataset", only=("datasets",))
    eng = _load_engine(args)  # a bad model file is reported before anything is read
    if args.text is not None:
        source = {"file": str(path)}
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise CLIError(f"text file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    else:
        try:
            text = dataset_text(args.dataset, config=args.dataset_config, split=args.split, column=args.text_column,
                                data_files=args.data_files, max_documents=args.max_documents)
        except DatasetError as error:
            raise CLIError(str(error)) from error
        source = {"dataset": args.dataset, "dataset_config": args.dataset_config, "split": args.split,
                  "text_column": args.text_column}
    tok = Tokenizer.from_model_file(eng)
    ids = tok.encode(text)
    if args.max_tokens is not None:
        if args.max_tokens < 2:
            raise CLIError(f"--max-tokens must be >= 2, got {args.max_tokens}")
        ids = ids[:args.max_tokens]
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                  TimeRemainingColumn(), console=console, disable=args.quiet, transient=True) as bar:
        task = bar.add_task("eval", total=max(len(ids) - 1, 1))
        res = perplexity(eng, ids, window=args.window, stride=args.stride,
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
    if args.json:
        _print_json({**source, **res.as_dict(), "isa": eng.isa(), "threads": eng.threads, "lm_head": eng.lm_head,
                     "kv_cache": eng.kv_cache})
    else:
        print(f"perplexity {res.ppl:.4f} over {res.tokens} tokens (nll {res.nll:.4f} nats/token, top-1 "
              f"{100 * res.top1:.2f}%); {res.windows} windows of {res.window} tokens, stride {res.stride}; "
              f"{res.seconds:.2f} s")


def add_bench_args(p):
    _add_engine_args(p, model_optional=True)
    p.add_argument("--shape", help="bench random ternary weights of a named shape in memory instead of MODEL "
                   "(bitnet-large, bitnet-2b, smollm2-135m, bitnet.cpp's 125m .. 100b, llama3-8b, llama3-70b)")
    p.add_argument("--dims", help="random weights of explicit dimensions instead of MODEL: "
                   "hidden=N,ffn=N,layers=N,heads=N[,kv_heads=N][,vocab=N][,head_dim=N]")
    p.add_argument("--tie", action="store_true", help="with --shape: tie lm_head to the embedding")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens of the prefill")
    p.add_argument("--decode", type=int, default=64, help="decode steps after the prefill")
    p.add_argument("--no-bandwidth", action="store_true", help="skip measuring the memory bandwidth")
    p.add_argument("--json", action="store_true")


def cmd_bench(args) -> None:
    """Prefill and decode tokens/s, bytes per token and the fraction of the streaming-read bandwidth."""
    from .bench import measure_speed, random_model, shape_name

    if sum(x is not None for x in (args.model, args.shape, args.dims)) != 1:
        raise CLIError("bench needs MODEL, --shape NAME or --dims ... (one of them)")
    if args.model is None:
        shape = _shape_arg(args)
        from .device import CudaEngine, require_device
        from .engine import Engine

        require_device(args.device)
        cfg, tensors = random_model(shape, max(args.prefill + args.decode, 8), tie=args.tie)
        cls = CudaEngine if args.device == "cuda" else Engine
        eng = cls(cfg, tensors, {"eps": 1e-5}, isa=args.isa, threads=args.threads, lm_head=args.lm_head,
                  kv_cache=args.kv_cache)
        what = {"shape": shape_name(shape)}
    else:
        t0 = time.perf_counter()
        eng = _load_engine(args)  # with every integrity check (checksums, codes): what a user waits for
        what = {"model": str(args.model), "load_s": round(time.perf_counter() - t0, 3), **_memory_figures()}
    # the bandwidth probe runs the CPU kernels: no roofline fraction for --device cuda
    res = {**what, **measure_speed(eng, args.prefill, args.decode,
                                   bandwidth=not args.no_bandwidth and args.device == "cpu")}
    if args.json:
        _print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")


def _memory_figures() -> dict:
    """Peak RSS and major page faults of this process so far (Linux: ru_maxrss in KiB)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mib": round(ru.ru_maxrss / 1024, 1), "major_page_faults": ru.ru_majflt}


def add_verify_args(p):
    p.add_argument("model", metavar="MODEL", help="a .bitnet file")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def cmd_verify(args) -> None:
    """Check a .bitnet file completely: header, shapes, every tensor's CRC-32, every ternary code.

    The same checks every load makes (`generate`, `serve`, ... refuse a file that fails them); here
    without building anything else, with the bytes and time they took. Exit 0: the file is good;
    otherwise one `error:` line naming the tensor, exit 2."""
    from ..export.reader import open_model
    from .engine import Engine

    path = Path(args.model)
    if not path.is_file():
        raise CLIError(f"model file {path} does not exist" if not path.exists() else f"model {path} is not a file")
    t0 = time.perf_counter()
    f = open_model(path, verify_checksums=True)
    t1 = time.perf_counter()
    Engine.load(path, verify_checksums=False)  # shapes against the config, ternary codes, scales
    t2 = time.perf_counter()
    size = path.stat().st_size
    res = {"model": str(path), "ok": True, "tensors": len(f.checksums["tensors"]), "bytes": size,
           "checksums_s": round(t1 - t0, 3), "codes_s": round(t2 - t1, 3),
           "gb_per_s": round(size / max(t2 - t0, 1e-9) / 1e9, 2)}
    if args.json:
        _print_json(res)
    else:
        print(f"ok: {path} ({size / 2**30:.2f} GiB, {res['tensors']} tensors): checksums {res['checksums_s']} s, "
              f"codes and shapes {res['codes_s']} s ({res['gb_per_s']} GB/s)")


def _shape_arg(args):
    """--shape NAME or --dims SPEC -> what random_model takes; CLIError naming the problem."""
    from .bench import SHAPES, parse_dims

    if args.dims is not None:
        try:
            return parse_dims(args.dims)
        except ValueError as e:
            raise CLIError(str(e)) from None
    if args.shape not in SHAPES:
        raise CLIError(f"unknown --shape {args.shape!r}; expected one of {', '.join(SHAPES)}")
    return args.shape


def add_random_model_args(p):
    p.add_argument("--shape", help="a named shape (bitnet-large, bitnet-2b, smollm2-135m, bitnet.cpp's 125m .. 100b, "
                   "llama3-8b, llama3-70b)")
    p.add_argument("--dims", help="explicit dimensions: hidden=N,ffn=N,layers=N,heads=N[,kv_heads=N][,vocab=N][,head_dim=N]")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    p.add_argument("--packing", choices=("2bit", "1.6bit"), default="2bit",
                   help="ternary packing: 2bit (i2_b128) or 1.6bit (t3_b160, read in place)")


def cmd_random_model(args) -> None:
    """Write a .bitnet file with random ternary weights of a named shape (for speed runs)."""
    from .bench import shape_name, write_random_model

    if (args.shape is None) == (args.dims is None):
        raise CLIError("random-model needs --shape NAME or --dims ... (one of them)")
    shape = _shape_arg(args)
    if args.max_seq_len < 1:
        raise CLIError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    path = write_random_model(args.output, shape, args.max_seq_len, seed=args.seed, tie=args.tie,
                              packing={"2bit": "i2_b128", "1.6bit": "t3_b160"}[args.packing])
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, shape {shape_name(shape)}, random ternary weights)")


def add_serve_args(p):
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ctx", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--max-batch", type=int, default=8, help="concurrent sequences (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot; beyond: HTTP 429")
    p.add_argument("--step-tokens", type=int, default=256,
                   help="at most this many tokens per engine step while sequences decode (one each, the rest "
                   "prefill waiting prompts)")
    p.add_argument("--step-time-factor", type=float, default=2.0,
                   help="a step that prefills a prompt while streams decode takes about this many times a "
                   "decode-only step (measured as the server runs): the streams' inter-token latency bound")
    p.add_argument("--idle-step-tokens", type=int, default=512, help="prefill tokens of a step with nothing to decode")
    p.add_argument("--api-key", default=os.environ.get("BITNET_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1 (default: BITNET_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the file name's stem)")
    p.add_argument("--max-body", type=int, default=8 * 2**20, help="largest request body in bytes; beyond: HTTP 413")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def cmd_serve(args) -> None:
    """Serve the model over the OpenAI HTTP API (chat, completions, streaming) with continuous batching."""
    from ..extras import require

    require("serve", "bitnet-run serve")
    for name, v, lo in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                        ("--step-tokens", args.step_tokens, 1), ("--idle-step-tokens", args.idle_step_tokens, 1),
                        ("--max-body", args.max_body, 1)):
        if v < lo:
            raise CLIError(f"{name} must be >= {lo}, got {v}")
    if args.ctx is not None and args.ctx < 1:
        raise CLIError(f"--ctx must be >= 1, got {args.ctx}")
    if not args.step_time_factor > 1:
        raise CLIError(f"--step-time-factor must be > 1, got {args.step_time_factor}")
    path = _model_file(args)  # before the server starts; the loader (in its thread) loads it
    import uvicorn

    from .serve.app import create_app

    failed: list[Exception] = []

    def load():  # in the server's loading thread; a model that cannot be served stops the server
        try:
            eng = _load_engine(args)
            if args.ctx is not None and args.ctx > eng.max_seq_len:
                raise CLIError(f"--ctx {args.ctx} is larger than the model's context ({eng.max_seq_len})")
            return eng
        except Exception as e:
            failed.append(e)
            os.kill(os.getpid(), signal.SIGINT)
            raise

    app = create_app(load, model_name=args.model_name or path.stem, api_key=args.api_key, max_body_bytes=args.max_body,
                     max_batch=args.max_batch, ctx=args.ctx, max_queue=args.max_queue, step_tokens=args.step_tokens,
                     idle_step_tokens=args.idle_step_tokens, step_time_factor=args.step_time_factor)
    print(f"serving {path} as {app.state.server.model_name!r} on http://{args.host}:{args.port} "
          f"(max batch {args.max_batch}; /health says when the model is loaded)", file=sys.stderr)
    try:  # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        if not failed:
            raise
    if failed:
        raise failed[0]


def add_lm_eval_args(p):
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="...",
                   help="lm-eval's own arguments, e.g. --model bitnet --model_args pretrained=model.bitnet --tasks T")


def cmd_lm_eval(args) -> None:
    """Run EleutherAI's lm-evaluation-harness with our `bitnet` model type registered (the [eval] extra)."""
    from ..extras import require

    require("eval", "bitnet-run lm-eval")
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401 - registers the `bitnet` model type

    argv = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    except SystemExit as e:
        if e.code not in (0, None):
            raise CLIError(f"lm-eval exited with status {e.code}") from None
    finally:
        sys.argv = argv


# ---- the one place subcommands are registered -----------------------------------------------------

SUBCOMMANDS = {
    "generate": (add_generate_args, cmd_generate),
    "chat": (add_chat_args, cmd_chat),
    "eval": (add_eval_args, cmd_eval),
    "bench": (add_bench_args, cmd_bench),
    "random-model": (add_random_model_args, cmd_random_model),
    "serve": (add_serve_args, cmd_serve),
    "lm-eval": (add_lm_eval_args, cmd_lm_eval),
    "verify": (add_verify_args, cmd_verify),
}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bitnet-run", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (add_args, fn) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=fn.__doc__.split("\n")[0], description=fn.__doc__,
                            add_help=name != "lm-eval")  # lm-eval's --help is lm-eval's
        add_args(sp)
        sp.set_defaults(func=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's, --help included
            args = argparse.Namespace(func=cmd_lm_eval, lm_eval_args=argv[1:])
        else:
            args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 0
    try:
        args.func(args)
        return 0
    except (BitNetError, ValueError, RuntimeError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # `bitnet-run generate ... | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if os.environ.get("BITNET_TRACEBACK"):
            raise
        msg = str(e).strip().replace("\n", " ") or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
