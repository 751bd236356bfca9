"""diffusers' step output dataclasses, built without their per-call field introspection.

``BaseOutput.__post_init__`` looks up the dataclass fields and sets every value twice
through overridden ``__setattr__`` / ``__setitem__`` on each construction: on a small
latent that costs a large share of a fused step (about 8 us of a 35 us step on a 2-core
CPU). ``step_output`` produces the object that construction produces (the same instance
attributes and dict items, in field order) by setting them directly (the instance
``__dict__`` holds the attributes: dataclass fields are plain class attributes);
tests/test_step_output.py compares the two for every class returned here, so a change in
diffusers' BaseOutput shows up as a failing test, not as a subtly different object.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

_builders: dict[type, object] = {}


def step_output(cls: type, *values):
    """``cls(*values)`` for a diffusers step-output dataclass whose first value is a tensor."""
    if torch.compiler.is_compiling() or not isinstance(values[0], torch.Tensor):
        # dynamo knows diffusers' outputs by their constructor; a dict first field takes
        # BaseOutput's other branch
        return cls(*values)
    build = _builders.get(cls)
    if build is None:
        build = _builders[cls] = _builder(cls)
    return build(values)


def _builder(cls: type):
    """values -> the object ``cls(*values)`` makes. Diffusers' step outputs have one field or
    two; those are written out (a loop over the fields costs as much as the fields)."""
    names = tuple(field.name for field in dataclasses.fields(cls))
    new, set_item = cls.__new__, OrderedDict.__setitem__

    def check(values):
        if len(values) != len(names):
            raise TypeError(f"{cls.__name__} has fields {names}, got {len(values)} values")

    if len(names) == 1:
        (first,) = names

        def build(values):
            check(values)
            output = new(cls)
            output.__dict__[first] = values[0]
            set_item(output, first, values[0])
            return output

    elif len(names) == 2:
        first, second = names

        def build(values):
            check(values)
            output = new(cls)
            attributes = output.__dict__
            attributes[first], attributes[second] = values
            set_item(output, first, values[0])
            if values[1] is not None:
                set_item(output, second, values[1])
            return output

    else:

        def build(values):
            check(values)
            output = new(cls)
            for name, value in zip(names, values):
                output.__dict__[name] = value
                if value is not None:
                    set_item(output, name, value)
            return output

    return build
