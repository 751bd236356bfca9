"""`fused-sched` as a user runs it: well-formed output, clear errors, non-zero exits."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fused_sched", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info_lists_every_backend():
    out = run("info")
    assert out.returncode == 0, out.stderr
    for name in ("torch", "cpu", "cuda", "triton"):
        assert f" {name} " in out.stdout
    # where the compiled backends' module loaded, info says which one and from where
    assert ("extension: " in out.stdout) == bool(re.search(r" cpu +available", out.stdout))


COMPILED_FIELDS = ("compiled_median_us", "compiled_iqr_us", "compiled_compile_s", "speedup_vs_compiled")


def _inductor_should_compile() -> bool:
    """Where inductor has what it needs (a GPU, or a C++ compiler for its CPU code), the
    torch.compile baseline must run; elsewhere it may be reported unavailable."""
    return torch.cuda.is_available() or any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))


def test_bench_json_and_plot_are_well_formed(tmp_path, capsys):
    path, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    out = run("bench", "--scheduler", "ddim,dpm++2m", "--shape", "tiny,2x4x16x16", "--backend", "torch",
              "--repeats", "3", "--no-compile-baseline", "--json", str(path), "--plot", str(plot))
    assert out.returncode == 0, out.stderr
    report = json.loads(path.read_text())
    assert {"date", "device", "torch", "diffusers", "fused_sched", "copy_bandwidth_GBps"} <= set(report["meta"])
    rows = report["rows"]
    assert sorted((r["scheduler"], r["shape"], r["backend"]) for r in rows) == sorted(
        (k, s, b) for k in ("ddim", "dpm++2m") for s in ("tiny", "2x4x16x16") for b in ("diffusers", "torch"))
    for r in rows:
        assert r["median_us"] > 0 and r["samples"] == 3 and r["bytes_per_step"] > 0
        assert r["speedup_vs_diffusers"] > 0 and r["percent_of_copy_bandwidth"] > 0
        # skipped on request: the baseline's fields are there, null, with the reason
        assert all(r[field] is None for field in COMPILED_FIELDS)
        assert "--no-compile-baseline" in r["compiled_unavailable"]
    assert "vs diffusers" in out.stdout and "skipped (--no-compile-baseline)" in out.stdout  # the terminal table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same figure drawn again from the JSON alone (a GPU session brings back JSON), in
    # process: the subprocess above has shown the entry point.
    from fused_sched import __main__ as cli

    replot = tmp_path / "replot.png"
    assert cli.main(["plot", str(path), str(replot)]) == 0
    assert replot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", str(plot), str(replot)]) == 2  # not a bench JSON: a usage error naming the file
    stderr = capsys.readouterr().err
    assert "is not the --json of a bench run" in stderr and str(plot) in stderr


def test_bench_compile_baseline_fields(tmp_path):
    """One case, one compile: the torch.compile baseline has its own row and every row its fields."""
    path, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    out = run("bench", "--scheduler", "ddim", "--shape", "tiny", "--backend", "torch", "--repeats", "3",
              "--json", str(path), "--plot", str(plot))
    assert out.returncode == 0, out.stderr
    rows = json.loads(path.read_text())["rows"]
    reason = rows[0]["compiled_unavailable"]
    assert all(r["compiled_unavailable"] == reason for r in rows)
    if reason is None:
        assert [r["backend"] for r in rows] == ["diffusers", "torch.compile", "torch"]
        compiled = rows[1]
        assert compiled["samples"] == 3 and compiled["median_us"] > 0 and compiled["iqr_us"] >= 0
        assert compiled["speedup_vs_compiled"] == 1.0 and compiled["speedup_vs_diffusers"] > 0
        for r in rows:
            assert r["compiled_median_us"] == compiled["median_us"] and r["compiled_iqr_us"] == compiled["iqr_us"]
            assert r["compiled_compile_s"] > 0
            assert r["speedup_vs_compiled"] == pytest.approx(compiled["median_us"] / r["median_us"])
        assert "torch.compile" in out.stdout and "vs compiled" in out.stdout
    else:
        assert not _inductor_should_compile(), f"torch.compile baseline unavailable: {reason}"
        assert [r["backend"] for r in rows] == ["diffusers", "torch"]
        assert isinstance(reason, str) and reason and all(r[f] is None for r in rows for f in COMPILED_FIELDS)
        assert f"unavailable: {reason}" in out.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_reports_a_baseline_that_does_not_compile(tmp_path, monkeypatch, capsys):
    """A case torch.compile fails on is a row saying so, with the reason, and null fields."""
    from fused_sched import __main__ as cli, benchmark

    def no_compiler(graph, example_inputs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler (simulated)")

    monkeypatch.setattr(benchmark, "COMPILE_BACKEND", no_compiler)
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--scheduler", "ddim", "--shape", "tiny", "--backend", "torch", "--repeats", "3",
                     "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["diffusers", "torch"]
    for r in rows:
        assert all(r[field] is None for field in COMPILED_FIELDS)
        assert "InvalidCxxCompiler: no working C++ compiler (simulated)" in r["compiled_unavailable"]
    table = capsys.readouterr().out
    assert "torch.compile" in table and "unavailable: torch.compile failed: RuntimeError: InvalidCxxCompiler" in table


def test_bench_keeps_going_past_a_case_that_fails(tmp_path, monkeypatch, capsys):
    """An implementation that raises in one case, while it is made or in its turns, is a row
    with the error; the run goes on to the other implementations and cases, and the report is
    complete (and can be plotted)."""
    from fused_sched import __main__ as cli

    make = cli.contender

    def failing(kind, which, *args, **kwargs):
        made = make(kind, which, *args, **kwargs)
        if kind == "ddim" and which == "fused":
            def launch_fails():
                raise RuntimeError("kernel launch failed (simulated)")

            made.step = launch_fails
        if kind == "dpm++2m" and which == "diffusers":
            raise ValueError("diffusers cannot run this (simulated)")
        return made

    monkeypatch.setattr(cli, "contender", failing)
    path, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["bench", "--scheduler", "ddim,dpm++2m,ddim-inverse", "--shape", "tiny", "--backend", "torch",
                     "--repeats", "3", "--no-compile-baseline", "--json", str(path)]) == 0
    rows = {(r["scheduler"], r["backend"]): r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {(k, b) for k in ("ddim", "dpm++2m", "ddim-inverse") for b in ("diffusers", "torch")}
    assert rows["ddim", "torch"]["error"] == "RuntimeError: kernel launch failed (simulated)"
    assert "error" not in rows["ddim", "diffusers"] and rows["ddim", "diffusers"]["median_us"] > 0
    assert all(rows["dpm++2m", b]["error"] == "ValueError: diffusers cannot run this (simulated)"
               for b in ("diffusers", "torch"))
    assert all("error" not in rows["ddim-inverse", b] for b in ("diffusers", "torch"))
    assert "FAILED: RuntimeError: kernel launch failed (simulated)" in capsys.readouterr().out
    assert cli.main(["plot", str(path), str(plot)]) == 0 and plot.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "bench.json.partial").exists()


def test_verify_passes_on_every_backend_available_here():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kinds = ("ddim", "dpm++2m", "cogvideox-dpm")
    out = run("verify", "--scheduler", ",".join(kinds), "--steps", "10", "--device", device)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout
    from fused_sched import ops

    available = [name for name, reason in ops.availability(torch.device(device)).items()
                 if reason is None and name != "cuda-emulator"]  # the tests' own backend, unknown to the CLI
    assert {"torch", "cpu" if device == "cpu" else "cuda"} <= set(available)
    for kind in kinds:
        for name in available:  # verify reports an unavailable backend as skipped, which must not pass here
            assert re.search(rf"^{re.escape(kind)} +{name} +max rel error .* ok$", out.stdout, re.M), (kind, name)


@pytest.mark.parametrize("args,message", [
    (("bench", "--scheduler", "nope"), "--scheduler 'nope' is not one of"),
    (("bench", "--backend", "nope"), "--backend 'nope' is not one of"),
    (("bench", "--shape", "1x"), "--shape '1x'"),
    (("bench", "--dtype", "fp8"), "--dtype 'fp8' is not one of"),
    (("verify", "--scheduler", "nope"), "--scheduler 'nope' is not one of"),
])
def test_bad_arguments_exit_non_zero_without_traceback(args, message, capsys):
    # In process (a subprocess costs seconds of imports; `python -m fused_sched` itself is
    # run by the tests above): any exception but the usage exit would propagate and fail here.
    from fused_sched import __main__ as cli

    try:
        code = cli.main(list(args))
    except SystemExit as usage_exit:
        code = usage_exit.code
    assert code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr
