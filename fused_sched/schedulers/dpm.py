"""FusedDPMSolverMultistepScheduler and its inverse: one fused op per step (two with
thresholding), rows selected by (step index, effective order) from a table built once."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from diffusers import (DPMSolverMultistepInverseScheduler, DPMSolverMultistepScheduler,  # noqa: F401
                       SchedulerMixin)  # (SchedulerMixin: see base.py)
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .. import ops
from ..coefficients.dpm import DATA_PREDICTION_ALGORITHMS, SDE_ALGORITHMS, dpm_table, row_index
from ..coefficients.table import PlacedTable
from .base import (FusedSchedulerMixin, caller_stacklevel, check_clipping_config, checked_num_inference_steps,
                   stream_capturing, validated_init)
from .step_cursor import DeviceStepCursor
from .step_output import step_output

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


def _check_config(scheduler) -> None:
    config = scheduler.config
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={config.prediction_type!r}; expected one of {PREDICTION_TYPES}")
    # diffusers' __init__ checks these two and the final sigma's; they are checked again
    # here for options changed after it (see FusedSchedulerMixin._step_config_options)
    if config.algorithm_type not in ALGORITHMS:
        raise ValueError(f"algorithm_type={config.algorithm_type!r}; expected one of {ALGORITHMS}")
    if config.solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type={config.solver_type!r}; expected one of {SOLVER_TYPES}")
    if getattr(config, "final_sigmas_type", None) == "zero" and config.algorithm_type not in DATA_PREDICTION_ALGORITHMS:
        raise ValueError(
            f"final_sigmas_type='zero' with algorithm_type={config.algorithm_type!r}: a noise-prediction solver "
            "cannot step to sigma 0 (diffusers refuses it when the scheduler is made); use final_sigmas_type="
            "'sigma_min' or a data-prediction algorithm"
        )
    if config.prediction_type == "flow_prediction" and config.algorithm_type not in DATA_PREDICTION_ALGORITHMS:
        raise ValueError(
            f"prediction_type='flow_prediction' needs algorithm_type 'dpmsolver++' or 'sde-dpmsolver++', "
            f"got {config.algorithm_type!r}"
        )
    if config.use_flow_sigmas:
        others = [name for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
                  if getattr(config, name, False)]
        if others:
            raise ValueError(
                f"use_flow_sigmas=True with {others[0]}=True: the latter's sigmas (those of the variance-preserving "
                "schedule, above 1 at the start) are then read as flow sigmas, alpha = 1 - sigma < 0, and diffusers "
                "returns all-NaN; use one of them"
            )
    check_clipping_config(config)
    if config.algorithm_type == "sde-dpmsolver" and config.solver_order >= 3:
        raise ValueError(
            "algorithm_type='sde-dpmsolver' with solver_order=3: there is no third-order SDE-DPM-Solver update "
            "(diffusers fails with UnboundLocalError at the third step); use solver_order<=2 or 'sde-dpmsolver++'"
        )


def _check_inverse_config(scheduler) -> None:
    _check_config(scheduler)
    config = scheduler.config
    if config.use_flow_sigmas:
        raise ValueError(
            "use_flow_sigmas=True is not supported by the inverse scheduler: diffusers builds a descending "
            "sigma schedule there, so its 'inversion' denoises instead"
        )
    if config.algorithm_type in SDE_ALGORITHMS:
        raise ValueError(
            f"algorithm_type={config.algorithm_type!r} cannot run in the inverse direction: the noise scale "
            "sqrt(1 - exp(-2h)) has no real value for h < 0 (diffusers returns all-NaN); "
            "use 'dpmsolver++' or 'dpmsolver'"
        )


class DPMFamilyMixin(FusedSchedulerMixin):
    """Step logic shared by the forward and inverse multistep DPM-Solver classes.

    The position in the schedule (step index, ``lower_order_nums``) lives in Python ints for
    eager steps and in a ``DeviceStepCursor`` for steps traced by torch.compile. A flag says
    which is current; switching from traced to eager steps (or reading ``step_index`` /
    ``lower_order_nums`` after traced steps) reads the device counters once.
    """

    _inverse = False
    _host_current = True  # the Python ints hold the position
    _device_current = False  # the device cursor holds the position
    _lower_order_nums = 0
    # prepare_cuda_graph: the history h1, h2 in fixed buffers, the position on the device
    _static_history: list[torch.Tensor] | None = None
    # The device cursor was put at step 0 by default (set_timesteps or prepare_cuda_graph with
    # no position to keep); the first eager step moves it to its timestep's position, as
    # diffusers' first step finds its index from the timestep.
    _start_pending = False
    # The cursor position that reads as "no step yet" (step_index None, as in diffusers): where
    # set_timesteps, prepare_cuda_graph or set_begin_index put the cursor before any step. No
    # step leaves it there: every step counts a lower-order step, so lower_order_nums >= 1.
    _unstarted_position: tuple[int, int] | None = None

    # What the table, the clip options and the cursor's rows are made from (see
    # FusedSchedulerMixin._step_config_options); the step reads the other options it needs itself.
    _step_config_options = ("prediction_type", "algorithm_type", "solver_type", "solver_order", "thresholding",
                            "dynamic_thresholding_ratio", "sample_max_value", "use_flow_sigmas", "lower_order_final",
                            "euler_at_final")
    _step_schedule_state = ("sigmas",)

    def _build_schedule(self, device) -> None:
        """set_timesteps' part, after diffusers': the table, and a trajectory from step 0."""
        self._remember_schedule()
        self._schedule_device = device
        table = self._checked_table()
        self._place_table(table)
        n = len(self._host_timesteps)
        cursor = DeviceStepCursor(n, self.config.solver_order, self._row_for,
                                  self._table.on(torch.device(device or "cpu"), torch.float32).device)
        if not (hasattr(self, "_cursor") and self._cursor.take(cursor)):
            self._cursor = cursor
        self._host_current, self._device_current = True, False
        self._start_pending = False
        if self._static_history is not None:
            # A new trajectory from step 0, in place: a captured graph replays it from here.
            for buffer in self._static_history:
                buffer.zero_()
            self._cursor.start_at(0, 0)
            self._start_pending = True
            self._unstarted_position = (0, 0)
            self._point_model_outputs_at_buffers()
            self._host_current, self._device_current = False, True
        self._note_tables_built()

    def _rebuild_tables(self) -> None:
        """The table for the step inputs as they are now (``_require_schedule``), in place,
        keeping the trajectory's position and history."""
        if self.config.solver_order != self._cursor.solver_order:
            raise ValueError(
                f"{type(self).__name__}: config.solver_order changed from {self._cursor.solver_order} to "
                f"{self.config.solver_order} after set_timesteps; the solver history (model_outputs) was made for "
                "the old order: call set_timesteps again to start a trajectory with the new one"
            )
        self._place_table(self._checked_table())
        self._cursor.relabel(self._row_for)
        self._note_tables_built()

    def _checked_table(self) -> torch.Tensor:
        """The float64 table for the config and sigmas as they are now, after every check."""
        self._validate_config()
        self._clip = self._clip_options()  # made with the table: steps read no config for it
        n, sigmas = len(self._host_timesteps), self.sigmas
        # step i reads sigmas i and i + 1 (the inverse class keeps sigmas of timesteps its
        # schedule dropped as repeats, so it may hold more)
        if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < n + 1:
            got = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
            raise ValueError(
                f"{type(self).__name__}: sigmas is {got}; the schedule of {n} timesteps needs a 1-D tensor of at "
                f"least {n + 1} sigmas (one per timestep and the final one)"
            )
        # float64 scalars: see dpm_table. Kept for the messages about the table's rows, which
        # a step must be able to give without reading self.sigmas off the device.
        self._table_sigmas = sigmas.cpu().double()
        table = dpm_table(self.config, self._table_sigmas)
        self._note_non_finite_rows(table, n)
        return table

    def _place_table(self, table: torch.Tensor) -> None:
        # Same shapes as before (same number of steps): refilled in place, so a CUDA graph
        # captured over traced steps stays valid after set_timesteps.
        placed = getattr(self, "_table", None)
        if placed is None or not placed.refill(table, self._schedule_device):
            self._table = PlacedTable(table, self._schedule_device)

    def _row_for(self, i: int, lower_order_nums: int) -> int:
        """The table row an eager step i uses after ``lower_order_nums`` steps."""
        return row_index(i, self._order_at(i, len(self._host_timesteps), lower_order_nums))

    def _note_non_finite_rows(self, table: torch.Tensor, n: int) -> None:
        """Find the rows whose coefficients are inf/NaN; warn when a trajectory from the start
        reaches one, and let the step that would select one raise (``_refuse_non_finite_row``).

        After a step between equal sigmas (a repeated timestep: custom, or from as many steps
        as training timesteps), the next multistep update divides by h0 = 0; diffusers
        returns inf/NaN from there on. The schedule itself is diffusers' (its own tests build
        such schedules and check only their timesteps), so set_timesteps warns, and an eager
        step raises instead of returning NaN (a traced or graph-captured step, which selects
        its row on the device, returns diffusers' inf/NaN after that warning). Rows of orders
        a step cannot have are NaN by construction and never selected.
        """
        self._non_finite_rows = frozenset((~torch.isfinite(table).all(dim=1)).nonzero().flatten().tolist())
        orders, lower = [], 0
        for i in range(n):
            orders.append(self._order_at(i, n, lower))
            lower = min(lower + 1, self.config.solver_order)
        reached = [i for i, order in enumerate(orders) if row_index(i, order) in self._non_finite_rows]
        if reached:
            warnings.warn(self._non_finite_message([(i, orders[i]) for i in reached]), UserWarning,
                          stacklevel=caller_stacklevel())

    def _non_finite_message(self, steps) -> str:
        named = [(i, self._host_timesteps[i], order) for i, order in steps[:4]]
        sigmas = self._table_sigmas
        rising = [i for i, _ in steps if self.config.algorithm_type in SDE_ALGORITHMS and sigmas[i + 1] > sigmas[i]]
        if rising:
            i = rising[0]
            return (
                f"{type(self).__name__}: the coefficients of (step, timestep, order) {named} are not finite: sigma "
                f"rises across step {i} (from {float(sigmas[i]):.6g} to {float(sigmas[i + 1]):.6g}), where the "
                f"{self.config.algorithm_type} noise scale, the square root of a variance that is negative when "
                "sigma rises, has no real value (diffusers returns NaN there, and this scheduler raises at that "
                "step). Use timesteps that descend, final_sigmas_type='zero', or an ODE algorithm_type"
            )
        return (
            f"{type(self).__name__}: the coefficients of (step, timestep, order) {named} are not finite: where two "
            "consecutive sigmas are equal (a repeated timestep), the multistep update after them divides by their "
            "log-SNR difference, 0 (diffusers returns inf/NaN there, and this scheduler raises at that step). "
            "Remove the repeated timestep, use fewer steps than num_train_timesteps, or solver_order=1"
        )

    def prepare_cuda_graph(self, sample: torch.Tensor, model_output: torch.Tensor | None = None) -> None:
        """Make this scheduler's steps capturable in a CUDA graph (call after ``set_timesteps``
        and before capture, with tensors like the ones the captured step will get).

        From then on every step, captured or not, keeps the solver history in fixed buffers
        (rotated by device copies after the fused op: one or two extra passes over the
        latent per step) and its position in the device cursor, as traced steps do; so a
        graph captured over one step replays the next step each time. ``set_timesteps``
        (same number of steps) restarts both in place at step 0, ``set_begin_index`` moves
        the start. Reading ``step_index`` / ``lower_order_nums`` then reads the device.
        """
        self._require_schedule()
        model_output = sample if model_output is None else model_output
        self._check_model_io(model_output, sample)
        if stream_capturing(sample.device):
            raise ValueError(f"{type(self).__name__}.prepare_cuda_graph must be called before capture, not during it")
        if self._cursor.step.device != sample.device:
            raise ValueError(
                f"{type(self).__name__}: the schedule is on {self._cursor.step.device}, the sample on "
                f"{sample.device}; call set_timesteps(..., device={str(sample.device)!r}) first"
            )
        self._make_host_current()
        dtype = self._history_dtype(sample, model_output)
        buffers = [torch.zeros(sample.shape, dtype=dtype, device=sample.device)
                   for _ in range(self._weighed_history_terms)]
        # the history so far, newest first, as the buffers hold it
        for buffer, h in zip(buffers, self.model_outputs[::-1]):
            if h is not None:
                buffer.copy_(h)
        self._static_history = buffers
        begin = getattr(self, "_begin_index", None)
        step = self._step_index if self._step_index is not None else (begin or 0)
        self._cursor.start_at(step, self._lower_order_nums)
        self._start_pending = self._step_index is None and begin is None
        self._unstarted_position = (step, 0) if self._step_index is None else None
        self._point_model_outputs_at_buffers()
        self._host_current, self._device_current = False, True

    @property
    def _weighed_history_terms(self) -> int:
        """How many history entries a step of any order can weigh: solver_order - 1, where
        orders above 3 run as 3 (diffusers keeps solver_order entries but reads two at most)."""
        return min(self.config.solver_order, 3) - 1

    def _point_model_outputs_at_buffers(self) -> None:
        """``model_outputs``' last entries (newest last, as diffusers lays it out) view the
        buffers, which each step overwrites in place; the entries before them, which no step
        reads, keep what they held (None from set_timesteps)."""
        for j, buffer in enumerate(self._static_history):
            self.model_outputs[-1 - j] = buffer

    @property
    def step_index(self):
        self._make_host_current()
        return self._step_index

    @property
    def lower_order_nums(self) -> int:
        self._make_host_current()
        return self._lower_order_nums

    @lower_order_nums.setter
    def lower_order_nums(self, value: int) -> None:
        self._lower_order_nums = value
        self._device_current = False

    def _make_host_current(self) -> None:
        if not self._host_current:
            self._step_index, self._lower_order_nums = self._cursor.read()
            if (self._step_index, self._lower_order_nums) == self._unstarted_position:
                self._step_index = None  # no step yet, as diffusers says
            self._host_current = True

    def _index_of_timestep(self, timestep) -> int:
        """diffusers' rule (second match when repeated, last index when absent), compared as
        diffusers compares, ``scheduler.timesteps == timestep``: in the dtype that promotes to
        (a bfloat16 749 is 748 there, and matches the schedule's 749; a Python float is
        compared in float32), on a host copy of the schedule."""
        if isinstance(timestep, (float, np.number, np.ndarray)):
            value = timestep  # diffusers compares any one number with the schedule
        else:
            value = self._host_timestep(timestep)
        if value is None:
            # A tensor that is not an element of scheduler.timesteps: its value must be read,
            # one sync on the first step, as diffusers does.
            if timestep.numel() != 1:
                raise ValueError(f"timestep must hold one value, got a tensor of shape {tuple(timestep.shape)}")
            value = timestep.detach().reshape(() if timestep.dim() == 0 else (1,)).cpu()
        if isinstance(value, int):  # an int64 comparison: exact
            matches = [i for i, t in enumerate(self._host_timesteps) if t == value]
        else:
            schedule = torch.tensor(self._host_timesteps, dtype=self._schedule_timesteps.dtype)
            matches = (schedule == value).nonzero().flatten().tolist()
        if not matches:
            return len(self._host_timesteps) - 1
        return matches[1] if len(matches) > 1 else matches[0]

    def _init_step_index(self, timestep) -> None:
        begin = getattr(self, "_begin_index", None)
        if begin is not None:
            self._step_index = begin
            return
        # An element of scheduler.timesteps says exactly where the trajectory starts. diffusers
        # only knows the value and takes its second occurrence, which skips a step when the
        # starting timestep is repeated right after itself: the forward class then fails with
        # IndexError at the end, and starts at the element's own position instead; the inverse
        # class (exponential / beta sigmas give timesteps [0, 0, ...]) has a sigma to spare,
        # finishes finite, and follows diffusers, whether given the element or its value.
        position = None if self._inverse else self._schedule_position(timestep)
        self._step_index = position if position is not None else self._index_of_timestep(timestep)

    def _lower_order_final(self, i: int, n: int) -> bool:
        c = self.config
        small = c.lower_order_final and n < 15
        if self._inverse:
            return i == n - 1 and (c.euler_at_final or small)
        return i == n - 1 and (c.euler_at_final or small or c.final_sigmas_type == "zero")

    def _order_at(self, i: int, n: int, lower_order_nums: int) -> int:
        """The solver order diffusers uses at step i of n after ``lower_order_nums`` steps."""
        c = self.config
        if c.solver_order == 1 or lower_order_nums < 1 or self._lower_order_final(i, n):
            return 1
        if c.solver_order == 2 or lower_order_nums < 2 or (i == n - 2 and c.lower_order_final and n < 15):
            return 2
        return 3

    def _history_dtype(self, sample, model_output) -> torch.dtype:
        # diffusers stores the converted output at the dtype its formula yields: m's own where
        # the output is m itself (thresholding keeps its input's dtype), else promote(x, m).
        c = self.config
        if c.algorithm_type in DATA_PREDICTION_ALGORITHMS:
            keeps_model_dtype = c.prediction_type == "sample"
        else:
            keeps_model_dtype = c.prediction_type == "epsilon" and not c.thresholding
        return model_output.dtype if keeps_model_dtype else torch.promote_types(sample.dtype, model_output.dtype)

    def _out_dtype(self, sample, history_dtype, history) -> torch.dtype:
        """prev's dtype. diffusers' forward step casts it to the stored value's dtype; the
        inverse's update returns what its arithmetic promotes to: the sample and every model
        output it weighs (this step's and the history's, which may hold other dtypes after a
        pipeline changes dtype mid-trajectory)."""
        if not self._inverse:
            return history_dtype
        dtype = torch.promote_types(sample.dtype, history_dtype)
        for h in history:
            dtype = torch.promote_types(dtype, h.dtype)
        return dtype

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        self._require_schedule()
        self._check_model_io(model_output, sample)
        if torch.compiler.is_compiling() or self._static_history is not None:
            return self._traced_step(model_output, timestep, sample, generator, variance_noise, return_dict)
        self._make_host_current()
        self._device_current = False
        if self._step_index is None:
            self._init_step_index(timestep)
        i, n = self._step_index, len(self._host_timesteps)
        if i >= n:
            raise ValueError(
                f"step() was called {i + 1} times after set_timesteps({n}): the schedule has only {n} steps; "
                "call set_timesteps again to start a new trajectory"
            )
        c = self.config
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]  # diffusers keeps the first 3 channels (the mean)

        order = self._order_at(i, n, self._lower_order_nums)
        row = row_index(i, order)
        if row in self._non_finite_rows:
            raise ValueError(self._non_finite_message([(i, order)]))
        history = tuple(self.model_outputs[-1 : -order : -1]) if order > 1 else ()
        if history and history[0].shape != sample.shape:
            raise ValueError(
                f"sample has shape {tuple(sample.shape)}, but the solver history of the previous steps "
                f"(model_outputs) has shape {tuple(history[0].shape)}: a trajectory keeps its latent shape; call "
                "set_timesteps to start a new one"
            )
        coefficient_dtype = self._coefficient_dtype(sample, model_output, history)
        rows = self._table.row(row, sample.device, coefficient_dtype)

        noise = self._sde_noise(model_output, sample, generator, variance_noise)
        history_dtype = self._history_dtype(sample, model_output)
        out_dtype = self._out_dtype(sample, history_dtype, history)
        prev, d, _ = ops.fused_step(
            sample, model_output, rows, history=history, noise=noise, out_dtype=out_dtype,
            history_dtype=history_dtype, constant_columns=self._table.constant_columns, **self._clip,
        )

        self._remember_history(d)
        if self._lower_order_nums < c.solver_order:
            self._lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return step_output(SchedulerOutput, prev)

    def _sde_noise(self, model_output, sample, generator, variance_noise):
        """z for the SDE solvers (fp32, as diffusers draws it), None for the ODE ones."""
        if self.config.algorithm_type not in SDE_ALGORITHMS:
            return None
        self._check_shapes_before_noise(model_output, sample, variance_noise)
        if variance_noise is None or self._philox_seed is not None:  # in-kernel noise refuses variance_noise
            return self._draw_noise(model_output.shape, generator, model_output.device, torch.float32,
                                    variance_noise)
        return self._noise_of_shape(variance_noise.to(device=model_output.device, dtype=torch.float32),
                                    model_output.shape)

    def _clip_options(self) -> dict:
        c = self.config
        if c.thresholding:
            return dict(clip="threshold", threshold_ratio=c.dynamic_thresholding_ratio, threshold_max=c.sample_max_value)
        return {}

    def _remember_history(self, d: torch.Tensor) -> None:
        for j in range(self.config.solver_order - 1):
            self.model_outputs[j] = self.model_outputs[j + 1]
        self.model_outputs[-1] = d

    def _traced_step(self, model_output, timestep, sample, generator, variance_noise, return_dict):
        """The step as torch.compile traces it, and as every step runs after
        ``prepare_cuda_graph``: the same op and rows as eager, with the row gathered by the
        device cursor and always ``_weighed_history_terms`` history terms (absent ones are
        zeros; their coefficients are 0 in every row of a lower order), so the graph is the same at every
        step. Stepping past the end fails in the cursor's gather (on CUDA, a device assert)."""
        if self._cursor.step.device != sample.device:
            raise ValueError(
                f"{type(self).__name__}: a traced step keeps its position on the schedule's device "
                f"({self._cursor.step.device}), but the sample is on {sample.device}; call "
                f"set_timesteps(..., device={str(sample.device)!r}) as pipelines do"
            )
        if not self._device_current:
            if stream_capturing(sample.device):
                # loading it would be captured too, and every replay would restart there
                raise ValueError(
                    f"{type(self).__name__}: the step position is not on the device yet; call "
                    "scheduler.prepare_cuda_graph(sample, model_output) before capturing"
                )
            self._start_device_cursor(timestep)
        elif self._start_pending and not torch.compiler.is_compiling() and not stream_capturing(sample.device):
            self._start_at_first_timestep(timestep)
        c = self.config
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]
        noise = self._sde_noise(model_output, sample, generator, variance_noise)
        history_dtype = self._history_dtype(sample, model_output)
        if self._static_history is not None:
            history = self._checked_static_history(sample, history_dtype)
        else:
            history = tuple(
                h if h is not None else torch.zeros(sample.shape, dtype=history_dtype, device=sample.device)
                for h in self.model_outputs[::-1][: self._weighed_history_terms]
            )
        # float64 where a history entry is, as eagerly: after float64 steps, say
        coefficient_dtype = self._coefficient_dtype(sample, model_output, history)
        rows = self._cursor.rows(self._table.on(sample.device, coefficient_dtype))
        out_dtype = self._out_dtype(sample, history_dtype, history)
        prev, d, _ = ops.fused_step(
            sample, model_output, rows, history=history, noise=noise, out_dtype=out_dtype,
            history_dtype=history_dtype, constant_columns=self._table.constant_columns, **self._clip,
        )
        if self._static_history is not None:
            for newer, older in zip(history, history[1:]):  # (h1, h2): h2 <- h1 before h1 <- d
                older.copy_(newer)
            if history:
                history[0].copy_(d)
        else:
            self._remember_history(d)
        self._cursor.advance()
        self._host_current = False
        self._start_pending = False
        if not return_dict:
            return (prev,)
        return step_output(SchedulerOutput, prev)

    def _checked_static_history(self, sample, dtype) -> tuple[torch.Tensor, ...]:
        """The history buffers, newest first, refusing inputs unlike the ones they were made for."""
        history = self._static_history
        if history and (history[0].shape != sample.shape or history[0].dtype != dtype
                        or history[0].device != sample.device):
            raise ValueError(
                f"{type(self).__name__}: prepare_cuda_graph made the history for shape {tuple(history[0].shape)}, "
                f"{history[0].dtype} on {history[0].device}; this step has shape {tuple(sample.shape)}, {dtype} on "
                f"{sample.device}: call prepare_cuda_graph again with these inputs"
            )
        return tuple(history)

    def _start_device_cursor(self, timestep) -> None:
        """Load the position into the device cursor: from the host ints after eager steps
        (the traced graph then holds them as constants: one recompile per switch), else from
        the begin index or the first timestep, as ``_init_step_index`` would."""
        if self._step_index is not None:
            self._cursor.start_at(self._step_index, self._lower_order_nums)
        elif getattr(self, "_begin_index", None) is not None:
            self._cursor.start_at(self._begin_index, self._lower_order_nums)
        else:
            self._cursor.start_at(self._first_step_index(timestep), self._lower_order_nums)
        self._device_current = True
        self._start_pending = False

    def _start_at_first_timestep(self, timestep) -> None:
        """The first eager step after the cursor was put at step 0 by default starts where
        its timestep is. A traced or captured step does not: a captured graph replays from
        where set_timesteps put the cursor."""
        self._cursor.start_unless_moved(self._first_step_index(timestep))
        self._start_pending = False

    def _first_step_index(self, timestep) -> int | torch.Tensor:
        """Where a trajectory whose first step is given ``timestep`` starts, by
        ``_init_step_index``'s rule: an int, or for a tensor that is not an element of the
        schedule (any tensor, when traced) diffusers' rule evaluated on the device."""
        position = None if self._inverse else self._schedule_position(timestep)
        if position is not None:
            return position
        if isinstance(timestep, torch.Tensor):
            return self._cursor.index_of(self._schedule_timesteps, timestep)
        return self._index_of_timestep(timestep)


class FusedDPMSolverMultistepScheduler(DPMFamilyMixin, DPMSolverMultistepScheduler):
    _validate_config = _check_config
    __init__ = validated_init(DPMSolverMultistepScheduler.__init__)
    _step_config_options = DPMFamilyMixin._step_config_options + ("final_sigmas_type",)

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None):
        if num_inference_steps is not None:  # else timesteps, which diffusers checks
            num_inference_steps = checked_num_inference_steps(num_inference_steps)
        parent = super()

        def schedule():
            parent.set_timesteps(num_inference_steps=num_inference_steps, device=device, mu=mu, timesteps=timesteps)
            self._build_schedule(device)

        self._all_or_nothing(schedule)  # a refused schedule leaves the previous one whole
        self._reset_philox_counter()  # a new trajectory replays the same noise

    # Only the forward class has these two, as in diffusers: pipelines call what hasattr finds.
    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        if schedule_timesteps is not None or self._schedule_timesteps is None:
            # given a schedule, or before set_timesteps (diffusers then searches the training timesteps)
            return super().index_for_timestep(timestep, schedule_timesteps)
        return self._index_of_timestep(timestep)

    def set_begin_index(self, begin_index: int = 0):
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)):
            raise TypeError(f"begin_index must be an int, got {type(begin_index).__name__}")
        if begin_index < 0:
            raise ValueError(
                f"begin_index={begin_index}: expected a step position >= 0 (diffusers indexes sigmas with it from "
                "the end: NaN at -1, another step's noise levels below)"
            )
        begin_index = int(begin_index)
        super().set_begin_index(begin_index)
        if self._static_history is not None:
            # as diffusers: a start set after a step has run (here possibly a replayed one) is ignored
            self._cursor.start_unless_moved(begin_index)
            self._start_pending = False
            self._unstarted_position = (begin_index, 0)  # what the cursor holds unless a step moved it
            self._host_current, self._device_current = False, True


class FusedDPMSolverMultistepInverseScheduler(DPMFamilyMixin, DPMSolverMultistepInverseScheduler):
    _inverse = True
    _validate_config = _check_inverse_config
    __init__ = validated_init(DPMSolverMultistepInverseScheduler.__init__)

    def set_timesteps(self, num_inference_steps=None, device=None):
        num_inference_steps = checked_num_inference_steps(num_inference_steps)
        parent = super()

        def schedule():
            parent.set_timesteps(num_inference_steps, device=device)
            self._build_schedule(device)

        self._all_or_nothing(schedule)  # a refused schedule leaves the previous one whole
        self._reset_philox_counter()  # a new trajectory replays the same noise
