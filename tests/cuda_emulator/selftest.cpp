// Kernels that test the emulator itself, written as CUDA: if the emulator ran a block's
// threads in lockstep, or a warp collective or barrier wrongly, the emulated csrc/cuda
// kernels could pass for the wrong reason. tests/test_cuda_emulator.py checks each.
#include "cuda_emulator.h"

#include <cstdint>

#include "launch.cuh"
#include "selftest.h"

namespace fused_sched::emulator::selftest {
namespace {

constexpr int kMaxThreads = 1024;

// out[t] = in[n - 1 - t] through shared memory, with or without the barrier between the
// writes and the reads that a GPU needs.
__global__ void reverse_kernel(const int32_t* in, int32_t* out, bool synchronise) {
  __shared__ int32_t staged[kMaxThreads];
  const unsigned t = threadIdx.x;
  staged[t] = in[blockIdx.x * blockDim.x + t];
  if (synchronise) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = staged[blockDim.x - 1 - t];
}

// Per warp: inclusive prefix sums by __shfl_up_sync, the ballot of odd values, lane 0's
// value by __shfl_sync; per block: __syncthreads_or of "value is negative".
__global__ void collectives_kernel(const int64_t* in, int64_t* scan, int64_t* ballot, int64_t* first,
                                   int64_t* any_negative) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32u;
  const long long value = in[i];
  long long inclusive = value;
  for (unsigned offset = 1; offset < 32; offset *= 2) {
    const long long below = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += below;
  }
  scan[i] = inclusive;
  ballot[i] = __ballot_sync(0xffffffffu, (value & 1) != 0);
  first[i] = __shfl_sync(0xffffffffu, value, 0);
  any_negative[i] = __syncthreads_or(value < 0);
}

// Thread 0 returns while the others wait at a barrier: a hang on a GPU.
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

// A float4 load from an address that is not 16-byte aligned: a GPU faults ("misaligned
// address"); the emulator's sanitizer must report it.
__global__ void misaligned_load_kernel(const float* p, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(p + 1);
  *out = v.x + v.y + v.z + v.w;
}

}  // namespace

cudaError_t misaligned_load(const float* p, float* out) {
  FS_LAUNCH(1u, 1u, nullptr, misaligned_load_kernel)(p, out);
  return cudaGetLastError();
}

cudaError_t reverse(const int32_t* in, int32_t* out, unsigned blocks, unsigned threads, bool synchronise) {
  FS_LAUNCH(blocks, threads, nullptr, reverse_kernel)(in, out, synchronise);
  return cudaGetLastError();
}

cudaError_t collectives(const int64_t* in, int64_t* scan, int64_t* ballot, int64_t* first, int64_t* any_negative,
                        unsigned blocks, unsigned threads) {
  FS_LAUNCH(blocks, threads, nullptr, collectives_kernel)(in, scan, ballot, first, any_negative);
  return cudaGetLastError();
}

cudaError_t divergent_barrier(unsigned threads) {
  FS_LAUNCH(1u, threads, nullptr, divergent_barrier_kernel)();
  return cudaGetLastError();
}

}  // namespace fused_sched::emulator::selftest
