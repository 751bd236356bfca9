import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests import their shared drivers as plain modules.
sys.path.insert(0, os.path.dirname(__file__))

from fused_sched import ops  # noqa: E402
from fused_sched.ops import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# csrc/cuda's kernels run on CPU tensors by the tests' CUDA emulator (tests/cuda_emulator):
# a backend of the tests only, registered as fused_sched registers its own (resolved on
# first use), so every backend-parametrised test also runs the CUDA sources on machines
# without a GPU: their host-compiled form, with the device's own logic (step_math.h's
# FS_SELECT_FORMS) but the host's libm and no device intrinsics, so a GPU run still has
# the last word on those. `auto` never chooses it: it is in no preference list.
backends._REGISTRY.setdefault("cuda-emulator", "cuda_emulator:BACKEND")

BACKENDS = ("torch", "cpu", "cuda", "triton", "cuda-emulator")
CPU_ONLY_BACKENDS = ("cpu", "cuda-emulator")


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(*, drop=(), tests_importable=False, **variables) -> dict:
    """The environment for a test's Python subprocess: this process's, with the repository
    (and, if asked, the tests folder) first on PYTHONPATH ahead of what was there (a GPU
    session's carried packages, say), without the variables in ``drop``, with ``variables``."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    paths = [REPOSITORY] + ([os.path.join(REPOSITORY, "tests")] if tests_importable else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(variables)
    return env


def backend_device(name: str) -> torch.device:
    """Where a backend's tests put their data: the GPU where there is one (CPU tensors are
    covered on CPU machines), except for the backends that run CPU tensors only."""
    return torch.device("cpu") if name in CPU_ONLY_BACKENDS else DEVICE


def skip_unavailable_backend(name: str, reason: str, allow_module_level: bool = False):
    """Skip the test (or module) that needs backend ``name``, or fail it if
    FUSED_SCHED_REQUIRE_BACKENDS lists the backend (CI lists every backend its machine can
    run, so none is skipped there unseen)."""
    if name in os.environ.get("FUSED_SCHED_REQUIRE_BACKENDS", "").split(","):
        pytest.fail(f"backend {name!r} is required here but unavailable: {reason}", pytrace=False)
    pytest.skip(f"backend {name!r} unavailable: {reason}", allow_module_level=allow_module_level)


def require_backend(name: str):
    """The backend object, if it can run on ``backend_device(name)``; else
    ``skip_unavailable_backend``."""
    reason = backends.why_unavailable(name, backend_device(name), (torch.float32,))
    if reason is not None:
        skip_unavailable_backend(name, reason)
    return backends.load_backend(name)


@pytest.fixture(scope="module", params=BACKENDS)
def available_backend(request) -> str:
    """Each backend that can run on this machine (see ``require_backend``), once per module
    (the module's tests are grouped by it)."""
    require_backend(request.param)
    return request.param


@pytest.fixture
def backend(available_backend):
    """Run a module's tests once per backend that can run on this machine, selected for
    the test alone, on the device of ``backend_device`` (tests take the ``device`` fixture
    for their tensors)."""
    with ops.use_backend(available_backend):
        yield available_backend


@pytest.fixture(autouse=True)
def no_backend_selection_left_behind():
    """A test that does not ask for a backend runs on what the environment selects, not on
    one an earlier test selected and left behind."""
    before = backends._selected, backends._thread_selection.name
    yield
    after = backends._selected, backends._thread_selection.name
    assert after == before, f"the test left backend selection (process, thread) {after!r}"


@pytest.fixture(autouse=True)
def no_undefined_behaviour_in_emulated_kernels():
    """Fails a test after which the CUDA emulator's sanitizer has reported undefined
    behaviour (tests/cuda_emulator; a GPU would fault or compute garbage there)."""
    yield
    emulator = sys.modules.get("cuda_emulator")
    if emulator is not None and emulator.load_backend.cache_info().currsize:
        reports = emulator.undefined_behaviour_reports()
        if reports:
            pytest.fail("undefined behaviour in the emulated CUDA kernels:\n" + "\n".join(reports))


@pytest.fixture
def device(backend) -> torch.device:
    """The device of the selected backend's data (see ``backend_device``)."""
    return backend_device(backend)
