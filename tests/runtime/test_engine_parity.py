"""Full forward of the C++ engine vs the PyTorch reference built from the same exported file."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bitnet_train.export.from_model import model_arrays  # noqa: E402
from bitnet_train.export.reference import build_reference_model  # noqa: E402
from bitnet_train.export.writer import write_bitnet  # noqa: E402
from bitnet_train.model import BitNetModel, ModelConfig, QuantConfig  # noqa: E402
from bitnet_train.runtime import Engine, _C  # noqa: E402

ISAS = _C.available_isas()
BASE = dict(vocab_size=211, hidden_size=96, intermediate_size=200, num_layers=2, num_heads=4, num_kv_heads=2,
            max_seq_len=48, init_std=0.08)

VARIANTS = {
    "subln-swiglu-gqa": dict(norm="subln", ffn="swiglu"),
    "bitlinear-relu2": dict(norm="bitlinear", ffn="relu2", num_kv_heads=4),
    "none-swiglu-mqa-tied": dict(norm="none", ffn="swiglu", num_kv_heads=1, tie_embeddings=True),
    "subln-relu2-headdim": dict(norm="subln", ffn="relu2", head_dim=32),
    "qwen2-qkv-bias": dict(norm="none", ffn="swiglu", qkv_bias=True, tie_embeddings=True),
    "qwen3-qk-norm": dict(norm="none", ffn="swiglu", qk_norm=True, head_dim=32),
    "subln-bias-qknorm": dict(norm="subln", ffn="relu2", qkv_bias=True, qk_norm=True),
}


def make_model(overrides: dict, keep: list[str] | None = None, seed: int = 0) -> BitNetModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**BASE, **overrides})
    model = BitNetModel(cfg, QuantConfig(keep_high_precision=keep or []))
    with torch.no_grad():  # norms away from 1 so that every norm weight matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def export(model: BitNetModel, path, dense_dtype="F32", packing="i2_b128"):
    return write_bitnet(path, model_arrays(model), packing=packing, dense_dtype=dense_dtype)


def prompts(vocab: int, lengths=(7, 12, 3), seed=1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n) for n in lengths]


def ref_logits(ref, seq: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.from_numpy(np.asarray(seq, np.int64))[None])[0].numpy()


def assert_close(a: np.ndarray, b: np.ndarray, what: str):
    """Logits agree: most rows to float rounding, every row within a few int8 rounding flips.

    Summation order differs (softmax, RMSNorm, dense sums), so now and then x * s_x lands on the
    other side of a .5 and one activation code differs by 1; that moves later logits by ~1%.
    """
    scale = float(np.abs(b).max())
    row_err = np.abs(a - b).max(-1) / scale  # (T,)
    assert row_err.max() <= 0.05, f"{what}: max |diff| {row_err.max():.3g} of the logit scale {scale:.3g}"
    assert np.median(row_err) <= 1e-4, f"{what}: median row error {np.median(row_err):.3g} (rows {row_err})"
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9, f"{what}: argmax disagrees"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_logits_match_reference(tmp_path, variant):
    model = make_model(VARIANTS[variant])
    path = export(model, tmp_path / "m.bitnet")
    ref = build_reference_model(path)
    eng = Engine.load(path)
    for seq in prompts(model.config.vocab_size):
        got = eng.forward(seq)
        assert got.shape == (len(seq), model.config.vocab_size)
        assert_close(got, ref_logits(ref, seq), f"{variant} len {len(seq)}")


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_gives_the_same_logits(tmp_path, isa):
    model = make_model(VARIANTS["subln-swiglu-gqa"])
    path = export(model, tmp_path / "m.bitnet", dense_dtype="F16")
    seq = prompts(model.config.vocab_size, lengths=(20,))[0]
    base = Engine.load(path, isa="scalar").forward(seq)
    eng = Engine.load(path, isa=isa)
    assert eng.isa() == isa
    # ternary math is integer-exact on every path; only dense fp32 sums (lm_head) reorder.
    np.testing.assert_allclose(eng.forward(seq), base, rtol=1e-4, atol=1e-4 * np.abs(base).max())


@pytest.mark.parametrize("dense_dtype", ["F16", "BF16"])
def test_half_precision_files(tmp_path, dense_dtype):
    model = make_model(VARIANTS["subln-swiglu-gqa"])
    path = export(model, tmp_path / "m.bitnet", dense_dtype=dense_dtype)
    ref = build_reference_model(path)  # converts the file's dense tensors to fp32 exactly
    seq = prompts(model.config.vocab_size, lengths=(15,))[0]
    assert_close(Engine.load(path).forward(seq), ref_logits(ref, seq), dense_dtype)


def test_hybrid_precision_and_t3_packing(tmp_path):
    model = make_model(VARIANTS["bitlinear-relu2"], keep=["layers.0.mlp.*", "layers.1.self_attn.o_proj"])
    ref_path = export(model, tmp_path / "i2.bitnet")
    ref = build_reference_model(ref_path)
    seq = prompts(model.config.vocab_size, lengths=(11,))[0]
    want = ref_logits(ref, seq)
    assert_close(Engine.load(ref_path).forward(seq), want, "hybrid i2_b128")
    t3 = export(model, tmp_path / "t3.bitnet", packing="t3_b5")  # a format-version-1 file: repacked at load
    assert_close(Engine.load(t3).forward(seq), want, "hybrid t3_b5")
    t160 = export(model, tmp_path / "t160.bitnet", packing="t3_b160")
    assert_close(Engine.load(t160).forward(seq), want, "hybrid t3_b160")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", ["subln-swiglu-gqa", "bitlinear-relu2"])
def test_t3_b160_file_gives_the_i2_logits_bit_for_bit(tmp_path, isa, variant):
    """The 1.6-bit file, read in place, computes exactly what the 2-bit one does (integer ternary
    math, the same dense tensors): prefill, ragged batches and cached decode, on every ISA."""
    model = make_model(VARIANTS[variant], keep=["layers.1.self_attn.o_proj"])
    i2 = Engine.load(export(model, tmp_path / "i2.bitnet", dense_dtype="F16"), isa=isa)
    t3 = Engine.load(export(model, tmp_path / "t3.bitnet", dense_dtype="F16", packing="t3_b160"), isa=isa)
    assert t3.quant["packing"] == "t3_b160" and t3.isa() == isa  # not repacked
    seqs = prompts(model.config.vocab_size, lengths=(9, 6, 13))
    for seq in seqs:
        np.testing.assert_array_equal(t3.forward(seq), i2.forward(seq))
    ca, cb = i2.new_cache(n_seqs=3), t3.new_cache(n_seqs=3)
    np.testing.assert_array_equal(t3.forward([s[:3] for s in seqs], cache=cb, last_only=True),
                                  i2.forward([s[:3] for s in seqs], cache=ca, last_only=True))
    for step in range(3, 6):
        toks = [[int(s[step])] for s in seqs]
        np.testing.assert_array_equal(t3.forward(toks, cache=cb, last_only=True), i2.forward(toks, cache=ca, last_only=True))


def test_kv_cache_decode_matches_full_prefill(tmp_path):
    model = make_model(VARIANTS["subln-swiglu-gqa"])
    eng = Engine.load(export(model, tmp_path / "m.bitnet"))
    seqs = prompts(model.config.vocab_size, lengths=(9, 4, 13))
    full = [eng.forward(s) for s in seqs]
    cache = eng.new_cache(n_seqs=3)
    # ragged prefill of the first 3 tokens of each, then the rest one token at a time for all three
    first = eng.forward([s[:3] for s in seqs], cache=cache)
    for i in range(3):
        np.testing.assert_allclose(first[i], full[i][:3], rtol=1e-5, atol=1e-5)
    for t in range(3, 13):
        live = [i for i, s in enumerate(seqs) if t < len(s)]
        out = eng.forward([[int(seqs[i][t])] for i in live], cache=cache, seq_ids=live, last_only=True)
        for row, i in zip(out, live):
            np.testing.assert_allclose(row, full[i][t], rtol=1e-4, atol=1e-4 * np.abs(full[i][t]).max())
    assert [cache.length(i) for i in range(3)] == [9, 4, 13]


def test_greedy_tokens_match_reference(tmp_path):
    model = make_model(VARIANTS["subln-swiglu-gqa"], seed=3)
    path = export(model, tmp_path / "m.bitnet", dense_dtype="F16")
    ref = build_reference_model(path)
    eng = Engine.load(path)
    prompt = prompts(model.config.vocab_size, lengths=(5,))[0]
    steps = model.config.max_seq_len - len(prompt)
    ids = torch.from_numpy(prompt.astype(np.int64))[None]
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, ref(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = ids[0, len(prompt):].tolist()
    cache = eng.new_cache()
    nxt = int(eng.forward(prompt, cache=cache, last_only=True).argmax())
    got = [nxt]
    for _ in range(steps - 1):
        nxt = int(eng.forward([nxt], cache=cache, last_only=True).argmax())
        got.append(nxt)
    assert got == want


def test_engine_logits_match_the_trained_model_with_fp32_export(tmp_path):
    model = make_model(VARIANTS["subln-swiglu-gqa"])
    eng = Engine.load(export(model, tmp_path / "m.bitnet", dense_dtype="F32"))
    seq = prompts(model.config.vocab_size, lengths=(16,))[0]
    assert_close(eng.forward(seq), ref_logits(model, seq), "trained model")


def int8_rows_reference(w: np.ndarray) -> np.ndarray:
    """Per-row symmetric int8 (scale = max|row| / 127, round half to even), dequantized, in numpy."""
    w = w.astype(np.float32)
    amax = np.abs(w).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1))
    return (np.clip(np.rint(w / scale), -127, 127) * scale).astype(np.float32)


@pytest.mark.parametrize("variant", ["subln-swiglu-gqa", "none-swiglu-mqa-tied"])
def test_int8_lm_head_matches_reference_with_int8_weights(tmp_path, variant):
    model = make_model(VARIANTS[variant])
    path = export(model, tmp_path / "m.bitnet")
    ref = build_reference_model(path)
    # the reference with an int8-rounded lm_head; a new parameter, so tied embeddings stay as stored
    q = int8_rows_reference(ref.lm_head.weight.detach().numpy())
    ref.lm_head.weight = torch.nn.Parameter(torch.from_numpy(q), requires_grad=False)
    eng = Engine.load(path, lm_head="int8")
    fp = Engine.load(path)
    assert eng.lm_head == "int8" and fp.lm_head == "fp"
    assert eng.weight_bytes_per_token < fp.weight_bytes_per_token
    for seq in prompts(model.config.vocab_size, lengths=(9, 4)):
        got = eng.forward(seq)
        assert_close(got, ref_logits(ref, seq), f"int8 lm_head {variant}")
        assert not np.allclose(got, fp.forward(seq), rtol=0, atol=1e-7), "int8 lm_head changed nothing"


def test_int8_lm_head_rejects_unknown_choice(tmp_path):
    path = export(make_model(VARIANTS["subln-swiglu-gqa"]), tmp_path / "m.bitnet")
    with pytest.raises(ValueError, match="lm_head must be one of"):
        Engine.load(path, lm_head="int4")


@pytest.fixture
def fp16_kv_reference(monkeypatch):
    """The reference with its keys (after RoPE) and values rounded to fp16, as the f16 KV cache stores them."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def rounded(q, k, v, *args, **kwargs):
        return sdpa(q, k.half().float(), v.half().float(), *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", rounded)


@pytest.mark.parametrize("variant", ["subln-swiglu-gqa", "subln-relu2-headdim"])
def test_f16_kv_cache_matches_reference_with_fp16_keys_and_values(tmp_path, variant, fp16_kv_reference):
    model = make_model(VARIANTS[variant])
    path = export(model, tmp_path / "m.bitnet")
    ref = build_reference_model(path)
    eng = Engine.load(path, kv_cache="f16")
    fp = Engine.load(path)
    assert eng.kv_cache == "f16" and fp.kv_cache == "f32"
    seq = prompts(model.config.vocab_size, lengths=(14,))[0]
    want = ref_logits(ref, seq)
    cache = eng.new_cache()
    assert cache.dtype == "f16" and cache.nbytes * 2 == fp.new_cache().nbytes
    # prefill 6 tokens into the f16 cache, then decode the rest one at a time from it
    got = [eng.forward(seq[:6], cache=cache)]
    got += [eng.forward(seq[t:t + 1], cache=cache) for t in range(6, len(seq))]
    got = np.concatenate(got)
    assert_close(got, want, f"f16 KV cache {variant}")
    assert not np.allclose(got, fp.forward(seq), rtol=0, atol=1e-7), "the f16 KV cache changed nothing"


def test_kv_cache_dtype_choices(tmp_path):
    path = export(make_model(VARIANTS["subln-swiglu-gqa"]), tmp_path / "m.bitnet")
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        Engine.load(path, kv_cache="int8")
    eng = Engine.load(path)
    assert eng.new_cache(dtype="f16").dtype == "f16" and eng.new_cache().dtype == "f32"
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        eng.new_cache(dtype="bf16")


def test_fp16_bits_round_like_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * np.exp2(rng.integers(-30, 20, 200_000))).astype(np.float32)
    special = np.array([0.0, -0.0, 65504, 65519.996, 65520, -65520, 1e30, np.inf, -np.inf, 2.0**-24, 2.0**-25,
                        3 * 2.0**-25, 2.0**-14 - 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11], np.float32)
    x = np.concatenate([x, special])
    with np.errstate(over="ignore"):  # values past 65520 round to inf, as intended
        want = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_C.fp16_bits(x), want)
    assert np.isnan(_C.fp16_bits(np.array([np.nan], np.float32)).view(np.float16)).all()


@pytest.mark.skipif("amx" not in ISAS, reason="no AMX-INT8 here (CPUID amx_tile + amx_int8, and Linux's permission "
                                               "for tile data): the AMX kernels are tested where the CPU has them")
@pytest.mark.parametrize("packing", ["i2_b128", "t3_b160"])
def test_amx_batches_give_the_avx512_logits_bit_for_bit(tmp_path, packing):
    """Prefill and ragged batches of >= 16 rows run the AMX tiles; decode steps (1 row) the AVX-512
    kernels. Both are the same integer math and the rest is the same code: identical logits."""
    model = make_model(VARIANTS["subln-swiglu-gqa"])
    path = export(model, tmp_path / "m.bitnet", dense_dtype="F16", packing=packing)
    amx, avx = Engine.load(path, isa="amx"), Engine.load(path, isa="avx512")
    seqs = prompts(model.config.vocab_size, lengths=(40, 17, 33))
    for seq in seqs:
        np.testing.assert_array_equal(amx.forward(seq), avx.forward(seq))
    ca, cb = amx.new_cache(n_seqs=3), avx.new_cache(n_seqs=3)
    np.testing.assert_array_equal(amx.forward(seqs, cache=ca, last_only=True), avx.forward(seqs, cache=cb, last_only=True))
    toks = [[int(s[0])] for s in seqs]
    np.testing.assert_array_equal(amx.forward(toks, cache=ca, last_only=True), avx.forward(toks, cache=cb, last_only=True))


def test_prefetch_distance_override(tmp_path, monkeypatch):
    """BITNET_PREFETCH_BYTES tunes the memory-bound loops' software prefetch; it never changes a
    result, and a value that is not a byte count is a clear error."""
    model = make_model(VARIANTS["subln-swiglu-gqa"])
    path = export(model, tmp_path / "m.bitnet", dense_dtype="F16")
    seq = prompts(model.config.vocab_size, lengths=(12,))[0]
    monkeypatch.delenv("BITNET_PREFETCH_BYTES", raising=False)
    want = Engine.load(path).forward(seq)
    assert _C.prefetch_bytes() == 8192
    monkeypatch.setenv("BITNET_PREFETCH_BYTES", "0")
    np.testing.assert_array_equal(Engine.load(path).forward(seq), want)
    assert _C.prefetch_bytes() == 0
    monkeypatch.setenv("BITNET_PREFETCH_BYTES", "32768")
    np.testing.assert_array_equal(Engine.load(path).forward(seq), want)
    assert _C.prefetch_bytes() == 32768
    monkeypatch.setenv("BITNET_PREFETCH_BYTES", "8k")
    with pytest.raises(ValueError, match="BITNET_PREFETCH_BYTES must be a byte count >= 0.*'8k'"):
        Engine.load(path)
    monkeypatch.delenv("BITNET_PREFETCH_BYTES")
    Engine.load(path)
    assert _C.prefetch_bytes() == 8192
