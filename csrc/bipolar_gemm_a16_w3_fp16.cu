// Kernels of bipolar_gemm_a16.cuh for 3-bit weights and fp16 activations (one file per width and
// type: parallel compilation).
#define BIPOLAR_GEMM_A16_KERNELS
#include "bipolar_gemm_a16.cuh"

namespace bipolar {
namespace a16 {
BIPOLAR_GEMM_A16_INSTANTIATE(__half, 3)
}  // namespace a16
}  // namespace bipolar
