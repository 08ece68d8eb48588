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
"""

from __future__ import annotations

import torch

from .. import ops
from ..format.quantize import fake_quantize_activations
from . import a16_layout
from .base import BipolarLinearKernel, apply_2d, cuda_half_reason, replace_parameter
from .layer_config import BipolarLayerConfig


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
        return apply_2d(x, bias, c.n, lambda x2: ops.linear_a16_cuda(
            fake_quantize_activations(x2, c.a_bits), layer.qweight, layer.scales, c.n, c.k, self.group_shift))
