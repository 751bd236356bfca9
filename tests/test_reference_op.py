"""The reference op: per-row coefficients, exact quantile thresholding, backend selection."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch._dynamo.testing

from conftest import BACKENDS, backend_device, require_backend
from drivers import bit_pattern, quantile_rows
from fused_sched import ops
from fused_sched.coefficients.table import assemble
from fused_sched.ops import backends, layout as L, reference


def _random_rows(batch, seed=0):
    return torch.randn(batch, L.NUM_COEFFICIENTS, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("clip", ["none", "clamp", "threshold"])
def test_each_batch_row_uses_its_own_coefficients(clip):
    """Row b applied to batch element b equals stepping element b alone with row b."""
    x, m, h1, h2, z = (torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(i)) for i in range(5))
    rows = _random_rows(3)
    kwargs = dict(clip=clip, clip_range=0.7, threshold_ratio=0.9, threshold_max=1.5, history_dtype=torch.float32,
                  x0_dtype=torch.float32, backend="torch")
    batched = ops.fused_step(x, m, rows, history=(h1, h2), noise=z, **kwargs)
    for b in range(3):
        alone = ops.fused_step(x[b:b + 1], m[b:b + 1], rows[b:b + 1], history=(h1[b:b + 1], h2[b:b + 1]),
                               noise=z[b:b + 1], **kwargs)
        for got, want in zip(batched, alone):
            assert torch.equal(got[b:b + 1], want)


def test_reference_formula_in_float64():
    """The op evaluates layout.py's formula; checked element by element in float64."""
    x, m, h1, h2, z = (torch.randn(2, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                       for i in range(5))
    c = _random_rows(2).double()
    c[1, L.US] = 0.0  # a row without the unclipped form of d
    prev, d, x0 = ops.fused_step(x, m, c, history=(h1, h2), noise=z, clip="clamp", clip_range=0.5,
                                 history_dtype=torch.float64, x0_dtype=torch.float64, backend="torch")
    forms = set()
    for b in range(2):
        k = c[b].tolist()
        for j in range(33):
            x0_sum = k[L.AX] * x[b, j].item() + (k[L.AM] + k[L.AL]) * m[b, j].item()
            unclipped = k[L.AS] * x0_sum
            e0 = min(max(unclipped, -0.5), 0.5)
            if e0 == unclipped and k[L.US] != 0:
                ed = k[L.US] * (k[L.UX] * x[b, j].item() + k[L.UM] * m[b, j].item())
            else:
                ed = k[L.PS] * (k[L.PX] * x[b, j].item() + k[L.P0] * e0 + k[L.PM] * m[b, j].item())
            forms.add((b, e0 == unclipped))
            eo = (k[L.OX] * x[b, j].item() + k[L.OC] * e0 + k[L.O0] * ed + k[L.OM] * m[b, j].item()
                  + k[L.O1] * (ed - h1[b, j].item()) + k[L.O2] * (h1[b, j].item() - h2[b, j].item())
                  + k[L.ON] * z[b, j].item())
            assert x0[b, j].item() == pytest.approx(e0, rel=1e-12, abs=1e-12)
            assert d[b, j].item() == pytest.approx(ed, rel=1e-12, abs=1e-12)
            assert prev[b, j].item() == pytest.approx(eo, rel=1e-12, abs=1e-12)
    assert forms == {(0, True), (0, False), (1, True), (1, False)}  # every form of d was checked


@pytest.mark.parametrize("backend", BACKENDS)
def test_am_low_part_keeps_an_infinite_model_output_infinite(backend):
    """A table splits AM into its float32 part and the rest AL (layout.py), toward zero, so
    both have one sign: with m = +-inf, AM*m + AL*m is an infinity, as diffusers' x - sigma*m
    is, never inf - inf = NaN (which thresholding would spread over the batch row). Checked
    on sigmas whose nearest float32 lies on either side, and on sigmas that are float32
    numbers in a table whose other rows need a low part (0.5, 0.25): those get one too, as a
    zero AL in such a row would be 0*inf = NaN (only a column that is 0 in every row is left
    out). A table whose every AM is a float32 number keeps AL = 0 (left out)."""
    require_backend(backend)
    device = backend_device(backend)
    sigma = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.99999986, 0.25, 1e-3], dtype=torch.float64)
    table = assemble(len(sigma), ax=1.0, am=-sigma, **{"as": 2.0})
    assert bool((table[:, L.AL] != 0).all())
    exact = assemble(2, ax=1.0, am=torch.tensor([-0.5, -0.25], dtype=torch.float64))
    assert bool((exact[:, L.AL] == 0).all()) and exact[:, L.AM].tolist() == [-0.5, -0.25]
    assert bool((table[:, L.AL] * table[:, L.AM] > 0).all()) and bool((table[:, L.AM] + table[:, L.AL] == -sigma).all())
    x = torch.tensor([[0.5, -0.5]], device=device)
    m = torch.tensor([[math.inf, -math.inf]], device=device)
    for row in table.to(torch.float32).to(device):
        x0 = ops.fused_step(x, m, row[None], x0_dtype=torch.float32, backend=backend).x0
        assert torch.equal(x0, torch.tensor([[-math.inf, math.inf]], device=device)), (row, x0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_x0_enters_the_output_only_when_clipping(backend):
    """OC multiplies the clipped x0. Unclipped, x0 may be +-inf (AS = inf: zero-SNR epsilon
    prediction at t = T-1) and a table folds any x0 term into OX and OM, so OC is not read:
    prev = OX*x + O0*d stays +-inf where 0*inf would make it NaN."""
    require_backend(backend)
    device = backend_device(backend)
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]], device=device)
    m = torch.tensor([[0.5, 1.0, 0.25, -1.0]], device=device)
    rows = torch.zeros(1, L.NUM_COEFFICIENTS, device=device)
    rows[0, L.AX], rows[0, L.AM], rows[0, L.AS] = 1.0, -1.0, math.inf  # x0 = inf*(x - m)
    rows[0, L.P0], rows[0, L.PS], rows[0, L.OX], rows[0, L.O0], rows[0, L.OC] = 1.0, 1.0, 2.0, 3.0, 0.0  # d = x0
    prev = ops.fused_step(x, m, rows, backend=backend).prev_sample
    assert torch.equal(prev, torch.tensor([[math.inf, -math.inf, math.inf, math.inf]], device=device))
    rows[0, L.AS], rows[0, L.OC] = 1.0, 5.0
    clamped = ops.fused_step(x, m, rows, clip="clamp", clip_range=1.0, backend=backend).prev_sample
    x0 = (x - m).clamp(-1.0, 1.0)
    assert torch.equal(clamped, torch.addcmul(torch.addcmul(2.0 * x, rows[0, L.OC], x0), rows[0, L.O0], x0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_subnormals_are_not_flushed(backend):
    """Subnormal inputs, and products that fall below 2**-126, keep their exact values, as in
    IEEE arithmetic and the reference: a kernel built or run with flush-to-zero (nvcc
    -ftz=true, refused at build time, or a GPU's .ftz instructions) would make them 0.
    Every value here is exact (powers of two times few-bit mantissas), so the expected
    bits are the float64 evaluation's."""
    require_backend(backend)
    device = backend_device(backend)
    normal = [2.0**-122 * (1 + k / 8) for k in range(8)]
    subnormal = [k * 2.0**-140 for k in range(1, 9)]
    x64 = torch.tensor([normal + subnormal, [-v for v in subnormal + normal]], dtype=torch.float64)
    m = torch.ones(2, 16, device=device)
    rows = torch.zeros(1, L.NUM_COEFFICIENTS, device=device)
    rows[0, L.AX], rows[0, L.AS], rows[0, L.OX] = 1.0, 2.0**-6, 0.5  # x0 = x/64, prev = x/2
    out = ops.fused_step(x64.float().to(device), m, rows, x0_dtype=torch.float32, backend=backend)
    for name, got, exact in (("prev", out.prev_sample, x64 / 2), ("x0", out.x0, x64 / 64)):
        expected = exact.float()
        assert torch.equal(expected.double(), exact) and expected.ne(0).all(), f"{name}: the case is not exact"
        assert (expected.abs() < torch.finfo(torch.float32).tiny).sum() >= 8, f"{name}: too few subnormals"
        assert torch.equal(got.cpu().view(torch.int32), expected.view(torch.int32)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_clip_as_one_clamp_equals_the_spec_form_bit_for_bit(dtype):
    """The reference clips thresholded x0 as clamp(x0 / s, -1, 1), one op shorter than the
    spec's clamp(x0, -s, s) / s that diffusers and the kernels compute. Equal for every
    s > 0, inf and NaN (the scales a step can have: threshold_max > 0 is checked): division
    by s > 0 is monotone and s / s == 1. Checked on the values where they could part:
    signed zeros, the clamp boundary and its neighbours, infinities, NaN."""
    tiny = torch.finfo(dtype).tiny
    scales = torch.tensor([1.0, 1.0 + torch.finfo(dtype).eps, 1.5, 3.0, 0.5, tiny, 1e30, math.inf, math.nan],
                          dtype=dtype)
    for s in scales:
        edges = [s, torch.nextafter(s, s.new_tensor(math.inf)), torch.nextafter(s, s.new_tensor(0.0))]
        values = torch.tensor([0.0, -0.0, tiny, 1.0, 2.5, 1e38, math.inf, math.nan], dtype=dtype)
        values = torch.cat([values, torch.stack(edges)])
        values = torch.cat([values, -values])
        spec = torch.minimum(torch.maximum(values, -s), s) / s
        short = torch.clamp(values / s, -1.0, 1.0)
        assert torch.equal(bit_pattern(short), bit_pattern(spec)), s


@pytest.mark.parametrize("shape", [(3,), (3, 5), (2, 3, 4, 5, 2)])  # 1-D: one element per batch row
@pytest.mark.parametrize("backend", BACKENDS)
def test_thresholding_scales_each_batch_row_for_any_rank(backend, shape):
    """x0 clipped to +-s_b and divided by s_b, s_b from batch row b alone, whatever the
    sample's rank (the scale is broadcast back over the row's own dimensions)."""
    require_backend(backend)
    device = backend_device(backend)
    g = torch.Generator().manual_seed(5)
    x, m = (torch.randn(shape, generator=g) * 3 for _ in range(2))
    rows = torch.zeros(1, L.NUM_COEFFICIENTS)
    rows[0, L.AX], rows[0, L.AM], rows[0, L.AS], rows[0, L.P0], rows[0, L.PS], rows[0, L.O0] = 1.0, -0.5, 1.0, 1.0, 1.0, 1.0
    out = ops.fused_step(x.to(device), m.to(device), rows.to(device), clip="threshold", threshold_ratio=0.7,
                         threshold_max=2.0, x0_dtype=torch.float32, backend=backend)
    x0 = torch.addcmul(x, rows[0, L.AM], m)
    s = torch.quantile(x0.reshape(shape[0], -1).abs(), 0.7, dim=1).clamp(1.0, 2.0)
    s = s.reshape((-1,) + (1,) * (len(shape) - 1))
    expected = torch.minimum(torch.maximum(x0, -s), s) / s
    assert out.x0.shape == shape and out.prev_sample.shape == shape
    assert torch.equal(out.x0.cpu(), expected) and torch.equal(out.prev_sample.cpu(), expected)


@pytest.mark.parametrize("kind", ["random", "above_one", "wide_range", "ties", "constant", "nan", "signed_zeros"])
@pytest.mark.parametrize("n", [1, 2, 17, 1000, 4099])
@pytest.mark.parametrize("ratio", [0.995, 0.87, 0.5, 0.1, 1.0, 0.0])  # 0.1, 0: selection from the low end
def test_threshold_scale_equals_torch_quantile(kind, n, ratio):
    values = quantile_rows(kind, n, torch.Generator().manual_seed(3))
    identity = torch.zeros(1, L.NUM_COEFFICIENTS)
    identity[0, L.AM] = identity[0, L.AS] = 1.0  # x0 = m
    for max_value in (1.0, 2.5, 0.5):
        got = reference.threshold_scale(torch.zeros_like(values), values, identity, ratio, max_value)
        want = torch.clamp(torch.quantile(values.abs(), ratio, dim=1), min=1, max=max_value)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_quantile_rank_is_float32_arithmetic():
    """For N = 1,123,200 (CogVideoX's latent) the float32 rank is integral; float64's is not."""
    lo, hi, weight = reference.quantile_rank(0.995, 1_123_200)
    assert (lo, hi, weight) == (1_117_583, 1_117_583, 0.0)
    assert 0.995 * (1_123_200 - 1) != float(np.float32(0.995) * np.float32(1_123_200 - 1))


@pytest.mark.parametrize("n, ratio", [(1_123_200, 0.995), (101, 0.29)])
def test_quantile_rank_follows_the_input_dtype(n, ratio):
    """A float64 step ranks in float64, as torch.quantile does for float64 input: here the
    float32 and float64 ranks pick different weights, and each dtype matches torch."""
    assert reference.quantile_rank(ratio, n, torch.float64) != reference.quantile_rank(ratio, n, torch.float32)
    values = torch.randn(2, n, generator=torch.Generator().manual_seed(0)) * 3
    identity = torch.zeros(1, L.NUM_COEFFICIENTS)
    identity[0, L.AM] = identity[0, L.AS] = 1.0
    for dtype in (torch.float32, torch.float64):
        v = values.to(dtype)
        got = reference.threshold_scale(torch.zeros_like(v), v, identity.to(dtype), ratio, 1e6)
        want = torch.clamp(torch.quantile(v.abs(), ratio, dim=1), min=1, max=1e6)
        assert torch.equal(got, want), dtype


def test_threshold_scale_beyond_torch_quantile_limit():
    """torch.quantile refuses rows above 2**24 elements; selection has no such limit. Checked
    against a sort of the same row with the same float32 rank rule."""
    n = 2**24 + 3
    values = torch.randn(1, n, generator=torch.Generator().manual_seed(0))
    identity = torch.zeros(1, L.NUM_COEFFICIENTS)
    identity[0, L.AM] = identity[0, L.AS] = 1.0
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(values.abs(), 0.995, dim=1)
    got = reference.threshold_scale(torch.zeros_like(values), values, identity, 0.995, 10.0)
    ordered = values.abs().sort(dim=1).values
    lo, hi, weight = reference.quantile_rank(0.995, n)
    want = torch.lerp(ordered[:, lo], ordered[:, hi], torch.tensor([weight]))
    assert torch.equal(got, torch.clamp(want, 1.0, 10.0))


# --- backend selection -------------------------------------------------------------------

def test_unknown_backend_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="'bogus' is not a backend"):
        ops.set_backend("bogus")
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="FUSED_SCHED_BACKEND='bogus'"):
        backends.requested_backend()


def test_selection_order(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.requested_backend() == "torch"
    with ops.use_backend("cpu"):
        assert backends.requested_backend() == "cpu"
        assert backends.requested_backend("torch") == "torch"  # an explicit argument wins
    assert backends.requested_backend() == "torch"


def test_use_backend_selects_for_its_own_thread_only():
    """use_backend is this thread's (before set_backend's process-wide selection): a block
    in another thread neither changes this thread's backend nor, leaving out of order with
    this one's, leaves its own selection behind."""
    entered, leave = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        with ops.use_backend("cpu"):
            seen["inside"] = backends.requested_backend()
            entered.set()
            leave.wait()
        seen["after"] = backends.requested_backend()

    with ops.use_backend("torch"):
        worker = threading.Thread(target=other_thread)
        worker.start()
        entered.wait()
        assert backends.requested_backend() == "torch"  # while the other thread's block is open
    leave.set()  # the other block ends after this one
    worker.join()
    assert seen == {"inside": "cpu", "after": backends.requested_backend()}
    assert backends._thread_selection.name is None
    previous = backends._selected
    try:
        ops.set_backend("torch")
        with ops.use_backend("auto"):  # 'auto' is a selection of its own
            assert backends.requested_backend() == "auto"
        worker = threading.Thread(target=lambda: seen.update(set_elsewhere=backends.requested_backend()))
        worker.start()
        worker.join()
        assert seen["set_elsewhere"] == "torch"  # set_backend is every thread's
    finally:
        backends._selected = previous


def test_a_traced_step_runs_the_backend_selected_when_it_runs():
    """The traced op is one opaque node that selects its backend at each call: a step traced
    under one use_backend runs under another's selection, in the thread that calls it, and
    is not traced again (a backend that cannot run the case refuses it there, loudly)."""
    torch._dynamo.reset()
    frames = torch._dynamo.testing.CompileCounter()
    x = torch.randn(1, 8)
    c = torch.randn(1, L.NUM_COEFFICIENTS)
    step = torch.compile(fullgraph=True, backend=frames)(lambda x: ops.fused_step(x, x, c)[0])
    with ops.use_backend("torch"):
        torch.testing.assert_close(step(x), ops.fused_step(x, x, c, backend="torch")[0], rtol=1e-6, atol=1e-6)
    with ops.use_backend("cuda"), pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' cannot run on cpu"):
        step(x)
    assert frames.frame_count == 1


def test_explicit_backend_that_cannot_run_is_an_error_not_a_substitute():
    x = torch.randn(1, 8)
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' cannot run on cpu"):
        ops.fused_step(x, x, torch.zeros(1, L.NUM_COEFFICIENTS), backend="cuda")


def test_auto_hands_float64_to_torch():
    """Kernel backends store fp16/bf16/fp32 only; auto gives float64 to the reference, visibly."""
    chosen = backends.select_backend(torch.device("cpu"), (torch.float64,), "auto")
    assert chosen.name == "torch"


def test_auto_says_once_that_it_passes_over_a_backend_that_failed_to_load(monkeypatch):
    """A failed build (no compiler, say) leaves every step on the reference: auto runs it,
    and warns once per process, naming the backend and the error. A backend that merely
    cannot run a case (float64 on the compiled ones) is passed over without a word."""
    import warnings

    monkeypatch.delitem(backends._loaded, "cpu", raising=False)
    monkeypatch.setitem(backends._load_errors, "cpu", "RuntimeError: building the extension failed")
    monkeypatch.setattr(backends, "_load_errors_reported", set())
    monkeypatch.setattr(backends, "_choices", {})
    with pytest.warns(RuntimeWarning, match="backend 'cpu' failed to load .RuntimeError: building the extension"):
        chosen = backends.select_backend(torch.device("cpu"), (torch.float32,), "auto")
    assert chosen.name == "torch"
    monkeypatch.setattr(backends, "_choices", {})  # not merely a cached choice: the warning is once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select_backend(torch.device("cpu"), (torch.float16,), "auto").name == "torch"
    monkeypatch.delitem(backends._load_errors, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select_backend(torch.device("cpu"), (torch.float64,), "auto").name == "torch"


def test_auto_on_cpu_prefers_the_extension_when_it_loads():
    chosen = backends.select_backend(torch.device("cpu"), (torch.float32,), "auto")
    cpu_reason = backends.why_unavailable("cpu", torch.device("cpu"), (torch.float32,))
    assert chosen.name == ("cpu" if cpu_reason is None else "torch")
