"""The constant-columns hint: schedulers tell the op which coefficients are 0 or 1 in every
row of a table, and the torch backend skips those terms. The hint must change no bit of any
result, must hold for every row a step can select, and must never make an output alias an
input or another output."""

from __future__ import annotations

import pytest
import torch

from drivers import make_pair, run_trajectory
from fused_sched import ops
from fused_sched.coefficients.table import constant_columns
from fused_sched.ops import layout as L
from fused_sched.ops import torch_backend

# (kind, config): every scheduler, with prediction types and options that change which
# columns are constant (sample prediction: x0 = m exactly; clipping; SDE noise; 3rd order).
CASES = [
    ("ddim", {}),
    ("ddim", {"prediction_type": "sample"}),
    ("ddim", {"prediction_type": "v_prediction", "clip_sample": True}),
    ("ddim", {"thresholding": True}),
    ("ddim_inverse", {}),
    ("ddim_inverse", {"prediction_type": "sample", "set_alpha_to_one": False}),
    ("dpm", {}),
    ("dpm", {"solver_order": 3, "prediction_type": "v_prediction"}),
    ("dpm", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpm", {"algorithm_type": "dpmsolver", "prediction_type": "sample", "final_sigmas_type": "sigma_min"}),
    ("dpm_inverse", {}),
    ("cogvideox_ddim", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                        "timestep_spacing": "trailing"}),
    ("cogvideox_dpm", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                       "timestep_spacing": "trailing"}),
]


def _ids(case):
    kind, config = case
    return kind + "".join(f"-{k}={v}" for k, v in config.items())


def _trajectory(kind, config, monkeypatch, hint: bool):
    monkeypatch.setattr(torch_backend.TorchBackend, "uses_constant_columns", hint)
    with ops.use_backend("torch"):
        _, fused = make_pair(kind, config)
        outputs, error = run_trajectory(kind, fused, config, 10)
    assert error is None, error
    return outputs


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_hint_changes_no_bit_of_a_trajectory(case, monkeypatch):
    kind, config = case
    with_hint = _trajectory(kind, config, monkeypatch, hint=True)
    without = _trajectory(kind, config, monkeypatch, hint=False)
    assert len(with_hint) == len(without) == 10
    for (prev, x0), (prev_ref, x0_ref) in zip(with_hint, without):
        assert torch.equal(prev, prev_ref)
        assert (x0 is None) == (x0_ref is None)
        if x0 is not None:
            assert torch.equal(x0, x0_ref)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_hint_holds_for_every_row_of_every_table(case):
    kind, config = case
    _, fused = make_pair(kind, config)
    fused.set_timesteps(10)
    tables = list(fused._tables.values()) if hasattr(fused, "_tables") else [fused._table]
    assert tables
    for placed in tables:
        for column, value in placed.constant_columns.items():
            assert bool((placed.host[:, column] == value).all()), (L.COLUMN_NAMES[column], value)
        # the hint is not empty where the structure is known: every table has P0 or AS fixed
        if len(placed):
            assert placed.constant_columns


def test_constant_columns_of_a_crafted_table():
    table = torch.tensor([
        # ax   am   px    p0   pm   ox   o0   om   o1   o2            on   as
        [1.0, 0.5, 0.0, 1.0, -0.0, 0.0, 2.0, 0.0, 1.0, float("nan"), 0.0, 1.0],
        [1.0, 0.7, -0.0, 1.0, 0.0, 1.0, 3.0, 0.0, 0.0, float("nan"), 0.0, 2.0],
    ], dtype=torch.float64)
    known = constant_columns(table)
    assert dict(known) == {L.AX: 1.0, L.PX: 0.0, L.P0: 1.0, L.PM: 0.0, L.OM: 0.0, L.ON: 0.0}
    assert len(constant_columns(table[:0])) == 0  # an empty table promises nothing


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_outputs_never_alias_inputs_or_each_other(prediction_type):
    """With sample prediction x0 = m and d = x0 exactly: skipping the identity terms must
    still hand back fresh tensors."""
    x, m, h = (torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(i)) for i in range(3))
    rows = torch.zeros(1, L.NUM_COEFFICIENTS)
    rows[0, L.AM] = rows[0, L.P0] = rows[0, L.AS] = rows[0, L.O0] = 1.0
    if prediction_type == "epsilon":
        rows[0, L.AX], rows[0, L.AM], rows[0, L.AS] = 1.0, -0.5, 2.0
    known = constant_columns(rows.double())
    outputs = ops.fused_step(x, m, rows, history=(h,), history_dtype=torch.float32, x0_dtype=torch.float32,
                             constant_columns=known, backend="torch")
    plain = ops.fused_step(x, m, rows, history=(h,), history_dtype=torch.float32, x0_dtype=torch.float32,
                           backend="torch")
    pointers = {t.data_ptr() for t in (x, m, h)}
    for got, want in zip(outputs, plain):
        assert torch.equal(got, want)
        assert got.data_ptr() not in pointers
        pointers.add(got.data_ptr())


def test_a_hint_is_checked():
    x = torch.randn(1, 8)
    rows = torch.zeros(1, L.NUM_COEFFICIENTS)
    with pytest.raises(ValueError, match=f"constant_columns has key {L.NUM_COEFFICIENTS}"):
        ops.fused_step(x, x, rows, constant_columns={L.NUM_COEFFICIENTS: 0.0})
    with pytest.raises(TypeError, match=r"constant_columns\[3\]"):
        ops.fused_step(x, x, rows, constant_columns={3: "one"})
    with pytest.raises(TypeError, match="constant_columns must be a mapping"):
        ops.fused_step(x, x, rows, constant_columns=[(3, 1.0)])
