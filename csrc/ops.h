// Host-side declarations of the bipolar CUDA ops. The schemas live in torch_bindings.cpp; the
// implementations in one .cu file per kernel family.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace bipolar {

// The activation operand of every op: fp16/bf16 [M, K] on CUDA. Elements within a row must be
// dense (the kernels load 16-byte vectors along K); rows may be any stride apart (a slice of a
// wider tensor). `op` prefixes each message with the op's name.
inline void check_activations(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              "x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, "x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op,
              "x must have contiguous rows (stride 1 along K; call .contiguous()), got strides ", x.strides());
}

// Weight-only (a_bits = 16) kernels on the repacked layout of bipolar_gemm_a16.cuh (built at load by
// vllm_bipolar/kernels/a16_layout.py):
//   qweight  int32 [Np / 16, Kp / 64, 32 * bits]   (Np = n rounded up to 64, Kp = k rounded up to 64)
//   scales   fp16 / bf16 [Gp, Np, 2]: (s, z) per (group of 2^group_shift channels, row), z = 0 if symmetric
// gemm_a16: y[M, n] = x[M, k] @ W^T on tensor cores; x fp16 / bf16 with the dtype of scales, rows on
// 16-byte boundaries. dequantize_a16: the dense W [n, k] in the dtype of scales.
at::Tensor gemm_a16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t n, int64_t k,
                    int64_t group_shift);
at::Tensor dequantize_a16(const at::Tensor& qweight, const at::Tensor& scales, int64_t n, int64_t k,
                          int64_t group_shift);

// Per-token symmetric bipolar quantization of activations into bit planes (bipolar_act_quant.cu):
//   x fp16 / bf16 [M, K] (contiguous rows) -> (planes int32 [a_bits, M, ceil(K/32)] in the checkpoint
//   bit-plane layout, scales fp32 [M]); bit-exact with vllm_bipolar.format.quantize_activations on CUDA.
std::tuple<at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x, int64_t a_bits);
// The same quantization into code bytes for gemm_int8: (codes uint8 [M, K rounded up to 128] in its slot
// order, zeros past K; scales fp32 [M]; sums int32 [G, M rounded up to 4], the code sum PA of each (group
// of 2^group_shift channels, row); group_shift 7..29, or 30 for one group per row).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations_int8(const at::Tensor& x, int64_t a_bits,
                                                                        int64_t group_shift);

// WpAq product on binary tensor cores (bipolar_gemm_binary.cu, mma .b1 AND.popc):
//   y[M, N] = a_scales[m] * (sum_g (s[n, g] * J[m, n, g] + z[n, g] * S[m, g]) + col_bias[n]),
// J / S from the bit planes and a_sums (binary_group_sums of a_planes); sz ((s, z) pairs, fp32
// [G, N rounded up to even, 2]) and col_bias (fp32 [N]) prepared from the weights at load time.
at::Tensor gemm_binary(const at::Tensor& a_planes, const at::Tensor& a_scales, const at::Tensor& a_sums,
                       const at::Tensor& qweight, const at::Tensor& sz, const at::Tensor& col_bias, int64_t k,
                       int64_t group_size, at::ScalarType out_dtype);

// WpAq product on int8 tensor cores (bipolar_gemm_int8.cuh, mma .u8.u8) for large batches, on the
// weight-only layout (qweight / scales as for gemm_a16, so a layer keeps one copy of its weights):
//   y[M, n] = a_scales[m] * (sum_g (s[n,g] * J[m,n,g] + z[n,g] * S[m,g]) + col_bias[n])   (scales' dtype)
// with the activations from quantize_activations_int8(x, a_bits, group_shift) and col_bias (fp32 [n])
// prepared at load time; group_shift 7..29 or 30 (one group per row).
at::Tensor gemm_int8(const at::Tensor& a_codes, const at::Tensor& a_scales, const at::Tensor& a_sums,
                     const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& col_bias, int64_t n,
                     int64_t k, int64_t group_shift, int64_t a_bits);

// Per-group code sums of bit planes [bits, R, ceil(K/32)] -> int32 [G, R rounded up to 4]:
// out[g, r] = sum_j 2^j popc(plane_j[r, words of group g]) (padding rows 0).
at::Tensor binary_group_sums(const at::Tensor& planes, int64_t k, int64_t group_size);

}  // namespace bipolar
