"""In-kernel counter-based noise, ``noise=PhiloxNoise(seed, offset)``, on every backend.

What must hold (fused_sched/ops/philox.py describes the generator, Triton's tl.randn):

- The Philox4x32-10 stage is integer arithmetic: every backend's raw outputs equal the
  reference's bit for bit (rtol = atol = 0).
- z itself goes through log, sqrt and cos, whose last bits differ between libm (the cpu
  backend), SLEEF (torch on CPU), numpy (Triton's interpreter) and CUDA's libdevice
  (cuda, and triton on a GPU). Each rounds within ~2 ulp (CUDA documents logf 1, cosf 2,
  sqrtf 0 or Triton's approximate sqrt ~1; glibc and SLEEF u10 <= 1; numpy's float32 SIMD
  <= 1.5) and every other operation is the same correctly rounded one, so a backend's z is
  within ~5 ulp of the exact Box-Muller value of the same uniforms (log's error halves
  through the sqrt). Two backends then differ by at most ~10 ulp of z: the tests allow
  16 ulp, |dz| <= 2**-19 * |z| (z is never 0: u1 < 1 and cos(fl32(2 pi u2)) != 0).
- Given its own z as a tensor, a backend's tensor-noise step reproduces its philox step bit
  for bit: the noise source changes nothing else in the arithmetic.
- On one backend the values are bit-identical on re-run and under any split of the tensor:
  blocks and grids, threads, batch rows vs one flat row, separate calls whose offsets
  advance by the elements before them, aligned or not.
- The numbers are standard normal: mean and variance (z-tests) and a chi-square
  goodness-of-fit over equiprobable bins, each two-sided/upper at a false-alarm rate of
  1e-6 for a correct generator. The seeds are fixed, so each test is deterministic; the
  rate is the chance that a correct generator fails for a seed picked at random.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pytest
import torch

import fused_sched
from fused_sched import ops
from fused_sched.ops import PhiloxNoise, backends, layout, philox
from fused_sched.verify import stand_in_model

from conftest import backend_device, require_backend

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K = layout.NUM_COEFFICIENTS
Z_RTOL = 2.0**-19  # 16 float32 ulp of z between any two backends (see the module docstring)
FALSE_ALARM = 1e-6


@pytest.fixture
def backend(backend):
    """conftest's backend, for this module's data on DEVICE: on a GPU machine the cpu backend
    (CPU tensors only) is skipped here; CPU machines (CI) run its philox tests."""
    if backend_device(backend) != DEVICE:
        pytest.skip(f"backend {backend!r} runs on {backend_device(backend)}; this module's data is on {DEVICE}")
    return backend


def _interpreted(backend: str) -> bool:
    return backend == "triton" and DEVICE.type == "cpu"


def _fma_rounds_once(backend: str) -> bool:
    """Whether the backend's fma rounds once, as the reference's addcmul does on the CPUs
    ATen vectorises for (only an old Triton interpreter's does not: _common.FMA_ROUNDS_ONCE)."""
    if backend != "triton":
        return True
    from fused_sched.ops.triton import _common

    return _common.FMA_ROUNDS_ONCE


def _impl(backend: str):
    return backends.select_backend(DEVICE, (torch.float32,), backend)


def _bits(backend: str, seed: int, offset: int, numel: int) -> torch.Tensor:
    if backend == "torch":
        return philox.philox_bits(seed, offset, numel, DEVICE)
    return _impl(backend).philox_bits(seed, offset, numel, DEVICE)


def _noise_only_rows(rows: int = 1) -> torch.Tensor:
    c = torch.zeros(rows, K, device=DEVICE)
    c[:, layout.ON] = 1.0
    return c


def _z(shape, noise, **kwargs) -> torch.Tensor:
    """The step's z itself: with ON = 1 and every other coefficient 0, prev = fma(1, z, 0) = z."""
    zeros = torch.zeros(shape, device=DEVICE)
    return ops.fused_step(zeros, zeros, _noise_only_rows(), noise=noise, **kwargs).prev_sample


def _assert_close_z(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    assert bool(torch.isfinite(got).all())
    error = (got.double() - expected.double()).abs() / expected.double().abs()
    worst = int(error.argmax())
    assert float(error.max()) <= Z_RTOL, (
        f"z differs by {float(error.max()):.3g} relative at flat index {worst}: "
        f"{float(got.flatten()[worst])!r} vs {float(expected.flatten()[worst])!r}"
    )


# ---- contract with the C++ and Triton sources


def test_noise_codes_and_constants_match_the_sources():
    header = (ROOT / "csrc" / "include" / "fused_sched" / "philox.h").read_text()
    codes = dict(re.findall(r"\bk(NoNoise|NoiseTensor|Philox) = (\d+)", header))
    assert {"none": int(codes["NoNoise"]), "tensor": int(codes["NoiseTensor"]), "philox": int(codes["Philox"])} == (
        philox.NOISE_CODES
    )
    constants = {name: int(value, 16) for name, value in re.findall(r"\bk(Philox\w+) = 0x([0-9A-Fa-f]+)u;", header)}
    assert constants == {
        "PhiloxKeyA": philox.PHILOX_KEY_A,
        "PhiloxKeyB": philox.PHILOX_KEY_B,
        "PhiloxRoundA": philox.PHILOX_ROUND_A,
        "PhiloxRoundB": philox.PHILOX_ROUND_B,
    }
    assert f"kPhiloxRounds = {philox.PHILOX_ROUNDS};" in header


def test_reference_is_philox4x32_10():
    """Random123's known-answer vector for counter 0, key 0 (first two of four outputs)."""
    assert philox.philox_bits(0, 0, 1).tolist() == [[0x6627E8D5, 0xE169C58D]]


def test_reference_is_triton_randn():
    """The reference reproduces tl.randn itself (run by Triton's interpreter on CPU), bits
    and normals, independently of the backend code under test."""
    triton = pytest.importorskip("triton")
    from fused_sched.ops.triton import INTERPRETED

    if not INTERPRETED:
        pytest.skip("checked against Triton's interpreter; on a GPU the triton backend tests cover it")
    import triton.language as tl

    @triton.jit
    def randn_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + index, tl.randn(seed, offset + index.to(tl.int64)), mask=index < n)

    n = 3000
    for seed, offset in ((0, 0), (2**63 + 5, 2**32 - 1000)):
        out = torch.empty(n)
        randn_kernel[(triton.cdiv(n, 256),)](out, n, philox.signed_seed(seed), offset, BLOCK=256)
        _assert_close_z(out, philox.philox_normal(seed, offset, n))


# ---- every backend against the reference

BIT_CASES = [(0, 0), (1, 7), (123456789, 2**32 - 100), (2**63 - 1, 2**40 + 3), (2**63, 0), (2**64 - 1, 2**62)]


@pytest.mark.parametrize("seed,offset", BIT_CASES)
def test_philox_bits_identical_to_reference(backend, seed, offset):
    if backend == "torch" and DEVICE.type == "cpu":
        pytest.skip("the torch backend's bits on the CPU are the reference itself (test_reference_is_philox4x32_10 "
                    "checks those); on a GPU this compares its device arithmetic with the CPU's")
    n = 1024 if _interpreted(backend) else 100_000
    got = _bits(backend, seed, offset, n)
    assert torch.equal(got.cpu(), philox.philox_bits(seed, offset, n))


@pytest.mark.parametrize("portable", [False, True])
def test_cpu_philox_bits_on_both_loops(portable):
    """The cpu backend's AVX2 Philox (eight counters per vector, the 64-bit counter's carry
    done by hand) and its baseline loop give the reference's bits, across a 2**32 boundary of
    the counter, with counts that leave partial groups of eight in every task."""
    require_backend("cpu")
    from fused_sched.ops import extension

    ext = extension.load_extension()
    offset, n = 2**32 - 1003, 70_001
    ext.cpu_use_portable_kernels_only(portable)
    try:
        got = backends.select_backend(torch.device("cpu"), (torch.float32,), "cpu").philox_bits(
            77, offset, n, torch.device("cpu"))
    finally:
        ext.cpu_use_portable_kernels_only(False)
    assert torch.equal(got, philox.philox_bits(77, offset, n))


def test_uniforms_are_in_the_unit_interval():
    bits = torch.tensor([[0, 1], [2**31 - 1, 2**31], [2**32 - 1, 2**31 + 1]])
    u = philox.philox_uniform(bits)
    assert u.dtype == torch.float32
    assert float(u.min()) == 0.0 and float(u.max()) < 1.0
    assert u[1, 0] == u[1, 1] and u[0, 0] == u[2, 0]  # v and ~v map to the same value


@pytest.mark.parametrize("packs", [False, True], ids=["odd-count", "count-of-eights"])
@pytest.mark.parametrize("seed,offset", [(0, 0), (2024, 12345), (2**64 - 1, 2**33 + 1)])
def test_noise_matches_reference(backend, seed, offset, packs):
    """An element count of whole eights takes the CUDA kernel's packed path (eight elements a
    thread, their counters consecutive), any other count the element-wise one."""
    if packs:
        shape = (3, 1000) if _interpreted(backend) else (4, 3, 32, 96)
    else:
        shape = (3, 1001) if _interpreted(backend) else (4, 3, 33, 97)
    got = _z(shape, PhiloxNoise(seed, offset))
    expected = philox.philox_normal(seed, offset, math.prod(shape), DEVICE).reshape(shape)
    _assert_close_z(got, expected)


@pytest.mark.parametrize("clip,history,rows", [("none", 0, 1), ("clamp", 1, 2), ("threshold", 2, 2), ("none", 2, 1)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_philox_step_is_the_tensor_step_with_the_same_z(backend, clip, history, rows, out_dtype):
    """Every specialisation: the philox step equals the same backend's tensor-noise step fed
    the z that backend computes, bit for bit; and the reference's philox step within the
    stated tolerance of z (|ON| * 2**-19 * |z|) plus one ulp of the output dtype (a fp32
    difference can cross a rounding boundary of bfloat16). Where one side's fma rounds twice
    (ATen's addcmul on CPU capability DEFAULT, an old Triton interpreter's tl.fma) the rest
    rounds differently too: 8 fp32 ulp of the terms' magnitude more there (see
    test_compiled_kernels.py)."""
    g = torch.Generator().manual_seed(11)
    shape = (2, 3, 337)
    x, m, h1, h2 = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(4))
    c = torch.randn(rows, K, generator=g).to(DEVICE)
    hist = (h1, h2)[:history]
    noise = PhiloxNoise(99, 5000)
    kwargs = dict(history=hist, clip=clip, clip_range=1.5, threshold_ratio=0.9, threshold_max=2.0,
                  out_dtype=out_dtype, history_dtype=torch.float32, x0_dtype=torch.float16)
    got = ops.fused_step(x, m, c, noise=noise, **kwargs)
    z = _z(shape, noise)
    with_tensor = ops.fused_step(x, m, c, noise=z, **kwargs)
    for a, b in zip(got, with_tensor):
        assert torch.equal(a, b)

    reference = ops.fused_step(x, m, c, noise=noise, backend="torch", **kwargs)
    z_ref = philox.philox_normal(99, 5000, math.prod(shape), DEVICE).reshape(shape)
    column = lambda k: c[:, k].reshape((-1,) + (1,) * (len(shape) - 1))  # noqa: E731
    out_ulp = torch.finfo(out_dtype).eps * reference.prev_sample.float().abs()
    bound = column(layout.ON).abs() * Z_RTOL * z_ref.abs() * 1.01 + out_ulp + 1e-30
    cpu_default = torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    if DEVICE.type == "cpu" and (cpu_default or not _fma_rounds_once(backend)):
        d_size = 4  # |d| here, with these rows and inputs; history enters as d - h1, h1 - h2
        terms = [(layout.OX, x.abs()), (layout.OM, m.abs()), (layout.ON, z_ref.abs()), (layout.O0, d_size),
                 (layout.O1, d_size + h1.abs()), (layout.O2, h1.abs() + h2.abs())]
        magnitude = sum(column(k).abs() * t for k, t in terms)
        bound = bound + magnitude * 8 * 2.0**-24
    assert bool(((got.prev_sample.float() - reference.prev_sample.float()).abs() <= bound).all())


# ---- statistics


def _normal_quantile(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


def _chi2_upper(df: int, false_alarm: float) -> float:
    """Upper critical value of chi-square(df) by Wilson-Hilferty (accurate to ~1% this far out)."""
    zq = _normal_quantile(1.0 - false_alarm)
    return df * (1.0 - 2.0 / (9 * df) + zq * math.sqrt(2.0 / (9 * df))) ** 3


@pytest.mark.parametrize("seed", [0, 987654321])
def test_noise_is_standard_normal(backend, seed):
    """Mean ~ 0 and variance ~ 1 (z-tests, two-sided, false alarm 1e-6 each), and the bin
    counts of 32 equiprobable normal bins (chi-square, 31 df, false alarm 1e-6)."""
    n = 2**16 if _interpreted(backend) else 2**21
    z = _z((4, n // 4), PhiloxNoise(seed, 12345)).double().flatten().cpu()
    bound = _normal_quantile(1.0 - FALSE_ALARM / 2)
    mean = float(z.mean())
    assert abs(mean) * math.sqrt(n) <= bound, f"mean {mean} over {n} normals"
    var = float(z.var())
    # (n-1) s^2 ~ chi-square(n-1); at this n, (s^2 - 1) / sqrt(2 / (n-1)) is normal to ~1e-3.
    assert abs(var - 1.0) / math.sqrt(2.0 / (n - 1)) <= bound, f"variance {var} over {n} normals"
    bins = 32
    edges = torch.tensor([_normal_quantile(k / bins) for k in range(1, bins)], dtype=torch.float64)
    counts = torch.bincount(torch.bucketize(z, edges), minlength=bins).double()
    expected = n / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 <= _chi2_upper(bins - 1, FALSE_ALARM), f"chi-square {chi2} over {bins} bins"


def test_different_seeds_and_offsets_are_different_noise(backend):
    shape = (2, 500)
    a = _z(shape, PhiloxNoise(1, 0))
    assert not torch.equal(a, _z(shape, PhiloxNoise(2, 0)))
    assert not torch.equal(a, _z(shape, PhiloxNoise(1 + 2**32, 0)))  # the seed's high word is keyed too
    b = _z(shape, PhiloxNoise(1, 1000))
    assert not torch.equal(a, b)
    # consecutive draws share no counter: offset 1000 continues where offset 0 ended
    assert torch.equal(_z((1, 2000), PhiloxNoise(1, 0))[:, 1000:].reshape(shape), b)


# ---- reproducibility and splits


def test_rerun_is_bit_identical(backend):
    g = torch.Generator().manual_seed(5)
    x, m = (torch.randn(3, 7, 129, generator=g).to(DEVICE) for _ in range(2))
    c = torch.randn(1, K, generator=g).to(DEVICE)
    runs = [ops.fused_step(x, m, c, noise=PhiloxNoise(42, 17), x0_dtype=torch.float32) for _ in range(3)]
    for other in runs[1:]:
        assert torch.equal(other.prev_sample, runs[0].prev_sample) and torch.equal(other.x0, runs[0].x0)


@pytest.mark.parametrize("width", [301, 304], ids=["odd-count", "count-of-eights"])
def test_identical_under_splits(backend, width):
    """With width 304 the whole tensor and its halves take the CUDA kernel's packed path and
    the unaligned and odd-sized pieces its element-wise one, which must agree."""
    seed, offset = 777, 3 * 2**31 + 11  # counters cross a 2**32 boundary inside the tensor
    shape = (4, 5, width)
    numel = math.prod(shape)
    whole = _z(shape, PhiloxNoise(seed, offset))

    # batch halves as separate calls, the second offset by the elements of the first
    half = numel // 2
    first = _z((2, 5, width), PhiloxNoise(seed, offset))
    second = _z((2, 5, width), PhiloxNoise(seed, offset + half))
    assert torch.equal(torch.cat([first, second]), whole)

    # a flat view split at points that are no multiple of any block, pack or chunk size
    flat = whole.reshape(1, numel)
    start = 0
    for stop in (1, 1000, 1003, 4097, numel):
        part = _z((1, stop - start), PhiloxNoise(seed, offset + start))
        assert torch.equal(part, flat[:, start:stop]), (start, stop)
        start = stop

    # per-row coefficients (one grid row / task row per batch element) vs one row for all
    zeros = torch.zeros(shape, device=DEVICE)
    per_row = ops.fused_step(zeros, zeros, _noise_only_rows(shape[0]), noise=PhiloxNoise(seed, offset)).prev_sample
    assert torch.equal(per_row, whole)

    # inputs that are not 16-byte aligned (the CUDA kernel's unpacked path)
    buffer = torch.zeros(numel + 1, device=DEVICE)
    unaligned = buffer[1:].view(shape)
    assert unaligned.is_contiguous() and unaligned.data_ptr() % 16 != 0
    odd = ops.fused_step(unaligned, unaligned, _noise_only_rows(), noise=PhiloxNoise(seed, offset)).prev_sample
    assert torch.equal(odd, whole)


def test_identical_across_thread_counts(backend):
    shape = (2, 70_001)  # several parallel tasks on the cpu backend
    if _interpreted(backend):
        shape = (2, 1500)
    expected = _z(shape, PhiloxNoise(3, 9))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _z(shape, PhiloxNoise(3, 9))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, expected)


def test_cpu_vectorised_and_portable_loops_agree():
    """The cpu backend's AVX2 loops and its baseline build give the same bits, except that
    where it is built with libmvec (x86-64 Linux) the AVX2 Box-Muller takes log and cos from
    it: then z agrees within the stated tolerance (the Philox stage is exact either way)."""
    require_backend("cpu")
    from fused_sched.ops import extension

    ext = extension.load_extension()
    zeros = torch.zeros(3, 40_000)
    c = _noise_only_rows().cpu()

    def z():
        return ops.fused_step(zeros, zeros, c, noise=PhiloxNoise(6, 2**32 - 7), backend="cpu").prev_sample

    vectorised = z()
    try:
        ext.cpu_use_portable_kernels_only(True)
        portable = z()
    finally:
        ext.cpu_use_portable_kernels_only(False)
    if ext.cpu_vector_box_muller:
        _assert_close_z(vectorised, portable)
    else:
        assert torch.equal(vectorised, portable)
    expected = philox.philox_normal(6, 2**32 - 7, zeros.numel()).reshape(zeros.shape)
    _assert_close_z(vectorised, expected)
    _assert_close_z(portable, expected)


def test_identical_across_triton_block_sizes(monkeypatch):
    """Small blocks and every configuration the autotuner may pick give the same bits."""
    require_backend("triton")
    import triton

    from fused_sched.ops.triton import step

    shape = (3, 777)
    expected = _z(shape, PhiloxNoise(8, 2**32 - 5), backend="triton")
    for config in [triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})] + step.AUTOTUNE_CONFIGS:
        monkeypatch.setattr(step, "_step_launcher", step.launcher([config]))
        assert torch.equal(_z(shape, PhiloxNoise(8, 2**32 - 5), backend="triton"), expected), config


def test_triton_library_op_takes_the_seed_as_ints():
    require_backend("triton")
    from fused_sched.ops.triton import step  # noqa: F401  (registers the op)

    g = torch.Generator().manual_seed(2)
    x, m = (torch.randn(2, 300, generator=g).to(DEVICE) for _ in range(2))
    c = torch.randn(1, K, generator=g).to(DEVICE)
    seed = 2**64 - 3
    outs = torch.ops.fused_sched.triton_fused_step(x, m, c, [], None, "none", 1.0, None, torch.float32, None, None,
                                                    philox.signed_seed(seed), 40)
    assert torch.equal(outs[0], ops.fused_step(x, m, c, noise=PhiloxNoise(seed, 40), backend="triton").prev_sample)


@pytest.mark.parametrize("case", ["plain", "history-threshold", "view"])
def test_device_offset_is_the_int_offset(backend, case):
    """A 0-dim int64 offset tensor, read by the kernel from device memory, gives the int
    offset's bits: every output, with history and thresholding, and for a 0-dim view into
    a larger tensor (the kernel reads at the view's storage offset)."""
    g = torch.Generator().manual_seed(5)
    x, m, h1, h2 = (torch.randn(3, 7, 129, generator=g).to(DEVICE) for _ in range(4))
    c = torch.randn(3, K, generator=g).to(DEVICE)
    offset = 2**40 + 17
    kwargs = dict(x0_dtype=torch.float32)
    if case == "history-threshold":
        kwargs.update(history=(h1, h2), history_dtype=torch.float32, clip="threshold", threshold_ratio=0.9,
                      threshold_max=2.0)
    device_offset = torch.tensor(offset, device=DEVICE)
    if case == "view":
        device_offset = torch.tensor([-1, offset, -1], device=DEVICE)[1]
        assert device_offset.dim() == 0 and device_offset.storage_offset() == 1
    by_int = ops.fused_step(x, m, c, noise=PhiloxNoise(9, offset), **kwargs)
    by_tensor = ops.fused_step(x, m, c, noise=PhiloxNoise(9, device_offset), **kwargs)
    for a, b in zip(by_int, by_tensor):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b)
    assert int(device_offset) == offset  # read, never written


def test_device_offset_over_the_reference_cpu_pieces():
    """The torch reference adds the offset tensor on the device, also where it computes a
    large CPU tensor in cache-sized pieces; the cpu backend agrees bit for bit."""
    zeros = torch.zeros(2, 40_000)
    c = torch.zeros(1, K)
    c[:, layout.ON] = 1.0
    offset = 2**32 - 11
    for backend in ("torch", "cpu"):
        require_backend(backend)
        by_int = ops.fused_step(zeros, zeros, c, noise=PhiloxNoise(3, offset), backend=backend).prev_sample
        by_tensor = ops.fused_step(zeros, zeros, c, noise=PhiloxNoise(3, torch.tensor(offset)),
                                   backend=backend).prev_sample
        assert torch.equal(by_int, by_tensor), backend


def test_device_offset_steps_read_no_value_on_the_host(backend):
    """The offset tensor's value is never converted to a Python number (no sync on a GPU)."""
    from test_no_host_sync import no_host_syncs

    if _interpreted(backend):
        pytest.skip("Triton's interpreter runs kernels on host copies of their arguments")
    g = torch.Generator().manual_seed(6)
    x, m = (torch.randn(2, 3, 50, generator=g).to(DEVICE) for _ in range(2))
    c = torch.randn(1, K, generator=g).to(DEVICE)
    offset = torch.tensor(123, device=DEVICE)
    with no_host_syncs():
        got = ops.fused_step(x, m, c, noise=PhiloxNoise(4, offset)).prev_sample
    assert torch.equal(got, ops.fused_step(x, m, c, noise=PhiloxNoise(4, 123)).prev_sample)


def test_triton_backend_traced_with_a_device_offset():
    """The Triton backend called inside a traced function passes the offset tensor to its
    registered op as the tensor argument philox_base, not as the int philox_offset (which
    the dispatcher would fill by reading the tensor on the host)."""
    require_backend("triton")
    from fused_sched.ops.triton import BACKEND

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    x, m = (torch.randn(2, 90, generator=g).to(DEVICE) for _ in range(2))
    c = torch.randn(1, K, generator=g).to(DEVICE)

    def step(x, m, c, offset):
        return BACKEND.fused_step(x, m, c, (), PhiloxNoise(2**64 - 1, offset), "none", 1.0, None,
                                  torch.float32, None, torch.float32)

    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(step, fullgraph=True, backend=keep_graph)
    for offset in (5, 2**33):
        got = compiled(x, m, c, torch.tensor(offset, device=DEVICE))
        expected = step(x, m, c, offset)
        assert torch.equal(got[0], expected[0]) and got[1] is None and torch.equal(got[2], expected[2])
    assert len(graphs) == 1
    (call,) = [n for n in graphs[0].graph.nodes if n.target is torch.ops.fused_sched.triton_fused_step.default]
    *_, philox_offset, philox_base, absent_terms = call.args
    assert philox_offset == 0 and philox_base.op == "placeholder" and absent_terms == 0


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_torch_compile_with_a_device_offset_keeps_it_a_graph_input(backend, compiler):
    """Offsets in device memory do not become graph constants: new values, same graph, and
    the custom op takes the tensor as its philox_base input (not as the int philox_offset,
    which the dispatcher would fill by reading the tensor on the host)."""
    torch._dynamo.reset()
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    counters.clear()
    g = torch.Generator().manual_seed(4)
    x, m = (torch.randn(2, 3, 50, generator=g).to(DEVICE) for _ in range(2))
    c = torch.randn(1, K, generator=g).to(DEVICE)

    def step(x, m, c, offset):
        return ops.fused_step(x, m, c, noise=PhiloxNoise(5, offset)).prev_sample

    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(compiler)(gm, example_inputs)

    compiled = torch.compile(step, fullgraph=True, backend=keep_graph)
    for offset in (0, 300, 10**12):
        tensor = torch.tensor(offset, device=DEVICE)
        assert torch.equal(compiled(x, m, c, tensor), step(x, m, c, offset))
    assert counters["stats"]["unique_graphs"] == 1
    (call,) = [n for n in graphs[0].graph.nodes if n.target is torch.ops.fused_sched.fused_step.default]
    *_, philox_seed, philox_offset, philox_base = call.args
    assert (philox_seed, philox_offset, philox_base.op) == (5, 0, "placeholder")


def test_torch_compile(backend):
    """Under torch.compile the op travels as the custom op with the seed and offset as ints."""
    g = torch.Generator().manual_seed(3)
    x, m = (torch.randn(2, 3, 50, generator=g).to(DEVICE) for _ in range(2))
    c = torch.randn(1, K, generator=g).to(DEVICE)
    noise = PhiloxNoise(2**63 + 1, 77)

    def step(x, m, c):
        return ops.fused_step(x, m, c, noise=noise, x0_dtype=torch.float32)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got, expected = compiled(x, m, c), step(x, m, c)
    assert torch.equal(got.prev_sample, expected.prev_sample) and torch.equal(got.x0, expected.x0)


# ---- argument checks


def test_invalid_philox_arguments_are_named():
    x = torch.zeros(2, 8)
    c = _noise_only_rows()

    def step(noise):
        return ops.fused_step(x, x, c, noise=noise, backend="torch")

    with pytest.raises(ValueError, match=r"seed=-1 is outside \[0, 2\*\*64\)"):
        step(PhiloxNoise(-1))
    with pytest.raises(ValueError, match="seed=18446744073709551616"):
        step(PhiloxNoise(2**64))
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        step(PhiloxNoise(1.0))
    with pytest.raises(TypeError, match="seed must be an int, got bool"):
        step(PhiloxNoise(True))
    with pytest.raises(TypeError, match="seed must be a Python int, not a tensor"):
        step(PhiloxNoise(torch.tensor(3)))
    with pytest.raises(ValueError, match="offset=-5 must be >= 0"):
        step(PhiloxNoise(1, -5))
    with pytest.raises(ValueError, match=r"offset=9223372036854775800 \+ 16 elements reaches 2\*\*63"):
        step(PhiloxNoise(1, 2**63 - 8))
    with pytest.raises(TypeError, match="offset must be an int, got str"):
        step(PhiloxNoise(1, "0"))
    with pytest.raises(TypeError, match="noise must be a torch.Tensor, a PhiloxNoise or None, got tuple"):
        step((1, 0))
    with pytest.raises(ValueError, match="offset must be an int or a 0-dim int64 tensor"):
        step(PhiloxNoise(1, torch.tensor([3])))
    with pytest.raises(ValueError, match="offset must be an int or a 0-dim int64 tensor"):
        step(PhiloxNoise(1, torch.tensor(3, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"offset must be .* on the sample's device cpu, got .* on meta"):
        step(PhiloxNoise(1, torch.tensor(3, device="meta")))
    step(PhiloxNoise(1, torch.tensor(-1)))  # a tensor's range is not checked: that would read it
    # numpy-style integers are ints
    import numpy as np

    step(PhiloxNoise(np.int64(5), np.uint32(3)))


@pytest.mark.parametrize("backend", ["cpu", "cuda", "cuda-emulator"])
def test_kernel_entry_points_check_the_noise_mode(backend):
    """The launchers' own checks (csrc/cuda/launch_arguments.h for cuda and its emulator)."""
    device = backend_device(backend)
    require_backend(backend)
    if backend == "cuda-emulator":
        fn = backends.load_backend(backend).module.fused_step
    else:
        from fused_sched.ops import extension

        ext = extension.load_extension()
        fn = ext.cpu_fused_step if backend == "cpu" else ext.cuda_fused_step
    x = torch.zeros(2, 8, device=device)
    c = _noise_only_rows().to(device)
    out = torch.empty_like(x)

    def step(**overrides):
        args = dict(sample=x, model_output=x, coefficients=c, history1=None, history2=None, noise=None,
                    noise_mode=2, philox_seed=1, philox_offset=0, philox_base=None, scale=None, clip=0,
                    clip_range=1.0, absent_terms=0, out=out,
                    history_out=None, x0_out=None)
        args.update(overrides)
        return fn(**args)

    step()
    with pytest.raises(RuntimeError, match="noise mode 3 is not 0"):
        step(noise_mode=3)
    with pytest.raises(RuntimeError, match="a noise tensor goes with noise mode 1"):
        step(noise=x)
    with pytest.raises(RuntimeError, match="a noise tensor goes with noise mode 1"):
        step(noise_mode=1)
    with pytest.raises(RuntimeError, match=r"PhiloxNoise offset -1 \+ 16 elements must stay in \[0, 2\*\*63\)"):
        step(philox_offset=-1)
    with pytest.raises(RuntimeError, match="must stay in"):
        step(philox_offset=2**63 - 10)
    with pytest.raises(RuntimeError, match="philox_base must be one int64 on the sample's device"):
        step(philox_base=torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="philox_base goes with noise mode 2"):
        step(noise_mode=0, philox_base=torch.zeros((), dtype=torch.int64, device=device))


# ---- schedulers


def _noisy_schedulers():
    return {
        "ddim": (fused_sched.FusedDDIMScheduler(), dict(eta=1.0)),
        "dpm_sde": (fused_sched.FusedDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {}),
        "cogvideox_dpm": (fused_sched.FusedCogVideoXDPMScheduler(), {}),
    }


def _trajectory(kind, scheduler, step_kwargs, steps=6, shape=(1, 4, 8, 8)):
    scheduler.set_timesteps(steps)
    init = torch.Generator().manual_seed(1234)
    x = torch.randn(shape, generator=init).to(DEVICE)
    pattern = torch.randn(shape, generator=init).to(DEVICE)
    old, samples = None, []
    for i, t in enumerate(scheduler.timesteps):
        m = stand_in_model(x, t, pattern)
        if kind == "cogvideox_dpm":
            back = scheduler.timesteps[i - 1] if i > 0 else None
            x, old = scheduler.step(m, old, t, back, x, return_dict=False)
        else:
            x = scheduler.step(m, t, x, return_dict=False, **step_kwargs)[0]
        samples.append(x)
    return samples


@pytest.mark.parametrize("kind", ["ddim", "dpm_sde", "cogvideox_dpm"])
def test_scheduler_trajectory_is_reproducible(backend, kind):
    scheduler, kwargs = _noisy_schedulers()[kind]
    scheduler.use_philox_noise(2024)
    first = _trajectory(kind, scheduler, kwargs)
    again = _trajectory(kind, scheduler, kwargs)  # set_timesteps restarts the counter
    for a, b in zip(first, again):
        assert torch.equal(a, b)

    scheduler.use_philox_noise(2025)
    other = _trajectory(kind, scheduler, kwargs)
    assert not torch.equal(other[-1], first[-1])

    # off again: the diffusers-compatible generator path, unchanged
    scheduler.use_philox_noise(None)
    fresh, _ = _noisy_schedulers()[kind]
    torch.manual_seed(0)
    default = _trajectory(kind, scheduler, kwargs)
    torch.manual_seed(0)
    expected = _trajectory(kind, fresh, kwargs)
    for a, b in zip(default, expected):
        assert torch.equal(a, b)
    assert not torch.equal(default[-1], first[-1])


def test_each_noisy_step_gets_fresh_noise(backend):
    scheduler = fused_sched.FusedDDIMScheduler()
    scheduler.use_philox_noise(1)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, m = (torch.randn(1, 4, 8, 8, generator=g).to(DEVICE) for _ in range(2))
    t = scheduler.timesteps[3]
    a = scheduler.step(m, t, x, eta=1.0).prev_sample
    b = scheduler.step(m, t, x, eta=1.0).prev_sample  # same inputs, the next counters
    assert not torch.equal(a, b)
    # a deterministic step (eta = 0) draws nothing: the counter does not move
    scheduler.step(m, t, x, eta=0.0)
    c = scheduler.step(m, t, x, eta=1.0).prev_sample
    assert not torch.equal(c, a) and not torch.equal(c, b)
    scheduler.set_timesteps(10)
    assert torch.equal(scheduler.step(m, t, x, eta=1.0).prev_sample, a)
    scheduler.step(m, t, x, eta=0.0, generator=torch.Generator())  # no noise drawn, nothing to refuse
    assert torch.equal(scheduler.step(m, t, x, eta=1.0).prev_sample, b)


@pytest.mark.parametrize("kind", ["ddim", "dpm_sde", "cogvideox_dpm"])
def test_philox_ignores_a_pipelines_generator_and_refuses_variance_noise(kind):
    """Pipelines pass their generator to every step: with philox on it is not used (and
    not advanced), so the result equals a step without it. Explicit noise is refused."""
    scheduler, kwargs = _noisy_schedulers()[kind]
    scheduler.use_philox_noise(5)
    x = torch.randn(1, 4, 8, 8)

    def step(generator):
        scheduler.set_timesteps(4)
        t = scheduler.timesteps[0]
        if kind == "cogvideox_dpm":
            return scheduler.step(x, None, t, None, x, generator=generator, return_dict=False)[0]
        return scheduler.step(x, t, x, generator=generator, **kwargs)[0]

    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    assert torch.equal(step(generator), step(None))
    assert torch.equal(generator.get_state(), state)
    t = scheduler.timesteps[0]
    if kind != "cogvideox_dpm":  # diffusers' CogVideoX DPM ignores variance_noise, as this one does
        with pytest.raises(ValueError, match="variance_noise was passed while in-kernel noise is on"):
            scheduler.step(x, t, x, variance_noise=torch.randn(1, 4, 8, 8), **kwargs)


def test_use_philox_noise_checks_the_seed():
    scheduler = fused_sched.FusedDDIMScheduler()
    with pytest.raises(ValueError, match=r"seed=-3 is outside \[0, 2\*\*64\)"):
        scheduler.use_philox_noise(-3)
    with pytest.raises(TypeError, match="seed must be an int"):
        scheduler.use_philox_noise(0.5)
    scheduler.use_philox_noise(2**64 - 1)
    scheduler.use_philox_noise(None)


def test_scheduler_counter_lives_on_the_device_and_advances_after_the_snapshot():
    """The counter is a 0-dim int64 tensor on the schedule's device; each draw hands out a
    snapshot of it (unchanged by later draws) and then advances it in place by the draw's
    element count. set_timesteps and use_philox_noise zero it in place: a CUDA graph that
    captured its storage restarts with it."""
    scheduler = fused_sched.FusedDDIMScheduler()
    scheduler.use_philox_noise(8)
    scheduler.set_timesteps(6)
    counter = scheduler._philox_counter
    assert counter.dtype == torch.int64 and counter.dim() == 0 and counter.device == scheduler.timesteps.device
    shape = (2, 4, 8, 8)
    first = scheduler._draw_noise(shape, None, counter.device, torch.float32)
    second = scheduler._draw_noise(shape, None, counter.device, torch.float32)
    assert isinstance(first.offset, torch.Tensor) and first.offset is not counter
    assert (int(first.offset), int(second.offset), int(counter)) == (0, 512, 1024)

    x = torch.randn(shape)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.tanh(x), t, x, eta=1.0).prev_sample
    assert int(counter) == 1024 + 6 * 512
    scheduler.set_timesteps(6)
    assert scheduler._philox_counter is counter and int(counter) == 0
    counter.fill_(99)
    scheduler.use_philox_noise(9)
    assert scheduler._philox_counter is counter and int(counter) == 0
    scheduler.use_philox_noise(None)
    assert scheduler._philox_counter is None


def test_counter_is_not_created_during_cuda_graph_capture(monkeypatch):
    """Made during capture, the counter would be re-made (at 0) by every replay: refused.
    Off CUDA there is no capture; the check is exercised through its stream test."""
    from fused_sched.schedulers import base

    scheduler = fused_sched.FusedDDIMScheduler()
    scheduler.use_philox_noise(1)  # no schedule yet: no counter yet
    assert scheduler._philox_counter is None
    monkeypatch.setattr(base, "stream_capturing", lambda device: True)
    with pytest.raises(ValueError, match=r"making it during CUDA-graph capture would reset it at every replay"):
        scheduler._draw_noise((1, 4), None, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(base, "stream_capturing", lambda device: False)
    assert int(scheduler._draw_noise((1, 4), None, torch.device("cpu"), torch.float32).offset) == 0
    # An existing counter on the device is captured as is: reads and in-place advances.
    monkeypatch.setattr(base, "stream_capturing", lambda device: True)
    assert int(scheduler._draw_noise((1, 4), None, torch.device("cpu"), torch.float32).offset) == 4
