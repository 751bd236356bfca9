"""Whole-trajectory comparison of a fused scheduler with diffusers, for `fused-sched verify`.

A deterministic stand-in model replaces the network: smooth and contractive (Lipschitz 0.6
in x), so a trajectory does not amplify float32 rounding and any growing difference is a
difference in the step.
"""

from __future__ import annotations

import dataclasses

import torch

from . import ops
from .benchmark import SCHEDULERS

FP32_TOLERANCE = 1e-4  # relative to max|diffusers|, per step; see tests/test_conformance.py


def stand_in_model(x: torch.Tensor, t, pattern: torch.Tensor) -> torch.Tensor:
    m = 0.6 * torch.tanh(x.float()) + 0.3 * pattern * torch.cos(torch.tensor(float(t) / 150.0))
    return m.to(x.dtype)


def _step(kind: str, scheduler, m, i, x, old):
    t = scheduler.timesteps[i]
    if kind.startswith("cogvideox-dpm"):
        back = scheduler.timesteps[i - 1] if i > 0 else None
        return scheduler.step(m, old, t, back, x, return_dict=False)
    out = scheduler.step(m, t, x, return_dict=False)
    return out[0], (out[1] if len(out) > 1 else None)


def trajectory(kind: str, fused: bool, shape, steps: int, dtype=torch.float32, device="cpu", seed=0):
    """prev samples of a whole trajectory from fixed x_T and stand-in model."""
    reference_cls, fused_cls, config = SCHEDULERS[kind]
    scheduler = (fused_cls if fused else reference_cls)(**config)
    scheduler.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    pattern = torch.randn(shape, generator=g).to(device)
    outputs, old = [], None
    for i in range(len(scheduler.timesteps)):
        m = stand_in_model(x, scheduler.timesteps[i], pattern)
        x, old = _step(kind, scheduler, m, i, x, old)
        outputs.append(x)
    return outputs


@dataclasses.dataclass
class Verdict:
    backend: str
    max_relative_error: float | None
    passed: bool
    note: str = ""


def verify(kind: str, shape=(2, 4, 16, 16), steps: int = 20, device="cpu") -> list[Verdict]:
    """Max per-step relative error of every available backend against diffusers."""
    if SCHEDULERS[kind][2].get("algorithm_type", "").startswith("sde") or kind == "cogvideox-dpm":
        note = "stochastic: both draw from the same seeded generator"
    else:
        note = ""
    reference = trajectory(kind, False, shape, steps, device=device)
    verdicts = []
    for name in ("torch", "cpu", "cuda", "triton"):
        reason = ops.backends.why_unavailable(name, torch.device(device), (torch.float32,))
        if reason is not None:
            verdicts.append(Verdict(name, None, True, f"unavailable: {reason}"))
            continue
        torch.manual_seed(0)
        with ops.use_backend(name):
            fused = trajectory(kind, True, shape, steps, device=device)
        error = max(float((f.double() - r.double()).abs().max() / r.double().abs().max())
                    for f, r in zip(fused, reference))
        verdicts.append(Verdict(name, error, error <= FP32_TOLERANCE, note))
    return verdicts


# ---- distance from a float64 evaluation, step by step ------------------------------------

FLOAT32_ULP = 2.0**-23


@dataclasses.dataclass
class StepDistance:
    """One output of one step: max|y - y64| / max|y64| for diffusers' and the fused step."""

    step: int
    output: str  # "prev", or "stored": DPM's history value, DDIM's x0
    diffusers: float
    fused: float

    @property
    def ratio(self) -> float:
        """The fused distance over diffusers' plus one float32 ulp: above 1 breaks DESIGN.md's contract."""
        return self.fused / (self.diffusers + FLOAT32_ULP)


_DPM_UPDATES = ("dpm_solver_first_order_update", "multistep_dpm_solver_second_order_update",
                "multistep_dpm_solver_third_order_update")


def in_float64(scheduler) -> None:
    """Cast a diffusers scheduler's schedule (after set_timesteps) to float64: every scalar its
    step forms from it is then float64, and so is the step on float64 inputs.

    DPMSolverMultistepScheduler.step casts the sample (and SDE noise) to float32 before its
    update, where a float64 scalar times a float32 tensor is a float32 product: the term
    (alpha_t/alpha_s)*x, which at small alpha nearly cancels against the model-output term,
    would be rounded in float32 (2e-4 of the result on a cosine schedule). The updates get
    the step's own sample and noise, in float64, instead."""
    if hasattr(scheduler, "sigmas"):
        scheduler.sigmas = scheduler.sigmas.double()
    for boundary in ("final_alpha_cumprod", "initial_alpha_cumprod"):  # the DDIM family's (the inverse's)
        if hasattr(scheduler, boundary):
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
            setattr(scheduler, boundary, torch.as_tensor(getattr(scheduler, boundary)).double())
    if "_float64_step_inputs" not in vars(scheduler) and all(hasattr(scheduler, name) for name in _DPM_UPDATES):
        _dpm_updates_in_float64(scheduler)


def _dpm_updates_in_float64(scheduler) -> None:
    inputs = scheduler._float64_step_inputs = {}
    step = scheduler.step

    def step_keeping_inputs(model_output, timestep, sample, generator=None, variance_noise=None, **kwargs):
        inputs["sample"] = sample.double()
        inputs["noise"] = None if variance_noise is None else variance_noise.double()
        return step(model_output, timestep, sample, generator, variance_noise, **kwargs)

    scheduler.step = step_keeping_inputs
    for name in _DPM_UPDATES:
        def update_in_float64(*args, _update=getattr(scheduler, name), **kwargs):
            kwargs["sample"] = inputs["sample"]
            if kwargs.get("noise") is not None:
                if inputs["noise"] is None:
                    raise ValueError("a float64 DPM-Solver step needs its SDE noise as variance_noise")
                kwargs["noise"] = inputs["noise"]
            return _update(*args, **kwargs)

        setattr(scheduler, name, update_in_float64)


def _distance(value: torch.Tensor, exact: torch.Tensor) -> float:
    return float((value.double() - exact).abs().max() / exact.abs().max().clamp(min=1e-30))


def _stored(scheduler, output):
    return scheduler.model_outputs[-1] if hasattr(scheduler, "model_outputs") else output.pred_original_sample


def float64_distances(reference_cls, fused_cls, config: dict, steps: int, step_kwargs=None, shape=(2, 4, 8, 8),
                      seed: int = 0, device="cpu") -> list[StepDistance]:
    """Every step of diffusers' float32 trajectory evaluated three ways from the same sample,
    model output, noise and multistep history: diffusers' step, the fused step (the current
    backend), and diffusers' own step in float64 (``in_float64``), which shares nothing with
    the fused tables. Steps where the float64 evaluation is not finite are not judged."""
    step_kwargs = step_kwargs or {}
    reference, exact, fused = reference_cls(**config), reference_cls(**config), fused_cls(**config)
    for scheduler in (reference, exact, fused):
        scheduler.set_timesteps(steps, device=device)
    in_float64(exact)
    multistep = hasattr(reference, "model_outputs")
    if multistep and len(set(reference.timesteps.tolist())) < steps:
        reference._step_index = exact._step_index = 0  # diffusers' lookup would skip a repeated first timestep
    g = torch.Generator().manual_seed(seed)
    x, pattern = (torch.randn(shape, generator=g).to(device) for _ in range(2))
    distances = []
    for i, t in enumerate(reference.timesteps):
        m = stand_in_model(x, t, pattern)
        noise = torch.randn(shape, generator=g).to(device) if step_kwargs.get("eta") else None

        def arguments(variance_noise):
            return step_kwargs if variance_noise is None else dict(step_kwargs, variance_noise=variance_noise)

        if multistep:  # the same history for all three: each step is judged on its own
            fused.model_outputs = [None if h is None else h.clone() for h in reference.model_outputs]
            exact.model_outputs = [None if h is None else h.double() for h in reference.model_outputs]
        ref_out = reference.step(m, t, x, **arguments(noise))
        exact_out = exact.step(m.double(), t, x.double(), **arguments(None if noise is None else noise.double()))
        fused_out = fused.step(m, fused.timesteps[i], x, **arguments(noise))
        for name, ref_value, fused_value, exact_value in (
                ("prev", ref_out.prev_sample, fused_out.prev_sample, exact_out.prev_sample),
                ("stored", _stored(reference, ref_out), _stored(fused, fused_out), _stored(exact, exact_out))):
            if bool(torch.isfinite(exact_value).all()):
                distances.append(StepDistance(i, name, _distance(ref_value, exact_value),
                                              _distance(fused_value, exact_value)))
        x = ref_out.prev_sample
    return distances

