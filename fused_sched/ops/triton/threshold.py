"""Dynamic-thresholding scale by radix select, in Triton: exact, no sort, no size limit.

s_b = clamp(quantile(|x0_b|, ratio), 1, max_value), equal to ``reference.threshold_scale``
(torch.quantile's float32 rank arithmetic, its two order statistics and torch.lerp's
rounding) bit for bit.

How. A non-negative float orders like its IEEE bit pattern read as an integer, so the
k-th smallest |x0| is found digit by digit over the 31 significant bits of that key, most
significant first (digits of 8, 8, 8 and 7 bits). Each pass is two launches:

1. ``_histogram_kernel``: every program recomputes x0 = AS*(AX*x + AM*m + AL*m) for its part of
   a row (no |x0| buffer: a pass is bandwidth-bound and a key buffer would cost a write
   and a read of its own), keeps the keys whose higher digits equal the prefix chosen so
   far, and adds its 256-bin histogram of the current digit to the row's int64 histogram
   with one atomic per non-empty bin. The first pass also counts NaNs.
2. ``_narrow_kernel``, one program per row: finds the bin holding the target rank with a
   cumulative sum, appends that digit to the prefix and subtracts the counts below it.

Both order statistics torch.quantile interpolates, lo and hi = lo or lo + 1, are selected
together: they share a histogram until their prefixes differ, then each keeps its own.
All state (prefixes, remaining ranks, NaN count) lives in a device workspace, so there is
no host round trip between passes and the op can be captured in a CUDA graph. Counts and
ranks are int64: rows may hold more than 2**31 elements. After the last pass the prefixes
are the order statistics' bit patterns and the narrow kernel writes the scale.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import reference
from . import _common as C
# The kernels name what they use from _common bare. inductor compiles a registered op's kernel
# from source it regenerates out of the globals the kernel loads (kernels, ints and constexprs);
# a module attribute such as C.AX would be left undefined there.
from ._common import (
    AL, AM, AS, AX, data_estimate,
)

# (shift, bits) of each pass's digit, most significant first; together bits 0..30.
DIGITS = ((23, 8), (15, 8), (7, 8), (0, 7))
PASSES = len(DIGITS)
MAX_BINS = 256

# Workspace words per row (int64).
_PREFIX_LO, _PREFIX_HI, _RANK_LO, _RANK_HI, _NAN_COUNT, _FAILED = (tl.constexpr(i) for i in range(6))
STATE_WORDS = 8

# The histogram kernel accumulates into its outputs with atomics, so autotuning (which
# re-runs a kernel) would need its workspace saved and restored around every trial; a fixed
# configuration suffices for a bandwidth-bound pass: 2048 elements per tile in 8 warps
# gives 8 elements per thread, two 16-byte loads per fp32 input.
GPU_BLOCK, GPU_WARPS = 2048, 8
# Programs per SM to aim for across all rows of a pass.
PROGRAMS_PER_SM = 4
INTERPRETER_BLOCK = 1024
# Under the interpreter, split rows as if the device had this many SMs, so small test rows
# still run several programs per row, each over several tiles.
INTERPRETER_SMS = 2

# The quiet NaN as fp32 bits. Not a float NaN constexpr: a launch checks that the globals
# a kernel used still equal their compile-time values, and NaN != NaN would fail every
# launch on a GPU (the interpreter does not check; tests/test_triton_gpu_compile.py does).
NAN_BITS = tl.constexpr(0x7FC00000)


@triton.jit
def _init_kernel(state_ptr, hist_ptr, rank_lo, rank_hi, PASSES: tl.constexpr, MAX_BINS: tl.constexpr,
                 STATE_WORDS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    words = tl.arange(0, STATE_WORDS)
    init = tl.where(words == _RANK_LO, rank_lo, tl.where(words == _RANK_HI, rank_hi, 0)).to(tl.int64)
    tl.store(state_ptr + row * STATE_WORDS + words, init)
    bins = tl.arange(0, PASSES * 2 * MAX_BINS)
    tl.store(hist_ptr + row * (PASSES * 2 * MAX_BINS) + bins, tl.zeros([PASSES * 2 * MAX_BINS], tl.int64))


@triton.jit(do_not_specialize_on_alignment=["coef_ptr"])  # scalar loads (see step.py)
def _histogram_kernel(
    x_ptr, m_ptr, coef_ptr, coef_row_stride, state_ptr, hist_ptr,
    row_numel, tiles_per_program,
    PASS: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
    PASSES: tl.constexpr, MAX_BINS: tl.constexpr, STATE_WORDS: tl.constexpr,
    WIDE_INDEX: tl.constexpr, ABSENT: tl.constexpr, BLOCK: tl.constexpr,
):
    BINS: tl.constexpr = 1 << BITS
    ABOVE: tl.constexpr = SHIFT + BITS
    row = tl.program_id(0)
    part = tl.program_id(1)
    if WIDE_INDEX:
        part = part.to(tl.int64)
    state = state_ptr + row.to(tl.int64) * STATE_WORDS
    # Keys are < 2**31, so their int32 shifts never see a sign bit.
    prefix_lo = tl.load(state + _PREFIX_LO).to(tl.int32)
    prefix_hi = tl.load(state + _PREFIX_HI).to(tl.int32)
    split = prefix_lo != prefix_hi
    coef = coef_ptr + row.to(tl.int64) * coef_row_stride  # K * rows passes 2**31 first
    ax = tl.load(coef + AX)
    am = tl.load(coef + AM)
    al = tl.load(coef + AL)
    a_s = tl.load(coef + AS)
    base = row.to(tl.int64) * row_numel

    counts_lo = tl.zeros([BINS], tl.int32)
    counts_hi = tl.zeros([BINS], tl.int32)
    nans = tl.zeros([BLOCK], tl.int32)
    first_tile = part * tiles_per_program
    for t in range(0, tiles_per_program):
        cols = (first_tile + t) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row_numel
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        v = data_estimate(x, m, ax, am, al, a_s, ABSENT)
        key = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        digit = (key >> SHIFT) & (BINS - 1)
        if PASS == 0:
            nans += (mask & (v != v)).to(tl.int32)
            counts_lo += tl.histogram(digit, BINS, mask=mask)
        else:
            high = key >> ABOVE
            counts_lo += tl.histogram(digit, BINS, mask=mask & (high == (prefix_lo >> ABOVE)))
            if split:
                counts_hi += tl.histogram(digit, BINS, mask=mask & (high == (prefix_hi >> ABOVE)))

    hist = hist_ptr + (row.to(tl.int64) * PASSES + PASS) * (2 * MAX_BINS)
    bins = tl.arange(0, BINS)
    # Only the sums matter and the next launch orders them: relaxed atomics suffice.
    tl.atomic_add(hist + bins, counts_lo.to(tl.int64), mask=counts_lo != 0, sem="relaxed")
    tl.atomic_add(hist + MAX_BINS + bins, counts_hi.to(tl.int64), mask=counts_hi != 0, sem="relaxed")
    if PASS == 0:
        row_nans = tl.sum(nans, axis=0)
        tl.atomic_add(state + _NAN_COUNT, row_nans.to(tl.int64), mask=row_nans > 0, sem="relaxed")


@triton.jit
def _narrow_kernel(
    state_ptr, hist_ptr, scale_ptr, weight, max_value,
    PASS: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, LAST: tl.constexpr,
    PASSES: tl.constexpr, MAX_BINS: tl.constexpr, STATE_WORDS: tl.constexpr,
):
    BINS: tl.constexpr = 1 << BITS
    row = tl.program_id(0)
    state = state_ptr + row.to(tl.int64) * STATE_WORDS
    hist = hist_ptr + (row.to(tl.int64) * PASSES + PASS) * (2 * MAX_BINS)
    # Both targets at once, as rows of a [2, BINS] tile: lo (0) and hi (1). When lo == hi
    # they are the same rank and stay identical, so no special case is needed.
    targets = tl.arange(0, 2)
    bins = tl.arange(0, BINS)
    prefix = tl.load(state + _PREFIX_LO + targets)
    rank = tl.load(state + _RANK_LO + targets)
    # Until the prefixes differ, the histogram kernel counted both targets in histogram 0.
    split = tl.max(prefix, axis=0) != tl.min(prefix, axis=0)
    source = tl.where(split, targets, 0)
    counts = tl.load(hist + source[:, None] * MAX_BINS + bins[None, :])
    inclusive = tl.cumsum(counts, axis=1)
    # The first bin whose inclusive count exceeds the rank holds it; BINS if none does,
    # which only a counting bug could cause.
    digit = tl.sum((inclusive <= rank[:, None]).to(tl.int64), axis=1)
    below = tl.sum(tl.where(bins[None, :] < digit[:, None], counts, 0), axis=1)
    prefix = prefix | (digit << SHIFT)
    tl.store(state + _PREFIX_LO + targets, prefix)
    tl.store(state + _RANK_LO + targets, rank - below)
    failed = (tl.max(digit, axis=0) >= BINS) | (tl.load(state + _FAILED) != 0)
    tl.store(state + _FAILED, failed.to(tl.int64))

    if LAST:
        v_lo = tl.sum(tl.where(targets == 0, prefix, 0), axis=0).to(tl.int32).to(tl.float32, bitcast=True)
        v_hi = tl.sum(tl.where(targets == 1, prefix, 0), axis=0).to(tl.int32).to(tl.float32, bitcast=True)
        # torch.lerp as ATen's CPU (AVX2/AVX-512) and CUDA kernels round it.
        diff = v_hi - v_lo
        lerp = tl.where(tl.abs(weight) < 0.5, tl.fma(weight, diff, v_lo), tl.fma(weight - 1.0, diff, v_hi))
        # Equal order statistics are the quantile: lerp(inf, inf, w) would be NaN.
        s = tl.where(v_lo == v_hi, v_lo, lerp)
        # A row holding a NaN has a NaN quantile; a failed selection must not pass as a value.
        nan = tl.full((), NAN_BITS, tl.int32).to(tl.float32, bitcast=True)
        s = tl.where((tl.load(state + _NAN_COUNT) > 0) | failed, nan, s)
        # torch.clamp(s, min=1, max=max_value): NaN passes, max wins over min.
        s = tl.where(s < 1.0, 1.0, s)
        s = tl.where(s > max_value, max_value, s)
        tl.store(scale_ptr + row, s)


@functools.lru_cache(maxsize=256)
def _rank(ratio: float, row_numel: int):
    return reference.quantile_rank(ratio, row_numel)


@functools.lru_cache(maxsize=16)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _partition(rows: int, row_numel: int, block: int, sms: int):
    """(programs per row, tiles per program) for one histogram pass."""
    tiles = triton.cdiv(row_numel, block)
    parts = max(1, min(tiles, triton.cdiv(PROGRAMS_PER_SM * sms, rows)))
    # Grid axis 1 holds at most 65535 programs; a program's int32 counts stay below 2**31.
    tiles_per_program = max(triton.cdiv(tiles, parts), triton.cdiv(tiles, C.MAX_GRID_ROWS))
    if tiles_per_program * block >= C.INT32_LIMIT:
        raise ValueError(f"threshold_scale: a batch row of {row_numel} elements is too large for int32 per-program counts")
    return triton.cdiv(tiles, tiles_per_program), tiles_per_program


if C.INTERPRETED:
    _histogram_launcher, _narrow_launcher = _histogram_kernel, _narrow_kernel
else:
    # One configuration each: a single-config autotuner never benchmarks (so never re-runs
    # the accumulating kernel), and it carries num_warps through wrap_triton.
    _histogram_launcher = triton.autotune(
        configs=[triton.Config({"BLOCK": GPU_BLOCK}, num_warps=GPU_WARPS)], key=[])(_histogram_kernel)
    _narrow_launcher = triton.autotune(configs=[triton.Config({}, num_warps=2)], key=[])(_narrow_kernel)


def threshold_scale_impl(sample, model_output, coefficients, ratio: float, max_value: float,
                         wrap=C.direct, absent_terms: int = 0) -> torch.Tensor:
    """(B,) float32 scale; the semantics of ``reference.threshold_scale``."""
    x = sample if sample.is_contiguous() else sample.contiguous()
    m = model_output if model_output.is_contiguous() else model_output.contiguous()
    c = coefficients if coefficients.is_contiguous() else coefficients.contiguous()
    # Concrete sizes: the ranks and the grid depend on them, so a symbolic trace (a
    # torch.compile with dynamic shapes) specialises on them here instead of failing.
    rows = int(x.shape[0])
    row_numel = int(x.numel()) // rows if rows else 0
    if row_numel == 0:
        raise ValueError(f"threshold_scale needs at least one element per batch row, got shape {tuple(x.shape)}")
    if rows > C.INT32_LIMIT:
        raise ValueError(f"threshold_scale supports at most {C.INT32_LIMIT} batch rows, got {rows}")
    lo, hi, weight = _rank(float(ratio), row_numel)
    device = x.device
    if C.INTERPRETED:
        block, sms, tile = INTERPRETER_BLOCK, INTERPRETER_SMS, dict(BLOCK=INTERPRETER_BLOCK)
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        block, sms, tile = GPU_BLOCK, _multiprocessors(index), {}
    parts, tiles_per_program = _partition(rows, row_numel, block, sms)
    wide = parts * tiles_per_program * block > C.WIDE_INDEX_FROM
    coef_row_stride = C.NUM_COEFFICIENTS if c.shape[0] > 1 else 0

    state = torch.empty((rows, STATE_WORDS), dtype=torch.int64, device=device)
    hist = torch.empty((rows, PASSES, 2, MAX_BINS), dtype=torch.int64, device=device)
    scale = torch.empty((rows,), dtype=torch.float32, device=device)
    layout = dict(PASSES=PASSES, MAX_BINS=MAX_BINS, STATE_WORDS=STATE_WORDS)
    wrap(_init_kernel)[(rows,)](state, hist, lo, hi, **layout)
    for index, (shift, bits) in enumerate(DIGITS):
        digit = dict(PASS=index, SHIFT=shift, BITS=bits, **layout)
        wrap(_histogram_launcher)[(rows, parts)](
            x, m, c, coef_row_stride, state, hist, row_numel, tiles_per_program,
            WIDE_INDEX=wide, ABSENT=absent_terms, **tile, **digit,
        )
        wrap(_narrow_launcher)[(rows,)](
            state, hist, scale, weight, max_value, LAST=index == PASSES - 1, **digit,
        )
    return scale


@torch.library.triton_op("fused_sched::triton_threshold_scale", mutates_args=())
def threshold_scale_op(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    ratio: float,
    max_value: float,
    absent_terms: int = 0,
) -> torch.Tensor:
    with C.device_guard(sample.device):
        return threshold_scale_impl(sample, model_output, coefficients, ratio, max_value, torch.library.wrap_triton,
                                    absent_terms)


if C.INTERPRETED:
    # See step.py: triton_op's derived fake cannot run an interpreted kernel.
    @threshold_scale_op.register_fake
    def _(sample, model_output, coefficients, ratio, max_value, absent_terms=0):
        return sample.new_empty((sample.shape[0],), dtype=torch.float32)
