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
