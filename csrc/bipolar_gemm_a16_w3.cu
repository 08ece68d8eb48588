// Kernels of bipolar_gemm_a16.cuh for 3-bit weights (one file per width: parallel compilation).
#define BIPOLAR_GEMM_A16_KERNELS
#include "bipolar_gemm_a16.cuh"

namespace bipolar {
namespace a16 {
BIPOLAR_GEMM_A16_INSTANTIATE(3)
}  // namespace a16
}  // namespace bipolar
