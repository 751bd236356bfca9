"""The GPU kernels alone: each backend's fused step against the device's copy bandwidth,
and its radix-select thresholding against the eager reference (fused_sched.ops.reference).

    python bench/bench_kernels.py [--backend triton,cuda] [--dtype fp32,bf16] [--json FILE]

A step moves (inputs + outputs) * numel * itemsize bytes once; "% copy" is its achieved
bandwidth over that of a device-to-device copy of the same byte count (read + write),
timed the same way. Two times per case, medians over repeats after a warm-up that also
autotunes:

- ``kernel_us``: a CUDA graph of calls, replayed REPLAYS_PER_SAMPLE times between two
  events, per call: the device's time alone (one graph launch's latency spread over many
  calls), the number the copy roofline is about. The calls cycle through enough copies of
  the inputs (``--cold-bytes`` in all) that each call finds its data in HBM, not in L2
  (50-60 MB on Hopper), as a real step does; the copy is timed over copies of its buffers
  alike. The copy and each backend's graph are timed in turns (ROUNDS rounds, the order
  reversed every other round), so a drifting clock moves them alike.
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
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (label, shape), most wanted first: the three video latents the Triton issue names
# (CogVideoX 49 frames, Wan 720p, HunyuanVideo 720p with a batch of 2), then an SD latent
# batch and SDXL's.
SHAPES = [("cogvideox-49f", (1, 13, 16, 60, 90)), ("wan-720p", (1, 16, 21, 90, 160)),
          ("hunyuan-720p-b2", (2, 16, 33, 90, 160)), ("sd15-b4", (4, 4, 64, 64)), ("sdxl-b2", (2, 4, 128, 128))]
# (label, history terms, noise, writes d, writes x0, clip): what each scheduler's step reads
# and writes (DDIM returns x0 as pred_original_sample; DPM writes its history value). Noise:
# None, "storage" (DDIM draws it in the model output's dtype), "fp32" (the SDE solvers draw
# float32, as diffusers does) or "philox" (in the kernel: no noise tensor).
STEPS = [("ddim", 0, None, False, True, "none"), ("ddim-eta", 0, "storage", False, True, "none"),
         ("ddim-eta-philox", 0, "philox", False, True, "none"),
         ("dpm++2m", 1, None, True, False, "none"), ("dpm++3m-sde", 2, "fp32", True, False, "clamp"),
         ("ddim-threshold", 0, None, False, True, "threshold")]
REPLAYS_PER_SAMPLE = 5
ROUNDS = 4
DEVICE = torch.device("cuda")  # tests/test_bench_kernels.py runs the loop on the CPU, the GPU parts mocked


def _event_seconds(run, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return times


def _median_event_seconds(run, repeats: int) -> float:
    return statistics.median(_event_seconds(run, repeats))


def call_seconds(fn, repeats: int) -> float:
    """Median seconds of one eager fn() between CUDA events (after two warm-up calls)."""
    fn()
    fn()
    torch.cuda.synchronize()
    return _median_event_seconds(fn, repeats)


class Replayed:
    """A CUDA graph of ``calls`` (callables, each already warm: no autotuning may happen in
    capture); ``run()`` replays it REPLAYS_PER_SAMPLE times, ``calls_per_run`` calls in all.
    The calls' outputs are kept with the graph: freed, one call's outputs would be the next
    one's memory, and the writes would stay in L2."""

    def __init__(self, calls):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # capture wants a warm-up on a side stream first
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = [call() for call in calls]
        self.graph.replay()
        torch.cuda.synchronize()
        self.calls_per_run = REPLAYS_PER_SAMPLE * len(calls)

    def run(self) -> None:
        for _ in range(REPLAYS_PER_SAMPLE):
            self.graph.replay()


def seconds_per_call_in_turns(replayed: dict, repeats: int) -> dict:
    """{name: median seconds per call} of each Replayed, timed in turns: ROUNDS rounds of
    ``repeats // ROUNDS`` samples each, the order reversed every other round."""
    samples = {name: [] for name in replayed}
    names = list(replayed)
    for r in range(ROUNDS):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name] += _event_seconds(replayed[name].run, max(1, repeats // ROUNDS))
    return {name: statistics.median(s) / replayed[name].calls_per_run for name, s in samples.items()}


def spin_up(seconds: float = 0.3) -> None:
    """Keep the GPU copying for ``seconds``: it idles at a fraction of its clock."""
    source = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        target.copy_(source)
        torch.cuda.synchronize()


def copies_for(nbytes: int, cold_bytes: int) -> int:
    """How many copies of a call's data keep every call of a replay out of L2 (at least 2,
    at most 64: beyond that the inputs alone are large)."""
    return max(2, min(64, -(-cold_bytes // max(nbytes, 1))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton,cuda", help="comma-separated: triton, cuda")
    parser.add_argument("--dtype", default="fp32,bf16", help=f"comma-separated, from: {', '.join(DTYPES)}")
    parser.add_argument("--shape", default=",".join(label for label, _ in SHAPES),
                        help="comma-separated labels, most wanted first (default: all)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cold-bytes", type=int, default=512 * 2**20,
                        help="bytes the replayed calls' inputs and outputs span (default 512 MiB: ~10x L2)")
    parser.add_argument("--json", help="also write the rows to this JSON file (rewritten after every shape)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (interpreted or emulated kernels' timings are meaningless)")

    import fused_sched
    from fused_sched.bench_record import run_facts, write_report
    from fused_sched.ops import PhiloxNoise, backends, layout, reference

    names = args.backend.split(",")
    for name in names:
        reason = backends.why_unavailable(name, DEVICE, (torch.float32,))
        if reason is not None:
            raise SystemExit(f"--backend {name}: unavailable: {reason}")
    kernels = {name: backends.load_backend(name) for name in names}
    if "triton" in kernels:
        import triton

        from fused_sched.ops.triton import INTERPRETED, step

        if INTERPRETED:
            raise SystemExit("TRITON_INTERPRET is set: unset it to time the compiled kernels")
    dtypes = [(name, DTYPES[name]) for name in args.dtype.split(",")]
    known_shapes = dict(SHAPES)
    unknown = [label for label in args.shape.split(",") if label not in known_shapes]
    if unknown:
        raise SystemExit(f"--shape {','.join(unknown)}: expected labels from {', '.join(known_shapes)}")
    shapes = [(label, known_shapes[label]) for label in args.shape.split(",")]
    device = DEVICE
    g = torch.Generator(device=device).manual_seed(0)
    spin_up()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                fused_sched=fused_sched.__version__, python=platform.python_version(), repeats=args.repeats,
                cold_bytes=args.cold_bytes, **run_facts(),
                method=f"kernel_us: CUDA graph over copies of the data spanning cold_bytes, replayed "
                       f"{REPLAYS_PER_SAMPLE} times between events, per call; the copy and the backends timed in "
                       f"turns ({ROUNDS} rounds, the order reversed every other round); "
                       "call_us: one eager call between CUDA events")
    if "triton" in kernels:
        meta.update(triton=triton.__version__, triton_autotune=step.AUTOTUNE,
                    triton_configs=[str(config) for config in step.LAUNCH_CONFIGS])
    rows = []
    print(f"{'shape':<14} {'dtype':<5} {'step':<16} {'backend':<7} {'kernel us':>10} {'call us':>9} {'GB/s':>7} "
          f"{'% copy':>7}")
    for label, shape in shapes:  # shape first: a run cut short keeps the most wanted latents in both dtypes
        for dtype_name, dtype in dtypes:
            c = torch.randn(1, layout.NUM_COEFFICIENTS, generator=g, device=device)

            def fresh(storage=dtype):
                return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(storage)

            numel = torch.Size(shape).numel()
            for name, history, noise, write_d, write_x0, clip in STEPS:
                noise_dtype = {"storage": dtype, "fp32": torch.float32}.get(noise)
                itemsize = torch.tensor([], dtype=dtype).element_size()
                streams = 2 + history + 1 + int(write_d) + int(write_x0)  # x, m, history, prev, d, x0
                nbytes = numel * (streams * itemsize + (noise_dtype.itemsize if noise_dtype is not None else 0))
                copies = copies_for(nbytes, args.cold_bytes)
                sources = [torch.empty(nbytes // 2, dtype=torch.uint8, device=device) for _ in range(copies)]
                targets = [torch.empty_like(s) for s in sources]
                replayed = {"copy": Replayed([lambda s=s, t=t: t.copy_(s) for s, t in zip(sources, targets)])}
                # (x, m, history, z) per copy: every replayed call reads data no other call just read
                data = [(fresh(), fresh(), tuple(fresh() for _ in range(history)),
                         PhiloxNoise(7, k * numel) if noise == "philox" else
                         fresh(noise_dtype) if noise_dtype is not None else None) for k in range(copies)]
                case_rows = {}
                for backend, kernel in kernels.items():
                    row = case_rows[backend] = dict(shape=label, dims=list(shape), dtype=dtype_name, step=name,
                                                    backend=backend, bytes=nbytes, copies=copies)
                    try:
                        scales = [kernel.threshold_scale(x, m, c, 0.995, 1.5) if clip == "threshold" else None
                                  for x, m, _, _ in data]

                        def call(x, m, hist, z, scale, kernel=kernel):
                            return kernel.fused_step(x, m, c, hist, z, clip, 1.0, scale, dtype,
                                                     dtype if write_d else None, dtype if write_x0 else None)

                        calls = [lambda d=d, s=s: call(*d, s) for d, s in zip(data, scales)]
                        row.update(call_us=call_seconds(calls[0], args.repeats) * 1e6)  # warms up (and autotunes)
                        replayed[backend] = Replayed(calls)
                    except Exception as error:  # a row that says why, and the other cases still run
                        row.update(error=f"{type(error).__name__}: {error}"[:500])
                try:
                    seconds = seconds_per_call_in_turns(replayed, args.repeats)
                except Exception as error:
                    seconds = {}
                    for backend in replayed:
                        if backend != "copy":
                            case_rows[backend].update(error=f"{type(error).__name__}: {error}"[:500])
                for backend, row in case_rows.items():
                    if backend in seconds:
                        copy_s, step_s = seconds["copy"], seconds[backend]
                        row.update(copy_gbps=nbytes / copy_s / 1e9, kernel_us=step_s * 1e6,
                                   gbps=nbytes / step_s / 1e9, fraction_of_copy=copy_s / step_s)
                        print(f"{label:<14} {dtype_name:<5} {name:<16} {backend:<7} {step_s * 1e6:>10.1f} "
                              f"{row['call_us']:>9.1f} {nbytes / step_s / 1e9:>7.0f} {100 * copy_s / step_s:>6.1f}%",
                              flush=True)
                    else:
                        print(f"{label:<14} {dtype_name:<5} {name:<16} {backend:<7} FAILED {row.get('error')}",
                              flush=True)
                    rows.append(row)
                del data, replayed, sources, targets
            # Thresholding: the selection (radix passes over x and m) against the eager reference,
            # replayed over copies of (x, m) like the steps, so its first pass reads HBM.
            nbytes = 2 * numel * torch.tensor([], dtype=dtype).element_size()
            copies = copies_for(nbytes, args.cold_bytes)
            pairs = [(fresh(), fresh()) for _ in range(copies)]
            x, m = pairs[0]
            try:
                reference_s = call_seconds(lambda: reference.threshold_scale(x, m, c, 0.995, 1.5),
                                           max(5, args.repeats // 5))
            except Exception as error:
                reference_s = None
                print(f"{label:<14} {dtype_name:<5} threshold_scale reference FAILED {type(error).__name__}: {error}",
                      flush=True)
            for backend, kernel in kernels.items():
                row = dict(shape=label, dims=list(shape), dtype=dtype_name, step="threshold_scale", backend=backend,
                           bytes=nbytes, copies=copies,
                           reference_call_us=None if reference_s is None else reference_s * 1e6)
                try:
                    selects = [lambda x=x, m=m, kernel=kernel: kernel.threshold_scale(x, m, c, 0.995, 1.5)
                               for x, m in pairs]
                    call_s = call_seconds(selects[0], args.repeats)
                    select_s = seconds_per_call_in_turns({backend: Replayed(selects)}, args.repeats)[backend]
                    row.update(call_us=call_s * 1e6, kernel_us=select_s * 1e6,
                               speedup_vs_reference=None if reference_s is None else reference_s / call_s)
                    print(f"{label:<14} {dtype_name:<5} {'threshold_scale':<16} {backend:<7} "
                          f"{select_s * 1e6:>10.1f} {call_s * 1e6:>9.1f}   (eager reference "
                          f"{'-' if reference_s is None else f'{reference_s * 1e6:.1f}'} us)", flush=True)
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
