// Torch op registration for the bipolar CUDA kernels, and the Python module vllm_bipolar._C.
//
// Python.h comes first, as CPython asks of every file that includes it.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

// Schemas: the contract with the Python side (fake/meta implementations are registered there,
// with torch.library.register_fake, so that torch.compile can trace the ops without a GPU).
TORCH_LIBRARY(bipolar_kernels, m) {
  // Weight-only, repacked layout (ops.h, bipolar_gemm_a16.cuh): y[M, n] = x[M, k] @ W^T on tensor
  // cores, and the dense W[n, k] for the dequantize-then-cuBLAS path of large M.
  m.def("gemm_a16(Tensor x, Tensor qweight, Tensor scales, int n, int k, int group_shift) -> Tensor");
  m.def("dequantize_a16(Tensor qweight, Tensor scales, int n, int k, int group_shift) -> Tensor");
  // Per-token symmetric bipolar quantization: x fp16/bf16 [M, K] -> (planes int32 [a_bits, M, ceil(K/32)]
  // in the checkpoint bit-plane layout, scales fp32 [M]).
  m.def("quantize_activations(Tensor x, int a_bits) -> (Tensor, Tensor)");
  // The same into code bytes in gemm_int8's slot order: (codes uint8 [M, K rounded up to 128], scales fp32 [M],
  // group sums int32 [G, M4]) for groups of 2^group_shift channels (30: one per row).
  m.def("quantize_activations_int8(Tensor x, int a_bits, int group_shift) -> (Tensor, Tensor, Tensor)");
  // y[M, N] = a_scales[m] * (sum_g (s[n,g] * J[m,n,g] + z[n,g] * S[m,g]) + col_bias[n]) on binary tensor
  // cores (mma .b1 AND.popc): a_planes int32 [q, M, W], a_scales fp32 [M], a_sums int32 [G, M4]
  // (binary_group_sums), qweight int32 [p, N, W], sz fp32 [G, N2, 2] and col_bias fp32 [N] (prepared from
  // the weights), group_size -1 or a multiple of 128.
  m.def("gemm_binary(Tensor a_planes, Tensor a_scales, Tensor a_sums, Tensor qweight, Tensor sz, Tensor col_bias, "
        "int k, int group_size, ScalarType out_dtype) -> Tensor");
  // The same product on int8 tensor cores (mma .u8.u8) on the weight-only layout (qweight, scales as for
  // gemm_a16), activations from quantize_activations_int8, col_bias fp32 [n] prepared at load.
  m.def("gemm_int8(Tensor a_codes, Tensor a_scales, Tensor a_sums, Tensor qweight, Tensor scales, Tensor col_bias, "
        "int n, int k, int group_shift, int a_bits) -> Tensor");
  // Per-group code sums of bit planes [bits, R, W] -> int32 [G, R rounded up to 4]
  m.def("binary_group_sums(Tensor planes, int k, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(bipolar_kernels, CUDA, m) {
  m.impl("gemm_a16", &bipolar::gemm_a16);
  m.impl("dequantize_a16", &bipolar::dequantize_a16);
  m.impl("quantize_activations", &bipolar::quantize_activations);
  m.impl("gemm_binary", &bipolar::gemm_binary);
  m.impl("quantize_activations_int8", &bipolar::quantize_activations_int8);
  m.impl("gemm_int8", &bipolar::gemm_int8);
  m.impl("binary_group_sums", &bipolar::binary_group_sums);
}

// The module itself is empty: importing it only loads the shared library, whose static
// initialisers above register the ops under torch.ops.bipolar_kernels. A bare PyInit (the pattern
// of vLLM's csrc/core/registration.h) instead of PYBIND11_MODULE keeps pybind11 and its headers
// out of the build, and uses only the stable C API, so the library could later be built against
// Python's limited API (one wheel for every CPython version).
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C  // set by torch's BuildExtension; the CI compile check has no setup.py
#endif
#define BIPOLAR_CONCAT_(a, b) a##b
#define BIPOLAR_CONCAT(a, b) BIPOLAR_CONCAT_(a, b)
#define BIPOLAR_STR_(a) #a
#define BIPOLAR_STR(a) BIPOLAR_STR_(a)

PyMODINIT_FUNC BIPOLAR_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, BIPOLAR_STR(TORCH_EXTENSION_NAME), nullptr, 0,
                                      nullptr};
  return PyModule_Create(&module);
}
