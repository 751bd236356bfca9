"""bench/gpu_session.sh, the runbook of a session lent a GPU, asks its tools only for what
they accept: such a session is rare and short, and a misspelt scheduler or shape there
costs its benchmarks. Checked here without a GPU: the script's syntax, and every
scheduler, shape, dtype and backend it passes to `fused_sched bench` and
bench/bench_kernels.py."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from fused_sched import __main__ as cli
from fused_sched import benchmark

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "bench" / "gpu_session.sh"


def _bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _invocations(tool: str) -> list[dict[str, str]]:
    """The options of every command line of the runbook that runs ``tool`` (continuation
    lines joined; shell variables left as they are)."""
    text = RUNBOOK.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if tool not in line or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line.split("||")[0], comments=True)
        found.append({w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")})
    return found


def test_the_runbook_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    result = subprocess.run([bash, "-n", str(RUNBOOK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_fused_sched_bench_is_asked_for_what_it_knows():
    invocations = _invocations("-m fused_sched bench")
    assert len(invocations) >= 2  # the fused steps against diffusers, and the compile baseline
    for options in invocations:
        if "--scheduler" in options:
            cli._choices(options["--scheduler"], benchmark.SCHEDULERS, "--scheduler")
        if "--dtype" in options:
            cli._choices(options["--dtype"], benchmark.DTYPES, "--dtype")
        for shape in options.get("--shape", "").split(","):
            if shape:
                cli._shape(shape)
    # the issues' latents and dtypes, in the run against diffusers
    wanted = next(o for o in invocations if o.get("--json", "").endswith("-steps.json"))
    assert [cli._shape(s)[1] for s in wanted["--shape"].split(",")] == [
        (1, 13, 16, 60, 90), (1, 16, 21, 90, 160), (2, 16, 33, 90, 160)]
    assert set(wanted["--dtype"].split(",")) == {"fp32", "bf16"}


def test_bench_kernels_is_asked_for_what_it_knows():
    module = _bench_kernels()
    (options,) = _invocations("bench/bench_kernels.py")
    shapes = dict(module.SHAPES)
    assert [shapes[label] for label in options["--shape"].split(",")] == [
        (1, 13, 16, 60, 90), (1, 16, 21, 90, 160), (2, 16, 33, 90, 160)]
    assert set(options["--dtype"].split(",")) == {"fp32", "bf16"} <= set(module.DTYPES)
    assert options["--backend"] == "$backends"
    assert re.search(r"^backends=cuda,triton$", RUNBOOK.read_text(), re.M)
