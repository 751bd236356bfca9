// Launcher of the CUDA kernels: checks tensors, turns them into raw pointers and calls
// the torch-free entry points of kernels.h on the current stream. Host compiler only.
#include "ops_cuda.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "../common/checks.h"
#include "../cpu/ops_cpu.h"
#include "kernels.h"

namespace fused_sched::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
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
      TORCH_CHECK(false, "fused_sched cuda backend: unsupported dtype ", t.scalar_type());
  }
}

const void* input_ptr(const std::optional<at::Tensor>& t) { return t ? t->const_data_ptr() : nullptr; }
void* output_ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }
DType dtype_or_float(const std::optional<at::Tensor>& t) { return t ? dtype_of(*t) : DType::kFloat32; }

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "fused_sched cuda backend: launching the ", what, " kernels failed: ",
              cudaGetErrorString(status));
}

}  // namespace

void fused_step(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                const std::optional<at::Tensor>& history1, const std::optional<at::Tensor>& history2,
                const std::optional<at::Tensor>& noise, int64_t noise_mode, int64_t philox_seed,
                int64_t philox_offset, const std::optional<at::Tensor>& philox_base,
                const std::optional<at::Tensor>& scale, int64_t clip, double clip_range,
                const at::Tensor& out, const std::optional<at::Tensor>& history_out,
                const std::optional<at::Tensor>& x0_out) {
  const auto [batch, row_size] = check_step_inputs("cuda", c10::DeviceType::CUDA, sample, model_output, coefficients);
  check_fused_step("cuda", sample, history1, history2, noise, noise_mode, philox_offset, scale, clip, clip_range, out,
                   history_out, x0_out);
  const c10::cuda::CUDAGuard guard(sample.device());

  StepLaunch a;
  a.x = sample.const_data_ptr();
  a.m = model_output.const_data_ptr();
  a.h1 = input_ptr(history1);
  a.h2 = input_ptr(history2);
  a.noise = input_ptr(noise);
  a.x_type = dtype_of(sample);
  a.m_type = dtype_of(model_output);
  a.h1_type = dtype_or_float(history1);
  a.h2_type = dtype_or_float(history2);
  a.noise_type = dtype_or_float(noise);
  a.noise_mode = static_cast<int>(noise_mode);
  // The seed's bits: the kernels take the key as uint64 (seeds >= 2**63 arrive negative).
  a.philox_seed = static_cast<uint64_t>(philox_seed);
  a.philox_offset = static_cast<uint64_t>(philox_offset);
  check_philox_base("cuda", philox_base, noise_mode, sample);
  a.philox_base = philox_base ? philox_base->const_data_ptr<int64_t>() : nullptr;
  a.out = out.data_ptr();
  a.history_out = output_ptr(history_out);
  a.x0_out = output_ptr(x0_out);
  a.out_type = dtype_of(out);
  a.history_type = dtype_or_float(history_out);
  a.x0_type = dtype_or_float(x0_out);
  a.coefficients = coefficients.const_data_ptr<float>();
  a.coefficient_rows = coefficients.size(0);
  a.scale = clip == 2 ? scale->const_data_ptr<float>() : nullptr;
  a.batch = batch;
  a.row_size = row_size;
  a.clip = static_cast<int>(clip);
  // torch.clamp(x0, -r, r) on a float32 tensor rounds the Python float r to float32.
  a.clip_range = static_cast<float>(clip_range);
  if (row_size == 0) return;
  check_launch(launch_fused_step(a, c10::cuda::getCurrentCUDAStream().stream()), "fused-step");
}

at::Tensor threshold_scale(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                           double ratio, double max_value) {
  const auto [batch, row_size] = check_step_inputs("cuda", c10::DeviceType::CUDA, sample, model_output, coefficients);
  TORCH_CHECK(row_size > 0, "fused_sched cuda backend: dynamic thresholding needs at least one element per batch "
              "row, got shape ", sample.sizes());
  TORCH_CHECK(ratio > 0.0 && ratio <= 1.0, "fused_sched cuda backend: threshold ratio must be in (0, 1], got ", ratio);
  TORCH_CHECK(batch <= 0x7fffffff, "fused_sched cuda backend: dynamic thresholding supports at most 2**31 - 1 batch "
              "rows, got ", batch);
  const c10::cuda::CUDAGuard guard(sample.device());

  at::Tensor result = at::empty({batch}, sample.options().dtype(at::kFloat));
  // Selection state lives in a stream-ordered allocation from torch's caching allocator:
  // no synchronisation, and graph capture gives it a private pool.
  at::Tensor workspace = at::empty({static_cast<int64_t>(threshold_workspace_bytes(batch))},
                                   sample.options().dtype(at::kByte));
  ThresholdLaunch a;
  a.x = sample.const_data_ptr();
  a.m = model_output.const_data_ptr();
  a.x_type = dtype_of(sample);
  a.m_type = dtype_of(model_output);
  a.coefficients = coefficients.const_data_ptr<float>();
  a.coefficient_rows = coefficients.size(0);
  a.batch = batch;
  a.row_size = row_size;
  a.ratio = static_cast<float>(ratio);
  a.max_value = static_cast<float>(max_value);
  a.scale = result.data_ptr<float>();
  a.workspace = workspace.data_ptr();
  check_launch(launch_threshold_scale(a, c10::cuda::getCurrentCUDAStream().stream()), "threshold-scale");
  return result;
}

void philox_bits(int64_t seed, int64_t offset, const at::Tensor& out) {
  check_philox_bits("cuda", at::kCUDA, offset, out);
  const int64_t n = out.size(0);
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(launch_philox_bits(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), n,
                                  static_cast<uint32_t*>(out.data_ptr()), c10::cuda::getCurrentCUDAStream().stream()),
               "philox-bits");
}

// bindings.cpp binds both backends the same way; its CUDA half is compiled only in CUDA
// builds, so the shared signatures are checked here, where CPU-only CI compiles too.
static_assert(std::is_same_v<decltype(&fused_step), decltype(&cpu::fused_step)>);
static_assert(std::is_same_v<decltype(&threshold_scale), decltype(&cpu::threshold_scale)>);
static_assert(std::is_same_v<decltype(&philox_bits), decltype(&cpu::philox_bits)>);

}  // namespace fused_sched::cuda
