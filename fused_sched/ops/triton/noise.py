"""The raw Philox outputs behind ``noise=PhiloxNoise`` in the Triton backend, for the tests
that check every backend computes the same bits. The fused step itself calls ``tl.randn``
(step.py), which draws these two outputs from ``tl.randint4x`` with the same arguments."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import philox
from . import _common as C

_BLOCK = 512


@triton.jit(do_not_specialize=["n", "seed", "offset"])
def _philox_bits_kernel(out_ptr, n, seed: tl.int64, offset: tl.int64, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    first, second, _, _ = tl.randint4x(seed, offset + index)
    tl.store(out_ptr + 2 * index, first.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 2 * index + 1, second.to(tl.int32, bitcast=True), mask=mask)


def philox_bits(seed: int, offset: int, numel: int, device, wrap=C.direct) -> torch.Tensor:
    """As ``philox.philox_bits``: int64 (numel, 2) holding the uint32 outputs. ``wrap`` as in
    step.launch_step (the GPU-compile tests record the launch with it)."""
    out = torch.empty((numel, 2), dtype=torch.int32, device=device)
    if numel:
        grid = (triton.cdiv(numel, _BLOCK),)
        wrap(_philox_bits_kernel)[grid](out, numel, philox.signed_seed(philox.check_seed(seed)), int(offset),
                                        BLOCK=_BLOCK)
    return out.to(torch.int64) & 0xFFFFFFFF
