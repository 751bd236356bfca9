"""In-kernel counter-based normal noise: ``noise=PhiloxNoise(seed, offset)``.

Instead of reading a noise tensor, the fused step computes z for the element with global
flat index i (row-major over the whole logical tensor, batch included) from the counter
``offset + i`` and the key ``seed``, so it needs no tensor, is reproducible, and gives every
element the same number however the tensor is split (into blocks, threads, batch rows or
separate calls whose offsets advance by the elements before them).

The generator is Triton's ``tl.randn(seed, offset)`` exactly, so the Triton kernel simply
calls it and this module, ``csrc/include/fused_sched/philox.h`` (CPU and CUDA) and Triton
produce the same numbers:

1. Philox4x32-10: counter (c0, c1, c2, c3) = (low 32 bits of the counter, high 32 bits, 0,
   0), key (k0, k1) = (low 32 bits of the seed, high 32 bits); ten rounds of
   ``c0, c1, c2, c3 = hi(B*c2) ^ c1 ^ k0, lo(B*c2), hi(A*c0) ^ c3 ^ k1, lo(A*c0)`` with
   A = 0xD2511F53, B = 0xCD9E8D57, the key raised by (0x9E3779B9, 0xBB67AE85) after each.
2. The first two outputs c0, c1 become uniforms in [0, 1): the uint32 read as int32 v,
   ``v = ~v if v < 0``, then ``float32(v) * float32(4.6566127342e-10)``.
3. Box-Muller, first output only, in float32: ``u1 = max(1e-7, u1)``,
   ``z = sqrt(-2*log(u1)) * cos(float32(2*pi) * u2)``.

Steps 1 and 2 are exact integer and IEEE operations: every backend produces the same
bits. Step 3 calls log / sqrt / cos, which libm, SLEEF (torch on CPU), numpy (Triton's
interpreter) and CUDA's libdevice each round within a few ulp, so z agrees across backends
to a few float32 ulp (tests/test_philox_noise.py states the bound); on one backend and
machine it is bit-reproducible.

The numbers are not those of ``torch.randn`` with a generator: this mode is opt-in
(``scheduler.use_philox_noise(seed)``), and the diffusers-compatible noise stays the default.

This module holds the executable reference of the generator: uint32 arithmetic emulated in
int64 tensors (a product of two 32-bit halves is split into 16-bit pieces so that nothing
overflows), on any device.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

__all__ = [
    "NOISE_CODES",
    "PhiloxNoise",
    "check_noise",
    "kernel_arguments",
    "philox_bits",
    "philox_normal",
    "philox_uniform",
]

SEED_LIMIT = 2**64  # seeds are 64-bit keys: 0 <= seed < 2**64
OFFSET_LIMIT = 2**63  # counters are indexed in int64: offset + numel <= 2**63 - 1

# Noise sources as the kernels number them (Triton's NOISE constexpr, csrc's NoiseSource).
NOISE_CODES = {"none": 0, "tensor": 1, "philox": 2}

_MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10

# Float32 constants of Triton's uint_to_uniform_float / pair_uniform_to_normal (Python
# floats that Triton rounds to float32).
_UNIFORM_SCALE = 4.6566127342e-10
_MIN_U1 = 1.0e-7
_TWO_PI = 6.283185307179586


class PhiloxNoise(NamedTuple):
    """Counter-based normal noise computed inside the fused step (see the module docstring).

    seed: the key, an int in [0, 2**64). offset: the counter of the tensor's first element,
    an int >= 0, or a 0-dim int64 tensor on the sample's device that every backend reads
    from device memory when its kernel runs (a scheduler's counter: a step traced by
    torch.compile takes it as a graph input, a captured CUDA graph reads its value at each
    replay, and nothing reads it on the host). Element i uses counter ``offset + i``, and
    ``offset + numel`` must stay below 2**63: checked for an int; for a tensor that check
    would need a host read (a sync), so it is the caller's to keep. Successive draws that
    must be independent use disjoint counter ranges, e.g. offsets advanced by ``numel`` per
    draw (what the schedulers do). A tensor offset gives the same bits as the int offset of
    the same value, on every backend.
    """

    seed: int
    offset: int | torch.Tensor = 0


def _as_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise TypeError(f"PhiloxNoise {name} must be an int, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        raise TypeError(f"PhiloxNoise {name} must be a Python int, not a tensor (reading it would sync)")
    return operator.index(value)


def check_seed(seed) -> int:
    """The seed as an int, or a TypeError / ValueError naming it."""
    seed = _as_int("seed", seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"PhiloxNoise seed={seed} is outside [0, 2**64)")
    return seed


def check_noise(noise: PhiloxNoise, sample: torch.Tensor) -> PhiloxNoise:
    """Validated ``PhiloxNoise`` for ``sample``'s elements (ints normalised)."""
    seed = check_seed(noise.seed)
    numel = sample.numel()
    if isinstance(noise.offset, torch.Tensor):
        offset = noise.offset
        if offset.dtype != torch.int64 or offset.dim() != 0 or offset.device != sample.device:
            raise ValueError(
                f"PhiloxNoise offset must be an int or a 0-dim int64 tensor on the sample's device {sample.device}, "
                f"got a {offset.dtype} tensor of shape {tuple(offset.shape)} on {offset.device}"
            )
        return noise if type(seed) is type(noise.seed) is int else PhiloxNoise(seed, offset)
    offset = _as_int("offset", noise.offset)
    if offset < 0:
        raise ValueError(f"PhiloxNoise offset={offset} must be >= 0")
    if offset + numel >= OFFSET_LIMIT:
        raise ValueError(
            f"PhiloxNoise offset={offset} + {numel} elements reaches 2**63: counters are indexed in int64"
        )
    if type(seed) is type(noise.seed) is int and type(offset) is type(noise.offset):
        return noise
    return PhiloxNoise(seed, offset)


def signed_seed(seed: int) -> int:
    """The seed's 64 bits as a signed int64 (what the kernels and custom-op schemas take)."""
    return seed - SEED_LIMIT if seed >= 2**63 else seed


def unsigned_seed(seed: int) -> int:
    """Inverse of :func:`signed_seed`."""
    return seed + SEED_LIMIT if seed < 0 else seed


def kernel_arguments(noise) -> tuple[torch.Tensor | None, int, int, int, torch.Tensor | None]:
    """(noise tensor or None, noise code, signed int64 seed, int offset, offset tensor or None)
    for the kernels: the first counter is the int offset plus the tensor's value if any."""
    if noise is None:
        return None, NOISE_CODES["none"], 0, 0, None
    if isinstance(noise, PhiloxNoise):
        if isinstance(noise.offset, torch.Tensor):
            return None, NOISE_CODES["philox"], signed_seed(noise.seed), 0, noise.offset
        return None, NOISE_CODES["philox"], signed_seed(noise.seed), noise.offset, None
    return noise, NOISE_CODES["tensor"], 0, 0, None


# ---- the reference generator, in int64 tensors


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product a*b, for a < 2**32 and 0 <= b < 2**32.

    The products with b's two 16-bit halves stay below 2**48, so int64 never overflows.
    """
    p_lo = (b & 0xFFFF) * a
    mid = (b >> 16) * a + (p_lo >> 16)  # = a*b >> 16, below 2**49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


# On CPU the rounds run over cache-sized pieces: some 260 elementwise int64 ops per value
# are memory-bound over a large tensor and several times faster from L2.
_CPU_PIECE = 1 << 15


def philox_bits(seed: int, offset: int | torch.Tensor, numel: int, device=None) -> torch.Tensor:
    """The two Philox4x32-10 outputs that ``tl.randn`` uses, for counters offset + [0, numel):
    an int64 tensor of shape (numel, 2) holding uint32 values. A 0-dim int64 tensor
    ``offset`` (on ``device``) is added to the counters on the device: its value is never
    read on the host."""
    seed = check_seed(seed)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu" and numel > _CPU_PIECE:
        out = torch.empty((numel, 2), dtype=torch.int64)
        for start in range(0, numel, _CPU_PIECE):
            stop = min(numel, start + _CPU_PIECE)
            out[start:stop] = _philox_bits(seed, offset + start, stop - start, device)
        return out
    return _philox_bits(seed, offset, numel, device)


def _philox_bits(seed: int, offset: int | torch.Tensor, numel: int, device) -> torch.Tensor:
    counter = torch.arange(numel, dtype=torch.int64, device=device) + offset  # a device add for a tensor
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return torch.stack((c0, c1), dim=1)


def philox_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for uint32 values held in int64: float32 in [0, 1)."""
    folded = torch.where(bits >= 2**31, bits ^ _MASK32, bits)  # int32 v < 0 -> ~v
    # below 2**31, so exact in float64; the cast to float32 is the one rounding
    as_float = folded.to(torch.float64).to(torch.float32)
    # A Python scalar, not a device tensor: torch.tensor(v, device="cuda") copies from the host,
    # which a CUDA-graph capture refuses. ATen rounds the scalar to float32 first, as before.
    return as_float * _UNIFORM_SCALE


def philox_normal(seed: int, offset: int | torch.Tensor, numel: int, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """``tl.randn(seed, offset + arange(numel))``: a 1-D float32 result cast to ``dtype``
    (``offset``: an int, or a 0-dim int64 tensor on ``device``, as in ``PhiloxNoise``)."""
    bits = philox_bits(seed, offset, numel, device)
    u = philox_uniform(bits)
    f32 = torch.float32
    u1 = u[:, 0].clamp_min(_MIN_U1)  # u is never NaN; scalars as in philox_uniform
    theta = u[:, 1] * _TWO_PI
    r = torch.sqrt(torch.log(u1) * -2.0)
    z = r * torch.cos(theta)
    return z if dtype == f32 else z.to(dtype)


def noise_like(noise: PhiloxNoise, sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The z tensor a ``PhiloxNoise`` stands for, shaped like ``sample``."""
    return philox_normal(noise.seed, noise.offset, sample.numel(), sample.device, dtype).reshape(sample.shape)
