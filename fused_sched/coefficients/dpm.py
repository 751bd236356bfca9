"""Coefficient rows of the multistep DPM-Solver family (forward and inverse).

One row per (step i, solver order 1..3); row index ``3*i + order - 1``. Every scalar
(alpha, sigma, lambda, h, r, the update multipliers, the expansion of D1/D2 into the
history terms M0, M1, M2) follows diffusers' formulas, vectorised over steps, in the dtype
of the sigmas given: the schedulers pass float64 (see ``dpm_table``).
"""

from __future__ import annotations

import torch

from ..ops import layout as L
from .table import assemble, difference_weights, eps_conversion, fold_history_value, x0_conversion

MAX_ORDER = 3
DATA_PREDICTION_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
SDE_ALGORITHMS = ("sde-dpmsolver", "sde-dpmsolver++")


def row_index(step: int, order: int) -> int:
    return MAX_ORDER * step + order - 1


def alpha_sigma(sigmas: torch.Tensor, use_flow_sigmas: bool):
    """(alpha_t, sigma_t) of diffusers' ``_sigma_to_alpha_sigma_t``."""
    if use_flow_sigmas:
        return 1 - sigmas, sigmas
    alpha = 1 / ((sigmas**2 + 1) ** 0.5)
    return alpha, sigmas * alpha


def _shifted(values: torch.Tensor, back: int, steps: int) -> torch.Tensor:
    """values[i - back] for i in [0, steps), NaN where i - back < 0."""
    out = torch.full((steps,), float("nan"), dtype=values.dtype)
    if back < steps:
        out[back:] = values[: steps - back]
    return out


def _conversion_columns(config, sigmas, alpha, sigma, steps):
    """x0 = as*(ax*x + am*m) and the history value d = ps*(px*x + p0*x0c + pm*m) at sigma index
    i, with d = us*(ux*x + um*m) where clipping left x0 unchanged."""
    s, a, sg = sigmas[:steps], alpha[:steps], sigma[:steps]
    prediction = config.prediction_type
    if config.algorithm_type in DATA_PREDICTION_ALGORITHMS:
        if prediction == "flow_prediction":
            return dict(ax=torch.ones_like(s), am=-s, p0=1.0)
        return dict(**x0_conversion(prediction, a, sg), p0=1.0)
    # dpmsolver / sde-dpmsolver store eps = scale*(ex*x + em*m); x0 only matters for
    # thresholding. Where eps is (x - alpha*x0)/sigma it is scaled after it cancels (PS,
    # layout.py), as diffusers does.
    if prediction == "sample":
        x0, (scale, ex, em) = dict(ax=0.0, am=1.0), (1 / sg, 1.0, -a)
    else:
        (ex, em), scale = eps_conversion(prediction, a, sg), 1.0
        x0 = dict(ax=1 - sg * ex, am=-sg * em, **{"as": 1 / a})  # (x - sigma*eps)/alpha
    if not config.thresholding:
        return dict(**x0, ps=scale, px=ex, pm=em)
    # eps from the clipped x0, (x - alpha*x0c)/sigma; where clipping left x0 unchanged, the
    # eps x0 was found from, without the round trip (US, layout.py)
    return dict(**x0, ps=1 / sg, px=1.0, p0=-a, us=scale, ux=ex, um=em)


def _update_multipliers(algorithm: str, solver_type: str, order: int, alpha_t, sigma_t, alpha_s0, sigma_s0, h):
    """(ox, k0, k1, k2, on) with prev = ox*x + k0*D0 + k1*D1 + k2*D2 + on*z (diffusers' scalars).

    The SDE noise variances 1 - exp(-2h) and exp(2h) - 1 are negative where sigma rises
    across the step (h < 0: custom ascending timesteps, or flow sigmas followed by a larger
    VP sigma_min): their square root is NaN there, as diffusers' is, and the scheduler refuses
    such a row at its step (a noise scale clamped at 0 dropped the noise silently). Equal
    sigmas give h = 0 exactly in float64, and a variance of 0.
    """
    zero = torch.zeros_like(h)
    k1 = k2 = on = zero
    if algorithm == "dpmsolver++":
        ox = sigma_t / sigma_s0
        k0 = -(alpha_t * (torch.exp(-h) - 1.0))
        if order == 2 and solver_type == "midpoint":
            k1 = -(0.5 * (alpha_t * (torch.exp(-h) - 1.0)))
        elif order >= 2:
            k1 = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        if order == 3:
            k2 = -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
    elif algorithm == "dpmsolver":
        ox = alpha_t / alpha_s0
        k0 = -(sigma_t * (torch.exp(h) - 1.0))
        if order == 2 and solver_type == "midpoint":
            k1 = -(0.5 * (sigma_t * (torch.exp(h) - 1.0)))
        elif order >= 2:
            k1 = -(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))
        if order == 3:
            k2 = -(sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5))
    elif algorithm == "sde-dpmsolver++":
        ox = sigma_t / sigma_s0 * torch.exp(-h)
        k0 = alpha_t * (1 - torch.exp(-2.0 * h))
        on = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        if order == 2 and solver_type == "midpoint":
            k1 = 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h)))
        elif order >= 2:
            k1 = alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        if order == 3:
            k2 = alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    elif algorithm == "sde-dpmsolver":
        ox = alpha_t / alpha_s0
        k0 = -2.0 * (sigma_t * (torch.exp(h) - 1.0))
        on = sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
        if order == 2 and solver_type == "midpoint":
            k1 = -(sigma_t * (torch.exp(h) - 1.0))
        elif order == 2:
            k1 = -2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))
        elif order == 3:
            # diffusers has no third-order sde-dpmsolver update; the schedulers reject it.
            nan = torch.full_like(h, float("nan"))
            return nan, nan, nan, nan, nan
    else:
        raise ValueError(f"algorithm_type={algorithm!r} is not supported")
    return ox, k0, k1, k2, on


def _history_weights(order: int, r0, r1):
    """Weights of (M0, M1, M2) in D0, D1, D2, from diffusers' r0, r1."""
    one = torch.ones_like(r0)
    zero = torch.zeros_like(one)
    D0 = (one, zero, zero)
    if order == 1:
        return D0, (zero, zero, zero), (zero, zero, zero)
    inv_r0 = 1.0 / r0
    D1_0 = (inv_r0, -inv_r0, zero)
    if order == 2:
        return D0, D1_0, (zero, zero, zero)
    inv_r1 = 1.0 / r1
    D1_1 = (zero, inv_r1, -inv_r1)
    diff = tuple(a - b for a, b in zip(D1_0, D1_1))
    w = r0 / (r0 + r1)
    inv_sum = 1.0 / (r0 + r1)
    D1 = tuple(a + w * d for a, d in zip(D1_0, diff))
    D2 = tuple(inv_sum * d for d in diff)
    return D0, D1, D2


def dpm_table(config, sigmas: torch.Tensor) -> torch.Tensor:
    """(3*steps, K) float64 rows for a schedule with ``len(sigmas) - 1`` steps.

    Rows for an order the step cannot have (not enough history) are NaN and never selected.
    A step between equal sigmas (h = 0: the inverse scheduler's duplicated last sigma, or
    karras/exponential sigmas ending at sigma_min with final_sigmas_type="sigma_min") is the
    identity, prev = x: that is the h -> 0 limit of every update, where diffusers' heun and
    third-order formulas evaluate 0/0 and return NaN.

    Pass the sigmas as float64 (diffusers stores float32 values; cast them up): each
    coefficient is then rounded to the step's dtype once, when the table is placed. Formed
    in float32 as diffusers forms its scalars, their rounding errors were then composed
    and folded (``fold_history_value``), which diffusers' step does not do, and a step
    landed up to 1.4x farther from a float64 evaluation than diffusers' step
    (test_conformance.py, test_steps_are_no_farther_from_float64_than_diffusers).
    """
    steps = sigmas.shape[0] - 1
    alpha, sigma = alpha_sigma(sigmas, config.use_flow_sigmas)
    lam = torch.log(alpha) - torch.log(sigma)
    lam_t, lam_s0 = lam[1:], lam[:-1]
    lam_s1, lam_s2 = _shifted(lam_s0, 1, steps), _shifted(lam_s0, 2, steps)
    h, h0, h1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
    r0, r1 = h0 / h, h1 / h

    conversion = _conversion_columns(config, sigmas, alpha, sigma, steps)
    tables = []
    for order in (1, 2, 3):
        ox, k0, k1, k2, on = _update_multipliers(
            config.algorithm_type, config.solver_type, order, alpha[1:], sigma[1:], alpha[:-1], sigma[:-1], h
        )
        D0, D1, D2 = _history_weights(order, r0, r1)
        weights = [k0 * D0[j] + k1 * D1[j] + k2 * D2[j] for j in range(3)]  # of M0, M1, M2
        o0, o1, o2 = difference_weights(*weights)
        table = assemble(steps, ox=ox, o0=o0, o1=o1, o2=o2, on=on, **conversion)
        if config.algorithm_type not in DATA_PREDICTION_ALGORITHMS:
            table = fold_history_value(table)  # d = eps cancels against x where alpha is small
        output = list(L.OUTPUT_COLUMNS)
        if order > 1:
            table[: order - 1, output] = float("nan")  # needs history that cannot exist yet
        # A flat step's output is x; its x0 and history value stay what diffusers stores
        flat = (h == 0).nonzero().flatten()
        table[flat[:, None], output] = 0.0
        table[flat, L.OX] = 1.0
        tables.append(table)
    return torch.stack(tables, dim=1).reshape(MAX_ORDER * steps, L.NUM_COEFFICIENTS)
