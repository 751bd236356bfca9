"""Triton backend kernels on a CUDA GPU: fused-step bandwidth against the device's copy
bandwidth, and the radix-select thresholding time against torch.quantile / kthvalue.

    python bench/bench_triton.py [--dtype bf16] [--json bench/results/triton-<gpu>.json]

A step moves (inputs + outputs) * numel * itemsize bytes once; "% copy" is its achieved
bandwidth over that of a device-to-device copy of the same byte count (read + write),
timed the same way. Medians of CUDA-event timings after a warm-up that also autotunes.
Needs a GPU: the interpreter's timings would say nothing about the kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (label, shape): an SD latent batch, SDXL, a CogVideoX-49-frame video latent, a 4M+ case.
SHAPES = [("sd15-b4", (4, 4, 64, 64)), ("sdxl-b2", (2, 4, 128, 128)), ("cogvideox-49f", (1, 13, 16, 60, 90)),
          ("4M", (1, 4, 1024, 1024)), ("16M", (2, 8, 1024, 1024))]
# (label, history terms, noise, writes d, writes x0, clip)
STEPS = [("ddim", 0, False, False, False, "none"), ("ddim-eta", 0, True, False, False, "none"),
         ("dpm++2m", 1, False, True, False, "none"), ("dpm++3m-sde", 2, True, True, False, "clamp"),
         ("threshold", 0, False, False, False, "threshold")]


def time_cuda(fn, repeats: int) -> float:
    """Median seconds of fn() over ``repeats`` CUDA-event timed runs (after two warm-ups)."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_triton.py needs a CUDA GPU (the Triton interpreter's timings are meaningless)")

    from fused_sched.ops import layout, reference
    from fused_sched.ops.triton import BACKEND, INTERPRETED

    if INTERPRETED:
        raise SystemExit("TRITON_INTERPRET is set: unset it to time the compiled kernels")
    dtype, device = DTYPES[args.dtype], torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"{'shape':<14} {'step':<12} {'us':>9} {'GB/s':>8} {'% copy':>7}")
    for label, shape in SHAPES:
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        m, h1, h2, z = (torch.randn_like(x) for _ in range(4))
        c = torch.randn(1, layout.NUM_COEFFICIENTS, generator=g, device=device)
        for name, history, noise, write_d, write_x0, clip in STEPS:
            hist = (h1, h2)[:history]
            scale = BACKEND.threshold_scale(x, m, c, 0.995, 1.5) if clip == "threshold" else None
            streams = 2 + history + int(noise) + 1 + int(write_d) + int(write_x0)
            nbytes = streams * x.numel() * x.element_size()
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_s = time_cuda(lambda: dst.copy_(src), args.repeats)

            def run():
                BACKEND.fused_step(x, m, c, hist, z if noise else None, clip, 1.0, scale, dtype,
                                   dtype if write_d else None, dtype if write_x0 else None)

            step_s = time_cuda(run, args.repeats)
            gbps = nbytes / step_s / 1e9
            frac = copy_s / step_s
            rows.append(dict(shape=label, dims=list(shape), step=name, dtype=args.dtype, median_us=step_s * 1e6,
                             gbps=gbps, copy_gbps=nbytes / copy_s / 1e9, fraction_of_copy=frac))
            print(f"{label:<14} {name:<12} {step_s * 1e6:>9.1f} {gbps:>8.0f} {100 * frac:>6.1f}%")
        # Thresholding: the op's selection (4 radix passes over x and m) against the eager reference.
        select_s = time_cuda(lambda: BACKEND.threshold_scale(x, m, c, 0.995, 1.5), args.repeats)
        ref_s = time_cuda(lambda: reference.threshold_scale(x, m, c, 0.995, 1.5), max(5, args.repeats // 10))
        rows.append(dict(shape=label, dims=list(shape), step="threshold_scale", dtype=args.dtype,
                         median_us=select_s * 1e6, reference_median_us=ref_s * 1e6))
        print(f"{label:<14} {'scale':<12} {select_s * 1e6:>9.1f}   (reference kthvalue {ref_s * 1e6:.1f} us)")
    if args.json:
        import triton

        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    python=platform.python_version())
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
