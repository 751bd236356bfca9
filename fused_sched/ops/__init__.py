"""The fused scheduler-step op: argument checks and backend dispatch.

Schedulers call :func:`fused_step` (the DDIM family :func:`plan_step` once per input
signature, then the plan's ``run``); kernels never see unchecked arguments. See
``layout.py`` for the math and the coefficient-row columns.
"""

from __future__ import annotations

import inspect
import math
from typing import Mapping, NamedTuple, Sequence

import torch

from . import layout, reference, torch_backend
from .backends import (
    BackendUnavailableError,
    availability,
    known_backends,
    requested_backend,
    select_backend,
    set_backend,
    use_backend,
)
from .layout import CLIP_MODES, NUM_COEFFICIENTS, ConstantColumns
from .philox import PhiloxNoise
from .philox import check_noise as _check_philox_noise

__all__ = [
    "BackendUnavailableError",
    "ConstantColumns",
    "PhiloxNoise",
    "StepOutputs",
    "availability",
    "fused_step",
    "known_backends",
    "layout",
    "requested_backend",
    "select_backend",
    "set_backend",
    "use_backend",
]

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32 = torch.finfo(torch.float32)


class StepOutputs(NamedTuple):
    prev_sample: torch.Tensor
    history_value: torch.Tensor | None
    x0: torch.Tensor | None


def _check_like(name: str, tensor, shape: torch.Size, device: torch.device) -> None:
    """``tensor`` must match the sample's shape and device (passed in: read once per step)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.shape != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected the sample's shape {tuple(shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}; expected the sample's device {device}")
    if tensor.dtype not in STORAGE_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of {[str(d) for d in STORAGE_DTYPES]}")


def fused_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    history: Sequence[torch.Tensor] = (),
    noise: torch.Tensor | PhiloxNoise | None = None,
    clip: str = "none",
    clip_range: float = 1.0,
    threshold_ratio: float = 0.995,
    threshold_max: float = 1.0,
    out_dtype: torch.dtype | None = None,
    history_dtype: torch.dtype | None = None,
    x0_dtype: torch.dtype | None = None,
    constant_columns: Mapping[int, float] | None = None,
    backend: str | None = None,
) -> StepOutputs:
    """One scheduler step for a whole batch (see ``layout.py`` for the formula).

    Args:
        sample, model_output: x and m, same shape (B, ...), same device, any float dtype.
        coefficients: (1, K) or (B, K) rows, float32 (float64 when x or m is float64),
            on the sample's device. Row b is applied to batch element b.
        history: up to two earlier history values h1 (most recent), h2.
        noise: z, or None for a deterministic step (the ON column is then ignored), or
            ``PhiloxNoise(seed, offset)``: z computed in the kernel, for the element with flat
            index i a standard normal from counter offset + i (``philox.py``): no tensor,
            reproducible, the same values however the tensor is split.
        clip: "none", "clamp" (to +-clip_range) or "threshold" (dynamic thresholding: per
            batch row, s = clamp(quantile(|x0|, threshold_ratio), 1, threshold_max)).
        out_dtype: dtype of prev (default: promotion of sample and model_output dtypes).
        history_dtype / x0_dtype: write d / the clipped x0 in this dtype; None skips it.
        constant_columns: {column: value} holding in every row the caller may pass (a
            scheduler knows them per schedule, e.g. P0 = 1 and PX = PM = 0 when d = x0). A
            backend may skip terms with known 0 or 1 coefficients; a wrong entry gives
            wrong results, so only state what the table guarantees.
        backend: a backend name overriding the process-wide selection.

    Inputs are never modified. Returns ``StepOutputs(prev_sample, history_value, x0)``.

    Checks and backend choice are made once per call signature (shapes, dtypes, devices,
    options, backend request) and reused by later calls with the same one (``_plans``):
    a scheduler calls this with one signature per trajectory, and on a small latent the
    checks cost as much as the arithmetic.
    """
    history = _history_tuple(history)
    plan = _planned(sample, model_output, coefficients, history, noise, clip, clip_range, threshold_ratio,
                    threshold_max, out_dtype, history_dtype, x0_dtype, constant_columns, backend)
    return plan.run(sample, model_output, coefficients, history, noise)


def plan_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    history: Sequence[torch.Tensor] = (),
    noise: torch.Tensor | PhiloxNoise | None = None,
    **options,
) -> "StepPlan":
    """What :func:`fused_step` decides before it computes: every check of these arguments
    and the backend chosen for them, as a :class:`StepPlan` whose ``run`` computes the step.
    ``fused_step(...)`` is ``plan_step(...).run(sample, model_output, coefficients, history,
    noise)``.

    For callers that step many times with inputs they know keep one signature: a scheduler
    makes its coefficient rows itself, so the sample's and model output's shapes, dtypes and
    devices (and the backend request) fix everything the checks read, and it keeps the plan
    under those instead of having every argument checked again per step. ``run`` checks
    nothing but PhiloxNoise values; calling it with tensors of another signature than the
    plan's is a caller's bug (``fused_step`` is the checked form).

    ``options`` are fused_step's other keyword arguments, with its defaults.
    """
    unknown = options.keys() - _STEP_OPTIONS.keys()
    if unknown:
        raise TypeError(f"plan_step() got unexpected keyword argument(s) {sorted(unknown)}; "
                        f"expected fused_step's: {sorted(_STEP_OPTIONS)}")
    return _planned(sample, model_output, coefficients, _history_tuple(history), noise,
                    **{**_STEP_OPTIONS, **options})


# fused_step's keyword arguments other than the tensors, with their defaults
_STEP_OPTIONS = {name: parameter.default for name, parameter in inspect.signature(fused_step).parameters.items()
                 if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("history", "noise")}


def _history_tuple(history) -> tuple:
    if type(history) is not tuple:
        if isinstance(history, torch.Tensor):  # tuple() would split it along dim 0
            raise TypeError("history must be a sequence of tensors, got a single tensor; pass (h1,) or (h1, h2), most recent first")
        history = tuple(history)
    return history


def _planned(sample, model_output, coefficients, history, noise, clip, clip_range, threshold_ratio, threshold_max,
             out_dtype, history_dtype, x0_dtype, constant_columns, backend) -> "StepPlan":
    """The plan of this call signature: from the cache, else checked and stored."""
    if torch.compiler.is_compiling():  # traced, the plan only carries the options to the custom op
        return _plan(sample, model_output, coefficients, history, noise, clip, clip_range, threshold_ratio,
                     threshold_max, out_dtype, history_dtype, x0_dtype, constant_columns, backend)
    key = _signature(sample, model_output, coefficients, history, noise, clip, clip_range, threshold_ratio,
                     threshold_max, out_dtype, history_dtype, x0_dtype, constant_columns, backend)
    plan = _plans.get(key) if key is not None else None
    if plan is None:  # the key holds constant_columns' id, and the plan keeps the object alive
        plan = _plan(sample, model_output, coefficients, history, noise, clip, clip_range, threshold_ratio,
                     threshold_max, out_dtype, history_dtype, x0_dtype, constant_columns, backend)
        if key is not None:
            _plans.store(key, plan)
    return plan


def _plan(sample, model_output, coefficients, history, noise, clip, clip_range, threshold_ratio, threshold_max,
          out_dtype, history_dtype, x0_dtype, constant_columns, backend) -> "StepPlan":
    """Every check of fused_step's arguments; the backend chosen for them (not under tracing)."""
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    shape, device, dtype = sample.shape, sample.device, sample.dtype
    if not shape or shape[0] < 1:
        raise ValueError(f"sample must have a leading batch dimension of size >= 1, got shape {tuple(shape)}")
    if dtype not in STORAGE_DTYPES:
        raise TypeError(f"sample has dtype {dtype}; expected one of {[str(d) for d in STORAGE_DTYPES]}")
    _check_like("model_output", model_output, shape, device)
    wide = dtype == torch.float64 or model_output.dtype == torch.float64
    if history:
        if len(history) > 2:
            raise ValueError(f"history holds at most 2 tensors, got {len(history)}")
        for i, h in enumerate(history):
            _check_like(f"history[{i}]", h, shape, device)
        wide = wide or any(h.dtype == torch.float64 for h in history)
    if noise is not None:
        if isinstance(noise, PhiloxNoise):
            _check_philox_noise(noise, sample)
        elif isinstance(noise, torch.Tensor):
            _check_like("noise", noise, shape, device)
        else:
            raise TypeError(f"noise must be a torch.Tensor, a PhiloxNoise or None, got {type(noise).__name__}")

    expected = torch.float64 if wide else torch.float32
    if not isinstance(coefficients, torch.Tensor) or coefficients.dtype != expected:
        got = coefficients.dtype if isinstance(coefficients, torch.Tensor) else type(coefficients).__name__
        raise TypeError(f"coefficients must be a {expected} tensor for these inputs, got {got}")
    rows_shape = coefficients.shape
    if len(rows_shape) != 2 or rows_shape[1] != NUM_COEFFICIENTS or rows_shape[0] not in (1, shape[0]):
        raise ValueError(
            f"coefficients has shape {tuple(rows_shape)}; expected (1, {NUM_COEFFICIENTS}) "
            f"or ({shape[0]}, {NUM_COEFFICIENTS})"
        )
    if coefficients.device != device:
        raise ValueError(f"coefficients are on {coefficients.device}; expected the sample's device {device}")

    if clip not in CLIP_MODES:
        raise ValueError(f"clip={clip!r}; expected one of {CLIP_MODES}")
    if clip == "clamp":
        _check_x0_bound("clip_range", clip_range, wide, "clamps x0")
    if clip == "threshold":
        if not 0.0 <= threshold_ratio <= 1.0:  # torch.quantile's q; 0 is the minimum
            raise ValueError(f"threshold_ratio must be in [0, 1], got {threshold_ratio}")
        _check_x0_bound("threshold_max", threshold_max, wide, "takes the thresholding scale")
        if sample.numel() == 0:
            raise ValueError(f"dynamic thresholding takes a quantile of each batch row, and sample of shape "
                             f"{tuple(shape)} has empty rows")

    if constant_columns is not None and not isinstance(constant_columns, ConstantColumns):
        if not isinstance(constant_columns, Mapping):
            raise TypeError(
                f"constant_columns must be a mapping {{column: value}}, got {type(constant_columns).__name__}"
            )
        constant_columns = ConstantColumns(constant_columns)

    if out_dtype is None:
        out_dtype = torch.promote_types(dtype, model_output.dtype)
    for name, value in (("out_dtype", out_dtype), ("history_dtype", history_dtype), ("x0_dtype", x0_dtype)):
        if value is not None and value not in STORAGE_DTYPES:
            raise TypeError(f"{name}={value} is not a supported storage dtype {[str(d) for d in STORAGE_DTYPES]}")

    impl = None
    if not torch.compiler.is_compiling():  # traced, the custom op selects when it runs
        impl = _select(sample, model_output, history, noise, backend)
    return StepPlan(impl, sample, model_output, history, noise, clip, float(clip_range), float(threshold_ratio),
                    float(threshold_max), out_dtype, history_dtype, x0_dtype, constant_columns, backend)


def _check_x0_bound(argument: str, bound, wide: bool, use: str) -> None:
    """A bound on x0 (the clamp's range, the thresholding scale's maximum) is positive, and
    in a float32 step a float32 value: one beyond float32's range is refused by torch.clamp
    where a kernel would round it to inf (diffusers raises RuntimeError), and one that rounds
    to 0 or a subnormal clamps every x0 to (nearly) 0, or makes the thresholded x0/s NaN."""
    if not bound > 0:
        raise ValueError(f"{argument} must be > 0, got {bound}")
    if not wide and not (FLOAT32.tiny <= bound <= FLOAT32.max or bound == math.inf):
        raise ValueError(
            f"{argument}={bound!r} must be inf or a normal float32 value, from {FLOAT32.tiny:.6g} to "
            f"float32's largest, {float(FLOAT32.max)!r}: a float32 step {use} in float32"
        )


def _select(sample, model_output, history, noise, backend):
    dtypes = (sample.dtype, model_output.dtype)
    if history:
        dtypes += tuple(h.dtype for h in history)
    if noise is not None and not isinstance(noise, PhiloxNoise):
        dtypes += (noise.dtype,)
    return select_backend(sample.device, dtypes, backend)


class StepPlan:
    """What the checks decided for one call signature: the backend, the normalised options
    and, from a backend that specialises (``step_program``), the step's program. Made by
    :func:`plan_step`; ``impl`` is None for a plan made while torch.compile traces (the
    custom op selects the backend when it runs)."""

    __slots__ = ("impl", "clip", "clip_range", "threshold_ratio", "threshold_max", "out_dtype", "history_dtype",
                 "x0_dtype", "constant_columns", "backend", "_step", "_threshold", "_requested", "_autograd_plan")

    def __init__(self, impl, sample, model_output, history, noise, clip, clip_range, threshold_ratio, threshold_max,
                 out_dtype, history_dtype, x0_dtype, constant_columns, backend=None):
        self.impl = impl
        self.backend = backend  # the explicit request, for the traced custom op
        self.clip, self.clip_range = clip, clip_range
        self.threshold_ratio, self.threshold_max = threshold_ratio, threshold_max
        self.out_dtype, self.history_dtype, self.x0_dtype = out_dtype, history_dtype, x0_dtype
        self.constant_columns = constant_columns
        self._step = self._threshold = None
        # What chose impl, for a step whose inputs need gradients (_with_autograd).
        self._requested = requested_backend(backend) if impl is not None else None
        # None: impl's outputs carry gradients themselves; False: the torch plan is not made yet.
        self._autograd_plan = None if getattr(impl, "propagates_gradients", False) else False
        if getattr(impl, "step_program", None) is not None:
            self._specialise(sample, model_output, history, noise)

    # A plan is a decision about a call signature (and holds a backend's module and compiled
    # programs, which cannot be copied): a copy of something that keeps plans shares them.
    # StableDiffusionPanoramaPipeline deep-copies a scheduler's __dict__ per view, which
    # bypasses the scheduler's own __getstate__.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def _specialise(self, sample, model_output, history, noise) -> None:
        known = reference.hashable_columns(self.constant_columns)
        dtype = reference.compute_dtype(sample, model_output, *history)
        self._step = self.impl.step_program(self.clip, self.clip_range, len(history), reference.noise_kind(noise),
                                            dtype, self.out_dtype, self.history_dtype, self.x0_dtype, known)
        if self.clip == "threshold":
            self._threshold = self.impl.threshold_program(self.threshold_ratio, self.threshold_max,
                                                          tuple(sample.shape[1:]), dtype, known)

    def run(self, sample, model_output, coefficients, history=(), noise=None) -> StepOutputs:
        """The step on tensors of this plan's signature (see :func:`plan_step`)."""
        if type(history) is not tuple:
            history = _history_tuple(history)
        if isinstance(noise, PhiloxNoise):  # its values differ per call
            noise = _check_philox_noise(noise, sample)
        if torch.compiler.is_compiling():
            if torch.is_grad_enabled() and _needs_gradients(sample, model_output, history, noise):
                return self._traced_with_autograd(sample, model_output, coefficients, history, noise)
            return self._traced(sample, model_output, coefficients, history, noise)
        if (self._autograd_plan is not None and torch.is_grad_enabled()
                and _needs_gradients(sample, model_output, history, noise)):
            return self._with_autograd(sample, model_output, coefficients, history, noise)
        step = self._step
        if step is not None:
            scale = x0 = None
            if self._threshold is not None:  # x0 is found once, for the scale and the step
                scale, x0 = self._threshold(sample, model_output, coefficients)
            return StepOutputs(*step(sample, model_output, coefficients, history, noise, scale, x0))
        return self._run_on(self.impl, sample, model_output, coefficients, history, noise)

    def _run_on(self, impl, sample, model_output, coefficients, history, noise) -> StepOutputs:
        """The step through ``impl``'s unspecialised entry points: the thresholding scale, then the step."""
        scale = None
        if self.clip == "threshold":
            scale = impl.threshold_scale(sample, model_output, coefficients, self.threshold_ratio, self.threshold_max,
                                         constant_columns=self.constant_columns)
        return StepOutputs(*impl.fused_step(sample, model_output, coefficients, history, noise, self.clip,
                                            self.clip_range, scale, self.out_dtype, self.history_dtype,
                                            self.x0_dtype, constant_columns=self.constant_columns))

    def _with_autograd(self, sample, model_output, coefficients, history, noise) -> StepOutputs:
        """The step on the torch backend, whose ops autograd records, for inputs that need
        gradients: the compiled kernels have no backward, and their outputs would silently
        carry none. Under ``auto`` the step is handed over; a compiled backend asked for by
        name refuses instead of being replaced."""
        if self._requested != "auto":
            raise _refuses_gradients(self._requested)
        if self._autograd_plan is False:
            self._autograd_plan = StepPlan(
                select_backend(sample.device, (sample.dtype,), "torch"), sample, model_output, history, noise,
                self.clip, self.clip_range, self.threshold_ratio, self.threshold_max, self.out_dtype,
                self.history_dtype, self.x0_dtype, self.constant_columns, "torch")
        return self._autograd_plan.run(sample, model_output, coefficients, history, noise)

    def _traced_with_autograd(self, sample, model_output, coefficients, history, noise) -> StepOutputs:
        """Traced, a step whose inputs need gradients is the reference's torch ops, which the
        compiled graph differentiates (inductor fuses them); the opaque custom op has no
        backward. The same rule as eagerly: a compiled backend asked for by name refuses."""
        requested = requested_backend(self.backend)
        if requested not in ("auto", "torch"):
            raise _refuses_gradients(requested)
        return self._run_on(torch_backend.BACKEND, sample, model_output, coefficients, history, noise)

    def _traced(self, sample, model_output, coefficients, history, noise) -> StepOutputs:
        # One opaque node (see compiled.py): no graph break into backend code.
        noise_tensor, philox_seed, philox_offset, philox_base = compiled.noise_arguments(noise)
        prev, d, x0 = compiled.fused_step_op(
            sample, model_output, coefficients, list(history), noise_tensor, self.clip, self.clip_range,
            self.threshold_ratio, self.threshold_max, self.out_dtype, self.history_dtype, self.x0_dtype, self.backend,
            *compiled.constant_columns_arguments(self.constant_columns), philox_seed, philox_offset, philox_base,
        )
        return StepOutputs(prev, d if self.history_dtype is not None else None,
                           x0 if self.x0_dtype is not None else None)


def _needs_gradients(sample, model_output, history, noise) -> bool:
    """Whether an input of the step requires gradients (the caller checks grad mode)."""
    return (sample.requires_grad or model_output.requires_grad or any(h.requires_grad for h in history)
            or (isinstance(noise, torch.Tensor) and noise.requires_grad))


def _refuses_gradients(requested: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"backend {requested!r} does not propagate gradients, and an input of this step requires them: select "
        "backend 'torch' (or 'auto', which hands such steps to it), or step under torch.no_grad()")


def run_backend(sample, model_output, coefficients, history, noise, clip, clip_range, threshold_ratio, threshold_max,
                out_dtype, history_dtype, x0_dtype, backend, *, constant_columns=None) -> StepOutputs:
    """Select the backend and run the (already validated) step on it."""
    impl = _select(sample, model_output, history, noise, backend)
    return StepPlan(impl, sample, model_output, history, noise, clip, float(clip_range), float(threshold_ratio),
                    float(threshold_max), out_dtype, history_dtype, x0_dtype, constant_columns).run(
        sample, model_output, coefficients, history, noise)


def _tensor_signature(t):
    return (t.shape, t.dtype, t.device)


def _signature(sample, model_output, coefficients, history, noise, clip, clip_range, threshold_ratio, threshold_max,
               out_dtype, history_dtype, x0_dtype, constant_columns, backend):
    """Everything the checks and the backend choice depend on, or None where an argument is
    not of a type whose checks this fully describes (those calls are checked every time).

    Tensors must be plain ``torch.Tensor`` (a subclass may change what its attributes mean);
    ``constant_columns`` is keyed by identity, and the plan keeps the object, so its id is not
    reused while the plan lives; the backend request is read now (set_backend / the
    environment may change between calls).
    """
    Tensor = torch.Tensor
    if type(sample) is not Tensor or type(model_output) is not Tensor or type(coefficients) is not Tensor:
        return None
    if constant_columns is not None and type(constant_columns) is not ConstantColumns:
        return None
    if not history:
        history_key = ()
    elif len(history) == 1 and type(history[0]) is Tensor:
        history_key = _tensor_signature(history[0])
    elif len(history) == 2 and type(history[0]) is Tensor and type(history[1]) is Tensor:
        history_key = (_tensor_signature(history[0]), _tensor_signature(history[1]))
    else:
        return None
    if noise is None:
        noise_key = None
    elif type(noise) is Tensor:
        noise_key = _tensor_signature(noise)
    elif type(noise) is PhiloxNoise:
        noise_key = PhiloxNoise  # checked per call: its seed and offset are values
    else:
        return None
    return (sample.shape, sample.dtype, sample.device, model_output.shape, model_output.dtype, model_output.device,
            coefficients.shape, coefficients.dtype, coefficients.device, history_key, noise_key, clip, clip_range,
            threshold_ratio, threshold_max, out_dtype, history_dtype, x0_dtype, id(constant_columns),
            requested_backend(backend))


class _PlanCache(dict):
    """Signature -> StepPlan, bounded: a process steps with few signatures, but nothing
    stops a caller from cycling through many."""

    capacity = 256

    def store(self, key, plan) -> None:
        if len(self) >= self.capacity:
            self.clear()
        self[key] = plan


_plans = _PlanCache()


from . import compiled  # noqa: E402  (registers fused_sched::fused_step; needs run_backend)
