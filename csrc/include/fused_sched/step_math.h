// The per-element step math shared by the CPU and CUDA kernels.
//
// Written once so that both backends round identically, and as the reference does:
// fused_sched/ops/reference.py builds each sum with torch.addcmul(a, b, c) = a + b*c,
// which ATen evaluates as one fused multiply-add (its AVX2/AVX-512 CPU kernels, and its
// CUDA kernel for value 1, as called there: one FFMA in torch 2.11.0+cu130's sm_90 code),
// and every other product or sum separately rounded. Here the same terms
// are explicit fmadd() calls and every other operation is explicitly rounded, so the
// compiler cannot contract or reassociate anything: host code is built with
// -ffp-contract=off, and device code uses __fmaf_rn / __fmul_rn / __fadd_rn, which nvcc
// never fuses further.
//
// This header includes no torch and no CUDA header, so g++ compiles it on its own.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

namespace fused_sched {

// Columns of a coefficient row; must match fused_sched/ops/layout.py (a test compares them).
enum Column : int {
  kAX = 0,
  kAM = 1,
  kPX = 2,
  kP0 = 3,
  kPM = 4,
  kOX = 5,
  kO0 = 6,
  kOM = 7,
  kO1 = 8,
  kO2 = 9,
  kON = 10,
  kAS = 11,
  kOC = 12,
  kPS = 13,
  kAL = 14,
  kUS = 15,
  kUX = 16,
  kUM = 17,
  kNumCoefficients = 18,
};

// Values match layout.CLIP_MODES' positions; the bindings pass them as ints.
enum class Clip : int { kNone = 0, kClamp = 1, kThreshold = 2 };

struct Coefficients {
  float ax, am, px, p0, pm, ox, o0, om, o1, o2, on, as, oc, ps, al, us, ux, um;
  // Bits 1 << column of the terms known to be 0 in every row (layout.absent_terms): left
  // out of the sums, not multiplied, since 0 * inf is NaN and -0 + 0*t is +0 where the
  // reference and diffusers have no such term.
  uint32_t absent;
};

FS_HD Coefficients load_coefficients(const float* row, uint32_t absent) {
  Coefficients c;
  c.absent = absent;
  c.ax = row[kAX];
  c.am = row[kAM];
  c.px = row[kPX];
  c.p0 = row[kP0];
  c.pm = row[kPM];
  c.ox = row[kOX];
  c.o0 = row[kO0];
  c.om = row[kOM];
  c.o1 = row[kO1];
  c.o2 = row[kO2];
  c.on = row[kON];
  c.as = row[kAS];
  c.oc = row[kOC];
  c.ps = row[kPS];
  c.al = row[kAL];
  c.us = row[kUS];
  c.ux = row[kUX];
  c.um = row[kUM];
  return c;
}

FS_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FS_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// a / b correctly rounded, also where the device build is asked for approximate division
// (-prec-div=false, which --use_fast_math implies, say through NVCC_APPEND_FLAGS).
FS_HD float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// a*b + c with one rounding. On the host this is std::fma: a single instruction where the
// caller is compiled for FMA (the CPU kernels' FMA clones), a correctly rounded libm call
// otherwise, so every build gives the same bits.
FS_HD float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

FS_HD bool is_nan(float v) { return v != v; }

// Where a term may be absent or a value replaced, the GPU selects and the CPU loops blend bit
// patterns (gcc vectorises a blend; see add_difference_term). The tests' CUDA emulator, which
// compiles the .cu sources for the host, takes the GPU's select forms, so that CI checks
// them against the reference as it checks the CPU's blends through the cpu backend.
#if defined(__CUDA_ARCH__) || defined(FUSED_SCHED_CUDA_EMULATOR)
#define FS_SELECT_FORMS 1
#else
#define FS_SELECT_FORMS 0
#endif

#if !defined(__CUDA_ARCH__)
// Bits of `when_set` where `mask` is set, of `otherwise` elsewhere (a mask is all 0 or all 1).
inline float blend(uint32_t mask, float when_set, float otherwise) {
  uint32_t a, b;
  std::memcpy(&a, &when_set, sizeof(a));
  std::memcpy(&b, &otherwise, sizeof(b));
  const uint32_t bits = (a & mask) | (b & ~mask);
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
#endif

// torch.maximum / torch.minimum: a NaN in either argument wins. Written as one compare
// and a select so the CPU loops stay vectorisable.
FS_HD float nan_max(float a, float b) { return (a > b || is_nan(a)) ? a : b; }
FS_HD float nan_min(float a, float b) { return (a < b || is_nan(a)) ? a : b; }

// torch.clamp(v, lo, hi) for lo <= hi: NaN passes through.
FS_HD float clamp_keep_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Every sum starts here: -0 is the identity of addition, so a first term fmadd(a, t, -0) is
// the product a*t rounded once, sign of zero included, as the reference's first product.
constexpr float kEmptySum = -0.0f;

// sum + a*t with one rounding, or sum itself where the term is absent (see Coefficients).
FS_HD float add_term(float sum, const Coefficients& c, Column column, float a, float t) {
  return ((c.absent >> column) & 1u) ? sum : fmadd(a, t, sum);
}

// add_term for a history difference t = newer - older. On the host, a blend of the two
// bit patterns rather than a select: gcc keeps a subtraction that only one side of a select
// uses on that side (-ftrapping-math), which left the step loops with history scalar (13x
// the instructions, callgrind); here the difference is formed on both.
FS_HD float add_difference_term(float sum, const Coefficients& c, Column column, float a, float newer, float older) {
#if FS_SELECT_FORMS
  return add_term(sum, c, column, a, sub(newer, older));
#else
  const uint32_t keep_sum = 0u - ((c.absent >> column) & 1u);
  return blend(keep_sum, sum, fmadd(a, sub(newer, older), sum));
#endif
}

// x0 = AS*(AX*x + AM*m + AL*m), before clipping (addcmuls, then a product, in the reference). The sum is formed first and scaled after (see
// layout.py): for epsilon prediction AS = 1/sqrt(alpha), which is +inf on zero-SNR
// schedules, and scaling the cancelled sum gives the +-inf that clipping then bounds.
FS_HD float data_estimate(const Coefficients& c, float x, float m) {
  const float sum = add_term(add_term(add_term(kEmptySum, c, kAX, c.ax, x), c, kAM, c.am, m), c, kAL, c.al, m);
  return mul(sum, c.as);
}

// clamp: x0 to [-r, r]. threshold: clamp(x0, -s, s) / s with the row's scale s; a true
// division (not a reciprocal product) because that is what the reference rounds.
template <Clip kClip>
FS_HD float apply_clip(float x0, float clip_range, float scale) {
  if constexpr (kClip == Clip::kClamp) {
    return clamp_keep_nan(x0, -clip_range, clip_range);
  } else if constexpr (kClip == Clip::kThreshold) {
    return div(nan_min(nan_max(x0, -scale), scale), scale);
  } else {
    (void)clip_range;
    (void)scale;
    return x0;
  }
}

// d = PS*(PX*x + P0*x0 + PM*m): what the multistep history stores (two addcmuls, then a
// product, in the reference). Scaled after the sum cancels, as x0 is (see layout.py).
FS_HD float history_value(const Coefficients& c, float x, float x0, float m) {
  return mul(add_term(add_term(add_term(kEmptySum, c, kPX, c.px, x), c, kP0, c.p0, x0), c, kPM, c.pm, m), c.ps);
}

// US*(UX*x + UM*m): the history value without x0, for where clipping left x0 unchanged.
FS_HD float unclipped_history_value(const Coefficients& c, float x, float m) {
  return mul(add_term(add_term(kEmptySum, c, kUX, c.ux, x), c, kUM, c.um, m), c.us);
}

// d where clipping left x0 unchanged, for a row that gives it without x0 (US != 0):
// unclipped_history_value, the same value without the round trip through x0 (layout.py);
// `d` (the form through the clipped x0) elsewhere, where x0 is NaN, and without clipping.
// kUnclippedForm false compiles to `d`: the CPU loops are specialised on it (a US known to
// be 0 in every row), since computing the form costs every loop about a quarter more
// instructions (callgrind). On the host a blend of bit patterns under one mask, as in
// add_difference_term: with a branch or a select, gcc left the step loops scalar.
template <bool kUnclippedForm>
FS_HD float keep_unclipped_history_value(const Coefficients& c, float x, float m, float x0, float x0c, float d) {
  if constexpr (!kUnclippedForm) {
    (void)x;
    (void)m;
    (void)x0;
    (void)x0c;
    return d;
  } else {
#if FS_SELECT_FORMS
    if ((c.absent >> kUS) & 1u) return d;
    return x0c == x0 && c.us != 0.0f ? unclipped_history_value(c, x, m) : d;
#else
    const float unclipped = unclipped_history_value(c, x, m);
    const uint32_t has_form = ((c.absent >> kUS) & 1u) ^ 1u;
    const uint32_t use = has_form & static_cast<uint32_t>(c.us != 0.0f) & static_cast<uint32_t>(x0c == x0);
    return blend(0u - use, unclipped, d);
#endif
  }
}

// out = OX*x (+ OC*x0) + O0*d + OM*m (+ O1*(d - h1)) (+ O2*(h1 - h2)) (+ ON*z), terms added
// left to right, each after the first by an addcmul in the reference. The clipped x0
// enters only when clipping: unclipped, it is linear in x and m (tables fold it into OX
// and OM) and may be +-inf, where 0*x0 would be NaN. History enters as differences of
// consecutive values, each rounded once before it is weighed (see layout.py).
template <Clip kClip, int kHistory, bool kNoise>
FS_HD float combine(const Coefficients& c, float x, float x0, float d, float m, float h1, float h2, float z) {
  static_assert(kHistory >= 0 && kHistory <= 2, "at most two history terms");
  float out = add_term(kEmptySum, c, kOX, c.ox, x);
  if constexpr (kClip != Clip::kNone) out = add_term(out, c, kOC, c.oc, x0);
  out = add_term(add_term(out, c, kO0, c.o0, d), c, kOM, c.om, m);
  if constexpr (kHistory >= 1) out = add_difference_term(out, c, kO1, c.o1, d, h1);
  if constexpr (kHistory >= 2) out = add_difference_term(out, c, kO2, c.o2, h1, h2);
  if constexpr (kNoise) out = add_term(out, c, kON, c.on, z);
  (void)x0;
  (void)h1;
  (void)h2;
  (void)z;
  return out;
}

struct StepValues {
  float out;
  float d;
  float x0;
};

// kUnclippedForm: see keep_unclipped_history_value; it never applies without clipping.
template <Clip kClip, int kHistory, bool kNoise, bool kUnclippedForm = kClip != Clip::kNone>
FS_HD StepValues step(const Coefficients& c, float x, float m, float h1, float h2, float z, float clip_range,
                      float scale) {
  StepValues v;
  const float x0 = data_estimate(c, x, m);
  v.x0 = apply_clip<kClip>(x0, clip_range, scale);
  v.d = keep_unclipped_history_value<kUnclippedForm && kClip != Clip::kNone>(c, x, m, x0, v.x0,
                                                                           history_value(c, x, v.x0, m));
  v.out = combine<kClip, kHistory, kNoise>(c, x, v.x0, v.d, m, h1, h2, z);
  return v;
}

// ---- dynamic thresholding: s_b = clamp(quantile(|x0_b|, q), 1, max) ----

// The two order statistics torch.quantile interpolates and its weight, with torch's
// float32 rank arithmetic (rank = fl32(q) * fl32(n - 1)); a double rank would choose a
// different weight for some n. For n - 1 above 2**24 the float rank can round up past
// n - 1 when q is within an ulp of 1; the indices are clamped to the last element there,
// where torch.quantile (limited to 2**24 elements) has no answer to copy.
struct QuantileRank {
  int64_t lo;
  int64_t hi;
  float weight;
};

FS_HD QuantileRank quantile_rank(float q, int64_t n) {
  const float rank = q * static_cast<float>(n - 1);
  const float below = floorf(rank);
  QuantileRank r;
  r.lo = static_cast<int64_t>(below);
  r.hi = static_cast<int64_t>(ceilf(rank));
  r.weight = rank - below;
  if (r.lo > n - 1) r.lo = n - 1;
  if (r.hi > n - 1) r.hi = n - 1;
  return r;
}

// torch.lerp as ATen's vectorised CPU kernel (AVX2/AVX-512) and its CUDA kernel compute
// it: fma(w, b - a, a) for |w| < 0.5, else fma(w - 1, b - a, b). (ATen's scalar fallback
// for CPUs without FMA rounds the product separately and can differ by one ulp.)
FS_HD float lerp_like_torch(float a, float b, float w) {
  const float diff = b - a;
  return fabsf(w) < 0.5f ? fmaf(w, diff, a) : fmaf(w - 1.0f, diff, b);
}

// The final scale from the two order statistics: NaN when the row held a NaN (as
// torch.quantile gives), then torch.clamp(s, min=1, max=max_value). Equal statistics are the
// quantile itself: lerp(inf, inf, w) would be NaN (x0 = +-inf for epsilon prediction where
// alphas_cumprod is 0), as it is in the reference.
FS_HD float threshold_from_order_statistics(float v_lo, float v_hi, float weight, bool row_has_nan,
                                            float max_value) {
  float s = v_lo == v_hi ? v_lo : lerp_like_torch(v_lo, v_hi, weight);
  if (row_has_nan) s = NAN;
  if (is_nan(s)) return s;
  s = s < 1.0f ? 1.0f : s;
  return s > max_value ? max_value : s;
}

// |x0| as an unsigned key whose integer order is the float order: the sign bit is clear,
// so the IEEE bit pattern of a non-negative float (+inf included) is monotonic. NaN
// patterns sort above +inf, which is harmless because a NaN row's answer is NaN anyway.
FS_HD uint32_t abs_key(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v) & 0x7fffffffu;
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits & 0x7fffffffu;
#endif
}

FS_HD float key_value(uint32_t key) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(key);
#else
  float v;
  std::memcpy(&v, &key, sizeof(v));
  return v;
#endif
}

// Radix-select digit layout over the 31 significant bits of a key: 11 + 10 + 10.
constexpr int kRadixPasses = 3;
constexpr int kRadixMaxBins = 2048;

FS_HD constexpr int radix_shift(int pass) { return pass == 0 ? 20 : (pass == 1 ? 10 : 0); }
FS_HD constexpr int radix_bits(int pass) { return pass == 0 ? 11 : 10; }

// Whether a key's bits above this pass's digit equal the prefix chosen by earlier passes.
FS_HD bool radix_prefix_matches(uint32_t key, uint32_t prefix, int pass) {
  const int above = radix_shift(pass) + radix_bits(pass);
  return (key >> above) == (prefix >> above);
}

FS_HD uint32_t radix_digit(uint32_t key, int pass) {
  return (key >> radix_shift(pass)) & ((1u << radix_bits(pass)) - 1u);
}

}  // namespace fused_sched
