"""Per-step host overhead on a tiny latent (1x4x8x8): diffusers' eager step against the fused
classes, side by side in one run. On a tiny latent the arithmetic is negligible, so this
measures Python + dispatch + scalar math per step.

    python bench/host_overhead.py [--backend torch] [--json bench/results/host_overhead_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import diffusers
import torch

import fused_sched
from fused_sched.benchmark import SCHEDULERS, device_name, time_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", help="fused backend to time (default: torch, the reference)")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    shape, device = (1, 4, 8, 8), torch.device("cpu")
    rows = []
    print(f"{'scheduler':<20} {'diffusers us':>13} {'fused us':>10} {'ratio':>7}")
    for kind in SCHEDULERS:
        ref = time_step(kind, "diffusers", shape, torch.float32, device, repeats=args.repeats)
        fused = time_step(kind, "fused", shape, torch.float32, device, backend=args.backend, repeats=args.repeats)
        ratio = ref.median_s / fused.median_s
        rows.append(dict(scheduler=kind, diffusers_median_us=ref.median_s * 1e6, diffusers_iqr_us=ref.spread_s * 1e6,
                         fused_median_us=fused.median_s * 1e6, fused_iqr_us=fused.spread_s * 1e6, ratio=ratio))
        print(f"{kind:<20} {ref.median_s * 1e6:>13.1f} {fused.median_s * 1e6:>10.1f} {ratio:>6.2f}x")
    if args.json:
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=f"CPU: {device_name(device)}, {torch.get_num_threads()} threads",
                    torch=torch.__version__, diffusers=diffusers.__version__, fused_sched=fused_sched.__version__,
                    python=platform.python_version(), backend=args.backend, shape=list(shape), dtype="float32")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
