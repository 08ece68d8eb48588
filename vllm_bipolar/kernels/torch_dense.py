"""Dense backend: dequantizes each layer once, at load, and multiplies by the dense weight.

For vLLM's CPU backend, where the per-call dequantization of the ``torch`` backend costs 15-90x the
matmul itself (``benchmarks/results/torch_path_cpu.json``): this one runs at the speed of the
unquantized model, holding the weight in the activation dtype (16 bits per weight: the checkpoint stays
small on disk and in transfer, not in memory). Outputs are those of the ``torch`` backend bit for bit
(the same dequantized weight, the same activation quantization, the same matmul). Only when forced:
``VLLM_BIPOLAR_KERNEL=torch_dense``.
"""

from __future__ import annotations

import torch

from ..format.quantize import fake_quantize_activations
from ..format.reference import dequantize_packed
from ..format.spec import A16
from .base import BipolarLinearKernel, replace_parameter
from .layer_config import BipolarLayerConfig


class TorchDenseKernel(BipolarLinearKernel):
    name = "torch_dense"

    @classmethod
    def can_implement(cls, config: BipolarLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c = self.config
        zeros = None if layer.zeros is None else layer.zeros.data
        weight = dequantize_packed(layer.qweight.data, layer.scales.data, zeros, c.k, c.group_size, c.act_dtype)
        replace_parameter(layer, "weight", weight)
        for name in ("qweight", "scales", "zeros"):
            replace_parameter(layer, name, None)

    def apply_weights(self, layer, x, bias=None):
        c = self.config
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if c.a_bits != A16:
            x2 = fake_quantize_activations(x2, c.a_bits)
        y = torch.nn.functional.linear(x2, layer.weight, bias)
        return y.reshape(*lead, y.shape[-1])
