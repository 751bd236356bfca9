"""csrc/cuda's kernels compiled for the CPU and run by a CUDA emulator (cuda_emulator.h).

``load_backend()`` builds (ninja, cached) a module from every ``csrc/cuda/*.cu``, each
compiled by the host compiler after ``cuda_emulator.h`` with FUSED_SCHED_CUDA_EMULATOR
defined, plus the launch arguments of ``csrc/cuda/launch_arguments.h`` and bindings of
the compiled backends' signatures, and returns it as a fused_sched ``CompiledBackend``
named ``cuda-emulator`` that takes CPU tensors. Tests drive it exactly as they drive the
``cpu`` backend; what the emulation does and does not show is in cuda_emulator.h.

Everything is compiled with UndefinedBehaviorSanitizer: what a GPU would fault on or
miscompute in silence (a misaligned vector access, a shift past the word, an index out of a
shared array, signed overflow) is reported where the emulated kernel does it.
``undefined_behaviour_reports()`` returns the reports so far (the tests' conftest fails any
test after which there is one). A misaligned vector access also faults on x86, as on a GPU:
the process dies naming the test (faulthandler) and the report stays in
``build_directory()/ubsan.<pid>``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path

import torch

from fused_sched.ops import extension

import cuda_toolkit

HERE = Path(__file__).resolve().parent
CUDA_SOURCES = extension.CSRC / "cuda"
NAME = "fused_sched_cuda_emulator"
# vptr needs RTTI of every polymorphic type torch's headers touch; the kernels have none.
SANITIZE = ["-fsanitize=undefined", "-fno-sanitize=vptr"]


def build_directory() -> Path:
    # Next to the extension's cache, so CI's cache and FUSED_SCHED_BUILD_DIR cover both.
    extension_directory = extension.build_directory(False)
    return extension_directory.with_name(extension_directory.name + "_cuda_emulator")


def _translation_units(directory: Path) -> list[Path]:
    """One host-compiled unit per .cu (their anonymous namespaces must stay apart)."""
    units = []
    for source in sorted(CUDA_SOURCES.glob("*.cu")):
        unit = directory / f"emulated_{source.stem}.cpp"
        text = f'#include "cuda_emulator.h"\n#include "{source}"\n'
        # Rewritten only when it changes, so ninja's cache stays valid.
        if not unit.is_file() or unit.read_text() != text:
            unit.write_text(text)
        units.append(unit)
    return units


def __getattr__(name: str):
    # ``BACKEND``, resolved lazily as fused_sched's registry resolves its backends: the
    # registry of the tests (conftest.py) names it ``cuda_emulator:BACKEND``.
    if name == "BACKEND":
        if torch.cuda.is_available():
            # It stands in for a GPU; where there is one, the cuda backend runs the tests on it.
            return extension.UnavailableBackend(
                "cuda-emulator", "a GPU is present: the cuda backend runs csrc/cuda's kernels on it")
        if cuda_toolkit.INCLUDE is None:
            return extension.UnavailableBackend(
                "cuda-emulator", "the CUDA toolkit's headers were not found (set CUDA_HOME or put nvcc on PATH)")
        return load_backend(cuda_toolkit.INCLUDE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def schedule(order: str, seed: int = 0):
    """Launches in the block now run their blocks, and each block its threads, in this order
    ('in-order', 'reversed', or 'shuffled' by ``seed``; see runtime.cpp); in order after."""
    module = load_backend(cuda_toolkit.INCLUDE).module
    module.set_schedule(order, seed)
    try:
        yield
    finally:
        module.set_schedule("in-order", 0)


def _report_prefix() -> Path:
    return build_directory() / "ubsan"


def undefined_behaviour_reports() -> list[str]:
    """The sanitizer's reports from this process since the last call (each is removed once
    read). The sanitizer reports each place in the code once per process."""
    reports = []
    for path in sorted(build_directory().glob(f"ubsan.{os.getpid()}*")):
        reports.append(path.read_text())
        path.unlink()
    return reports


@functools.cache
def load_backend(cuda_include: Path):
    """The emulated kernels as a CompiledBackend over CPU tensors (built on first use)."""
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    # Where the sanitizer writes its reports (runtime.cpp, __ubsan_default_options).
    os.environ["FUSED_SCHED_EMULATOR_UBSAN_LOG"] = str(_report_prefix())
    start = time.perf_counter()
    module = cpp_extension.load(
        name=NAME,
        sources=[str(p) for p in _translation_units(directory)]
        + [str(HERE / name) for name in ("runtime.cpp", "selftest.cpp", "bindings.cpp")],
        # The kernels' step math takes its host branch here: it needs the cpu backend's
        # -ffp-contract=off to round as the reference does.
        extra_cflags=extension.CXX_FLAGS + SANITIZE + ["-DFUSED_SCHED_CUDA_EMULATOR"],
        extra_include_paths=[str(extension.CSRC / "include"), str(CUDA_SOURCES), str(HERE), str(cuda_include)],
        # Calls to the emulated runtime (cudaGetLastError, ...) bind to runtime.cpp's own
        # definitions: a CUDA build of torch loads the real libcudart into the global symbol
        # scope, which would otherwise take them (and report no driver on a GPU-less host).
        extra_ldflags=SANITIZE + ["-Wl,-Bsymbolic"],
        build_directory=str(directory),
        verbose=False,
    )
    print(f"\nfused_sched CUDA emulator ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    backend = extension.CompiledBackend("cuda-emulator", "cpu", module.fused_step, module.threshold_scale,
                                        module.philox_bits)
    backend.module = module  # tests count its launches
    return backend
