"""GPU tests of the weight-only CUDA kernels (bipolar_kernels::gemm_a16 / dequantize_a16) and their op.

References, all independent of the kernels:
* vllm_bipolar.format (quantize_weight, pack_codes, dequantize_packed): the checkpoint's meaning;
* vllm_bipolar.kernels.a16_layout.dequantize: the repacked layout read back in float64 by torch;
* a float64 matmul.
Fresh random data on every run (the seed is in the failure message); outputs are poisoned by
allocating them fresh (torch.empty) and checking every element. Skips without CUDA or the extension.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import vllm_bipolar.format as fmt
from conftest import assert_within, load_kernel_ops, round_once
from vllm_bipolar.kernels import a16_layout

OPS, WHY = load_kernel_ops("gemm_a16", "dequantize_a16") if torch.cuda.is_available() else (None, "no CUDA device")
pytestmark = pytest.mark.skipif(OPS is None, reason=f"CUDA kernels unavailable: {WHY}")

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


# Which kernel serves an (M, N) call (csrc/bipolar_gemm_a16.cuh, use_decode_kernel; BIPOLAR_A16_DECODE_MAX_M
# forces the largest M of the decode kernel, for running every M through the mid-batch kernel). The
# decode kernel applies the scales in fp32 after the mma, so it uses W exactly; the mid-batch kernel and
# dequantize + cuBLAS use W rounded once to the activations' dtype.
_DECODE_MAX_M = os.environ.get("BIPOLAR_A16_DECODE_MAX_M")


def uses_decode_kernel(m: int, n: int) -> bool:
    if _DECODE_MAX_M:
        return m <= int(_DECODE_MAX_M)
    return m <= 8 or (m <= 16 and n < 8192)


def decode_beta_max(bits, dtype):
    """Largest beta of the decode kernel's codes beta + c (RawCode in csrc/bipolar_gemm_a16.cuh)."""
    if bits in (3, 5, 6, 7):
        return 2 ** bits  # codes of several parts sit at the top of the mantissa
    if bits == 8:
        return 256 if dtype == torch.float16 else 0  # bf16: through fp32, beta 0
    return 64 if dtype == torch.float16 else 128


@dataclass
class LayoutWeight:
    """W of a repacked layer in float64, exactly as the layout stores it, and per (row, channel) the
    magnitude the decode kernel accumulates in fp32 for it: 2 |s| (beta_max + L) + |z|."""
    exact: torch.Tensor
    decode_mag: torch.Tensor


def make_layer(n, k, bits, group_size, symmetric, dtype, gen=None):
    """Random checkpoint layer -> (repacked qweight, scales, shift, LayoutWeight)."""
    w = torch.randn(n, k, device=DEV, generator=gen) * 0.02 + torch.randn(n, 1, device=DEV, generator=gen) * 0.01
    q = fmt.quantize_weight(w, bits, group_size=group_size, symmetric=symmetric, dtype=dtype)
    qw, sc, shift = a16_layout.repack(fmt.pack_codes(q.codes, bits), q.scales, q.zeros, k, group_size)
    group = (torch.arange(k, device=DEV) >> shift).clamp(max=sc.shape[0] - 1)
    s, z = (sc[group, :n, i].T.to(torch.float64).abs() for i in (0, 1))  # [n, k]
    mag = 2 * s * (decode_beta_max(bits, dtype) + 2 ** bits - 1) + z
    return qw, sc, shift, LayoutWeight(a16_layout.dequantize(qw, sc, n, k, shift), mag)


def check_gemm(y, x, w, what):
    """|y - x @ W^T| within one output rounding plus fp32 accumulation: 2^-20 of sum |x||W| for W rounded
    to x.dtype (every path but the decode kernel); for the decode kernel, W exactly and 2^-20 of the
    magnitudes it accumulates (sum |x| decode_mag: beta + c, then sum beta x taken back out)."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.exact.shape[0]), what
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    x64 = x.to(torch.float64)
    if not uses_decode_kernel(x.shape[0], w.exact.shape[0]):
        wr = round_once(w.exact, x.dtype)
        accumulated = x64.abs() @ wr.abs().T
    else:
        wr = w.exact
        accumulated = x64.abs() @ (wr.abs() + w.decode_mag).T
    ref = x64 @ wr.T
    bound = ULP[x.dtype] * ref.abs() + 2.0 ** -20 * accumulated + 1e-6
    assert_within(y, ref, bound, what)


# ---- the main grid: every width, dtype, group size, offsets or not ----------------------------------
@pytest.mark.parametrize("group_size", [-1, 32, 128, 256, 96])
@pytest.mark.parametrize("symmetric", [False, True], ids=["offsets", "symmetric"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_gemm_a16_matches_reference(bits, dtype, symmetric, group_size):
    seed = torch.seed()
    for k in (576, 1536, 1000, 96):
        for n in (1, 3, 1553):
            qw, sc, shift, w = make_layer(n, k, bits, group_size, symmetric, dtype)
            for m in (1, 3, 8, 9, 16, 17, 64, 65, 255):
                x = torch.randn(m, k, device=DEV, dtype=dtype)
                y = OPS.gemm_a16(x, qw, sc, n, k, shift)
                check_gemm(y, x, w, f"W{bits} {dtype} sym={symmetric} g={group_size} M={m} N={n} K={k} seed={seed}")


@pytest.mark.parametrize("k", [4096, 11008, 14336])
def test_gemm_a16_model_shapes(k):
    seed = torch.seed()
    for bits, n in ((2, 4096 + 17), (4, 1024), (3, 77)):
        qw, sc, shift, w = make_layer(n, k, bits, 128, False, torch.float16)
        for m in (1, 16, 17, 100):
            x = torch.randn(m, k, device=DEV, dtype=torch.float16)
            check_gemm(OPS.gemm_a16(x, qw, sc, n, k, shift), x, w, f"W{bits} M={m} N={n} K={k} seed={seed}")


def test_gemm_a16_wide_layer():
    """N = 49152 + 17 (a fused vocab-sized layer), not a multiple of any tile."""
    n, k = 49152 + 17, 576
    qw, sc, shift, w = make_layer(n, k, 4, 64, False, torch.bfloat16)
    for m in (1, 16, 33):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        check_gemm(OPS.gemm_a16(x, qw, sc, n, k, shift), x, w, f"N={n} M={m}")


# ---- exact arithmetic: every wrong element shows ------------------------------------------------------
def exact_layer(n, k, bits, group_size, dtype, gen):
    """Random codes with (s, z) chosen so that W and every partial sum are exact in fp32 and W in dtype."""
    codes = torch.randint(0, 2 ** bits, (n, k), device=DEV, generator=gen).to(torch.uint8)
    g = 1 if group_size == -1 else -(-k // group_size)
    ones = torch.ones(n, g, device=DEV, dtype=dtype)
    qw, sc, shift = a16_layout.repack(fmt.pack_codes(codes, bits), ones, None, k, group_size)
    gp, np_ = sc.shape[:2]
    if dtype == torch.float16:  # z + s v on a 2^-4 grid below 66: 11 significant bits suffice
        s = torch.pow(2.0, -torch.randint(2, 5, (gp, np_), device=DEV, generator=gen).float())
        z = torch.randint(-32, 33, (gp, np_), device=DEV, generator=gen).float() / 16
    else:  # bf16, 8 significant bits: v/16 + z below 3 (bits <= 4), v/16 alone (wider codes)
        s = torch.full((gp, np_), 2.0 ** -4, device=DEV)
        z = torch.randint(-32, 33, (gp, np_), device=DEV, generator=gen).float() / 16 * (bits <= 4)
    sc = torch.stack([s, z], dim=-1).to(dtype).contiguous()
    w = a16_layout.dequantize(qw, sc, n, k, shift)
    assert torch.equal(w.to(dtype).to(torch.float64), w), "test data not exact in the dtype"
    return qw, sc, shift, w


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_gemm_a16_exact(bits, dtype):
    gen = torch.Generator(device=DEV)
    seed = torch.seed()
    gen.manual_seed(seed)
    # (576, 128): 9 blocks, so with 8 decode warps (test_decode_kernel_variants) the last warp's run ends
    # after the first block of a 128-channel group
    for k, group_size in ((4096, 128), (1000, 32), (576, -1), (576, 128), (96, 256), (1536, 256)):
        n = 1553
        qw, sc, shift, w = exact_layer(n, k, bits, group_size, dtype, gen)
        for m in (1, 3, 16, 17, 80):
            x = torch.randint(-2, 3, (m, k), device=DEV, generator=gen).to(dtype)
            y = OPS.gemm_a16(x, qw, sc, n, k, shift)
            ref = (x.to(torch.float64) @ w.T).to(dtype)
            bad = (y != ref).sum().item()
            assert bad == 0, f"W{bits} {dtype} K={k} g={group_size} M={m} seed={seed}: {bad} outputs differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_dequantize_a16_matches_layout(bits, dtype):
    """The dense weight equals the layout's float64 reading rounded once (bf16 W8 goes through fp32: 1 ulp)."""
    for n, k, group_size in ((1553, 1000, 32), (3, 96, -1), (64, 576, 128)):
        qw, sc, shift, w = make_layer(n, k, bits, group_size, False, dtype)
        got = OPS.dequantize_a16(qw, sc, n, k, shift)
        assert got.shape == (n, k) and got.dtype == dtype
        exact = round_once(a16_layout.dequantize(qw, sc, n, k, shift), dtype)
        assert_rounded_once(got.to(torch.float64), exact, bits, dtype, f"W{bits} {dtype} N={n} K={k} g={group_size}")


def assert_rounded_once(got, want, bits, dtype, what):
    """Kernel weights (float64) equal `want`, the exact weights rounded once to dtype, bit for bit; bf16 W8
    goes through fp32 (1 ulp)."""
    if bits == 8 and dtype == torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=ULP[dtype], atol=0, msg=what)
        return
    bad = got != want
    assert not bad.any(), (f"{what}: {int(bad.sum())} weights differ, e.g. kernel {got[bad][:3].tolist()} "
                           f"reference {want[bad][:3].tolist()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_mid_kernel_weights_are_rounded_once(bits, dtype):
    """The mid-batch kernel's weights, read out one channel at a time (x = rows of the identity, M = 100:
    each output is one product, exact in fp32, then a dtype value again), equal z + s v rounded once to the
    dtype (bf16 W8 goes through fp32: 1 ulp). Pins down which rounding the kernel's decode makes, which the
    float tests only see through sums."""
    n, k, chunk = 200, 1000, 100
    qw, sc, shift, w = make_layer(n, k, bits, 32, False, dtype)
    want = round_once(w.exact, dtype)
    for c0 in range(0, k, chunk):
        x = torch.zeros(chunk, k, device=DEV, dtype=dtype)
        x[torch.arange(chunk), c0 + torch.arange(chunk)] = 1
        got = OPS.gemm_a16(x, qw, sc, n, k, shift).T.to(torch.float64)  # [n, chunk]: W[:, c0 + i]
        assert_rounded_once(got, want[:, c0:c0 + chunk], bits, dtype, f"W{bits} {dtype} channels {c0}..{c0 + chunk - 1}")


def test_layout_matches_checkpoint():
    """The repacked weight is the checkpoint's weight: z + s v rounded once, like the reference."""
    for bits in (1, 3, 4, 7, 8):
        n, k, gs = 1553, 1000, 32
        w0 = torch.randn(n, k, device=DEV) * 0.02
        q = fmt.quantize_weight(w0, bits, group_size=gs, symmetric=False, dtype=torch.float16)
        qweight = fmt.pack_codes(q.codes, bits)
        ref = fmt.dequantize_packed(qweight, q.scales, q.zeros, k, gs, torch.float64)
        qw, sc, shift = a16_layout.repack(qweight, q.scales, q.zeros, k, gs)
        got = OPS.dequantize_a16(qw, sc, n, k, shift).to(torch.float64)
        assert torch.equal(got, round_once(ref, torch.float16)), f"W{bits}"


# ---- the op: dispatch by M, odd K, unaligned and strided activations ----------------------------------
def test_op_dispatch_and_odd_inputs():
    from vllm_bipolar import ops

    n, k = 1553, 1000
    qw, sc, shift, w = make_layer(n, k, 4, 128, False, torch.float16)
    for m in (1, 16, 17, ops.A16_FUSED_MAX_M, ops.A16_FUSED_MAX_M + 1, 1000):
        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
        check_gemm(ops.linear_a16_cuda(x, qw, sc, n, k, shift), x, w, f"op M={m}")
    # K not a multiple of 8: the op zero-pads the activations
    k2 = 100
    qw2, sc2, shift2, w2 = make_layer(n, k2, 3, 32, True, torch.bfloat16)
    x = torch.randn(5, k2, device=DEV, dtype=torch.bfloat16)
    check_gemm(ops.linear_a16_cuda(x, qw2, sc2, n, k2, shift2), x, w2, "op K=100")
    # unaligned base and a row stride that is not a multiple of 8
    buf = torch.randn(5 * k + 8, device=DEV, dtype=torch.float16)
    x = buf[1:1 + 5 * k].view(5, k)
    check_gemm(ops.linear_a16_cuda(x, qw, sc, n, k, shift), x, w, "op unaligned")
    wide = torch.randn(9, k + 5, device=DEV, dtype=torch.float16)
    check_gemm(ops.linear_a16_cuda(wide[:, :k], qw, sc, n, k, shift), wide[:, :k], w, "op strided")


def test_empty_batch_and_bad_arguments():
    n, k = 17, 256
    qw, sc, shift, _ = make_layer(n, k, 4, 128, False, torch.float16)
    y = OPS.gemm_a16(torch.empty(0, k, device=DEV, dtype=torch.float16), qw, sc, n, k, shift)
    assert y.shape == (0, n)
    x = torch.randn(2, k, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="dtype of x"):
        OPS.gemm_a16(x.bfloat16(), qw, sc, n, k, shift)
    with pytest.raises(RuntimeError, match="qweight must be"):
        OPS.gemm_a16(x, qw[:, :2], sc, n, k, shift)
    with pytest.raises(RuntimeError, match="scales must be"):
        OPS.gemm_a16(x, qw, sc[:1], n, k, shift)
    with pytest.raises(RuntimeError, match="columns but k"):
        OPS.gemm_a16(x[:, :128], qw, sc, n, k, shift)


def test_cuda_graph_capture_and_replay():
    n, k = 1553, 4096
    qw, sc, shift, w = make_layer(n, k, 2, 128, False, torch.float16)
    xs = torch.randn(3, k, device=DEV, dtype=torch.float16)
    OPS.gemm_a16(xs, qw, sc, n, k, shift)  # warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = OPS.gemm_a16(xs, qw, sc, n, k, shift)
    for _ in range(3):
        xs.copy_(torch.randn_like(xs))
        graph.replay()
        torch.cuda.synchronize()
        check_gemm(ys, xs, w, "graph replay")


@pytest.mark.parametrize("switch", ["BIPOLAR_A16_DECODE_CHUNK=1", "BIPOLAR_A16_DECODE_WARPS=32",
                                    "BIPOLAR_A16_DECODE_WARPS=8"])
def test_decode_kernel_variants(switch):
    """Decode kernel variants the defaults leave to some shapes change how warps walk K and fold their scale
    groups, not the result. With the switch set (read once per process: a subprocess), the exact-arithmetic
    test (K of 2 to 64 blocks, group sizes 32 to per-row) and the model shapes (K up to 224 blocks) pass for
    every width: one-block chunks everywhere (BIPOLAR_A16_DECODE_CHUNK=1; the default takes two blocks at
    1-2 bits where it can), the 32-warp CTA wherever it can run (M <= 8 at 1, 2, 4 bits with x in
    shared memory; the default takes it only for K >= 8192 on narrow layers, a16::kDecodeWarps32MinBlocks),
    and 8-warp CTAs everywhere (runs of an even number of blocks where the default has odd ones, so that
    128-channel groups take two one-block chunks, DecodeConfig::kGroupChunks, and a run may end after a
    group's first block)."""
    code = ("import test_cuda_kernels as t\n"
            "for bits in range(1, 9):\n"
            "    for dtype in t.DTYPES: t.test_gemm_a16_exact(bits, dtype)\n"
            "for k in (4096, 11008, 14336): t.test_gemm_a16_model_shapes(k)\n")
    tests = Path(__file__).resolve().parent
    name, value = switch.split("=")
    env = dict(os.environ, **{name: value},
               PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tests, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{switch}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


# ---- WpAq layers through the weight-only kernels ---------------------------------------------------
@pytest.mark.parametrize("a_bits", [1, 2, 4, 8])
@pytest.mark.parametrize("w_bits", [1, 2, 3, 4, 8])
def test_wpaq_through_a16_kernels(w_bits, a_bits):
    """The cuda_gemm_a16 backend's WpAq layer = per-token activation quantization (the reference's own
    function), then the weight-only op: equal to x_q @ W within the kernels' rounding, for every M path."""
    from vllm_bipolar import ops
    from vllm_bipolar.format import fake_quantize_activations

    seed = torch.seed()
    n, k = 1553, 1536
    qw, sc, shift, w = make_layer(n, k, w_bits, 128, False, torch.float16)
    for m in (1, 9, 17, 100):
        x = torch.randn(m, k, device=DEV, dtype=torch.float16) * 3
        xq = fake_quantize_activations(x, a_bits)
        y = ops.linear_a16_cuda(xq, qw, sc, n, k, shift)
        what = f"W{w_bits}A{a_bits} M={m} seed={seed}"
        if ops.a16_uses_fused_kernel(m):
            check_gemm(y, xq, w, what)
        else:
            # dequantize + cuBLAS: the fp16 GEMM of unquantized layers (torch lets cuBLAS reduce in
            # reduced precision), so the reference is that GEMM on the layout's exact weights
            ref = torch.nn.functional.linear(xq, round_once(w.exact, xq.dtype).to(xq.dtype))
            torch.testing.assert_close(y, ref, rtol=ULP[xq.dtype], atol=ULP[xq.dtype] * float(ref.abs().max()), msg=what)
