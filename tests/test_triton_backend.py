"""The ``triton`` backend (fused_sched/ops/triton) against the executable spec, reference.py.

Runs on CPU through Triton's interpreter. TRITON_INTERPRET=1 must be in the environment
when the kernels are *decorated*, i.e. before ``fused_sched.ops.triton`` is first imported
(Triton reads it in ``@triton.jit``, not when ``triton`` itself is imported:
``test_interpreter_is_chosen_at_decoration`` checks this), so it is set at the very top,
before anything can import the kernels. On a machine with CUDA it is left alone and the
compiled kernels run on the GPU.

Tolerances. The kernels evaluate the reference's fp32 formula with the same operations in
the same order: each torch.addcmul of the reference is an explicit fma (ATen fuses addcmul
on AVX2/AVX-512 CPUs and on CUDA), every other product, sum and quotient is separately
rounded, and stores round to nearest even like ``Tensor.to``. A recent interpreter computes
an fma with one rounding, so on a CPU where ATen runs its FMA kernels every comparison is
bit-exact (rtol = atol = 0, NaN == NaN): one ulp of difference would mean the kernel
computes something else. Elsewhere (ATen's DEFAULT capability without FMA, an interpreter
whose tl.fma rounds twice, or the reference evaluated by a GPU's eager kernels) only fma
contraction can differ: a step's outputs then agree within 16 half-ulps of the sum of its
terms' magnitudes (``contraction_bound`` derives it), plus one ulp of the storage dtype,
since an fp32 difference can cross that type's rounding boundary; other comparisons within
a few fp32 ulps (``tolerance``). Thresholding selects order statistics exactly; only its
final lerp can round differently there (one ulp).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import itertools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from conftest import skip_unavailable_backend, subprocess_env  # noqa: E402
from drivers import quantile_rows, record_calls  # noqa: E402
from fused_sched import ops  # noqa: E402
from fused_sched.ops import layout, reference  # noqa: E402

try:
    import fused_sched.ops.triton as triton_backend  # noqa: E402
except ImportError as error:
    skip_unavailable_backend("triton", f"fused_sched.ops.triton does not import: {error}", allow_module_level=True)
from fused_sched.ops.triton import _common, step, threshold  # noqa: E402

if not triton_backend.INTERPRETED and not torch.cuda.is_available():
    pytest.skip(
        "fused_sched.ops.triton was imported without TRITON_INTERPRET=1 before this module, and there is no GPU",
        allow_module_level=True,
    )

# The interpreter evaluates with numpy, which warns about the inf/NaN arithmetic tested here.
if triton_backend.INTERPRETED and _common.INTERPRETER_DEFECT is not None:
    # The backend reports itself unavailable here; its kernels cannot run to be tested.
    skip_unavailable_backend("triton", _common.INTERPRETER_DEFECT, allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu" if triton_backend.INTERPRETED else "cuda")
BACKEND = triton_backend.BACKEND
K = layout.NUM_COEFFICIENTS
STORAGE = (torch.float32, torch.float16, torch.bfloat16)
# On CPU the reference's addcmul is one fma only where ATen has a vectorised kernel, and the
# interpreter's tl.fma is one only in recent Triton (_common.FMA_ROUNDS_ONCE).
EXACT_EXPECTED = (triton_backend.INTERPRETED and _common.FMA_ROUNDS_ONCE
                  and torch.backends.cpu.get_cpu_capability() != "DEFAULT")
EXACT = dict(rtol=0.0, atol=0.0, equal_nan=True)


def tolerance(dtype):
    """Bit-exact where the reference fuses addcmul as the kernels do; elsewhere a few fp32
    ulps of values O(1..100) (atol = 64 ulp(1)) and one ulp of the storage dtype."""
    if EXACT_EXPECTED:
        return EXACT
    eps32 = torch.finfo(torch.float32).eps
    eps = max(eps32, torch.finfo(dtype).eps)
    return dict(rtol=eps, atol=64 * eps32, equal_nan=True)


def assert_same(got, expected, bound=None):
    """got == expected bit for bit where that is expected (EXACT_EXPECTED); elsewhere within
    ``bound`` (per element, see contraction_bound) if given, else ``tolerance``."""
    assert (got is None) == (expected is None)
    if got is None:
        return
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.device == expected.device
    if EXACT_EXPECTED or bound is None:
        torch.testing.assert_close(got, expected, **tolerance(expected.dtype))
        return
    # plus one unit of the storage dtype: an fp32 difference can cross its rounding boundary
    allowed = bound + torch.finfo(expected.dtype).eps * expected.double().abs()
    difference = (got.double() - expected.double()).abs()
    ok = (got == expected) | (got.isnan() & expected.isnan()) | (difference <= allowed)
    worst = int(torch.where(ok, 0.0, difference / allowed).flatten().argmax())
    assert bool(ok.all()), (f"{int((~ok).sum())} of {ok.numel()} elements beyond the rounding bound; worst at flat "
                            f"index {worst}: got {got.flatten()[worst]}, expected {expected.flatten()[worst]}, "
                            f"allowed difference {allowed.flatten()[worst]}")


def contraction_bound(x, m, c, h, z):
    """Per element, how far apart two fp32 evaluations of layout.py's formula can be when they
    differ only in which products are fused into a following add (an fma rounds once, a
    product then a sum twice). Every operation rounds at most once more, by at most half an
    fp32 ulp (2**-24 relative) of a value no larger than the sum of the magnitudes of the
    terms it combines, and a difference reaches the output scaled by the coefficients that
    make up that sum. The formula has fewer than 16 operations on any path, so 16 * 2**-24
    of the largest such sum (x0's, d's or the output's) bounds all three outputs; clipping
    (clamp, or the threshold's clamp and division by s >= 1) only shrinks a difference."""
    def column(k):
        return c[:, k].double().abs().reshape((-1,) + (1,) * (x.dim() - 1))

    def size(t):
        return t.double().abs()

    x0 = column(layout.AS) * (column(layout.AX) * size(x) + (column(layout.AM) + column(layout.AL)) * size(m))
    d = column(layout.PX) * size(x) + column(layout.P0) * x0 + column(layout.PM) * size(m)
    out = (column(layout.OX) * size(x) + column(layout.OC) * x0 + column(layout.O0) * d
           + column(layout.OM) * size(m))
    values = (d,) + tuple(size(t) for t in h)  # history enters as d - h1, h1 - h2
    for k, newer, older in zip((layout.O1, layout.O2), values, values[1:]):
        out = out + column(k) * (newer + older)
    if z is not None:
        out = out + column(layout.ON) * size(z)
    return 16 * 2.0**-24 * torch.maximum(torch.maximum(x0, d), out)


def make_case(shape, dtypes, coefficient_rows, seed, history=0, noise=False, magnitude=2.0):
    """Inputs of one step; dtypes is the storage of (x, m, h1, h2, z)."""
    g = torch.Generator().manual_seed(seed)

    def randn(dtype):
        return (torch.randn(shape, generator=g) * magnitude).to(dtype).to(DEVICE)

    x, m = randn(dtypes[0]), randn(dtypes[1])
    h = tuple(randn(dtypes[2 + i]) for i in range(history))
    z = randn(dtypes[4]) if noise else None
    rows = shape[0] if coefficient_rows == "per_row" else 1
    c = torch.randn((rows, K), generator=g).to(DEVICE)
    return x, m, c, h, z


def run_both(x, m, c, h, z, clip, out_dtype, history_dtype, x0_dtype, clip_range=1.5, ratio=0.9, max_value=3.0):
    # The step kernel is checked against the reference's scale, thresholding separately.
    scale = reference.threshold_scale(x, m, c, ratio, max_value) if clip == "threshold" else None
    got = BACKEND.fused_step(x, m, c, h, z, clip, clip_range, scale, out_dtype, history_dtype, x0_dtype)
    expected = reference.fused_step(x, m, c, h, z, clip, clip_range, scale, out_dtype, history_dtype, x0_dtype)
    bound = None if EXACT_EXPECTED else contraction_bound(x, m, c, h, z)
    for g, e in zip(got, expected):
        assert_same(g, e, bound)


# ---- the step kernel ----

OUTPUTS = [(None, None), (torch.float32, None), (None, torch.float32), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("clip", layout.CLIP_MODES)
def test_every_specialisation(clip):
    """clip x history terms x noise x optional outputs, one row per batch element."""
    for history, noise, (history_dtype, x0_dtype) in itertools.product((0, 1, 2), (False, True), OUTPUTS):
        x, m, c, h, z = make_case((2, 17), (torch.float32,) * 5, "per_row", seed=history, history=history, noise=noise)
        run_both(x, m, c, h, z, clip, torch.float32, history_dtype, x0_dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_every_specialisation_low_precision(dtype):
    for clip, history, noise in itertools.product(layout.CLIP_MODES, (0, 2), (False, True)):
        x, m, c, h, z = make_case((2, 17), (dtype,) * 5, "per_row", seed=5, history=history, noise=noise)
        run_both(x, m, c, h, z, clip, dtype, dtype, dtype)


SHAPES = [(1, 1), (2, 17), (3, 4099), (2, 3, 5, 7), (2, 2, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rows", ["broadcast", "per_row"])
def test_shapes(shape, rows):
    """Row lengths of 1, 17 and 4099 (several blocks and a ragged tail), 4-D and 5-D latents."""
    for k, clip in enumerate(layout.CLIP_MODES):
        x, m, c, h, z = make_case(shape, (torch.float32,) * 5, rows, seed=10 + k, history=2, noise=True)
        run_both(x, m, c, h, z, clip, torch.float32, torch.float32, torch.float32)


@pytest.mark.parametrize("config", step.AUTOTUNE_CONFIGS, ids=lambda c: f"block{c.kwargs['BLOCK']}-warps{c.num_warps}")
def test_every_launch_configuration(monkeypatch, config):
    """Each configuration the autotuner may pick (or FUSED_SCHED_TRITON_AUTOTUNE=0 fixes)
    computes the reference, whichever wins on the device: a row of two whole blocks of the
    largest and a ragged tail, 16-bit storage, every clip mode, history and noise."""
    monkeypatch.setattr(step, "_step_launcher", step.launcher([config]))
    row = 2 * step.MAX_BLOCK + 5
    for k, (clip, dtype) in enumerate(itertools.product(layout.CLIP_MODES, (torch.float32, torch.bfloat16))):
        x, m, c, h, z = make_case((2, row), (dtype,) * 5, "per_row", seed=40 + k, history=2, noise=True)
        run_both(x, m, c, h, z, clip, dtype, torch.float32, dtype)


def test_autotuning_can_be_switched_off():
    """FUSED_SCHED_TRITON_AUTOTUNE=0 leaves the compiled launcher one configuration (no timing
    on a first step); unset, it tunes over every one (the launcher test_triton_gpu_compile
    compiles). The import in compiled mode runs in a subprocess (no GPU needed to import)."""
    assert step.autotune_requested(None) and step.autotune_requested("1") and step.autotune_requested(" yes ")
    assert not any(step.autotune_requested(v) for v in ("0", "false", "No", " OFF "))
    code = "from fused_sched.ops.triton import step\nprint([c.kwargs['BLOCK'] for c in step._step_launcher.configs])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=subprocess_env(drop=("TRITON_INTERPRET",), FUSED_SCHED_TRITON_AUTOTUNE="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str([step.FIXED_CONFIG.kwargs["BLOCK"]])


def test_per_row_coefficients_are_applied_per_row():
    """Batch row b uses coefficient row b: a row's result equals a one-row step on it."""
    x, m, c, h, z = make_case((3, 40), (torch.float32,) * 5, "per_row", seed=3, history=1, noise=True)
    prev, _, _ = BACKEND.fused_step(x, m, c, h, z, "clamp", 1.0, None, torch.float32, None, None)
    for b in range(3):
        one, _, _ = BACKEND.fused_step(x[b:b + 1], m[b:b + 1], c[b:b + 1], tuple(t[b:b + 1] for t in h),
                                       z[b:b + 1], "clamp", 1.0, None, torch.float32, None, None)
        assert torch.equal(prev[b:b + 1], one)
    assert not torch.equal(prev[0], prev[1])


MIXED = [
    (torch.float16,) * 5,
    (torch.bfloat16,) * 5,
    (torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16, torch.float32, torch.bfloat16, torch.float16),
]
OUT_DTYPES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.float16, torch.bfloat16),
    (torch.float16, torch.bfloat16, torch.float64),
]


@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
def test_storage_dtypes(dtypes):
    """Each tensor in its own dtype; outputs in fp32, fp16, bf16 and fp64 (an fp32 result widened)."""
    for k, (clip, outs) in enumerate(itertools.product(layout.CLIP_MODES, OUT_DTYPES)):
        x, m, c, h, z = make_case((2, 300), dtypes, "per_row", seed=20 + k, history=2, noise=True, magnitude=8.0)
        run_both(x, m, c, h, z, clip, *outs)


def test_non_contiguous_inputs():
    """Strided inputs are accepted: the host wrapper makes one explicit contiguous copy."""
    g = torch.Generator().manual_seed(3)

    def randn(*shape):  # on the device first: a copy between devices may not keep a view's strides
        return torch.randn(shape, generator=g).to(DEVICE)

    x = randn(2, 6, 9, 8).transpose(1, 3)  # permuted
    m = randn(2, 8, 9, 12)[..., ::2]  # sliced
    h1 = randn(2, 8, 9, 6).to(torch.float16).contiguous(memory_format=torch.channels_last)
    z = randn(1, 8, 9, 6).expand(2, 8, 9, 6)  # broadcast (stride 0)
    c = randn(K, 2).t()  # (2, K) column-major
    assert not any(t.is_contiguous() for t in (x, m, h1, z, c))
    for clip in layout.CLIP_MODES:
        run_both(x, m, c, (h1,), z, clip, torch.float32, torch.float32, torch.float16)
    assert_same(BACKEND.threshold_scale(x, m, c, 0.8, 5.0), reference.threshold_scale(x, m, c, 0.8, 5.0))


def test_special_values_propagate():
    """inf, NaN, signed zeros and subnormals reach the outputs exactly as in the reference."""
    x = torch.tensor([[0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e38, -1e-45, 3.0]], device=DEVICE)
    m = torch.tensor([[1.0, -1.0, 1.0, 2.0, 0.0, 1e38, 5.0, float("nan")]], device=DEVICE)
    c = torch.linspace(-2, 2, K, device=DEVICE).reshape(1, K)
    for clip in layout.CLIP_MODES:
        run_both(x, m, c, (x, m), m, clip, torch.float32, torch.float32, torch.float32)
        run_both(x, m, c, (), None, clip, torch.float16, torch.bfloat16, torch.float16)


def test_bfloat16_stores_round_to_nearest_even():
    """Halfway and near-halfway fp32 values, inf overflow and NaN, stored as bf16 like Tensor.to."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x7F7FFFFF, 0xFF7F8000, 0x7FC00001, 0x00008000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32).reshape(1, -1).to(DEVICE)
    c = torch.zeros(1, K, device=DEVICE)
    c[0, layout.OX] = 1.0  # prev = x exactly
    prev, _, _ = BACKEND.fused_step(bits, bits, c, (), None, "none", 1.0, None, torch.bfloat16, None, None)
    expected = bits.to(torch.bfloat16)
    # NaN payloads are not part of the contract (ATen's vector and scalar paths differ).
    nan = expected.isnan()
    assert torch.equal(prev.isnan(), nan)
    assert torch.equal(prev[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_row_chunks_beyond_the_grid_limit(monkeypatch):
    """More batch rows than grid axis 1 holds go in several launches (limit lowered to 2 here)."""
    monkeypatch.setattr(_common, "MAX_GRID_ROWS", 2)
    x, m, c, h, z = make_case((5, 33), (torch.float32,) * 5, "per_row", seed=4, history=2, noise=True)
    for clip in ("clamp", "threshold"):
        run_both(x, m, c, h, z, clip, torch.float32, torch.float32, torch.float32)


def test_wide_index_path(monkeypatch):
    """The int64 in-row offsets used for rows of 2**31 elements or more (threshold lowered here)."""
    monkeypatch.setattr(_common, "WIDE_INDEX_FROM", 1000)
    x, m, c, h, z = make_case((2, 1500), (torch.float32,) * 5, "per_row", seed=6, history=1, noise=True)
    run_both(x, m, c, h, z, "threshold", torch.float32, torch.float32, torch.float32)
    assert_same(BACKEND.threshold_scale(x, m, c, 0.7, 50.0), reference.threshold_scale(x, m, c, 0.7, 50.0))


def test_empty_tensors():
    x = torch.empty(2, 0, 3, device=DEVICE)
    c = torch.ones(1, K, device=DEVICE)
    out, d, x0 = BACKEND.fused_step(x, x, c, (), None, "clamp", 1.0, None, torch.float16, torch.float32, None)
    assert out.shape == x.shape and out.dtype == torch.float16 and d.shape == x.shape and x0 is None
    with pytest.raises(ValueError, match="at least one element per batch row"):
        BACKEND.threshold_scale(x, x, c, 0.5, 2.0)


# ---- dynamic thresholding ----


def _identity_rows(b):
    """Coefficients with x0 = x exactly (AX = 1, AM = 0, AS = 1)."""
    c = torch.zeros(b, K, device=DEVICE)
    c[:, layout.AX] = 1.0
    c[:, layout.AS] = 1.0
    return c


QUANTILE_CASES = [(0.995, 1e30), (0.37, 1e30), (1.0, 1e30), (0.5, 1e30), (0.9, 2.5), (0.3, 0.5), (0.0, 1e30)]


@pytest.mark.parametrize("data", ["random", "above_one", "wide_range", "ties", "constant", "nan", "signed_zeros"])
@pytest.mark.parametrize("n", [1, 2, 17, 1000])
def test_threshold_scale_equals_torch_quantile(data, n):
    """Bit-exact torch.quantile(|x0|, q, dim=1).clamp(1, max): rank q*(n-1) is a fraction
    for most (q, n) here (e.g. 0.37*16 = 5.92), an integer for q = 1 and for q = 0.5 at odd n,
    so both the two-statistic lerp and the single-statistic path run; max_value 0.5 < 1
    checks that max wins as in torch.clamp."""
    g = torch.Generator().manual_seed(n)
    x = quantile_rows(data, n, g).to(DEVICE)
    m = torch.randn(x.shape, generator=g).to(DEVICE)
    c = _identity_rows(3)
    for ratio, max_value in QUANTILE_CASES:
        expected = torch.quantile(x.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)
        got = BACKEND.threshold_scale(x, m, c, ratio, max_value)
        torch.testing.assert_close(got, expected, **(EXACT if EXACT_EXPECTED else dict(rtol=2.0**-23, atol=0.0, equal_nan=True)))
        if data == "nan":
            assert got[1].isnan() and not got[0].isnan() and not got[2].isnan()


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_threshold_scale_equals_reference(dtype):
    """Arbitrary coefficients (x0 = AS*(AX*x + AM*m) recomputed in every pass), per-row and shared."""
    for k, shape in enumerate([(1, 1), (2, 17), (3, 4099), (2, 3, 5, 7)]):
        for rows in ("broadcast", "per_row"):
            x, m, c, _, _ = make_case(shape, (dtype, torch.float32, dtype, dtype, dtype), rows, seed=30 + k, magnitude=3.0)
            for ratio, max_value in ((0.995, 1e30), (0.37, 4.0)):
                assert_same(BACKEND.threshold_scale(x, m, c, ratio, max_value),
                            reference.threshold_scale(x, m, c, ratio, max_value))


def test_threshold_scale_infinite_order_statistics():
    """Zero-SNR epsilon step: AS = inf makes x0 = +-inf (NaN where AX*x + AM*m is 0). Equal
    infinite statistics give inf (torch.quantile's lerp would give NaN), as the reference does."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, generator=g).to(DEVICE)
    m = torch.randn(3, 50, generator=g).to(DEVICE)
    c = torch.zeros(3, K, device=DEVICE)
    c[:, layout.AX], c[:, layout.AM] = 1.0, -0.5
    c[0, layout.AS] = float("inf")  # every |x0| infinite
    c[1, layout.AS] = 1.0
    c[2, layout.AS] = 1e38  # some overflow to inf, some stay finite
    for ratio in (0.995, 0.5, 0.1):
        expected = reference.threshold_scale(x, m, c, ratio, 1e30)
        assert_same(BACKEND.threshold_scale(x, m, c, ratio, 1e30), expected)
        assert expected[0] == 1e30


def test_threshold_scale_many_programs_per_row(monkeypatch):
    """Small tiles, so each row spans many programs that each loop over several tiles and
    merge their histograms with atomics."""
    monkeypatch.setattr(threshold, "INTERPRETER_BLOCK", 64)
    monkeypatch.setattr(threshold, "INTERPRETER_SMS", 4)
    parts, tiles = threshold._partition(2, 3001, 64, 4)
    assert parts > 1 and tiles > 1
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 3001, generator=g) * 5).to(DEVICE)
    m = torch.randn(2, 3001, generator=g).to(DEVICE)
    c = torch.randn(2, K, generator=g).to(DEVICE)
    assert_same(BACKEND.threshold_scale(x, m, c, 0.83, 1e30), reference.threshold_scale(x, m, c, 0.83, 1e30))


def test_threshold_scale_row_above_2_pow_24(monkeypatch):
    """No 2**24 limit (torch.quantile's): one row of 2**24 + 3 elements, against kthvalue.
    Interpreted tiles of 2**20 elements keep this to about 30 s on CPU."""
    monkeypatch.setattr(threshold, "INTERPRETER_BLOCK", 2**20)
    n = 2**24 + 3
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(1, n, generator=g) * 3).to(DEVICE)
    m = torch.randn(1, n, generator=g).to(DEVICE)
    c = torch.zeros(1, K, device=DEVICE)
    c[0, layout.AX], c[0, layout.AM], c[0, layout.AS] = 1.25, -0.5, 0.75
    for ratio in (0.995, 0.6):
        assert_same(BACKEND.threshold_scale(x, m, c, ratio, 100.0), reference.threshold_scale(x, m, c, ratio, 100.0))


# ---- routing, availability, torch.compile ----


def _call(backend, dtype=torch.float32, **kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype).to(DEVICE)
    m = torch.randn(2, 4, 8, 8, generator=g).to(dtype).to(DEVICE)
    c = torch.randn(2, K, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32).to(DEVICE)
    return ops.fused_step(x, m, c, history=(x,), clip="threshold", threshold_ratio=0.9, threshold_max=2.0,
                          history_dtype=dtype, x0_dtype=dtype, backend=backend, **kwargs)


def test_public_op_routes_to_the_triton_backend(monkeypatch):
    assert ops.select_backend(DEVICE, (torch.float32,), "triton") is BACKEND
    calls = record_calls(monkeypatch, BACKEND, ("fused_step", "threshold_scale"))
    got = _call("triton")
    assert calls == ["threshold_scale", "fused_step"]
    expected = _call("torch")
    for g, e in zip(got, expected):
        assert_same(g, e)


def test_float64_is_unavailable():
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        _call("triton", dtype=torch.float64)
    reason = BACKEND.unavailable_reason(DEVICE, (torch.float32, torch.float64))
    assert reason is not None and "torch.float64" in reason


def test_unavailable_reasons(monkeypatch):
    assert BACKEND.unavailable_reason(DEVICE, STORAGE) is None
    assert "CUDA" in BACKEND.unavailable_reason(torch.device("meta"), (torch.float32,))
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    reason = BACKEND.unavailable_reason(torch.device("cpu"), (torch.float32,))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    # ROCm's GPUs are "cuda" devices to torch; the kernels' inline PTX is NVIDIA's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    reason = BACKEND.unavailable_reason(torch.device("cuda"), (torch.float32,))
    assert reason is not None and "ROCm build (HIP 6.4.0)" in reason


def test_fma_probe_tells_how_tl_fma_rounds():
    """_common.FMA_ROUNDS_ONCE (which decides whether these tests expect bit-exactness) says
    what tl.fma does here: on triples where one rounding and two give different floats, the
    kernel gives the once-rounded value everywhere if the probe says so, else the twice-
    rounded one. Once-rounded: from float64, where a product of two floats is exact and the
    sum's rounding before the one to float32 changes nothing in these random cases."""
    g = torch.Generator().manual_seed(4)
    a, b, c = (torch.randn(4096, generator=g) for _ in range(3))
    once = (a.double() * b.double() + c.double()).float()
    twice = a * b + c  # two separate ATen ops: two roundings
    differ = once != twice
    assert int(differ.sum()) > 100
    a, b, c, once, twice = (t[differ].to(DEVICE) for t in (a, b, c, once, twice))
    out = torch.empty_like(a)
    for i in range(a.numel()):  # the probe kernel on one element at a time
        _common._fma_probe_kernel[(1,)](a[i:], b[i:], c[i:], out[i:])
    assert torch.equal(out, once if _common.FMA_ROUNDS_ONCE else twice)


def test_a_broken_interpreter_makes_the_backend_unavailable(monkeypatch):
    """What the interpreter probe finds is the backend's reason not to run CPU tensors."""
    monkeypatch.setattr(_common, "INTERPRETER_DEFECT", "a broken interpreter")
    expected = "a broken interpreter" if triton_backend.INTERPRETED else BACKEND.unavailable_reason("cpu", ())
    assert BACKEND.unavailable_reason("cpu", (torch.float32,)) == expected
    if torch.cuda.is_available():
        assert BACKEND.unavailable_reason("cuda", (torch.float32,)) is None


def test_interpreter_is_chosen_at_decoration():
    """TRITON_INTERPRET is read when @triton.jit runs, not when triton is imported, so setting
    it after `import triton` but before the kernels' module is imported is enough."""
    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.runtime.interpreter import InterpretedFunction
        os.environ["TRITON_INTERPRET"] = "1"
        @triton.jit
        def k(x):
            pass
        print(isinstance(k, InterpretedFunction))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_registered_ops_match_the_backend():
    x, m, c, h, z = make_case((2, 3, 11), (torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.float32),
                              "per_row", seed=8, history=2, noise=True)
    scale = torch.ops.fused_sched.triton_threshold_scale(x, m, c, 0.9, 3.0)
    assert torch.equal(scale, BACKEND.threshold_scale(x, m, c, 0.9, 3.0))
    outs = torch.ops.fused_sched.triton_fused_step(x, m, c, list(h), z, "threshold", 1.0, scale,
                                                   torch.float16, None, torch.float32)
    direct = BACKEND.fused_step(x, m, c, h, z, "threshold", 1.0, scale, torch.float16, None, torch.float32)
    assert len(outs) == 2 and torch.equal(outs[0], direct[0]) and torch.equal(outs[1], direct[2])


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the registered ops (thresholding scale, then step).

    backend="eager" runs dynamo's graph with the ops as opaque nodes; on CPU that is as far as
    it goes: aot_eager and inductor trace *into* a triton_op through wrap_triton, which cannot
    wrap an interpreted kernel, so those need the compiled kernels on a GPU.
    """
    torch._dynamo.reset()
    x, m, c, h, z = make_case((2, 4, 5), (torch.float32,) * 5, "per_row", seed=12, history=2, noise=True)

    def step_fn(x, m, c, h1, h2, z):
        return BACKEND.fused_step(x, m, c, (h1, h2), z, "threshold", 1.0,
                                  BACKEND.threshold_scale(x, m, c, 0.9, 3.0), torch.float32, torch.float32, None)

    compiled = torch.compile(step_fn, fullgraph=True, backend="eager")
    got = compiled(x, m, c, *h, z)
    expected = step_fn(x, m, c, *h, z)
    assert got[2] is None
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ---- GPU code generation, checked without a GPU ----

_COMPILE_SCRIPT = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_sched.ops import layout as L
from fused_sched.ops.triton import INTERPRETED, step, threshold
assert not INTERPRETED
# sample prediction's absent terms (x0 = m): the kernels leave them out at compile time
ABSENT = L.absent_terms({L.AX: 0.0, L.PX: 0.0, L.PM: 0.0, L.OX: 0.0})
target = GPUTarget("cuda", 90, 32)

def build(fn, types, consts, num_warps=4, aligned=()):
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                          target=target, options={"num_warps": num_warps}).asm["ptx"]

ptrs = ["x_ptr", "m_ptr", "h1_ptr", "h2_ptr", "z_ptr", "coef_ptr", "scale_ptr", "out_ptr", "d_ptr", "x0_ptr"]
types = {p: "*fp32" for p in ptrs}
types.update(x_ptr="*bf16", d_ptr="*bf16", h2_ptr="*fp16", row_numel="i32", row_start="i32",
             coef_row_stride="i32", clip_range="fp32", size_class="i32", seed="i64", noise_offset="i64",
             offset_ptr="*i64")
# noise: 0 none, 1 tensor, 2 philox (tl.randn in the kernel); in_memory: the offset is loaded
for clip, history, noise, wide, in_memory in [(0, 0, 0, False, False), (1, 1, 1, False, False),
                                              (2, 2, 1, True, False), (0, 1, 2, False, False),
                                              (2, 0, 2, True, False), (0, 1, 2, False, True),
                                              (2, 2, 2, True, True)]:
    ptx = build(step._step_kernel, types, dict(CLIP=clip, HISTORY=history, NOISE=noise, WRITE_D=True,
                WRITE_X0=True, WIDE_INDEX=wide, OFFSET_IN_MEMORY=in_memory, ABSENT=ABSENT if clip == 1 else 0,
                BLOCK=2048), 8,
                aligned=ptrs + ["row_numel"])
    # The device-resident Philox offset: one 64-bit load, only where asked for.
    assert bool(re.search(r"ld\\.global[\\w.:]*\\.b64", ptx)) == in_memory, "offset load"
    # Contiguous fast path: 16-byte vector loads and stores; IEEE division only.
    assert re.search(r"ld\\.global[\\w.:]*\\.v4\\.b32", ptx) and "st.global.v4.b32" in ptx, "no vector access"
    assert "div.full" not in ptx and "div.approx" not in ptx
    assert ("div.rn.f32" in ptx) == (clip == 2)
    assert ("mul.hi.u32" in ptx) == (noise == 2), "Philox rounds (umulhi) exactly where noise is philox"
    # The step's arithmetic keeps float32 subnormals; only tl.randn's log, cos and sqrt take
    # libdevice's flush-to-zero paths, on inputs that are never subnormal (philox.py).
    assert noise == 2 or ".ftz" not in ptx, "flush-to-zero arithmetic in the step"
hist_types = dict(x_ptr="*fp32", m_ptr="*fp16", coef_ptr="*fp32", coef_row_stride="i32", state_ptr="*i64",
                  hist_ptr="*i64", row_numel="i32", tiles_per_program="i32")
narrow_types = dict(state_ptr="*i64", hist_ptr="*i64", scale_ptr="*fp32", weight="fp32", max_value="fp32")
layout = dict(PASSES=threshold.PASSES, MAX_BINS=threshold.MAX_BINS, STATE_WORDS=threshold.STATE_WORDS)
for index, (shift, bits) in enumerate(threshold.DIGITS):
    digit = dict(PASS=index, SHIFT=shift, BITS=bits, **layout)
    build(threshold._histogram_kernel, hist_types, dict(WIDE_INDEX=index == 3, BLOCK=threshold.GPU_BLOCK,
                                                        ABSENT=ABSENT if index == 1 else 0, **digit),
          threshold.GPU_WARPS, aligned=["x_ptr", "m_ptr", "row_numel"])
    build(threshold._narrow_kernel, narrow_types, dict(LAST=index == threshold.PASSES - 1, **digit), 2)
build(threshold._init_kernel, dict(state_ptr="*i64", hist_ptr="*i64", rank_lo="i64", rank_hi="i64"), layout)
print("ok")
"""


def test_kernels_compile_for_hopper():
    """Every kernel lowers to PTX for sm_90 (Triton needs no GPU for that): catches what the
    interpreter accepts but the compiler rejects, and checks the step's vectorised access."""
    pytest.importorskip("triton.backends.nvidia")
    # TRITON_DEFAULT_FP_FUSION: the current default, stated to silence Triton's notice
    env = subprocess_env(drop=("TRITON_INTERPRET",), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
