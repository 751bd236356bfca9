"""A step reads no tensor value on the host: whole trajectories under a guard that makes every
tensor-to-Python conversion raise, at the Python level and at the ATen level (where C++
code such as indexing with a 0-dim tensor would read a value without Python noticing)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from drivers import PAIRS, StepArgs, _step, stand_in_model


class HostSyncError(AssertionError):
    pass


_SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}


class _ForbidSyncs(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING_OPS:
            raise HostSyncError(f"host sync via {func}")
        return func(*args, **(kwargs or {}))


_PY_CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu")


@contextlib.contextmanager
def no_host_syncs():
    saved = {name: getattr(torch.Tensor, name) for name in _PY_CONVERSIONS}

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise HostSyncError(f"Tensor.{name} called during a step")
        return raiser

    try:
        for name in _PY_CONVERSIONS:
            setattr(torch.Tensor, name, forbid(name))
        with _ForbidSyncs():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_guard_catches_syncs():
    """The guard is not vacuous: each kind of conversion it claims to catch raises."""
    t = torch.tensor(3)
    table = torch.arange(10.0)
    for attempt in (lambda: t.item(), lambda: bool(t > 1), lambda: int(t), lambda: table[t].tolist(),
                    lambda: torch.ops.aten._local_scalar_dense(t)):
        with pytest.raises(HostSyncError), no_host_syncs():
            attempt()


CONFIGS = {
    "ddim": [dict(), dict(thresholding=True), dict(prediction_type="v_prediction", timestep_spacing="trailing")],
    "ddim_inverse": [dict()],
    "cogvideox_ddim": [dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)],
    "cogvideox_dpm": [dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)],
    "dpm": [dict(), dict(solver_order=3, thresholding=True, prediction_type="sample"),
            dict(algorithm_type="sde-dpmsolver++")],
    "dpm_inverse": [dict(solver_order=3)],
}
CASES = [(kind, i) for kind, configs in CONFIGS.items() for i in range(len(configs))]


@pytest.mark.parametrize("noise_source", ["generator", "philox"])
@pytest.mark.parametrize("timestep_form", ["int", "schedule_element"])
@pytest.mark.parametrize("kind,index", CASES)
def test_trajectory_steps_without_host_syncs(kind, index, timestep_form, noise_source):
    config = CONFIGS[kind][index]
    scheduler = PAIRS[kind][1](**config)
    if noise_source == "philox":  # the in-kernel noise counter lives on the device
        scheduler.use_philox_noise(3)
    scheduler.set_timesteps(12)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pattern = torch.randn(2, 4, 8, 8)
    args = StepArgs(eta=0.5 if kind == "ddim" else 0.0)
    if args.eta:
        # A step with a new eta builds its table once, on the host (host math, whose constant
        # columns it reads, and one upload); set_timesteps rebuilds the tables of the eta values
        # used before, so the trajectory's steps find it built.
        scheduler.step(x, scheduler.timesteps[0], x, eta=args.eta, generator=torch.Generator())
        scheduler.set_timesteps(12)
    generator, state = torch.Generator().manual_seed(0), {}
    host = scheduler.timesteps.tolist()
    for i in range(len(host)):
        m = stand_in_model(x, host[i], pattern)
        t = host[i] if timestep_form == "int" else scheduler.timesteps[i]
        schedule = host if timestep_form == "int" else scheduler.timesteps
        with no_host_syncs():
            x, _ = _step(kind, scheduler, m, t, x, i, schedule, state, args, generator, torch.float32)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "cogvideox_ddim"])
def test_ddim_family_gathers_rows_for_other_tensor_timesteps(kind):
    """A timestep tensor that is not an element of scheduler.timesteps (e.g. a copy) selects
    its row with a device-side gather, still without a sync."""
    scheduler = PAIRS[kind][1]()
    scheduler.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8)
    copies = scheduler.timesteps.clone()
    for i in range(len(copies)):
        m = torch.tanh(x)
        with no_host_syncs():
            x = scheduler.step(m, copies[i], x).prev_sample
    assert torch.isfinite(x).all()
