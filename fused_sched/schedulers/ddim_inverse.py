"""FusedDDIMInverseScheduler: DDIMInverseScheduler whose step is one fused op."""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler
from diffusers.schedulers.scheduling_ddim_inverse import DDIMSchedulerOutput

from .. import ops
from ..coefficients.ddim import ddim_inverse_table
from .base import validated_init
from .ddim import _check_config
from .ddim_family import DDIMFamilyMixin
from .step_output import step_output


class FusedDDIMInverseScheduler(DDIMFamilyMixin, DDIMInverseScheduler):
    __init__ = validated_init(DDIMInverseScheduler.__init__, _check_config)

    def _boundary_alpha(self) -> torch.Tensor:
        return self.initial_alpha_cumprod

    def _build_tables(self, device) -> None:
        alphas, initial = self._host_alphas
        # made per schedule, with the tables: steps read no config
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
        self._check_model_io(model_output, sample)
        placed = self._tables["step"]
        coefficient_dtype, promoted, x0_dtype = self._step_dtypes(sample, model_output)
        rows = self._row(placed, timestep, sample.device, coefficient_dtype)
        prev, _, x0 = ops.fused_step(sample, model_output, rows, out_dtype=promoted, x0_dtype=x0_dtype,
                                     constant_columns=placed.constant_columns, **self._clip)
        if not return_dict:
            return (prev, x0)
        return step_output(DDIMSchedulerOutput, prev, x0)
