"""Pure-torch implementation of the fused step: the executable spec and the CPU fallback.

Reads like the math in ``layout.py``. Arithmetic is fp32 (fp64 when any input is fp64);
results are cast once, at the end, to the requested storage dtypes.
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np
import torch

from . import layout as L
from .philox import PhiloxNoise, noise_like


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to costs a dispatch even when it is a no-op; this path runs every step.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _rows(coefficients: torch.Tensor, ndim: int, dtype: torch.dtype):
    """Per-column views that broadcast over one batch row: shape (1,) for a single row,
    (B, 1, ..., 1) for one row per batch element."""
    c = _as(coefficients, dtype)
    if c.shape[0] == 1:
        return c.unbind(1)
    return c.reshape(c.shape + (1,) * (ndim - 1)).unbind(1)


class _ColumnViews:
    """Column views of recently used coefficient rows, reused across steps.

    Splitting a row into thirteen views costs more than the step's arithmetic on a small
    latent, and a schedule passes the same few rows again and again. Schedulers pass the
    same row object for the same row (``PlacedTable.row``), found by identity; other rows
    are found by the memory they occupy (address, shape, strides, dtype, device): two live
    tensors with that key view the same memory, and a cached view keeps that memory
    allocated, so a key can never name other values. In-place writes to a table are seen,
    as views see them.
    """

    capacity = 512

    def __init__(self):
        self._by_object: dict = {}  # id(row) -> (row, views); the row is held, so ids stay unique
        self._by_memory: dict = {}

    def get(self, coefficients: torch.Tensor, ndim: int, dtype: torch.dtype):
        if torch.compiler.is_compiling() or coefficients.dtype != dtype:
            return _rows(coefficients, ndim, dtype)  # traced tensors have no address
        batched = coefficients.shape[0] > 1
        known = self._by_object.get(id(coefficients))
        if known is not None and known[0] is coefficients and (not batched or known[1] == ndim):
            return known[2]
        key = (coefficients.data_ptr(), coefficients.shape, coefficients.stride(), dtype, coefficients.device,
               ndim if batched else 0)
        views = self._by_memory.get(key)
        if views is None:
            if len(self._by_memory) >= self.capacity:
                self._by_memory.clear()
            views = self._by_memory[key] = _rows(coefficients, ndim, dtype)
        if len(self._by_object) >= self.capacity:
            self._by_object.clear()
        self._by_object[id(coefficients)] = (coefficients, ndim, views)
        return views


_column_views = _ColumnViews()


@functools.lru_cache(maxsize=256)  # numpy scalar arithmetic costs microseconds; a schedule asks the same few
def quantile_rank(q: float, n: int) -> tuple[int, int, float]:
    """The order statistics torch.quantile interpolates, with its float32 rank arithmetic.

    torch computes rank = q * (n - 1) in the input dtype (float32); a float64 rank would
    pick a different weight for large n (e.g. n = 1,123,200).
    """
    rank = np.float32(q) * np.float32(n - 1)
    # Above 2**24 elements (where torch.quantile refuses) n - 1 itself rounds in float32 and
    # the rank can land past the last index: clamp, as the kernels do.
    lo = min(int(np.floor(rank)), n - 1)
    hi = min(int(np.ceil(rank)), n - 1)
    return lo, hi, float(rank - np.float32(lo))


def data_estimate(sample, model_output, coefficients, dtype):
    """x0 = AS*(AX*x + AM*m), before any clipping, in ``dtype``."""
    x = _as(sample, dtype)
    m = _as(model_output, dtype)
    return _x0(_column_views.get(coefficients, x.dim(), dtype), x, m)


def _combination(c, terms, known):
    """sum(c[column] * t for column, t in terms), rounded as the kernels round it: the first
    product, then one fused multiply-add (addcmul, a + b*c) per further term.

    Columns the caller knows to be 0 in every row are skipped and known 1s are not
    multiplied: for finite values that changes no bit (a + 0*t == a, 1*t == t), and it is
    what diffusers computes (it has no such terms). None when every term is known zero.
    """
    total = None
    for column, t in terms:
        k = known.get(column)
        if k == 0.0:
            continue
        if total is None:
            total = t if k == 1.0 else c[column] * t
        else:
            total = total + t if k == 1.0 else torch.addcmul(total, c[column], t)
    return total


def _x0(c, x, m, known=None):
    known = known or {}
    x0 = _combination(c, ((L.AX, x), (L.AM, m)), known)
    if x0 is None:
        return torch.zeros_like(x)
    return x0 if known.get(L.AS) == 1.0 else x0 * c[L.AS]


def threshold_scale(sample, model_output, coefficients, ratio: float, max_value: float):
    """Per-batch-row dynamic-thresholding scale s_b, shape (B,), float32 (float64 for fp64).

    s_b = clamp(quantile(|x0_b|, ratio), min=1, max=max_value), exactly as torch.quantile
    would give it, but by selection (topk, from whichever end of the row is nearer the
    quantile): no 2**24 limit, and one pass finds both order statistics. A row containing
    NaN gives NaN, as torch.quantile does.
    """
    dtype = compute_dtype(sample, model_output)
    x0 = data_estimate(sample, model_output, coefficients, dtype)
    flat = x0.reshape(x0.shape[0], -1).abs()
    n = flat.shape[1]
    lo, hi, weight = quantile_rank(ratio, n)
    if n - lo <= hi + 1:  # the usual case (ratio near 1): the n - lo largest, descending
        largest = torch.topk(flat, n - lo, dim=1).values
        s, v_hi = largest[:, -1], largest[:, -1 if hi == lo else -2]
        has_nan = torch.isnan(largest[:, 0])  # NaN ranks above every number
    else:  # the hi + 1 smallest, ascending
        smallest = torch.topk(flat, hi + 1, dim=1, largest=False).values
        s, v_hi = smallest[:, lo], smallest[:, hi]
        has_nan = torch.isnan(flat).any(dim=1)
    # Equal order statistics are the quantile; torch.lerp(inf, inf, w) would be NaN (x0 is
    # +-inf for epsilon prediction where alphas_cumprod is 0, and torch.quantile gives NaN).
    s = torch.where(s == v_hi, s, torch.lerp(s, v_hi, weight))
    s = s.masked_fill(has_nan, float("nan"))
    return torch.clamp(s, min=1.0, max=max_value)


def fused_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    history: tuple[torch.Tensor, ...],
    noise: torch.Tensor | PhiloxNoise | None,
    clip: str,
    clip_range: float,
    scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    history_dtype: torch.dtype | None,
    x0_dtype: torch.dtype | None,
    constant_columns: Mapping[int, float] | None = None,
):
    """Returns (prev, history value or None, x0 or None). Arguments are already validated.

    ``constant_columns``: {column: value} the caller guarantees for every row; known zeros
    and ones spare their terms (see ``_combination``).

    ``noise``: z as a tensor, or ``PhiloxNoise(seed, offset)``: z of the element with flat
    index i is ``philox.philox_normal`` at counter offset + i (float32, like the kernels).
    """
    known = constant_columns or {}
    dtype = compute_dtype(sample, model_output, *history)
    x = _as(sample, dtype)
    m = _as(model_output, dtype)
    c = _column_views.get(coefficients, x.dim(), dtype)

    x0 = _x0(c, x, m, known)
    if clip == "clamp":
        x0 = torch.clamp(x0, -clip_range, clip_range)
    elif clip == "threshold":
        s = _as(scale, dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        x0 = torch.minimum(torch.maximum(x0, -s), s) / s

    d = _combination(c, ((L.PX, x), (L.P0, x0), (L.PM, m)), known)
    if d is None:
        d = torch.zeros_like(x)
    terms = [(L.OX, x)] + ([] if clip == "none" else [(L.OC, x0)]) + [(L.O0, d), (L.OM, m)]
    terms += [(column, _as(h, dtype)) for column, h in zip((L.O1, L.O2), history)]
    if isinstance(noise, PhiloxNoise):
        if known.get(L.ON) != 0.0:  # a known-zero term would be skipped: draw nothing
            terms.append((L.ON, noise_like(noise, x, dtype)))
    elif noise is not None:
        terms.append((L.ON, _as(noise, dtype)))
    out = _combination(c, terms, known)
    if out is None:
        out = torch.zeros_like(x)

    outputs = (
        _as(out, out_dtype),
        None if history_dtype is None else _as(d, history_dtype),
        None if x0_dtype is None else _as(x0, x0_dtype),
    )
    if not known:
        return outputs  # every output is a fresh result of arithmetic
    return _owned(outputs, (sample, model_output, *history, noise))


def _owned(outputs, inputs):
    """Outputs as fresh tensors: a skipped identity term (d = x0, x0 = m for sample
    prediction) must not hand back an input, or one output twice."""
    seen = [t for t in inputs if t is not None]
    owned = []
    for t in outputs:
        if t is not None and any(t is other for other in seen):
            t = t.clone()
        if t is not None:
            seen.append(t)
        owned.append(t)
    return tuple(owned)
