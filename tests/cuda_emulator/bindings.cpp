// Python bindings of the CUDA kernels run by the CPU emulator: csrc/cuda's entry points
// with the launch arguments of csrc/cuda/launch_arguments.h built from CPU tensors. Same
// functions and signatures as the compiled backends' (csrc/bindings.cpp), so the tests
// drive them through fused_sched's CompiledBackend like the real cuda backend.
#include <torch/extension.h>

#include <cstring>

#include "cuda_emulator.h"
#include "kernels.h"
#include "launch_arguments.h"
#include "selftest.h"

namespace {

namespace cuda = fused_sched::cuda;

constexpr const char* kBackend = "cuda-emulator";

// A GPU's fresh memory holds whatever was there before. The host allocator here often hands
// back the block just freed, which may hold the very values a test expects (the reference's
// result of the same shape), so an element a kernel fails to write could pass unseen. The
// outputs and the selection workspace of every emulated launch are therefore filled first
// with a pattern no step computes (0xA5 bytes: -2.9e-16 as fp32 or bf16, -0.022 as fp16).
constexpr int kPoisonByte = 0xA5;

void poison(const at::Tensor& t) {
  if (t.defined() && t.numel() > 0) std::memset(t.data_ptr(), kPoisonByte, t.nbytes());
}

void poison(const std::optional<at::Tensor>& t) {
  if (t.has_value()) poison(*t);
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "fused_sched ", kBackend, ": launching the ", what, " kernels failed: ",
              cudaGetErrorString(status));
}

void fused_step(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                const std::optional<at::Tensor>& history1, const std::optional<at::Tensor>& history2,
                const std::optional<at::Tensor>& noise, int64_t noise_mode, int64_t philox_seed,
                int64_t philox_offset, const std::optional<at::Tensor>& philox_base,
                const std::optional<at::Tensor>& scale, int64_t clip, double clip_range, int64_t absent_terms,
                const at::Tensor& out,
                const std::optional<at::Tensor>& history_out, const std::optional<at::Tensor>& x0_out) {
  const cuda::StepLaunch a = cuda::fused_step_launch(kBackend, c10::DeviceType::CPU, sample, model_output,
                                                     coefficients, history1, history2, noise, noise_mode, philox_seed,
                                                     philox_offset, philox_base, scale, clip, clip_range,
                                                     absent_terms, out, history_out, x0_out);
  if (a.row_size == 0) return;
  poison(out);
  poison(history_out);
  poison(x0_out);
  check_launch(cuda::launch_fused_step(a, nullptr), "fused-step");
}

at::Tensor threshold_scale(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                           double ratio, double max_value, int64_t absent_terms) {
  const cuda::ThresholdScaleLaunch launch = cuda::threshold_scale_launch(
      kBackend, c10::DeviceType::CPU, sample, model_output, coefficients, ratio, max_value, absent_terms);
  poison(launch.result);
  poison(launch.workspace);
  check_launch(cuda::launch_threshold_scale(launch.args, nullptr), "threshold-scale");
  return launch.result;
}

void philox_bits(int64_t seed, int64_t offset, const at::Tensor& out) {
  fused_sched::check_philox_bits(kBackend, at::kCPU, offset, out);
  poison(out);
  check_launch(cuda::launch_philox_bits(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out.size(0),
                                        static_cast<uint32_t*>(out.data_ptr()), nullptr),
               "philox-bits");
}

at::Tensor checked_block(const at::Tensor& t, at::ScalarType dtype, int64_t threads) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous() &&
                  threads >= 1 && threads <= 1024 && t.numel() % threads == 0,
              "self-test input: a contiguous 1-D CPU ", dtype, " tensor of whole blocks of 1..1024 threads");
  return t;
}

at::Tensor selftest_reverse(const at::Tensor& in, int64_t threads, bool synchronise) {
  checked_block(in, at::kInt, threads);
  at::Tensor out = at::empty_like(in);
  check_launch(fused_sched::emulator::selftest::reverse(in.const_data_ptr<int32_t>(), out.data_ptr<int32_t>(),
                                                        in.numel() / threads, threads, synchronise),
               "self-test");
  return out;
}

at::Tensor selftest_broadcast(const at::Tensor& in, int64_t threads, bool synchronise) {
  TORCH_CHECK(in.device().is_cpu() && in.scalar_type() == at::kInt && in.dim() == 1 && in.is_contiguous() &&
                  in.numel() >= 1 && threads >= 1 && threads <= 1024,
              "self-test input: a contiguous 1-D CPU int32 tensor, one value per block of 1..1024 threads");
  at::Tensor out = at::empty({in.numel() * threads}, in.options());
  check_launch(fused_sched::emulator::selftest::broadcast(in.const_data_ptr<int32_t>(), out.data_ptr<int32_t>(),
                                                          in.numel(), threads, synchronise),
               "self-test");
  return out;
}

std::vector<at::Tensor> selftest_collectives(const at::Tensor& in, int64_t threads) {
  checked_block(in, at::kLong, threads);
  std::vector<at::Tensor> out;
  for (int k = 0; k < 4; ++k) out.push_back(at::empty_like(in));
  check_launch(fused_sched::emulator::selftest::collectives(in.const_data_ptr<int64_t>(), out[0].data_ptr<int64_t>(),
                                                            out[1].data_ptr<int64_t>(), out[2].data_ptr<int64_t>(),
                                                            out[3].data_ptr<int64_t>(), in.numel() / threads,
                                                            threads),
               "self-test");
  return out;
}

// (thread order, block order) of one launch: see arrival_order_kernel.
std::vector<at::Tensor> selftest_arrival_order(int64_t blocks, int64_t threads) {
  TORCH_CHECK(blocks >= 1 && threads >= 1 && threads <= 1024, "self-test: 1.. blocks of 1..1024 threads");
  at::Tensor thread_order = at::full({blocks, 2, threads}, -1, at::kInt);
  at::Tensor block_order = at::full({blocks}, -1, at::kInt);
  at::Tensor counters = at::zeros({1 + 2 * blocks}, at::kInt);
  check_launch(fused_sched::emulator::selftest::arrival_order(
                   thread_order.data_ptr<int32_t>(), block_order.data_ptr<int32_t>(),
                   reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>()), blocks, threads),
               "self-test");
  return {thread_order, block_order};
}

// A fresh output poisoned as fused_step's are, then half written: what a missed write shows.
at::Tensor selftest_write_even(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= (int64_t{1} << 24), "self-test: 1..2**24 elements");
  at::Tensor out = at::empty({n}, at::kInt);
  poison(out);
  check_launch(fused_sched::emulator::selftest::write_even(out.data_ptr<int32_t>(), n), "self-test");
  return out;
}

void set_schedule(const std::string& order, uint64_t seed) {
  namespace emulator = fused_sched::emulator;
  if (order == "in-order") {
    emulator::set_schedule(emulator::Schedule::kInOrder, seed);
  } else if (order == "reversed") {
    emulator::set_schedule(emulator::Schedule::kReversed, seed);
  } else if (order == "shuffled") {
    emulator::set_schedule(emulator::Schedule::kShuffled, seed);
  } else {
    TORCH_CHECK(false, "schedule order must be 'in-order', 'reversed' or 'shuffled', got '", order, "'");
  }
}

void selftest_divergent_barrier(int64_t threads) {
  check_launch(fused_sched::emulator::selftest::divergent_barrier(threads), "self-test");
}

float selftest_misaligned_load() {
  alignas(16) float values[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  float out = 0.0f;
  check_launch(fused_sched::emulator::selftest::misaligned_load(values, &out), "self-test");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "csrc/cuda's kernels on CPU tensors, run by the tests' CUDA emulator";
  namespace py = pybind11;
  // The argument names of csrc/bindings.cpp, so tests may pass them by keyword to either.
  m.def("fused_step", &fused_step, py::arg("sample"), py::arg("model_output"), py::arg("coefficients"),
        py::arg("history1"), py::arg("history2"), py::arg("noise"), py::arg("noise_mode"), py::arg("philox_seed"),
        py::arg("philox_offset"), py::arg("philox_base"), py::arg("scale"), py::arg("clip"), py::arg("clip_range"),
        py::arg("absent_terms"), py::arg("out"), py::arg("history_out"), py::arg("x0_out"));
  m.def("threshold_scale", &threshold_scale, py::arg("sample"), py::arg("model_output"), py::arg("coefficients"),
        py::arg("ratio"), py::arg("max_value"), py::arg("absent_terms"));
  m.def("philox_bits", &philox_bits, py::arg("seed"), py::arg("offset"), py::arg("out"));
  m.def("selftest_reverse", &selftest_reverse);
  m.def("selftest_broadcast", &selftest_broadcast);
  m.def("selftest_collectives", &selftest_collectives);
  m.def("selftest_arrival_order", &selftest_arrival_order);
  m.def("selftest_divergent_barrier", &selftest_divergent_barrier);
  m.def("selftest_write_even", &selftest_write_even);
  m.def("set_schedule", &set_schedule, py::arg("order"), py::arg("seed") = 0,
        "The order of blocks and of a block's threads in later launches: 'in-order' (the default), "
        "'reversed' or 'shuffled' (by seed, a new thread order every round).");
  m.def("selftest_misaligned_load", &selftest_misaligned_load);
  m.def("launches", &fused_sched::emulator::launches, "Kernel launches so far in this process.");
  m.def("take_launch_grids", &fused_sched::emulator::take_launch_grids,
        "The grid sizes (blocks) of the launches since the last call, in issue order.");
  m.attr("multiprocessors") = fused_sched::emulator::kMultiprocessors;
  m.attr("resident_blocks_per_multiprocessor") = fused_sched::emulator::kResidentBlocksPerMultiprocessor;
  m.attr("poison_byte") = kPoisonByte;
}
