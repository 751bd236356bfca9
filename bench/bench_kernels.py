"""The GPU kernels alone: each backend's fused step against the device's copy bandwidth,
and its radix-select thresholding against the eager reference (torch.kthvalue).

    python bench/bench_kernels.py [--backend triton,cuda] [--dtype fp32,bf16] [--json FILE]

A step moves (inputs + outputs) * numel * itemsize bytes once; "% copy" is its achieved
bandwidth over that of a device-to-device copy of the same byte count (read + write),
timed the same way. Two times per case, medians over repeats after a warm-up that also
autotunes:

- ``kernel_us``: a CUDA graph of calls, replayed, per call: the device's time alone, the
  number the copy roofline is about. The calls cycle through enough copies of the inputs
  (``--cold-bytes`` in all) that each call finds its data in HBM, not in L2 (50-60 MB on
  Hopper), as a real step does; the copy is timed over copies of its buffers alike.
- ``call_us``: one eager call between CUDA events: on a small tensor this is the host's
  dispatch time, since the device waits for it.

The ``threshold_scale`` rows time the selection alone (its radix passes over x and m)
against the eager reference (``reference_call_us``), replayed over copies of (x, m) alike;
their ``bytes`` are x and m once, which each backend reads once per pass.

A case that fails is a row with its ``error``; the others still run. The JSON is rewritten
after every shape, so a run cut short keeps what it measured. Needs a GPU: the Triton
interpreter's or an emulator's timings say nothing about kernels.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (label, shape), most wanted first: the three video latents the Triton issue names
# (CogVideoX 49 frames, Wan 720p, HunyuanVideo 720p with a batch of 2), then an SD latent
# batch and SDXL's.
SHAPES = [("cogvideox-49f", (1, 13, 16, 60, 90)), ("wan-720p", (1, 16, 21, 90, 160)),
          ("hunyuan-720p-b2", (2, 16, 33, 90, 160)), ("sd15-b4", (4, 4, 64, 64)), ("sdxl-b2", (2, 4, 128, 128))]
# (label, history terms, noise, writes d, writes x0, clip): what each scheduler's step reads
# and writes (DDIM returns x0 as pred_original_sample; DPM writes its history value).
STEPS = [("ddim", 0, False, False, True, "none"), ("ddim-eta", 0, True, False, True, "none"),
         ("dpm++2m", 1, False, True, False, "none"), ("dpm++3m-sde", 2, True, True, False, "clamp"),
         ("ddim-threshold", 0, False, False, True, "threshold")]


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


def kernel_seconds(calls, repeats: int) -> float:
    """Median seconds per call of a CUDA graph of ``calls`` (callables, each already warm:
    no autotuning may happen in capture), replayed: the device's time without the host's."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture wants a warm-up on a side stream first
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # Kept until the graph is timed: freed, one call's outputs would be the next one's
        # memory, and the writes would stay in L2.
        outputs = [call() for call in calls]
    graph.replay()
    torch.cuda.synchronize()
    seconds = _median_event_seconds(graph.replay, repeats) / len(calls)
    del outputs
    return seconds


def copies_for(nbytes: int, cold_bytes: int) -> int:
    """How many copies of a call's data keep every call of a replay out of L2 (at least 2,
    at most 64: beyond that the inputs alone are large)."""
    return max(2, min(64, -(-cold_bytes // max(nbytes, 1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton,cuda", help="comma-separated: triton, cuda")
    parser.add_argument("--dtype", default="fp32,bf16", help=f"comma-separated, from: {', '.join(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cold-bytes", type=int, default=512 * 2**20,
                        help="bytes the replayed calls' inputs and outputs span (default 512 MiB: ~10x L2)")
    parser.add_argument("--json", help="also write the rows to this JSON file (rewritten after every shape)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (interpreted or emulated kernels' timings are meaningless)")

    from fused_sched.benchmark import write_report
    from fused_sched.ops import backends, layout, reference

    names = args.backend.split(",")
    for name in names:
        reason = backends.why_unavailable(name, torch.device("cuda"), (torch.float32,))
        if reason is not None:
            raise SystemExit(f"--backend {name}: unavailable: {reason}")
    kernels = {name: backends.load_backend(name) for name in names}
    if "triton" in kernels:
        import triton

        from fused_sched.ops.triton import INTERPRETED, step

        if INTERPRETED:
            raise SystemExit("TRITON_INTERPRET is set: unset it to time the compiled kernels")
    dtypes = [(name, DTYPES[name]) for name in args.dtype.split(",")]
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), repeats=args.repeats, cold_bytes=args.cold_bytes,
                method="kernel_us: CUDA graph replay over copies of the data spanning cold_bytes; "
                       "call_us: one eager call between CUDA events")
    if "triton" in kernels:
        meta.update(triton=triton.__version__, triton_autotune=step.AUTOTUNE,
                    triton_configs=[str(config) for config in step.LAUNCH_CONFIGS])
    rows = []
    print(f"{'shape':<14} {'dtype':<5} {'step':<16} {'backend':<7} {'kernel us':>10} {'call us':>9} {'GB/s':>7} "
          f"{'% copy':>7}")
    for dtype_name, dtype in dtypes:
        for label, shape in SHAPES:
            c = torch.randn(1, layout.NUM_COEFFICIENTS, generator=g, device=device)

            def fresh():
                return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)

            for name, history, noise, write_d, write_x0, clip in STEPS:
                streams = 2 + history + int(noise) + 1 + int(write_d) + int(write_x0)
                numel = torch.Size(shape).numel()
                nbytes = streams * numel * torch.tensor([], dtype=dtype).element_size()
                copies = copies_for(nbytes, args.cold_bytes)
                sources = [torch.empty(nbytes // 2, dtype=torch.uint8, device=device) for _ in range(copies)]
                targets = [torch.empty_like(s) for s in sources]
                copy_s = kernel_seconds([lambda s=s, t=t: t.copy_(s) for s, t in zip(sources, targets)],
                                        args.repeats)
                del sources, targets
                # (x, m, history, z) per copy: every replayed call reads data no other call just read
                data = [(fresh(), fresh(), tuple(fresh() for _ in range(history)), fresh() if noise else None)
                        for _ in range(copies)]
                for backend, kernel in kernels.items():
                    row = dict(shape=label, dims=list(shape), dtype=dtype_name, step=name, backend=backend,
                               bytes=nbytes, copies=copies, copy_gbps=nbytes / copy_s / 1e9)
                    try:
                        scales = [kernel.threshold_scale(x, m, c, 0.995, 1.5) if clip == "threshold" else None
                                  for x, m, _, _ in data]

                        def call(x, m, hist, z, scale, kernel=kernel):
                            return kernel.fused_step(x, m, c, hist, z, clip, 1.0, scale, dtype,
                                                     dtype if write_d else None, dtype if write_x0 else None)

                        calls = [lambda d=d, s=s: call(*d, s) for d, s in zip(data, scales)]
                        call_s = call_seconds(calls[0], args.repeats)  # warms up (and autotunes) first
                        row.update(call_us=call_s * 1e6)
                        step_s = kernel_seconds(calls, args.repeats)
                        row.update(kernel_us=step_s * 1e6, gbps=nbytes / step_s / 1e9,
                                   fraction_of_copy=copy_s / step_s)
                        print(f"{label:<14} {dtype_name:<5} {name:<16} {backend:<7} {step_s * 1e6:>10.1f} "
                              f"{call_s * 1e6:>9.1f} {nbytes / step_s / 1e9:>7.0f} {100 * copy_s / step_s:>6.1f}%",
                              flush=True)
                    except Exception as error:  # a row that says why, and the other cases still run
                        row.update(error=f"{type(error).__name__}: {error}"[:500])
                        print(f"{label:<14} {dtype_name:<5} {name:<16} {backend:<7} FAILED {row['error']}", flush=True)
                    rows.append(row)
                del data
            # Thresholding: the selection (radix passes over x and m) against the eager reference,
            # replayed over copies of (x, m) like the steps, so its first pass reads HBM.
            nbytes = 2 * torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
            copies = copies_for(nbytes, args.cold_bytes)
            pairs = [(fresh(), fresh()) for _ in range(copies)]
            x, m = pairs[0]
            reference_s = call_seconds(lambda: reference.threshold_scale(x, m, c, 0.995, 1.5),
                                       max(5, args.repeats // 5))
            for backend, kernel in kernels.items():
                row = dict(shape=label, dims=list(shape), dtype=dtype_name, step="threshold_scale", backend=backend,
                           bytes=nbytes, copies=copies, reference_call_us=reference_s * 1e6)
                try:
                    selects = [lambda x=x, m=m, kernel=kernel: kernel.threshold_scale(x, m, c, 0.995, 1.5)
                               for x, m in pairs]
                    call_s = call_seconds(selects[0], args.repeats)
                    select_s = kernel_seconds(selects, args.repeats)
                    row.update(call_us=call_s * 1e6, kernel_us=select_s * 1e6,
                               speedup_vs_reference=reference_s / call_s)
                    print(f"{label:<14} {dtype_name:<5} {'threshold_scale':<16} {backend:<7} "
                          f"{select_s * 1e6:>10.1f} {call_s * 1e6:>9.1f}   (eager reference {reference_s * 1e6:.1f} us)",
                          flush=True)
                except Exception as error:
                    row.update(error=f"{type(error).__name__}: {error}"[:500])
                    print(f"{label:<14} {dtype_name:<5} {'threshold_scale':<16} {backend:<7} FAILED {row['error']}",
                          flush=True)
                rows.append(row)
            del pairs
            if args.json:
                write_report(args.json, meta, rows)


if __name__ == "__main__":
    main()
