// CPU entry points of the fused scheduler step (called from csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

namespace fused_sched::cpu {

// Tests and benchmarks only: true forces the baseline-ISA kernels even where the CPU has
// AVX2+FMA (results are bit-identical; this checks that and measures the difference).
extern std::atomic<bool> portable_kernels_only;
// Whether the next launch runs the AVX2+FMA clones (else the baseline-ISA loops): the one
// place every cpu kernel asks.
bool use_fma_clones();
// Built to take in-kernel noise's log and cos from glibc's libmvec on AVX2 CPUs.
extern const bool vector_box_muller;

// Writes prev into `out` and, when given, the history value into `history_out` and the
// clipped x0 into `x0_out`. All tensors contiguous, on the CPU, with the sample's shape.
// z comes from `noise_mode` (NoiseSource): 0 none, 1 the `noise` tensor, 2 counter-based
// normals philox_normal(seed, philox_offset [+ *philox_base] + i) for the element with flat index i, where
// `philox_seed` carries the seed's 64 bits (fused_sched/ops/philox.py). `absent_terms`: bits
// 1 << column of terms left out of the sums (fused_sched/ops/layout.py, absent_terms).
void fused_step(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                const std::optional<at::Tensor>& history1, const std::optional<at::Tensor>& history2,
                const std::optional<at::Tensor>& noise, int64_t noise_mode, int64_t philox_seed,
                int64_t philox_offset, const std::optional<at::Tensor>& philox_base,
                const std::optional<at::Tensor>& scale, int64_t clip, double clip_range, int64_t absent_terms,
                const at::Tensor& out, const std::optional<at::Tensor>& history_out,
                const std::optional<at::Tensor>& x0_out);

// Tests: the two Philox outputs tl.randn uses, for counters offset + [0, n), into the
// contiguous int32 tensor `out` of shape (n, 2) (uint32 bit patterns).
void philox_bits(int64_t seed, int64_t offset, const at::Tensor& out);

// Tests: the loop fused_step runs for a step of this clip mode, number of history terms,
// noise and absent_terms: whether it computes d's unclipped form, the absent terms among
// those it reads, and whether they are compiled into it (known_absent_terms.h; false
// also where the CPU runs the baseline-ISA loops).
struct StepLoopChoice {
  bool unclipped_form;
  int64_t absent;
  bool known_absent;
};
StepLoopChoice step_loop_choice(int64_t clip, int64_t history, bool noise, int64_t absent_terms);

// Tests: the entries of known_absent_terms.h as (clip, history, noise, unclipped form, absent).
std::vector<std::tuple<int64_t, int64_t, bool, bool, int64_t>> known_absent_terms();

// Per-batch-row dynamic-thresholding scale, float32 of shape (B,).
at::Tensor threshold_scale(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                           double ratio, double max_value, int64_t absent_terms);

}  // namespace fused_sched::cpu
