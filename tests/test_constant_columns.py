"""The constant-columns hint: schedulers tell the op which coefficients are 0 or 1 in every
row of a table, and every backend leaves the known-zero terms out of its sums. The hint must
change no bit of a finite result, must hold for every row a step can select, must never
make an output alias an input or another output, and must keep inf, NaN and -0.0 out of
the results as the reference (and diffusers, which has no such terms) does."""

from __future__ import annotations

import pytest
import torch

from conftest import backend_device, require_backend
from drivers import make_pair, run_trajectory
from fused_sched import ops
from fused_sched.coefficients import table
from fused_sched.coefficients.table import constant_columns
from fused_sched.ops import layout as L

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
    if not hint:  # every table then knows no constant column
        monkeypatch.setattr(table, "constant_columns", lambda rows: L.ConstantColumns())
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
        selectable = placed.host[~placed.host[:, list(L.OUTPUT_COLUMNS)].isnan().all(dim=1)]
        for column, value in placed.constant_columns.items():
            assert bool((selectable[:, column] == value).all()), (L.COLUMN_NAMES[column], value)
        # the hint is not empty where the structure is known: every table has P0 or AS fixed
        if len(placed):
            assert placed.constant_columns


def test_constant_columns_of_a_crafted_table():
    table = torch.zeros(3, L.NUM_COEFFICIENTS, dtype=torch.float64)
    for column, values in {L.AX: (1.0, 1.0, 2.0), L.AM: (0.5, 0.7, 0.5), L.PX: (0.0, -0.0, 1.0), L.P0: (1.0, 1.0, 1.0),
                           L.OX: (0.0, 1.0, 0.0), L.O0: (2.0, 3.0, 2.0), L.O1: (1.0, 0.0, 1.0), L.AS: (1.0, 2.0, 1.0),
                           L.O2: (float("nan"),) * 3}.items():
        table[:, column] = torch.tensor(values, dtype=torch.float64)
    # A placeholder row (dpm_table: an order the step cannot have) is never selected: its
    # other columns (AX 2, PX 1 above) are not consulted.
    table[2, list(L.OUTPUT_COLUMNS)] = float("nan")
    known = constant_columns(table)
    varying = {L.AM, L.OX, L.O0, L.O1, L.AS, L.O2}  # O2: NaN is no known value
    assert dict(known) == {L.AX: 1.0, L.P0: 1.0,
                           **{c: 0.0 for c in range(L.NUM_COEFFICIENTS) if c not in varying | {L.AX, L.P0}}}
    assert len(constant_columns(table[:0])) == 0  # an empty table promises nothing
    assert len(constant_columns(table[2:])) == 0  # nor one of placeholders alone


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


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bit patterns, the sign of zero included; any NaN matches any NaN (payloads are
    not part of the contract)."""
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


# (name, columns known to be 0): one term at a time, and the structures schedulers make
# (sample prediction: x0 = m; DDIM with clipping: prev from x0 and m alone).
ABSENT_CASES = [(L.COLUMN_NAMES[c], (c,)) for c in L.TERM_COLUMNS] + [
    ("sample-prediction", (L.AX, L.PX, L.PM, L.O1, L.O2)),
    ("ddim-clip", (L.OX, L.PX, L.P0, L.PM, L.O0, L.O1, L.O2)),
]


@pytest.mark.parametrize("backend_name", ["cpu", "cuda-emulator", "cuda", "triton"])
@pytest.mark.parametrize("clip", L.CLIP_MODES)
def test_every_backend_leaves_absent_terms_out_like_the_reference(backend_name, clip):
    """A term whose column is known to be 0 is left out of its sum by every backend, as the
    reference leaves it out and diffusers has no such term: an inf or NaN in its operand
    stays out of the result (0*inf would be NaN; with thresholding, NaN for the whole
    row), and -0.0 sums stay -0.0. Bit for bit against the reference."""
    require_backend(backend_name)
    device = backend_device(backend_name)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 2.5, -1.5, 1e-3])
    x = torch.stack([special, special.roll(3)]).to(device)
    m = torch.stack([special.roll(1), -special.roll(5)]).to(device)
    h1, h2, z = (torch.stack([special.roll(k), special.roll(k + 1)]).to(device) for k in (2, 4, 6))
    base = torch.tensor([[1.0, -0.5, 0.25, 1.0, -0.75, 0.5, 1.5, -0.25, 0.125, 0.375, 0.625, 2.0, 0.875, 1.25, 3e-8,
                          0.5, -0.375, 1.75]], device=device)
    for name, columns in ABSENT_CASES:
        rows = base.clone()
        rows[:, list(columns)] = 0.0
        known = L.ConstantColumns({c: 0.0 for c in columns})
        args = dict(history=(h1, h2), noise=z, clip=clip, clip_range=1.0, threshold_ratio=0.5, threshold_max=4.0,
                    history_dtype=torch.float32, x0_dtype=torch.float32, constant_columns=known)
        want = ops.fused_step(x, m, rows, backend="torch", **args)
        got = ops.fused_step(x, m, rows, backend=backend_name, **args)
        for output, g, w in zip(("prev", "d", "x0"), got, want):
            assert _same_bits(g, w), (name, output, g, w)
