"""FusedDDIMInverseScheduler: DDIMInverseScheduler whose step is one fused op."""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler, SchedulerMixin  # noqa: F401  (SchedulerMixin: see base.py)
from diffusers.schedulers.scheduling_ddim_inverse import DDIMSchedulerOutput

from ..coefficients.ddim import ddim_inverse_table
from .base import validated_init
from .ddim import _check_clipping_config
from .ddim_family import DDIMFamilyMixin
from .step_output import step_output


class FusedDDIMInverseScheduler(DDIMFamilyMixin, DDIMInverseScheduler):
    _validate_config = _check_clipping_config
    __init__ = validated_init(DDIMInverseScheduler.__init__)
    _step_config_options = ("prediction_type", "clip_sample", "clip_sample_range", "num_train_timesteps")
    _step_schedule_state = ("num_inference_steps", "alphas_cumprod", "initial_alpha_cumprod")

    def _boundary_alpha(self) -> torch.Tensor:
        return self.initial_alpha_cumprod

    def _alpha_rises_across_step(self, t: int) -> bool:
        return False  # the inverse steps toward noise: alpha-bar falls, and no variance is formed

    def _build_tables(self, device) -> None:
        alphas, initial = self._host_alphas
        # made with the tables: steps read no config
        self._clip = dict(clip="clamp", clip_range=self.config.clip_sample_range) if self.config.clip_sample else {}
        table = ddim_inverse_table(alphas, self._step_gap(), initial, self.config.prediction_type)
        self._install_table("step", table, device, clips=self.config.clip_sample)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        self._require_schedule()
        prev, x0 = self._fused_step("step", timestep, sample, model_output, None, self._clip)
        if not return_dict:
            return (prev, x0)
        return step_output(DDIMSchedulerOutput, prev, x0)
