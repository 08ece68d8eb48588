"""CUDA weight-only backend (a_bits = 16): ``bipolar_kernels::gemm_a16`` from csrc/bipolar_gemm_a16.cu.

Reads the checkpoint bit-plane layout directly (no repack yet): warps stream the planes of a few
output rows, rebuild each code from its planes, turn it into an fp32 value with one byte permute
and accumulate x . v with one FMA per element; s * dot + z * sum(x) per 32-weight word. Fast at
M <= 2 (weights streamed once); larger M goes to dequantize + cuBLAS inside the same op
(``ops.linear_a16_cuda``) until the tensor-core kernels exist.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import BipolarLinearKernel, apply_2d, cuda_half_reason, keep_checkpoint_layout
from .layer_config import BipolarLayerConfig


class CudaGemmA16Kernel(BipolarLinearKernel):
    name = "cuda_gemm_a16"

    @classmethod
    def can_implement(cls, config: BipolarLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        why = cuda_half_reason(config, device)
        if why is None and not config.weight_only:
            why = f"weight-only kernel; a_bits={config.a_bits} needs a WpAq kernel"
        return why is None, why

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        keep_checkpoint_layout(layer)

    def apply_weights(self, layer, x, bias=None):
        c = self.config
        return apply_2d(x, bias, c.n, lambda x2: ops.linear_a16_cuda(
            x2, layer.qweight, layer.scales, layer.zeros, c.k, c.group_size))
