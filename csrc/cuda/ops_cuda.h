// CUDA entry points of the fused scheduler step (called from csrc/bindings.cpp). Same
// contract as csrc/cpu/ops_cpu.h, for CUDA tensors, run on the current stream.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fused_sched::cuda {

void fused_step(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                const std::optional<at::Tensor>& history1, const std::optional<at::Tensor>& history2,
                const std::optional<at::Tensor>& noise, int64_t noise_mode, int64_t philox_seed,
                int64_t philox_offset, const std::optional<at::Tensor>& philox_base,
                const std::optional<at::Tensor>& scale, int64_t clip, double clip_range, int64_t absent_terms,
                const at::Tensor& out, const std::optional<at::Tensor>& history_out,
                const std::optional<at::Tensor>& x0_out);

at::Tensor threshold_scale(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                           double ratio, double max_value, int64_t absent_terms);

void philox_bits(int64_t seed, int64_t offset, const at::Tensor& out);

}  // namespace fused_sched::cuda
