"""What registering the fused op with torch.library costs an eager call.

The public op (``fused_sched.ops.fused_step``) dispatches in Python when eager and goes
through the registered custom op ``fused_sched::fused_step`` only under torch.compile. This
times, side by side on a tiny latent (so the arithmetic is negligible), one eager call of:

    direct      ops.fused_step (what schedulers call)
    custom-op   torch.ops.fused_sched.fused_step (the registered op, called eagerly)

with the same backend and arguments, and reports the difference: the price an eager step
would pay if it always went through the dispatcher.

    python bench/dispatch_overhead.py [--backend torch] [--device cpu] [--json bench/results/cpu-dispatch-overhead.json]

On a GPU (``--device cuda --backend triton``, as bench/gpu_session.sh runs it) a tiny step's
kernel is shorter than its launch, so the times are the host's, the dispatcher's included.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import time

import torch

import fused_sched
from fused_sched import bench_record, ops
from fused_sched.benchmark import device_name
from fused_sched.ops import compiled, layout as L


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _median_us(fn, repeats: int, sync, inner: int = 200) -> tuple[float, float]:
    for _ in range(inner):
        fn()
    samples = []
    for _ in range(repeats):
        # On a GPU the calls are asynchronous: each block starts on an idle device and ends
        # when its last kernel has run, so no block is charged for another's queue.
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner * 1e6)
    quartiles = statistics.quantiles(samples, n=4)
    return statistics.median(samples), quartiles[2] - quartiles[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()

    device = torch.device(args.device)
    x, m = (torch.randn(1, 4, 8, 8, device=device) for _ in range(2))
    rows = torch.rand(1, L.NUM_COEFFICIENTS, device=device)
    f32 = torch.float32

    def direct():
        return ops.fused_step(x, m, rows, out_dtype=f32, x0_dtype=f32, backend=args.backend)

    def custom_op():
        return torch.ops.fused_sched.fused_step(x, m, rows, [], None, "none", 1.0, 0.995, 1.0, f32, None, f32,
                                                args.backend, *compiled.constant_columns_arguments(None))

    assert torch.equal(direct()[0], custom_op()[0])  # same op, same result: only the path differs
    rows_out = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, fn in (("direct", direct), ("custom-op", custom_op)):
        median, spread = _median_us(fn, args.repeats, sync)
        rows_out[name] = dict(median_us=median, iqr_us=spread)
        print(f"{name:<10} {median:8.2f} us  (IQR {spread:.2f})")
    added = rows_out["custom-op"]["median_us"] - rows_out["direct"]["median_us"]
    print(f"the dispatcher adds {added:.2f} us per eager call")
    if args.json:
        name = device_name(device)
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=f"{device.type}: {name}, {torch.get_num_threads()} threads", torch=torch.__version__,
                    cuda=torch.version.cuda, triton=_triton_version(), fused_sched=fused_sched.__version__,
                    python=platform.python_version(), backend=args.backend, shape=[1, 4, 8, 8],
                    **bench_record.run_facts())
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows_out, dispatcher_added_us=added), f, indent=2)


if __name__ == "__main__":
    main()
