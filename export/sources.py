"""What `bitnet-export` can read: a run directory, a Lightning checkpoint, a `model/` directory, a
ternary (TQ1_0/TQ2_0) llama.cpp GGUF, a ternary Hugging Face directory (model_type bitnet), or
(with --ptq) a Hugging Face Llama-family directory / other GGUF file. Each is opened as a `Source`:
its config and its state dict as LazyTensors (names and shapes checked), no tensor read yet, so
the export reads, quantizes and writes one tensor at a time (DESIGN.md, scale principles):

    model/ directory   model.safetensors read with plain reads, a tensor at a time
    Lightning .ckpt    memory-mapped (torch.load(mmap=True)); each tensor's pages dropped once copied
    HF directory       the safetensors shards walked a tensor at a time (importers.open_hf_llama)
    ternary GGUF       decoded a tensor at a time (gguf_import.open_ternary_gguf)
    other GGUF --ptq   dequantized whole by transformers (importers: its GGUF loader has no per-tensor
                       route), then quantized a tensor at a time
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..model import ModelConfig, QuantConfig
from ..model_dir import FORMAT_NAME as MODEL_DIR_FORMAT
from ..model_dir import read_model_dir_config
from ..tensor_files import LazyCheckpoint, SafetensorsFile, mapped_checkpoint, sha256_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class Source:
    checkpoint: LazyCheckpoint  # config, quant, lazy state dict
    kind: str  # model_dir | checkpoint | hf | gguf (ternary, bitnet_train.gguf_import)
    path: Path
    tokenizer_json: str | None = None
    tokenizer_config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)




def read_tokenizer_dir(path: Path) -> tuple[str | None, dict]:
    """(tokenizer.json text or None, tokenizer_config with the chat template folded in)."""
    tok = path / "tokenizer.json"
    tok_json = tok.read_text(encoding="utf-8") if tok.is_file() else None
    tok_cfg: dict = {}
    cfg_file = path / "tokenizer_config.json"
    try:
        if cfg_file.is_file():
            tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        special = path / "special_tokens_map.json"
        if special.is_file():
            for k, v in json.loads(special.read_text(encoding="utf-8")).items():
                tok_cfg.setdefault(k, v)
        if tok_json is not None:
            json.loads(tok_json)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: tokenizer files are not valid JSON: {e}") from None
    template = path / "chat_template.jinja"  # transformers 5 saves the chat template beside the config
    if "chat_template" not in tok_cfg and template.is_file():
        tok_cfg["chat_template"] = template.read_text(encoding="utf-8")
    return tok_json, tok_cfg


def _is_model_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("format") == MODEL_DIR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _open_model_dir(path: Path) -> Source:
    meta = read_model_dir_config(path)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        qcfg = QuantConfig.from_dict(meta["quant"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: invalid model/quant config: {e}") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} is not a model directory: model.safetensors is missing")
    f = SafetensorsFile(weights)
    state = {name: f.lazy(name) for name in f.entries}
    if cfg.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # save_model_dir stores the shared tensor once
    ck = LazyCheckpoint(cfg, qcfg, state, None, {}, str(weights))
    tok_json, tok_cfg = read_tokenizer_dir(path)
    prov = dict(meta.get("provenance") or {})
    return Source(ck, "model_dir", path, tok_json, tok_cfg, {
        "recipe": prov.get("recipe"), "step": prov.get("step"),
        "source_sha256": sha256_file(weights), "training": prov,
    })


def _open_checkpoint(path: Path) -> Source:
    # A Lightning checkpoint is a pickle (as train.py reads it): export only checkpoints you trust.
    ckpt, lazy = mapped_checkpoint(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or not isinstance(hp.get("model"), dict) or not isinstance(hp.get("quant"), dict):
        raise CheckpointError(f"{path} is not a bitnet_train checkpoint (no model/quant config in hyper_parameters)")
    try:
        cfg, qcfg = ModelConfig.from_dict(dict(hp["model"])), QuantConfig.from_dict(dict(hp["quant"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model/quant config: {e}") from None
    state = {k[len("model."):]: lazy(v) for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}
    if cfg.tie_embeddings and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    ck = LazyCheckpoint(cfg, qcfg, state, None, {}, str(path))
    tok_json, tok_cfg = None, {}
    for cand in (path.parent.parent / "model", path.parent.parent, path.parent):
        if (cand / "tokenizer.json").is_file():
            tok_json, tok_cfg = read_tokenizer_dir(cand)
            break
    return Source(ck, "checkpoint", path, tok_json, tok_cfg, {
        "recipe": hp.get("recipe"), "step": ckpt.get("global_step"), "source_sha256": sha256_file(path),
    })


def _tokenizer_files(tokenizer) -> tuple[str | None, dict]:
    if tokenizer is None:
        return None, {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return read_tokenizer_dir(Path(tmp))


def _open_hf(path: Path) -> Source:
    from ..importers import open_hf_llama
    from ..importers_bitnet import is_ternary_hf_directory

    if path.is_dir() and is_ternary_hf_directory(path):
        # already ternary (HF bitnet: packed, or master weights quantized online): imported with its
        # own quantization, norms and activation, it exports without --ptq
        ck = open_hf_llama(path, quant=QuantConfig())
    else:
        ck = open_hf_llama(path, quant=QuantConfig(method="none"), norm="none")
    tok_json, tok_cfg = _tokenizer_files(ck.tokenizer)
    digest = hashlib.sha256(json.dumps(ck.info.get("sha256", {}), sort_keys=True).encode()).hexdigest()
    return Source(ck, "hf", path, tok_json, tok_cfg, {
        "recipe": None, "step": None, "source_sha256": digest, "hf": ck.info,
    })


def _open_ternary_gguf(path: Path, *, ptq: bool) -> Source:
    from ..gguf_import import open_ternary_gguf

    ck = open_ternary_gguf(path, ptq=ptq)
    tok_json, tok_cfg = _tokenizer_files(ck.tokenizer)
    info = dict(ck.info)
    return Source(ck, "gguf", path, tok_json, tok_cfg, {
        "recipe": None, "step": None, "source_sha256": info.pop("sha256"), "gguf": info,
    })


def _stage_dirs(path: Path) -> list[Path]:
    """RUN_DIR/stage1, stage2, ... of a staged recipe, in stage order (not name order: stage10 > stage9)."""
    found = [(int(d.name[5:]), d) for d in path.glob("stage*") if d.is_dir() and d.name[5:].isdigit()]
    return [d for _, d in sorted(found)]


def open_source(path: str | os.PathLike, *, ptq: bool = False) -> Source:
    """SOURCE of bitnet-export, opened: headers and configs read and checked, no tensor yet."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run directory, a .ckpt or a model/ directory)")
    if path.is_file():
        if path.suffix == ".ckpt":
            return _open_checkpoint(path)
        if path.suffix == ".gguf":
            from ..gguf_import import has_ternary_linears

            if has_ternary_linears(path):  # TQ1_0 / TQ2_0: already ternary, read by our own importer
                return _open_ternary_gguf(path, ptq=ptq)
            if not ptq:
                raise CheckpointError(f"{path} is a GGUF model without ternary (TQ1_0/TQ2_0) tensors, not a "
                                      f"trained BitNet: pass --ptq to ternarize it")
            return _open_hf(path)
        raise CheckpointError(f"{path}: expected a Lightning checkpoint (.ckpt), a run directory or a model/ directory")
    if _is_model_dir(path):
        return _open_model_dir(path)
    if _is_model_dir(path / "model"):
        return _open_model_dir(path / "model")
    stages = _stage_dirs(path)
    if stages:  # a staged recipe's run directory: RUN_DIR/stage1 .. stageN, each a run directory
        last = stages[-1]
        if not _is_model_dir(last / "model"):
            done = [d.name for d in stages if _is_model_dir(d / "model")]
            hint = f"; pass {path / done[-1]} to export an earlier stage" if done else ""
            raise CheckpointError(f"staged run {path}: its last stage {last.name} has no model/ "
                                  f"(training has not finished){hint}")
        return _open_model_dir(last / "model")
    if (path / "checkpoints").is_dir():
        ckpts = sorted((path / "checkpoints").glob("*.ckpt"))
        hint = f"; pass a checkpoint instead, e.g. {ckpts[-1]}" if ckpts else ""
        raise CheckpointError(f"run directory {path} has no model/ (training has not finished){hint}")
    if (path / "config.json").is_file():
        from ..importers_bitnet import is_ternary_hf_directory

        if not ptq and not is_ternary_hf_directory(path):
            raise CheckpointError(f"{path} is a Hugging Face checkpoint, not a trained BitNet: pass --ptq to ternarize it")
        return _open_hf(path)
    raise CheckpointError(f"{path} is neither a run directory, a model/ directory nor a Hugging Face directory")
