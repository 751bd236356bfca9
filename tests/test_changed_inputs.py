"""What a step reads, changed after set_timesteps, is read as diffusers reads it.

diffusers' step reads its config options and schedule state (alphas_cumprod, sigmas, the
step count) at every call, and callers change them between calls: FrozenDict lets
``scheduler.config.clip_sample = False`` through (StableCascade's pipelines do it), and the
state tensors can be edited in place or replaced. The fused classes build tables from them
once; each case here changes one of them mid-trajectory, on diffusers' scheduler and the
fused one alike, and checks that every step still matches diffusers within one step's
rounding (teacher-forced: both get the same sample and model output), and that the change
moved diffusers' trajectory (a check that could not fail otherwise).
"""

from __future__ import annotations

import copy

import pytest
import torch

from drivers import (PAIRS, STEP_TOLERANCE, TRAJECTORY_TOLERANCE, StepArgs, _initial_state, _step,
                     assert_close_to_diffusers, relative_error, stand_in_model)

N = 10  # below 15: lower_order_final decides the last DPM steps' order
EDIT_AT = 2  # the change is made after this many steps (the tables are built and used by then)
TOLERANCE = STEP_TOLERANCE
# The change must move diffusers' steps well past that: a fused class ignoring it would
# then be that far from diffusers and fail.
MOVED = 10 * TOLERANCE


def config_edit(**options):
    def edit(scheduler):
        for name, value in options.items():
            setattr(scheduler.config, name, value)  # as diffusers' FrozenDict lets through
    edit.__name__ = ",".join(f"{k}={v}" for k, v in options.items())
    return edit


def registered(**options):
    def edit(scheduler):
        scheduler.register_to_config(**options)  # replaces the config object
    edit.__name__ = "register_to_config(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")"
    return edit


def state_edit(name, change):
    def edit(scheduler):
        change(scheduler, name)
    edit.__name__ = f"{name}:{change.__name__}"
    return edit


def scaled_in_place(scheduler, name):
    getattr(scheduler, name).mul_(0.95)


def replaced(scheduler, name):
    setattr(scheduler, name, getattr(scheduler, name) * 0.95)


def set_to(value):
    def change(scheduler, name):
        setattr(scheduler, name, value)
    change.__name__ = f"set_to({value})"
    return change


CASES = [
    ("ddim", dict(clip_sample=True, clip_sample_range=0.5), config_edit(clip_sample=False)),
    ("ddim", dict(clip_sample=False), config_edit(clip_sample=True, clip_sample_range=0.5)),
    ("ddim", dict(clip_sample=True, clip_sample_range=0.5), config_edit(clip_sample_range=0.25)),
    ("ddim", dict(clip_sample=False), config_edit(thresholding=True, dynamic_thresholding_ratio=0.6,
                                                  sample_max_value=1.5)),
    ("ddim", dict(clip_sample=False), config_edit(prediction_type="v_prediction")),
    ("ddim", dict(clip_sample=False), registered(prediction_type="sample")),
    ("ddim", dict(clip_sample=False), state_edit("alphas_cumprod", scaled_in_place)),
    ("ddim", dict(clip_sample=False), state_edit("alphas_cumprod", replaced)),
    # trailing: the last step, the one that reads it, starts at t = 99 (alpha-bar 0.90), so a
    # final alpha-bar of 0.95 is a valid step (below alpha-bar at t, diffusers gives NaN)
    ("ddim", dict(clip_sample=False, timestep_spacing="trailing"),
     state_edit("final_alpha_cumprod", set_to(torch.tensor(0.95)))),
    ("ddim", dict(clip_sample=False), state_edit("num_inference_steps", set_to(20))),
    ("ddim_inverse", dict(clip_sample=False), config_edit(clip_sample=True, clip_sample_range=0.5)),
    ("ddim_inverse", dict(clip_sample=False), state_edit("alphas_cumprod", scaled_in_place)),
    ("ddim_inverse", dict(clip_sample=False), state_edit("initial_alpha_cumprod", set_to(torch.tensor(0.5))),
     0),  # read by the first step only
    ("cogvideox_ddim", {}, config_edit(prediction_type="v_prediction")),
    ("cogvideox_ddim", {}, state_edit("alphas_cumprod", scaled_in_place)),
    ("cogvideox_dpm", {}, config_edit(prediction_type="v_prediction")),
    ("cogvideox_dpm", {}, state_edit("alphas_cumprod", scaled_in_place)),
    ("dpm", {}, config_edit(prediction_type="v_prediction")),
    ("dpm", dict(final_sigmas_type="sigma_min"), config_edit(algorithm_type="dpmsolver")),
    ("dpm", {}, config_edit(solver_type="heun")),
    ("dpm", dict(solver_order=3), config_edit(lower_order_final=False)),
    ("dpm", {}, config_edit(thresholding=True, dynamic_thresholding_ratio=0.6, sample_max_value=1.5)),
    ("dpm", {}, state_edit("sigmas", scaled_in_place)),
    ("dpm", {}, state_edit("sigmas", replaced)),
    ("dpm_inverse", {}, config_edit(prediction_type="v_prediction")),
    ("dpm_inverse", {}, state_edit("sigmas", scaled_in_place)),
]


def _trajectory_with_edit(kind, config, edit, edit_at, shape=(2, 4, 8, 8)):
    """Teacher-forced steps of diffusers, diffusers unedited and the fused class, ``edit``
    applied to the first and last after ``edit_at`` steps: [(diffusers, unedited, fused)] prev."""
    reference_cls, fused_cls = PAIRS[kind]
    schedulers = [reference_cls(**config), reference_cls(**config), fused_cls(**config)]
    for scheduler in schedulers:
        scheduler.set_timesteps(N)
    x, pattern, factor = _initial_state(kind, config, shape, torch.float32, torch.device("cpu"))
    states = [{} for _ in schedulers]
    generators = [torch.Generator().manual_seed(0) for _ in schedulers]
    results = []
    for i, t in enumerate(schedulers[0].timesteps):
        if i == edit_at:
            edit(schedulers[0])
            edit(schedulers[2])
        m = stand_in_model(x, t, pattern, factor)
        prev = [_step(kind, s, m, s.timesteps[i], x, i, s.timesteps, state, StepArgs(), g, torch.float32)[0]
                for s, state, g in zip(schedulers, states, generators)]
        results.append(prev)
        x = prev[0]
    return results


@pytest.mark.parametrize("kind, config, edit, edit_at", [case + (EDIT_AT,) * (len(case) == 3) for case in CASES],
                         ids=lambda v: getattr(v, "__name__", None))
def test_a_change_after_set_timesteps_is_followed_like_diffusers(kind, config, edit, edit_at):
    results = _trajectory_with_edit(kind, config, edit, edit_at)
    moved = max(relative_error(unedited, ref) for ref, unedited, _ in results[edit_at:])
    assert moved > MOVED, f"the change does not move diffusers' trajectory ({moved:.2e}): the case proves nothing"
    for i, (ref, _, fused) in enumerate(results):
        assert relative_error(fused, ref) <= TOLERANCE, f"step {i}: {relative_error(fused, ref):.2e} from diffusers"


@pytest.mark.parametrize("kind", ["ddim", "cogvideox_ddim", "cogvideox_dpm"])
@pytest.mark.parametrize("change", [scaled_in_place, replaced])
def test_add_noise_and_get_velocity_follow_alphas_cumprod(kind, change):
    reference_cls, fused_cls = PAIRS[kind]
    reference, fused = reference_cls(), fused_cls()
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    t = torch.tensor([10, 400, 900])
    for scheduler in (reference, fused):  # fills the fused class's copies of alphas_cumprod
        scheduler.add_noise(x, noise, t)
        change(scheduler, "alphas_cumprod")
    for method in ("add_noise", "get_velocity"):
        ref, out = getattr(reference, method)(x, noise, t), getattr(fused, method)(x, noise, t)
        assert_close_to_diffusers(out, ref, what=method)


def test_an_edit_reaches_a_copy_made_before_its_first_step():
    """A copy carries whether its tables are current, not the original's tensor ids: one
    made with an edit pending rebuilds, one made without keeps its tables."""
    fused = PAIRS["ddim"][1](clip_sample=True, clip_sample_range=0.5)
    fused.set_timesteps(N)
    untouched = copy.deepcopy(fused)
    assert untouched._tables_current()
    fused.config.clip_sample = False
    pending = copy.deepcopy(fused)
    x = torch.full((1, 2, 2), 3.0)
    expected = PAIRS["ddim"][0](clip_sample=False)
    expected.set_timesteps(N)
    t = expected.timesteps[0]
    assert torch.equal(pending.step(x, pending.timesteps[0], x).prev_sample, fused.step(x, t, x).prev_sample)
    assert relative_error(fused.step(x, t, x).prev_sample, expected.step(x, t, x).prev_sample) <= TOLERANCE


def _one_step(kind, scheduler, x, i):
    """prev of step i on sample and model output ``x``, noise (CogVideoX DPM) from a fixed seed."""
    timesteps = scheduler.timesteps
    return _step(kind, scheduler, x, timesteps[i], x, i, timesteps, {}, StepArgs(), torch.Generator().manual_seed(0),
                 torch.float32)[0]


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "cogvideox_ddim", "cogvideox_dpm"])
def test_a_refused_set_timesteps_leaves_the_previous_schedule_whole(kind):
    """diffusers replaces the timesteps and the count before the fused checks refuse a
    schedule (trailing spacing overshoots for 61 of 1000 steps); the scheduler must be
    left as it was, and one that had no schedule must still say so."""
    reference_cls, fused_cls = PAIRS[kind]
    fresh = fused_cls(timestep_spacing="trailing")
    with pytest.raises(ValueError, match="outside the training range"):
        fresh.set_timesteps(61)
    x = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="run 'set_timesteps'"):
        _one_step(kind, fresh, x, 0)

    fused = fused_cls(timestep_spacing="trailing")
    fused.set_timesteps(10)
    before = (fused.timesteps.clone(), fused.num_inference_steps)
    expected = _one_step(kind, fused, x, 3)
    with pytest.raises(ValueError, match="outside the training range"):
        fused.set_timesteps(61)
    assert torch.equal(fused.timesteps, before[0]) and fused.num_inference_steps == before[1]
    assert torch.equal(_one_step(kind, fused, x, 3), expected)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_a_change_that_cannot_work_is_refused_at_the_next_step_and_can_be_undone(kind):
    _, fused_cls = PAIRS[kind]
    fused = fused_cls()
    fused.set_timesteps(N)
    x = torch.randn(1, 2, 3)
    expected = _one_step(kind, copy.deepcopy(fused), x, 0)
    original = fused.config.prediction_type
    fused.config.prediction_type = "flow"
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        _one_step(kind, fused, x, 0)
    fused.config.prediction_type = original
    assert torch.equal(_one_step(kind, fused, x, 0), expected)


@pytest.mark.parametrize("kind", ["dpm", "dpm_inverse"])
def test_dpm_refuses_a_changed_solver_order_or_sigmas_of_another_length(kind):
    _, fused_cls = PAIRS[kind]
    fused = fused_cls(solver_order=2)
    fused.set_timesteps(N)
    x = torch.randn(1, 2, 3)
    fused.config.solver_order = 3
    with pytest.raises(ValueError, match="solver_order changed from 2 to 3 after set_timesteps"):
        fused.step(x, fused.timesteps[0], x)
    fused.set_timesteps(N)  # a new trajectory takes the new order
    fused.step(x, fused.timesteps[0], x)
    fused.sigmas = fused.sigmas[1:]
    with pytest.raises(ValueError, match=rf"needs a 1-D tensor of at least {N + 1} sigmas"):
        fused.step(x, fused.timesteps[1], x)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_a_rebuild_during_cuda_graph_capture_is_refused(kind, monkeypatch):
    """Capture is simulated (this runs on any machine): a rebuild there would be recorded,
    so the step refuses, naming the remedy, and changes nothing."""
    from fused_sched.schedulers import base

    fused = PAIRS[kind][1]()
    fused.set_timesteps(N)
    fused.config.prediction_type = "v_prediction"
    x = torch.randn(1, 2, 3)
    monkeypatch.setattr(base, "stream_capturing", lambda device: True)
    with pytest.raises(ValueError, match="during CUDA-graph capture"):
        fused.step(x, fused.timesteps[0], x)
    assert not fused._tables_current()


@pytest.mark.parametrize("kind", ["ddim", "cogvideox_dpm"])
def test_a_final_alpha_below_the_last_steps_alpha_is_refused_naming_it(kind):
    """A final_alpha_cumprod set by hand below alpha-bar at the last timestep makes the
    step's variance (DDIM) or noise scale (CogVideoX DPM) negative, where diffusers returns
    NaN: the step refuses, saying so (not blaming the prediction type)."""
    fused = PAIRS[kind][1]()
    fused.set_timesteps(N)
    fused.final_alpha_cumprod = torch.tensor(0.5)
    x = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match=r"alpha-bar rises across the step at timestep\(s\) \[0\]"):
        _one_step(kind, fused, x, 0)


def _hand_set_trajectory(kind, scheduler):
    """The count and the timesteps assigned without set_timesteps (diffusers' DDIM-family
    steps read only the count and the alphas), then a trajectory over them."""
    scheduler.num_inference_steps = N
    scheduler.timesteps = torch.arange(900, -1, -100)
    x, state = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), {}
    for i, t in enumerate(scheduler.timesteps):
        x, _ = _step(kind, scheduler, 0.3 * x, t, x, i, scheduler.timesteps, state, StepArgs(),
                     torch.Generator().manual_seed(i), torch.float32)
    return x


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "cogvideox_ddim", "cogvideox_dpm"])
def test_a_schedule_assigned_by_hand_steps_like_diffusers(kind):
    reference_cls, fused_cls = PAIRS[kind]
    assert_close_to_diffusers(_hand_set_trajectory(kind, fused_cls()), _hand_set_trajectory(kind, reference_cls()),
                              TRAJECTORY_TOLERANCE)


@pytest.mark.parametrize("kind", ["dpm", "dpm_inverse"])
def test_a_dpm_schedule_assigned_by_hand_is_refused_naming_set_timesteps(kind):
    # diffusers' step would pair the assigned timesteps with the training sigmas __init__ made
    with pytest.raises(ValueError, match="num_inference_steps=10 was assigned without set_timesteps"):
        _hand_set_trajectory(kind, PAIRS[kind][1]())
