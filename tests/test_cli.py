"""`fused-sched` as a user runs it: well-formed output, clear errors, non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fused_sched", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info_lists_every_backend():
    out = run("info")
    assert out.returncode == 0, out.stderr
    for name in ("torch", "cpu", "cuda", "triton"):
        assert f" {name} " in out.stdout


def test_bench_json_and_plot_are_well_formed(tmp_path):
    path, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    out = run("bench", "--scheduler", "ddim,dpm++2m", "--shape", "tiny,2x4x16x16", "--backend", "torch",
              "--repeats", "3", "--json", str(path), "--plot", str(plot))
    assert out.returncode == 0, out.stderr
    report = json.loads(path.read_text())
    assert {"date", "device", "torch", "diffusers", "fused_sched", "copy_bandwidth_GBps"} <= set(report["meta"])
    rows = report["rows"]
    assert sorted((r["scheduler"], r["shape"], r["backend"]) for r in rows) == sorted(
        (k, s, b) for k in ("ddim", "dpm++2m") for s in ("tiny", "2x4x16x16") for b in ("diffusers", "torch"))
    for r in rows:
        assert r["median_us"] > 0 and r["samples"] == 3 and r["bytes_per_step"] > 0
        assert r["speedup_vs_diffusers"] > 0 and r["percent_of_copy_bandwidth"] > 0
    assert "speedup" in out.stdout  # the terminal table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_passes():
    out = run("verify", "--scheduler", "ddim,dpm++2m,cogvideox-dpm", "--steps", "10")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" ok") >= 3 and "FAIL" not in out.stdout


@pytest.mark.parametrize("args,message", [
    (("bench", "--scheduler", "nope"), "--scheduler 'nope' is not one of"),
    (("bench", "--backend", "nope"), "--backend 'nope' is not one of"),
    (("bench", "--shape", "1x"), "--shape '1x'"),
    (("bench", "--dtype", "fp8"), "--dtype 'fp8' is not one of"),
    (("verify", "--scheduler", "nope"), "--scheduler 'nope' is not one of"),
])
def test_bad_arguments_exit_non_zero_without_traceback(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
