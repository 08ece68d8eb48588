// The torch op bipolar_kernels::gemm_binary: argument checks, output allocation and dispatch to the
// binary tensor-core kernels of bipolar_gemm_binary.cuh (instantiated per weight width in
// bipolar_gemm_binary_w*.cu).
//
//   a_planes  int32 [q, M, ceil(K/32)]  activation bit planes (bipolar_kernels::quantize_activations)
//   a_scales  fp32 [M]                  per-token activation scales
//   qweight   int32 [p, N, ceil(K/32)]  weight bit planes, checkpoint layout (format version 1)
//   scales    [N, G] fp16 / bf16 (fp32 accepted: a debug/test path), the output dtype
//   zeros     [N, G] of scales' dtype, or none (symmetric)
//   group_size -1 or a positive multiple of 128 (what the config allows with quantized activations)
//
// MMA shape: groups that are a multiple of 256 channels (and group_size = -1) use
// mma.m16n8k256 (one instruction per plane pair per 256 bits); groups of an odd multiple of 128
// (128, 384, ...) end in the middle of a 256-bit step, so those use m16n8k128 and close a group
// after any 128-bit half.
//
// No host synchronisation; allocations: the output and an fp32 copy of (s, z) (caching allocator); current
// stream: graph-capturable.

#include "ops.h"
#include "bipolar_gemm_binary.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace bipolar {

at::Tensor gemm_binary(const at::Tensor& a_planes, const at::Tensor& a_scales, const at::Tensor& qweight,
                       const at::Tensor& scales, const std::optional<at::Tensor>& zeros, int64_t k,
                       int64_t group_size) {
  const char* op = "bipolar_kernels::gemm_binary: ";
  TORCH_CHECK(a_planes.is_cuda(), op, "a_planes must be a CUDA tensor, got device ", a_planes.device());
  TORCH_CHECK(k > 0 && k <= 0x7fffffff - 256, op, "k must be in 1..2^31-257, got ", k);
  const int64_t words = (k + 31) / 32;
  auto check_planes = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == a_planes.device(), op, name, " is on ", t.device(), " but a_planes is on ",
                a_planes.device());
    TORCH_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 3 && t.size(2) == words, op, name, " must be [bits, rows, ceil(k/32) = ", words,
                "] for k = ", k, ", got shape ", t.sizes());
    TORCH_CHECK(t.size(0) >= 1 && t.size(0) <= 8, op, name, ".size(0) is a bit width and must be 1..8, got ",
                t.size(0));
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
    TORCH_CHECK(t.numel() <= 0x7fffffffLL * 4, op, name, " too large");
  };
  check_planes(a_planes, "a_planes");
  check_planes(qweight, "qweight");
  const int64_t q = a_planes.size(0), m = a_planes.size(1);
  const int64_t p = qweight.size(0), n = qweight.size(1);
  TORCH_CHECK(m <= 65535LL * 32 && n <= 0x7fffffffLL, op, "M = ", m, " too large (at most ", 65535LL * 32,
              " rows per call); split the batch");
  TORCH_CHECK(a_scales.device() == a_planes.device() && a_scales.scalar_type() == at::kFloat &&
                  a_scales.dim() == 1 && a_scales.size(0) == m && a_scales.is_contiguous(),
              op, "a_scales must be a contiguous fp32 CUDA tensor [M] = [", m, "], got ", a_scales.scalar_type(), " ",
              a_scales.sizes());
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 128 == 0 && group_size <= (1 << 30)), op,
              "group_size must be -1 or a positive multiple of 128 (binary MMAs consume K in steps of 128 bits), "
              "got ", group_size);
  const int64_t groups = group_size == -1 ? 1 : (k + group_size - 1) / group_size;
  const at::ScalarType dt = scales.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op,
              "scales must be float16, bfloat16 (or float32), got ", dt);
  auto check_group_tensor = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == a_planes.device(), op, name, " is on ", t.device(), " but a_planes is on ",
                a_planes.device());
    TORCH_CHECK(t.scalar_type() == dt, op, name, " must have the dtype of scales (", dt, "), got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == groups, op, name, " must be [N, G] = [", n, ", ",
                groups, "] (k = ", k, ", group_size = ", group_size, "), got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  };
  check_group_tensor(scales, "scales");
  if (zeros.has_value()) check_group_tensor(*zeros, "zeros");
  // The per-group integer product is combined in 32-bit arithmetic: |I| <= K_g * Lw * La must fit.
  const int64_t group_len = group_size == -1 ? k : std::min<int64_t>(k, group_size);
  const int64_t lw = (int64_t(1) << p) - 1, la = (int64_t(1) << q) - 1;
  TORCH_CHECK(group_len * lw * la < (int64_t(1) << 31), op, "group of ", group_len, " channels at W", p, "A", q,
              " overflows the 32-bit integer epilogue (needs group_size * (2^p-1) * (2^q-1) < 2^31); "
              "use a smaller group_size");

  at::Tensor y = at::empty({m, n}, scales.options());
  if (m == 0 || n == 0) return y;

  const c10::cuda::OptionalCUDAGuard guard(a_planes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a_planes.device().index()).stream();
  binary::Problem pr;
  pr.a = reinterpret_cast<const uint32_t*>(a_planes.data_ptr());
  pr.a_scales = a_scales.data_ptr<float>();
  pr.b = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
  // (s, z) as fp32 pairs, group-major [G, N rounded up to even, 2], z = 0 when symmetric (the kernel's
  // pipeline stages copy the pairs of their groups and columns with 16-byte cp.async; see Problem.sz).
  // Built per call from the layer's [N, G] tensors: two small copies, beside a product of M x N x K.
  const int64_t sz_stride = (n + 1) / 2 * 2;
  at::Tensor sz = at::zeros({groups, sz_stride, 2}, scales.options().dtype(at::kFloat));
  sz.narrow(1, 0, n).select(2, 0).copy_(scales.t());
  if (zeros.has_value()) sz.narrow(1, 0, n).select(2, 1).copy_(zeros->t());
  pr.sz = sz.data_ptr<float>();
  pr.sz_stride = int(sz_stride);
  pr.out = y.data_ptr();
  pr.M = int(m);
  pr.N = int(n);
  pr.K = int(k);
  pr.W = int(words);
  pr.G = int(groups);
  const bool per_row = group_size == -1;
  pr.group_bits = per_row ? int(k) : int(group_size);
  pr.group_words = per_row ? int((words + 7) / 8 * 8) : int(group_size / 32);
  const bool k128 = !per_row && (group_size % 256 != 0);
  pr.magic = group_len * lw * la < (int64_t(1) << 22);
  pr.vec16 = words % 4 == 0 && reinterpret_cast<uintptr_t>(pr.a) % 16 == 0 && reinterpret_cast<uintptr_t>(pr.b) % 16 == 0;
  pr.dtype = dt == at::kHalf ? binary::DType::kHalf : (dt == at::kBFloat16 ? binary::DType::kBFloat16 : binary::DType::kFloat);
  switch (p) {
    case 1: binary::launch_binary_w1(int(q), k128, pr, stream); break;
    case 2: binary::launch_binary_w2(int(q), k128, pr, stream); break;
    case 3: binary::launch_binary_w3(int(q), k128, pr, stream); break;
    case 4: binary::launch_binary_w4(int(q), k128, pr, stream); break;
    case 5: binary::launch_binary_w5(int(q), k128, pr, stream); break;
    case 6: binary::launch_binary_w6(int(q), k128, pr, stream); break;
    case 7: binary::launch_binary_w7(int(q), k128, pr, stream); break;
    case 8: binary::launch_binary_w8(int(q), k128, pr, stream); break;
    default: TORCH_CHECK(false, op, "unsupported weight bits ", p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace bipolar
