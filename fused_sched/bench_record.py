"""What a benchmark run records besides its timings: the JSON file, and the facts about the
run that a number needs to be read later (commit, GPU driver and clocks).

Light on purpose (no diffusers, no torch._inductor): the kernel benchmark needs neither.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

# The commit the run measured: a device run gets the working tree without .git, so the
# calling command passes it (bench/gpu_session.sh's header shows how).
COMMIT_VARIABLE = "FUSED_SCHED_COMMIT"


def write_report(path: str, meta: dict, rows: list) -> None:
    """A bench run's JSON, ``{"meta": ..., "rows": ...}``, replaced whole: rewritten after
    every case, a run cut short (killed at a time limit, say) leaves a complete file."""
    temporary = f"{path}.partial"
    with open(temporary, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    os.replace(temporary, path)


def commit() -> str | None:
    """The commit measured: FUSED_SCHED_COMMIT, else ``git rev-parse HEAD`` where a checkout
    has one (a working tree with changes says so), else None."""
    given = os.environ.get(COMMIT_VARIABLE)
    if given:
        return given
    git = shutil.which("git")
    if git is None:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run([git, "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run([git, "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def gpu_state() -> dict | None:
    """The driver version and the SM clocks (now and at most) as nvidia-smi reports them
    (a GPU that idles at a low clock when the run starts says so here), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    fields = ("driver_version", "clocks.sm", "clocks.max.sm", "temperature.gpu", "power.draw")
    try:
        out = subprocess.run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values))


def run_facts() -> dict:
    """The facts every benchmark JSON's meta carries besides its own."""
    return dict(commit=commit(), gpu_state=gpu_state())
