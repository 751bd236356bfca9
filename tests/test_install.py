"""Installing fused_sched as users do: an sdist of the project, a wheel built from it, that
wheel installed into a folder of its own and imported from there, never from the checkout.

A plain wheel carries the C++/CUDA sources inside the package, and the extension is built
just in time from them on first use. ``FUSED_SCHED_BUILD_EXT=1`` builds it ahead of time
into the wheel (``fused_sched._ext``), and the package then loads that module instead of
building one. Each test compiles the CPU part once (one to two minutes on two cores; CI's
xdist runs them beside other tests); the GPU session leaves them to CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
# What an sdist is made from: the packaging files, the package and its sources.
PROJECT = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "fused_sched", "csrc")

# Run from the installed folder: the package and the module it loads must come from there,
# the compiled kernels must be the reference's (test_compiled_kernels.py holds them to it
# bit-exactly where ATen has FMA; here the question is only which module runs), and
# `fused-sched info` says which module it loaded.
LOAD_AND_STEP = """
import sys
from pathlib import Path
import torch
import fused_sched
from fused_sched import ops
from fused_sched.ops import extension, layout
from fused_sched.__main__ import main

site, expected_module_folder = Path(sys.argv[1]), Path(sys.argv[2])
assert Path(fused_sched.__file__).is_relative_to(site), fused_sched.__file__
{checks}
module = extension.load_extension()
assert Path(module.__file__).is_relative_to(expected_module_folder), module.__file__
generator = torch.Generator().manual_seed(0)
x, m = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(2))
rows = torch.randn(2, layout.NUM_COEFFICIENTS, generator=generator)
for clip in ("none", "threshold"):
    compiled = ops.fused_step(x, m, rows, clip=clip, backend="cpu").prev_sample
    reference = ops.fused_step(x, m, rows, clip=clip, backend="torch").prev_sample
    torch.testing.assert_close(compiled, reference)
main(["info"])
print("installed ok")
"""

# A plain wheel: no prebuilt module, and the sources the JIT build reads are the package's
# own copy of the checkout's csrc/, every file of it, byte for byte.
SOURCES_SHIPPED = """
import filecmp, importlib.util
checkout = Path(sys.argv[3])
assert importlib.util.find_spec(extension.PREBUILT_MODULE) is None, "a plain wheel has no prebuilt module"
assert extension.CSRC == site / "fused_sched" / "csrc", extension.CSRC
files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
assert files(extension.CSRC) == files(checkout), (files(extension.CSRC), files(checkout))
_, differ, unreadable = filecmp.cmpfiles(extension.CSRC, checkout, files(checkout), shallow=False)
assert not differ and not unreadable, (differ, unreadable)
assert all(Path(p).is_relative_to(extension.CSRC) for p in extension.extension_sources(with_cuda=True))
"""


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("project")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in PROJECT:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=source)
    (archive,) = dist.glob("*.tar.gz")
    return archive


def _run(command, timeout=1200, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    shown = " ".join(a if len(a) < 200 else "<script>" for a in command)
    assert done.returncode == 0, f"{shown}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _install_wheel(sdist: Path, folder: Path, **variables) -> Path:
    """Builds the wheel from ``sdist`` (with the torch of this environment, as the README's
    --no-build-isolation install does) and installs it into ``folder/site``."""
    wheels, site = folder / "wheels", folder / "site"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(sdist)], env=subprocess_env(**variables))
    (wheel,) = wheels.glob("*.whl")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel)])
    return site


def _run_installed(site: Path, script: str, *arguments, jit_folder: Path) -> subprocess.CompletedProcess:
    # Only the installed folder and what else the environment provides (a GPU session's
    # carried packages, say): the checkout is neither on the path nor the working folder.
    others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(site), *others]), FUSED_SCHED_BUILD_DIR=str(jit_folder))
    return _run([sys.executable, "-c", script, str(site), *map(str, arguments)], cwd=site.parent, env=env, timeout=600)


def test_a_plain_wheel_carries_the_sources_and_builds_the_extension_from_them(sdist, tmp_path):
    site, jit = _install_wheel(sdist, tmp_path), tmp_path / "jit"
    script = LOAD_AND_STEP.format(checks=SOURCES_SHIPPED)
    run = _run_installed(site, script, jit, ROOT / "csrc", jit_folder=jit)
    assert "installed ok" in run.stdout, run.stdout + run.stderr
    assert "fused_sched: building the C++ extension" in run.stderr  # announced
    assert f"extension: built just in time, {jit}" in run.stdout


def test_a_wheel_built_ahead_of_time_loads_its_prebuilt_module(sdist, tmp_path):
    site, jit = _install_wheel(sdist, tmp_path, FUSED_SCHED_BUILD_EXT="1"), tmp_path / "jit"
    assert len(list((site / "fused_sched").glob("_ext*.so"))) == 1
    run = _run_installed(site, LOAD_AND_STEP.format(checks=""), site / "fused_sched", jit_folder=jit)
    assert "installed ok" in run.stdout, run.stdout + run.stderr
    assert "building the C++ extension" not in run.stderr
    assert f"extension: prebuilt, {site / 'fused_sched'}" in run.stdout
    assert not jit.exists() or not any(jit.iterdir())  # nothing was built just in time
