"""pytest-benchmark suite: one scheduler step, diffusers and the torch.compile baseline vs
each available fused backend.

    python -m pytest bench/test_bench_step.py --benchmark-only [--benchmark-json out.json]

Not part of the test run (testpaths = tests); the `fused-sched bench` command measures the
same cases with its own timer and adds bytes moved and % of copy bandwidth. "torch.compile"
is the fused scheduler's step with its op replaced by torch.compile of the pure-torch
reference (``fused_sched.benchmark``'s module docstring says exactly what is timed); it is
compiled before the benchmark starts, and a case it does not compile is skipped with the
reason.
"""

from __future__ import annotations

import pytest
import torch

from fused_sched import ops
from fused_sched.benchmark import (SCHEDULERS, SHAPES, BaselineUnavailable, compile_step, compiled_reference,
                                   no_recompiles, prime_host_allocator, stepper)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE_NAMES = ["tiny", "sd-512"] if DEVICE.type == "cpu" else ["cogvideox-49f", "wan-720p"]
IMPLEMENTATIONS = ["diffusers", "torch.compile"] + [
    name for name, reason in ops.availability(DEVICE).items() if reason is None]


@pytest.fixture(scope="module", autouse=True)
def pipeline_like_allocator():
    """Latent-sized host tensors from malloc's heap, as in a pipeline (prime_host_allocator)."""
    prime_host_allocator()


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
    elif implementation == "torch.compile":
        with compiled_reference() as op:
            try:
                compile_step(step, op, DEVICE)
            except BaselineUnavailable as error:
                pytest.skip(f"torch.compile baseline unavailable: {error}")
            with no_recompiles():
                benchmark(timed)
    else:
        with ops.use_backend(implementation):
            benchmark(timed)
