"""GPU tests of the int8 WpAq kernels (bipolar_kernels::quantize_activations_int8 / gemm_int8) and their op.

References, independent of the kernels: vllm_bipolar.format.quantize_activations (the activation codes
and scales, bit for bit), kernels.a16_layout.dequantize (the weights the layout holds, float64) and a
float64 matmul of the two. Fresh random data on every run (the seed is in the failure message). Skips
without CUDA or the extension.
"""

from __future__ import annotations

import pytest
import torch

import vllm_bipolar.format as fmt
from conftest import assert_within, load_kernel_ops
from vllm_bipolar import ops
from vllm_bipolar.kernels import a16_layout
from vllm_bipolar.kernels.cuda_gemm_a16 import int8_col_bias

OPS, WHY = (load_kernel_ops("gemm_int8", "quantize_activations_int8", "binary_group_sums")
            if torch.cuda.is_available() else (None, "no CUDA device"))
pytestmark = pytest.mark.skipif(OPS is None, reason=f"CUDA kernels unavailable: {WHY}")

DEV = "cuda"
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def slot_order(k: int) -> torch.Tensor:
    """Channel held by each code slot of a row (quantize_activations_int8): in every 16 channels, slot
    4 t + 2 e + r holds channel 8 r + 2 t + e."""
    slot = torch.arange(k, device=DEV)
    j, t, base = slot % 4, (slot % 16) // 4, slot - slot % 16
    return base + 8 * (j % 2) + 2 * t + j // 2


def make_layer(n, k, w_bits, a_bits, group_size, symmetric, dtype):
    """(repacked qweight, scales, shift, col_bias, W in float64, per row sum_k (2 |s| Lw + |z|))."""
    w = torch.randn(n, k, device=DEV) * 0.02 + torch.randn(n, 1, device=DEV) * 0.01
    q = fmt.quantize_weight(w, w_bits, group_size=group_size, symmetric=symmetric, dtype=dtype)
    planes = fmt.pack_codes(q.codes, w_bits)
    qw, sc, shift = a16_layout.repack(planes, q.scales, q.zeros, k, group_size)
    group = (torch.arange(k, device=DEV) >> shift).clamp(max=sc.shape[0] - 1)
    s, z = (sc[group, :n, i].T.to(torch.float64).abs() for i in (0, 1))  # [n, k]
    term_mag = (2 * s * (2 ** w_bits - 1) + z).sum(1)
    return (qw, sc, shift, int8_col_bias(planes, q.scales, k, group_size, a_bits),
            a16_layout.dequantize(qw, sc, n, k, shift), term_mag)


def reference(x, a_bits, w64, term_mag):
    """(x_q @ W^T in float64, the magnitude of what the kernel sums in fp32)."""
    codes, s = fmt.quantize_activations(x, a_bits)
    xq = (2 * codes.to(torch.float64) - (2 ** a_bits - 1)) * s.to(torch.float64)[:, None]
    amax = xq.abs().amax(1, keepdim=True)
    # per group the kernel adds s J + z S (|s_x s J| <= 2 max|x_q| s Lw K_g, |s_x z S| <= max|x_q| |z| K_g), and
    # the column term s_x col_bias (<= max|x_q| sum_k s Lw): all within max|x_q| * term_mag
    return xq @ w64.T, xq.abs() @ w64.abs().T + amax * term_mag[None, :]


def check(y, ref, mag, dtype, what):
    assert y.dtype == dtype and y.shape == ref.shape, what
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    bound = ULP[dtype] * ref.abs() + 2.0 ** -18 * mag + 1e-6
    assert_within(y, ref, bound, what)


@pytest.mark.parametrize("group_shift", [7, 8, 30])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("a_bits", [1, 2, 4, 8])
def test_quantize_activations_int8(a_bits, dtype, group_shift):
    seed = torch.seed()
    for m, k in ((1, 576), (3, 1000), (17, 4096), (5, 130)):
        x = torch.randn(m, k, device=DEV, dtype=dtype) * 3
        x[0, : k // 3] = 0  # a partly empty row
        codes, s, sums = OPS.quantize_activations_int8(x, a_bits, group_shift)
        ref_codes, ref_s = fmt.quantize_activations(x, a_bits)
        kp = (k + 127) // 128 * 128
        assert codes.shape == (m, kp) and codes.dtype == torch.uint8
        what = f"A{a_bits} {dtype} shift={group_shift} M={m} K={k} seed={seed}"
        assert torch.equal(s, ref_s), what
        padded = torch.zeros(m, kp, dtype=torch.uint8, device=DEV)
        padded[:, :k] = ref_codes
        assert torch.equal(codes, padded[:, slot_order(kp)]), what
        glen = kp if group_shift == 30 else 1 << group_shift
        g = -(-k // glen)
        ref_sums = torch.zeros(g, (m + 3) // 4 * 4, dtype=torch.int32, device=DEV)
        per_block = padded.to(torch.int64).view(m, kp // 128, 128).sum(-1)  # [m, stages]
        blocks_per_group = glen // 128
        for gi in range(g):
            ref_sums[gi, :m] = per_block[:, gi * blocks_per_group:(gi + 1) * blocks_per_group].sum(1).to(torch.int32)
        assert torch.equal(sums, ref_sums), what


@pytest.mark.parametrize("group_size", [-1, 128, 256, 384])
@pytest.mark.parametrize("symmetric", [False, True], ids=["offsets", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("w_bits", range(1, 9))
def test_gemm_int8_matches_reference(w_bits, dtype, symmetric, group_size):
    seed = torch.seed()
    for a_bits in (1, 2, 4, 8):
        for k in (576, 1536, 1000):
            if group_size != -1 and 2 * min(k, group_size) * (2 ** w_bits - 1) * (2 ** a_bits - 1) >= 2 ** 31:
                continue
            for n in (1, 3, 1553):
                qw, sc, shift, cb, w64, tmag = make_layer(n, k, w_bits, a_bits, group_size, symmetric, dtype)
                for m in (1, 3, 17, 255):
                    x = torch.randn(m, k, device=DEV, dtype=dtype)
                    y = ops.wpaq_int8_forward(x, qw, sc, cb, n, k, shift, a_bits)
                    ref, mag = reference(x, a_bits, w64, tmag)
                    check(y, ref, mag, dtype, f"W{w_bits}A{a_bits} {dtype} sym={symmetric} g={group_size} M={m} "
                                              f"N={n} K={k} seed={seed}")


def test_gemm_int8_exact_integers():
    """Unit scales, no offsets, x at the code grid with scale 1: the output is the exact integer sum of the
    bipolar products (within fp16's exact integer range), as the binary decomposition defines it."""
    seed = torch.seed()
    for w_bits, a_bits, k in ((1, 1, 1000), (2, 2, 200), (1, 3, 250), (3, 1, 250), (2, 1, 300)):
        n, m = 77, 33
        codes_w = torch.randint(0, 2 ** w_bits, (n, k), device=DEV)
        planes = fmt.pack_codes(codes_w, w_bits)
        scales = torch.ones(n, 1, device=DEV, dtype=torch.float16)
        qw, sc, shift = a16_layout.repack(planes, scales, None, k, -1)
        cb = int8_col_bias(planes, scales, k, -1, a_bits)
        la = 2 ** a_bits - 1
        xv = 2 * torch.randint(0, la + 1, (m, k), device=DEV) - la
        xv[:, 0] = la  # max |x| = La: scale exactly 1
        y = ops.wpaq_int8_forward(xv.to(torch.float16), qw, sc, cb, n, k, shift, a_bits)
        ref = xv.to(torch.float64) @ (2 * codes_w.to(torch.float64) - (2 ** w_bits - 1)).T
        assert ref.abs().max() < 2048
        assert torch.equal(y.to(torch.float64), ref), f"W{w_bits}A{a_bits} K={k} seed={seed}"


@pytest.mark.parametrize("k", [4096, 11008])
def test_gemm_int8_model_shapes(k):
    seed = torch.seed()
    for w_bits, a_bits, n in ((2, 8, 4096 + 17), (4, 4, 1024), (2, 2, 77)):
        qw, sc, shift, cb, w64, tmag = make_layer(n, k, w_bits, a_bits, 128, False, torch.float16)
        for m in (16, 129, 1000):
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            ref, mag = reference(x, a_bits, w64, tmag)
            check(ops.wpaq_int8_forward(x, qw, sc, cb, n, k, shift, a_bits), ref, mag, torch.float16,
                  f"W{w_bits}A{a_bits} M={m} N={n} K={k} seed={seed}")


def test_gemm_int8_graph_capture_and_bad_arguments():
    n, k = 300, 640
    qw, sc, shift, cb, _, _ = make_layer(n, k, 2, 4, 128, False, torch.float16)
    x = torch.randn(40, k, device=DEV, dtype=torch.float16)
    eager = ops.wpaq_int8_forward(x, qw, sc, cb, n, k, shift, 4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.wpaq_int8_forward(x, qw, sc, cb, n, k, shift, 4)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)
    codes, s, sums = OPS.quantize_activations_int8(x, 4, shift)
    with pytest.raises(RuntimeError, match="group_shift"):
        OPS.gemm_int8(codes, s, sums, qw, sc, cb, n, k, 6, 4)
    with pytest.raises(RuntimeError, match="a_codes"):
        OPS.gemm_int8(codes[:, :128].contiguous(), s, sums, qw, sc, cb, n, k, shift, 4)
    with pytest.raises(RuntimeError, match="col_bias"):
        OPS.gemm_int8(codes, s, sums, qw, sc, cb[:-1], n, k, shift, 4)
    with pytest.raises(RuntimeError, match="qweight"):
        OPS.gemm_int8(codes, s, sums, qw[:, :-1].contiguous(), sc, cb, n, k, shift, 4)


def test_wpaq_op_switches_to_int8(monkeypatch):
    """ops.linear_wpaq_cuda: below WPAQ_INT8_MIN_M the weight-only kernels on x_fq, from it the int8 kernel."""
    from vllm_bipolar.format import fake_quantize_activations

    n, k = 500, 1536
    qw, sc, shift, cb, _, _ = make_layer(n, k, 3, 4, 128, False, torch.float16)
    monkeypatch.setattr(ops, "WPAQ_INT8_MIN_M", 64)
    for m in (8, 64, 100):
        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
        y = ops.linear_wpaq_cuda(x, fake_quantize_activations(x, 4), qw, sc, cb, n, k, shift, 4)
        want = (ops.wpaq_int8_forward(x, qw, sc, cb, n, k, shift, 4) if m >= 64
                else ops.linear_a16_cuda(fake_quantize_activations(x, 4), qw, sc, n, k, shift))
        assert torch.equal(y, want), f"M={m}"
