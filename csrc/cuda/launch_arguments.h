// Tensors to the raw launch arguments of kernels.h, after the checks of common/checks.h.
//
// Host compiler only, and no CUDA torch header: ops_cuda.cpp builds its launches here from
// CUDA tensors, and the tests' CPU emulator of the kernels (tests/cuda_emulator) builds
// them from CPU tensors, so the emulated launches are the ones a GPU receives.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <optional>

#include "../common/checks.h"
#include "kernels.h"

namespace fused_sched::cuda {

inline DType dtype_of(const char* backend, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, "fused_sched ", backend, " backend: unsupported dtype ", t.scalar_type());
  }
}

// Checks every argument (tensors on `device`) and fills the launch; row_size may be 0.
inline StepLaunch fused_step_launch(const char* backend, c10::DeviceType device, const at::Tensor& sample,
                                    const at::Tensor& model_output, const at::Tensor& coefficients,
                                    const std::optional<at::Tensor>& history1,
                                    const std::optional<at::Tensor>& history2, const std::optional<at::Tensor>& noise,
                                    int64_t noise_mode, int64_t philox_seed, int64_t philox_offset,
                                    const std::optional<at::Tensor>& philox_base,
                                    const std::optional<at::Tensor>& scale, int64_t clip, double clip_range,
                                    int64_t absent_terms, const at::Tensor& out,
                                    const std::optional<at::Tensor>& history_out,
                                    const std::optional<at::Tensor>& x0_out) {
  const auto [batch, row_size] = check_step_inputs(backend, device, sample, model_output, coefficients);
  check_fused_step(backend, sample, history1, history2, noise, noise_mode, philox_offset, scale, clip, clip_range, out,
                   history_out, x0_out);
  check_philox_base(backend, philox_base, noise_mode, sample);
  const auto input = [](const std::optional<at::Tensor>& t) { return t ? t->const_data_ptr() : nullptr; };
  const auto output = [](const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; };
  const auto type = [backend](const std::optional<at::Tensor>& t) {
    return t ? dtype_of(backend, *t) : DType::kFloat32;
  };

  StepLaunch a;
  a.x = sample.const_data_ptr();
  a.m = model_output.const_data_ptr();
  a.h1 = input(history1);
  a.h2 = input(history2);
  a.noise = input(noise);
  a.x_type = dtype_of(backend, sample);
  a.m_type = dtype_of(backend, model_output);
  a.h1_type = type(history1);
  a.h2_type = type(history2);
  a.noise_type = type(noise);
  a.noise_mode = static_cast<int>(noise_mode);
  // The seed's bits: the kernels take the key as uint64 (seeds >= 2**63 arrive negative).
  a.philox_seed = static_cast<uint64_t>(philox_seed);
  a.philox_offset = static_cast<uint64_t>(philox_offset);
  a.philox_base = philox_base ? philox_base->const_data_ptr<int64_t>() : nullptr;
  a.out = out.data_ptr();
  a.history_out = output(history_out);
  a.x0_out = output(x0_out);
  a.out_type = dtype_of(backend, out);
  a.history_type = type(history_out);
  a.x0_type = type(x0_out);
  a.coefficients = coefficients.const_data_ptr<float>();
  a.coefficient_rows = coefficients.size(0);
  a.scale = clip == 2 ? scale->const_data_ptr<float>() : nullptr;
  a.batch = batch;
  a.row_size = row_size;
  a.clip = static_cast<int>(clip);
  // torch.clamp(x0, -r, r) on a float32 tensor rounds the Python float r to float32.
  a.clip_range = static_cast<float>(clip_range);
  a.absent_terms = checked_absent_terms(backend, absent_terms);
  return a;
}

// A threshold-scale launch and the tensors it writes: the (batch,) fp32 result and the
// selection workspace, both allocated on the sample's device (stream-ordered by torch's
// caching allocator on CUDA: no synchronisation, and a captured graph gets a private pool).
struct ThresholdScaleLaunch {
  ThresholdLaunch args;
  at::Tensor result;
  at::Tensor workspace;
};

inline ThresholdScaleLaunch threshold_scale_launch(const char* backend, c10::DeviceType device,
                                                   const at::Tensor& sample, const at::Tensor& model_output,
                                                   const at::Tensor& coefficients, double ratio, double max_value,
                                                   int64_t absent_terms) {
  const auto [batch, row_size] = check_step_inputs(backend, device, sample, model_output, coefficients);
  check_threshold_arguments(backend, row_size, sample.sizes(), ratio, max_value);
  TORCH_CHECK(batch <= 0x7fffffff, "fused_sched ", backend, " backend: dynamic thresholding supports at most 2**31 - 1 "
              "batch rows, got ", batch);
  ThresholdScaleLaunch launch;
  launch.result = at::empty({batch}, sample.options().dtype(at::kFloat));
  launch.workspace = at::empty({static_cast<int64_t>(threshold_workspace_bytes(batch))},
                               sample.options().dtype(at::kByte));
  ThresholdLaunch& a = launch.args;
  a.x = sample.const_data_ptr();
  a.m = model_output.const_data_ptr();
  a.x_type = dtype_of(backend, sample);
  a.m_type = dtype_of(backend, model_output);
  a.coefficients = coefficients.const_data_ptr<float>();
  a.coefficient_rows = coefficients.size(0);
  a.batch = batch;
  a.row_size = row_size;
  a.ratio = static_cast<float>(ratio);
  a.max_value = static_cast<float>(max_value);
  a.absent_terms = checked_absent_terms(backend, absent_terms);
  a.scale = launch.result.data_ptr<float>();
  a.workspace = launch.workspace.data_ptr();
  return launch;
}

}  // namespace fused_sched::cuda
