"""The ``torch`` backend: the reference implementation, on any device and dtype."""

from __future__ import annotations

from . import reference


class TorchBackend:
    name = "torch"
    # Its steps are torch ops, which autograd records (the op hands steps whose inputs need
    # gradients to this backend: StepPlan._with_autograd).
    propagates_gradients = True

    @staticmethod
    def unavailable_reason(device, dtypes):
        return None

    fused_step = staticmethod(reference.fused_step)
    threshold_scale = staticmethod(reference.threshold_scale)
    # The op keeps one program per call signature (ops.StepPlan): a step then runs only
    # torch arithmetic, no decisions.
    step_program = staticmethod(reference.step_program)
    threshold_program = staticmethod(reference.threshold_program)


BACKEND = TorchBackend()
