"""pytest-benchmark suite: one scheduler step, diffusers vs each available fused backend.

    python -m pytest bench/test_bench_step.py --benchmark-only [--benchmark-json out.json]

Not part of the test run (testpaths = tests); the `fused-sched bench` command measures the
same cases with its own timer and adds bytes moved and % of copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from fused_sched import ops
from fused_sched.benchmark import SCHEDULERS, SHAPES, stepper

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE_NAMES = ["tiny", "sd-512"] if DEVICE.type == "cpu" else ["cogvideox-49f", "wan-720p"]
IMPLEMENTATIONS = ["diffusers"] + [name for name, reason in ops.availability(DEVICE).items() if reason is None]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPE_NAMES)
@pytest.mark.parametrize("kind", ["ddim", "dpm++2m", "dpm++2m-threshold", "cogvideox-dpm"])
def test_step(benchmark, kind, shape, implementation):
    reference_cls, fused_cls, config = SCHEDULERS[kind]
    scheduler = (reference_cls if implementation == "diffusers" else fused_cls)(**config)
    scheduler.set_timesteps(20, device=DEVICE)
    x = torch.randn(SHAPES[shape], device=DEVICE)
    m = torch.randn(SHAPES[shape], device=DEVICE)
    step = stepper(kind, scheduler, x, m, 10)

    def timed():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    if implementation == "diffusers":
        benchmark(timed)
    else:
        with ops.use_backend(implementation):
            benchmark(timed)
