// Host-side declarations of the bipolar CUDA ops. The schemas live in torch_bindings.cpp; the
// implementations in one .cu file per kernel family.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace bipolar {

// Weight-only (a_bits = 16) product y[M, N] = x[M, K] @ W^T, W = z + s * v read straight from the
// checkpoint bit planes (format version 1). See bipolar_gemm_a16.cu for the layout and the checks.
//   x        fp16 / bf16 [M, K], rows contiguous (stride(1) == 1; any row stride >= K)
//   qweight  int32 [bits, N, ceil(K / 32)], contiguous, bits in 1..8
//   scales   x.dtype [N, G], G = ceil(K / group_size) (1 when group_size == -1)
//   zeros    x.dtype [N, G] or none (symmetric)
at::Tensor gemm_a16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& zeros, int64_t k, int64_t group_size);

}  // namespace bipolar
