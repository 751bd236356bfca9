"""torch.compile(fullgraph=True) over whole trajectories: the fused op is one opaque node
(fused_sched::fused_step), a traced step has no graph break, and it does not recompile per
step.

Covered: the DDIM family (timestep passed as an element of scheduler.timesteps, or an int) and the
multistep DPM-Solvers, whose traced step keeps its position in a device cursor
(schedulers/step_cursor.py): at most one graph per history length (None entries of
model_outputs at the start of a trajectory), never one per step.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from drivers import PAIRS
from fused_sched import ops

KINDS = {"ddim": dict(), "ddim_inverse": dict(),
         "cogvideox_ddim": dict(prediction_type="v_prediction", timestep_spacing="trailing")}


def _initial_sample(device):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("timestep_form", ["tensor", "int"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_compiled_trajectory_has_no_graph_breaks_or_per_step_recompiles(backend, device, kind, timestep_form):
    """Timesteps as pipelines pass them (elements of scheduler.timesteps) or as Python ints
    (dynamo makes an int that changes a symbol; a step that specialised on its value traced
    a graph per timestep, and fell back to eager at the recompile limit)."""
    torch._dynamo.reset()
    counters.clear()
    fused_cls = PAIRS[kind][1]
    eager, traced = fused_cls(**KINDS[kind]), fused_cls(**KINDS[kind])
    for s in (eager, traced):
        s.set_timesteps(10, device=device)

    @torch.compile(fullgraph=True, backend="eager")
    def step(m, t, x):
        return traced.step(m, t, x, return_dict=False)[0]

    x_eager = x_traced = _initial_sample(device)
    for i in range(10):
        x_eager = eager.step(torch.tanh(x_eager), eager.timesteps[i], x_eager, return_dict=False)[0]
        t = traced.timesteps[i] if timestep_form == "tensor" else int(traced.timesteps[i])
        x_traced = step(torch.tanh(x_traced), t, x_traced)
        # Same op on the same backend: the traced graph computes exactly the eager result.
        assert torch.equal(x_traced, x_eager), f"step {i}"
    # One graph for the first call, at most one more once dynamo makes the timestep dynamic.
    assert counters["stats"]["unique_graphs"] <= 2
    assert not counters["graph_break"]


DPM_CASES = {
    "dpm++2m": ("dpm", dict(), False),
    "dpm++3m-begin-index": ("dpm", dict(solver_order=3), True),
    "sde-dpm++2m": ("dpm", dict(algorithm_type="sde-dpmsolver++"), False),
    "dpm++3m-threshold-sample": ("dpm", dict(solver_order=3, thresholding=True, prediction_type="sample"), False),
    "dpm-inverse-3": ("dpm_inverse", dict(solver_order=3), False),
    # orders above 3 run as 3: the traced step carries two history terms, not solver_order - 1
    "dpm++4m": ("dpm", dict(solver_order=4), False),
    "dpm-inverse-4": ("dpm_inverse", dict(solver_order=4), False),
}


def _dpm_pair(name, steps, device=torch.device("cpu")):
    kind, config, begin = DPM_CASES[name]
    pair = [PAIRS[kind][1](**config) for _ in range(2)]
    for s in pair:
        s.set_timesteps(steps, device=device)
        if begin:
            s.set_begin_index(0)
    return pair


def _dpm_step(scheduler, x, i, noise):
    kwargs = {"variance_noise": noise} if scheduler.config.algorithm_type.startswith("sde") else {}
    return scheduler.step(torch.tanh(x), scheduler.timesteps[i], x, return_dict=False, **kwargs)[0]


@pytest.mark.parametrize("name", sorted(DPM_CASES))
def test_compiled_dpm_trajectory_reuses_its_graphs(backend, device, name):
    """20 traced steps give the eager results exactly, from at most solver_order graphs."""
    torch._dynamo.reset()
    counters.clear()
    eager, traced = _dpm_pair(name, 20, device)
    step = torch.compile(fullgraph=True, backend="eager")(lambda x, i, z: _dpm_step(traced, x, i, z))
    x_eager = x_traced = _initial_sample(device)
    noise = torch.Generator().manual_seed(1)
    for i in range(20):
        z = torch.randn(2, 4, 8, 8, generator=noise).to(device)
        x_eager = _dpm_step(eager, x_eager, i, z)
        x_traced = step(x_traced, i, z)
        assert torch.equal(x_traced, x_eager), f"step {i}"
    assert counters["stats"]["unique_graphs"] <= traced.config.solver_order
    assert not counters["graph_break"]
    # The public state read after traced steps is diffusers' (one sync, outside the steps).
    assert (traced.step_index, traced.lower_order_nums) == (eager.step_index, eager.lower_order_nums) == (20, eager.config.solver_order)


def test_dpm_switching_between_eager_and_traced_steps_keeps_the_trajectory(backend, device):
    torch._dynamo.reset()
    eager, mixed = _dpm_pair("dpm++3m-begin-index", 12, device)
    traced_step = torch.compile(fullgraph=True, backend="eager")(lambda x, i: _dpm_step(mixed, x, i, None))
    x_eager = x_mixed = _initial_sample(device)
    for i in range(12):
        x_eager = _dpm_step(eager, x_eager, i, None)
        x_mixed = traced_step(x_mixed, i) if (i // 3) % 2 else _dpm_step(mixed, x_mixed, i, None)
        assert torch.equal(x_mixed, x_eager), f"step {i}"
        assert mixed.step_index == eager.step_index and mixed.lower_order_nums == eager.lower_order_nums


def test_traced_dpm_steps_after_float64_steps_weigh_the_float64_history_like_eager():
    """History stored by float64 eager steps makes the next float32 steps' coefficients
    float64, traced as eagerly (traced, they were float32 and the op refused them). The
    backend is auto's (whatever backend this module's other tests selected): float64
    operands go to the torch backend."""
    torch._dynamo.reset()
    eager, mixed = _dpm_pair("dpm++3m-begin-index", 8)
    traced_step = torch.compile(fullgraph=True, backend="eager")(lambda x, i: _dpm_step(mixed, x, i, None))
    x_eager = x_mixed = _initial_sample(torch.device("cpu")).double()
    with ops.use_backend("auto"):
        for i in range(8):
            if i == 2:
                x_eager, x_mixed = x_eager.float(), x_mixed.float()
            x_eager = _dpm_step(eager, x_eager, i, None)
            x_mixed = traced_step(x_mixed, i) if i >= 2 else _dpm_step(mixed, x_mixed, i, None)
            assert x_mixed.dtype == x_eager.dtype and torch.equal(x_mixed, x_eager), f"step {i}"


def test_traced_dpm_step_past_the_end_fails():
    torch._dynamo.reset()
    (scheduler, _) = _dpm_pair("dpm++2m", 4)
    step = torch.compile(fullgraph=True, backend="eager")(
        lambda x, t: scheduler.step(torch.tanh(x), t, x, return_dict=False)[0])
    x = torch.randn(1, 4, 8, 8)
    for t in scheduler.timesteps:
        x = step(x, t)
    with pytest.raises(IndexError, match="index out of range"):  # the cursor's gather (a device assert on CUDA)
        step(x, scheduler.timesteps[-1])


@pytest.mark.parametrize("config", [dict(thresholding=True), dict(prediction_type="sample", clip_sample=False)],
                         ids=["threshold", "sample-prediction"])
def test_compiled_noisy_ddim_with_variance_noise(backend, device, config):
    """eta > 0 with the noise given as variance_noise (a torch.Generator cannot be traced),
    dynamic thresholding's two ops included: eager results, no per-step recompiles."""
    torch._dynamo.reset()
    counters.clear()
    eager, traced = (PAIRS["ddim"][1](**config) for _ in range(2))
    for s in (eager, traced):
        s.set_timesteps(10, device=device)
    step = torch.compile(fullgraph=True, backend="eager")(
        lambda m, t, x, z: traced.step(m, t, x, eta=0.5, variance_noise=z, return_dict=False)[0])
    noise = torch.Generator().manual_seed(1)
    x_eager = x_traced = _initial_sample(device)
    for i in range(10):
        z = torch.randn(2, 4, 8, 8, generator=noise).to(device)
        x_traced = step(torch.tanh(x_traced), traced.timesteps[i], x_traced, z)
        x_eager = eager.step(torch.tanh(x_eager), eager.timesteps[i], x_eager, eta=0.5, variance_noise=z,
                             return_dict=False)[0]
        assert torch.equal(x_traced, x_eager), f"step {i}"
    assert counters["stats"]["unique_graphs"] <= 2
    assert not counters["graph_break"]


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("kind", ["ddim-eta", "sde-dpm++2m"])
def test_compiled_trajectory_with_in_kernel_noise(backend, device, kind, compiler):
    """use_philox_noise: the counter is a device tensor the kernel reads (a snapshot) and the
    step then advances in place, so noisy steps trace once: the graph count stops growing
    after the first steps, there is no graph break, the results are eager's bit for bit
    (aot_eager: also through functionalization, where the in-place advance becomes a
    copy-back after the op), and set_timesteps restarts the same trajectory."""
    torch._dynamo.reset()
    counters.clear()
    steps = 12
    if kind == "ddim-eta":
        pair, kwargs = [PAIRS["ddim"][1]() for _ in range(2)], dict(eta=1.0)
    else:
        pair, kwargs = [PAIRS["dpm"][1](algorithm_type="sde-dpmsolver++") for _ in range(2)], {}
    eager, traced = pair
    for s in pair:
        s.use_philox_noise(11)
        s.set_timesteps(steps, device=device)
    step = torch.compile(fullgraph=True, backend=compiler)(
        lambda m, t, x: traced.step(m, t, x, return_dict=False, **kwargs)[0])
    x0 = _initial_sample(device)

    def traced_trajectory():
        x, samples = x0, []
        for i in range(steps):
            x = step(torch.tanh(x), traced.timesteps[i], x)
            samples.append(x)
            if i == 3:
                graphs_after_4_steps.append(counters["stats"]["unique_graphs"])
        return samples

    graphs_after_4_steps = []
    first = traced_trajectory()
    x_eager = x0
    for i in range(steps):
        x_eager = eager.step(torch.tanh(x_eager), eager.timesteps[i], x_eager, return_dict=False, **kwargs)[0]
        assert torch.equal(first[i], x_eager), f"step {i}"
    assert counters["stats"]["unique_graphs"] == graphs_after_4_steps[0] <= 2
    assert int(traced._philox_counter) == int(eager._philox_counter) == steps * x0.numel()

    traced.set_timesteps(steps, device=device)
    again = traced_trajectory()
    for i in range(steps):
        assert torch.equal(again[i], first[i]), f"re-run step {i}"
    assert counters["stats"]["unique_graphs"] == graphs_after_4_steps[0]
    assert not counters["graph_break"]


def _cogvideox_dpm_trajectory(step, timesteps, x):
    """The CogVideoX pipeline's calls: history None at the first step, then the previous x0
    and timestep."""
    old, samples = None, []
    for i in range(len(timesteps)):
        x, old = step(torch.tanh(x), old, timesteps[i], timesteps[i - 1] if i > 0 else None, x)
        samples.append(x)
    return samples


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_compiled_cogvideox_dpm_trajectory_with_in_kernel_noise(backend, device, beta_schedule, compiler):
    """diffusers' CogVideoXDPM step cannot be traced (t_p >= 0 and 'old is None or t_p < 0'
    read the timestep, randn takes a generator). The fused one, with in-kernel noise, picks
    its order on the device: two graphs (without and with history), no graph break, eager's
    results bit for bit (the last step is first order though history is passed)."""
    torch._dynamo.reset()
    counters.clear()
    config = dict(prediction_type="v_prediction", timestep_spacing="trailing", beta_schedule=beta_schedule)
    eager, traced = (PAIRS["cogvideox_dpm"][1](**config) for _ in range(2))
    for s in (eager, traced):
        s.use_philox_noise(7)
        s.set_timesteps(10, device=device)
    step = torch.compile(fullgraph=True, backend=compiler)(lambda *args: traced.step(*args))
    x = _initial_sample(device)
    expected = _cogvideox_dpm_trajectory(eager.step, eager.timesteps, x)
    got = _cogvideox_dpm_trajectory(step, traced.timesteps, x)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"step {i}"
    assert int(traced._philox_counter) == int(eager._philox_counter)
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]


def test_compiled_cogvideox_dpm_with_torch_default_generator(backend, device):
    """generator=None: the traced step draws both noises and keeps the one eager would use.
    Traced with backend='eager' the draws come from torch's global generator in that order,
    so from the same seed the trajectory is eager's (the traced last step draws one unused
    tensor more)."""
    torch._dynamo.reset()
    counters.clear()
    config = dict(prediction_type="v_prediction", timestep_spacing="trailing")
    eager, traced = (PAIRS["cogvideox_dpm"][1](**config) for _ in range(2))
    for s in (eager, traced):
        s.set_timesteps(8, device=device)
    step = torch.compile(fullgraph=True, backend="eager")(lambda *args: traced.step(*args))
    x = _initial_sample(device)
    torch.manual_seed(3)
    expected = _cogvideox_dpm_trajectory(eager.step, eager.timesteps, x)
    torch.manual_seed(3)
    got = _cogvideox_dpm_trajectory(step, traced.timesteps, x)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"step {i}"
    assert not counters["graph_break"]


def _set_config(name, value):
    def change(scheduler):
        setattr(scheduler.config, name, value)
    return change


def _replace(name):
    def change(scheduler):
        setattr(scheduler, name, getattr(scheduler, name) * 0.95)
    return change


@pytest.mark.parametrize("kind, name, change", [
    ("ddim", "clip_sample", _set_config("clip_sample", False)),
    ("ddim", "alphas_cumprod", _replace("alphas_cumprod")),
    ("dpm", "prediction_type", _set_config("prediction_type", "v_prediction")),
    ("dpm", "sigmas", _replace("sigmas")),
], ids=["ddim-option", "ddim-state", "dpm-option", "dpm-state"])
def test_a_change_reaches_compiled_steps_through_an_eager_step_and_is_refused_without_one(kind, name, change):
    """A compiled step cannot rebuild the tables (tests/test_changed_inputs.py): after a
    changed option or replaced state it is traced again (its guards on them fail) and
    refuses, naming the remedy; after one eager step, which rebuilds them, compiled steps
    follow the change."""
    torch._dynamo.reset()
    config = dict(clip_sample=True, clip_sample_range=0.5) if kind == "ddim" else {}
    traced, eager = PAIRS[kind][1](**config), PAIRS[kind][1](**config)
    for scheduler in (traced, eager):
        scheduler.set_timesteps(6)

    def step(scheduler, x, i):
        return scheduler.step(torch.tanh(x) * 3, scheduler.timesteps[i], x, return_dict=False)[0]

    compiled = torch.compile(fullgraph=True, backend="eager")(step)
    x = _initial_sample(torch.device("cpu"))
    assert torch.equal(compiled(traced, x, 0), step(eager, x, 0))
    for scheduler in (traced, eager):
        change(scheduler)
    with pytest.raises(Exception, match=rf"\['{name}'\] changed since the tables were built"):
        compiled(traced, x, 1)
    assert torch.equal(step(traced, x, 1), step(eager, x, 1))  # rebuilds the tables
    assert torch.equal(compiled(traced, x, 2), step(eager, x, 2))


def test_tracing_a_generator_names_the_remedy():
    """A torch.Generator cannot be traced: the error says what to do instead."""
    torch._dynamo.reset()
    scheduler = PAIRS["ddim"][1]()
    scheduler.set_timesteps(4)
    step = torch.compile(fullgraph=True, backend="eager")(
        lambda m, t, x, g: scheduler.step(m, t, x, eta=1.0, generator=g, return_dict=False)[0])
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(Exception, match="use_philox_noise"):
        step(x, scheduler.timesteps[0], x, torch.Generator().manual_seed(0))


def test_traced_dpm_step_on_another_device_than_the_schedule_names_the_fix():
    """The device cursor lives where set_timesteps put the schedule; a traced step on data
    elsewhere says so (off GPU, a 'meta' sample stands in for another device)."""
    torch._dynamo.reset()
    (scheduler, _) = _dpm_pair("dpm++2m", 4)
    step = torch.compile(fullgraph=True, backend="eager")(
        lambda x, t: scheduler.step(x, t, x, return_dict=False)[0])
    x = torch.empty(1, 4, 8, 8, device="meta")
    with pytest.raises(Exception, match=r"set_timesteps\(\.\.\., device='meta'\)"):
        step(x, scheduler.timesteps[0])
