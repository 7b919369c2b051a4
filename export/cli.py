"""`bitnet-export SOURCE -o OUT [--format bitnet|gguf|hf] [--packing 2bit|1.6bit] [--ptq] [--dtype ...]`

SOURCE: a run directory (its model/ is exported; a staged run's last stage), a Lightning checkpoint,
a model/ directory, an already-ternary checkpoint (a Hugging Face `bitnet` directory, a TQ1_0/TQ2_0
llama.cpp GGUF), or with --ptq a full-precision Hugging Face Llama/Mistral/Qwen2/Qwen3 directory or
GGUF file. Errors print one line and exit 2; the output appears only when it is complete.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .. import __version__
from ..errors import BitNetError

PACKING_OF = {"2bit": "i2_b128", "1.6bit": "t3_b160"}
DTYPE_OF = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
PROGRESS_MIN_BYTES = 64 << 20  # show progress bars from this much output on


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitnet-export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="SOURCE", help="run directory, Lightning .ckpt, model/ directory, HF bitnet "
                   "directory, TQ1_0/TQ2_0 .gguf (or with --ptq: a full-precision HF directory or .gguf file)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (bitnet, gguf) or directory (hf)")
    p.add_argument("--format", choices=("bitnet", "gguf", "hf"), default="bitnet")
    p.add_argument("--packing", choices=tuple(PACKING_OF), default="2bit",
                   help="ternary packing: 2bit (i2_b128 / GGUF TQ2_0) or 1.6bit (t3_b160 / GGUF TQ1_0)")
    p.add_argument("--ptq", action="store_true",
                   help="ternarize post-training: allows models trained without quantization or with lambda < 1")
    p.add_argument("--dtype", choices=tuple(DTYPE_OF), help="dtype of embeddings, norms, lm_head, "
                   "high-precision linears (default fp16; bf16 for --format hf, where transformers' BitLinear "
                   "can overflow float16, see hf_writer)")
    p.add_argument("--tokenizer", metavar="DIR", help="take tokenizer.json / tokenizer_config.json from DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def export(args: argparse.Namespace) -> "ExportSummary":
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from .from_model import QuantizedTensors
    from .model_tensors import dense_names, ternary_names
    from .schema import linear_shapes
    from .sources import open_source, read_tokenizer_dir
    from .summary import make_summary, print_summary

    console = Console(stderr=True)
    packing = PACKING_OF[args.packing]
    dtype = DTYPE_OF[args.dtype or ("bf16" if args.format == "hf" else "fp16")]
    out = Path(args.output)
    if out.exists() and (out.is_dir() != (args.format == "hf")):
        raise BitNetError(f"output {out} exists and is a {'directory' if out.is_dir() else 'file'}; "
                          f"--format {args.format} writes a {'directory' if args.format == 'hf' else 'file'}")
    if args.format == "hf" and packing != "i2_b128":
        raise BitNetError("--format hf has only transformers' 2-bit layout; drop --packing 1.6bit")
    src = open_source(args.source, ptq=args.ptq)
    tok_json, tok_cfg = src.tokenizer_json, src.tokenizer_config
    if args.tokenizer:
        tok_json, tok_cfg = read_tokenizer_dir(Path(args.tokenizer))
        if tok_json is None:
            raise BitNetError(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    provenance = {
        **src.provenance,
        "source": str(args.source),
        "source_kind": src.kind,
        "exporter": f"bitnet_train.export {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ptq": bool(args.ptq),
    }
    # nothing is read yet: each writer reads, quantizes and writes one tensor at a time
    tensors = QuantizedTensors.of_checkpoint(src.checkpoint.config, src.checkpoint.quant, src.checkpoint.state,
                                             ptq=args.ptq, tokenizer_json=tok_json, tokenizer_config=tok_cfg,
                                             provenance=provenance)
    notes = [] if tok_json else ["no tokenizer.json found: the file has no tokenizer (pass --tokenizer DIR)"]
    shapes = linear_shapes(tensors.config)
    total = (sum(math.prod(shapes[n]) // 4 for n in ternary_names(tensors))
             + sum(2 * math.prod(s) for s in dense_names(tensors).values()))
    show = not args.quiet and total >= PROGRESS_MIN_BYTES
    with Progress(TextColumn("writing"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, disable=not show, transient=True) as bar:
        task = bar.add_task("write", total=total)
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        fallbacks: dict[str, str] = {}
        if args.format == "bitnet":
            from .packing import packed_shape
            from .writer import write_bitnet

            write_bitnet(out, tensors, packing=packing, dense_dtype=dtype, progress=advance)
            ternary_bytes = sum(math.prod(packed_shape(*shapes[n], packing)) for n in ternary_names(tensors))
        elif args.format == "gguf":
            from .gguf_writer import write_gguf

            ternary_bytes, fallbacks, more = write_gguf(out, tensors, packing=packing, dense_dtype=dtype,
                                                        progress=advance)
            notes += more
        else:
            from .hf_writer import write_hf

            ternary_bytes, more = write_hf(out, tensors, dense_dtype=dtype)
            notes += more
    label = {"bitnet": packing, "gguf": {"i2_b128": "TQ2_0", "t3_b160": "TQ1_0"}[packing], "hf": "hf_2bit_rows"}
    summary = make_summary(tensors, out, args.format, label[args.format], dtype,
                           ternary_bytes, fallbacks, notes)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print_summary(summary, Console())
    return summary


def main(argv: list[str] | None = None) -> int:
    from ..cli_errors import run_cli

    args = build_parser().parse_args(argv)

    def run():
        from ..extras import require

        require("train", "bitnet-export")  # reading runs and checkpoints is torch's
        if args.format == "gguf":
            require("gguf", "bitnet-export --format gguf")
        try:
            export(args)
        except OSError as e:  # disk full, permissions, ...: one line, like every other user error
            raise BitNetError(f"{e.filename or args.output}: {e.strerror or e}") from None

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
