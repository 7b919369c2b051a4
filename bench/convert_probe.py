"""How good a start each conversion gives, before any training (issue 17, section 1.3).

Imports the recipe's source model (SmolLM2-135M with SubLN inserted and calibrated, as the distillation
recipe's first stage does), chooses its ternary codes with each method, and scores it untrained on the
validation blocks of the held-out plays and on the general English set: absmean rounding (what QAT starts
from), GPTQ-style rounding on calibration activations, and GPTQ followed by block-wise reconstruction.

    python bench/convert_probe.py                                   # SmolLM2, the distillation recipe
    python bench/convert_probe.py --methods round,round+recon40,gptq+recon40 --calib-blocks 32
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="smollm2_135m_1p58_distill")
    p.add_argument("--calib-blocks", type=int, default=16)
    p.add_argument("--methods", default="round,gptq,gptq+recon20",
                   help="comma-separated: round | gptq, each optionally +reconN (N block-reconstruction steps per block)")
    p.add_argument("--recon-lr", type=float, default=5e-4)
    p.add_argument("--general-blocks", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="torch seed before each method (reconstruction batches)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    from bitnet_train.config import compose_config
    from bitnet_train.conversion import ConvertConfig, convert_model
    from bitnet_train.data import DataConfig, TextDataModule
    from bitnet_train.importers import calibrate_subln
    from bitnet_train.model import QuantConfig
    from bitnet_train.runtime.bench import cpu_line
    from bitnet_train.train import _calibration_ids, build_source_model, resolve_precision
    from distill_study import score_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config([f"recipe={args.recipe}", "data.teacher_corpus.fraction=0", *args.overrides])
    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    t0 = time.time()
    source, tokenizer, prov = build_source_model(mcfg, QuantConfig.from_dict(OmegaConf.to_container(cfg.quant)))
    data = {**OmegaConf.to_container(cfg.data, resolve=True), "teacher_corpus": {}}
    dm = TextDataModule(DataConfig(**data, seed=int(cfg.seed)), tokenizer=tokenizer)
    dm.setup("fit")
    if prov.get("subln_added"):
        calibrate_subln(source, _calibration_ids(dm.train_blocks))
    source.eval()
    print(f"# {cpu_line()}; torch threads {torch.get_num_threads()}; source loaded in {time.time() - t0:.1f} s")

    methods = []
    for spec in args.methods.split(","):
        base, _, recon = spec.partition("+recon")
        methods.append((spec, ConvertConfig(method=base, calib_blocks=args.calib_blocks, recon_steps=int(recon or 0),
                                            recon_lr=args.recon_lr)))
    autocast = torch.bfloat16 if resolve_precision(str(cfg.trainer.precision), "cpu")[0] == "bf16-mixed" else None
    print(f"# block reconstruction autocast: {autocast}")
    rows = []
    for name, ccfg in methods:
        model = copy.deepcopy(source)
        torch.manual_seed(args.seed)
        t = time.time()
        report = convert_model(model, _calibration_ids(dm.train_blocks, ccfg.calib_blocks), ccfg, autocast=autocast)
        seconds = time.time() - t
        model.eval()
        scores = score_model(model, tokenizer, cfg, 0, args.general_blocks, val=True)
        row = {"method": name, "seconds": round(seconds, 1), "val_ppl": scores["val_ppl"],
               "general_ppl": scores.get("test_general_ppl"), **{k: v for k, v in report.items() if k != "method"}}
        rows.append(row)
        print(f"{name:>18}: val ppl {row['val_ppl']:>12,.1f}  general ppl {row['general_ppl'] or float('nan'):>12,.1f}"
              f"  ({seconds:.1f} s)", flush=True)
        del model
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
