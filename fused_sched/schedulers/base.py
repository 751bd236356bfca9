"""What every fused scheduler shares: timestep resolution without syncs, checks, noise.

Each module defining a fused class also imports diffusers' ``SchedulerMixin``: a saved
pipeline names its scheduler by (defining module, class), and ``DiffusionPipeline.
from_pretrained`` looks the loader's base classes up by name in that module, so without
it a pipeline saved after the swap would not load. Those module names are therefore part
of the API (pinned in tests/test_pipelines.py, SAVED_NAMES): a class moved elsewhere stays
importable from its old module, with SchedulerMixin beside it.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import operator
import sys

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ..coefficients.table import normalized_device
from ..ops.philox import PhiloxNoise, check_seed


def validated_init(parent_init):
    """Wrap a diffusers ``__init__`` with the class's config check (``_validate_config``),
    keeping its signature.

    ``functools.wraps`` keeps ``__wrapped__``, so ConfigMixin still reads the parent's
    parameters and ``from_config`` / ``save_pretrained`` round trips are unchanged.
    """

    @functools.wraps(parent_init)
    def __init__(self, *args, **kwargs):
        parent_init(self, *args, **kwargs)
        self._validate_config()

    return __init__


def check_clipping_config(config) -> None:
    """The x0 bounds of a config that clips, checked when the scheduler is made: diffusers
    clamps with any value, and a bound that is not positive sets every x0 to 0, flips it or
    divides it by 0."""
    # read as attributes, as diffusers' steps read them (see FusedSchedulerMixin._step_config_options)
    if getattr(config, "thresholding", False):
        if not config.sample_max_value > 0:
            raise ValueError(
                f"sample_max_value={config.sample_max_value!r} with thresholding=True: the thresholding scale "
                "s = clamp(quantile, 1, sample_max_value) divides x0 and must be > 0 (diffusers' s would be "
                "sample_max_value, flipping x0 or dividing it by 0)"
            )
        if not 0 <= config.dynamic_thresholding_ratio <= 1:
            raise ValueError(
                f"dynamic_thresholding_ratio={config.dynamic_thresholding_ratio!r} with thresholding=True: the "
                "quantile of |x0| taken per sample must be in [0, 1] (diffusers' torch.quantile raises at the first "
                "step)"
            )
    elif getattr(config, "clip_sample", False) and not config.clip_sample_range > 0:
        raise ValueError(
            f"clip_sample_range={config.clip_sample_range!r} with clip_sample=True: x0 is clamped to "
            "[-clip_sample_range, clip_sample_range], which must not be empty or a point (diffusers clamps every "
            "x0 to 0, or to the negative bound)"
        )


def _broadcasts_to(shape, target) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without enlarging it."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


class FusedSchedulerMixin:
    """Host-side bookkeeping shared by the fused classes; holds no tensor math."""

    _schedule_timesteps: torch.Tensor | None = None  # the tensor set_timesteps produced
    _host_timesteps: list[int] = []
    # (address of element 0, bytes between elements, dtype, device) of the schedule
    _schedule_address: tuple[int, int, torch.dtype, torch.device] | None = None
    _philox_seed: int | None = None  # use_philox_noise: None draws as diffusers does
    # Counter of the next noisy draw's first element: a 0-dim int64 tensor on the data's
    # device, so a traced or captured step reads and advances it there (never on the host).
    _philox_counter: torch.Tensor | None = None
    _philox_fresh: bool = True  # no draw since the last reset: the counter holds 0

    # What a copy (copy.deepcopy, pickle) makes afresh instead of carrying over: addresses
    # are this process's, and the plans kept per schedule hold backend modules and kernels.
    _process_local_state: tuple[str, ...] = ("_schedule_address", "_host_timesteps_version", "_host_timesteps",
                                             "_built_options", "_built_state")

    # What diffusers' step reads that this class turns into tables when it builds them: the
    # config options (each class names its own) and the scheduler's schedule state (tensors
    # and counts set by set_timesteps or __init__). diffusers reads them at every step, and
    # callers change them between steps: FrozenDict lets ``scheduler.config.clip_sample =
    # False`` through (StableCascade's pipelines do it), and ``scheduler.sigmas`` or
    # ``alphas_cumprod`` can be edited in place or replaced. A step whose inputs differ from
    # those its tables were built from rebuilds them first (``_require_schedule``).
    _step_config_options: tuple[str, ...] = ()
    _step_schedule_state: tuple[str, ...] = ()
    # When the tables were built: the options' values, and each state value with its
    # in-place version (None for other than tensors). Holding the objects keeps them from
    # being freed, so another object cannot take the place of one.
    _built_options: tuple | None = None
    _built_state: tuple | None = None

    @classmethod
    def _get_compatibles(cls) -> list:
        # diffusers lists, by name, the class itself and those in _compatibles that diffusers
        # exports; a fused class is no export of diffusers, so it names itself and its parent.
        parent = next(c for c in cls.__mro__ if c.__module__.startswith("diffusers.schedulers.scheduling_"))
        return [cls] + parent._get_compatibles()

    def __copy__(self):
        # diffusers' set_timesteps and steps rebind the attributes they change, so a shallow
        # copy of its scheduler is independent of the original's next schedule; the fused
        # classes change their tables, device cursor, noise counter and static history in
        # place (so that a captured CUDA graph stays valid), which a shallow copy would share.
        return copy.deepcopy(self)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._process_local_state:
            state.pop(name, None)
        # The copy's state tensors are new objects: whether its tables are current is
        # carried over instead of the ids (a copy taken with an edit pending still rebuilds).
        state["_tables_current"] = self._tables_current()
        return state

    def __setstate__(self, state) -> None:
        current = state.pop("_tables_current", False)
        self.__dict__.update(state)
        if current:
            self._note_tables_built()
        if self._schedule_timesteps is not None:
            if self._schedule_timesteps is self.timesteps:  # a copy made under inference mode
                self._keep_schedule_versioned()
                self._schedule_timesteps = self.timesteps
            # read from the copy's tensor: the original's may have been edited in place since
            # its values were last read
            self._read_host_timesteps()

    def _remember_schedule(self) -> None:
        if self.timesteps.is_meta:
            raise ValueError(
                f"{type(self).__name__}.set_timesteps(device='meta'): a meta tensor holds no values, and the fused "
                "classes build their tables from the schedule's; pass a real device"
            )
        self._keep_schedule_versioned()
        self._schedule_timesteps = self.timesteps
        self._read_host_timesteps()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # one C call each per step (this runs at every step: see _require_schedule)
        cls._read_step_options = staticmethod(_attributes_getter(cls._step_config_options))
        cls._read_step_state = staticmethod(_attributes_getter(cls._step_schedule_state))

    def _tables_current(self) -> bool:
        """Whether what the tables were built from (``_step_config_options``) is as it was:
        the same option values, and the same state objects unedited (their in-place
        versions; no device memory is read). It runs at every eager step, so it reads the
        options with one attrgetter call; ``_refuse_changes_traced`` is the same rule in the
        form torch.compile traces (one shared form measured 0.5 µs slower per step)."""
        if self._read_step_options(self.config) != self._built_options:
            return False
        for value, (built, version) in zip(self._read_step_state(self), self._built_state):
            if value is built:
                if version is not None and value._version != version:
                    return False
            elif isinstance(value, torch.Tensor) or isinstance(built, torch.Tensor) or value != built:
                return False
        return True

    def _note_tables_built(self) -> None:
        # An inference tensor (made under torch.inference_mode()) keeps no version, so an
        # in-place edit of it would go unseen: such state becomes the same values as a
        # normal tensor, as the schedule does (_keep_schedule_versioned).
        with torch.inference_mode(False):
            for name in self._step_schedule_state:
                value = getattr(self, name)
                if isinstance(value, torch.Tensor) and value.is_inference():
                    setattr(self, name, value.clone())
        self._built_options = self._read_step_options(self.config)
        self._built_state = tuple((value, value._version if isinstance(value, torch.Tensor) else None)
                                  for value in self._read_step_state(self))

    def _all_or_nothing(self, change) -> None:
        """Run ``change()``; if it raises, put every attribute back as it was, so that a
        refused set_timesteps or rebuild leaves the scheduler as before (diffusers' own
        set_timesteps has replaced the timesteps by then). ``change`` must make its in-place
        writes (refilled tables, the noise counter) only after its last check."""
        before = self.__dict__.copy()
        try:
            change()
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _keep_schedule_versioned(self) -> None:
        """``self.timesteps`` made under torch.inference_mode() (set_timesteps, or a copy made
        there) is an inference tensor, which keeps no version counter: an in-place edit of
        the schedule would go unseen (``_schedule_position``). It becomes the same values as
        a normal tensor, whose edits count, under inference mode too."""
        if self.timesteps is not None and self.timesteps.is_inference():
            with torch.inference_mode(False):
                self.timesteps = self.timesteps.clone()

    def _note_schedule_identity(self) -> None:
        """What _schedule_position needs: the schedule tensor's address and layout (None for
        an expanded schedule, stride 0, which gives no position per address) and its version
        now, matching the host values held."""
        schedule = self._schedule_timesteps
        stride = schedule.stride(0) if schedule.dim() == 1 and schedule.numel() > 1 else 1
        self._schedule_address = (
            (schedule.data_ptr(), stride * schedule.element_size(), schedule.dtype, schedule.device) if stride else None
        )
        # An inference tensor keeps no version (_keep_schedule_versioned replaces the
        # scheduler's own; one assigned to scheduler.timesteps by hand may still be one).
        self._host_timesteps_version = None if schedule.is_inference() else schedule._version

    def _read_host_timesteps(self) -> None:
        """The schedule's values on the host, and the version of the tensor they were read
        from: an in-place edit of ``scheduler.timesteps`` is seen (``_schedule_position``)."""
        self._host_timesteps = [int(v) for v in self._schedule_timesteps.cpu().tolist()]
        self._note_schedule_identity()

    def _reset_philox_counter(self) -> None:
        """Counter back to 0: an existing one is zeroed in place (a CUDA graph captured
        earlier reads that storage, so its replays restart too); else it is made on the
        schedule's device, or, without a schedule yet, by the first draw on the sample's."""
        self._philox_fresh = True
        if self._philox_seed is None:
            self._philox_counter = None
        elif self._philox_counter is not None:
            self._philox_counter.zero_()
        elif self._schedule_timesteps is not None:
            self._philox_counter = torch.zeros((), dtype=torch.int64, device=self._schedule_timesteps.device)

    def use_philox_noise(self, seed: int | None) -> None:
        """Opt in to in-kernel counter-based noise (None restores the default).

        With a seed, every noisy step uses ``fused_sched.ops.PhiloxNoise(seed, offset)``
        instead of drawing a tensor from ``generator`` / taking ``variance_noise``: the
        fused kernel computes z from the seed and each element's index, so no noise tensor
        is drawn, written or read. Each noisy draw advances ``offset`` by the draw's element
        count, so steps get fresh noise; ``set_timesteps`` (and this call) reset it to 0, so
        running the same trajectory again reproduces it exactly, on any backend to a few
        float32 ulp. ``offset`` is a 0-dim int64 tensor on the data's device that the kernel
        reads and the step advances there: traced steps share one graph, no step reads it
        on the host, and the replays of a captured CUDA graph continue it (it must be on
        the device before capture: ``set_timesteps(..., device=...)``). The numbers differ
        from ``torch.randn``'s: results are not diffusers' for the same generator seed.
        While it is on, a ``generator`` passed to ``step`` is not used (diffusers pipelines
        pass theirs to every step; opting in here is the choice of noise source), and
        ``variance_noise``, which is explicit noise, raises ``ValueError``.
        """
        self._philox_seed = None if seed is None else check_seed(seed)
        self._reset_philox_counter()

    def _require_schedule(self) -> None:
        """Refuse a step before set_timesteps; rebuild the tables where what they were built
        from has changed since (``_step_config_options``).

        A traced step cannot rebuild them (host work), nor see an in-place edit of the state
        (torch.compile does not guard tensor versions); it reads the tables as they are, and
        a later eager step, or set_timesteps, refills them in place, where the compiled graph
        reads them. A changed option or replaced state is seen, though: the graph guards on
        the values and objects read here, so after such a change the step is traced again and
        refuses to run on stale tables.
        """
        if self._schedule_timesteps is None and self.num_inference_steps is not None:
            self._adopt_schedule_set_by_hand()
        if self.num_inference_steps is None or self._schedule_timesteps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        if torch.compiler.is_compiling():
            self._refuse_changes_traced()
        elif not self._tables_current():
            if stream_capturing(self._schedule_timesteps.device):
                raise ValueError(
                    f"{type(self).__name__}: the config or schedule state changed since the tables were built, and "
                    "rebuilding them during CUDA-graph capture would be recorded and replayed (its host copies are "
                    "not capturable); take one eager step after the change, before capturing"
                )
            self._all_or_nothing(self._rebuild_tables)

    def _adopt_schedule_set_by_hand(self) -> None:
        """``num_inference_steps`` (and ``timesteps``) assigned without set_timesteps: a class
        whose diffusers step reads nothing else set_timesteps makes takes them as its
        schedule (the DDIM family); this refuses."""
        raise ValueError(
            f"{type(self).__name__}: num_inference_steps={self.num_inference_steps!r} was assigned without "
            "set_timesteps, which also makes the sigmas this class's step reads; call set_timesteps"
        )

    def _refuse_changes_traced(self) -> None:
        """_tables_current as torch.compile can trace it (no attrgetter, no versions)."""
        config = self.config
        changed = [name for name, built in zip(self._step_config_options, self._built_options or ())
                   if getattr(config, name) != built]
        for name, (built, _) in zip(self._step_schedule_state, self._built_state or ()):
            value = getattr(self, name)
            if value is not built and (isinstance(value, torch.Tensor) or value != built):
                changed.append(name)
        if changed or self._built_options is None:
            raise ValueError(
                f"{type(self).__name__}: {changed or 'the config'} changed since the tables were built, and a step "
                "traced by torch.compile cannot rebuild them; take one eager step (or call set_timesteps) after the "
                "change, then the compiled steps"
            )

    def _schedule_position(self, timestep) -> int | None:
        """Index into the schedule of a tensor that is an element of ``scheduler.timesteps``.

        Such a tensor (``for t in scheduler.timesteps``, ``timesteps[i]``, slices of it) views
        the schedule's memory, so its position follows from its address without reading
        device memory. The schedule is kept alive, so no other tensor can occupy that memory:
        a same-dtype tensor at one of its element addresses holds that element. None for
        anything else.
        """
        address = self._schedule_address
        if (
            address is None
            or not isinstance(timestep, torch.Tensor)
            # torch.compile cannot trace addresses; a traced step gathers its row on the
            # device instead, which is also what keeps a captured graph's arguments fixed.
            or torch.compiler.is_compiling()
            or timestep.dim() != 0
            or timestep.dtype != address[2]
            or timestep.device != address[3]
        ):
            return None
        schedule = self._schedule_timesteps
        if schedule.data_ptr() != address[0]:
            # Another tensor took the schedule's place without set_timesteps (a pipeline that
            # deep-copies the scheduler's __dict__ and restores it, bypassing __getstate__):
            # the noted address is the old tensor's, which no longer holds this schedule.
            return None
        position, misaligned = divmod(timestep.data_ptr() - address[0], address[1])
        if misaligned or not 0 <= position < len(self._host_timesteps):
            return None
        version = self._host_timesteps_version
        if version is not None and schedule._version != version:
            self._read_host_timesteps()  # edited in place since: read again (one sync, once per edit)
        return position

    def _host_timestep(self, timestep) -> int | None:
        """The timestep's value known on the host without reading device memory, else None.

        Python ints are their own value; elements of ``scheduler.timesteps`` are looked up
        by position (see ``_schedule_position``). Other tensors return None.
        """
        if isinstance(timestep, torch.Tensor):  # first: pipelines pass elements of scheduler.timesteps
            position = self._schedule_position(timestep)
            return None if position is None else self._host_timesteps[position]
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            return int(timestep)
        if isinstance(timestep, np.ndarray) and timestep.ndim == 0 and np.issubdtype(timestep.dtype, np.integer):
            return int(timestep)  # diffusers indexes its tables with it as with an int
        raise TypeError(f"timestep must be an int or a torch.Tensor, got {type(timestep).__name__}")

    def _check_training_timestep(self, t: int, argument: str = "timestep") -> int:
        T = self.config.num_train_timesteps
        if not 0 <= t < T:
            raise ValueError(f"{argument}={t} is outside the training range [0, {T})")
        return t

    @staticmethod
    def _coefficient_dtype(sample: torch.Tensor, model_output: torch.Tensor, history=()) -> torch.dtype:
        """float64 where any input the step reads is (diffusers' arithmetic promotes to it: a
        float64 history term makes the update float64 even after float32 outputs), else float32."""
        wide = sample.dtype == torch.float64 or model_output.dtype == torch.float64
        if history and not wide:
            wide = any(h.dtype == torch.float64 for h in history)
        return torch.float64 if wide else torch.float32

    @staticmethod
    def _check_model_io(model_output, sample) -> None:
        # Straight-line checks: this runs every step, and a loop over pairs costs a
        # noticeable share of a small latent's step.
        if not (isinstance(model_output, torch.Tensor) and model_output.is_floating_point()):
            _refuse_tensor("model_output", model_output)
        if not (isinstance(sample, torch.Tensor) and sample.is_floating_point()):
            _refuse_tensor("sample", sample)

    @staticmethod
    def _check_shapes_before_noise(model_output, sample, variance_noise=None) -> None:
        """The op's shape checks, made before a step draws noise: a step that fails must leave
        the caller's generator as it was (diffusers fails before its draw), so that a retry
        draws the same noise."""
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}; expected the sample's shape "
                             f"{tuple(sample.shape)}")
        if variance_noise is not None and (not isinstance(variance_noise, torch.Tensor)
                                           or not _broadcasts_to(variance_noise.shape, sample.shape)):
            got = (f"shape {tuple(variance_noise.shape)}" if isinstance(variance_noise, torch.Tensor)
                   else f"type {type(variance_noise).__name__}")
            raise ValueError(f"variance_noise has {got}; expected a tensor of the sample's shape {tuple(sample.shape)} "
                             "or one that broadcasts to it")

    @staticmethod
    def _noise_of_shape(variance_noise: torch.Tensor, shape) -> torch.Tensor:
        # diffusers adds std * variance_noise, which broadcasts: one noise for every batch row, say
        return variance_noise if variance_noise.shape == shape else variance_noise.expand(shape)

    def _draw_noise(self, shape, generator, device, dtype, variance_noise=None):
        """z for one noisy draw: a tensor as diffusers draws it, or, after
        ``use_philox_noise(seed)``, a ``PhiloxNoise`` for the kernel to compute."""
        if self._philox_seed is not None:
            return self._philox_draw(shape, generator, variance_noise, device)
        if variance_noise is not None:
            return self._noise_of_shape(variance_noise, shape)
        if generator is not None and torch.compiler.is_compiling():
            # dynamo's own message ("failed to convert args/kwargs to proxy") names no remedy
            raise ValueError(
                f"{type(self).__name__}: a torch.Generator cannot be traced by torch.compile; call "
                "scheduler.use_philox_noise(seed) for in-kernel noise, pass variance_noise where the step takes it, "
                "or pass generator=None (torch's default generator)"
            )
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _philox_draw(self, shape, generator, variance_noise, device) -> PhiloxNoise:
        if variance_noise is not None:
            raise ValueError(
                f"{type(self).__name__}: variance_noise was passed while in-kernel noise is on "
                f"(use_philox_noise({self._philox_seed})); pass variance_noise=None, or call "
                "use_philox_noise(None) to use it"
            )
        counter = self._philox_counter
        if counter is None or counter.device != normalized_device(torch.device(device)):
            counter = self._philox_counter_on(torch.device(device))
        # The kernel gets a snapshot (one 8-byte device copy), then the counter advances in
        # place: both are device work in stream order, so the op reads the pre-increment
        # value eagerly, traced (the clone is its own graph value) and in a CUDA graph, and
        # the PhiloxNoise handed out never changes after the fact.
        noise = PhiloxNoise(self._philox_seed, counter.clone())
        counter.add_(math.prod(shape))
        self._philox_fresh = False
        return noise

    def _philox_counter_on(self, device: torch.device) -> torch.Tensor:
        """The counter on the sample's device, where it is not there yet: zeros before the
        trajectory's first draw, else the current count carried over (one copy; from a GPU
        to the CPU a sync). Refused while a CUDA graph is being captured: the graph would
        re-create the counter on every replay, and so repeat one step's noise."""
        if stream_capturing(device):
            raise ValueError(
                f"{type(self).__name__}: the in-kernel noise counter (use_philox_noise) is not on {device} yet, and "
                "making it during CUDA-graph capture would reset it at every replay; call "
                f"set_timesteps(..., device={str(device)!r}) (or run one noisy step) before capturing"
            )
        old = self._philox_counter
        if old is None or self._philox_fresh:
            counter = torch.zeros((), dtype=torch.int64, device=device)
        else:
            counter = old.to(device)
        self._philox_counter = counter
        return counter


def _attributes_getter(names: tuple[str, ...]):
    """A callable giving the tuple of the named attributes of its argument."""
    if len(names) == 1:
        name = names[0]
        return lambda obj: (getattr(obj, name),)
    return operator.attrgetter(*names) if names else (lambda obj: ())


def checked_num_inference_steps(value) -> int:
    """``value`` as a positive int (a float holding one is taken, as diffusers takes it):
    diffusers divides by zero on 0, and builds an empty or mis-indexed schedule from a
    negative or fractional count that fails only later."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point \
            and value.dtype != torch.bool:
        # its value, as an int gives it: diffusers' spacing arithmetic with the tensor runs in
        # float32 and, for some counts, puts a timestep one off the int's schedule
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_inference_steps must be an integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {value}")
    return int(value)


def caller_stacklevel() -> int:
    """warnings.warn's stacklevel, called here, that names the first frame outside this
    package: the caller's line, whichever path inside reached the warning."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(__package__.split(".")[0] + "."):
        frame, level = frame.f_back, level + 1
    return level


def stream_capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a graph (False off CUDA and in tracing)."""
    return (device.type == "cuda" and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


def _refuse_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def check_finite_rows(table: torch.Tensor, timesteps, describe) -> None:
    """Raise where a scheduled row is inf/NaN: diffusers would silently return inf/NaN there."""
    bad = [t for t in timesteps if not bool(torch.isfinite(table[t]).all())]
    if bad:
        raise ValueError(describe(bad))
