"""fused_sched: drop-in diffusers schedulers whose step is one fused kernel."""

from .ops import BackendUnavailableError, set_backend, use_backend
from .schedulers.ddim import FusedDDIMScheduler

__version__ = "0.1.0"
