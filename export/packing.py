"""Ternary packings of the .bitnet format (FORMAT.md section 5). numpy only, never torch.

A code c in {-1, 0, 1} is stored as the digit q = c + 1 in {0, 1, 2}; each row (out dimension) is
packed on its own, its `in` codes padded with c = 0 (q = 1).

    i2_b128  U8 (out, ceil(in/128)*32)   2 bits/weight. Byte j of 128-code block b holds the codes of
             elements 128b + 32k + j at bits 2k..2k+1, k = 0..3.
    t3_b160  U8 (out, ceil(in/160)*32)   1.6 bits/weight, read in place by the CPU kernels. Byte j of
             160-code block b holds the digits q_k of elements 160b + 32k + j, k = 0..4, as
             v = sum_k q_k * 3**(4-k) stored pre-scaled: byte = ceil(256 v / 243). Digit k is
             floor(3 u_k / 256) with u_0 = byte, u_(k+1) = 3 u_k mod 256. (Format version 2.)
    t3_b5    U8 (out, ceil(in/5))        1.6 bits/weight. Byte j = sum_k q[5j+k] * 3**k, k = 0..4.
                                         (Version 1; the runtime repacks it at load.)

Vectorized functions (`pack_*`, `unpack_*`) and scalar references (`*_ref`, plain loops, the
definition the C++ kernels are tested against) must agree bit for bit. Unpacking rejects invalid
digits and non-zero padding with ValueError.
"""

from __future__ import annotations

import numpy as np

I2_B128 = "i2_b128"
T3_B160 = "t3_b160"
T3_B5 = "t3_b5"
PACKINGS = (I2_B128, T3_B160, T3_B5)

I2_BLOCK = 128  # codes per block
I2_BLOCK_BYTES = 32  # bytes per block: 128 codes * 2 bits / 8
T3_GROUP = 5  # codes per byte
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
T3_MAX = 242  # 3**5 - 1
T160_BLOCK = 160  # codes per t3_b160 block
T160_BLOCK_BYTES = 32  # bytes per block: 5 codes per byte
# t3_b160 byte of each base-3 value v = 0..242 (q_0 most significant): ceil(256 v / 243)
T160_ENCODE = ((256 * np.arange(243) + 242) // 243).astype(np.uint8)
# and back: v of every byte (exact for the 243 encodings), and which bytes are encodings
T160_VALUE = ((243 * np.arange(256)) >> 8).astype(np.uint8)
T160_VALID = (243 * np.arange(256)) % 256 < 243
_POW3_MSF = np.array([81, 27, 9, 3, 1], dtype=np.uint8)  # digit k weighs 3**(4-k)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def packed_shape(out_features: int, in_features: int, packing: str) -> tuple[int, int]:
    if packing == I2_B128:
        return out_features, _ceil_div(in_features, I2_BLOCK) * I2_BLOCK_BYTES
    if packing == T3_B160:
        return out_features, _ceil_div(in_features, T160_BLOCK) * T160_BLOCK_BYTES
    if packing == T3_B5:
        return out_features, _ceil_div(in_features, T3_GROUP)
    raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")


def bits_per_weight(in_features: int, packing: str) -> float:
    """Storage bits per weight of one row, padding included (scales excluded)."""
    return 8.0 * packed_shape(1, in_features, packing)[1] / in_features


def _check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D (out, in) array, got shape {codes.shape}")
    if codes.shape[1] == 0:
        raise ValueError("codes must have at least one column")
    if codes.dtype.kind == "f":
        if not np.isin(codes, (-1.0, 0.0, 1.0)).all():
            raise ValueError("codes must be in {-1, 0, 1}")
    elif codes.dtype.kind in "iu":
        if codes.size and (codes.min() < -1 or codes.max() > 1):
            raise ValueError("codes must be in {-1, 0, 1}")
    else:
        raise ValueError(f"codes must be an integer or float array, got dtype {codes.dtype}")
    return codes.astype(np.int8)


def _check_packed(packed: np.ndarray, in_features: int, packing: str) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(f"packed weights must be a 2-D uint8 array, got {packed.dtype} {packed.shape}")
    if in_features <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")
    want = packed_shape(packed.shape[0], in_features, packing)
    if packed.shape != want:
        raise ValueError(f"{packing} weights for in_features={in_features} must have shape {want}, got {packed.shape}")
    return packed


# ---- i2_b128, vectorized ---------------------------------------------------------------------

def pack_i2_b128(codes: np.ndarray) -> np.ndarray:
    """(out, in) codes in {-1, 0, 1} -> (out, ceil(in/128)*32) uint8."""
    codes = _check_codes(codes)
    out, n = codes.shape
    nb = _ceil_div(n, I2_BLOCK)
    q = np.ones((out, nb * I2_BLOCK), dtype=np.uint8)  # padding: q = 1 (c = 0)
    q[:, :n] = codes + 1
    q = q.reshape(out, nb, 4, I2_BLOCK_BYTES)  # [row, block, k, j] = element 128b + 32k + j
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)  # (out, nb, 32)
    return np.ascontiguousarray(packed.reshape(out, nb * I2_BLOCK_BYTES))


def unpack_i2_b128(packed: np.ndarray, in_features: int) -> np.ndarray:
    """(out, ceil(in/128)*32) uint8 -> (out, in) int8 codes. ValueError on q = 3 or non-zero padding."""
    packed = _check_packed(packed, in_features, I2_B128)
    out, nbytes = packed.shape
    nb = nbytes // I2_BLOCK_BYTES
    p = packed.reshape(out, nb, 1, I2_BLOCK_BYTES)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = ((p >> shifts) & 3).reshape(out, nb * I2_BLOCK)  # (out, padded in)
    if (q == 3).any():
        row, col = np.argwhere(q == 3)[0]
        raise ValueError(f"invalid 2-bit code 3 at row {row}, element {col}")
    if (q[:, in_features:] != 1).any():
        raise ValueError("padding codes after the last element are not 0 (q must be 1)")
    return (q[:, :in_features].astype(np.int8) - 1)


# ---- t3_b5, vectorized -----------------------------------------------------------------------

def pack_t3_b5(codes: np.ndarray) -> np.ndarray:
    """(out, in) codes in {-1, 0, 1} -> (out, ceil(in/5)) uint8, base 3, least significant first."""
    codes = _check_codes(codes)
    out, n = codes.shape
    ng = _ceil_div(n, T3_GROUP)
    q = np.ones((out, ng * T3_GROUP), dtype=np.uint8)
    q[:, :n] = codes + 1
    q = q.reshape(out, ng, T3_GROUP)
    return np.ascontiguousarray((q * _POW3).sum(axis=2, dtype=np.uint8))  # max 242: no overflow


def unpack_t3_b5(packed: np.ndarray, in_features: int) -> np.ndarray:
    """(out, ceil(in/5)) uint8 -> (out, in) int8 codes. ValueError on bytes > 242 or non-zero padding."""
    packed = _check_packed(packed, in_features, T3_B5)
    out, ng = packed.shape
    if (packed > T3_MAX).any():
        row, col = np.argwhere(packed > T3_MAX)[0]
        raise ValueError(f"invalid base-3 byte {packed[row, col]} (> {T3_MAX}) at row {row}, byte {col}")
    q = (packed[:, :, None] // _POW3) % 3  # (out, ng, 5)
    q = q.reshape(out, ng * T3_GROUP)
    if (q[:, in_features:] != 1).any():
        raise ValueError("padding codes after the last element are not 0 (q must be 1)")
    return q[:, :in_features].astype(np.int8) - 1


# ---- t3_b160, vectorized ---------------------------------------------------------------------

def pack_t3_b160(codes: np.ndarray) -> np.ndarray:
    """(out, in) codes in {-1, 0, 1} -> (out, ceil(in/160)*32) uint8: five digits per byte, pre-scaled."""
    codes = _check_codes(codes)
    out, n = codes.shape
    nb = _ceil_div(n, T160_BLOCK)
    q = np.ones((out, nb * T160_BLOCK), dtype=np.uint8)  # padding: q = 1 (c = 0)
    q[:, :n] = codes + 1
    q = q.reshape(out, nb, 5, T160_BLOCK_BYTES)  # [row, block, k, j] = element 160b + 32k + j
    v = np.einsum("rbkj,k->rbj", q, _POW3_MSF, dtype=np.uint8)  # <= 242: no overflow
    return np.ascontiguousarray(T160_ENCODE[v].reshape(out, nb * T160_BLOCK_BYTES))


def unpack_t3_b160(packed: np.ndarray, in_features: int) -> np.ndarray:
    """(out, ceil(in/160)*32) uint8 -> (out, in) int8 codes. ValueError on a byte that is no encoding
    or non-zero padding."""
    packed = _check_packed(packed, in_features, T3_B160)
    bad = ~T160_VALID[packed]
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"invalid t3_b160 byte {packed[row, col]} at row {row}, byte {col} "
                         f"(bytes are ceil(256 v / 243) for v = 0..242)")
    out, nbytes = packed.shape
    nb = nbytes // T160_BLOCK_BYTES
    v = T160_VALUE[packed].reshape(out, nb, 1, T160_BLOCK_BYTES)
    q = (v // _POW3_MSF.reshape(1, 1, 5, 1)) % 3  # [row, block, k, j]
    q = q.reshape(out, nb * T160_BLOCK)
    if (q[:, in_features:] != 1).any():
        raise ValueError("padding codes after the last element are not 0 (q must be 1)")
    return q[:, :in_features].astype(np.int8) - 1


# ---- dispatch --------------------------------------------------------------------------------

def pack(codes: np.ndarray, packing: str) -> np.ndarray:
    if packing == I2_B128:
        return pack_i2_b128(codes)
    if packing == T3_B160:
        return pack_t3_b160(codes)
    if packing == T3_B5:
        return pack_t3_b5(codes)
    raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")


def unpack(packed: np.ndarray, in_features: int, packing: str) -> np.ndarray:
    if packing == I2_B128:
        return unpack_i2_b128(packed, in_features)
    if packing == T3_B160:
        return unpack_t3_b160(packed, in_features)
    if packing == T3_B5:
        return unpack_t3_b5(packed, in_features)
    raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")


# ---- scalar references: one element at a time, written to be read top to bottom ------------

def pack_i2_b128_ref(codes: np.ndarray) -> np.ndarray:
    codes = _check_codes(codes)
    out, n = codes.shape
    nb = (n + 127) // 128
    packed = np.zeros((out, nb * 32), dtype=np.uint8)
    for r in range(out):
        for b in range(nb):
            for j in range(32):
                byte = 0
                for k in range(4):
                    e = 128 * b + 32 * k + j
                    q = int(codes[r, e]) + 1 if e < n else 1
                    byte |= q << (2 * k)
                packed[r, 32 * b + j] = byte
    return packed


def unpack_i2_b128_ref(packed: np.ndarray, in_features: int) -> np.ndarray:
    packed = _check_packed(packed, in_features, I2_B128)
    out, nbytes = packed.shape
    codes = np.zeros((out, in_features), dtype=np.int8)
    for r in range(out):
        for b in range(nbytes // 32):
            for j in range(32):
                byte = int(packed[r, 32 * b + j])
                for k in range(4):
                    q = (byte >> (2 * k)) & 3
                    e = 128 * b + 32 * k + j
                    if q == 3:
                        raise ValueError(f"invalid 2-bit code 3 at row {r}, element {e}")
                    if e < in_features:
                        codes[r, e] = q - 1
                    elif q != 1:
                        raise ValueError("padding codes after the last element are not 0 (q must be 1)")
    return codes


def pack_t3_b5_ref(codes: np.ndarray) -> np.ndarray:
    codes = _check_codes(codes)
    out, n = codes.shape
    ng = (n + 4) // 5
    packed = np.zeros((out, ng), dtype=np.uint8)
    for r in range(out):
        for g in range(ng):
            byte, weight = 0, 1
            for k in range(5):
                e = 5 * g + k
                q = int(codes[r, e]) + 1 if e < n else 1
                byte += q * weight
                weight *= 3
            packed[r, g] = byte
    return packed


def unpack_t3_b5_ref(packed: np.ndarray, in_features: int) -> np.ndarray:
    packed = _check_packed(packed, in_features, T3_B5)
    out, ng = packed.shape
    codes = np.zeros((out, in_features), dtype=np.int8)
    for r in range(out):
        for g in range(ng):
            byte = int(packed[r, g])
            if byte > T3_MAX:
                raise ValueError(f"invalid base-3 byte {byte} (> {T3_MAX}) at row {r}, byte {g}")
            for k in range(5):
                q = byte % 3
                byte //= 3
                e = 5 * g + k
                if e < in_features:
                    codes[r, e] = q - 1
                elif q != 1:
                    raise ValueError("padding codes after the last element are not 0 (q must be 1)")
    return codes


def pack_t3_b160_ref(codes: np.ndarray) -> np.ndarray:
    codes = _check_codes(codes)
    out, n = codes.shape
    nb = (n + 159) // 160
    packed = np.zeros((out, nb * 32), dtype=np.uint8)
    for r in range(out):
        for b in range(nb):
            for j in range(32):
                v = 0
                for k in range(5):
                    e = 160 * b + 32 * k + j
                    q = int(codes[r, e]) + 1 if e < n else 1
                    v = 3 * v + q
                packed[r, 32 * b + j] = -(-256 * v // 243)  # ceil(256 v / 243)
    return packed


def unpack_t3_b160_ref(packed: np.ndarray, in_features: int) -> np.ndarray:
    packed = _check_packed(packed, in_features, T3_B160)
    out, nbytes = packed.shape
    codes = np.zeros((out, in_features), dtype=np.int8)
    for r in range(out):
        for b in range(nbytes // 32):
            for j in range(32):
                byte = int(packed[r, 32 * b + j])
                if (243 * byte) % 256 >= 243:
                    raise ValueError(f"invalid t3_b160 byte {byte} at row {r}, byte {32 * b + j} "
                                     f"(bytes are ceil(256 v / 243) for v = 0..242)")
                u = byte
                for k in range(5):
                    q = (3 * u) // 256  # digit k
                    u = (3 * u) % 256
                    e = 160 * b + 32 * k + j
                    if e < in_features:
                        codes[r, e] = q - 1
                    elif q != 1:
                        raise ValueError("padding codes after the last element are not 0 (q must be 1)")
    return codes
