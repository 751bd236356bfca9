"""step_output builds exactly the object diffusers' own output constructor builds."""

from __future__ import annotations

import pickle

import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddim_cogvideox import DDIMSchedulerOutput as CogVideoXOutput
from diffusers.schedulers.scheduling_ddim_inverse import DDIMSchedulerOutput as InverseOutput
from diffusers.schedulers.scheduling_dpm_cogvideox import DDIMSchedulerOutput as CogVideoXDPMOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from torch.utils import _pytree as pytree

from fused_sched.schedulers.step_output import step_output

# Every output class a fused step returns, with the value patterns it is built with.
CASES = [
    (DDIMSchedulerOutput, 2), (InverseOutput, 2), (CogVideoXOutput, 2), (CogVideoXDPMOutput, 2), (SchedulerOutput, 1),
]


def _values(count: int, none_after_first: bool):
    first = torch.randn(2, 3)
    rest = [None if none_after_first else torch.randn(2, 3) for _ in range(count - 1)]
    return (first, *rest)


@pytest.mark.parametrize("none_after_first", [False, True])
@pytest.mark.parametrize("cls,count", CASES)
def test_same_object_as_the_constructor(cls, count, none_after_first):
    values = _values(count, none_after_first)
    built, expected = step_output(cls, *values), cls(*values)
    assert type(built) is cls
    # instance attributes and dict items, by identity and in order: all the state there is
    assert list(vars(built)) == list(vars(expected))
    assert all(vars(built)[k] is vars(expected)[k] for k in vars(expected))
    assert list(built.items()) == [(k, v) for k, v in expected.items()]
    assert all(a is b for a, b in zip(built.to_tuple(), expected.to_tuple()))
    assert built[0] is expected[0] and built.prev_sample is values[0]
    # what other code does with outputs: pytree flattening (DDP, compile) and pickling
    assert pytree.tree_flatten(built)[1] == pytree.tree_flatten(expected)[1]
    restored = pickle.loads(pickle.dumps(built))
    assert type(restored) is cls and list(restored.keys()) == list(expected.keys())
    assert torch.equal(restored.prev_sample, values[0])


def test_later_assignment_behaves_as_on_a_constructed_output():
    values = _values(2, none_after_first=True)
    built, expected = step_output(DDIMSchedulerOutput, *values), DDIMSchedulerOutput(*values)
    late = torch.ones(1)
    for output in (built, expected):
        output.prev_sample = late  # a field that is a key: updates the item too
    assert built["prev_sample"] is late and expected["prev_sample"] is late


def test_wrong_number_of_values_is_refused():
    with pytest.raises(TypeError, match="has fields"):
        step_output(DDIMSchedulerOutput, torch.zeros(1))
