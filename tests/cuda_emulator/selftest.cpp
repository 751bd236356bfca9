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

// out[i] = in[block] for every thread of the block, published by thread 0 through shared
// memory: without the barrier, a race that the in-order schedule hides (thread 0 runs first).
__global__ void broadcast_kernel(const int32_t* in, int32_t* out, bool synchronise) {
  __shared__ int32_t published;
  if (threadIdx.x == 0) published = in[blockIdx.x];
  if (synchronise) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = published;
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

// The order the schedule ran things in: block_order[k] is the k-th block to start; for
// each block b and barrier interval r, thread_order[(b * 2 + r) * blockDim.x + k] is the
// k-th thread to run in it. counters (zeroed, 1 + 2 * gridDim.x) hand out the positions.
__global__ void arrival_order_kernel(int32_t* thread_order, int32_t* block_order, unsigned* counters) {
  const unsigned b = blockIdx.x;
  if (threadIdx.x == 0) block_order[atomicAdd(&counters[0], 1u)] = static_cast<int32_t>(b);
  for (unsigned r = 0; r < 2; ++r) {
    const unsigned k = atomicAdd(&counters[1 + 2 * b + r], 1u);
    thread_order[(2 * b + r) * blockDim.x + k] = static_cast<int32_t>(threadIdx.x);
    __syncthreads();
  }
}

// Writes out[i] = i for even i only: what a kernel that misses elements leaves behind.
__global__ void write_even_kernel(int32_t* out, int64_t n) {
  const int64_t i = 2 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (i < n) out[i] = static_cast<int32_t>(i);
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

cudaError_t broadcast(const int32_t* in, int32_t* out, unsigned blocks, unsigned threads, bool synchronise) {
  FS_LAUNCH(blocks, threads, nullptr, broadcast_kernel)(in, out, synchronise);
  return cudaGetLastError();
}

cudaError_t collectives(const int64_t* in, int64_t* scan, int64_t* ballot, int64_t* first, int64_t* any_negative,
                        unsigned blocks, unsigned threads) {
  FS_LAUNCH(blocks, threads, nullptr, collectives_kernel)(in, scan, ballot, first, any_negative);
  return cudaGetLastError();
}

cudaError_t arrival_order(int32_t* thread_order, int32_t* block_order, unsigned* counters, unsigned blocks,
                          unsigned threads) {
  FS_LAUNCH(blocks, threads, nullptr, arrival_order_kernel)(thread_order, block_order, counters);
  return cudaGetLastError();
}

cudaError_t write_even(int32_t* out, int64_t n) {
  const unsigned threads = 128;
  FS_LAUNCH(static_cast<unsigned>((n / 2 + threads) / threads), threads, nullptr, write_even_kernel)(out, n);
  return cudaGetLastError();
}

cudaError_t divergent_barrier(unsigned threads) {
  FS_LAUNCH(1u, threads, nullptr, divergent_barrier_kernel)();
  return cudaGetLastError();
}

}  // namespace fused_sched::emulator::selftest
