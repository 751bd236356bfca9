"""Bad input gets a clear error naming what is wrong; inputs are never modified; the
configurations where diffusers breaks are refused or computed correctly, never NaN (but
where only the device knows the step's timestep, and diffusers' step is NaN too)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import fused_sched
from fused_sched import ops
from conftest import require_backend
from drivers import PAIRS, STEP_TOLERANCE, TRAJECTORY_TOLERANCE, assert_close_to_diffusers, relative_error

X = torch.randn(2, 4, 8, 8)


def _ready(kind="ddim", n=10, **config):
    scheduler = PAIRS[kind][1](**config)
    scheduler.set_timesteps(n)
    return scheduler


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_step_before_set_timesteps(kind):
    scheduler = PAIRS[kind][1]()
    args = (X, None, 999, None, X) if kind == "cogvideox_dpm" else (X, 999, X)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(*args)


@pytest.mark.parametrize("kind", ["dpm", "dpm_inverse"])
def test_stepping_past_the_end(kind):
    scheduler = _ready(kind)
    x = X
    for t in scheduler.timesteps:
        x = scheduler.step(torch.tanh(x), t, x).prev_sample
    with pytest.raises(ValueError, match="only 10 steps"):
        scheduler.step(torch.tanh(x), scheduler.timesteps[-1], x)


def test_timestep_outside_training_range():
    with pytest.raises(ValueError, match=r"timestep=1000 is outside the training range \[0, 1000\)"):
        _ready().step(X, 1000, X)


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "cogvideox_ddim", "cogvideox_dpm"])
@pytest.mark.parametrize("value", [1000, -3])
def test_tensor_timestep_outside_training_range(kind, value):
    """A tensor that is not an element of scheduler.timesteps is gathered on the device; on
    the CPU its range is checked by the gather, and the error names it like an int's."""
    scheduler = _ready(kind)
    timestep = torch.tensor(value)
    message = rf"timestep={value} is outside the training range \[0, 1000\)"
    with pytest.raises(ValueError, match=message):
        if kind == "cogvideox_dpm":
            scheduler.use_philox_noise(0)  # with in-kernel noise the order is decided on the device
            scheduler.step(X, X, timestep, scheduler.timesteps[0], X)
        else:
            scheduler.step(X, timestep, X)


def test_a_gather_that_cannot_raise_gives_nan_rows(monkeypatch):
    """Off the CPU, or traced, an out-of-range index cannot raise without a sync, and a failed
    gather would be a device-side assert: the row is NaN instead, the others untouched."""
    from fused_sched.schedulers.ddim_family import gather_rows

    table = torch.arange(12.0).reshape(4, 3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the path a traced or GPU step takes
    rows = gather_rows(table, torch.tensor([2, 4, -1, 0]))
    assert torch.equal(rows[[0, 3]], table[[2, 0]])
    assert rows[[1, 2]].isnan().all()


def test_shape_mismatch_names_the_argument():
    with pytest.raises(ValueError, match="model_output has shape"):
        _ready().step(torch.randn(2, 4, 8, 9), 901, X)


def test_dpm_latent_shape_change_mid_trajectory_names_the_history():
    scheduler = _ready("dpm")
    scheduler.step(X, scheduler.timesteps[0], X)
    with pytest.raises(ValueError, match=r"solver history of the previous steps \(model_outputs\) has shape"):
        scheduler.step(X[:1], scheduler.timesteps[1], X[:1])


def test_dtype_errors_name_the_argument():
    with pytest.raises(TypeError, match="model_output must be a floating-point tensor"):
        _ready().step(torch.ones(2, 4, 8, 8, dtype=torch.int32), 901, X)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
        _ready().step(X, 901, X.numpy())


def test_device_mismatch_names_the_argument():
    meta = torch.empty(2, 4, 8, 8, device="meta")
    with pytest.raises(ValueError, match="model_output is on meta"):
        ops.fused_step(X, meta, torch.zeros(1, ops.layout.NUM_COEFFICIENTS))


def test_eta_must_be_a_finite_number():
    with pytest.raises(TypeError, match="eta must be a Python number"):
        _ready().step(X, 901, X, eta=torch.tensor(0.5))
    scheduler = _ready()
    tables = len(scheduler._tables)
    for eta in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=re.escape(f"eta={eta}: expected a finite number")):
            scheduler.step(X, 901, X, eta=eta)
    assert len(scheduler._tables) == tables  # nothing built for them (NaN keys never match: one per call)


def _eta_steps(spacing, eta):
    """(timestep, diffusers' prev or None where it is not finite, fused prev or the
    ValueError) for each step of a 10-step trajectory, both fed diffusers' sample."""
    reference, fused = (cls(timestep_spacing=spacing) for cls in PAIRS["ddim"])
    for s in (reference, fused):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, steps = torch.randn(1, 4, 8, 8, generator=g), []
    for t, fused_t in zip(reference.timesteps, fused.timesteps):
        m, z = torch.tanh(x), torch.randn(x.shape, generator=g)
        expected = reference.step(m, t, x, eta=eta, variance_noise=z).prev_sample
        try:
            got = fused.step(m, fused_t, x, eta=eta, variance_noise=z).prev_sample
        except ValueError as error:
            got = error
        steps.append((int(t), expected if bool(expected.isfinite().all()) else None, got))
        if steps[-1][1] is None:
            break
        x = expected
    return steps


@pytest.mark.parametrize("spacing, eta, refused_at", [
    ("trailing", 1.05, None),  # within sqrt(a_prev(1 - a_t)/(a_prev - a_t)) at every step
    ("leading", 1.05, 100),
    ("trailing", 1.1, 999),
    ("leading", -1.2, 900),  # eta enters squared
])
def test_eta_beyond_one_runs_where_diffusers_does_and_is_refused_where_it_gives_nan(spacing, eta, refused_at):
    """diffusers takes any eta; above 1 in size the direction term sqrt(1 - a_prev - std^2)
    is NaN at the steps where eta^2 > a_prev(1 - a_t)/(a_prev - a_t), and only there."""
    steps = _eta_steps(spacing, eta)
    for t, expected, got in steps:
        if t == refused_at:
            assert expected is None, f"diffusers is finite at timestep {t}"
            assert isinstance(got, ValueError) and f"eta={eta} at timestep {t}" in str(got)
            bound = re.search(r"this step takes \|eta\| <= sqrt\(a_prev\(1 - a_t\)/\(a_prev - a_t\)\), about (\S+) ",
                              str(got))
            assert bound is not None, str(got)
            scheduler = PAIRS["ddim"][1](timestep_spacing=spacing)  # the bound it names is taken there
            scheduler.set_timesteps(10)
            assert scheduler.step(X, t, X, eta=float(bound.group(1)), variance_noise=X).prev_sample.isfinite().all()
        else:
            assert expected is not None, f"diffusers returns NaN at timestep {t}, which the fused step took"
            assert not isinstance(got, ValueError), f"timestep {t}: {got}"
            assert relative_error(got, expected) <= STEP_TOLERANCE, f"timestep {t}"
    assert (steps[-1][0] == refused_at) if refused_at is not None else len(steps) == 10


@pytest.mark.parametrize("how", ["tensor", "traced"])
def test_eta_beyond_the_bound_at_a_device_only_timestep_gives_nan_as_diffusers(how):
    """A timestep tensor that is not an element of scheduler.timesteps, or any timestep of a
    traced step, is not read on the host: its row, NaN there, gives the NaN diffusers' step
    gives (and a traced step does not break its graph)."""
    reference, fused = (cls(timestep_spacing="trailing") for cls in PAIRS["ddim"])
    for scheduler in (reference, fused):
        scheduler.set_timesteps(10)
    expected = reference.step(X, torch.tensor(999), X, eta=1.1, variance_noise=X).prev_sample
    if how == "traced":
        torch._dynamo.reset()
        step = torch.compile(fullgraph=True, backend="eager")(
            lambda m, t, x, z: fused.step(m, t, x, eta=1.1, variance_noise=z, return_dict=False)[0])
        got = step(X, fused.timesteps[0], X, X)
    else:
        got = fused.step(X, torch.tensor(999), X, eta=1.1, variance_noise=X).prev_sample
    assert expected.isnan().all() and got.isnan().all()


def test_generator_and_variance_noise_together():
    with pytest.raises(ValueError, match="both generator and variance_noise"):
        _ready().step(X, 901, X, eta=0.5, generator=torch.Generator(), variance_noise=torch.randn_like(X))
    # At eta 0 neither is used, and diffusers accepts both: so does the drop-in.
    reference = PAIRS["ddim"][0]()
    reference.set_timesteps(10)
    both = dict(eta=0.0, generator=torch.Generator(), variance_noise=torch.randn_like(X))
    assert_close_to_diffusers(_ready().step(X, 901, X, **both).prev_sample,
                              reference.step(X, 901, X, **both).prev_sample)


NOISY_STEPS = {  # kind, config, step of a bad model_output that draws noise once its shape passed
    "ddim-eta": ("ddim", {}, lambda s, m, g, **kw: s.step(m, s.timesteps[0], X, eta=1.0, generator=g, **kw)),
    "sde-dpm++": ("dpm", {"algorithm_type": "sde-dpmsolver++"},
                  lambda s, m, g, **kw: s.step(m, s.timesteps[0], X, generator=g, **kw)),
    "cogvideox-dpm": ("cogvideox_dpm", {}, lambda s, m, g, **kw: s.step(m, None, s.timesteps[0], None, X, generator=g)),
}


@pytest.mark.parametrize("case", sorted(NOISY_STEPS))
def test_a_step_that_fails_leaves_the_generator_as_it_was(case):
    """As in diffusers, a noisy step whose inputs are refused draws nothing: the retry with
    the right inputs draws the noise the first call would have, and gives diffusers' result."""
    kind, config, step = NOISY_STEPS[case]
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 4, 8, 7\); expected the sample's shape"):
        step(_ready(kind, **config), X[..., :7], generator)
    assert torch.equal(generator.get_state(), before)
    if kind != "cogvideox_dpm":
        with pytest.raises(ValueError, match=r"variance_noise has shape \(2, 4, 8, 7\); expected a tensor"):
            step(_ready(kind, **config), X, None, variance_noise=X[..., :7])
    retried = step(_ready(kind, **config), torch.tanh(X), generator)[0]
    reference = PAIRS[kind][0](**config)
    reference.set_timesteps(10)
    expected = step(reference, torch.tanh(X), torch.Generator().manual_seed(0))[0]
    assert_close_to_diffusers(retried, expected)


@pytest.mark.parametrize("noise_shape", [(1, 4, 8, 8), (4, 1, 8), (8,)])
@pytest.mark.parametrize("case", ["ddim-eta", "sde-dpm++"])
def test_variance_noise_that_broadcasts_to_the_sample_is_taken_as_diffusers_takes_it(case, noise_shape):
    # diffusers adds std * variance_noise: one noise for every batch row, say. A noise the
    # sample would broadcast to (larger than it) is refused above.
    kind, config, step = NOISY_STEPS[case]
    noise = torch.randn(noise_shape, generator=torch.Generator().manual_seed(3))
    reference = PAIRS[kind][0](**config)
    reference.set_timesteps(10)
    expected = step(reference, torch.tanh(X), None, variance_noise=noise)[0]
    assert_close_to_diffusers(step(_ready(kind, **config), torch.tanh(X), None, variance_noise=noise)[0], expected)
    with pytest.raises(ValueError, match=r"variance_noise has shape \(3, 4, 8, 8\); expected a tensor"):
        step(_ready(kind, **config), X, None, variance_noise=torch.randn(3, 4, 8, 8))


@pytest.mark.parametrize("device_order", [False, True], ids=["eager", "order-on-device"])
@pytest.mark.parametrize("old, message", [
    (X[..., :7], r"old_pred_original_sample has shape \(2, 4, 8, 7\); expected the sample's shape"),
    (X.to(torch.int64), "old_pred_original_sample must be a floating-point tensor"),
    (X.to("meta"), "old_pred_original_sample is on meta; expected the sample's device"),
], ids=["shape", "dtype", "device"])
def test_a_cogvideox_dpm_step_refusing_its_history_leaves_the_generator_as_it_was(old, message, device_order):
    """The history is checked before either of the second-order step's two draws."""
    scheduler = _ready("cogvideox_dpm")
    if device_order:
        # with timestep tensors that are not elements, the order is chosen on the device
        scheduler.use_philox_noise(0)
    t, back = scheduler.timesteps[2], scheduler.timesteps[1]
    if device_order:
        t, back = t.clone(), back.clone()
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    counter = None if scheduler._philox_counter is None else scheduler._philox_counter.clone()
    with pytest.raises((ValueError, TypeError), match=message):
        scheduler.step(X, old, t, back, X, generator=generator)
    assert torch.equal(generator.get_state(), before)
    if counter is not None:
        assert torch.equal(scheduler._philox_counter, counter)


@pytest.mark.parametrize("kind, config, message", [
    ("ddim", dict(clip_sample=True, clip_sample_range=0.0), "clip_sample_range=0.0 with clip_sample=True"),
    ("ddim_inverse", dict(clip_sample=True, clip_sample_range=-1.0), "clip_sample_range=-1.0 with clip_sample=True"),
    ("ddim", dict(thresholding=True, sample_max_value=-1.0), "sample_max_value=-1.0 with thresholding=True"),
    ("dpm", dict(thresholding=True, sample_max_value=0.0), "sample_max_value=0.0 with thresholding=True"),
    ("ddim", dict(thresholding=True, dynamic_thresholding_ratio=1.5),
     "dynamic_thresholding_ratio=1.5 with thresholding=True"),
    ("dpm", dict(thresholding=True, dynamic_thresholding_ratio=math.nan),
     "dynamic_thresholding_ratio=nan with thresholding=True"),
    ("dpm", dict(use_karras_sigmas=True, use_flow_sigmas=True), "use_flow_sigmas=True with use_karras_sigmas=True"),
    ("dpm", dict(use_lu_lambdas=True, use_flow_sigmas=True), "use_flow_sigmas=True with use_lu_lambdas=True"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_configs_that_break_diffusers_are_refused_at_construction(kind, config, message):
    """Refused when the scheduler is made, naming the config keys (they failed at the first
    step, naming the op's arguments or a repeated timestep that was not the cause)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        PAIRS[kind][1](**config)


def test_cogvideox_takes_clip_options_it_never_uses():
    """diffusers' CogVideoX schedulers accept clip_sample and clip_sample_range and ignore them."""
    scheduler = _ready("cogvideox_ddim", clip_sample=True, clip_sample_range=0.0)
    reference = PAIRS["cogvideox_ddim"][0](clip_sample=True, clip_sample_range=0.0)
    reference.set_timesteps(10)
    t = scheduler.timesteps[2]
    assert_close_to_diffusers(scheduler.step(torch.tanh(X), t, X).prev_sample,
                              reference.step(torch.tanh(X), t, X).prev_sample)


def test_cogvideox_dpm_history_without_timestep_back():
    scheduler = _ready("cogvideox_dpm")
    with pytest.raises(ValueError, match="without timestep_back"):
        scheduler.step(X, X, scheduler.timesteps[1], None, X)


@pytest.mark.parametrize("back", [1000, -1])
@pytest.mark.parametrize("history", [False, True])
def test_cogvideox_dpm_refuses_a_timestep_back_outside_the_training_range_on_a_first_order_step(back, history):
    """diffusers reads alphas_cumprod[timestep_back] on every step given one: out of range it
    raises IndexError, and -1 wraps to the noisiest alpha; on the last step, or without
    history, the step is first order and does not use it, which must not hide the error."""
    scheduler = _ready("cogvideox_dpm")
    last = scheduler.timesteps[-1]  # t - gap < 0: first order whatever the history
    for t in (last, scheduler.timesteps[1]) if not history else (last,):
        with pytest.raises(ValueError, match=re.escape(f"timestep_back={back} is outside the training range")):
            scheduler.step(X, X if history else None, t, back, X)


def test_cogvideox_dpm_refuses_a_timestep_back_at_the_timesteps_log_snr():
    """Equal log-SNR at both timesteps makes diffusers' ratio r = 0 and its step non-finite;
    the fused step refuses the pair, naming it, and takes the next step as before."""
    reference, fused = (cls() for cls in PAIRS["cogvideox_dpm"])
    for s in (reference, fused):
        s.set_timesteps(10)
    t = int(fused.timesteps[2])
    expected = reference.step(torch.tanh(X), X, t, t, X, return_dict=False)[0]
    assert not bool(expected.isfinite().all())
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    with pytest.raises(ValueError, match=re.escape(f"(timestep, timestep_back) [({t}, {t})] are not finite")):
        fused.step(torch.tanh(X), X, t, t, X, generator=generator)
    assert torch.equal(generator.get_state(), before)  # refused before either draw
    back = int(fused.timesteps[1])
    got, want = (s.step(torch.tanh(X), X, t, back, X, generator=torch.Generator().manual_seed(0))[0]
                 for s in (fused, reference))
    assert relative_error(got, want) <= STEP_TOLERANCE


@pytest.mark.parametrize("begin_index, error, message", [
    (-1, ValueError, "begin_index=-1: expected a step position >= 0"),
    (-2, ValueError, "begin_index=-2: expected a step position >= 0"),
    (1.0, TypeError, "begin_index must be an int, got float"),
    (True, TypeError, "begin_index must be an int, got bool"),
])
def test_dpm_refuses_a_begin_index_that_is_no_step_position(begin_index, error, message):
    """diffusers indexes sigmas with a negative begin index from the end: NaN at -1, the
    noise levels of another step at -2 (both finite-looking trajectories gone wrong)."""
    reference = PAIRS["dpm"][0]()
    reference.set_timesteps(10)
    reference.set_begin_index(-1)
    assert bool(reference.step(X, reference.timesteps[0], X).prev_sample.isnan().all())
    scheduler = _ready("dpm")
    with pytest.raises(error, match=re.escape(message)):
        scheduler.set_begin_index(begin_index)
    assert scheduler.begin_index is None


def test_dpm_after_its_timesteps_are_sliced_runs_from_that_step_as_set_begin_index():
    """diffusers, given scheduler.timesteps[k:], indexes its sigmas from 0 while the slice's
    length sets the last steps' order; the fused step finds the first timestep's position in
    the schedule (an element of it, sliced or copied) and runs the trajectory from step k."""
    k, n = 4, 10
    expected_scheduler = PAIRS["dpm"][1]()
    expected_scheduler.set_timesteps(n)
    expected_scheduler.set_begin_index(k)
    trajectories = []
    for take in (lambda ts: ts[k:], lambda ts: ts[k:].clone(), None):
        scheduler = expected_scheduler if take is None else PAIRS["dpm"][1]()
        if take is not None:
            scheduler.set_timesteps(n)
            scheduler.timesteps = take(scheduler.timesteps)
        x, samples = X, []
        for t in scheduler.timesteps if take is not None else expected_scheduler.timesteps[k:]:
            x = scheduler.step(torch.tanh(x), t, x).prev_sample
            samples.append(x)
        trajectories.append(samples)
    sliced, copied, expected = trajectories
    assert len(expected) == n - k
    for i in range(n - k):
        assert torch.equal(sliced[i], expected[i]) and torch.equal(copied[i], expected[i]), f"step {k + i}"
    reference = PAIRS["dpm"][0]()
    reference.set_timesteps(n)
    reference.timesteps = reference.timesteps[k:]
    x = X
    for t in reference.timesteps:
        x = reference.step(torch.tanh(x), t, x).prev_sample
    assert relative_error(x, expected[-1]) > 0.01  # diffusers' own run of this case is another trajectory


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_a_meta_schedule_is_refused_and_leaves_the_scheduler_as_it_was(kind):
    scheduler = PAIRS[kind][1]()
    scheduler.set_timesteps(10)
    before = scheduler.timesteps.clone()
    with pytest.raises(ValueError, match=r"set_timesteps\(device='meta'\)"):
        scheduler.set_timesteps(12, device="meta")
    assert torch.equal(scheduler.timesteps, before) and scheduler.num_inference_steps == 10


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "cogvideox_ddim", "cogvideox_dpm"])
def test_a_steps_offset_past_the_training_range_is_named_as_the_cause(kind):
    """Leading spacing with steps_offset=1 and as many steps as training steps ends at
    timestep 1000, out of range for diffusers' step (IndexError): the refusal names the
    offset, not the trailing spacing's np.arange overshoot."""
    scheduler = PAIRS[kind][1](steps_offset=1, timestep_spacing="leading")
    with pytest.raises(ValueError, match=r"steps_offset=1 .* gives timestep\(s\) \[1000\] at or past "
                                         r"num_train_timesteps=1000") as raised:
        scheduler.set_timesteps(1000)
    assert "np.arange" not in str(raised.value)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])  # sample: x0 = m, d = x0 pass through
@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_inputs_are_not_modified(kind, prediction_type, backend, device):
    """Neither the step's inputs nor the history a multistep scheduler keeps change in a
    later step (the torch backend accumulates into its own intermediates in place)."""
    config = dict(prediction_type=prediction_type)
    if kind in ("ddim", "dpm"):
        config["thresholding"] = True
    if kind == "ddim_inverse" and prediction_type == "sample":
        config["set_alpha_to_one"] = False  # else eps is not recoverable at alpha = 1 (refused)
    scheduler = PAIRS[kind][1](**config)
    scheduler.set_timesteps(10, device=device)
    x, m = torch.randn(2, 4, 8, 8, device=device), torch.randn(2, 4, 8, 8, device=device)
    x_copy, m_copy = x.clone(), m.clone()
    old = torch.randn(2, 4, 8, 8, device=device)
    old_copy = old.clone()
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(4):
        t = scheduler.timesteps[i]
        if kind == "cogvideox_dpm":
            scheduler.step(m, old if i else None, t, scheduler.timesteps[i - 1] if i else None, x)
        else:
            scheduler.step(m, t, x)
        history = [h for h in getattr(scheduler, "model_outputs", []) if h is not None]
        kept += [(h, h.clone()) for h in history if all(h is not k for k, _ in kept)]
    assert torch.equal(x, x_copy) and torch.equal(m, m_copy) and torch.equal(old, old_copy)
    assert all(torch.equal(h, copy) for h, copy in kept)
    if kind.startswith("dpm"):
        assert len(kept) >= 3  # the history was checked, not skipped


# --- configurations where diffusers breaks (spec: "Broken paths") ---------------------------

@pytest.mark.parametrize("algorithm", ["sde-dpmsolver", "sde-dpmsolver++"])
def test_inverse_sde_is_refused(algorithm):
    with pytest.raises(ValueError, match="cannot run in the inverse direction"):
        fused_sched.FusedDPMSolverMultistepInverseScheduler(algorithm_type=algorithm)


def test_sde_dpmsolver_third_order_is_refused():
    with pytest.raises(ValueError, match="no third-order SDE-DPM-Solver"):
        fused_sched.FusedDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3,
                                                     final_sigmas_type="sigma_min")


def test_inverse_flow_sigmas_are_refused():
    with pytest.raises(ValueError, match="use_flow_sigmas=True is not supported by the inverse"):
        fused_sched.FusedDPMSolverMultistepInverseScheduler(use_flow_sigmas=True)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "sde-dpmsolver"])
def test_flow_prediction_needs_data_prediction_solver(algorithm_type):
    """Refused when made, where diffusers' first step raises."""
    config = dict(prediction_type="flow_prediction", algorithm_type=algorithm_type, final_sigmas_type="sigma_min")
    reference = PAIRS["dpm"][0](**config)
    reference.set_timesteps(4)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="prediction_type given as flow_prediction must be one of"):
        reference.step(x, reference.timesteps[0], x)
    with pytest.raises(ValueError, match=rf"flow_prediction' needs algorithm_type .* got '{algorithm_type}'"):
        fused_sched.FusedDPMSolverMultistepScheduler(**config)


@pytest.mark.parametrize("kind", ["ddim", "cogvideox_ddim", "cogvideox_dpm"])
def test_epsilon_with_zero_snr_is_refused_where_diffusers_gives_nan(kind):
    reference_cls, fused_cls = PAIRS[kind]
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="epsilon")
    if kind == "ddim":
        config["clip_sample"] = False  # with clipping, +-inf x0 is bounded and the step is finite
    reference = reference_cls(**config)
    reference.set_timesteps(10)
    t = reference.timesteps[0]
    m = torch.tanh(X)
    out = (reference.step(m, None, t, None, X) if kind == "cogvideox_dpm" else reference.step(m, t, X))[0]
    assert not torch.isfinite(out).all()  # the refusal below is justified
    with pytest.raises(ValueError, match="not finite with prediction_type='epsilon'"):
        fused_cls(**config).set_timesteps(10)


def test_inverse_ddim_sample_prediction_with_alpha_one_is_refused_where_diffusers_gives_inf():
    """set_alpha_to_one makes the inverse's first alpha 1: eps = (x - x0)/sqrt(1 - 1)."""
    reference_cls, fused_cls = PAIRS["ddim_inverse"]
    config = dict(prediction_type="sample", set_alpha_to_one=True)
    reference = reference_cls(**config)
    reference.set_timesteps(10)
    out = reference.step(torch.tanh(X), reference.timesteps[0], X)[0]
    assert not torch.isfinite(out).all()  # the refusal below is justified
    with pytest.raises(ValueError, match="prediction_type='sample'.*set_alpha_to_one=True"):
        fused_cls(**config).set_timesteps(10)


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "cogvideox_ddim", "cogvideox_dpm"])
def test_a_trailing_schedule_reaching_timestep_minus_one_is_refused_in_set_timesteps(kind):
    """61 trailing steps of 1000: diffusers' np.arange yields 62 timesteps, one of them -1,
    where its step reads alphas_cumprod[-1], the noisiest value, at the clean end; refused
    before the pipeline spends its steps, not at the step that reads it."""
    reference_cls, fused_cls = PAIRS[kind]
    config = dict(timestep_spacing="trailing")
    reference = reference_cls(**config)
    reference.set_timesteps(61)
    assert len(reference.timesteps) == 62 and int(reference.timesteps.min()) == -1  # the refusal is justified
    fused = fused_cls(**config)
    with pytest.raises(ValueError, match=r"num_inference_steps=61 .* gives 62 timesteps, \[-1\] outside the "
                                         r"training range \[0, 1000\)"):
        fused.set_timesteps(61)
    fused.set_timesteps(60)  # a count whose schedule stays in range is taken
    reference.set_timesteps(60)
    assert torch.equal(fused.timesteps, reference.timesteps)


def _first_non_finite_step(scheduler, x) -> int | None:
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(0.1 * x, t, x).prev_sample
        if not torch.isfinite(x).all():
            return i
    return None


@pytest.mark.parametrize("kind, schedule, bad_step", [
    ("dpm", dict(num_inference_steps=1001), 251),  # more steps than training timesteps: repeats
    ("dpm_inverse", dict(num_inference_steps=1001), 251),
    ("dpm", dict(timesteps=[999, 800, 600, 600, 400, 200, 100]), 3),
])
def test_dpm_repeated_timesteps_warn_and_raise_where_diffusers_gives_nan(kind, schedule, bad_step):
    """A step between equal sigmas is the identity, but the multistep update after it
    divides by h0 = 0: diffusers returns inf/NaN from that step on. set_timesteps builds
    diffusers' schedule (its own tests check such schedules) and warns, naming that step;
    the step raises there instead of returning NaN."""
    config = dict(final_sigmas_type="sigma_min") if "timesteps" in schedule else {}
    _assert_warned_and_refused_where_diffusers_is_first_nan(
        kind, config, schedule, bad_step, rf"\(step, timestep, order\) \[\({bad_step}, \d+, 2\).* are not finite")


def _assert_warned_and_refused_where_diffusers_is_first_nan(kind, config, schedule, bad_step, message):
    """diffusers' schedule, whose step ``bad_step`` is its first non-finite one: set_timesteps
    warns with ``message``, the steps before it are finite, and that step raises it."""
    reference_cls, fused_cls = PAIRS[kind]
    reference = reference_cls(**config)
    reference.set_timesteps(**schedule)
    x = torch.randn(1, 2, 4, 4)
    assert _first_non_finite_step(reference, x) == bad_step  # the refusal is justified
    fused = fused_cls(**config)
    with pytest.warns(UserWarning, match=message):
        fused.set_timesteps(**schedule)
    assert torch.equal(fused.timesteps, reference.timesteps) and torch.equal(fused.sigmas, reference.sigmas)
    for t in fused.timesteps[:bad_step]:
        x = fused.step(0.1 * x, t, x).prev_sample
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match=message):
        fused.step(0.1 * x, fused.timesteps[bad_step], x)


@pytest.mark.parametrize("config, schedule, bad_step", [
    (dict(algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min"), dict(timesteps=[200, 400, 600]), 0),
    (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), dict(timesteps=[200, 400, 600]), 0),
    # flow sigmas end below the VP sigma_min that final_sigmas_type="sigma_min" appends
    (dict(algorithm_type="sde-dpmsolver++", use_flow_sigmas=True, flow_shift=0.5, prediction_type="flow_prediction",
          final_sigmas_type="sigma_min"), dict(num_inference_steps=60), 59),
], ids=["ascending-timesteps-sde-dpmsolver++", "ascending-timesteps-sde-dpmsolver", "flow-sigmas-then-sigma-min"])
def test_sde_dpm_step_where_sigma_rises_warns_and_raises_where_diffusers_gives_nan(config, schedule, bad_step):
    """The SDE noise scale is the square root of 1 - exp(-2h) (or exp(2h) - 1), negative where
    sigma rises (h < 0): diffusers' step is NaN there; the fused row was a finite step that
    silently dropped the noise (the variance clamped at 0)."""
    _assert_warned_and_refused_where_diffusers_is_first_nan(
        "dpm", config, schedule, bad_step,
        rf"\(step, timestep, order\) \[\({bad_step}, \d+, \d\).* are not finite: sigma rises across step {bad_step}")


def test_dpm_flat_last_step_stores_diffusers_history_value():
    """karras sigmas ending at sigma_min: the last step is between equal sigmas, prev = x,
    and the data prediction diffusers stores in model_outputs is kept (it was stored as 0)."""
    config = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")
    reference, fused = (cls(**config) for cls in PAIRS["dpm"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for scheduler in (reference, fused):
        scheduler.set_timesteps(10)
    assert reference.sigmas[-1] == reference.sigmas[-2]
    x_ref = x_fused = x
    for t in reference.timesteps:
        x_ref = reference.step(torch.tanh(x_ref) + 0.1, t, x_ref).prev_sample
        x_fused = fused.step(torch.tanh(x_fused) + 0.1, t, x_fused).prev_sample
    assert_close_to_diffusers(x_fused, x_ref, TRAJECTORY_TOLERANCE)
    assert reference.model_outputs[-1].abs().max() > 1  # not a 0 that would match by accident
    assert_close_to_diffusers(fused.model_outputs[-1], reference.model_outputs[-1], TRAJECTORY_TOLERANCE)


@pytest.mark.parametrize("order,solver_type", [(2, "heun"), (3, "midpoint")])
def test_inverse_duplicated_final_sigma_is_the_identity(order, solver_type):
    """diffusers evaluates 0/0 on the last step (h = 0) and returns NaN; the h -> 0 limit of the
    update is prev = x, which is what the fused class returns."""
    config = dict(solver_order=order, solver_type=solver_type, use_karras_sigmas=True)
    reference = PAIRS["dpm_inverse"][0](**config)
    fused = PAIRS["dpm_inverse"][1](**config)
    n = 16  # >= 15, so lower_order_final does not make the last step first order
    reference.set_timesteps(n)
    fused.set_timesteps(n)
    x_ref = x_fused = torch.randn(2, 4, 8, 8) * 0.1
    for i, t in enumerate(reference.timesteps):
        last_input = x_fused
        x_ref = reference.step(torch.tanh(x_ref), t, x_ref).prev_sample
        x_fused = fused.step(torch.tanh(x_fused), fused.timesteps[i], x_fused).prev_sample
    assert torch.isnan(x_ref).any()
    assert torch.equal(x_fused, last_input)


def test_fused_op_argument_checks():
    c = torch.zeros(1, ops.layout.NUM_COEFFICIENTS)
    with pytest.raises(ValueError, match=r"coefficients has shape \(1, 10\)"):
        ops.fused_step(X, X, torch.zeros(1, 10))
    k = ops.layout.NUM_COEFFICIENTS
    with pytest.raises(TypeError, match="coefficients must be a torch.float32"):
        ops.fused_step(X, X, c.double())
    with pytest.raises(ValueError, match="clip='bogus'"):
        ops.fused_step(X, X, c, clip="bogus")
    with pytest.raises(ValueError, match="history holds at most 2"):
        ops.fused_step(X, X, c, history=(X, X, X))
    with pytest.raises(ValueError, match="threshold_ratio must be in"):
        ops.fused_step(X, X, c, clip="threshold", threshold_ratio=1.5)
    # A float32 step takes its x0 bound in float32 (the thresholding scale's upper bound, the
    # clamp's range): one that is 0, subnormal or overflowing there is refused on every backend
    for clip, argument in (("threshold", "threshold_max"), ("clamp", "clip_range")):
        for beyond_float32 in (1e-50, 1e-40, 3.4028235e38, 1e39):
            with pytest.raises(ValueError, match=re.escape(f"{argument}={beyond_float32!r} must be inf or a normal "
                                                           "float32")):
                ops.fused_step(X, X, c, clip=clip, **{argument: beyond_float32})
            # where the step computes in float64, the bound is float64 too, as in diffusers
            ops.fused_step(X.double(), X.double(), c.double(), clip=clip, **{argument: beyond_float32},
                           backend="torch")
        for bound in (torch.finfo(torch.float32).tiny, float(torch.finfo(torch.float32).max), math.inf):
            ops.fused_step(X, X, c, clip=clip, **{argument: bound})
    with pytest.raises(ValueError, match=rf"coefficients has shape \(3, {k}\)"):
        ops.fused_step(X, X, torch.zeros(3, k))
    assert math.isfinite(float(ops.fused_step(X, X, c).prev_sample.sum()))


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("value, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                                          ("10", TypeError)])
def test_num_inference_steps_must_be_a_positive_integer(kind, value, error):
    # diffusers divides by zero on 0 and builds an empty or mis-indexed schedule otherwise
    with pytest.raises(error, match="num_inference_steps must be"):
        PAIRS[kind][1]().set_timesteps(value)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_num_inference_steps_as_a_whole_float_is_taken(kind):
    # diffusers' DDIM family takes 12.0 as 12; its DPM classes raise a TypeError deep in numpy
    reference, fused = (cls() for cls in PAIRS[kind])
    reference.set_timesteps(12)
    fused.set_timesteps(12.0)
    assert torch.equal(fused.timesteps, reference.timesteps)
    assert fused.num_inference_steps == 12


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_num_inference_steps_as_an_integer_tensor_is_taken(kind):
    """A one-element integer tensor, as diffusers takes it (a float tensor stays refused)."""
    reference, fused = (cls() for cls in PAIRS[kind])
    reference.set_timesteps(12)
    fused.set_timesteps(torch.tensor(12))
    assert torch.equal(fused.timesteps, reference.timesteps)
    assert fused.num_inference_steps == 12
    with pytest.raises(TypeError, match="num_inference_steps must be an integer"):
        fused.set_timesteps(torch.tensor(12.5))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_thresholding_empty_rows_is_refused_clearly(backend):
    require_backend(backend)
    x = torch.zeros(2, 0, 3)
    c = torch.zeros(1, ops.layout.NUM_COEFFICIENTS)
    with pytest.raises(ValueError, match="has empty rows"):
        ops.fused_step(x, x, c, clip="threshold", backend=backend)
    assert ops.fused_step(x, x, c, backend=backend).prev_sample.shape == x.shape  # without it: nothing to do
