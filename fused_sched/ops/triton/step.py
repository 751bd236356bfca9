"""The fused step as one Triton kernel, with its host wrapper and torch.library op.

One generic elementwise kernel, specialised at compile time (tl.constexpr) on the clip
mode, the number of history terms, the noise source (none, a tensor, or counter-based
normals ``tl.randn(seed, offset + i)`` for ``noise=PhiloxNoise``) and which of the optional
outputs (history value d, clipped x0) are written; ``prev`` is always written. One pass
over memory: every input is read once, every output written once, fp32 arithmetic
whatever the storage dtypes (see _common.py for the rounding).

Grid: axis 0 = blocks of BLOCK elements within a row, axis 1 = batch rows. A row is a
batch element when its coefficient row or thresholding scale differs per row; otherwise
the whole tensor is a single row, so the common case is a plain 1-D launch that reads the
coefficients once per program. Rows beyond CUDA's 65535 limit on axis 1 go in further
launches. Offsets within a row are int32 unless a row has 2**31 or more elements.

Philox noise: the counter of an element is ``offset + row * row_numel + column``, its flat
index in the whole tensor, so neither the block size, nor the grid, nor whether the batch
is one row or many changes the number an element gets (fused_sched/ops/philox.py).

Layout: inputs are read as dense row-major tensors. A non-contiguous input (a slice, a
channels-last latent, an expanded view) is copied once with ``.contiguous()`` here in the
host wrapper; outputs are always new contiguous tensors.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import philox
from ..philox import PhiloxNoise
from . import _common as C
# The kernels name what they use from _common bare. inductor compiles a registered op's kernel
# from source it regenerates out of the globals the kernel loads (kernels, ints and constexprs);
# a module attribute such as C.AX would be left undefined there.
from ._common import (
    AL, AM, AS, AX, CLIP_CLAMP, CLIP_NONE, CLIP_THRESHOLD, NOISE_PHILOX, NOISE_TENSOR, O0, O1, O2, OC, OM, ON, OX, P0,
    PM, PS, PX, add_term, data_estimate, empty_sum, keep_unclipped_history_value, scaled, store,
)

# Under the interpreter the block size is fixed (autotuning would only time numpy); small
# enough that the test sizes span several blocks and exercise the masked tail.
INTERPRETER_BLOCK = 512

# Memory-bound: 16-byte vector accesses need BLOCK / (32 * num_warps) >= 4 fp32 elements
# per thread; 1024-4096 elements keep enough bytes in flight per SM on Hopper.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))
]
# FUSED_SCHED_TRITON_AUTOTUNE=0 (read at import): this one configuration, the middle of the
# tuned range (16 fp32 per thread, four 16-byte accesses each). Autotuning compiles every
# configuration and times them on the first step of each size class and specialisation,
# synchronising the device; switched off, a first step compiles once and never waits, and
# a test suite that meets hundreds of specialisations compiles a quarter as many kernels.
FIXED_CONFIG = AUTOTUNE_CONFIGS[1]
# No launch configuration is larger: a row is indexed in int64 if its last block could pass 2**31.
MAX_BLOCK = max(config.kwargs["BLOCK"] for config in AUTOTUNE_CONFIGS)


def autotune_requested(setting: str | None) -> bool:
    """FUSED_SCHED_TRITON_AUTOTUNE's value: unset or anything but 0/false/no/off tunes."""
    return (setting or "1").strip().lower() not in ("0", "false", "no", "off")


AUTOTUNE = autotune_requested(os.environ.get("FUSED_SCHED_TRITON_AUTOTUNE"))


# size_class only keys the autotuner, and seed / noise_offset change every noisy step:
# specialising on their values would compile needless variants. Both are int64 whatever
# their value (a Python int below 2**31 would otherwise make an int32 variant). The
# coefficient row, scales and offset are read one scalar at a time, so their alignment buys
# nothing, and a table row's address is 16-byte aligned for one timestep in four.
@triton.jit(do_not_specialize=["size_class", "seed", "noise_offset"],
            do_not_specialize_on_alignment=["coef_ptr", "scale_ptr", "offset_ptr"])
def _step_kernel(
    x_ptr, m_ptr, h1_ptr, h2_ptr, z_ptr, coef_ptr, scale_ptr,
    out_ptr, d_ptr, x0_ptr,
    row_numel, row_start, coef_row_stride, clip_range,
    size_class,  # autotuning key only: log2 of the element count
    seed: tl.int64, noise_offset: tl.int64,  # NOISE_PHILOX only: the key's 64 bits, the first counter
    offset_ptr,  # OFFSET_IN_MEMORY only: an int64 added to noise_offset (a scheduler's device counter)
    CLIP: tl.constexpr, HISTORY: tl.constexpr, NOISE: tl.constexpr,
    WRITE_D: tl.constexpr, WRITE_X0: tl.constexpr, WIDE_INDEX: tl.constexpr,
    OFFSET_IN_MEMORY: tl.constexpr, ABSENT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = row_start + tl.program_id(1)
    block = tl.program_id(0)
    if WIDE_INDEX:
        block = block.to(tl.int64)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_numel
    # The row base is a scalar, so the per-element offsets stay narrow and contiguous.
    base = row.to(tl.int64) * row_numel
    coef = coef_ptr + row.to(tl.int64) * coef_row_stride  # K * rows passes 2**31 first

    ax = tl.load(coef + AX)
    am = tl.load(coef + AM)
    a_s = tl.load(coef + AS)
    px = tl.load(coef + PX)
    p0 = tl.load(coef + P0)
    pm = tl.load(coef + PM)
    ox = tl.load(coef + OX)
    o0 = tl.load(coef + O0)
    om = tl.load(coef + OM)

    # Streamed once: evict_first keeps them from displacing anything worth caching.
    x = tl.load(x_ptr + base + cols, mask=mask, eviction_policy="evict_first").to(tl.float32)
    m = tl.load(m_ptr + base + cols, mask=mask, eviction_policy="evict_first").to(tl.float32)

    x0 = data_estimate(x, m, ax, am, tl.load(coef + AL), a_s, ABSENT)
    unclipped_x0 = x0
    if CLIP == CLIP_CLAMP:
        # torch.clamp: a NaN stays NaN (both comparisons are false).
        x0 = tl.where(x0 < -clip_range, -clip_range, tl.where(x0 > clip_range, clip_range, x0))
    elif CLIP == CLIP_THRESHOLD:
        s = tl.load(scale_ptr + row)
        # torch.maximum / torch.minimum: a NaN in either operand wins (a NaN row has s = NaN).
        x0 = tl.where((x0 > -s) | (x0 != x0), x0, -s)
        x0 = tl.where((x0 < s) | (x0 != x0), x0, s)
        x0 = tl.math.div_rn(x0, s)

    empty = empty_sum(x)
    d = add_term(add_term(add_term(empty, px, x, PX, ABSENT), p0, x0, P0, ABSENT), pm, m, PM, ABSENT)
    d = scaled(d, tl.load(coef + PS))  # scaled after the sum cancels (layout.py)
    if CLIP != CLIP_NONE:
        d = keep_unclipped_history_value(d, x, m, unclipped_x0, x0, coef, ABSENT)
    out = add_term(empty, ox, x, OX, ABSENT)
    if CLIP != CLIP_NONE:  # unclipped, x0 is folded into OX and OM and may be +-inf (layout.py)
        out = add_term(out, tl.load(coef + OC), x0, OC, ABSENT)
    out = add_term(add_term(out, o0, d, O0, ABSENT), om, m, OM, ABSENT)
    # History enters as differences of consecutive values (layout.py): d - h1, h1 - h2.
    if HISTORY >= 1:
        h1 = tl.load(h1_ptr + base + cols, mask=mask, eviction_policy="evict_first").to(tl.float32)
        out = add_term(out, tl.load(coef + O1), d - h1, O1, ABSENT)
    if HISTORY >= 2:
        h2 = tl.load(h2_ptr + base + cols, mask=mask, eviction_policy="evict_first").to(tl.float32)
        out = add_term(out, tl.load(coef + O2), h1 - h2, O2, ABSENT)
    if NOISE == NOISE_TENSOR:
        z = tl.load(z_ptr + base + cols, mask=mask, eviction_policy="evict_first").to(tl.float32)
        out = add_term(out, tl.load(coef + ON), z, ON, ABSENT)
    elif NOISE == NOISE_PHILOX:
        # The element's flat index in the whole tensor keys its number: any split agrees.
        first = noise_offset
        if OFFSET_IN_MEMORY:
            first = first + tl.load(offset_ptr)
        z = tl.randn(seed, first + base + cols)
        out = add_term(out, tl.load(coef + ON), z, ON, ABSENT)

    store(out_ptr + base + cols, out, mask)
    if WRITE_D:
        store(d_ptr + base + cols, d, mask)
    if WRITE_X0:
        store(x0_ptr + base + cols, x0, mask)


def launcher(configs: list):
    """The step kernel launched with the best of ``configs`` per (size class,
    specialisation); with one configuration Triton launches it without timing anything."""
    too_large = [config for config in configs if config.kwargs["BLOCK"] > MAX_BLOCK]
    if too_large:
        raise ValueError(f"launch configurations {too_large} have BLOCK > MAX_BLOCK = {MAX_BLOCK}")
    # The key names what sets the tensors read and written. ABSENT, WIDE_INDEX and
    # OFFSET_IN_MEMORY change scalar work only (terms left out, index width, one int64 load),
    # so a variant launches with the configuration tuned for the first of its siblings
    # rather than timing every configuration again (each tuning compiles them all and syncs).
    return triton.autotune(configs=configs, key=["size_class", "CLIP", "HISTORY", "NOISE", "WRITE_D", "WRITE_X0"])(
        _step_kernel)


if C.INTERPRETED:
    LAUNCH_CONFIGS = [triton.Config({"BLOCK": INTERPRETER_BLOCK})]
elif AUTOTUNE:
    # The first call of each key benchmarks (and synchronises), so it must not happen inside
    # CUDA-graph capture: run one warm-up step first, as any capture needs anyway.
    LAUNCH_CONFIGS = AUTOTUNE_CONFIGS
else:
    LAUNCH_CONFIGS = [FIXED_CONFIG]
_step_launcher = launcher(LAUNCH_CONFIGS)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def launch_step(
    sample, model_output, coefficients, history, noise,
    clip: str, clip_range: float, scale, out, d, x0, wrap=C.direct, absent_terms: int = 0,
) -> None:
    """Runs the kernel into the preallocated contiguous outputs (d / x0 may be None).

    Arguments are those of ``reference.fused_step``, already validated (``noise`` is None, a
    tensor or a ``PhiloxNoise``); inputs may be non-contiguous (copied here once). ``wrap``
    is ``torch.library.wrap_triton`` inside the registered op, so that torch.compile sees
    the launch.
    """
    x = _dense(sample)
    m = _dense(model_output)
    c = _dense(coefficients)
    hist = tuple(_dense(h) for h in history)
    z, noise_code, seed, noise_offset, offset_base = C.noise_arguments(noise)
    if z is not None:
        z = _dense(z)
    if clip == "threshold":
        if scale is None:
            raise ValueError("clip='threshold' needs the per-row scale from threshold_scale")
        s = _dense(scale if scale.dtype == torch.float32 else scale.to(torch.float32))
    else:
        s = c  # never read: CLIP is not threshold

    numel = x.numel()
    if numel == 0:
        return
    rows, row_numel = C.row_geometry(x, c.shape[0] > 1 or clip == "threshold")
    coef_row_stride = C.NUM_COEFFICIENTS if c.shape[0] > 1 else 0
    wide = row_numel + MAX_BLOCK > C.WIDE_INDEX_FROM
    # Absent operands are never read or written (their constexpr branch is compiled out);
    # any valid pointer stands in for them.
    h1 = hist[0] if len(hist) >= 1 else x
    h2 = hist[1] if len(hist) >= 2 else x
    args = dict(
        CLIP=C.CLIP_CODES[clip], HISTORY=len(hist), NOISE=noise_code,
        WRITE_D=d is not None, WRITE_X0=x0 is not None, WIDE_INDEX=wide,
        OFFSET_IN_MEMORY=offset_base is not None, ABSENT=absent_terms,
    )
    size_class = numel.bit_length()
    for row_start in range(0, rows, C.MAX_GRID_ROWS):
        n_rows = min(C.MAX_GRID_ROWS, rows - row_start)

        def grid(meta, n_rows=n_rows):
            return (triton.cdiv(row_numel, meta["BLOCK"]), n_rows)

        wrap(_step_launcher)[grid](
            x, m, h1, h2, z if z is not None else x, c, s,
            out, d if d is not None else out, x0 if x0 is not None else out,
            row_numel, row_start, coef_row_stride, clip_range, size_class, seed, noise_offset,
            offset_base if offset_base is not None else c, **args,
        )


def fused_step_impl(
    sample, model_output, coefficients, history, noise,
    clip, clip_range, scale, out_dtype, history_dtype, x0_dtype, wrap=C.direct, absent_terms: int = 0,
):
    """``reference.fused_step`` semantics: returns (prev, d or None, x0 or None)."""
    shape, device = sample.shape, sample.device
    out = torch.empty(shape, dtype=out_dtype, device=device)
    d = None if history_dtype is None else torch.empty(shape, dtype=history_dtype, device=device)
    x0 = None if x0_dtype is None else torch.empty(shape, dtype=x0_dtype, device=device)
    with C.device_guard(device):
        launch_step(sample, model_output, coefficients, history, noise, clip, clip_range, scale, out, d, x0, wrap,
                    absent_terms)
    return out, d, x0


# ---- torch.library registration: torch.compile traces the op, and inductor sees the kernel.


@torch.library.triton_op("fused_sched::triton_fused_step", mutates_args=())
def fused_step_op(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    history: list[torch.Tensor],
    noise: Optional[torch.Tensor],
    clip: str,
    clip_range: float,
    scale: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    history_dtype: Optional[torch.dtype],
    x0_dtype: Optional[torch.dtype],
    philox_seed: Optional[int] = None,
    philox_offset: int = 0,
    philox_base: Optional[torch.Tensor] = None,
    absent_terms: int = 0,
) -> list[torch.Tensor]:
    """[prev] + [d if history_dtype] + [x0 if x0_dtype]: a schema has no optional outputs.

    A schema cannot take a ``PhiloxNoise``: with ``noise`` None, ``philox_seed`` (the seed's
    64 bits as a signed int64) and ``philox_offset`` stand for it, or ``philox_base`` (a
    0-dim int64 tensor, which the kernel loads; ``philox_offset`` is then unused) for a
    device-resident offset.
    """
    if philox_seed is not None:
        noise = PhiloxNoise(philox.unsigned_seed(philox_seed), philox_offset if philox_base is None else philox_base)
    out, d, x0 = fused_step_impl(
        sample, model_output, coefficients, history, noise,
        clip, clip_range, scale, out_dtype, history_dtype, x0_dtype, torch.library.wrap_triton, absent_terms,
    )
    return [t for t in (out, d, x0) if t is not None]


if C.INTERPRETED:
    # triton_op derives its fake by running the function on fake tensors, trusting
    # wrap_triton to record the launch instead of running it; wrap_triton cannot wrap an
    # interpreted kernel and returns it as is, which would read fake data. State the shapes.
    @fused_step_op.register_fake
    def _(sample, model_output, coefficients, history, noise, clip, clip_range, scale,
          out_dtype, history_dtype, x0_dtype, philox_seed=None, philox_offset=0, philox_base=None, absent_terms=0):
        dtypes = (out_dtype, history_dtype, x0_dtype)
        return [torch.empty(sample.shape, dtype=t, device=sample.device) for t in dtypes if t is not None]
