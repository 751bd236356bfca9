"""FusedCogVideoXDDIMScheduler and FusedCogVideoXDPMScheduler.

Both ignore eta / use_clipped_model_output / clip options, as diffusers does. Their tables
are float64 (scaled_linear) like diffusers' scalars; rows are rounded to float32 once.
"""

from __future__ import annotations

import math

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, SchedulerMixin  # noqa: F401  (SchedulerMixin: see base.py)
from diffusers.schedulers.scheduling_ddim_cogvideox import DDIMSchedulerOutput
# diffusers defines a DDIMSchedulerOutput class in each module; each step returns its own module's.
from diffusers.schedulers.scheduling_dpm_cogvideox import DDIMSchedulerOutput as DPMSchedulerOutput

from .. import ops
from ..coefficients.ddim import LAMBDA, cogvideox_ddim_table, cogvideox_dpm_history_column, cogvideox_dpm_tables
from ..coefficients.table import PlacedTable, normalized_device
from ..ops import layout as L
from .base import _refuse_tensor, validated_init
from .ddim import _check_config
from .ddim_family import AddNoiseMixin, DDIMFamilyMixin, check_index_dtype, gather_rows
from .step_output import step_output


_ALL_BUT_HISTORY_WEIGHT = frozenset(range(L.NUM_COEFFICIENTS)) - {L.O1}


def _without_history_term(known: L.ConstantColumns) -> L.ConstantColumns:
    """``known`` with O1 = 0: the step leaves its history term out."""
    return L.ConstantColumns({**known, L.O1: 0.0})


class FusedCogVideoXDDIMScheduler(AddNoiseMixin, DDIMFamilyMixin, CogVideoXDDIMScheduler):
    _validate_config = _check_config
    __init__ = validated_init(CogVideoXDDIMScheduler.__init__)
    _step_config_options = ("prediction_type", "num_train_timesteps")

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
        prev, x0 = self._fused_step("step", timestep, sample, model_output)
        if not return_dict:
            return (prev, x0)
        return step_output(DDIMSchedulerOutput, prev, x0)


class FusedCogVideoXDPMScheduler(AddNoiseMixin, DDIMFamilyMixin, CogVideoXDPMScheduler):
    """Second-order rows exist for the pipeline's pairs (timesteps[i], timesteps[i-1]); any
    other (timestep, timestep_back) pair gets its row computed on the host for that call.

    Where the timesteps' values are not known on the host (traced by torch.compile, or
    tensors that are not elements of ``scheduler.timesteps`` while in-kernel noise is on,
    e.g. the static inputs of a captured CUDA graph), the step decides the order on the
    device instead of reading them: see ``_device_step``.
    """

    _validate_config = _check_config
    __init__ = validated_init(CogVideoXDPMScheduler.__init__)
    _step_config_options = ("prediction_type", "num_train_timesteps")

    def _build_tables(self, device) -> None:
        alphas, final = self._host_alphas
        gap = self._step_gap()
        first, terms = cogvideox_dpm_tables(alphas, gap, final, self.config.prediction_type)
        # Every check first: installing refills the old tables and terms in place.
        self._check_schedule_rows(first, self._host_timesteps)
        # The schedule's pairs (t, back) get their second-order row at row t (a table indexed by
        # training timestep, like every other: same shape for any schedule, so refilled in
        # place); other rows repeat the first-order ones and are never selected. Steps with
        # t - gap < 0 are first order whatever the history, so need no pair row; a timestep
        # scheduled twice with different predecessors keeps only its first pair here (the
        # other is computed per call, as for any unscheduled pair).
        pairs = {}
        for t, back in zip(self._host_timesteps[1:], self._host_timesteps[:-1]):
            if t - gap >= 0:
                pairs.setdefault(t, (t, back))
        second = first.clone()
        if pairs:
            second[list(pairs)] = self._second_order_rows(list(pairs.values()), first, terms)
        self._install_table("first", first, device)
        self._solver_terms = terms
        # Refilled in place, like the tables, so captured graphs keep reading valid memory.
        self._placed_terms = getattr(self, "_placed_terms", {})
        for placed in self._placed_terms.values():
            placed.copy_(terms)
        self._terms_on(normalized_device(torch.device(device or "cpu")))  # placed before any step is traced
        self._pair_rows = {pair: t for t, pair in pairs.items()}
        self._install_table("second", second, device)
        # Pairs whose history weight is 0 (back at alpha-bar = 0 on zero-SNR schedules: r = inf).
        self._weightless_pairs = frozenset(pair for t, pair in pairs.items() if second[t, L.O1] == 0)
        self._weightless_known = _without_history_term(self._tables["second"].constant_columns)

    def _second_order_rows(self, pairs: list[tuple[int, int]], first: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
        """Rows for the (t, back) ``pairs``, from the host first-order table and solver terms."""
        t = torch.tensor([p[0] for p in pairs])
        back = torch.tensor([p[1] for p in pairs])
        rows = first[t].clone()
        rows[:, L.O1] = cogvideox_dpm_history_column(terms[t], terms[back, LAMBDA])
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
            check_index_dtype(timestep, argument)
            if timestep.numel() != 1:
                raise ValueError(f"{argument} must hold one value, got shape {tuple(timestep.shape)}")
            t = int(timestep)
        return self._check_training_timestep(t, argument)

    def _decides_on_device(self, timestep, timestep_back) -> bool:
        """Whether the step must choose its order without reading the timesteps: always when
        traced; eagerly when a timestep's value is not host-known and in-kernel noise is on
        (with a generator, the number of draws must match diffusers', so it is read)."""
        if torch.compiler.is_compiling():
            return True
        if self._philox_seed is None:
            return False
        return any(isinstance(v, torch.Tensor) and self._host_timestep(v) is None for v in (timestep, timestep_back))

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
    ) -> DPMSchedulerOutput | tuple:
        self._require_schedule()
        self._check_model_io(model_output, sample)
        if self._decides_on_device(timestep, timestep_back):
            return self._device_step(model_output, old_pred_original_sample, timestep, timestep_back, sample,
                                     generator, return_dict)
        t = self._resolve(timestep, "timestep")
        # diffusers reads alphas_cumprod[timestep_back] whenever it is given, first-order
        # steps included, where an out-of-range one fails (or a negative one wraps)
        back = None if timestep_back is None else self._resolve(timestep_back, "timestep_back")
        second_order = old_pred_original_sample is not None and t - self._step_gap() >= 0
        if second_order and timestep_back is None:
            raise ValueError(
                "old_pred_original_sample was given without timestep_back: the second-order step needs the "
                "previous (noisier) timestep"
            )
        self._check_shapes_before_noise(model_output, sample)
        if second_order:
            self._check_history_before_noise(old_pred_original_sample, sample)
        dtypes = self._step_dtypes(sample, model_output)
        dtype, _, x0_dtype = dtypes
        if second_order:  # its row refuses a pair it cannot step between: before the draws
            placed, index, known = self._second_order_row(t, back)
            dtype, prev_dtype = self._second_order_dtypes(dtypes, old_pred_original_sample)
        noise = self._draw_noise(sample.shape, generator, sample.device, sample.dtype)
        if not second_order:
            placed = self._tables["first"]
            rows = placed.row(t, sample.device, dtype)
            prev, _, x0 = ops.fused_step(sample, model_output, rows, noise=noise, x0_dtype=x0_dtype,
                                         constant_columns=placed.constant_columns)
            return prev, x0  # diffusers returns a tuple here whatever return_dict says

        # The first-order result is discarded, but its noise draw still advances the generator.
        noise = self._draw_noise(sample.shape, generator, sample.device, sample.dtype)
        rows = placed.row(index, sample.device, dtype)
        prev, _, x0 = ops.fused_step(
            sample, model_output, rows, history=(old_pred_original_sample,), noise=noise, out_dtype=prev_dtype,
            x0_dtype=x0_dtype, constant_columns=known,
        )
        if not return_dict:
            return (prev, x0)
        return step_output(DPMSchedulerOutput, prev, x0)

    @staticmethod
    def _check_history_before_noise(old, sample) -> None:
        """The op's checks of the history term a step will weigh, made before the step draws
        (see ``_check_shapes_before_noise``)."""
        if not (isinstance(old, torch.Tensor) and old.is_floating_point()):
            _refuse_tensor("old_pred_original_sample", old)
        if old.shape != sample.shape:
            raise ValueError(f"old_pred_original_sample has shape {tuple(old.shape)}; expected the sample's shape "
                             f"{tuple(sample.shape)}")
        if old.device != sample.device:
            raise ValueError(f"old_pred_original_sample is on {old.device}; expected the sample's device "
                             f"{sample.device}")

    @staticmethod
    def _second_order_dtypes(dtypes, old) -> tuple[torch.dtype, torch.dtype]:
        """(coefficients, prev) dtypes of a second-order step, from the first-order step's
        ``dtypes`` (``_step_dtypes``): diffusers' update adds the history term, so its dtype
        joins the promotion (a float64 old_pred_original_sample makes prev float64);
        pred_original_sample's stays the first-order one. ``old`` passed
        ``_check_history_before_noise``."""
        dtype, promoted, _ = dtypes
        return (torch.float64 if old.dtype == torch.float64 else dtype), torch.promote_types(promoted, old.dtype)

    def _second_order_row(self, t: int, back: int) -> tuple[PlacedTable, int, L.ConstantColumns]:
        """(table, row index, constant columns) of the second-order row for the pair (t, back).

        Where the row's history weight O1 is 0, the constant columns say so, and the step
        leaves the term O1*(x0 - old) out: diffusers' update there is M3*x0 - M4*old with
        M4 = 0, which an infinite x0 leaves infinite, where 0*(x0 - old) would be NaN."""
        index = self._pair_rows.get((t, back))
        if index is not None:
            placed = self._tables["second"]
            weightless = (t, back) in self._weightless_pairs
            return placed, index, (self._weightless_known if weightless else placed.constant_columns)
        rows = self._second_order_rows([(t, back)], self._tables["first"].host, self._solver_terms)
        # The row is a first-order row with its own O1: every other column the first-order
        # table holds constant holds here (OM = 0 among them, where 0*inf would be NaN).
        known = self._tables["first"].constant_columns.only(_ALL_BUT_HISTORY_WEIGHT)
        known = _without_history_term(known) if rows[0, L.O1] == 0 else known
        return PlacedTable(rows, known=known), 0, known

    def _device_step(self, model_output, old, timestep, timestep_back, sample, generator, return_dict):
        """The step with the order chosen on the device, reading no timestep value.

        Without history it is the first-order step. With history, the first-order row and
        the second-order row (its O1 made from the solver terms at both timesteps, the
        same arithmetic as the eager table) are both formed, and ``t - gap >= 0`` selects
        one; the history term is always passed (O1 = 0 in a first-order row). Noise follows
        the eager draws: the second-order step uses the second draw, so with in-kernel noise
        its offset and the counter's advance depend on that selection. Differences from the
        eager step, which cannot be decided without the values: with history, the result is
        scheduling_dpm_cogvideox's DDIMSchedulerOutput when ``return_dict`` even on the last
        (first-order) step, ``timestep_back`` is required, a float64 ``old_pred_original_sample`` makes prev
        float64 on that step too (diffusers' first-order step ignores the history, and its
        prev has the first-order dtype), and where the history weight is 0 (that step; a
        zero-SNR step back from T-1) an infinite x0 gives NaN, 0*(x0 - old), where diffusers
        gives +-inf (the eager step leaves the term out: ``_second_order_row``); out-of-range
        timesteps fail in the gathers.
        """
        device = sample.device
        self._check_shapes_before_noise(model_output, sample)
        if old is not None:
            if timestep_back is None:
                raise ValueError(
                    "old_pred_original_sample was given without timestep_back: a step that decides its order on "
                    "the device (traced, or in-kernel noise with timesteps that are not elements of "
                    "scheduler.timesteps) needs the previous timestep whenever history is given"
                )
            self._check_history_before_noise(old, sample)
        dtypes = self._step_dtypes(sample, model_output)
        dtype, _, x0_dtype = dtypes
        prev_dtype = None
        if old is not None:
            dtype, prev_dtype = self._second_order_dtypes(dtypes, old)
        first = self._tables["first"]
        t = self._device_index(timestep, "timestep", device)
        rows = gather_rows(first.on(device, dtype), t)
        history = ()
        known = first.constant_columns
        if old is not None:
            back = self._device_index(timestep_back, "timestep_back", device)
            terms = self._terms_on(device)
            o1 = cogvideox_dpm_history_column(gather_rows(terms, t),
                                              gather_rows(terms, back, "timestep_back")[:, LAMBDA])
            column = torch.arange(rows.shape[1], device=device)
            second_rows = torch.where(column == L.O1, o1.to(dtype)[:, None], rows)
            second_order = (t - self._step_gap() >= 0)[:, None]
            rows = torch.where(second_order, second_rows, rows)
            history = (old,)
            known = known.only(_ALL_BUT_HISTORY_WEIGHT)
        # drawn after every check above: a refused step leaves the generator as it was
        noise = self._draw_noise(sample.shape, generator, device, sample.dtype)
        if old is not None:
            noise = self._second_draw(noise, second_order, sample.shape, generator, device, sample.dtype)
        prev, _, x0 = ops.fused_step(sample, model_output, rows, history=history, noise=noise, out_dtype=prev_dtype,
                                     x0_dtype=x0_dtype, constant_columns=known)
        if old is None or not return_dict:
            return (prev, x0)
        return step_output(DPMSchedulerOutput, prev, x0)

    def _device_index(self, timestep, argument: str, device) -> torch.Tensor:
        """(1,) int64 index on ``device`` for a Python int (range-checked here) or a tensor."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"{argument} must hold one value, got shape {tuple(timestep.shape)}")
            check_index_dtype(timestep, argument)
            return timestep.reshape(1).to(device=device, dtype=torch.int64)
        t = self._check_training_timestep(self._host_timestep(timestep), argument)
        return torch.full((1,), t, dtype=torch.int64, device=device)

    def _terms_on(self, device) -> torch.Tensor:
        device = torch.device(device)
        terms = self._placed_terms.get(device)
        if terms is None:
            terms = self._placed_terms[device] = self._solver_terms.to(device)
        return terms

    def _second_draw(self, first_noise, second_order, shape, generator, device, dtype):
        """The noise a second-order step uses, chosen by the device flag ``second_order``."""
        if isinstance(first_noise, ops.PhiloxNoise):
            skip = second_order.reshape(()).to(torch.int64) * math.prod(shape)
            self._philox_counter.add_(skip)
            return ops.PhiloxNoise(first_noise.seed, first_noise.offset + skip)
        z2 = self._draw_noise(shape, generator, device, dtype)
        return torch.where(second_order.reshape((1,) * len(shape)), z2, first_noise)
