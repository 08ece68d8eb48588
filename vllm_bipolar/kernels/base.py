"""The interface every bipolar linear kernel backend implements (after vLLM's MPLinearKernel).

A backend says whether it can run a layer (``can_implement``), converts the checkpoint-layout
parameters into the layout it reads fastest once the weights are loaded
(``process_weights_after_loading``), and computes the layer (``apply_weights``). The chooser in
``__init__`` takes the first backend of its priority list that can implement a layer.
"""

from __future__ import annotations

import abc

import torch

from .layer_config import BipolarLayerConfig


class BipolarLinearKernel(abc.ABC):
    #: short name used in logs, errors and VLLM_BIPOLAR_KERNEL
    name: str = ""

    def __init__(self, config: BipolarLayerConfig):
        self.config = config

    @classmethod
    @abc.abstractmethod
    def can_implement(cls, config: BipolarLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        """(True, None) when this backend runs ``config`` on ``device``; else (False, why not)."""

    @abc.abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack ``layer.qweight``/``scales``/``zeros`` (checkpoint layout) for this backend."""

    @abc.abstractmethod
    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N]."""


def cuda_half_reason(config: BipolarLayerConfig, device: torch.device) -> str | None:
    """Why a CUDA-extension backend cannot run on ``device`` with this dtype (None when it can)."""
    from .. import ops

    if device.type != "cuda":
        return f"needs a CUDA device (layer is on {device.type})"
    if not ops.cuda_extension_available():
        return ops.CUDA_EXTENSION_ERROR
    if config.act_dtype not in (torch.float16, torch.bfloat16):
        return f"activations must be fp16 or bf16, got {config.act_dtype}"
    return None


def apply_2d(x: torch.Tensor, bias: torch.Tensor | None, n: int, op) -> torch.Tensor:
    """Run ``op`` on x flattened to [M, K] with dense rows, add the bias, restore the leading dims."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = op(x2)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def keep_checkpoint_layout(layer: torch.nn.Module) -> None:
    """For backends that read format version 1 as stored: make the parameters plain and contiguous."""
    for name in ("qweight", "scales", "zeros"):
        t = getattr(layer, name, None)
        replace_parameter(layer, name, None if t is None else t.data.contiguous())


def replace_parameter(layer: torch.nn.Module, name: str, data: torch.Tensor | None) -> None:
    """Swap a vLLM parameter for a plain frozen one (drops loader metadata no longer needed)."""
    if name in layer._parameters:
        del layer._parameters[name]
    if data is None:
        setattr(layer, name, None)
    else:
        layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
