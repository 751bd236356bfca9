"""fused_sched: drop-in diffusers schedulers whose step is one fused kernel."""

from .ops import BackendUnavailableError, set_backend, use_backend
from .schedulers.cogvideox import FusedCogVideoXDDIMScheduler, FusedCogVideoXDPMScheduler
from .schedulers.ddim import FusedDDIMScheduler
from .schedulers.ddim_inverse import FusedDDIMInverseScheduler
from .schedulers.dpm import FusedDPMSolverMultistepInverseScheduler, FusedDPMSolverMultistepScheduler

__version__ = "0.1.0"
