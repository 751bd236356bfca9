"""Steps whose inputs require gradients: gradients flow as through diffusers' step, or the
step refuses; they are never silently dropped (the compiled kernels have no backward)."""

from __future__ import annotations

import pytest
import torch

import fused_sched
from fused_sched import ops
from fused_sched.ops import backends

from conftest import require_backend
from drivers import PAIRS, assert_close_to_diffusers, record_calls

CONFIGS = [("ddim", {}), ("ddim", {"thresholding": True}), ("dpm", {}), ("dpm", {"thresholding": True}),
           # a scale inside (1, max): its gradient flows too (test_a_compiled_step_... checks this premise)
           ("ddim", {"thresholding": True, "dynamic_thresholding_ratio": 0.5, "sample_max_value": 20.0})]


def _step_and_gradient(cls, config, compiled=False):
    """(prev, d/dx, d/dm) of sum(prev^2) for one mid-trajectory step, eager or through
    torch.compile(fullgraph=True)."""
    scheduler = cls(**config)
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).requires_grad_()
    m = torch.randn(2, 4, 8, 8, generator=g).requires_grad_()
    step = lambda m, t, x: scheduler.step(m, t, x).prev_sample  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True)
    prev = step(m, scheduler.timesteps[1], x)
    prev.square().sum().backward()
    return prev, x.grad, m.grad


def _threshold_medians(config):
    """Per batch row, the median of |x0| that _step_and_gradient's DDIM step thresholds."""
    scheduler = PAIRS["ddim"][0](**config)
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    alpha = scheduler.alphas_cumprod[int(scheduler.timesteps[1])]
    return ((x - (1 - alpha).sqrt() * m) / alpha.sqrt()).abs().reshape(2, -1).quantile(0.5, dim=1)


def _compiled_backend():
    """The backend auto runs CPU steps on, when it is not the torch reference."""
    require_backend("cpu")
    chosen = backends.select_backend(torch.device("cpu"), (torch.float32,), "auto")
    if chosen.name == "torch":
        pytest.skip("auto already runs the torch backend here (the cpu extension is unavailable)")
    return chosen


@pytest.mark.parametrize("kind, config", CONFIGS)
def test_auto_hands_steps_that_need_gradients_to_the_torch_backend(monkeypatch, kind, config):
    compiled = _compiled_backend()
    ran = record_calls(monkeypatch, compiled, ["fused_step", "threshold_scale"])
    reference_cls, fused_cls = PAIRS[kind]
    prev, dx, dm = _step_and_gradient(fused_cls, config)
    expected_prev, expected_dx, expected_dm = _step_and_gradient(reference_cls, config)
    assert ran == []  # the compiled kernels did not run
    assert prev.requires_grad
    for name, a, b in (("prev", prev, expected_prev), ("d/dx", dx, expected_dx), ("d/dm", dm, expected_dm)):
        assert_close_to_diffusers(a.detach(), b.detach(), what=name)


def test_without_gradients_auto_keeps_the_compiled_backend(monkeypatch):
    compiled = _compiled_backend()
    ran = record_calls(monkeypatch, compiled, ["fused_step"])
    scheduler = fused_sched.FusedDDIMScheduler()
    scheduler.set_timesteps(6)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with torch.no_grad():
        prev = scheduler.step(x, scheduler.timesteps[1], x).prev_sample
    assert ran == ["fused_step"] and not prev.requires_grad
    prev = scheduler.step(x.detach(), scheduler.timesteps[1], x.detach()).prev_sample
    assert ran == ["fused_step"] * 2


def test_a_compiled_backend_asked_for_by_name_refuses_gradients():
    compiled = _compiled_backend()
    scheduler = fused_sched.FusedDDIMScheduler()
    scheduler.set_timesteps(6)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with ops.use_backend(compiled.name):
        with pytest.raises(ops.BackendUnavailableError, match="does not propagate gradients"):
            scheduler.step(x, scheduler.timesteps[1], x)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("kind", ["ddim", "dpm", "cogvideox_ddim", "ddim_inverse"])
def test_a_schedule_used_under_inference_mode_still_steps_with_gradients(backend, kind):
    """set_timesteps and a first step under torch.inference_mode() (a pipeline run), then a
    step that tracks gradients: nothing the scheduler keeps may be an inference tensor."""
    results = []
    for cls in PAIRS[kind]:
        scheduler = cls()
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with ops.use_backend(backend), torch.inference_mode():
            scheduler.set_timesteps(6)
            scheduler.step(0.1 * x, scheduler.timesteps[0], x)
        with ops.use_backend(backend):
            x = x.clone().requires_grad_()
            prev = scheduler.step(0.1 * x, scheduler.timesteps[1], x).prev_sample
        prev.square().sum().backward()
        results.append((prev.detach(), x.grad))
    (prev_ref, grad_ref), (prev_fused, grad_fused) = results
    assert_close_to_diffusers(prev_fused, prev_ref, what="prev")
    assert_close_to_diffusers(grad_fused, grad_ref, what="d/dx")


@pytest.mark.parametrize("kind, config", [
    # the scale inside (1, max), so its gradient flows too (checked below)
    ("ddim", {"thresholding": True, "dynamic_thresholding_ratio": 0.5, "sample_max_value": 20.0}),
    ("dpm", {}),
])
def test_a_compiled_step_backpropagates_like_diffusers(kind, config):
    """Traced, a step that needs gradients is the reference's torch ops (the fused op is an
    opaque custom op without a backward). Tolerance: inductor reorders and contracts the
    float32 arithmetic of forward and backward, a few ulps of the largest term: 1e-5 of the
    largest value, relative."""
    if config.get("thresholding"):  # the premise: the median of |x0| is neither clamped to 1 nor to the max
        median = _threshold_medians(config)
        assert bool(((median > 1) & (median < config["sample_max_value"])).all()), median
    reference_cls, fused_cls = PAIRS[kind]
    got = _step_and_gradient(fused_cls, config, compiled=True)
    expected = _step_and_gradient(reference_cls, config)
    for name, a, b in zip(("prev", "d/dx", "d/dm"), got, expected):
        assert_close_to_diffusers(a.detach(), b.detach(), what=name)


def test_a_compiled_step_with_a_compiled_backend_named_refuses_gradients():
    compiled_backend = _compiled_backend()
    torch._dynamo.reset()
    scheduler = fused_sched.FusedDDIMScheduler()
    scheduler.set_timesteps(6)
    compiled = torch.compile(lambda x, t: scheduler.step(x, t, x).prev_sample, fullgraph=True)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with ops.use_backend(compiled_backend.name):
        with pytest.raises(Exception, match="does not propagate gradients"):
            compiled(x, scheduler.timesteps[1])
