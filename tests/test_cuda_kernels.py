"""GPU tests of the bipolar CUDA kernels (torch.ops.bipolar_kernels, built from csrc/ as vllm_bipolar._C).

Every result is compared with the pure-torch definition of the format (vllm_bipolar.format):
quantize_weight + pack_codes make the checkpoint tensors, dequantize_packed in float64 gives the
dense weight, and a float64 matmul the reference. Data is fresh random on every run.

Skips cleanly when there is no CUDA device or the extension was not built
(`python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import vllm_bipolar.format as fmt  # noqa: E402  (the package __init__ imports neither vLLM nor _C)
from conftest import load_kernel_ops  # noqa: E402

OPS, WHY = load_kernel_ops("gemm_a16") if torch.cuda.is_available() else (None, "no CUDA device")

pytestmark = pytest.mark.skipif(OPS is None, reason=f"CUDA kernels unavailable: {WHY}")

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
ALL_BITS = list(range(1, 9))
GROUP_SIZES = [-1, 32, 128, 256]
# 576/1536/4096: model-like; 4000: partial last group for 128/256; 96: one word group, K < group;
# 1000: partial last word (K % 32 = 8) with 16-byte aligned rows; 100: K % 8 != 0 (scalar loads)
KS = [576, 1536, 4096, 4000, 96, 1000, 100]
NS = [1, 3, 1536 + 17]
MS = [1, 2, 3, 16, 17, 255]  # M tiles are 1, 2 or 4 rows: 2 and 3 hit the small tiles, 17 a partial one
# One ulp of the output dtype, relative (the kernel rounds an fp32 result once).
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def make_layer(n: int, k: int, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype):
    """Random weight -> (qweight, scales, zeros, dense float64 reference weight, per-column scales)."""
    w = torch.randn(n, k, device=DEV) * 0.02 + torch.randn(n, 1, device=DEV) * 0.01
    q = fmt.quantize_weight(w, bits, group_size=group_size, symmetric=symmetric, dtype=dtype)
    qweight = fmt.pack_codes(q.codes, bits)
    assert qweight.shape == (bits, n, math.ceil(k / 32)) and qweight.dtype == torch.int32
    w_ref = fmt.dequantize_packed(qweight, q.scales, q.zeros, k, group_size, torch.float64)
    s_cols = fmt.expand_groups(q.scales.to(torch.float64), k, group_size)
    return qweight, q.scales, q.zeros, w_ref, s_cols


def error_bound(x: torch.Tensor, w_ref: torch.Tensor, s_cols: torch.Tensor, bits: int, ref: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on |kernel - float64 reference|.

    * one output ulp (the fp32 result is rounded once to fp16/bf16);
    * fp32 accumulation: per 32-element word the kernel sums x_j * f_j with f_j <= 2^(bits+4) + 2L
      (bipolar_decode.cuh), so 2^-18 (twice 32 * 2^-24) * sum_j |x_j| s_j (2^(bits+4) + 2L), and
      2^-16 * sum |x| |w| for the sums across words and the scale products;
    * 1e-7 absolute for outputs that land in the subnormal range.
    """
    lv = 2 ** bits - 1
    f_max = (min(2 ** (bits + 4), 256) if bits <= 7 else 0) + 2 * lv
    xa = x.to(torch.float64).abs()
    acc = 2.0 ** -18 * (xa @ (s_cols.abs() * f_max).T) + 2.0 ** -16 * (xa @ w_ref.abs().T)
    return ULP[dtype] * ref.abs() + acc + 1e-7


def check_close(y: torch.Tensor, x: torch.Tensor, w_ref, s_cols, bits: int, what: str):
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w_ref.shape[0]), what
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    ref = x.to(torch.float64) @ w_ref.T
    err = (y.to(torch.float64) - ref).abs()
    bound = error_bound(x, w_ref, s_cols, bits, ref, x.dtype)
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err / bound).flatten()))
        m, n = divmod(i, ref.shape[1])
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} outputs off; worst at (m={m}, n={n}): "
                    f"kernel {y[m, n].item():.6g}, reference {ref[m, n].item():.6g}, bound {bound[m, n].item():.3g}")
    # the coarse criterion of the design brief, relative to the output norm
    rel = torch.linalg.vector_norm(y.to(torch.float64) - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)
    assert rel < 1e-2, f"{what}: relative error {rel.item():.3g} of the output norm"


def gemm(x, qweight, scales, zeros, k, group_size):
    return OPS.gemm_a16(x, qweight, scales, zeros, k, group_size)


# ---- the main grid ------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["offsets", "symmetric"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_gemm_a16_matches_reference(bits, dtype, symmetric, group_size):
    seed = torch.seed()  # fresh data every run; the seed is in the failure message
    for k in KS:
        for n in NS:
            qweight, scales, zeros, w_ref, s_cols = make_layer(n, k, bits, group_size, symmetric, dtype)
            for m in MS:
                x = torch.randn(m, k, device=DEV, dtype=dtype)
                y = gemm(x, qweight, scales, zeros, k, group_size)
                check_close(y, x, w_ref, s_cols, bits,
                            f"bits={bits} {dtype} sym={symmetric} g={group_size} M={m} N={n} K={k} seed={seed}")


# ---- exact arithmetic: integers and powers of two -----------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_gemm_a16_exact_on_representable_data(bits, dtype):
    """x small integers, scales powers of two, offsets quarter-integers: every fp32 step of the
    kernel is exact, so the output is the float64 product rounded once (at most 1 ulp off, and
    nearly always exactly equal). Catches any wrong element, plane, group or row."""
    gen = torch.Generator(device=DEV)
    gen.manual_seed(torch.seed())
    for k, group_size in [(4096, 128), (1000, 32), (100, -1), (96, 256)]:
        n, lv = 1536 + 17, 2 ** bits - 1
        ng = 1 if group_size == -1 else math.ceil(k / group_size)
        codes = torch.randint(0, lv + 1, (n, k), device=DEV, generator=gen).to(torch.uint8)
        qweight = fmt.pack_codes(codes, bits)
        scales = torch.pow(2.0, torch.randint(-6, -2, (n, ng), device=DEV, generator=gen).float()).to(dtype)
        zeros = (torch.randint(-16, 17, (n, ng), device=DEV, generator=gen).float() / 4).to(dtype)
        for zs in (zeros, None):
            w_ref = fmt.dequantize(codes, scales, zs, bits, group_size, torch.float64)
            for m in (1, 3, 17):
                x = torch.randint(-2, 3, (m, k), device=DEV, generator=gen).to(dtype)
                y = gemm(x, qweight, scales, zs, k, group_size)
                ref = x.to(torch.float64) @ w_ref.T
                assert torch.isfinite(y).all()
                err = (y.to(torch.float64) - ref).abs()
                ulp = ULP[dtype] * ref.abs().clamp_min(2.0 ** -14)
                what = f"bits={bits} {dtype} K={k} g={group_size} M={m} zeros={zs is not None}"
                assert (err <= ulp).all(), f"{what}: max error {err.max().item():.4g} > 1 ulp"
                exact = (y.to(torch.float64) == ref.to(dtype).to(torch.float64)).float().mean().item()
                assert exact > 0.99, f"{what}: only {exact:.3f} of outputs exact"


# ---- layout edge cases --------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_padding_bits_are_ignored(bits):
    """Bits past K in the last word are 0 in a valid checkpoint; the kernel must not depend on them."""
    k, n, group_size = 1000, 1553, 128  # 1000 = 31 * 32 + 8: the last word holds 8 real columns
    qweight, scales, zeros, w_ref, s_cols = make_layer(n, k, bits, group_size, False, torch.float16)
    dirty = qweight.clone()
    dirty[:, :, -1] |= torch.tensor(-(1 << (k % 32)), dtype=torch.int32, device=DEV)  # set bits 8..31
    for m in (1, 16, 40):
        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
        y_clean = gemm(x, qweight, scales, zeros, k, group_size)
        y_dirty = gemm(x, dirty, scales, zeros, k, group_size)
        assert torch.equal(y_clean, y_dirty), f"M={m}: output depends on padding bits"
        check_close(y_dirty, x, w_ref, s_cols, bits, f"padding bits={bits} M={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_unaligned_activations(dtype):
    """x starting 2 bytes past a 16-byte boundary (no vector loads possible)."""
    k, n, bits = 1536, 1553, 4
    qweight, scales, zeros, w_ref, s_cols = make_layer(n, k, bits, 128, False, dtype)
    for m in (1, 5, 17):
        buf = torch.randn(m * k + 8, device=DEV, dtype=dtype)
        x = buf[1:1 + m * k].view(m, k)
        assert x.data_ptr() % 16 != 0 and x.is_contiguous()
        check_close(gemm(x, qweight, scales, zeros, k, 128), x, w_ref, s_cols, bits, f"unaligned M={m}")


def test_row_strided_activations():
    """x a column slice of a wider tensor: rows ldx > K apart (aligned and unaligned strides)."""
    k, n, bits = 1000, 1553, 3
    qweight, scales, zeros, w_ref, s_cols = make_layer(n, k, bits, 32, False, torch.bfloat16)
    for extra in (24, 5):
        wide = torch.randn(17, k + extra, device=DEV, dtype=torch.bfloat16)
        x = wide[:, :k]
        assert not x.is_contiguous() and x.stride(1) == 1
        check_close(gemm(x, qweight, scales, zeros, k, 32), x, w_ref, s_cols, bits, f"row stride {k + extra}")


@pytest.mark.parametrize("bits", [2, 4])
def test_large_m(bits):
    """Correctness (not speed) for prefill-sized M: the M tiles loop over the grid."""
    k, n, m = 1536, 1553, 2049
    qweight, scales, zeros, w_ref, s_cols = make_layer(n, k, bits, 128, False, torch.bfloat16)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    check_close(gemm(x, qweight, scales, zeros, k, 128), x, w_ref, s_cols, bits, f"M={m}")


def test_empty_batch():
    qweight, scales, zeros, _, _ = make_layer(17, 256, 4, 128, False, torch.float16)
    y = gemm(torch.empty(0, 256, device=DEV, dtype=torch.float16), qweight, scales, zeros, 256, 128)
    assert y.shape == (0, 17) and y.dtype == torch.float16


# ---- CUDA graphs and streams --------------------------------------------------------------------
def test_cuda_graph_capture_and_replay():
    k, n, bits, m = 4096, 1553, 4, 3
    qweight, scales, zeros, w_ref, s_cols = make_layer(n, k, bits, 128, False, torch.float16)
    static_x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as torch.cuda.graphs asks
        gemm(static_x, qweight, scales, zeros, k, 128)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = gemm(static_x, qweight, scales, zeros, k, 128)
    for _ in range(3):
        static_x.copy_(torch.randn(m, k, device=DEV, dtype=torch.float16))
        graph.replay()
        torch.cuda.synchronize()
        check_close(static_y, static_x, w_ref, s_cols, bits, "graph replay")
        assert torch.equal(static_y, gemm(static_x, qweight, scales, zeros, k, 128))


def test_runs_on_the_current_stream():
    k, n, bits = 4096, 1553, 2
    qweight, scales, zeros, w_ref, s_cols = make_layer(n, k, bits, 64, False, torch.bfloat16)
    side = torch.cuda.Stream()
    x = torch.randn(16, k, device=DEV, dtype=torch.bfloat16)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = gemm(x, qweight, scales, zeros, k, 64)
    side.synchronize()
    check_close(y, x, w_ref, s_cols, bits, "side stream")


# ---- argument checks ------------------------------------------------------------------------------
def run_argument_checks() -> list[str]:
    """Call the op with one bad argument at a time; return what did not raise the expected error."""
    k, n = 256, 8
    qweight, scales, zeros, _, _ = make_layer(n, k, 3, 128, False, torch.float16)
    x = torch.randn(2, k, device=DEV, dtype=torch.float16)
    cases = [
        ((x.float(), qweight, scales, zeros, k, 128), "float16 or bfloat16"),
        ((x.cpu(), qweight, scales, zeros, k, 128), "CUDA"),
        ((x[:, :128].contiguous(), qweight, scales, zeros, k, 128), "columns"),
        ((torch.randn(k, 2, device=DEV, dtype=torch.float16).T, qweight, scales, zeros, k, 128), "contiguous rows"),
        ((x, qweight[:, :, :-1].contiguous(), scales, zeros, k, 128), "ceil(k/32)"),
        ((x, qweight.to(torch.int64), scales, zeros, k, 128), "int32"),
        ((x, qweight, scales.to(torch.bfloat16), zeros, k, 128), "dtype of x"),
        ((x, qweight, scales[:, :1].contiguous(), zeros, k, 128), "scales must be [N, G]"),
        ((x, qweight, scales, zeros[:-1], k, 128), "zeros must be [N, G]"),
        ((x, qweight, scales, zeros, k, 48), "multiple of 32"),
        ((x, torch.zeros(9, n, k // 32, dtype=torch.int32, device=DEV), scales, zeros, k, 128), "1..8"),
    ]
    problems = []
    for args, message in cases:
        try:
            gemm(*args)
        except RuntimeError as exc:
            if message not in str(exc):
                problems.append(f"expected {message!r} in the error, got: {str(exc).splitlines()[0]}")
        else:
            problems.append(f"no error raised for the case {message!r}")
    return problems


def test_argument_checks_have_clear_messages():
    """Bad arguments raise RuntimeErrors that say what is wrong.

    Run in a child process: on the GPU image used during development (extension built with
    CC=/opt/gcc) raising from the op crashed the process, and a crash must fail this test only,
    not end the whole test session."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import test_cuda_kernels as t; p = t.run_argument_checks(); print(*p, sep='\\n'); sys.exit(1 if p else 0)")
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (f"argument checks failed (exit status {r.returncode}):\n{r.stdout[-4000:]}\n"
                               f"{r.stderr[-4000:]}")
