"""Bipolar codes and their bit-plane packing (checkpoint format version 1, DESIGN.md section 4).

An n-bit bipolar code c in [0, 2^n - 1] has bits b_0..b_{n-1}; bit i stands for 2^i * (+1 or -1),
so its value is v = sum_i 2^i (2 b_i - 1) = 2c - (2^n - 1): the odd integers in
[-(2^n - 1), 2^n - 1].

Packed layout: ``qweight`` int32 [bits, N, ceil(K/32)]; bit j of word w of plane p, row n is bit
p of the code of W[n, 32 w + j] (little-endian along K). Padding bits past K are 0.
"""

from __future__ import annotations

import torch

WORD_BITS = 32
_ROW_CHUNK = 8192  # rows packed per step: bounds the temporaries to ~8 MiB per 1k columns


def max_level(bits: int) -> int:
    """Largest bipolar value of ``bits`` bits: 2^bits - 1 (values are odd in [-L, L])."""
    return (1 << bits) - 1


def codes_to_values(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Code c -> odd integer value 2c - (2^bits - 1), as int32."""
    return codes.to(torch.int32) * 2 - max_level(bits)


def values_to_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Odd integer value v -> code (v + 2^bits - 1) / 2, as uint8. ``values`` must be on the grid."""
    return torch.div(values.to(torch.int32) + max_level(bits), 2, rounding_mode="floor").to(torch.uint8)


def num_words(k: int) -> int:
    return (k + WORD_BITS - 1) // WORD_BITS


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [N, K] (integers in [0, 2^bits)) into bit planes int32 [bits, N, ceil(K/32)].

    Built a byte at a time (8 codes -> one uint8 per plane), then the bytes of 4 consecutive
    positions are reinterpreted as one little-endian int32 word: bit j of the word is column 32w+j.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_codes expects codes of shape [N, K], got {tuple(codes.shape)}")
    n, k = codes.shape
    w = num_words(k)
    out = torch.empty((bits, n, w), dtype=torch.int32, device=codes.device)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device)).to(torch.uint8)
    for r0 in range(0, n, _ROW_CHUNK):
        c = codes[r0:r0 + _ROW_CHUNK].to(torch.uint8)
        c = torch.nn.functional.pad(c, (0, w * WORD_BITS - k)).view(-1, w * 4, 8)
        for p in range(bits):
            by = (((c >> p) & 1) * weights).sum(-1, dtype=torch.uint8)  # [rows, 4W]: at most 255
            out[p, r0:r0 + _ROW_CHUNK] = by.view(torch.int32)
    return out


def _byte_spread_lut(device: torch.device) -> torch.Tensor:
    """[256] int64: byte value b spread to 8 bytes, byte j (little-endian) = bit j of b."""
    b = torch.arange(256, dtype=torch.int64, device=device)
    j = torch.arange(8, dtype=torch.int64, device=device)
    return (((b[:, None] >> j) & 1) << (8 * j)).sum(1)


_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def _spread_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> int64 [..., 4 W]: one int64 per byte of the words, holding its 8 bits as 8 bytes."""
    lut = _LUT_CACHE.get(words.device)
    if lut is None:
        lut = _LUT_CACHE[words.device] = _byte_spread_lut(words.device)
    return lut[words.contiguous().view(torch.uint8).to(torch.int64)]


def unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [..., ceil(K/32)] -> uint8 0/1 [..., K] (bit j of word w -> column 32 w + j).

    Goes through bytes and a 256-entry table: one gather per byte (8 columns at once, as the 8 bytes
    of an int64) instead of 32 shifts per word. The byte views rely on little-endian storage (x86-64,
    AArch64, CUDA).
    """
    return _spread_bytes(words).view(torch.uint8)[..., :k]


def unpack_codes(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Bit planes int32 [bits, N, ceil(K/32)] -> codes uint8 [N, K].

    The planes' spread bytes are combined 8 columns per int64 operation (plane p shifted by p: each
    byte stays below 256, so no carry crosses into the next column).
    """
    if qweight.dim() != 3 or qweight.dtype != torch.int32:
        raise ValueError(f"unpack_codes expects int32 [bits, N, words], got {qweight.dtype} {tuple(qweight.shape)}")
    codes = _spread_bytes(qweight[0])
    for p in range(1, qweight.shape[0]):
        codes |= _spread_bytes(qweight[p]) << p
    return codes.view(torch.uint8)[..., :k]


def popcount32(x: torch.Tensor) -> torch.Tensor:
    """Per-element population count of int32 words (as int64), by SWAR on the unsigned value."""
    v = x.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24
