"""Step-latency measurement shared by ``bench/`` and the ``fused-sched`` command.

A case is (scheduler, config, latent shape, dtype). Each is timed side by side in one run:
diffusers' eager step, the fused class on a given backend, and the torch.compile baseline,
same inputs, same trajectory position, timestep passed as an element of
``scheduler.timesteps`` as pipelines do. Times are host+device wall time per step
(synchronised on CUDA), median and spread over repeats. A case's implementations are
timed in turns (:func:`time_in_turns`), so that a machine whose speed drifts during the run
slows them alike instead of skewing their ratios.

The torch.compile baseline ("compiled" here, ``torch.compile`` in the command's output)
answers "what would plain torch.compile of the same math give you". It is the fused
scheduler's step, unchanged, with its op ``fused_sched.ops.fused_step`` (and
``ops.plan_step``, whose plans the DDIM family keeps) replaced, for the duration of the
measurement, by ``torch.compile`` (inductor, default mode,
``fullgraph=True``, static shapes) of the pure-torch reference: ``ops.reference``'s
``threshold_scale`` (dynamic thresholding only) followed by its ``fused_step``, on the very
tensors the scheduler passes (x, m, the coefficient row it selected, history, noise).
Inductor sees the whole reference math as one graph and generates its own fused kernels
(C++/OpenMP on CPU, Triton on CUDA). The replacement is needed because under torch.compile
the public op deliberately calls an opaque custom op (``ops/compiled.py``), which inductor
cannot see into. So the measured time is the scheduler's Python (row selection, state,
noise draws), the guard check and launch of the compiled graph, and its kernels, the same
work the fused rows time, with only the op differing (the public op's argument checks and
backend dispatch are not in it). Compilation happens in the first call, before timing; its
duration is reported separately. Each case compiles afresh (``torch.compiler.reset``), and
its turns run under the ``fail_on_recompile`` stance, so no timed call compiles or silently
falls back to eager. Before timing, the compiled outputs are checked against the eager
reference on the same inputs. Where any of this fails (no C++ compiler for inductor's CPU
code, an unsupported dtype, a graph break), :class:`BaselineUnavailable` carries the reason.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import gc
import inspect
import platform
import statistics
import time

import diffusers
import torch
import torch._inductor.config

import fused_sched
from fused_sched import ops
from fused_sched.ops import reference

SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, fused_sched.FusedDDIMScheduler, {}),
    "ddim-threshold": (diffusers.DDIMScheduler, fused_sched.FusedDDIMScheduler, {"thresholding": True}),
    "ddim-inverse": (diffusers.DDIMInverseScheduler, fused_sched.FusedDDIMInverseScheduler, {}),
    "dpm++2m": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler, {}),
    "dpm++3m": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler,
                {"solver_order": 3}),
    "dpm++2m-threshold": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler,
                          {"thresholding": True}),
    "sde-dpm++2m": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler,
                    {"algorithm_type": "sde-dpmsolver++"}),
    "cogvideox-ddim": (diffusers.CogVideoXDDIMScheduler, fused_sched.FusedCogVideoXDDIMScheduler,
                       {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                        "rescale_betas_zero_snr": True}),
    "cogvideox-dpm": (diffusers.CogVideoXDPMScheduler, fused_sched.FusedCogVideoXDPMScheduler,
                      {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                       "rescale_betas_zero_snr": True}),
}

SHAPES = {
    "tiny": (1, 4, 8, 8),
    "sd-512": (1, 4, 64, 64),
    "cogvideox-49f": (1, 13, 16, 60, 90),
    "wan-720p": (1, 16, 21, 90, 160),
    "hunyuan-720p": (1, 16, 33, 90, 160),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Timing:
    median_s: float
    spread_s: float  # interquartile range
    samples: int
    compile_s: float | None = None  # the compiled baseline's first call (compilation), not in the samples


class BaselineUnavailable(Exception):
    """The torch.compile baseline cannot run this case; ``str()`` is the reason."""


def device_name(device: torch.device) -> str:
    """What results files name the machine by: the GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stepper(kind: str, scheduler, x: torch.Tensor, m: torch.Tensor, steps_before: int):
    """A zero-argument callable doing one mid-trajectory step; state is reset on each call so
    every repeat measures the same step (same order, same history)."""
    timesteps = scheduler.timesteps
    t = timesteps[steps_before]
    if kind.startswith("cogvideox-dpm"):
        back, old = timesteps[steps_before - 1], m.clone()
        return lambda: scheduler.step(m, old, t, back, x, return_dict=False)
    if kind.startswith("dpm") or kind.startswith("sde-dpm"):
        history = [m.clone() for _ in scheduler.model_outputs]

        def step():
            scheduler._step_index = steps_before
            scheduler.lower_order_nums = scheduler.config.solver_order
            scheduler.model_outputs = list(history)
            return scheduler.step(m, t, x)

        return step
    return lambda: scheduler.step(m, t, x)


def make_step(kind: str, fused: bool, shape, dtype, device, steps: int = 20):
    """The mid-trajectory step of ``kind`` (diffusers' class, or the fused one), as a
    zero-argument callable on fixed random inputs: the same inputs for either class."""
    reference_cls, fused_cls, config = SCHEDULERS[kind]
    scheduler = (fused_cls if fused else reference_cls)(**config)
    scheduler.set_timesteps(steps, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    m = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return stepper(kind, scheduler, x, m, steps // 2)


@dataclasses.dataclass
class Contender:
    """One implementation of a case's step: ``step`` runs it, inside ``turn()`` (the context
    each of its turns needs); ``compile_s`` is the compiled baseline's compilation time."""

    name: str
    step: collections.abc.Callable[[], object]
    turn: collections.abc.Callable[[], contextlib.AbstractContextManager]
    compile_s: float | None = None


def contender(kind: str, which: str, shape, dtype, device, backend: str | None = None, steps: int = 20) -> Contender:
    """The step of ``kind`` for ``which`` = "diffusers", "fused" (on ``backend``, else the
    selected one) or "compiled" (the torch.compile baseline, see the module docstring:
    compiled here, by its first step; raises :class:`BaselineUnavailable` where it does not
    compile). Named ``which``, or the backend for "fused"."""
    if which not in ("diffusers", "fused", "compiled"):
        raise ValueError(f"which={which!r}; expected 'diffusers', 'fused' or 'compiled'")
    step = make_step(kind, which != "diffusers", shape, dtype, device, steps)
    if which == "diffusers":
        return Contender("diffusers", step, contextlib.nullcontext)
    if which == "fused":
        turn = (lambda: ops.use_backend(backend)) if backend else contextlib.nullcontext
        return Contender(backend or "fused", step, turn)
    with compiled_reference() as op:
        compile_s = compile_step(step, op, device)

    @contextlib.contextmanager
    def compiled_turn():
        # The op compiled above stands in again; a call that would recompile raises.
        with _op_replaced(op, op.plan), no_recompiles():
            yield

    gc.collect()  # compilation's garbage, not collected during another contender's turn
    return Contender("compiled", step, compiled_turn, compile_s)


# Rounds of turns that time_in_turns gives a case's contenders: even, so that every
# contender's mean place in the order is the same.
ROUNDS = 6


def time_in_turns(contenders, device, repeats: int = 50, warmup: int = 5, rounds: int = ROUNDS,
                  progress=None) -> dict:
    """{name: Timing, or the exception its step raised} for the contenders of one case, timed
    in turns: ``rounds`` rounds in which each contender takes one untimed step and then its
    share of the ``repeats`` timed ones, in the given order in even rounds and reversed in
    odd ones (A B C, C B A, ...: a steady drift then moves every contender's samples alike
    over an even number of rounds). A machine whose speed drifts (a shared VM's copy
    bandwidth moved 8-48 GB/s between runs, diffusers' medians 2x) then slows every
    contender alike, where timing one after the other put the drift into their ratios. A
    contender whose step raises is dropped from later turns; the compiled baseline's
    exception becomes :class:`BaselineUnavailable`. ``progress()`` is called after each
    round."""
    rounds = max(1, min(rounds, repeats))
    prime_host_allocator()
    results = {c.name: [] for c in contenders}
    live = list(contenders)
    for c in list(live):  # warm-up, as a pipeline's first steps
        try:
            with c.turn():
                _warm_up(c.step, device, warmup)
        except Exception as error:
            results[c.name] = _turn_error(c, error)
            live.remove(c)
    for r in range(rounds):
        share = repeats // rounds + (1 if r < repeats % rounds else 0)
        for c in (live if r % 2 == 0 else live[::-1]):
            try:
                with c.turn():
                    c.step()
                    _synchronize(device)
                    results[c.name] += _samples(c.step, device, share)
            except Exception as error:
                results[c.name] = _turn_error(c, error)
        live = [c for c in live if isinstance(results[c.name], list)]
        if progress is not None:
            progress()
    timings = {}
    for c in contenders:
        samples = results[c.name]
        if not isinstance(samples, list):
            timings[c.name] = samples
            continue
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
        timings[c.name] = Timing(statistics.median(samples), quartiles[2] - quartiles[0], len(samples), c.compile_s)
    return timings


def _turn_error(c: Contender, error: Exception) -> Exception:
    if c.name == "compiled" and not isinstance(error, BaselineUnavailable):
        return BaselineUnavailable(f"torch.compile failed after compiling: {error_summary(error)}")
    return error


# glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


def prime_host_allocator() -> None:
    """Puts glibc's malloc in the state a pipeline's has: allocations below 32 MiB served from
    its heap, not from fresh mappings.

    glibc maps every allocation above its mmap threshold afresh (128 KiB at start) and so
    page-faults it on first touch; freeing a mapped chunk raises the threshold to that
    chunk's size, up to 32 MiB. In a pipeline the model's freed activations have long done
    so (and raised the trim threshold, twice it, with it). In a bench process nothing had:
    on the CogVideoX latent diffusers' DDIM step page-faulted up to 5,421 times per step
    (the count depends on the address-space layout; 0 to 439 primed) and the fused cpu step
    up to 2,162; diffusers' step took 2.9 ms instead of 2.0 ms, and which implementation
    paid how much depended on what ran before it.
    Freeing one mapped chunk of just under 32 MiB raises the threshold for the rest of the
    process; nothing changes elsewhere (CUDA tensors use torch's caching allocator; other C
    libraries)."""
    chunk = torch.empty(GLIBC_MMAP_THRESHOLD_MAX // 4 - 2**12, dtype=torch.float32)  # never touched: no faults
    del chunk


# A GPU idles at a low clock: warm up for this long at least, not only `warmup` steps
# (GPU_SPIN_UP_S before a run's first measurement, from idle).
CUDA_WARMUP_S = 0.1
GPU_SPIN_UP_S = 0.3


def _warm_up(step, device, warmup: int, minimum_s: float = CUDA_WARMUP_S) -> None:
    start = time.perf_counter()
    minimum = minimum_s if device.type == "cuda" else 0.0
    done = 0
    while done < warmup or time.perf_counter() - start < minimum:
        step()
        done += 1
    _synchronize(device)


# Bytes written before each timed step on a GPU (outside its time) to evict the step's data
# from L2 (50-60 MB on Hopper): in a pipeline the model's forward pass has evicted the
# latent before the scheduler steps, and warm data would time a multi-pass step (diffusers')
# at L2 speed, judged against an HBM copy roofline.
L2_EVICTION_BYTES = 256 * 2**20
_eviction_buffers: dict[torch.device, torch.Tensor] = {}


def _evict_l2(device: torch.device) -> None:
    if device.type != "cuda":
        return  # the CPU numbers on record were measured warm; a CPU's caches are a pipeline's too
    buffer = _eviction_buffers.get(device)
    if buffer is None:
        buffer = _eviction_buffers[device] = torch.empty(L2_EVICTION_BYTES, dtype=torch.uint8, device=device)
    buffer.zero_()


def _samples(step, device, count: int) -> list[float]:
    """Wall time of ``count`` steps, each with a device synchronize, each on a GPU after its
    data was evicted from L2 (``_evict_l2``, untimed)."""
    samples = []
    for _ in range(count):
        _evict_l2(device)
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


# --- the torch.compile baseline --------------------------------------------------------------

COMPILE_BACKEND = "inductor"  # torch.compile's backend for the baseline (tests swap in a failing one)


def _reference_step(options: dict):
    """The reference op with its non-tensor arguments fixed: what torch.compile compiles.
    ``options`` are the public op's non-tensor arguments; those the reference's
    ``fused_step`` takes by name (including any it gains later) are passed on."""
    taken = inspect.signature(reference.fused_step).parameters
    fixed = {name: value for name, value in options.items() if name in taken}
    clip, ratio, max_value = options["clip"], options["threshold_ratio"], options["threshold_max"]

    def step(sample, model_output, coefficients, history, noise):
        scale = None
        if clip == "threshold":
            scale = reference.threshold_scale(sample, model_output, coefficients, ratio, max_value)
        return reference.fused_step(sample, model_output, coefficients, history, noise, scale=scale, **fixed)

    return step


class CompiledReferenceOp:
    """Stands in for ``fused_sched.ops.fused_step`` (same arguments, same outputs): runs the step
    as ``torch.compile`` of the reference, compiled once per combination of non-tensor
    arguments. The first call of each combination also checks the compiled outputs against the
    eager reference on the same inputs. ``calls`` counts calls, so a scheduler that no longer
    goes through ``ops.fused_step`` is noticed instead of timed as something else.

    Per call it adds one dictionary look-up to the compiled graph's own call (a few
    microseconds); argument binding and checks happen once per combination."""

    _TENSORS = ("sample", "model_output", "coefficients", "history", "noise")
    _PER_CALL = frozenset(("history", "noise", "backend"))  # not part of the compiled variant's key

    def __init__(self, public_op, backend="inductor"):
        self.backend = backend
        self.calls = 0
        self._signature = inspect.signature(public_op)
        self._compiled = {}
        self._kept = []  # non-hashable option values keyed by id stay alive, so ids stay unique
        # the public op's non-tensor arguments the stand-in can honour: the reference's, the
        # thresholding parameters, and backend (meaningless here: the reference is the backend)
        known = set(inspect.signature(reference.fused_step).parameters) | {"threshold_ratio", "threshold_max"}
        self._unknown = {name: p.default for name, p in self._signature.parameters.items()
                         if name not in known and name not in self._TENSORS and name != "backend"}

    def plan(self, sample, model_output, coefficients, **kwargs) -> "_CompiledPlan":
        """Stands in for ``ops.plan_step``, which the DDIM family calls (and keeps the plan)."""
        return _CompiledPlan(self, {name: v for name, v in kwargs.items() if name not in ("history", "noise")})

    def __call__(self, sample, model_output, coefficients, **kwargs):
        self.calls += 1
        key = tuple((name, value if value.__hash__ is not None else id(value))
                    for name, value in kwargs.items() if name not in self._PER_CALL)
        compiled = self._compiled.get(key)
        if compiled is None:
            return self._compile(key, sample, model_output, coefficients, kwargs)
        history = tuple(kwargs.get("history", ()))
        return ops.StepOutputs(*compiled(sample, model_output, coefficients, history, kwargs.get("noise")))

    def _compile(self, key, sample, model_output, coefficients, kwargs):
        bound = self._signature.bind(sample, model_output, coefficients, **kwargs)
        bound.apply_defaults()
        options = dict(bound.arguments)
        for name in self._TENSORS:
            options.pop(name)
        options.pop("backend", None)
        for name, default in self._unknown.items():
            if options.pop(name) is not default:
                raise BaselineUnavailable(f"ops.fused_step was called with {name}=, which the reference "
                                          "(ops/reference.py) does not take")
        if options["out_dtype"] is None:
            options["out_dtype"] = torch.promote_types(sample.dtype, model_output.dtype)
        options = {name: dict(v) if isinstance(v, collections.abc.Mapping) else v for name, v in options.items()}
        arguments = (sample, model_output, coefficients, tuple(kwargs.get("history", ())), kwargs.get("noise"))
        compiled = torch.compile(_reference_step(options), backend=self.backend, fullgraph=True, dynamic=False)
        outputs = compiled(*arguments)
        _check_against_eager(outputs, _reference_step(options)(*arguments))
        self._kept.append(kwargs)
        self._compiled[key] = compiled
        return ops.StepOutputs(*outputs)


class _CompiledPlan:
    """``ops.StepPlan``'s ``run`` on the compiled reference: the options fixed, the tensors per call."""

    def __init__(self, op: CompiledReferenceOp, options: dict):
        self.op, self.options = op, options

    def run(self, sample, model_output, coefficients, history=(), noise=None):
        return self.op(sample, model_output, coefficients, history=history, noise=noise, **self.options)


def _check_against_eager(compiled, eager) -> None:
    for name, got, want in zip(("prev_sample", "history value", "x0"), compiled, eager):
        if want is None:
            continue
        want64, got64 = want.double(), got.double()
        scale = float(want64.abs().max()) if want64.numel() else 0.0
        # a different evaluation order and FMA contraction move the result by a few rounding steps
        tolerance = max(1e-4, 2 * torch.finfo(want.dtype).eps) * max(scale, 1e-30)
        nan_mismatch = bool((torch.isnan(got64) != torch.isnan(want64)).any())
        error = float((got64 - want64).nan_to_num(0.0, 0.0, 0.0).abs().max()) if want64.numel() else 0.0
        if nan_mismatch or got.dtype != want.dtype or not error <= tolerance:
            raise BaselineUnavailable(
                f"torch.compile of the reference gives a different {name} than the eager reference "
                f"(max abs difference {error:.3g}, tolerance {tolerance:.3g}, NaN mismatch {nan_mismatch})")


@contextlib.contextmanager
def compiled_reference(backend=None):
    """While active, ``fused_sched.ops.fused_step`` (which every fused scheduler calls, or its
    ``ops.plan_step``, whose plan the DDIM family keeps per schedule) is a
    :class:`CompiledReferenceOp`; the previous compiled state is reset on entry so this case
    compiles afresh. A plan a scheduler made before entering is not replaced: use a scheduler
    with a fresh schedule (``op.calls`` shows whether the stand-in ran). ``backend``:
    torch.compile's backend, default :data:`COMPILE_BACKEND`. Yields the stand-in."""
    torch.compiler.reset()
    backend = COMPILE_BACKEND if backend is None else backend
    op = CompiledReferenceOp(ops.fused_step, backend)
    # In-process compilation: inductor's pool of compile workers would otherwise keep
    # starting up in the background and slow the next timed case on a small machine.
    with _op_replaced(op, op.plan), torch._inductor.config.patch(compile_threads=1):
        yield op


@contextlib.contextmanager
def _op_replaced(fused_step, plan_step):
    """``ops.fused_step`` and ``ops.plan_step``, which the schedulers call through the module,
    replaced while active."""
    original, original_plan = ops.fused_step, ops.plan_step
    ops.fused_step, ops.plan_step = fused_step, plan_step
    try:
        yield
    finally:
        ops.fused_step, ops.plan_step = original, original_plan


def compile_step(step, op: CompiledReferenceOp, device) -> float:
    """Runs ``step`` once under :func:`compiled_reference` (this compiles) and returns the
    seconds it took; raises :class:`BaselineUnavailable` with the reason where it fails."""
    start = time.perf_counter()
    try:
        step()
        _synchronize(device)
    except BaselineUnavailable:
        raise
    except Exception as error:
        raise BaselineUnavailable(f"torch.compile failed: {error_summary(error)}") from error
    if op.calls == 0:
        raise BaselineUnavailable("the fused scheduler's step did not call fused_sched.ops.fused_step, "
                                  "so there is no op to replace with the compiled reference")
    return time.perf_counter() - start


def no_recompiles():
    """Context in which a compiled function that would recompile raises instead (torch >= 2.6;
    a no-op before): a timed call never compiles, nor falls back to eager at the recompile limit."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("fail_on_recompile") if set_stance is not None else contextlib.nullcontext()


def error_summary(error: BaseException, limit: int = 200) -> str:
    """One line for a table cell: the exception type and the first non-empty line of its message
    (inductor wraps the underlying error, e.g. a C++ compiler failure, in a long report)."""
    while getattr(error, "inner_exception", None) is not None:  # BackendCompilerFailed, InductorError
        error = error.inner_exception
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bytes_per_step(kind: str, shape, dtype, device=torch.device("cpu"), steps: int = 20) -> int:
    """The least a fused step of ``kind`` must move: every tensor its op reads (x, m, history
    values, a noise tensor) and writes (its outputs) once, each at its own dtype, plus, with
    dynamic thresholding, x and m once more (the quantile must be known before any output
    is written). Counted from the op's arguments and outputs in one real step (on the torch
    backend: the tensors do not depend on the backend), so mixed dtypes, an fp32 noise
    tensor and history values are counted as they are.

    It is a floor, the same for every row of a case: a radix selection reads x and m more
    often (Triton in 4 passes, cuda in 3), so a thresholded row's "% copy" also shows what
    the extra passes cost. Noise a scheduler draws into a tensor (``randn``) before the op
    is not counted: that is the work in-kernel noise avoids."""
    with recorded_op_traffic() as traffic, ops.use_backend("torch"):
        make_step(kind, True, shape, dtype, device, steps)()
    if not traffic:
        raise RuntimeError(f"the fused {kind} step did not call fused_sched.ops: nothing to count")
    return sum(traffic)


def op_bytes(sample, model_output, history, noise, clip, outputs) -> int:
    """Bytes one call of the op reads and writes at the least (see :func:`bytes_per_step`)."""
    read = [sample, model_output, *history]
    if isinstance(noise, torch.Tensor):
        read.append(noise)
    if clip == "threshold":
        read += [sample, model_output]
    return sum(t.nbytes for t in read) + sum(t.nbytes for t in outputs if t is not None)


@contextlib.contextmanager
def recorded_op_traffic():
    """While active, every call of ``ops.fused_step``, and every ``run`` of a plan made by
    ``ops.plan_step``, appends :func:`op_bytes` of the call to the yielded list. A plan made
    before entering is not recorded: use a scheduler with a fresh schedule."""
    original, original_plan = ops.fused_step, ops.plan_step
    traffic = []

    def fused_step(sample, model_output, coefficients, *, history=(), noise=None, clip="none", **options):
        outputs = original(sample, model_output, coefficients, history=history, noise=noise, clip=clip, **options)
        traffic.append(op_bytes(sample, model_output, history, noise, clip, outputs))
        return outputs

    def plan_step(sample, model_output, coefficients, *, clip="none", **options):
        return _RecordedPlan(original_plan(sample, model_output, coefficients, clip=clip, **options), clip, traffic)

    with _op_replaced(fused_step, plan_step):
        yield traffic


class _RecordedPlan:
    """A plan whose runs :func:`recorded_op_traffic` counts."""

    def __init__(self, plan, clip, traffic):
        self.plan, self.clip, self.traffic = plan, clip, traffic

    def run(self, sample, model_output, coefficients, history=(), noise=None):
        outputs = self.plan.run(sample, model_output, coefficients, history, noise)
        self.traffic.append(op_bytes(sample, model_output, history, noise, self.clip, outputs))
        return outputs


def copy_bandwidth(device: torch.device, megabytes: int | None = None, repeats: int | None = None) -> float:
    """Bytes/s of a device-to-device copy (read + write), measured now: the roofline a
    memory-bound step is judged against. A GPU is first kept copying for GPU_SPIN_UP_S
    seconds at least: it idles at a fraction of its clock (an H200 at 345 of 1980 MHz)."""
    if megabytes is None:
        megabytes = 1024 if device.type == "cuda" else 64
    if repeats is None:
        repeats = 50 if device.type == "cuda" else 10
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    _warm_up(lambda: target.copy_(source), device, 1, GPU_SPIN_UP_S)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / statistics.median(samples)
