"""The Triton kernels compile for real GPUs, here, without one (tests/triton_gpu_compile.py).

Triton's interpreter, which runs the kernels in CI, checks their arithmetic but skips the
compiler and the launch path: a kernel can pass every interpreted test and still fail to
compile, or fail at every launch (a float NaN constexpr global did: a launch checks that
the globals a kernel used are unchanged, and NaN != NaN). So each host wrapper records its
launches on CPU tensors and Triton's own launch path compiles them, down to a cubin, for
sm_90 (every step-kernel specialisation and every thresholding pass) and sm_80, in
subprocesses without TRITON_INTERPRET. The generated code is then checked for what the
kernels promise: 16-byte vector accesses to element data, correctly rounded division, and
machine code that does not depend on Triton's fp-fusion default (which changes in Triton
3.10), so the kernels round every product and sum exactly as the reference does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = (90, 80)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{sm: [per-kernel summary]}: both targets compiled in parallel subprocesses."""
    pytest.importorskip("triton")
    # Compiled mode, with the launcher users get by default (every autotuning configuration).
    env = subprocess_env(drop=("TRITON_INTERPRET", "FUSED_SCHED_TRITON_AUTOTUNE"))
    directory = tmp_path_factory.mktemp("triton_gpu_compile")
    runs = {sm: subprocess.Popen([sys.executable, str(ROOT / "tests" / "triton_gpu_compile.py"), str(sm),
                                  str(directory / f"sm{sm}.json")], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            for sm in ARCHITECTURES}
    results = {}
    for sm, run in runs.items():
        output, _ = run.communicate(timeout=900)
        assert run.returncode == 0, f"compiling the Triton kernels for sm_{sm} failed:\n{output[-6000:]}"
        results[sm] = json.loads((directory / f"sm{sm}.json").read_text())["kernels"]
    return results


def test_every_kernel_compiles_to_a_cubin(compiled):
    kernels = {"_step_kernel", "_init_kernel", "_histogram_kernel", "_narrow_kernel", "_philox_bits_kernel"}
    for sm in ARCHITECTURES:
        assert {k["kernel"] for k in compiled[sm]} == kernels
        assert all(k["cubin_bytes"] > 0 for k in compiled[sm])
    cases = {k["case"] for k in compiled[90] if k["kernel"] == "_step_kernel"}
    specialisations = {f"step-{c}-h{h}-{n}" for c in ("none", "clamp", "threshold") for h in (0, 1, 2)
                       for n in ("none", "tensor", "philox")}
    assert specialisations <= cases
    # and the specialisations schedulers' tables make, with the terms they know to be 0 left out
    assert {"step-scheduler-ddim-clip", "step-scheduler-dpm++2m", "step-scheduler-dpm++2m-threshold",
            "step-scheduler-dpmsolver-threshold"} <= cases
    configs = {json.dumps(k["config"], sort_keys=True) for k in compiled[90] if k["kernel"] == "_step_kernel"}
    from fused_sched.ops.triton import step  # imported here: the module needs triton (importorskip above)

    assert len(configs) == len(step.AUTOTUNE_CONFIGS)


@pytest.mark.parametrize("kernel", ["_step_kernel", "_histogram_kernel"])
def test_element_data_moves_16_bytes_at_a_time(compiled, kernel):
    """fp32 and 16-bit storage alike: every masked (element) load and store of the
    elementwise kernels is a 128-bit vector access on a contiguous row, in every autotuning
    configuration; no element is loaded or stored alone."""
    entries = [k for sm in ARCHITECTURES for k in compiled[sm] if k["kernel"] == kernel]
    assert entries
    for entry in entries:
        assert not entry["masked_scalar_accesses"], (entry["case"], entry["config"], entry["masked_scalar_accesses"][:3])
        assert any(a.startswith("ld.global") and a.endswith(".v4.b32") for a in entry["vector_accesses"]), entry
        if kernel == "_step_kernel":
            assert "st.global.v4.b32" in entry["vector_accesses"], entry


def test_divisions_are_correctly_rounded(compiled):
    """Triton's `/` is an approximate division on NVIDIA GPUs; the kernels use div_rn."""
    for sm in ARCHITECTURES:
        for entry in compiled[sm]:
            assert set(entry["divisions"]) <= {"div.rn.f32"}, entry
    thresholded = [k for k in compiled[90] if k["case"].startswith("step-threshold")]
    assert thresholded and all(k["divisions"] == ["div.rn.f32"] for k in thresholded)


def test_machine_code_does_not_depend_on_fp_fusion(compiled):
    """The same SASS with enable_fp_fusion on and off: every fma in the kernels is an
    explicit tl.fma, so no product and sum is contracted behind the reference's back."""
    checked = [k for k in compiled[90] if "same_sass_with_and_without_fp_fusion" in k]
    assert {k["kernel"] for k in checked} == {"_step_kernel", "_init_kernel", "_histogram_kernel", "_narrow_kernel"}
    for entry in checked:
        assert entry["same_sass_with_and_without_fp_fusion"], (entry["case"], entry["kernel"], entry["config"])


def test_inductor_compiles_the_kernels_it_regenerates(compiled):
    """torch.compile with inductor does not launch a registered op's kernel as written: it
    regenerates the kernel's source from the globals the kernel loads (other kernels, ints,
    constexprs) and compiles that. A helper reached through a module attribute (C.AX) was
    left undefined there, and every compiled call of the ops failed. Every specialisation
    compiled from the regenerated source is the same machine code."""
    for sm in ARCHITECTURES:
        checked = [k for k in compiled[sm] if "same_sass_as_inductor_regenerates" in k]
        assert {k["kernel"] for k in checked} == {k["kernel"] for k in compiled[sm]}
        for entry in checked:
            assert entry["same_sass_as_inductor_regenerates"], (sm, entry["case"], entry["kernel"])


# The registered Triton ops traced as torch.compile traces them with dynamic shapes (sizes
# as symbols), in compiled mode: there a triton_op's shapes come from running its host
# wrapper on fake tensors, which the interpreter's hand-written fakes never do. The host
# wrapper asks the (absent) GPU for its index and SM count only to size the grid.
TRACE_WITH_SYMBOLIC_SIZES = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from fused_sched.ops import layout
from fused_sched.ops.triton import _common, step, threshold
assert not _common.INTERPRETED
threshold._multiprocessors = lambda index: 132
torch.cuda.current_device = lambda: 0

def thresholded_step(x, m, c):
    scale = threshold.threshold_scale_op(x, m, c, 0.995, 1.0)
    return step.fused_step_op(x, m, c, [x], None, "threshold", 1.0, scale, torch.float32, torch.float32, None)

x = torch.randn(2, 4096)
graph = make_fx(thresholded_step, tracing_mode="symbolic")(x, x, torch.zeros(2, layout.NUM_COEFFICIENTS))
print(sorted({str(n.target) for n in graph.graph.nodes if n.op == "call_function"}))
"""


def test_the_registered_ops_trace_with_symbolic_sizes():
    """A compiled pipeline that changes resolution, frame count or batch, or one compiled
    with dynamic=True, traces the ops with symbolic sizes; the thresholding wrapper hashed
    them (its rank cache) and failed with 'unhashable type: SymInt'."""
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", TRACE_WITH_SYMBOLIC_SIZES],
                         env=subprocess_env(drop=("TRITON_INTERPRET",)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "fused_sched.triton_threshold_scale.default" in run.stdout
    assert "fused_sched.triton_fused_step.default" in run.stdout
