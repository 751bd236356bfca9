"""The CUDA sources compile, warning-free, on any machine with nvcc (no GPU, no CUDA torch).

Every csrc/**/*.cu is compiled with ``nvcc -c`` for sm_80 and sm_90a with all warnings as
errors, under the half/bfloat16 conversion restrictions torch's extension builder
imposes (-D__CUDA_NO_HALF_CONVERSIONS__ ...) and without them. The torch-facing launcher,
which only a CUDA build of torch would otherwise ever compile, is syntax-checked with the host compiler against torch's headers and the toolkit's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cuda_toolkit import INCLUDE, NVCC, NVDISASM, needs_headers, needs_nvcc, sass_instructions
from fused_sched.ops.extension import NVCC_FLAGS

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))

TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
WERROR = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"]


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"


def test_there_are_cuda_sources():
    assert {p.name for p in CU_FILES} >= {"fused_step.cu", "threshold.cu"}


@needs_nvcc
@pytest.mark.parametrize(
    "variant,archs",
    [("torch_defines", ("80", "90a")), ("plain", ("90a",))],
)
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: str(p.relative_to(CSRC)))
def test_cu_file_compiles_without_warnings(source, variant, archs, tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    defines = TORCH_NVCC_DEFINES if variant == "torch_defines" else []
    _run(
        [NVCC, "-std=c++17", *NVCC_FLAGS, f"-I{CSRC / 'include'}", *gencode, *defines, *WERROR,
         "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))],
        cwd=tmp_path,
    )


def test_shared_header_compiles_with_the_host_compiler(tmp_path):
    """step_math.h is plain C++ for g++: no CUDA, no torch."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    source = tmp_path / "header.cpp"
    source.write_text('#include "fused_sched/step_math.h"\nint main() { return fused_sched::kNumCoefficients - 11; }\n')
    _run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{CSRC / 'include'}", "-c", str(source),
          "-o", str(tmp_path / "header.o")], cwd=tmp_path)


def _kernel_entries(ptx: str) -> dict[str, str]:
    """Mangled kernel name -> its PTX body."""
    parts = re.split(r"^\s*(?:\.visible\s+)?\.entry\s+", ptx, flags=re.M)[1:]
    return {part.split("(", 1)[0].strip(): part for part in parts}


@needs_nvcc
@pytest.mark.parametrize("source,kernel,accesses", [
    ("fused_step.cu", "fused_step_kernel", ("ld.global.v4.f32", "ld.global.v4.u32", "st.global.v4.f32",
                                            "st.global.v4.u32")),
    ("threshold.cu", "histogram_kernel", ("ld.global.v4.f32", "ld.global.v4.u32")),
])
def test_packed_kernels_access_memory_128_bits_at_a_time(source, kernel, accesses, tmp_path):
    """Every packed instantiation (template argument kPacked = true) moves fp32 and 16-bit
    storage with 128-bit vector loads and stores (v4.f32 / v4.u32 in the PTX); the element
    path of the same kernel has no vector access (the PTX shows the check can fail)."""
    ptx = tmp_path / "kernels.ptx"
    _run([NVCC, "-std=c++17", "-O3", "-ptx", "-arch=sm_90a", *TORCH_NVCC_DEFINES, f"-I{CSRC / 'include'}",
          str(CSRC / "cuda" / source), "-o", str(ptx)], cwd=tmp_path)
    packed = {True: [], False: []}
    for name, body in _kernel_entries(ptx.read_text()).items():
        flag = re.search(rf"{kernel}I.*Lb([01])EEEv", name)
        if flag is not None:
            packed[flag.group(1) == "1"].append((name, body))
    assert packed[True] and len(packed[True]) == len(packed[False])
    for name, body in packed[True]:
        missing = [a for a in accesses if a not in body]
        assert not missing, f"{name} lacks {missing}"
    for name, body in packed[False]:
        assert ".v4." not in body, f"{name}: vector access on the element path"


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: str(p.relative_to(CSRC)))
def test_device_code_is_the_same_whatever_nvcc_is_told_about_rounding(source, tmp_path):
    """nvcc contracts a*b + c into an fma by default (--fmad=true), and -prec-div=false
    (implied by --use_fast_math, which NVCC_APPEND_FLAGS can add to any build) makes a
    float division approximate; the step math rounds every product, sum and quotient
    explicitly (__fmul_rn, __fadd_rn, __fmaf_rn, __fdiv_rn), so the machine code must not
    change with either: then the GPU rounds as the reference does whatever the build asked.
    (sm_90a only: the arithmetic is the same source for every architecture.)"""
    arch = "90a"
    if NVDISASM is None:
        pytest.skip("no nvdisasm (CUDA toolkit or Triton's bundled copy)")
    flag_sets = {"default": [], "no-contraction": ["--fmad=false"], "approximate-division": ["-prec-div=false"]}
    listings = {}
    for name, flags in flag_sets.items():
        cubin = tmp_path / f"{name}.cubin"
        _run([NVCC, "-std=c++17", "-O3", "-cubin", f"-arch=sm_{arch}", *flags, *TORCH_NVCC_DEFINES,
              f"-I{CSRC / 'include'}", str(source), "-o", str(cubin)], cwd=tmp_path)
        listings[name] = sass_instructions(cubin)
    assert any("FMUL" in line or "FADD" in line or "FFMA" in line or "MUFU" in line or "IMAD" in line
               for line in listings["default"]), "the listing holds no instructions"
    for name in flag_sets:
        assert listings[name] == listings["default"], name


@needs_headers
def test_cuda_launcher_compiles_against_torch_headers(tmp_path):
    # bindings.cpp's CUDA half is not compiled here (torch/extension.h costs ~30 s);
    # ops_cuda.cpp static_asserts that it binds functions of the CPU half's signatures.
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    torch_include = Path(torch.__file__).parent / "include"
    # A CPU build of torch ships c10/cuda headers but not the one CMake generates.
    stub = tmp_path / "stub"
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    _run(
        [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DFUSED_SCHED_WITH_CUDA",
         f"-I{CSRC / 'include'}",
         "-isystem", str(torch_include), "-isystem", str(torch_include / "torch" / "csrc" / "api" / "include"),
         "-isystem", str(INCLUDE), "-isystem", str(stub), str(CSRC / "cuda" / "ops_cuda.cpp")],
        cwd=tmp_path,
    )


def test_cuda_sources_include_no_torch_header():
    """The .cu files (and what they include from csrc) must compile without torch."""
    for path in [*CU_FILES, *CSRC.rglob("*.cuh"), CSRC / "cuda" / "kernels.h", *(CSRC / "include").rglob("*.h")]:
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{path.relative_to(ROOT)} includes {banned}"
