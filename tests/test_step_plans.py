"""fused_step checks a call signature once and reuses the decision (``ops._plans``): these
tests prove the reuse happens, and that no argument the checks read can be changed without
the call being checked again."""

from __future__ import annotations

import pytest
import torch

from fused_sched import ops
from fused_sched.ops import layout as L

X = torch.randn(2, 3, 4, 4)
M = torch.randn(2, 3, 4, 4)
ROWS = torch.randn(1, L.NUM_COEFFICIENTS)
KNOWN = ops.ConstantColumns({L.ON: 0.0})


@pytest.fixture
def checks(monkeypatch):
    """Counts the full argument checks; starts from an empty plan cache."""
    monkeypatch.setattr(ops, "_plans", ops._PlanCache())
    calls = []
    original = ops._plan

    def counted(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(ops, "_plan", counted)
    return calls


def _step(**kwargs):
    arguments = dict(x0_dtype=torch.float32, constant_columns=KNOWN, backend="torch")
    arguments.update(kwargs)
    sample = arguments.pop("sample", X)
    model_output = arguments.pop("model_output", M)
    rows = arguments.pop("rows", ROWS)
    return ops.fused_step(sample, model_output, rows, **arguments)


def test_a_repeated_signature_is_checked_once_and_gives_the_same_results(checks):
    first = _step()
    other_values = _step(sample=torch.randn(2, 3, 4, 4), model_output=torch.randn(2, 3, 4, 4))
    again = _step()
    assert len(checks) == 1
    for got, want in zip(again, first):
        assert (got is None and want is None) or torch.equal(got, want)
    assert not torch.equal(other_values.prev_sample, first.prev_sample)


@pytest.mark.parametrize("change, error, message", [
    (dict(model_output=torch.randn(2, 3, 4, 5)), ValueError, "model_output has shape"),
    (dict(model_output=torch.randn(2, 3, 4, 4).to(torch.int32)), TypeError, "model_output has dtype"),
    (dict(model_output=torch.randn(2, 3, 4, 4, device="meta")), ValueError, "model_output is on meta"),
    (dict(history=(torch.randn(2, 3, 4, 5),)), ValueError, r"history\[0\] has shape"),
    (dict(noise=torch.randn(1, 3, 4, 4)), ValueError, "noise has shape"),
    (dict(rows=torch.randn(3, L.NUM_COEFFICIENTS)), ValueError, "coefficients has shape"),
    (dict(rows=torch.randn(1, L.NUM_COEFFICIENTS, dtype=torch.float64)), TypeError, "coefficients must be"),
    (dict(clip="clamp", clip_range=-1.0), ValueError, "clip_range must be > 0"),
    (dict(clip="threshold", threshold_ratio=1.5), ValueError, "threshold_ratio must be in"),
    (dict(clip="clip"), ValueError, "clip='clip'"),
    (dict(x0_dtype=torch.int8), TypeError, "x0_dtype"),
    (dict(constant_columns={99: 0.0}), ValueError, "constant_columns has key 99"),
    (dict(backend="bogus"), ValueError, "backend='bogus'"),
])
def test_every_checked_argument_is_checked_again_when_it_changes(checks, change, error, message):
    _step()
    with pytest.raises(error, match=message):
        _step(**change)


def test_the_backend_request_is_part_of_the_signature(checks, monkeypatch):
    """set_backend / use_backend / the environment between two calls choose the backend of
    the second: a plan made under one request never serves another."""
    _step(backend=None)
    ran = []
    torch_backend = ops.backends.load_backend("torch")
    monkeypatch.setattr(torch_backend, "fused_step", lambda *a, **k: ran.append("torch") or (X, None, X))
    with ops.use_backend("torch"):
        _step(backend=None)
    assert ran == ["torch"] and len(checks) == 2
    monkeypatch.setenv(ops.backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="FUSED_SCHED_BACKEND='bogus'"):
        _step(backend=None)


def test_tensor_subclasses_and_plain_mappings_are_checked_every_call(checks):
    class Marked(torch.Tensor):
        pass

    marked = X.as_subclass(Marked)
    for _ in range(2):
        _step(sample=marked)
        _step(constant_columns={L.ON: 0.0})
    assert len(checks) == 4


def test_philox_noise_values_are_checked_every_call(checks):
    _step(noise=ops.PhiloxNoise(1, 0))
    with pytest.raises(ValueError, match="offset=-1 must be >= 0"):
        _step(noise=ops.PhiloxNoise(1, -1))
    assert len(checks) == 1


def test_the_cache_is_bounded(checks, monkeypatch):
    monkeypatch.setattr(ops._PlanCache, "capacity", 3)
    for n in range(1, 6):
        _step(sample=torch.randn(n, 3), model_output=torch.randn(n, 3))
    assert len(ops._plans) <= 3
