// The torch ops bipolar_kernels::quantize_activations and quantize_activations_int8: per-token
// symmetric bipolar quantization of activations, written straight into bit planes (checkpoint layout,
// format version 1) for the binary tensor-core GEMM (bipolar_gemm_binary.cuh), or into code bytes plus
// their per-group sums for the int8 tensor-core GEMM (bipolar_gemm_int8.cuh).
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
// quantize_activations_int8: codes uint8 [M, K rounded up to 128] (zeros past K, slot order of the int8
// GEMM, below) and PA int32 [G, M rounded up to 4] (the sum of the row's codes in group g; zeros in the
// padding rows).
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
#include <type_traits>

namespace bipolar {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// max that propagates NaN (like torch.amax)
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// amax over the row (NaN-propagating), shared by every thread of the CTA: one reduction over a row of K.
template <typename T>
__device__ __forceinline__ float row_absmax(const T* row, int K) {
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
  return amax;
}

// The scale of a row of max |x| amax, for L = lv: torch CUDA computes amax / L as amax * (1 / L).
__device__ __forceinline__ float row_scale(float amax, float lv) { return __fmul_rn(amax, __fdiv_rn(1.0f, lv)); }

// The code of one element: clamp(round_half_even((x / s_safe + L) * 0.5), 0, L).
__device__ __forceinline__ unsigned element_code(float x, float s_safe, float lv) {
  const float v = __fmul_rn(__fadd_rn(__fdiv_rn(x, s_safe), lv), 0.5f);
  return static_cast<unsigned>(fminf(fmaxf(rintf(v), 0.f), lv));  // rintf: round half to even, as torch.round
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const T* __restrict__ x, int64_t ldx, int K, int W, int q,
                                                            uint32_t* __restrict__ planes, int64_t M,
                                                            float* __restrict__ scales) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * ldx;
  const float amax = row_absmax(row, K);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float lv = float((1 << q) - 1);
  const float s = row_scale(amax, lv);
  const float s_safe = s == 0.f ? 1.f : s;
  if (threadIdx.x == 0) scales[m] = s;

  // codes, packed by ballots: warp `warp` handles words warp, warp + 8, ...
  for (int w = warp; w < W; w += kThreads / 32) {
    const int k = w * 32 + lane;
    const bool valid = k < K;
    const unsigned code = valid ? element_code(to_float(row[k]), s_safe, lv) : 0u;
    for (int p = 0; p < q; ++p) {
      const unsigned word = __ballot_sync(0xffffffffu, valid && ((code >> p) & 1u));
      if (lane == p) planes[(int64_t(p) * M + m) * W + w] = word;
    }
  }
}

// Codes as bytes for the int8 GEMM (bipolar_gemm_int8.cuh): codes [M, Kp] (Kp = K rounded up to 128,
// zeros past K) in the GEMM's slot order: inside every 16 channels, slot 4 t + 2 e + r holds channel
// 8 r + 2 t + e, the order in which the weight-only layout hands a lane its weight codes; and PA, the
// code sum of each (group, row), int32 [G, sums_stride]. Grid: one CTA per row of sums (M rounded up to
// 4); the CTAs of the padding rows write zero sums (the GEMM copies four rows at a time). Each thread
// writes one 32-bit word per step (slots 4 t .. 4 t + 3 of a 16-channel chunk: channels 2 t, 2 t + 8,
// 2 t + 1, 2 t + 9), so a warp covers 128 channels, which lie in one group (groups are multiples of
// 128): one warp reduction and one shared atomic per step.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_int8_kernel(const T* __restrict__ x, int64_t ldx, int K, int Kp,
                                                                 int q, int group_len, int G, int64_t M,
                                                                 uint8_t* __restrict__ codes, float* __restrict__ scales,
                                                                 int* __restrict__ sums, int64_t sums_stride) {
  extern __shared__ int group_sum[];  // [G]
  const int64_t m = blockIdx.x;
  if (m >= M) {
    for (int g = threadIdx.x; g < G; g += kThreads) sums[g * sums_stride + m] = 0;
    return;
  }
  for (int g = threadIdx.x; g < G; g += kThreads) group_sum[g] = 0;
  const T* row = x + m * ldx;
  const float amax = row_absmax(row, K);  // (its barrier also orders the zeroing above)
  const float lv = float((1 << q) - 1);
  const float s = row_scale(amax, lv);
  const float s_safe = s == 0.f ? 1.f : s;
  if (threadIdx.x == 0) scales[m] = s;
  uint32_t* out = reinterpret_cast<uint32_t*>(codes + m * Kp);
  for (int w = threadIdx.x; w < Kp / 4; w += kThreads) {  // Kp / 4 is a multiple of 32: whole warps
    const int k0 = 16 * (w >> 2) + 2 * (w & 3);  // channel of slot 4 t (e = r = 0) in chunk w / 4, t = w % 4
    uint32_t word = 0, sum = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // slot 4 t + j, j = 2 e + r
      const int k = k0 + 8 * (j & 1) + (j >> 1);
      const unsigned c = k < K ? element_code(to_float(row[k]), s_safe, lv) : 0u;
      word |= c << (8 * j);
      sum += c;
    }
    out[w] = word;
    sum = __reduce_add_sync(0xffffffffu, sum);
    if ((threadIdx.x & 31) == 0) atomicAdd(&group_sum[(4 * w) / group_len], int(sum));
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += kThreads) sums[g * sums_stride + m] = group_sum[g];
}

void check_quantize_args(const at::Tensor& x, int64_t a_bits, const char* op) {
  check_activations(x, op);
  TORCH_CHECK(a_bits >= 1 && a_bits <= 8, op, "a_bits must be 1..8, got ", a_bits);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k > 0, op, "x must have at least one column");
  TORCH_CHECK(k <= 0x7fffffff - 128 && m <= 0x7fffffff, op, "x too large: shape ", x.sizes());
}

// T = __half / __nv_bfloat16 from x's dtype, for `launch`.
template <typename F>
void with_element_type(const at::Tensor& x, F&& launch) {
  if (x.scalar_type() == at::kHalf) launch(static_cast<const __half*>(nullptr));
  else launch(static_cast<const __nv_bfloat16*>(nullptr));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x, int64_t a_bits) {
  const char* op = "bipolar_kernels::quantize_activations: ";
  check_quantize_args(x, a_bits, op);
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t words = (k + 31) / 32;
  at::Tensor planes = at::empty({a_bits, m, words}, x.options().dtype(at::kInt));
  at::Tensor scales = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {planes, scales};
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t ldx = m > 1 ? x.stride(0) : k;
  auto* pl = reinterpret_cast<uint32_t*>(planes.data_ptr());
  auto* sc = scales.data_ptr<float>();
  with_element_type(x, [&](auto* tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    quantize_kernel<T><<<dim3(unsigned(m)), kThreads, 0, stream>>>(reinterpret_cast<const T*>(x.data_ptr()), ldx,
                                                                   int(k), int(words), int(a_bits), pl, m, sc);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {planes, scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations_int8(const at::Tensor& x, int64_t a_bits,
                                                                        int64_t group_shift) {
  const char* op = "bipolar_kernels::quantize_activations_int8: ";
  check_quantize_args(x, a_bits, op);
  TORCH_CHECK((group_shift >= 7 && group_shift < 30) || group_shift == 30, op,
              "group_shift must be 7..29 (groups of at least 128 channels) or 30 (one group per row), got ",
              group_shift);
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t kp = (k + 127) / 128 * 128, ms = (m + 3) / 4 * 4;
  const int64_t group_len = group_shift == 30 ? kp : int64_t(1) << group_shift;
  const int64_t groups = (k + group_len - 1) / group_len;
  TORCH_CHECK(groups * 4 <= 48 * 1024, op, "too many groups (", groups, ") for one row's shared-memory sums; use a "
              "larger group_size");
  at::Tensor codes = at::empty({m, kp}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor sums = at::empty({groups, ms}, x.options().dtype(at::kInt));
  if (m == 0) return {codes, scales, sums};
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t ldx = m > 1 ? x.stride(0) : k;
  with_element_type(x, [&](auto* tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    quantize_int8_kernel<T><<<dim3(unsigned(ms)), kThreads, size_t(groups) * 4, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), ldx, int(k), int(kp), int(a_bits), int(group_len), int(groups), m,
        codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), sums.data_ptr<int>(), ms);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scales, sums};
}

}  // namespace bipolar
