"""Pure-torch backend: runs anywhere (vLLM's CPU backend, or a GPU without the extension).

Keeps the checkpoint layout as is (bit planes, 1/8 byte per weight per bit) and dequantizes
inside the op at each call: slow but exact, and the definition the CUDA kernels are tested against.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import BipolarLinearKernel, keep_checkpoint_layout
from .layer_config import BipolarLayerConfig


class TorchReferenceKernel(BipolarLinearKernel):
    name = "torch"

    @classmethod
    def can_implement(cls, config: BipolarLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        keep_checkpoint_layout(layer)

    def apply_weights(self, layer, x, bias=None):
        c = self.config
        return ops.linear(x, layer.qweight, layer.scales, layer.zeros, bias, c.k, c.group_size, c.a_bits)
