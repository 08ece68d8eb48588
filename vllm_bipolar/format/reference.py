"""Reference bipolar matmuls (pure torch): what every kernel must reproduce.

* :func:`bitplane_matmul` computes a WpAq product from the packed bit planes with the
  AND-popcount identity of DESIGN.md section 2, in exact integer arithmetic per group, then
  applies scales and offsets. It is slow and exists to define the result.
* :func:`bipolar_linear` is the runtime path of the CPU backend: dequantize the planes (and
  fake-quantize the activations when a_bits < 16), then one float matmul.
"""

from __future__ import annotations

import torch

from .packing import WORD_BITS, num_words, pack_codes, popcount32, unpack_codes
from .quantize import (dequantize, effective_group, fake_quantize_activations, num_groups,
                       quantize_activations)
from .spec import A16


def _group_word_sums(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Sum [..., W] per-word counts into [..., G] per-group counts (groups are whole words)."""
    wpg = effective_group(k, group_size) // WORD_BITS if group_size != -1 else num_words(k)
    w = t.shape[-1]
    ng = num_groups(k, group_size)
    t = torch.nn.functional.pad(t, (0, ng * wpg - w))
    return t.view(*t.shape[:-1], ng, wpg).sum(-1)


def group_lengths(k: int, group_size: int) -> torch.Tensor:
    """Number of real (unpadded) input channels in each group: [G] int64."""
    g = effective_group(k, group_size)
    ng = num_groups(k, group_size)
    lens = torch.full((ng,), g, dtype=torch.int64)
    lens[-1] = k - g * (ng - 1)
    return lens


def bitplane_integer_products(a_planes: torch.Tensor, w_planes: torch.Tensor, k: int,
                              group_size: int) -> torch.Tensor:
    """Per-group integer dot products of bipolar values from bit planes.

    a_planes int32 [q, M, W] (activations), w_planes int32 [p, N, W] (weights).
    Returns int64 [M, N, G]: sum over k in group g of v_x[m, k] * v_w[n, k], computed as
        sum_i sum_j 2^(i+j) * (4 popc(A_j & B_i) - 2 popc(A_j) - 2 popc(B_i) + K_g).
    """
    q, m, _ = a_planes.shape
    p, n, _ = w_planes.shape
    kg = group_lengths(k, group_size).to(a_planes.device)
    pa = _group_word_sums(popcount32(a_planes), k, group_size)  # [q, M, G]
    pb = _group_word_sums(popcount32(w_planes), k, group_size)  # [p, N, G]
    out = torch.zeros((m, n, kg.numel()), dtype=torch.int64, device=a_planes.device)
    for j in range(q):
        for i in range(p):
            both = popcount32(a_planes[j][:, None, :] & w_planes[i][None, :, :])  # [M, N, W]
            pab = _group_word_sums(both, k, group_size)  # [M, N, G]
            out += (1 << (i + j)) * (4 * pab - 2 * pa[j][:, None, :] - 2 * pb[i][None, :, :] + kg)
    return out


def bitplane_value_sums(a_planes: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Per-group sums of bipolar values from planes: sum_j 2^j (2 popc(A_j, g) - K_g) -> int64 [M, G]."""
    kg = group_lengths(k, group_size).to(a_planes.device)
    pa = _group_word_sums(popcount32(a_planes), k, group_size)
    return sum((1 << j) * (2 * pa[j] - kg) for j in range(a_planes.shape[0]))


def bitplane_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, k: int, group_size: int, a_bits: int) -> torch.Tensor:
    """Reference W(p)A(q) product from bit planes: x [M, K] (float) -> float64 [M, N].

    The activations are quantized per token to ``a_bits`` bipolar values and packed like the
    weights; y[m, n] = s_x[m] * sum_g (s[n, g] * I[m, n, g] + z[n, g] * S[m, g]) with I the
    integer products and S the per-group sums of activation values.
    """
    codes, sx = quantize_activations(x, a_bits)
    a_planes = pack_codes(codes, a_bits)
    ints = bitplane_integer_products(a_planes, qweight, k, group_size)
    acc = (ints.to(torch.float64) * scales.to(torch.float64)[None]).sum(-1)
    if zeros is not None:
        vs = bitplane_value_sums(a_planes, k, group_size).to(torch.float64)  # [M, G]
        acc = acc + vs @ zeros.to(torch.float64).T
    return acc * sx.to(torch.float64)[:, None]


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      k: int, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed planes -> dense weight [N, K] (z + s * v) in ``dtype``."""
    return dequantize(unpack_codes(qweight, k), scales, zeros, qweight.shape[0], group_size, dtype)


# Weights dequantized per step of bipolar_linear (1M: 4 MB of fp32 intermediates). On 2 CPU cores, a
# 4096 x 4096 W4 layer took 83 ms dequantized whole and 29 ms in blocks of 256 rows (2^20 / K).
DEQUANT_CHUNK_ELEMS = 1 << 20


def row_blocks(n: int, k: int) -> list[slice]:
    """Output-row slices of about DEQUANT_CHUNK_ELEMS weights each, covering 0..n."""
    rows = max(1, DEQUANT_CHUNK_ELEMS // max(k, 1))
    return [slice(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def dequantize_packed_rows(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, k: int,
                           group_size: int, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_packed of output rows ``rows`` only (bit-identical to those rows of the whole)."""
    return dequantize_packed(qweight[:, rows], scales[rows], None if zeros is None else zeros[rows], k, group_size,
                             dtype)


def dequantize_packed_blocked(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, k: int,
                              group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_packed into one [N, K] ``dtype`` tensor, a row block at a time: the float32 intermediates
    stay at a block's size (about 10 bytes per weight of a whole layer otherwise)."""
    n = qweight.shape[1]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    for rows in row_blocks(n, k):
        out[rows] = dequantize_packed_rows(qweight, scales, zeros, k, group_size, rows, dtype)
    return out


def bipolar_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bias: torch.Tensor | None, k: int, group_size: int,
                   a_bits: int) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a bipolar layer, in x's dtype: the pure-torch runtime path.

    x [..., K]; with a_bits < 16 the activations are quantized per token first (dynamic), so the
    result is the one a WpAq kernel computes, up to float rounding of the accumulation.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if a_bits != A16:
        x2 = fake_quantize_activations(x2, a_bits)
    n = qweight.shape[1]
    blocks = row_blocks(n, k)
    if len(blocks) == 1:
        y = torch.nn.functional.linear(x2, dequantize_packed(qweight, scales, zeros, k, group_size, x.dtype), bias)
    else:  # a block of output rows at a time: the dense block stays in cache, and no full dense copy is made
        y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
        for sl in blocks:
            w = dequantize_packed_rows(qweight, scales, zeros, k, group_size, sl, x.dtype)
            y[:, sl] = torch.nn.functional.linear(x2, w, None if bias is None else bias[sl])
    return y.reshape(*lead, y.shape[-1])
