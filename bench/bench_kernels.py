"""The GPU kernels alone: each backend's fused step against the device's copy bandwidth,
and its radix-select thresholding against the eager reference (torch.kthvalue).

    python bench/bench_kernels.py [--backend triton,cuda] [--dtype fp32,bf16] [--json FILE]

A step moves (inputs + outputs) * numel * itemsize bytes once; "% copy" is its achieved
bandwidth over that of a device-to-device copy of the same byte count (read + write).
Two times per case, medians over repeats after a warm-up that also autotunes:

- ``kernel_us``: ``--graph-calls`` calls captured in one CUDA graph, replayed, per call:
  the device's time alone, the number the copy roofline is about;
- ``call_us``: one eager call between CUDA events: on a small tensor this is the host's
  dispatch time, since the device waits for it.

Needs a GPU: the Triton interpreter's or an emulator's timings say nothing about kernels.
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


def _median_event_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def call_seconds(fn, repeats: int) -> float:
    """Median seconds of one eager fn() between CUDA events (after two warm-up calls)."""
    fn()
    fn()
    torch.cuda.synchronize()
    return _median_event_seconds(fn, repeats)


def kernel_seconds(fn, repeats: int, calls: int) -> float:
    """Median seconds per fn() of a CUDA graph of ``calls`` captured calls, replayed: the
    device's time without the host's (fn must already be warm: no autotuning in capture)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture needs a side stream's warm-up first
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return _median_event_seconds(graph.replay, repeats) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton,cuda", help="comma-separated: triton, cuda")
    parser.add_argument("--dtype", default="fp32,bf16", help=f"comma-separated, from: {', '.join(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--graph-calls", type=int, default=20, help="calls per captured graph (kernel_us)")
    parser.add_argument("--json", help="also write the rows to this JSON file (rewritten after every shape)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (interpreted or emulated kernels' timings are meaningless)")

    from fused_sched.ops import backends, layout, reference

    names = args.backend.split(",")
    for name in names:
        reason = backends.why_unavailable(name, torch.device("cuda"), (torch.float32,))
        if reason is not None:
            raise SystemExit(f"--backend {name}: unavailable: {reason}")
    kernels = {name: backends.load_backend(name) for name in names}
    if "triton" in kernels:
        from fused_sched.ops.triton import INTERPRETED

        if INTERPRETED:
            raise SystemExit("TRITON_INTERPRET is set: unset it to time the compiled kernels")
    dtypes = [(name, DTYPES[name]) for name in args.dtype.split(",")]
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), repeats=args.repeats, graph_calls=args.graph_calls)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    rows = []
    print(f"{'shape':<14} {'dtype':<5} {'step':<16} {'backend':<7} {'kernel us':>10} {'call us':>9} {'GB/s':>7} "
          f"{'% copy':>7}")
    for dtype_name, dtype in dtypes:
        for label, shape in SHAPES:
            x = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
            m, h1, h2, z = (torch.randn_like(x) for _ in range(4))
            c = torch.randn(1, layout.NUM_COEFFICIENTS, generator=g, device=device)
            for name, history, noise, write_d, write_x0, clip in STEPS:
                hist = (h1, h2)[:history]
                streams = 2 + history + int(noise) + 1 + int(write_d) + int(write_x0)
                nbytes = streams * x.numel() * x.element_size()
                src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                copy_s = kernel_seconds(lambda: dst.copy_(src), args.repeats, args.graph_calls)
                for backend, kernel in kernels.items():
                    scale = kernel.threshold_scale(x, m, c, 0.995, 1.5) if clip == "threshold" else None

                    def run(kernel=kernel, scale=scale):
                        kernel.fused_step(x, m, c, hist, z if noise else None, clip, 1.0, scale, dtype,
                                          dtype if write_d else None, dtype if write_x0 else None)

                    call_s = call_seconds(run, args.repeats)
                    step_s = kernel_seconds(run, args.repeats, args.graph_calls)
                    rows.append(dict(shape=label, dims=list(shape), dtype=dtype_name, step=name, backend=backend,
                                     kernel_us=step_s * 1e6, call_us=call_s * 1e6, bytes=nbytes,
                                     gbps=nbytes / step_s / 1e9, copy_gbps=nbytes / copy_s / 1e9,
                                     fraction_of_copy=copy_s / step_s))
                    print(f"{label:<14} {dtype_name:<5} {name:<16} {backend:<7} {step_s * 1e6:>10.1f} "
                          f"{call_s * 1e6:>9.1f} {nbytes / step_s / 1e9:>7.0f} {100 * copy_s / step_s:>6.1f}%",
                          flush=True)
            # Thresholding: the selection (radix passes over x and m) against the eager reference.
            reference_s = call_seconds(lambda: reference.threshold_scale(x, m, c, 0.995, 1.5),
                                       max(5, args.repeats // 10))
            for backend, kernel in kernels.items():
                select = lambda kernel=kernel: kernel.threshold_scale(x, m, c, 0.995, 1.5)  # noqa: E731
                select_s = kernel_seconds(select, args.repeats, args.graph_calls)
                call_s = call_seconds(select, args.repeats)
                rows.append(dict(shape=label, dims=list(shape), dtype=dtype_name, step="threshold_scale",
                                 backend=backend, kernel_us=select_s * 1e6, call_us=call_s * 1e6,
                                 reference_call_us=reference_s * 1e6, speedup_vs_reference=reference_s / call_s))
                print(f"{label:<14} {dtype_name:<5} {'threshold_scale':<16} {backend:<7} {select_s * 1e6:>10.1f} "
                      f"{call_s * 1e6:>9.1f}   (eager reference {reference_s * 1e6:.1f} us)", flush=True)
            if args.json:  # after every shape, so a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
