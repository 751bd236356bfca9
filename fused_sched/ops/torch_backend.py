"""The ``torch`` backend: the reference implementation, on any device and dtype."""

from __future__ import annotations

from . import reference


class TorchBackend:
    name = "torch"

    @staticmethod
    def unavailable_reason(device, dtypes):
        return None

    fused_step = staticmethod(reference.fused_step)
    threshold_scale = staticmethod(reference.threshold_scale)


BACKEND = TorchBackend()
