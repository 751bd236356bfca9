"""What the Triton kernels share: interpreter detection, column constants, the x0 formula.

Rounding. The kernels evaluate exactly the operations of ``fused_sched/ops/reference.py``:
each ``torch.addcmul(a, b, c)`` there is computed by ATen as one fused multiply-add (its
AVX2/AVX-512 CPU kernels, and its CUDA kernel where value is 1, as the reference calls it:
an FFMA of b and c, read in the sm_90 machine code of torch 2.11.0+cu130, the oldest torch
this package supports), so here it is an explicit ``tl.fma``; every other product, sum and
quotient is a separately rounded fp32 operation. An explicit fma leaves the compiler
nothing to contract (Triton's ``enable_fp_fusion`` only fuses a plain multiply into a
following add, and no plain product here feeds a plain add), and divisions use
``tl.math.div_rn`` because Triton's ``/`` lowers to an approximate division on NVIDIA GPUs. Recent interpreters (Triton 3.9) evaluate ``tl.fma`` with a
correctly rounded fp32 fma, so on CPU the kernels reproduce the reference bit for bit;
older ones (3.6) multiply and then add, rounding twice, a last-place difference that a GPU
never shows. ``FMA_ROUNDS_ONCE`` says which (probed once, under the interpreter only).
"""

from __future__ import annotations

import contextlib

import torch

import triton
import triton.language as tl

from .. import layout as L
from .. import philox as _philox

# Kernels index a coefficient row through these, never through literals (see layout.py).
AX = tl.constexpr(L.AX)
AM = tl.constexpr(L.AM)
PX = tl.constexpr(L.PX)
P0 = tl.constexpr(L.P0)
PM = tl.constexpr(L.PM)
OX = tl.constexpr(L.OX)
O0 = tl.constexpr(L.O0)
OM = tl.constexpr(L.OM)
O1 = tl.constexpr(L.O1)
O2 = tl.constexpr(L.O2)
ON = tl.constexpr(L.ON)
AS = tl.constexpr(L.AS)
PS = tl.constexpr(L.PS)
AL = tl.constexpr(L.AL)
US = tl.constexpr(L.US)
UX = tl.constexpr(L.UX)
UM = tl.constexpr(L.UM)
OC = tl.constexpr(L.OC)
NUM_COEFFICIENTS = L.NUM_COEFFICIENTS

# Clip modes as kernel constants; positions of layout.CLIP_MODES.
CLIP_CODES = {name: code for code, name in enumerate(L.CLIP_MODES)}
CLIP_NONE = tl.constexpr(CLIP_CODES["none"])
CLIP_CLAMP = tl.constexpr(CLIP_CODES["clamp"])
CLIP_THRESHOLD = tl.constexpr(CLIP_CODES["threshold"])

# Noise sources as kernel constants; values of philox.NOISE_CODES.
NOISE_CODES = _philox.NOISE_CODES
NOISE_TENSOR = tl.constexpr(NOISE_CODES["tensor"])
NOISE_PHILOX = tl.constexpr(NOISE_CODES["philox"])
# noise (None | tensor | PhiloxNoise) -> (tensor or None, NOISE code, int64 seed, offset)
noise_arguments = _philox.kernel_arguments

# CUDA limits grid axes 1 and 2 to 65535 programs; batch rows go on axis 1 in chunks.
MAX_GRID_ROWS = 65535
INT32_LIMIT = 2**31 - 1
# Rows whose offsets could reach this are indexed in int64 (int32 is cheaper on the GPU).
WIDE_INDEX_FROM = INT32_LIMIT


@triton.jit
def _probe():
    pass


def _interpreted() -> bool:
    # Triton decides at decoration time, from TRITON_INTERPRET as it was then, whether a
    # @triton.jit function is compiled or interpreted; ask a decorated function rather
    # than the environment, which may have changed since.
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without an interpreter
        return False
    return isinstance(_probe, InterpretedFunction)


INTERPRETED = _interpreted()


_ONE = tl.constexpr(1)


@triton.jit
def empty_sum(like):
    """-0.0 per element, where every sum starts: the identity of addition, so a first term
    fma(a, t, -0.0) is the product a*t rounded once, sign of zero included."""
    return tl.full(like.shape, -0.0, tl.float32)


# A product that a later sum takes as an addend (d = PS*sum, then d - h1) is contracted into
# an fma under fp fusion, by LLVM or by ptxas, which rounds d differently from the
# reference; PTX's mul.rn is never contracted. The interpreter runs numpy, which never
# contracts.
_MUL_RN_BY_ASM = tl.constexpr(not INTERPRETED)


@triton.jit
def scaled(total, s):
    """total*s, rounded once on its own (see _MUL_RN_BY_ASM)."""
    if _MUL_RN_BY_ASM:
        result = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r",
                                           [total, tl.broadcast_to(s, total.shape)],
                                           dtype=tl.float32, is_pure=True, pack=1)
    else:
        result = total * s
    return result


@triton.jit
def add_term(total, a, t, COLUMN: tl.constexpr, ABSENT: tl.constexpr):
    """total + a*t rounded once, or total where bit COLUMN of ABSENT says the term is known
    to be 0 in every row (layout.absent_terms): left out, since 0*inf is NaN."""
    if (_ONE << COLUMN) & ABSENT:  # constexpr first: the interpreter passes ABSENT as an int
        result = total
    else:
        result = tl.fma(a, t, total)
    return result


@triton.jit
def data_estimate(x, m, ax, am, al, a_s, ABSENT: tl.constexpr):
    """x0 = AS*(AX*x + AM*m + AL*m) in fp32, rounded as the reference's addcmuls-then-product."""
    return add_term(add_term(add_term(empty_sum(x), ax, x, AX, ABSENT), am, m, AM, ABSENT), al, m, AL, ABSENT) * a_s


@triton.jit
def keep_unclipped_history_value(d, x, m, x0, x0c, coef, ABSENT: tl.constexpr):
    """With clipping: d where it changed x0 (or x0 is NaN); where it left x0 unchanged, for a
    row that gives it (US != 0), US*(UX*x + UM*m): the same value without the round trip
    through x0 (layout.py). A US known to be 0 in every row (its bit in ABSENT) compiles to d."""
    if (_ONE << US) & ABSENT:
        result = d
    else:
        us = tl.load(coef + US)
        unclipped = add_term(add_term(empty_sum(x), tl.load(coef + UX), x, UX, ABSENT), tl.load(coef + UM), m, UM,
                             ABSENT)
        result = tl.where(x0c == x0, tl.where(us != 0.0, scaled(unclipped, us), d), d)
    return result


# Triton's interpreter (3.x) converts float32 to bfloat16 by truncation, where the GPU and
# torch round to nearest even; under the interpreter the stores round explicitly.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def store(ptr, value, mask):
    """Stores fp32 ``value`` in the pointer's dtype with round-to-nearest-even."""
    if _ROUND_BF16_BY_HAND and ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        # Any NaN stays a NaN (the carry could turn a payload into inf); its bits are free.
        rounded = tl.where(value != value, 0x7FC00000, rounded)
        tl.store(ptr, (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fma_probe_kernel(a_ptr, b_ptr, c_ptr, out_ptr):
    tl.store(out_ptr, tl.fma(tl.load(a_ptr), tl.load(b_ptr), tl.load(c_ptr)))


def _fma_rounds_once() -> bool:
    """Whether tl.fma rounds once here: on a GPU always (fma.rn); the interpreter is asked.
    (1 + 2**-12)**2 - 1 is 2**-11 + 2**-24 exactly, but 2**-11 if the product is rounded
    first (its 2**-24 is half a unit in the last place of 1 + 2**-11: a tie, to even)."""
    if not INTERPRETED:
        return True
    a = torch.full((1,), 1.0 + 2.0**-12)
    out = torch.empty(1)
    _fma_probe_kernel[(1,)](a, a, torch.full((1,), -1.0), out)
    return out.item() == 2.0**-11 + 2.0**-24


FMA_ROUNDS_ONCE = _fma_rounds_once()


@triton.jit
def _loop_probe_kernel(out_ptr, n):
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out_ptr, total)


def _interpreter_defect() -> str | None:
    """Why this Triton's interpreter cannot run the kernels, or None (compiled: None). The
    histogram kernel loops over a runtime argument, which Triton 3.6's interpreter fails
    to do under NumPy 2 (it converts a one-element array to a Python int)."""
    if not INTERPRETED:
        return None
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe_kernel[(1,)](out, 3)
    except Exception as error:  # any failure: report it, never run kernels on a broken interpreter
        return (f"Triton {triton.__version__}'s interpreter cannot loop over a runtime argument here, which the "
                f"kernels do ({type(error).__name__}: {error}); use Triton >= 3.7 or a GPU")
    if out.item() != 3:
        return f"Triton {triton.__version__}'s interpreter ran a 3-iteration loop {out.item()} times"
    return None


INTERPRETER_DEFECT = _interpreter_defect()


def direct(kernel):
    """Eager launches call the kernel itself (``wrap_triton`` adds dispatch overhead)."""
    return kernel


_NO_GUARD = contextlib.nullcontext()  # reusable, and cheaper than a new one per call


def device_guard(device: torch.device):
    # Triton launches on the current CUDA device; switch only when the tensors live on
    # another one (a context switch costs a few microseconds on the hot path).
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_GUARD


def row_geometry(sample, per_row: bool):
    """(rows, elements per row) the kernels iterate over.

    Without per-row data (one coefficient row, no per-row scale) the whole tensor is one
    row: one grid axis, no batch arithmetic, the most common case of a diffusion step.
    """
    numel = sample.numel()
    if not per_row:
        return 1, numel
    rows = sample.shape[0]
    return rows, numel // rows
