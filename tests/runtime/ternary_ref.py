"""NumPy references for the runtime tests: i2_b128 and t3_b160 packing and the quantization contract.

Written from the layout and formulas (export FORMAT / DESIGN.md), not from the engine's code.
"""

from __future__ import annotations

import numpy as np

BLOCK = 128  # codes per i2_b128 block (32 bytes)


def pack_i2_b128(codes: np.ndarray) -> np.ndarray:
    """(out, in) ternary codes in {-1, 0, 1} -> (out, ceil(in/128)*32) uint8.

    q = c + 1 in 2 bits; rows padded with c = 0; byte j of block b holds element b*128 + 32k + j
    at bits 2k..2k+1.
    """
    out, n = codes.shape
    nb = -(-n // BLOCK)
    q = np.ones((out, nb * BLOCK), np.uint8)
    q[:, :n] = (codes.astype(np.int16) + 1).astype(np.uint8)
    q = q.reshape(out, nb, 4, 32)  # [row, block, k, j]
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return np.ascontiguousarray(packed.reshape(out, nb * 32))


def pack_t3_b160(codes: np.ndarray) -> np.ndarray:
    """(out, in) ternary codes -> (out, ceil(in/160)*32) uint8.

    q = c + 1; rows padded with c = 0; byte j of block b holds the digits of elements b*160 + 32k + j
    (k = 0..4) as v = sum_k q_k 3^(4-k), stored as ceil(256 v / 243).
    """
    out, n = codes.shape
    nb = -(-n // 160)
    q = np.ones((out, nb * 160), np.int64)
    q[:, :n] = codes.astype(np.int64) + 1
    q = q.reshape(out, nb, 5, 32)  # [row, block, k, j]
    v = sum(q[:, :, k] * 3 ** (4 - k) for k in range(5))
    return np.ascontiguousarray(((256 * v + 242) // 243).astype(np.uint8).reshape(out, nb * 32))


def act_quant(x: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Per-row: s_x = 127 / max(max|x|, eps), codes = clamp(rint(x * s_x), -128, 127) (fp32, ties to even)."""
    x = np.asarray(x, np.float32)
    s = np.float32(127.0) / np.maximum(np.abs(x).max(axis=-1), np.float32(eps))
    codes = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.int8)
    return codes, s.astype(np.float32)


def ternary_linear(x: np.ndarray, codes: np.ndarray, s_w: float, eps: float = 1e-5) -> np.ndarray:
    """y = (xq @ c^T, exact integers) * (s_w / s_x), fp32."""
    xq, s_x = act_quant(x, eps)
    acc = xq.astype(np.int64) @ codes.astype(np.int64).T
    return acc.astype(np.float32) * (np.float32(s_w) / s_x)[:, None]


def random_codes(rng: np.random.Generator, out: int, n: int) -> np.ndarray:
    return rng.integers(-1, 2, size=(out, n)).astype(np.int8)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)
