"""Compiles the Triton kernels for a GPU architecture on a machine without a GPU.

Run as a script, in a process without TRITON_INTERPRET (the interpreter replaces every
@triton.jit function, so the kernels must be imported uncompiled-but-real):

    python tests/triton_gpu_compile.py SM OUT.json

The host wrappers (``step.launch_step``, ``threshold.threshold_scale_impl``, ``noise.philox_bits``) run on CPU
tensors for a set of cases with ``wrap`` recording each launch instead of running it; each
recorded launch is then compiled by Triton's own launch path (``JITFunction.warmup``:
argument specialisation, options, the whole pipeline down to a cubin by ptxas) for
compute capability SM, under a stand-in driver that reports that target and nothing else.
Every autotuning configuration of the launcher is compiled, and each launch once more from
the source inductor regenerates for it (torch.compile compiles that, not the module's
kernel). OUT.json lists, per compiled kernel, what tests/test_triton_gpu_compile.py checks
in its PTX and machine code.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class TargetOnlyDriver:
    """What Triton's launch path asks the active driver before compiling, for a GPU that is
    not there: device 0, stream 0, the given target. Launching is never reached (warmup)."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class LaunchRecorder:
    """Stands in for ``torch.library.wrap_triton``: records (launcher, grid, args, kwargs)."""

    def __init__(self):
        self.launches = []

    def __call__(self, launcher):
        def at(grid):
            def record(*args, **kwargs):
                self.launches.append((launcher, grid, args, kwargs))
            return record

        class Indexable:
            __getitem__ = staticmethod(at)

        return Indexable()


def _cases(sm: int):
    """(name, function recording its launches, compile every autotuning config?, compare
    the machine code with and without fp fusion?). On sm_90, every specialisation of the
    step kernel (clip x history x noise source, optional outputs, 16-bit and mixed storage;
    every term present), those four schedulers' tables make (their known-zero terms left
    out), and the thresholding passes; on other targets one case per kernel (compile time)."""
    import torch

    from fused_sched.ops import layout
    from fused_sched.ops.philox import PhiloxNoise
    from fused_sched.ops.triton import noise as triton_noise, step, threshold

    def tensor(dtype, shape=(2, 4096)):
        return torch.zeros(shape, dtype=dtype)

    def step_case(clip, history, noise, x_dtype=torch.float32, m_dtype=torch.float32, rows=1, outputs=True,
                  absent=0):
        def run(wrap):
            x, m = tensor(x_dtype), tensor(m_dtype)
            c = torch.zeros(rows, layout.NUM_COEFFICIENTS)
            hist = tuple(tensor(x_dtype) for _ in range(history))
            z = {"none": None, "tensor": tensor(x_dtype), "philox": PhiloxNoise(7, 11),
                 "philox_device": PhiloxNoise(7, torch.zeros((), dtype=torch.int64))}[noise]
            scale = torch.ones(x.shape[0]) if clip == "threshold" else None
            out = torch.empty_like(x)
            d = torch.empty_like(x, dtype=torch.float32) if outputs else None
            x0 = torch.empty_like(x) if outputs else None
            step.launch_step(x, m, c, hist, z, clip, 1.0, scale, out, d, x0, wrap, absent_terms=absent)
        return run

    def scheduler_absent_terms(cls, **config):
        """The absent-term bits a scheduler's table hands its every step (the specialisations
        that run in pipelines; the cases above have every term present)."""
        scheduler = cls(**config)
        scheduler.set_timesteps(10)
        placed = scheduler._table if hasattr(scheduler, "_table") else next(iter(scheduler._tables.values()))
        absent = placed.constant_columns.absent_terms
        if not absent:
            raise AssertionError(f"{cls.__name__}({config}) leaves no term out: not a case of its own")
        return absent

    def threshold_case(dtype):
        def run(wrap):
            x = tensor(dtype)
            threshold.threshold_scale_impl(x, x, torch.zeros(2, layout.NUM_COEFFICIENTS), 0.995, 1.0, wrap)
        return run

    def philox_bits_case(wrap):  # the tests' raw Philox outputs (test_philox_noise.py)
        triton_noise.philox_bits(7, 11, 4096, "cpu", wrap)

    if sm != 90:
        return [("step-threshold-h2-philox", step_case("threshold", 2, "philox", rows=2), False, False),
                ("threshold-fp32", threshold_case(torch.float32), False, False),
                ("philox-bits", philox_bits_case, False, False)]
    cases = []
    for clip in ("none", "clamp", "threshold"):
        for history in (0, 1, 2):
            for noise in ("none", "tensor", "philox"):
                fusion = history == 2 and noise == "philox"
                cases.append((f"step-{clip}-h{history}-{noise}", step_case(clip, history, noise, rows=2),
                               clip == "clamp" and history == 2 and noise == "philox", fusion))
    cases += [
        ("step-none-h0-none-no-optional-outputs", step_case("none", 0, "none", outputs=False), False, False),
        ("step-bf16", step_case("clamp", 2, "tensor", torch.bfloat16, torch.bfloat16), True, True),
        ("step-fp16", step_case("none", 1, "none", torch.float16, torch.float16), False, False),
        ("step-bf16-sample-fp32-model-output", step_case("none", 1, "none", torch.bfloat16, torch.float32),
         False, True),
        ("step-philox-device-offset", step_case("none", 0, "philox_device"), False, False),
        ("threshold-fp32", threshold_case(torch.float32), False, True),
        ("threshold-bf16", threshold_case(torch.bfloat16), False, False),
        ("philox-bits", philox_bits_case, False, False),
    ]
    import fused_sched

    dpm = fused_sched.FusedDPMSolverMultistepScheduler
    cases += [
        ("step-scheduler-ddim-clip", step_case("clamp", 0, "none", absent=scheduler_absent_terms(
            fused_sched.FusedDDIMScheduler, clip_sample=True)), False, True),
        ("step-scheduler-dpm++2m", step_case("none", 1, "none", absent=scheduler_absent_terms(dpm)), False, True),
        ("step-scheduler-dpm++2m-threshold", step_case("threshold", 1, "none", absent=scheduler_absent_terms(
            dpm, thresholding=True)), False, False),
        ("step-scheduler-dpmsolver-threshold", step_case("threshold", 1, "none", absent=scheduler_absent_terms(
            dpm, algorithm_type="dpmsolver", thresholding=True, final_sigmas_type="sigma_min")), False, True),
    ]
    return cases


def _ptx_summary(ptx: str) -> dict:
    lines = [line.strip() for line in ptx.splitlines()]
    accesses = [l for l in lines if re.match(r"(?:@!?%p\d+\s+)?(?:ld|st)\.global", l)]
    return {
        "vector_accesses": sorted({re.search(r"(?:ld|st)\.global\S*?\.v[248]\.\w+", l).group(0)
                                   for l in accesses if re.search(r"\.v[248]\.", l)}),
        # Masked accesses are the element data (coefficients and scales are unmasked scalars).
        "masked_scalar_accesses": [l for l in accesses if l.startswith("@") and not re.search(r"\.v[248]\.", l)],
        "divisions": sorted({m for l in lines for m in re.findall(r"\bdiv(?:\.\w+)+", l)}),
    }


def _sass(cubin: bytes, tmp: Path) -> list[str]:
    """The instructions of a cubin (cuda_toolkit.sass_instructions)."""
    from cuda_toolkit import sass_instructions  # the script's folder, tests/, is on sys.path

    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    return sass_instructions(path)


def main(sm: int, out: Path) -> None:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter replaces the kernels")
    sys.path.insert(0, str(ROOT))
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from fused_sched.ops.triton import threshold

    # The host wrappers size their grids from the GPU: stand in an H100's 132 SMs.
    threshold._multiprocessors = lambda index: 132
    torch.cuda.current_device = lambda: 0

    driver.set_active(TargetOnlyDriver(GPUTarget("cuda", sm, 32)))
    with tempfile.TemporaryDirectory() as tmp:
        out.write_text(json.dumps({"sm": sm, "kernels": _compile_cases(sm, Path(tmp))}, indent=1))


def _as_inductor_compiles_it(kernel, tmp: Path):
    """The kernel as inductor compiles a registered op's launch of it: from the source that
    torch._inductor regenerates out of the globals the kernel loads, in a module of its own
    that starts with inductor's imports."""
    import importlib.util

    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    source = (TritonKernel.gen_common_triton_imports() + "\n@triton.jit\n"
              + user_defined_triton_kernel_transitive_closure_source_code(kernel))
    path = tmp / f"inductor_{kernel.__name__}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, kernel.__name__)


def _compile_cases(sm: int, tmp: Path) -> list[dict]:
    from triton.runtime import autotuner

    results = []
    regenerated = {}
    for name, run, every_config, check_fusion in _cases(sm):
        recorder = LaunchRecorder()
        run(recorder)
        for launcher, grid, args, kwargs in recorder.launches:
            if isinstance(launcher, autotuner.Autotuner):
                kernel, configs = launcher.fn, launcher.configs if every_config else launcher.configs[:1]
            else:
                kernel, configs = launcher, [None]
            for config in configs:
                options = dict(kwargs)
                if config is not None:
                    options.update(config.all_kwargs())
                compiled = kernel.warmup(*args, grid=grid, **options)
                result = {
                    "case": name,
                    "kernel": kernel.__name__,
                    "config": {k: v for k, v in options.items() if k in ("BLOCK", "num_warps")},
                    "cubin_bytes": len(compiled.asm["cubin"]),
                    **_ptx_summary(compiled.asm["ptx"]),
                }
                if config is configs[0]:
                    # Every specialisation: a name left out of the regenerated source fails only
                    # where the branch that uses it is compiled.
                    if kernel.__name__ not in regenerated:
                        regenerated[kernel.__name__] = _as_inductor_compiles_it(kernel, tmp)
                    as_inductor = regenerated[kernel.__name__].warmup(*args, grid=grid, **options)
                    result["same_sass_as_inductor_regenerates"] = (
                        _sass(as_inductor.asm["cubin"], tmp) == _sass(compiled.asm["cubin"], tmp))
                if check_fusion:
                    # Whatever Triton's default (it changes in 3.10), the machine code must be
                    # the one that rounds every product and sum as written.
                    unfused = kernel.warmup(*args, grid=grid, enable_fp_fusion=False, **options)
                    fused = kernel.warmup(*args, grid=grid, enable_fp_fusion=True, **options)
                    result["same_sass_with_and_without_fp_fusion"] = (
                        _sass(unfused.asm["cubin"], tmp) == _sass(fused.asm["cubin"], tmp))
                results.append(result)
    return results


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
