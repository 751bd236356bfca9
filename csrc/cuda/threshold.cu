// Dynamic-thresholding scale by radix select on CUDA: the exact order statistics of
// |x0| that torch.quantile interpolates, without sorting and without a size limit.
//
// Keys are the 31 significant bits of |x0| (step_math.h, abs_key), recomputed from x and
// m on the fly in every pass instead of being stored, since a pass is bandwidth-bound and
// a key buffer would cost a write and a read of its own. Three digit passes of 11, 10 and
// 10 bits each build per-row histograms (shared-memory atomics, then one global add per
// non-empty bin) of the keys that match the prefix chosen so far, and a one-warp kernel
// per row narrows the prefix in device memory. The two order statistics lo and hi
// (= lo or lo + 1) are selected together: they share a histogram until their prefixes
// differ, then each keeps its own. The last narrowing kernel writes the scale.
#include <algorithm>

#include "device_io.cuh"
#include "fused_sched/step_math.h"
#include "kernels.h"
#include "launch.cuh"

namespace fused_sched::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned kRowHasNan = 1u;
// Set if a narrowing step finds no bin holding its target rank. That would be a bug, not
// a property of the data; the row's scale becomes NaN rather than an arbitrary value.
constexpr unsigned kSelectionFailed = 2u;

// Selection state of one batch row, in the caller's workspace.
struct RowState {
  unsigned long long hist[2][kRadixMaxBins];  // [target][digit]; target 1 only once split
  unsigned long long remaining[2];            // rank of lo / hi among keys matching prefix
  unsigned int prefix[2];                     // key bits chosen so far for lo / hi
  unsigned int flags;
};

__global__ void __launch_bounds__(kThreads) init_kernel(RowState* states, unsigned long long lo,
                                                        unsigned long long hi) {
  RowState& st = states[blockIdx.x];
  for (int b = threadIdx.x; b < 2 * kRadixMaxBins; b += blockDim.x) (&st.hist[0][0])[b] = 0ull;
  if (threadIdx.x == 0) {
    st.remaining[0] = lo;
    st.remaining[1] = hi;
    st.prefix[0] = 0u;
    st.prefix[1] = 0u;
    st.flags = 0u;
  }
}

template <int kPass, bool kPacked>
__global__ void __launch_bounds__(kThreads) histogram_kernel(const ThresholdLaunch a, RowState* states,
                                                             int blocks_per_row) {
  constexpr int kBins = 1 << radix_bits(kPass);
  __shared__ unsigned int counts[2][kBins];

  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t part = blockIdx.x % blocks_per_row;
  RowState& st = states[row];
  const uint32_t prefix_lo = st.prefix[0];
  const uint32_t prefix_hi = st.prefix[1];
  const bool split = prefix_lo != prefix_hi;

  for (int b = threadIdx.x; b < 2 * kBins; b += blockDim.x) (&counts[0][0])[b] = 0u;
  __syncthreads();

  const Coefficients c =
      load_coefficients(a.coefficients + (a.coefficient_rows == 1 ? 0 : row) * kNumCoefficients, a.absent_terms);
  const int64_t base = row * a.row_size;
  const int64_t stride = static_cast<int64_t>(blocks_per_row) * blockDim.x;
  bool saw_nan = false;
  auto count = [&](float x, float m) {
    const float v = data_estimate(c, x, m);
    saw_nan |= is_nan(v);
    const uint32_t key = abs_key(v);
    const uint32_t digit = radix_digit(key, kPass);
    if (radix_prefix_matches(key, prefix_lo, kPass)) atomicAdd(&counts[0][digit], 1u);
    if (split && radix_prefix_matches(key, prefix_hi, kPass)) atomicAdd(&counts[1][digit], 1u);
  };
  if constexpr (kPacked) {
    const int64_t packs = a.row_size / kPack;
    for (int64_t p = part * blockDim.x + threadIdx.x; p < packs; p += stride) {
      float x[kPack], m[kPack];
      load_pack(a.x, a.x_type, base + p * kPack, x);
      load_pack(a.m, a.m_type, base + p * kPack, m);
#pragma unroll
      for (int k = 0; k < kPack; ++k) count(x[k], m[k]);
    }
  } else {
    for (int64_t i = part * blockDim.x + threadIdx.x; i < a.row_size; i += stride) {
      count(load_one(a.x, a.x_type, base + i), load_one(a.m, a.m_type, base + i));
    }
  }

  if constexpr (kPass == 0) {
    // A NaN anywhere in the row makes its quantile NaN; the first pass sees every element.
    if (__syncthreads_or(saw_nan) && threadIdx.x == 0) atomicOr(&st.flags, kRowHasNan);
  } else {
    __syncthreads();
  }
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    if (counts[0][b] != 0u) atomicAdd(&st.hist[0][b], static_cast<unsigned long long>(counts[0][b]));
    if (split && counts[1][b] != 0u) atomicAdd(&st.hist[1][b], static_cast<unsigned long long>(counts[1][b]));
  }
}

// One warp per row: finds, for each target, the digit whose bin holds its remaining rank,
// appends it to the target's prefix, and clears the histograms for the next pass. After
// the last pass the prefixes are the order statistics themselves.
template <int kPass>
__global__ void __launch_bounds__(kWarp) narrow_kernel(RowState* states, float weight, float max_value,
                                                       float* scale) {
  constexpr int kBins = 1 << radix_bits(kPass);
  constexpr int kPerLane = kBins / kWarp;
  constexpr bool kLast = kPass == kRadixPasses - 1;
  RowState& st = states[blockIdx.x];
  const int lane = threadIdx.x;
  // Whether the histograms of this pass were built per target (read before any update).
  const bool split = st.prefix[0] != st.prefix[1];

  for (int target = 0; target < 2; ++target) {
    const unsigned long long* hist = st.hist[split ? target : 0];
    const unsigned long long k = st.remaining[target];
    unsigned long long sum = 0;
#pragma unroll 8
    for (int j = 0; j < kPerLane; ++j) sum += hist[lane * kPerLane + j];
    unsigned long long inclusive = sum;
#pragma unroll
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const unsigned long long y = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane >= offset) inclusive += y;
    }
    const unsigned long long exclusive = inclusive - sum;
    const unsigned owners = __ballot_sync(kFullMask, k >= exclusive && k < inclusive);
    unsigned digit = 0;
    unsigned long long below = 0;
    if (owners != 0u) {
      const int owner = __ffs(owners) - 1;
      if (lane == owner) {
        unsigned long long run = exclusive;
        for (int j = 0; j < kPerLane; ++j) {
          const unsigned long long n = hist[lane * kPerLane + j];
          if (k < run + n) {
            digit = static_cast<unsigned>(lane * kPerLane + j);
            below = run;
            break;
          }
          run += n;
        }
      }
      digit = __shfl_sync(kFullMask, digit, owner);
      below = __shfl_sync(kFullMask, below, owner);
    }
    if (lane == 0) {
      if (owners == 0u) st.flags |= kSelectionFailed;
      st.prefix[target] |= digit << radix_shift(kPass);
      st.remaining[target] = k - below;
    }
    __syncwarp();
  }

  if constexpr (kLast) {
    if (lane == 0) {
      scale[blockIdx.x] = threshold_from_order_statistics(key_value(st.prefix[0]), key_value(st.prefix[1]), weight,
                                                          st.flags != 0u, max_value);
    }
  } else {
    for (int b = lane; b < 2 * kRadixMaxBins; b += kWarp) (&st.hist[0][0])[b] = 0ull;
  }
}

template <int kPass>
void launch_pass(const ThresholdLaunch& a, RowState* states, int blocks_per_row, bool packed, float weight,
                 cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(a.batch * blocks_per_row);
  if (packed) {
    FS_LAUNCH(grid, kThreads, stream, histogram_kernel<kPass, true>)(a, states, blocks_per_row);
  } else {
    FS_LAUNCH(grid, kThreads, stream, histogram_kernel<kPass, false>)(a, states, blocks_per_row);
  }
  FS_LAUNCH(static_cast<unsigned>(a.batch), kWarp, stream, narrow_kernel<kPass>)(states, weight, a.max_value, a.scale);
}

}  // namespace

std::size_t threshold_workspace_bytes(int64_t batch) {
  return static_cast<std::size_t>(batch) * sizeof(RowState);
}

cudaError_t launch_threshold_scale(const ThresholdLaunch& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.row_size <= 0 || a.batch > 0x7fffffff) return cudaErrorInvalidValue;
  const QuantileRank rank = quantile_rank(a.ratio, a.row_size);
  RowState* states = static_cast<RowState*>(a.workspace);

  const bool packed = a.row_size % kPack == 0 && aligned16(a.x) && aligned16(a.m);
  const int64_t units = packed ? a.row_size / kPack : a.row_size;
  // One full wave of blocks across all rows (the passes differ only in which digit they
  // count, so pass 0 stands for all three), but at least a few thousand elements per
  // block so the per-block histogram flush stays small.
  const int64_t wave = packed ? blocks_per_wave<histogram_kernel<0, true>, kThreads>()
                              : blocks_per_wave<histogram_kernel<0, false>, kThreads>();
  const int64_t per_row_for_device = (wave + a.batch - 1) / a.batch;
  const int64_t per_row_for_work = (units + 8 * kThreads - 1) / (8 * kThreads);
  const int64_t grid_limit = 0x7fffffff / a.batch;
  // A block's histogram counts are 32-bit: no block may count 2^31 elements (a margin for
  // the grid-stride remainder), whatever the device queries gave (1 block if they failed).
  const int64_t per_row_for_counts = (a.row_size + (int64_t{1} << 31) - 1) >> 31;
  const int blocks_per_row = static_cast<int>(std::max<int64_t>(
      {1, per_row_for_counts, std::min({per_row_for_device, per_row_for_work, grid_limit})}));

  FS_LAUNCH(static_cast<unsigned>(a.batch), kThreads, stream, init_kernel)(
      states, static_cast<unsigned long long>(rank.lo), static_cast<unsigned long long>(rank.hi));
  launch_pass<0>(a, states, blocks_per_row, packed, rank.weight, stream);
  launch_pass<1>(a, states, blocks_per_row, packed, rank.weight, stream);
  launch_pass<2>(a, states, blocks_per_row, packed, rank.weight, stream);
  return cudaGetLastError();
}

}  // namespace fused_sched::cuda
