"""CUDA WpAq backend (a_bits 1..8): binary tensor cores, ``bipolar_kernels::quantize_activations`` +
``bipolar_kernels::gemm_binary`` from csrc/bipolar_act_quant.cu and csrc/bipolar_gemm_binary.cu.

Activations are quantized per token into bit planes on the fly; the product is p*q one-bit
matrix products (mma.sync .b1 AND.popc, sm_80+) plus popcount corrections and per-group scales /
offsets in the epilogue (DESIGN.md section 2). Reads the checkpoint bit planes as stored; at load
time it adds what depends on the weights alone (``prepare_binary_weights``): the (s, z) pairs as
fp32, group-major (in place of the checkpoint's scales / zeros, which it frees), and the column term of
the popcount correction summed over the groups.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import BipolarLinearKernel, apply_2d, cuda_half_reason, keep_checkpoint_layout, replace_parameter
from .layer_config import BipolarLayerConfig

BINARY_MMA_K = 128  # groups must cover whole m16n8k128 steps (group_size -1 or a multiple of 128)


class CudaBinaryGemmKernel(BipolarLinearKernel):
    name = "cuda_binary_gemm"

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # mma.sync .b1 AND.popc (Ampere and later)

    @classmethod
    def can_implement(cls, config: BipolarLayerConfig, device: torch.device) -> tuple[bool, str | None]:
        why = cuda_half_reason(config, device)
        if why is not None:
            return False, why
        missing = [op for op in ("quantize_activations", "binary_group_sums", "gemm_binary")
                   if not hasattr(torch.ops.bipolar_kernels, op)]
        if not missing and len(torch.ops.bipolar_kernels.gemm_binary.default._schema.arguments) != 9:
            missing = ["the 9-argument gemm_binary"]
        if missing:
            return False, (f"the built extension is older than this plugin (lacks {', '.join(missing)}); rebuild "
                           "it: pip install --no-build-isolation -e .")
        if config.weight_only:
            return False, "binary tensor-core kernel needs quantized activations (a_bits 1..8), got a_bits=16"
        major, minor = torch.cuda.get_device_capability(device)
        if major * 10 + minor < cls.get_min_capability():
            return False, f"needs compute capability >= 8.0 (binary mma.sync), device has {major}.{minor}"
        if config.group_size != -1 and config.group_size % BINARY_MMA_K:
            return False, f"group_size must be -1 or a multiple of {BINARY_MMA_K}, got {config.group_size}"
        group_len = config.k if config.group_size == -1 else min(config.k, config.group_size)
        if 2 * group_len * ((1 << config.w_bits) - 1) * ((1 << config.a_bits) - 1) >= 1 << 31:
            return False, (f"a group of {group_len} channels at W{config.w_bits}A{config.a_bits} overflows the "
                           "32-bit integer epilogue")
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        keep_checkpoint_layout(layer)
        c = self.config
        sz, col_bias = prepare_binary_weights(layer.qweight, layer.scales, layer.zeros, c.k, c.group_size, c.a_bits)
        layer.register_buffer("binary_sz", sz, persistent=False)
        layer.register_buffer("binary_col_bias", col_bias, persistent=False)
        # the kernel reads binary_sz: the checkpoint's (s, z) would be 4 bytes per group and row never read
        replace_parameter(layer, "scales", None)
        replace_parameter(layer, "zeros", None)

    def apply_weights(self, layer, x, bias=None):
        c = self.config
        return apply_2d(x, bias, c.n, lambda x2: ops.linear_binary_cuda(
            x2, layer.qweight, layer.binary_sz, layer.binary_col_bias, c.k, c.group_size, c.a_bits))


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-k // group_size)


def prepare_binary_weights(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, k: int,
                           group_size: int, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight-side inputs of ``bipolar_kernels::gemm_binary`` for activations of ``a_bits``.

    * ``sz`` fp32 [G, N rounded up to even, 2]: (s, z) per group and column, group-major (each
      pipeline stage of the kernel copies its groups' pairs in 16-byte pieces); z = 0 when symmetric.
    * ``col_bias`` fp32 [N]: sum_g s[n,g] C[n,g], C = K_g Lw La - 2 La PB[n,g] = -La * (sum of the
      weight values v = 2 code - Lw of column n in group g): the part of the popcount correction that
      depends on the column alone (csrc/bipolar_gemm_binary.cuh), summed in float64.
    """
    if qweight.dim() != 3:
        raise ValueError(f"qweight must be [w_bits, N, ceil(K/32)], got shape {tuple(qweight.shape)}")
    w_bits, n = qweight.shape[0], qweight.shape[1]
    g = num_groups(k, group_size)
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"scales must be float16, bfloat16 (or float32), got {scales.dtype}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            continue
        if tuple(t.shape) != (n, g):
            raise ValueError(f"{name} must be [N, G] = [{n}, {g}] (k = {k}, group_size = {group_size}), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype != scales.dtype:
            raise ValueError(f"{name} must have the dtype of scales ({scales.dtype}), got {t.dtype}")
        if t.device != qweight.device:
            raise ValueError(f"{name} is on {t.device} but qweight is on {qweight.device}")
    pb = torch.ops.bipolar_kernels.binary_group_sums(qweight, k, group_size)[:, :n]  # [G, N]
    return binary_weight_terms(pb, scales, zeros, k, group_size, w_bits, a_bits)


def binary_weight_terms(pb: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, k: int, group_size: int,
                        w_bits: int, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sz, col_bias) of :func:`prepare_binary_weights` from PB, the weight code sums per group [G, N] (any
    device: plain torch, so that the CPU tests check the decomposition the kernel relies on)."""
    g, n = pb.shape
    col_bias = binary_col_bias(pb, scales, k, group_size, w_bits, a_bits)
    sz = torch.zeros(g, (n + 1) // 2 * 2, 2, device=pb.device, dtype=torch.float32)
    sz[:, :n, 0] = scales.t()
    if zeros is not None:
        sz[:, :n, 1] = zeros.t()
    return sz, col_bias


def binary_col_bias(pb: torch.Tensor, scales: torch.Tensor, k: int, group_size: int, w_bits: int,
                    a_bits: int) -> torch.Tensor:
    """col_bias [N] fp32 of :func:`binary_weight_terms` alone (also the int8 kernel's column term)."""
    g = pb.shape[0]
    size = k if group_size == -1 else group_size
    kg = (k - torch.arange(g, device=pb.device, dtype=torch.float64) * size).clamp(max=size)  # real K_g
    wsum = 2 * pb.to(torch.float64) - kg[:, None] * ((1 << w_bits) - 1)  # sum of the weight values per group
    return (-((1 << a_bits) - 1) * (scales.t().to(torch.float64) * wsum).sum(0)).to(torch.float32).contiguous()
