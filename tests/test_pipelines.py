"""The one-line swap in real diffusers pipelines: ``pipe.scheduler = Fused*.from_config(
pipe.scheduler.config)`` gives diffusers' images (fp32 contract: within 1e-4 of their scale).

A tiny randomly initialised UNet stands in for a trained one; the pipelines drive the
schedulers exactly as in production (set_timesteps, init_noise_sigma, the step's keyword
arguments, generator, output dataclass fields).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, UNet2DModel

import fused_sched

FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def _images(pipe, **kwargs):
    # output_type="pt" keeps the pipeline's own post-processing (x/2 + 1/2, clamped) and no uint8 rounding
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(1), output_type="pt", **kwargs).images


def _assert_swap_matches(pipe, fused_cls, **kwargs):
    reference = _images(pipe, **kwargs)
    diffusers_scheduler = pipe.scheduler
    pipe.scheduler = fused_cls.from_config(diffusers_scheduler.config)
    try:
        fused = _images(pipe, **kwargs)
    finally:
        pipe.scheduler = diffusers_scheduler
    assert fused.dtype == reference.dtype and fused.shape == reference.shape
    error = float((fused - reference).abs().max() / reference.abs().max())
    assert error <= FP32_TOLERANCE, error


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline(unet, eta):
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    _assert_swap_matches(pipe, fused_sched.FusedDDIMScheduler, num_inference_steps=10, eta=eta)


def test_ddim_pipeline_replaces_a_scheduler_given_to_its_constructor(unet):
    """diffusers' DDIMPipeline turns any scheduler it is constructed with into a plain
    DDIMScheduler: the swap must come after construction (as the README shows)."""
    pipe = DDIMPipeline(unet=unet, scheduler=fused_sched.FusedDDIMScheduler())
    assert type(pipe.scheduler) is DDIMScheduler


@pytest.mark.parametrize("config", [dict(), dict(algorithm_type="sde-dpmsolver++"), dict(solver_order=3)],
                         ids=["dpm++2m", "sde-dpm++2m", "dpm++3m"])
def test_ddpm_pipeline_with_dpm_solver(unet, config):
    pipe = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    _assert_swap_matches(pipe, fused_sched.FusedDPMSolverMultistepScheduler, num_inference_steps=12)
