"""Run a diffusers scheduler and its fused counterpart side by side over whole trajectories,
with the contractive stand-in model of ``fused_sched.verify`` (a difference that grows along
a trajectory is then a difference in the step, not in the dynamics)."""

from __future__ import annotations

import dataclasses

import diffusers
import torch

import fused_sched
from fused_sched import verify

CPU = torch.device("cpu")

PAIRS = {
    "ddim": (diffusers.DDIMScheduler, fused_sched.FusedDDIMScheduler),
    "ddim_inverse": (diffusers.DDIMInverseScheduler, fused_sched.FusedDDIMInverseScheduler),
    "dpm": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler),
    "dpm_inverse": (diffusers.DPMSolverMultistepInverseScheduler, fused_sched.FusedDPMSolverMultistepInverseScheduler),
    "cogvideox_ddim": (diffusers.CogVideoXDDIMScheduler, fused_sched.FusedCogVideoXDDIMScheduler),
    "cogvideox_dpm": (diffusers.CogVideoXDPMScheduler, fused_sched.FusedCogVideoXDPMScheduler),
}


def stand_in_model(x: torch.Tensor, t, pattern: torch.Tensor, out_channels_factor: int = 1) -> torch.Tensor:
    m = verify.stand_in_model(x, t, pattern)
    if out_channels_factor > 1:  # learned variance: the model also predicts a variance channel block
        m = torch.cat([m, 0.5 * m], dim=1)
    return m


@dataclasses.dataclass
class StepArgs:
    """Per-call step options (DDIM's eta family, SDE noise source)."""

    eta: float = 0.0
    use_clipped_model_output: bool = False
    # "generator" | "variance_noise" | "float32_variance_noise": the generator's float32
    # draws handed over as variance_noise in the data's dtype, so that a float64 oracle run
    # sees the very noise values a float32 run drew (a float64 draw would give others)
    noise: str = "generator"
    seed: int = 0


def public_config(config) -> dict:
    """A scheduler config without diffusers' bookkeeping keys (``_class_name``, ``_use_default_values``, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def make_pair(kind: str, config: dict):
    reference_cls, fused_cls = PAIRS[kind]
    return reference_cls(**config), fused_cls(**config)


def _step(kind, scheduler, m, t, x, i, timesteps, state, args: StepArgs, generator, dtype_noise):
    if kind == "ddim":
        kwargs = dict(eta=args.eta, use_clipped_model_output=args.use_clipped_model_output)
        if args.eta > 0:
            if args.noise in ("variance_noise", "float32_variance_noise"):
                draw_dtype = torch.float32 if args.noise == "float32_variance_noise" else m.dtype
                kwargs["variance_noise"] = torch.randn(m.shape, generator=generator, dtype=draw_dtype).to(m)
            else:
                kwargs["generator"] = generator
        out = scheduler.step(m, t, x, **kwargs)
        return out.prev_sample, out.pred_original_sample
    if kind in ("ddim_inverse", "cogvideox_ddim"):
        out = scheduler.step(m, t, x)
        return out.prev_sample, out.pred_original_sample
    if kind in ("dpm", "dpm_inverse"):
        kwargs = {}
        if scheduler.config.algorithm_type.startswith("sde"):
            if args.noise in ("variance_noise", "float32_variance_noise"):
                draw_dtype = torch.float32 if args.noise == "float32_variance_noise" else dtype_noise
                kwargs["variance_noise"] = torch.randn(x.shape, generator=generator, dtype=draw_dtype).to(x.device)
            else:
                kwargs["generator"] = generator
        return scheduler.step(m, t, x, **kwargs)[0], None
    if kind == "cogvideox_dpm":
        back = timesteps[i - 1] if i > 0 else None
        prev, x0 = scheduler.step(m, state.get("old"), t, back, x, generator=generator, return_dict=False)
        state["old"] = x0
        return prev, x0
    raise ValueError(kind)


def _initial_state(kind, config, shape, dtype, device):
    """x_T and the stand-in model's pattern, drawn on the CPU: the same values on every device."""
    init = torch.Generator().manual_seed(1234)
    x = torch.randn(shape, generator=init).to(dtype).to(device)
    pattern = torch.randn(shape, generator=init).to(device)
    learned = kind.startswith("dpm") and config.get("variance_type") in ("learned", "learned_range")
    factor = 2 if learned and config.get("prediction_type", "epsilon") == "epsilon" else 1
    return x, pattern, factor


def _set_timesteps(scheduler, n, set_kwargs, device):
    """As pipelines call it: the schedule on the data's device."""
    if "timesteps" in set_kwargs:
        scheduler.set_timesteps(device=device, **set_kwargs)
    else:
        scheduler.set_timesteps(n, device=device, **set_kwargs)


def float64_oracle(kind, config):
    """diffusers' own scheduler of ``kind``, whose ``set_timesteps`` leaves its schedule in
    float64 (``verify.in_float64``): fed float64 tensors, its step is a float64 evaluation
    that shares nothing with the fused tables, the truth the float64 contract judges by."""
    scheduler = PAIRS[kind][0](**config)
    set_timesteps = scheduler.set_timesteps

    def set_timesteps_in_float64(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        verify.in_float64(scheduler)

    scheduler.set_timesteps = set_timesteps_in_float64
    return scheduler


def run_trajectory(kind, scheduler, config, n, shape=(2, 4, 8, 8), dtype=torch.float32, args=None,
                   set_kwargs=None, start_at_first_step=False, device=CPU):
    """[(prev, x0)] per step from a fixed x_T, stand-in model and noise seed, with data on
    ``device``; stops at the first exception and returns it as the second element (None if
    the trajectory completed)."""
    args = args or StepArgs()
    outputs = []
    try:
        _set_timesteps(scheduler, n, set_kwargs or {}, device)
        if start_at_first_step:
            scheduler._step_index = 0  # what set_begin_index(0) does, for classes without it
        x, pattern, factor = _initial_state(kind, config, shape, dtype, device)
        generator, state = torch.Generator().manual_seed(args.seed), {}
        for i, t in enumerate(scheduler.timesteps):
            m = stand_in_model(x, t, pattern, factor).to(dtype)
            prev, x0 = _step(kind, scheduler, m, t, x, i, scheduler.timesteps, state, args, generator, torch.float32)
            outputs.append((prev, x0))
            x = prev
    except Exception as error:  # the caller judges whose failure it is and whether it is allowed
        return outputs, error
    return outputs, None


MULTISTEP = ("dpm", "dpm_inverse")


def trajectories(kind, config, num_inference_steps, shape=(2, 4, 8, 8), dtype=torch.float32, args=None,
                 set_kwargs=None, device=CPU, oracle=False, start_at_first_step=False, share_history=False):
    """Teacher-forced steps: both classes get diffusers' sample and the same model output at
    every step, which isolates each step's own error. Returns (reference, fused, results),
    results[i] = ((prev, x0) of diffusers, (prev, x0) of fused, (x, m), truth, history),
    where truth is, with ``oracle``, the float64 evaluation of the same step from the same
    inputs (diffusers' own step in float64, ``float64_oracle``, given the float32 runs' noise
    values), else None. ``start_at_first_step``: diffusers starts at step 0 (see ``run_trajectory``).

    ``share_history`` (multistep DPM-Solver): before each step the fused and float64
    schedulers also get diffusers' history (the latter its float64 upcast), so a step is
    judged from identical inputs, history included (a third-order step can weight its history
    by ~100, and each scheduler's own rounding of it would decide a comparison); history is
    then the history value each scheduler stored at this step [diffusers, fused, truth or
    None], judged like the step's outputs. Else history is None."""
    args = args or StepArgs()
    reference, fused = make_pair(kind, config)
    schedulers = [reference, fused] + ([float64_oracle(kind, config)] if oracle else [])
    for scheduler in schedulers:
        _set_timesteps(scheduler, num_inference_steps, set_kwargs or {}, device)
    if start_at_first_step:
        reference._step_index = 0
        if oracle:
            schedulers[2]._step_index = 0
    x, pattern, factor = _initial_state(kind, config, shape, dtype, device)
    gens = [torch.Generator().manual_seed(args.seed) for _ in schedulers]
    states = [{} for _ in schedulers]
    oracle_args = dataclasses.replace(args, noise="float32_variance_noise")  # ignored by steps drawing their own
    results = []
    for i, t in enumerate(reference.timesteps):
        m = stand_in_model(x, t, pattern, factor).to(dtype)
        ref = _step(kind, reference, m, t, x, i, reference.timesteps, states[0], args, gens[0], torch.float32)
        out = _step(kind, fused, m, fused.timesteps[i], x, i, fused.timesteps, states[1], args, gens[1],
                    torch.float32)
        truth = None
        if oracle:
            exact = schedulers[2]
            truth = _step(kind, exact, m.double(), exact.timesteps[i], x.double(), i, exact.timesteps, states[2],
                          oracle_args, gens[2], torch.float32)
        history = None
        if share_history and kind in MULTISTEP:
            history = share_reference_history(schedulers) + [None] * (3 - len(schedulers))
        results.append((ref, out, (x, m), truth, history))
        x = ref[0]
    return reference, fused, results


def share_reference_history(schedulers) -> list:
    """[diffusers, fused, float64 oracle (optional)] multistep schedulers after a step: the
    history value each stored; then the others get diffusers' history (the oracle its
    float64 upcast), so that the next step starts from identical inputs."""
    stored = [s.model_outputs[-1] for s in schedulers]
    shared = schedulers[0].model_outputs
    for j, s in enumerate(schedulers[1:], start=1):
        s.model_outputs = [None if h is None else h.double() if j == 2 else h.clone() for h in shared]
    return stored


def bit_pattern(t: torch.Tensor) -> torch.Tensor:
    """The float tensor's bits as integers, every NaN made one pattern (payloads are not
    compared): torch.equal on these is equality bit for bit, NaN included."""
    integer = {torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype]
    return torch.where(torch.isnan(t), float("nan"), t).view(integer)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().double()
    return float((a.double() - b.double()).abs().max() / max(scale, 1e-30))


# How close a fused result must be to diffusers', relative to the largest magnitude of
# diffusers' value (``relative_error``):
# - one step from identical inputs: the two float32 evaluations differ by their own rounding,
#   a few ulps (2**-23 = 1.2e-7) of the largest term, with margin;
STEP_TOLERANCE = 1e-5
# - a trajectory of up to ~25 steps on the contractive stand-in model (fused_sched.verify),
#   each step from its own previous result: every step's rounding carried along, not amplified.
TRAJECTORY_TOLERANCE = 1e-4


def assert_close_to_diffusers(got: torch.Tensor, expected: torch.Tensor, tolerance: float = STEP_TOLERANCE,
                              what: str = "") -> None:
    """``got`` has ``expected``'s shape and dtype and is within ``tolerance`` of it."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.shape, got.dtype, expected.dtype)
    error = relative_error(got, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} above {tolerance:g}"


def record_calls(monkeypatch, obj, attributes) -> list[str]:
    """Wrap ``obj``'s methods so each call appends its name to the returned list: proves
    which backend code actually ran."""
    calls = []
    for attr in attributes:
        original = getattr(obj, attr)

        def spy(*args, _original=original, _attr=attr, **kwargs):
            calls.append(_attr)
            return _original(*args, **kwargs)

        monkeypatch.setattr(obj, attr, spy)
    return calls


def quantile_rows(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    """Three rows of ``n`` values of one kind, for checking thresholding against torch.quantile."""
    if name == "random":
        return torch.randn(3, n, generator=g) * 4
    if name == "wide_range":  # every exponent digit in play, subnormals included
        return torch.randn(3, n, generator=g) * torch.exp2(torch.randint(-140, 120, (3, n), generator=g).float())
    if name == "ties":
        return torch.randint(-4, 5, (3, n), generator=g).float() * 1.5
    if name == "above_one":  # every |value| >= 1: clamp(min=1) hides no order statistic, low ones included
        r = torch.randn(3, n, generator=g)
        return torch.where(r < 0, -1.0, 1.0) * (1.0 + 4.0 * r.abs())
    if name == "constant":
        return torch.full((3, n), -2.75)
    if name == "nan":
        x = torch.randn(3, n, generator=g) * 4
        x[1, n // 2] = float("nan")
        return x
    if name == "signed_zeros":
        x = torch.zeros(3, n)
        x[:, ::2] = -0.0
        x[2, -1] = 7.0
        return x
    if name == "inf":
        x = torch.randn(3, n, generator=g) * 4
        x[0, 0] = float("inf")
        x[2, :] = float("-inf")
        return x
    raise ValueError(name)
