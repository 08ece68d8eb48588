// The torch ops bipolar_kernels::gemm_binary (argument checks, output allocation and dispatch to the
// binary tensor-core kernels of bipolar_gemm_binary.cuh, instantiated per weight width in
// bipolar_gemm_binary_w*.cu) and bipolar_kernels::binary_group_sums (the per-group code sums the
// GEMM's popcount corrections need, for activation and weight planes alike).
//
// gemm_binary:
//   a_planes   int32 [q, M, ceil(K/32)]  activation bit planes (bipolar_kernels::quantize_activations)
//   a_scales   fp32 [M]                  per-token activation scales
//   a_sums     int32 [G, >= M rounded up to 4]  PA: binary_group_sums(a_planes, k, group_size)
//   qweight    int32 [p, N, ceil(K/32)]  weight bit planes, checkpoint layout (format version 1)
//   sz         fp32 [G, N rounded up to even, 2]  (s, z) pairs, group-major, z = 0 when symmetric
//   col_bias   fp32 [N]                  sum_g s[n,g] (K_g Lw La - 2 La PB[n,g]) for this q
//   group_size -1 or a positive multiple of 128 (what the config allows with quantized activations)
//   out_dtype  float16 / bfloat16 (float32: a debug and test path)
// sz and col_bias depend only on the weights (and q): vllm_bipolar/kernels/cuda_binary_gemm.py,
// prepare_binary_weights, builds them once at load time.
//
// MMA shape: groups that are a multiple of 256 channels (and group_size = -1) use
// mma.m16n8k256 (one instruction per plane pair per 256 bits); groups of an odd multiple of 128
// (128, 384, ...) end in the middle of a 256-bit step, so those use m16n8k128 and close a group
// after any 128-bit half.
//
// No host synchronisation, no allocation beyond the outputs, current stream: graph-capturable.

#include "ops.h"
#include "bipolar_gemm_binary.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace bipolar {

namespace {

// One warp per (group, row): sum over the group's words of every plane of popc(word) << plane, i.e.
// the sum of the codes of the row's channels in the group (padding bits are 0). Rows R .. rs - 1 of
// each group row are written as 0 (the GEMM copies a_sums in 16-byte pieces of four rows).
__global__ void group_sums_kernel(const uint32_t* __restrict__ planes, int nplanes, int R, int W, int group_words,
                                  int G, int rs, int* __restrict__ out) {
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (wid >= int64_t(G) * rs) return;
  const int g = int(wid / rs), r = int(wid % rs);
  int sum = 0;
  if (r < R) {
    const int w0 = g * group_words, w1 = min(W, w0 + group_words);
    for (int j = 0; j < nplanes; ++j) {
      const uint32_t* row = planes + (int64_t(j) * R + r) * W;
      int c = 0;
      for (int w = w0 + lane; w < w1; w += 32) c += __popc(row[w]);
      sum += c << j;
    }
    sum = __reduce_add_sync(0xffffffffu, sum);
  }
  if (lane == 0) out[int64_t(g) * rs + r] = sum;
}

void check_planes(const at::Tensor& t, const char* name, int64_t k, const at::Tensor& like, const char* op) {
  const int64_t words = (k + 31) / 32;
  TORCH_CHECK(t.device() == like.device(), op, name, " is on ", t.device(), " but a_planes is on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(2) == words, op, name, " must be [bits, rows, ceil(k/32) = ", words,
              "] for k = ", k, ", got shape ", t.sizes());
  TORCH_CHECK(t.size(0) >= 1 && t.size(0) <= 8, op, name, ".size(0) is a bit width and must be 1..8, got ",
              t.size(0));
  TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  TORCH_CHECK(t.numel() <= 0x7fffffffLL * 4, op, name, " too large");
}

void check_group_size(int64_t k, int64_t group_size, const char* op) {
  TORCH_CHECK(k > 0 && k <= 0x7fffffff - 256, op, "k must be in 1..2^31-257, got ", k);
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 128 == 0 && group_size <= (1 << 30)), op,
              "group_size must be -1 or a positive multiple of 128 (binary MMAs consume K in steps of 128 bits), "
              "got ", group_size);
}

int64_t round_up4(int64_t v) { return (v + 3) / 4 * 4; }

}  // namespace

at::Tensor binary_group_sums(const at::Tensor& planes, int64_t k, int64_t group_size) {
  const char* op = "bipolar_kernels::binary_group_sums: ";
  TORCH_CHECK(planes.is_cuda(), op, "planes must be a CUDA tensor, got device ", planes.device());
  check_group_size(k, group_size, op);
  check_planes(planes, "planes", k, planes, op);
  const int64_t words = (k + 31) / 32, rows = planes.size(1);
  const int64_t groups = group_size == -1 ? 1 : (k + group_size - 1) / group_size;
  const int64_t rs = round_up4(rows);
  TORCH_CHECK(groups * rs <= 0x7fffffffLL, op, "too many (group, row) pairs: ", groups, " x ", rs);
  const int64_t group_len = group_size == -1 ? k : std::min<int64_t>(k, group_size);
  TORCH_CHECK(group_len * ((int64_t(1) << planes.size(0)) - 1) < (int64_t(1) << 31), op, "a group of ", group_len,
              " channels at ", planes.size(0), " bits overflows the int32 sums; use a smaller group_size");
  at::Tensor out = at::empty({groups, rs}, planes.options());
  if (rs == 0) return out;
  const c10::cuda::OptionalCUDAGuard guard(planes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(planes.device().index()).stream();
  constexpr int kThreads = 256;
  const int64_t blocks = (groups * rs * 32 + kThreads - 1) / kThreads;
  group_sums_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<const uint32_t*>(planes.data_ptr()), int(planes.size(0)), int(rows), int(words),
      group_size == -1 ? int(words) : int(group_size / 32), int(groups), int(rs), out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gemm_binary(const at::Tensor& a_planes, const at::Tensor& a_scales, const at::Tensor& a_sums,
                       const at::Tensor& qweight, const at::Tensor& sz, const at::Tensor& col_bias, int64_t k,
                       int64_t group_size, at::ScalarType out_dtype) {
  const char* op = "bipolar_kernels::gemm_binary: ";
  TORCH_CHECK(a_planes.is_cuda(), op, "a_planes must be a CUDA tensor, got device ", a_planes.device());
  check_group_size(k, group_size, op);
  const int64_t words = (k + 31) / 32;
  check_planes(a_planes, "a_planes", k, a_planes, op);
  check_planes(qweight, "qweight", k, a_planes, op);
  const int64_t q = a_planes.size(0), m = a_planes.size(1);
  const int64_t p = qweight.size(0), n = qweight.size(1);
  TORCH_CHECK(m <= 65535LL * 32 && n <= 0x7fffffffLL, op, "M = ", m, " too large (at most ", 65535LL * 32,
              " rows per call); split the batch");
  TORCH_CHECK(a_scales.device() == a_planes.device() && a_scales.scalar_type() == at::kFloat &&
                  a_scales.dim() == 1 && a_scales.size(0) == m && a_scales.is_contiguous(),
              op, "a_scales must be a contiguous fp32 CUDA tensor [M] = [", m, "], got ", a_scales.scalar_type(), " ",
              a_scales.sizes());
  const int64_t groups = group_size == -1 ? 1 : (k + group_size - 1) / group_size;
  auto check_prepared = [&](const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef shape,
                            const char* from) {
    TORCH_CHECK(t.device() == a_planes.device() && t.scalar_type() == dt && t.sizes() == shape && t.is_contiguous(),
                op, name, " must be a contiguous ", dt, " tensor of shape ", shape, " on ", a_planes.device(),
                " (", from, "), got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  };
  const int64_t ms = round_up4(m), sz_stride = (n + 1) / 2 * 2;
  check_prepared(a_sums, "a_sums", at::kInt, {groups, ms}, "binary_group_sums(a_planes, k, group_size)");
  check_prepared(sz, "sz", at::kFloat, {groups, sz_stride, 2}, "prepare_binary_weights");
  check_prepared(col_bias, "col_bias", at::kFloat, {n}, "prepare_binary_weights");
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16 || out_dtype == at::kFloat, op,
              "out_dtype must be float16, bfloat16 (or float32), got ", out_dtype);
  // J = 4 T - 2 Lw PA is combined in 32-bit arithmetic: |J| <= 2 K_g Lw La must stay below 2^31.
  const int64_t group_len = group_size == -1 ? k : std::min<int64_t>(k, group_size);
  const int64_t lw = (int64_t(1) << p) - 1, la = (int64_t(1) << q) - 1;
  TORCH_CHECK(2 * group_len * lw * la < (int64_t(1) << 31), op, "group of ", group_len, " channels at W", p, "A", q,
              " overflows the 32-bit integer epilogue (needs 2 * group_size * (2^p-1) * (2^q-1) < 2^31); "
              "use a smaller group_size");

  at::Tensor y = at::empty({m, n}, a_scales.options().dtype(out_dtype));
  if (m == 0 || n == 0) return y;

  const c10::cuda::OptionalCUDAGuard guard(a_planes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a_planes.device().index()).stream();
  binary::Problem pr;
  pr.a = reinterpret_cast<const uint32_t*>(a_planes.data_ptr());
  pr.a_scales = a_scales.data_ptr<float>();
  pr.a_sums = a_sums.data_ptr<int>();
  pr.a_sums_stride = int(ms);
  pr.col_bias = col_bias.data_ptr<float>();
  pr.b = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
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
  pr.magic = 2 * group_len * lw * la < (int64_t(1) << 22);
  pr.vec16 = words % 4 == 0 && reinterpret_cast<uintptr_t>(pr.a) % 16 == 0 && reinterpret_cast<uintptr_t>(pr.b) % 16 == 0;
  TORCH_CHECK(reinterpret_cast<uintptr_t>(pr.sz) % 16 == 0 && reinterpret_cast<uintptr_t>(pr.a_sums) % 16 == 0, op,
              "sz and a_sums must be 16-byte aligned (use the tensors the preparing ops return, not views)");
  pr.dtype = out_dtype == at::kHalf ? DType::kHalf
                                    : (out_dtype == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat);
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
