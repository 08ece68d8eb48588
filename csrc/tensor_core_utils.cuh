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

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void store_elem(void* p, int64_t i, float v, DType dt) {
  if (dt == DType::kHalf) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else if (dt == DType::kBFloat16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(p)[i] = v;
}

// The WpAq kernels' output: y = s_x[row] * (acc + col_bias[col]) for a warp tile of WM x WN mma tiles (m16 x
// n8, accumulator layout: rows g / g + 8, columns 2t / 2t + 1) at rows row0.., columns col0.. of y [M, N].
// A pair of columns is one 32-bit store when the output is 16-bit and N even (a pair never straddles a row).
template <int WM, int WN>
__device__ __forceinline__ void store_scaled_tile(void* out, DType dt, int M, int N, int row0, int col0, int g, int t,
                                                  const float (&acc)[WM][WN][4], const float* a_scales,
                                                  const float* col_bias) {
  float cb[WN][2];
#pragma unroll
  for (int ni = 0; ni < WN; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = col0 + ni * 8 + 2 * t + e;
      cb[ni][e] = col < N ? col_bias[col] : 0.f;
    }
  const bool pairs = (N & 1) == 0 && dt != DType::kFloat;
#pragma unroll
  for (int mi = 0; mi < WM; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + mi * 16 + g + h * 8;
      if (row >= M) continue;
      const float sx = a_scales[row];
#pragma unroll
      for (int ni = 0; ni < WN; ++ni) {
        const int col = col0 + ni * 8 + 2 * t;
        const float v0 = sx * (acc[mi][ni][h * 2] + cb[ni][0]), v1 = sx * (acc[mi][ni][h * 2 + 1] + cb[ni][1]);
        const int64_t i0 = int64_t(row) * N + col;
        if (pairs && col < N) {
          if (dt == DType::kHalf) *reinterpret_cast<__half2*>(static_cast<__half*>(out) + i0) = __floats2half2_rn(v0, v1);
          else *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(out) + i0) = __floats2bfloat162_rn(v0, v1);
        } else {
          if (col < N) store_elem(out, i0, v0, dt);
          if (col + 1 < N) store_elem(out, i0 + 1, v1, dt);
        }
      }
    }
}

#endif  // __CUDACC__

}  // namespace bipolar
