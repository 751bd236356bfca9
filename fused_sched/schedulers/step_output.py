"""diffusers' step output dataclasses, built without their per-call field introspection.

``BaseOutput.__post_init__`` looks up the dataclass fields and sets every value twice
through overridden ``__setattr__`` / ``__setitem__`` on each construction: on a small
latent that costs a large share of a fused step (about 5 us of a 20 us step on a 2-core
CPU). ``step_output`` produces the object that construction produces (the same instance
attributes and dict items, in field order) by setting them directly;
tests/test_step_output.py compares the two for every class returned here, so a change in
diffusers' BaseOutput shows up as a failing test, not as a subtly different object.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

_field_names: dict[type, tuple[str, ...]] = {}


def step_output(cls: type, *values):
    """``cls(*values)`` for a diffusers step-output dataclass whose first value is a tensor."""
    if torch.compiler.is_compiling() or not isinstance(values[0], torch.Tensor):
        # dynamo knows diffusers' outputs by their constructor; a dict first field takes
        # BaseOutput's other branch
        return cls(*values)
    names = _field_names.get(cls)
    if names is None:
        names = _field_names[cls] = tuple(field.name for field in dataclasses.fields(cls))
    if len(values) != len(names):
        raise TypeError(f"{cls.__name__} has fields {names}, got {len(values)} values")
    output = cls.__new__(cls)
    for name, value in zip(names, values):
        object.__setattr__(output, name, value)
        if value is not None:
            OrderedDict.__setitem__(output, name, value)
    return output
