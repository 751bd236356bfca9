// The CUDA entry points as plain C++: raw pointers, sizes and a stream. No torch header,
// so the .cu files that implement them compile with nvcc alone, and the launcher
// (ops_cuda.cpp, host compiler, torch headers) is the only place that sees tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fused_sched::cuda {

// Storage types of a tensor. Inputs are kFloat32 / kFloat16 / kBFloat16; outputs may
// also be kFloat64 (the result is still computed in fp32, then widened).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct StepLaunch {
  // Inputs, each batch * row_size contiguous elements. h1/h2/noise are null when absent
  // (h2 only with h1).
  const void* x;
  const void* m;
  const void* h1;
  const void* h2;
  const void* noise;
  DType x_type, m_type, h1_type, h2_type, noise_type;
  // Where z comes from (fused_sched::NoiseSource): 0 none, 1 the `noise` tensor (non-null),
  // 2 philox_normal(philox_seed, philox_offset [+ *philox_base] + i) for the element with flat
  // index i.
  int noise_mode;
  uint64_t philox_seed;
  uint64_t philox_offset;
  // Device memory holding an int64 added to philox_offset (a scheduler's counter), or null.
  // Each thread loads it when the kernel runs, so a captured graph's replays see the value
  // the stream has written by then.
  const int64_t* philox_base;
  // Outputs: out always; history_out / x0_out null to skip them.
  void* out;
  void* history_out;
  void* x0_out;
  DType out_type, history_type, x0_type;
  // (coefficient_rows, 11) fp32 rows on the device; coefficient_rows is 1 or batch.
  const float* coefficients;
  int64_t coefficient_rows;
  // (batch,) fp32 threshold scales on the device, for clip == 2 only.
  const float* scale;
  int64_t batch;
  int64_t row_size;
  int clip;  // 0 none, 1 clamp, 2 threshold (fused_sched::Clip)
  float clip_range;
  // Bits 1 << column of the terms left out of the sums (fused_sched::Coefficients::absent).
  uint32_t absent_terms;
};

// Runs the fused step on `stream`; returns the launch status.
cudaError_t launch_fused_step(const StepLaunch& args, cudaStream_t stream);

// Tests: the two Philox outputs tl.randn uses for counters offset + [0, n), written as
// out[2 i], out[2 i + 1] (device memory, 2 n values), on `stream`.
cudaError_t launch_philox_bits(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out, cudaStream_t stream);

struct ThresholdLaunch {
  const void* x;
  const void* m;
  DType x_type, m_type;
  const float* coefficients;
  int64_t coefficient_rows;
  int64_t batch;
  int64_t row_size;  // >= 1
  float ratio;       // in [0, 1]
  float max_value;
  uint32_t absent_terms;  // as in StepLaunch
  float* scale;     // (batch,) fp32 output on the device
  void* workspace;  // threshold_workspace_bytes(batch) bytes on the device, any content
};

std::size_t threshold_workspace_bytes(int64_t batch);

// s_b = clamp(quantile(|x0_b|, ratio), 1, max_value) per batch row by radix select, all
// on `stream`: the passes narrow the selection in device memory, so there is no host
// round trip (and the sequence can be captured in a CUDA graph).
cudaError_t launch_threshold_scale(const ThresholdLaunch& args, cudaStream_t stream);

// Multiprocessor count of the current device (cached per device), for grid sizing.
int multiprocessor_count();

}  // namespace fused_sched::cuda
