import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig, apply_rope, rope_cache
from bitnet_train.quant import BitLinear

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_seq_len=16)


@pytest.mark.parametrize("norm", ["subln", "bitlinear", "none"])
@pytest.mark.parametrize("ffn", ["swiglu", "relu2"])
@pytest.mark.parametrize("method", ["b1.58", "none"])
def test_variants_run_and_are_causal(norm, ffn, method):
    torch.manual_seed(0)
    m = BitNetModel(dataclasses.replace(TINY, norm=norm, ffn=ffn), QuantConfig(method=method)).eval()
    idx = torch.randint(0, 64, (2, 10))
    logits = m(idx)
    assert logits.shape == (2, 10, 64) and torch.isfinite(logits).all()
    # changing a later token must not change earlier logits
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % 64
    torch.testing.assert_close(m(idx2)[:, :7], logits[:, :7])


def test_norm_variants_have_their_parameters():
    names = lambda cfg: set(BitNetModel(cfg).state_dict())  # noqa: E731
    sub = names(dataclasses.replace(TINY, norm="subln"))
    inl = names(dataclasses.replace(TINY, norm="bitlinear"))
    none = names(dataclasses.replace(TINY, norm="none"))
    assert "layers.0.self_attn.attn_sub_norm.weight" in sub and "layers.0.mlp.ffn_sub_norm.weight" in sub
    assert "layers.0.self_attn.q_proj.norm.weight" in inl and "layers.0.self_attn.attn_sub_norm.weight" not in inl
    assert not any("sub_norm" in n or ".norm.weight" in n.replace("layers.", "") and n != "norm.weight" for n in none)


def test_rope_matches_complex_rotation():
    cfg = dataclasses.replace(TINY, rope_theta=500.0)
    cos, sin = rope_cache(cfg, 8)
    x = torch.randn(1, 1, 8, cfg.head_dim)
    out = apply_rope(x, cos, sin)
    half = cfg.head_dim // 2
    inv = 1.0 / (500.0 ** (torch.arange(0, half).float() * 2 / cfg.head_dim))
    angle = torch.arange(8).float()[:, None] * inv[None, :]
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], dim=-1))


def test_gqa_equals_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = BitNetModel(TINY, QuantConfig(method="none")).eval()
    mha_cfg = dataclasses.replace(TINY, num_kv_heads=4)
    mha = BitNetModel(mha_cfg, QuantConfig(method="none")).eval()
    state = gqa.state_dict()
    hd = TINY.head_dim
    for i in range(TINY.num_layers):
        for p in ("k_proj", "v_proj"):
            w = state[f"layers.{i}.self_attn.{p}.weight"].view(2, hd, -1)  # (n_kv, hd, d)
            state[f"layers.{i}.self_attn.{p}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 64, (1, 9))
    torch.testing.assert_close(mha(idx), gqa(idx))


def test_hybrid_precision_keeps_named_modules_full_precision():
    m = BitNetModel(TINY, QuantConfig(keep_high_precision=["layers.0.*", "*.down_proj"]))
    mods = m.bitlinear_modules()
    assert not mods["layers.0.self_attn.q_proj"].quantize
    assert not mods["layers.1.mlp.down_proj"].quantize
    assert mods["layers.1.self_attn.q_proj"].quantize
    assert not isinstance(m.lm_head, BitLinear) and not isinstance(m.embed_tokens, BitLinear)


def test_tied_embeddings_share_storage():
    m = BitNetModel(dataclasses.replace(TINY, tie_embeddings=True))
    assert m.lm_head.weight is m.embed_tokens.weight


def test_quant_none_is_plain_linear_algebra():
    torch.manual_seed(0)
    m = BitNetModel(dataclasses.replace(TINY, norm="none", num_layers=1), QuantConfig(method="none")).eval()
    lin = m.layers[0].mlp.up_proj
    x = torch.randn(3, 32)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight))


@pytest.mark.parametrize("bad", [dict(norm="layer"), dict(ffn="gelu"), dict(num_kv_heads=3), dict(hidden_size=30),
                                 dict(vocab_size=0)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        ModelConfig(**{**dict(hidden_size=32, num_heads=4, num_kv_heads=2), **bad})


def test_sequence_longer_than_context_is_rejected():
    m = BitNetModel(TINY)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))
