"""Second-order (GPTQ-style) quantization of one linear layer onto the bipolar grid.

Minimises the layer's output error ||W X - W_q X||^2 over calibration inputs X, i.e.
tr((W - W_q) H (W - W_q)^T) with H = X X^T (K x K), by quantizing the columns of W one at a time
and pushing each column's error onto the columns not yet quantized, weighted by the inverse
Hessian (Optimal Brain Surgeon's update, in the order and blocked form of GPTQ):

  U = upper Cholesky factor of (H + damp * mean(diag H) * I)^-1
  for column j:  e = (w_j - q(w_j)) / U_jj ;  w_k -= e * U_jk  for every later column k

Updates to columns beyond the current block of ``block`` columns are deferred and applied as one
matrix product per block (the "lazy batch" form), which gives the same result with far less
memory traffic.

Grids (per group of ``group_size`` input channels of one output row, levels z + s*v, v odd):
  "bipolar"  continuous offset z and a scale search per group: clip ratios of the group's range,
             weighted least-squares refits of (s, z), errors weighted by 1/U_jj^2 (the cost OBS
             assigns to a squared error in column j). Fitted when the group's first column comes
             up, on the group's weights as updated by the columns quantized before it.
  "int"      GPTQ as published: the signed-INT grid with an integer zero point from the group's
             min/max (0 included), no search. Exactly representable in the bipolar format.

``act_order`` quantizes columns in decreasing order of diag(H) (the most active inputs first, while
the most columns remain to absorb their error). The groups stay the contiguous channel ranges of the
checkpoint (each group's grid is fitted when its first column comes up in that order), so no
permutation ever reaches the checkpoint or the kernels.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_bipolar.format.group_params import ParamGrid, as_grid
from vllm_bipolar.format.packing import max_level
from vllm_bipolar.format.quantize import (
    QuantizedWeight,
    assign_codes,
    dequantize,
    effective_group,
    grouped,
    int_grid_params,
    num_groups,
    search_grid,
)

GRIDS = ("bipolar", "int")


class GPTQError(ValueError):
    """The calibration statistics cannot be used (e.g. not positive definite even when dampened)."""


@dataclasses.dataclass
class GPTQResult:
    qweight: QuantizedWeight
    dequant: torch.Tensor  # fp32 [N, K]: z + s*v with the stored (dtype-rounded) s, z
    row_error: torch.Tensor  # fp64 [N]: (W - W_q) H (W - W_q)^T per output row (undampened H)


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 in float64; raises the dampening
    tenfold (up to 1.0) when H is not numerically positive definite."""
    k = h.shape[0]
    eye = torch.eye(k, dtype=torch.float64, device=h.device)
    mean_diag = torch.diagonal(h).mean().clamp_min(1e-12)
    d = damp
    while True:
        chol, info = torch.linalg.cholesky_ex(h + d * mean_diag * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                return u
        if d >= 1.0:
            raise GPTQError(f"the calibration Hessian ({k}x{k}) is not positive definite even with dampening "
                            f"{d}; use more calibration tokens (--calib-samples / --calib-seqlen)")
        d = min(d * 10, 1.0)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = 128, grid: str = "bipolar",
                  symmetric: bool = False, act_order: bool = True, damp: float = 0.01, block: int = 128,
                  dtype: torch.dtype | None = None, refit: bool = False, format_version: int = 1) -> GPTQResult:
    """Quantize ``w`` [N, K] given the input second moment ``h`` [K, K] (sum or mean of x x^T).

    ``refit``: once the codes are chosen, replace each row's scales (and offsets) by the ones that
    minimise that row's output error (:func:`refit_scales`), a row at a time where that helps.
    ``format_version`` 2: (s, z) are 8-bit codes of per-row steps (format/group_params.py); the steps
    span a fit of every group of the original weights, made before the column sweep (a group's
    grid is fitted on the updated weights when it comes up, onto those steps)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
    if grid == "int" and symmetric:
        raise ValueError("the INT grid with a zero point is asymmetric; drop --symmetric for *_int methods")
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match the weight's K = {k}")
    dtype = dtype or w.dtype
    lv = max_level(bits)
    W = w.to(torch.float32).clone()
    H = h.to(torch.float64).clone()
    dead = torch.diagonal(H) == 0  # inputs that are always 0: their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(k)
    inv = torch.argsort(perm)
    W = W[:, perm].contiguous()
    U = inverse_hessian_factor(H[perm][:, perm], damp).to(torch.float32)
    u_diag = torch.diagonal(U)

    g = effective_group(k, group_size)
    ng = num_groups(k, group_size)
    gid = (perm // g).tolist()  # group of each column, in processing order
    members = [inv[i * g:min((i + 1) * g, k)] for i in range(ng)]  # processing positions of each group
    S = torch.zeros(n, ng)
    Z = torch.zeros(n, ng)
    fitted = [False] * ng
    codes = torch.zeros(n, k)

    def fit(cur: torch.Tensor, imp: torch.Tensor, params: ParamGrid) -> tuple[torch.Tensor, torch.Tensor]:
        if grid == "int":
            s, z = int_grid_params(cur, bits, params)
        else:
            s, z, _ = search_grid(cur, imp, bits, symmetric, params)
        return s[..., 0], z[..., 0]

    params = ParamGrid(dtype)
    if format_version == 2:
        wg, mask = grouped(W[:, inv], group_size)  # every group, in checkpoint order
        imp = (grouped((1.0 / u_diag ** 2)[inv][None, :], group_size)[0] * mask).expand_as(wg)
        s0, z0 = fit(wg, imp, params)
        params = ParamGrid.fitted(dtype, s0, None if symmetric else z0)

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros(n, i2 - i1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            grp = gid[j]
            if not fitted[grp]:
                cols = members[grp]
                cur = W[:, cols].clone()
                inblk = (cols >= i1) & (cols < i2)
                cur[:, inblk] = W1[:, cols[inblk] - i1]
                later = cols >= i2
                if i and bool(later.any()):  # bring in this block's deferred updates
                    cur[:, later] -= E1[:, :i] @ U[i1:j][:, cols[later]]
                S[:, grp], Z[:, grp] = fit(cur, (1.0 / u_diag[cols] ** 2)[None, :], params)
                fitted[grp] = True
            wj = W1[:, i]
            c = assign_codes(wj, S[:, grp], Z[:, grp], bits)
            q = Z[:, grp] + S[:, grp] * (2 * c - lv)
            codes[:, j] = c
            err = (wj - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        if i2 < k:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]

    codes = codes[:, inv].to(torch.uint8)
    if refit:
        S, Z = refit_scales(w, h, codes, S, None if symmetric else Z, bits, group_size, params)
    scales = S.to(dtype)
    zeros = None if symmetric else Z.to(dtype)
    if not torch.isfinite(scales).all() or (zeros is not None and not torch.isfinite(zeros).all()):
        raise ValueError(f"scales/offsets overflow {dtype}; the weights are too large for this dtype")
    qw = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size,
                         grid=params if params.coded else None)
    deq = dequantize(codes, scales, zeros, bits, group_size)
    return GPTQResult(qweight=qw, dequant=deq, row_error=output_row_error(w, deq, h))


def refit_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bits: int, group_size: int, grid: ParamGrid | torch.dtype,
                 ridge: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (and offsets) that minimise each row's output error for fixed codes.

    With the codes fixed, a row's dequantized weights q = A theta are linear in theta = (s_g, z_g)
    (A[k, g] = v_k and A[k, G + g] = 1 for k in group g), so the row's error (w - q) H (w - q)^T is
    least squares: theta = (A^T H A)^-1 A^T H w, computed for all rows at once from the G x G
    blocks of H (a tiny ``ridge`` keeps groups whose codes are all equal solvable). The result is
    rounded onto ``grid`` (a ParamGrid, or the dtype of format version 1); a row keeps its old values
    unless its error (with the rounded values) drops. GPTQ fits each group's grid before the updates to later columns are known and never
    revisits it; this is that revisit. Returns float32 [N, G] scales and offsets (zeros when
    ``zeros`` is None, i.e. symmetric).
    """
    n, k = w.shape
    g = effective_group(k, group_size)
    ng = num_groups(k, group_size)
    lv = max_level(bits)
    H = h.to(torch.float64)
    W = w.to(torch.float64)
    V = codes.to(torch.float64) * 2 - lv
    sl = [slice(i * g, min((i + 1) * g, k)) for i in range(ng)]
    sym = zeros is None
    m = ng if sym else 2 * ng
    M = torch.zeros(n, m, m, dtype=torch.float64)
    WH = W @ H
    rhs = torch.zeros(n, m, dtype=torch.float64)
    for a in range(ng):
        VaH = V[:, sl[a]] @ H[sl[a]]  # [n, K]: sum_{i in a} v_i H[i, :]
        rhs[:, a] = (V[:, sl[a]] * WH[:, sl[a]]).sum(1)
        if not sym:
            rhs[:, ng + a] = WH[:, sl[a]].sum(1)
        for b in range(ng):
            M[:, a, b] = (VaH[:, sl[b]] * V[:, sl[b]]).sum(1)  # v_a^T H_ab v_b
            if not sym:
                M[:, a, ng + b] = VaH[:, sl[b]].sum(1)  # v_a^T H_ab 1
                M[:, ng + b, a] = M[:, a, ng + b]
                M[:, ng + a, ng + b] = H[sl[a], sl[b]].sum()  # 1^T H_ab 1
    diag = torch.diagonal(M, dim1=1, dim2=2)
    M = M + torch.diag_embed(ridge * diag.mean(1, keepdim=True).clamp_min(1e-30).expand_as(diag))
    theta = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
    grid = as_grid(grid)
    new_s = grid.scale(theta[:, :ng].to(torch.float32))
    new_z = torch.zeros_like(new_s) if sym else grid.offset(theta[:, ng:].to(torch.float32))
    old_s = grid.scale(scales.to(torch.float32))
    old_z = torch.zeros_like(old_s) if sym else grid.offset(zeros.to(torch.float32))
    ok = torch.isfinite(new_s).all(1) & torch.isfinite(new_z).all(1)
    new_s = torch.where(ok[:, None], new_s, old_s)
    new_z = torch.where(ok[:, None], new_z, old_z)
    err_old = output_row_error(w, dequantize(codes, old_s, None if sym else old_z, bits, group_size), h)
    err_new = output_row_error(w, dequantize(codes, new_s, None if sym else new_z, bits, group_size), h)
    better = (err_new < err_old)[:, None]
    return torch.where(better, new_s, old_s), torch.where(better, new_z, old_z)


def output_row_error(w: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(W - W_q) H (W - W_q)^T per output row, in float64: the squared output error over the inputs
    whose second moment is ``h``."""
    d = (w.to(torch.float64) - w_q.to(torch.float64))
    return ((d @ h.to(torch.float64)) * d).sum(1)
