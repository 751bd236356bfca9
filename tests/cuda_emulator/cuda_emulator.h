// A CPU emulator of the CUDA execution model, just large enough for csrc/cuda's kernels.
//
// Included before a .cu file that is compiled by the host compiler with
// FUSED_SCHED_CUDA_EMULATOR defined (see launch.cuh): the toolkit's headers supply the
// types and the host versions of the fp16/bf16 conversions, and this file supplies what
// only device code has. A launch runs the grid's blocks one after another, and a block's
// threads as fibers that switch at barriers and warp collectives (runtime.cpp), so shared
// memory, __syncthreads, warp shuffles and ballots and block reductions run as written,
// and a missing barrier gives wrong results every time instead of now and then.
//
// What it shows: indexing, grid-stride loops, packing, selection logic, histograms and
// their flushes, warp scans and everything computed from them, with the host branch of
// the step math (the one the cpu backend runs), and, through the sanitizer it is built
// with, undefined behaviour on the way. What it cannot show: device rounding (__fmaf_rn
// and friends compile to the same operations the host branch computes, which only a GPU
// confirms), races between threads that interleave within a barrier interval (fibers
// switch only at barriers and collectives; atomics are still real read-modify-writes),
// concurrency between blocks, the device memory model, occupancy and speed. Races whose
// outcome depends on the order of threads or blocks do show, when the tests run a kernel
// under several schedules (set_schedule) and compare.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// Host compilers get the execution-space keywords from the toolkit as nothing; shared
// memory must be one array per kernel instantiation that every thread of a block sees.
// Blocks run one at a time, so a function-local static is exactly that.
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace fused_sched::emulator {

struct ThreadPosition {
  uint3 thread_index;
  uint3 block_index;
  dim3 block_dim;
  dim3 grid_dim;
};

// The emulated thread running on this CPU thread (set for the duration of a kernel body).
extern thread_local ThreadPosition current;

// Multiprocessor count the emulated device reports, and the blocks of any kernel one of
// them holds at once (fixed: grids are sized from both; 3 makes a wave no power of two).
constexpr int kMultiprocessors = 2;
constexpr int kResidentBlocksPerMultiprocessor = 3;

void sync_block();
int sync_block_or(int predicate);
// The 64-bit pattern each lane of the calling thread's warp contributes, gathered after
// every lane has contributed. `mask` must name exactly the warp's lanes (the kernels only
// use full-warp collectives); anything else is reported as a kernel fault.
void warp_gather(unsigned mask, uint64_t mine, uint64_t (&lanes)[32]);
void sync_warp(unsigned mask);
[[noreturn]] void fault(const char* what);

// The order in which a launch runs its blocks, and a block its threads between two
// switches (barriers, collectives). A GPU promises no order: a kernel whose results differ
// between schedules has a race, within a barrier interval or between blocks, that the
// in-order schedule alone would hide. kShuffled draws a new thread order every round.
enum class Schedule { kInOrder, kReversed, kShuffled };
void set_schedule(Schedule schedule, uint64_t seed);

// Runs body() once per thread of every block of the grid, in the schedule's order; records
// a launch error (returned by cudaGetLastError) for a configuration a GPU would refuse.
void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* context);
// Kernel launches so far in this process (refused configurations included).
unsigned long long launches();
// The grid sizes (blocks) of the launches since the last call, in issue order.
std::vector<unsigned> take_launch_grids();

inline unsigned lane_of_current() { return current.thread_index.x % 32u; }

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

inline dim3 as_dim3(dim3 d) { return d; }
inline dim3 as_dim3(unsigned v) { return dim3(v); }
inline dim3 as_dim3(int v) { return dim3(static_cast<unsigned>(v)); }

// FS_LAUNCH(grid, block, stream, kernel)(arguments...): kernel parameters are copies, as a
// device receives them; the stream is ignored, since launches already run in issue order.
template <typename... Params>
struct Launch {
  dim3 grid;
  dim3 block;
  void (*kernel)(Params...);

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    struct Context {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> params;
    } context{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_grid(grid, block, [](void* c) {
      auto* ctx = static_cast<Context*>(c);
      std::apply(ctx->kernel, ctx->params);
    }, &context);
  }
};

template <typename Grid, typename Block, typename... Params>
Launch<Params...> launch(Grid grid, Block block, cudaStream_t, void (*kernel)(Params...)) {
  return Launch<Params...>{as_dim3(grid), as_dim3(block), kernel};
}

}  // namespace fused_sched::emulator

#define threadIdx (::fused_sched::emulator::current.thread_index)
#define blockIdx (::fused_sched::emulator::current.block_index)
#define blockDim (::fused_sched::emulator::current.block_dim)
#define gridDim (::fused_sched::emulator::current.grid_dim)

inline void __syncthreads() { ::fused_sched::emulator::sync_block(); }
inline int __syncthreads_or(int predicate) { return ::fused_sched::emulator::sync_block_or(predicate); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::fused_sched::emulator::sync_warp(mask); }

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32) {
  if (width != 32) ::fused_sched::emulator::fault("__shfl_sync: only width 32 is emulated");
  uint64_t lanes[32];
  ::fused_sched::emulator::warp_gather(mask, ::fused_sched::emulator::to_bits(value), lanes);
  return ::fused_sched::emulator::from_bits<T>(lanes[static_cast<unsigned>(source_lane) % 32u]);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  if (width != 32) ::fused_sched::emulator::fault("__shfl_up_sync: only width 32 is emulated");
  uint64_t lanes[32];
  ::fused_sched::emulator::warp_gather(mask, ::fused_sched::emulator::to_bits(value), lanes);
  const unsigned lane = ::fused_sched::emulator::lane_of_current();
  // A lane with no lane `delta` below it keeps its own value.
  return lane >= delta ? ::fused_sched::emulator::from_bits<T>(lanes[lane - delta]) : value;
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  uint64_t lanes[32];
  ::fused_sched::emulator::warp_gather(mask, predicate != 0 ? 1u : 0u, lanes);
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (((mask >> lane) & 1u) != 0u && lanes[lane] != 0u) ballot |= 1u << lane;
  }
  return ballot;
}

inline int __ffs(int x) { return __builtin_ffs(x); }

// Device atomics are relaxed read-modify-writes.
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}
inline unsigned atomicOr(unsigned* address, unsigned value) {
  return __atomic_fetch_or(address, value, __ATOMIC_RELAXED);
}
