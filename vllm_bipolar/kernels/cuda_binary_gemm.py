"""CUDA WpAq backend (a_bits 1..8): binary tensor cores, ``bipolar_kernels::quantize_activations`` +
``bipolar_kernels::gemm_binary`` from csrc/bipolar_act_quant.cu and csrc/bipolar_gemm_binary.cu.

Activations are quantized per token into bit planes on the fly; the product is p*q one-bit
matrix products (mma.sync .b1 AND.popc, sm_80+) plus popcount corrections and per-group scales /
offsets in the epilogue (DESIGN.md section 2). Reads the checkpoint bit-plane layout as stored.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import BipolarLinearKernel, apply_2d, cuda_half_reason, keep_checkpoint_layout
from .layer_config import BipolarLayerConfig

BINARY_MMA_K = 128  # groups must cover whole m16n8k128 steps (group_size -1 or a multiple of 128)


class CudaBinaryGemmKernel(BipolarLinearKernel):
    name = "cuda_binary_gemm"

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # mma.sync .b1 AND.popc (Ampere and later)

    @classmethod
    def can_implement(cls, config: BipolarLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        why = cuda_half_reason(config, device)
        if why is not None:
            return False, why
        if not hasattr(torch.ops.bipolar_kernels, "gemm_binary"):
            return False, "the built extension lacks bipolar_kernels::gemm_binary; rebuild it"
        if config.weight_only:
            return False, "binary tensor-core kernel needs quantized activations (a_bits 1..8), got a_bits=16"
        major, minor = torch.cuda.get_device_capability(device)
        if major * 10 + minor < cls.get_min_capability():
            return False, f"needs compute capability >= 8.0 (binary mma.sync), device has {major}.{minor}"
        if config.group_size != -1 and config.group_size % BINARY_MMA_K:
            return False, f"group_size must be -1 or a multiple of {BINARY_MMA_K}, got {config.group_size}"
        group_len = config.k if config.group_size == -1 else min(config.k, config.group_size)
        if group_len * ((1 << config.w_bits) - 1) * ((1 << config.a_bits) - 1) >= 1 << 31:
            return False, (f"a group of {group_len} channels at W{config.w_bits}A{config.a_bits} overflows the "
                           "32-bit integer epilogue")
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        keep_checkpoint_layout(layer)

    def apply_weights(self, layer, x, bias=None):
        c = self.config
        return apply_2d(x, bias, c.n, lambda x2: ops.linear_binary_cuda(
            x2, layer.qweight, layer.scales, layer.zeros, c.k, c.group_size, c.a_bits))
