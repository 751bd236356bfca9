"""Steps launch on the tensors' device and on that device's current stream (GPU only).

The cuda backend's launcher takes a device guard for the sample's device and torch's
current stream there; Triton launches on the current device's current stream and switches
device where the tensors live on another. A kernel enqueued on another stream races the
caller's own work on its stream; one launched for the wrong device fails or reads another
device's memory.

Each test writes the step's inputs on a side stream behind a long device-side sleep and
steps at once, with the inputs still unwritten (an event proves they were): a kernel
enqueued on any other stream would read the NaNs they held before and the result would
differ from the same steps taken without streams. The backends' equivalence to the
reference is proven elsewhere; here each is compared with itself, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from drivers import PAIRS
from fused_sched import ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

# About 0.1-0.5 s on an H100/H200: far longer than launching the steps takes once their
# kernels are compiled (the steps without streams compile them first).
SLEEP_CYCLES = 300_000_000

CASES = {
    # the threshold pass and the step: two launches and a workspace
    "ddim-threshold": ("ddim", dict(thresholding=True, prediction_type="sample")),
    # the second step weighs the first's history value
    "dpm++2m": ("dpm", dict()),
    # in-kernel noise, the counter advanced on the device
    "sde-dpm++2m-philox": ("dpm", dict(algorithm_type="sde-dpmsolver++")),
}
STEPS = 2


def _scheduler(case, device):
    kind, config = CASES[case]
    scheduler = PAIRS[kind][1](**config)
    if case.endswith("philox"):
        scheduler.use_philox_noise(3)
    scheduler.set_timesteps(10, device=device)
    return scheduler


def _steps(scheduler, x):
    samples = []
    for t in scheduler.timesteps[:STEPS]:
        x = scheduler.step(torch.tanh(x), t, x, return_dict=False)[0]
        samples.append(x)
    return samples


def _steps_on_side_stream(scheduler, x, side, other_current_device=None):
    """The steps on ``side`` (its device made current), their input written there only after
    a sleep; returns the samples and whether that write was still pending when the host had
    launched every step."""
    unwritten = torch.full_like(x, float("nan"))
    written = torch.cuda.Event()
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        unwritten.copy_(x)
        written.record(side)
        if other_current_device is None:
            samples = _steps(scheduler, unwritten)
        else:
            with torch.cuda.device(other_current_device):
                samples = _steps(scheduler, unwritten)
        pending = not written.query()
    torch.cuda.synchronize(x.device)
    return samples, pending


def _x(device):
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)


@requires_cuda
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_steps_run_on_the_callers_stream(backend_name, case):
    device = torch.device("cuda", torch.cuda.current_device())
    with ops.use_backend(backend_name):
        x = _x(device)
        expected = _steps(_scheduler(case, device), x)
        torch.cuda.synchronize(device)
        samples, pending = _steps_on_side_stream(_scheduler(case, device), x, torch.cuda.Stream(device))
    assert pending, ("the input was written before the last step was launched: a step synchronised with the "
                     "device, or SLEEP_CYCLES is too short for this test to prove anything")
    for i, (a, b) in enumerate(zip(samples, expected)):
        assert torch.equal(a, b), f"step {i} differs: a kernel ran on a stream other than the caller's"


@requires_cuda
@requires_two_gpus
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_steps_run_on_the_tensors_device_while_another_is_current(backend_name, case):
    """Tensors and tables on cuda:1, its side stream current there, cuda:0 the current device."""
    device = torch.device("cuda", 1)
    with ops.use_backend(backend_name):
        x = _x(device)
        with torch.cuda.device(device):
            expected = _steps(_scheduler(case, device), x)
        torch.cuda.synchronize(device)
        samples, pending = _steps_on_side_stream(_scheduler(case, device), x, torch.cuda.Stream(device),
                                                 other_current_device=0)
    assert pending, ("the input was written before the last step was launched: a step synchronised with the "
                     "device, or SLEEP_CYCLES is too short for this test to prove anything")
    for i, (a, b) in enumerate(zip(samples, expected)):
        assert a.device == device, f"step {i} returned a tensor on {a.device}"
        assert torch.equal(a, b), f"step {i} differs: a kernel ran on the wrong device or stream"
