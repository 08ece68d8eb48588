// Torch op registration for the bipolar CUDA kernels, and the Python module vllm_bipolar._C.
//
// Python.h comes first, as CPython asks of every file that includes it.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

// Schemas: the contract with the Python side (fake/meta implementations are registered there,
// with torch.library.register_fake, so that torch.compile can trace the ops without a GPU).
TORCH_LIBRARY(bipolar_kernels, m) {
  // y[M, N] = x[M, K] @ W^T with W = z + s * v decoded from the checkpoint bit planes
  // (format version 1); x fp16/bf16 [M, K] with contiguous rows, qweight int32 [bits, N, ceil(k/32)],
  // scales / zeros x.dtype [N, G], zeros optional. Returns a new [M, N] tensor of x.dtype.
  m.def("gemm_a16(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int k, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(bipolar_kernels, CUDA, m) {
  m.impl("gemm_a16", &bipolar::gemm_a16);
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
