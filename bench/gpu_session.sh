#!/usr/bin/env bash
# Everything a session lent a GPU machine should run, in one device call.
#
# The device image has torch (CUDA), triton, pytest, pytest-xdist, pytest-timeout,
# hypothesis and pytest-benchmark but no diffusers. Before the call, on the CPU machine, in
# the repo root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata          # .whl/ is git-ignored
#
# then call the device tool with carry [".whl"] and timeout_s 600, passing the commit the
# run measures (the device gets the working tree without .git; every JSON records it):
#
#   FUSED_SCHED_COMMIT=<git rev-parse HEAD> bash bench/gpu_session.sh all
#                                      # tests, then benchmarks, inside DEADLINE seconds
#
# (`tests` or `bench` alone reruns one half on a machine still warm: the extension build
# and Triton's cache live in .gpu_build/, which a warm machine keeps). Commit what comes
# back under bench/results/ (every JSON carries device, versions, date; draw the PNGs
# from the JSON with `python -m fused_sched plot`). $OUT gets at most 8 files: a device
# call returns no more.
set -uo pipefail
cd "$(dirname "$0")/.."

phase=${1:?usage: gpu_session.sh all|tests|bench}
out=${OUT:-/tmp/fused_sched_gpu}
mkdir -p "$out"
log="$out/session.log"
# Seconds from the start by which everything must have ended (the device call's limit is 600),
# and how many of them the tests leave to the benchmarks in `all`.
deadline=${DEADLINE:-570}
bench_reserve=${BENCH_RESERVE:-250}
stop_at=$deadline
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
export FUSED_SCHED_BUILD_DIR="$PWD/.gpu_build/extension" TRITON_CACHE_DIR="$PWD/.gpu_build/triton"
# torch guesses CUDA_HOME as the folder above nvcc's: a wrapper script such as
# /usr/local/bin/nvcc gives /usr/local, with no CUDA headers, and the cuda backend would not
# build. nvcc itself says where its toolkit is (TOP in its dry run).
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
    top=$(nvcc --dryrun -v -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    if [[ -n "$top" && -f "$top/include/cuda_runtime.h" ]]; then
        CUDA_HOME=$(cd "$top" && pwd -P)
        export CUDA_HOME
    fi
fi

# timeout for a step: its own cap, or what is left before stop_at (less a margin).
budget() {
    local left=$((stop_at - SECONDS - 10))
    ((left < $1)) && echo "$left" || echo "$1"
}

# step CAP COMMAND...: runs COMMAND under `budget CAP`, its output appended to the log, and
# returns its status; skipped (and said so, status 124) when under 20 s are left. At the
# limit it is interrupted (SIGINT: pytest still prints its summary), killed 15 s later.
step() {
    local cap status
    cap=$(budget "$1")
    shift
    if ((cap < 20)); then
        echo "=== SKIPPED (deadline): $*" | tee -a "$log"
        return 124
    fi
    echo "=== [$SECONDS s, limit ${cap} s] $*" | tee -a "$log"
    timeout -s INT -k 15 "$cap" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    echo "=== exit $status at $SECONDS s" | tee -a "$log"
    return "$status"
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
{ echo "CUDA_HOME=${CUDA_HOME:-unset} FUSED_SCHED_COMMIT=${FUSED_SCHED_COMMIT:-unset}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; python3 -m pip list 2>/dev/null |
    grep -i -E "^(torch|triton|diffusers|pytest-xdist|pytest-timeout) "; } 2>&1 | tee -a "$log"
# Build the extension once, announced, before anything is timed. A build cut short leaves
# torch's build lock behind, on which every later load would wait forever: nothing else
# builds now, so any lock left is stale. Without it, the benchmarks time triton alone.
# `info` exits 0 whatever it finds (a failed build is an unavailable backend), so whether
# the cuda backend can run is asked of the backend itself.
backends=cuda,triton
step 150 python3 -m fused_sched info
if ! python3 -c "import sys, torch; from fused_sched.ops import backends as b
r = b.why_unavailable('cuda', torch.device('cuda'), (torch.float32,)); print('cuda backend:', r or 'available')
sys.exit(r is not None)" 2>&1 | tee -a "$log"; then
    echo "=== the cuda backend is unavailable: its tests will fail, the benchmarks time triton alone" | tee -a "$log"
    backends=triton
fi
rm -f "$FUSED_SCHED_BUILD_DIR"/*/lock

if python3 -c "import xdist" 2>/dev/null; then
    # Triton compiles a kernel per specialisation in the test process: spread them over the cores.
    parallel="-n $(($(nproc) < 16 ? $(nproc) : 16))"
else
    parallel=""
fi
if python3 -c "import pytest_timeout" 2>/dev/null; then
    parallel="$parallel --timeout=120"  # a hung test is reported as such, not the whole run
fi

run_tests() {
    # A backend that cannot run here fails instead of skipping; failures are collected, not
    # stopped at, since this is the session's one look at them.
    export FUSED_SCHED_REQUIRE_BACKENDS=torch,cpu,cuda,triton
    local pytest="python3 -m pytest -q -rfEs --maxfail=40 -p no:cacheprovider $parallel"
    # Autotuning as users get it, where it meets graph capture and torch.compile.
    local tuned="tests/test_cuda_graphs.py tests/test_compile.py"
    FUSED_SCHED_TRITON_AUTOTUNE=1 step 120 $pytest $tuned || true
    # Everything else with one Triton configuration (test_every_launch_configuration checks
    # each of the others): the suite meets hundreds of specialisations, and autotuning would
    # compile and time four kernels for each. What needs no GPU (compiling for GPUs, the
    # CUDA emulator) is CI's, not device time.
    # test_pipelines.py runs CPU tensors and needs transformers, which the image lacks;
    # test_install.py builds wheels, one of them compiling every .cu with setuptools.
    local cpu_only="tests/test_cuda_sources.py tests/test_triton_gpu_compile.py tests/test_cuda_emulator.py
                    tests/test_pipelines.py tests/test_install.py"
    local rest
    rest=$(ls tests/test_*.py | grep -v -F -x -f <(tr ' ' '\n' <<< "$tuned $cpu_only"))
    FUSED_SCHED_TRITON_AUTOTUNE=0 step 240 $pytest $rest || true
}

run_bench() {
    local device
    device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
    # What the issues ask for, most wanted first: the fused step against diffusers' on the
    # video latents the Triton issue names (host time included), the video pipelines'
    # schedulers first (a run cut short loses the last schedulers, each in every shape and
    # dtype); then the kernels alone against the copy roofline, shape by shape; last the
    # torch.compile baseline, which compiles every case. One process per tool: each start
    # imports torch, diffusers and Triton and loads the extension again.
    step 140 python3 -m fused_sched bench --device cuda --backend "$backends" --no-compile-baseline \
        --scheduler cogvideox-dpm,cogvideox-ddim,ddim,dpm++2m,ddim-threshold,dpm++2m-threshold,sde-dpm++2m,dpm++3m,ddim-inverse \
        --shape cogvideox-49f,wan-720p,2x16x33x90x160 --dtype fp32,bf16 --json "$out/$device-steps.json" || true
    step 100 python3 bench/bench_kernels.py --backend "$backends" --dtype fp32,bf16 \
        --shape cogvideox-49f,wan-720p,hunyuan-720p-b2 --json "$out/$device-kernels.json" || true
    # What the registered torch.library op (the path torch.compile traces) would add to an
    # eager Triton step, which dispatches in Python instead.
    step 60 python3 bench/dispatch_overhead.py --device cuda --backend triton \
        --json "$out/$device-dispatch-overhead-triton.json" || true
    step 90 python3 -m fused_sched bench --device cuda --backend "$backends" \
        --scheduler dpm++2m-threshold,ddim,dpm++2m --shape cogvideox-49f --dtype fp32,bf16 \
        --json "$out/$device-compile-baseline.json" || true
}

case "$phase" in
all)
    stop_at=$((deadline - bench_reserve))
    run_tests
    stop_at=$deadline
    run_bench
    ;;
tests) run_tests ;;
bench) run_bench ;;
*)
    echo "unknown phase $phase: expected all, tests or bench" >&2
    exit 2
    ;;
esac
echo "=== done at $SECONDS s" | tee -a "$log"
