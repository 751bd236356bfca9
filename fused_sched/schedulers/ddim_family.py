"""Shared machinery of the DDIM family: tables indexed by training timestep, row lookup,
and add_noise / get_velocity that do not move the scheduler's tables to another device."""

from __future__ import annotations

import torch

from ..coefficients.table import PlacedTable
from ..ops import layout as L
from .base import FusedSchedulerMixin, check_finite_rows


class DDIMFamilyMixin(FusedSchedulerMixin):
    _tables: dict
    _retired_tables: dict  # tables of earlier schedules, by key, for refilling in place

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        super().set_timesteps(num_inference_steps, device=device)
        self._remember_schedule()
        # Tables rebuilt with their old shapes are refilled in place (see _install_table).
        self._retired_tables = {**getattr(self, "_retired_tables", {}), **getattr(self, "_tables", {})}
        self._tables = {}
        self._schedule_device = device
        # see _step_dtypes; kept across schedules (it depends on the config alone), so a
        # traced step's guards on it stay valid after set_timesteps
        self._dtypes_by_input = getattr(self, "_dtypes_by_input", {})
        self._host_alphas = (self.alphas_cumprod.cpu(), self._boundary_alpha().cpu())
        self._build_tables(device)  # each class installs the tables its step reads

    def _step_dtypes(self, sample: torch.Tensor, model_output: torch.Tensor):
        """(coefficients, prev, x0) dtypes of a step on these inputs: the rows' dtype, the
        promotion diffusers returns, and pred_original_sample's, which for sample prediction
        is the model output itself in diffusers. Made once per pair of input dtypes."""
        key = (sample.dtype, model_output.dtype)
        dtypes = self._dtypes_by_input.get(key)
        if dtypes is None:
            promoted = torch.promote_types(*key)
            x0 = model_output.dtype if self.config.prediction_type == "sample" else promoted
            dtypes = self._dtypes_by_input[key] = (self._coefficient_dtype(sample, model_output), promoted, x0)
        return dtypes

    def _boundary_alpha(self) -> torch.Tensor:
        """The alpha-bar used past the schedule's end (final, or initial for the inverse)."""
        return self.final_alpha_cumprod

    def _step_gap(self) -> int:
        return self.config.num_train_timesteps // self.num_inference_steps

    def _install_table(self, key, table: torch.Tensor, device, clips: bool | None = None,
                       known: L.ConstantColumns | None = None) -> PlacedTable:
        """Place ``table`` for steps; with ``clips`` given, first refuse non-finite scheduled rows.
        ``known``: its constant columns, for a table built inside a step (see PlacedTable)."""
        if clips is not None:
            self._check_schedule_rows(table, self._host_timesteps, clips)
        # The table a previous schedule had under this key keeps its storage when the new one
        # fits it: a CUDA graph captured over steps then stays valid after set_timesteps.
        placed = self._retired_tables.pop(key, None)
        if placed is None or not placed.refill(table, device, known):
            placed = PlacedTable(table, device, known)
        self._tables[key] = placed
        return placed

    def _check_schedule_rows(self, table: torch.Tensor, scheduled: list[int], clips: bool = False) -> None:
        """Refuse a schedule whose rows make inf/NaN. An infinite x0 scale (epsilon prediction
        where alphas_cumprod is 0) is allowed when the step clips x0: clipping bounds +-inf,
        as it does in diffusers."""
        def describe(bad):
            return (
                f"{type(self).__name__}: the coefficients at timestep(s) {bad[:4]} are not finite with "
                f"prediction_type={self.config.prediction_type!r}, "
                f"rescale_betas_zero_snr={self.config.rescale_betas_zero_snr}, "
                f"set_alpha_to_one={self.config.set_alpha_to_one} (diffusers returns inf/NaN here: "
                "epsilon prediction cannot recover x0 where alphas_cumprod is 0, and sample prediction "
                "cannot recover eps where it is 1). Use prediction_type='v_prediction' or change these options."
            )

        checked = table.clone()
        if clips:
            checked[:, L.AS] = checked[:, L.AS].nan_to_num(posinf=0.0)
        check_finite_rows(checked, scheduled, describe)

    def _row(self, placed: PlacedTable, timestep, device, dtype) -> torch.Tensor:
        """(1, K) coefficients for ``timestep``: a view when its value is host-known, else a
        device-side gather (no sync; an out-of-range tensor timestep fails in the gather)."""
        t = self._host_timestep(timestep)
        if t is not None:
            self._check_training_timestep(t)
            return placed.row(t, device, dtype)
        table = placed.on(device, dtype)
        index = timestep.reshape(-1).to(device=table.device, dtype=torch.int64)
        if index.numel() != 1:
            raise ValueError(f"timestep must hold one value, got shape {tuple(timestep.shape)}")
        return table.index_select(0, index)



class AddNoiseMixin:
    """add_noise / get_velocity of the DDIM family, without diffusers' side effect of moving
    ``self.alphas_cumprod`` to the data's device for good (which would turn every later
    step's scalar math into tiny device kernels)."""

    def _alphas_cumprod_on(self, device, dtype) -> torch.Tensor:
        # diffusers moves self.alphas_cumprod to the data's device for good; a cached copy
        # keeps the step's host tables where set_timesteps put them.
        cache = self.__dict__.setdefault("_alphas_cumprod_copies", {})
        key = (torch.device(device), dtype)
        if key not in cache:
            cache[key] = self.alphas_cumprod.to(device=device, dtype=dtype)
        return cache[key]

    def _broadcast_alphas(self, like: torch.Tensor, timesteps: torch.Tensor):
        alphas = self._alphas_cumprod_on(like.device, like.dtype)
        a = alphas[timesteps.to(like.device)].flatten()
        shape = a.shape + (1,) * (like.dim() - 1)
        return (a**0.5).reshape(shape), ((1 - a) ** 0.5).reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor):
        sqrt_a, sqrt_b = self._broadcast_alphas(original_samples, timesteps)
        return sqrt_a * original_samples + sqrt_b * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor):
        sqrt_a, sqrt_b = self._broadcast_alphas(sample, timesteps)
        return sqrt_a * noise - sqrt_b * sample
