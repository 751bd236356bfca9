"""`fused-sched` command: bench, verify, info, plot."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys

import torch

from . import __version__, bench_record, ops
from .ops import extension
from .benchmark import (DTYPES, ROUNDS, SCHEDULERS, SHAPES, BaselineUnavailable, Timing, bytes_per_step, contender,
                        copy_bandwidth, device_name, error_summary, time_in_turns)
from .bench_record import write_report

COMPILED = "torch.compile"  # the compiled-reference baseline's name in the rows (see benchmark.py)
SKIPPED = "skipped (--no-compile-baseline)"


class UsageError(Exception):
    pass


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch has no usable CUDA device")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"--device {name!r}: expected 'cpu' or 'cuda[:N]'")
    return torch.device(name)


def _choices(value: str, known, argument: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in known:
            raise UsageError(f"{argument} {name!r} is not one of: {', '.join(known)}")
    return names


def _shape(value: str):
    if value in SHAPES:
        return value, SHAPES[value]
    try:
        dims = tuple(int(d) for d in value.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims) or len(dims) < 2:
        raise UsageError(f"--shape {value!r}: a preset ({', '.join(SHAPES)}) or dims like 2x4x64x64")
    return value, dims


def _metadata(device: torch.device) -> dict:
    import diffusers

    name = device_name(device)
    try:  # the version only: importing triton takes a second, and it may be absent
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=f"{device.type}: {name}", threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.version.cuda, diffusers=diffusers.__version__, fused_sched=__version__,
                python=platform.python_version(), triton=triton_version,
                triton_autotune=os.environ.get("FUSED_SCHED_TRITON_AUTOTUNE", "unset (on)"),
                **(bench_record.run_facts() if device.type == "cuda" else dict(commit=bench_record.commit())))


def cmd_info(args) -> int:
    device = _device(args.device)
    for key, value in _metadata(device).items():
        print(f"{key:>12}: {value}")
    print("    backends:")
    for name, reason in ops.availability(device).items():
        print(f"{'':>14}{name:<8} {'available' if reason is None else 'unavailable: ' + reason}")
    module = extension.loaded_extension()  # loaded by the availability check where it builds
    if module is not None:
        origin = "prebuilt" if module.__name__ == extension.PREBUILT_MODULE else "built just in time"
        print(f"{'extension':>12}: {origin}, {module.__file__}")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    kinds = _choices(args.scheduler, SCHEDULERS, "--scheduler")
    failed = False
    for kind in kinds:
        for verdict in verify(kind, steps=args.steps, device=str(_device(args.device))):
            if verdict.max_relative_error is None:
                print(f"{kind:<20} {verdict.backend:<8} skipped ({verdict.note})")
                continue
            status = "ok" if verdict.passed else "FAIL"
            print(f"{kind:<20} {verdict.backend:<8} max rel error {verdict.max_relative_error:.2e}  "
                  f"(tolerance 1e-04) {status}")
            failed |= not verdict.passed
    return 1 if failed else 0


def _default_cases(device: torch.device):
    if device.type == "cuda":
        return list(SCHEDULERS), ["cogvideox-49f", "wan-720p", "hunyuan-720p"], ["fp32", "bf16"]
    return ["ddim", "dpm++2m", "dpm++2m-threshold", "cogvideox-ddim"], ["tiny", "sd-512"], ["fp32"]


def cmd_bench(args) -> int:
    device = _device(args.device)
    default_schedulers, default_shapes, default_dtypes = _default_cases(device)
    kinds = _choices(args.scheduler, SCHEDULERS, "--scheduler") if args.scheduler else default_schedulers
    shapes = [_shape(s) for s in args.shape.split(",")] if args.shape else [(s, SHAPES[s]) for s in default_shapes]
    dtypes = _choices(args.dtype, DTYPES, "--dtype") if args.dtype else default_dtypes
    # Triton's interpreter (TRITON_INTERPRET=1, how it runs without a GPU) executes kernels in
    # Python: correct, but its timings say nothing about the kernels, so it is not a default.
    available = [n for n, reason in ops.availability(device).items()
                 if reason is None and not (n == "triton" and device.type == "cpu")]
    backends = _choices(args.backend, ops.known_backends()[1:], "--backend") if args.backend else available
    if args.plot:
        _require_matplotlib()
    for name in backends:
        reason = ops.backends.why_unavailable(name, device, (torch.float32,))
        if reason is not None:
            raise UsageError(f"--backend {name}: unavailable on {device}: {reason}")

    # Other processes on the machine distort CPU timings, OpenMP-parallel kernels' most (a
    # barrier waits for a descheduled thread): say how busy it was.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    bandwidth = copy_bandwidth(device)
    meta = dict(_metadata(device), copy_bandwidth_GBps=bandwidth / 1e9, load_average_at_start=load,
                cpu_count=os.cpu_count(),
                timing="per sample: wall time of one step and a device synchronize (host time included: the "
                       "device idles while the host launches, where in a pipeline a step that never syncs hides "
                       "its host time behind the model's GPU work; on a GPU each step's data evicted from L2 "
                       "first, untimed); "
                       f"a case's implementations timed in turns ({ROUNDS} rounds, the order reversed every other round; "
                       "fused_sched.benchmark.time_in_turns)",
                bytes_per_step="the op's least traffic: each tensor it reads and writes once at its own dtype, "
                               "x and m once more where thresholding (fused_sched.benchmark.bytes_per_step)")
    cases = [(k, s, d) for k in kinds for s in shapes for d in dtypes]
    rows = []
    rounds = min(ROUNDS, args.repeats)
    total = len(cases) * rounds
    done = 0

    def round_done():
        nonlocal done
        done += 1
        _progress(done, total)

    for index, (kind, (shape_name, shape), dtype_name) in enumerate(cases):
        dtype = DTYPES[dtype_name]
        case = (kind, shape_name, shape, dtype_name)
        timings = {}
        try:
            moved = bytes_per_step(kind, shape, dtype, device, args.steps)
            contenders = [contender(kind, "diffusers", shape, dtype, device, steps=args.steps)]
            for backend in backends:
                try:
                    contenders.append(contender(kind, "fused", shape, dtype, device, backend=backend, steps=args.steps))
                except Exception as error:
                    timings[backend] = error
            compiled = SKIPPED
            if not args.no_compile_baseline:
                try:
                    contenders.append(contender(kind, "compiled", shape, dtype, device, steps=args.steps))
                except BaselineUnavailable as error:
                    compiled = str(error)
            timings.update(time_in_turns(contenders, device, args.repeats, rounds=rounds, progress=round_done))
            if isinstance(timings["diffusers"], Exception):
                raise timings["diffusers"]
        except Exception as error:  # a case that cannot run says why in its rows; the others still run
            rows += [_failed_row(*case, name, error) for name in ["diffusers"] + backends]
            done = (index + 1) * rounds
            _progress(done, total)
            if args.json:
                write_report(args.json, meta, rows)
            continue
        baseline = timings["diffusers"]
        if "compiled" in timings:
            compiled = timings["compiled"] if isinstance(timings["compiled"], Timing) else str(timings["compiled"])
        rows.append(_row(*case, "diffusers", baseline, baseline, compiled, moved, bandwidth))
        if isinstance(compiled, Timing):
            rows.append(_row(*case, COMPILED, compiled, baseline, compiled, moved, bandwidth))
        rows += [_row(*case, backend, timings[backend], baseline, compiled, moved, bandwidth)
                 if isinstance(timings[backend], Timing) else _failed_row(*case, backend, timings[backend])
                 for backend in backends]
        if args.json:  # after every case, so a run cut short keeps what it measured
            write_report(args.json, meta, rows)
    print(file=sys.stderr)
    _print_table(rows, device, bandwidth, load, compile_skipped=args.no_compile_baseline)
    if args.plot:
        _plot(rows, bandwidth, _metadata(device), args.plot)
    return 0


def cmd_plot(args) -> int:
    """The --plot of a bench run, drawn again from its --json (e.g. one made on another machine)."""
    _require_matplotlib()
    try:
        with open(args.json) as f:
            report = json.load(f)
        meta, rows = report["meta"], report["rows"]
        bandwidth = meta["copy_bandwidth_GBps"] * 1e9
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{args.json} is not the --json of a bench run: {error!r}") from None
    if not any("error" not in r for r in rows):
        raise UsageError(f"{args.json} holds no measured rows")
    _plot(rows, bandwidth, meta, args.png)
    return 0


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'fused-sched[plot]'") from None


def _plot(rows, bandwidth, meta, path) -> None:
    """Latency against bytes moved per step, one panel per scheduler and dtype, one line per
    implementation, and the copy-bandwidth roofline (bytes / measured copy bandwidth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]  # failed cases have no times
    panels = sorted({(r["scheduler"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (kind, dtype) in zip(axes[0], panels):
        subset = [r for r in rows if r["scheduler"] == kind and r["dtype"] == dtype]
        sizes = sorted({r["bytes_per_step"] for r in subset})
        for backend in sorted({r["backend"] for r in subset}):
            points = sorted((r["bytes_per_step"], r["median_us"]) for r in subset if r["backend"] == backend)
            baseline = backend in ("diffusers", COMPILED)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="s" if baseline else "o",
                    linestyle=":" if baseline else "-", label=backend)
        ax.plot(sizes, [b / bandwidth * 1e6 for b in sizes], "k--", label="copy roofline")
        ax.set(xscale="log", yscale="log", xlabel="bytes moved per step", ylabel="median step time (us)",
               title=f"{kind} {dtype}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, torch {meta['torch']}, {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _failed_row(kind, shape_name, shape, dtype_name, backend, error) -> dict:
    """An implementation that could not be timed in a case, and why."""
    return dict(scheduler=kind, shape=shape_name, dims=list(shape), dtype=dtype_name, backend=backend,
                error=error_summary(error))


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)


def _row(kind, shape_name, shape, dtype_name, backend, timing, baseline, compiled, moved, bandwidth):
    """One implementation in one case. ``compiled`` is the case's torch.compile baseline: a
    Timing, or the reason it did not run (then its fields are null and the reason is given)."""
    achieved = moved / timing.median_s
    ran = isinstance(compiled, Timing)
    return dict(scheduler=kind, shape=shape_name, dims=list(shape), dtype=dtype_name, backend=backend,
                median_us=timing.median_s * 1e6, iqr_us=timing.spread_s * 1e6, samples=timing.samples,
                speedup_vs_diffusers=baseline.median_s / timing.median_s,
                compiled_median_us=compiled.median_s * 1e6 if ran else None,
                compiled_iqr_us=compiled.spread_s * 1e6 if ran else None,
                compiled_compile_s=compiled.compile_s if ran else None,
                speedup_vs_compiled=compiled.median_s / timing.median_s if ran else None,
                compiled_unavailable=None if ran else compiled,
                bytes_per_step=moved, achieved_GBps=achieved / 1e9,
                percent_of_copy_bandwidth=100 * achieved / bandwidth)


def _print_table(rows, device, bandwidth, load=None, compile_skipped=False) -> None:
    busy = "" if load is None else f", load average {load:.2f} on {os.cpu_count()} CPUs at start"
    print(f"device {device}, measured copy bandwidth {bandwidth / 1e9:.1f} GB/s{busy}")
    header = f"{'scheduler':<18} {'shape':<14} {'dtype':<5} {'backend':<13} {'median us':>10} {'IQR us':>8} " \
             f"{'vs diffusers':>12} {'vs compiled':>11} {'GB/s':>8} {'% copy':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['scheduler']:<18} {r['shape']:<14} {r['dtype']:<5} {r['backend']:<13} FAILED: {r['error']}")
            continue
        vs_compiled = "-" if r["speedup_vs_compiled"] is None else f"{r['speedup_vs_compiled']:.2f}x"
        print(f"{r['scheduler']:<18} {r['shape']:<14} {r['dtype']:<5} {r['backend']:<13} {r['median_us']:>10.1f} "
              f"{r['iqr_us']:>8.1f} {r['speedup_vs_diffusers']:>11.2f}x {vs_compiled:>11} {r['achieved_GBps']:>8.2f} "
              f"{r['percent_of_copy_bandwidth']:>6.1f}%")
        if r["backend"] == "diffusers" and r["compiled_unavailable"] is not None and not compile_skipped:
            print(f"{r['scheduler']:<18} {r['shape']:<14} {r['dtype']:<5} {COMPILED:<13} "
                  f"unavailable: {r['compiled_unavailable']}")
    print("vs X = X's median / this row's median.")
    print(f"{COMPILED} = the fused scheduler's step with its op replaced by torch.compile (inductor) of the "
          "pure-torch\nreference op; compilation is not timed (its duration: compiled_compile_s in --json).")
    if compile_skipped:
        print(f"{COMPILED} baseline: {SKIPPED}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fused-sched", description="Fused diffusers schedulers: bench, verify, info, plot")
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="versions, device, backends and why any is unavailable")
    info.add_argument("--device")
    verify = sub.add_parser("verify", help="whole trajectories vs diffusers, max error per backend")
    verify.add_argument("--scheduler", default="ddim,dpm++2m,cogvideox-ddim",
                        help=f"comma-separated, from: {', '.join(SCHEDULERS)}")
    verify.add_argument("--steps", type=int, default=20)
    verify.add_argument("--device")
    bench = sub.add_parser("bench", help="step latency: schedulers x backends x shapes x dtypes vs diffusers' step "
                                         "and torch.compile of the reference step")
    bench.add_argument("--scheduler", help=f"comma-separated, from: {', '.join(SCHEDULERS)}")
    bench.add_argument("--backend", help="comma-separated backends (default: every available one)")
    bench.add_argument("--shape", help=f"comma-separated presets ({', '.join(SHAPES)}) or dims like 1x4x64x64")
    bench.add_argument("--dtype", help=f"comma-separated, from: {', '.join(DTYPES)}")
    bench.add_argument("--steps", type=int, default=20, help="length of the schedule the step is taken from")
    bench.add_argument("--repeats", type=int, default=30)
    bench.add_argument("--device")
    bench.add_argument("--json", help="write the rows and metadata to this file")
    bench.add_argument("--plot", help="write latency vs bytes moved, with the roofline, to this PNG")
    bench.add_argument("--no-compile-baseline", action="store_true",
                       help="skip the torch.compile baseline (it compiles each case: seconds per case)")
    plot = sub.add_parser("plot", help="draw a bench run's --plot from its --json")
    plot.add_argument("json", help="the --json file of a bench run")
    plot.add_argument("png", help="the PNG to write")
    args = parser.parse_args(argv)
    command = args.command or "bench"
    if args.command is None:
        args = parser.parse_args(["bench"] + (argv or []))
    try:
        return {"info": cmd_info, "verify": cmd_verify, "bench": cmd_bench, "plot": cmd_plot}[command](args)
    except UsageError as error:
        print(f"fused-sched: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
