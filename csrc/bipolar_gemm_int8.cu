// The torch op bipolar_kernels::gemm_int8: argument checks, output allocation and dispatch to the int8
// tensor-core kernels of bipolar_gemm_int8.cuh (instantiated per weight width in bipolar_gemm_int8_w*.cu).
//
//   a_codes     uint8 [M, K rounded up to 128]  activation codes in the kernel's slot order
//   a_scales    fp32 [M]                         per-token activation scales
//   a_sums      int32 [G, >= M rounded up to 4]  PA per (group, row)       (all three from
//                                                quantize_activations_int8(x, a_bits, group_shift))
//   qweight     int32 [Np / 16, ceil(K / 64), 32 * bits]  the weight-only layout (a16_layout.repack)
//   scales      fp16 / bf16 [Gp, Np, 2]          its (s, z) pairs; the output has this dtype
//   col_bias    fp32 [n]                         sum_g s C for these a_bits (cuda_gemm_a16.int8_col_bias)
//   group_shift log2 of the group length, 7..29, or 30 for one group per row
//
// No host synchronisation, no allocation beyond the output, current stream: graph-capturable.

#include "ops.h"
#include "bipolar_gemm_a16.cuh"  // a16::kNoGroups
#include "bipolar_gemm_int8.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace bipolar {

at::Tensor gemm_int8(const at::Tensor& a_codes, const at::Tensor& a_scales, const at::Tensor& a_sums,
                     const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& col_bias, int64_t n,
                     int64_t k, int64_t group_shift, int64_t a_bits) {
  const char* op = "bipolar_kernels::gemm_int8: ";
  TORCH_CHECK(a_codes.is_cuda(), op, "a_codes must be a CUDA tensor, got device ", a_codes.device());
  TORCH_CHECK(k > 0 && k <= 0x7fffffff - 128 && n > 0 && n <= 0x7fffffff - 64, op, "bad layer shape n = ", n,
              ", k = ", k);
  TORCH_CHECK(a_bits >= 1 && a_bits <= 8, op, "a_bits must be 1..8, got ", a_bits);
  TORCH_CHECK((group_shift >= 7 && group_shift < 30) || group_shift == a16::kNoGroups, op,
              "group_shift must be 7..29 (groups of at least 128 channels, the kernel's stage) or ", a16::kNoGroups,
              " (one group per row), got ", group_shift);
  const at::Device dev = a_codes.device();
  const int64_t kp = (k + 127) / 128 * 128, kb = (k + 63) / 64, np = (n + 63) / 64 * 64;
  const int64_t m = a_codes.size(0), ms = (m + 3) / 4 * 4;
  const bool per_row = group_shift == a16::kNoGroups;
  const int64_t glen = per_row ? kp : int64_t(1) << group_shift;
  const int64_t groups = per_row ? 1 : (k + glen - 1) / glen;
  const int64_t gp = per_row ? 1 : (kb * 64 + glen - 1) / glen;
  TORCH_CHECK(a_codes.scalar_type() == at::kByte && a_codes.dim() == 2 && a_codes.size(1) == kp &&
                  a_codes.is_contiguous() && reinterpret_cast<uintptr_t>(a_codes.data_ptr()) % 16 == 0,
              op, "a_codes must be contiguous, 16-byte aligned uint8 [M, k rounded up to 128 = ", kp,
              "] (quantize_activations_int8), got ", a_codes.scalar_type(), " ", a_codes.sizes());
  TORCH_CHECK(m <= 65535LL * 128, op, "M = ", m, " too large (at most ", 65535LL * 128, " rows per call)");
  TORCH_CHECK(qweight.device() == dev && qweight.scalar_type() == at::kInt && qweight.dim() == 3 &&
                  qweight.size(0) == np / 16 && qweight.size(1) == kb && qweight.size(2) % 32 == 0 &&
                  qweight.size(2) >= 32 && qweight.size(2) <= 256 && qweight.is_contiguous(),
              op, "qweight must be the contiguous int32 weight-only layout [Np/16, ceil(k/64), 32 * bits] = [", np / 16,
              ", ", kb, ", 32 * bits] on ", dev, " (a16_layout.repack), got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t p = qweight.size(2) / 32;
  TORCH_CHECK(scales.device() == dev && (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16) &&
                  scales.dim() == 3 && scales.size(0) == gp && scales.size(1) == np && scales.size(2) == 2 &&
                  scales.is_contiguous(),
              op, "scales must be contiguous float16 / bfloat16 [Gp, Np, 2] = [", gp, ", ", np, ", 2] (a16_layout.repack "
              "with this group_shift), got ", scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(a_scales.device() == dev && a_scales.scalar_type() == at::kFloat && a_scales.dim() == 1 &&
                  a_scales.size(0) == m && a_scales.is_contiguous(),
              op, "a_scales must be contiguous fp32 [M] = [", m, "], got ", a_scales.scalar_type(), " ", a_scales.sizes());
  TORCH_CHECK(a_sums.device() == dev && a_sums.scalar_type() == at::kInt && a_sums.dim() == 2 &&
                  a_sums.size(0) == groups && a_sums.size(1) == ms && a_sums.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(a_sums.data_ptr()) % 16 == 0,
              op, "a_sums must be contiguous int32 [G, M rounded up to 4] = [", groups, ", ", ms,
              "] (quantize_activations_int8), got ", a_sums.scalar_type(), " ", a_sums.sizes());
  TORCH_CHECK(col_bias.device() == dev && col_bias.scalar_type() == at::kFloat && col_bias.dim() == 1 &&
                  col_bias.size(0) == n && col_bias.is_contiguous(),
              op, "col_bias must be contiguous fp32 [n] = [", n, "], got ", col_bias.scalar_type(), " ", col_bias.sizes());
  // J = 4 T - 2 Lw PA is combined in 32-bit arithmetic: |J| <= 2 K_g Lw La must stay below 2^31.
  const int64_t group_len = std::min<int64_t>(k, glen), lw = (int64_t(1) << p) - 1, la = (int64_t(1) << a_bits) - 1;
  TORCH_CHECK(2 * group_len * lw * la < (int64_t(1) << 31), op, "a group of ", group_len, " channels at W", p, "A",
              a_bits, " overflows the 32-bit integer epilogue; use a smaller group_size");

  const c10::cuda::OptionalCUDAGuard guard(dev);
  int device = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(int8::smem_bytes(int(p)) <= smem_optin, op, "the kernel for ", p, "-bit weights needs ",
              int8::smem_bytes(int(p)), " bytes of shared memory per block; this GPU allows ", smem_optin);
  at::Tensor y = at::empty({m, n}, scales.options());
  if (m == 0) return y;

  int8::Problem pr;
  pr.a = a_codes.data_ptr<uint8_t>();
  pr.a_scales = a_scales.data_ptr<float>();
  pr.a_sums = a_sums.data_ptr<int>();
  pr.a_sums_stride = int(ms);
  pr.col_bias = col_bias.data_ptr<float>();
  pr.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
  pr.scales = scales.data_ptr();
  pr.out = y.data_ptr();
  pr.M = int(m);
  pr.N = int(n);
  pr.K = int(k);
  pr.Kp = int(kp);
  pr.KB = int(kb);
  pr.Np = int(np);
  pr.group_stages = int(glen / int8::kStageK);
  pr.group_bits = per_row ? int(k) : int(glen);
  pr.la = int(la);
  pr.magic = 2 * group_len * lw * la < (int64_t(1) << 22);
  pr.dtype = scales.scalar_type() == at::kHalf ? DType::kHalf : DType::kBFloat16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  switch (p) {
    case 1: int8::launch_int8_w1(pr, stream); break;
    case 2: int8::launch_int8_w2(pr, stream); break;
    case 3: int8::launch_int8_w3(pr, stream); break;
    case 4: int8::launch_int8_w4(pr, stream); break;
    case 5: int8::launch_int8_w5(pr, stream); break;
    case 6: int8::launch_int8_w6(pr, stream); break;
    case 7: int8::launch_int8_w7(pr, stream); break;
    case 8: int8::launch_int8_w8(pr, stream); break;
    default: TORCH_CHECK(false, op, "unsupported weight bits ", p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace bipolar
