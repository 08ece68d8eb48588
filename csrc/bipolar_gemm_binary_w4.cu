// Kernels of bipolar_gemm_binary.cuh for 4-bit weights, every activation width 1..8 and both
// MMA k shapes (one file per weight width: parallel compilation).
#define BIPOLAR_GEMM_BINARY_KERNELS
#include "bipolar_gemm_binary.cuh"

BIPOLAR_GEMM_BINARY_INSTANTIATE(4)
