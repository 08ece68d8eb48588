// The torch op bipolar_kernels::quantize_activations: per-token symmetric bipolar quantization of
// activations, written straight into bit planes (checkpoint layout, format version 1), for the
// binary tensor-core GEMM (bipolar_gemm_binary.cuh).
//
// Definition (vllm_bipolar/format/quantize.py, quantize_activations), bit for bit:
//   L = 2^q - 1, s = max_k |x[m,k]| / L, s_safe = (s == 0 ? 1 : s),
//   code = clamp(round_half_even((x / s_safe + L) * 0.5), 0, L)   (fp32 throughout)
// Bit-exactness notes: torch on CUDA evaluates `tensor / python_int` as tensor * (1 / L) (a CPU
// scalar divisor is turned into a reciprocal, BinaryDivTrueKernel.cu), so s is computed here as
// amax * (1.0f / L); the per-element x / s_safe is a true IEEE division in torch (tensor divisor)
// and here (__fdiv_rn). Every step uses explicit _rn intrinsics so that no FMA contraction
// changes a rounding. A NaN anywhere in a row propagates to its scale (torch's amax does too).
//
// Output layout: planes int32 [q, M, ceil(K/32)], bit j of word w of plane p = bit p of the code
// of x[m, 32 w + j]; bits past K are 0. One CTA per token row: a max-reduction over the row, then
// each warp takes 32 consecutive columns at a time, so __ballot_sync of "bit p of my code" is
// directly word w of plane p (lane j -> bit j, the little-endian order of the format).
//
// No host synchronisation, no allocation beyond the outputs, current stream: graph-capturable.

#include "ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <tuple>

namespace bipolar {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// max that propagates NaN (like torch.amax)
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const T* __restrict__ x, int64_t ldx, int K, int W, int q,
                                                            uint32_t* __restrict__ planes, int64_t M,
                                                            float* __restrict__ scales) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * ldx;
  // 1. amax over the row
  float amax = 0.f;
  for (int k = threadIdx.x; k < K; k += kThreads) amax = nan_max(amax, fabsf(to_float(row[k])));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  __shared__ float warp_max[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) amax = nan_max(amax, warp_max[w]);

  const float lv = float((1 << q) - 1);
  const float s = __fmul_rn(amax, __fdiv_rn(1.0f, lv));  // torch CUDA: amax / L == amax * (1 / L)
  const float s_safe = s == 0.f ? 1.f : s;
  if (threadIdx.x == 0) scales[m] = s;

  // 2. codes, packed by ballots: warp `warp` handles words warp, warp + 8, ...
  for (int w = warp; w < W; w += kThreads / 32) {
    const int k = w * 32 + lane;
    unsigned code = 0;
    bool valid = k < K;
    if (valid) {
      const float v = __fmul_rn(__fadd_rn(__fdiv_rn(to_float(row[k]), s_safe), lv), 0.5f);
      const float c = fminf(fmaxf(rintf(v), 0.f), lv);  // rintf: round half to even, as torch.round
      code = static_cast<unsigned>(c);
    }
    for (int p = 0; p < q; ++p) {
      const unsigned word = __ballot_sync(0xffffffffu, valid && ((code >> p) & 1u));
      if (lane == p) planes[(int64_t(p) * M + m) * W + w] = word;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x, int64_t a_bits) {
  const char* op = "bipolar_kernels::quantize_activations: ";
  check_activations(x, op);
  TORCH_CHECK(a_bits >= 1 && a_bits <= 8, op, "a_bits must be 1..8, got ", a_bits);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k > 0, op, "x must have at least one column");
  TORCH_CHECK(k <= 0x7fffffff - 32 && m <= 0x7fffffff, op, "x too large: shape ", x.sizes());
  const int64_t words = (k + 31) / 32;
  at::Tensor planes = at::empty({a_bits, m, words}, x.options().dtype(at::kInt));
  at::Tensor scales = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {planes, scales};
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t ldx = m > 1 ? x.stride(0) : k;
  auto* pl = reinterpret_cast<uint32_t*>(planes.data_ptr());
  auto* sc = scales.data_ptr<float>();
  if (x.scalar_type() == at::kHalf) {
    quantize_kernel<__half><<<dim3(unsigned(m)), kThreads, 0, stream>>>(
        reinterpret_cast<const __half*>(x.data_ptr()), ldx, int(k), int(words), int(a_bits), pl, m, sc);
  } else {
    quantize_kernel<__nv_bfloat16><<<dim3(unsigned(m)), kThreads, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), ldx, int(k), int(words), int(a_bits), pl, m, sc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {planes, scales};
}

}  // namespace bipolar
