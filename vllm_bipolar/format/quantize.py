"""Bipolar quantization of weights and activations, and dequantization (pure torch).

Weights: w ~= z + s * v per group of ``group_size`` consecutive input channels of one output row
(``group_size = -1``: one group per row), v an odd integer in [-(2^p - 1), 2^p - 1], s the scale
and z the offset (z = 0 when symmetric). Scales and offsets are rounded to what the checkpoint stores
(:class:`~.group_params.ParamGrid`: the model dtype in format version 1, 8-bit codes times a row step
in version 2) *before* the codes are chosen, so the stored (s, z) are the ones the codes were fitted to.

Activations: per token (row of x) x ~= s_x * v, symmetric, s_x = max|x| / (2^q - 1), optionally
after clipping each token at a fraction of its absolute maximum (:func:`clip_activations`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .group_params import ParamGrid, as_grid, stored_tensors
from .packing import max_level

# Clip ratios tried by the "mse" quantizer: fractions of the min/max (or absmax) range. Low bit
# widths want hard clipping (the best 2-bit grid often spans well under half the range); at 5+
# bits only mild clipping ever wins, so fewer candidates are tried there.
def mse_clip_grid(bits: int) -> tuple[float, ...]:
    steps = 15 if bits <= 3 else (10 if bits == 4 else 5)
    return tuple(1.0 - 0.05 * i for i in range(steps))  # 1.00 down to 0.30 / 0.55 / 0.80


MSE_REFITS = 2  # least-squares refits of (s, z) per candidate, each followed by a code reassignment


@dataclasses.dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8 [N, K], codes in [0, 2^bits)
    scales: torch.Tensor  # [N, G] in the checkpoint dtype
    zeros: torch.Tensor | None  # [N, G] in the checkpoint dtype, None when symmetric
    bits: int
    group_size: int
    grid: ParamGrid | None = None  # the grid (s, z) lie on: None = the dtype's (format version 1)

    def stored(self) -> dict[str, torch.Tensor | None]:
        """The layer's (s, z) checkpoint tensors by name suffix (group_params.stored_tensors)."""
        return stored_tensors(self.scales, self.zeros, self.grid or ParamGrid(self.scales.dtype))


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(k / group_size)


def effective_group(k: int, group_size: int) -> int:
    return k if group_size == -1 else group_size


def grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> zero-padded [N, G, g] and a validity mask [G, g] (the last group may be partial)."""
    n, k = w.shape
    g = effective_group(k, group_size)
    ng = num_groups(k, group_size)
    pad = ng * g - k
    wg = torch.nn.functional.pad(w, (0, pad)).view(n, ng, g)
    mask = torch.ones(ng * g, dtype=torch.bool, device=w.device)
    if pad:
        mask[k:] = False
    return wg, mask.view(ng, g)


def _assign(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest grid point: code c = clamp(round(((w - z) / s + L) / 2), 0, L) (float codes)."""
    lv = max_level(bits)
    s_safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.clamp(torch.round(((wg - z) / s_safe + lv) * 0.5), 0, lv)


def _sq_error(wg, imp, s, z, c, bits):
    """Importance-weighted squared error per group (``imp`` is 0 on padding)."""
    v = 2 * c - max_level(bits)
    return (((z + s * v) - wg) ** 2 * imp).sum(-1, keepdim=True)


def _rtn_params(wg, mask, bits, symmetric):
    lv = max_level(bits)
    if symmetric:
        amax = torch.where(mask, wg.abs(), torch.zeros_like(wg)).amax(-1, keepdim=True)
        return amax / lv, torch.zeros_like(amax)
    hi = torch.where(mask, wg, torch.full_like(wg, -math.inf)).amax(-1, keepdim=True)
    lo = torch.where(mask, wg, torch.full_like(wg, math.inf)).amin(-1, keepdim=True)
    return (hi - lo) / (2 * lv), (hi + lo) * 0.5


def _least_squares(wg, imp, c, bits, symmetric, s_prev, z_prev):
    """Best (s, z) for fixed codes: minimise sum imp * (w - z - s v)^2 (weighted least squares)."""
    v = 2 * c - max_level(bits)
    n = imp.sum(-1, keepdim=True)
    svw = (imp * v * wg).sum(-1, keepdim=True)
    svv = (imp * v * v).sum(-1, keepdim=True)
    if symmetric:
        s = torch.where(svv > 0, svw / svv.clamp_min(1e-30), s_prev)
        return s, z_prev
    sv = (imp * v).sum(-1, keepdim=True)
    sw = (imp * wg).sum(-1, keepdim=True)
    var = svv - sv * sv / n
    ok = var > 1e-9 * svv.clamp_min(1)
    s = torch.where(ok, (svw - sv * sw / n) / var.clamp_min(1e-30), s_prev)
    z = torch.where(ok, (sw - s * sv) / n, z_prev)
    return s, z


def search_grid(wg: torch.Tensor, imp: torch.Tensor, bits: int, symmetric: bool, grid: ParamGrid | torch.dtype,
                s: torch.Tensor | None = None, z: torch.Tensor | None = None, c: torch.Tensor | None = None):
    """Per-group grid search shared by the "mse" quantizer and the calibrated (GPTQ-style) one.

    ``wg`` [N, ..., g] holds the groups' weights (output rows first), ``imp`` (broadcastable to ``wg``,
    0 on padding) the importance of each squared error. Starting from the min/max grid (or ``s``,
    ``z``), tries each clip ratio of :func:`mse_clip_grid`, refits (s, z) by weighted least squares
    on the chosen codes (``MSE_REFITS`` times, s and z rounded onto ``grid`` (a ParamGrid, or a dtype
    for format version 1) each time) and keeps, per group, the candidate with the least
    importance-weighted squared error. Returns (s, z, float codes).
    """
    grid = as_grid(grid)
    if s is None:
        mask = (imp > 0) if imp.shape == wg.shape else torch.ones_like(wg, dtype=torch.bool)
        s, z = _rtn_params(wg, mask, bits, symmetric)
        s, z = grid.scale(s, up=True), grid.offset(z)
    if c is None:
        c = _assign(wg, s, z, bits)
    imp = imp.expand_as(wg)
    best_err = _sq_error(wg, imp, s, z, c, bits)
    base_s, base_z = s, z
    for ratio in mse_clip_grid(bits):
        cs, cz = grid.scale(base_s * ratio), base_z
        cc = _assign(wg, cs, cz, bits)
        for _ in range(MSE_REFITS):
            cs, cz = _least_squares(wg, imp, cc, bits, symmetric, cs, cz)
            cs, cz = grid.scale(cs), grid.offset(cz)
            cc = _assign(wg, cs, cz, bits)
        err = _sq_error(wg, imp, cs, cz, cc, bits)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        s, z = torch.where(better, cs, s), torch.where(better, cz, z)
        c = torch.where(better, cc, c)
    return s, z, c


def int_grid_params(wg: torch.Tensor, bits: int, grid: ParamGrid | torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed-INT grid with an integer zero point (GPTQ's and AWQ's), written as bipolar (s, z).

    Per group, as GPTQ computes it: range [min(w, 0), max(w, 0)], step = range / L (L = 2^bits - 1),
    integer zero point q0 = round(-min / step); levels step * (q - q0), q = 0..L. With v = 2q - L
    these are exactly the bipolar levels z + s*v for s = step / 2 and z = step * (L/2 - q0).
    ``wg`` [N, ..., g]; returns (s, z) [N, ..., 1], rounded onto ``grid`` (in format version 2 the
    integer zero point survives only as far as the row's offset step allows).
    """
    lv = max_level(bits)
    hi = wg.amax(-1, keepdim=True).clamp_min(0)
    lo = wg.amin(-1, keepdim=True).clamp_max(0)
    flat = hi == lo  # an all-zero group: GPTQ uses the range [-1, 1]
    hi, lo = torch.where(flat, torch.ones_like(hi), hi), torch.where(flat, -torch.ones_like(lo), lo)
    step = (hi - lo) / lv
    q0 = torch.round(-lo / step)
    grid = as_grid(grid)
    return grid.scale(step * 0.5), grid.offset(step * (lv * 0.5 - q0))


def assign_codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes (float) of ``w`` on the grid z + s*v (s, z broadcastable to ``w``)."""
    return _assign(w, s, z, bits)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False,
                    method: str = "rtn", dtype: torch.dtype | None = None, format_version: int = 1) -> QuantizedWeight:
    """Quantize a weight matrix [N, K] to bipolar codes with per-group scales (and offsets).

    method "rtn": round to nearest on the absmax grid (symmetric) or min/max grid (offsets).
    method "mse": per group, try clip ratios of that range, refit (s, z) by weighted least squares
    on the chosen codes, and keep the candidate with the least importance-weighted squared error
    (importance w^2 + mean(w^2) over the group: large weights are fitted more closely).
    ``dtype`` is the storage dtype of scales/offsets (default: ``w``'s dtype, fp32 kept as is).
    ``format_version`` 2: (s, z) as 8-bit codes of per-row steps (group_params.py); the steps come
    from a version 1 fit, then the layer is fitted again on that grid.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if method not in ("rtn", "mse"):
        raise ValueError(f"unknown quantization method {method!r}; expected 'rtn' or 'mse'")
    if format_version not in (1, 2):
        raise ValueError(f"format_version {format_version!r}: expected 1 or 2")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"weight has {bad} NaN/inf value(s); fix the source checkpoint before quantizing")
    dtype = dtype or w.dtype
    wg, mask = grouped(w.to(torch.float32), group_size)
    imp = None
    if method == "mse":
        # Importance of each weight: w^2 plus the group's mean square, so large weights (the ones
        # that carry most of a layer's output) are fitted more closely without ignoring the rest.
        sq = wg * wg * mask
        imp = (sq + sq.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)) * mask

    def fit(grid: ParamGrid):
        s, z = _rtn_params(wg, mask, bits, symmetric)
        s, z = grid.scale(s, up=True), grid.offset(z)  # the min/max range, never narrowed by the codes
        c = _assign(wg, s, z, bits)
        return (s, z, c) if imp is None else search_grid(wg, imp, bits, symmetric, grid, s, z, c)

    grid = ParamGrid(dtype)
    s, z, c = fit(grid)
    if format_version == 2:
        grid = ParamGrid.fitted(dtype, s, None if symmetric else z)
        first = s, z
        s, z, c = fit(grid)
        if imp is not None:  # mse: per group, the better of the first fit on the grid and the new search (the
            # search alone may miss the first fit, e.g. one group per row, whose scale code is capped at its value)
            s1, z1 = grid.scale(first[0]), grid.offset(first[1])
            c1 = _assign(wg, s1, z1, bits)
            better = _sq_error(wg, imp, s1, z1, c1, bits) < _sq_error(wg, imp, s, z, c, bits)
            s, z, c = torch.where(better, s1, s), torch.where(better, z1, z), torch.where(better, c1, c)
    n, k = w.shape
    scales = s.squeeze(-1).to(dtype)
    zeros = None if symmetric else z.squeeze(-1).to(dtype)
    if not torch.isfinite(scales).all() or (zeros is not None and not torch.isfinite(zeros).all()):
        raise ValueError(f"scales/offsets overflow {dtype}; the weights are too large for this dtype")
    codes = c.reshape(n, -1)[:, :k].to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size,
                           grid=grid if grid.coded else None)


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Per-group [N, G] -> per-column [N, K]."""
    return t.repeat_interleave(effective_group(k, group_size), dim=1)[:, :k]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [N, K] -> z + s * v as ``dtype`` (computed in float32, or float64 if asked).

    v = 2 code - L is exact; then one rounding for s * v and one for + z. The scales are broadcast over
    [N, G, group] views (whole groups, then the partial last one) rather than expanded to [N, K].
    """
    n, k = codes.shape
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    v = codes.to(cdt, copy=True).mul_(2).sub_(max_level(bits))  # a copy even when codes are cdt already
    s = scales.to(cdt)
    z = None if zeros is None else zeros.to(cdt)
    out = torch.empty((n, k), dtype=cdt, device=codes.device)
    size = effective_group(k, group_size)
    whole = k // size

    def fill(lo: int, hi: int, g0: int, g1: int) -> None:
        shape = (n, g1 - g0, (hi - lo) // (g1 - g0))
        o = out[:, lo:hi].view(shape)
        torch.mul(v[:, lo:hi].view(shape), s[:, g0:g1, None], out=o)
        if z is not None:
            o.add_(z[:, g0:g1, None])

    if whole:
        fill(0, whole * size, 0, whole)
    if whole * size < k:
        fill(whole * size, k, whole, whole + 1)
    return out.to(dtype)


def quantize_activations(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric bipolar quantization: x [M, K] -> (codes uint8 [M, K], scales fp32 [M]).

    An all-zero token gets scale 0 (its dequantized values are exactly 0); non-finite input
    propagates to the scale so the output shows it rather than hiding it.
    """
    lv = max_level(bits)
    xf = x.to(torch.float32)
    # amax * (1/L), not amax / L: the fp32 reciprocal is what torch's CUDA division by a scalar and
    # the activation-quantization kernel compute, so CPU, CUDA and the kernel agree bit for bit.
    s = xf.abs().amax(-1, keepdim=True) * (1.0 / lv)
    s_safe = torch.where(s == 0, torch.ones_like(s), s)
    codes = torch.clamp(torch.round((xf / s_safe + lv) * 0.5), 0, lv)
    return codes.to(torch.uint8), s.squeeze(-1)


def clip_activations(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Clip each token (row of x) at ``ratio`` times its absolute maximum, in x's dtype.

    The threshold t = ratio * max|x| is computed in float32 and rounded to x's dtype, then
    x -> clamp(x, -t, t). Quantizing the result per token (:func:`quantize_activations`) then uses
    the scale t / L, since max|clamp(x)| = t exactly (t <= max|x| for ratio <= 1): the clipped
    activation quantizer of ``quantization_config['a_clip_ratio']``, obtained with any backend's
    own unclipped quantizer. ``ratio`` >= 1 returns x unchanged.
    """
    if ratio >= 1:
        return x
    t = (x.to(torch.float32).abs().amax(-1, keepdim=True) * ratio).to(x.dtype)
    return torch.minimum(torch.maximum(x, -t), t)


def fake_quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize activations per token (what a WpAq kernel sees), in x's dtype."""
    codes, s = quantize_activations(x, bits)
    return ((codes.to(torch.float32) * 2 - max_level(bits)) * s[:, None]).to(x.dtype)
