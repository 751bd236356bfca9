"""The compiled kernels of csrc/ against the executable spec, fused_sched.ops.reference.

Every equivalence test here runs the ``cpu`` backend (csrc/cpu) and csrc/cuda's kernels:
on machines without a GPU by the tests' CUDA emulator (``cuda-emulator``,
tests/cuda_emulator: the .cu sources compiled by the host compiler, a launch's threads
run on CPU threads), on a GPU by the ``cuda`` backend itself, fed the same inputs copied
to the device with their layout (``OnTheGpu``) and judged against the reference on the
CPU. All evaluate the shared step math of csrc/include, so the tolerances below hold for
each: the GPU rounds every product, sum and fma explicitly, as the host does.

Tolerances. The kernels evaluate the reference's formula with the same fp32 operations in
the same order and the same roundings (csrc/include/fused_sched/step_math.h): products
and sums separately rounded, except the reference's torch.addcmul terms, which ATen
computes as fused multiply-adds and the kernels as explicit fmas. Results are then cast
to the storage dtype once, with the round-to-nearest-even of ``Tensor.to``. So on a CPU
where ATen runs its AVX2 or AVX-512 kernels, every comparison with the reference is
bit-exact (rtol = atol = 0, NaN == NaN), fp32 and low-precision storage alike: one ulp of
difference would mean the kernel computes something other than the spec.

Under ATen's DEFAULT capability (no FMA: old CPUs, or ATEN_CPU_CAPABILITY=default) the
reference's addcmul and lerp round the product separately while the kernels still fuse,
so there each fp32 term may differ by an ulp and the tolerance is a few fp32 ulps of the
values' scale, plus one ulp of a low-precision storage dtype (a fp32 difference can move
a value across a rounding boundary of the narrower type).

Each is built (or loaded from its cache) once per test session by the module fixture
``kernels``; a cold build takes about a minute on two cores.
"""

from __future__ import annotations

import itertools
import platform
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import require_backend, subprocess_env
from drivers import quantile_rows, record_calls
from fused_sched import ops
from fused_sched.ops import layout, reference

ROOT = Path(__file__).resolve().parents[1]
EXACT = dict(rtol=0.0, atol=0.0, equal_nan=True)
ATEN_HAS_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
LOW_PRECISION = (torch.float16, torch.bfloat16)
STORAGE = (torch.float32, torch.float16, torch.bfloat16)
K = layout.NUM_COEFFICIENTS
ESTIMATE_TERMS = (layout.AX, layout.AM, layout.AL)  # the terms of x0 (data_estimate in step_math.h)
ESTIMATE_TERM_SETS = [tuple(c for j, c in enumerate(ESTIMATE_TERMS) if mask >> j & 1)
                      for mask in range(2 ** len(ESTIMATE_TERMS))]


def _load(name: str):
    start = time.perf_counter()
    backend = require_backend(name)
    print(f"\n{name} kernels ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return backend


def _on_device(value, device: torch.device):
    """``value`` with every tensor in it copied to ``device`` with its strides and storage
    offset (so a view off the 16-byte grid stays off it: allocations are aligned alike)."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        whole = torch.empty(0, dtype=value.dtype).set_(storage, 0, (storage.nbytes() // value.element_size(),))
        return whole.to(device).as_strided(value.shape, value.stride(), value.storage_offset())
    if isinstance(value, (tuple, list)):
        return type(value)(_on_device(v, device) for v in value)
    return value


def _on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple):
        moved = [_on_cpu(v) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    return value


class OnTheGpu:
    """The cuda backend driven with these tests' CPU tensors: each call's tensors copied to
    the GPU (``_on_device``), its tensor results copied back."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        attribute = getattr(self._backend, name)
        if not callable(attribute):
            return attribute
        device = torch.device("cuda")

        def on_the_gpu(*args, **kwargs):
            result = attribute(*_on_device(args, device), **{k: _on_device(v, device) for k, v in kwargs.items()})
            return _on_cpu(result)

        return on_the_gpu


@pytest.fixture(scope="module", params=["cpu", "cuda-emulator", "cuda"])
def kernels(request):
    """A compiled backend driven with CPU tensors; built on first use in this environment."""
    backend = _load(request.param)
    return OnTheGpu(backend) if request.param == "cuda" else backend


@pytest.fixture(scope="module")
def cpu():
    """The compiled cpu backend, for what only it has (threads, ISA clones, routing)."""
    return _load("cpu")


def make_case(shape, dtypes, coefficient_rows, seed, history=0, noise=False, scale_values=2.0):
    """Inputs of one step. dtypes: storage of (x, m, h1, h2, z)."""
    g = torch.Generator().manual_seed(seed)
    b = shape[0]

    def randn(dtype):
        return (torch.randn(shape, generator=g) * scale_values).to(dtype)

    x, m = randn(dtypes[0]), randn(dtypes[1])
    h = tuple(randn(dtypes[2 + i]) for i in range(history))
    z = randn(dtypes[4]) if noise else None
    c = torch.randn((b if coefficient_rows == "per_row" else 1, layout.NUM_COEFFICIENTS), generator=g)
    return x, m, c, h, z


def tolerance(dtype):
    """Exact where ATen fuses addcmul/lerp as the kernels do; see the module docstring."""
    if ATEN_HAS_FMA:
        return EXACT
    eps32 = torch.finfo(torch.float32).eps
    eps = max(eps32, torch.finfo(dtype).eps if dtype.is_floating_point else eps32)
    # Values here are O(1..100): a few fp32 ulps of that scale, or one storage ulp.
    return dict(rtol=eps, atol=64 * eps32, equal_nan=True)


def assert_same(got, expected):
    assert (got is None) == (expected is None)
    if got is None:
        return
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, **tolerance(expected.dtype))


def run_both(backend, x, m, c, h, z, clip, out_dtype, history_dtype, x0_dtype, clip_range=1.5, ratio=0.9, max_value=3.0):
    scale = reference.threshold_scale(x, m, c, ratio, max_value) if clip == "threshold" else None
    got = backend.fused_step(x, m, c, h, z, clip, clip_range, scale, out_dtype, history_dtype, x0_dtype)
    expected = reference.fused_step(x, m, c, h, z, clip, clip_range, scale, out_dtype, history_dtype, x0_dtype)
    for g, e in zip(got, expected):
        assert_same(g, e)


def test_header_columns_match_layout():
    """The C++ column enum and clip codes are the same contract as layout.py."""
    header = (ROOT / "csrc" / "include" / "fused_sched" / "step_math.h").read_text()
    columns = dict(re.findall(r"\bk([A-Z0-9]{2}|NumCoefficients) = (\d+)", header))
    assert {k: int(v) for k, v in columns.items()} == {
        **{name.upper(): getattr(layout, name.upper()) for name in layout.COLUMN_NAMES},
        "NumCoefficients": layout.NUM_COEFFICIENTS,
    }
    clips = dict(re.findall(r"\bk(None|Clamp|Threshold) = (\d+)", header))
    assert [int(clips[k]) for k in ("None", "Clamp", "Threshold")] == [layout.CLIP_MODES.index(m) for m in layout.CLIP_MODES]
    from fused_sched.ops import extension

    assert extension.CLIP_CODES == {mode: i for i, mode in enumerate(layout.CLIP_MODES)}


SHAPES = [(1,), (1, 17), (3, 4099), (2, 3, 5, 7), (2, 3, 4, 5, 6)]
SPECIALISATIONS = list(itertools.product(layout.CLIP_MODES, (0, 1, 2), (False, True)))


@pytest.mark.parametrize("clip,history,noise", SPECIALISATIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_every_specialisation(kernels, clip, history, noise, dtype):
    for k, shape in enumerate(SHAPES):
        for rows in ("broadcast", "per_row"):
            x, m, c, h, z = make_case(shape, (dtype,) * 5, rows, seed=k, history=history, noise=noise)
            # Optional outputs on and off, in the storage dtype and in fp32.
            run_both(kernels, x, m, c, h, z, clip, dtype, dtype, dtype)
            run_both(kernels, x, m, c, h, z, clip, dtype, None, None)
            run_both(kernels, x, m, c, h, z, clip, torch.float32, torch.float32, None)
            run_both(kernels, x, m, c, h, z, clip, dtype, None, torch.float32)


@pytest.mark.parametrize("clip", layout.CLIP_MODES)
def test_mixed_storage_dtypes(kernels, clip):
    """Each tensor in its own dtype, float64 outputs included (computed in fp32, widened)."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.bfloat16, torch.float16)
    for k, shape in enumerate([(2, 33), (3, 4, 5, 7)]):
        x, m, c, h, z = make_case(shape, dtypes, "per_row", seed=10 + k, history=2, noise=True)
        run_both(kernels, x, m, c, h, z, clip, torch.bfloat16, torch.float32, torch.float64)
        run_both(kernels, x, m, c, h, z, clip, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("row_size", (70001, 70000), ids=("odd_rows", "rows_of_whole_packs"))
def test_large_rows_split_across_threads(kernels, dtype, row_size):
    """Rows longer than one task, so at::parallel_for splits rows into chunks across threads;
    for the CUDA kernels more elements (or 8-element packs) than the grid has threads, so
    every thread takes several turns of the grid-stride loop."""
    for clip in layout.CLIP_MODES:
        x, m, c, h, z = make_case((3, row_size), (dtype,) * 5, "per_row", seed=20, history=2, noise=True)
        run_both(kernels, x, m, c, h, z, clip, dtype, torch.float32, dtype)


def test_portable_kernels_give_the_same_bits(cpu):
    """The baseline-ISA loops (std::fma via libm) match the AVX2+FMA clones bit for bit."""
    from fused_sched.ops import extension

    ext = extension.load_extension()
    # the clones run by default where the CPU has AVX2 and FMA (x86-64 Linux), and not under the switch
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    if platform.machine() == "x86_64" and flags:
        assert ext.cpu_runs_fma_clones() == ({"avx2", "fma"} <= set(flags))
    ext.cpu_use_portable_kernels_only(True)
    try:
        assert not ext.cpu_runs_fma_clones()
        for clip in layout.CLIP_MODES:
            x, m, c, h, z = make_case((2, 3, 4099), (torch.float16, torch.float32, torch.bfloat16, torch.float32,
                                                     torch.float32), "per_row", seed=40, history=2, noise=True)
            run_both(cpu, x, m, c, h, z, clip, torch.float32, torch.bfloat16, torch.float32)
            assert_same(cpu.threshold_scale(x, m, c, 0.7, 50.0), reference.threshold_scale(x, m, c, 0.7, 50.0))
        for absent in ESTIMATE_TERM_SETS:
            check_threshold_scale_leaves_absent_terms_out(cpu, absent)
    finally:
        ext.cpu_use_portable_kernels_only(False)


def test_non_contiguous_inputs(kernels):
    """Strided inputs are accepted: the backend makes one explicit contiguous copy of each."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 6, 9, 8, generator=g)
    x = base.transpose(1, 3)  # permuted
    m = torch.randn(2, 8, 9, 12, generator=g)[..., ::2]  # sliced
    h1 = torch.randn(2, 8, 9, 6, generator=g).to(torch.float16).contiguous(memory_format=torch.channels_last)
    z = torch.randn(1, 8, 9, 6, generator=g).expand(2, 8, 9, 6)  # broadcast (stride 0)
    c = torch.randn(K, 2, generator=g).t()  # (2, K) with column-major strides
    assert not any(t.is_contiguous() for t in (x, m, h1, z, c))
    for clip in layout.CLIP_MODES:
        run_both(kernels, x, m, c, (h1,), z, clip, torch.float32, torch.float32, torch.float16)
    assert_same(kernels.threshold_scale(x, m, c, 0.8, 5.0), reference.threshold_scale(x, m, c, 0.8, 5.0))


def test_empty_rows(kernels):
    x = torch.empty(2, 0, 3)
    c = torch.ones(1, K)
    out, d, x0 = kernels.fused_step(x, x, c, (), None, "clamp", 1.0, None, torch.float16, torch.float32, None)
    assert out.shape == x.shape and out.dtype == torch.float16 and d.shape == x.shape and x0 is None


def test_contiguous_inputs_off_the_16_byte_grid(kernels):
    """Contiguous views that start 1, 2, 3 or 5 elements into their storage: the CUDA kernels' 8-element
    packs need 16-byte alignment and fall back to single elements; results are the same."""
    g = torch.Generator().manual_seed(5)
    for shift in (1, 2, 3, 5):
        for dtype in STORAGE:
            x, m, h1, z = ((torch.randn(2 * 64 + shift, generator=g) * 2).to(dtype)[shift:].view(2, 64)
                           for _ in range(4))
            c = torch.randn(2, K, generator=g)
            assert x.is_contiguous() and x.data_ptr() % 16 != 0
            for clip in layout.CLIP_MODES:
                run_both(kernels, x, m, c, (h1,), z, clip, dtype, torch.float32, dtype)
            assert_same(kernels.threshold_scale(x, m, c, 0.8, 5.0), reference.threshold_scale(x, m, c, 0.8, 5.0))


def test_special_values_propagate(kernels):
    """inf and NaN in the inputs reach the outputs exactly as in the reference."""
    x = torch.tensor([[0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e38, -1e-45, 3.0]])
    m = torch.tensor([[1.0, -1.0, 1.0, 2.0, 0.0, 1e38, 5.0, float("nan")]])
    c = torch.linspace(-2, 2, K).reshape(1, K)
    for clip in layout.CLIP_MODES:
        run_both(kernels, x, m, c, (x, m), m, clip, torch.float32, torch.float32, torch.float32)
        run_both(kernels, x, m, c, (), None, clip, torch.float16, torch.bfloat16, torch.float16)


# ---- dynamic thresholding ----


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_threshold_scale_equals_reference(kernels, dtype):
    for k, shape in enumerate(SHAPES + [(4, 3, 33, 31)]):
        for rows in ("broadcast", "per_row"):
            x, m, c, _, _ = make_case(shape, (dtype,) * 5, rows, seed=30 + k, scale_values=3.0)
            for ratio, max_value in ((0.995, 1e30), (0.5, 2.0), (0.37, 1e30), (1.0, 1e30), (1e-6, 0.5), (0.0, 1e30)):
                assert_same(kernels.threshold_scale(x, m, c, ratio, max_value),
                            reference.threshold_scale(x, m, c, ratio, max_value))


def _identity_rows(b):
    """Coefficients with x0 = x exactly (AX = 1, AM = 0)."""
    c = torch.zeros(b, layout.NUM_COEFFICIENTS)
    c[:, layout.AX] = 1.0
    c[:, layout.AS] = 1.0
    return c


def _quantile_tolerance():
    # See the module docstring: torch.quantile's lerp is unfused only on DEFAULT-capability CPUs.
    return EXACT if ATEN_HAS_FMA else dict(rtol=2.0**-23, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("data", ["random", "above_one", "ties", "constant", "nan", "signed_zeros", "inf"])
@pytest.mark.parametrize("n", [1, 2, 17, 1000, 4099])
def test_threshold_scale_equals_torch_quantile(kernels, data, n):
    g = torch.Generator().manual_seed(n)
    x = quantile_rows(data, n, g)
    m = torch.randn(x.shape, generator=g)
    c = _identity_rows(3)
    # 0.37 and 0.995 give non-integer ranks for most n; 1.0 the maximum, 0.0 the minimum.
    for ratio, max_value in ((0.995, 1e30), (0.37, 1e30), (1.0, 1e30), (0.9, 2.5), (0.1, 1e30), (0.0, 1e30)):
        expected = torch.quantile(x.abs(), ratio, dim=1)
        # torch.quantile lerps between two equal infinite order statistics into NaN; the op
        # defines the quantile of equal statistics as that value (see reference.py).
        lo, hi, _ = reference.quantile_rank(ratio, n)
        ordered = x.abs().sort(dim=1).values
        equal = (ordered[:, lo] == ordered[:, hi]) & ~x.isnan().any(dim=1)
        expected = torch.where(equal, ordered[:, lo], expected).clamp(min=1.0, max=max_value)
        torch.testing.assert_close(kernels.threshold_scale(x, m, c, ratio, max_value), expected, **_quantile_tolerance())


def test_threshold_scale_row_above_2_pow_24(kernels):
    """No 2**24 limit (torch.quantile's): one row of 2**24 + 3 elements, against kthvalue."""
    n = 2**24 + 3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, n, generator=g) * 3
    m = torch.randn(1, n, generator=g)
    c = torch.zeros(1, layout.NUM_COEFFICIENTS)
    c[0, layout.AX], c[0, layout.AM], c[0, layout.AS] = 1.25, -0.5, 0.75
    for ratio in (0.995, 0.6):
        assert_same(kernels.threshold_scale(x, m, c, ratio, 100.0), reference.threshold_scale(x, m, c, ratio, 100.0))


def check_threshold_scale_leaves_absent_terms_out(backend, absent):
    """The scale of rows whose x0 terms ``absent`` are absent is the reference's: the inf
    and NaN of an absent term's operand stay out of |x0|. Row 0 holds them in x, row 1 in
    m, so which rows are NaN depends on the set."""
    g = torch.Generator().manual_seed(len(absent))
    x, m = (torch.randn(2, 3001, generator=g) * 4 for _ in range(2))
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40])
    x[0, 100:105], m[1, 2000:2005] = special, special
    c = torch.randn(2, K, generator=g)
    c[:, list(absent)] = 0.0
    constant = layout.ConstantColumns({column: 0.0 for column in absent})
    for ratio in (0.995, 0.3):
        got = backend.threshold_scale(x, m, c, ratio, 1e30, constant_columns=constant)
        assert_same(got, reference.threshold_scale(x, m, c, ratio, 1e30, constant_columns=constant))
    reads_x = layout.AX not in absent
    reads_m = layout.AM not in absent or layout.AL not in absent
    assert got.isnan().tolist() == [reads_x, reads_m]


@pytest.mark.parametrize("absent", ESTIMATE_TERM_SETS,
                         ids=lambda absent: "+".join(layout.COLUMN_NAMES[c] for c in absent) or "none")
def test_threshold_scale_leaves_absent_estimate_terms_out(kernels, absent):
    """Every set of absent x0 terms (the cpu backend compiles a key loop per set)."""
    check_threshold_scale_leaves_absent_terms_out(kernels, absent)


def test_threshold_scale_order_statistics_in_two_top_digits_over_many_blocks(kernels):
    """The two order statistics in different top digits (both digits' keys kept after pass 0),
    in a row split into four blocks on the cpu backend (one per thread), each holding keys
    of both digits and ties: the scale is the reference's, so every block kept the keys it
    counted."""
    n = 4 * 32768 + 6
    lo, _, weight = reference.quantile_rank(0.75, n)
    assert 0.0 < weight < 1.0
    g = torch.Generator().manual_seed(11)
    # Order statistic lo the largest of [1.5, 2), hi the smallest of [2, 2.5): keys of two top
    # digits, each with thousands of distinct values and ties below it.
    steps = torch.randint(0, 2**15, (n,), generator=g) / 2**16
    values = torch.cat([2.0 - 2**-16 - steps[: lo + 1], 2.0 + steps[lo + 1:]])
    x = values[torch.randperm(n, generator=g)].reshape(1, n)
    x[0, ::2] *= -1.0
    c = _identity_rows(1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        got = kernels.threshold_scale(x, x, c, 0.75, 1e30)
    finally:
        torch.set_num_threads(threads)
    ordered = x.abs().sort().values[0]
    assert ordered[lo] < 2.0 <= ordered[lo + 1]
    assert_same(got, reference.threshold_scale(x, x, c, 0.75, 1e30))


@pytest.mark.parametrize("threads, batch, row_size", [
    (4, 4, 16384 + 5),      # rows too small to split: one row per thread
    (2, 5, 40000),          # rows that could be split, but more rows than threads: rows in parallel
    (4, 2, 3 * 32768 + 1),  # fewer rows than threads: one row at a time, in four blocks
], ids=["small-rows", "many-rows", "rows-in-blocks"])
def test_threshold_scale_batch_rows_on_threads(kernels, threads, batch, row_size):
    """Every way the cpu backend spreads a batch over its threads gives each row its own
    scale: rows with their own coefficients, the first saturating at the maximum, the
    second NaN, the last tied where it is not the second, the rest random."""
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, row_size, generator=g) * 3
    m = torch.randn(batch, row_size, generator=g)
    x[1, row_size // 2] = float("nan")
    x[-1] = (x[-1] * 4).round() / 4
    c = torch.randn(batch, K, generator=g)
    c[0, layout.AX] = 1e3
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = kernels.threshold_scale(x, m, c, 0.995, 50.0)
    finally:
        torch.set_num_threads(threads_before)
    expected = reference.threshold_scale(x, m, c, 0.995, 50.0)
    assert expected[0] == 50.0 and expected[1].isnan()
    assert expected[~expected.isnan()].unique().numel() == batch - 1  # a row given another's scale would show
    assert_same(got, expected)


# ---- routing, availability, errors ----


def _call(backend, dtype=torch.float32, **kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    m = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    c = torch.randn(2, K, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return ops.fused_step(x, m, c, history=(x,), clip="threshold", threshold_ratio=0.9, threshold_max=2.0,
                          history_dtype=dtype, x0_dtype=dtype, backend=backend, **kwargs)


def test_backend_cpu_runs_the_compiled_kernels(cpu, monkeypatch):
    from fused_sched.ops import extension

    assert ops.select_backend(torch.device("cpu"), (torch.float32,), "cpu") is extension.CPU_BACKEND
    calls = record_calls(monkeypatch, cpu, ("_fused_step", "_threshold_scale"))
    got = _call("cpu")
    assert calls == ["_threshold_scale", "_fused_step"]
    expected = _call("torch")
    for g, e in zip(got, expected):
        assert_same(g, e)


def test_auto_prefers_the_cpu_backend(cpu):
    with ops.use_backend("auto"):
        assert ops.select_backend(torch.device("cpu"), (torch.float16, torch.float32)) is cpu
        assert ops.select_backend(torch.device("cpu"), (torch.float64,)).name == "torch"


def test_float64_is_unavailable_on_cpu_backend(cpu):
    assert "float64" in cpu.unavailable_reason(torch.device("cpu"), (torch.float32, torch.float64))
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        _call("cpu", torch.float64)
    _call("auto", torch.float64)  # auto hands float64 to the torch backend


def test_cpu_backend_refuses_cuda_tensors(cpu):
    assert "cpu" in cpu.unavailable_reason(torch.device("cuda", 0), (torch.float32,))


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the reason given by a CPU build of torch")
def test_cuda_backend_says_why_it_is_unavailable():
    from fused_sched.ops import extension

    why = extension.cuda_unavailable_reason()  # with a CPU build of torch (CI): "... is a CPU build"
    if why is None:
        pytest.skip("the CUDA kernels can be built here")
    assert why in extension.CUDA_BACKEND.unavailable_reason(torch.device("cuda"), (torch.float32,))
    with pytest.raises(ops.BackendUnavailableError, match=re.escape(why)):
        extension.CUDA_BACKEND.fused_step()


def test_a_rocm_build_of_torch_is_named_as_such(monkeypatch):
    from fused_sched.ops import extension

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    assert "torch is a ROCm build" in extension.cuda_unavailable_reason()


@pytest.mark.parametrize("toolkit, devices, arch_list, expected", [
    ("none", 1, None, "no CUDA toolkit found"),
    ("without headers", 1, None, "has no include/cuda_runtime.h"),
    ("complete", 0, None, "set TORCH_CUDA_ARCH_LIST"),
    ("complete", 0, "9.0", None),
    ("complete", 1, None, None),
])
def test_cuda_kernels_are_built_only_where_the_build_can_succeed(monkeypatch, tmp_path, toolkit, devices, arch_list,
                                                                 expected):
    """With a CUDA build of torch, a build that would fail (and take the cpu backend, built
    into the same module, down with it) is not attempted: the CPU part builds alone and
    the cuda backend says why."""
    from torch.utils import cpp_extension

    from fused_sched.ops import extension

    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True)
    if toolkit == "complete":
        (home / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None if toolkit == "none" else str(home))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    if arch_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    reason = extension.cuda_unavailable_reason()
    assert reason is None if expected is None else expected in reason


def test_a_wrapper_nvcc_outside_its_toolkit_leads_to_the_toolkit(monkeypatch, tmp_path, capsys):
    """torch takes CUDA_HOME as the folder above the nvcc on PATH: for a wrapper script
    (/usr/local/bin/nvcc, as on this project's machines) that folder has no CUDA headers. The
    toolkit that nvcc reports in its dry run is used instead, and said so."""
    import shutil

    from torch.utils import cpp_extension

    from fused_sched.ops import extension

    real = shutil.which("nvcc")
    if real is None or extension.toolkit_root_from_nvcc(real) is None:
        pytest.skip("no nvcc that reports its toolkit here")
    home = tmp_path / "wrapper"
    (home / "bin").mkdir(parents=True)
    wrapper = home / "bin" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert extension.cuda_unavailable_reason() is None
    assert cpp_extension.CUDA_HOME == extension.toolkit_root_from_nvcc(real)
    assert (Path(cpp_extension.CUDA_HOME) / "include" / "cuda_runtime.h").is_file()
    assert f"CUDA_HOME={home} has no CUDA headers" in capsys.readouterr().err


@pytest.mark.parametrize("variable, flags, refused", [
    ("NVCC_APPEND_FLAGS", "-ftz=true", ["flushes float32 subnormals"]),
    ("NVCC_PREPEND_FLAGS", "-ftz=true", ["flushes float32 subnormals"]),
    ("NVCC_APPEND_FLAGS", "--use_fast_math", ["flushes float32 subnormals", "approximates logf and cosf"]),
    ("NVCC_APPEND_FLAGS", "--use_fast_math -ftz=false", ["approximates logf and cosf"]),
    ("NVCC_APPEND_FLAGS", "-ftz=false", []),
    # Proven not to change the machine code (test_cuda_sources.py), so not refused:
    ("NVCC_APPEND_FLAGS", "--fmad=false -prec-div=false", []),
])
def test_nvcc_flags_that_change_the_kernels_results_build_no_cuda_kernels(monkeypatch, variable, flags, refused):
    """nvcc reads NVCC_APPEND_FLAGS / NVCC_PREPEND_FLAGS itself, after (before) the build's
    own flags, so the build cannot overrule them. -ftz=true would flush float32 subnormals
    in every step (FTZ on ~9,700 SASS instructions of fused_step.cu), --use_fast_math
    also approximate the in-kernel noise's logf and cosf: silently different results. The
    CUDA kernels are then not built, and the cuda backend names the flag and its effect."""
    import shutil

    from torch.utils import cpp_extension

    from fused_sched.ops import extension

    nvcc = shutil.which("nvcc")
    root = None if nvcc is None else extension.toolkit_root_from_nvcc(nvcc)
    if root is None:
        pytest.skip("no nvcc that reports its toolkit here")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", root)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.delenv("PYTORCH_NVCC", raising=False)
    for name in ("NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, flags)
    reason = extension.cuda_unavailable_reason()
    if not refused:
        assert reason is None
        return
    assert f"{variable}={flags!r}" in reason
    for effect in ("flushes float32 subnormals", "approximates logf and cosf"):
        assert (effect in reason) == (effect in refused), effect


@pytest.mark.parametrize("with_cuda", [True, False])
def test_a_prebuilt_extension_needs_no_toolkit_to_run(monkeypatch, with_cuda):
    """An ahead-of-time build carries its kernels: where it has the CUDA ones, the cuda
    backend is made from them on a machine without nvcc (a runtime image); only a JIT
    build needs the toolkit. Where it has not, the backend says so."""
    import types

    from torch.utils import cpp_extension

    from fused_sched.ops import extension

    def entry_point(*args, **kwargs):
        raise AssertionError("not called here")

    prebuilt = types.SimpleNamespace(
        __file__="/site-packages/fused_sched/_ext.so", with_cuda=with_cuda, cpu_fused_step=entry_point,
        cpu_threshold_scale=entry_point, cpu_philox_bits=entry_point, cuda_fused_step=entry_point,
        cuda_threshold_scale=entry_point, cuda_philox_bits=entry_point,
    )
    monkeypatch.setattr(extension, "_prebuilt_extension", lambda: prebuilt)
    monkeypatch.setattr(extension, "_extension", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "no CUDA toolkit found" in extension.cuda_unavailable_reason()
    backend = extension._make_backend("CUDA_BACKEND")
    if with_cuda:
        assert isinstance(backend, extension.CompiledBackend) and backend.name == "cuda"
        assert backend._fused_step is entry_point
    else:
        assert isinstance(backend, extension.UnavailableBackend)
        assert "_ext.so was built without CUDA" in backend.reason


def test_an_ahead_of_time_build_without_cuda_says_why(capsys):
    from fused_sched.ops import extension

    reason = extension.cuda_unavailable_reason()
    if reason is None:
        pytest.skip("the CUDA kernels can be built here")
    built = extension.aot_extension()
    assert not any(source.endswith(".cu") for source in built.sources)
    assert f"building the extension without its CUDA kernels: {reason}" in capsys.readouterr().err


def test_kernel_entry_points_reject_bad_arguments(kernels):
    """The C++ checks name the argument and the fix, for callers that bypass the public op
    (the CUDA launcher's are those of csrc/cuda/launch_arguments.h, run here on CPU tensors)."""
    x = torch.randn(2, 8)
    c = torch.randn(1, K)
    out = torch.empty(2, 8)

    def step(**overrides):
        args = dict(sample=x, model_output=x, coefficients=c, history1=None, history2=None, noise=None,
                    noise_mode=0, philox_seed=0, philox_offset=0, philox_base=None, scale=None, clip=0,
                    clip_range=1.0, absent_terms=0, out=out, history_out=None, x0_out=None)
        args.update(overrides)
        return kernels._fused_step(**args)

    with pytest.raises(RuntimeError, match=r"model_output must be contiguous \(pass model_output.contiguous\(\)\)"):
        step(model_output=torch.randn(8, 2).t())
    with pytest.raises(RuntimeError, match="coefficients must be a float32 tensor"):
        step(coefficients=c.double())
    with pytest.raises(RuntimeError, match=rf"coefficients has shape \[3, {K}\]; expected \(1, {K}\) or \(2, {K}\)"):
        step(coefficients=torch.randn(3, K))
    with pytest.raises(RuntimeError, match="history\\[0\\] has dtype Double"):
        step(history1=x.double())
    with pytest.raises(RuntimeError, match="noise has shape"):
        step(noise=torch.randn(2, 9))
    with pytest.raises(RuntimeError, match="needs the per-row scale"):
        step(clip=2)
    with pytest.raises(RuntimeError, match="one per batch row"):
        step(clip=2, scale=torch.ones(3))
    with pytest.raises(RuntimeError, match="history2 was given without history1"):
        step(history2=x)
    with pytest.raises(RuntimeError, match="clip mode 7"):
        step(clip=7)
    with pytest.raises(RuntimeError, match="output out has dtype Int"):
        step(out=torch.empty(2, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"absent_terms=2048 has bits outside the term columns"):
        step(absent_terms=1 << layout.AS)  # AS scales a sum, it is no term of one
    with pytest.raises(RuntimeError, match="at least one element per batch row"):
        kernels._threshold_scale(torch.empty(2, 0), torch.empty(2, 0), c, 0.5, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"absent_terms=-1 has bits outside the term columns"):
        kernels._threshold_scale(x, x, c, 0.5, 1.0, -1)
    with pytest.raises(RuntimeError, match=r"threshold ratio must be in \[0, 1\], got nan"):
        kernels._threshold_scale(x, x, c, math.nan, 1.0, 0)
    # A bound that is not a normal float32 would zero x0, make x0 / s NaN, or round to inf.
    for bad in (math.nan, 0.0, -1.0, -math.inf, 1e-40, 1e39):
        with pytest.raises(RuntimeError, match=r"threshold max_value must be inf or a normal float32 value > 0"):
            kernels._threshold_scale(x, x, c, 0.5, bad, 0)
        with pytest.raises(RuntimeError, match=r"clip_range must be inf or a normal float32 value > 0"):
            step(clip=1, clip_range=bad)
    assert torch.isfinite(kernels._threshold_scale(x, x, c, 0.5, math.inf, 0)).all()
    step(clip=1, clip_range=math.inf)  # accepted: clamping to +-inf is no clamp


def test_importing_fused_sched_builds_nothing():
    code = (
        "import sys, fused_sched, fused_sched.ops, fused_sched.ops.extension as e\n"
        "assert e._extension is None, 'extension loaded at import'\n"
        "print(e.build_directory(False))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert "building the C++ extension" not in result.stderr


def test_build_directory_honours_environment(monkeypatch, tmp_path):
    from fused_sched.ops import extension

    monkeypatch.delenv("FUSED_SCHED_BUILD_DIR", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "te"))
    assert extension.build_directory(False).parent == tmp_path / "te" / "fused_sched"
    monkeypatch.setenv("FUSED_SCHED_BUILD_DIR", str(tmp_path / "fs"))
    assert extension.build_directory(False).parent == tmp_path / "fs"


def test_build_directory_follows_the_sources(monkeypatch, tmp_path):
    """Two installs whose C++ sources differ (two versions in two environments) build into
    different folders: neither rebuilds over the other's library nor loads it."""
    import shutil

    from fused_sched.ops import extension

    monkeypatch.setenv("FUSED_SCHED_BUILD_DIR", str(tmp_path / "fs"))
    copy = tmp_path / "csrc"
    shutil.copytree(extension.CSRC, copy)
    monkeypatch.setattr(extension, "CSRC", copy)
    before = extension.build_directory(False)
    assert before == extension.build_directory(False)  # stable for the same sources
    (copy / "cpu" / "ops_cpu.cpp").write_text((copy / "cpu" / "ops_cpu.cpp").read_text() + "\n// another version\n")
    assert extension.build_directory(False) != before
    cuda_only = extension.build_directory(False)
    (copy / "cuda" / "philox.cu").write_text((copy / "cuda" / "philox.cu").read_text() + "\n")
    assert extension.build_directory(False) == cuda_only  # a CPU build does not compile csrc/cuda
    assert extension.build_directory(True) != cuda_only


def test_a_cuda_backend_without_a_device_says_so(monkeypatch):
    """Built (a CUDA build of torch, TORCH_CUDA_ARCH_LIST) on a machine with no GPU, the
    cuda backend must not claim CUDA tensors it cannot make."""
    from fused_sched.ops import extension

    backend = extension.CompiledBackend("cuda", "cuda", None, None, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.unavailable_reason(torch.device("cuda"), (torch.float32,)) == "torch reports no usable CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend.unavailable_reason(torch.device("cuda"), (torch.float32,)) is None
