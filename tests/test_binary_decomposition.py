"""The split of the popcount correction that the binary WpAq kernel relies on, checked on the CPU.

csrc/bipolar_gemm_binary.cuh computes, per group g, only J = 4 T - 2 Lw PA (T = sum_k a_k b_k over the
codes, PA = sum_k a_k) and adds once per output the column bias sum_g s C_g, C = K_g Lw La - 2 La PB, that
vllm_bipolar.kernels.cuda_binary_gemm.binary_weight_terms builds at load time. Here, on fresh random codes:
I = J + C exactly against the format's AND-popcount definition (bitplane_integer_products), |J| within the
bound the op checks (2 K_g Lw La), and the kernel's float sum (sz pairs, col_bias) against the float64
product sum_g s I + z S.
"""

import pytest
import torch

from vllm_bipolar.format import bitplane_integer_products, bitplane_value_sums, pack_codes
from vllm_bipolar.format.reference import group_lengths
from vllm_bipolar.kernels.cuda_binary_gemm import binary_weight_terms


def group_slices(k, g):
    size = k if g == -1 else g
    return [slice(s, min(k, s + size)) for s in range(0, k, size)]


@pytest.mark.parametrize("group_size", [-1, 128, 256])
@pytest.mark.parametrize("w_bits,a_bits", [(1, 1), (2, 2), (3, 4), (8, 8), (4, 1), (1, 8)])
def test_kernel_terms_recompose_the_product(w_bits, a_bits, group_size):
    gen = torch.Generator().manual_seed(torch.seed())
    m, n, k = 7, 5, 600  # 600: a partial last group of 88 (128) / 88 (256) channels
    ca = torch.randint(0, 2 ** a_bits, (m, k), generator=gen)
    cw = torch.randint(0, 2 ** w_bits, (n, k), generator=gen)
    slices = group_slices(k, group_size)
    scales = torch.randn(n, len(slices), generator=gen) * 0.01
    zeros = torch.randn(n, len(slices), generator=gen) * 0.01
    lw, la = (1 << w_bits) - 1, (1 << a_bits) - 1
    ints = bitplane_integer_products(pack_codes(ca.to(torch.uint8), a_bits), pack_codes(cw.to(torch.uint8), w_bits),
                                     k, group_size)  # [M, N, G] int64: I
    vsums = bitplane_value_sums(pack_codes(ca.to(torch.uint8), a_bits), k, group_size)  # [M, G]: S
    kg = group_lengths(k, group_size)
    pb = torch.stack([cw[:, sl].sum(1) for sl in slices])  # [G, N]
    sz, col_bias = binary_weight_terms(pb.to(torch.int32), scales, zeros, k, group_size, w_bits, a_bits)
    assert sz.shape == (len(slices), (n + 1) // 2 * 2, 2) and sz.dtype == torch.float32
    assert (sz[:, n:] == 0).all() and col_bias.shape == (n,) and col_bias.dtype == torch.float32
    y = torch.zeros(m, n, dtype=torch.float64)
    ref = torch.zeros_like(y)
    mag = torch.zeros_like(y)
    for gi, sl in enumerate(slices):
        t = ca[:, sl] @ cw[:, sl].T  # int64
        pa = ca[:, sl].sum(1)
        j = 4 * t - 2 * lw * pa[:, None]
        c = int(kg[gi]) * lw * la - 2 * la * pb[gi]
        seed = f"seed {gen.initial_seed()}"
        assert torch.equal(j + c[None], ints[:, :, gi]), f"group {gi}: I != J + C ({seed})"
        assert int(j.abs().max()) <= 2 * int(kg[gi]) * lw * la, seed
        assert torch.equal(2 * pa - la * int(kg[gi]), vsums[:, gi]), seed
        s, z = sz[gi, :n, 0].double(), sz[gi, :n, 1].double()
        y += s[None] * j.double() + z[None] * vsums[:, gi, None].double()
        ref += scales[:, gi].double()[None] * ints[:, :, gi].double() + zeros[:, gi].double()[None] * vsums[:, gi, None]
        mag += s.abs()[None] * (ints[:, :, gi].abs() + 2 * c.abs()[None]).double() + (z[None] * vsums[:, gi, None]).abs()
    y += col_bias.double()[None]
    assert ((y - ref).abs() <= 2.0 ** -22 * mag + 1e-12).all(), f"seed {gen.initial_seed()}"


def test_prepare_binary_weights_names_bad_inputs():
    """The argument errors come before any kernel runs (so they are checked on the CPU too)."""
    from vllm_bipolar.kernels.cuda_binary_gemm import prepare_binary_weights

    k, n = 512, 8
    qweight = pack_codes(torch.randint(0, 4, (n, k)).to(torch.uint8), 2)
    sc = torch.ones(n, 4, dtype=torch.float16)
    cases = [
        ((qweight[0], sc, None), "[w_bits, N, ceil(K/32)]"),
        ((qweight, sc[:, :3], None), "[N, G] = [8, 4]"),
        ((qweight, sc, sc.float()), "dtype of scales"),
        ((qweight, sc.to(torch.int32), None), "float16, bfloat16"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError) as info:
            prepare_binary_weights(*args, k, 128, 4)
        assert msg in str(info.value), str(info.value)
