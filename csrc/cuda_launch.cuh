// Host-side launch helpers shared by the kernel families (bipolar_gemm_a16.cuh, bipolar_gemm_binary.cuh).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace bipolar {

// > 48 KB of dynamic shared memory needs an opt-in per kernel and device: done once per device, for
// the kernel's largest request, so that no later launch (nor a CUDA graph capture) pays for the
// driver call.
template <auto kKernel>
void opt_in_shared_memory(int bytes) {
  static std::atomic<uint64_t> opted_in{0};  // bit d: done on device d (one set of flags per kernel)
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit == 0 || !(opted_in.load(std::memory_order_relaxed) & bit)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
}

}  // namespace bipolar
