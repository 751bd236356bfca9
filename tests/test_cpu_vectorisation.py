"""The cpu backend's element loops are vectorised, checked in its machine code.

gcc decides this silently and every result stays right either way: a subtraction that gcc
would not evaluate on both sides of an absent term's select (step_math.h, add_term) once
left every step loop with history scalar, 13x the instructions (callgrind). So each FMA
clone (x86-64: the loops built for AVX2 + FMA, chosen at run time where the CPU has them)
of the step loop, one per (clip mode, history terms, noise, unclipped form of d: with
clipping only) specialisation with the absent terms read at run time and one per entry of
csrc/cpu/known_absent_terms.h with them compiled in, and of the thresholding pass's key
loop, one per set of absent x0 terms, must hold packed 256-bit fused multiply-adds.
Machine code, not time: no timed test.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from conftest import require_backend
from fused_sched.ops import extension, layout

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="the FMA clones exist on x86-64 only (FS_FMA_CLONES in ops_cpu.cpp)")

STEP_CLONE = re.compile(r"step_chunk_fma<\(fused_sched::Clip\)(\d), (\d), (true|false), (true|false), (-?\d+)l>")
KEY_CLONE = re.compile(r"abs_x0_keys_fma<(\d+)u>")
ABSENT_AT_RUN_TIME = "-1"  # kAbsentAtRunTime in ops_cpu.cpp
PACKED_FMA = re.compile(r"\sv(?:fn?m(?:add|sub))\d{3}ps\s.*ymm")


def _packed_fmas_per_function() -> dict[str, int]:
    require_backend("cpu")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    library = extension.load_extension().__file__
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True,
                             check=True).stdout
    counts, name = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            counts[name] = 0
        elif name is not None and PACKED_FMA.search(line):
            counts[name] += 1
    return counts


def test_every_step_and_threshold_loop_is_vectorised():
    counts = _packed_fmas_per_function()
    step_clones = {STEP_CLONE.search(name).groups(): n for name, n in counts.items() if STEP_CLONE.search(name)}
    expected = {(str(clip), str(history), noise, unclipped, ABSENT_AT_RUN_TIME) for clip in range(3)
                for history in range(3) for noise in ("true", "false")
                for unclipped in (("false", "true") if clip else ("false",))}
    expected |= {(str(clip), str(history), str(noise).lower(), str(unclipped).lower(), str(absent))
                 for clip, history, noise, unclipped, absent in extension.load_extension().cpu_known_absent_terms()}
    assert set(step_clones) == expected, f"step loop clones found: {sorted(step_clones)}"
    scalar = sorted(key for key, n in step_clones.items() if n == 0)
    assert not scalar, f"step loops (clip, history, noise, unclipped form, absent terms) without packed fma: {scalar}"
    key_clones = {int(KEY_CLONE.search(name).group(1)): n for name, n in counts.items() if KEY_CLONE.search(name)}
    estimate = (layout.AX, layout.AM, layout.AL)
    every_set = {sum(1 << c for j, c in enumerate(estimate) if mask >> j & 1) for mask in range(2 ** len(estimate))}
    assert set(key_clones) == every_set, f"thresholding key loop clones (absent terms) found: {sorted(key_clones)}"
    # With every term absent, |x0| is a constant: nothing is left to multiply.
    scalar = sorted(absent for absent, n in key_clones.items() if n == 0 and absent != max(every_set))
    assert not scalar, f"thresholding key loops (absent terms) without packed fma: {scalar}"
