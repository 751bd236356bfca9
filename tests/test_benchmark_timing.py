"""How ``fused-sched bench`` times a case's implementations: in turns (benchmark.time_in_turns).

Its ratios are only as good as the conditions the contenders ran under. Timed one after the
other, a machine whose speed moves during the run (a shared VM: its copy bandwidth moved
8-48 GB/s between runs) puts that drift into the ratios; timed in turns, every contender
sees it alike. A clock that the steps themselves advance makes the drift exact here.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import subprocess
import sys

import pytest
import torch

from conftest import subprocess_env
from fused_sched import benchmark
from fused_sched.benchmark import BaselineUnavailable, Contender, Timing, time_in_turns

CPU = torch.device("cpu")


class DriftingMachine:
    """A clock that each step advances by its cost, the machine slowing down steadily: the
    n-th step costs (1 + n * drift) times its cost. It logs which contender stepped."""

    def __init__(self, drift: float):
        self.now, self.steps, self.drift, self.log = 0.0, 0, drift, []

    def perf_counter(self) -> float:
        return self.now

    def contender(self, name: str, cost: float = 1.0, fails_at: int | None = None) -> Contender:
        def step():
            if fails_at is not None and self.log.count(name) == fails_at:
                raise RuntimeError(f"{name} failed (simulated)")
            self.log.append(name)
            self.steps += 1
            self.now += cost * (1.0 + self.steps * self.drift)

        return Contender(name, step, contextlib.nullcontext)


@pytest.fixture
def machine(monkeypatch):
    def make(drift=0.0):
        m = DriftingMachine(drift)
        monkeypatch.setattr(benchmark.time, "perf_counter", m.perf_counter)
        return m

    return make


def test_turns_alternate_their_order_and_give_every_contender_its_repeats(machine):
    m = machine()
    timings = time_in_turns([m.contender("a"), m.contender("b"), m.contender("c")], CPU, repeats=7, warmup=2,
                            rounds=3)
    assert all(isinstance(t, Timing) and t.samples == 7 and t.median_s == 1.0 for t in timings.values())
    warm_up, turns = m.log[:6], m.log[6:]
    assert warm_up == ["a"] * 2 + ["b"] * 2 + ["c"] * 2
    # Rounds in order a b c, c b a, a b c; a turn is one untimed step, then 3, 2 and 2 timed ones.
    expected = []
    for order, share in ((("a", "b", "c"), 3), (("c", "b", "a"), 2), (("a", "b", "c"), 2)):
        for name in order:
            expected += [name] * (1 + share)
    assert turns == expected


def test_drift_during_a_run_reaches_every_contender_alike(machine):
    """Two contenders of equal cost on a machine that slows down steadily, to twice its speed
    over the run: one after the other, the drift shows as a 1.38x ratio; in turns (an even
    number of rounds, the order reversed every other round), as none."""
    repeats, warmup = 60, 2
    drift = 1.0 / (2 * (warmup + 1 + repeats))
    m = machine(drift)
    one_after_the_other = time_in_turns([m.contender("a"), m.contender("b")], CPU, repeats, warmup, rounds=1)
    assert one_after_the_other["b"].median_s / one_after_the_other["a"].median_s > 1.35

    m = machine(drift)
    in_turns = time_in_turns([m.contender("a"), m.contender("b")], CPU, repeats, warmup)
    assert benchmark.ROUNDS % 2 == 0
    assert in_turns["b"].median_s / in_turns["a"].median_s == pytest.approx(1.0, rel=1e-9)


def test_a_contender_that_fails_is_dropped_and_the_others_finish(machine):
    m = machine()
    timings = time_in_turns([m.contender("a", fails_at=6), m.contender("b")], CPU, repeats=10, warmup=2, rounds=5)
    assert isinstance(timings["a"], RuntimeError) and "a failed (simulated)" in str(timings["a"])
    assert isinstance(timings["b"], Timing) and timings["b"].samples == 10
    assert m.log.count("a") == 6 and m.log[-1] == "b"


def test_the_compiled_baseline_failing_in_its_turn_is_unavailable_with_the_reason(machine):
    m = machine()
    compiled = m.contender("compiled", fails_at=3)
    timings = time_in_turns([m.contender("diffusers"), compiled], CPU, repeats=4, warmup=1, rounds=2)
    assert isinstance(timings["compiled"], BaselineUnavailable)
    assert "torch.compile failed after compiling: RuntimeError: compiled failed (simulated)" in str(
        timings["compiled"])
    assert isinstance(timings["diffusers"], Timing)


def test_each_turn_runs_in_its_contenders_context():
    """The fused contender's backend, the compiled baseline's stand-in op, are active in its
    turns only."""
    active = []

    @contextlib.contextmanager
    def turn():
        active.append(True)
        try:
            yield
        finally:
            active.pop()

    seen = []
    inside = Contender("inside", lambda: seen.append(("inside", bool(active))), turn)
    outside = Contender("outside", lambda: seen.append(("outside", bool(active))), contextlib.nullcontext)
    time_in_turns([inside, outside], CPU, repeats=4, warmup=1, rounds=2)
    assert set(seen) == {("inside", True), ("outside", False)}


LATENT_MAPPED_BYTES = """
import ctypes, sys, torch
from fused_sched import benchmark


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "primed":
    benchmark.prime_host_allocator()
before = libc.mallinfo2().hblkhd  # bytes in mapped chunks
latent = torch.empty(1, 13, 16, 60, 90)  # CogVideoX's, 4.5 MB
print(libc.mallinfo2().hblkhd - before)
"""


def _glibc_with_mallinfo2() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc >= 2.33


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc's malloc, with mallinfo2 to observe it")
def test_the_primed_allocator_serves_a_latent_from_its_heap():
    """Unprimed, a latent-sized tensor is a fresh mapping (page-faulted on first touch, and
    every step's temporaries are); primed, as a pipeline's allocator is, it comes from
    malloc's heap. Observed through glibc's own count of mapped bytes (page fault counts
    depend on the address-space layout: 0 to 5,421 per step unprimed, 0 to 439 primed, for
    diffusers' DDIM step on that latent)."""
    mapped = {}
    for state in ("unprimed", "primed"):
        out = subprocess.run([sys.executable, "-c", LATENT_MAPPED_BYTES, state], capture_output=True, text=True,
                             env=subprocess_env(), timeout=300)
        assert out.returncode == 0, out.stderr
        mapped[state] = int(out.stdout.split()[-1])
    assert mapped["unprimed"] >= 1 * 13 * 16 * 60 * 90 * 4 and mapped["primed"] == 0, mapped
