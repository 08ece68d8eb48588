"""Input transforms that a bipolar layer applies at run time (recorded in ``quantization_config``).

``online_hadamard``: the layer's input x [..., K] is multiplied by a block-diagonal Walsh-Hadamard
matrix H (Sylvester order, normalized so that H H = I, blocks of ``hadamard_block(K)`` channels)
before the kernel; the converter stored W H instead of W, so x H (W H)^T = x W^T in full
precision. Why: the rotation spreads the few very large input channels (outliers) over the whole
block, so per-token activation quantization (a_bits < 16) and the weight grid both see flatter,
Gaussian-like values. Used for down_proj, whose input (the SwiGLU product) has no preceding linear
map that could absorb the rotation offline.
"""

from __future__ import annotations

import torch

MAX_HADAMARD_BLOCK = 1024


def hadamard_block(k: int, max_block: int = MAX_HADAMARD_BLOCK) -> int:
    """Block size of the online Hadamard transform for K input channels: the largest power of two
    that divides K, at most ``max_block`` (so the blocks tile K and any shard of whole blocks)."""
    if k <= 0:
        raise ValueError(f"K must be positive, got {k}")
    return min(k & -k, max_block)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of order n (a power of two): symmetric, H H = I."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n ** 0.5


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x @ blockdiag(H_block, ..., H_block) over the last dimension, by the fast Walsh-Hadamard
    transform (log2(block) butterfly stages), computed in float32 (float64 kept) and returned in
    x's dtype."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"input width {k} is not a multiple of the Hadamard block {block}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cdt).reshape(-1, k)
    rows = y.shape[0]
    h = 1
    while h < block:
        y = y.view(rows, k // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(x.shape) * block ** -0.5).to(x.dtype)
