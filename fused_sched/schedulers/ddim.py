"""FusedDDIMScheduler: DDIMScheduler whose step is one fused op (two with thresholding)."""

from __future__ import annotations

import math
import numbers

import torch
from diffusers import DDIMScheduler, SchedulerMixin  # noqa: F401  (SchedulerMixin: see base.py)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from ..ops import layout as L
from ..coefficients.ddim import ddim_table
from .base import check_clipping_config, stream_capturing, validated_init
from .ddim_family import AddNoiseMixin, DDIMFamilyMixin
from .step_output import step_output


_BASE_KEY = (0.0, False)  # (eta, use_clipped_model_output) of the table set_timesteps builds
# Step-option tables set_timesteps rebuilds beyond the base one: those of the pairs most
# recently used. A caller that passes a new eta per request (a server) keeps this many, not
# one per eta it has ever seen, each rebuilt (host math and an upload) at every schedule.
OPTION_TABLES_KEPT = 8


def _check_config(scheduler) -> None:
    if scheduler.config.prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(
            f"prediction_type={scheduler.config.prediction_type!r}; expected 'epsilon', 'sample' or 'v_prediction'"
        )


def _check_clipping_config(scheduler) -> None:
    """The DDIM schedulers that clip (CogVideoX's take the options and never use them)."""
    _check_config(scheduler)
    check_clipping_config(scheduler.config)


def clip_options(config) -> dict:
    """fused_step's clip arguments for a config with clip_sample / thresholding (thresholding wins)."""
    if config.thresholding:
        return dict(clip="threshold", threshold_ratio=config.dynamic_thresholding_ratio,
                    threshold_max=config.sample_max_value)
    if config.clip_sample:
        return dict(clip="clamp", clip_range=config.clip_sample_range)
    return dict(clip="none")


class FusedDDIMScheduler(AddNoiseMixin, DDIMFamilyMixin, DDIMScheduler):
    _validate_config = _check_clipping_config
    __init__ = validated_init(DDIMScheduler.__init__)
    _step_config_options = ("prediction_type", "clip_sample", "clip_sample_range", "thresholding",
                            "dynamic_thresholding_ratio", "sample_max_value", "num_train_timesteps")

    def _build_tables(self, device) -> None:
        self._clip = clip_options(self.config)  # made with the tables: steps read no config
        self._eta_beyond_bound = {}
        if "_option_use" not in self.__dict__:  # the first schedule (see _note_option_use)
            self._option_use, self._captured_options = {}, set()
        table = self._table_rows(*_BASE_KEY)
        # checked before anything is installed: installing refills the old tables in place
        self._check_schedule_rows(table, self._host_timesteps, clips=self._clip["clip"] != "none")
        self._build_table(*_BASE_KEY, table)
        # Tables of the step options used before are rebuilt now, in place: a captured graph
        # may read them before any eager step would have rebuilt them. Those a graph has
        # captured or torch.compile has traced are always kept (a graph reads their memory; a
        # compiled step does not record its use), the rest only when recently used.
        recent = list(self._option_use)[-OPTION_TABLES_KEPT:]
        for key in list(self._retired_tables):
            if key in recent or key in self._captured_options or self._retired_tables[key].hint_inherited:
                self._build_table(*key)
            else:
                del self._retired_tables[key]
                self._option_use.pop(key, None)

    def _table_rows(self, eta: float, use_clipped_model_output: bool) -> torch.Tensor:
        alphas, final = self._host_alphas
        return ddim_table(alphas, self._step_gap(), final, self.config.prediction_type, eta, use_clipped_model_output)

    def _build_table(self, eta: float, use_clipped_model_output: bool, table: torch.Tensor | None = None) -> None:
        """Install the rows for one (eta, use_clipped_model_output): these are step arguments,
        so a table is built (host math, one small upload) the first time a step uses a new
        pair, and reused for the rest of the schedule."""
        if table is None:
            table = self._table_rows(eta, use_clipped_model_output)
        key = (eta, use_clipped_model_output)
        # The table's constant columns are read off its host rows, so that the terms its rows
        # never have are left out (multiplied by 0, an infinite input there would give NaN).
        # A step that torch.compile traces cannot branch on values: a table it builds inherits
        # what the base table knows about the columns eta cannot change, and keeps that hint
        # when set_timesteps refills it, so that the compiled step's guards on it still hold.
        base = self._tables.get(_BASE_KEY)
        retired = self._retired_tables.get(key)
        inherit = base is not None and (torch.compiler.is_compiling() or (retired is not None and retired.hint_inherited))
        known = base.constant_columns.only(L.ESTIMATE_COLUMNS) if inherit else None
        self._install_table(key, table, self._schedule_device, known=known).hint_inherited = inherit

    def _note_option_use(self, key, sample) -> None:
        """Record a step's use of a step-option table (most recent last), and whether a CUDA
        graph captures it (see ``_build_tables``)."""
        use = self._option_use
        use.pop(key, None)
        use[key] = None
        if isinstance(sample, torch.Tensor) and stream_capturing(sample.device):
            self._captured_options.add(key)

    def _check_eta_bound(self, key, timestep) -> None:
        """Refuse an |eta| > 1 at a host-known timestep where the direction term has no real
        value (the row is NaN; at a timestep known only on the device, traced steps' included,
        the step returns NaN as diffusers' does)."""
        beyond = self._eta_beyond_bound.get(key)
        if beyond is None:  # the rows this eta makes NaN, found on the host table once per schedule
            base, table = self._tables[_BASE_KEY].host, self._tables[key].host
            rows = table.isnan().any(dim=1) & ~base.isnan().any(dim=1)
            beyond = self._eta_beyond_bound[key] = frozenset(rows.nonzero().flatten().tolist())
        t = self._host_timestep(timestep) if beyond else None
        if t is None or t not in beyond:
            return
        a_t, a_p = float(self._host_alphas[0][t]), self._alpha_after_step(t)
        bound = (a_p * (1 - a_t) / (a_p - a_t)) ** 0.5
        raise ValueError(
            f"eta={key[0]} at timestep {t}: the DDIM direction term sqrt(1 - a_prev - std^2) has no real value "
            f"there (diffusers returns NaN); this step takes |eta| <= sqrt(a_prev(1 - a_t)/(a_prev - a_t)), "
            f"about {math.floor(bound * 1e6) / 1e6} (decided in float64: within float32 rounding of the bound, "
            "diffusers' own step may differ)"
        )

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
        if type(eta) is not float and (isinstance(eta, torch.Tensor) or not isinstance(eta, numbers.Real)):
            raise TypeError(f"eta must be a Python number, got {type(eta).__name__}")
        if not math.isfinite(eta):  # diffusers' step is NaN throughout
            raise ValueError(f"eta={eta}: expected a finite number")
        if eta > 0 and generator is not None and variance_noise is not None:  # at eta 0 neither is used
            raise ValueError(
                "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                " `variance_noise` stays `None`."
            )
        key = (float(eta), bool(use_clipped_model_output))
        if key != _BASE_KEY and not torch.compiler.is_compiling():
            self._note_option_use(key, sample)
        if key not in self._tables:
            self._build_table(*key)
        if abs(eta) > 1 and not torch.compiler.is_compiling():
            self._check_eta_bound(key, timestep)
        noise = None
        if eta > 0:  # diffusers draws noise whenever eta > 0, even where std is 0
            self._check_model_io(model_output, sample)  # before reading it (_fused_step checks it too)
            self._check_shapes_before_noise(model_output, sample, variance_noise)
            noise = self._draw_noise(model_output.shape, generator, model_output.device, model_output.dtype,
                                     variance_noise)
        prev, x0 = self._fused_step(key, timestep, sample, model_output, noise, self._clip)
        if not return_dict:
            return (prev, x0)
        return step_output(DDIMSchedulerOutput, prev, x0)
