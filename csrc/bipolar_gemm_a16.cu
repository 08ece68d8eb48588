// The torch op bipolar_kernels::gemm_a16: argument checks, output allocation, dispatch to the
// kernel family of bipolar_gemm_a16.cuh (instantiated per weight width in bipolar_gemm_a16_w*.cu).
//
// No host synchronisation, no allocation beyond the output, launched on the current stream: the
// op can be captured in a CUDA graph.

#include "ops.h"
#include "bipolar_gemm_a16.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
// c10/cuda headers rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE
// headers, which a CUDA toolkit without the math libraries (and the CI compile check) lacks.
// c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream aliases.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace bipolar {
namespace {

constexpr int64_t kWordBits = 32;

template <typename T>
void launch_bits(int bits, const a16::Problem& p, cudaStream_t stream) {
  switch (bits) {
    case 1: a16::launch<T, 1>(p, stream); break;
    case 2: a16::launch<T, 2>(p, stream); break;
    case 3: a16::launch<T, 3>(p, stream); break;
    case 4: a16::launch<T, 4>(p, stream); break;
    case 5: a16::launch<T, 5>(p, stream); break;
    case 6: a16::launch<T, 6>(p, stream); break;
    case 7: a16::launch<T, 7>(p, stream); break;
    case 8: a16::launch<T, 8>(p, stream); break;
    default: TORCH_CHECK(false, "bipolar_kernels::gemm_a16: unsupported weight bits ", bits);
  }
}

}  // namespace

at::Tensor gemm_a16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& zeros, int64_t k, int64_t group_size) {
  const char* op = "bipolar_kernels::gemm_a16: ";
  check_activations(x, op);
  TORCH_CHECK(k > 0, op, "k must be positive, got ", k);
  TORCH_CHECK(x.size(1) == k, op, "x has ", x.size(1), " columns but k = ", k);
  // weights
  TORCH_CHECK(qweight.device() == x.device(), op, "qweight is on ", qweight.device(), " but x is on ", x.device());
  TORCH_CHECK(qweight.scalar_type() == at::kInt, op, "qweight must be int32, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 3, op, "qweight must be [bits, N, ceil(K/32)], got shape ", qweight.sizes());
  TORCH_CHECK(qweight.is_contiguous(), op, "qweight must be contiguous");
  const int64_t bits = qweight.size(0);
  TORCH_CHECK(bits >= 1 && bits <= 8, op, "qweight.size(0) is the weight bit width and must be 1..8, got ", bits);
  const int64_t n = qweight.size(1);
  const int64_t words = (k + kWordBits - 1) / kWordBits;
  TORCH_CHECK(qweight.size(2) == words, op, "qweight.size(2) must be ceil(k/32) = ", words, " for k = ", k,
              ", got ", qweight.size(2));
  // groups
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % kWordBits == 0), op,
              "group_size must be -1 or a positive multiple of 32, got ", group_size);
  const int64_t groups = group_size == -1 ? 1 : (k + group_size - 1) / group_size;
  const int64_t words_per_group = group_size == -1 ? words : group_size / kWordBits;
  auto check_group_tensor = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), op, name, " is on ", t.device(), " but x is on ", x.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, name, " must have the dtype of x (", x.scalar_type(),
                "), got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == groups, op, name, " must be [N, G] = [", n, ", ",
                groups, "] (k = ", k, ", group_size = ", group_size, "), got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  };
  check_group_tensor(scales, "scales");
  if (zeros.has_value()) check_group_tensor(*zeros, "zeros");
  // index ranges (the kernel indexes weights with 32 bits, activations and outputs with 64)
  const int64_t m = x.size(0);
  constexpr int64_t kIntMax = 0x7fffffff;
  TORCH_CHECK(k <= kIntMax - kWordBits && qweight.numel() <= kIntMax && scales.numel() <= kIntMax, op,
              "layer too large for 32-bit indexing: N = ", n, ", K = ", k, ", bits = ", bits);
  TORCH_CHECK(m <= a16::kMaxM, op, "M = ", m, " is too large (at most ", a16::kMaxM, " rows per call); split the batch");

  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;

  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  a16::Problem p;
  p.x = x.data_ptr();
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
  p.scales = scales.data_ptr();
  p.zeros = zeros.has_value() ? zeros->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.M = int(m);
  p.ldx = m > 1 ? x.stride(0) : k;  // one row: its stride is never used
  p.N = int(n);
  p.K = int(k);
  p.W = int(words);
  p.G = int(groups);
  p.words_per_group = int(words_per_group);
  p.group_shift = -1;  // log2(words_per_group) when it is a power of two
  for (int sh = 0; sh < 31; ++sh)
    if ((int64_t(1) << sh) == words_per_group) p.group_shift = sh;
  // 16-byte activation loads need every row start 16-byte aligned: base pointer and row stride.
  p.x_vec = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (p.ldx % 8 == 0);
  if (x.scalar_type() == at::kHalf) launch_bits<__half>(int(bits), p, stream);
  else launch_bits<__nv_bfloat16>(int(bits), p, stream);
  return y;
}

}  // namespace bipolar
