"""In-kernel noise on the cpu backend against drawing a noise tensor, side by side in one run.

One noisy fused step (x0 = x, out = x0 + 0.1 z) on the CogVideoX 49-frame latent
(1x13x16x60x90, fp32), three ways: ``torch.randn`` + the step reading that tensor (what a
generator-driven SDE/DDIM-eta step costs), the step computing z in the kernel
(``PhiloxNoise``) with its AVX2 loops (libmvec's log/cos where built with it), and the same
with the baseline-ISA loops. Alternating blocks, median and minimum per variant.

    python bench/cpu_philox.py [--json bench/results/cpu-philox-noise.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

import fused_sched
from fused_sched import ops
from fused_sched.benchmark import device_name
from fused_sched.ops import PhiloxNoise, extension, layout

SHAPE = (1, 13, 16, 60, 90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    ext = extension.load_extension()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=generator)
    rows = torch.zeros(1, layout.NUM_COEFFICIENTS)
    rows[0, layout.AX] = rows[0, layout.AS] = rows[0, layout.P0] = rows[0, layout.O0] = 1.0
    rows[0, layout.ON] = 0.1

    def randn_then_step():
        ops.fused_step(x, x, rows, noise=torch.randn(SHAPE, generator=generator), backend="cpu")

    def philox_step():
        ops.fused_step(x, x, rows, noise=PhiloxNoise(7, 0), backend="cpu")

    def portable_philox_step():
        ext.cpu_use_portable_kernels_only(True)
        try:
            philox_step()
        finally:
            ext.cpu_use_portable_kernels_only(False)

    variants = {"randn + step": randn_then_step, "philox step (AVX2 loops)": philox_step,
                "philox step (baseline loops)": portable_philox_step}
    times = {name: [] for name in variants}
    for step in variants.values():
        step()
    for _ in range(args.blocks):
        for name, step in variants.items():
            start = time.perf_counter()
            for _ in range(3):
                step()
            times[name].append((time.perf_counter() - start) / 3)
    rows_out = []
    for name, samples in times.items():
        median, best = statistics.median(samples) * 1e3, min(samples) * 1e3
        rows_out.append(dict(variant=name, median_ms=median, min_ms=best))
        print(f"{name:<30} median {median:7.2f} ms   min {best:7.2f} ms")
    if args.json:
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=f"CPU: {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads",
                    torch=torch.__version__, fused_sched=fused_sched.__version__, python=platform.python_version(),
                    shape=list(SHAPE), dtype="float32", vector_box_muller=bool(ext.cpu_vector_box_muller))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows_out), f, indent=2)


if __name__ == "__main__":
    main()
