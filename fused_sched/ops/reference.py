"""Pure-torch implementation of the fused step: the executable spec and the CPU fallback.

Reads like the math in ``layout.py``. Arithmetic is fp32 (fp64 when any input is fp64);
results are cast once, at the end, to the requested storage dtypes.

A step is made in two stages, like a kernel specialised at compile time: ``step_program``
and ``threshold_program`` fix what a call signature fixes (clip mode, which terms exist,
dtypes, row length, columns known to be 0 or 1) and return the arithmetic as a function of
the tensors alone; ``fused_step`` and ``threshold_scale`` make the program and run it. On
a small latent the decisions cost as much as the arithmetic, so the op keeps the program
of each call signature (``ops.StepPlan``) and runs only the arithmetic per step.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping

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

    Splitting a row into one view per column costs more than the step's arithmetic on a small
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


def _memoised(fn):
    """``fn`` behind an LRU cache of its (hashable) arguments, except while torch.compile
    traces: dynamo then traces ``fn`` itself, and at a cache wrapper it would warn of a
    possible silent incorrectness (these are pure functions of their arguments)."""
    cached = functools.lru_cache(maxsize=256)(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        return cached(*args, **kwargs)

    return call


@_memoised  # numpy scalar arithmetic costs microseconds; a schedule asks the same few
def quantile_rank(q: float, n: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, float]:
    """The order statistics torch.quantile interpolates, with its rank arithmetic.

    torch computes rank = q * (n - 1) in the input dtype: float32 for every storage dtype
    the kernels take (a float64 rank would pick a different weight for large n, e.g.
    n = 1,123,200), float64 for a float64 step.
    """
    real = np.float64 if dtype == torch.float64 else np.float32
    rank = real(q) * real(n - 1)
    lo = min(int(np.floor(rank)), n - 1)
    hi = min(int(np.ceil(rank)), n - 1)
    return lo, hi, float(rank - real(lo))


def hashable_columns(known: Mapping[int, float] | None) -> tuple:
    """A constant-columns hint as the programs below are keyed by: ((column, value), ...)."""
    return tuple(sorted(known.items())) if known else ()


# ---- linear forms: every sum of coefficient-weighted tensors in the step -----------------

# A sum of no terms, as the kernels start every sum: -0.0, the identity of addition.
EMPTY_SUM = -0.0


def linear_form(columns: tuple[int, ...], known: Mapping[int, float]):
    """f(c, tensors) = sum(c[column] * t for column, t in zip(columns, tensors)), rounded as
    the kernels round it: the first product, then one fused multiply-add (addcmul,
    a + b*c) per further term; None when every term is known to be zero.

    Columns ``known`` to be 0 in every row are left out, as every backend leaves them out
    (``layout.absent_terms``: diffusers has no such terms, and 0*t would be NaN for an
    infinite t), and known 1s are not multiplied (1*t == t). ``f.passes_through`` is the index of the tensor f
    returns itself (a lone term with coefficient 1), else None: otherwise the result is a
    new tensor, which later terms accumulate into in place (the same kernels as the
    out-of-place ops, so the same bits, without an allocation per term).
    """
    terms = tuple((i, column, known.get(column) == 1.0)
                  for i, column in enumerate(columns) if known.get(column) != 0.0)
    # A unit first term is an input: the second term makes the sum a new tensor.
    steps = tuple((i, column, unit, n > 1 or (n == 1 and not terms[0][2]))
                  for n, (i, column, unit) in enumerate(terms))

    def form(c, tensors):
        total = None
        for i, column, unit, in_place in steps:
            t = tensors[i]
            if total is None:
                total = t if unit else c[column] * t
            elif in_place:
                total.add_(t) if unit else total.addcmul_(c[column], t)
            else:
                total = total + t if unit else torch.addcmul(total, c[column], t)
        return total

    form.passes_through = terms[0][0] if len(terms) == 1 and terms[0][2] else None
    return form


def scaled_form(columns: tuple[int, ...], scale: int, known: Mapping[int, float]):
    """f(c, tensors) = c[scale] * (the ``linear_form`` of ``columns``): the sum is formed
    first and scaled after (layout.py's AS and PS); None when every term is known to be
    zero. ``f.passes_through`` as for ``linear_form`` where the scale is known to be 1,
    else None: the result is then a new tensor."""
    combination = linear_form(columns, known)
    scaled = known.get(scale) != 1.0
    owned = combination.passes_through is None  # the sum is a new tensor: scale it in place

    def form(c, tensors):
        total = combination(c, tensors)
        if total is None or not scaled:
            return total
        return total.mul_(c[scale]) if owned else total * c[scale]

    form.passes_through = None if scaled else combination.passes_through
    return form


def _x0_program(known: Mapping[int, float]):
    """x0 = AS*(AX*x + AM*m + AL*m), before any clipping, as f(c, x, m); ``f.passes_through``
    as for ``scaled_form`` (x0 is x or m itself), else x0 is a new tensor."""
    form = scaled_form((L.AX, L.AM, L.AL), L.AS, known)

    def x0(c, x, m):
        total = form(c, (x, m, m))
        return torch.full_like(x, EMPTY_SUM) if total is None else total

    x0.passes_through = form.passes_through  # 0: x, 1: m
    return x0


# ---- dynamic thresholding ------------------------------------------------------------------

@_memoised
def threshold_program(ratio: float, max_value: float, row_shape: tuple[int, ...], dtype: torch.dtype,
                      known: tuple = ()):
    """s_b = clamp(quantile(|x0_b|, ratio), min=1, max=max_value) for batch rows of shape
    ``row_shape`` (the sample's shape without its batch dimension), as
    f(sample, model_output, coefficients) -> (s, x0): s shaped to broadcast over a batch row,
    (B, 1, ..., 1), and the unclipped x0 it was found from, in ``dtype``.

    Exactly as torch.quantile would give it, but by selection (topk, from whichever end of
    the row is nearer the quantile): no 2**24 limit, and one pass finds both order
    statistics. A row containing NaN gives NaN, as torch.quantile does.
    """
    x0_of = _x0_program(dict(known))
    numel = math.prod(row_shape)
    lo, hi, weight = quantile_rank(ratio, numel, dtype)
    from_top = numel - lo <= hi + 1  # the usual case (ratio near 1)
    # Each batch row laid out along the last dimension, so every statistic keeps the shape
    # (B, 1, ..., 1) that clipping broadcasts; a 1-D sample's rows are (B, 1), and its
    # statistics are made (B,) at the end.
    rows_shape = (-1,) + (1,) * (len(row_shape) - 1) + (numel,)
    flat_batch = not row_shape

    def scale(sample, model_output, coefficients):
        x, m = _as(sample, dtype), _as(model_output, dtype)
        x0 = x0_of(_column_views.get(coefficients, x.dim(), dtype), x, m)
        rows = x0.reshape(*rows_shape).abs()
        if from_top:  # the numel - lo largest, descending
            largest = torch.topk(rows, numel - lo, dim=-1).values
            s, v_hi = largest.narrow(-1, -1, 1), largest.narrow(-1, -1 if hi == lo else -2, 1)
            top = largest.narrow(-1, 0, 1)  # NaN ranks above every number
        else:  # the hi + 1 smallest, ascending
            smallest = torch.topk(rows, hi + 1, dim=-1, largest=False).values
            s, v_hi = smallest.narrow(-1, lo, 1), smallest.narrow(-1, hi, 1)
            top = rows.amax(dim=-1, keepdim=True)  # NaN when the row holds one
        if hi != lo:
            # Equal order statistics are the quantile; torch.lerp(inf, inf, w) would be NaN
            # (x0 is +-inf for epsilon prediction where alphas_cumprod is 0, and
            # torch.quantile gives NaN there).
            s = torch.where(s == v_hi, s, torch.lerp(s, v_hi, weight))
        s = torch.where(torch.isnan(top), top, s)
        s = s.clamp_(min=1.0, max=max_value)  # s is this program's own tensor
        return (s.reshape(-1) if flat_batch else s), x0

    return scale


def threshold_scale(sample, model_output, coefficients, ratio: float, max_value: float, constant_columns=None):
    """Per-batch-row dynamic-thresholding scale s_b, shape (B,), float32 (float64 for fp64):
    see ``threshold_program``."""
    program = threshold_program(float(ratio), float(max_value), tuple(sample.shape[1:]),
                                compute_dtype(sample, model_output), hashable_columns(constant_columns))
    return program(sample, model_output, coefficients)[0].reshape(-1)


# ---- the step ------------------------------------------------------------------------------

@_memoised
def step_program(clip: str, clip_range: float, history: int, noise: str, dtype: torch.dtype,
                 out_dtype: torch.dtype, history_dtype: torch.dtype | None, x0_dtype: torch.dtype | None,
                 known: tuple = ()) -> Callable:
    """The step for one structure, as f(sample, model_output, coefficients, history, noise,
    scale, x0) -> (prev, history value or None, x0 or None).

    ``history``: how many history tensors; ``noise``: "none", "tensor" or "philox" (see
    ``fused_step``); ``known``: ((column, value), ...) holding in every row (see
    ``linear_form``). f's ``scale`` is thresholding's s in ``dtype``, shaped to broadcast
    over a batch row, and its ``x0`` the unclipped x0 when the caller has it already (the
    thresholding pass, ``threshold_program``), else None.
    """
    known = dict(known)
    x0_of = _x0_program(known)
    x0_owned = x0_of.passes_through is None  # a new tensor, clamped in place
    d_of = scaled_form((L.PX, L.P0, L.PM), L.PS, known)
    clipped = clip != "none"
    # Where clipping left x0 unchanged, a row may give d without x0 (layout.py, US); a US
    # known to be 0 in every row means no row does.
    unclipped_form = clipped and known.get(L.US) != 0.0
    unclipped_d_of = scaled_form((L.UX, L.UM), L.US, known) if unclipped_form else None
    us_known = L.US in known
    draws = noise == "tensor" or (noise == "philox" and known.get(L.ON) != 0.0)  # a known-zero term draws nothing
    philox = noise == "philox"
    out_of = linear_form((L.OX,) + ((L.OC,) if clipped else ()) + (L.O0, L.OM) + (L.O1, L.O2)[:history]
                         + ((L.ON,) if draws else ()), known)
    # An output may be an input, or another output, only where a lone unit term hands a
    # tensor through (d = x0, x0 = m for sample prediction): then it is copied.
    may_alias = (out_of.passes_through is not None
                 or (history_dtype is not None and d_of.passes_through is not None)
                 or (x0_dtype is not None and not clipped and x0_of.passes_through is not None))

    def step(sample, model_output, coefficients, history, noise, scale, x0):
        x, m = _as(sample, dtype), _as(model_output, dtype)
        c = _column_views.get(coefficients, x.dim(), dtype)

        if x0 is None:
            x0 = x0_of(c, x, m)
        unclipped_x0 = x0
        if clip == "clamp":
            in_place = x0_owned and not unclipped_form
            x0 = x0.clamp_(-clip_range, clip_range) if in_place else torch.clamp(x0, -clip_range, clip_range)
        elif clip == "threshold":
            # clamp(x0, -s, s) / s, one op shorter: for s > 0 (or NaN, or inf) the two agree
            # bit for bit, as division by s is monotone and s / s == 1 exactly.
            x0 = (x0 / scale).clamp_(-1.0, 1.0)

        d = d_of(c, (x, x0, m))
        if d is None:
            d = torch.full_like(x, EMPTY_SUM)
        if unclipped_form:
            unchanged = x0 == unclipped_x0  # False where x0 is NaN
            if not us_known:
                unchanged &= c[L.US] != 0.0
            d_unclipped = unclipped_d_of(c, (x, m))
            d = torch.where(unchanged, EMPTY_SUM if d_unclipped is None else d_unclipped, d)
        terms = (x, x0, d, m) if clipped else (x, d, m)
        if history:  # as differences of consecutive values, d - h1 and h1 - h2 (layout.py)
            values = (d,) + tuple(_as(h, dtype) for h in history)
            terms += tuple(newer - older for newer, older in zip(values, values[1:]))
        if draws:
            terms += (noise_like(noise, x, dtype) if philox else _as(noise, dtype),)
        out = out_of(c, terms)
        if out is None:
            out = torch.full_like(x, EMPTY_SUM)

        outputs = (
            _as(out, out_dtype),
            None if history_dtype is None else _as(d, history_dtype),
            None if x0_dtype is None else _as(x0, x0_dtype),
        )
        return _owned(outputs, (sample, model_output, *history, noise)) if may_alias else outputs

    return step


def noise_kind(noise) -> str:
    return "none" if noise is None else "philox" if isinstance(noise, PhiloxNoise) else "tensor"


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
    and ones spare their terms (see ``linear_form``).

    ``noise``: z as a tensor, or ``PhiloxNoise(seed, offset)``: z of the element with flat
    index i is ``philox.philox_normal`` at counter offset + i (float32, like the kernels).
    """
    dtype = compute_dtype(sample, model_output, *history)
    program = step_program(clip, float(clip_range), len(history), noise_kind(noise), dtype, out_dtype, history_dtype,
                           x0_dtype, hashable_columns(constant_columns))
    if scale is not None:  # (B,) -> (B, 1, ..., 1)
        scale = _as(scale, dtype).reshape((-1,) + (1,) * (sample.dim() - 1))
    return program(sample, model_output, coefficients, history, noise, scale, None)


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
