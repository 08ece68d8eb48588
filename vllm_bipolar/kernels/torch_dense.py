"""Dense backend: dequantizes each layer once, at load, and multiplies by the dense weight.

For vLLM's CPU backend, where the per-call dequantization of the ``torch`` backend costs 15-90x the
matmul itself (``benchmarks/results/torch_path_cpu.json``): this one runs at the speed of the
unquantized model, holding the weight in the activation dtype (16 bits per weight: the checkpoint stays
small on disk and in transfer, not in memory). Inside vLLM on CPU the dense weight goes through vLLM's
own CPU GEMM dispatch (the prepacked oneDNN / AMX kernels its unquantized layers use, 1.4x faster than
``torch.nn.functional.linear`` on SmolLM2 here); elsewhere ``torch.nn.functional.linear``, whose outputs
are those of the ``torch`` backend bit for bit on layers it dequantizes whole (the same dequantized
weight, activation quantization and matmul; on larger layers, which the ``torch`` backend multiplies in
row blocks, up to the order of the GEMM's sums). Only when forced: ``VLLM_BIPOLAR_KERNEL=torch_dense``.
"""

from __future__ import annotations

import logging

import torch

from ..format.quantize import fake_quantize_activations
from ..format.reference import dequantize_packed_blocked
from ..format.spec import A16
from .base import BipolarLinearKernel, replace_parameter
from .layer_config import BipolarLayerConfig

logger = logging.getLogger("vllm.bipolar")  # under "vllm": printed by vLLM's logging config (no vLLM import here)


class TorchDenseKernel(BipolarLinearKernel):
    name = "torch_dense"

    @classmethod
    def can_implement(cls, config: BipolarLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c = self.config
        zeros = None if layer.zeros is None else layer.zeros.data
        weight = dequantize_packed_blocked(layer.qweight.data, layer.scales.data, zeros, c.k, c.group_size,
                                           c.act_dtype)
        replace_parameter(layer, "weight", weight)
        for name in ("qweight", "scales", "zeros"):
            replace_parameter(layer, name, None)
        layer.bipolar_dense_linear = vllm_cpu_linear(layer)

    def apply_weights(self, layer, x, bias=None):
        c = self.config
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if c.a_bits != A16:
            x2 = fake_quantize_activations(x2, c.a_bits)
        if layer.bipolar_dense_linear is None:
            y = torch.nn.functional.linear(x2, layer.weight, bias)
        elif x2.shape[0] == 0:  # vLLM's oneDNN GEMM stops the process (SIGFPE) on an empty batch
            y = x2.new_empty((0, c.n))
        else:
            # bias added here: vLLM's AMX kernel wants an fp32 bias (it converts the layer's own at dispatch)
            y = layer.bipolar_dense_linear(x2, layer.weight, None)
            if bias is not None:
                y = y + bias.to(y.dtype)
        return y.reshape(*lead, y.shape[-1])


def vllm_cpu_linear(layer: torch.nn.Module):
    """vLLM's CPU GEMM for ``layer.weight`` (it may prepack the weight and empty ``layer.weight``), as a
    function (x, weight, bias) -> y; None outside vLLM's CPU platform or when vLLM lacks the dispatch."""
    if layer.weight.device.type != "cpu":
        return None
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.platforms import current_platform
    except ImportError:
        return None
    if not current_platform.is_cpu():
        return None
    weight = layer.weight
    try:
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        return layer.cpu_linear
    except (TypeError, RuntimeError) as e:  # another vLLM release's signature, or its GEMM refusing the weight
        logger.warning("bipolar: torch_dense falls back to torch.nn.functional.linear (vLLM's CPU GEMM "
                       "dispatch failed: %s)", e)
        layer.weight = weight
        return None
