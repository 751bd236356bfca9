// Python bindings of the compiled fused-step kernels (pybind11; one module for both the
// CPU and, when built with CUDA, the CUDA entry points). Python allocates the outputs so
// that dtype choices stay in Python and the C++ side only checks and fills them.
#include <torch/extension.h>

#include "cpu/ops_cpu.h"
#if defined(FUSED_SCHED_WITH_CUDA)
#include "cuda/ops_cuda.h"
#endif

namespace {

template <typename FusedStep>
void def_fused_step(pybind11::module_& m, const char* name, FusedStep fn, const char* doc) {
  namespace py = pybind11;
  m.def(name, fn, doc, py::arg("sample"), py::arg("model_output"), py::arg("coefficients"), py::arg("history1"),
        py::arg("history2"), py::arg("noise"), py::arg("noise_mode"), py::arg("philox_seed"),
        py::arg("philox_offset"), py::arg("philox_base"), py::arg("scale"), py::arg("clip"), py::arg("clip_range"),
        py::arg("absent_terms"), py::arg("out"),
        py::arg("history_out"), py::arg("x0_out"));
}

template <typename PhiloxBits>
void def_philox_bits(pybind11::module_& m, const char* name, PhiloxBits fn, const char* doc) {
  namespace py = pybind11;
  m.def(name, fn, doc, py::arg("seed"), py::arg("offset"), py::arg("out"));
}

template <typename ThresholdScale>
void def_threshold_scale(pybind11::module_& m, const char* name, ThresholdScale fn, const char* doc) {
  namespace py = pybind11;
  m.def(name, fn, doc, py::arg("sample"), py::arg("model_output"), py::arg("coefficients"), py::arg("ratio"),
        py::arg("max_value"), py::arg("absent_terms"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_sched compiled kernels (see fused_sched/ops/layout.py for the math)";
  def_fused_step(m, "cpu_fused_step", &fused_sched::cpu::fused_step,
                 "One fused scheduler step on CPU tensors; fills out / history_out / x0_out.");
  def_threshold_scale(m, "cpu_threshold_scale", &fused_sched::cpu::threshold_scale,
                      "Per-row dynamic-thresholding scale (B,) float32 of CPU tensors.");
  def_philox_bits(m, "cpu_philox_bits", &fused_sched::cpu::philox_bits,
                  "Tests: the Philox outputs behind PhiloxNoise for counters offset + [0, n), into int32 (n, 2).");
  m.def(
      "cpu_use_portable_kernels_only",
      [](bool only) { fused_sched::cpu::portable_kernels_only.store(only); },
      "Tests/benchmarks: run the baseline-ISA CPU loops even on AVX2+FMA CPUs (same results, except in-kernel "
      "noise where cpu_vector_box_muller: libm's log/cos instead of libmvec's, within a few ulp).",
      pybind11::arg("only"));
  m.def("cpu_runs_fma_clones", &fused_sched::cpu::use_fma_clones,
        "Tests: whether cpu launches now run the AVX2+FMA clones (false: the baseline-ISA loops).");
  m.attr("cpu_vector_box_muller") = fused_sched::cpu::vector_box_muller;
  m.def(
      "cpu_step_loop",
      [](int64_t clip, int64_t history, bool noise, int64_t absent_terms) {
        const auto loop = fused_sched::cpu::step_loop_choice(clip, history, noise, absent_terms);
        return std::make_tuple(loop.unclipped_form, loop.absent, loop.known_absent);
      },
      "Tests: (unclipped form of d, absent terms the loop reads, whether they are compiled in) of the loop a cpu "
      "step with these arguments runs.",
      pybind11::arg("clip"), pybind11::arg("history"), pybind11::arg("noise"), pybind11::arg("absent_terms"));
  m.def("cpu_known_absent_terms", &fused_sched::cpu::known_absent_terms,
        "Tests: the step loops compiled with their absent terms known, as (clip, history, noise, unclipped form, "
        "absent terms).");
#if defined(FUSED_SCHED_WITH_CUDA)
  def_fused_step(m, "cuda_fused_step", &fused_sched::cuda::fused_step,
                 "One fused scheduler step on CUDA tensors, on the current stream.");
  def_threshold_scale(m, "cuda_threshold_scale", &fused_sched::cuda::threshold_scale,
                      "Per-row dynamic-thresholding scale (B,) float32 by radix select, on the current stream.");
  def_philox_bits(m, "cuda_philox_bits", &fused_sched::cuda::philox_bits,
                  "Tests: the Philox outputs behind PhiloxNoise for counters offset + [0, n), into int32 (n, 2).");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
