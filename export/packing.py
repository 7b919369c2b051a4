"""Ternary packings of the .bitnet format (FORMAT.md section 5). numpy only, never torch.

A code c in {-1, 0, 1} is stored as the digit q = c + 1 in {0, 1, 2}; each row (out dimension) is
packed on its own, its `in` codes padded with c = 0 (q = 1).

    i2_b128  U8 (out, ceil(in/128)*32)   2 bits/weight. Byte j of 128-code block b holds the codes of
             elements 128b + 32k + j at bits 2k..2k+1, k = 0..3.
    t3_b5    U8 (out, ceil(in/5))        1.6 bits/weight. Byte j = sum_k q[5j+k] * 3**k, k = 0..4.

Vectorized functions (`pack_*`, `unpack_*`) and scalar references (`*_ref`, plain loops, the
definition the C++ kernels are tested against) must agree bit for bit. Unpacking rejects invalid
digits and non-zero padding with ValueError.
"""

from __future__ import annotations

import numpy as np

I2_B128 = "i2_b128"
T3_B5 = "t3_b5"
PACKINGS = (I2_B128, T3_B5)

I2_BLOCK = 128  # codes per block
I2_BLOCK_BYTES = 32  # bytes per block: 128 codes * 2 bits / 8
T3_GROUP = 5  # codes per byte
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
T3_MAX = 242  # 3**5 - 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def packed_shape(out_features: int, in_features: int, packing: str) -> tuple[int, int]:
    if packing == I2_B128:
        return out_features, _ceil_div(in_features, I2_BLOCK) * I2_BLOCK_BYTES
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


# ---- dispatch --------------------------------------------------------------------------------

def pack(codes: np.ndarray, packing: str) -> np.ndarray:
    if packing == I2_B128:
        return pack_i2_b128(codes)
    if packing == T3_B5:
        return pack_t3_b5(codes)
    raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")


def unpack(packed: np.ndarray, in_features: int, packing: str) -> np.ndarray:
    if packing == I2_B128:
        return unpack_i2_b128(packed, in_features)
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
