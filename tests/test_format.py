"""The bipolar-INT format in pure torch: packing, quantization, the bit-plane reference matmul.

Every test draws fresh random data (no fixed seed): the properties must hold for any input.
"""

import pytest
import torch

from vllm_bipolar.format import (bipolar_linear, bitplane_integer_products, bitplane_matmul,
                                 bitplane_value_sums, codes_to_values, dequantize, dequantize_packed,
                                 expand_groups, fake_quantize_activations, max_level, pack_codes, popcount32,
                                 quantize_activations, quantize_weight, unpack_bits, unpack_codes, values_to_codes)
from vllm_bipolar.format.quantize import num_groups

BITS = range(1, 9)
ODD_K = [576, 1536, 32 * 7, 32 * 5 + 7, 1, 33, 4000]  # SmolLM2 widths, whole words, partial words/groups


def pack_codes_naive(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent bit-by-bit packer (slow): the layout of DESIGN.md section 4 written out literally."""
    n, k = codes.shape
    w = (k + 31) // 32
    out = torch.zeros(bits, n, w, dtype=torch.int64)
    for p in range(bits):
        for j in range(k):
            out[p, :, j // 32] |= ((codes[:, j].to(torch.int64) >> p) & 1) << (j % 32)
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k", [(3, 576), (1, 1536), (5, 32 * 5 + 7), (2, 33), (4, 1)])
def test_pack_matches_literal_layout(bits, n, k):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (bits, n, (k + 31) // 32)
    assert torch.equal(packed, pack_codes_naive(codes, bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k", [(n, k) for n in (1, 3) for k in ODD_K] + [(49152, 576), (49152, 33)])
def test_pack_unpack_round_trip(bits, k, n):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(packed, k), codes)
    # Padding bits past K are zero in every plane.
    if k % 32:
        last = packed[..., -1].to(torch.int64) & 0xFFFFFFFF
        assert torch.all((last >> (k % 32)) == 0)


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("k,group_size", [(576, 128), (576, -1), (100, 128), (1536, 32), (200, 64), (33, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_is_the_definition(bits, k, group_size, dtype):
    """dequantize (broadcast over group views) equals z + s * v with per-column expanded scales, bit for bit,
    and unpack_bits the literal bit-by-bit reading; whole and partial last groups."""
    n = 7
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    ng = num_groups(k, group_size)
    scales = torch.rand(n, ng) * 0.1
    zeros = torch.randn(n, ng) * 0.1
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    for z in (zeros, None):
        v = codes.to(cdt) * 2 - max_level(bits)
        w = v * expand_groups(scales.to(cdt), k, group_size)
        if z is not None:
            w = w + expand_groups(z.to(cdt), k, group_size)
        got = dequantize(codes, scales, z, bits, group_size, dtype)
        assert got.dtype == dtype and torch.equal(got, w.to(dtype))
    words = pack_codes(codes, bits)[0]
    naive = torch.stack([(words[:, j // 32].to(torch.int64) >> (j % 32)) & 1 for j in range(k)], 1).to(torch.uint8)
    assert torch.equal(unpack_bits(words, k), naive)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantize_leaves_float_codes_alone(dtype):
    """Codes given as floats of the compute dtype are not rewritten in place (v = 2 code - L on a copy)."""
    codes = torch.randint(0, 8, (5, 70)).to(dtype)
    before = codes.clone()
    scales, zeros = torch.rand(5, 3), torch.randn(5, 3)
    got = dequantize(codes, scales, zeros, 3, 32, dtype)
    assert torch.equal(codes, before)
    assert torch.equal(got, dequantize(before.to(torch.uint8), scales, zeros, 3, 32, dtype))


@pytest.mark.parametrize("n,k,group_size", [(600, 1800, 128), (333, 4000, -1), (5, 300000, 256)])
def test_blocked_dequantize_is_the_whole(n, k, group_size, monkeypatch):
    """dequantize_packed_blocked (torch_dense's load path: row blocks of about DEQUANT_CHUNK_ELEMS weights)
    gives the whole dequantize_packed bit for bit, including a last partial block and single-row blocks."""
    from vllm_bipolar.format import reference

    monkeypatch.setattr(reference, "DEQUANT_CHUNK_ELEMS", 1 << 16)  # several blocks at test sizes
    bits = 3
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    qweight = pack_codes(codes, bits)
    ng = num_groups(k, group_size)
    scales, zeros = (torch.rand(n, ng) * 0.1).to(torch.bfloat16), (torch.randn(n, ng) * 0.1).to(torch.bfloat16)
    assert len(reference.row_blocks(n, k)) > 1
    for z in (zeros, None):
        got = reference.dequantize_packed_blocked(qweight, scales, z, k, group_size, torch.bfloat16)
        assert torch.equal(got, dequantize_packed(qweight, scales, z, k, group_size, torch.bfloat16))


@pytest.mark.parametrize("bits", BITS)
def test_values_are_the_odd_grid(bits):
    codes = torch.arange(2**bits, dtype=torch.uint8)
    v = codes_to_values(codes, bits)
    expected = torch.arange(-max_level(bits), max_level(bits) + 1, 2, dtype=torch.int32)
    assert torch.equal(v, expected)
    assert torch.equal(values_to_codes(v, bits), codes)
    # v = sum_i 2^i (2 b_i - 1) for the bits b_i of the code
    by_bits = sum((1 << i) * (2 * ((codes.to(torch.int32) >> i) & 1) - 1) for i in range(bits))
    assert torch.equal(v, by_bits)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["rtn", "mse"])
@pytest.mark.parametrize("k", [576, 32 * 5 + 7, 200])
def test_quantize_dequantize(bits, group_size, symmetric, method, k):
    n = 7
    w = torch.randn(n, k) * torch.rand(n, 1) * 3
    q = quantize_weight(w, bits, group_size, symmetric, method, dtype=torch.float32)
    ng = num_groups(k, group_size)
    assert q.codes.shape == (n, k) and q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= max_level(bits)
    assert q.scales.shape == (n, ng)
    assert (q.zeros is None) == symmetric and (symmetric or q.zeros.shape == (n, ng))
    wd = dequantize(q.codes, q.scales, q.zeros, bits, group_size, torch.float64)
    # Every dequantized value lies exactly on its group's grid z + s * (odd integer).
    g = k if group_size == -1 else group_size
    col_group = torch.arange(k) // g
    s = q.scales.double()[:, col_group]
    z = 0 if q.zeros is None else q.zeros.double()[:, col_group]
    v = (wd - z) / s
    assert torch.allclose(v, v.round(), atol=1e-6)
    assert torch.all(v.round().remainder(2) == 1) and torch.all(v.abs() <= max_level(bits) + 1e-6)
    # Error bound: within the grid range every weight is at most half a step (= s) away;
    # rtn keeps the whole range, so the bound holds everywhere.
    err = (wd - w.double()).abs()
    if method == "rtn":
        assert torch.all(err <= s * (1 + 1e-4) + 1e-7)
    # mse never does worse than rtn in its importance-weighted squared error (it starts from rtn).
    if method == "mse":
        r = quantize_weight(w, bits, group_size, symmetric, "rtn", dtype=torch.float32)
        wr = dequantize(r.codes, r.scales, r.zeros, bits, group_size, torch.float64)
        # The quantizer's importance: w^2 plus the mean of w^2 over the weight's own group (per row).
        sq = w.double() ** 2
        imp = sq.clone()
        for i in range(0, k, g):
            imp[:, i:i + g] += sq[:, i:i + g].mean(-1, keepdim=True)
        assert (imp * (wd - w.double()) ** 2).sum() <= (imp * (wr - w.double()) ** 2).sum() * (1 + 1e-6)


def test_quantize_more_bits_less_error():
    w = torch.randn(64, 512)
    errs = []
    for bits in BITS:
        q = quantize_weight(w, bits, 128, False, "rtn", torch.float32)
        errs.append(((dequantize(q.codes, q.scales, q.zeros, bits, 128) - w) ** 2).mean().item())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_quantize_rejects_non_finite():
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_weight(w, 4)


def test_quantize_zero_group_is_exact():
    w = torch.zeros(2, 128)
    w[1, :64] = torch.randn(64)
    for sym in (True, False):
        q = quantize_weight(w, 3, 64, sym, "mse", torch.float32)
        wd = dequantize(q.codes, q.scales, q.zeros, 3, 64)
        assert torch.equal(wd[0], torch.zeros(128)) and torch.equal(wd[1, 64:], torch.zeros(64))


def test_popcount_matches_bin():
    x = torch.randint(-2**31, 2**31 - 1, (1000,), dtype=torch.int64).to(torch.int32)
    expected = torch.tensor([bin(int(v) & 0xFFFFFFFF).count("1") for v in x])
    assert torch.equal(popcount32(x), expected)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_activation_quantization(bits):
    x = torch.randn(9, 300) * torch.rand(9, 1) * 10
    x[3] = 0  # an all-zero token
    x[4] = 2.5  # a token of all-equal values
    codes, s = quantize_activations(x, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= max_level(bits) and s.shape == (9,)
    xd = fake_quantize_activations(x, bits)
    assert torch.equal(xd[3], torch.zeros(300))
    assert torch.allclose(xd[4], x[4])
    assert torch.all((xd - x).abs() <= s[:, None] * (1 + 1e-5) + 1e-7)
    assert torch.isfinite(xd).all()


@pytest.mark.parametrize("w_bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("a_bits", [1, 2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size,k", [(128, 576), (-1, 32 * 9 + 5), (256, 640)])
def test_bitplane_matmul_is_exact(w_bits, a_bits, symmetric, group_size, k):
    m, n = 3, 5
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    q = quantize_weight(w, w_bits, group_size, symmetric, "rtn", dtype=torch.float32)
    qweight = pack_codes(q.codes, w_bits)
    a_codes, sx = quantize_activations(x, a_bits)
    # Integer part: AND-popcount over bit planes == int64 dot products of the odd values, per group.
    ints = bitplane_integer_products(pack_codes(a_codes, a_bits), qweight, k, group_size)
    vx = codes_to_values(a_codes, a_bits).to(torch.int64)
    vw = codes_to_values(q.codes, w_bits).to(torch.int64)
    g = k if group_size == -1 else group_size
    expected = torch.stack([vx[:, i:i + g] @ vw[:, i:i + g].T for i in range(0, k, g)], dim=-1)
    assert torch.equal(ints, expected)
    sums = bitplane_value_sums(pack_codes(a_codes, a_bits), k, group_size)
    assert torch.equal(sums, torch.stack([vx[:, i:i + g].sum(-1) for i in range(0, k, g)], dim=-1))
    # With scales and offsets: equals the float64 matmul of the dequantized operands.
    y = bitplane_matmul(x, qweight, q.scales, q.zeros, k, group_size, a_bits)
    xd = (vx.double() * sx.double()[:, None])
    wd = dequantize(q.codes, q.scales, q.zeros, w_bits, group_size, torch.float64)
    ref = xd @ wd.T
    assert torch.allclose(y, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 3, 40])
def test_runtime_linear_in_row_blocks(m, monkeypatch):
    """bipolar_linear dequantizes large layers a block of output rows at a time (a partial last block, bias
    sliced with it): the same result as one matmul with the whole dequantized weight (fp32: the GEMM's sums
    may be ordered differently, so equal to the float64 rounding error)."""
    import vllm_bipolar.format.reference as reference

    n, k, gs = 203, 300, 128
    monkeypatch.setattr(reference, "DEQUANT_CHUNK_ELEMS", 64 * k)  # blocks of 64 rows: 4 blocks, the last of 11
    q = quantize_weight(torch.randn(n, k), 4, gs, False, "rtn", dtype=torch.float32)
    qweight = pack_codes(q.codes, 4)
    x, bias = torch.randn(m, k), torch.randn(n)
    y = bipolar_linear(x, qweight, q.scales, q.zeros, bias, k, gs, 16)
    ref = x.double() @ dequantize_packed(qweight, q.scales, q.zeros, k, gs, torch.float64).T + bias.double()
    assert y.shape == (m, n)
    assert ((y.double() - ref).abs() <= 1e-5 * (x.double().abs() @ dequantize_packed(
        qweight, q.scales, q.zeros, k, gs, torch.float64).abs().T + bias.double().abs())).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("a_bits", [16, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_runtime_linear_matches_reference(dtype, tol, a_bits, symmetric):
    m, n, k, gs = 17, 49, 576, 128
    x = torch.randn(2, m, k)
    w = torch.randn(n, k)
    bias = torch.randn(n)
    q = quantize_weight(w, 3, gs, symmetric, "mse", dtype=dtype)
    qweight = pack_codes(q.codes, 3)
    y = bipolar_linear(x.to(dtype), qweight, q.scales, q.zeros, bias.to(dtype), k, gs, a_bits)
    assert y.shape == (2, m, n) and y.dtype == dtype
    xr = x.to(dtype).double().reshape(-1, k)
    if a_bits != 16:
        xr = fake_quantize_activations(x.to(dtype).reshape(-1, k).float(), a_bits).double()
    ref = xr @ dequantize_packed(qweight, q.scales, q.zeros, k, gs, torch.float64).T + bias.to(dtype).double()
    err = (y.double().reshape(-1, n) - ref).norm() / ref.norm()
    assert err < tol, err
