"""How far each fused step lands from a float64 evaluation, against diffusers' own step.

DESIGN.md's numerical contract: a fused result is no farther from a float64 evaluation of
the same formulas than diffusers' eager result is, plus one ulp of the storage dtype. This
survey measures it over the option space of the DPM-Solver and DDIM schedulers, step by
step (teacher forcing): every step of diffusers' float32 trajectory is evaluated three ways
from the same sample, model output and multistep history,

- diffusers' step in float32,
- the fused class's step in float32 (``--backend``),
- diffusers' own step on float64 inputs with its schedule (the float32 values it stores:
  ``sigmas``, ``alphas_cumprod``) cast to float64, so that every scalar it forms is float64:
  a float64 evaluation that shares nothing with the fused tables.

The distance of an output y is max|y - y64| / max|y64|, for the prev sample and the value
the step stores (DPM's history value, DDIM's x0). A configuration's ratio is its worst
step's fused distance over (diffusers' distance + 2**-23); above 1 it breaks the contract.

    python bench/float64_distance.py [--backend torch] [--json out.json] [--family dpm|ddim]

Slow on purpose (about 1,800 trajectories of 8-25 steps; about 20 minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
import warnings

import diffusers
import torch

import fused_sched
from fused_sched import ops, verify

FLOAT32_ULP = 2.0**-23
SHAPE = (2, 4, 8, 8)


def distance(value: torch.Tensor, exact: torch.Tensor) -> float:
    return float((value.double() - exact).abs().max() / exact.abs().max().clamp(min=1e-30))


def _dpm_configs():
    for algorithm, prediction, beta, sigmas, zero_snr, thresholding, order in itertools.product(
            ("dpmsolver++", "dpmsolver"), ("epsilon", "v_prediction", "sample"),
            ("squaredcos_cap_v2", "linear", "scaled_linear"), ("beta", "karras", "exponential", None),
            (False, True), (False, True), (2, 3)):
        config = dict(algorithm_type=algorithm, prediction_type=prediction, beta_schedule=beta,
                      rescale_betas_zero_snr=zero_snr, final_sigmas_type="zero" if zero_snr else "sigma_min",
                      thresholding=thresholding, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                      solver_order=order)
        if sigmas:
            config[f"use_{sigmas}_sigmas"] = True
        for n in (8, 20):
            yield config, n, {}


def _ddim_configs():
    for prediction, beta, clip, zero_snr, eta, clipped, spacing in itertools.product(
            ("epsilon", "v_prediction", "sample"), ("squaredcos_cap_v2", "linear", "scaled_linear"),
            (False, True), (False, True), (0.0, 1.0), (False, True), ("leading", "trailing")):
        config = dict(prediction_type=prediction, beta_schedule=beta, clip_sample=clip,
                      rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing)
        for n in (10, 25):
            yield config, n, dict(eta=eta, use_clipped_model_output=clipped)


FAMILIES = {
    "dpm": (diffusers.DPMSolverMultistepScheduler, fused_sched.FusedDPMSolverMultistepScheduler, _dpm_configs),
    "ddim": (diffusers.DDIMScheduler, fused_sched.FusedDDIMScheduler, _ddim_configs),
}


def _in_float64(scheduler) -> None:
    """diffusers' scheduler with its schedule cast to float64 (after set_timesteps)."""
    if isinstance(scheduler, diffusers.DPMSolverMultistepScheduler):
        scheduler.sigmas = scheduler.sigmas.double()
    else:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod).double()


def _stored(scheduler, output):
    """The value a step stores for later: DPM's history value, DDIM's x0."""
    if hasattr(scheduler, "model_outputs"):
        return scheduler.model_outputs[-1]
    return output.pred_original_sample


def survey_trajectory(family: str, config: dict, n: int, step_kwargs: dict, backend: str) -> dict:
    """The worst step of one configuration: its ratio and the distances behind it."""
    reference_cls, fused_cls, _ = FAMILIES[family]
    reference, exact, fused = reference_cls(**config), reference_cls(**config), fused_cls(**config)
    for scheduler in (reference, exact, fused):
        scheduler.set_timesteps(n)
    _in_float64(exact)
    multistep = hasattr(reference, "model_outputs")
    if multistep and len(set(reference.timesteps.tolist())) < n:
        reference._step_index = exact._step_index = 0  # diffusers' lookup would skip the repeated first timestep
    g = torch.Generator().manual_seed(0)
    x, pattern = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    worst = dict(ratio=0.0)
    for i, t in enumerate(reference.timesteps):
        m = verify.stand_in_model(x, t, pattern)
        noise = torch.randn(SHAPE, generator=g) if step_kwargs.get("eta") else None

        def arguments(variance_noise):
            return step_kwargs if variance_noise is None else dict(step_kwargs, variance_noise=variance_noise)

        if multistep:  # the same history for all three: each step is judged on its own
            fused.model_outputs = [None if h is None else h.clone() for h in reference.model_outputs]
            exact.model_outputs = [None if h is None else h.double() for h in reference.model_outputs]
        ref_out = reference.step(m, t, x, **arguments(noise))
        exact_out = exact.step(m.double(), t, x.double(), **arguments(None if noise is None else noise.double()))
        with ops.use_backend(backend):
            fused_out = fused.step(m, fused.timesteps[i], x, **arguments(noise))
        for name, ref_value, fused_value, exact_value in (
                ("prev", ref_out.prev_sample, fused_out.prev_sample, exact_out.prev_sample),
                ("stored", _stored(reference, ref_out), _stored(fused, fused_out), _stored(exact, exact_out))):
            if not torch.isfinite(exact_value).all():
                continue
            ref_distance, fused_distance = distance(ref_value, exact_value), distance(fused_value, exact_value)
            ratio = fused_distance / (ref_distance + FLOAT32_ULP)
            if ratio > worst["ratio"]:
                worst = dict(ratio=ratio, step=i, output=name, diffusers=ref_distance, fused=fused_distance)
        x = ref_out.prev_sample
    return worst


def survey(family: str, backend: str) -> list[dict]:
    rows = []
    for config, n, step_kwargs in FAMILIES[family][2]():
        try:
            worst = survey_trajectory(family, config, n, step_kwargs, backend)
        except Exception as error:  # a configuration either class refuses or breaks on: not a step to judge
            rows.append(dict(family=family, config=config, n=n, step_kwargs=step_kwargs, skipped=repr(error)[:200]))
            continue
        rows.append(dict(family=family, config=config, n=n, step_kwargs=step_kwargs, **worst))
    return rows


def summary(rows: list[dict]) -> dict:
    judged = [r for r in rows if "ratio" in r]
    return dict(configurations=len(judged), skipped=len(rows) - len(judged),
                above_1=sum(r["ratio"] > 1 for r in judged), above_2=sum(r["ratio"] > 2 for r in judged),
                worst=max((r["ratio"] for r in judged), default=None))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = {}
    for family in args.family or sorted(FAMILIES):
        rows = survey(family, args.backend)
        results[family] = dict(summary=summary(rows), rows=rows)
        print(family, results[family]["summary"], flush=True)
        for row in sorted((r for r in rows if r.get("ratio", 0) > 1), key=lambda r: -r["ratio"])[:15]:
            print(f"  {row['ratio']:6.2f}  step {row['step']:2d} {row['output']:6s} diffusers {row['diffusers']:.2e} "
                  f"fused {row['fused']:.2e}  n={row['n']} {row['config']} {row['step_kwargs'] or ''}")
    if args.json:
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    backend=args.backend, torch=torch.__version__, diffusers=diffusers.__version__,
                    fused_sched=fused_sched.__version__, python=platform.python_version(), shape=SHAPE)
        with open(args.json, "w") as out:
            json.dump(dict(meta=meta, **results), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
