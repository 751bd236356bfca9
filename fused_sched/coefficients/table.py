"""Assembling coefficient tables and placing them on devices."""

from __future__ import annotations

import torch

from ..ops import layout as L


def assemble(rows: int, **columns) -> torch.Tensor:
    """A float64 (rows, K) table from named columns (see ``layout.COLUMN_NAMES``).

    Each column is a scalar or a tensor of ``rows`` values; missing columns are 0, except
    the scales AS and PS, which are 1. ``am`` is split (layout.py's AL): AM keeps it rounded
    toward zero to float32 and AL the rest, exactly (a float64 minus a float32 near it is a
    float64 number); a float64 step adds the two back. Toward zero, so that AL has AM's sign:
    an infinite model output then gives AM*m and AL*m infinities of one sign, where
    diffusers' x - sigma*m is infinite, not inf - inf = NaN.

    Where some row needs a low part, a row whose AM is a float32 number gets one too: AM
    one float32 step toward zero and AL that step, exactly. A zero AL would make 0*inf = NaN
    of an infinite model output in that row (DDIM's 1000-step schedule has one, t = 18),
    and only a column that is 0 in every row is left out of the sums (layout.absent_terms).
    A table where no row needs one keeps AL = 0, left out (sample prediction, flow sigmas).
    """
    table = torch.zeros(rows, L.NUM_COEFFICIENTS, dtype=torch.float64)
    table[:, L.SCALE_COLUMNS] = 1.0
    for name, value in columns.items():
        table[:, L.COLUMN_NAMES.index(name)] = torch.as_tensor(value, dtype=torch.float64)
    am = table[:, L.AM]
    high = am.to(torch.float32)
    nearest = high.double()
    finite = torch.isfinite(high)
    inexact = finite & (nearest != am)
    # inexact.any() stays a tensor: a step may build a table while torch.compile traces it.
    step_down = (nearest.abs() > am.abs()) | (finite & ~inexact & (am != 0) & inexact.any())
    high = torch.where(step_down, torch.nextafter(high, torch.zeros_like(high)), high).double()
    table[:, L.AL] = torch.where(finite, am - high, 0.0)
    table[:, L.AM] = torch.where(finite, high, am)
    return table


def fold_history_value(table: torch.Tensor) -> torch.Tensor:
    """The table with the current step's history value d = PS*(PX*x + P0*x0 + PM*m) folded
    into the output's own columns (OX += O0*PS*PX, OC += O0*PS*P0, OM += O0*PS*PM, O0 = 0),
    in float64.

    For solvers whose d is eps recomputed from x (dpmsolver, sde-dpmsolver), OX and O0*PX can
    be ~1e3 and nearly opposite where alpha is small; folded here, the step never forms the
    two large terms in fp32 (layout.py). d itself is unchanged: the history still stores it.
    """
    folded = table.clone()
    o0 = table[:, L.O0] * table[:, L.PS]
    folded[:, L.OX] += o0 * table[:, L.PX]
    folded[:, L.OC] += o0 * table[:, L.P0]
    folded[:, L.OM] += o0 * table[:, L.PM]
    folded[:, L.O0] = 0.0
    return folded


def difference_weights(w0, w1, w2):
    """The columns (O0, O1, O2) of the combination w0*d + w1*h1 + w2*h2, which the step
    forms as O0*d + O1*(d - h1) + O2*(h1 - h2) (layout.py)."""
    return w0 + w1 + w2, -(w1 + w2), -w2


def x0_conversion(prediction_type: str, alpha, sigma):
    """Columns ax, am, as with x0 = as*(ax*x + am*m), for x = alpha*x0 + sigma*eps."""
    one = torch.ones_like(alpha)
    if prediction_type == "epsilon":
        return dict(ax=one, am=-sigma, **{"as": 1.0 / alpha})
    if prediction_type == "sample":
        return dict(ax=torch.zeros_like(alpha), am=one)
    if prediction_type == "v_prediction":
        return dict(ax=alpha, am=-sigma)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported here")


def eps_conversion(prediction_type: str, alpha, sigma):
    """(ex, em) with eps = ex*x + em*m, from the unclipped model output."""
    if prediction_type == "epsilon":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    if prediction_type == "sample":
        return 1.0 / sigma, -alpha / sigma
    if prediction_type == "v_prediction":
        return sigma, alpha
    raise ValueError(f"prediction_type={prediction_type!r} is not supported here")


def normalized_device(device: torch.device) -> torch.device:
    """'cuda' and 'cuda:0' name the same memory; tensors report the indexed form."""
    if device.type != "cpu" and device.index is None:
        return torch.empty(0, device=device).device
    return device


def constant_columns(table: torch.Tensor) -> L.ConstantColumns:
    """{column: 0.0 or 1.0} for columns holding that value in every row: the op's
    ``constant_columns`` hint, true for every row of this table whatever a step selects.
    Both values are exact in every storage dtype, so the hint holds for every placement.

    Rows whose output columns are all NaN are placeholders no step selects (``dpm_table``:
    an order the step cannot have) and are not consulted: counted, they made every output
    term of a DPM table present, and 0*inf turned an infinite model output into NaN where
    diffusers' formula has no such term."""
    known = {}
    table = table[~torch.isnan(table[:, list(L.OUTPUT_COLUMNS)]).all(dim=1)]
    if table.shape[0] == 0:
        return L.ConstantColumns()
    for column in range(table.shape[1]):
        for value in (0.0, 1.0):
            if bool((table[:, column] == value).all()):
                known[column] = value
    return L.ConstantColumns(known)


class PlacedTable:
    """A float64 host table with lazily made copies per (device, dtype).

    The float32 copy for the schedule's device is made in ``set_timesteps``; any other
    placement is made once, on first use, and reused for the rest of the schedule. Single
    rows are handed out as the same view object each time (``row``): a step then pays no
    slicing, and the reference op recognises the row it has already split into columns.
    """

    def __init__(self, table: torch.Tensor, device=None, known: L.ConstantColumns | None = None):
        """``known``: the constant columns when the caller knows them without reading the
        table (a table built inside a step must not be read on the host)."""
        self.host = table
        self.constant_columns = constant_columns(table) if known is None else known
        self._placed: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._rows: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}
        # Set by the owner when ``known`` came from another table rather than from reading
        # this one (a table built while torch.compile traces): its refills then pass the
        # same hint, so that guards a compiled step took on the columns still hold.
        self.hint_inherited = False
        if device is not None:
            self.on(torch.device(device), torch.float32)

    def refill(self, table: torch.Tensor, device=None, known: L.ConstantColumns | None = None) -> bool:
        """Take ``table``'s values into this table's placements, in place, when it has the same
        shape and dtype: a CUDA graph captured over steps reads these tensors' memory, and
        stays valid across ``set_timesteps`` calls that rebuild the same tables. False, and
        nothing changed, otherwise (the caller then makes a new PlacedTable)."""
        if table.shape != self.host.shape or table.dtype != self.host.dtype:
            return False
        self.host = table
        self.constant_columns = constant_columns(table) if known is None else known
        for placed in {id(t): t for t in self._placed.values()}.values():
            placed.copy_(table.to(dtype=placed.dtype))
        if device is not None:
            self.on(torch.device(device), torch.float32)
        return True

    def on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        placed = self._placed.get((device, dtype))  # the hot path: a tensor's own device
        if placed is None:
            key = (normalized_device(device), dtype)
            placed = self._placed.get(key)
            if placed is None:
                # Kept for later steps, which may track gradients: never an inference tensor,
                # even when the first step runs under torch.inference_mode().
                with torch.inference_mode(False):
                    placed = self.host.to(dtype=dtype).to(device).contiguous()
                self._placed[key] = placed
            self._placed[(device, dtype)] = placed
        return placed

    def row(self, index: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Row ``index`` as a (1, K) view of the placement on (device, dtype). The views alias
        the placements, so a refill is seen through them; ``index`` must be in range."""
        key = (device, dtype, index)
        view = self._rows.get(key)
        if view is None:
            with torch.inference_mode(False):  # see on()
                view = self._rows[key] = self.on(device, dtype)[index : index + 1]
        return view

    def __len__(self) -> int:
        return self.host.shape[0]
