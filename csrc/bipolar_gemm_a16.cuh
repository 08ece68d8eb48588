// Weight-only bipolar GEMM kernel family, activations fp16 / bf16 ("a_bits = 16"), decode-sized M.
//
//   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = z[n, g] + s[n, g] * v[n, k],   g = k / group_size
//
// The kernel reads the CHECKPOINT layout of format version 1 (DESIGN.md section 4) as it is, with
// no repacking:
//   qweight  int32 [bits, N, W], W = ceil(K / 32). Bit j of word w of plane p, row n is bit p of the
//            code c of W[n, 32 w + j]; the bipolar value is v = 2 c - L, L = 2^bits - 1.
//            Padding bits past K are 0; this kernel never depends on them (the matching x is 0).
//   scales   [N, G] in the activation dtype; zeros [N, G] or absent (symmetric, z = 0).
//   group_size is -1 (one group per row) or a multiple of 32, so a 32-bit word never straddles two
//   groups: word w belongs to group w / (group_size / 32). The last group may be partial.
//
// Work split (layout choices):
//   * A warp owns R consecutive output rows (R = 2 or 4) and one tile of MT <= 4 activation rows
//     (blockIdx.y). Lane l handles words w = l, l + 32, l + 64, ... of its rows, so for every
//     (plane, row) the warp reads 32 consecutive int32 words = 128 contiguous bytes: coalesced.
//     The loads of U such words per lane (U * R * BITS <= 16) are issued before any is used.
//     Rows are N-major inside a plane, so the R rows of a warp are R neighbouring 128-byte runs.
//   * Weights are streamed once (ld.global.nc.L1::no_allocate); the activation slice of a word
//     (32 elements = 64 bytes per row of x) is read with four 16-byte loads that stay in L1/L2
//     and are shared by the R rows of the warp and by the other warps of the block.
//   * Per word and per row, sum_j x_j v_j = 2 * sum_p 2^p S_p - L * X with S_p = sum of x_j whose
//     bit p is set and X = sum_j x_j. Since sum_p 2^p S_p = sum_j c_j x_j, the kernel gathers the
//     bit planes into codes (bipolar_decode.cuh: ~BITS/4 shifts+LOP3 per element, shared by the
//     four bytes of a word) so that one byte permute makes each code an fp32 number, then one FMA
//     per element and activation row. X (and its per-offset parts) is shared by all rows of the
//     warp. Then acc += s * dot + z * X per word, in fp32.
//   * The R x MT partial sums of each lane are combined by a warp-shuffle butterfly at the end.
//
// No host synchronisation, no allocation beyond the output, launched on the current stream: the
// op can be captured in a CUDA graph.
//
// Files: this header holds the family (templates over element type, weight bits and M tile);
// bipolar_gemm_a16_w<BITS>.cu instantiate one weight width each, so the 48 kernels compile in
// parallel; bipolar_gemm_a16.cu is the torch op (checks, dispatch).
#pragma once

#include "bipolar_decode.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace bipolar {
namespace a16 {

// Arguments of one call, as the op checked them.
struct Problem {
  const void* x;
  const uint32_t* qweight;
  const void* scales;
  const void* zeros;  // nullptr when symmetric
  void* y;
  int M, N, K, W, G, words_per_group, group_shift;
  int64_t ldx;  // elements between rows of x
  bool x_vec;   // x rows 16-byte aligned: vector loads
};

// Launch y = x @ W^T for weight width BITS and element type T (__half or __nv_bfloat16) on
// `stream`; defined when BIPOLAR_GEMM_A16_KERNELS is set (the instantiation files).
template <typename T, int BITS>
void launch(const Problem& p, cudaStream_t stream);

// Largest M one call takes (grid.y = ceil(M / 4) <= 65535).
constexpr int64_t kMaxM = int64_t(65535) * 4;

}  // namespace a16
}  // namespace bipolar

#if defined(BIPOLAR_GEMM_A16_KERNELS)
#include <c10/cuda/CUDAException.h>

namespace bipolar {
namespace a16 {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;  // 128 threads: small blocks keep the tail of N balanced
constexpr int kWordBits = 32;

// ---- element types --------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  // Two consecutive elements packed in one 32-bit word (element 2i in the low half).
  static __device__ __forceinline__ float2 pair_to_float2(uint32_t u) {
    __half2 h;
    memcpy(&h, &u, sizeof(h));
    return __half22float2(h);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  // bf16 is the upper half of an fp32: widening is a shift / mask, exact.
  static __device__ __forceinline__ float2 pair_to_float2(uint32_t u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  }
};

// ---- tiling ---------------------------------------------------------------------------------------
// Compile-time knobs (defaults below; -D overrides exist only for tuning experiments):
//   BIPOLAR_A16_ROWS_SMALL_M  rows per warp at MT <= 2 (default: see R below)
//   BIPOLAR_A16_PLANE_REGS    plane registers per lane for a batch of words (default 16)
// Register pressure decides speed here: with larger batches ptxas rematerialises addresses and
// constants (PLANE_REGS = 32 measured 8% slower at M = 1, W4, and 30% slower at M = 4).
// M tiles stop at 4: at MT = 16 the unrolled kernel (200+ registers, 2 warps per scheduler)
// stalled on instruction fetch and took 527 us at M = 16 (W4, N = 11008, K = 4096; H100),
// against 175 us for four MT = 4 tiles.
template <int BITS, int MT>
struct Tile {
  // Rows per warp: more rows share each activation load, its fp32 conversion and its sums X, but
  // every row costs BITS plane registers per word in flight and MT accumulators. Measured on H100
  // (N = 11008, K = 4096, g128, M = 1): 4 rows take W4 from 19.9 to 16.6 us, W1/W2 gain nothing
  // more, W8 loses (24.3 -> 25.1 us); 1 row is slower everywhere (W4 23.1 us).
  static constexpr int kRowsDefault = ((BITS <= 4 && MT == 1) || (BITS <= 2 && MT <= 4)) ? 4 : 2;
#if defined(BIPOLAR_A16_ROWS_SMALL_M)
  static constexpr int R = MT <= 2 ? BIPOLAR_A16_ROWS_SMALL_M : kRowsDefault;
#else
  static constexpr int R = kRowsDefault;
#endif
  // Residues per decode family (bipolar_decode.cuh): 4 cuts the decode's shifts to 1/4 for the
  // price of 4 partial activation sums per activation row.
  static constexpr int kSpanMax = 4;
  static constexpr int SPAN = BITS <= 7 ? ((8 - BITS) < kSpanMax ? (8 - BITS) : kSpanMax) : 1;
  // Independent FMA chains per (activation row, weight row): at MT <= 2 there are too few chains
  // to hide the FMA latency, so even and odd 8-element chunks accumulate separately.
  static constexpr int NC = MT <= 2 ? 2 : 1;
  // Words per lane whose loads are issued together (1..4): up to kPlaneRegs plane registers.
#if defined(BIPOLAR_A16_PLANE_REGS)
  static constexpr int kPlaneRegs = BIPOLAR_A16_PLANE_REGS;
#else
  static constexpr int kPlaneRegs = 16;
#endif
  static_assert(MT <= 4, "M tiles of at most 4 (see above)");
  static constexpr int U = kPlaneRegs / (R * BITS) < 1 ? 1 : (kPlaneRegs / (R * BITS) > 4 ? 4 : kPlaneRegs / (R * BITS));
  static_assert(MT * R <= kWarpSize, "one output per lane at the final store");
};

// ---- memory -------------------------------------------------------------------------------------
// Weight planes are read exactly once: keep them out of L1 so the activations stay there.
// volatile: the compiler must not speculate the load out of its bounds check (ptxas still
// schedules it freely).
__device__ __forceinline__ uint32_t load_stream(const uint32_t* ptr) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.b32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}

// Eight consecutive activations x[0..7] as fp32. `fast`: the 8 elements are in bounds and 16-byte
// aligned (one vector load). Otherwise element-wise, with elements at or past `valid` read as 0:
// this is what makes the padding bits of the last word irrelevant.
template <typename T>
__device__ __forceinline__ void load_x8(const T* ptr, bool fast, int valid, float (&xv)[8]) {
  if (fast) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(ptr));
    const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = Elem<T>::pair_to_float2(words[i]);
      xv[2 * i] = f.x;
      xv[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) xv[i] = i < valid ? Elem<T>::to_float(ptr[i]) : 0.f;
  }
}

// ---- kernel ---------------------------------------------------------------------------------------
template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock, 1)
    gemm_a16_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight,
                    const T* __restrict__ scales, const T* __restrict__ zeros, T* __restrict__ y,
                    int M, int N, int K, int64_t ldx, int W, int G, int words_per_group, int group_shift,
                    bool x_vec) {
  using Cfg = Tile<BITS, MT>;
  using Dec = PlaneDecoder<BITS, Cfg::SPAN>;
  constexpr int R = Cfg::R;
  constexpr int NC = Cfg::NC;
  constexpr int NO = Dec::kOffsets;
  constexpr int U = Cfg::U;

  const int lane = threadIdx.x % kWarpSize;
  const int n0 = (blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize) * R;
  if (n0 >= N) return;  // whole warp: no barriers follow
  const int m0 = blockIdx.y * MT;
  const int mv = min(MT, M - m0);  // valid activation rows in this tile
  const T* xt = x + m0 * ldx;  // rows of x are ldx elements apart

  // 32-bit element indices (the op checks qweight.numel() and scales.numel() < 2^31): one
  // IMAD.WIDE per load instead of 64-bit pointer arithmetic that ptxas would rematerialise.
  // Rows past N (last warp) are clamped to N - 1: valid memory, never stored.
  const int plane_stride = N * W;

  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  // Group of word w: groups are whole words (group_size % 32 == 0); a shift when the number of
  // words per group is a power of two (the usual 64 / 128 / 256), else a division.
  auto load_word = [&](int w, uint32_t(&pl)[R][BITS], float(&sc)[R], float(&zc)[R]) {
    const int g = group_shift >= 0 ? (w >> group_shift) : (w / words_per_group);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = min(n0 + r, N - 1);
      const int word_index = n * W + w;
#pragma unroll
      for (int p = 0; p < BITS; ++p) pl[r][p] = load_stream(qweight + (p * plane_stride + word_index));
      sc[r] = Elem<T>::to_float(scales[n * G + g]);
      zc[r] = zeros != nullptr ? Elem<T>::to_float(zeros[n * G + g]) : 0.f;
    }
  };

  auto process_word = [&](int w, const uint32_t(&pl)[R][BITS], const float(&sc)[R], const float(&zc)[R]) {
    uint32_t res[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      Dec::residue_words(pl[r], res[r]);
      // Opaque to the optimiser: without this LLVM re-derives each residue word for every chunk
      // (it narrows the word to the byte each permute reads), doubling the decode's LOP3s.
#pragma unroll
      for (int e = 0; e < 8; ++e) asm("" : "+r"(res[r][e]));
    }

    float F[MT][R][NC];  // sum_j x_j f_j per (activation row, weight row), NC chains
    float X[MT][NO];     // sum_j x_j per activation row, split by decode offset o_j (slot)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int o = 0; o < NO; ++o) X[m][o] = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < NC; ++c) F[m][r][c] = 0.f;
    }

    const int k0 = w * kWordBits;
    const bool fast = x_vec && k0 + kWordBits <= K;
    // Elements 8*chunk .. 8*chunk+7 of the word: element 8*chunk + e is byte `chunk` of res[.][e].
#pragma unroll
    for (int chunk = 0; chunk < 4; ++chunk) {
      float f[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < 8; ++e) f[r][e] = Dec::value(res[r][e], e, chunk);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < mv) {
          float xv[8];
          load_x8<T>(xt + m * ldx + k0 + 8 * chunk, fast, K - k0 - 8 * chunk, xv);
#pragma unroll
          for (int e = 0; e < 8; ++e) X[m][Dec::slot(e)] += xv[e];
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int e = 0; e < 8; ++e) F[m][r][chunk % NC] = fmaf(xv[e], f[r][e], F[m][r][chunk % NC]);
        }
      }
    }

    // dot = kScaleF * F - Y - L * X;  acc += s * dot + z * X = s * (kScaleF * F - Y) + (z - s L) * X
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float xs = X[m][0];
      float ys = Dec::kExpBit ? Dec::omega(0) * X[m][0] : 0.f;
#pragma unroll
      for (int o = 1; o < NO; ++o) {
        xs += X[m][o];
        ys = fmaf(Dec::omega(o), X[m][o], ys);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float fs = F[m][r][0];
#pragma unroll
        for (int c = 1; c < NC; ++c) fs += F[m][r][c];
        const float dot2c = Dec::kExpBit ? fs - ys : Dec::kScaleF * fs;  // 2 * sum_j c_j x_j
        acc[m][r] = fmaf(sc[r], dot2c, fmaf(fmaf(-Dec::kL, sc[r], zc[r]), xs, acc[m][r]));
      }
    }
  };

  // Batches of U words per lane (words wb, wb + 32, ..., wb + 32 (U-1)): all their plane loads are
  // issued before the first is used, so U * R * BITS loads per lane are in flight.
  for (int wb = lane; wb < W; wb += kWarpSize * U) {
    uint32_t pl[U][R][BITS];
    float sc[U][R], zc[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (wb + u * kWarpSize < W) load_word(wb + u * kWarpSize, pl[u], sc[u], zc[u]);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (wb + u * kWarpSize < W) process_word(wb + u * kWarpSize, pl[u], sc[u], zc[u]);
  }

  // Butterfly: every lane ends with every sum; lane m*R + r stores (m, r) (one store per lane).
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == m * R + r && m < mv && n0 + r < N) y[size_t(m0 + m) * N + n0 + r] = Elem<T>::from_float(v);
    }
}

template <typename T, int BITS, int MT>
void launch_tile(const Problem& p, cudaStream_t stream) {
  constexpr int rows_per_block = Tile<BITS, MT>::R * kWarpsPerBlock;
  const dim3 grid((p.N + rows_per_block - 1) / rows_per_block, (p.M + MT - 1) / MT);
  gemm_a16_kernel<T, BITS, MT><<<grid, kWarpSize * kWarpsPerBlock, 0, stream>>>(
      static_cast<const T*>(p.x), p.qweight, static_cast<const T*>(p.scales),
      static_cast<const T*>(p.zeros), static_cast<T*>(p.y), p.M, p.N, p.K, p.ldx, p.W, p.G,
      p.words_per_group, p.group_shift, p.x_vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T, int BITS>
void launch(const Problem& p, cudaStream_t stream) {
  // Activation-row tile: the smallest of 1, 2, 4 that covers M; larger M loops over tiles of 4
  // (grid.y; the tiles re-read the weights, mostly from L2): correct for any M, fast for M <= 4.
  if (p.M <= 1) launch_tile<T, BITS, 1>(p, stream);
  else if (p.M <= 2) launch_tile<T, BITS, 2>(p, stream);
  else launch_tile<T, BITS, 4>(p, stream);
}

// Explicit instantiation of one weight width for both element types.
#define BIPOLAR_GEMM_A16_INSTANTIATE(BITS)                                                \
  template void launch<__half, BITS>(const Problem& p, cudaStream_t stream);              \
  template void launch<__nv_bfloat16, BITS>(const Problem& p, cudaStream_t stream);

}  // namespace a16
}  // namespace bipolar
#endif  // BIPOLAR_GEMM_A16_KERNELS
