"""Llama-style BitNet b1.58 model: plain nn.Modules with a dataclass config, no I/O.

Linear layers come from an injected factory (`LinearFactory`), so the same model runs ternary
(BitLinear, quantize=True), full precision (quant=none) or mixed (hybrid precision list).
Parameter names follow the Hugging Face Llama layout so importers map weights one to one.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .dict_config import DictSerializable
from .losses import linear_cross_entropy
from .quant import BitLinear, RMSNorm

NormKind = Literal["subln", "bitlinear", "none"]
FfnKind = Literal["swiglu", "relu2"]


@dataclass
class ModelConfig(DictSerializable):
    section = "model"

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # default hidden_size // num_heads
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    norm: str = "subln"  # subln | bitlinear | none
    ffn: str = "swiglu"  # swiglu | relu2
    init_std: float = 0.02
    # Qwen2 / Qwen2.5: q, k, v projections carry a bias, kept in full precision and added after
    # the (ternary) product. Qwen3: an RMSNorm over head_dim on every q and k head, before RoPE.
    qkv_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.norm not in ("subln", "bitlinear", "none"):
            raise ValueError(f"norm must be 'subln', 'bitlinear' or 'none', got {self.norm!r}")
        if self.ffn not in ("swiglu", "relu2"):
            raise ValueError(f"ffn must be 'swiglu' or 'relu2', got {self.ffn!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")



@dataclass
class QuantConfig(DictSerializable):
    """How linear layers are quantized. Paired explicitly with export (export requires lambda 1)."""

    section = "quant"

    method: str = "b1.58"  # b1.58 | none
    eps: float = 1e-5
    # fnmatch patterns of module names kept in high precision (hybrid), e.g. "layers.0.*".
    keep_high_precision: list[str] = field(default_factory=list)
    lambda_warmup_steps: int = 0  # 0: lambda = 1 from the start (training from scratch)
    lambda_schedule: str = "linear"
    # Weight-only quantization before this step (full-precision activations in training; evaluation and
    # export always quantize them): "weight-only first, int8 activations later". 0: int8 from the start.
    act_quant_from_step: int = 0
    # A learnable per-tensor weight scale (LSQ-style) instead of mean|W|: each ternary BitLinear gets a
    # `log_scale` parameter, set to log(mean|W|) at its first forward and trained by its own gradient; the
    # codes are clamp(round(W / exp(log_scale))) and export writes the learned value as s_w.
    learnable_scale: bool = False

    def __post_init__(self):
        if int(self.act_quant_from_step) < 0:
            raise ValueError(f"quant.act_quant_from_step must be >= 0, got {self.act_quant_from_step}")
        if self.method not in ("b1.58", "none"):
            raise ValueError(f"quant method must be 'b1.58' or 'none', got {self.method!r}")
        self.keep_high_precision = list(self.keep_high_precision)



# (module_name, in_features, out_features, bias=False) -> module
LinearFactory = Callable[..., nn.Module]


def make_linear_factory(model_cfg: ModelConfig, quant_cfg: QuantConfig) -> LinearFactory:
    pre_norm = model_cfg.norm == "bitlinear"

    def factory(name: str, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        keep = any(fnmatch.fnmatchcase(name, p) for p in quant_cfg.keep_high_precision)
        return BitLinear(
            in_features,
            out_features,
            bias=bias,
            quantize=quant_cfg.method == "b1.58" and not keep,
            pre_norm=pre_norm,
            norm_eps=model_cfg.rms_norm_eps,
            eps=quant_cfg.eps,
            learnable_scale=bool(quant_cfg.learnable_scale),
        )

    return factory


def rope_cache(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim), in the rotate-half (HF Llama) convention."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, n_head, T, head_dim); cos/sin: (T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding (no training).

    One (k, v) pair of buffers per layer, each (B, n_kv, max_len, head_dim), after RoPE. A forward
    with the cache (`BitNetModel.forward(idx, cache=...)`) runs its T new positions against the
    `length` cached ones and appends them. Every per-token op (BitLinear's per-token activation
    scale, RMSNorm, RoPE) sees the same values as in a full forward, so incremental logits equal
    full-sequence logits up to float summation order (tests/test_teacher_corpus.py).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        self.max_len = max_len or cfg.max_seq_len
        if not 0 < self.max_len <= cfg.max_seq_len:
            raise ValueError(f"KV cache length {self.max_len} must be in 1..max_seq_len {cfg.max_seq_len}")
        shape = (batch_size, cfg.num_kv_heads, self.max_len, cfg.head_dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(cfg.num_layers)]
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row repeated n times (B -> B·n): a prompt prefilled once, then sampled n ways."""
        out = object.__new__(KVCache)
        out.max_len, out.length = self.max_len, self.length
        out.layers = [(k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)) for k, v in self.layers]
        return out

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop the rows not in `rows` (indices, in the order kept): finished sequences stop costing compute."""
        self.layers = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.layers]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, linear: LinearFactory):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        bias = {"bias": True} if cfg.qkv_bias else {}
        self.q_proj = linear(f"{prefix}.q_proj", d, self.n_head * self.hd, **bias)
        self.k_proj = linear(f"{prefix}.k_proj", d, self.n_kv * self.hd, **bias)
        self.v_proj = linear(f"{prefix}.v_proj", d, self.n_kv * self.hd, **bias)
        self.o_proj = linear(f"{prefix}.o_proj", self.n_head * self.hd, d)
        # Qwen3 QK-norm: one RMSNorm over head_dim, shared by all heads, on q and on k.
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        # SubLN: a norm on the attention output, before o_proj (BitNet b1.58 2B4T layout).
        self.attn_sub_norm = RMSNorm(self.n_head * self.hd, cfg.rms_norm_eps) if cfg.norm == "subln" else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        """x (B, T, d); cos/sin (T, hd) for positions start..start+T-1; kv: this layer's KVCache buffers."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)  # (B, T, n_head, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)  # (B, T, n_kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if kv is not None:
            k_buf, v_buf = kv  # (B, n_kv, max_len, hd)
            k_buf[:, :, start : start + T] = k
            v_buf[:, :, start : start + T] = v
            k, v = k_buf[:, :, : start + T], v_buf[:, :, : start + T]  # (B, n_kv, start+T, hd)
            if start > 0:
                causal = False
                if T > 1:  # query i (position start+i) sees keys 0..start+i
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        rep = self.n_head // self.n_kv
        if kv is not None and T == 1 and rep > 1:
            # one decode position: the rep query heads that share a kv head attend to it as rep
            # queries of one head, instead of copying the whole cache rep times (repeat_interleave)
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, rep, self.hd), k, v)  # (B, n_kv, rep, hd)
            y = y.reshape(B, self.n_head, 1, self.hd)
        else:
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)  # (B, n_head, T, hd)
                v = v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)
        if self.attn_sub_norm is not None:
            y = self.attn_sub_norm(y)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, linear: LinearFactory):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(f"{prefix}.gate_proj", d, f)
        self.up_proj = linear(f"{prefix}.up_proj", d, f)
        self.down_proj = linear(f"{prefix}.down_proj", f, d)
        self.ffn_sub_norm = RMSNorm(f, cfg.rms_norm_eps) if cfg.norm == "subln" else None
        self.relu2 = cfg.ffn == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.relu(g).square() if self.relu2 else F.silu(g)
        h = g * self.up_proj(x)  # (B, T, ffn)
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, linear: LinearFactory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, f"layers.{idx}.self_attn", linear)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, f"layers.{idx}.mlp", linear)

    def forward(self, x, cos, sin, kv=None, start: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class BitNetModel(nn.Module):
    """Decoder-only LM. Embeddings, norms and lm_head are never quantized."""

    def __init__(self, cfg: ModelConfig, quant: QuantConfig | None = None, linear: LinearFactory | None = None):
        super().__init__()
        self.config = cfg
        self.quant_config = quant or QuantConfig()
        linear = linear or make_linear_factory(cfg, self.quant_config)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, i, linear) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # scaled init for residual output projections (GPT-2 / nanoGPT)
                s = std / math.sqrt(2 * self.config.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, mean=0.0, std=s)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab).

        cache: incremental decoding: idx holds the T positions after the cache's `length` ones;
        they are appended to the cache."""
        return self.lm_head(self.hidden_states(idx, cache))

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final-normed hidden states (B, T, d) that the lm_head maps to logits."""
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if start + T > limit:
            what = "the KV cache's length" if cache is not None else "max_seq_len"
            raise ValueError(f"sequence length {start + T} exceeds {what} {limit}")
        x = self.embed_tokens(idx)  # (B, T, d)
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.length = start + T
        return self.norm(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, F.cross_entropy(self(idx), targets) without the logits
        tensor: the lm_head and the loss go in row chunks (losses.linear_cross_entropy)."""
        h = self.hidden_states(idx)
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def bitlinear_modules(self) -> dict[str, BitLinear]:
        return {n: m for n, m in self.named_modules() if isinstance(m, BitLinear)}

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Simple sampling without a KV cache (for samples during training; the runtime serves)."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.max_seq_len:]
            logits = self(ctx)[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
