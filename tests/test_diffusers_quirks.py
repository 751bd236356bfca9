"""Behaviours of diffusers' step that look accidental but that pipelines depend on, each
checked side by side with diffusers (spec §12): how many noise draws a trajectory
consumes, which arguments a step ignores."""

from __future__ import annotations

import pytest
import torch

from drivers import PAIRS, TRAJECTORY_TOLERANCE, assert_close_to_diffusers

SHAPE = (1, 4, 8, 8)


def _run(kind, cls, config, steps, **step_kwargs):
    """A whole trajectory with generator seed 0 on a contractive stand-in model; returns the
    final sample and the generator's next draw (how many draws the trajectory consumed)."""
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    old = None
    for i, t in enumerate(scheduler.timesteps):
        m = 0.1 * x
        if kind == "cogvideox_dpm":
            back = scheduler.timesteps[i - 1] if i else None
            x, old = scheduler.step(m, old, t, back, x, generator=generator, return_dict=False)
        else:
            x = scheduler.step(m, t, x, generator=generator, **step_kwargs).prev_sample
    return x, torch.randn(4, generator=generator)


@pytest.mark.parametrize("kind, config, step_kwargs", [
    ("ddim", {}, dict(eta=0.5)),  # a draw every step, the last (whose std is 0) included
    ("ddim", {}, dict(eta=-0.5)),  # no draw: diffusers draws for eta > 0 only, and std^2 still shrinks the direction
    ("dpm", dict(algorithm_type="sde-dpmsolver++"), {}),  # fp32 draws every step, the last included
    ("cogvideox_dpm", {}, {}),  # always draws; twice on second-order steps
], ids=["ddim-eta", "ddim-negative-eta", "sde-dpm", "cogvideox-dpm"])
def test_a_trajectory_consumes_the_generator_like_diffusers(kind, config, step_kwargs):
    reference_cls, fused_cls = PAIRS[kind]
    x_ref, next_ref = _run(kind, reference_cls, config, 5, **step_kwargs)
    x_fused, next_fused = _run(kind, fused_cls, config, 5, **step_kwargs)
    assert torch.equal(next_fused, next_ref)
    assert_close_to_diffusers(x_fused, x_ref, TRAJECTORY_TOLERANCE)


def test_dpm_ignores_the_timestep_argument_after_the_first_step():
    results = []
    for cls in PAIRS["dpm"]:
        scheduler = cls()
        scheduler.set_timesteps(10)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        x = scheduler.step(0.1 * x, scheduler.timesteps[0], x).prev_sample
        x = scheduler.step(0.1 * x, 5, x).prev_sample  # not the schedule's second timestep
        assert scheduler.step_index == 2
        results.append(x)
    assert_close_to_diffusers(results[1], results[0], TRAJECTORY_TOLERANCE)
    fresh = PAIRS["dpm"][1]()
    fresh.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x = fresh.step(0.1 * x, fresh.timesteps[0], x).prev_sample
    assert torch.equal(fresh.step(0.1 * x, fresh.timesteps[1], x).prev_sample, results[1])


def test_cogvideox_ddim_ignores_eta_generator_and_clipping_options():
    config = dict(clip_sample=True, clip_sample_range=0.01)
    plain, _ = _run("cogvideox_ddim", PAIRS["cogvideox_ddim"][1], {}, 5)
    for cls in PAIRS["cogvideox_ddim"]:
        given, next_draw = _run("cogvideox_ddim", cls, config, 5, eta=1.0)
        assert_close_to_diffusers(given, plain, TRAJECTORY_TOLERANCE, cls.__name__)
        assert torch.equal(next_draw, torch.randn(4, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_thresholding_at_ratio_zero_takes_the_minimum_like_diffusers(kind):
    # torch.quantile's q = 0 is the row's minimum |x0|; diffusers' own fp16 scheduler test
    # runs dynamic_thresholding_ratio=0, so a drop-in must too (the op once refused q = 0).
    config = dict(thresholding=True, dynamic_thresholding_ratio=0.0, sample_max_value=1e4)
    if kind == "ddim":
        config["clip_sample"] = False
    results = []
    for cls in PAIRS[kind]:
        scheduler = cls(**config)
        scheduler.set_timesteps(10)
        # the first step's |x0| are in the hundreds: the minimum sets the scale, not a clamp bound
        x = 3.0 + torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * x, t, x).prev_sample
        results.append(x)
    assert_close_to_diffusers(results[1], results[0], TRAJECTORY_TOLERANCE)
