// Loads and stores between any storage type and fp32 registers, for the CUDA kernels.
//
// The storage type is a runtime value that is the same for every thread, so the switch
// costs a few uniform instructions instead of one kernel instantiation per combination
// of five input and three output types. Packs of kPack elements use 128-bit accesses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

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

// Elements [i, i + kPack); the caller guarantees 16-byte alignment of p + i.
__device__ __forceinline__ void load_pack(const void* p, DType t, int64_t i, float (&v)[kPack]) {
  switch (t) {
    case DType::kFloat16: {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __half*>(p) + i);
      const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
      for (int k = 0; k < kPack / 2; ++k) {
        const float2 f = __half22float2(h[k]);
        v[2 * k] = f.x;
        v[2 * k + 1] = f.y;
      }
      return;
    }
    case DType::kBFloat16: {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p) + i);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int k = 0; k < kPack / 2; ++k) {
        const float2 f = __bfloat1622float2(h[k]);
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
      uint4 raw;
      __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
      for (int k = 0; k < kPack / 2; ++k) h[k] = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
      *reinterpret_cast<uint4*>(static_cast<__half*>(p) + i) = raw;
      return;
    }
    case DType::kBFloat16: {
      uint4 raw;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
      for (int k = 0; k < kPack / 2; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p) + i) = raw;
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
