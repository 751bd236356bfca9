// Every kernel launch in csrc/cuda is written FS_LAUNCH(grid, block, stream, kernel)(arguments...).
//
// Under nvcc it is the triple-chevron launch (no dynamic shared memory). The tests' CPU
// emulator (tests/cuda_emulator) compiles these same sources with the host compiler and
// FUSED_SCHED_CUDA_EMULATOR defined, and then a launch runs the kernel's blocks one after
// another on the CPU, a block's threads as fibers: the kernels' indexing, selection and
// synchronisation logic is tested on machines without a GPU, from the text nvcc compiles.
#pragma once

#if defined(FUSED_SCHED_CUDA_EMULATOR)
#define FS_LAUNCH(grid, block, stream, ...) ::fused_sched::emulator::launch((grid), (block), (stream), __VA_ARGS__)
#else
#define FS_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

#include <atomic>

#include "kernels.h"

namespace fused_sched::cuda {

constexpr int kMaxDevices = 64;

// query(device) for the current device, asked once per device and kept in `cache`; 0 where
// there is no current device or the query fails (returns < 1), which is asked again next time.
template <typename Query>
int once_per_device(std::atomic<int> (&cache)[kMaxDevices], Query query) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return 0;
  if (device < kMaxDevices) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  const int value = query(device);
  if (value < 1) return 0;
  if (device < kMaxDevices) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// How many blocks of kKernel, launched with kThreadsPerBlock threads and no dynamic shared
// memory, the current device runs at once: its SMs times the blocks one SM holds, which the
// kernel's registers and shared memory decide (ptxas -v gives the step kernels 32 to 106
// registers a thread across their specialisations, sm_80 and sm_90a: 2 to 8 blocks of 256,
// none spilling). A grid-stride
// kernel launched with this many blocks runs as one full wave, each block with the same
// share; a fixed number of blocks per SM would leave SMs idle below it, or end in a partial
// last wave above it. A failed query falls back to one block per SM, and its error is the
// launch's to report (cudaGetLastError).
template <auto kKernel, int kThreadsPerBlock>
int blocks_per_wave() {
  static std::atomic<int> cached[kMaxDevices] = {};
  const int blocks = once_per_device(cached, [](int) {
    int per_multiprocessor = 0;
    const cudaError_t status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_multiprocessor, reinterpret_cast<const void*>(kKernel), kThreadsPerBlock, 0);
    return status == cudaSuccess ? per_multiprocessor * multiprocessor_count() : 0;
  });
  return blocks > 0 ? blocks : multiprocessor_count();
}

}  // namespace fused_sched::cuda
