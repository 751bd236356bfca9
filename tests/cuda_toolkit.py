"""Where the CUDA toolkit is, for the tests that compile csrc/cuda without a GPU.

CI sets FUSED_SCHED_REQUIRE_NVCC=1: there a missing toolkit fails the run (these tests
are what keeps the CUDA sources from rotting unseen on GPU-less machines); elsewhere the
tests that need it are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
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

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_headers = pytest.mark.skipif(
    INCLUDE is None, reason="no cuda_runtime_api.h found next to nvcc, under CUDA_HOME or in /usr/local/cuda"
)
