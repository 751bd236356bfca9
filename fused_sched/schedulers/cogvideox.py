"""FusedCogVideoXDDIMScheduler and FusedCogVideoXDPMScheduler.

Both ignore eta / use_clipped_model_output / clip options, as diffusers does. Their tables
are float64 (scaled_linear) like diffusers' scalars; rows are rounded to float32 once.
"""

from __future__ import annotations

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.schedulers.scheduling_ddim_cogvideox import DDIMSchedulerOutput

from .. import ops
from ..coefficients.ddim import cogvideox_ddim_table, cogvideox_dpm_first_order_table, cogvideox_dpm_rows
from ..coefficients.table import PlacedTable
from ..ops import layout as L
from .base import validated_init
from .ddim import _check_config
from .ddim_family import AddNoiseMixin, DDIMFamilyMixin


def _x0_dtype(config, sample, model_output):
    if config.prediction_type == "sample":
        return model_output.dtype
    return torch.promote_types(sample.dtype, model_output.dtype)


class FusedCogVideoXDDIMScheduler(AddNoiseMixin, DDIMFamilyMixin, CogVideoXDDIMScheduler):
    __init__ = validated_init(CogVideoXDDIMScheduler.__init__, _check_config)

    def _build_tables(self, device) -> None:
        alphas, final = self._host_alphas
        table = cogvideox_ddim_table(alphas, self._step_gap(), final, self.config.prediction_type)
        self._install_table("step", table, device, clips=False)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        self._require_schedule()
        self._check_model_io(model_output, sample)
        placed = self._tables["step"]
        rows = self._row(placed, timestep, sample.device, self._coefficient_dtype(sample, model_output))
        prev, _, x0 = ops.fused_step(
            sample, model_output, rows, x0_dtype=_x0_dtype(self.config, sample, model_output),
            constant_columns=placed.constant_columns,
        )
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class FusedCogVideoXDPMScheduler(AddNoiseMixin, DDIMFamilyMixin, CogVideoXDPMScheduler):
    """Second-order rows exist for the pipeline's pairs (timesteps[i], timesteps[i-1]); any
    other (timestep, timestep_back) pair gets its row computed on the host for that call."""

    __init__ = validated_init(CogVideoXDPMScheduler.__init__, _check_config)

    def _build_tables(self, device) -> None:
        alphas, final = self._host_alphas
        gap = self._step_gap()
        first = cogvideox_dpm_first_order_table(alphas, gap, final, self.config.prediction_type)
        self._install_table("first", first, device, clips=False)
        # Steps with t - gap < 0 are first order whatever the history, so need no pair row.
        pairs = [p for p in zip(self._host_timesteps[1:], self._host_timesteps[:-1]) if p[0] - gap >= 0]
        self._pair_rows = {pair: i for i, pair in enumerate(pairs)}
        second = self._second_order_rows(pairs) if pairs else torch.zeros(0, first.shape[1], dtype=torch.float64)
        self._install_table("second", second, device)

    def _second_order_rows(self, pairs: list[tuple[int, int]]) -> torch.Tensor:
        alphas, final = self._host_alphas
        t = torch.tensor([p[0] for p in pairs])
        back = torch.tensor([p[1] for p in pairs])
        t_prev = t - self._step_gap()
        a_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)], final.to(alphas.dtype))
        rows = cogvideox_dpm_rows(alphas[t], a_prev, self.config.prediction_type, alphas[back])
        bad = [pair for pair, row in zip(pairs, rows) if not bool(torch.isfinite(row).all())]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: second-order coefficients for (timestep, timestep_back) {bad[:4]} are not "
                "finite (equal log-SNR at both timesteps makes r = 0); diffusers returns inf/NaN here"
            )
        return rows

    def _resolve(self, timestep, argument: str) -> int:
        t = self._host_timestep(timestep)
        if t is None:
            # Not an element of scheduler.timesteps: its value decides the order and how many
            # noise draws happen, so it must be read. Pipelines pass timesteps[i] and never sync.
            t = int(timestep)
        return self._check_training_timestep(t, argument)

    def step(
        self,
        model_output: torch.Tensor,
        old_pred_original_sample: torch.Tensor | None,
        timestep: int | torch.Tensor,
        timestep_back: int | torch.Tensor | None,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = False,
    ) -> DDIMSchedulerOutput | tuple:
        self._require_schedule()
        self._check_model_io(model_output, sample)
        t = self._resolve(timestep, "timestep")
        second_order = old_pred_original_sample is not None and t - self._step_gap() >= 0
        if second_order and timestep_back is None:
            raise ValueError(
                "old_pred_original_sample was given without timestep_back: the second-order step needs the "
                "previous (noisier) timestep"
            )
        dtype = self._coefficient_dtype(sample, model_output)
        noise = self._draw_noise(sample.shape, generator, sample.device, sample.dtype)
        x0_dtype = _x0_dtype(self.config, sample, model_output)
        if not second_order:
            placed = self._tables["first"]
            rows = placed.on(sample.device, dtype)[t : t + 1]
            prev, _, x0 = ops.fused_step(sample, model_output, rows, noise=noise, x0_dtype=x0_dtype,
                                         constant_columns=placed.constant_columns)
            return prev, x0  # diffusers returns a tuple here whatever return_dict says

        back = self._resolve(timestep_back, "timestep_back")
        # The first-order result is discarded, but its noise draw still advances the generator.
        noise = self._draw_noise(sample.shape, generator, sample.device, sample.dtype)
        placed, index = self._second_order_row(t, back)
        rows = placed.on(sample.device, dtype)[index : index + 1]
        prev, _, x0 = ops.fused_step(
            sample, model_output, rows, history=(old_pred_original_sample,), noise=noise, x0_dtype=x0_dtype,
            constant_columns=placed.constant_columns,
        )
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _second_order_row(self, t: int, back: int) -> tuple[PlacedTable, int]:
        """(table, row index) of the second-order row for the pair (t, back)."""
        index = self._pair_rows.get((t, back))
        if index is not None:
            return self._tables["second"], index
        known = self._tables["second"].constant_columns.only(L.ESTIMATE_COLUMNS)
        return PlacedTable(self._second_order_rows([(t, back)]), known=known), 0
