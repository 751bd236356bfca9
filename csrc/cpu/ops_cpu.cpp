// CPU kernels of the fused scheduler step.
//
// Storage dtypes vary per tensor (fp32/fp16/bf16 in, and fp64 out too), so instead of
// instantiating the math for every combination of storage types, each thread walks its
// range in chunks of kChunk elements: inputs stored in another type are converted into
// small fp32 buffers that stay in L1, one float-only loop (templated on clip mode,
// history count and noise, so it has no branches and auto-vectorises) computes the chunk,
// and results are converted on the way out. fp32 tensors are read and written in place.
//
// The math uses fused multiply-adds (step_math.h). On x86 the two loops that evaluate it
// are compiled twice: for AVX2+FMA, picked at run time where the CPU has it, and for the
// baseline ISA, where std::fma is a correctly rounded libm call (same bits, slower). So
// one binary is exact and portable, and fast on every x86 CPU since 2013.
#include "ops_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <iterator>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "known_absent_terms.h"
#include "fused_sched/philox.h"
#include "fused_sched/step_math.h"

#if defined(__x86_64__) || defined(__i386__)
#define FS_FMA_CLONES 1
#define FS_TARGET_FMA __attribute__((target("avx2,fma")))
#else
#define FS_FMA_CLONES 0  // FMA is part of the baseline ISA (aarch64) or std::fma is the best there is
#endif

// In-kernel noise's log and cos from glibc's libmvec where the build links it (x86-64
// Linux, FS_HAVE_LIBMVEC from fused_sched/ops/extension.py): about 9x faster than calling
// libm per element, which made in-kernel noise slower than drawing a tensor with randn.
#if FS_FMA_CLONES && defined(__x86_64__) && defined(FS_HAVE_LIBMVEC)
#define FS_VECTOR_BOX_MULLER 1
#else
#define FS_VECTOR_BOX_MULLER 0
#endif
#if FS_FMA_CLONES
#include <immintrin.h>
#endif

namespace fused_sched::cpu {

std::atomic<bool> portable_kernels_only{false};
const bool vector_box_muller = FS_VECTOR_BOX_MULLER;

bool use_fma_clones() {
#if FS_FMA_CLONES
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported && !portable_kernels_only.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

namespace {

constexpr int64_t kChunk = 512;
static_assert(kChunk % 8 == 0, "philox_chunk fills whole groups of eight");
// Below this many elements per task the thread-pool hand-off costs more than the work.
constexpr int64_t kMinElementsPerTask = 32768;

template <typename T>
void to_float(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void from_float(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// An input tensor seen as fp32 chunks.
struct Reader {
  const void* data = nullptr;
  at::ScalarType type = at::kFloat;

  // Elements [begin, begin + n) as fp32: in place for fp32 storage, else converted into buf.
  const float* chunk(int64_t begin, int64_t n, float* buf) const {
    switch (type) {
      case at::kFloat:
        return static_cast<const float*>(data) + begin;
      case at::kHalf:
        to_float(static_cast<const c10::Half*>(data) + begin, buf, n);
        return buf;
      case at::kBFloat16:
        to_float(static_cast<const c10::BFloat16*>(data) + begin, buf, n);
        return buf;
      default:
        TORCH_CHECK(false, "fused_sched cpu backend: unsupported input dtype ", type);
    }
  }
};

// An output tensor (or none) written from fp32 chunks.
struct Writer {
  void* data = nullptr;
  at::ScalarType type = at::kFloat;

  // Where the math should write elements [begin, begin + n): the tensor itself for fp32
  // storage, else buf (also when there is no tensor: the value is computed regardless).
  float* target(int64_t begin, float* buf) const {
    return (data != nullptr && type == at::kFloat) ? static_cast<float*>(data) + begin : buf;
  }

  void commit(int64_t begin, int64_t n, const float* buf) const {
    if (data == nullptr) return;
    switch (type) {
      case at::kFloat:
        return;  // written in place by target()
      case at::kHalf:
        return from_float(buf, static_cast<c10::Half*>(data) + begin, n);
      case at::kBFloat16:
        return from_float(buf, static_cast<c10::BFloat16*>(data) + begin, n);
      case at::kDouble:
        return from_float(buf, static_cast<double*>(data) + begin, n);
      default:
        TORCH_CHECK(false, "fused_sched cpu backend: unsupported output dtype ", type);
    }
  }
};

Reader reader_of(const at::Tensor& t) { return Reader{t.const_data_ptr(), t.scalar_type()}; }
Reader reader_of(const std::optional<at::Tensor>& t) { return t ? reader_of(*t) : Reader{}; }
Writer writer_of(const at::Tensor& t) { return Writer{t.data_ptr(), t.scalar_type()}; }
Writer writer_of(const std::optional<at::Tensor>& t) { return t ? writer_of(*t) : Writer{}; }

struct StepArgs {
  Reader x, m, h1, h2, z;
  Writer out, d, x0;
  const float* coefficients;
  int64_t coefficient_rows;
  const float* scale;
  int64_t batch, row_size;
  float clip_range;
  uint32_t absent_terms;
  uint64_t philox_seed, philox_offset;
};

// kAbsent: the row's absent terms (Coefficients::absent) as a constant, so that the absent
// terms compile away (known_absent_terms.h), or kAbsentAtRunTime to read them from the row.
constexpr int64_t kAbsentAtRunTime = -1;

template <Clip kClip, int kHistory, bool kNoise, bool kUnclippedForm, int64_t kAbsent>
[[gnu::always_inline]] inline void step_loop(const Coefficients& row, const float* __restrict x,
                                             const float* __restrict m, const float* __restrict h1,
                                             const float* __restrict h2, const float* __restrict z,
                                             float* __restrict out, float* __restrict d, float* __restrict x0,
                                             int64_t n, float clip_range, float scale) {
  Coefficients c = row;
  if constexpr (kAbsent != kAbsentAtRunTime) c.absent = static_cast<uint32_t>(kAbsent);
  for (int64_t i = 0; i < n; ++i) {
    const StepValues v = step<kClip, kHistory, kNoise, kUnclippedForm>(
        c, x[i], m[i], kHistory >= 1 ? h1[i] : 0.0f, kHistory >= 2 ? h2[i] : 0.0f, kNoise ? z[i] : 0.0f, clip_range,
        scale);
    out[i] = v.out;
    d[i] = v.d;
    x0[i] = v.x0;
  }
}

using ChunkFn = void (*)(const Coefficients&, const float*, const float*, const float*, const float*, const float*,
                         float*, float*, float*, int64_t, float, float);

template <Clip kClip, int kHistory, bool kNoise, bool kUnclippedForm, int64_t kAbsent = kAbsentAtRunTime>
void step_chunk_portable(const Coefficients& c, const float* x, const float* m, const float* h1, const float* h2,
                         const float* z, float* out, float* d, float* x0, int64_t n, float clip_range, float scale) {
  step_loop<kClip, kHistory, kNoise, kUnclippedForm, kAbsent>(c, x, m, h1, h2, z, out, d, x0, n, clip_range, scale);
}

#if FS_FMA_CLONES
template <Clip kClip, int kHistory, bool kNoise, bool kUnclippedForm, int64_t kAbsent = kAbsentAtRunTime>
FS_TARGET_FMA void step_chunk_fma(const Coefficients& c, const float* x, const float* m, const float* h1,
                                  const float* h2, const float* z, float* out, float* d, float* x0, int64_t n,
                                  float clip_range, float scale) {
  step_loop<kClip, kHistory, kNoise, kUnclippedForm, kAbsent>(c, x, m, h1, h2, z, out, d, x0, n, clip_range, scale);
}
#endif

// The loops of known_absent_terms.h, one per entry: the FMA clones where there are some
// (on an x86 CPU without AVX2 the run-time loops serve every step), else the baseline ones.
template <size_t kEntry>
constexpr ChunkFn known_absent_loop_of() {
  constexpr KnownAbsentTerms e = kKnownAbsentTerms[kEntry];
#if FS_FMA_CLONES
  return &step_chunk_fma<e.clip, e.history, e.noise, e.unclipped_form, static_cast<int64_t>(e.absent)>;
#else
  return &step_chunk_portable<e.clip, e.history, e.noise, e.unclipped_form, static_cast<int64_t>(e.absent)>;
#endif
}

template <size_t... kEntries>
constexpr std::array<ChunkFn, sizeof...(kEntries)> known_absent_loops_of(std::index_sequence<kEntries...>) {
  return {known_absent_loop_of<kEntries>()...};
}

constexpr std::array<ChunkFn, kNumKnownAbsentTerms> kKnownAbsentLoops =
    known_absent_loops_of(std::make_index_sequence<kNumKnownAbsentTerms>{});

// The keys of |x0| (abs_key) into dst, n <= kChunk; returns how many were NaN. kAbsent:
// which of the estimate's terms (AX, AM, AL) are absent, known at compile time so that
// they compile away; each of the eight sets has its loop (abs_x0_keys_for).
template <uint32_t kAbsent>
[[gnu::always_inline]] inline int64_t abs_x0_key_loop(const Coefficients& row, const float* __restrict x,
                                                      const float* __restrict m, uint32_t* __restrict dst, int64_t n) {
  Coefficients c = row;
  c.absent = kAbsent;
  uint32_t nan_count = 0;  // 32-bit: a 64-bit sum would widen every vector of flags
  for (int64_t i = 0; i < n; ++i) {
    const float v = data_estimate(c, x[i], m[i]);
    nan_count += is_nan(v);
    dst[i] = abs_key(v);
  }
  return nan_count;
}

using AbsX0KeysFn = int64_t (*)(const Coefficients&, const float*, const float*, uint32_t*, int64_t);

template <uint32_t kAbsent>
int64_t abs_x0_keys_portable(const Coefficients& c, const float* x, const float* m, uint32_t* dst, int64_t n) {
  return abs_x0_key_loop<kAbsent>(c, x, m, dst, n);
}

#if FS_FMA_CLONES
template <uint32_t kAbsent>
FS_TARGET_FMA int64_t abs_x0_keys_fma(const Coefficients& c, const float* x, const float* m, uint32_t* dst,
                                      int64_t n) {
  return abs_x0_key_loop<kAbsent>(c, x, m, dst, n);
}
#endif

constexpr Column kEstimateTerms[] = {kAX, kAM, kAL};
constexpr size_t kEstimateTermSets = size_t{1} << std::size(kEstimateTerms);

// The absent bits of estimate-term set number i (bit j of i: kEstimateTerms[j] is absent).
constexpr uint32_t estimate_absent_terms(size_t i) {
  uint32_t absent = 0;
  for (size_t j = 0; j < std::size(kEstimateTerms); ++j) {
    if ((i >> j) & 1u) absent |= 1u << kEstimateTerms[j];
  }
  return absent;
}

template <size_t... kSets>
constexpr std::array<AbsX0KeysFn, sizeof...(kSets)> portable_key_loops(std::index_sequence<kSets...>) {
  return {&abs_x0_keys_portable<estimate_absent_terms(kSets)>...};
}
constexpr auto kPortableKeyLoops = portable_key_loops(std::make_index_sequence<kEstimateTermSets>{});

#if FS_FMA_CLONES
template <size_t... kSets>
constexpr std::array<AbsX0KeysFn, sizeof...(kSets)> fma_key_loops(std::index_sequence<kSets...>) {
  return {&abs_x0_keys_fma<estimate_absent_terms(kSets)>...};
}
constexpr auto kFmaKeyLoops = fma_key_loops(std::make_index_sequence<kEstimateTermSets>{});
#endif

// The key loop for rows whose absent terms are ``absent``.
AbsX0KeysFn abs_x0_keys_for(uint32_t absent) {
  size_t set = 0;
  for (size_t j = 0; j < std::size(kEstimateTerms); ++j) {
    set |= static_cast<size_t>((absent >> kEstimateTerms[j]) & 1u) << j;
  }
#if FS_FMA_CLONES
  if (use_fma_clones()) return kFmaKeyLoops[set];
#endif
  return kPortableKeyLoops[set];
}

// The |x0| keys of one batch row, computed chunk by chunk from x and m whenever a pass
// needs them: reading x and m again moves less memory than writing a row of keys and
// reading it back (8 bytes per fp32 element against 12 with the write's read for
// ownership; 4 for fp16/bf16), and needs no row-sized buffer.
struct RowKeys {
  Reader x, m;
  Coefficients c;
  int64_t row_begin;  // the row's first element in the flat tensors
  AbsX0KeysFn abs_x0_keys;

  // visit(keys, n) for consecutive chunks of the row's elements [lo, hi); returns how
  // many keys were NaN. visit may change the keys it is given.
  template <typename Visit>
  int64_t for_each_chunk(int64_t lo, int64_t hi, Visit&& visit) const {
    alignas(64) float bx[kChunk], bm[kChunk];
    alignas(64) uint32_t keys[kChunk];
    int64_t nan_count = 0;
    for (int64_t offset = lo; offset < hi; offset += kChunk) {
      const int64_t n = std::min(kChunk, hi - offset);
      const float* xs = x.chunk(row_begin + offset, n, bx);
      const float* ms = m.chunk(row_begin + offset, n, bm);
      nan_count += abs_x0_keys(c, xs, ms, keys, n);
      visit(keys, n);
    }
    return nan_count;
  }
};

// Most keys share a few top digits, so consecutive increments of one histogram would
// mostly hit the same bin and each wait for the last (a store-to-load chain of ~5 cycles
// per key). Keys i, i+1, i+2, i+3 count into four separate histograms instead.
constexpr int64_t kHistogramLanes = 4;

void histogram_top_digits(const uint32_t* __restrict keys, int64_t n, uint32_t* __restrict lanes) {
  int64_t i = 0;
  for (; i + kHistogramLanes <= n; i += kHistogramLanes) {
    for (int64_t lane = 0; lane < kHistogramLanes; ++lane) {
      ++lanes[lane * kRadixMaxBins + radix_digit(keys[i + lane], 0)];
    }
  }
  for (; i < n; ++i) ++lanes[radix_digit(keys[i], 0)];
}

void sum_histogram_lanes(const uint32_t* __restrict lanes, uint32_t* __restrict hist) {
  for (int d = 0; d < kRadixMaxBins; ++d) {
    uint32_t count = 0;
    for (int64_t lane = 0; lane < kHistogramLanes; ++lane) count += lanes[lane * kRadixMaxBins + d];
    hist[d] = count;
  }
}

// Radix select's later passes over one block: the keys [0, n) whose bits above this pass's
// digit match the prefix of either order statistic (both are one prefix unless ``split``)
// have their digit counted and are moved to the front, in order; returns how many.
// Everything arrives by value so that it stays in registers: read through references, the
// prefixes and the pass were reloaded after every store into the keys, which may alias them.
int64_t keep_matching_keys(uint32_t* __restrict keys, int64_t n, int pass, uint32_t prefix_lo, uint32_t prefix_hi,
                           bool split, uint32_t* __restrict hist_lo, uint32_t* __restrict hist_hi) {
  auto matches = [&](uint32_t key) {
    return static_cast<uint32_t>(radix_prefix_matches(key, prefix_lo, pass)) |
           static_cast<uint32_t>(radix_prefix_matches(key, prefix_hi, pass));
  };
  int64_t kept = 0;
  auto keep = [&](uint32_t key) {
    const bool lo = radix_prefix_matches(key, prefix_lo, pass);
    const bool hi = split && radix_prefix_matches(key, prefix_hi, pass);
    if (lo) ++hist_lo[radix_digit(key, pass)];
    if (hi) ++hist_hi[radix_digit(key, pass)];
    if (lo || hi) keys[kept++] = key;
  };
  // In pass 1 nearly every key matches neither prefix: a group of them is ruled out by
  // one vectorised test instead of a compare and branch per key.
  constexpr int64_t kGroup = 16;
  int64_t i = 0;
  for (; i + kGroup <= n; i += kGroup) {
    uint32_t any = 0;
    for (int64_t j = 0; j < kGroup; ++j) any |= matches(keys[i + j]);
    if (any == 0) continue;
    for (int64_t j = 0; j < kGroup; ++j) keep(keys[i + j]);
  }
  for (; i < n; ++i) keep(keys[i]);
  return kept;
}

// The Philox rounds and uniforms of a chunk in baseline code (the AVX2 loops use
// philox_uniforms_avx2 below: the same integer arithmetic and conversion, the same bits).
void philox_uniforms_portable(uint64_t seed, uint64_t first_counter, float* __restrict u1, float* __restrict u2,
                              int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const PhiloxPair p = philox_pair(seed, first_counter + static_cast<uint64_t>(i));
    u1[i] = philox_uniform(p.first);
    u2[i] = philox_uniform(p.second);
  }
}

#if FS_FMA_CLONES
// (hi, lo) 32-bit halves of k * v for eight lanes: vpmuludq multiplies the even lanes and,
// after a shift, the odd ones; one 64-bit product gives both halves (the scalar code's
// umulhi32 and low product).
FS_TARGET_FMA inline void mul_hi_lo(uint32_t k, __m256i v, __m256i& hi, __m256i& lo) {
  const __m256i kv = _mm256_set1_epi32(static_cast<int>(k));
  const __m256i even = _mm256_mul_epu32(kv, v);
  const __m256i odd = _mm256_mul_epu32(kv, _mm256_srli_epi64(v, 32));
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// philox_pair for the counters first_counter + [0, n), eight at a time, written as two
// arrays (first, second outputs); n a multiple of 8. GCC does vectorise the scalar loop, but
// with a separate 32-bit multiply for each low product and 64-bit counter lanes; this is
// about 3x faster, and the same integer arithmetic, so the same bits.
FS_TARGET_FMA void philox_pairs_avx2(uint64_t seed, uint64_t first_counter, uint32_t* first, uint32_t* second,
                                     int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign_bit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t i = 0; i < n; i += 8) {
    const uint64_t base = first_counter + static_cast<uint64_t>(i);
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    // counter = base + lane as 64-bit: the low word wraps below base's where a carry goes up
    __m256i c0 = _mm256_add_epi32(base_lo, lane);
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign_bit), _mm256_xor_si256(c0, sign_bit));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32))), carry);
    __m256i c2 = _mm256_setzero_si256();
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kPhiloxRounds; ++round) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo(kPhiloxRoundB, c2, hi_b, lo_b);
      mul_hi_lo(kPhiloxRoundA, c0, hi_a, lo_a);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo_b;
      c3 = lo_a;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(first + i), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(second + i), c1);
  }
}

// philox_uniform on eight lanes: ~v where v < 0 is v ^ (v >> 31 arithmetic); vcvtdq2ps
// rounds to nearest like the scalar int32 -> float conversion.
FS_TARGET_FMA inline __m256 philox_uniform_avx2(__m256i bits) {
  const __m256i folded = _mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(kPhiloxUniformScale));
}

// n a multiple of 8, the buffers that long.
FS_TARGET_FMA void philox_uniforms_avx2(uint64_t seed, uint64_t first_counter, float* u1, float* u2, int64_t n) {
  alignas(32) uint32_t first[kChunk], second[kChunk];
  philox_pairs_avx2(seed, first_counter, first, second, n);
  for (int64_t i = 0; i < n; i += 8) {
    _mm256_storeu_ps(u1 + i, philox_uniform_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + i))));
    _mm256_storeu_ps(u2 + i, philox_uniform_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + i))));
  }
}
#endif

#if FS_VECTOR_BOX_MULLER
// glibc's libmvec: logf / cosf on eight lanes (the x86-64 vector-function ABI names, which
// GCC itself calls under -ffast-math; declared here so that nothing else is fast-math).
extern "C" __m256 _ZGVdN8v_logf(__m256);
extern "C" __m256 _ZGVdN8v_cosf(__m256);

// box_muller on eight lanes at a time, the same operations in the same order, with
// libmvec's log and cos (within a few ulp, like the scalar libm's: tests/test_philox_noise.py
// bounds z) and the correctly rounded vsqrtps / vmulps / vmaxps. ``n`` must be a multiple of
// 8: every element goes through this path, so a value never depends on where a chunk ends.
FS_TARGET_FMA void box_muller_avx2(const float* u1, const float* u2, float* dst, int64_t n) {
  const __m256 min_u1 = _mm256_set1_ps(kPhiloxMinU1);
  const __m256 two_pi = _mm256_set1_ps(kPhiloxTwoPi);
  const __m256 minus_two = _mm256_set1_ps(-2.0f);
  for (int64_t i = 0; i < n; i += 8) {
    // max(u1, 1e-7) as box_muller's `u1 > min ? u1 : min` (u1 is never NaN)
    const __m256 a = _mm256_max_ps(_mm256_loadu_ps(u1 + i), min_u1);
    const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, _ZGVdN8v_logf(a)));
    const __m256 c = _ZGVdN8v_cosf(_mm256_mul_ps(two_pi, _mm256_loadu_ps(u2 + i)));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(r, c));
  }
}
#endif

// z for elements [begin, begin + n <= kChunk) of the flat tensor. Counter-based, so the
// chunking and the threads that run the chunks do not change a value. ``dst`` holds kChunk
// floats (kChunk is a multiple of 8: the vector path fills whole groups of eight).
void philox_chunk(uint64_t seed, uint64_t first_counter, float* __restrict dst, int64_t n) {
  alignas(64) float u1[kChunk], u2[kChunk];
#if FS_FMA_CLONES
  if (use_fma_clones()) {
    // Whole groups of eight: the lanes past n compute counters of later elements, unused.
    const int64_t padded = (n + 7) / 8 * 8;
    philox_uniforms_avx2(seed, first_counter, u1, u2, padded);
#if FS_VECTOR_BOX_MULLER
    box_muller_avx2(u1, u2, dst, padded);
#else
    for (int64_t i = 0; i < n; ++i) dst[i] = box_muller(u1[i], u2[i]);
#endif
    return;
  }
#endif
  philox_uniforms_portable(seed, first_counter, u1, u2, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = box_muller(u1[i], u2[i]);
}

// The loop a step runs: its absent terms known at compile time (known_absent_terms.h), or
// the run-time loop, with or without the unclipped form of d.
struct StepLoop {
  bool unclipped_form = false;
  uint32_t absent = 0;  // the step's absent terms among those the loop reads
  ChunkFn known_absent_loop = nullptr;
};

StepLoop step_loop_for(Clip clip, int history, bool noise, uint32_t absent_terms) {
  StepLoop loop;
  // The unclipped form of d (US, layout.py) only with clipping, and only where a row may
  // have it: its own loop, so that no other loop pays for it.
  loop.unclipped_form = clip != Clip::kNone && ((absent_terms >> kUS) & 1u) == 0u;
  loop.absent = absent_terms & terms_read(clip, history, noise, loop.unclipped_form);
#if FS_FMA_CLONES
  if (!use_fma_clones()) return loop;
#endif
  for (size_t i = 0; i < kNumKnownAbsentTerms; ++i) {
    const KnownAbsentTerms& e = kKnownAbsentTerms[i];
    if (e.clip == clip && e.history == history && e.noise == noise && e.unclipped_form == loop.unclipped_form &&
        e.absent == loop.absent) {
      loop.known_absent_loop = kKnownAbsentLoops[i];
      break;
    }
  }
  return loop;
}

template <Clip kClip, int kHistory, NoiseSource kNoise>
void run_step(const StepArgs& a) {
  constexpr bool kHasNoise = kNoise != NoiseSource::kNoNoise;
  const int64_t chunks_per_row = (a.row_size + kChunk - 1) / kChunk;
  const int64_t tasks = a.batch * chunks_per_row;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / kChunk);
  constexpr bool kClips = kClip != Clip::kNone;
  const StepLoop loop = step_loop_for(kClip, kHistory, kHasNoise, a.absent_terms);
  ChunkFn chunk_fn = loop.known_absent_loop;
  if (chunk_fn == nullptr) {
    chunk_fn = loop.unclipped_form ? &step_chunk_portable<kClip, kHistory, kHasNoise, kClips>
                                   : &step_chunk_portable<kClip, kHistory, kHasNoise, false>;
#if FS_FMA_CLONES
    if (use_fma_clones()) {
      chunk_fn = loop.unclipped_form ? &step_chunk_fma<kClip, kHistory, kHasNoise, kClips>
                                     : &step_chunk_fma<kClip, kHistory, kHasNoise, false>;
    }
#endif
  }
  at::parallel_for(0, tasks, grain, [&](int64_t task_begin, int64_t task_end) {
    alignas(64) float bx[kChunk], bm[kChunk], bh1[kChunk], bh2[kChunk], bz[kChunk];
    alignas(64) float bout[kChunk], bd[kChunk], bx0[kChunk];
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t row = task / chunks_per_row;
      const int64_t offset = (task % chunks_per_row) * kChunk;
      const int64_t n = std::min(kChunk, a.row_size - offset);
      const int64_t begin = row * a.row_size + offset;
      const Coefficients c =
          load_coefficients(a.coefficients + (a.coefficient_rows == 1 ? 0 : row) * kNumCoefficients, a.absent_terms);
      const float scale = kClip == Clip::kThreshold ? a.scale[row] : 1.0f;

      const float* x = a.x.chunk(begin, n, bx);
      const float* m = a.m.chunk(begin, n, bm);
      const float* h1 = kHistory >= 1 ? a.h1.chunk(begin, n, bh1) : nullptr;
      const float* h2 = kHistory >= 2 ? a.h2.chunk(begin, n, bh2) : nullptr;
      const float* z = nullptr;
      if constexpr (kNoise == NoiseSource::kNoiseTensor) {
        z = a.z.chunk(begin, n, bz);
      } else if constexpr (kNoise == NoiseSource::kPhilox) {
        philox_chunk(a.philox_seed, a.philox_offset + static_cast<uint64_t>(begin), bz, n);
        z = bz;
      }
      float* out = a.out.target(begin, bout);
      float* d = a.d.target(begin, bd);
      float* x0 = a.x0.target(begin, bx0);
      chunk_fn(c, x, m, h1, h2, z, out, d, x0, n, a.clip_range, scale);
      a.out.commit(begin, n, out);
      a.d.commit(begin, n, d);
      a.x0.commit(begin, n, x0);
    }
  });
}

template <Clip kClip, int kHistory>
void dispatch_noise(const StepArgs& a, NoiseSource noise) {
  switch (noise) {
    case NoiseSource::kNoiseTensor:
      return run_step<kClip, kHistory, NoiseSource::kNoiseTensor>(a);
    case NoiseSource::kPhilox:
      return run_step<kClip, kHistory, NoiseSource::kPhilox>(a);
    default:
      return run_step<kClip, kHistory, NoiseSource::kNoNoise>(a);
  }
}

template <Clip kClip>
void dispatch_history(const StepArgs& a, int history, NoiseSource noise) {
  switch (history) {
    case 0:
      return dispatch_noise<kClip, 0>(a, noise);
    case 1:
      return dispatch_noise<kClip, 1>(a, noise);
    default:
      return dispatch_noise<kClip, 2>(a, noise);
  }
}

}  // namespace

void fused_step(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                const std::optional<at::Tensor>& history1, const std::optional<at::Tensor>& history2,
                const std::optional<at::Tensor>& noise, int64_t noise_mode, int64_t philox_seed,
                int64_t philox_offset, const std::optional<at::Tensor>& philox_base,
                const std::optional<at::Tensor>& scale, int64_t clip, double clip_range, int64_t absent_terms,
                const at::Tensor& out, const std::optional<at::Tensor>& history_out,
                const std::optional<at::Tensor>& x0_out) {
  const auto [batch, row_size] = check_step_inputs("cpu", c10::DeviceType::CPU, sample, model_output, coefficients);
  check_fused_step("cpu", sample, history1, history2, noise, noise_mode, philox_offset, scale, clip, clip_range, out,
                   history_out, x0_out);

  StepArgs a;
  a.x = reader_of(sample);
  a.m = reader_of(model_output);
  a.h1 = reader_of(history1);
  a.h2 = reader_of(history2);
  a.z = reader_of(noise);
  a.out = writer_of(out);
  a.d = writer_of(history_out);
  a.x0 = writer_of(x0_out);
  a.coefficients = coefficients.const_data_ptr<float>();
  a.coefficient_rows = coefficients.size(0);
  a.scale = clip == 2 ? scale->const_data_ptr<float>() : nullptr;
  a.batch = batch;
  a.row_size = row_size;
  // torch.clamp(x0, -r, r) on a float32 tensor rounds the Python float r to float32.
  a.clip_range = static_cast<float>(clip_range);
  a.absent_terms = checked_absent_terms("cpu", absent_terms);
  // The seed's bits: the kernels take the key as uint64 (seeds >= 2**63 arrive negative).
  a.philox_seed = static_cast<uint64_t>(philox_seed);
  a.philox_offset = static_cast<uint64_t>(philox_offset);
  check_philox_base("cpu", philox_base, noise_mode, sample);
  // A CPU tensor's value is host memory: reading it here is no sync.
  if (philox_base) a.philox_offset += static_cast<uint64_t>(*philox_base->const_data_ptr<int64_t>());
  if (row_size == 0) return;

  const int history = history2 ? 2 : (history1 ? 1 : 0);
  const auto noise_source = static_cast<NoiseSource>(noise_mode);
  switch (static_cast<Clip>(clip)) {
    case Clip::kNone:
      return dispatch_history<Clip::kNone>(a, history, noise_source);
    case Clip::kClamp:
      return dispatch_history<Clip::kClamp>(a, history, noise_source);
    case Clip::kThreshold:
      return dispatch_history<Clip::kThreshold>(a, history, noise_source);
  }
}

StepLoopChoice step_loop_choice(int64_t clip, int64_t history, bool noise, int64_t absent_terms) {
  TORCH_CHECK(clip >= 0 && clip <= 2, "clip must be 0, 1 or 2, got ", clip);
  TORCH_CHECK(history >= 0 && history <= 2, "history must be 0, 1 or 2, got ", history);
  const StepLoop loop = step_loop_for(static_cast<Clip>(clip), static_cast<int>(history), noise,
                                      checked_absent_terms("cpu", absent_terms));
  return {loop.unclipped_form, static_cast<int64_t>(loop.absent), loop.known_absent_loop != nullptr};
}

std::vector<std::tuple<int64_t, int64_t, bool, bool, int64_t>> known_absent_terms() {
  std::vector<std::tuple<int64_t, int64_t, bool, bool, int64_t>> entries;
  for (const KnownAbsentTerms& e : kKnownAbsentTerms) {
    entries.emplace_back(static_cast<int64_t>(e.clip), e.history, e.noise, e.unclipped_form,
                         static_cast<int64_t>(e.absent));
  }
  return entries;
}

void philox_bits(int64_t seed, int64_t offset, const at::Tensor& out) {
  check_philox_bits("cpu", at::kCPU, offset, out);
  const int64_t n = out.size(0);
  auto* dst = static_cast<uint32_t*>(out.data_ptr());
  at::parallel_for(0, n, kMinElementsPerTask, [&](int64_t begin, int64_t end) {
#if FS_FMA_CLONES
    if (use_fma_clones()) {  // the kernels' own Philox loop, so tests see the bits they use
      alignas(32) uint32_t first[kChunk], second[kChunk];
      for (int64_t start = begin; start < end; start += kChunk) {
        const int64_t count = std::min(kChunk, end - start);
        philox_pairs_avx2(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + start), first, second,
                          (count + 7) / 8 * 8);
        for (int64_t j = 0; j < count; ++j) {
          dst[2 * (start + j)] = first[j];
          dst[2 * (start + j) + 1] = second[j];
        }
      }
      return;
    }
#endif
    for (int64_t i = begin; i < end; ++i) {
      const PhiloxPair p = philox_pair(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset + i));
      dst[2 * i] = p.first;
      dst[2 * i + 1] = p.second;
    }
  });
}

namespace {

// Radix select of the order statistics of one batch row's |x0| (non-negative floats order
// like their bits), with the row split into blocks that run in parallel with their own
// histograms. Pass 0 counts the top digit of every key. Pass 1 computes the keys again and
// keeps, block by block, only those under a top digit that an order statistic has (0.3% of
// a Gaussian row at the 0.995 quantile), counting their next digit; pass 2 reads those alone.
class RowSelection {
 public:
  RowSelection(int64_t row_size, int64_t nblocks)
      : row_size_(row_size),
        nblocks_(nblocks),
        block_size_((row_size + nblocks - 1) / nblocks),
        lanes_(static_cast<size_t>(nblocks * kHistogramLanes * kRadixMaxBins)),
        hist_lo_(static_cast<size_t>(nblocks * kRadixMaxBins)),
        hist_hi_(static_cast<size_t>(nblocks * kRadixMaxBins)),
        block_has_nan_(static_cast<size_t>(nblocks)),
        segment_(static_cast<size_t>(nblocks + 1)),
        kept_(static_cast<size_t>(nblocks)) {}

  // The row's thresholding scale s.
  float scale(const RowKeys& keys, const QuantileRank& rank, float max_scale) {
    count_top_digits(keys);
    if (std::any_of(block_has_nan_.begin(), block_has_nan_.end(), [](uint8_t f) { return f != 0; })) {
      return threshold_from_order_statistics(NAN, NAN, rank.weight, true, max_scale);
    }
    uint32_t prefix_lo = 0, prefix_hi = 0;
    int64_t k_lo = rank.lo, k_hi = rank.hi;
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      const bool split = pass > 0 && !radix_prefix_matches(prefix_hi, prefix_lo, pass);
      if (pass > 0) count_matching_digits(keys, pass, prefix_lo, prefix_hi, split);
      const uint32_t d_lo = digit_of_rank(hist_lo_, pass, k_lo);
      const uint32_t d_hi = digit_of_rank(split ? hist_hi_ : hist_lo_, pass, k_hi);
      prefix_lo |= d_lo << radix_shift(pass);
      prefix_hi |= d_hi << radix_shift(pass);
      if (pass == 0) reserve_candidates(d_lo, d_hi);
    }
    return threshold_from_order_statistics(key_value(prefix_lo), key_value(prefix_hi), rank.weight, false, max_scale);
  }

 private:
  int64_t block_end(int64_t b) const { return std::min(row_size_, (b + 1) * block_size_); }

  void count_top_digits(const RowKeys& keys) {
    at::parallel_for(0, nblocks_, 1, [&](int64_t bb, int64_t be) {
      for (int64_t b = bb; b < be; ++b) {
        uint32_t* lanes = lanes_.data() + b * kHistogramLanes * kRadixMaxBins;
        std::fill(lanes, lanes + kHistogramLanes * kRadixMaxBins, 0u);
        const int64_t nan_count = keys.for_each_chunk(b * block_size_, block_end(b), [&](const uint32_t* k, int64_t n) {
          histogram_top_digits(k, n, lanes);
        });
        sum_histogram_lanes(lanes, hist_lo_.data() + b * kRadixMaxBins);
        block_has_nan_[b] = nan_count != 0;
      }
    });
  }

  // Room for the keys pass 1 keeps: those under either top digit, counted by pass 0.
  void reserve_candidates(uint32_t d_lo, uint32_t d_hi) {
    for (int64_t b = 0; b < nblocks_; ++b) {
      const uint32_t* h = hist_lo_.data() + b * kRadixMaxBins;
      segment_[b + 1] = segment_[b] + h[d_lo] + (d_hi != d_lo ? h[d_hi] : 0u);
    }
    candidates_.resize(static_cast<size_t>(segment_[nblocks_]));
  }

  void count_matching_digits(const RowKeys& keys, int pass, uint32_t prefix_lo, uint32_t prefix_hi, bool split) {
    std::fill(hist_lo_.begin(), hist_lo_.end(), 0u);
    if (split) std::fill(hist_hi_.begin(), hist_hi_.end(), 0u);
    at::parallel_for(0, nblocks_, 1, [&](int64_t bb, int64_t be) {
      for (int64_t b = bb; b < be; ++b) {
        uint32_t* hl = hist_lo_.data() + b * kRadixMaxBins;
        uint32_t* hh = hist_hi_.data() + b * kRadixMaxBins;
        uint32_t* block_candidates = candidates_.data() + segment_[b];
        if (pass == 1) {
          const int64_t capacity = segment_[b + 1] - segment_[b];
          int64_t count = 0;
          keys.for_each_chunk(b * block_size_, block_end(b), [&](uint32_t* k, int64_t n) {
            const int64_t matching = keep_matching_keys(k, n, pass, prefix_lo, prefix_hi, split, hl, hh);
            TORCH_CHECK(count + matching <= capacity,
                        "fused_sched cpu backend: radix select found more keys than pass 0 counted");
            std::copy(k, k + matching, block_candidates + count);
            count += matching;
          });
          kept_[b] = count;
        } else {
          kept_[b] = keep_matching_keys(block_candidates, kept_[b], pass, prefix_lo, prefix_hi, split, hl, hh);
        }
      }
    });
  }

  // Sums the block histograms and picks the digit holding rank k; returns it, k made
  // relative to the digit's first key.
  uint32_t digit_of_rank(const std::vector<uint32_t>& hist, int pass, int64_t& k) const {
    int64_t below = 0;
    for (int d = 0; d < (1 << radix_bits(pass)); ++d) {
      int64_t count = 0;
      for (int64_t b = 0; b < nblocks_; ++b) count += hist[b * kRadixMaxBins + d];
      if (below + count > k) {
        k -= below;
        return static_cast<uint32_t>(d);
      }
      below += count;
    }
    TORCH_CHECK(false, "fused_sched cpu backend: radix select lost its rank");
    return 0u;
  }

  int64_t row_size_, nblocks_, block_size_;
  std::vector<uint32_t> lanes_;  // pass 0's kHistogramLanes histograms per block, reused row after row
  std::vector<uint32_t> hist_lo_, hist_hi_;
  std::vector<uint8_t> block_has_nan_;
  // The keys pass 1 keeps, block b's in [segment_[b], segment_[b + 1]), kept_[b] of them
  // still matching after each later pass.
  std::vector<uint32_t> candidates_;
  std::vector<int64_t> segment_, kept_;
};

}  // namespace

at::Tensor threshold_scale(const at::Tensor& sample, const at::Tensor& model_output, const at::Tensor& coefficients,
                           double ratio, double max_value, int64_t absent_terms) {
  const auto [batch, row_size] = check_step_inputs("cpu", c10::DeviceType::CPU, sample, model_output, coefficients);
  const uint32_t absent = checked_absent_terms("cpu", absent_terms);
  check_threshold_arguments("cpu", row_size, sample.sizes(), ratio, max_value);

  const QuantileRank rank = quantile_rank(static_cast<float>(ratio), row_size);
  const Reader x = reader_of(sample);
  const Reader m = reader_of(model_output);
  const float* coef = coefficients.const_data_ptr<float>();
  const int64_t coefficient_rows = coefficients.size(0);
  const AbsX0KeysFn abs_x0_keys = abs_x0_keys_for(absent);
  auto row_keys = [&](int64_t row) {
    return RowKeys{x, m, load_coefficients(coef + (coefficient_rows == 1 ? 0 : row) * kNumCoefficients, absent),
                   row * row_size, abs_x0_keys};
  };

  at::Tensor result = at::empty({batch}, sample.options().dtype(at::kFloat));
  float* s = result.data_ptr<float>();
  const float max_scale = static_cast<float>(max_value);
  const int64_t threads = at::get_num_threads();
  const int64_t max_block = int64_t{1} << 30;  // histogram counts are uint32
  const int64_t nblocks = std::max<int64_t>(
      std::min<int64_t>(threads, (row_size + kMinElementsPerTask - 1) / kMinElementsPerTask),
      (row_size + max_block - 1) / max_block);
  if (batch > 1 && (nblocks == 1 || batch >= threads)) {
    // Rows in parallel, each selected by one thread: rows too small to split, or enough of
    // them to keep every thread busy without.
    const int64_t rows_per_task = std::max<int64_t>(1, kMinElementsPerTask / row_size);
    const int64_t row_blocks = (row_size + max_block - 1) / max_block;
    at::parallel_for(0, batch, rows_per_task, [&](int64_t rb, int64_t re) {
      RowSelection selection(row_size, row_blocks);
      for (int64_t row = rb; row < re; ++row) s[row] = selection.scale(row_keys(row), rank, max_scale);
    });
  } else {
    RowSelection selection(row_size, nblocks);
    for (int64_t row = 0; row < batch; ++row) s[row] = selection.scale(row_keys(row), rank, max_scale);
  }
  return result;
}

}  // namespace fused_sched::cpu
