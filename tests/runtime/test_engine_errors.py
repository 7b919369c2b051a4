"""Bad input to the engine: clear Python errors, never a crash. No torch needed."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bitnet_train.runtime import Engine, _C
from ternary_ref import pack_i2_b128, pack_t3_b160, random_codes

CFG = dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_layers=1, num_heads=4, num_kv_heads=2,
           max_seq_len=16, norm="subln", ffn="swiglu")


def random_tensors(cfg=CFG, seed=0, dense=np.float16, packing="i2_b128") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pack = pack_t3_b160 if packing == "t3_b160" else pack_i2_b128
    d, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_heads"]
    qd, kvd = cfg["num_heads"] * hd, cfg["num_kv_heads"] * hd
    t = {"embed_tokens.weight": rng.standard_normal((V, d)).astype(dense),
         "lm_head.weight": rng.standard_normal((V, d)).astype(dense) * 0.1,
         "norm.weight": np.ones(d, dense)}
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(d, dense)
        t[p + "post_attention_layernorm.weight"] = np.ones(d, dense)
        t[p + "self_attn.attn_sub_norm.weight"] = np.ones(qd, dense)
        t[p + "mlp.ffn_sub_norm.weight"] = np.ones(f, dense)
        for name, (o, n) in {"self_attn.q_proj": (qd, d), "self_attn.k_proj": (kvd, d), "self_attn.v_proj": (kvd, d),
                             "self_attn.o_proj": (d, qd), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
                             "mlp.down_proj": (d, f)}.items():
            t[p + name + ".qweight"] = pack(random_codes(rng, o, n))
            t[p + name + ".scale"] = np.array([0.05], np.float32)
    return t


def test_engine_imports_without_torch():
    import subprocess

    code = "import sys, bitnet_train.runtime as r; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_and_tensors_round_trip():
    eng = Engine(CFG, random_tensors(), {"eps": 1e-5, "packing": "i2_b128"}, threads=2)
    assert eng.isa() in _C.available_isas()
    assert eng.threads == 2
    out = eng.forward([[1, 2, 3], [4, 5, 6]])
    assert out.shape == (2, 3, 61) and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.__setitem__("norm.weight", np.ones(47, np.float16)), r"'norm.weight' has shape \(47,\); expected \(48,\)"),
    (lambda t: t.pop("lm_head.weight"), "missing tensor 'lm_head.weight'"),
    (lambda t: t.__setitem__("bogus", np.ones(3, np.float32)), "unexpected tensors .*'bogus'"),
    (lambda t: t.__setitem__("layers.0.mlp.up_proj.scale", np.array([-1.0], np.float32)), "expected a finite s_w > 0"),
    (lambda t: t.__setitem__("layers.0.mlp.up_proj.qweight", np.full((80, 32), 0xFF, np.uint8)), "invalid 2-bit code 3"),
    (lambda t: t.__setitem__("layers.0.mlp.up_proj.qweight", np.zeros((80, 64), np.uint8)), r"expected \(80, 32\)"),
    (lambda t: t.__setitem__("norm.weight", np.ones(48, np.float64)), "dtype float64"),
    (lambda t: t.__setitem__("layers.0.mlp.up_proj.weight", np.ones((80, 48), np.float32)), "both '.qweight'"),
])
def test_bad_tensors_are_value_errors(mutate, match):
    t = random_tensors()
    mutate(t)
    with pytest.raises(ValueError, match=match):
        Engine(CFG, t)


def test_t3_b160_tensors_are_used_in_place_and_checked():
    i2 = Engine(CFG, random_tensors(), {"eps": 1e-5, "packing": "i2_b128"})
    t = random_tensors(packing="t3_b160")
    t3 = Engine(CFG, t, {"eps": 1e-5, "packing": "t3_b160"})
    np.testing.assert_array_equal(t3.forward([[1, 2, 3, 4]]), i2.forward([[1, 2, 3, 4]]))  # same codes, same logits
    # 48 and 80 inputs: one 32-byte block a row either way; the byte counts agree
    assert t3.weight_bytes_per_token == i2.weight_bytes_per_token
    bad = dict(t)
    q = t["layers.0.mlp.down_proj.qweight"].copy()
    q[3, 5] = 178  # not an encoding
    bad["layers.0.mlp.down_proj.qweight"] = q
    with pytest.raises(ValueError, match=r"'layers.0.mlp.down_proj.qweight' holds the invalid t3_b160 byte 178 at byte 101"):
        Engine(CFG, bad, {"packing": "t3_b160"})
    with pytest.raises(ValueError, match="tensors must be packed i2_b128 or t3_b160, got 't3_b5'"):
        Engine(CFG, t, {"packing": "t3_b5"})


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        Engine({**CFG, "num_kv_heads": 3}, random_tensors())
    with pytest.raises(ValueError, match="norm must be"):
        Engine({**CFG, "norm": "layernorm"}, random_tensors())
    with pytest.raises(ValueError, match="unknown model config keys"):
        Engine({**CFG, "rope_scaling": 2}, random_tensors())


def test_bad_forward_calls():
    eng = Engine(CFG, random_tensors())
    with pytest.raises(ValueError, match="token id 61 at index 2 outside the vocabulary"):
        eng.forward([1, 2, 61])
    with pytest.raises(ValueError, match="token id -1"):
        eng.forward([-1])
    cache = eng.new_cache(n_seqs=1)
    eng.forward(list(range(10)), cache=cache)
    with pytest.raises(ValueError, match="holds 10 tokens; adding 7 exceeds the context of 16"):
        eng.forward(list(range(7)), cache=cache)
    assert cache.length(0) == 10  # a refused call changes nothing
    with pytest.raises(ValueError, match="out of range"):
        eng.forward([1], cache=cache, seq_ids=[3])
    with pytest.raises(ValueError, match="max_len = 17"):
        eng.new_cache(1, 17)
    with pytest.raises(ValueError, match="threads = 0"):
        eng.threads = 0
    with pytest.raises(ValueError, match="1-D or 2-D"):
        eng.forward(np.zeros((1, 2, 3), np.int64))
    cache.reset(0)
    assert cache.length(0) == 0


def test_forced_isa_missing_on_this_cpu(monkeypatch):
    missing = [isa for isa in ("avx2", "avx512", "amx") if isa not in _C.available_isas()]
    if not missing:
        pytest.skip("this CPU has every ISA")
    monkeypatch.setenv("BITNET_ISA", missing[-1])
    with pytest.raises(RuntimeError, match="not supported by this CPU"):
        Engine(CFG, random_tensors())
    with pytest.raises(RuntimeError, match="not supported by this CPU"):
        Engine(CFG, random_tensors(), isa=missing[-1])


def test_threads_do_not_change_results():
    t = random_tensors(seed=3)
    a = Engine(CFG, t, threads=1).forward(list(range(12)))
    b = Engine(CFG, t, threads=2).forward(list(range(12)))
    np.testing.assert_array_equal(a, b)


def test_a_context_of_a_million_tokens_sizes_nothing_until_a_cache_asks():
    """RoPE angles are formed per forward, so a 2^20-token context costs nothing at load; a KV cache
    larger than this machine's memory is refused with its size named, before any allocation."""
    import resource

    cfg = dict(CFG, max_seq_len=1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    eng = Engine(cfg, random_tensors(cfg), threads=1)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 * 1024  # KiB
    short = eng.forward([[3, 4, 5]], last_only=True)
    assert np.array_equal(short, Engine(CFG, random_tensors(CFG), threads=1).forward([[3, 4, 5]], last_only=True))
    with pytest.raises(ValueError, match=r"needs \d+ MiB; this machine has \d+ MiB"):
        eng.new_cache(65536, 1 << 20)
    with pytest.raises(ValueError, match="max_seq_len = 2097152; expected at most 1048576"):
        Engine(dict(CFG, max_seq_len=1 << 21), random_tensors(CFG), threads=1)
