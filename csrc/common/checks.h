// Argument checks shared by the CPU and CUDA launchers (torch headers; never seen by nvcc).
//
// The public op in fused_sched/ops validates shapes and options first; these checks guard
// the raw-pointer kernels against anything that reaches them another way (a backend
// object called directly, a future caller) with messages that say what to change.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "fused_sched/philox.h"
#include "fused_sched/step_math.h"

namespace fused_sched {

inline bool is_input_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_output_dtype(at::ScalarType t) { return is_input_dtype(t) || t == at::kDouble; }

inline void check_tensor_like(const char* backend, const char* name, const at::Tensor& t, const at::Tensor& sample,
                              bool is_output) {
  TORCH_CHECK(t.defined(), "fused_sched ", backend, " backend: ", name, " is an undefined tensor");
  TORCH_CHECK(t.sizes() == sample.sizes(), "fused_sched ", backend, " backend: ", name, " has shape ", t.sizes(),
              "; expected the sample's shape ", sample.sizes());
  TORCH_CHECK(t.device() == sample.device(), "fused_sched ", backend, " backend: ", name, " is on ", t.device(),
              "; expected the sample's device ", sample.device());
  if (is_output) {
    TORCH_CHECK(is_output_dtype(t.scalar_type()), "fused_sched ", backend, " backend: output ", name, " has dtype ",
                t.scalar_type(), "; supported output dtypes are float32, float16, bfloat16 and float64");
  } else {
    TORCH_CHECK(is_input_dtype(t.scalar_type()), "fused_sched ", backend, " backend: ", name, " has dtype ",
                t.scalar_type(),
                "; the compiled kernels read float32, float16 and bfloat16 (use backend='torch' for float64)");
  }
  TORCH_CHECK(t.is_contiguous(), "fused_sched ", backend, " backend: ", name,
              " must be contiguous (pass ", name, ".contiguous()); got strides ", t.strides());
}

// The bits of absent terms (layout.absent_terms): term columns only, never AS or PS, which
// scale a sum rather than weigh a term of it.
inline uint32_t checked_absent_terms(const char* backend, int64_t absent_terms) {
  constexpr int64_t kAllTerms = ((int64_t{1} << kNumCoefficients) - 1) & ~(int64_t{1} << kAS) & ~(int64_t{1} << kPS);
  TORCH_CHECK((absent_terms & ~kAllTerms) == 0, "fused_sched ", backend, " backend: absent_terms=", absent_terms,
              " has bits outside the term columns (mask ", kAllTerms, ")");
  return static_cast<uint32_t>(absent_terms);
}

// A bound on x0 (clip_range, the thresholding scale's maximum) reaches the kernels as a
// float32: one that rounds to 0 or a subnormal would clamp every x0 to (nearly) 0 or make
// x0 / s NaN, and a finite one beyond float32's range would round to inf.
inline void check_x0_bound(const char* backend, const char* name, double bound) {
  TORCH_CHECK(std::isinf(bound) ? bound > 0 : (bound >= FLT_MIN && bound <= FLT_MAX), "fused_sched ", backend,
              " backend: ", name, " must be inf or a normal float32 value > 0 (", FLT_MIN, " to ", FLT_MAX, "), got ",
              bound);
}

inline void check_threshold_arguments(const char* backend, int64_t row_size, at::IntArrayRef shape, double ratio,
                                      double max_value) {
  TORCH_CHECK(row_size > 0, "fused_sched ", backend, " backend: dynamic thresholding needs at least one element per "
              "batch row, got shape ", shape);
  TORCH_CHECK(ratio >= 0.0 && ratio <= 1.0, "fused_sched ", backend, " backend: threshold ratio must be in [0, 1], got ",
              ratio);
  check_x0_bound(backend, "threshold max_value", max_value);
}

// Checks what both ops read; returns the batch size B and the row size (elements per row).
inline std::pair<int64_t, int64_t> check_step_inputs(const char* backend, c10::DeviceType device_type,
                                                     const at::Tensor& sample, const at::Tensor& model_output,
                                                     const at::Tensor& coefficients) {
  TORCH_CHECK(sample.defined() && sample.device().type() == device_type, "fused_sched ", backend,
              " backend: sample must be a ", c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ",
              sample.defined() ? sample.device().str() : std::string("an undefined tensor"));
  TORCH_CHECK(sample.dim() >= 1 && sample.size(0) >= 1, "fused_sched ", backend,
              " backend: sample needs a leading batch dimension of size >= 1, got shape ", sample.sizes());
  check_tensor_like(backend, "sample", sample, sample, false);
  check_tensor_like(backend, "model_output", model_output, sample, false);
  const int64_t batch = sample.size(0);
  TORCH_CHECK(coefficients.defined() && coefficients.scalar_type() == at::kFloat, "fused_sched ", backend,
              " backend: coefficients must be a float32 tensor, got ",
              coefficients.defined() ? c10::toString(coefficients.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(coefficients.dim() == 2 && coefficients.size(1) == kNumCoefficients &&
                  (coefficients.size(0) == 1 || coefficients.size(0) == batch),
              "fused_sched ", backend, " backend: coefficients has shape ", coefficients.sizes(), "; expected (1, ",
              int(kNumCoefficients), ") or (", batch, ", ", int(kNumCoefficients), ")");
  TORCH_CHECK(coefficients.device() == sample.device(), "fused_sched ", backend, " backend: coefficients are on ",
              coefficients.device(), "; expected the sample's device ", sample.device());
  TORCH_CHECK(coefficients.is_contiguous(), "fused_sched ", backend,
              " backend: coefficients must be contiguous (pass coefficients.contiguous())");
  return {batch, sample.numel() / batch};
}

inline void check_scale(const char* backend, const at::Tensor& scale, const at::Tensor& sample) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == sample.size(0) && scale.is_contiguous(),
              "fused_sched ", backend, " backend: the threshold scale must be a contiguous float32 tensor of ",
              sample.size(0), " elements (one per batch row, as threshold_scale returns), got dtype ",
              scale.scalar_type(), " and shape ", scale.sizes());
  TORCH_CHECK(scale.device() == sample.device(), "fused_sched ", backend, " backend: the threshold scale is on ",
              scale.device(), "; expected the sample's device ", sample.device());
}

// PhiloxNoise with a tensor offset: one int64 on the sample's device, added to the int offset
// by the kernel (read from memory, so a traced or captured step sees its current value).
inline void check_philox_base(const char* backend, const std::optional<at::Tensor>& base, int64_t noise_mode,
                              const at::Tensor& sample) {
  if (!base) return;
  TORCH_CHECK(noise_mode == static_cast<int64_t>(NoiseSource::kPhilox), "fused_sched ", backend,
              " backend: philox_base goes with noise mode 2 (philox) only");
  TORCH_CHECK(base->defined() && base->scalar_type() == at::kLong && base->numel() == 1 && base->is_contiguous() &&
                  base->device() == sample.device(),
              "fused_sched ", backend, " backend: philox_base must be one int64 on the sample's device ",
              sample.device(), ", got ", base->defined() ? base->toString() : std::string("an undefined tensor"),
              base->defined() ? " with " + std::to_string(base->numel()) + " elements on " + base->device().str()
                              : std::string());
}

// Checks the options and every tensor of a fused_step call.
inline void check_fused_step(const char* backend, const at::Tensor& sample,
                             const std::optional<at::Tensor>& history1, const std::optional<at::Tensor>& history2,
                             const std::optional<at::Tensor>& noise, int64_t noise_mode, int64_t philox_offset,
                             const std::optional<at::Tensor>& scale, int64_t clip, double clip_range,
                             const at::Tensor& out, const std::optional<at::Tensor>& history_out,
                             const std::optional<at::Tensor>& x0_out) {
  TORCH_CHECK(clip >= 0 && clip <= 2, "fused_sched ", backend, " backend: clip mode ", clip,
              " is not 0 (none), 1 (clamp) or 2 (threshold)");
  TORCH_CHECK(!history2.has_value() || history1.has_value(), "fused_sched ", backend,
              " backend: history2 was given without history1");
  if (history1) check_tensor_like(backend, "history[0]", *history1, sample, false);
  if (history2) check_tensor_like(backend, "history[1]", *history2, sample, false);
  if (noise) check_tensor_like(backend, "noise", *noise, sample, false);
  TORCH_CHECK(noise_mode >= 0 && noise_mode <= 2, "fused_sched ", backend, " backend: noise mode ", noise_mode,
              " is not 0 (none), 1 (tensor) or 2 (philox)");
  TORCH_CHECK(noise.has_value() == (noise_mode == static_cast<int64_t>(NoiseSource::kNoiseTensor)), "fused_sched ",
              backend, " backend: a noise tensor goes with noise mode 1 (tensor) only, got mode ", noise_mode,
              noise.has_value() ? " with a tensor" : " without one");
  if (noise_mode == static_cast<int64_t>(NoiseSource::kPhilox)) {
    // Counters offset + i, i < numel, are computed in int64 (as the Triton kernel does).
    TORCH_CHECK(philox_offset >= 0 && philox_offset <= INT64_MAX - sample.numel(), "fused_sched ", backend,
                " backend: PhiloxNoise offset ", philox_offset, " + ", sample.numel(),
                " elements must stay in [0, 2**63)");
  }
  if (clip == 1) check_x0_bound(backend, "clip_range", clip_range);
  if (clip == 2) {
    TORCH_CHECK(scale.has_value(), "fused_sched ", backend,
                " backend: clip='threshold' needs the per-row scale from threshold_scale()");
    check_scale(backend, *scale, sample);
  }
  check_tensor_like(backend, "out", out, sample, true);
  if (history_out) check_tensor_like(backend, "history_out", *history_out, sample, true);
  if (x0_out) check_tensor_like(backend, "x0_out", *x0_out, sample, true);
}

// philox_bits (a test entry point) writes the raw 32-bit pairs of counters offset .. offset+n-1.
inline void check_philox_bits(const char* backend, at::DeviceType device, int64_t offset, const at::Tensor& out) {
  TORCH_CHECK(out.defined() && out.device().type() == device && out.scalar_type() == at::kInt && out.dim() == 2 &&
                  out.size(1) == 2 && out.is_contiguous(),
              "fused_sched ", backend, " backend: philox_bits writes a contiguous int32 ", backend,
              " tensor of shape (n, 2)");
  TORCH_CHECK(offset >= 0 && offset <= INT64_MAX - out.size(0), "fused_sched ", backend, " backend: philox offset ",
              offset, " + ", out.size(0), " must stay in [0, 2**63)");
}

}  // namespace fused_sched
