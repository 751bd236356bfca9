// The emulator's runtime: a block's threads as cooperative fibers on the calling CPU
// thread, block and warp barriers, and the few CUDA runtime calls csrc/cuda makes.
//
// Fibers, not OS threads: a fiber runs until it reaches a barrier or a warp collective, so
// every thread of a block reaches each barrier before any goes past it, in an order the
// schedule fixes (set_schedule; thread 0 first by default). That makes a missing
// __syncthreads fail deterministically (the first thread reads shared memory before the
// others have written it) where OS threads would expose it only by chance, and makes the
// outcome of any other race a function of the schedule, so tests can vary it and compare;
// it is also ~20x faster than waking hundreds of OS threads at every barrier on two cores.
// Threads waiting at different barriers, or a thread that returns while others wait,
// would hang a GPU; here they are reported as a kernel fault.
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emulator.h"

namespace fused_sched::emulator {

thread_local ThreadPosition current{};

namespace {

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 0x7fffffffu;
constexpr std::size_t kStackBytes = 256 * 1024;

// A barrier of `parties` fibers; arrive() returns the OR of the flags they brought.
struct Barrier {
  unsigned parties = 0;
  unsigned arrived = 0;
  unsigned long generation = 0;
  int accumulated = 0;
  int result = 0;
};

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  bool finished = false;
};

// Fiber stacks, kept from launch to launch (one per thread of the largest block so far).
std::vector<std::unique_ptr<char[]>> stacks;

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<std::array<uint64_t, 32>> warp_slots;
  unsigned running = 0;
  // Set by every arrival, release and finish: a scheduling round without it is a deadlock.
  bool progressed = false;
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  uint3 block_index;
  dim3 block_dim;
  dim3 grid_dim;
};

Block* active = nullptr;
std::mutex launch_mutex;
cudaError_t last_error = cudaSuccess;
unsigned long long launch_count = 0;
std::vector<unsigned> launch_grids;  // since the last take_launch_grids()
Schedule schedule = Schedule::kInOrder;
uint64_t schedule_seed = 0;

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// order = 0..n-1 as the schedule runs them; `round` varies the shuffle (stream of draws).
void schedule_order(std::vector<unsigned>& order, unsigned n, uint64_t round) {
  order.resize(n);
  for (unsigned i = 0; i < n; ++i) order[i] = schedule == Schedule::kReversed ? n - 1 - i : i;
  if (schedule != Schedule::kShuffled) return;
  uint64_t state = splitmix64(schedule_seed ^ splitmix64(round));
  for (unsigned i = n; i > 1; --i) {  // Fisher-Yates
    state = splitmix64(state);
    std::swap(order[i - 1], order[state % i]);
  }
}

void yield_to_scheduler() {
  Fiber& self = active->fibers[active->running];
  swapcontext(&self.context, &active->scheduler);
  // Resumed: the scheduler has set `current` back to this fiber's position.
}

int arrive_and_wait(Barrier& barrier, int flag) {
  active->progressed = true;
  barrier.accumulated |= flag;
  const unsigned long generation = barrier.generation;
  if (++barrier.arrived == barrier.parties) {
    barrier.result = barrier.accumulated;
    barrier.accumulated = 0;
    barrier.arrived = 0;
    ++barrier.generation;
    return barrier.result;
  }
  while (barrier.generation == generation) yield_to_scheduler();
  // No later generation can complete before this fiber arrives again, so `result` is still
  // this generation's.
  return barrier.result;
}

void fiber_entry() {
  Block& block = *active;
  block.body(block.context);
  block.fibers[block.running].finished = true;
  block.progressed = true;
  // uc_link returns to the scheduler.
}

unsigned warp_lanes(const Block& block, unsigned warp) {
  return std::min(32u, block.block_dim.x - 32u * warp);
}

unsigned lanes_mask(unsigned lanes) { return lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u; }

void run_block(Block& block, unsigned threads) {
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& fiber = block.fibers[t];
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack;
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = &block.scheduler;
    fiber.finished = false;
    makecontext(&fiber.context, fiber_entry, 0);
  }
  std::vector<unsigned> order;
  unsigned finished = 0;
  for (uint64_t round = 0; finished < threads; ++round) {
    block.progressed = false;
    finished = 0;
    schedule_order(order, threads, (uint64_t{block.block_index.x} << 32) ^ round);
    for (const unsigned t : order) {
      if (block.fibers[t].finished) {
        ++finished;
        continue;
      }
      block.running = t;
      current.thread_index = make_uint3(t, 0, 0);
      current.block_index = block.block_index;
      current.block_dim = block.block_dim;
      current.grid_dim = block.grid_dim;
      swapcontext(&block.scheduler, &block.fibers[t].context);
    }
    if (finished < threads && !block.progressed) {
      current.thread_index = make_uint3(block.running, 0, 0);
      fault("deadlock: the block's threads wait at different barriers, or some returned while others wait");
    }
  }
}

}  // namespace

void fault(const char* what) {
  std::fprintf(stderr, "fused_sched CUDA emulator: kernel fault in block %u thread %u: %s\n", current.block_index.x,
               current.thread_index.x, what);
  std::fflush(stderr);
  std::abort();
}

void set_schedule(Schedule order, uint64_t seed) {
  std::lock_guard<std::mutex> guard(launch_mutex);
  schedule = order;
  schedule_seed = seed;
}

unsigned long long launches() {
  std::lock_guard<std::mutex> guard(launch_mutex);
  return launch_count;
}

std::vector<unsigned> take_launch_grids() {
  std::lock_guard<std::mutex> guard(launch_mutex);
  std::vector<unsigned> taken;
  taken.swap(launch_grids);
  return taken;
}

void sync_block() { arrive_and_wait(active->block_barrier, 0); }

int sync_block_or(int predicate) { return arrive_and_wait(active->block_barrier, predicate != 0 ? 1 : 0); }

void warp_gather(unsigned mask, uint64_t mine, uint64_t (&lanes)[32]) {
  const unsigned warp = current.thread_index.x / 32u;
  const unsigned count = warp_lanes(*active, warp);
  if (mask != lanes_mask(count)) fault("warp collective whose mask is not the warp's lanes");
  std::array<uint64_t, 32>& slots = active->warp_slots[warp];
  slots[lane_of_current()] = mine;
  arrive_and_wait(active->warp_barriers[warp], 0);
  for (unsigned lane = 0; lane < 32; ++lane) lanes[lane] = lane < count ? slots[lane] : 0u;
  // Nobody overwrites a slot before every lane has read them all.
  arrive_and_wait(active->warp_barriers[warp], 0);
}

void sync_warp(unsigned mask) {
  const unsigned warp = current.thread_index.x / 32u;
  if (mask != lanes_mask(warp_lanes(*active, warp))) fault("__syncwarp whose mask is not the warp's lanes");
  arrive_and_wait(active->warp_barriers[warp], 0);
}

void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* context) {
  // One launch at a time: a launch owns the kernels' static shared arrays.
  std::lock_guard<std::mutex> guard(launch_mutex);
  ++launch_count;
  if (launch_grids.size() < 4096) launch_grids.push_back(grid.x);  // bounded: nobody may take them
  const unsigned threads = block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > kMaxGridX || threads == 0 ||
      threads > kMaxThreadsPerBlock) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) {
    std::fprintf(stderr, "fused_sched CUDA emulator: only one-dimensional grids and blocks are emulated\n");
    std::abort();
  }
  Block state;
  state.fibers.resize(threads);
  while (stacks.size() < threads) stacks.emplace_back(new char[kStackBytes]);
  for (unsigned t = 0; t < threads; ++t) state.fibers[t].stack = stacks[t].get();
  const unsigned warps = (threads + 31) / 32;
  state.warp_barriers.resize(warps);
  state.warp_slots.resize(warps);
  state.body = body;
  state.context = context;
  state.block_dim = block;
  state.grid_dim = grid;
  Block* const outer = active;
  active = &state;
  std::vector<unsigned> blocks;
  schedule_order(blocks, grid.x, ~uint64_t{0});
  for (const unsigned b : blocks) {
    state.block_barrier = Barrier{threads};
    for (unsigned w = 0; w < warps; ++w) state.warp_barriers[w] = Barrier{warp_lanes(state, w)};
    state.block_index = make_uint3(b, 0, 0);
    run_block(state, threads);
  }
  active = outer;
  current = ThreadPosition{};
}

}  // namespace fused_sched::emulator

// UndefinedBehaviorSanitizer (the emulator is built with it) asks for its options when it
// first reports. Reports go to files <prefix>.<pid> named by the tests in
// FUSED_SCHED_EMULATOR_UBSAN_LOG, not to a stderr that pytest captures and nobody reads.
extern "C" const char* __ubsan_default_options() {
  static const std::string options = [] {
    const char* prefix = std::getenv("FUSED_SCHED_EMULATOR_UBSAN_LOG");
    return prefix != nullptr ? std::string("log_path=") + prefix : std::string();
  }();
  return options.c_str();
}

// The runtime calls csrc/cuda makes, for one emulated device.
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0 || attribute != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = fused_sched::emulator::kMultiprocessors;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel, int block_size,
                                                          size_t dynamic_shared_memory) {
  if (kernel == nullptr || block_size < 1 || block_size > 1024 || dynamic_shared_memory != 0) {
    return cudaErrorInvalidValue;
  }
  *blocks = fused_sched::emulator::kResidentBlocksPerMultiprocessor;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> guard(fused_sched::emulator::launch_mutex);
  const cudaError_t error = fused_sched::emulator::last_error;
  fused_sched::emulator::last_error = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    default:
      return "unrecognized error code";
  }
}
