"""What `fused-sched bench` counts as the bytes a step moves (its "% copy" column)."""

from __future__ import annotations

import pytest
import torch

from fused_sched import ops
from fused_sched.benchmark import SCHEDULERS, bytes_per_step, recorded_op_traffic

SHAPE = (2, 3, 5, 7)
NUMEL = 2 * 3 * 5 * 7

# Full tensors the op reads + writes once, counted by hand from the spec: x and m; the
# history values (DPM: h1, 3M also h2; CogVideoX DPM: the previous x0); a noise tensor (SDE,
# CogVideoX DPM); x and m again where thresholding; prev and x0 (DDIM family) or prev and
# the history value (DPM family).
TENSORS_TOUCHED = {
    "ddim": 2 + 2,
    "ddim-threshold": 2 + 2 + 2,
    "ddim-inverse": 2 + 2,
    "dpm++2m": 3 + 2,
    "dpm++3m": 4 + 2,
    "dpm++2m-threshold": 3 + 2 + 2,
    "sde-dpm++2m": 3 + 1 + 2,
    "cogvideox-ddim": 2 + 2,
    "cogvideox-dpm": 3 + 1 + 2,
}


def test_every_benchmarked_scheduler_has_a_hand_count():
    assert set(TENSORS_TOUCHED) == set(SCHEDULERS)


@pytest.mark.parametrize("kind", sorted(TENSORS_TOUCHED))
def test_each_tensor_the_op_touches_is_counted_once(kind):
    assert bytes_per_step(kind, SHAPE, torch.float32) == TENSORS_TOUCHED[kind] * NUMEL * 4


def test_each_tensor_is_counted_at_its_own_dtype():
    # bf16 x, m, history and outputs; diffusers' SDE noise is drawn in float32.
    assert bytes_per_step("sde-dpm++2m", SHAPE, torch.bfloat16) == (5 * 2 + 4) * NUMEL
    assert bytes_per_step("dpm++2m", SHAPE, torch.bfloat16) == 5 * 2 * NUMEL


def test_recording_puts_the_op_back_even_when_the_step_fails():
    original, original_plan = ops.fused_step, ops.plan_step
    with pytest.raises(ZeroDivisionError):
        with recorded_op_traffic():
            assert ops.fused_step is not original and ops.plan_step is not original_plan
            raise ZeroDivisionError
    assert ops.fused_step is original and ops.plan_step is original_plan
