"""Multistep DPM-Solver steps after ``prepare_cuda_graph``: the history in fixed buffers, the
position in the device cursor, so that a CUDA graph captured over one step replays the
next step each time (tests/test_cuda_graphs.py captures real graphs on a GPU).

Here, on any machine: such steps give the ordinary eager trajectory bit for bit, from the
start or from the middle of a trajectory, read nothing on the host, keep every tensor they
read or write between steps at one address, and restart in place with set_timesteps."""

from __future__ import annotations

import pytest
import torch

from drivers import PAIRS
from test_no_host_sync import no_host_syncs

CONFIGS = {
    "2m": ("dpm", dict()),
    "3m-threshold-sample": ("dpm", dict(solver_order=3, thresholding=True, prediction_type="sample")),
    "3m-lower-order-final": ("dpm", dict(solver_order=3, lower_order_final=True, euler_at_final=True)),
    "sde-2m": ("dpm", dict(algorithm_type="sde-dpmsolver++")),
    "dpmsolver-1": ("dpm", dict(algorithm_type="dpmsolver", solver_order=1, final_sigmas_type="sigma_min")),
    "inverse-3m": ("dpm_inverse", dict(solver_order=3)),
    "4m": ("dpm", dict(solver_order=4)),  # runs as 3M: two history buffers
}
N = 9


def _scheduler(case):
    kind, config = CONFIGS[case]
    scheduler = PAIRS[kind][1](**config)
    scheduler.use_philox_noise(5)  # SDE noise that a graph can replay
    scheduler.set_timesteps(N)
    return scheduler


def _x():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _run(scheduler, x, steps, guard=False):
    samples = []
    for i in steps:
        m = torch.tanh(x) * 0.9 + 0.05 * i
        if guard:
            with no_host_syncs():
                x = scheduler.step(m, scheduler.timesteps[i], x).prev_sample
        else:
            x = scheduler.step(m, scheduler.timesteps[i], x).prev_sample
        samples.append(x)
    return samples


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"step {i}"


@pytest.mark.parametrize("case", sorted(CONFIGS))
@pytest.mark.parametrize("prepared_at", [0, 4])
def test_static_steps_give_the_eager_trajectory(case, prepared_at):
    expected = _run(_scheduler(case), _x(), range(N))
    scheduler = _scheduler(case)
    first = _run(scheduler, _x(), range(prepared_at))
    x = first[-1] if first else _x()
    scheduler.prepare_cuda_graph(x)
    rest = _run(scheduler, x, range(prepared_at, N), guard=True)
    _assert_same(first + rest, expected)
    assert scheduler.step_index == N  # read back from the device cursor
    assert scheduler.lower_order_nums == min(N, scheduler.config.solver_order)


@pytest.mark.parametrize("case", ["3m-lower-order-final", "sde-2m", "inverse-3m"])
def test_a_change_mid_trajectory_is_followed_with_the_position_on_the_device(case):
    """A config option and the sigmas changed after a few static steps: the next step
    rebuilds the table and the cursor's rows in place (tests/test_changed_inputs.py),
    keeping the position and history the device holds, as ordinary eager steps do."""
    def edit(scheduler):
        scheduler.config.lower_order_final = not scheduler.config.lower_order_final
        scheduler.sigmas.mul_(0.97)

    trajectories = []
    for static in (False, True):
        scheduler = _scheduler(case)
        x = _x()
        if static:
            scheduler.prepare_cuda_graph(x)
        first = _run(scheduler, x, range(3))
        edit(scheduler)
        trajectories.append(first + _run(scheduler, first[-1], range(3, N)))
    _assert_same(trajectories[1], trajectories[0])
    unedited = _run(_scheduler(case), _x(), range(N))
    assert not torch.allclose(unedited[-1], trajectories[0][-1], rtol=1e-3, atol=0), "the edit moved nothing"


@pytest.mark.parametrize("case", ["3m-threshold-sample", "sde-2m"])
def test_set_timesteps_restarts_in_place(case):
    """What a graph reads and writes across steps keeps its address; set_timesteps (same
    number of steps) zeroes the history and rewinds the position in place, so the same
    steps replay the same trajectory."""
    scheduler = _scheduler(case)
    scheduler.prepare_cuda_graph(_x())

    def addresses():
        tensors = list(scheduler._static_history) + [scheduler._cursor.step, scheduler._cursor.lower,
                                                     scheduler._cursor.row_lookup, scheduler._philox_counter]
        tensors += list(scheduler._table._placed.values())
        return [t.data_ptr() for t in tensors]

    before = addresses()
    first = _run(scheduler, _x(), range(N))
    assert addresses() == before
    scheduler.set_timesteps(N)
    assert addresses() == before
    assert all(not bool(h.any()) for h in scheduler._static_history)
    _assert_same(_run(scheduler, _x(), range(N)), first)
    assert [h.data_ptr() for h in scheduler.model_outputs[1:]] == before[: len(scheduler._static_history)][::-1]


@pytest.mark.parametrize("begin", [0, 3])
def test_set_begin_index_moves_the_start(begin):
    """The start moves, and the position still reads as diffusers' does: no step yet
    (step_index None) until the first step, whatever the begin index."""
    diffusers_scheduler = PAIRS["dpm"][0]()
    diffusers_scheduler.set_timesteps(N)
    diffusers_scheduler.set_begin_index(begin)
    reference = _scheduler("2m")
    reference.set_begin_index(begin)
    expected = _run(reference, _x(), range(begin, N))
    scheduler = _scheduler("2m")
    scheduler.prepare_cuda_graph(_x())
    scheduler.set_begin_index(begin)
    assert (scheduler.step_index, scheduler.begin_index) == (diffusers_scheduler.step_index, begin) == (None, begin)
    got = _run(scheduler, _x(), range(begin, N))
    _assert_same(got, expected)
    assert scheduler.step_index == N


@pytest.mark.parametrize("case", ["2m", "inverse-3m"])
@pytest.mark.parametrize("given", ["element", "copy", "int"])
@pytest.mark.parametrize("prepared", ["prepare_cuda_graph", "set_timesteps again"])
def test_the_first_step_starts_where_its_timestep_is(case, given, prepared):
    """As diffusers' first step finds its index from the timestep, so does the first eager
    step after prepare_cuda_graph or set_timesteps put the cursor at step 0 by default: a
    trajectory over timesteps[3:] runs steps 3 to N - 1, not 0 to N - 4."""
    def timesteps(scheduler):
        ts = scheduler.timesteps[3:]
        return {"element": list(ts), "copy": [t.clone() for t in ts], "int": [int(t) for t in ts]}[given]

    def run(scheduler):
        x, samples = _x(), []
        for i, t in enumerate(timesteps(scheduler)):
            x = scheduler.step(torch.tanh(x) * 0.9 + 0.05 * i, t, x).prev_sample
            samples.append(x)
        return samples

    expected = run(_scheduler(case))
    scheduler = _scheduler(case)
    scheduler.prepare_cuda_graph(_x())
    if prepared == "set_timesteps again":
        run(scheduler)
        scheduler.set_timesteps(N)
    assert scheduler.step_index is None  # no step yet, as diffusers says
    got = run(scheduler)
    _assert_same(got, expected)
    assert scheduler.step_index == N


def test_set_begin_index_after_a_step_is_ignored_as_diffusers_does():
    expected = _run(_scheduler("2m"), _x(), range(N))
    scheduler = _scheduler("2m")
    scheduler.prepare_cuda_graph(_x())
    first = _run(scheduler, _x(), range(4))
    scheduler.set_begin_index(4)  # diffusers reads the begin index only before the first step
    assert scheduler.step_index == 4
    _assert_same(first + _run(scheduler, first[-1], range(4, N)), expected)


def test_inputs_unlike_the_prepared_ones_are_refused():
    scheduler = _scheduler("2m")
    scheduler.prepare_cuda_graph(_x())
    other = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="prepare_cuda_graph made the history for shape"):
        scheduler.step(other, scheduler.timesteps[0], other)
    half = _x().half()
    with pytest.raises(ValueError, match="call prepare_cuda_graph again"):
        scheduler.step(half, scheduler.timesteps[0], half)


def test_prepare_needs_a_schedule():
    scheduler = PAIRS["dpm"][1]()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.prepare_cuda_graph(_x())


def test_capture_without_preparation_is_refused_before_anything_is_recorded(monkeypatch):
    """During capture, loading the position would be recorded and rerun by every replay:
    the step refuses instead, naming prepare_cuda_graph; preparing during capture is refused
    too. (Capture itself is simulated: this runs on any machine.)"""
    from fused_sched.schedulers import dpm

    scheduler = _scheduler("2m")
    scheduler.prepare_cuda_graph(_x())
    scheduler.lower_order_nums = 0  # a host-side change: the device position is stale now
    monkeypatch.setattr(dpm, "stream_capturing", lambda device: True)
    x = _x()
    with pytest.raises(ValueError, match="prepare_cuda_graph"):
        scheduler.step(x, scheduler.timesteps[0], x)
    with pytest.raises(ValueError, match="before capture"):
        scheduler.prepare_cuda_graph(x)
