// Device helpers shared by the tensor-core kernel families that stage tiles with cp.async and read
// them with ldmatrix (bipolar_gemm_binary.cuh, bipolar_gemm_int8.cuh), and their output element type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace bipolar {

// Output / scale element type (the op's output dtype is the dtype of `scales`; fp32 is accepted
// as a debug and test path: with unit scales it returns the exact integer sums).
enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

#ifdef __CUDACC__

__device__ __forceinline__ void cp_async16(uint32_t* smem, const uint32_t* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // src-size 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

// Same with the shared-memory address already converted (bytes).
__device__ __forceinline__ void cp_async16_s(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}

// ldmatrix of 1 / 2 / 4 8x8 b16 matrices (row addresses from lanes 0-7 / 0-15 / 0-31).
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(uint32_t addr, uint32_t& d0, uint32_t& d1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(d0), "=r"(d1) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x1(uint32_t addr, uint32_t& d0) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(d0) : "r"(addr));
}

__device__ __forceinline__ void cp_async4(uint32_t* smem, const uint32_t* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

// Same with the shared-memory address already converted (bytes).
__device__ __forceinline__ void cp_async4_s(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void store_elem(void* p, int64_t i, float v, DType dt) {
  if (dt == DType::kHalf) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else if (dt == DType::kBFloat16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(p)[i] = v;
}

#endif  // __CUDACC__

}  // namespace bipolar
