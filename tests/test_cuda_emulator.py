"""The CUDA emulator that runs csrc/cuda's kernels in CI (tests/cuda_emulator).

The emulator is itself checked here, with kernels written for the purpose: a block's
threads really are separate threads of control (a missing barrier gives wrong results),
the schedule really reorders blocks and threads (so a race that running thread 0 first
hides shows under another), warp collectives and block reductions compute what CUDA
defines, a barrier that a GPU would hang on is a loud fault, undefined behaviour a GPU
would fault on is reported by the sanitizer the emulator is built with, and the backend
the other tests select really runs csrc/cuda's launches (counted), one per step and seven
per thresholding scale (no host round trip between the selection passes), with its outputs
poisoned first so that a missed write shows. And csrc/cuda's kernels give the same bits
under every schedule.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cuda_emulator
from conftest import require_backend, subprocess_env
from fused_sched import ops
from fused_sched.ops import layout


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


@pytest.mark.parametrize("threads", [32, 100, 256])
def test_schedules_reorder_blocks_and_threads(emulator, threads):
    """The schedule the tests vary really changes the order: in order, reversed, and
    shuffled by seed, afresh for every block and every barrier interval. (A fiber that
    completes a barrier runs on past it, so an interval's first thread is the previous
    interval's last one; the rest follow the schedule.)"""
    blocks = 8
    arange = torch.arange(threads, dtype=torch.int32)

    def orders(order, seed=0):
        with cuda_emulator.schedule(order, seed):
            thread_order, block_order = emulator.selftest_arrival_order(blocks, threads)
        for interval in thread_order.view(-1, threads):
            assert torch.equal(interval.sort().values, arange)  # every thread ran once per interval
        assert torch.equal(block_order.sort().values, torch.arange(blocks, dtype=torch.int32))
        return thread_order, block_order

    thread_order, block_order = orders("in-order")
    assert torch.equal(block_order, torch.arange(blocks, dtype=torch.int32))
    assert torch.equal(thread_order[:, 0], arange.expand(blocks, -1))
    assert torch.equal(thread_order[:, 1, 1:], arange[:-1].expand(blocks, -1))

    thread_order, block_order = orders("reversed")
    assert torch.equal(block_order, torch.arange(blocks, dtype=torch.int32).flip(0))
    assert torch.equal(thread_order[:, 0], arange.flip(0).expand(blocks, -1))
    assert torch.equal(thread_order[:, 1, 1:], arange[1:].flip(0).expand(blocks, -1))

    shuffled = orders("shuffled", seed=1)
    assert torch.equal(orders("shuffled", seed=1)[0], shuffled[0])  # a seed is a schedule
    assert not torch.equal(orders("shuffled", seed=2)[0], shuffled[0])
    thread_order, block_order = shuffled
    assert not torch.equal(block_order, torch.arange(blocks, dtype=torch.int32))
    first = thread_order[:, 0]
    assert not torch.equal(first[0], arange) and not torch.equal(first[0], first[1])  # per block
    assert not torch.equal(thread_order[0, 1, 1:], first[0][first[0] != thread_order[0, 1, 0]])  # per round
    assert torch.equal(orders("in-order")[1], torch.arange(blocks, dtype=torch.int32))  # and back


@pytest.mark.parametrize("threads", [32, 256])
def test_a_race_the_in_order_schedule_hides_is_exposed_by_another(emulator, threads):
    """Thread 0 publishes a value through shared memory and the others read it with no
    barrier between: in order (thread 0 first) that happens to work; reversed, or shuffled,
    the others read before it writes. With the barrier, every schedule gets it right."""
    values = torch.arange(100, 105, dtype=torch.int32)
    expected = values.repeat_interleave(threads)
    assert torch.equal(emulator.selftest_broadcast(values, threads, False), expected)
    for order, seed in [("reversed", 0), ("shuffled", 3)]:
        with cuda_emulator.schedule(order, seed):
            assert not torch.equal(emulator.selftest_broadcast(values, threads, False), expected)
            assert torch.equal(emulator.selftest_broadcast(values, threads, True), expected)


def test_an_element_a_kernel_does_not_write_shows_the_poison(emulator):
    """Outputs are poisoned before every emulated launch (bindings.cpp), so a missed write
    reads as 0xA5 bytes, never as what the allocator's reused block happened to hold."""
    assert emulator.poison_byte == 0xA5
    out = emulator.selftest_write_even(1001)
    index = torch.arange(1001, dtype=torch.int32)
    assert torch.equal(out[0::2], index[0::2])
    assert bool((out[1::2] == 0xA5A5A5A5 - 2**32).all())  # those bits as an int32


def _every_kernel(backend) -> list:
    """The outputs of every csrc/cuda kernel on inputs that make them branch: thresholding on
    rows split over several blocks (packed) and on the element path, ties, a NaN row, batch
    rows with their own coefficients; the step with both history terms, Philox noise and
    each clip mode, writing every output."""
    g = torch.Generator().manual_seed(11)
    results = []
    for shape in [(3, 5 * 8 * 256 * 8), (3, 4099), (3, 17)]:
        x, m, h1, h2 = (torch.randn(shape, generator=g) for _ in range(4))
        x[1, ::3] = 0.5
        m[1, ::3] = 0.25  # ties in row 1
        x[2, 5] = float("nan")
        c = torch.randn(shape[0], layout.NUM_COEFFICIENTS, generator=g)
        scale = backend.threshold_scale(x, m, c, 0.995, 3.0)
        results.append(scale)
        for clip in layout.CLIP_MODES:
            results += backend.fused_step(x, m, c, (h1, h2), ops.PhiloxNoise(3, 5), clip, 1.5,
                                          scale if clip == "threshold" else None,
                                          torch.bfloat16, torch.float32, torch.float16)
    return results


@pytest.mark.parametrize("order, seed", [("reversed", 0), ("shuffled", 1), ("shuffled", 2)])
def test_kernels_do_not_depend_on_the_schedule(order, seed):
    """csrc/cuda's kernels give the same bits whatever order their blocks and threads run
    in: no race between threads of a barrier interval or between blocks decides a result
    (a GPU guarantees no order, so any that did would be a latent bug)."""
    backend = require_backend("cuda-emulator")
    expected = _every_kernel(backend)
    assert len(expected) == 3 * (1 + 3 * 3)
    with cuda_emulator.schedule(order, seed):
        got = _every_kernel(backend)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)


def test_a_barrier_a_gpu_would_hang_on_is_a_fault():
    """Thread 0 returns while the others wait at __syncthreads: the process aborts naming
    the fault (a subprocess, since it must abort)."""
    code = (
        "import cuda_emulator, cuda_toolkit\n"
        "cuda_emulator.load_backend(cuda_toolkit.INCLUDE).module.selftest_divergent_barrier(64)\n"
    )
    require_backend("cuda-emulator")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=subprocess_env(tests_importable=True))
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


def test_grid_stride_kernels_launch_one_wave_of_blocks(emulator):
    """The step and the thresholding passes launch as many blocks as the device runs at once
    (its SMs times the blocks of that kernel one SM holds, as cudaOccupancyMaxActiveBlocks-
    PerMultiprocessor says), or fewer where there is less work: each block of a grid-stride
    loop then does the same share, where a fixed count per SM would end in a partial wave,
    or leave SMs idle, depending on the kernel's registers."""
    wave = emulator.multiprocessors * emulator.resident_blocks_per_multiprocessor
    g = torch.Generator().manual_seed(0)
    rows = 3
    # Two rounds of 8-element packs for every thread of a wave, per row.
    x, m = (torch.randn(rows, wave * 256 * 8 * 2, generator=g) for _ in range(2))
    c = torch.randn(rows, layout.NUM_COEFFICIENTS, generator=g)
    emulator.take_launch_grids()
    ops.fused_step(x, m, c, clip="clamp", clip_range=1.0, backend="cuda-emulator")
    assert emulator.take_launch_grids() == [wave]
    ops.fused_step(x, m, c, clip="threshold", threshold_ratio=0.9, threshold_max=2.0, backend="cuda-emulator")
    blocks_per_row = -(-wave // rows)
    selection = [rows] + [rows * blocks_per_row, rows] * 3  # init, then (histogram, narrow) per pass
    assert emulator.take_launch_grids() == selection + [wave]
    tiny = torch.randn(1, 17, generator=g)
    ops.fused_step(tiny, tiny, c[:1], clip="none", backend="cuda-emulator")
    assert emulator.take_launch_grids() == [1]


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
