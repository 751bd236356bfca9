"""Step-latency measurement shared by ``bench/`` and the ``fused-sched`` command.

A case is (scheduler, config, latent shape, dtype). Each is timed side by side in one run:
diffusers' eager step and the fused class on a given backend, same inputs, same trajectory
position, timestep passed as an element of ``scheduler.timesteps`` as pipelines do. Times
are host+device wall time per step (synchronised on CUDA), median and spread over repeats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import diffusers
import torch

import fused_sched
from fused_sched import ops

SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, fused_sched.FusedDDIMScheduler, {}),
    "ddim-threshold": (diffusers.DDIMScheduler, fused_sched.FusedDDIMScheduler, {"thresholding": True}),
    "ddim-inverse": (diffusers.DDIMInverseScheduler, fused_sched.FusedDDIMInverseScheduler, {}),
    "dpm++2m": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler, {}),
    "dpm++3m": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler,
                {"solver_order": 3}),
    "dpm++2m-threshold": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler,
                          {"thresholding": True}),
    "sde-dpm++2m": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler,
                    {"algorithm_type": "sde-dpmsolver++"}),
    "cogvideox-ddim": (diffusers.CogVideoXDDIMScheduler, fused_sched.FusedCogVideoXDDIMScheduler,
                       {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                        "rescale_betas_zero_snr": True}),
    "cogvideox-dpm": (diffusers.CogVideoXDPMScheduler, fused_sched.FusedCogVideoXDPMScheduler,
                      {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                       "rescale_betas_zero_snr": True}),
}

SHAPES = {
    "tiny": (1, 4, 8, 8),
    "sd-512": (1, 4, 64, 64),
    "cogvideox-49f": (1, 13, 16, 60, 90),
    "wan-720p": (1, 16, 21, 90, 160),
    "hunyuan-720p": (1, 16, 33, 90, 160),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Timing:
    median_s: float
    spread_s: float  # interquartile range
    samples: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stepper(kind: str, scheduler, x: torch.Tensor, m: torch.Tensor, steps_before: int):
    """A zero-argument callable doing one mid-trajectory step; state is reset on each call so
    every repeat measures the same step (same order, same history)."""
    timesteps = scheduler.timesteps
    t = timesteps[steps_before]
    if kind.startswith("cogvideox-dpm"):
        back, old = timesteps[steps_before - 1], m.clone()
        return lambda: scheduler.step(m, old, t, back, x, return_dict=False)
    if kind.startswith("dpm") or kind.startswith("sde-dpm"):
        history = [m.clone() for _ in scheduler.model_outputs]

        def step():
            scheduler._step_index = steps_before
            scheduler.lower_order_nums = scheduler.config.solver_order
            scheduler.model_outputs = list(history)
            return scheduler.step(m, t, x)

        return step
    return lambda: scheduler.step(m, t, x)


def time_step(kind: str, which: str, shape, dtype, device, backend: str | None = None,
              repeats: int = 50, warmup: int = 5, steps: int = 20) -> Timing:
    """Time one step of ``kind`` for ``which`` = "diffusers" or "fused"."""
    reference_cls, fused_cls, config = SCHEDULERS[kind]
    scheduler = (reference_cls if which == "diffusers" else fused_cls)(**config)
    scheduler.set_timesteps(steps, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    m = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    step = stepper(kind, scheduler, x, m, steps // 2)
    context = ops.use_backend(backend) if (which == "fused" and backend) else contextlib.nullcontext()
    samples = []
    with context:
        for _ in range(warmup):
            step()
        _synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            _synchronize(device)
            samples.append(time.perf_counter() - start)
    quartiles = statistics.quantiles(samples, n=4)
    return Timing(statistics.median(samples), quartiles[2] - quartiles[0], len(samples))


def bytes_per_step(kind: str, shape, dtype) -> int:
    """Minimum bytes a fused step must move (reads + writes of full tensors), DESIGN.md."""
    _, _, config = SCHEDULERS[kind]
    numel = 1
    for d in shape:
        numel *= d
    element = torch.tensor([], dtype=dtype).element_size()
    reads, writes = 2, 2  # x, m -> prev and x0 (DDIM family) or prev and history value (DPM)
    if kind in ("dpm++2m", "dpm++2m-threshold", "sde-dpm++2m", "cogvideox-dpm"):
        reads += 1  # one history tensor
    if kind == "dpm++3m":
        reads += 2
    if kind.startswith("sde") or kind == "cogvideox-dpm":
        reads += 1  # the noise tensor (fp32 for SDE-DPM)
    if "threshold" in kind:
        reads += 2 * 4  # the selection passes re-read x and m (four radix digits)
    return numel * element * (reads + writes)


def copy_bandwidth(device: torch.device, megabytes: int | None = None, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write), measured now: the roofline a
    memory-bound step is judged against."""
    if megabytes is None:
        megabytes = 1024 if device.type == "cuda" else 64
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    target.copy_(source)
    _synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / statistics.median(samples)
