"""The fused classes are drop-ins: same config, persistence, public state and helpers."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch

from drivers import TRAJECTORY_TOLERANCE, PAIRS, StepArgs, _step, assert_close_to_diffusers, public_config


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_is_a_subclass_with_the_same_config(kind):
    reference_cls, fused_cls = PAIRS[kind]
    assert issubclass(fused_cls, reference_cls)
    assert dict(fused_cls().config) == dict(reference_cls().config)
    assert fused_cls.order == reference_cls.order
    assert fused_cls._compatibles == reference_cls._compatibles
    # diffusers' classes list themselves as compatible (configs load across them quietly)
    assert sorted(map(str, fused_cls().compatibles)) == sorted(map(str, [fused_cls] + reference_cls().compatibles))


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_from_config_and_pretrained_round_trips(kind, tmp_path):
    reference_cls, fused_cls = PAIRS[kind]
    reference = reference_cls(prediction_type="v_prediction", timestep_spacing="trailing")
    fused = fused_cls.from_config(reference.config)
    assert isinstance(fused, fused_cls)
    assert fused.config.prediction_type == "v_prediction"
    fused.save_pretrained(tmp_path)
    again = fused_cls.from_pretrained(tmp_path)
    assert public_config(again.config) == public_config(fused.config)
    assert isinstance(reference_cls.from_pretrained(tmp_path), reference_cls)  # and back


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_public_state_after_set_timesteps(kind):
    reference_cls, fused_cls = PAIRS[kind]
    reference, fused = reference_cls(), fused_cls()
    assert torch.equal(reference.timesteps, fused.timesteps)  # before set_timesteps too
    reference.set_timesteps(13)
    fused.set_timesteps(13)
    assert torch.equal(reference.timesteps, fused.timesteps)
    assert fused.num_inference_steps == reference.num_inference_steps
    assert fused.init_noise_sigma == reference.init_noise_sigma
    assert len(fused) == len(reference)
    for name in ("sigmas", "alphas_cumprod"):
        if hasattr(reference, name):
            assert torch.equal(getattr(reference, name), getattr(fused, name))
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(fused.scale_model_input(x, fused.timesteps[0]), x)


def test_dpm_state_advances_like_diffusers():
    reference_cls, fused_cls = PAIRS["dpm"]
    reference, fused = reference_cls(solver_order=3), fused_cls(solver_order=3)
    for s in (reference, fused):
        s.set_timesteps(8)
        s.set_begin_index(0)
    x = torch.randn(2, 4, 8, 8)
    for t in reference.timesteps:
        m = torch.tanh(x)
        reference.step(m, t, x)
        x = fused.step(m, t, x).prev_sample
        assert fused.step_index == reference.step_index
        assert fused.lower_order_nums == reference.lower_order_nums
        assert fused.begin_index == reference.begin_index
        assert [o is None for o in fused.model_outputs] == [o is None for o in reference.model_outputs]


@pytest.mark.parametrize("config", [{}, {"solver_order": 3}, {"algorithm_type": "sde-dpmsolver++"}], ids=str)
def test_dpm_float64_history_then_float32_outputs_like_diffusers(config):
    """A float64 model output, then float32 ones: diffusers' update promotes to float64 while
    the float64 history term takes part and casts to the model output's dtype; the fused
    step computes in float64 there too (it refused the step, naming an internal argument)."""
    g = torch.Generator().manual_seed(3)
    x, m = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    results = []
    for cls in PAIRS["dpm"]:
        scheduler = cls(**config)
        scheduler.set_timesteps(10)
        outputs = [m.double()] + [m * i for i in (1, 2, 3)]
        results.append([scheduler.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
                        for i, (out, t) in enumerate(zip(outputs, scheduler.timesteps))])
    for expected, got in zip(*results):
        assert_close_to_diffusers(got, expected)


def test_cogvideox_dpm_float64_history_like_diffusers():
    """A float64 old_pred_original_sample joins diffusers' promotion: prev float64, x0 float32."""
    g = torch.Generator().manual_seed(4)
    x, m = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    old = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=g)
    results = []
    for cls in PAIRS["cogvideox_dpm"]:
        scheduler = cls()
        scheduler.set_timesteps(10)
        t, back = scheduler.timesteps[3], scheduler.timesteps[2]
        results.append(scheduler.step(m, old, t, back, x, generator=torch.Generator().manual_seed(0)))
    for expected, got in zip(*results):
        assert_close_to_diffusers(got, expected)
    assert [r.dtype for r in results[1]] == [torch.float64, torch.float32]


@pytest.mark.parametrize("kind", ["ddim", "cogvideox_ddim", "cogvideox_dpm", "dpm"])
def test_add_noise_matches_diffusers(kind):
    reference_cls, fused_cls = PAIRS[kind]
    reference, fused = reference_cls(), fused_cls()
    for s in (reference, fused):
        s.set_timesteps(10)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = reference.timesteps[[1, 4, 7]]
    assert torch.equal(fused.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))


@pytest.mark.parametrize("kind", ["ddim", "cogvideox_ddim", "cogvideox_dpm"])
def test_get_velocity_matches_diffusers(kind):
    reference_cls, fused_cls = PAIRS[kind]
    reference, fused = reference_cls(), fused_cls()
    x, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    assert torch.equal(fused.get_velocity(x, noise, t), reference.get_velocity(x, noise, t))


@pytest.mark.parametrize("kind", ["ddim", "cogvideox_ddim", "cogvideox_dpm"])
def test_add_noise_and_get_velocity_leave_alphas_cumprod_where_it_is(kind, monkeypatch):
    """diffusers assigns ``self.alphas_cumprod = self.alphas_cumprod.to(data's device)`` in
    both (on a GPU, moving the step's host tables there for good); the fused classes assign
    nothing. On the CPU the move returns the same tensor, so the assignments are recorded."""
    reference_cls, fused_cls = PAIRS[kind]
    assigned = []
    original = reference_cls.__setattr__

    def spy(self, name, value):  # the fused class inherits it
        if name == "alphas_cumprod":
            assigned.append(type(self))
        original(self, name, value)

    monkeypatch.setattr(reference_cls, "__setattr__", spy)
    x, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    schedulers = [cls() for cls in PAIRS[kind]]
    assigned.clear()  # construction assigns it
    for scheduler in schedulers:
        scheduler.add_noise(x, noise, t)
        scheduler.get_velocity(x, noise, t)
    assert assigned == [reference_cls] * 2  # the spy sees diffusers' moves, and no fused one


# What the fused classes add to diffusers' public surface, on purpose and documented.
ADDED_PUBLIC_NAMES = {
    "ddim": {"use_philox_noise"}, "ddim_inverse": {"use_philox_noise"}, "cogvideox_ddim": {"use_philox_noise"},
    "cogvideox_dpm": {"use_philox_noise"}, "dpm": {"use_philox_noise", "prepare_cuda_graph"},
    "dpm_inverse": {"use_philox_noise", "prepare_cuda_graph"},
}


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_public_surface_is_diffusers_plus_the_documented_additions(kind):
    # Pipelines probe schedulers with hasattr (set_begin_index, add_noise, get_velocity, ...)
    # and call what they find: a method diffusers' class lacks must not appear on ours.
    reference, fused = (cls() for cls in PAIRS[kind])
    for s in (reference, fused):
        s.set_timesteps(10)
    public = lambda obj: {name for name in dir(obj) if not name.startswith("_")}  # noqa: E731
    assert public(reference) <= public(fused)
    assert public(fused) - public(reference) == ADDED_PUBLIC_NAMES[kind]


def test_set_timesteps_clears_the_begin_index_like_diffusers():
    schedulers = [cls() for cls in PAIRS["dpm"]]
    for s in schedulers:
        s.set_timesteps(10)
        s.set_begin_index(3)
        s.set_timesteps(10)
    assert [s.begin_index for s in schedulers] == [None, None]
    x = torch.randn(1, 4, 8, 8)
    outputs = [s.step(0.1 * x, s.timesteps[0], x).prev_sample for s in schedulers]
    assert [s.step_index for s in schedulers] == [1, 1]  # started at the first timestep, not 3
    assert_close_to_diffusers(outputs[1], outputs[0])


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_return_types_match(kind):
    """The very class diffusers returns: each diffusers module defines its own
    DDIMSchedulerOutput, so the names alone would not tell them apart."""
    schedulers = [cls() for cls in PAIRS[kind]]
    for s in schedulers:
        s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    t, back = schedulers[0].timesteps[2], schedulers[0].timesteps[1]

    def step(scheduler, return_dict):
        if kind == "cogvideox_dpm":  # second order: its first-order step returns a tuple whatever is asked
            return scheduler.step(x, 0.5 * x, t, back, x, return_dict=return_dict)
        return scheduler.step(x, t, x, return_dict=return_dict)

    reference, fused = (step(s, True) for s in schedulers)
    assert type(fused) is type(reference)
    assert isinstance(step(schedulers[1], False), tuple)


def test_cogvideox_dpm_first_order_returns_a_tuple_like_diffusers():
    reference_cls, fused_cls = PAIRS["cogvideox_dpm"]
    fused = fused_cls()
    fused.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    out = fused.step(x, None, fused.timesteps[0], None, x, return_dict=True)
    assert isinstance(out, tuple) and len(out) == 2


@pytest.mark.parametrize("kind, config, n", [
    ("ddim_inverse", dict(timestep_spacing="linspace"), 10),  # the inverse takes leading / trailing only
    ("ddim", {}, 1001), ("ddim_inverse", {}, 1001), ("cogvideox_ddim", {}, 1001), ("cogvideox_dpm", {}, 1001),
], ids=["inverse-linspace", "ddim-n>T", "inverse-n>T", "cogvideox_ddim-n>T", "cogvideox_dpm-n>T"])
def test_schedules_diffusers_refuses_are_refused_alike(kind, config, n):
    errors = []
    for cls in PAIRS[kind]:
        with pytest.raises(ValueError) as raised:
            cls(**config).set_timesteps(n)
        errors.append(str(raised.value))
    assert errors[1] == errors[0]


@pytest.mark.parametrize("value", [True, False])
def test_ddim_inverse_maps_the_deprecated_set_alpha_to_zero(value):
    reference, fused = (cls(set_alpha_to_zero=value) for cls in PAIRS["ddim_inverse"])
    assert fused.config.set_alpha_to_one == reference.config.set_alpha_to_one
    assert torch.equal(fused.initial_alpha_cumprod, reference.initial_alpha_cumprod)
    x = torch.randn(1, 4, 8, 8)
    outputs = []
    for s in (reference, fused):
        s.set_timesteps(10)
        outputs.append(s.step(0.1 * x, s.timesteps[0], x).prev_sample)
    assert_close_to_diffusers(outputs[1], outputs[0])


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_method_signatures_are_diffusers(kind):
    # Pipelines read them: CogVideoX's passes eta / generator only where inspect.signature(
    # scheduler.step) names them, and custom timesteps only where set_timesteps does.
    # Annotations may differ (ours also name the tensor timesteps diffusers takes).
    def parameters(method):
        return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]

    reference, fused = (cls() for cls in PAIRS[kind])
    for name in ("__init__", "step", "set_timesteps", "add_noise", "get_velocity", "scale_model_input",
                 "set_begin_index"):
        if hasattr(reference, name):
            assert parameters(getattr(fused, name)) == parameters(getattr(reference, name)), name



def _steps(kind, scheduler, x, state, indices):
    """The steps at ``indices`` of the schedule, as a pipeline calls them, with a fixed
    stand-in model and noise drawn from a generator seeded afresh: the last sample."""
    generator = torch.Generator().manual_seed(7)
    for i in indices:
        x, _ = _step(kind, scheduler, 0.1 * x, scheduler.timesteps[i], x, i, scheduler.timesteps, state, StepArgs(),
                     generator, torch.float32)
    return x


COPIES = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": lambda s: pickle.loads(pickle.dumps(s))}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_a_copy_mid_trajectory_continues_like_the_original(kind, how):
    # diffusers' schedulers copy and pickle mid-trajectory; ours keep per-process state (step
    # plans holding backend modules, the schedule's address), which a copy makes afresh.
    scheduler = PAIRS[kind][1]()
    scheduler.set_timesteps(8)
    state = {}  # the pipeline's own (CogVideoX DPM's previous x0)
    x = _steps(kind, scheduler, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), state, range(3))
    copied = COPIES[how](scheduler)
    # its own schedule's elements resolve by address, as the original's do
    assert copied._schedule_address[0] == copied.timesteps.data_ptr() != scheduler.timesteps.data_ptr()
    from_copy = _steps(kind, copied, x, dict(state), range(3, 8))  # first: the original must not see it
    from_original = _steps(kind, scheduler, x, dict(state), range(3, 8))
    assert torch.equal(from_copy, from_original)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_a_new_schedule_on_a_shallow_copy_leaves_the_original_like_diffusers(kind):
    # diffusers' set_timesteps rebinds what it changes; the fused classes refill tables and
    # reset their device cursor in place
    def trajectory(scheduler):
        scheduler.set_timesteps(10)
        state = {}
        x = _steps(kind, scheduler, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), state,
                   range(4))
        if kind == "dpm":  # a table of the original's shape: the one refilled in place
            copy.copy(scheduler).set_timesteps(timesteps=list(range(990, 0, -99)))
        else:
            copy.copy(scheduler).set_timesteps(25)
        return _steps(kind, scheduler, x, state, range(4, 10))

    reference_cls, fused_cls = PAIRS[kind]
    assert_close_to_diffusers(trajectory(fused_cls()), trajectory(reference_cls()), TRAJECTORY_TOLERANCE)

def _views_restoring_dict_copies(kind, scheduler, views=2, steps=6):
    """StableDiffusionPanoramaPipeline's per-view scheduler states: copy.deepcopy(scheduler.
    __dict__) after each view's step and __dict__.update before the next (around the class's
    own copy methods), while the loop iterates the timesteps tensor read before the copies."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    saved = [copy.deepcopy(scheduler.__dict__)] * views
    states = [{} for _ in range(views)]  # the pipeline's own (CogVideoX DPM's previous x0)
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(views)]
    for i, t in enumerate(timesteps):
        for j in range(views):
            scheduler.__dict__.update(saved[j])
            latents[j], _ = _step(kind, scheduler, (0.2 + 0.1 * j) * latents[j], t, latents[j], i, timesteps,
                                  states[j], StepArgs(), torch.Generator().manual_seed(i), torch.float32)
            saved[j] = copy.deepcopy(scheduler.__dict__)
    return torch.stack(latents)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_per_view_copies_of_the_scheduler_dict_step_like_diffusers(kind):
    reference_cls, fused_cls = PAIRS[kind]
    expected = _views_restoring_dict_copies(kind, reference_cls())
    assert_close_to_diffusers(_views_restoring_dict_copies(kind, fused_cls()), expected, TRAJECTORY_TOLERANCE)


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "cogvideox_ddim"])
def test_a_schedule_tensor_no_longer_the_schedulers_is_not_taken_for_its_elements(kind):
    # After __dict__.update(copy.deepcopy(__dict__)) the scheduler's schedule is the copy; the
    # tensor it replaced is the caller's to change, and its elements are plain timesteps.
    outputs = []
    for cls in PAIRS[kind]:
        scheduler = cls()
        scheduler.set_timesteps(10)
        replaced = scheduler.timesteps
        scheduler.__dict__.update(copy.deepcopy(scheduler.__dict__))
        assert scheduler.timesteps is not replaced
        replaced[3] = 7
        x = torch.ones(1, 2, 4, 4)
        outputs.append(scheduler.step(torch.full_like(x, 0.5), replaced[3], x).prev_sample)
    assert_close_to_diffusers(outputs[1], outputs[0])
