"""How a step finds its coefficient row without reading device memory: elements of
``scheduler.timesteps`` are recognised by address, everything else falls back to a
device-side gather, and the row handed to the op is one reused view of the placed table."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from drivers import PAIRS, TRAJECTORY_TOLERANCE, assert_close_to_diffusers
from fused_sched.coefficients.table import PlacedTable
from fused_sched.ops import layout as L


def _scheduled(kind="ddim", n=10):
    scheduler = PAIRS[kind][1]()
    scheduler.set_timesteps(n)
    return scheduler


def test_schedule_elements_resolve_to_their_values():
    scheduler = _scheduled()
    host = scheduler.timesteps.tolist()
    assert [scheduler._host_timestep(t) for t in scheduler.timesteps] == host
    assert scheduler._host_timestep(scheduler.timesteps[3]) == host[3]
    assert scheduler._host_timestep(scheduler.timesteps[2:][1]) == host[3]  # a slice's element
    assert scheduler._host_timestep(scheduler.timesteps[::2][2]) == host[4]  # a strided view's element


@pytest.mark.parametrize("other", [
    lambda ts: ts.clone()[3],  # same values, other memory
    lambda ts: ts[3].to(torch.int32),  # other dtype
    lambda ts: ts[3:5],  # not 0-dim
    lambda ts: torch.tensor(int(ts[3])),
])
def test_other_tensors_are_not_taken_for_schedule_elements(other):
    scheduler = _scheduled()
    assert scheduler._host_timestep(other(scheduler.timesteps)) is None


def test_a_previous_schedules_element_is_not_taken_for_the_new_one():
    scheduler = _scheduled()
    old = scheduler.timesteps[3]  # keeps the old schedule's memory alive
    scheduler.set_timesteps(25)
    assert scheduler._host_timestep(old) is None
    assert scheduler._host_timestep(scheduler.timesteps[3]) == scheduler.timesteps.tolist()[3]


def test_an_element_of_a_larger_tensor_outside_the_schedule_is_not_matched():
    scheduler = _scheduled()
    full = torch.arange(30, dtype=scheduler.timesteps.dtype).flip(0)
    scheduler.timesteps = full[5:15]  # pipelines slice schedules (img2img strength)
    scheduler._remember_schedule()
    assert scheduler._host_timestep(full[4]) is None and scheduler._host_timestep(full[15]) is None
    assert scheduler._host_timestep(full[5]) == int(full[5])


def test_an_expanded_schedule_matches_nothing():
    scheduler = _scheduled()
    scheduler.timesteps = torch.tensor([7]).expand(4)
    scheduler._remember_schedule()
    assert scheduler._host_timestep(scheduler.timesteps[1]) is None


def test_steps_reuse_one_row_view_that_sees_refills():
    table = torch.arange(2 * L.NUM_COEFFICIENTS, dtype=torch.float64).reshape(2, L.NUM_COEFFICIENTS)
    placed = PlacedTable(table, "cpu")
    row = placed.row(1, torch.device("cpu"), torch.float32)
    assert row is placed.row(1, torch.device("cpu"), torch.float32)
    assert row.shape == (1, L.NUM_COEFFICIENTS) and torch.equal(row, table[1:2].float())
    assert placed.refill(table + 100)
    assert torch.equal(row, table[1:2].float() + 100)


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "cogvideox_ddim"])
def test_ddim_family_step_passes_the_cached_row(kind, monkeypatch):
    """The op receives the very row object PlacedTable.row hands out for that timestep (the
    step runs its kept plan, ``StepPlan.run``, from the second step on)."""
    from fused_sched import ops

    scheduler = _scheduled(kind)
    seen = []
    original = ops.StepPlan.run
    monkeypatch.setattr(ops.StepPlan, "run", lambda plan, *a, **k: seen.append(a[2]) or original(plan, *a, **k))
    x = torch.randn(1, 4, 8, 8)
    for _ in range(2):
        scheduler.step(x, scheduler.timesteps[4], x)
    t = scheduler.timesteps.tolist()[4]
    placed = next(iter(scheduler._tables.values()))
    assert seen[0] is seen[1] is placed.row(t, x.device, torch.float32)


@pytest.mark.parametrize("kind", ["dpm", "dpm_inverse"])
@pytest.mark.parametrize("form", ["clone", "one-element 1-D", "int32", "bfloat16", "float16", "absent value",
                                  "python float", "python float within float32 rounding", "0-d numpy array",
                                  "numpy float32"])
def test_dpm_first_timestep_given_as_another_value_is_looked_up_like_diffusers(kind, form):
    """A first timestep that is not an element of scheduler.timesteps is found by value
    (second match when repeated, the last step when absent), in both DPM classes, compared
    in the dtype diffusers' ``timesteps == timestep`` promotes to: at a timestep bfloat16
    cannot hold (749 is 748 there) the bfloat16 value still matches its own step, and a
    Python float matches within float32 rounding (compared exactly, both started at the
    last step)."""
    results = []
    for cls in PAIRS[kind]:
        scheduler = cls()
        scheduler.set_timesteps(8)
        t = next(t for t in scheduler.timesteps if float(t.to(torch.bfloat16)) != int(t))
        t = {"clone": lambda: t.clone(), "one-element 1-D": lambda: t.reshape(1).clone(),
             "int32": lambda: t.to(torch.int32), "bfloat16": lambda: t.to(torch.bfloat16),
             "float16": lambda: t.to(torch.float16), "absent value": lambda: t + 1, "python float": lambda: float(t),
             "python float within float32 rounding": lambda: float(t) + 1e-5,
             "0-d numpy array": lambda: np.array(int(t)), "numpy float32": lambda: np.float32(t)}[form]()
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        prev = scheduler.step(0.1 * x, t, x).prev_sample
        results.append((scheduler.step_index, prev))
    (index_ref, prev_ref), (index_fused, prev_fused) = results
    assert index_fused == index_ref
    assert_close_to_diffusers(prev_fused, prev_ref)


@pytest.mark.parametrize("form", ["element", "python int"])
def test_dpm_inverse_repeated_first_timestep_starts_where_diffusers_does(form):
    """Exponential sigmas give the inverse schedule timesteps [0, 0, ...] (np.unique of the
    fractional timesteps, then the int cast); diffusers starts at the second 0 and, with a
    sigma to spare, finishes finite. The inverse class follows it whether given the element
    scheduler.timesteps[0] or its value (the forward class, where diffusers would end in
    IndexError, starts at the element's own position: README, Where diffusers breaks)."""
    results = []
    for cls in PAIRS["dpm_inverse"]:
        scheduler = cls(use_exponential_sigmas=True)
        scheduler.set_timesteps(26)
        assert scheduler.timesteps[:2].tolist() == [0, 0]
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(scheduler.timesteps[:-1]):  # diffusers' trajectory is one step short
            t = t if form == "element" or i else int(t)
            x = scheduler.step(0.6 * torch.tanh(x), t, x).prev_sample
            if i == 0:
                assert scheduler.step_index == 2
        results.append(x)
    assert torch.isfinite(results[0]).all()
    assert_close_to_diffusers(results[1], results[0], TRAJECTORY_TOLERANCE)


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("copied", [False, True], ids=["", "then-copied"])
@pytest.mark.parametrize("mode", ["grad", "inference"])
def test_a_timestep_edited_in_place_is_read_again(kind, copied, mode):
    """Elements of scheduler.timesteps are resolved by position against host values read at
    set_timesteps; an in-place edit of the schedule afterwards must not leave them stale,
    nor in a copy made after an edit (it resolves against its own tensor's values), nor
    where it all runs under torch.inference_mode() (whose tensors keep no version counter)."""
    with torch.inference_mode(mode == "inference"):
        _edit_timesteps_in_place_and_step(kind, copied)


def _edit_timesteps_in_place_and_step(kind, copied):
    results = []
    for cls in PAIRS[kind]:
        scheduler = cls()
        scheduler.set_timesteps(5)
        if copied:
            scheduler.timesteps[0] += 5 if int(scheduler.timesteps[0]) < 500 else -5  # stays in range
            scheduler = copy.deepcopy(scheduler)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        m = 0.1 * x
        ts = scheduler.timesteps
        if kind == "cogvideox_dpm":
            first = scheduler.step(m, None, ts[0], None, x, generator=torch.Generator().manual_seed(1))[0]
            ts[1] = ts[1] - 17
            prev = scheduler.step(m, m, ts[1], ts[0], x, generator=torch.Generator().manual_seed(2))[0]
        else:
            first = scheduler.step(m, ts[0], x).prev_sample
            ts[1] = ts[1] - 17
            prev = scheduler.step(m, ts[1], x).prev_sample
        results.append((first, prev))
    for fused, reference in zip(results[1], results[0]):
        assert_close_to_diffusers(fused, reference)


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "cogvideox_ddim"])
@pytest.mark.parametrize("form", ["python int", "numpy int64", "0-d numpy array"])
def test_ddim_family_timesteps_given_as_host_integers_step_like_diffusers(kind, form):
    results = []
    for cls in PAIRS[kind]:
        scheduler = cls()
        scheduler.set_timesteps(8)
        t = int(scheduler.timesteps[3])
        t = {"python int": t, "numpy int64": np.int64(t), "0-d numpy array": np.array(t)}[form]
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        results.append(scheduler.step(0.1 * x, t, x).prev_sample)
    assert_close_to_diffusers(results[1], results[0])


@pytest.mark.parametrize("kind, argument", [
    ("ddim", "timestep"), ("ddim_inverse", "timestep"), ("cogvideox_ddim", "timestep"),
    ("cogvideox_dpm", "timestep"), ("cogvideox_dpm", "timestep_back"),
])
def test_ddim_family_refuses_floating_point_timestep_tensors(kind, argument):
    # diffusers indexes its tables with the timestep and fails on a float tensor (IndexError);
    # a cast would truncate 700.5 to 700 silently, so the fused class refuses it by name.
    scheduler = PAIRS[kind][1]()
    scheduler.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, back = scheduler.timesteps[3], scheduler.timesteps[2]
    with pytest.raises(TypeError, match=f"{argument} must be an integer tensor"):
        if kind == "cogvideox_dpm":
            t, back = (t.double() + 0.5, back) if argument == "timestep" else (t, back.float())
            scheduler.step(0.1 * x, 0.1 * x, t, back, x)
        else:
            scheduler.step(0.1 * x, t.float() + 0.5, x)


@pytest.mark.parametrize("timestep", [500, torch.tensor(999)], ids=["int", "tensor"])
def test_index_for_timestep_before_set_timesteps_searches_the_training_timesteps(timestep):
    reference, fused = (cls() for cls in PAIRS["dpm"])
    assert fused.index_for_timestep(timestep) == reference.index_for_timestep(timestep) >= 0
