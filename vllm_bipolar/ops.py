"""Torch custom ops of vllm-bipolar, each with a fake (meta) implementation.

vLLM traces models with torch.compile and replays them as CUDA graphs; every bipolar computation
is therefore one opaque custom op whose fake implementation gives the output's shape and dtype
without touching data.

* ``bipolar::linear``: the pure-torch path (any device), defined here.
* ``bipolar_kernels::*``: the CUDA kernels of ``csrc/``, defined in C++ by the extension
  ``vllm_bipolar._C`` when it was built; their fakes are registered here.
"""

from __future__ import annotations

import torch

from .format.reference import bipolar_linear, dequantize_packed

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


# Largest batch (tokens) for which the weight-streaming kernel beats dequantize + cuBLAS on an H100
# (N=11008, K=4096, 4-bit: 16.6 us vs 35.2 us for fp16 at M=1, 24-30 us vs 35 at M=2, slower from
# M=4 on). Larger batches take the dequantize + matmul path until tensor-core kernels exist.
GEMV_MAX_M = 2


@torch.library.custom_op("bipolar::linear_a16_cuda", mutates_args=())
def linear_a16_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    k: int, group_size: int) -> torch.Tensor:
    """Weight-only bipolar linear on CUDA, x [M, K] -> [M, N]; picks the kernel by M.

    The choice depends on the number of tokens, so it is made here, inside an opaque op: a Python
    branch in the layer would be frozen by torch.compile to whatever M the warm-up used.
    """
    if x.shape[0] <= GEMV_MAX_M:
        return torch.ops.bipolar_kernels.gemm_a16(x, qweight, scales, zeros, k, group_size)
    w = dequantize_packed(qweight, scales, zeros, k, group_size, x.dtype)
    return torch.nn.functional.linear(x, w)


@linear_a16_cuda.register_fake
def _(x, qweight, scales, zeros, k, group_size):
    return x.new_empty((x.shape[0], qweight.shape[1]))


@torch.library.custom_op("bipolar::linear_binary_cuda", mutates_args=())
def linear_binary_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       k: int, group_size: int, a_bits: int) -> torch.Tensor:
    """WpAq bipolar linear on binary tensor cores, x [M, K] -> [M, N] (x.dtype).

    Quantizes the activations per token into bit planes, then the AND-popcount GEMM: one opaque op
    for the layer, so torch.compile sees neither the planes nor the activation scales.
    """
    planes, sx = torch.ops.bipolar_kernels.quantize_activations(x, a_bits)
    return torch.ops.bipolar_kernels.gemm_binary(planes, sx, qweight, scales, zeros, k, group_size)


@linear_binary_cuda.register_fake
def _(x, qweight, scales, zeros, k, group_size, a_bits):
    return x.new_empty((x.shape[0], qweight.shape[1]))


def _register_kernel_fakes() -> None:
    if not cuda_extension_available():
        return

    @torch.library.register_fake("bipolar_kernels::gemm_a16")
    def _(x, qweight, scales, zeros, k, group_size):
        return x.new_empty((x.shape[0], qweight.shape[1]))

    @torch.library.register_fake("bipolar_kernels::quantize_activations")
    def _(x, a_bits):
        words = (x.shape[1] + 31) // 32
        return (x.new_empty((a_bits, x.shape[0], words), dtype=torch.int32),
                x.new_empty((x.shape[0],), dtype=torch.float32))

    @torch.library.register_fake("bipolar_kernels::gemm_binary")
    def _(a_planes, a_scales, qweight, scales, zeros, k, group_size):
        return scales.new_empty((a_planes.shape[1], qweight.shape[1]))


_register_kernel_fakes()
