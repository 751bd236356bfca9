// CPU entry points of the fused scheduler step (called from csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include <atomic>

namespace fused_sched::cpu {

// Tests and benchmarks only: true forces the baseline-ISA kernels even where the CPU has
// AVX2+FMA (results are bit-identical; this checks that and measures the difference).
extern std::atomic<bool> portable_kernels_only;

// Writes prev into `out` and, when given, the history value into `history_out` and the
// clipped x0 into `x0_out`. All tensors contiguous, on the CPU, with the sample's shape.
void fused_step(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                const std::optional<at::Tensor>& history1, const std::optional<at::Tensor>& history2,
                const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& scale, int64_t clip,
                double clip_range, const at::Tensor& out, const std::optional<at::Tensor>& history_out,
                const std::optional<at::Tensor>& x0_out);

// Per-batch-row dynamic-thresholding scale, float32 of shape (B,).
at::Tensor threshold_scale(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                           double ratio, double max_value);

}  // namespace fused_sched::cpu
