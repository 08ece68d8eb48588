// WpAq bipolar GEMM on int8 tensor cores (mma.sync m16n8k32 .u8.u8, IMMA, sm_80+): the kernel family
// behind bipolar_kernels::gemm_int8 (host side in bipolar_gemm_int8.cu). For large batches of quantized
// activations, one 8-bit MMA takes the place of the p * q one-bit MMAs of bipolar_gemm_binary.cuh, and
// one int32 accumulator the place of its p + q - 1 shift accumulators.
//
// Math: the decomposition of the binary family (DESIGN.md section 2, bipolar_gemm_binary.cuh), with the
// code products summed by the tensor core at once. Activation codes u (0..La), weight codes c (0..Lw),
// bipolar values 2u - La and 2c - Lw; over a group g of K_g real channels
//   I[m,n,g] = sum_k (2u - La)(2c - Lw) = 4 T - 2 Lw PA[m,g] - 2 La PB[n,g] + K_g Lw La,   T = sum_k u c
// with PA / PB the code sums. In the kernel J = 4 T - 2 Lw PA; the column part C = K_g Lw La - 2 La PB is
// summed over the groups at load time into col_bias[n] = sum_g s C; S[m,g] = 2 PA - La K_g; and
//   y[m,n] = s_x[m] * (sum_g (s[n,g] J[m,n,g] + z[n,g] S[m,g]) + col_bias[n]).
//
// Weights: the weight-only kernels' layout (bipolar_gemm_a16.cuh, vllm_bipolar/kernels/a16_layout.py),
// so that a layer keeps one copy of its weights for every batch size: blocks of 16 rows x 64 channels in
// which lane l = 4 g + t holds the codes of rows 8 h + g and channels 16 s + 8 r + 2 t + e (pair p =
// 4 s + 2 h + r, half e), and (s, z) in the activation dtype per group of 2^group_shift channels.
// Each warp turns its lanes' codes straight into the B fragments of mma m16n8k32 (b0: 4 codes of the
// lane's column in channels 0-15 of a 32-channel step, b1: channels 16-31). A k-step s is 16 channels,
// and pairs p0 = 4 s + 2 h, p0 + 1 (r = 0, 1) hold the 4 codes of column 8 h + g in it; they go into
// b as bytes (p0 e0, p0+1 e0, p0 e1, p0+1 e1), the order in which a part word holds them, so the byte
// shuffle is two masks and one shift. What the MMA pairs is the fragment slot, not the channel, so
// the activations are stored with the same permutation (quantize_activations_int8): inside every 16
// channels, slot 4 t + 2 e + r holds channel 8 r + 2 t + e.
//
// Activations: codes as bytes in that slot order, [M, Kp] (Kp = K rounded up to 128, zero padding),
// and PA per (group, row), both from bipolar_kernels::quantize_activations_int8 in one pass over x.
//
// Tiles: a CTA computes 128 x 128 outputs with 8 warps (2 along M x 4 along N, 64 x 32 each: 4 x 4 MMA
// tiles, 64 int32 accumulators + 64 fp32 sums per thread); K advances in stages of 128 channels (two
// layout blocks), so a group (2^group_shift >= 128 channels) is a whole number of stages and closes at
// a stage's end. Per stage, shared memory holds A (128 rows x 128 code bytes, XOR-swizzled for
// ldmatrix), the 8 x 2 layout blocks of the 128 columns, the stage group's (s, z) of the 128 columns and
// PA of the 128 rows; a kPipe-deep cp.async ring of stages, one barrier per stage.
//
// Files: this header holds the template (over weight bits P); bipolar_gemm_int8_w<P>.cu instantiate it
// per weight width (parallel compilation), each defining launch_int8_w<P>.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tensor_core_utils.cuh"  // DType, cp.async / ldmatrix wrappers, store_elem

namespace bipolar {
namespace int8 {

struct Problem {
  const uint8_t* a;        // activation codes [M, Kp], slot order above
  const float* a_scales;   // [M] per-token scales s_x
  const int* a_sums;       // PA, int32 [G, a_sums_stride]
  int a_sums_stride;       // M rounded up to 4
  const float* col_bias;   // [N] sum_g s C (vllm_bipolar/kernels/cuda_gemm_a16.py, int8_col_bias)
  const uint32_t* qweight; // weight-only layout [Np / 16, KB, 32 * P] (KB = K rounded up to 64, / 64)
  const void* scales;      // (s, z) [Gp, Np, 2], fp16 / bf16 (`dtype`)
  void* out;               // [M, N] of `dtype`
  int M, N, K, Kp, KB, Np;
  int group_stages;        // 128-channel stages per group (all stages when group_size == -1)
  int group_bits;          // channels per group (K when one group per row)
  int la;                  // 2^q - 1
  bool magic;              // every |J| < 2^22: exact conversion by a magic add (as in the binary family)
  DType dtype;             // kHalf / kBFloat16: the dtype of scales and out
};

constexpr int kStageK = 128;  // channels (= A bytes, = weight bits) per stage
constexpr int kBM = 128, kBN = 128, kThreads = 256;

// Dynamic shared memory of the kernel for weight width p: 3-4 stages, at most 99 KiB (what Ada allows a
// CTA; A100 and H100 allow more).
constexpr int stage_bytes(int p) { return kBM * kStageK + p * kBN * 16 + kBN * 4 + kBM * 4; }
constexpr int pipe_depth(int p) { return 4 * stage_bytes(p) <= 99 * 1024 ? 4 : 3; }
constexpr int smem_bytes(int p) { return pipe_depth(p) * stage_bytes(p); }

#define BIPOLAR_INT8_DECLARE(P) void launch_int8_w##P(const Problem& p, cudaStream_t stream);
BIPOLAR_INT8_DECLARE(1)
BIPOLAR_INT8_DECLARE(2)
BIPOLAR_INT8_DECLARE(3)
BIPOLAR_INT8_DECLARE(4)
BIPOLAR_INT8_DECLARE(5)
BIPOLAR_INT8_DECLARE(6)
BIPOLAR_INT8_DECLARE(7)
BIPOLAR_INT8_DECLARE(8)
#undef BIPOLAR_INT8_DECLARE

}  // namespace int8
}  // namespace bipolar

#ifdef BIPOLAR_GEMM_INT8_KERNELS  // kernel bodies: only in the per-width files

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bipolar_gemm_a16.cuh"  // the weight layout: a16::num_parts / part_width / part_shift
#include "cuda_launch.cuh"

namespace bipolar {
namespace int8 {

// Shared-memory rows of 128 bytes (A codes, expanded weight bytes) are eight 16-byte chunks, stored at
// chunk ^ (row % 8): ldmatrix reads the same chunk of 8 consecutive rows, which then sit in 8 distinct
// bank quads (conflict-free), and each chunk stays contiguous for cp.async and 16-byte stores.
__device__ __forceinline__ uint32_t swz128(int row, int chunk) { return uint32_t(row * 128 + ((chunk ^ (row & 7)) << 4)); }

// D += A B over 32 channels, codes as unsigned bytes (PTX ISA, mma .m16n8k32 .u8; g = lane / 4,
// t = lane % 4): a0 = A[row g][k 4t..4t+3], a1 = A[row g+8][same], a2 = A[row g][k 16+4t..], a3 =
// A[row g+8][k 16+4t..]; b0 = B[col g][k 4t..4t+3], b1 = B[col g][k 16+4t..]; c0, c1 = C[row g][cols
// 2t, 2t+1], c2, c3 = C[row g+8][cols 2t, 2t+1]. kZero: C = 0 (the first MMA of a group).
template <bool kZero>
__device__ __forceinline__ void imma(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kZero) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\n"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// The B fragment register of column 8 h + g for k-step s (16 channels): bytes (p0 e0, p0+1 e0, p0 e1,
// p0+1 e1) of pairs p0 = 4 s + 2 h and p0 + 1, from the lane's words of one layout block (`words`: the
// 32 * P words of the block are [part][lane][w words]; `lw` points at this lane's first word of part 0's
// run, i.e. the block + l * w0). Per part of width w (bit offset o in the code, its words at 32 o + l w):
// the word holding p0 has it at bit w j0, p0 + 1 at w (j0 + 1), and their e = 1 halves 16 bits up; one
// shift brings p0 to bit 0 (bytes 0 and 2 after the mask), a second brings p0 + 1 to bit 8 (bytes 1, 3).
template <int P, int S, int H>
__device__ __forceinline__ uint32_t b_fragment(const uint32_t* block, int lane) {
  constexpr int kP0 = 4 * S + 2 * H;
  uint32_t frag = 0;
#pragma unroll
  for (int i = 0; i < a16::num_parts(P); ++i) {
    const int w = a16::part_width(P, i), o = a16::part_shift(P, i);
    const int per_word = 16 / w, widx = kP0 / per_word, j0 = kP0 % per_word;
    const uint32_t word = block[32 * o + lane * w + widx];
    const uint32_t m2 = ((1u << w) - 1) * 0x00010001u;
    const uint32_t lo = (word >> (w * j0)) & m2;                        // p0: bytes 0 (e0) and 2 (e1)
    const uint32_t hi = (8 >= w * (j0 + 1) ? word << (8 - w * (j0 + 1)) : word >> (w * (j0 + 1) - 8)) & (m2 << 8);
    frag |= (lo | hi) << o;                                              // p0 + 1: bytes 1 and 3
  }
  return frag;
}

// kMagic: p.magic (a template parameter, so that the epilogue has no select between the two conversions).
template <int P, bool kMagic>
__global__ void __launch_bounds__(kThreads, 1) gemm_int8_kernel(const Problem p) {
  constexpr int kPipe = pipe_depth(P), kStage = stage_bytes(P);
  constexpr int kBlockWords = 32 * P;  // one layout block
  constexpr int kOffW = kBM * kStageK, kOffSz = kOffW + P * kBN * 16, kOffPa = kOffSz + kBN * 4;
  constexpr int WM = 4, WN = 4;  // m16 / n8 tiles per warp
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sbase = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm0 = (warp >> 2) * 64, wn0 = (warp & 3) * 32;  // warp tile origin in the CTA tile
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int stages = p.Kp / kStageK;

  // ---- stage copies (each thread's share, fixed for the whole loop) ----
  // A: 128 rows x 8 chunks, 4 per thread: rows tid / 8 + 32 i, chunk tid % 8.
  // Weights: the 8 column blocks x 2 k blocks of the stage, stored [column block][k block][32 P words]:
  //   each column block's two k blocks are contiguous in global memory (8 P chunks of 16 bytes each).
  // (s, z): 128 columns x 4 bytes = 32 chunks (threads 0..31); PA: 32 chunks of four rows (threads 32..63).
  const int a_chunk = tid & 7, a_row0 = tid >> 3;
  constexpr int kWChunks = kBN / 16 * 2 * kBlockWords / 4;  // 16-byte chunks of a stage's weights
  auto fill = [&](int buf, int st) {
    const uint32_t dst = sbase + uint32_t(buf * kStage);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = a_row0 + 32 * i;
      const bool ok = m0 + row < p.M;
      const uint8_t* src = p.a + (ok ? int64_t(m0 + row) * p.Kp + st * kStageK + a_chunk * 16 : 0);
      cp_async16_s(dst + swz128(row, a_chunk), src, ok);
    }
#pragma unroll
    for (int i = 0; i < (kWChunks + kThreads - 1) / kThreads; ++i) {
      const int c = tid + i * kThreads;
      if (c < kWChunks) {
        constexpr int kPerColBlock = 2 * kBlockWords / 4;  // chunks of one column block's two k blocks
        const int cb = c / kPerColBlock, within = c % kPerColBlock;
        const int kb = 2 * st + within / (kBlockWords / 4);  // its k block (the second may be past KB)
        // rows past Np do not exist (N is rounded up to 64, CTA tiles to 128): zero-fill
        const bool ok = kb < p.KB && n0 + 16 * cb < p.Np;
        const uint32_t* src = p.qweight + (ok ? (int64_t(n0 / 16 + cb) * p.KB + 2 * st) * kBlockWords + within * 4 : 0);
        cp_async16_s(dst + uint32_t(kOffW + c * 16), src, ok);
      }
    }
    const int grp = st / p.group_stages;
    if (tid < kBN / 4) {
      const int col = n0 + 4 * tid;  // 4 columns' (s, z) pairs of 2 x 16 bits
      const bool ok = col < p.Np;
      cp_async16_s(dst + uint32_t(kOffSz + tid * 16),
                   static_cast<const uint8_t*>(p.scales) + (ok ? (int64_t(grp) * p.Np + col) * 4 : 0), ok);
    } else if (tid < kBN / 4 + kBM / 4) {
      const int row = m0 + 4 * (tid - kBN / 4);
      const bool ok = row < p.a_sums_stride;
      cp_async16_s(dst + uint32_t(kOffPa + (tid - kBN / 4) * 16),
                   p.a_sums + (ok ? int64_t(grp) * p.a_sums_stride + row : 0), ok);
    }
  };

  int acc[WM][WN][4];
  float out[WM][WN][4];
#pragma unroll
  for (int mi = 0; mi < WM; ++mi)
#pragma unroll
    for (int ni = 0; ni < WN; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) out[mi][ni][c] = 0.f, acc[mi][ni][c] = 0;

#pragma unroll
  for (int s0 = 0; s0 < kPipe - 1; ++s0) {
    if (s0 < stages) fill(s0, s0);
    cp_async_commit();
  }

  // ldmatrix lanes for A (x4 = rows 0-7 / 8-15 x chunks lo / hi of a 32-channel step): row lane % 16,
  // chunk + lane / 16
  const int a_lrow = lane & 15, a_lhi = lane >> 4;
  constexpr uint32_t kBias = kMagic ? 0x4B400000u : 0u;
  constexpr uint32_t Lw = (1u << P) - 1;

  for (int st = 0; st < stages; ++st) {
    cp_async_wait<kPipe - 2>();  // stage st has landed (this thread's copies)
    __syncthreads();             // ... and everyone's; buffer (st - 1) % kPipe is free again
    if (st + kPipe - 1 < stages) fill((st + kPipe - 1) % kPipe, st + kPipe - 1);
    cp_async_commit();

    const int buf = st % kPipe;
    const uint32_t a_addr = sbase + uint32_t(buf * kStage);
    // this warp's two column blocks (32 columns), k blocks 0 and 1 of the stage
    const uint32_t* wblk = reinterpret_cast<const uint32_t*>(smem + buf * kStage + kOffW) + (wn0 / 16) * 2 * kBlockWords;
    const bool fresh = st % p.group_stages == 0;
#pragma unroll
    for (int kk = 0; kk < kStageK / 32; ++kk) {
      uint32_t af[WM][4], bf[WN][2];
#pragma unroll
      for (int mi = 0; mi < WM; ++mi)
        ldsm_x4(a_addr + swz128(wm0 + mi * 16 + a_lrow, 2 * kk + a_lhi), af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
      // n8 tile ni = 2 cb + h: column block cb of the warp, row half h; k block kk / 2, k-steps 2 (kk % 2) + r
#pragma unroll
      for (int cb = 0; cb < 2; ++cb) {
        const uint32_t* blk = wblk + (cb * 2 + kk / 2) * kBlockWords;
        if (kk % 2 == 0) {
          bf[2 * cb][0] = b_fragment<P, 0, 0>(blk, lane), bf[2 * cb][1] = b_fragment<P, 1, 0>(blk, lane);
          bf[2 * cb + 1][0] = b_fragment<P, 0, 1>(blk, lane), bf[2 * cb + 1][1] = b_fragment<P, 1, 1>(blk, lane);
        } else {
          bf[2 * cb][0] = b_fragment<P, 2, 0>(blk, lane), bf[2 * cb][1] = b_fragment<P, 3, 0>(blk, lane);
          bf[2 * cb + 1][0] = b_fragment<P, 2, 1>(blk, lane), bf[2 * cb + 1][1] = b_fragment<P, 3, 1>(blk, lane);
        }
      }
      if (kk == 0 && fresh) {
#pragma unroll
        for (int mi = 0; mi < WM; ++mi)
#pragma unroll
          for (int ni = 0; ni < WN; ++ni) imma<true>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
      } else {
#pragma unroll
        for (int mi = 0; mi < WM; ++mi)
#pragma unroll
          for (int ni = 0; ni < WN; ++ni) imma<false>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
      }
    }

    // group end: fold T into the fp32 sums (J = 4 T - 2 Lw PA; one magic add or I2F, two FMAs)
    if ((st + 1) % p.group_stages == 0 || st + 1 == stages) {
      const int grp = st / p.group_stages;
      const uint32_t* ssz = reinterpret_cast<const uint32_t*>(smem + buf * kStage + kOffSz) + wn0;
      const int* spa = reinterpret_cast<const int*>(smem + buf * kStage + kOffPa) + wm0;
      const int kg = min(p.K, (grp + 1) * p.group_bits) - grp * p.group_bits;
      float sc[WN][2], zc[WN][2];
#pragma unroll
      for (int ni = 0; ni < WN; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const uint32_t v = ssz[ni * 8 + 2 * t + e];  // (s, z) as two 16-bit floats
          if (p.dtype == DType::kHalf) {
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&v));
            sc[ni][e] = f.x, zc[ni][e] = f.y;
          } else {
            const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
            sc[ni][e] = f.x, zc[ni][e] = f.y;
          }
        }
#pragma unroll
      for (int mi = 0; mi < WM; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t pa = uint32_t(spa[mi * 16 + h * 8 + g]);
          const uint32_t row_term = kBias - 2u * Lw * pa;
          const float srow = float(int(2u * pa - uint32_t(p.la) * uint32_t(kg)));  // S[m, g]
#pragma unroll
          for (int ni = 0; ni < WN; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = h * 2 + e;
              const uint32_t u = 4u * uint32_t(acc[mi][ni][c]) + row_term;  // J (+ magic), mod 2^32
              const float jval = kMagic ? __fsub_rn(__int_as_float(int(u)), 12582912.0f) : float(int(u));
              out[mi][ni][c] = fmaf(sc[ni][e], jval, fmaf(zc[ni][e], srow, out[mi][ni][c]));
            }
        }
    }
  }
  cp_async_wait<0>();

  // y = s_x * (out + col_bias)
  store_scaled_tile(p.out, p.dtype, p.M, p.N, m0 + wm0, n0 + wn0, g, t, out, p.a_scales, p.col_bias);
}

template <int P, bool kMagic>
void launch_magic(const Problem& p, cudaStream_t stream) {
  if (smem_bytes(P) > 48 * 1024) opt_in_shared_memory<gemm_int8_kernel<P, kMagic>>(smem_bytes(P));
  const dim3 grid((p.N + kBN - 1) / kBN, (p.M + kBM - 1) / kBM);
  gemm_int8_kernel<P, kMagic><<<grid, kThreads, smem_bytes(P), stream>>>(p);
}

template <int P>
void launch(const Problem& p, cudaStream_t stream) {
  if (p.magic) launch_magic<P, true>(p, stream);
  else launch_magic<P, false>(p, stream);
}

}  // namespace int8
}  // namespace bipolar

#define BIPOLAR_GEMM_INT8_INSTANTIATE(P)                                                 \
  namespace bipolar {                                                                    \
  namespace int8 {                                                                       \
  void launch_int8_w##P(const Problem& p, cudaStream_t stream) { launch<P>(p, stream); } \
  }                                                                                      \
  }

#endif  // BIPOLAR_GEMM_INT8_KERNELS
