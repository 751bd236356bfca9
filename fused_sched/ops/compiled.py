"""``fused_sched::fused_step`` as a torch.library custom op, for torch.compile.

Under ``torch.compile`` the public op calls this instead of dispatching in Python, so
dynamo records one opaque node (shapes and dtypes from the fake implementation) and never
traces into backend selection, extension loading or kernel launch code. Eager calls do not
go through it: the custom-op dispatcher costs tens of microseconds per call, which is most
of a small step's budget.
"""

from __future__ import annotations

from typing import Optional

import torch

from .philox import PhiloxNoise, signed_seed, unsigned_seed


def constant_columns_arguments(constant_columns) -> tuple[list[int], list[float]]:
    """A schema has no dict type: {column: value} travels as two lists."""
    items = sorted(dict(constant_columns or {}).items())
    return [column for column, _ in items], [value for _, value in items]


def noise_arguments(noise) -> tuple[torch.Tensor | None, int | None, int, torch.Tensor | None]:
    """A schema has no NamedTuple: PhiloxNoise(seed, offset) travels as (None, seed, offset,
    None), or (None, seed, 0, offset) when the offset is a device tensor, which then stays a
    graph input instead of a constant; the seed as its 64 bits in a signed int64; a tensor or
    None as (noise, None, 0, None)."""
    if isinstance(noise, PhiloxNoise):
        if isinstance(noise.offset, torch.Tensor):
            return None, signed_seed(noise.seed), 0, noise.offset
        return None, signed_seed(noise.seed), noise.offset, None
    return noise, None, 0, None


def _empty(like: torch.Tensor) -> torch.Tensor:
    # custom ops return tensors only: an output that was not asked for is an empty tensor
    return like.new_empty((0,))


@torch.library.custom_op("fused_sched::fused_step", mutates_args=())
def fused_step_op(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    history: list[torch.Tensor],
    noise: Optional[torch.Tensor],
    clip: str,
    clip_range: float,
    threshold_ratio: float,
    threshold_max: float,
    out_dtype: torch.dtype,
    history_dtype: Optional[torch.dtype],
    x0_dtype: Optional[torch.dtype],
    backend: Optional[str],
    constant_columns: list[int],
    constant_values: list[float],
    philox_seed: Optional[int] = None,
    philox_offset: int = 0,
    philox_base: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import run_backend

    if philox_seed is not None:
        noise = PhiloxNoise(unsigned_seed(philox_seed), philox_offset if philox_base is None else philox_base)

    prev, d, x0 = run_backend(sample, model_output, coefficients, tuple(history), noise, clip, clip_range,
                              threshold_ratio, threshold_max, out_dtype, history_dtype, x0_dtype, backend,
                              constant_columns=dict(zip(constant_columns, constant_values)))
    # The fake implementation promises fresh contiguous outputs.
    return (prev.contiguous().clone() if prev.data_ptr() == sample.data_ptr() else prev.contiguous(),
            _empty(sample) if d is None else d.contiguous(),
            _empty(sample) if x0 is None else x0.contiguous())


@fused_step_op.register_fake
def _(sample, model_output, coefficients, history, noise, clip, clip_range, threshold_ratio, threshold_max,
      out_dtype, history_dtype, x0_dtype, backend, constant_columns, constant_values, philox_seed=None,
      philox_offset=0, philox_base=None):
    def like(dtype):
        return _empty(sample) if dtype is None else sample.new_empty(sample.shape, dtype=dtype)

    return like(out_dtype), like(history_dtype), like(x0_dtype)
