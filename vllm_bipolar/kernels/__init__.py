"""Kernel backends for bipolar linear layers, and the chooser.

Each backend (see base.BipolarLinearKernel) declares what it can run; ``choose_kernel`` walks
``KERNELS`` in priority order and takes the first that can implement the layer. When none can,
the error lists every backend's reason. ``VLLM_BIPOLAR_KERNEL=<name>`` forces one backend.
"""

from __future__ import annotations

import os

import torch

from .base import BipolarLinearKernel
from .cuda_binary_gemm import CudaBinaryGemmKernel
from .cuda_gemm_a16 import CudaGemmA16Kernel
from .layer_config import BipolarLayerConfig
from .torch_dense import TorchDenseKernel
from .torch_reference import TorchReferenceKernel

# The weight-only kernels come first for every a_bits: measured faster than the binary tensor-core
# kernels at every shape (see cuda_gemm_a16.py); those stay available through VLLM_BIPOLAR_KERNEL, and so
# does torch_dense (after torch, which runs anything: never chosen automatically; 16 bits per weight).
KERNELS: list[type[BipolarLinearKernel]] = [CudaGemmA16Kernel, CudaBinaryGemmKernel, TorchReferenceKernel,
                                            TorchDenseKernel]
FORCE_ENV = "VLLM_BIPOLAR_KERNEL"


def choose_kernel(config: BipolarLayerConfig, device: torch.device) -> type[BipolarLinearKernel]:
    forced = os.environ.get(FORCE_ENV, "").strip()
    candidates = KERNELS
    if forced:
        candidates = [k for k in KERNELS if k.name == forced]
        if not candidates:
            raise ValueError(f"{FORCE_ENV}={forced!r} names no kernel; choose from {[k.name for k in KERNELS]}")
    reasons = []
    for kernel in candidates:
        ok, why = kernel.can_implement(config, device)
        if ok:
            return kernel
        reasons.append(f"  {kernel.name}: {why}")
    raise ValueError(f"no bipolar kernel can run the layer {config.describe()} on {device}:\n" + "\n".join(reasons))


__all__ = ["KERNELS", "BipolarLayerConfig", "BipolarLinearKernel", "choose_kernel"]
