"""Pure-torch implementation of the fused step: the executable spec and the CPU fallback.

Reads like the math in ``layout.py``. Arithmetic is fp32 (fp64 when any input is fp64);
results are cast once, at the end, to the requested storage dtypes.
"""

from __future__ import annotations

import numpy as np
import torch

from . import layout as L


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to costs a dispatch even when it is a no-op; this path runs every step.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _rows(coefficients: torch.Tensor, ndim: int, dtype: torch.dtype):
    """Per-column views shaped (B or 1, 1, ..., 1) so they broadcast over one batch row."""
    c = _as(coefficients, dtype)
    return c.reshape(c.shape + (1,) * (ndim - 1)).unbind(1)


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
    return _x0(_rows(coefficients, x.dim(), dtype), x, m)


def _x0(c, x, m):
    # addcmul(a, b, c) = a + b*c: one dispatch instead of two keeps the CPU fallback's
    # per-step host overhead low on small latents.
    return torch.addcmul(c[L.AX] * x, c[L.AM], m) * c[L.AS]


def threshold_scale(sample, model_output, coefficients, ratio: float, max_value: float):
    """Per-batch-row dynamic-thresholding scale s_b, shape (B,), float32 (float64 for fp64).

    s_b = clamp(quantile(|x0_b|, ratio), min=1, max=max_value), exactly as torch.quantile
    would give it, but by selection (kthvalue) so rows above 2**24 elements work too.
    A row containing NaN gives NaN, as torch.quantile does.
    """
    dtype = compute_dtype(sample, model_output)
    x0 = data_estimate(sample, model_output, coefficients, dtype)
    flat = x0.reshape(x0.shape[0], -1).abs()
    lo, hi, weight = quantile_rank(ratio, flat.shape[1])
    v_lo = torch.kthvalue(flat, lo + 1, dim=1).values
    v_hi = v_lo if hi == lo else torch.kthvalue(flat, hi + 1, dim=1).values
    # Equal order statistics are the quantile; torch.lerp(inf, inf, w) would be NaN (x0 is
    # +-inf for epsilon prediction where alphas_cumprod is 0, and torch.quantile gives NaN).
    s = torch.where(v_lo == v_hi, v_lo, torch.lerp(v_lo, v_hi, torch.full_like(v_lo, weight)))
    s = torch.where(torch.isnan(flat).any(dim=1), torch.full_like(s, float("nan")), s)
    return torch.clamp(s, min=1.0, max=max_value)


def fused_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    history: tuple[torch.Tensor, ...],
    noise: torch.Tensor | None,
    clip: str,
    clip_range: float,
    scale: torch.Tensor | None,
    out_dtype: torch.dtype,
    history_dtype: torch.dtype | None,
    x0_dtype: torch.dtype | None,
):
    """Returns (prev, history value or None, x0 or None). Arguments are already validated."""
    dtype = compute_dtype(sample, model_output, *history)
    x = _as(sample, dtype)
    m = _as(model_output, dtype)
    c = _rows(coefficients, x.dim(), dtype)

    x0 = _x0(c, x, m)
    if clip == "clamp":
        x0 = torch.clamp(x0, -clip_range, clip_range)
    elif clip == "threshold":
        s = _as(scale, dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        x0 = torch.minimum(torch.maximum(x0, -s), s) / s

    d = torch.addcmul(torch.addcmul(c[L.PX] * x, c[L.P0], x0), c[L.PM], m)
    out = torch.addcmul(torch.addcmul(c[L.OX] * x, c[L.O0], d), c[L.OM], m)
    for column, h in zip((L.O1, L.O2), history):
        out = torch.addcmul(out, c[column], _as(h, dtype))
    if noise is not None:
        out = torch.addcmul(out, c[L.ON], _as(noise, dtype))

    return (
        _as(out, out_dtype),
        None if history_dtype is None else _as(d, history_dtype),
        None if x0_dtype is None else _as(x0, x0_dtype),
    )
