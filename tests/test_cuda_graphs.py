"""Steps inside captured CUDA graphs.

A captured graph replays kernels on the memory they used at capture: the coefficient
tables, the DPM cursor, CogVideoX's solver terms and the in-kernel noise counter must keep
their storage for as long as the graph is replayed, including across ``set_timesteps``
(a new generation with the same graph). The first tests prove that storage stays put and
holds the new schedule's values (they run anywhere); the rest capture real graphs and run
only where CUDA exists.

Which steps can be captured: the DDIM family (rows gathered from the timestep tensor on
the device), with in-kernel noise for eta > 0; CogVideoX DPM with in-kernel noise (its
order chosen on the device; the caller passes the history, so it can be a static buffer);
the multistep DPM-Solver after ``prepare_cuda_graph`` (history in fixed buffers, position
in the device cursor: tests/test_dpm_static_history.py checks that mode on any machine).
"""

from __future__ import annotations

import pytest
import torch

from drivers import PAIRS, STEP_TOLERANCE
from fused_sched import ops
from fused_sched.schedulers import ddim as ddim_module

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

COGVIDEOX = dict(prediction_type="v_prediction", timestep_spacing="trailing")


def _storage_read_by_steps(scheduler) -> list[int]:
    """Addresses of every tensor a step reads besides its arguments."""
    tensors = []
    for placed in getattr(scheduler, "_tables", {}).values():
        tensors += placed._placed.values()
    if hasattr(scheduler, "_table"):
        tensors += scheduler._table._placed.values()
    if hasattr(scheduler, "_cursor"):
        tensors += [scheduler._cursor.row_lookup, scheduler._cursor.step, scheduler._cursor.lower]
    tensors += getattr(scheduler, "_placed_terms", {}).values()
    if scheduler._philox_counter is not None:
        tensors.append(scheduler._philox_counter)
    return sorted({t.data_ptr() for t in tensors})


def _ddim_eta_step(scheduler, m, t, x):
    return scheduler.step(m, t, x, eta=1.0, return_dict=False)[0]


def _trajectory(kind, scheduler, x, steps_taken=None):
    old, samples = None, []
    timesteps = scheduler.timesteps
    for i in range(len(timesteps) if steps_taken is None else steps_taken):
        m = torch.tanh(x)
        if kind == "cogvideox_dpm":
            x, old = scheduler.step(m, old, timesteps[i], timesteps[i - 1] if i > 0 else None, x)
        elif kind == "ddim":
            x = _ddim_eta_step(scheduler, m, timesteps[i], x)
        else:
            x = scheduler.step(m, timesteps[i], x, return_dict=False)[0]
        samples.append(x)
    return samples


CASES = {
    "ddim": dict(),
    "ddim_inverse": dict(),
    "cogvideox_ddim": COGVIDEOX,
    "cogvideox_dpm": COGVIDEOX,
    "dpm": dict(algorithm_type="sde-dpmsolver++"),
    "dpm_inverse": dict(solver_order=3),
}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("second_steps", [10, 7], ids=["same-steps", "other-steps"])
def test_set_timesteps_refills_the_storage_steps_read(kind, second_steps):
    """After a trajectory, set_timesteps keeps every tensor steps read where it was (where
    the new tables have the old shapes: always for the DDIM family, whose tables are indexed
    by training timestep; for DPM with the same number of steps), and a trajectory from it
    is exactly a fresh scheduler's."""
    used = PAIRS[kind][1](**CASES[kind])
    used.use_philox_noise(4)
    used.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    _trajectory(kind, used, x)
    before = _storage_read_by_steps(used)
    used.set_timesteps(second_steps)
    reshaped = kind in ("dpm", "dpm_inverse") and second_steps != 10
    assert (_storage_read_by_steps(used) == before) is not reshaped

    fresh = PAIRS[kind][1](**CASES[kind])
    fresh.use_philox_noise(4)
    fresh.set_timesteps(second_steps)
    for i, (a, b) in enumerate(zip(_trajectory(kind, used, x), _trajectory(kind, fresh, x))):
        assert torch.equal(a, b), f"step {i}"


def _placed_tables(scheduler) -> dict:
    tables = dict(getattr(scheduler, "_tables", {}))
    if hasattr(scheduler, "_table"):
        tables["dpm"] = scheduler._table
    return tables


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_step_after_the_schedule_state_changed_refills_the_storage_steps_read(kind):
    """A step after ``alphas_cumprod`` / ``sigmas`` was edited rebuilds the tables
    (tests/test_changed_inputs.py) in place: a graph captured before the edit reads the new
    values, the same as a scheduler edited before its first step holds."""
    schedulers = []
    for steps_before_edit in (3, 0):
        scheduler = PAIRS[kind][1](**CASES[kind])
        scheduler.use_philox_noise(4)
        scheduler.set_timesteps(10)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        _trajectory(kind, scheduler, x, steps_taken=steps_before_edit)
        before = _storage_read_by_steps(scheduler)
        getattr(scheduler, "sigmas" if kind.startswith("dpm") else "alphas_cumprod").mul_(0.95)
        _trajectory(kind, scheduler, x, steps_taken=1)
        if steps_before_edit:
            assert _storage_read_by_steps(scheduler) == before
        schedulers.append(scheduler)
    edited_mid_trajectory, edited_first = (_placed_tables(s) for s in schedulers)
    assert edited_mid_trajectory.keys() == edited_first.keys()
    for key, placed in edited_mid_trajectory.items():
        # NaN: rows of an order a step cannot have (dpm_table)
        torch.testing.assert_close(placed.host, edited_first[key].host, rtol=0, atol=0, equal_nan=True)
        for copy in placed._placed.values():
            torch.testing.assert_close(copy, placed.host.to(copy.dtype), rtol=0, atol=0, equal_nan=True)


def test_ddim_rebuilds_a_used_eta_table_in_set_timesteps():
    """A graph captured over an eta > 0 step reads that eta's table: set_timesteps refills it
    too, before any eager step with that eta would."""
    scheduler = PAIRS["ddim"][1]()
    scheduler.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    _ddim_eta_step(scheduler, x, scheduler.timesteps[0], x)
    eta_table = scheduler._tables[(1.0, False)]
    placed = eta_table.on(torch.device("cpu"), torch.float32)
    scheduler.set_timesteps(7)
    assert scheduler._tables[(1.0, False)] is eta_table
    fresh = PAIRS["ddim"][1]()
    fresh.set_timesteps(7)
    fresh._build_table(1.0, False)
    assert torch.equal(placed, fresh._tables[(1.0, False)].on(torch.device("cpu"), torch.float32))


def test_ddim_keeps_the_tables_of_recently_used_and_captured_etas(monkeypatch):
    """A caller passing a new eta per generation (a server) does not make set_timesteps
    rebuild, or the scheduler hold, one table per eta it has ever seen: it keeps the
    OPTION_TABLES_KEPT most recently used, and every table a CUDA graph captured (which reads
    its memory, refilled in place). An eta whose table was dropped is rebuilt at its next step
    and steps as diffusers' does."""
    kept = ddim_module.OPTION_TABLES_KEPT
    reference, scheduler = PAIRS["ddim"][0](), PAIRS["ddim"][1]()
    for s in (reference, scheduler):
        s.set_timesteps(10)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[2]

    def step(s, eta):
        return s.step(torch.tanh(x), t, x, eta=eta, variance_noise=z).prev_sample

    with monkeypatch.context() as capturing:  # as a step inside torch.cuda.graph() sees it
        capturing.setattr(ddim_module, "stream_capturing", lambda device: True)
        step(scheduler, 0.01)
    captured = scheduler._tables[(0.01, False)]
    etas = [i / (kept + 6) for i in range(1, kept + 6)]  # within (0, 1)
    for eta in etas:
        step(scheduler, eta)
    step(scheduler, etas[0])  # used again: among the most recent now
    scheduler.set_timesteps(10)
    recent = [etas[0]] + etas[-(kept - 1):]
    assert set(scheduler._tables) == {(0.0, False), (0.01, False)} | {(eta, False) for eta in recent}
    assert scheduler._tables[(0.01, False)] is captured
    dropped = etas[1]
    assert (dropped, False) not in scheduler._tables
    torch.testing.assert_close(step(scheduler, dropped), step(reference, dropped), rtol=STEP_TOLERANCE, atol=1e-6)


def _capture(fn, *static_inputs):
    """A CUDA graph of fn(*static_inputs) after warm-up on a side stream, and its outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static_inputs)
    return graph, outputs


@requires_cuda
@pytest.mark.parametrize("backend_name", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("kind", ["ddim", "cogvideox_dpm", "ddim_inverse", "dpm", "dpm_inverse"])
def test_captured_step_replays_the_eager_trajectory(backend_name, kind):
    """One captured step, replayed with the timestep, sample, model output (and CogVideoX's
    history) copied into static buffers, gives the eager trajectory bit for bit: rows
    gathered from the timestep (DPM-Solver: from its device cursor) on the device, fresh
    in-kernel noise per replay from the device counter, DPM-Solver's history rotated in its
    buffers. After set_timesteps, the same graph replays the same trajectory again."""
    device = torch.device("cuda")
    with ops.use_backend(backend_name):
        eager, captured = (PAIRS[kind][1](**CASES[kind]) for _ in range(2))
        for s in (eager, captured):
            s.use_philox_noise(21)
            s.set_timesteps(10, device=device)
        x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
        expected = _trajectory(kind, eager, x0)

        static_x, static_m = x0.clone(), x0.clone()
        # the warm-up step before capture is an eager first step: it starts where its timestep is
        static_t = captured.timesteps[0].clone()
        static_back, static_old = torch.zeros_like(static_t), x0.clone()
        if kind.startswith("dpm"):
            captured.prepare_cuda_graph(static_x, static_m)
        if kind == "cogvideox_dpm":
            def step():
                return captured.step(static_m, static_old, static_t, static_back, static_x)
        elif kind == "ddim":
            def step():
                return (_ddim_eta_step(captured, static_m, static_t, static_x),)
        else:
            def step():
                return (captured.step(static_m, static_t, static_x, return_dict=False)[0],)
        graph, outputs = _capture(step)

        def replayed_trajectory():
            captured.set_timesteps(10, device=device)  # restarts the counter, refills tables in place
            x, old, samples = x0, None, []
            timesteps = captured.timesteps
            for i in range(len(timesteps)):
                if kind == "cogvideox_dpm" and i == 0:
                    # the first step has no history: run it eagerly, as the pipeline's first call differs
                    x, old = captured.step(torch.tanh(x), None, timesteps[0], None, x)
                    samples.append(x)
                    continue
                static_t.copy_(timesteps[i])
                static_x.copy_(x)
                static_m.copy_(torch.tanh(x))
                if kind == "cogvideox_dpm":
                    static_back.copy_(timesteps[i - 1])
                    static_old.copy_(old)
                graph.replay()
                x = outputs[0].clone()
                if kind == "cogvideox_dpm":
                    old = outputs[1].clone()
                samples.append(x)
            return samples

        for attempt in range(2):
            for i, (a, b) in enumerate(zip(replayed_trajectory(), expected)):
                assert torch.equal(a, b), f"run {attempt} step {i}"
