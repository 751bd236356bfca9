// Launcher of the CUDA kernels: the checked launch arguments of launch_arguments.h, run by
// the torch-free entry points of kernels.h on the current stream. Host compiler only.
#include "ops_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "../common/checks.h"
#include "../cpu/ops_cpu.h"
#include "kernels.h"
#include "launch_arguments.h"

namespace fused_sched::cuda {
namespace {

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "fused_sched cuda backend: launching the ", what, " kernels failed: ",
              cudaGetErrorString(status));
}

}  // namespace

void fused_step(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                const std::optional<at::Tensor>& history1, const std::optional<at::Tensor>& history2,
                const std::optional<at::Tensor>& noise, int64_t noise_mode, int64_t philox_seed,
                int64_t philox_offset, const std::optional<at::Tensor>& philox_base,
                const std::optional<at::Tensor>& scale, int64_t clip, double clip_range, int64_t absent_terms,
                const at::Tensor& out, const std::optional<at::Tensor>& history_out,
                const std::optional<at::Tensor>& x0_out) {
  const StepLaunch a = fused_step_launch("cuda", c10::DeviceType::CUDA, sample, model_output, coefficients, history1,
                                         history2, noise, noise_mode, philox_seed, philox_offset, philox_base, scale,
                                         clip, clip_range, absent_terms, out, history_out, x0_out);
  if (a.row_size == 0) return;
  const c10::cuda::CUDAGuard guard(sample.device());
  check_launch(launch_fused_step(a, c10::cuda::getCurrentCUDAStream().stream()), "fused-step");
}

at::Tensor threshold_scale(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                           double ratio, double max_value, int64_t absent_terms) {
  const ThresholdScaleLaunch launch = threshold_scale_launch("cuda", c10::DeviceType::CUDA, sample, model_output,
                                                            coefficients, ratio, max_value, absent_terms);
  const c10::cuda::CUDAGuard guard(sample.device());
  check_launch(launch_threshold_scale(launch.args, c10::cuda::getCurrentCUDAStream().stream()), "threshold-scale");
  return launch.result;
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
