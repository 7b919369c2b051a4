"""Every kernel ISA against the scalar reference and NumPy, on odd shapes."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_train.runtime import _C
from ternary_ref import (act_quant, from_bf16_bits, pack_i2_b128, pack_t3_b160, random_codes, ternary_linear,
                         to_bf16_bits)

ISAS = _C.available_isas()
SHAPES = [  # (out, in, rows)
    (1, 1, 1),
    (3, 31, 2),
    (17, 127, 3),
    (33, 128, 4),
    (64, 129, 5),
    (40, 300, 7),
    (96, 1000, 1),
    (8, 4096, 9),
    (37, 260, 16),  # 4 x 4 tiles with a leftover weight row
    (70, 384, 8),
    (6, 200, 11),
    # batches: the AMX kernels' 16-row tiles and 32-row panels, with partial tiles on every side
    (70, 2561, 33),
    (33, 700, 48),
    (100, 1536, 128),
]


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_rows_matches_numpy(isa):
    rng = np.random.default_rng(0)
    for n in (1, 7, 31, 32, 33, 127, 128, 129, 300):
        x = rng.standard_normal((5, n)).astype(np.float32) * rng.uniform(0.01, 100, (5, 1)).astype(np.float32)
        x[1] = 0.0  # all-zero row: s_x = 127 / eps, codes 0
        q, s, total = _C.quantize_rows(x, 1e-5, isa)
        ref_q, ref_s = act_quant(x)
        assert q.shape == (5, -(-n // 128) * 128)
        np.testing.assert_array_equal(q[:, :n], ref_q)
        assert not q[:, n:].any(), "padding must be zero"
        np.testing.assert_array_equal(s, ref_s)
        np.testing.assert_array_equal(total, ref_q.astype(np.int32).sum(axis=1))


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_rounds_half_to_even(isa):
    # max|x| = 127 -> s_x = 1 exactly, so x * s_x lands on the .5 ties themselves.
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, 4.5], np.float32)
    row = np.concatenate([ties, [127.0], ties, np.full(20, 5.5, np.float32)]).astype(np.float32)
    q, s, _ = _C.quantize_rows(row[None, :], 1e-5, isa)
    assert s[0] == 1.0
    n = row.size
    np.testing.assert_array_equal(q[0, :n], np.rint(row).astype(np.int8))
    assert list(q[0, :10]) == [0, 2, 2, 0, -2, -2, 126, -126, 4, 4]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("out,n,rows", SHAPES)
def test_ternary_matmul_matches_reference(isa, out, n, rows):
    rng = np.random.default_rng(out * 1000 + n)
    codes = random_codes(rng, out, n)
    codes[0] = 0  # an all-zero weight row
    x = rng.standard_normal((rows, n)).astype(np.float32)
    if rows > 2:
        x[1] = 0.0  # an all-zero activation row
    s_w = np.float32(0.0371)
    w = pack_i2_b128(codes)
    y = _C.ternary_matmul(w, s_w, x, 1e-5, isa, 2)
    y_scalar = _C.ternary_matmul(w, s_w, x, 1e-5, "scalar", 1)
    # integer accumulation + the same scale rule: bit-identical across ISAs and to NumPy
    np.testing.assert_array_equal(y, y_scalar)
    np.testing.assert_array_equal(y, ternary_linear(x, codes, s_w))


T3_SHAPES = [  # (out, in, rows): in not a multiple of 160, odd row counts, m = 1..17
    (1, 1, 1), (3, 31, 2), (17, 159, 3), (33, 160, 4), (9, 161, 5), (31, 319, 6), (5, 321, 7), (7, 1000, 8),
    (11, 481, 9), (3, 2600, 10), (37, 260, 11), (19, 700, 12), (13, 97, 13), (6, 1601, 14), (21, 333, 15),
    (4, 640, 16), (15, 170, 17),
    (70, 2561, 33), (33, 700, 48), (100, 1536, 128),  # batches (AMX tiles; 2561: a row ends inside a 64-code tile)
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("out,n,rows", T3_SHAPES)
def test_t3_b160_matmul_matches_reference_and_i2(isa, out, n, rows):
    rng = np.random.default_rng(out * 1000 + n + 7)
    codes = random_codes(rng, out, n)
    codes[0] = 0
    x = rng.standard_normal((rows, n)).astype(np.float32)
    if rows > 2:
        x[1] = 0.0
    s_w = np.float32(0.0371)
    w = pack_t3_b160(codes)
    y = _C.ternary_matmul(w, s_w, x, 1e-5, isa, 2, packing="t3_b160")
    # the scalar t3 kernel, the i2_b128 kernel on the same codes and NumPy: all bit-identical
    np.testing.assert_array_equal(y, _C.ternary_matmul(w, s_w, x, 1e-5, "scalar", 1, packing="t3_b160"))
    np.testing.assert_array_equal(y, _C.ternary_matmul(pack_i2_b128(codes), s_w, x, 1e-5, isa, 2))
    np.testing.assert_array_equal(y, ternary_linear(x, codes, s_w))


@pytest.mark.parametrize("isa", ISAS)
def test_t3_b160_extreme_activations(isa):
    n, out = 160 * 45 + 37, 5
    codes = np.ones((out, n), np.int8)
    codes[1] = -1
    codes[2, ::2] = -1
    x = np.full((3, n), 1.0, np.float32)
    x[1] = -1.0
    x[2, ::2] = -1.0
    y = _C.ternary_matmul(pack_t3_b160(codes), 1.0, x, 1e-5, isa, 1, packing="t3_b160")
    np.testing.assert_array_equal(y, ternary_linear(x, codes, 1.0))


def test_t3_b160_shape_and_packing_errors():
    x = np.ones((1, 170), np.float32)
    with pytest.raises(ValueError, match=r"wrong shape for t3_b160 and in_features 170; expected \(out, 64\)"):
        _C.ternary_matmul(np.zeros((2, 32), np.uint8), 1.0, x, packing="t3_b160")
    with pytest.raises(ValueError, match="unknown ternary packing 'i4'"):
        _C.ternary_matmul(np.zeros((2, 64), np.uint8), 1.0, x, packing="i4")
    with pytest.raises(ValueError, match="'t3_b5' is not read in place"):
        _C.ternary_matmul(np.zeros((2, 34), np.uint8), 1.0, x, packing="t3_b5")


@pytest.mark.parametrize("isa", ISAS)
def test_ternary_extreme_activations(isa):
    # |x| at the int8 limits on every element: the int16 pair sums of maddubs must not saturate.
    n, out = 4096 + 37, 5
    codes = np.ones((out, n), np.int8)
    codes[1] = -1
    codes[2, ::2] = -1
    x = np.full((3, n), 1.0, np.float32)
    x[1] = -1.0
    x[2, ::2] = -1.0
    w = pack_i2_b128(codes)
    y = _C.ternary_matmul(w, 1.0, x, 1e-5, isa, 1)
    np.testing.assert_array_equal(y, ternary_linear(x, codes, 1.0))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_dense_matmul(isa, dtype):
    rng = np.random.default_rng(1)
    for out, n, rows in [(1, 1, 1), (19, 33, 3), (40, 300, 6), (7, 17, 5)]:
        w32 = rng.standard_normal((out, n)).astype(np.float32)
        if dtype == "f32":
            w, wf = w32, w32
        elif dtype == "f16":
            w16 = w32.astype(np.float16)
            w, wf = w16.view(np.uint16), w16.astype(np.float32)
        else:
            w = to_bf16_bits(w32)
            wf = from_bf16_bits(w)
        x = rng.standard_normal((rows, n)).astype(np.float32)
        y = _C.dense_matmul(w, dtype, x, isa, 2)
        ref = x.astype(np.float64) @ wf.astype(np.float64).T
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.sqrt(n))


def test_unknown_isa_is_a_value_error():
    with pytest.raises(ValueError, match="unknown ISA 'sse'"):
        _C.resolve_isa("sse")


def test_forced_isa_the_cpu_lacks_is_a_clear_error(monkeypatch):
    missing = [isa for isa in ("avx2", "avx512", "amx") if isa not in ISAS]
    if not missing:
        pytest.skip("this CPU and build have every ISA")
    monkeypatch.setenv("BITNET_ISA", missing[-1])
    with pytest.raises(RuntimeError, match=f"ISA '{missing[-1]}' \\(BITNET_ISA\\) is not"):
        _C.resolve_isa()
    with pytest.raises(RuntimeError, match="not"):
        _C.ternary_matmul(pack_i2_b128(np.zeros((1, 8), np.int8)), 1.0, np.ones((1, 8), np.float32))


def test_env_override_selects_scalar(monkeypatch):
    monkeypatch.setenv("BITNET_ISA", "scalar")
    assert _C.resolve_isa() == "scalar"
    assert _C.resolve_isa("auto") == "scalar"
