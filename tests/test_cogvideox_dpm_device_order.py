"""FusedCogVideoXDPMScheduler choosing its order on the device.

Its eager step reads the timesteps' values to pick first or second order and how many noise
draws to make. Where those values are not on the host (a traced step, or the static timestep
tensors of a captured CUDA graph while in-kernel noise is on), the step forms both rows and
selects on the device. These tests prove that path gives the eager results bit for bit, for
every row it can select, and reads no value on the host.
"""

from __future__ import annotations

import pytest
import torch

import fused_sched
from fused_sched.coefficients.ddim import LAMBDA, cogvideox_dpm_history_column
from fused_sched.ops import layout as L
from test_no_host_sync import no_host_syncs

BASE = dict(prediction_type="v_prediction", timestep_spacing="trailing")
CONFIGS = {
    # scaled_linear: float64 solver terms; linear: float32 terms (diffusers' dtypes)
    "scaled-linear-zero-snr": dict(BASE, rescale_betas_zero_snr=True),
    "linear": dict(BASE, beta_schedule="linear"),
    "epsilon-leading-alpha-one": dict(prediction_type="epsilon", timestep_spacing="leading", set_alpha_to_one=True),
    "sample-linspace": dict(prediction_type="sample", timestep_spacing="linspace", beta_schedule="linear"),
}


def _scheduler(config, seed=5, steps=10):
    scheduler = fused_sched.FusedCogVideoXDPMScheduler(**config)
    scheduler.use_philox_noise(seed)
    scheduler.set_timesteps(steps)
    return scheduler


def _trajectory(scheduler, timesteps, return_dict=False):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    old, samples = None, []
    for i in range(len(timesteps)):
        back = timesteps[i - 1] if i > 0 else None
        out = scheduler.step(torch.tanh(x), old, timesteps[i], back, x, return_dict=return_dict)
        x, old = out
        samples.append((x, old))
    return samples


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_device_order_gives_the_eager_trajectory(name):
    """Timesteps given as copies (not elements of scheduler.timesteps) take the device path:
    the same samples and x0 as the eager step at every step, first, second and last
    (first-order with history) alike, and the noise counter advanced by the same draws."""
    host, device = _scheduler(CONFIGS[name]), _scheduler(CONFIGS[name])
    expected = _trajectory(host, host.timesteps)
    copies = device.timesteps.clone()
    assert device._decides_on_device(copies[1], copies[0])
    assert not host._decides_on_device(host.timesteps[1], host.timesteps[0])
    got = _trajectory(device, copies)
    for i, ((x, x0), (ex, ex0)) in enumerate(zip(got, expected)):
        assert torch.equal(x, ex) and torch.equal(x0, ex0), f"step {i}"
    n = expected[0][0].numel()
    assert int(device._philox_counter) == int(host._philox_counter) == (2 * len(expected) - 2) * n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["scaled-linear-zero-snr", "linear"])
def test_device_rows_equal_the_host_rows_for_any_timestep_pair(name, dtype):
    """The second-order columns the device path forms equal the host's, bit for bit, for
    scheduled pairs and for pairs no schedule holds (the host computes those per call)."""
    scheduler = _scheduler(CONFIGS[name])
    gap = scheduler._step_gap()
    scheduled = list(zip(scheduler._host_timesteps[1:], scheduler._host_timesteps[:-1]))
    T = scheduler.config.num_train_timesteps
    unscheduled = [(t, t + 2 * gap + 1) for t, _ in scheduled if t + 2 * gap + 1 < T] + [(500, 10), (gap, T - 1)]
    assert len(unscheduled) >= 4
    for t, back in scheduled + unscheduled:
        if t - gap < 0:
            continue
        placed, index, _ = scheduler._second_order_row(t, back)
        host_row = placed.on(torch.device("cpu"), dtype)[index]
        terms = scheduler._terms_on(torch.device("cpu"))
        o1 = cogvideox_dpm_history_column(terms[[t]], terms[[back], LAMBDA])
        first = scheduler._tables["first"].on(torch.device("cpu"), dtype)[t]
        assert torch.equal(o1.to(dtype)[0], host_row[L.O1]), (t, back)
        others = [c for c in range(L.NUM_COEFFICIENTS) if c != L.O1]
        assert torch.equal(first[others], host_row[others]), (t, back)


def test_device_order_reads_no_value_on_the_host():
    scheduler = _scheduler(CONFIGS["scaled-linear-zero-snr"])
    copies = scheduler.timesteps.clone()
    x, old = torch.randn(2, 4, 8, 8), None
    for i in range(len(copies)):
        with no_host_syncs():
            x, old = scheduler.step(torch.tanh(x), old, copies[i], copies[i - 1] if i > 0 else None, x)
    assert torch.isfinite(x).all()


def test_device_order_needs_timestep_back_with_history():
    """Eager accepts history without timestep_back on the last (first-order) step; the device
    path cannot tell which step it is, so it requires timestep_back whenever history is given."""
    scheduler = _scheduler(CONFIGS["linear"])
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="timestep_back"):
        scheduler.step(x, x, scheduler.timesteps[-1].clone(), None, x)


def test_generator_steps_still_read_the_timestep():
    """Without in-kernel noise the number of generator draws must be diffusers', so a
    timestep that is not host-known is read (the eager path): same result as an int."""
    a, b = (fused_sched.FusedCogVideoXDPMScheduler(**CONFIGS["linear"]) for _ in range(2))
    for s in (a, b):
        s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    ints = [int(t) for t in a.timesteps]
    out_a = a.step(x, x, ints[3], ints[2], x, generator=torch.Generator().manual_seed(1))
    out_b = b.step(x, x, b.timesteps[3].clone(), b.timesteps[2].clone(), x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out_a[0], out_b[0])
    assert b._decides_on_device(b.timesteps[3].clone(), None) is False
