"""The `model/` directory a training run ends with, and that `bitnet-export` reads.

    model/
      config.json         {"format": "bitnet_train.model_dir", "version": 1,
                           "model": ModelConfig, "quant": QuantConfig, "provenance": {...}}
      model.safetensors   latent (full-precision) weights, HF Llama parameter names, plus
                          "*.lam" buffers (lambda of each quantized BitLinear; export needs 1.0)
      tokenizer.json, tokenizer_config.json (+ chat template), special_tokens_map.json

Written into a temporary sibling directory and renamed into place, so a reader never sees a
half-written model/.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import BitNetError
from .model import BitNetModel, ModelConfig, QuantConfig

FORMAT_NAME = "bitnet_train.model_dir"
FORMAT_VERSION = 1


def save_model_dir(path: str | os.PathLike, model: BitNetModel, tokenizer=None, provenance: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "quant": model.quant_config.to_dict(),
            "provenance": provenance or {},
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # shared with embed_tokens.weight
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT_NAME})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config_json(directory: Path, missing: str) -> tuple[Path, dict]:
    """(path, parsed) of directory/config.json; BitNetError `missing` when it is absent, or naming the
    file when it is not valid JSON."""
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise BitNetError(missing)
    try:
        return cfg_file, json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BitNetError(f"{cfg_file} is not valid JSON: {e}") from None


def read_model_dir_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg_file, meta = read_config_json(path, f"{path} is not a model directory: config.json is missing")
    if meta.get("format") != FORMAT_NAME:
        raise BitNetError(f"{cfg_file}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise BitNetError(f"{cfg_file}: version {meta.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    return meta


def load_model_dir(path: str | os.PathLike, load_tokenizer: bool = True):
    """-> (model, tokenizer or None, meta). The model is in eval mode on CPU."""
    path = Path(path)
    meta = read_model_dir_config(path)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        qcfg = QuantConfig.from_dict(meta["quant"])
    except (KeyError, TypeError, ValueError) as e:
        raise BitNetError(f"{path / 'config.json'}: invalid model/quant config: {e}") from None
    model = BitNetModel(cfg, qcfg)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise BitNetError(f"{path} is not a model directory: model.safetensors is missing")
    state = load_file(str(weights))
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    load_state_checked(model, state, str(weights))
    model.eval()
    tok = None
    if load_tokenizer and (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    return model, tok, meta


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with errors that name the missing/unexpected/mis-shaped tensors."""
    check_state({k: tuple(v.shape) for k, v in model.state_dict().items()},
                {k: tuple(v.shape) for k, v in state.items()}, source)
    model.load_state_dict(state, strict=True)


def check_state(own: dict[str, tuple[int, ...]], state: dict[str, tuple[int, ...]], source: str) -> None:
    """The state-dict names and shapes a model expects (own) against a checkpoint's; BitNetError naming
    the missing / unexpected / mis-shaped tensors (also for a lazy state, before anything is read)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise BitNetError(
            f"{source}: weights do not match the model architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, shape in own.items():
        if tuple(state[k]) != tuple(shape):
            raise BitNetError(f"{source}: tensor {k} has shape {tuple(state[k])}, the model expects {tuple(shape)}")
