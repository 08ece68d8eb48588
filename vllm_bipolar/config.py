"""``BipolarConfig``: vLLM's view of a bipolar checkpoint's ``quantization_config``.

Parsing and validation live in :mod:`vllm_bipolar.format.spec` (shared with the converter);
this class adapts them to vLLM's ``QuantizationConfig`` interface and picks, per layer, the
linear method (bipolar, or unquantized for ``modules_to_not_convert``).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from .format.spec import QUANT_METHOD, BipolarConfigError, BipolarQuantSpec, shard_names


class BipolarConfig(QuantizationConfig):
    """Bipolar-INT quantization (w_bits 1..8, a_bits 1..8 or 16), checkpoint format version 1."""

    def __init__(self, spec: BipolarQuantSpec | None = None):
        super().__init__()
        if spec is None:  # vLLM does this for `--quantization bipolar` on a checkpoint without a config
            raise BipolarConfigError(
                "quantization='bipolar' was requested but the checkpoint's config.json has no bipolar "
                "quantization_config; convert the model first: python -m quant_tools.convert SRC DST --w-bits 4")
        self.spec = spec

    def __repr__(self) -> str:
        return f"BipolarConfig({self.spec.to_dict()})"

    # ---- QuantizationConfig interface ---------------------------------------------------------
    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # The pure-torch backend runs anywhere; CUDA kernels check their own needs in can_implement.
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        # The quantization_config block of config.json is all we read.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BipolarConfig":
        return cls(BipolarQuantSpec.from_dict(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head (ParallelLMHead) and others stay unquantized
        names = shard_names(prefix, self.packed_modules_mapping or None)
        skipped = {n: self.spec.is_skipped(n) for n in names}
        if all(skipped.values()):
            return UnquantizedLinearMethod()
        bits = {n: self.spec.bits_for(n) for n in names}
        if any(skipped.values()) or len(set(bits.values())) > 1:
            raise BipolarConfigError(
                f"{prefix} is one fused layer in vLLM made of {names}, but the checkpoint gives them different "
                f"bits {bits} or skip status {skipped}; re-convert with equal bits for the fused shards.")
        from .linear_method import BipolarLinearMethod

        return BipolarLinearMethod(self, w_bits=next(iter(bits.values())), prefix=prefix)
