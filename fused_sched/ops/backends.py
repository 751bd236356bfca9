"""Backend registry and selection.

A backend is a module-level object with ``name``, ``unavailable_reason(device, dtypes)``
(None when it can run that case), ``fused_step(...)`` and ``threshold_scale(...)`` with
the signatures of ``reference.py``, the caller's ``constant_columns`` included: every
backend leaves the terms it knows to be 0 out of its sums (``layout.absent_terms``). One
that also has ``step_program`` and ``threshold_program`` (the torch backend) is specialised
once per call signature and the op keeps the programs (``ops.StepPlan``). Backends register lazily so that importing
fused_sched never imports Triton or builds the C++ extension.

Selection: an explicit ``backend=`` argument, else :func:`use_backend` (this thread's),
else :func:`set_backend` (the process's), else the ``FUSED_SCHED_BACKEND`` environment
variable, else ``auto``. ``auto`` takes the
first backend of the device's preference list that can run the case, and says so once
(a RuntimeWarning) where it passes over one that failed to load: a build or import that
failed leaves every step on a slower backend. A backend named explicitly that cannot run
the case is an error, never a silent substitute.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Iterable

import torch

ENV_VAR = "FUSED_SCHED_BACKEND"

# name -> "module:attribute" of the backend object, imported on first use.
_REGISTRY: dict[str, str] = {
    "torch": "fused_sched.ops.torch_backend:BACKEND",
    "triton": "fused_sched.ops.triton:BACKEND",
    "cuda": "fused_sched.ops.extension:CUDA_BACKEND",
    "cpu": "fused_sched.ops.extension:CPU_BACKEND",
}

# Fastest first. ``torch`` runs everywhere and closes every list.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}

_loaded: dict[str, object] = {}
# (requested name, device type, dtypes) -> backend that runs it: selection is on the hot path.
# Availability depends only on these (and on the machine), so a choice never goes stale.
_choices: dict[tuple, object] = {}
_load_errors: dict[str, str] = {}
_load_errors_reported: set[str] = set()
_selected: str | None = None  # set_backend's, for every thread


class _ThreadSelection(threading.local):
    """use_backend's selection, per thread: one thread's ``with`` block neither changes the
    backend of steps other threads run meanwhile nor, leaving out of order with them,
    restores a selection that was theirs. A traced step reads it when it runs: the fused op
    is one opaque node that selects its backend at each call."""

    name: str | None = None


_thread_selection = _ThreadSelection()


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run the requested case."""


def known_backends() -> tuple[str, ...]:
    return ("auto",) + tuple(_REGISTRY)


def _check_name(name: str, argument: str) -> str:
    if not isinstance(name, str) or name not in known_backends():
        raise ValueError(f"{argument}={name!r} is not a backend; expected one of {known_backends()}")
    return name


def set_backend(name: str | None) -> None:
    """Select the backend for every fused op in this process (None or 'auto' restores auto)."""
    global _selected
    _selected = None if name is None else _check_name(name, "backend")


@contextlib.contextmanager
def use_backend(name: str):
    """Select the backend for the fused ops this thread runs inside the ``with`` block
    (before :func:`set_backend`'s selection; 'auto' is a selection too)."""
    previous = _thread_selection.name
    _thread_selection.name = _check_name(name, "backend")
    try:
        yield
    finally:
        _thread_selection.name = previous


def requested_backend(explicit: str | None = None) -> str:
    if explicit is not None:
        return _check_name(explicit, "backend")
    scoped = _thread_selection.name
    if scoped is not None:
        return scoped
    if _selected is not None:
        return _selected
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env.strip().lower(), ENV_VAR)
    return "auto"


def load_backend(name: str):
    """The backend object, or None with the import failure recorded for ``why_unavailable``."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    module_name, attribute = _REGISTRY[name].split(":")
    try:
        backend = getattr(importlib.import_module(module_name), attribute)
    except Exception as error:  # an optional backend failing to import is a reported state
        _load_errors[name] = f"{type(error).__name__}: {error}"
        return None
    _loaded[name] = backend
    return backend


def why_unavailable(name: str, device: torch.device, dtypes: Iterable[torch.dtype]) -> str | None:
    """None if backend ``name`` can run this case, else the reason it cannot."""
    backend = load_backend(name)
    if backend is None:
        return f"backend {name!r} failed to load ({_load_errors[name]})"
    return backend.unavailable_reason(device, tuple(dtypes))


def select_backend(device: torch.device, dtypes: Iterable[torch.dtype], explicit: str | None = None):
    """The backend object that will run a case on ``device`` with these storage dtypes."""
    dtypes = tuple(dtypes)
    name = requested_backend(explicit)
    key = (name, device.type, dtypes)
    chosen = _choices.get(key)
    if chosen is not None:
        return chosen
    if name != "auto":
        reason = why_unavailable(name, device, dtypes)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run on {device} with dtypes "
                f"{[str(d) for d in dtypes]}: {reason}"
            )
        _choices[key] = _loaded[name]
        return _loaded[name]
    for candidate in AUTO_PREFERENCE.get(device.type, ("torch",)):
        if why_unavailable(candidate, device, dtypes) is None:
            _choices[key] = _loaded[candidate]
            return _loaded[candidate]
        if candidate in _load_errors:
            _report_passed_over(candidate)
    raise BackendUnavailableError(f"no backend can run on {device}")  # torch runs everywhere


def _report_passed_over(name: str) -> None:
    # Once per backend and process: the warning is about the machine, not about a call.
    if name in _load_errors_reported:
        return
    _load_errors_reported.add(name)
    warnings.warn(
        f"fused_sched: backend {name!r} failed to load ({_load_errors[name]}), so 'auto' runs a slower one "
        f"instead. `fused-sched info` lists the backends; set {ENV_VAR} (e.g. 'torch') to choose one.",
        RuntimeWarning, stacklevel=2,
    )


def availability(device: torch.device) -> dict[str, str | None]:
    """For `fused-sched info`: every backend and why it is unavailable on ``device`` (None: ok)."""
    return {name: why_unavailable(name, device, (torch.float32,)) for name in _REGISTRY}
