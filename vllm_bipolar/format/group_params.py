"""Per-group scales and offsets as a checkpoint stores them (format versions 1 and 2).

A layer's weights are w = z + s * v per group of input channels of one output row (quantize.py).

Format version 1 stores s and z in the model dtype: ``scales`` / ``zeros`` [N, G], 16 bits each per
group and row (at group size 128 that is 0.25 bits per weight on top of the code bits: +25% at W1).

Format version 2 stores them as 8-bit codes with one step per output row (double quantization, as
k-quants and QLoRA do), 16 bits per group and row for both:

    scales       uint8 [N, G]   scale codes 1..255          s = dtype(code * scales_step[n])
    scales_step  dtype [N]      the row's scale step
    zeros        int8  [N, G]   offset codes -127..127      z = dtype(code * zeros_step[n])
    zeros_step   dtype [N]      the row's offset step        (zeros, zeros_step only when not symmetric)

The product code * step is exact in float32 (an 8-bit integer times a significand of at most 11
bits), so decoding is one rounding to the model dtype: one multiply and one conversion in a kernel,
bit-identical to :func:`decode`. The steps come from a first, unconstrained fit (the row's largest
scale over 255, largest |offset| over 127); the quantizers then fit the codes of the weights against
the decoded (s, z) (:class:`ParamGrid`), so the grid the weights were rounded to is the stored one.
Scale codes start at 1: a group whose best scale is far below the row's largest keeps a scale of one
step rather than collapsing to zero (only an all-zero row, step 0, decodes to s = 0).
"""

from __future__ import annotations

import torch

SCALE_CODE_MAX = 255  # uint8
ZERO_CODE_MAX = 127  # int8, symmetric range
SCALE_CODES = (1, SCALE_CODE_MAX)  # code ranges (lo, hi): a scale code of 0 is never written
ZERO_CODES = (-ZERO_CODE_MAX, ZERO_CODE_MAX)
# Checkpoint tensors of a layer besides qweight, per format version (zeros*: only when not symmetric).
GROUP_TENSORS = {1: ("scales", "zeros"), 2: ("scales", "scales_step", "zeros", "zeros_step")}


def _rows(step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Row steps [N] as float32, shaped to broadcast over ``like`` [N, ...]."""
    return step.to(torch.float32).view(-1, *([1] * (like.dim() - 1)))


def row_steps(values: torch.Tensor, code_max: int, dtype: torch.dtype) -> torch.Tensor:
    """The per-row step [N] (``dtype``) that spans ``values`` [N, ...] with codes up to ``code_max``.

    The largest |value| of the row over ``code_max``, rounded up to a ``dtype`` number so the largest
    value still has a code (an all-zero row gets step 0)."""
    top = values.to(torch.float32).abs().flatten(1).amax(1)
    step = (top / code_max).to(dtype)
    short = step.to(torch.float32) * code_max < top  # rounded down: take the next dtype number up
    step = torch.where(short, torch.nextafter(step, torch.full_like(step, float("inf"))), step)
    if not torch.isfinite(step).all():
        raise ValueError(f"scales/offsets overflow {dtype}; the weights are too large for this dtype")
    return step


def encode(values: torch.Tensor, step: torch.Tensor, codes: tuple[int, int], up: bool = False) -> torch.Tensor:
    """Values [N, ...] -> the nearest codes in ``codes`` (lo, hi) of ``step`` [N], or the next code up with
    ``up``: uint8 for the scale range, int8 for the offset range. A zero step gives the code nearest 0."""
    lo, hi = codes
    st = _rows(step, values)
    r = values.to(torch.float32) / torch.where(st > 0, st, torch.ones_like(st))
    q = torch.ceil(r - 1e-4) if up else torch.round(r)
    q = torch.where(st > 0, q, torch.zeros_like(q)).clamp(lo, hi)
    return q.to(torch.uint8 if lo >= 0 else torch.int8)


def decode(codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes [N, ...] and row steps [N] -> values dtype(code * step) (the product is exact in fp32)."""
    return (codes.to(torch.float32) * _rows(step, codes)).to(dtype)


class ParamGrid:
    """The values a checkpoint can hold for (s, z): what the quantizers round their fits to.

    ``ParamGrid(dtype)`` is format version 1 (any ``dtype`` number). With ``scales_step`` (and
    ``zeros_step``) [N] it is format version 2: dtype(code * step) per row. Inputs of
    :meth:`scale` / :meth:`offset` are [N, ...] with the rows first; outputs are float32.
    """

    def __init__(self, dtype: torch.dtype, scales_step: torch.Tensor | None = None,
                 zeros_step: torch.Tensor | None = None):
        self.dtype = dtype
        self.scales_step = scales_step
        self.zeros_step = zeros_step

    @property
    def coded(self) -> bool:
        return self.scales_step is not None

    @classmethod
    def fitted(cls, dtype: torch.dtype, s: torch.Tensor, z: torch.Tensor | None) -> "ParamGrid":
        """The format version 2 grid whose steps span an unconstrained fit (s, z) [N, ...]."""
        zs = None if z is None else row_steps(z, ZERO_CODE_MAX, dtype)
        return cls(dtype, row_steps(s, SCALE_CODE_MAX, dtype), zs)

    def rows(self, sl: slice) -> "ParamGrid":
        """The grid of output rows ``sl`` (a slice of a stacked fit)."""
        if not self.coded:
            return self
        return ParamGrid(self.dtype, self.scales_step[sl], None if self.zeros_step is None else self.zeros_step[sl])

    def scale(self, s: torch.Tensor, up: bool = False) -> torch.Tensor:
        """``s`` on the grid: the nearest value, or with ``up`` (a min/max fit whose range must not
        shrink) the next code up; the dtype grid of version 1 always rounds to nearest."""
        if not self.coded:
            return s.to(self.dtype).to(torch.float32)
        if up:
            return decode(encode(s, self.scales_step, SCALE_CODES, up=True), self.scales_step, self.dtype).float()
        codes = nearest_codes(s, self.scales_step, self.dtype, SCALE_CODES)
        return decode(codes, self.scales_step, self.dtype).float()

    def offset(self, z: torch.Tensor) -> torch.Tensor:
        if not self.coded or self.zeros_step is None:
            return z.to(self.dtype).to(torch.float32)
        codes = nearest_codes(z, self.zeros_step, self.dtype, ZERO_CODES)
        return decode(codes, self.zeros_step, self.dtype).float()


def as_grid(grid: "ParamGrid | torch.dtype") -> ParamGrid:
    return grid if isinstance(grid, ParamGrid) else ParamGrid(grid)


def stored_tensors(scales: torch.Tensor, zeros: torch.Tensor | None, grid: ParamGrid) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a layer's (s, z) [N, G] (already on ``grid``), by name suffix.

    Version 1: ``scales``, ``zeros`` as they are. Version 2: the codes and steps; checked to decode
    back to exactly ``scales`` / ``zeros`` (they must come from the quantizers' grid)."""
    if not grid.coded:
        return {"scales": scales, "zeros": zeros}
    out = {"scales": _codes_of(scales, grid.scales_step, SCALE_CODES),
           "scales_step": grid.scales_step.contiguous()}
    if zeros is not None:
        out["zeros"] = _codes_of(zeros, grid.zeros_step, ZERO_CODES)
        out["zeros_step"] = grid.zeros_step.contiguous()
    return out


def nearest_codes(values: torch.Tensor, step: torch.Tensor, dtype: torch.dtype, codes: tuple[int, int]
                  ) -> torch.Tensor:
    """Codes whose decoded value dtype(code * step) is nearest to ``values`` (ties: the nearest code).

    Decoding rounds code * step to the model dtype, and bf16's 8-bit significand can round two codes
    above 128 to one value, so the nearest code of ``values`` may decode one value off: its neighbours
    are tried too. A value on the grid therefore gets a code that decodes to exactly it (rounding onto
    the grid is idempotent)."""
    v = values.to(torch.float32)
    lo, hi = codes
    best = encode(values, step, codes)
    err = (decode(best, step, dtype).float() - v).abs()
    for delta in (-1, 1):
        cand = (best.to(torch.int16) + delta).clamp(lo, hi).to(best.dtype)
        e = (decode(cand, step, dtype).float() - v).abs()
        better = e < err
        best, err = torch.where(better, cand, best), torch.where(better, e, err)
    return best


def _codes_of(values: torch.Tensor, step: torch.Tensor, codes: tuple[int, int]) -> torch.Tensor:
    """Codes that decode to exactly ``values`` (which must lie on the grid of ``step``)."""
    out = nearest_codes(values, step, values.dtype, codes)
    if not torch.equal(decode(out, step, values.dtype), values):
        raise AssertionError("format version 2: scales/offsets are not on their row grid (a quantizer bug)")
    return out


def module_tensors(tensors, module: str) -> dict[str, torch.Tensor]:
    """A checkpoint module's (s, z) tensors by name suffix, from a mapping of full tensor names."""
    return {n: tensors[f"{module}.{n}"] for n in GROUP_TENSORS[2] if f"{module}.{n}" in tensors}


def decode_tensors(tensors, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales, zeros) in ``dtype`` from a layer's stored tensors (a mapping by name suffix).

    Version 1 tensors (float ``scales``) are returned as they are (cast to ``dtype``); version 2
    codes are decoded with their steps. ``dtype`` None: the checkpoint's (of the scales, or steps)."""
    sc, zr = tensors["scales"], tensors.get("zeros")
    dtype = dtype or (sc if sc.is_floating_point() else tensors["scales_step"]).dtype
    if sc.is_floating_point():
        return sc.to(dtype), None if zr is None else zr.to(dtype)
    scales = decode(sc, tensors["scales_step"].to(dtype), dtype)
    zeros = None if zr is None else decode(zr, tensors["zeros_step"].to(dtype), dtype)
    return scales, zeros
