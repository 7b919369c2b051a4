"""Importer: Hugging Face checkpoints that are already ternary (transformers' BitNet integration).

Which directories: model_type "bitnet" (BitNetForCausalLM, e.g. microsoft/bitnet-b1.58-2B-4T), and
model_type "llama", "qwen2" or "qwen3" with `quantization_config.quant_method: bitnet` (what
`bitnet-export --format hf` writes for norm "none" / "bitlinear" models, and for those with Qwen2's
q/k/v biases or Qwen3's QK-norm). `importers.load_hf_llama` hands them here.

How transformers computes them, and how that maps to our BitNetModel (the tests check each line
against transformers' own forward):

* Forms. `quantization_config` {linear_class, quantization_mode} picks the linear:
  - linear_class "bitlinear" (transformers' default; microsoft's 2B4T): `weight` uint8 packed, plus
    `weight_scale` (1,). BitLinear.post_quant_process DIVIDES: y = acc / (s_x * weight_scale),
    so W = codes / weight_scale and our s_w = 1 / weight_scale.
  - "autobitlinear" + "offline": the same packed `weight` (or unpacked codes), and AutoBitLinear
    MULTIPLIES: y = F.linear(act_quant(x), codes) * weight_scale, so s_w = weight_scale.
  - "autobitlinear" + "online" (microsoft's 2B4T-bf16): dense master weights, no weight_scale;
    WeightQuant ternarizes them every forward with scale 1 / max(mean|W|, 1e-5), i.e. codes =
    round(W / mean|W|) clamped and W ~ codes * mean|W|: our absmean quantizer, so the master weights
    are our latent weights as they are.
  - no quantization_config (model_type "bitnet" only): master weights like "online". transformers
    itself would run them unquantized (plain nn.Linear), which is not the function a BitNet was
    trained for; we import them ternary and say so (source_info "quantization", "exact" False).
* Packing (transformers' pack_weights): uint8 (out/4, in); stored row r holds rows r + i*out/4 of
  the (out, in) code matrix in bits 2i..2i+1 (i = 0..3), each as code + 1. out % 4 == 0.
* Codes + scale -> our latent weights: `quant.ternary_master_weight`, whose absmean quantization
  gives back the codes exactly and the scale to one float32 ulp. (A linear our model does not
  quantize, e.g. a quant "none" import, gets the dequantized weights codes * s_w instead.)
* Activations: per-token absmax int8 with the 1e-5 clamp, ours too (QuantConfig eps 1e-5).
* Which linears are ternary: every nn.Linear but those `modules_to_not_convert` names (transformers'
  should_convert_module rules: a module-boundary prefix, a regex, or a suffix); without the list,
  all but lm_head. Those kept dense are added to our quant's keep_high_precision. Our lm_head is
  never ternary, so a list that leaves lm_head to be converted is refused.
* Norms: BitNetForCausalLM has attn_sub_norm (hidden_size wide, on the attention output before
  o_proj) and ffn_sub_norm (intermediate_size, on act(gate) * up before down_proj): our norm
  "subln", same names, so transformers needs num_heads * head_dim == hidden_size. A llama-type
  checkpoint has none (our "none"). use_rms_norm (an RMSNorm inside each converted BitLinear /
  AutoBitLinear over its input, eps quantization_config.rms_norm_eps) is our norm "bitlinear" (tensor
  `NAME.rms_norm.weight` -> `NAME.norm.weight`); it maps only onto a llama-type checkpoint (a
  bitnet one would need both SubLN and in-layer norms), with every linear converted and the same
  eps as the model's RMSNorms.
* Activation: hidden_act "relu2" (BitNet's default) -> ffn "relu2", relu(gate)^2 * up; "silu" ->
  "swiglu". RoPE: rotate-half, rope_type default only. GQA, head_dim and tied embeddings map as
  for Llama. BitNet has no biases: a `.bias` tensor or attention_bias / mlp_bias true is refused,
  except Qwen2's q/k/v biases, which transformers' BitLinear adds after its scaled product (as our
  BitLinear does: `bias` full precision). Qwen3's q_norm / k_norm are plain RMSNorms, ours too.

Nothing here downloads.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import BitNetError, CheckpointError
from .model import ModelConfig, QuantConfig
from .model_dir import read_config_json
from .quant import ternary_master_weight
from .tensor_files import LazyCheckpoint, LazyTensor, meta_model, safetensors_state

TERNARY_MODEL_TYPES = ("bitnet",)  # model types that are ternary by family
# model types that may carry a bitnet quantization_config (our --format hf writes llama for norm none/bitlinear,
# qwen2 / qwen3 for models with q/k/v biases / QK-norm)
BITNET_QUANTIZED_MODEL_TYPES = ("bitnet", "llama", "qwen2", "qwen3")
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
QUANTIZATION_MODES = ("offline", "online")
VALUES_PER_ITEM = 4  # ternary rows per packed uint8 row
TRANSFORMERS_EPS = 1e-5  # the clamp of transformers' WeightQuant / ActQuant / activation_quant
RELU2_ACTIVATIONS = ("relu2",)
SILU_ACTIVATIONS = ("silu", "swish")


@dataclass(frozen=True)
class HFBitNetQuant:
    """An HF checkpoint's bitnet quantization_config, read and checked."""

    linear_class: str  # bitlinear | autobitlinear
    mode: str  # offline | online
    declared: bool  # False: config.json has no quantization_config
    use_rms_norm: bool
    rms_norm_eps: float
    modules_to_not_convert: tuple[str, ...] | None

    @property
    def form(self) -> str:
        """"divide" (packed, W = codes / weight_scale), "multiply" (packed, W = codes * weight_scale)
        or "master" (dense weights ternarized on the fly)."""
        if self.linear_class == "bitlinear":
            return "divide"  # transformers' BitLinear holds packed weights whatever the mode says
        return "multiply" if self.mode == "offline" else "master"

    def converts(self, module: str) -> bool:
        """Whether transformers makes the nn.Linear `module` (its HF name) ternary."""
        if self.modules_to_not_convert is None:
            return module != "lm_head"  # transformers' default skips the output embedding
        return should_convert_module(module, self.modules_to_not_convert)

    def describe(self) -> str:
        if not self.declared:
            return "master weights, no quantization_config (imported ternary, as online)"
        return f"{self.linear_class} {self.mode}"


def should_convert_module(full_name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """transformers' should_convert_module: a pattern keeps `full_name` dense when it matches from the
    start up to a module boundary ("layers.1" keeps "layers.1.mlp", not "layers.11"), as a regex with
    the same boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{p}){boundary}", full_name) or full_name.endswith(p) for p in patterns)


def is_ternary_hf_config(raw: dict) -> bool:
    """A parsed config.json of an HF checkpoint that this module imports."""
    q = raw.get("quantization_config")
    return raw.get("model_type") in TERNARY_MODEL_TYPES or (isinstance(q, dict) and q.get("quant_method") == "bitnet")


def is_ternary_hf_directory(path: str | os.PathLike) -> bool:
    """An HF directory whose config.json says its linears are ternary (False when unreadable)."""
    try:
        _, raw = read_config_json(Path(path), "no config.json")
    except BitNetError:
        return False
    return isinstance(raw, dict) and is_ternary_hf_config(raw)


def read_bitnet_quantization(raw: dict, where: str) -> HFBitNetQuant:
    """The quantization_config of a ternary HF config.json; one-line errors naming the key."""
    model_type = raw.get("model_type")
    if model_type not in BITNET_QUANTIZED_MODEL_TYPES:
        raise BitNetError(f"{where}: model_type {model_type!r} with a bitnet quantization_config is not supported "
                          f"(supported: {', '.join(BITNET_QUANTIZED_MODEL_TYPES)})")
    q = raw.get("quantization_config")
    if q is None:
        return HFBitNetQuant("autobitlinear", "online", False, False, 1e-6, None)
    if not isinstance(q, dict):
        raise BitNetError(f"{where}: quantization_config must be an object, got {type(q).__name__}")
    if q.get("quant_method") != "bitnet":
        raise BitNetError(f"{where}: quantization_config.quant_method is {q.get('quant_method')!r}, expected 'bitnet' "
                          f"for a {model_type} checkpoint")
    # transformers' BitNetQuantConfig defaults
    linear_class = q.get("linear_class", "bitlinear")
    mode = q.get("quantization_mode", "offline")
    if linear_class not in LINEAR_CLASSES:
        raise BitNetError(f"{where}: quantization_config.linear_class {linear_class!r} is unknown "
                          f"(expected one of {', '.join(LINEAR_CLASSES)})")
    if mode not in QUANTIZATION_MODES:
        raise BitNetError(f"{where}: quantization_config.quantization_mode {mode!r} is unknown "
                          f"(expected one of {', '.join(QUANTIZATION_MODES)})")
    skip = q.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise BitNetError(f"{where}: quantization_config.modules_to_not_convert must be a list of module names, "
                          f"got {skip!r}")
    for pattern in skip or ():
        try:
            re.compile(pattern)  # transformers matches each as a regex too
        except re.error as e:
            raise BitNetError(f"{where}: quantization_config.modules_to_not_convert entry {pattern!r} is not a valid "
                              f"pattern: {e}") from None
    eps = q.get("rms_norm_eps")
    return HFBitNetQuant(linear_class, mode, True, bool(q.get("use_rms_norm", False)),
                         1e-6 if eps is None else float(eps), None if skip is None else tuple(skip))


def bitnet_model_config(hf_config, q: HFBitNetQuant, *, norm: str | None = None, ffn: str | None = None,
                        max_seq_len: int | None = None, source: str = "checkpoint") -> ModelConfig:
    """ModelConfig of a ternary HF checkpoint. norm: None or the checkpoint's own; ffn: None = the
    checkpoint's (another changes the function)."""
    from .importers import FAMILY_FEATURES, _rope_settings, capped_seq_len, hf_model_config

    model_type = hf_config.model_type
    qkv_bias, qk_norm = FAMILY_FEATURES.get(model_type, (False, False))
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise BitNetError(f"{source}: {flag} is true; a {model_type} BitNet checkpoint has no biases"
                              + (" but Qwen2's q/k/v ones" if qkv_bias else ""))
    own_ffn = checkpoint_ffn(hf_config, source)
    num_heads = int(hf_config.num_attention_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads)
    if model_type == "bitnet":
        own_norm = "subln"
        if q.use_rms_norm:
            raise BitNetError(f"{source}: quantization_config.use_rms_norm is true on a bitnet model: in-layer "
                              f"RMSNorms on top of its SubLN norms have no equivalent in our model (norm is one of "
                              f"subln, bitlinear)")
        if num_heads * head_dim != hf_config.hidden_size:
            raise BitNetError(f"{source}: head_dim {head_dim} x num_attention_heads {num_heads} != hidden_size "
                              f"{hf_config.hidden_size}; transformers' BitNet sizes attn_sub_norm by hidden_size")
    else:
        own_norm = "bitlinear" if q.use_rms_norm else "none"
    if q.use_rms_norm and abs(q.rms_norm_eps - float(hf_config.rms_norm_eps)) > 1e-12:
        raise BitNetError(f"{source}: quantization_config.rms_norm_eps {q.rms_norm_eps} differs from rms_norm_eps "
                          f"{hf_config.rms_norm_eps}; our in-layer norms (norm 'bitlinear') use the model's eps")
    if norm is not None and norm != own_norm:
        raise BitNetError(f"{source}: the checkpoint's norm is {own_norm!r} (its {model_type} layout); "
                          f"model.norm {norm!r} cannot be imported (leave it unset or {own_norm!r})")
    rope_theta, rope_type, rotary_fraction = _rope_settings(hf_config)
    if rope_type != "default":
        raise BitNetError(f"{source}: RoPE scaling type {rope_type!r} is not implemented (expected plain RoPE)")
    if rotary_fraction != 1.0:
        raise BitNetError(f"{source}: partial_rotary_factor {rotary_fraction} is not supported (expected 1.0)")
    return hf_model_config(hf_config, seq_len=capped_seq_len(hf_config, max_seq_len), rope_theta=rope_theta,
                           source=source, norm=own_norm, ffn=ffn if ffn is not None else own_ffn, qkv_bias=qkv_bias,
                           qk_norm=qk_norm)


def checkpoint_ffn(hf_config, source: str = "checkpoint") -> str:
    """Our ffn for the checkpoint's hidden_act (both families: down(act(gate(x)) * up(x)))."""
    act = hf_config.hidden_act
    if act in RELU2_ACTIVATIONS:
        return "relu2"
    if act in SILU_ACTIVATIONS:
        return "swiglu"
    raise BitNetError(f"{source}: hidden_act {act!r} is not supported (expected 'relu2' or 'silu')")


def unpack_hf_rows(packed: torch.Tensor) -> torch.Tensor:
    """(out/4, in) uint8 -> (out, in) int8: stored row r, bits 2i..2i+1 -> row r + i*out/4, minus 1.
    Values are in {-1, 0, 1} for a valid file; the unused 2-bit value 3 comes out as 2."""
    return torch.cat([((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(VALUES_PER_ITEM)], dim=0)


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Our linear names -> (out, in), as BitNetModel builds them."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out = {}
    for i in range(cfg.num_layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        out.update({f"{a}.q_proj": (q, d), f"{a}.k_proj": (kv, d), f"{a}.v_proj": (kv, d), f"{a}.o_proj": (d, q),
                    f"{m}.gate_proj": (f, d), f"{m}.up_proj": (f, d), f"{m}.down_proj": (d, f)})
    return out


def _scale_of(t: torch.Tensor, key: str, form: str) -> float:
    if not t.is_floating_point() or t.numel() != 1:
        raise CheckpointError(f"tensor {key}: expected one floating-point scale, got {t.dtype} of shape {tuple(t.shape)}")
    ws = float(t.double())
    if not (ws > 0 and ws < float("inf")):
        raise CheckpointError(f"tensor {key}: the weight scale must be finite and positive, got {ws}")
    # float64 reciprocal, then float32 (one rounding)
    return float(torch.tensor(1.0 / ws, dtype=torch.float32)) if form == "divide" else float(t.float())


def _check_stored_weight(dtype: torch.dtype, wshape: tuple[int, ...], key: str, shape: tuple[int, int],
                         form: str) -> None:
    """A converted linear's stored weight has a dtype and shape we can read codes from (checked from
    the header, before its values are read)."""
    n_out, n_in = shape
    packed_shape = (n_out // VALUES_PER_ITEM, n_in)
    if dtype == torch.uint8:
        if n_out % VALUES_PER_ITEM or tuple(wshape) != packed_shape:
            want = f"({n_out}/4, {n_in})" if n_out % VALUES_PER_ITEM else str(packed_shape)
            raise CheckpointError(f"tensor {key}: packed shape {tuple(wshape)} disagrees with the config's "
                                  f"({n_out}, {n_in}) linear (expected uint8 {want}, 4 rows per byte)")
        return
    if form == "multiply" and dtype.is_floating_point and tuple(wshape) == shape:
        return  # offline AutoBitLinear also takes an unpacked weight and uses it as it is
    raise CheckpointError(f"tensor {key}: expected packed uint8 {packed_shape} (the config's ({n_out}, {n_in}) "
                          f"linear, 4 rows per byte), got {dtype} of shape {tuple(wshape)}")


def _codes_of(w: torch.Tensor, key: str, shape: tuple[int, int], form: str) -> torch.Tensor:
    """(out, in) int8 ternary codes of a converted linear's stored weight."""
    _check_stored_weight(w.dtype, tuple(w.shape), key, shape, form)
    if w.dtype == torch.uint8:
        codes = unpack_hf_rows(w)
        if bool((codes > 1).any()):
            raise CheckpointError(f"tensor {key}: holds the 2-bit value 3, which is not a ternary code (0, 1, 2)")
        return codes
    if bool(((w != -1) & (w != 0) & (w != 1)).any()):
        raise CheckpointError(f"tensor {key}: an unpacked offline weight must hold ternary codes -1, 0, 1")
    return w.to(torch.int8)


def bitnet_state(hf_state: dict[str, LazyTensor], cfg: ModelConfig, quant: QuantConfig, q: HFBitNetQuant,
                 converted: dict[str, bool], source: str) -> dict[str, LazyTensor]:
    """HF tensors -> our state dict for BitNetModel(cfg, quant) (quant: the final one), lazily: names,
    dtypes, shapes and weight scales are checked here; a linear's codes are unpacked, and made into
    latent weights, when its LazyTensor is loaded."""
    allowed_bias = re.compile(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias") if cfg.qkv_bias else None
    for name in hf_state:
        if name.endswith(".bias") and not (allowed_bias and allowed_bias.fullmatch(name)):
            raise CheckpointError(f"{source}: tensor {name}: a BitNet checkpoint has no biases (expected none"
                                  + (" but q/k/v_proj.bias" if cfg.qkv_bias else "") + ")")
    hf_state = dict(hf_state)
    bitlinears = meta_model(cfg, quant).bitlinear_modules()
    state: dict[str, LazyTensor] = {}
    for name, shape in _linear_shapes(cfg).items():
        w_key, s_key, n_key = f"model.{name}.weight", f"model.{name}.weight_scale", f"model.{name}.rms_norm.weight"
        if w_key not in hf_state:
            raise CheckpointError(f"{source}: tensor {w_key} is missing")
        w, scale = hf_state.pop(w_key), hf_state.pop(s_key, None)
        if q.use_rms_norm and n_key in hf_state:
            state[f"{name}.norm.weight"] = hf_state.pop(n_key)
        dense = not converted[name] or q.form == "master"
        if dense:
            if scale is not None:
                why = ("master weights (ternarized on the fly) have none" if converted[name]
                       else "it is in modules_to_not_convert (kept high precision)")
                raise CheckpointError(f"{source}: tensor {s_key} is unexpected: {why}")
            if not w.dtype.is_floating_point or tuple(w.shape) != shape:
                raise CheckpointError(f"{source}: tensor {w_key}: expected a dense floating-point {shape} weight, "
                                      f"got {w.dtype} of shape {tuple(w.shape)}")
            state[f"{name}.weight"] = w.then(torch.Tensor.float, dtype=torch.float32)
            continue
        if scale is None:
            raise CheckpointError(f"{source}: tensor {s_key} is missing (a {q.linear_class} {q.mode} checkpoint "
                                  f"stores one weight_scale per ternary linear)")
        try:
            _check_stored_weight(w.dtype, tuple(w.shape), w_key, shape, q.form)
            s_w = _scale_of(scale.load(), s_key, q.form)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        linear = bitlinears[name]
        if linear.quantize:
            try:  # the scale checks ternary_master_weight makes, before any codes are read
                ternary_master_weight(torch.ones(1), s_w, linear.eps)
            except ValueError as e:
                raise CheckpointError(f"{source}: tensor {s_key}: {e}") from None
        state[f"{name}.weight"] = w.then(functools.partial(_latent_weight, key=w_key, shape=shape, form=q.form,
                                                           s_w=s_w, eps=linear.eps if linear.quantize else None,
                                                           source=source), shape=shape, dtype=torch.float32)
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name.endswith(".weight_scale"):
            raise CheckpointError(f"{source}: tensor {name} is unexpected: {name.removesuffix('_scale')} is not a "
                                  f"linear our model makes ternary (lm_head and norms stay high precision)")
        state[name.removeprefix("model.")] = tensor.then(torch.Tensor.float, dtype=torch.float32) \
            if tensor.dtype.is_floating_point else tensor
    if cfg.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _latent_weight(w: torch.Tensor, *, key: str, shape: tuple[int, int], form: str, s_w: float, eps: float | None,
                   source: str) -> torch.Tensor:
    """A converted linear's stored weight -> our fp32 weight: latent weights that quantize back to its
    codes and scale (eps: the linear's quantizer eps), or codes * s_w for a linear our model keeps
    dense (eps None)."""
    try:
        codes = _codes_of(w, key, shape, form)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if eps is None:
        return codes.float() * s_w
    return ternary_master_weight(codes, s_w, eps)


def load_hf_bitnet(
    path: str | os.PathLike,
    *,
    quant: QuantConfig,
    norm: str | None = None,
    ffn: str | None = None,
    max_seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Import a ternary HF directory. -> (model in eval mode on CPU, fast tokenizer, source_info).

    quant: our quantization; b1.58 (eps 1e-5) computes the checkpoint's function. The linears the
           checkpoint keeps dense are added to quant.keep_high_precision (model.quant_config).
    norm:  None or the checkpoint's own (bitnet: "subln"); ffn: None = the checkpoint's activation.
    source_info: as load_hf_llama's, plus "quantization" (the form) and "kept_high_precision".
    """
    ck = open_hf_bitnet(path, quant=quant, norm=norm, ffn=ffn, max_seq_len=max_seq_len)
    model = ck.build_model()
    model.to(dtype)
    model.eval()
    return model, ck.tokenizer, ck.info


def open_hf_bitnet(
    path: str | os.PathLike,
    *,
    quant: QuantConfig,
    norm: str | None = None,
    ffn: str | None = None,
    max_seq_len: int | None = None,
) -> LazyCheckpoint:
    """load_hf_bitnet's checkpoint with no tensor read yet (lambda buffers at 1, as a fresh model's)."""
    from .importers import _load_tokenizer, _safetensors_files, _sha256_file

    path = Path(path)
    config_file, raw = read_config_json(path, f"cannot import {path}: config.json is missing")
    q = read_bitnet_quantization(raw, str(config_file))
    hf_config = _read_config(path, config_file)
    cfg = bitnet_model_config(hf_config, q, norm=norm, ffn=ffn, max_seq_len=max_seq_len, source=str(config_file))
    if q.modules_to_not_convert is not None and q.converts("lm_head"):
        raise BitNetError(f"{config_file}: quantization_config.modules_to_not_convert does not list lm_head, so "
                          f"transformers makes the lm_head ternary; ours stays high precision (add 'lm_head')")
    converted = {name: q.converts(f"model.{name}") for name in _linear_shapes(cfg)}
    dense = [name for name, c in converted.items() if not c]
    if q.use_rms_norm and dense:
        raise BitNetError(f"{config_file}: use_rms_norm with linears kept dense ({dense[:3]}): transformers puts the "
                          f"in-layer RMSNorm on converted linears only, our norm 'bitlinear' on every linear")
    quant = replace(quant, keep_high_precision=list(quant.keep_high_precision) + dense)
    weight_files = _safetensors_files(path)
    tokenizer = _load_tokenizer(path, None)

    state = bitnet_state(safetensors_state(weight_files), cfg, quant, q, converted, str(path))
    skeleton = meta_model(cfg, quant)
    for key, own in skeleton.state_dict().items():
        if key not in state and key.endswith(".lam"):
            state[key] = LazyTensor.of(torch.ones(own.shape))

    ternary_as_theirs = all(m.quantize == converted[n] for n, m in skeleton.bitlinear_modules().items())
    source_info = {
        "source": str(path),
        "gguf_file": None,
        "sha256": {f.name: _sha256_file(f) for f in weight_files},
        "model_type": hf_config.model_type,
        "quantization": q.describe(),
        "kept_high_precision": dense,
        "subln_added": False,  # a bitnet checkpoint's SubLN gains are its own: nothing to calibrate
        "exact": (q.declared and ternary_as_theirs and cfg.ffn == checkpoint_ffn(hf_config)
                  and abs(quant.eps - TRANSFORMERS_EPS) < 1e-12),
    }
    return LazyCheckpoint(cfg, quant, state, tokenizer, source_info, str(path))


def _read_config(path: Path, config_file: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BitNetError(f"{config_file}: transformers cannot read this config: {e}") from None
