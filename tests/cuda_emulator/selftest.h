// The emulator's self-test kernels (selftest.cpp), for bindings.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fused_sched::emulator::selftest {

cudaError_t reverse(const int32_t* in, int32_t* out, unsigned blocks, unsigned threads, bool synchronise);
cudaError_t broadcast(const int32_t* in, int32_t* out, unsigned blocks, unsigned threads, bool synchronise);
cudaError_t collectives(const int64_t* in, int64_t* scan, int64_t* ballot, int64_t* first, int64_t* any_negative,
                        unsigned blocks, unsigned threads);
cudaError_t arrival_order(int32_t* thread_order, int32_t* block_order, unsigned* counters, unsigned blocks,
                          unsigned threads);
cudaError_t write_even(int32_t* out, int64_t n);
cudaError_t divergent_barrier(unsigned threads);
cudaError_t misaligned_load(const float* p, float* out);

}  // namespace fused_sched::emulator::selftest
