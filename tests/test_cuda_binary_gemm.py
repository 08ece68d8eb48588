"""GPU tests of the WpAq path on binary tensor cores: bipolar_kernels::quantize_activations,
bipolar_kernels::binary_group_sums and bipolar_kernels::gemm_binary (csrc/bipolar_act_quant.cu,
csrc/bipolar_gemm_binary*.cu) with the load-time prepare_binary_weights, the op
bipolar::linear_binary_cuda and the backend CudaBinaryGemmKernel.

* Activation quantization must equal vllm_bipolar.format (quantize_activations + pack_codes) bit
  for bit, computed by the format on the same (CUDA) device.
* Per-group code sums (binary_group_sums) equal the sums of the codes, padding rows 0.
* The GEMM's integer machinery is checked exactly: fp32 output (the op's debug/test dtype) with
  small integer scales/offsets and unit activation scales make every kernel step exact, so the
  output must equal the float64 sum of per-group integer products (and, on small cases,
  vllm_bipolar.format.bitplane_integer_products / bitplane_value_sums).
* End to end (fp16/bf16): quantize + gemm against the float64 reference with an error bound.

Skips cleanly without CUDA or without the built extension. Data is fresh random on every run.
``python tests/test_cuda_binary_gemm.py --bench`` prints one timing (W2A2 g128 vs fp16 matmul).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # for `python tests/...py --bench`
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vllm_bipolar.format as fmt  # noqa: E402  (the package __init__ imports neither vLLM nor _C)
from conftest import load_kernel_ops  # noqa: E402

OPS, WHY = (load_kernel_ops("gemm_binary", "quantize_activations", "binary_group_sums") if torch.cuda.is_available()
            else (None, "no CUDA device"))
if OPS is not None and torch.cuda.get_device_capability()[0] < 8:
    OPS, WHY = None, "binary tensor cores need compute capability >= 8.0"

pytestmark = pytest.mark.skipif(OPS is None, reason=f"CUDA binary kernels unavailable: {WHY}")

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
W_BITS = [1, 2, 3, 4, 8]
A_BITS = [1, 2, 4, 8]
PAIRS = [(w, a) for w in W_BITS for a in A_BITS]
GROUP_SIZES = [-1, 128, 256]
KS = [576, 1536, 4096]  # 576 with 128 / 256: a partial last group (and W % 4 != 0: 4-byte copies)
NS = [1, 3, 1536 + 17]
MS = [1, 3, 16, 17, 255]
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def num_groups(k, g):
    return 1 if g == -1 else math.ceil(k / g)


def group_slices(k, g):
    size = k if g == -1 else g
    return [slice(s, min(k, s + size)) for s in range(0, k, size)]


def gemm_binary(a_planes, a_scales, qweight, scales, zeros, k, g):
    """The GEMM from checkpoint tensors: the weights prepared as at load time, PA from the planes;
    output dtype = scales' dtype (fp32: the exact debug path)."""
    from vllm_bipolar.kernels.cuda_binary_gemm import prepare_binary_weights

    sz, col_bias = prepare_binary_weights(qweight, scales, zeros, k, g, a_planes.shape[0])
    sums = OPS.binary_group_sums(a_planes, k, g)
    return OPS.gemm_binary(a_planes, a_scales, sums, qweight, sz, col_bias, k, g, scales.dtype)


# ---- activation quantization -----------------------------------------------------------------------
def special_rows(k, dtype):
    """All-zero token, a token of 1e4 magnitudes, and exact ties (x / s + L odd -> round half even)."""
    zero = torch.zeros(k)
    big = (torch.rand(k) * 2 - 1) * 1e4
    big[0] = 1e4
    ties = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 0.25, -0.25, 0.75]).repeat(k // 8 + 1)[:k]
    return torch.stack([zero, big, ties]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("a_bits", list(range(1, 9)))
def test_quantize_activations_bit_exact(a_bits, dtype):
    seed = torch.seed()
    for k in [576, 1000, 100, 31, 4096]:
        for m in [1, 3, 17, 255]:
            x = (torch.randn(m, k) * torch.exp(torch.randn(m, 1) * 2)).to(dtype)
            if m >= 3:
                x[:3] = special_rows(k, dtype)
            x = x.to(DEV)
            planes, scales = OPS.quantize_activations(x, a_bits)
            codes, s_ref = fmt.quantize_activations(x, a_bits)
            ref = fmt.pack_codes(codes, a_bits)
            what = f"a_bits={a_bits} {dtype} K={k} M={m} seed={seed}"
            assert planes.dtype == torch.int32 and planes.shape == (a_bits, m, math.ceil(k / 32)), what
            assert scales.dtype == torch.float32 and scales.shape == (m,), what
            assert torch.equal(scales, s_ref), f"{what}: scales differ at {torch.nonzero(scales != s_ref)[:5].tolist()}"
            bad = (planes != ref).any(0).any(-1)
            assert not bad.any(), f"{what}: planes differ in rows {torch.nonzero(bad).flatten()[:10].tolist()}"
            if m >= 3:
                assert scales[0] == 0, f"{what}: all-zero token must get scale 0"


def test_quantize_activations_row_strided_and_empty():
    k = 1000
    wide = torch.randn(17, k + 24, device=DEV, dtype=torch.bfloat16)
    x = wide[:, :k]
    planes, scales = OPS.quantize_activations(x, 3)
    codes, s_ref = fmt.quantize_activations(x.contiguous(), 3)
    assert torch.equal(planes, fmt.pack_codes(codes, 3)) and torch.equal(scales, s_ref)
    planes, scales = OPS.quantize_activations(torch.empty(0, 64, device=DEV, dtype=torch.float16), 2)
    assert planes.shape == (2, 0, 2) and scales.shape == (0,)


def test_binary_group_sums():
    """Per-group code sums of random planes (activation and weight shapes), padding rows zero."""
    gen = torch.Generator(device=DEV)
    gen.manual_seed(torch.seed())
    for bits in (1, 3, 8):
        for rows, k in [(1, 576), (17, 1536), (255, 4096), (6, 100)]:
            codes = torch.randint(0, 2 ** bits, (rows, k), device=DEV, generator=gen).to(torch.uint8)
            planes = fmt.pack_codes(codes, bits)
            for g in GROUP_SIZES:
                sums = OPS.binary_group_sums(planes, k, g)
                rs = (rows + 3) // 4 * 4
                assert sums.dtype == torch.int32 and sums.shape == (num_groups(k, g), rs)
                ref = torch.stack([codes[:, sl].to(torch.int64).sum(1) for sl in group_slices(k, g)])
                assert torch.equal(sums[:, :rows].to(torch.int64), ref), f"bits={bits} rows={rows} k={k} g={g}"
                assert (sums[:, rows:] == 0).all()


# ---- exact integer machinery (fp32 debug output) -----------------------------------------------------
def random_planes(rows, k, bits, gen):
    codes = torch.randint(0, 2 ** bits, (rows, k), device=DEV, generator=gen).to(torch.uint8)
    return codes, fmt.pack_codes(codes, bits)


def exact_reference(vx, vw, scales, zeros, k, g, a_bits):
    """float64 y = sum_g s * I_g + z * S_g, and a bound on the magnitudes the kernel's fp32 sums see
    (for the exactness bound): it adds s * J_g + z * S_g per group, J = I - C with the column term
    C_g = -La * sum_k v_w (summed over the groups into col_bias), so sum_g |s| (|I_g| + 2 |C_g|) + |z S_g|."""
    y = torch.zeros(vx.shape[0], vw.shape[0], dtype=torch.float64, device=DEV)
    mag = torch.zeros_like(y)
    la = (1 << a_bits) - 1
    for gi, sl in enumerate(group_slices(k, g)):
        ig = vx[:, sl] @ vw[:, sl].T
        s = scales[:, gi].to(torch.float64)[None]
        term = ig * s
        mag += (ig.abs() + 2 * la * vw[:, sl].sum(1)[None].abs()) * s.abs()
        if zeros is not None:
            zterm = vx[:, sl].sum(1, keepdim=True) * zeros[:, gi].to(torch.float64)[None]
            term = term + zterm
            mag += zterm.abs()
        y += term
    return y, mag


@pytest.mark.parametrize("w_bits,a_bits", PAIRS, ids=[f"W{w}A{a}" for w, a in PAIRS])
def test_gemm_binary_integer_exact(w_bits, a_bits):
    gen = torch.Generator(device=DEV)
    seed = torch.seed()
    gen.manual_seed(seed)
    mmax = max(MS)
    for k in KS:
        xcodes, a_planes = random_planes(mmax, k, a_bits, gen)
        vx = fmt.codes_to_values(xcodes, a_bits).to(torch.float64)
        for n in NS:
            wcodes, qweight = random_planes(n, k, w_bits, gen)
            vw = fmt.codes_to_values(wcodes, w_bits).to(torch.float64)
            for g in GROUP_SIZES:
                ng = num_groups(k, g)
                scales = torch.randint(-1, 3, (n, ng), device=DEV, generator=gen).float()
                zeros = torch.randint(-1, 2, (n, ng), device=DEV, generator=gen).float()
                for zs in (zeros, None):
                    ref, mag = exact_reference(vx, vw, scales, zs, k, g, a_bits)
                    # fp32 sums of integers are exact below 2^24; beyond, allow the fp32 rounding
                    bound = torch.where(mag < 2 ** 24, torch.zeros_like(mag), mag * 2.0 ** -22)
                    for m in MS:
                        ones = torch.ones(m, device=DEV)
                        y = gemm_binary(a_planes[:, :m].contiguous(), ones, qweight, scales, zs, k, g)
                        assert y.dtype == torch.float32 and y.shape == (m, n)
                        err = (y.to(torch.float64) - ref[:m]).abs()
                        bad = err > bound[:m]
                        if bad.any():
                            i = int(torch.argmax(err.flatten()))
                            r, c = divmod(i, n)
                            pytest.fail(f"W{w_bits}A{a_bits} K={k} N={n} g={g} M={m} zeros={zs is not None} "
                                        f"seed={seed}: {int(bad.sum())} of {bad.numel()} wrong; at ({r},{c}) "
                                        f"kernel {y[r, c].item()} reference {ref[r, c].item()}")


@pytest.mark.parametrize("w_bits,a_bits", [(1, 1), (2, 2), (3, 4), (8, 8), (4, 1)])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_gemm_binary_matches_bitplane_integer_products(w_bits, a_bits, group_size):
    """Per group, against the format's AND-popcount definition: one-hot fp32 scales pick group g of
    I (bitplane_integer_products), one-hot offsets with zero scales pick S (bitplane_value_sums)."""
    gen = torch.Generator(device=DEV)
    gen.manual_seed(torch.seed())
    k, n, m = 576, 37, 19
    _, a_planes = random_planes(m, k, a_bits, gen)
    _, qweight = random_planes(n, k, w_bits, gen)
    ints = fmt.bitplane_integer_products(a_planes, qweight, k, group_size)  # [M, N, G] int64
    sums = fmt.bitplane_value_sums(a_planes, k, group_size)  # [M, G]
    ng = num_groups(k, group_size)
    ones = torch.ones(m, device=DEV)
    for gi in range(ng):
        onehot = torch.zeros(n, ng, device=DEV)
        onehot[:, gi] = 1
        y = gemm_binary(a_planes, ones, qweight, onehot, None, k, group_size)
        assert torch.equal(y.to(torch.int64), ints[:, :, gi]), f"group {gi}: integer products differ"
        y = gemm_binary(a_planes, ones, qweight, torch.zeros_like(onehot), onehot, k, group_size)
        assert torch.equal(y.to(torch.int64), sums[:, gi, None].expand(m, n)), f"group {gi}: value sums differ"


# ---- end to end in fp16 / bf16 -----------------------------------------------------------------------
def make_layer(n, k, bits, group_size, symmetric, dtype):
    w = torch.randn(n, k, device=DEV) * 0.02 + torch.randn(n, 1, device=DEV) * 0.01
    q = fmt.quantize_weight(w, bits, group_size=group_size, symmetric=symmetric, dtype=dtype)
    qweight = fmt.pack_codes(q.codes, bits)
    w_ref = fmt.dequantize(q.codes, q.scales, q.zeros, bits, group_size, torch.float64)
    return qweight, q.scales, q.zeros, w_ref


def term_magnitude(x, w_ref, zeros, k, group_size, a_bits):
    """s_x * sum_k (|v_x| + 2 La) (|w| + 2 |z|): bounds sum_g |s I_g| + |z S_g| (|s v| <= |w| + |z|) plus
    the column terms |s C_g| = La |sum_k s v_w| the kernel adds and takes away again (J = I - C, col_bias)."""
    codes, sx = fmt.quantize_activations(x, a_bits)
    vx = fmt.codes_to_values(codes, a_bits).to(torch.float64).abs()
    wz = w_ref.abs()
    if zeros is not None:
        wz = wz + 2 * fmt.expand_groups(zeros.to(torch.float64).abs(), k, group_size)
    return sx.to(torch.float64)[:, None] * (vx @ wz.T + 2 * ((1 << a_bits) - 1) * wz.sum(1)[None])


def linear_reference(x, w_ref, a_bits):
    """float64 reference of the WpAq product (the formula of format.bitplane_matmul)."""
    codes, sx = fmt.quantize_activations(x, a_bits)
    vx = fmt.codes_to_values(codes, a_bits).to(torch.float64)
    return sx.to(torch.float64)[:, None] * (vx @ w_ref.T), sx.to(torch.float64)[:, None] * (vx.abs() @ w_ref.abs().T)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["offsets", "symmetric"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("w_bits,a_bits", PAIRS, ids=[f"W{w}A{a}" for w, a in PAIRS])
def test_linear_binary_matches_reference(w_bits, a_bits, dtype, symmetric, group_size):
    seed = torch.seed()
    for k in [576, 4096]:
        for n in [3, 1536 + 17]:
            qweight, scales, zeros, w_ref = make_layer(n, k, w_bits, group_size, symmetric, dtype)
            x = torch.randn(max(MS), k, device=DEV, dtype=dtype)
            x[0] = 0  # an all-zero token: output exactly 0
            ref, _ = linear_reference(x, w_ref, a_bits)
            mag = term_magnitude(x, w_ref, zeros, k, group_size, a_bits)
            ng = num_groups(k, group_size)
            bound = ULP[dtype] * ref.abs() + (ng + 4) * 2.0 ** -23 * mag + 1e-30
            for m in MS:
                planes, sx = OPS.quantize_activations(x[:m], a_bits)
                y = gemm_binary(planes, sx, qweight, scales, zeros, k, group_size)
                what = f"W{w_bits}A{a_bits} {dtype} sym={symmetric} g={group_size} K={k} N={n} M={m} seed={seed}"
                assert y.dtype == dtype and y.shape == (m, n), what
                assert torch.isfinite(y).all(), what
                assert (y[0] == 0).all(), f"{what}: zero token"
                err = (y.to(torch.float64) - ref[:m]).abs()
                if (err > bound[:m]).any():
                    i = int(torch.argmax((err / bound[:m]).flatten()))
                    r, c = divmod(i, n)
                    pytest.fail(f"{what}: {int((err > bound[:m]).sum())} outputs off; worst ({r},{c}) kernel "
                                f"{y[r, c].item():.6g} ref {ref[r, c].item():.6g} bound {bound[r, c].item():.3g}")


def test_fast_reference_equals_bitplane_matmul():
    """The float64 reference used above is format.bitplane_matmul's formula (checked on a small case)."""
    k, n, m = 1536, 29, 7
    for w_bits, a_bits, g, sym in [(2, 2, 128, False), (4, 8, -1, True), (3, 1, 256, False)]:
        qweight, scales, zeros, w_ref = make_layer(n, k, w_bits, g, sym, torch.bfloat16)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        ref, _ = linear_reference(x, w_ref, a_bits)
        slow = fmt.bitplane_matmul(x, qweight, scales, zeros, k, g, a_bits)
        torch.testing.assert_close(ref, slow, rtol=1e-12, atol=1e-12)


def test_custom_op_and_backend():
    """bipolar::linear_binary_cuda and CudaBinaryGemmKernel (chosen when forced; the weight-only kernels
    come first for WpAq layers)."""
    from vllm_bipolar import ops
    from vllm_bipolar.kernels import BipolarLayerConfig, choose_kernel
    from vllm_bipolar.kernels.cuda_binary_gemm import CudaBinaryGemmKernel

    k, n, w_bits, a_bits, g = 1536, 1553, 2, 4, 128
    qweight, scales, zeros, w_ref = make_layer(n, k, w_bits, g, False, torch.float16)
    x = torch.randn(5, 3, k, device=DEV, dtype=torch.float16)
    cfg = BipolarLayerConfig(n=n, k=k, w_bits=w_bits, a_bits=a_bits, group_size=g, symmetric=False,
                             act_dtype=torch.float16)
    from vllm_bipolar.kernels.cuda_gemm_a16 import CudaGemmA16Kernel

    assert choose_kernel(cfg, torch.device(DEV)) is CudaGemmA16Kernel
    ok, why = CudaBinaryGemmKernel.can_implement(
        BipolarLayerConfig(n=n, k=k, w_bits=2, a_bits=16, group_size=g, symmetric=False, act_dtype=torch.float16),
        torch.device(DEV))
    assert not ok and "a_bits" in why
    layer = torch.nn.Module()
    layer.register_parameter("qweight", torch.nn.Parameter(qweight, requires_grad=False))
    layer.register_parameter("scales", torch.nn.Parameter(scales, requires_grad=False))
    layer.register_parameter("zeros", torch.nn.Parameter(zeros, requires_grad=False))
    kern = CudaBinaryGemmKernel(cfg)
    kern.process_weights_after_loading(layer)
    assert layer.scales is None and layer.zeros is None  # freed: the kernel reads binary_sz
    bias = torch.randn(n, device=DEV, dtype=torch.float16)
    y = kern.apply_weights(layer, x, bias)
    assert y.shape == (5, 3, n) and y.dtype == torch.float16
    y_lin = ops.linear_binary_cuda(x.reshape(-1, k), qweight, layer.binary_sz, layer.binary_col_bias, k, g, a_bits)
    assert torch.equal(y_lin, gemm_binary(*OPS.quantize_activations(x.reshape(-1, k), a_bits), qweight, scales,
                                          zeros, k, g))
    y2 = y_lin + bias
    assert torch.equal(y.reshape(-1, n), y2)
    ref, mag = linear_reference(x.reshape(-1, k), w_ref, a_bits)
    ref = ref + bias.double()
    err = (y.reshape(-1, n).double() - ref).abs()
    assert (err <= ULP[torch.float16] * ref.abs() + 2 ** -18 * mag + 2e-3 * bias.abs().double()).all()


def test_cuda_graph_capture():
    k, n, g = 4096, 1553, 128
    qweight, scales, zeros, _ = make_layer(n, k, 2, g, False, torch.bfloat16)
    static_x = torch.randn(17, k, device=DEV, dtype=torch.bfloat16)

    from vllm_bipolar import ops
    from vllm_bipolar.kernels.cuda_binary_gemm import prepare_binary_weights

    sz, col_bias = prepare_binary_weights(qweight, scales, zeros, k, g, 2)

    def run():
        return ops.linear_binary_cuda(static_x, qweight, sz, col_bias, k, g, 2)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = run()
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, run())


def test_argument_checks():
    from vllm_bipolar.kernels.cuda_binary_gemm import prepare_binary_weights

    k, n = 512, 8
    _, a_planes = random_planes(4, k, 2, None)
    _, qweight = random_planes(n, k, 2, None)
    sx = torch.ones(4, device=DEV)
    sc = torch.ones(n, 4, device=DEV, dtype=torch.float16)
    sums = OPS.binary_group_sums(a_planes, k, 128)
    sz, cb = prepare_binary_weights(qweight, sc, None, k, 128, 2)
    good = (a_planes, sx, sums, qweight, sz, cb, k, 128, torch.float16)
    assert gemm_binary(a_planes, sx, qweight, sc, None, k, 128).shape == (4, n)
    cases = [
        ((a_planes, sx, sums, qweight, sz, cb, k, 64, torch.float16), "multiple of 128"),
        ((a_planes, sx, sums, qweight[:, :, :-1].contiguous(), sz, cb, k, 128, torch.float16), "ceil(k/32)"),
        ((a_planes, sx[:3], sums, qweight, sz, cb, k, 128, torch.float16), "a_scales"),
        ((a_planes, sx, sums[:, :2].contiguous(), qweight, sz, cb, k, 128, torch.float16), "binary_group_sums"),
        ((a_planes, sx, sums, qweight, sz[:2].contiguous(), cb, k, 128, torch.float16), "prepare_binary_weights"),
        ((a_planes, sx, sums, qweight, sz, cb.half(), k, 128, torch.float16), "col_bias"),
        ((a_planes, sx, sums, qweight, sz, cb, k, 128, torch.int32), "out_dtype"),
    ]
    for args, msg in cases:
        assert len(args) == len(good)
        with pytest.raises(RuntimeError, match=None) as info:
            OPS.gemm_binary(*args)
        assert msg in str(info.value), f"expected {msg!r} in: {str(info.value).splitlines()[0]}"
    for args, msg in [((qweight, sc[:, :2], None), "[N, G]"), ((qweight, sc, sc.float()), "dtype of scales")]:
        with pytest.raises(ValueError, match=None) as info:
            prepare_binary_weights(*args, k, 128, 2)
        assert msg in str(info.value)
    with pytest.raises(RuntimeError, match="a_bits"):
        OPS.quantize_activations(torch.randn(2, 64, device=DEV, dtype=torch.float16), 9)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        OPS.binary_group_sums(a_planes, k, 96)


# ---- timing ---------------------------------------------------------------------------------------
def bench(m=2048, n=4096, k=4096, w_bits=2, a_bits=2, g=128, iters=50):
    """Median of `iters` CUDA-event timings: linear_binary_cuda (quantize, sums, gemm), gemm_binary alone, fp16."""
    dtype = torch.float16
    codes = torch.randint(0, 2 ** w_bits, (n, k), device=DEV).to(torch.uint8)
    qweight = fmt.pack_codes(codes, w_bits)
    scales = (torch.rand(n, num_groups(k, g), device=DEV) * 0.01).to(dtype)
    zeros = (torch.randn(n, num_groups(k, g), device=DEV) * 0.01).to(dtype)
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    w = torch.randn(n, k, device=DEV, dtype=dtype)
    from vllm_bipolar import ops
    from vllm_bipolar.kernels.cuda_binary_gemm import prepare_binary_weights

    sz, col_bias = prepare_binary_weights(qweight, scales, zeros, k, g, a_bits)
    planes, sx = OPS.quantize_activations(x, a_bits)
    sums = OPS.binary_group_sums(planes, k, g)

    def timeit(fn):
        for _ in range(5):
            fn()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2] * 1e3  # us

    t_full = timeit(lambda: ops.linear_binary_cuda(x, qweight, sz, col_bias, k, g, a_bits))
    t_gemm = timeit(lambda: OPS.gemm_binary(planes, sx, sums, qweight, sz, col_bias, k, g, dtype))
    t_quant = timeit(lambda: OPS.quantize_activations(x, a_bits))
    t_fp16 = timeit(lambda: torch.matmul(x, w.T))
    ops_ = 2.0 * m * n * k
    print(f"W{w_bits}A{a_bits} g{g} M={m} N={n} K={k} ({torch.cuda.get_device_name()}), median of {iters}:")
    print(f"  linear_binary_cuda   {t_full:8.1f} us   gemm_binary {t_gemm:8.1f} us ({ops_ / t_gemm / 1e6:.0f} "
          f"effective TOPS)   quantize {t_quant:6.1f} us")
    print(f"  torch fp16 matmul    {t_fp16:8.1f} us ({ops_ / t_fp16 / 1e6:.0f} TFLOPS)   speedup "
          f"{t_fp16 / t_full:.2f}x (with quantize), {t_fp16 / t_gemm:.2f}x (gemm only)")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        if OPS is None:
            sys.exit(f"unavailable: {WHY}")
        bench()
        bench(g=256)
        bench(g=-1)
        bench(w_bits=4, a_bits=4)
        bench(m=16)
