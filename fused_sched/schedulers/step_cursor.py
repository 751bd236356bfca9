"""A multistep scheduler's position kept on the device, for steps traced by torch.compile.

An eager DPM-Solver step picks its coefficient row from Python ints (the step index and
``lower_order_nums``). Traced, every such int becomes a constant of the graph, so each step
would recompile, and a CUDA graph would replay the first step's row forever. A traced step
instead reads both counters from device tensors, looks its row up in a device table
(step, lower_order_nums) -> row, and advances the counters in place: the graph is the same
at every step and reads no value on the host.
"""

from __future__ import annotations

from typing import Callable

import torch


class DeviceStepCursor:
    def __init__(self, num_steps: int, solver_order: int, row_for: Callable[[int, int], int], device):
        """``row_for(step, lower_order_nums)`` is the table row an eager step would use."""
        self.num_steps, self.solver_order = num_steps, solver_order
        self.row_lookup = self._lookup(row_for).to(device)
        self.step = torch.zeros((), dtype=torch.int64, device=self.row_lookup.device)
        self.lower = torch.zeros_like(self.step)

    def _lookup(self, row_for: Callable[[int, int], int]) -> torch.Tensor:
        return torch.tensor(
            [[row_for(i, lower) for lower in range(self.solver_order + 1)] for i in range(self.num_steps)],
            dtype=torch.int64,
        )

    def relabel(self, row_for: Callable[[int, int], int]) -> None:
        """New rows for the same steps (the options deciding each step's order changed), in
        place; the position is kept."""
        self.row_lookup.copy_(self._lookup(row_for))

    def take(self, other: "DeviceStepCursor") -> bool:
        """Become ``other`` (a new schedule's cursor) in place, keeping this cursor's tensors,
        which a captured CUDA graph reads; False, and nothing changed, where the lookup's
        shape or device differ."""
        same = (self.row_lookup.shape == other.row_lookup.shape and self.row_lookup.device == other.row_lookup.device)
        if same:
            self.num_steps, self.solver_order = other.num_steps, other.solver_order
            self.row_lookup.copy_(other.row_lookup)
            self.step.zero_()
            self.lower.zero_()
        return same

    def rows(self, table: torch.Tensor) -> torch.Tensor:
        """(1, K) row of ``table`` for the current position. Past the last step the index
        is out of range and the gather fails (there is no host check without a sync)."""
        position = (self.step * (self.solver_order + 1) + self.lower).reshape(1)
        # index_select, not indexing with 0-d tensors, which dynamo would read as Python ints
        return table.index_select(0, self.row_lookup.reshape(-1).index_select(0, position))

    def advance(self) -> None:
        self.step.add_(1)
        self.lower.add_(1).clamp_(max=self.solver_order)

    def start_at(self, step: int | torch.Tensor, lower_order_nums: int) -> None:
        """``step``: an int, or a 0-d tensor on the cursor's device (``index_of``)."""
        if isinstance(step, torch.Tensor):
            self.step.copy_(step)
        else:
            self.step.fill_(step)
        self.lower.fill_(lower_order_nums)

    @staticmethod
    def index_of(schedule: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """diffusers' ``index_for_timestep`` on the device: the second match when the value
        repeats, the last step when it is absent."""
        matches = schedule == timestep.to(schedule.device)
        count = matches.sum()
        first = matches.to(torch.int8).argmax()
        second = (matches.cumsum(0) == 2).to(torch.int8).argmax()
        last = torch.full_like(count, schedule.shape[0] - 1)
        return torch.where(count == 0, last, torch.where(count > 1, second, first))

    def start_unless_moved(self, step: int | torch.Tensor) -> None:
        """Move a cursor still at its start (step 0, no history: no step has run since it was
        put there) to ``step``; one that has moved, by steps a CUDA graph replayed where the
        host does not see them, stays (diffusers ignores a start once a step has run)."""
        unmoved = (self.step == 0) & (self.lower == 0)
        self.step.copy_(torch.where(unmoved, torch.as_tensor(step, device=self.step.device), self.step))

    def read(self) -> tuple[int, int]:
        """(step index, lower_order_nums) on the host: one sync, outside any step."""
        return int(self.step), int(self.lower)
