"""How far each fused step lands from a float64 evaluation, against diffusers' own step.

DESIGN.md's numerical contract: a fused result is no farther from a float64 evaluation of
the same formulas than diffusers' eager result is, plus one ulp of the storage dtype. This
survey measures it over the option space of the DPM-Solver and DDIM schedulers, step by
step (``fused_sched.verify.float64_distances``: teacher forcing, with diffusers' own step in
float64 as the float64 evaluation, which shares nothing with the fused tables). The
distance of an output y is max|y - y64| / max|y64|, for the prev sample and the value the
step stores (DPM's history value, DDIM's x0). A configuration's ratio is its worst step's
fused distance over (diffusers' distance + 2**-23); above 1 it breaks the contract.

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

SHAPE = (2, 4, 8, 8)


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


def survey(family: str, backend: str) -> list[dict]:
    rows = []
    for config, n, step_kwargs in FAMILIES[family][2]():
        reference_cls, fused_cls, _ = FAMILIES[family]
        try:
            with ops.use_backend(backend):
                distances = verify.float64_distances(reference_cls, fused_cls, config, n, step_kwargs, SHAPE)
        except Exception as error:  # a configuration either class refuses or breaks on: not a step to judge
            rows.append(dict(family=family, config=config, n=n, step_kwargs=step_kwargs, skipped=repr(error)[:200]))
            continue
        worst = max(distances, key=lambda d: d.ratio)
        rows.append(dict(family=family, config=config, n=n, step_kwargs=step_kwargs, ratio=worst.ratio,
                         step=worst.step, output=worst.output, diffusers=worst.diffusers, fused=worst.fused))
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
