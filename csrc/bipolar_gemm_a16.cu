// The torch ops of the weight-only kernel family (bipolar_gemm_a16.cuh): argument checks, output
// allocation, dispatch by weight width (instantiated per width and type in bipolar_gemm_a16_w*_{fp16,bf16}.cu).
//   bipolar_kernels::gemm_a16        y[M, N] = x[M, K] @ W^T, tensor cores, weights decoded in registers
//   bipolar_kernels::dequantize_a16  W[N, K] dense (the large-M path: dequantize, then cuBLAS)
// Both read the repacked layout built at load (vllm_bipolar/kernels/a16_layout.py).
//
// No host synchronisation, launched on the current stream: the ops can be captured in a CUDA graph.
// Allocations: the output, and for the mid-batch kernel when it splits K a zeroed fp32 workspace
// [M, N] (from the caching allocator) that is converted into the output after the kernel.

#include "ops.h"
#include "bipolar_gemm_a16.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
// c10/cuda headers rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE
// headers, which a CUDA toolkit without the math libraries (and the CI compile check) lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

namespace bipolar {
namespace {

using a16::kBlockK;
using a16::kBlockN;
using a16::kPadN;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Device attributes the launches depend on, asked once per device: the SM count (the decode kernel's
// CTA size, the mid-batch kernel's K split), the opt-in shared memory per CTA (the decode kernel's x
// rows) and the compute capability (programmatic dependent launch needs sm_90).
enum DeviceAttr { kSms, kSmemOptin, kMajor, kNumDeviceAttrs };
int device_attribute(DeviceAttr which, int device) {
  static std::atomic<int> cache[kNumDeviceAttrs][64] = {};
  static constexpr cudaDeviceAttr kAttrs[kNumDeviceAttrs] = {
      cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrComputeCapabilityMajor};
  static constexpr int kFallback[kNumDeviceAttrs] = {132, 48 * 1024, 8};
  if (device < 0 || device >= 64) return kFallback[which];
  int v = cache[which][device].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttrs[which], device));
    cache[which][device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Programmatic dependent launch of the decode kernel: on sm_90+, unless BIPOLAR_PDL=0 (read once).
bool use_pdl(int device) {
  static const bool enabled = [] {
    const char* e = std::getenv("BIPOLAR_PDL");
    return e == nullptr || std::string(e) != "0";
  }();
  return enabled && device_attribute(kMajor, device) >= 9;
}

// An integer tuning switch: environment variable `name`, one of `allowed` (else an error naming them);
// `unset` when it is absent or empty. The callers read it once (a function-local static).
int env_choice(const char* name, int unset, std::initializer_list<int> allowed) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == 0) return unset;
  const int n = std::atoi(e);
  bool ok = false;
  std::string choices;
  int i = 0;
  for (const int a : allowed) {
    ok = ok || n == a;
    choices += (i == 0 ? "" : (i + 1 == int(allowed.size()) ? " or " : ", ")) + std::to_string(a);
    ++i;
  }
  TORCH_CHECK(ok, name, " must be ", choices, ", got \"", e, "\"");
  return n;
}

// Largest M of the decode kernel: BIPOLAR_A16_DECODE_MAX_M (0, 8 or 16); unset: -1, the rule of
// a16::use_decode_kernel.
int decode_max_m() {
  static const int v = env_choice("BIPOLAR_A16_DECODE_MAX_M", -1, {0, 8, 16});
  return v;
}

// Largest chunk of the decode kernel in layout blocks (a16::use_two_block_chunks): BIPOLAR_A16_DECODE_CHUNK
// (1 or 2; for tuning); unset: 2.
int decode_chunk_max() {
  static const int v = env_choice("BIPOLAR_A16_DECODE_CHUNK", 2, {1, 2});
  return v;
}

// Warps per decode CTA: BIPOLAR_A16_DECODE_WARPS (2, 4, 8, 16 or 32; for tuning); unset: 0, the rule of
// a16::launch_decode_tile.
int decode_warps() {
  static const int v = env_choice("BIPOLAR_A16_DECODE_WARPS", 0, {2, 4, 8, 16, 32});
  return v;
}

// The decode kernel's one-token fold (Problem::one_token_fold): on unless BIPOLAR_A16_ONE_TOKEN_FOLD=0.
bool one_token_fold() {
  static const bool v = env_choice("BIPOLAR_A16_ONE_TOKEN_FOLD", 1, {0, 1}) == 1;
  return v;
}

template <typename T>
void dispatch(bool dequantize, int bits, const a16::Problem& p, cudaStream_t stream) {
#define BIPOLAR_CASE(B)                                                        \
  case B:                                                                      \
    if (dequantize) a16::launch_dequantize<T, B>(p, stream);                   \
    else a16::launch_gemm<T, B>(p, stream);                                    \
    break;
  switch (bits) {
    BIPOLAR_CASE(1) BIPOLAR_CASE(2) BIPOLAR_CASE(3) BIPOLAR_CASE(4)
    BIPOLAR_CASE(5) BIPOLAR_CASE(6) BIPOLAR_CASE(7) BIPOLAR_CASE(8)
    default: TORCH_CHECK(false, "bipolar_kernels: unsupported weight bits ", bits);
  }
#undef BIPOLAR_CASE
}

// Checks the repacked weight tensors against (n, k, group_shift); fills the weight part of `p` and
// returns the weight width.
int check_weights(const char* op, const at::Tensor& qweight, const at::Tensor& scales, int64_t n, int64_t k,
                  int64_t group_shift, a16::Problem& p) {
  TORCH_CHECK(n > 0 && k > 0, op, "n and k must be positive, got n = ", n, ", k = ", k);
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.dim() == 3 && qweight.is_contiguous(),
              op, "qweight must be the repacked contiguous int32 CUDA tensor [Np/16, Kp/64, 32*bits] "
              "(vllm_bipolar.kernels.a16_layout.repack), got ", qweight.scalar_type(), " ", qweight.sizes(),
              " on ", qweight.device());
  TORCH_CHECK(group_shift >= 5 && group_shift <= a16::kNoGroups, op, "group_shift must be 5..30, got ", group_shift);
  const int64_t np = round_up(n, kPadN), kp = round_up(k, kBlockK);
  const int64_t words = qweight.size(2);
  TORCH_CHECK(words % 32 == 0 && words / 32 >= 1 && words / 32 <= 8, op,
              "qweight.size(2) must be 32 * bits with bits 1..8, got ", words);
  TORCH_CHECK(qweight.size(0) == np / kBlockN && qweight.size(1) == kp / kBlockK, op, "qweight must be [",
              np / kBlockN, ", ", kp / kBlockK, ", 32*bits] for n = ", n, ", k = ", k, ", got ", qweight.sizes());
  const int64_t gp = group_shift >= a16::kNoGroups ? 1 : (kp + (int64_t(1) << group_shift) - 1) >> group_shift;
  TORCH_CHECK(scales.device() == qweight.device(), op, "scales is on ", scales.device(), " but qweight is on ",
              qweight.device());
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16, op,
              "scales must be float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == gp && scales.size(1) == np && scales.size(2) == 2 &&
                  scales.is_contiguous(),
              op, "scales must be contiguous [Gp, Np, 2] = [", gp, ", ", np, ", 2], got ", scales.sizes());
  TORCH_CHECK(qweight.numel() < (int64_t(1) << 40) && np * kp < (int64_t(1) << 40), op, "layer too large");
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
  p.scales = scales.data_ptr();
  p.N = int(n);
  p.K = int(k);
  p.Np = int(np);
  p.Kp = int(kp);
  p.Gp = int(gp);
  p.group_shift = int(group_shift);
  return int(words / 32);
}

}  // namespace

at::Tensor gemm_a16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t n, int64_t k,
                    int64_t group_shift) {
  const char* op = "bipolar_kernels::gemm_a16: ";
  check_activations(x, op);
  TORCH_CHECK(x.size(1) == k, op, "x has ", x.size(1), " columns but k = ", k);
  TORCH_CHECK(qweight.device() == x.device(), op, "qweight is on ", qweight.device(), " but x is on ", x.device());
  TORCH_CHECK(scales.scalar_type() == x.scalar_type(), op, "scales must have the dtype of x (", x.scalar_type(),
              "), got ", scales.scalar_type());
  a16::Problem p{};
  const int bits = check_weights(op, qweight, scales, n, k, group_shift, p);
  const int64_t m = x.size(0);
  TORCH_CHECK(m <= a16::kMaxM, op, "M = ", m, " is too large (at most ", a16::kMaxM, " rows per call)");
  const int64_t ldx = m > 1 ? x.stride(0) : k;
  // 16-byte cp.async of activation rows: K, the row stride and the base must be multiples of 8 elements.
  TORCH_CHECK(k % 8 == 0 && ldx % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, op,
              "x rows must start on 16-byte boundaries (k and the row stride multiples of 8, base aligned); "
              "got k = ", k, ", row stride ", ldx, " (pad k or call .contiguous())");

  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  p.x = x.data_ptr();
  p.ldx = ldx;
  p.y = y.data_ptr();
  p.M = int(m);
  const int device = x.device().index();
  p.sms = device_attribute(kSms, device);
  p.smem_optin = device_attribute(kSmemOptin, device);
  p.pdl = use_pdl(device);
  p.decode_max_m = decode_max_m();
  p.decode_chunk_max = decode_chunk_max();
  p.decode_warps = decode_warps();
  p.one_token_fold = one_token_fold();
  at::Tensor partial;
  if (!a16::use_decode_kernel(p.M, p.N, p.decode_max_m)) {
    p.kb_per_split = a16::gemm_a16_kb_per_split(p.M, p.Np, p.Kp, p.sms, int(bits));
    if (p.kb_per_split < p.Kp / kBlockK) {  // K split over CTAs: fp32 partial sums, then y
      partial = at::zeros({m, n}, x.options().dtype(at::kFloat));
      p.partial = partial.data_ptr<float>();
    }
  }
  if (x.scalar_type() == at::kHalf) dispatch<__half>(false, bits, p, stream);
  else dispatch<__nv_bfloat16>(false, bits, p, stream);
  if (partial.defined()) y.copy_(partial);
  return y;
}

at::Tensor dequantize_a16(const at::Tensor& qweight, const at::Tensor& scales, int64_t n, int64_t k,
                          int64_t group_shift) {
  const char* op = "bipolar_kernels::dequantize_a16: ";
  a16::Problem p{};
  const int bits = check_weights(op, qweight, scales, n, k, group_shift, p);
  at::Tensor w = at::empty({n, k}, scales.options());
  const c10::cuda::OptionalCUDAGuard guard(qweight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(qweight.device().index()).stream();
  p.y = w.data_ptr();
  if (scales.scalar_type() == at::kHalf) dispatch<__half>(true, bits, p, stream);
  else dispatch<__nv_bfloat16>(true, bits, p, stream);
  return w;
}

}  // namespace bipolar
