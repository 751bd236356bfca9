// The emulator's runtime: a pool of CPU threads that run the threads of one block at a
// time, block barriers, warp exchanges, and the few CUDA runtime calls csrc/cuda makes.
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda_emulator.h"

namespace fused_sched::emulator {

thread_local ThreadPosition current{};

namespace {

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridX = 0x7fffffffu;

// Waits until `parties` threads have arrived; returns the OR of the flags they brought.
class Barrier {
 public:
  explicit Barrier(unsigned parties) : parties_(parties) {}

  int arrive_and_wait(int flag) {
    std::unique_lock<std::mutex> lock(mutex_);
    accumulated_ |= flag;
    const unsigned long generation = generation_;
    if (++arrived_ == parties_) {
      result_ = accumulated_;
      accumulated_ = 0;
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return result_;
    }
    released_.wait(lock, [&] { return generation_ != generation; });
    // No later generation can complete before this thread arrives again, so result_ is
    // still this generation's.
    return result_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const unsigned parties_;
  unsigned arrived_ = 0;
  unsigned long generation_ = 0;
  int accumulated_ = 0;
  int result_ = 0;
};

struct Warp {
  explicit Warp(unsigned lane_count) : lanes(lane_count), barrier(lane_count) {}
  const unsigned lanes;
  Barrier barrier;
  uint64_t slots[32] = {};
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads) {
    for (unsigned first = 0; first < threads; first += 32) {
      warps.push_back(std::make_unique<Warp>(std::min(32u, threads - first)));
    }
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

thread_local Block* current_block = nullptr;

// Persistent workers, one per emulated thread of the largest block seen so far; worker t
// runs thread t of each block. Never destroyed: the workers outlive every launch and
// block, idle, until the process exits.
class Pool {
 public:
  void run(unsigned threads, const std::function<void(unsigned)>& body) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_ < threads) {
      std::thread(&Pool::work, this, workers_++, generation_).detach();
    }
    body_ = &body;
    threads_ = threads;
    remaining_ = threads;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    body_ = nullptr;
  }

 private:
  // `seen`: the generation current when the worker was created (under the lock, before
  // the generation it is created for begins).
  void work(unsigned index, unsigned long seen) {
    for (;;) {
      const std::function<void(unsigned)>* body = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= threads_) continue;
        body = body_;
      }
      (*body)(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_;
  std::condition_variable done_;
  unsigned workers_ = 0;
  unsigned threads_ = 0;
  unsigned remaining_ = 0;
  unsigned long generation_ = 0;
  const std::function<void(unsigned)>* body_ = nullptr;
};

Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

std::mutex launch_mutex;
cudaError_t last_error = cudaSuccess;
unsigned long long launch_count = 0;

Warp& current_warp() { return *current_block->warps[current.thread_index.x / 32u]; }

}  // namespace

void fault(const char* what) {
  std::fprintf(stderr, "fused_sched CUDA emulator: kernel fault in block %u thread %u: %s\n", current.block_index.x,
               current.thread_index.x, what);
  std::fflush(stderr);
  std::abort();
}

unsigned long long launches() {
  std::lock_guard<std::mutex> guard(launch_mutex);
  return launch_count;
}

void sync_block() { current_block->barrier.arrive_and_wait(0); }

int sync_block_or(int predicate) { return current_block->barrier.arrive_and_wait(predicate != 0 ? 1 : 0); }

void warp_gather(unsigned mask, uint64_t mine, uint64_t (&lanes)[32]) {
  Warp& warp = current_warp();
  const unsigned expected = warp.lanes == 32 ? 0xffffffffu : (1u << warp.lanes) - 1u;
  if (mask != expected) fault("warp collective whose mask is not the warp's lanes");
  warp.slots[lane_of_current()] = mine;
  warp.barrier.arrive_and_wait(0);
  for (unsigned lane = 0; lane < 32; ++lane) lanes[lane] = lane < warp.lanes ? warp.slots[lane] : 0u;
  // Nobody overwrites a slot before every lane has read them all.
  warp.barrier.arrive_and_wait(0);
}

void sync_warp(unsigned mask) {
  Warp& warp = current_warp();
  const unsigned expected = warp.lanes == 32 ? 0xffffffffu : (1u << warp.lanes) - 1u;
  if (mask != expected) fault("__syncwarp whose mask is not the warp's lanes");
  warp.barrier.arrive_and_wait(0);
}

void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* context) {
  // One launch at a time: blocks share the pool and kernels' static shared arrays.
  std::lock_guard<std::mutex> guard(launch_mutex);
  ++launch_count;
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
  for (unsigned b = 0; b < grid.x; ++b) {
    Block state(threads);
    pool().run(threads, [&](unsigned t) {
      current.thread_index = make_uint3(t, 0, 0);
      current.block_index = make_uint3(b, 0, 0);
      current.block_dim = block;
      current.grid_dim = grid;
      current_block = &state;
      body(context);
      current_block = nullptr;
    });
  }
}

}  // namespace fused_sched::emulator

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
