"""Coefficient rows of the DDIM family (DDIM, DDIMInverse, CogVideoXDDIM, CogVideoXDPM).

Every table here is indexed by the *training* timestep t (one row per t in [0, T)), so a
step with any timestep selects a row without arithmetic. The schedule's scalars follow
diffusers' formulas in the dtype of the ``alphas_cumprod`` given; the schedulers pass
float64 (``DDIMFamilyMixin``), so each coefficient is rounded to the step's dtype once,
when the table is placed.
"""

from __future__ import annotations

import torch

from .table import assemble, eps_conversion, x0_conversion


def _previous_alphas(alphas_cumprod: torch.Tensor, step_gap: int, final_alpha_cumprod: torch.Tensor):
    """(a_t, a_p) for every training timestep t, with t_p = t - step_gap (not the next entry)."""
    t = torch.arange(alphas_cumprod.shape[0])
    t_prev = t - step_gap
    a_prev = torch.where(
        t_prev >= 0,
        alphas_cumprod[t_prev.clamp(min=0)],
        final_alpha_cumprod.to(alphas_cumprod.dtype),
    )
    return alphas_cumprod, a_prev


def ddim_table(
    alphas_cumprod: torch.Tensor,
    step_gap: int,
    final_alpha_cumprod: torch.Tensor,
    prediction_type: str,
    eta: float,
    use_clipped_model_output: bool,
) -> torch.Tensor:
    """DDIM: prev = sqrt(a_p)*x0c + sqrt(1 - a_p - std^2)*eps + std*z, std = eta*sqrt(var)."""
    a_t, a_p = _previous_alphas(alphas_cumprod, step_gap, final_alpha_cumprod)
    b_t, b_p = 1 - a_t, 1 - a_p
    sqrt_a, sqrt_b = a_t**0.5, b_t**0.5
    variance = (b_p / b_t) * (1 - a_t / a_p)
    std = eta * variance**0.5
    direction_squared = 1 - a_p - std**2
    if abs(eta) <= 1:
        # (1-a_p)^2 a_t / (a_p (1-a_t)) at |eta| = 1, so >= 0 for |eta| <= 1; with zero-SNR
        # (a_t = 0) and eta = 1 it is 0 and float32 rounding can make it -1e-8, where diffusers
        # takes the square root of a negative number and returns NaN.
        direction_squared = direction_squared.clamp(min=0)
    # Above 1, negative (the row NaN, as diffusers' step) where eta^2 > a_p(1-a_t)/(a_p-a_t).
    direction = direction_squared**0.5

    x0 = x0_conversion(prediction_type, sqrt_a, sqrt_b)
    if use_clipped_model_output:
        # eps recomputed from the clipped x0: eps = (x - sqrt(a_t)*x0c) / sqrt(b_t)
        ox = direction / sqrt_b
        o0 = a_p**0.5 - direction * sqrt_a / sqrt_b
        om = torch.zeros_like(ox)
    else:
        ex, em = eps_conversion(prediction_type, sqrt_a, sqrt_b)
        ox, om = direction * ex, direction * em
        o0 = a_p**0.5
    return assemble(a_t.shape[0], **x0, p0=1.0, ox=ox, o0=o0, om=om, on=std)


def ddim_inverse_table(
    alphas_cumprod: torch.Tensor,
    step_gap: int,
    initial_alpha_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """DDIMInverse, indexed by the target (noisier) t: x0 and eps use a_c, c = min(t - gap, T-1)."""
    T = alphas_cumprod.shape[0]
    c = (torch.arange(T) - step_gap).clamp(max=T - 1)
    a_c = torch.where(c >= 0, alphas_cumprod[c.clamp(min=0)], initial_alpha_cumprod.to(alphas_cumprod.dtype))
    a_target = alphas_cumprod
    sqrt_a, sqrt_b = a_c**0.5, (1 - a_c) ** 0.5
    x0 = x0_conversion(prediction_type, sqrt_a, sqrt_b)
    ex, em = eps_conversion(prediction_type, sqrt_a, sqrt_b)
    direction = (1 - a_target) ** 0.5
    return assemble(
        T, **x0, p0=1.0,
        ox=direction * ex, om=direction * em, o0=a_target**0.5,
    )


def cogvideox_ddim_table(
    alphas_cumprod: torch.Tensor, step_gap: int, final_alpha_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """CogVideoXDDIM: prev = A*x + B*x0 with A = sqrt((1-a_p)/(1-a_t)), B = sqrt(a_p) - sqrt(a_t)*A."""
    a_t, a_p = _previous_alphas(alphas_cumprod, step_gap, final_alpha_cumprod)
    x0 = x0_conversion(prediction_type, a_t**0.5, (1 - a_t) ** 0.5)
    A = ((1 - a_p) / (1 - a_t)) ** 0.5
    B = a_p**0.5 - a_t**0.5 * A
    return assemble(a_t.shape[0], **x0, p0=1.0, ox=A, o0=B)


def _half_lambda(a: torch.Tensor) -> torch.Tensor:
    return ((a / (1 - a)) ** 0.5).log()


# Columns of the per-timestep solver terms (see cogvideox_dpm_tables).
LAMBDA, H, M2 = range(3)


def cogvideox_dpm_tables(
    alphas_cumprod: torch.Tensor, step_gap: int, final_alpha_cumprod: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoXDPM (SDE-DPM++ 2M midpoint in alpha-bar space), indexed by training timestep t.

    Returns (first-order rows, solver terms). A first-order row gives
    prev = M1*x - M2*x0 + Mn*z. The second-order step, prev = M1*x - M2*(M3*x0 - M4*old)
    with M3 = 1 + M4, is M1*x - M2*x0 - M2*M4*(x0 - old) + Mn*z with old in history slot h1
    (layout.py's differences, d = x0): it differs from the first-order row only in O1,
    which depends on the previous timestep too: ``cogvideox_dpm_history_column`` makes it
    from the solver terms (lambda_t, h, M2) at t and lambda at the previous timestep, with
    + - * / only, so host and device give the same bits.
    """
    a_t, a_p = _previous_alphas(alphas_cumprod, step_gap, final_alpha_cumprod)
    x0 = x0_conversion(prediction_type, a_t**0.5, (1 - a_t) ** 0.5)
    lam, lam_next = _half_lambda(a_t), _half_lambda(a_p)
    h = lam_next - lam
    m1 = ((1 - a_p) / (1 - a_t)) ** 0.5 * (-h).exp()
    m2 = (-2 * h).expm1() * a_p**0.5
    mn = (1 - a_p) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
    rows = assemble(a_t.shape[0], **x0, p0=1.0, ox=m1, o0=-m2, on=mn)
    return rows, torch.stack([lam, h, m2], dim=1)


def cogvideox_dpm_history_column(terms_t: torch.Tensor, lambda_back: torch.Tensor) -> torch.Tensor:
    """O1 = -M2*M4 of the second-order rows, M4 = 1/(2r): ``terms_t`` (N, 3) solver terms
    at t, ``lambda_back`` (N,) lambda at the previous timesteps, in the terms' dtype
    (float64 from the schedulers), on the host or on the device."""
    r = (terms_t[:, LAMBDA] - lambda_back) / terms_t[:, H]
    return -terms_t[:, M2] * (1 / (2 * r))
