// The fused scheduler step on CUDA: one elementwise pass, specialised at compile time on
// clip mode, history count and noise source (what changes the arithmetic and the loads),
// with the optional outputs as uniform runtime branches. Counter-based noise is computed
// from the element's flat index, so the grid, the packing and the row split never change
// which number an element gets.
#include <algorithm>
#include <atomic>
#include <iterator>

#include "device_io.cuh"
#include "fused_sched/philox.h"
#include "fused_sched/step_math.h"
#include "kernels.h"
#include "launch.cuh"

namespace fused_sched::cuda {
namespace {

constexpr int kThreads = 256;

// The row a thread's elements [first, end) belong to, with what it reads per row.
struct RowCache {
  int64_t first = 0;
  int64_t end = 0;  // empty until the first element: no row is loaded yet
  Coefficients c;
  float scale = 1.0f;
};

// Coefficients are read from device memory (not kernel arguments) so that a captured
// CUDA graph replays any step; a thread re-reads them only when its element i leaves the
// row it has, and only then divides (a 64-bit division is dozens of instructions, and a
// grid-stride thread stays in one row for many iterations). Without per-row data every
// element is in row 0.
template <Clip kClip>
__device__ __forceinline__ void select_row(const StepLaunch& a, int64_t i, bool per_row, RowCache& cache) {
  if (i >= cache.first && i < cache.end) return;
  const int64_t row = per_row ? i / a.row_size : 0;
  cache.first = per_row ? row * a.row_size : 0;
  cache.end = per_row ? cache.first + a.row_size : a.batch * a.row_size;
  cache.c = load_coefficients(a.coefficients + (a.coefficient_rows == 1 ? 0 : row) * kNumCoefficients, a.absent_terms);
  if constexpr (kClip == Clip::kThreshold) cache.scale = a.scale[row];
}

template <Clip kClip, int kHistory, NoiseSource kNoise, bool kPacked>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(const StepLaunch a, bool per_row) {
  constexpr bool kHasNoise = kNoise != NoiseSource::kNoNoise;
  const int64_t total = a.batch * a.row_size;
  const int64_t units = kPacked ? total / kPack : total;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // A device-resident counter base is read when the kernel runs, so a captured or traced
  // step uses the scheduler's current counter.
  uint64_t philox_first = a.philox_offset;
  if constexpr (kNoise == NoiseSource::kPhilox) {
    if (a.philox_base != nullptr) philox_first += static_cast<uint64_t>(*a.philox_base);
  }
  RowCache cache;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t i = kPacked ? u * kPack : u;
    // A pack never straddles rows: packing needs row_size % kPack == 0 when rows differ.
    select_row<kClip>(a, i, per_row, cache);
    if constexpr (kPacked) {
      float x[kPack], m[kPack], h1[kPack], h2[kPack], z[kPack];
      load_pack(a.x, a.x_type, i, x);
      load_pack(a.m, a.m_type, i, m);
      if constexpr (kHistory >= 1) load_pack(a.h1, a.h1_type, i, h1);
      if constexpr (kHistory >= 2) load_pack(a.h2, a.h2_type, i, h2);
      if constexpr (kNoise == NoiseSource::kNoiseTensor) load_pack(a.noise, a.noise_type, i, z);
      if constexpr (kNoise == NoiseSource::kPhilox) {
#pragma unroll
        for (int k = 0; k < kPack; ++k) {
          z[k] = philox_normal(a.philox_seed, philox_first + static_cast<uint64_t>(i + k));
        }
      }
      float out[kPack], d[kPack], x0[kPack];
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        const StepValues v = step<kClip, kHistory, kHasNoise>(cache.c, x[k], m[k], kHistory >= 1 ? h1[k] : 0.0f,
                                                              kHistory >= 2 ? h2[k] : 0.0f, kHasNoise ? z[k] : 0.0f,
                                                              a.clip_range, cache.scale);
        out[k] = v.out;
        d[k] = v.d;
        x0[k] = v.x0;
      }
      store_pack(a.out, a.out_type, i, out);
      if (a.history_out != nullptr) store_pack(a.history_out, a.history_type, i, d);
      if (a.x0_out != nullptr) store_pack(a.x0_out, a.x0_type, i, x0);
    } else {
      const float h1 = kHistory >= 1 ? load_one(a.h1, a.h1_type, i) : 0.0f;
      const float h2 = kHistory >= 2 ? load_one(a.h2, a.h2_type, i) : 0.0f;
      float z = 0.0f;
      if constexpr (kNoise == NoiseSource::kNoiseTensor) z = load_one(a.noise, a.noise_type, i);
      if constexpr (kNoise == NoiseSource::kPhilox) {
        z = philox_normal(a.philox_seed, philox_first + static_cast<uint64_t>(i));
      }
      const StepValues v = step<kClip, kHistory, kHasNoise>(cache.c, load_one(a.x, a.x_type, i),
                                                            load_one(a.m, a.m_type, i), h1, h2, z, a.clip_range,
                                                            cache.scale);
      store_one(a.out, a.out_type, i, v.out);
      if (a.history_out != nullptr) store_one(a.history_out, a.history_type, i, v.d);
      if (a.x0_out != nullptr) store_one(a.x0_out, a.x0_type, i, v.x0);
    }
  }
}

template <Clip kClip, int kHistory, NoiseSource kNoise>
void launch(const StepLaunch& a, bool per_row, bool packed, cudaStream_t stream) {
  const int64_t units = a.batch * a.row_size / (packed ? kPack : 1);
  const int64_t wanted = (units + kThreads - 1) / kThreads;
  const auto grid = [wanted](int wave) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, wave)));
  };
  if (packed) {
    constexpr auto kernel = fused_step_kernel<kClip, kHistory, kNoise, true>;
    FS_LAUNCH(grid(blocks_per_wave<kernel, kThreads>()), kThreads, stream, kernel)(a, per_row);
  } else {
    constexpr auto kernel = fused_step_kernel<kClip, kHistory, kNoise, false>;
    FS_LAUNCH(grid(blocks_per_wave<kernel, kThreads>()), kThreads, stream, kernel)(a, per_row);
  }
}

template <Clip kClip, int kHistory>
void dispatch_noise(const StepLaunch& a, bool per_row, bool packed, cudaStream_t stream) {
  switch (static_cast<NoiseSource>(a.noise_mode)) {
    case NoiseSource::kNoiseTensor:
      return launch<kClip, kHistory, NoiseSource::kNoiseTensor>(a, per_row, packed, stream);
    case NoiseSource::kPhilox:
      return launch<kClip, kHistory, NoiseSource::kPhilox>(a, per_row, packed, stream);
    default:
      return launch<kClip, kHistory, NoiseSource::kNoNoise>(a, per_row, packed, stream);
  }
}

template <Clip kClip>
void dispatch_history(const StepLaunch& a, bool per_row, bool packed, cudaStream_t stream) {
  if (a.h2 != nullptr) return dispatch_noise<kClip, 2>(a, per_row, packed, stream);
  if (a.h1 != nullptr) return dispatch_noise<kClip, 1>(a, per_row, packed, stream);
  return dispatch_noise<kClip, 0>(a, per_row, packed, stream);
}

bool all_aligned(const StepLaunch& a) {
  const void* pointers[] = {a.x, a.m, a.h1, a.h2, a.noise, a.out, a.history_out, a.x0_out};
  return std::all_of(std::begin(pointers), std::end(pointers),
                     [](const void* p) { return p == nullptr || aligned16(p); });
}

}  // namespace

int multiprocessor_count() {
  static std::atomic<int> cached[kMaxDevices] = {};
  const int count = once_per_device(cached, [](int device) {
    int value = 0;
    return cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device) == cudaSuccess ? value : 0;
  });
  return count > 0 ? count : 1;
}

cudaError_t launch_fused_step(const StepLaunch& a, cudaStream_t stream) {
  if (a.batch <= 0 || a.row_size <= 0) return cudaSuccess;
  if (a.noise_mode < 0 || a.noise_mode > 2 ||
      (a.noise_mode == static_cast<int>(NoiseSource::kNoiseTensor)) != (a.noise != nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool per_row = a.coefficient_rows > 1 || a.clip == static_cast<int>(Clip::kThreshold);
  const int64_t total = a.batch * a.row_size;
  const bool packed = all_aligned(a) && (per_row ? a.row_size % kPack == 0 : total % kPack == 0);
  switch (static_cast<Clip>(a.clip)) {
    case Clip::kNone:
      dispatch_history<Clip::kNone>(a, per_row, packed, stream);
      break;
    case Clip::kClamp:
      dispatch_history<Clip::kClamp>(a, per_row, packed, stream);
      break;
    case Clip::kThreshold:
      dispatch_history<Clip::kThreshold>(a, per_row, packed, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fused_sched::cuda
