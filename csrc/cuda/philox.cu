// The raw Philox outputs behind noise=PhiloxNoise, for the tests that check every backend
// computes the same bits (the fused step itself calls philox_normal in fused_step.cu).
#include <algorithm>

#include "fused_sched/philox.h"
#include "kernels.h"
#include "launch.cuh"

namespace fused_sched::cuda {
namespace {

constexpr int kBitsThreads = 256;

__global__ void __launch_bounds__(kBitsThreads)
    philox_bits_kernel(uint64_t seed, uint64_t offset, int64_t n, uint32_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const PhiloxPair p = philox_pair(seed, offset + static_cast<uint64_t>(i));
    out[2 * i] = p.first;
    out[2 * i + 1] = p.second;
  }
}

}  // namespace

cudaError_t launch_philox_bits(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t wanted = (n + kBitsThreads - 1) / kBitsThreads;
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(wanted, blocks_per_wave<philox_bits_kernel, kBitsThreads>())));
  FS_LAUNCH(blocks, kBitsThreads, stream, philox_bits_kernel)(seed, offset, n, out);
  return cudaGetLastError();
}

}  // namespace fused_sched::cuda
