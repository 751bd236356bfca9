"""Shared machinery of the DDIM family: tables indexed by training timestep, row lookup,
and add_noise / get_velocity that do not move the scheduler's tables to another device."""

from __future__ import annotations

import torch

from .. import ops
from ..coefficients.table import PlacedTable
from ..ops import layout as L
from ..ops.philox import PhiloxNoise
from .base import FusedSchedulerMixin, check_finite_rows, checked_num_inference_steps


class DDIMFamilyMixin(FusedSchedulerMixin):
    _tables: dict
    _retired_tables: dict  # tables of earlier schedules, by key, for refilling in place
    _process_local_state = FusedSchedulerMixin._process_local_state + ("_step_plans",)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if self._schedule_timesteps is not None:
            self._step_plans = {}

    # diffusers' DDIM-family steps read these (and each class's config options) every step
    _step_schedule_state = ("num_inference_steps", "alphas_cumprod", "final_alpha_cumprod")

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        num_inference_steps = checked_num_inference_steps(num_inference_steps)
        # A refused schedule leaves the previous one whole (diffusers has replaced the
        # timesteps and the count before the checks run).
        self._all_or_nothing(lambda: self._set_schedule(num_inference_steps, device))
        self._reset_philox_counter()  # a new trajectory replays the same noise

    def _set_schedule(self, num_inference_steps: int, device) -> None:
        super().set_timesteps(num_inference_steps, device=device)
        self._take_schedule(device)

    def _adopt_schedule_set_by_hand(self) -> None:
        # diffusers' DDIM-family steps read num_inference_steps and the alphas, never the
        # timesteps: a schedule assigned by hand steps there as one set_timesteps made
        self._all_or_nothing(lambda: self._take_schedule(self.timesteps.device))

    def _take_schedule(self, device) -> None:
        self._remember_schedule()
        self._schedule_device = device
        self._rebuild_tables()

    def _rebuild_tables(self) -> None:
        """The tables for the schedule and for the step inputs as they are now: at
        set_timesteps, and at a step after those inputs changed (``_require_schedule``)."""
        self._validate_config()
        checked_num_inference_steps(self.num_inference_steps)  # it may have been set by hand
        self._check_schedule_in_training_range()
        # Tables rebuilt with their old shapes are refilled in place (see _install_table).
        self._retired_tables = {**getattr(self, "_retired_tables", {}), **getattr(self, "_tables", {})}
        self._tables = {}
        self._step_plans = {}  # see _fused_step
        # see _step_dtypes; kept across schedules while the prediction type is the same, so
        # a traced step's guards on it stay valid after set_timesteps
        if self.__dict__.get("_dtypes_for") != self.config.prediction_type:
            self._dtypes_by_input, self._dtypes_for = {}, self.config.prediction_type
        # float64: every scalar of the tables is formed from diffusers' stored (float32)
        # alphas in float64 and rounded once when placed; formed in float32, their rounding
        # was composed further and some steps landed farther from float64 than diffusers'
        self._host_alphas = (self.alphas_cumprod.cpu().double(),
                             torch.as_tensor(self._boundary_alpha()).cpu().double())
        self._build_tables(self._schedule_device)  # each class installs the tables its step reads
        self._note_tables_built()

    def _check_schedule_in_training_range(self) -> None:
        """Refuse a schedule holding a timestep outside [0, num_train_timesteps), here rather
        than at that step, after a pipeline has spent every step before it.

        diffusers' trailing spacing takes np.arange over a fractional step, which for some
        counts (61, 103, 121, ... of 1000 training steps) yields one element too many: the
        schedule then ends at timestep -1, where diffusers indexes alphas_cumprod from its
        end (the noisiest alpha) and wrecks the sample the step before made clean (the
        inverse's schedule starts at -1: its first step sends a clean sample to full noise).
        """
        T = self.config.num_train_timesteps
        outside = [t for t in self._host_timesteps if not 0 <= t < T]
        if outside and max(outside) >= T:
            raise ValueError(
                f"{type(self).__name__}: timestep_spacing={self.config.timestep_spacing!r} with "
                f"steps_offset={self.config.steps_offset} and num_inference_steps={self.num_inference_steps} gives "
                f"timestep(s) {[t for t in outside if t >= T]} at or past num_train_timesteps={T}: the offset is added "
                "to a schedule that already reaches its end, and diffusers' step there indexes alphas_cumprod out "
                "of range (IndexError). Use fewer steps or steps_offset=0"
            )
        if outside:
            n = self.num_inference_steps
            raise ValueError(
                f"{type(self).__name__}: timestep_spacing={self.config.timestep_spacing!r} with "
                f"num_inference_steps={n} and num_train_timesteps={T} gives {len(self._host_timesteps)} timesteps, "
                f"{outside} outside the training range [0, {T}): diffusers' np.arange overshoots for this count, and "
                "its step at -1 reads alphas_cumprod[-1], the noisiest value, at the clean end of the schedule. "
                "Use another num_inference_steps or timestep_spacing"
            )

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

    def _fused_step(self, table_key, timestep, sample: torch.Tensor, model_output: torch.Tensor, noise=None,
                    clip: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prev, x0) of one step with the rows of table ``table_key`` at ``timestep``, with
        the op's ``clip`` arguments; checks ``sample`` and ``model_output``.

        The op's plan (``ops.plan_step``: every check, the backend choice) is kept per
        schedule under the table, the sample's, model output's and noise's shapes, dtypes and
        devices, and the backend request: the rows come from this scheduler's own table, in a
        dtype and on a device those fix, and the options are the schedule's, so nothing else
        the op checks can differ between two steps with the same key (a key's dtypes passed
        the checks, so its tensors are floating point). A new key, a tensor subclass, or a
        traced step is checked in full.
        """
        placed = self._tables[table_key]
        key = None
        if type(sample) is torch.Tensor and type(model_output) is torch.Tensor and not torch.compiler.is_compiling():
            if noise is None or type(noise) is PhiloxNoise:
                noise_key = None if noise is None else PhiloxNoise
            elif type(noise) is torch.Tensor:
                noise_key = (noise.shape, noise.dtype, noise.device)
            else:
                noise_key = False  # not cached
            if noise_key is not False:
                key = (table_key, sample.shape, sample.dtype, sample.device, model_output.shape, model_output.dtype,
                       model_output.device, noise_key, ops.requested_backend())
        known = self._step_plans.get(key) if key is not None else None
        if known is not None:
            coefficient_dtype, plan = known
            rows = self._row(placed, timestep, sample.device, coefficient_dtype)
        else:
            self._check_model_io(model_output, sample)
            coefficient_dtype, promoted, x0_dtype = self._step_dtypes(sample, model_output)
            if type(noise) is not PhiloxNoise and noise is not None:
                # diffusers adds std * variance_noise last, so a caller's noise joins the promotion
                promoted = torch.promote_types(promoted, noise.dtype)
            rows = self._row(placed, timestep, sample.device, coefficient_dtype)
            plan = ops.plan_step(sample, model_output, rows, noise=noise, out_dtype=promoted, x0_dtype=x0_dtype,
                                 constant_columns=placed.constant_columns, **(clip or {}))
            if key is not None:
                if len(self._step_plans) >= 64:  # a caller may cycle through many shapes
                    self._step_plans.clear()
                self._step_plans[key] = (coefficient_dtype, plan)
        prev, _, x0 = plan.run(sample, model_output, rows, (), noise)
        return prev, x0

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
            rising = [t for t in bad if self._alpha_rises_across_step(t)]
            if rising:
                alphas, _ = self._host_alphas
                t = rising[0]
                return (
                    f"{type(self).__name__}: alpha-bar rises across the step at timestep(s) {rising[:4]} (at t={t} "
                    f"from alphas_cumprod[t]={float(alphas[t]):.6g} to {self._alpha_after_step(t):.6g} at the step's "
                    "end): the step's variance (1 - a_prev)/(1 - a_t)*(1 - a_t/a_prev) is negative there, and "
                    "diffusers returns NaN. Check alphas_cumprod and final_alpha_cumprod (edited by hand?)"
                )
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

    def _alpha_after_step(self, t: int) -> float:
        """alpha-bar at the end of the (denoising) step from t: at t - T//n, or the final one."""
        alphas, boundary = self._host_alphas
        prev = t - self._step_gap()
        return float(alphas[prev] if prev >= 0 else boundary)

    def _alpha_rises_across_step(self, t: int) -> bool:
        return self._alpha_after_step(t) < float(self._host_alphas[0][t])

    def _row(self, placed: PlacedTable, timestep, device, dtype) -> torch.Tensor:
        """(1, K) coefficients for ``timestep``: a view when its value is host-known, else a
        device-side gather (no sync; see ``gather_rows`` for an out-of-range tensor)."""
        t = self._host_timestep(timestep)
        if t is not None:
            self._check_training_timestep(t)
            if torch.compiler.is_compiling():
                # torch.compile makes an int that changes between calls a symbol: a slice keeps
                # it one, where the views kept per index would specialise on (and retrace for)
                # every timestep
                return placed.on(device, dtype)[t : t + 1]
            return placed.row(t, device, dtype)
        check_index_dtype(timestep)
        table = placed.on(device, dtype)
        index = timestep.reshape(-1).to(device=table.device, dtype=torch.int64)
        if index.numel() != 1:
            raise ValueError(f"timestep must hold one value, got shape {tuple(timestep.shape)}")
        return gather_rows(table, index)


def gather_rows(table: torch.Tensor, index: torch.Tensor, argument: str = "timestep") -> torch.Tensor:
    """Rows ``index`` (int64, on the table's device) of a table indexed by training timestep,
    without reading the index on the host. On the CPU an index outside the table raises a
    ValueError naming ``argument`` (the gather checks it anyway, at no cost). On a GPU, or
    traced, where a failed gather is a device-side assert that ends the process's CUDA
    context and checking first would wait for the device, the row of an out-of-range index
    is NaN: the step then returns NaN."""
    if index.device.type == "cpu" and not torch.compiler.is_compiling():  # a traced step takes the device path
        try:
            return table.index_select(0, index)
        except IndexError:
            bad = [int(i) for i in index if not 0 <= int(i) < table.shape[0]]
            if not bad:
                raise
            raise ValueError(f"{argument}={bad[0]} is outside the training range [0, {table.shape[0]})") from None
    safe = index.clamp(0, table.shape[0] - 1)
    rows = table.index_select(0, safe)
    return torch.where((safe == index)[:, None], rows, float("nan"))



def check_index_dtype(timestep: torch.Tensor, argument: str = "timestep") -> None:
    """The DDIM family indexes its tables with a timestep that is not host-known: diffusers'
    indexing fails on a floating-point tensor (IndexError), where a cast would turn 700.5
    into 700 silently."""
    if timestep.is_floating_point() or timestep.is_complex():
        raise TypeError(f"{argument} must be an integer tensor (the training timestep indexes alphas_cumprod), "
                        f"got {timestep.dtype}")


class AddNoiseMixin:
    """add_noise / get_velocity of the DDIM family, without diffusers' side effect of moving
    ``self.alphas_cumprod`` to the data's device for good (which would turn every later
    step's scalar math into tiny device kernels)."""

    def _alphas_cumprod_on(self, device, dtype) -> torch.Tensor:
        # diffusers moves self.alphas_cumprod to the data's device for good; a cached copy
        # keeps the step's host tables where set_timesteps put them. The copies follow
        # alphas_cumprod as diffusers reads it at each call: replaced, or edited in place
        # (its version), they are made again.
        source = self.alphas_cumprod
        if source.is_inference():  # keeps no version, so its edits cannot be seen: nothing is kept
            return source.to(device=device, dtype=dtype)
        copies = self.__dict__.get("_alphas_cumprod_copies")
        if copies is None or copies[0] is not source or copies[1] != source._version:
            copies = self._alphas_cumprod_copies = (source, source._version, {})
        cache = copies[2]
        key = (torch.device(device), dtype)
        if key not in cache:
            cache[key] = source.to(device=device, dtype=dtype)
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
