// Python bindings of the CUDA kernels run by the CPU emulator: csrc/cuda's entry points
// with the launch arguments of csrc/cuda/launch_arguments.h built from CPU tensors. Same
// functions and signatures as the compiled backends' (csrc/bindings.cpp), so the tests
// drive them through fused_sched's CompiledBackend like the real cuda backend.
#include <torch/extension.h>

#include "cuda_emulator.h"
#include "kernels.h"
#include "launch_arguments.h"

namespace {

namespace cuda = fused_sched::cuda;

constexpr const char* kBackend = "cuda-emulator";

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "fused_sched ", kBackend, ": launching the ", what, " kernels failed: ",
              cudaGetErrorString(status));
}

void fused_step(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                const std::optional<at::Tensor>& history1, const std::optional<at::Tensor>& history2,
                const std::optional<at::Tensor>& noise, int64_t noise_mode, int64_t philox_seed,
                int64_t philox_offset, const std::optional<at::Tensor>& philox_base,
                const std::optional<at::Tensor>& scale, int64_t clip, double clip_range, const at::Tensor& out,
                const std::optional<at::Tensor>& history_out, const std::optional<at::Tensor>& x0_out) {
  const cuda::StepLaunch a = cuda::fused_step_launch(kBackend, c10::DeviceType::CPU, sample, model_output,
                                                     coefficients, history1, history2, noise, noise_mode, philox_seed,
                                                     philox_offset, philox_base, scale, clip, clip_range, out,
                                                     history_out, x0_out);
  if (a.row_size == 0) return;
  check_launch(cuda::launch_fused_step(a, nullptr), "fused-step");
}

at::Tensor threshold_scale(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                           double ratio, double max_value) {
  const cuda::ThresholdScaleLaunch launch = cuda::threshold_scale_launch(
      kBackend, c10::DeviceType::CPU, sample, model_output, coefficients, ratio, max_value);
  check_launch(cuda::launch_threshold_scale(launch.args, nullptr), "threshold-scale");
  return launch.result;
}

void philox_bits(int64_t seed, int64_t offset, const at::Tensor& out) {
  fused_sched::check_philox_bits(kBackend, at::kCPU, offset, out);
  check_launch(cuda::launch_philox_bits(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out.size(0),
                                        static_cast<uint32_t*>(out.data_ptr()), nullptr),
               "philox-bits");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "csrc/cuda's kernels on CPU tensors, run by the tests' CUDA emulator";
  m.def("fused_step", &fused_step);
  m.def("threshold_scale", &threshold_scale);
  m.def("philox_bits", &philox_bits);
  m.def("launches", &fused_sched::emulator::launches, "Kernel launches so far in this process.");
  m.attr("multiprocessors") = fused_sched::emulator::kMultiprocessors;
}
