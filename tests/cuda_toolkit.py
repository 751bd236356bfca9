"""Where the CUDA toolkit is, for the tests that compile csrc/cuda without a GPU.

CI sets FUSED_SCHED_REQUIRE_NVCC=1: there a missing toolkit fails the run (these tests
are what keeps the CUDA sources from rotting unseen on GPU-less machines); elsewhere the
tests that need it are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


NVCC = _find_nvcc()


def _find_include() -> Path | None:
    # nvcc may be a wrapper script outside the toolkit, so look in the usual places too.
    candidates = [Path(h) / "include" for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    if NVCC is not None:
        candidates.append(Path(NVCC).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime_api.h").is_file()), None)


INCLUDE = _find_include()

if os.environ.get("FUSED_SCHED_REQUIRE_NVCC") == "1":
    if NVCC is None:
        raise RuntimeError("FUSED_SCHED_REQUIRE_NVCC=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if INCLUDE is None:
        raise RuntimeError("FUSED_SCHED_REQUIRE_NVCC=1 but the toolkit's cuda_runtime_api.h was not found")



def _find_nvdisasm() -> str | None:
    """The toolkit's nvdisasm, else the one Triton ships (CI's toolkit is nvcc alone)."""
    found = shutil.which("nvdisasm") or (str(Path(NVCC).resolve().parent / "nvdisasm") if NVCC else None)
    if found and Path(found).is_file():
        return found
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    bundled = Path(nvidia.__file__).parent / "bin" / "nvdisasm"
    return str(bundled) if bundled.is_file() else None


NVDISASM = _find_nvdisasm()


def sass_instructions(cubin: Path) -> list[str]:
    """The machine instructions of a cubin, in order, without addresses, encodings, labels
    or directives: what two builds of the same code are compared by."""
    if NVDISASM is None:
        raise RuntimeError("no nvdisasm (CUDA toolkit or Triton's bundled copy)")
    listing = subprocess.run([NVDISASM, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    lines = [re.sub(r"/\*.*?\*/", "", line).strip().rstrip(";").strip() for line in listing.splitlines()]
    return [line for line in lines if line and not line.startswith(".") and not line.endswith(":")]


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_headers = pytest.mark.skipif(
    INCLUDE is None, reason="no cuda_runtime_api.h found next to nvcc, under CUDA_HOME or in /usr/local/cuda"
)
