"""fused_step checks a call signature once and reuses the decision (``ops._plans``): these
tests prove the reuse happens, and that no argument the checks read can be changed without
the call being checked again."""

from __future__ import annotations

import pytest
import torch

import fused_sched
from drivers import bit_pattern, relative_error
from fused_sched import ops
from fused_sched.ops import layout as L, reference

X = torch.randn(2, 3, 4, 4)
M = torch.randn(2, 3, 4, 4)
ROWS = torch.randn(1, L.NUM_COEFFICIENTS)
KNOWN = ops.ConstantColumns({L.ON: 0.0})


@pytest.fixture
def checks(monkeypatch):
    """Counts the full argument checks; starts from an empty plan cache."""
    monkeypatch.setattr(ops, "_plans", ops._PlanCache())
    calls = []
    original = ops._plan

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(ops, "_plan", counted)
    return calls


def _step(**kwargs):
    arguments = dict(x0_dtype=torch.float32, constant_columns=KNOWN, backend="torch")
    arguments.update(kwargs)
    sample = arguments.pop("sample", X)
    model_output = arguments.pop("model_output", M)
    rows = arguments.pop("rows", ROWS)
    return ops.fused_step(sample, model_output, rows, **arguments)


def test_a_repeated_signature_is_checked_once_and_gives_the_same_results(checks):
    first = _step()
    other_values = _step(sample=torch.randn(2, 3, 4, 4), model_output=torch.randn(2, 3, 4, 4))
    again = _step()
    assert len(checks) == 1
    for got, want in zip(again, first):
        assert (got is None and want is None) or torch.equal(got, want)
    assert not torch.equal(other_values.prev_sample, first.prev_sample)


@pytest.mark.parametrize("change, error, message", [
    (dict(model_output=torch.randn(2, 3, 4, 5)), ValueError, "model_output has shape"),
    (dict(model_output=torch.randn(2, 3, 4, 4).to(torch.int32)), TypeError, "model_output has dtype"),
    (dict(model_output=torch.randn(2, 3, 4, 4, device="meta")), ValueError, "model_output is on meta"),
    (dict(history=(torch.randn(2, 3, 4, 5),)), ValueError, r"history\[0\] has shape"),
    (dict(noise=torch.randn(1, 3, 4, 4)), ValueError, "noise has shape"),
    (dict(rows=torch.randn(3, L.NUM_COEFFICIENTS)), ValueError, "coefficients has shape"),
    (dict(rows=torch.randn(1, L.NUM_COEFFICIENTS, dtype=torch.float64)), TypeError, "coefficients must be"),
    (dict(clip="clamp", clip_range=-1.0), ValueError, "clip_range must be > 0"),
    (dict(clip="threshold", threshold_ratio=1.5), ValueError, "threshold_ratio must be in"),
    (dict(clip="clip"), ValueError, "clip='clip'"),
    (dict(x0_dtype=torch.int8), TypeError, "x0_dtype"),
    (dict(constant_columns={99: 0.0}), ValueError, "constant_columns has key 99"),
    (dict(backend="bogus"), ValueError, "backend='bogus'"),
])
def test_every_checked_argument_is_checked_again_when_it_changes(checks, change, error, message):
    _step()
    with pytest.raises(error, match=message):
        _step(**change)


def test_the_backend_request_is_part_of_the_signature(checks, monkeypatch):
    """set_backend / use_backend / the environment between two calls choose the backend of
    the second: a plan made under one request never serves another."""
    _step(backend=None)
    ran = []
    torch_backend = ops.backends.load_backend("torch")
    monkeypatch.setattr(torch_backend, "step_program",
                        lambda *structure: lambda *tensors: ran.append("torch") or (X, None, X))
    with ops.use_backend("torch"):
        _step(backend=None)
    assert ran == ["torch"] and len(checks) == 2
    monkeypatch.setenv(ops.backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="FUSED_SCHED_BACKEND='bogus'"):
        _step(backend=None)


def test_tensor_subclasses_and_plain_mappings_are_checked_every_call(checks):
    class Marked(torch.Tensor):
        pass

    marked = X.as_subclass(Marked)
    for _ in range(2):
        _step(sample=marked)
        _step(constant_columns={L.ON: 0.0})
    assert len(checks) == 4


def test_philox_noise_values_are_checked_every_call(checks):
    _step(noise=ops.PhiloxNoise(1, 0))
    with pytest.raises(ValueError, match="offset=-1 must be >= 0"):
        _step(noise=ops.PhiloxNoise(1, -1))
    assert len(checks) == 1


def test_the_cache_is_bounded(checks, monkeypatch):
    monkeypatch.setattr(ops._PlanCache, "capacity", 3)
    for n in range(1, 6):
        _step(sample=torch.randn(n, 3), model_output=torch.randn(n, 3))
    assert len(ops._plans) <= 3


def test_the_torch_backend_specialises_a_step_once_per_signature(checks, monkeypatch):
    """The plan keeps the reference's program for its signature (``reference.step_program``):
    a trajectory of one signature decides the step's structure once, not every step."""
    made = []
    backend = ops.backends.load_backend("torch")
    original_step, original_threshold = backend.step_program, backend.threshold_program
    monkeypatch.setattr(backend, "step_program", lambda *s: made.append("step") or original_step(*s))
    monkeypatch.setattr(backend, "threshold_program", lambda *s: made.append("threshold") or original_threshold(*s))
    scheduler = fused_sched.FusedDDIMScheduler(thresholding=True)
    scheduler.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    with ops.use_backend("torch"):
        for t in scheduler.timesteps:
            x = scheduler.step(torch.tanh(x), t, x).prev_sample
    assert sorted(made) == ["step", "threshold"] and len(checks) == 1


@pytest.mark.parametrize("ratio", [0.995, 0.1])  # the order statistics from the top, from the bottom
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_a_thresholded_step_finds_x0_once_with_the_same_bits(ratio, prediction_type):
    """On the torch backend a thresholded step computes x0 once, for the scale and the step
    (``StepPlan.run``); the result is the two-pass form the kernels compute
    (``reference.threshold_scale``, then ``reference.fused_step``), bit for bit, including a
    row holding NaN."""
    scheduler = fused_sched.FusedDDIMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                                               prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    placed = scheduler._tables[(0.0, False)]
    rows = placed.row(int(scheduler.timesteps[3]), torch.device("cpu"), torch.float32)
    x, m = torch.randn(3, 4, 5, 7) * 3, torch.randn(3, 4, 5, 7) * 3
    m[1, 2, 3, 4] = float("nan")
    options = dict(clip="threshold", threshold_ratio=ratio, threshold_max=1.5, x0_dtype=torch.float32,
                   constant_columns=placed.constant_columns)
    once = ops.fused_step(x, m, rows, backend="torch", **options)
    scale = reference.threshold_scale(x, m, rows, ratio, 1.5)
    two_pass = reference.fused_step(x, m, rows, (), None, "threshold", 1.0, scale, torch.float32, None,
                                    torch.float32, placed.constant_columns)
    assert torch.isnan(once.prev_sample[1]).all() and not torch.isnan(once.prev_sample[0]).any()
    for got, want in zip(once, two_pass):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(bit_pattern(got), bit_pattern(want))


# ---- the DDIM family keeps the op's plan per schedule (DDIMFamilyMixin._fused_step) --------

DDIM_FAMILY = ["ddim", "ddim_inverse", "cogvideox_ddim"]


def _ddim_family(kind, **config):
    from drivers import PAIRS

    reference = PAIRS[kind][0](**config)
    fused = PAIRS[kind][1](**config)
    for scheduler in (reference, fused):
        scheduler.set_timesteps(10)
    return reference, fused


@pytest.mark.parametrize("kind", DDIM_FAMILY)
def test_a_ddim_family_trajectory_is_planned_once(checks, kind):
    _, scheduler = _ddim_family(kind)
    x = torch.randn(2, 3, 4, 4)
    with ops.use_backend("torch"):
        for t in scheduler.timesteps:
            x = scheduler.step(torch.tanh(x), t, x).prev_sample
    assert len(checks) == 1 and torch.isfinite(x).all()


@pytest.mark.parametrize("kind", DDIM_FAMILY)
@pytest.mark.parametrize("change", ["model_output dtype", "sample dtype", "shape", "backend request", "schedule"])
def test_a_kept_plan_never_serves_another_signature(checks, kind, change):
    """After a step, a step whose inputs differ in anything the op checked is planned again
    and gives what diffusers gives for those inputs."""
    reference, fused = _ddim_family(kind)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = fused.timesteps[3]
    with ops.use_backend("torch"):
        fused.step(m, t, x)
        backend = "auto" if change == "backend request" else "torch"  # another request, whatever it selects
        if change == "model_output dtype":
            m = m.to(torch.bfloat16)
        elif change == "sample dtype":
            x = x.double()
        elif change == "shape":
            x, m = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
        elif change == "schedule":
            for scheduler in (reference, fused):
                scheduler.set_timesteps(7)
            t = fused.timesteps[3]
        with ops.use_backend(backend):
            got = fused.step(m, t, x)
    want = reference.step(m, reference.timesteps[3], x)
    assert len(checks) == 2
    assert got.prev_sample.dtype == want.prev_sample.dtype
    assert got.pred_original_sample.dtype == want.pred_original_sample.dtype
    # Identical inputs: one step's float32 rounding, with margin (test_conformance's
    # TEACHER_FORCED_TOLERANCE); with a bf16 model output diffusers rounds its products with
    # it in bf16, and the low-precision contract's 3e-2 (README, test_low_precision) applies.
    tolerance = 3e-2 if change == "model_output dtype" else 1e-5
    assert relative_error(got.prev_sample, want.prev_sample) <= tolerance


@pytest.mark.parametrize("kind", DDIM_FAMILY)
@pytest.mark.parametrize("bad, error, message", [
    (dict(model_output=torch.randn(2, 3, 4, 5)), ValueError, "model_output has shape"),
    (dict(model_output=torch.randn(2, 3, 4, 4, device="meta")), ValueError, "model_output is on meta"),
    (dict(model_output=torch.randn(2, 3, 4, 4).to(torch.int32)), TypeError, "model_output must be a floating-point"),
])
def test_bad_input_after_a_kept_plan_is_still_refused(checks, kind, bad, error, message):
    _, scheduler = _ddim_family(kind)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    scheduler.step(m, scheduler.timesteps[3], x)
    with pytest.raises(error, match=message):
        scheduler.step(bad["model_output"], scheduler.timesteps[4], x)


def test_ddim_noise_of_another_signature_is_checked_again(checks):
    _, scheduler = _ddim_family("ddim")
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = scheduler.timesteps[3]
    scheduler.step(m, t, x, eta=0.5, variance_noise=torch.randn(2, 3, 4, 4))
    scheduler.step(m, t, x, eta=0.5, variance_noise=torch.randn(2, 3, 4, 4))
    assert len(checks) == 1
    with pytest.raises(ValueError, match="variance_noise has shape"):  # refused by the step, before the op
        scheduler.step(m, t, x, eta=0.5, variance_noise=torch.randn(3, 3, 4, 4))
    assert len(checks) == 1
    scheduler.step(m, t, x, eta=0.5, variance_noise=torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert len(checks) == 2
    scheduler.step(m, t, x, eta=0.7, variance_noise=torch.randn(2, 3, 4, 4))  # another table
    assert len(checks) == 3


def test_tensor_subclass_inputs_to_a_ddim_family_step_are_checked_every_call(checks):
    class Marked(torch.Tensor):
        pass

    _, scheduler = _ddim_family("ddim_inverse")
    x = torch.randn(2, 3, 4, 4).as_subclass(Marked)
    for t in scheduler.timesteps[:3]:
        scheduler.step(torch.randn(2, 3, 4, 4), t, x)
    assert len(checks) == 3


def test_plan_step_takes_fused_steps_options_and_its_plan_computes_the_same_step(checks):
    options = dict(clip="clamp", clip_range=0.5, x0_dtype=torch.float32, history_dtype=torch.float16,
                   constant_columns=KNOWN, backend="torch")
    history = (torch.randn(2, 3, 4, 4),)
    plan = ops.plan_step(X, M, ROWS, history=history, **options)
    assert ops.plan_step(X, M, ROWS, history=history, **options) is plan and len(checks) == 1
    for got, want in zip(plan.run(X, M, ROWS, history), ops.fused_step(X, M, ROWS, history=history, **options)):
        assert torch.equal(got, want)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['clip_ratio'\]"):
        ops.plan_step(X, M, ROWS, clip_ratio=0.5)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        ops.plan_step(X, M, ROWS, clip="clamp", clip_range=0.0)
