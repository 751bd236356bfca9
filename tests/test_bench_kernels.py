"""bench/bench_kernels.py runs every case end to end, its GPU parts stood in for on the CPU.

The kernel benchmark runs only on a GPU, and a session lent one is rare: a Python error in
its loop (a misnamed argument, a noise kind it cannot build, a row it cannot write) would
cost that session its kernel numbers. Here the loop runs on CPU tensors with the cpu
backend, CUDA events replaced by the host clock and CUDA graphs by calling the captured
calls again; what is checked is that every case yields a complete row with the bytes the
module docstring defines, not any timing."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from conftest import require_backend

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (2, 4, 8, 8)


class HostClockEvent:
    def __init__(self, enable_timing=False):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end) -> float:
        return (end.time - self.time) * 1e3


@pytest.fixture
def bench_kernels(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class CalledAgain:
        """A CUDA graph of ``calls`` stood in for by the calls themselves."""

        def __init__(self, calls):
            for call in calls:
                call()
            self.calls, self.calls_per_run = calls, module.REPLAYS_PER_SAMPLE * len(calls)

        def run(self):
            for _ in range(module.REPLAYS_PER_SAMPLE):
                for call in self.calls:
                    call()

    monkeypatch.setattr(module, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(module, "SHAPES", [("tiny", SHAPE)])
    monkeypatch.setattr(module, "Replayed", CalledAgain)
    monkeypatch.setattr(module, "spin_up", lambda seconds=0.3: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", HostClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "stand-in")
    return module


def test_every_case_gives_a_complete_row(bench_kernels, tmp_path):
    require_backend("cpu")
    report = tmp_path / "kernels.json"
    bench_kernels.main(["--backend", "cpu", "--dtype", "fp32,bf16", "--shape", "tiny", "--repeats", "4",
                        "--cold-bytes", "100000", "--json", str(report)])
    written = json.loads(report.read_text())
    assert written["meta"]["device"] == "stand-in" and "commit" in written["meta"]
    rows = {(r["dtype"], r["step"]): r for r in written["rows"]}
    steps = [s[0] for s in bench_kernels.STEPS] + ["threshold_scale"]
    assert set(rows) == {(d, s) for d in ("fp32", "bf16") for s in steps}
    numel = torch.Size(SHAPE).numel()
    for (dtype, step), row in rows.items():
        assert "error" not in row, row
        assert row["kernel_us"] > 0 and row["call_us"] > 0, row
        if step == "threshold_scale":
            assert row["bytes"] == 2 * numel * {"fp32": 4, "bf16": 2}[dtype]
            continue
        assert row["fraction_of_copy"] > 0 and row["copy_gbps"] > 0, row
    # x, m, two history terms, prev and d at the storage dtype, and float32 noise: the SDE step
    assert rows["bf16", "dpm++3m-sde"]["bytes"] == numel * (6 * 2 + 4)
    assert rows["bf16", "ddim-eta"]["bytes"] == numel * 5 * 2  # x, m, z, prev, x0
    assert rows["bf16", "ddim-eta-philox"]["bytes"] == numel * 4 * 2  # no noise tensor
