// Loads and stores between any storage type and fp32 registers, for the CUDA kernels.
//
// The storage type is a runtime value that is the same for every thread, so the switch
// costs a few uniform instructions instead of one kernel instantiation per combination
// of five input and three output types. Packs of kPack elements use 128-bit accesses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace fused_sched::cuda {

constexpr int kPack = 8;

__device__ __forceinline__ float load_one(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_one(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      return;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      return;
    case DType::kFloat64:
      static_cast<double*>(p)[i] = static_cast<double>(v);
      return;
    default:
      static_cast<float*>(p)[i] = v;
      return;
  }
}

// The value whose bits are `from`'s. A 16-byte pack of 16-bit values is loaded and stored
// as one uint4 and its 32-bit words are converted to and from __half2 / __nv_bfloat162 by
// copying bits: reading a uint4 register through a __half2 pointer (the usual idiom)
// breaks C++'s aliasing rules, and the host compiler did drop such loads when the tests'
// CUDA emulator compiled this file. memcpy between registers costs no instruction.
template <typename To, typename From>
__device__ __forceinline__ To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as converts between types of one size");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// Elements [i, i + kPack); the caller guarantees 16-byte alignment of p + i.
__device__ __forceinline__ void load_pack(const void* p, DType t, int64_t i, float (&v)[kPack]) {
  switch (t) {
    case DType::kFloat16: {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __half*>(p) + i);
      const uint32_t words[kPack / 2] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int k = 0; k < kPack / 2; ++k) {
        const float2 f = __half22float2(bits_as<__half2>(words[k]));
        v[2 * k] = f.x;
        v[2 * k + 1] = f.y;
      }
      return;
    }
    case DType::kBFloat16: {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p) + i);
      const uint32_t words[kPack / 2] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int k = 0; k < kPack / 2; ++k) {
        const float2 f = __bfloat1622float2(bits_as<__nv_bfloat162>(words[k]));
        v[2 * k] = f.x;
        v[2 * k + 1] = f.y;
      }
      return;
    }
    default: {
      const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      const float4 a = q[0];
      const float4 b = q[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
      return;
    }
  }
}

__device__ __forceinline__ void store_pack(void* p, DType t, int64_t i, const float (&v)[kPack]) {
  switch (t) {
    case DType::kFloat16: {
      uint32_t words[kPack / 2];
#pragma unroll
      for (int k = 0; k < kPack / 2; ++k) words[k] = bits_as<uint32_t>(__floats2half2_rn(v[2 * k], v[2 * k + 1]));
      *reinterpret_cast<uint4*>(static_cast<__half*>(p) + i) = make_uint4(words[0], words[1], words[2], words[3]);
      return;
    }
    case DType::kBFloat16: {
      uint32_t words[kPack / 2];
#pragma unroll
      for (int k = 0; k < kPack / 2; ++k) {
        words[k] = bits_as<uint32_t>(__floats2bfloat162_rn(v[2 * k], v[2 * k + 1]));
      }
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p) + i) =
          make_uint4(words[0], words[1], words[2], words[3]);
      return;
    }
    case DType::kFloat64: {
      double2* q = reinterpret_cast<double2*>(static_cast<double*>(p) + i);
#pragma unroll
      for (int k = 0; k < kPack / 2; ++k) q[k] = make_double2(v[2 * k], v[2 * k + 1]);
      return;
    }
    default: {
      float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
      q[0] = make_float4(v[0], v[1], v[2], v[3]);
      q[1] = make_float4(v[4], v[5], v[6], v[7]);
      return;
    }
  }
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

}  // namespace fused_sched::cuda
