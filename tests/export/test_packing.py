"""Packing round trips, the worked example of FORMAT.md, and vectorized == scalar reference."""

import numpy as np
import pytest

from bitnet_train.export import packing as P

PACKINGS = [P.I2_B128, P.T3_B160, P.T3_B5]
SHAPES = [(1, 1), (3, 5), (2, 127), (4, 128), (5, 129), (3, 159), (4, 160), (2, 161), (7, 255), (3, 256), (2, 333),
          (3, 481), (1, 1000)]


def random_codes(shape, seed=0):
    return np.random.default_rng(seed).integers(-1, 2, size=shape).astype(np.int8)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_random(packing, shape):
    codes = random_codes(shape, seed=shape[0] * 1000 + shape[1])
    packed = P.pack(codes, packing)
    assert packed.dtype == np.uint8
    assert packed.shape == P.packed_shape(*shape, packing)
    np.testing.assert_array_equal(P.unpack(packed, shape[1], packing), codes)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("value", [-1, 0, 1])
@pytest.mark.parametrize("shape", [(3, 7), (2, 128), (4, 300)])
def test_round_trip_constant(packing, value, shape):
    codes = np.full(shape, value, dtype=np.int8)
    packed = P.pack(codes, packing)
    np.testing.assert_array_equal(P.unpack(packed, shape[1], packing), codes)


@pytest.mark.parametrize("shape", [(3, 5), (2, 127), (5, 129), (3, 159), (2, 161), (2, 333), (1, 1), (2, 700)])
def test_vectorized_equals_reference(shape):
    codes = random_codes(shape, seed=7)
    i2 = P.pack_i2_b128(codes)
    np.testing.assert_array_equal(i2, P.pack_i2_b128_ref(codes))
    np.testing.assert_array_equal(P.unpack_i2_b128_ref(i2, shape[1]), codes)
    t160 = P.pack_t3_b160(codes)
    np.testing.assert_array_equal(t160, P.pack_t3_b160_ref(codes))
    np.testing.assert_array_equal(P.unpack_t3_b160_ref(t160, shape[1]), codes)
    np.testing.assert_array_equal(P.unpack_t3_b160(P.pack_t3_b160_ref(codes), shape[1]), codes)
    t3 = P.pack_t3_b5(codes)
    np.testing.assert_array_equal(t3, P.pack_t3_b5_ref(codes))
    np.testing.assert_array_equal(P.unpack_t3_b5_ref(t3, shape[1]), codes)


def test_worked_example_from_format_md():
    codes = np.array([[1, -1, 0, 0, 1]], dtype=np.int8)
    i2 = P.pack_i2_b128(codes)
    assert i2.shape == (1, 32)
    assert list(i2[0, :5]) == [0x56, 0x54, 0x55, 0x55, 0x56]
    assert (i2[0, 5:] == 0x55).all()
    assert P.pack_t3_b5(codes).tolist() == [[200]]
    t160 = P.pack_t3_b160(codes)
    assert t160.shape == (1, 32)
    assert list(t160[0, :5]) == [0xD5, 0x2B, 0x80, 0x80, 0xD5]
    assert (t160[0, 5:] == 0x80).all()
    assert (P.pack_i2_b128(np.zeros((2, 200), np.int8)) == 0x55).all()
    assert (P.pack_t3_b160(np.zeros((2, 200), np.int8)) == 0x80).all()
    assert (P.pack_t3_b5(np.zeros((2, 10), np.int8)) == 121).all()


def test_t3_b160_byte_code_from_the_definition():
    # byte = ceil(256 v / 243) for v = sum_k q_k 3^(4-k); digit k = floor(3 u_k / 256), u_(k+1) = 3 u_k mod 256
    encodings = {}
    for v in range(243):
        q = [(v // 3 ** (4 - k)) % 3 for k in range(5)]
        byte = -(-256 * v // 243)
        u = byte
        for k in range(5):
            assert (3 * u) // 256 == q[k] == int(u > 85) + int(u > 170), (v, k)
            u = (3 * u) % 256
        encodings[byte] = v
    assert len(encodings) == 243 and max(encodings) == 255 and min(encodings) == 0
    invalid = sorted(set(range(256)) - set(encodings))
    assert invalid == [1, 20, 40, 60, 79, 99, 119, 138, 158, 178, 197, 217, 237]
    assert P.T160_ENCODE.tolist() == sorted(encodings)
    assert [b for b in range(256) if not P.T160_VALID[b]] == invalid
    assert all(P.T160_VALUE[b] == v for b, v in encodings.items())


def test_t3_b160_positions_from_the_definition():
    # element 160b + 32k + j is digit k (weight 3^(4-k)) of byte 32b + j: check every position of 2 blocks
    n = 320
    for e in range(n):
        codes = np.zeros((1, n), np.int8)
        codes[0, e] = 1  # q = 2 where every other digit is 1
        b, k, j = e // 160, (e % 160) // 32, e % 32
        want = np.full(64, 0x80, np.uint8)
        want[32 * b + j] = -(-256 * (121 + 3 ** (4 - k)) // 243)
        np.testing.assert_array_equal(P.pack_t3_b160(codes)[0], want)


def test_i2_bit_positions_from_the_definition():
    # element 128b + 32k + j sits in byte 32b + j at bits 2k..2k+1: check every position of 2 blocks
    n = 256
    for e in range(n):
        codes = np.zeros((1, n), np.int8)
        codes[0, e] = 1  # q = 2 = 0b10
        b, k, j = e // 128, (e % 128) // 32, e % 32
        want = np.full(64, 0x55, np.uint8)
        want[32 * b + j] = (0x55 & ~(3 << 2 * k)) | (2 << 2 * k)
        np.testing.assert_array_equal(P.pack_i2_b128(codes)[0], want)


def test_bits_per_weight():
    assert P.bits_per_weight(256, P.I2_B128) == 2.0
    assert P.bits_per_weight(64, P.I2_B128) == 4.0
    assert P.bits_per_weight(500, P.T3_B5) == 1.6
    assert P.bits_per_weight(320, P.T3_B160) == 1.6
    # the shapes the layout is judged on (hidden, ffn), padding included: all <= 1.67
    assert round(P.bits_per_weight(2560, P.T3_B160), 4) == 1.6      # bitnet-2b hidden
    assert round(P.bits_per_weight(6912, P.T3_B160), 4) == 1.6296   # bitnet-2b ffn
    assert round(P.bits_per_weight(8192, P.T3_B160), 4) == 1.625    # 100b hidden
    assert round(P.bits_per_weight(45568, P.T3_B160), 4) == 1.6011  # 100b ffn


@pytest.mark.parametrize("unpack", [P.unpack_i2_b128, P.unpack_i2_b128_ref])
def test_i2_rejects_code_3_and_dirty_padding(unpack):
    packed = P.pack_i2_b128(random_codes((2, 100)))
    bad = packed.copy()
    bad[1, 3] |= 0b11
    with pytest.raises(ValueError, match="invalid 2-bit code"):
        unpack(bad, 100)
    bad = packed.copy()
    bad[0, 31] = (packed[0, 31] & 0x3F) | (2 << 6)  # element 127 is padding; set it to q = 2
    with pytest.raises(ValueError, match="padding"):
        unpack(bad, 100)


@pytest.mark.parametrize("unpack", [P.unpack_t3_b5, P.unpack_t3_b5_ref])
def test_t3_rejects_invalid_bytes_and_dirty_padding(unpack):
    packed = P.pack_t3_b5(random_codes((2, 12)))
    bad = packed.copy()
    bad[0, 1] = 243
    with pytest.raises(ValueError, match="invalid base-3 byte"):
        unpack(bad, 12)
    bad = packed.copy()
    bad[1, 2] = 2 + 3 * 1 + 9 * 0 + 27 * 1 + 81 * 1  # elements 12..14 are padding; digit 2 -> 0
    with pytest.raises(ValueError, match="padding"):
        unpack(bad, 12)


@pytest.mark.parametrize("unpack", [P.unpack_t3_b160, P.unpack_t3_b160_ref])
def test_t3_b160_rejects_invalid_bytes_and_dirty_padding(unpack):
    packed = P.pack_t3_b160(random_codes((2, 170)))
    for byte in (1, 20, 237):  # not an encoding
        bad = packed.copy()
        bad[1, 40] = byte
        with pytest.raises(ValueError, match=f"invalid t3_b160 byte {byte} at row 1, byte 40"):
            unpack(bad, 170)
    bad = packed.copy()
    bad[0, 63] = P.T160_ENCODE[81 * 1 + 27 * 1 + 9 * 1 + 3 * 1 + 1 * 2]  # element 160 + 128 + 31 (padding) -> q = 2
    with pytest.raises(ValueError, match="padding"):
        unpack(bad, 170)


def test_rejects_bad_codes_and_shapes():
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        P.pack_i2_b128(np.array([[2, 0]]))
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        P.pack_t3_b5(np.array([[0.5, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        P.pack_i2_b128(np.zeros(5, np.int8))
    with pytest.raises(ValueError, match="shape"):
        P.unpack_i2_b128(np.zeros((2, 31), np.uint8), 100)
    with pytest.raises(ValueError, match="unknown packing"):
        P.pack(np.zeros((1, 1), np.int8), "i4")


def test_packing_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; import bitnet_train.export.packing; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
