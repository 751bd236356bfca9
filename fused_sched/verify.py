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
