"""Torch custom ops of vllm-bipolar, each with a fake (meta) implementation.

vLLM traces models with torch.compile and replays them as CUDA graphs; every bipolar computation
is therefore one opaque custom op whose fake implementation gives the output's shape and dtype
without touching data.

* ``bipolar::linear``: the pure-torch path (any device), defined here.
* ``bipolar_kernels::*``: the CUDA kernels of ``csrc/``, defined in C++ by the extension
  ``vllm_bipolar._C`` when it was built; their fakes are registered here.
"""

from __future__ import annotations

import os

import torch

from .format.reference import bipolar_linear

try:  # the CUDA extension is optional: absent on CPU-only installs
    from . import _C  # noqa: F401  (importing registers the bipolar_kernels ops)

    CUDA_EXTENSION_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the build
    CUDA_EXTENSION_ERROR = (f"the CUDA extension vllm_bipolar._C is not available ({e}); build it on a CUDA "
                            "machine with `pip install --no-build-isolation -e .`")


def cuda_extension_available() -> bool:
    return CUDA_EXTENSION_ERROR is None


@torch.library.custom_op("bipolar::linear", mutates_args=())
def linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           bias: torch.Tensor | None, k: int, group_size: int, a_bits: int) -> torch.Tensor:
    """y = x @ W^T + bias for a bipolar layer in checkpoint layout (pure torch, any device)."""
    return bipolar_linear(x, qweight, scales, zeros, bias, k, group_size, a_bits)


@linear.register_fake
def _(x, qweight, scales, zeros, bias, k, group_size, a_bits):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


# Which batches (tokens) the fused weight-only kernels take (the decode kernel up to 8-16 tokens, the
# mid-batch kernel above); larger ones dequantize the weight once per call and use cuBLAS. Tuned
# from benchmarks/kernels.py on an H100 (benchmarks/results/kernels_a16_h100.json and
# kernels_fused256_h100.json): at M = 128 the mid-batch kernel takes 54-66 us on the 11008- and
# 14336-wide layers where dequantize + cuBLAS takes 79-110; at M = 256 dequantize + cuBLAS wins.
# BIPOLAR_A16_FUSED_MAX_M overrides it (for tuning: the benchmark then times the fused kernels at
# every M).
A16_FUSED_MAX_M = int(os.environ.get("BIPOLAR_A16_FUSED_MAX_M", "128"))


def a16_uses_fused_kernel(m: int) -> bool:
    return m <= A16_FUSED_MAX_M


def _a16_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, n: int, k: int,
                 group_shift: int) -> torch.Tensor:
    if not a16_uses_fused_kernel(x.shape[0]):
        w = torch.ops.bipolar_kernels.dequantize_a16(qweight, scales, n, k, group_shift)
        return torch.nn.functional.linear(x, w)
    if k % 8:  # the kernel copies 16-byte row chunks: zero channels up to a multiple of 8 contribute 0
        pad = 8 - k % 8
        x = torch.nn.functional.pad(x, (0, pad))
        k += pad
    elif x.data_ptr() % 16 or (x.shape[0] > 1 and x.stride(0) % 8):
        x = x.clone(memory_format=torch.contiguous_format)
    return torch.ops.bipolar_kernels.gemm_a16(x, qweight, scales, n, k, group_shift)


@torch.library.custom_op("bipolar::linear_a16_cuda", mutates_args=())
def linear_a16_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, n: int, k: int,
                    group_shift: int) -> torch.Tensor:
    """Weight-only bipolar linear on CUDA (repacked layout, kernels/a16_layout.py), x [M, K] -> [M, N].

    The kernel depends on the number of tokens, so it is chosen here, inside an opaque op: a Python
    branch in the layer would be frozen by torch.compile to whatever M the warm-up used.
    """
    return _a16_forward(x, qweight, scales, n, k, group_shift)


@linear_a16_cuda.register_fake
def _(x, qweight, scales, n, k, group_shift):
    return x.new_empty((x.shape[0], n))


# From which batch (tokens) WpAq layers run the int8 tensor-core kernel (csrc/bipolar_gemm_int8.cuh) instead
# of the weight-only kernels on fake-quantized activations; 0 = never. BIPOLAR_WPAQ_INT8_MIN_M overrides it
# (for tuning: 1 runs every batch through the int8 kernel).
WPAQ_INT8_MIN_M = int(os.environ.get("BIPOLAR_WPAQ_INT8_MIN_M", "0"))


def wpaq_uses_int8_kernel(m: int) -> bool:
    return WPAQ_INT8_MIN_M > 0 and m >= WPAQ_INT8_MIN_M


def wpaq_int8_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, col_bias: torch.Tensor, n: int,
                      k: int, group_shift: int, a_bits: int) -> torch.Tensor:
    """The int8 kernel's product: activation codes and sums in one pass over x, then the GEMM."""
    codes, sx, sums = torch.ops.bipolar_kernels.quantize_activations_int8(x, a_bits, group_shift)
    return torch.ops.bipolar_kernels.gemm_int8(codes, sx, sums, qweight, scales, col_bias, n, k, group_shift, a_bits)


@torch.library.custom_op("bipolar::linear_wpaq_cuda", mutates_args=())
def linear_wpaq_cuda(x: torch.Tensor, x_fq: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     col_bias: torch.Tensor, n: int, k: int, group_shift: int, a_bits: int) -> torch.Tensor:
    """WpAq bipolar linear on CUDA over the weight-only layout, x [M, K] -> [M, N].

    ``x_fq``: x quantized per token and dequantized (format.fake_quantize_activations, computed outside
    the op so that torch.compile fuses it), for the weight-only kernels at small M; large M quantizes
    x itself for the int8 kernel (``wpaq_uses_int8_kernel``). Chosen here, per call, like linear_a16_cuda.
    """
    if wpaq_uses_int8_kernel(x.shape[0]):
        return wpaq_int8_forward(x, qweight, scales, col_bias, n, k, group_shift, a_bits)
    return _a16_forward(x_fq, qweight, scales, n, k, group_shift)


@linear_wpaq_cuda.register_fake
def _(x, x_fq, qweight, scales, col_bias, n, k, group_shift, a_bits):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("bipolar::linear_binary_cuda", mutates_args=())
def linear_binary_cuda(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, col_bias: torch.Tensor,
                       k: int, group_size: int, a_bits: int) -> torch.Tensor:
    """WpAq bipolar linear on binary tensor cores, x [M, K] -> [M, N] (x.dtype).

    Quantizes the activations per token into bit planes, sums their codes per group, then the
    AND-popcount GEMM: one opaque op for the layer, so torch.compile sees neither the planes nor the
    activation scales. ``sz`` / ``col_bias``: the weights' prepared terms
    (``kernels.cuda_binary_gemm.prepare_binary_weights``, built once at load time).
    """
    planes, sx = torch.ops.bipolar_kernels.quantize_activations(x, a_bits)
    sums = torch.ops.bipolar_kernels.binary_group_sums(planes, k, group_size)
    return torch.ops.bipolar_kernels.gemm_binary(planes, sx, sums, qweight, sz, col_bias, k, group_size, x.dtype)


@linear_binary_cuda.register_fake
def _(x, qweight, sz, col_bias, k, group_size, a_bits):
    return x.new_empty((x.shape[0], qweight.shape[1]))


def _register_kernel_fakes() -> None:
    if not cuda_extension_available():
        return

    def fake(name: str):
        # An extension built from older sources lacks the newer ops: registering a fake for a missing op
        # would raise here and break every backend; its kernels say "rebuild it" in can_implement instead.
        if hasattr(torch.ops.bipolar_kernels, name):
            return torch.library.register_fake(f"bipolar_kernels::{name}")
        return lambda fn: fn

    @fake("gemm_a16")
    def _(x, qweight, scales, n, k, group_shift):
        return x.new_empty((x.shape[0], n))

    @fake("dequantize_a16")
    def _(qweight, scales, n, k, group_shift):
        return scales.new_empty((n, k))

    @fake("quantize_activations")
    def _(x, a_bits):
        words = (x.shape[1] + 31) // 32
        return (x.new_empty((a_bits, x.shape[0], words), dtype=torch.int32),
                x.new_empty((x.shape[0],), dtype=torch.float32))

    @fake("quantize_activations_int8")
    def _(x, a_bits, group_shift):
        kp = (x.shape[1] + 127) // 128 * 128
        glen = kp if group_shift == 30 else 1 << group_shift
        return (x.new_empty((x.shape[0], kp), dtype=torch.uint8), x.new_empty((x.shape[0],), dtype=torch.float32),
                x.new_empty((-(-x.shape[1] // glen), (x.shape[0] + 3) // 4 * 4), dtype=torch.int32))

    @fake("gemm_int8")
    def _(a_codes, a_scales, a_sums, qweight, scales, col_bias, n, k, group_shift, a_bits):
        return scales.new_empty((a_codes.shape[0], n))

    @fake("gemm_binary")
    def _(a_planes, a_scales, a_sums, qweight, sz, col_bias, k, group_size, out_dtype):
        return a_scales.new_empty((a_planes.shape[1], qweight.shape[1]), dtype=out_dtype)

    @fake("binary_group_sums")
    def _(planes, k, group_size):
        groups = 1 if group_size == -1 else -(-k // group_size)
        return planes.new_empty((groups, (planes.shape[1] + 3) // 4 * 4), dtype=torch.int32)

_register_kernel_fakes()
