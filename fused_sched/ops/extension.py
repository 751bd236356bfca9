"""The compiled backends ``cpu`` and ``cuda``: the C++/CUDA kernels of ``csrc/``.

Nothing here builds at import. The registry asks for ``CPU_BACKEND`` / ``CUDA_BACKEND``
(module attributes resolved lazily, PEP 562) the first time a compiled backend is
considered; that first access loads the extension:

1. a prebuilt module ``fused_sched._ext``, when the package was installed with
   ``FUSED_SCHED_BUILD_EXT=1`` (see :func:`aot_extension`), else
2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja), announced on stderr with
   compiler progress and cached under :func:`build_directory` for the next process.

The CUDA sources are compiled only where torch is a CUDA build and a CUDA toolkit is
found; elsewhere the CPU part builds alone and ``CUDA_BACKEND.unavailable_reason`` says
why. A failed build raises, and the registry reports the error for both backends.

This file imports only torch and the standard library at module level so that setup.py
can load it by path (without importing fused_sched) to get the ahead-of-time build.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import platform
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import torch

__all__ = [
    "CPU_BACKEND",
    "CUDA_BACKEND",
    "aot_extension",
    "build_directory",
    "cuda_unavailable_reason",
    "extension_modules",
    "extension_sources",
    "load_extension",
]

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_ROOT.parent
# A wheel carries the sources inside the package (setup.py's build_py puts them there); a
# checkout, and an editable install of it, has them beside the package.
CSRC = PACKAGE_ROOT / "csrc" if (PACKAGE_ROOT / "csrc").is_dir() else REPO_ROOT / "csrc"

PREBUILT_MODULE = "fused_sched._ext"

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Clip modes as the C++ side numbers them (csrc/include/fused_sched/step_math.h, Clip).
CLIP_CODES = {"none": 0, "clamp": 1, "threshold": 2}

# Host code: -ffp-contract=off keeps every product and sum separately rounded, as the
# eager reference rounds them (see step_math.h); -O3 lets the chunk loops vectorise.
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
# Device code: the step math uses explicitly rounded intrinsics; no --use_fast_math, whose
# approximate division would change the thresholded x0. The .cu files' host code (the
# quantile's rank and weight) is rounded as the C++ sources are: -ffp-contract=off.
NVCC_FLAGS = ["-O3", "-Xcompiler", "-ffp-contract=off"]
# What nvcc's device compile (cicc, in its dry run) may be told, by NVCC_APPEND_FLAGS say,
# that changes the kernels' results. -fmad and -prec-div leave their machine code alone
# (tests/test_cuda_sources.py); nothing in the source can keep -ftz from flushing float32
# subnormals, nor --use_fast_math from approximating the in-kernel noise's logf and cosf.
RESULT_CHANGING_DEVICE_FLAGS = {
    "-ftz=1": "flushes float32 subnormals to zero (-ftz=true)",
    "-fast-math": "approximates logf and cosf (--use_fast_math)",
}
CUDA_DEFINE = "-DFUSED_SCHED_WITH_CUDA"


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be built in this environment (None: they can)."""
    if torch.version.cuda is None:
        if torch.version.hip is not None:
            return f"torch is a ROCm build (torch {torch.__version__}, HIP {torch.version.hip}): the kernels are CUDA's"
        return f"torch is a CPU build (torch {torch.__version__}, torch.version.cuda is None)"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found to compile the kernels (set CUDA_HOME or put nvcc on PATH)"
    # torch guesses CUDA_HOME as the folder above nvcc's, which for a wrapper script
    # (/usr/local/bin/nvcc) has no headers: the build would fail, taking the cpu backend with it.
    if not _adopt_toolkit_with_headers(cpp_extension):
        return (f"the CUDA toolkit at CUDA_HOME={cpp_extension.CUDA_HOME} has no include/cuda_runtime.h "
                "(set CUDA_HOME to the toolkit's root, e.g. /usr/local/cuda)")
    # Without a device, torch's build asks for its architecture and fails (IndexError).
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        return ("no CUDA device is visible to take the GPU architecture from (set TORCH_CUDA_ARCH_LIST, "
                "e.g. '9.0', to build the CUDA kernels without one)")
    changes = nvcc_result_changing_flags(_nvcc_command(cpp_extension.CUDA_HOME))
    if changes:
        told = ", ".join(f"{v}={os.environ[v]!r}" for v in ("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS")
                         if os.environ.get(v)) or "its configuration"
        return (f"nvcc's device compile, as {told} sets it, {' and '.join(changes)}: the kernels would no "
                "longer compute what the reference does (remove those flags to build them)")
    return None


def _nvcc_command(cuda_home: str) -> list[str]:
    """The nvcc command torch's build runs (PYTORCH_NVCC, e.g. 'ccache nvcc', where set)."""
    override = os.environ.get("PYTORCH_NVCC")
    return shlex.split(override) if override else [str(Path(cuda_home) / "bin" / "nvcc")]


def nvcc_result_changing_flags(nvcc: list[str]) -> list[str]:
    """What the device compile of this build, as the dry run of ``nvcc`` shows it (with the
    NVCC_PREPEND_FLAGS / NVCC_APPEND_FLAGS that nvcc reads itself), would do that changes
    the kernels' results: descriptions from RESULT_CHANGING_DEVICE_FLAGS; [] where it shows
    none, or nvcc cannot be run (then the build itself says what is wrong)."""
    told = {flag for line in _nvcc_dry_run(nvcc, *NVCC_FLAGS) if "cicc" in line for flag in line.split()}
    return [what for flag, what in RESULT_CHANGING_DEVICE_FLAGS.items() if flag in told]


def _nvcc_dry_run(nvcc: list[str], *flags: str) -> list[str]:
    """The lines of ``nvcc --dryrun`` compiling an empty CUDA file with ``flags``: the
    commands it would run, which say what it was told. [] where nvcc cannot be run."""
    try:
        dry_run = subprocess.run([*nvcc, "--dryrun", *flags, "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return (dry_run.stdout + dry_run.stderr).splitlines()


def _has_cuda_headers(root: Path) -> bool:
    return (root / "include" / "cuda_runtime.h").is_file()


def _adopt_toolkit_with_headers(cpp_extension) -> bool:
    """Whether ``cpp_extension.CUDA_HOME`` is a toolkit with its headers, after making it the
    toolkit that its nvcc reports where it was not (announced): torch's build takes the
    headers, nvcc and libraries from that variable."""
    home = Path(cpp_extension.CUDA_HOME)
    if _has_cuda_headers(home):
        return True
    root = toolkit_root_from_nvcc(str(home / "bin" / "nvcc"))
    if root is None:
        return False
    print(f"fused_sched: CUDA_HOME={home} has no CUDA headers; using the toolkit its nvcc reports, {root}",
          file=sys.stderr)
    cpp_extension.CUDA_HOME = root
    return True


@functools.lru_cache(maxsize=8)
def toolkit_root_from_nvcc(nvcc: str) -> str | None:
    """The root of the toolkit ``nvcc`` belongs to, as nvcc itself reports it (TOP in its dry
    run), where that has the CUDA headers; None otherwise, or where there is no such nvcc.
    For an nvcc that is a wrapper script outside its toolkit."""
    if not Path(nvcc).is_file():
        return None
    for line in _nvcc_dry_run([nvcc], "-v"):
        if line.startswith("#$ TOP="):
            root = Path(line.partition("=")[2].strip()).resolve()
            return str(root) if _has_cuda_headers(root) else None
    return None


def extension_sources(with_cuda: bool, relative: bool = False) -> list[str]:
    """Source files of the extension: absolute, or relative to the repository root (setup.py)."""
    files = [CSRC / "bindings.cpp", CSRC / "cpu" / "ops_cpu.cpp"]
    if with_cuda:
        files += [CSRC / "cuda" / "ops_cuda.cpp", *sorted((CSRC / "cuda").glob("*.cu"))]
    return [str(p.relative_to(REPO_ROOT)) if relative else str(p) for p in files]


def _openmp_flags() -> list[str]:
    # at::parallel_for is inline: with an OpenMP build of ATen it is a `#pragma omp
    # parallel` compiled into *our* object, so without -fopenmp it would silently run on
    # one thread. Linking -fopenmp adds a libgomp.so.1 dependency that resolves to the
    # copy torch has already loaded (same soname), so there is one thread pool.
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


@functools.cache  # find_library runs ldconfig; the answer does not change in a process
def _libmvec_available() -> bool:
    """glibc's vector math library (x86-64 Linux): the cpu kernels' in-kernel noise takes
    log and cos from it, eight lanes at a time (csrc/cpu/ops_cpu.cpp, FS_HAVE_LIBMVEC)."""
    import ctypes.util

    return (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
            and ctypes.util.find_library("mvec") is not None)


def _link_flags() -> list[str]:
    return _openmp_flags() + (["-lmvec"] if _libmvec_available() else [])


def _compile_args(with_cuda: bool) -> dict[str, list[str]]:
    defines = [CUDA_DEFINE] if with_cuda else []
    if _libmvec_available():
        defines = defines + ["-DFS_HAVE_LIBMVEC"]
    return {"cxx": CXX_FLAGS + _openmp_flags() + defines, "nvcc": NVCC_FLAGS + defines}


def aot_extension():
    """The setuptools Extension for an ahead-of-time build (``FUSED_SCHED_BUILD_EXT=1``).

    Sources are relative to the repository root, where setup.py runs. CUDA is included
    under the same conditions as the JIT build.
    """
    from torch.utils import cpp_extension

    reason = cuda_unavailable_reason()
    with_cuda = reason is None
    if not with_cuda:
        print(f"fused_sched: building the extension without its CUDA kernels: {reason}", file=sys.stderr)
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    args = _compile_args(with_cuda)
    return kind(
        name=PREBUILT_MODULE,
        sources=extension_sources(with_cuda, relative=True),
        # Absolute: BuildExtension compiles with ninja from the build folder.
        include_dirs=[str(CSRC / "include")],
        extra_compile_args=args if with_cuda else args["cxx"],
        extra_link_args=_link_flags(),
    )


def extension_modules():
    """(ext_modules, cmdclass) for setup.py's ahead-of-time build."""
    from torch.utils.cpp_extension import BuildExtension

    return [aot_extension()], {"build_ext": BuildExtension}


def _build_inputs(with_cuda: bool) -> list[Path]:
    """The files a build compiles or includes: every file of csrc/, the CUDA ones only for
    a CUDA build."""
    return sorted(p for p in CSRC.rglob("*")
                  if p.is_file() and (with_cuda or "cuda" not in p.relative_to(CSRC).parts))


def _sources_digest(with_cuda: bool) -> str:
    """A short hash of the build's sources, names and contents."""
    digest = hashlib.sha256()
    for path in _build_inputs(with_cuda):
        digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def build_directory(with_cuda: bool) -> Path:
    """Where the JIT build is cached: one folder per Python / torch / CUDA combination and
    per content of the C++ sources, so that two installs of different fused_sched versions
    (two environments, say) never rebuild over each other's library, nor load it, which
    would fail at the first call with a signature that changed between them.

    ``FUSED_SCHED_BUILD_DIR`` if set, else ``$TORCH_EXTENSIONS_DIR/fused_sched``, else
    ``~/.cache/fused_sched`` (``$XDG_CACHE_HOME`` honoured).
    """
    base = os.environ.get("FUSED_SCHED_BUILD_DIR")
    if not base:
        torch_dir = os.environ.get("TORCH_EXTENSIONS_DIR")
        if torch_dir:
            base = os.path.join(torch_dir, "fused_sched")
        else:
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            base = os.path.join(cache, "fused_sched")
    device = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = f"{python}_torch{torch.__version__}_{device}_{_sources_digest(with_cuda)}"
    return Path(base) / tag.replace("+", "_").replace("/", "_")


def _module_name(with_cuda: bool) -> str:
    return "fused_sched_ext_cuda" if with_cuda else "fused_sched_ext_cpu"


def _needs_build(directory: Path, name: str, with_cuda: bool) -> bool:
    """Whether ninja will compile: no library yet, or a file it is built from newer than it."""
    libraries = list(directory.glob(f"{name}*.so")) + list(directory.glob(f"{name}*.pyd"))
    if not libraries:
        return True
    built = min(p.stat().st_mtime for p in libraries)
    return any(p.stat().st_mtime > built for p in _build_inputs(with_cuda))


def _jit_build(with_cuda: bool):
    from torch.utils import cpp_extension

    if not (CSRC / "bindings.cpp").is_file():
        raise RuntimeError(
            f"the fused_sched C++ sources are not at {CSRC} (this install of fused_sched carries neither them nor "
            "a prebuilt extension); reinstall it from a wheel or a source checkout"
        )
    name = _module_name(with_cuda)
    directory = build_directory(with_cuda)
    directory.mkdir(parents=True, exist_ok=True)
    verbose = _needs_build(directory, name, with_cuda)
    if verbose:
        print(f"fused_sched: building the C++ extension (first use, cached in {directory})", file=sys.stderr, flush=True)
    args = _compile_args(with_cuda)
    try:
        return cpp_extension.load(
            name=name,
            sources=extension_sources(with_cuda),
            extra_cflags=args["cxx"],
            extra_cuda_cflags=args["nvcc"],
            extra_include_paths=[str(CSRC / "include")],
            extra_ldflags=_link_flags(),
            build_directory=str(directory),
            with_cuda=with_cuda,
            verbose=verbose,
        )
    except Exception as error:
        raise RuntimeError(
            f"building the fused_sched C++ extension in {directory} failed ({error}); the compiler output is "
            "above. Use backend='torch' meanwhile, or set FUSED_SCHED_BUILD_DIR to a fresh folder to retry."
        ) from error


_lock = threading.Lock()
_extension = None


def load_extension():
    """The compiled module (prebuilt if installed, else JIT-built once and cached)."""
    global _extension
    with _lock:
        if _extension is None:
            _extension = _prebuilt_extension() or _jit_build(cuda_unavailable_reason() is None)
        return _extension


def _prebuilt_extension():
    """The module an ahead-of-time build installed, or None."""
    try:
        return importlib.import_module(PREBUILT_MODULE)
    except ImportError:
        return None


def loaded_extension():
    """The compiled module if this process has loaded it, else None (loads nothing)."""
    return _extension


def _dtype_reason(dtypes) -> str | None:
    unsupported = [d for d in dtypes if d not in INPUT_DTYPES]
    if unsupported:
        return (
            f"storage dtype {unsupported[0]} is not supported by the compiled kernels "
            "(float32, float16 and bfloat16; the torch backend handles float64)"
        )
    return None


def _contiguous(t):
    # Kernels take flat contiguous buffers. A strided input costs one explicit copy here,
    # which is no worse than the eager ops it replaces would pay on such an input.
    return None if t is None else t.contiguous()


class CompiledBackend:
    """A backend object (see backends.py) over the entry points of the compiled module."""

    def __init__(self, name: str, device_type: str, fused_step_fn, threshold_scale_fn, philox_bits_fn=None):
        self.name = name
        self.device_type = device_type
        self._fused_step = fused_step_fn
        self._threshold_scale = threshold_scale_fn
        self._philox_bits = philox_bits_fn
        # Imported here, not at module level: setup.py loads this file by path, outside the package.
        from . import layout, philox

        self._noise_arguments = philox.kernel_arguments
        self._philox = philox
        self._absent_terms = layout.absent_terms

    def __repr__(self) -> str:
        return f"<fused_sched compiled backend {self.name!r}>"

    def unavailable_reason(self, device, dtypes):
        device = torch.device(device)
        if device.type != self.device_type:
            return f"the {self.name} backend runs on {self.device_type} tensors, not {device.type}"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "torch reports no usable CUDA device"
        return _dtype_reason(dtypes)

    def threshold_scale(self, sample, model_output, coefficients, ratio: float, max_value: float,
                        constant_columns=None):
        return self._threshold_scale(
            _contiguous(sample), _contiguous(model_output), _contiguous(coefficients), float(ratio), float(max_value),
            self._absent_terms(constant_columns),
        )

    def fused_step(
        self, sample, model_output, coefficients, history, noise, clip, clip_range, scale,
        out_dtype, history_dtype, x0_dtype, constant_columns=None,
    ):
        if clip not in CLIP_CODES:
            raise ValueError(f"clip={clip!r}; expected one of {tuple(CLIP_CODES)}")
        history = tuple(history)
        if len(history) > 2:
            raise ValueError(f"history holds at most 2 tensors, got {len(history)}")

        x = sample.contiguous()
        # empty_like of a contiguous tensor is contiguous, and costs half of torch.empty(shape, ...)
        out = torch.empty_like(x, dtype=out_dtype)
        d = None if history_dtype is None else torch.empty_like(x, dtype=history_dtype)
        x0 = None if x0_dtype is None else torch.empty_like(x, dtype=x0_dtype)
        # noise: None, a tensor, or PhiloxNoise (computed in the kernel from seed and offset)
        noise, noise_mode, philox_seed, philox_offset, philox_base = self._noise_arguments(noise)
        self._fused_step(
            x,
            _contiguous(model_output),
            _contiguous(coefficients),
            _contiguous(history[0]) if len(history) > 0 else None,
            _contiguous(history[1]) if len(history) > 1 else None,
            _contiguous(noise),
            noise_mode,
            philox_seed,
            philox_offset,
            philox_base,
            _contiguous(scale) if clip == "threshold" else None,
            CLIP_CODES[clip],
            float(clip_range),
            self._absent_terms(constant_columns),
            out,
            d,
            x0,
        )
        return out, d, x0

    def philox_bits(self, seed: int, offset: int, numel: int, device=None) -> torch.Tensor:
        """Tests: the kernels' Philox outputs, as ``philox.philox_bits`` returns them."""
        out = torch.empty((numel, 2), dtype=torch.int32, device=device or self.device_type)
        self._philox_bits(self._philox.signed_seed(self._philox.check_seed(seed)), int(offset), out)
        return out.to(torch.int64) & 0xFFFFFFFF


class UnavailableBackend:
    """A compiled backend this environment cannot provide, with the reason why."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def __repr__(self) -> str:
        return f"<fused_sched backend {self.name!r}, unavailable: {self.reason}>"

    def unavailable_reason(self, device, dtypes):
        return self.reason

    def _raise(self, *args, **kwargs):
        from .backends import BackendUnavailableError

        raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {self.reason}")

    fused_step = _raise
    threshold_scale = _raise


def _make_backend(name: str):
    if name == "CUDA_BACKEND":
        # Only a JIT build needs the toolkit: a prebuilt module runs without one.
        reason = None if _prebuilt_extension() is not None else cuda_unavailable_reason()
        if reason is not None:
            return UnavailableBackend("cuda", reason)
        ext = load_extension()
        if not ext.with_cuda:
            return UnavailableBackend("cuda", f"the prebuilt extension {ext.__file__} was built without CUDA")
        return CompiledBackend("cuda", "cuda", ext.cuda_fused_step, ext.cuda_threshold_scale, ext.cuda_philox_bits)
    ext = load_extension()
    return CompiledBackend("cpu", "cpu", ext.cpu_fused_step, ext.cpu_threshold_scale, ext.cpu_philox_bits)


_backends: dict[str, object] = {}


def __getattr__(name: str):
    if name in ("CPU_BACKEND", "CUDA_BACKEND"):
        if name not in _backends:
            _backends[name] = _make_backend(name)
        return _backends[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
