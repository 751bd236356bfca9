"""The cpu backend's step loops compiled with their absent terms known (csrc/cpu/known_absent_terms.h).

A loop that reads the absent terms at run time blends every term in or out; one compiled
with them known leaves them out of the code. Both compute the same bits, so:

- every common configuration of every scheduler steps through a loop with its absent
  terms compiled in (else the list lacks an entry: the test prints the entries to add);
- every entry's loop gives the reference's bits, inf, NaN, -0.0 and subnormals in every
  input included (an absent term's operand must stay out of the result), and the bits of
  the run-time loop.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_backend
from drivers import StepArgs, bit_pattern, make_pair, run_trajectory
from fused_sched import ops
from fused_sched.ops import extension, layout as L

CLIP_NAMES = ("Clip::kNone", "Clip::kClamp", "Clip::kThreshold")
# cpu_fused_step's parameters in order (csrc/bindings.cpp, def_fused_step)
STEP_ARGUMENTS = ("sample", "model_output", "coefficients", "history1", "history2", "noise", "noise_mode",
                  "philox_seed", "philox_offset", "philox_base", "scale", "clip", "clip_range", "absent_terms", "out",
                  "history_out", "x0_out")

# The configurations of the schedulers that pipelines use, and the options that change
# which terms a table leaves out (prediction type, clipping, thresholding, noise, order).
ZERO_SNR_TRAILING = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                     "timestep_spacing": "trailing", "clip_sample": False}
COMMON_CONFIGURATIONS = [
    ("ddim", {}, StepArgs()),
    ("ddim", {}, StepArgs(eta=0.5)),
    ("ddim", {"clip_sample": False}, StepArgs()),
    ("ddim", {"clip_sample": False}, StepArgs(eta=1.0)),
    ("ddim", {"prediction_type": "sample"}, StepArgs()),
    ("ddim", {"prediction_type": "sample"}, StepArgs(eta=0.5)),
    ("ddim", ZERO_SNR_TRAILING, StepArgs()),
    ("ddim", {"thresholding": True, "clip_sample": False}, StepArgs()),
    ("ddim", {"thresholding": True, "clip_sample": False}, StepArgs(eta=0.5)),
    ("ddim_inverse", {}, StepArgs()),
    ("ddim_inverse", {"clip_sample": False}, StepArgs()),
    ("cogvideox_ddim", ZERO_SNR_TRAILING, StepArgs()),
    ("cogvideox_dpm", ZERO_SNR_TRAILING, StepArgs()),
    ("dpm", {}, StepArgs()),
    ("dpm", {"use_karras_sigmas": True}, StepArgs()),
    ("dpm", {"solver_order": 3}, StepArgs()),
    ("dpm", {"solver_type": "heun"}, StepArgs()),
    ("dpm", {"prediction_type": "v_prediction"}, StepArgs()),
    ("dpm", {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}, StepArgs()),
    ("dpm", {"algorithm_type": "sde-dpmsolver++"}, StepArgs()),
    ("dpm", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, StepArgs()),
    ("dpm", {"thresholding": True}, StepArgs()),
    ("dpm", {"thresholding": True, "prediction_type": "sample"}, StepArgs()),
    ("dpm", {"thresholding": True, "variance_type": "learned_range"}, StepArgs()),
    ("dpm", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, StepArgs()),
    ("dpm_inverse", {}, StepArgs()),
]


@pytest.fixture(scope="module")
def module():
    """The compiled module, where its loops are compiled with fused multiply-adds, as ATen's
    (else the reference rounds its addcmul terms twice: test_compiled_kernels.py)."""
    require_backend("cpu")
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("ATen's DEFAULT capability: the reference rounds addcmul's product separately, and the "
                    "x86 loops are the baseline-ISA ones, which read the absent terms at run time")
    return extension.load_extension()


def _entry_source(clip, history, noise, unclipped_form, absent) -> str:
    names = ", ".join(f"k{L.COLUMN_NAMES[c].upper()}" for c in range(L.NUM_COEFFICIENTS) if absent >> c & 1)
    return (f"{{{CLIP_NAMES[clip]}, {history}, {str(noise).lower()}, {str(unclipped_form).lower()}, "
            f"columns<{names}>}},")


@pytest.fixture(scope="module")
def common_loops(module):
    """{(clip, history, noise, unclipped form, absent terms read, compiled in): the first
    configuration whose step runs that loop}, over whole trajectories of every configuration."""
    loops = {}
    backend = extension.CPU_BACKEND
    step = backend._fused_step
    producer = None

    def recording_step(*args, **kwargs):
        call = dict(zip(STEP_ARGUMENTS, args), **kwargs)
        clip, noise = call["clip"], call["noise_mode"] != 0
        history = (call["history1"] is not None) + (call["history2"] is not None)
        loop = module.cpu_step_loop(clip, history, noise, call["absent_terms"])
        loops.setdefault((clip, history, noise, *loop), producer)
        return step(*args, **kwargs)

    backend._fused_step = recording_step
    try:
        for kind, config, step_args in COMMON_CONFIGURATIONS:
            producer = f"{kind} {config}" + (f" eta={step_args.eta}" if step_args.eta else "")
            _, fused = make_pair(kind, config)
            with ops.use_backend("cpu"):
                _, error = run_trajectory(kind, fused, config, 6, shape=(1, 3, 4, 4), args=step_args)
            assert error is None, (producer, error)
    finally:
        backend._fused_step = step
    return loops


def test_common_configurations_run_loops_with_their_absent_terms_compiled_in(common_loops):
    assert len(common_loops) >= 10, f"too few distinct loops recorded: {common_loops}"
    missing = {_entry_source(*loop[:5]): producer for loop, producer in common_loops.items() if not loop[5]}
    assert not missing, "add to kKnownAbsentTerms in csrc/cpu/known_absent_terms.h:\n" + "\n".join(
        f"    {entry}  // {producer}" for entry, producer in sorted(missing.items()))


def test_every_entry_is_a_loop_that_a_common_configuration_runs(module, common_loops):
    """So that the list does not grow stale: each entry costs compile time."""
    used = {loop[:5] for loop in common_loops}
    unused = [_entry_source(*entry) for entry in module.cpu_known_absent_terms() if tuple(entry) not in used]
    assert not unused, "no common configuration runs these loops of known_absent_terms.h:\n" + "\n".join(unused)


def _special_values(seed: int, infinite: bool = True, nan: bool = True, n: int = 64) -> torch.Tensor:
    """Normal values with inf, -inf, NaN, +-0 and subnormals among them (unless left out), in
    two batch rows."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(2, n, generator=g) * 2
    inf = float("inf") if infinite else 5.0
    special = torch.tensor([inf, -inf, float("nan") if nan else 7.0, 0.0, -0.0, 1e-40, -3e-42, 1e-30])
    for row in range(2):
        values[row, torch.randperm(n, generator=g)[: len(special)]] = special
    return values


def test_every_known_absent_loop_gives_the_reference_bits(module):
    entries = module.cpu_known_absent_terms()
    assert entries, "kKnownAbsentTerms is empty"
    for index, (clip, history, noise, unclipped_form, absent) in enumerate(entries):
        columns = [c for c in L.TERM_COLUMNS if absent >> c & 1]
        if clip != 0 and not unclipped_form:
            columns += [L.US, L.UX, L.UM]
        known = L.ConstantColumns({c: 0.0 for c in columns})
        g = torch.Generator().manual_seed(index)
        rows = torch.randn(2, L.NUM_COEFFICIENTS, generator=g)
        rows[:, columns] = 0.0
        # A NaN in x0 (and inf - inf is one) makes its thresholded row all NaN: there, no NaN
        # in x, and no NaN or inf in m.
        x = _special_values(7 * index, nan=clip != 2)
        m = _special_values(7 * index + 1, infinite=clip != 2, nan=clip != 2)
        h1, h2, z = (_special_values(7 * index + k) for k in range(2, 5))
        args = dict(history=(h1, h2)[:history], noise=z if noise else None, clip=L.CLIP_MODES[clip],
                    clip_range=1.0, threshold_ratio=0.75, threshold_max=4.0, history_dtype=torch.float32,
                    x0_dtype=torch.float32, constant_columns=known)
        source = _entry_source(clip, history, noise, unclipped_form, absent)
        assert module.cpu_step_loop(clip, history, noise, known.absent_terms) == (unclipped_form, absent, True), source
        want = ops.fused_step(x, m, rows, backend="torch", **args)
        got = ops.fused_step(x, m, rows, backend="cpu", **args)
        module.cpu_use_portable_kernels_only(True)
        try:
            run_time = ops.fused_step(x, m, rows, backend="cpu", **args)
        finally:
            module.cpu_use_portable_kernels_only(False)
        for output, g_, w, r in zip(("prev", "d", "x0"), got, want, run_time):
            assert torch.equal(bit_pattern(g_), bit_pattern(w)), (source, output, "vs the reference")
            assert torch.equal(bit_pattern(g_), bit_pattern(r)), (source, output, "vs the run-time loop")
        assert got.prev_sample.isfinite().any(), f"{source}: every output NaN or inf, nothing compared"
