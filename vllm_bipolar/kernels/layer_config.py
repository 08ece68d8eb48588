"""What a kernel backend needs to know about one bipolar linear layer (on one tensor-parallel rank)."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class BipolarLayerConfig:
    n: int  # output features on this rank (sum of the fused shards)
    k: int  # input features on this rank
    w_bits: int  # 1..8
    a_bits: int  # 1..8, or 16 for weight-only
    group_size: int  # -1 (one group per row) or a multiple of 32
    symmetric: bool  # False: per-group offsets (`zeros`) are present
    act_dtype: torch.dtype  # dtype of activations, scales and offsets

    @property
    def weight_only(self) -> bool:
        return self.a_bits == 16

    def describe(self) -> str:
        z = "sym" if self.symmetric else "offsets"
        return (f"W{self.w_bits}A{self.a_bits} g{self.group_size} {z} N={self.n} K={self.k} "
                f"{str(self.act_dtype).replace('torch.', '')}")
