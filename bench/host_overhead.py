"""Per-step host overhead on a tiny latent (1x4x8x8): diffusers' eager step against the fused
classes, side by side in one run. On a tiny latent the arithmetic is negligible, so this
measures Python + dispatch + scalar math per step.

The two are timed in alternating blocks (``--block`` calls each), so that a change in the
machine's speed during the run (shared CPUs drift by 2x) affects both alike; the ratio is
of the medians over blocks, and of the minima (the least disturbed blocks) as a check.

    python bench/host_overhead.py [--backend torch] [--json bench/results/host_overhead_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import diffusers
import torch

import fused_sched
from fused_sched import ops
from fused_sched.benchmark import SCHEDULERS, device_name, make_step


def per_step_times(steps, blocks: int, block: int) -> list[list[float]]:
    """Seconds per call of each callable, one value per block, the callables alternating."""
    for step in steps:  # warm up: first-use placements, caches
        for _ in range(block):
            step()
    times = [[] for _ in steps]
    for _ in range(blocks):
        for step, samples in zip(steps, times):
            start = time.perf_counter()
            for _ in range(block):
                step()
            samples.append((time.perf_counter() - start) / block)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", help="fused backend to time (default: torch, the reference)")
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--block", type=int, default=50, help="calls per timed block")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    shape, device = (1, 4, 8, 8), torch.device("cpu")
    rows = []
    print(f"{'scheduler':<20} {'diffusers us':>13} {'fused us':>10} {'ratio':>7} {'ratio of minima':>16}")
    with ops.use_backend(args.backend):
        for kind in SCHEDULERS:
            steps = [make_step(kind, fused, shape, torch.float32, device) for fused in (False, True)]
            ref, fused = per_step_times(steps, args.blocks, args.block)
            ref_us, fused_us = statistics.median(ref) * 1e6, statistics.median(fused) * 1e6
            rows.append(dict(scheduler=kind, diffusers_median_us=ref_us, fused_median_us=fused_us,
                             diffusers_min_us=min(ref) * 1e6, fused_min_us=min(fused) * 1e6,
                             ratio=ref_us / fused_us, ratio_of_minima=min(ref) / min(fused)))
            print(f"{kind:<20} {ref_us:>13.1f} {fused_us:>10.1f} {ref_us / fused_us:>6.2f}x "
                  f"{min(ref) / min(fused):>15.2f}x", flush=True)
    if args.json:
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=f"CPU: {device_name(device)}, {torch.get_num_threads()} threads",
                    torch=torch.__version__, diffusers=diffusers.__version__, fused_sched=fused_sched.__version__,
                    python=platform.python_version(), backend=args.backend, shape=list(shape), dtype="float32",
                    method=f"alternating blocks of {args.block} calls, {args.blocks} blocks each")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
