"""The weight-only kernels' load-time layout (vllm_bipolar/kernels/a16_layout.py), on the CPU.

repack() followed by the layout's own float64 reader must give back the checkpoint's weight as
vllm_bipolar.format defines it, for every width, odd shapes, group sizes (powers of two, -1, and
sizes that are expanded to a power-of-two divisor), with and without offsets; padding rows are zero.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import round_once

import vllm_bipolar.format as fmt
from vllm_bipolar.kernels import a16_layout


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n,k,group_size", [(17, 100, 32), (3, 96, -1), (70, 1000, 96),
                                            (16, 64, 256)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["offsets", "symmetric"])
def test_repack_round_trip(bits, n, k, group_size, symmetric):
    w = torch.randn(n, k) * 0.02 + torch.randn(n, 1) * 0.01
    q = fmt.quantize_weight(w, bits, group_size=group_size, symmetric=symmetric, dtype=torch.float16)
    qweight = fmt.pack_codes(q.codes, bits)
    ref = fmt.dequantize_packed(qweight, q.scales, q.zeros, k, group_size, torch.float64)
    packed, sz, shift = a16_layout.repack(qweight, q.scales, q.zeros, k, group_size)
    np_, kp = a16_layout.round_up(n, 64), a16_layout.round_up(k, 64)
    assert packed.shape == (np_ // 16, kp // 64, 32 * bits) and packed.dtype == torch.int32
    assert sz.shape[1:] == (np_, 2) and sz.dtype == torch.float16
    got = a16_layout.dequantize(packed, sz, n, k, shift)
    assert torch.equal(got, ref), f"max error {(got - ref).abs().max().item():.3g}"
    # padding rows read back as exact zeros (padding channels of a real group need not: the kernels
    # zero-fill the activations past K)
    full = a16_layout.dequantize(packed, sz, np_, kp, shift)
    assert torch.equal(full[n:], torch.zeros_like(full[n:]))


def test_parts_cover_every_bit_once():
    for bits in range(1, 9):
        parts = a16_layout.parts(bits)
        assert sum(w for w, _ in parts) == bits
        assert [o for _, o in parts] == [sum(w for w, _ in parts[:i]) for i in range(len(parts))]
        assert all(w in (1, 2, 4, 8) for w, _ in parts)


def test_group_shift():
    assert a16_layout.group_shift(-1) == a16_layout.NO_GROUPS_SHIFT
    assert [a16_layout.group_shift(g) for g in (32, 64, 128, 256, 96, 160, 192)] == [5, 6, 7, 8, 5, 5, 6]


@pytest.mark.parametrize("dtype,mant,min_exp", [(torch.bfloat16, 8, -126), (torch.float16, 11, -14)], ids=["bf16", "fp16"])
def test_round_once_is_one_rounding(dtype, mant, min_exp):
    """The GPU tests' reference rounding of float64 weights (conftest.round_once) against a scalar
    round-half-to-even on fresh random values of every magnitude, subnormals and exact ties; and a value that
    torch's cast (through float32) rounds twice: 1 + 2^-8 + 2^-30 is above bf16's tie at 1 + 2^-8."""
    def rne(v):
        if v == 0:
            return 0.0
        ulp = 2.0 ** (max(math.frexp(abs(v))[1] - 1, min_exp) - (mant - 1))
        f, r = divmod(abs(v) / ulp, 1.0)
        return math.copysign((f + (r > 0.5 or (r == 0.5 and f % 2 == 1))) * ulp, v)

    x = torch.randn(5000, dtype=torch.float64) * torch.exp(torch.randn(5000, dtype=torch.float64) * 6)
    ties = torch.tensor([1 + 2.0 ** -mant, 1 + 3 * 2.0 ** -mant, -(1 + 2.0 ** -mant), 2.0 ** (min_exp - mant) * 3, 0.0],
                        dtype=torch.float64)
    x = torch.cat([x.clamp(-6e4, 6e4), ties])
    got = round_once(x, dtype)
    bad = got != torch.tensor([rne(v) for v in x.tolist()], dtype=torch.float64)
    assert not bad.any(), f"{dtype}: {int(bad.sum())} values rounded otherwise, e.g. {x[bad][:4].tolist()}"

    assert torch.equal(got.to(dtype).to(torch.float64), got)
    twice = torch.tensor([1 + 2.0 ** -8 + 2.0 ** -30], dtype=torch.float64)
    assert round_once(twice, torch.bfloat16).item() == 1 + 2.0 ** -7
    assert twice.to(torch.bfloat16).item() == 1.0  # torch's cast: the case round_once exists for
