"""The CUDA emulator that runs csrc/cuda's kernels in CI (tests/cuda_emulator).

The emulator is itself checked here, with kernels written for the purpose: a block's
threads really are separate threads of control (a missing barrier gives wrong results),
warp collectives and block reductions compute what CUDA defines, a barrier that a GPU would
hang on is a loud fault, undefined behaviour a GPU would fault on is reported by the
sanitizer the emulator is built with, and the backend the other tests select really runs csrc/cuda's
launches (counted), one per step and seven per thresholding scale (no host round trip
between the selection passes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emulator
from conftest import require_backend
from fused_sched import ops
from fused_sched.ops import layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emulator():
    return require_backend("cuda-emulator").module


@pytest.mark.parametrize("threads", [32, 100, 256, 1024])
def test_a_missing_barrier_is_exposed(emulator, threads):
    """Reversing a block through shared memory is right with __syncthreads and wrong without
    it: every thread writes before any reads only if the barrier is there."""
    values = torch.arange(3 * threads, dtype=torch.int32)
    expected = values.view(3, threads).flip(1).flatten()
    assert torch.equal(emulator.selftest_reverse(values, threads, True), expected)
    unsynchronised = emulator.selftest_reverse(values, threads, False)
    assert not torch.equal(unsynchronised, expected)


@pytest.mark.parametrize("threads", [32, 64, 256])
def test_warp_and_block_collectives(emulator, threads):
    g = torch.Generator().manual_seed(threads)
    values = torch.randint(-2**40, 2**40, (4 * threads,), generator=g)
    values[:threads] = values[:threads].abs()  # block 0: nothing negative
    scan, ballot, first, any_negative = emulator.selftest_collectives(values, threads)
    warps = values.view(-1, 32)
    assert torch.equal(scan, warps.cumsum(1).flatten())
    odd = (warps & 1).bool().to(torch.int64) << torch.arange(32)
    assert torch.equal(ballot, odd.sum(1, keepdim=True).expand(-1, 32).flatten())
    assert torch.equal(first, warps[:, :1].expand(-1, 32).flatten())
    blocks = values.view(-1, threads)
    assert torch.equal(any_negative, (blocks < 0).any(1, keepdim=True).expand(-1, threads).flatten().long())
    assert not bool(any_negative[:threads].any())


def test_a_barrier_a_gpu_would_hang_on_is_a_fault():
    """Thread 0 returns while the others wait at __syncthreads: the process aborts naming
    the fault (a subprocess, since it must abort)."""
    code = (
        "import cuda_emulator, cuda_toolkit\n"
        "cuda_emulator.load_backend(cuda_toolkit.INCLUDE).module.selftest_divergent_barrier(64)\n"
    )
    require_backend("cuda-emulator")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "kernel fault in block 0" in result.stderr and "deadlock" in result.stderr, result.stderr


def test_a_misaligned_vector_load_is_reported(emulator):
    """A float4 load one float past a 16-byte boundary: the sanitizer names it (the report is
    consumed here, so conftest's check after every test does not fail this one)."""
    cuda_emulator.undefined_behaviour_reports()
    assert emulator.selftest_misaligned_load() == 2 + 3 + 4 + 5
    reports = "".join(cuda_emulator.undefined_behaviour_reports())
    assert "misaligned address" in reports and "float4" in reports and "selftest.cpp" in reports, reports


def _launches(emulator, call) -> int:
    before = emulator.launches()
    call()
    return emulator.launches() - before


def test_the_emulated_backend_runs_the_cuda_launches(emulator):
    """ops.fused_step(backend='cuda-emulator') runs csrc/cuda's launch code: one kernel per
    step, and for dynamic thresholding an init kernel plus a histogram and a narrowing
    kernel per radix pass (three), all queued without reading anything back."""
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, layout.NUM_COEFFICIENTS, generator=g)
    step = lambda **kw: ops.fused_step(x, m, c, backend="cuda-emulator", **kw)  # noqa: E731
    assert _launches(emulator, lambda: step(clip="clamp", clip_range=1.0)) == 1
    assert _launches(emulator, lambda: step(clip="threshold", threshold_ratio=0.9, threshold_max=2.0)) == 1 + 7
