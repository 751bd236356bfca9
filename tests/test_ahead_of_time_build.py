"""The opt-in ahead-of-time build: ``FUSED_SCHED_BUILD_EXT=1`` makes setup.py build the
extension (fused_sched._ext), and the package then loads that module instead of building
one itself. Compiles the CPU part with setuptools (about two minutes on two cores; CI's
xdist runs it beside other tests); the GPU session leaves it to CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process with the built folder added to the package's path, as an
# installed wheel would place the module; FUSED_SCHED_BUILD_DIR points at a folder that
# must stay empty (no JIT build).
LOAD_AND_STEP = """
import sys
import torch
import fused_sched
fused_sched.__path__.append(sys.argv[1])
from fused_sched import ops
from fused_sched.ops import extension, layout

module = extension.load_extension()
assert module.__name__ == "fused_sched._ext", module.__name__
assert module.__file__.startswith(sys.argv[1]), module.__file__
generator = torch.Generator().manual_seed(0)
x, m = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(2))
rows = torch.randn(2, layout.NUM_COEFFICIENTS, generator=generator)
for clip in ("none", "threshold"):
    compiled = ops.fused_step(x, m, rows, clip=clip, backend="cpu").prev_sample
    reference = ops.fused_step(x, m, rows, clip=clip, backend="torch").prev_sample
    # test_compiled_kernels.py holds the cpu kernels to the reference (bit-exact where ATen
    # has FMA); here the question is only whether the prebuilt module is those kernels
    torch.testing.assert_close(compiled, reference)
from fused_sched.__main__ import main
main(["info"])  # says which module it loaded
print("prebuilt ok")
"""


def test_setup_py_builds_the_extension_the_package_then_loads(tmp_path):
    lib, temp, jit = tmp_path / "lib", tmp_path / "temp", tmp_path / "jit"
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp", str(temp)],
        cwd=ROOT, env=subprocess_env(FUSED_SCHED_BUILD_EXT="1"), capture_output=True, text=True, timeout=1200,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert len(list((lib / "fused_sched").glob("_ext*.so"))) == 1

    run = subprocess.run([sys.executable, "-c", LOAD_AND_STEP, str(lib / "fused_sched")], cwd=ROOT,
                         env=subprocess_env(FUSED_SCHED_BUILD_DIR=str(jit)), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "prebuilt ok" in run.stdout, run.stdout + run.stderr
    assert "building the C++ extension" not in run.stderr
    assert f"extension: prebuilt, {lib / 'fused_sched'}" in run.stdout
    assert not jit.exists() or not any(jit.iterdir())
