"""The weight layout of the weight-only tensor-core kernels (csrc/bipolar_gemm_a16.cuh), built at load.

Checkpoint format version 1 stores bit planes (``qweight`` int32 [bits, N, ceil(K/32)]). The
weight-only kernels want each thread's codes next to each other, in the order of its mma.sync
m16n8k16 B fragments, so :func:`repack` rearranges them once, in ``process_weights_after_loading``:

``qweight`` int32 ``[Np/16, Kp/64, 32*bits]`` (Np = N rounded up to 64, Kp = K rounded up to 64)
    One block = 16 rows x 64 channels. Lane ``l`` of a warp owns rows ``n = 8h + l//4`` (h = 0, 1)
    and channels ``k = 16s + 8r + 2(l%4) + e`` (k-step s = 0..3, register r = 0..1, pair half e), i.e.
    16 element pairs ``p = 4s + 2h + r``. The code bits are split into parts of width 8, 4, 2 or 1
    (widest first: 7 = 4+2+1, 3 = 2+1, 8 = 8); a part of width w packs 16/w pairs per word, pair j at
    bits ``[w*j, w*j+w)`` (e = 0) and ``[16+w*j, ...)`` (e = 1). Words are ordered
    ``[part][lane][w words]``; the part of width w with bit offset o in the code starts at word 32*o.
``scales`` act dtype ``[Gp, Np, 2]``
    ``(s, z)`` per (group, row) (z = 0 when symmetric): ``W = z + s*(2c - L)``, which the mid-batch and
    dequantize kernels compute as one FMA on the exact value ``v = 2c - L``, i.e. rounded once, like the
    reference; the decode kernel applies ``s`` and ``z`` in fp32 after the mma (W exactly).
    Groups are ``2**group_shift`` channels: a group size that is not a power of two
    is expanded to its largest power-of-two divisor; group_size -1 becomes group_shift 30 (one group).

Padding rows and groups hold ``s = z = 0`` (exactly zero); padding channels of the last real group
hold code 0 and meet zero activations (the kernels zero-fill x past K), so they never contribute.
"""

from __future__ import annotations

import torch

from ..format.packing import max_level, unpack_codes

BLOCK_N = 16
BLOCK_K = 64
PAD_N = 64
NO_GROUPS_SHIFT = 30


def round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def parts(bits: int) -> list[tuple[int, int]]:
    """(width, bit offset) of each part of a ``bits``-bit code, widest first."""
    if bits == 8:
        return [(8, 0)]
    out, offset = [], 0
    for width in (4, 2, 1):
        if bits & width:
            out.append((width, offset))
            offset += width
    return out


def group_shift(group_size: int) -> int:
    """log2 of the group length the kernels use for ``group_size`` (30: one group per row)."""
    if group_size == -1:
        return NO_GROUPS_SHIFT
    low = group_size & -group_size  # largest power-of-two divisor (group sizes are multiples of 32)
    return low.bit_length() - 1


def _fragment_order(codes: torch.Tensor) -> torch.Tensor:
    """codes [Np, Kp] -> [Np/16, Kp/64, 32 lanes, 16 pairs, 2] in the B-fragment order above."""
    np_, kp = codes.shape
    # n = 16 nb + 8 h + g ; k = 64 kb + 16 s + 8 r + 2 t + e ; lane = 4 g + t ; pair = 4 s + 2 h + r
    c = codes.view(np_ // 16, 2, 8, kp // 64, 4, 2, 4, 2)  # nb h g kb s r t e
    c = c.permute(0, 3, 2, 6, 4, 1, 5, 7)  # nb kb g t s h r e
    return c.reshape(np_ // 16, kp // 64, 32, 16, 2)


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, k: int, group_size: int
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Checkpoint tensors (format version 1) -> (qweight, scales, group_shift) of the kernel layout."""
    bits, n, _ = qweight.shape
    np_, kp = round_up(n, PAD_N), round_up(k, BLOCK_K)
    codes = torch.zeros(np_, kp, dtype=torch.int32, device=qweight.device)
    codes[:n, :k] = unpack_codes(qweight, k).to(torch.int32)
    frag = _fragment_order(codes)  # [NB, KB, 32, 16, 2]
    words = []
    for width, offset in parts(bits):
        per_word = 16 // width
        pv = (frag >> offset) & ((1 << width) - 1)  # [NB, KB, 32, 16, 2]
        pv = pv.view(*pv.shape[:3], width, per_word, 2).to(torch.int64)
        pos = torch.arange(per_word, device=pv.device, dtype=torch.int64) * width
        word = ((pv[..., 0] << pos) | (pv[..., 1] << (pos + 16))).sum(-1)  # bits are disjoint: sum == or
        words.append(word.to(torch.int32).reshape(*word.shape[:2], 32 * width))  # [NB, KB, lane*w]
    packed = torch.cat(words, dim=-1).contiguous()  # [NB, KB, 32*bits]; words of uint32 stored as int32

    shift = group_shift(group_size)
    glen = 1 << shift
    gp = 1 if shift == NO_GROUPS_SHIFT else (kp + glen - 1) // glen
    dtype = scales.dtype
    s = scales.to(torch.float32)
    z = zeros.to(torch.float32) if zeros is not None else torch.zeros_like(s)
    if shift != NO_GROUPS_SHIFT:
        # each checkpoint group covers group_size / glen kernel groups (same values repeated)
        rep = 1 if group_size == -1 else group_size // glen
        s = s.repeat_interleave(rep, dim=1)[:, :gp]
        z = z.repeat_interleave(rep, dim=1)[:, :gp]
    ab = torch.zeros(gp, np_, 2, dtype=torch.float32, device=scales.device)
    g = s.shape[1]
    ab[:g, :n, 0] = s.t()
    ab[:g, :n, 1] = z.t()
    return packed, ab.to(dtype).contiguous(), shift


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, n: int, k: int, shift: int,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense W [n, k] from the kernel layout, computed as ``z + s*(2c - L)`` in float64 (then ``dtype``).

    The independent reader of :func:`repack`'s output, used by the tests of both the layout and the
    CUDA kernels.
    """
    nb, kb, words = qweight.shape
    bits = words // 32
    frag = torch.zeros(nb, kb, 32, 16, 2, dtype=torch.int64, device=qweight.device)
    w32 = qweight.to(torch.int64) & 0xFFFFFFFF
    for width, offset in parts(bits):
        per_word = 16 // width
        part = w32[..., 32 * offset: 32 * (offset + width)].reshape(nb, kb, 32, width, 1)
        pos = torch.arange(per_word, device=qweight.device, dtype=torch.int64) * width
        mask = (1 << width) - 1
        e0 = (part >> pos) & mask
        e1 = (part >> (pos + 16)) & mask
        pv = torch.stack([e0, e1], dim=-1).reshape(nb, kb, 32, 16, 2)
        frag |= pv << offset
    # inverse of _fragment_order
    c = frag.view(nb, kb, 8, 4, 4, 2, 2, 2)  # nb kb g t s h r e
    c = c.permute(0, 5, 2, 1, 4, 6, 3, 7)  # nb h g kb s r t e
    values = 2 * c.reshape(nb * 16, kb * 64)[:n, :k].to(torch.float64) - max_level(bits)
    ab = scales.to(torch.float64)
    cols = torch.arange(k, device=qweight.device) >> shift if shift != NO_GROUPS_SHIFT else \
        torch.zeros(k, dtype=torch.int64, device=qweight.device)
    s = ab[cols, :n, 0].t()
    z = ab[cols, :n, 1].t()
    return (z + s * values).to(dtype)
