"""bf16 / fp16 storage: close to diffusers, and at least as close to a float64 evaluation.

Teacher forcing feeds all evaluations the same low-precision sample and model output at every
step. Tolerances, from the issue's contract:
- within 3e-2 * max|diffusers| of diffusers (bf16 has 8 significant bits, ~4e-3 relative per
  rounding; diffusers rounds every intermediate, so the two may differ by several of those);
- max|fused - truth| <= max|diffusers - truth| + one storage ulp of max|truth|, where truth is
  the same step evaluated in float64 from the same inputs (the fused class on float64 tensors,
  whose rows hold the same scalars diffusers uses, composed in float64).
Where diffusers is itself far from float64 (the inverse DPM scheduler computes in the storage
dtype: its first bf16 step is 11% away), "within 3e-2 of diffusers" cannot hold for an
accurate result; there the fused step must instead be within 1e-2 of the float64 value.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from fused_sched import ops

from drivers import PAIRS, StepArgs, _step, relative_error, stand_in_model

LOW_PRECISION_TOLERANCE = 3e-2
ACCURATE_TOLERANCE = 1e-2

DETERMINISTIC = {
    "ddim": dict(),
    "ddim_inverse": dict(),
    "cogvideox_ddim": dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    "dpm": dict(solver_order=3, final_sigmas_type="sigma_min"),
    "dpm_inverse": dict(solver_order=2),
}
STOCHASTIC = {
    "ddim": (dict(), StepArgs(eta=1.0, noise="variance_noise")),
    "cogvideox_dpm": (dict(prediction_type="v_prediction", timestep_spacing="trailing"), StepArgs()),
    "dpm": (dict(algorithm_type="sde-dpmsolver++"), StepArgs(noise="variance_noise")),
}


def _teacher_forced(kind, config, dtype, model_dtype, args, with_truth, device):
    """Per step [diffusers, fused (the selected backend), truth (float64 reference op)] from
    the same inputs, with data on ``device``."""
    reference_cls, fused_cls = PAIRS[kind]
    schedulers = [reference_cls(**config), fused_cls(**config)] + ([fused_cls(**config)] if with_truth else [])
    for s in schedulers:
        s.set_timesteps(12, device=device)
    shape = (2, 4, 8, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(device)
    pattern = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(device)
    gens = [torch.Generator().manual_seed(0) for _ in schedulers]
    states = [{} for _ in schedulers]
    steps = []
    for i, t in enumerate(schedulers[0].timesteps):
        m = stand_in_model(x, t, pattern).to(model_dtype)
        outs = []
        for j, s in enumerate(schedulers):
            xi, mi = (x.double(), m.double()) if j == 2 else (x, m)
            with ops.use_backend("torch") if j == 2 else contextlib.nullcontext():
                outs.append(_step(kind, s, mi, s.timesteps[i], xi, i, s.timesteps, states[j], args, gens[j],
                                  torch.float32)[0])
        steps.append(outs)
        x = outs[0].to(dtype)
    return steps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", sorted(DETERMINISTIC))
def test_low_precision_is_no_farther_from_float64_than_diffusers(backend, device, kind, dtype):
    steps = _teacher_forced(kind, DETERMINISTIC[kind], dtype, dtype, StepArgs(), True, device)
    for i, (ref, fused, truth) in enumerate(steps):
        assert fused.dtype == ref.dtype
        assert (relative_error(fused, ref) <= LOW_PRECISION_TOLERANCE
                or relative_error(fused.double(), truth) <= ACCURATE_TOLERANCE), f"step {i}"
        ulp = torch.finfo(dtype).eps * float(truth.abs().max())
        fused_error = float((fused.double() - truth).abs().max())
        ref_error = float((ref.double() - truth).abs().max())
        assert fused_error <= ref_error + ulp, f"step {i}: fused {fused_error:.3e} vs diffusers {ref_error:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", sorted(STOCHASTIC))
def test_low_precision_with_noise_matches_diffusers(backend, device, kind, dtype):
    config, args = STOCHASTIC[kind]
    for i, (ref, fused) in enumerate(_teacher_forced(kind, config, dtype, dtype, args, False, device)):
        assert fused.dtype == ref.dtype
        assert relative_error(fused, ref) <= LOW_PRECISION_TOLERANCE, f"step {i}"


@pytest.mark.parametrize("kind", ["cogvideox_ddim", "cogvideox_dpm", "dpm"])
def test_bf16_sample_with_fp32_model_output(backend, device, kind):
    """The CogVideoX pipeline steps a bf16 latent with noise_pred.float()."""
    config = dict(prediction_type="v_prediction", timestep_spacing="trailing") if kind != "dpm" else {}
    steps = _teacher_forced(kind, config, torch.bfloat16, torch.float32, StepArgs(), False, device)
    for i, (ref, fused) in enumerate(steps):
        assert fused.dtype == ref.dtype == torch.float32
        assert relative_error(fused, ref) <= LOW_PRECISION_TOLERANCE, f"step {i}"
