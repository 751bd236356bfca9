#!/usr/bin/env bash
# Everything a session lent a GPU machine should run, in as few device calls as possible.
#
# The device image has torch (CUDA), triton, pytest, hypothesis and pytest-benchmark but no
# diffusers. Before the first call, on the CPU machine, in the repo root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata          # .whl/ is git-ignored
#
# then call the device tool with carry [".whl"] and, one phase per call (each well inside
# the 10-minute limit of a call):
#
#   bash bench/gpu_session.sh tests    # every backend on CUDA tensors, log to $OUT
#   bash bench/gpu_session.sh bench    # fused-sched bench on the video presets + Triton kernels
#
# and commit what comes back under bench/results/ (the JSON carries device, versions, date).
set -uo pipefail
cd "$(dirname "$0")/.."

phase=${1:?usage: gpu_session.sh tests|bench}
out=${OUT:-/tmp/fused_sched_gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
# Build the extension once, announced, before anything is timed.
python3 -m fused_sched info 2>&1 | tee "$out/info.txt"

case "$phase" in
tests)
    # A backend that cannot run here fails instead of skipping. What only a GPU can show runs
    # first (graphs, kernels, conformance on CUDA tensors); failures are collected, not
    # stopped at, since a call is the session's one look at them.
    export FUSED_SCHED_REQUIRE_BACKENDS=torch,cpu,cuda,triton
    gpu_first="tests/test_cuda_graphs.py tests/test_triton_backend.py tests/test_conformance.py tests/test_low_precision.py tests/test_compile.py tests/test_philox_noise.py"
    timeout 400 python3 -m pytest $gpu_first -q -rfEs --maxfail=40 -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
    # What needs no GPU (compiling for GPUs, the CUDA emulator) is CI's, not device time.
    cpu_only="tests/test_cuda_sources.py tests/test_triton_gpu_compile.py tests/test_cuda_emulator.py"
    rest=$(ls tests/test_*.py | grep -v -F -x -f <(tr ' ' '\n' <<< "$gpu_first $cpu_only"))
    timeout 150 python3 -m pytest $rest -q -rfE --maxfail=40 -p no:cacheprovider 2>&1 | tee -a "$out/gpu-tests.log"
    ;;
bench)
    device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
    for dtype in fp32 bf16; do
        timeout 180 python3 -m fused_sched bench --device cuda --backend cuda,triton --no-compile-baseline \
            --shape cogvideox-49f,wan-720p,hunyuan-720p --dtype "$dtype" \
            --json "$out/$device-$dtype.json" --plot "$out/$device-$dtype.png" 2>&1 | tee -a "$out/bench.log"
    done
    # The torch.compile baseline compiles each case (seconds each): a subset.
    timeout 150 python3 -m fused_sched bench --device cuda --backend cuda,triton \
        --scheduler ddim,dpm++2m,dpm++2m-threshold --shape cogvideox-49f,wan-720p --dtype fp32,bf16 \
        --json "$out/$device-compile-baseline.json" 2>&1 | tee -a "$out/bench.log"
    timeout 120 python3 bench/bench_triton.py --json "$out/$device-triton-kernels.json" 2>&1 | tee -a "$out/bench.log"
    ;;
*)
    echo "unknown phase $phase: expected tests or bench" >&2
    exit 2
    ;;
esac
