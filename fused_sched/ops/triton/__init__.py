"""The ``triton`` backend: the fused step and the thresholding scale as Triton kernels.

Runs on CUDA devices. With ``TRITON_INTERPRET=1`` set before this package is imported,
Triton's interpreter runs the same kernels on CPU tensors (slowly): that is how the tests
check the kernels on machines without a GPU. Storage dtypes float32, float16 and bfloat16,
mixed freely; float64 inputs are not supported (the kernels compute in fp32 only, and
the contract asks fp64 arithmetic for them), while any output dtype, float64 included, is
a cast of the fp32 result.

- ``step.py``: the generic fused-step kernel, its host wrapper, and the torch.library op
  ``torch.ops.fused_sched.triton_fused_step``.
- ``threshold.py``: the radix-select thresholding scale and the op
  ``torch.ops.fused_sched.triton_threshold_scale``.
- ``noise.py``: the raw Philox outputs behind ``noise=PhiloxNoise`` (tests compare them
  across backends; the step kernel itself calls ``tl.randn``).

Eager calls launch the kernels directly (a custom-op dispatch costs microseconds per
step); under torch.compile the backend calls the registered ops, which dynamo can trace
and inductor can look into.
"""

from __future__ import annotations

import torch

from .. import philox
from ..layout import absent_terms
from . import _common, step, threshold
from .noise import philox_bits as _philox_bits

__all__ = ["BACKEND", "INTERPRETED", "TritonBackend"]

INTERPRETED = _common.INTERPRETED
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonBackend:
    name = "triton"

    @staticmethod
    def unavailable_reason(device, dtypes):
        unsupported = sorted({str(d) for d in dtypes if d not in SUPPORTED_DTYPES})
        if unsupported:
            return (
                f"the triton backend computes in float32 and does not take {', '.join(unsupported)} "
                "inputs (float64 needs float64 arithmetic); use backend 'torch', 'cpu' or 'cuda'"
            )
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "torch reports no usable CUDA device"
            if torch.version.hip is not None:  # ROCm's GPUs are "cuda" devices to torch
                return (f"the triton backend's kernels use NVIDIA PTX (mul.rn.f32); torch is a ROCm build "
                        f"(HIP {torch.version.hip}): use backend 'torch'")
            return None
        if device.type == "cpu":
            if INTERPRETED:
                return _common.INTERPRETER_DEFECT
            return (
                "Triton kernels run on CUDA devices; CPU tensors run only in Triton's interpreter, "
                "which needs TRITON_INTERPRET=1 in the environment before fused_sched.ops.triton is imported"
            )
        return f"the triton backend runs on CUDA devices, not {device.type}"

    @staticmethod
    def fused_step(sample, model_output, coefficients, history, noise, clip, clip_range, scale,
                   out_dtype, history_dtype, x0_dtype, constant_columns=None):
        absent = absent_terms(constant_columns)
        if torch.compiler.is_compiling():
            philox_args = (None, 0, None)
            if isinstance(noise, philox.PhiloxNoise):  # a schema takes no NamedTuple
                # (seed, int offset, offset tensor): a device offset stays a graph input
                offset = noise.offset
                on_device = isinstance(offset, torch.Tensor)
                philox_args = (philox.signed_seed(noise.seed), 0 if on_device else offset,
                               offset if on_device else None)
                noise = None
            outs = iter(step.fused_step_op(
                sample, model_output, coefficients, list(history), noise, clip, clip_range, scale,
                out_dtype, history_dtype, x0_dtype, *philox_args, absent,
            ))
            prev = next(outs)
            d = None if history_dtype is None else next(outs)
            x0 = None if x0_dtype is None else next(outs)
            return prev, d, x0
        return step.fused_step_impl(
            sample, model_output, coefficients, history, noise, clip, clip_range, scale,
            out_dtype, history_dtype, x0_dtype, absent_terms=absent,
        )

    @staticmethod
    def philox_bits(seed, offset, numel, device):
        """Tests: the Philox outputs behind ``PhiloxNoise``, as ``philox.philox_bits`` gives them."""
        device = torch.device(device)
        with _common.device_guard(device):
            return _philox_bits(seed, offset, numel, device)

    @staticmethod
    def threshold_scale(sample, model_output, coefficients, ratio, max_value, constant_columns=None):
        absent = absent_terms(constant_columns)
        if torch.compiler.is_compiling():
            return threshold.threshold_scale_op(sample, model_output, coefficients, ratio, max_value, absent)
        with _common.device_guard(sample.device):
            return threshold.threshold_scale_impl(sample, model_output, coefficients, ratio, max_value,
                                                  absent_terms=absent)


BACKEND = TritonBackend()
