"""The one-line swap in real diffusers pipelines: ``pipe.scheduler = Fused*.from_config(
pipe.scheduler.config)`` gives diffusers' images (fp32 contract: within 1e-4 of their scale).

Tiny randomly initialised models stand in for trained ones, and prompt embeddings for the
text encoder (so nothing is downloaded; transformers is needed only because the pipelines'
modules import it). The pipelines drive the schedulers exactly as in production:
set_timesteps, init_noise_sigma, the step's keyword arguments chosen by inspecting its
signature, generator, output dataclass fields, CogVideoX's (old x0, timestep_back) step,
video-to-video's and img2img's add_noise and mid-schedule start (set_begin_index).
"""

from __future__ import annotations

import functools

import json

import PIL.Image
import pytest
import torch
from diffusers import (AutoencoderKL, AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                       CogVideoXPipeline, CogVideoXTransformer3DModel, CogVideoXVideoToVideoPipeline, DDIMPipeline,
                       DDIMScheduler, DDPMPipeline, DiffusionPipeline, DPMSolverMultistepScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionPanoramaPipeline, UNet2DConditionModel, UNet2DModel, UniPCMultistepScheduler,
                       WanPipeline, WanTransformer3DModel)

import fused_sched
from drivers import public_config

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


def _with_fused_scheduler(pipe, fused_cls, run):
    """run(pipe) with the one-line swap made, then diffusers' scheduler put back; fails
    unless the pipeline stepped the fused scheduler (not one it made or kept itself)."""
    diffusers_scheduler = pipe.scheduler
    fused = pipe.scheduler = fused_cls.from_config(diffusers_scheduler.config)
    steps_taken = []
    fused_step = fused.step

    @functools.wraps(fused_step)  # pipelines pass eta / generator as the step's signature takes them
    def counted_step(*args, **kwargs):
        steps_taken.append(kwargs.get("timestep", args[1] if len(args) > 1 else None))
        return fused_step(*args, **kwargs)

    fused.step = counted_step
    try:
        result = run(pipe)
    finally:
        pipe.scheduler = diffusers_scheduler
    assert steps_taken, "the pipeline never called the fused scheduler's step"
    return result


def _assert_swap_matches(pipe, fused_cls, run=None, **kwargs):
    run = run or (lambda p: _images(p, **kwargs))
    reference = run(pipe)
    fused = _with_fused_scheduler(pipe, fused_cls, run)
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


def _prompt_embeddings(batch, length, width):
    return tuple(torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed)) for seed in (2, 3))


def _tiny_cogvideox_transformer(temporal_compression_ratio):
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=temporal_compression_ratio, max_text_seq_length=8,
    ).eval()


@pytest.fixture(scope="module")
def cogvideox_pipe():
    # Without a VAE the pipeline takes the default factors (8 spatial, 4 temporal): 32x32 px and
    # 9 frames are a 3x4x4 latent with 4 channels, and output_type="latent" never decodes.
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=_tiny_cogvideox_transformer(4),
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cogvideox_latents(pipe, dtype=torch.float32, seed=1, **kwargs):
    prompt, negative = (e.to(dtype) for e in _prompt_embeddings(1, 8, 16))
    pipe.transformer.to(dtype)
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=32, width=32, num_frames=9,
                num_inference_steps=6, guidance_scale=6.0, generator=torch.Generator().manual_seed(seed),
                output_type="latent", **kwargs).frames


COGVIDEOX = {"cogvideox_ddim": (CogVideoXDDIMScheduler, fused_sched.FusedCogVideoXDDIMScheduler),
             "cogvideox_dpm": (CogVideoXDPMScheduler, fused_sched.FusedCogVideoXDPMScheduler)}


@pytest.mark.parametrize("use_dynamic_cfg", [False, True], ids=["cfg", "dynamic-cfg"])
@pytest.mark.parametrize("kind", sorted(COGVIDEOX))
def test_cogvideox_pipeline(cogvideox_pipe, kind, use_dynamic_cfg):
    diffusers_cls, fused_cls = COGVIDEOX[kind]
    cogvideox_pipe.scheduler = diffusers_cls()
    _assert_swap_matches(cogvideox_pipe, fused_cls, lambda p: _cogvideox_latents(p, use_dynamic_cfg=use_dynamic_cfg))


# Seeds of the bf16 comparison (see below): what is compared is their mean.
BF16_SEEDS = range(1, 9)


@pytest.mark.parametrize("kind", sorted(COGVIDEOX))
def test_cogvideox_pipeline_in_bfloat16(cogvideox_pipe, kind):
    """As CogVideoX runs: bf16 transformer and latents, fp32 guidance, the step's result cast
    back to bf16 by the pipeline. The bf16 transformer alone moves the result about 1.5% of
    its scale from the fp32 pipeline's, and diffusers rounds x*sqrt(a) to bf16 inside its step
    where the fused step does not, so the two bf16 runs differ by about as much as each
    differs from fp32. The claim tested: the fused run is on average no farther from the fp32
    pipeline than diffusers' bf16 run is, plus one bf16 ulp of the scale (the per-step
    contract of tests/test_low_precision.py, here over a whole pipeline).

    On average over seeds, because per seed the claim is not true: the tiny transformer
    amplifies each rounding chaotically, and the two runs' distances differ by a spread of
    about 0.003 of the scale (at seed 5 the fused DPM run is 0.004 farther than diffusers',
    over ten seeds 0.0006 nearer on average). The mean of eight seeds has a standard error
    of about 0.001, so the margin of one ulp (0.0039) is four of them."""
    diffusers_cls, fused_cls = COGVIDEOX[kind]
    distances = {"diffusers": [], "fused": []}
    try:
        for seed in BF16_SEEDS:
            cogvideox_pipe.scheduler = diffusers_cls()
            fp32 = _cogvideox_latents(cogvideox_pipe, seed=seed)
            runs = {"diffusers": _cogvideox_latents(cogvideox_pipe, torch.bfloat16, seed=seed),
                    "fused": _with_fused_scheduler(cogvideox_pipe, fused_cls,
                                                   lambda p: _cogvideox_latents(p, torch.bfloat16, seed=seed))}
            for name, run in runs.items():
                assert run.dtype == torch.bfloat16 and run.shape == fp32.shape
                distances[name].append(float((run.float() - fp32).abs().max() / fp32.abs().max()))
    finally:
        cogvideox_pipe.transformer.to(torch.float32)
    mean = {name: sum(values) / len(values) for name, values in distances.items()}
    assert mean["fused"] <= mean["diffusers"] + 2.0 ** -8, distances


@pytest.mark.parametrize("kind", sorted(COGVIDEOX))
def test_cogvideox_video_to_video_pipeline_starts_mid_schedule_like_diffusers(kind):
    """strength 0.7 of 10 steps: the input video's latents noised by add_noise (5-D) at the
    4th timestep, and the first step there has no predecessor (CogVideoX DPM: first order)."""
    # A VAE with one temporal halving: 9 frames of 8x8 px are a 5x4x4 latent.
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=2,
    ).eval()
    diffusers_cls, fused_cls = COGVIDEOX[kind]
    pipe = CogVideoXVideoToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                         transformer=_tiny_cogvideox_transformer(2), scheduler=diffusers_cls())
    pipe.set_progress_bar_config(disable=True)
    frames = torch.rand(9, 8, 8, 3, generator=torch.Generator().manual_seed(4)).mul(255).to(torch.uint8).numpy()
    video = [PIL.Image.fromarray(frame) for frame in frames]
    prompt, negative = _prompt_embeddings(1, 8, 16)

    def run(pipe):
        return pipe(video=video, prompt_embeds=prompt, negative_prompt_embeds=negative, height=8, width=8,
                    num_inference_steps=10, strength=0.7, guidance_scale=6.0,
                    generator=torch.Generator().manual_seed(1), output_type="latent").frames

    _assert_swap_matches(pipe, fused_cls, run)


@pytest.mark.parametrize("config", [dict(), dict(algorithm_type="sde-dpmsolver++")], ids=["dpm++2m", "sde-dpm++2m"])
def test_wan_pipeline_with_flow_matching_dpm_solver(config):
    """Wan's pipeline with DPM-Solver on flow sigmas (its UniPC config, as users switch it):
    it calls set_begin_index(0) before the loop and reads scheduler.sigmas[i] per step."""
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    wan_config = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).config
    # Without a VAE the pipeline takes the default factors (8 spatial, 4 temporal).
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=DPMSolverMultistepScheduler.from_config(wan_config, **config))
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = _prompt_embeddings(1, 8, 16)

    def run(pipe):
        torch.manual_seed(5)  # Wan passes no generator to step: SDE noise comes from torch's default one
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=32, width=32, num_frames=9,
                    num_inference_steps=8, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                    output_type="latent").frames

    _assert_swap_matches(pipe, fused_sched.FusedDPMSolverMultistepScheduler, run)


@pytest.fixture(scope="module")
def img2img_pipe():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                          scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _img2img_latents(pipe, **kwargs):
    prompt, negative = _prompt_embeddings(1, 6, 16)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, image=image, strength=0.6,
                num_inference_steps=10, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                output_type="latent", **kwargs).images


@pytest.mark.parametrize("diffusers_cls, fused_cls, config, kwargs", [
    (DDIMScheduler, fused_sched.FusedDDIMScheduler, {}, dict(eta=1.0)),
    (DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler, {}, {}),
    (DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler,
     dict(algorithm_type="sde-dpmsolver++"), {}),
], ids=["ddim-eta1", "dpm++2m", "sde-dpm++2m"])
def test_img2img_pipeline_starts_mid_schedule_like_diffusers(img2img_pipe, diffusers_cls, fused_cls, config, kwargs):
    """strength 0.6 of 10 steps: add_noise at the 5th timestep, and where the class has
    set_begin_index (DPM), the pipeline starts the scheduler there with it."""
    begin_indices = []

    def run(pipe):
        latents = _img2img_latents(pipe, **kwargs)
        begin_indices.append(getattr(pipe.scheduler, "begin_index", None))
        return latents

    img2img_pipe.scheduler = diffusers_cls(**config)
    _assert_swap_matches(img2img_pipe, fused_cls, run)
    assert begin_indices == ([4, 4] if hasattr(diffusers_cls, "set_begin_index") else [None, None])


@pytest.mark.parametrize("diffusers_cls, fused_cls", [
    (DDIMScheduler, fused_sched.FusedDDIMScheduler),
    (DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler),
], ids=["ddim", "dpm++2m"])
def test_a_channels_last_unet_gives_diffusers_latents_in_diffusers_layout(img2img_pipe, diffusers_cls, fused_cls):
    """diffusers' memory-format advice, unet.to(memory_format=torch.channels_last): the model
    output is channels-last and the latents contiguous. The fused step reads the strided
    model output, and the latents it returns have diffusers' layout at every step."""
    model_output_channels_last, latents_contiguous = [], []

    def record_model_output(module, inputs, output):
        model_output_channels_last.append(output[0].is_contiguous(memory_format=torch.channels_last))

    def record_latents(pipe, i, t, callback_kwargs):
        latents_contiguous.append(callback_kwargs["latents"].is_contiguous())
        return callback_kwargs

    img2img_pipe.scheduler = diffusers_cls()
    img2img_pipe.unet.to(memory_format=torch.channels_last)
    hook = img2img_pipe.unet.register_forward_hook(record_model_output)
    try:
        _assert_swap_matches(img2img_pipe, fused_cls, lambda p: _img2img_latents(p, callback_on_step_end=record_latents))
    finally:
        hook.remove()
        img2img_pipe.unet.to(memory_format=torch.contiguous_format)
    steps = len(latents_contiguous) // 2
    assert steps > 0 and all(model_output_channels_last)  # the premise: every model output channels-last
    assert latents_contiguous[:steps] == latents_contiguous[steps:] == [True] * steps



def test_panorama_pipeline_restoring_its_ddim_scheduler_per_view():
    """MultiDiffusion (its default scheduler is DDIM) keeps one scheduler state per view:
    copy.deepcopy(scheduler.__dict__) after each view's step and __dict__.update before the
    next, around the class's own copy methods (every class: tests/test_api.py)."""
    # Views are 64 latent pixels wide at a stride of 8 where the image is 8 times the latents
    # (a VAE of four blocks): a 512 x 576 image gives two overlapping views. A UNet without
    # attention keeps 64 x 64 latents cheap.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, mid_block_type=None,
        cross_attention_dim=16, norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(8,) * 4, in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4).eval()
    pipe = StableDiffusionPanoramaPipeline(vae=vae, unet=unet, text_encoder=None, tokenizer=None,
                                           scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.get_views(512, 576)) == 2
    prompt, negative = _prompt_embeddings(1, 6, 16)

    def run(p):
        return p(prompt_embeds=prompt, negative_prompt_embeds=negative, height=512, width=576, num_inference_steps=5,
                 generator=torch.Generator().manual_seed(1), output_type="latent").images

    _assert_swap_matches(pipe, fused_sched.FusedDDIMScheduler, run)


# The (module, class) a saved pipeline's model_index.json names for each class: the module
# that defines it (diffusers writes __module__ for libraries other than its own). Pipelines
# saved today name these, so they must keep loading: a class moved elsewhere stays
# importable here, with diffusers' SchedulerMixin beside it (the loader looks for it there).
SAVED_NAMES = {
    fused_sched.FusedDDIMScheduler: "fused_sched.schedulers.ddim",
    fused_sched.FusedDDIMInverseScheduler: "fused_sched.schedulers.ddim_inverse",
    fused_sched.FusedDPMSolverMultistepScheduler: "fused_sched.schedulers.dpm",
    fused_sched.FusedDPMSolverMultistepInverseScheduler: "fused_sched.schedulers.dpm",
    fused_sched.FusedCogVideoXDDIMScheduler: "fused_sched.schedulers.cogvideox",
    fused_sched.FusedCogVideoXDPMScheduler: "fused_sched.schedulers.cogvideox",
}


@pytest.mark.parametrize("fused_cls", list(SAVED_NAMES), ids=lambda cls: cls.__name__)
def test_a_pipeline_saved_after_the_swap_loads_with_the_fused_scheduler(unet, fused_cls, tmp_path):
    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler())  # DDPMPipeline keeps the scheduler it is given
    pipe.scheduler = fused_cls.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == [fused_cls.__module__, fused_cls.__name__]
    # As saved today, or (after a move) as saved before it: the name SAVED_NAMES pins.
    index["scheduler"] = [SAVED_NAMES[fused_cls], fused_cls.__name__]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is fused_cls
    assert public_config(loaded.scheduler.config) == public_config(pipe.scheduler.config)
