// Kernels of bipolar_gemm_int8.cuh for 8-bit weights (one file per weight width: parallel compilation).
#define BIPOLAR_GEMM_INT8_KERNELS
#include "bipolar_gemm_int8.cuh"

BIPOLAR_GEMM_INT8_INSTANTIATE(8)
