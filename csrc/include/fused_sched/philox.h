// Counter-based normal noise for noise=PhiloxNoise(seed, offset), shared by the CPU and
// CUDA kernels: the steps of Triton's tl.randn(seed, counter), so that every backend computes
// the same numbers up to the rounding of its math functions (fused_sched/ops/philox.py is
// the reference and documents the steps).
//
// Philox4x32-10 and the uint32 -> uniform conversion are exact integer / IEEE operations
// and give the same bits everywhere. The Box-Muller step calls log, sqrt and cos: sqrt is
// correctly rounded here on the host and on the device (__fsqrt_rn), while compiled
// tl.randn uses the GPU's approximate square root (sqrt.approx, within an ulp or so);
// logf / cosf are those of the host libm (or, in the CPU kernels' AVX2 loops, glibc's
// libmvec: csrc/cpu/ops_cpu.cpp) and of CUDA's math library, each within a few ulp, so z
// may differ from the other backends' by a few float32 ulp (tests/test_philox_noise.py
// states the bound).
//
// Products are explicitly rounded (step_math.h's mul) so that nvcc cannot contract them.
// No torch and no CUDA header: g++ compiles this on its own.
#pragma once

#include <cmath>
#include <cstdint>

#include "fused_sched/step_math.h"

namespace fused_sched {

// Where z comes from; values match fused_sched/ops/philox.py NOISE_CODES (a test compares them).
enum class NoiseSource : int { kNoNoise = 0, kNoiseTensor = 1, kPhilox = 2 };

// Philox4x32 constants (Salmon et al. 2011), as in triton/language/random.py.
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

// The float32 constants Triton's randn rounds its Python floats to:
// 4.6566127342e-10 (uniform scale, (1 - 2**-24) * 2**-31), 1e-7 (smallest u1), 2*pi.
constexpr float kPhiloxUniformScale = 0x1.fffffep-32f;
constexpr float kPhiloxMinU1 = 0x1.ad7f2ap-24f;
constexpr float kPhiloxTwoPi = 0x1.921fb6p+2f;

FS_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The two Philox outputs tl.randn uses (c0, c1 after ten rounds).
struct PhiloxPair {
  uint32_t first;
  uint32_t second;
};

// Counter (c0, c1, c2, c3) = (low, high 32 bits of `counter`, 0, 0); key (k0, k1) = (low,
// high 32 bits of `seed`).
FS_HD PhiloxPair philox_pair(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t prev0 = c0;
    const uint32_t prev2 = c2;
    c0 = umulhi32(kPhiloxRoundB, prev2) ^ c1 ^ k0;
    c2 = umulhi32(kPhiloxRoundA, prev0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * prev2;
    c3 = kPhiloxRoundA * prev0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  PhiloxPair p;
  p.first = c0;
  p.second = c1;
  return p;
}

// Triton's uint_to_uniform_float: the bits read as int32 v, ~v where v < 0 (so v < 2**31),
// converted to float32 with one rounding and scaled: a float in [0, 1).
FS_HD float philox_uniform(uint32_t bits) {
  const uint32_t folded = (bits & 0x80000000u) != 0u ? ~bits : bits;
  return mul(static_cast<float>(static_cast<int32_t>(folded)), kPhiloxUniformScale);
}

FS_HD float philox_log(float v) {
#if defined(__CUDA_ARCH__)
  return logf(v);
#else
  return std::log(v);
#endif
}

FS_HD float philox_cos(float v) {
#if defined(__CUDA_ARCH__)
  return cosf(v);
#else
  return std::cos(v);
#endif
}

FS_HD float philox_sqrt(float v) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(v);
#else
  return std::sqrt(v);
#endif
}

// Triton's pair_uniform_to_normal, first output: sqrt(-2 log max(1e-7, u1)) * cos(2 pi u2).
FS_HD float box_muller(float u1, float u2) {
  u1 = u1 > kPhiloxMinU1 ? u1 : kPhiloxMinU1;  // tl.maximum(1e-7, u1); never NaN
  const float theta = mul(kPhiloxTwoPi, u2);
  const float r = philox_sqrt(mul(-2.0f, philox_log(u1)));
  return mul(r, philox_cos(theta));
}

// tl.randn(seed, counter): Box-Muller on the first two uniforms.
FS_HD float philox_normal(uint64_t seed, uint64_t counter) {
  const PhiloxPair p = philox_pair(seed, counter);
  return box_muller(philox_uniform(p.first), philox_uniform(p.second));
}

}  // namespace fused_sched
