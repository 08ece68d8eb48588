"""CUDA backend on the weight-only kernels ``bipolar_kernels::gemm_a16`` / ``dequantize_a16``
(csrc/bipolar_gemm_a16.cu), for every a_bits.

At load the checkpoint bit planes are repacked (a16_layout.repack) so that each thread finds the
codes of its mma.sync B fragments side by side, and scales/offsets become (2s, z - sL) pairs.
Up to ``ops.A16_FUSED_MAX_M`` tokens the fused kernel streams the weights once and expands them to
fp16/bf16 in registers for the tensor cores; larger batches dequantize into a dense weight and call
cuBLAS (compute-bound there, where cuBLAS is the fastest tensor-core GEMM). The choice is made per
call inside the op.

Layers with a_bits < 16 run the same kernels on activations quantized per token and dequantized
(``format.fake_quantize_activations``, plain torch outside the op so that torch.compile fuses it
into one kernel with its neighbours; inside the opaque op it was six kernel launches per layer,
which at decode cost more than the GEMM): the reference's own order of operations, and on an H100 4-30x
faster than the binary tensor-core kernels of ``cuda_binary_gemm`` as they stand
(benchmarks/results/kernels_h100.json: W2A2, 14336 x 4096, M = 4096: 3.4 ms there against the
0.78 ms of the weight-only path), which stay selectable with VLLM_BIPOLAR_KERNEL=cuda_binary_gemm.

Large batches of such layers can go instead to the int8 tensor-core kernel (``bipolar_kernels::gemm_int8``,
csrc/bipolar_gemm_int8.cuh) on the same repacked weights: activations quantized to code bytes, one
8-bit MMA per 32 channels, the popcount-style corrections in the epilogue; at load time this adds only
``int8_col_bias`` (fp32 [N]). ``ops.WPAQ_INT8_MIN_M`` says from which batch on (see ops.py; 0, the
default, leaves WpAq layers exactly as before: no int8 term, no int8 op); layers the int8 kernel cannot
take (:func:`int8_reason`) always use the weight-only kernels.
"""

from __future__ import annotations

import torch

from .. import ops
from ..format.quantize import fake_quantize_activations
from . import a16_layout
from .base import BipolarLinearKernel, apply_2d, cuda_half_reason, replace_parameter
from .layer_config import BipolarLayerConfig

INT8_STAGE_K = 128  # channels per stage of the int8 kernel: its groups must be whole stages


def int8_smem_bytes(w_bits: int) -> int:
    """Shared memory per CTA of the int8 kernel (csrc/bipolar_gemm_int8.cuh, smem_bytes)."""
    stage = 128 * 128 + w_bits * 128 * 16 + 128 * 4 + 128 * 4
    return (4 if 4 * stage <= 99 * 1024 else 3) * stage


def int8_reason(config: BipolarLayerConfig, device: torch.device) -> str | None:
    """Why the int8 WpAq kernel cannot run this layer on ``device`` (None when it can)."""
    if config.weight_only:
        return "weight-only layer (a_bits = 16)"
    if not all(hasattr(torch.ops.bipolar_kernels, op) for op in ("gemm_int8", "quantize_activations_int8")):
        return "the built extension predates the int8 kernel; rebuild it: pip install --no-build-isolation -e ."
    if config.group_size != -1 and config.group_size % INT8_STAGE_K:
        return f"group_size must be -1 or a multiple of {INT8_STAGE_K}, got {config.group_size}"
    group_len = config.k if config.group_size == -1 else min(config.k, config.group_size)
    if 2 * group_len * ((1 << config.w_bits) - 1) * ((1 << config.a_bits) - 1) >= 1 << 31:
        return f"a group of {group_len} channels at W{config.w_bits}A{config.a_bits} overflows the 32-bit epilogue"
    optin = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    if optin < int8_smem_bytes(config.w_bits):
        return f"needs {int8_smem_bytes(config.w_bits)} bytes of shared memory per block, the GPU allows {optin}"
    return None


def int8_col_bias(qweight: torch.Tensor, scales: torch.Tensor, k: int, group_size: int, a_bits: int) -> torch.Tensor:
    """col_bias [N] of the int8 kernel from the checkpoint's planes and scales: sum_g s[n,g] C[n,g], the
    column part of the correction (the same term as the binary kernels', prepare_binary_weights)."""
    from .cuda_binary_gemm import binary_col_bias

    n = qweight.shape[1]
    pb = torch.ops.bipolar_kernels.binary_group_sums(qweight.contiguous(), k, group_size)[:, :n]
    return binary_col_bias(pb, scales, k, group_size, qweight.shape[0], a_bits)


class CudaGemmA16Kernel(BipolarLinearKernel):
    name = "cuda_gemm_a16"

    @classmethod
    def can_implement(cls, config: BipolarLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        why = cuda_half_reason(config, device)
        if why is None:
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                why = f"needs compute capability >= 8.0 (mma.sync m16n8k16 bf16), device has {major}.{minor}"
        return why is None, why

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c = self.config
        # the int8 kernel's column term only when it is switched on (ops.WPAQ_INT8_MIN_M; off by default)
        self.int8 = ops.WPAQ_INT8_MIN_M > 0 and int8_reason(c, layer.qweight.device) is None
        if self.int8:  # from the checkpoint planes, before they are repacked
            layer.register_buffer("int8_col_bias", int8_col_bias(layer.qweight.data, layer.scales.data, c.k,
                                                                 c.group_size, c.a_bits), persistent=False)
        qweight, scales, shift = a16_layout.repack(layer.qweight.data, layer.scales.data,
                                                   None if layer.zeros is None else layer.zeros.data,
                                                   c.k, c.group_size)
        replace_parameter(layer, "qweight", qweight)
        replace_parameter(layer, "scales", scales)
        replace_parameter(layer, "zeros", None)
        self.group_shift = shift

    def apply_weights(self, layer, x, bias=None):
        c = self.config
        if c.weight_only:
            return apply_2d(x, bias, c.n, lambda x2: ops.linear_a16_cuda(
                x2, layer.qweight, layer.scales, c.n, c.k, self.group_shift))
        if self.int8:
            return apply_2d(x, bias, c.n, lambda x2: ops.linear_wpaq_cuda(
                x2, fake_quantize_activations(x2, c.a_bits), layer.qweight, layer.scales, layer.int8_col_bias,
                c.n, c.k, self.group_shift, c.a_bits))
        return apply_2d(x, bias, c.n, lambda x2: ops.linear_a16_cuda(
            fake_quantize_activations(x2, c.a_bits), layer.qweight, layer.scales, c.n, c.k, self.group_shift))
