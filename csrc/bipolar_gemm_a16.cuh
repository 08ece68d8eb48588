// Weight-only bipolar GEMM kernel family (activations fp16 / bf16, "a_bits = 16") on tensor cores:
//
//   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = z[n, g] + s[n, g] * (2 c[n, k] - L),   L = 2^bits - 1
//
// Weights are expanded from their codes c to fp16 / bf16 in registers, directly in the B-operand
// fragment of mma.sync.m16n8k16 (sm_80+: A100, L4/L40, H100), so they travel HBM -> shared memory
// -> registers exactly once, as bits. Two kernel templates cover decode (M = 1..16) and medium
// batches; the op (bipolar_gemm_a16.cu) sends large M to the dequantize kernel + cuBLAS instead.
//
// ---- Repacked layout (private to this family; built at load by vllm_bipolar/kernels/a16_layout.py,
// which holds the authoritative description and a pure-torch decoder used by the tests) -----------
// qweight int32 [Np / 16, Kp / 64, 32 * bits]   Np = N rounded up to 64, Kp = K rounded up to 64.
//   One "block" = 16 output rows x 64 input channels = 1024 codes = 32 * bits words, the data of one
//   warp for 4 mma k-steps of two n8 tiles. Inside a block, lane l holds the codes of its own
//   B fragments (mma.sync m16n8k16, .col B): rows n = 8 h + l / 4 (h = 0, 1), channels
//   k = 16 s + 8 r + 2 (l % 4) + e (s = 0..3 k-step, r = 0..1 register, e = 0..1 half of the pair).
//   Its 16 element pairs p = 4 s + 2 h + r become 16 fp16x2 registers.
//   Why bits are split into "parts" of width 8, 4, 2 or 1 (bits = sum of parts, e.g. 7 = 4 + 2 + 1,
//   8 is one part of 8): a part of width w holds 16 / w pairs per 32-bit word with pair j at bits
//   [w j, w j + w) (element e = 0) and [16 + w j, ...) (e = 1), so one shift and one LOP3 move a
//   pair's part into both halves of a fp16x2 at once, next to the exponent bits (Marlin's trick).
//   Words: [part][lane][w words of the part]: lane l reads its w words of a part as one 4w-byte
//   shared-memory load, consecutive lanes consecutive addresses (no bank conflicts).
// scales x.dtype [Gp, Np, 2]: (s, z) per (group, row) (z = 0 when symmetric): W = z + s (2c - L);
//   Gp groups of 2^group_shift channels (group sizes that are not powers of two are
//   expanded to their largest power-of-two divisor at load; group_size -1 is group_shift 30).
//   Padding rows / groups have s = z = 0; padding channels meet zero-filled activations: never matter.
//
// ---- Work split ---------------------------------------------------------------------------------
// Two GEMM kernels read the layout:
// * gemv_a16_kernel (M <= 16, decode): weights stream from HBM straight into registers, two chunks
//   per warp in flight, no shared memory or barrier in the main loop; one LOP3 per code pair (the
//   scales are applied after the mma, in fp32, once per scale group); a CTA owns 32 output columns
//   and its 2-16 warps split K into contiguous runs; x rows sit in shared memory (or come from L1/L2
//   when too large).
// * gemm_mid_a16_kernel (M 9..16 on wide layers, see use_decode_kernel; 17..A16_FUSED_MAX_M): 8 warps
//   split 128 output columns and walk K together; a cp.async pipeline of 128-channel stages brings x,
//   the weight blocks and their (s, z) rows into shared memory; each decoded fragment serves up to 8
//   mma of 8 tokens; K is split over CTAs when there are few column tiles (fp32 partial sums in a
//   workspace).
// Beyond, the op dequantizes (dequantize_a16_kernel) and calls cuBLAS (vllm_bipolar/ops.py).
//
// No host synchronisation, launched on the current stream: the op can be captured in a CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace bipolar {
namespace a16 {

constexpr int kBlockN = 16;  // rows of a layout block
constexpr int kBlockK = 64;  // channels of a layout block
constexpr int kPadN = 64;    // Np: N rounded up to the widest CTA tile
constexpr int kNoGroups = 30;  // group_shift for group_size -1

// Arguments of one call, as the op checked them.
struct Problem {
  const void* x;          // [M, K] rows ldx apart (nullptr for dequantize)
  const uint32_t* qweight;  // [Np/16, Kp/64, 32 bits]
  const void* scales;     // [Gp, Np, 2]
  void* y;                // [M, N] (gemm) or [N, K] (dequantize)
  int M, N, K, Np, Kp, Gp, group_shift;
  int64_t ldx;
  // mid-batch kernel (M > kDecodeMaxM) only: K is split into runs of kb_per_split layout blocks; with
  // more than one run, every run adds its fp32 partial sums into `partial` [M, N] (zeroed), not y.
  float* partial;
  int kb_per_split;
  int sms;  // multiprocessors of the device (decode kernel: warps per CTA)
  int smem_optin;  // largest dynamic shared memory of a CTA on the device (opt-in)
  // decode kernel: launched with programmatic dependent launch (sm_90+, BIPOLAR_PDL not 0): it may start
  // while the previous kernel of the stream finishes, requests its first weights and waits
  // (griddepcontrol.wait) before it reads x
  bool pdl;
  // largest M of the decode kernel when BIPOLAR_A16_DECODE_MAX_M sets it (0, 8 or 16); -1: the rule of
  // use_decode_kernel
  int decode_max_m;
  // largest chunk of the decode kernel in layout blocks (use_two_block_chunks): 2, or 1 when
  // BIPOLAR_A16_DECODE_CHUNK=1 (for tuning)
  int decode_chunk_max;
  // warps per decode CTA when BIPOLAR_A16_DECODE_WARPS sets it (2, 4, 8, 16 or 32, for tuning); 0: the
  // rule of launch_decode_tile
  int decode_warps;
  // decode kernel at M = 1: fold only the even tokens' accumulators (fold_group); false when
  // BIPOLAR_A16_ONE_TOKEN_FOLD=0 (for A/B timing)
  bool one_token_fold;
};

// Largest M of the decode kernel; above it the mid-batch kernel, whose K split the op sets up
// (gemm_a16_kb_per_split) since a split needs a workspace.
constexpr int kDecodeMaxM = 16;
// Decode kernel or mid-batch kernel. M <= 8: decode. M 9..16: decode on layers narrower than 8192
// outputs, mid-batch kernel on wider ones, where the decode kernel's 16-token CTAs (16 warps per SM)
// need several waves. Measured on an H100 at M = 16, W4 (benchmarks/results/kernels_mid_h100.json):
// 4096 x 4096 decode 9.3 / mid 12.4 us, 4096 x 11008 19.4 / 20.8, 11008 x 4096 22.7 / 20.3,
// 22016 x 4096 42.8 / 34.3.
inline bool use_decode_kernel(int M, int N, int decode_max_m) {
  if (decode_max_m >= 0) return M <= decode_max_m;
  return M <= 8 || (M <= kDecodeMaxM && N < 8192);
}

// Mid-batch kernel tiles: output columns per CTA, layout blocks per pipeline stage, tokens per M-tile.
constexpr int kMidTileN = 128;
constexpr int kMidStageBlocks = 2;
inline int mid_tile_tokens(int M) { return M <= 16 ? 16 : (M <= 32 ? 32 : 64); }
// Shared memory of one pipeline stage: the x tile (MT x 128 channels), the 8 warps' weight blocks and
// their (s, z) words of up to 4 scale rows. Stages: as many as keep two CTAs on an SM (up to 4).
constexpr int mid_stage_bytes(int bits, int mt) {
  return mt * kMidStageBlocks * kBlockK * 2 + 8 * kMidStageBlocks * 32 * bits * 4 + 8 * (kMidStageBlocks * kBlockK / 32) * kBlockN * 4;
}
constexpr int mid_stages(int bits, int mt) {
  const int fit = 112 * 1024 / mid_stage_bytes(bits, mt);
  return fit > 4 ? 4 : (fit < 2 ? 2 : fit);
}
// CTAs of the mid-batch kernel an SM holds by registers (its launch bounds): 16-token tiles use about 80
// registers a thread, 32- and 64-token tiles up to 128.
constexpr int mid_ctas_per_sm(int mt) { return mt == 16 ? 3 : 2; }
constexpr int mid_smem_bytes(int bits, int mt) { return mid_stages(bits, mt) * mid_stage_bytes(bits, mt); }
// Layout blocks per K run of the mid-batch kernel for this problem on a GPU of `sms` SMs: the split
// (runs of whole stages) with the least time counted in waves of CTAs x blocks per run (plus a
// prologue / epilogue of about two blocks per CTA, and two for the workspace a split needs).
inline int gemm_a16_kb_per_split(int M, int Np, int Kp, int sms, int bits) {
  const int kblocks = Kp / kBlockK;
  const int mt = mid_tile_tokens(M);
  const int tiles = ((Np + kMidTileN - 1) / kMidTileN) * ((M + mt - 1) / mt);
  // CTAs an SM holds: by registers and by shared memory
  const int by_smem = (228 * 1024) / (mid_smem_bytes(bits, mt) + 1024);
  const int per_sm = std::max(1, std::min(mid_ctas_per_sm(mt), by_smem));
  const int64_t slots = int64_t(sms) * per_sm;
  int best = kblocks;
  int64_t best_cost = -1;
  for (int splits = 1; splits <= kblocks; ++splits) {
    int per = (kblocks + splits - 1) / splits;
    per = (per + kMidStageBlocks - 1) / kMidStageBlocks * kMidStageBlocks;
    const int real = (kblocks + per - 1) / per;
    if (real != splits) continue;  // same split as a smaller count
    const int64_t waves = (int64_t(tiles) * real + slots - 1) / slots;
    const int64_t cost = waves * (per + 2) + (real > 1 ? 2 : 0);
    if (best_cost < 0 || cost < best_cost) best_cost = cost, best = per;
  }
  return best < kblocks ? best : kblocks;
}

// y = x @ W^T for weight width BITS and element type T (__half or __nv_bfloat16) on `stream`.
template <typename T, int BITS>
void launch_gemm(const Problem& p, cudaStream_t stream);
// y[N, K] = W (dense, T).
template <typename T, int BITS>
void launch_dequantize(const Problem& p, cudaStream_t stream);

// Largest M one gemm call takes: the mid-batch kernel runs ceil(M / 64) M-tiles on grid.z (<= 65535);
// kept at 16 rows per tile, with room to spare; the workspace is M x N fp32.
constexpr int64_t kMaxM = int64_t(65535) * 16;

// ---- bit parts of the layout (also read by the int8 WpAq kernels, bipolar_gemm_int8.cuh) ---------------
__host__ __device__ constexpr int num_parts(int bits) {
  return bits == 8 ? 1 : ((bits >> 2) & 1) + ((bits >> 1) & 1) + (bits & 1);
}
// Width of part i (widest first); its bit offset in the code equals its word offset in the lane.
__host__ __device__ constexpr int part_width(int bits, int i) {
  if (bits == 8) return 8;
  int seen = 0;
  for (int w = 4; w >= 1; w >>= 1)
    if (bits & w) {
      if (seen == i) return w;
      ++seen;
    }
  return 0;
}
__host__ __device__ constexpr int part_shift(int bits, int i) {
  int s = 0;
  for (int j = 0; j < i; ++j) s += part_width(bits, j);
  return s;
}

}  // namespace a16
}  // namespace bipolar

#if defined(BIPOLAR_GEMM_A16_KERNELS)
#include <c10/cuda/CUDAException.h>

#include "cuda_launch.cuh"

namespace bipolar {
namespace a16 {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarpSize * kWarps;
constexpr int kStages = 4;

// ---- element types --------------------------------------------------------------------------------
// Bits of the integer v (|v| < 2^16, exactly representable) in a 16-bit float with `mant` mantissa
// bits and exponent bias `bias`, in both halves of a word: a compile-time constant for the decode.
constexpr uint32_t encode_integer(int v, int mant, int bias) {
  const uint32_t sign = v < 0 ? 0x8000u : 0u;
  const uint32_t a = uint32_t(v < 0 ? -v : v);
  int e = 0;
  while ((a >> (e + 1)) != 0) ++e;
  const uint32_t frac = e <= mant ? (a - (1u << e)) << (mant - e) : (a - (1u << e)) >> (e - mant);
  const uint32_t h = a == 0 ? 0u : sign | (uint32_t(e + bias) << mant) | frac;
  return h | (h << 16);
}

// mma.sync m16n8k16 with fp32 accumulators on elements of PTX type TY (inside Elem<T>, which supplies
// the type): mma (d += a b), mma_zero (d = a b, C = 0: the first mma of a scale group in the decode
// kernel, so that no register is reset) and mma(..., zero), one of the two (`zero` a constant where
// the decode kernel calls it).
#define BIPOLAR_MMA_M16N8K16(TY)                                                                            \
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "       \
                 "{%8,%9}, {%0,%1,%2,%3};\n"                                                               \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                          \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                          \
  }                                                                                                         \
  static __device__ __forceinline__ void mma_zero(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,      \
                                                  uint32_t b1) {                                            \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "       \
                 "{%8,%9}, {%10,%10,%10,%10};\n"                                                           \
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                          \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));                 \
  }                                                                                                         \
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, \
                                             bool zero) {                                                   \
    if (zero) mma_zero(d, a, b0, b1);                                                                       \
    else mma(d, a, b0, b1);                                                                                 \
  }

template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  using T2 = __half2;
  // 0x6400 is 1024.0: with a code c < 1024 in the mantissa the half is 1024 + c, exactly.
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr int kMantissa = 10;
  // fp16 bits of +-2^e (exact powers of two), both halves: compile-time constants (the intrinsic
  // conversions are inline asm, which ptxas cannot fold).
  static constexpr uint32_t pow2(int e, bool negative) {
    const uint32_t h = (negative ? 0x8000u : 0u) | (uint32_t(e + 15) << 10);
    return h | (h << 16);
  }
  static constexpr uint32_t integer(int v) { return encode_integer(v, 10, 15); }
  static __device__ __forceinline__ T2 magic() { return __halves2half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400)); }
  static __device__ __forceinline__ T2 fma2(T2 a, T2 b, T2 c) { return __hfma2(a, b, c); }
  static __device__ __forceinline__ T2 sub2(T2 a, T2 b) { return __hsub2(a, b); }
  static __device__ __forceinline__ T2 floats2(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ __half from_float(float a) { return __float2half_rn(a); }
  BIPOLAR_MMA_M16N8K16("f16")
};

template <>
struct Elem<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  // 0x4300 is 128.0 with 7 mantissa bits: 128 + c exact for c < 128 (bits <= 7; 8 bits go through fp32).
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr int kMantissa = 7;
  static constexpr uint32_t pow2(int e, bool negative) {  // bf16 bits of +-2^e, both halves
    const uint32_t h = (negative ? 0x8000u : 0u) | (uint32_t(e + 127) << 7);
    return h | (h << 16);
  }
  static constexpr uint32_t integer(int v) { return encode_integer(v, 7, 127); }
  static __device__ __forceinline__ T2 magic() {
    return __halves2bfloat162(__ushort_as_bfloat16(0x4300), __ushort_as_bfloat16(0x4300));
  }
  static __device__ __forceinline__ T2 fma2(T2 a, T2 b, T2 c) { return __hfma2(a, b, c); }
  static __device__ __forceinline__ T2 sub2(T2 a, T2 b) { return __hsub2(a, b); }
  static __device__ __forceinline__ T2 floats2(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float a) { return __float2bfloat16_rn(a); }
  BIPOLAR_MMA_M16N8K16("bf16")
};
#undef BIPOLAR_MMA_M16N8K16

template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T2>
__device__ __forceinline__ T2 from_u32(uint32_t u) {
  return *reinterpret_cast<T2*>(&u);
}

// (a & mask) | bits in one LOP3. Written out because ptxas splits the C expression into two LOP3 when
// mask and bits are both immediates (a SASS LOP3 takes one); here they become registers set once.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
  return d;
}

// ---- code extraction shared by both decodes -------------------------------------------------------------
// bf16 with 8-bit codes: the magic trick's 128 + c needs more than bf16's 8 significant bits, so a pair's
// two codes go through fp32 (2^23 + c in the mantissa, minus 2^23: exact).
template <int P>
__device__ __forceinline__ void code8_pair_as_floats(const uint32_t (&words)[8], float& c0, float& c1) {
  const uint32_t w = words[P / 2];
  const uint32_t t = (P % 2) ? (w >> 8) : w;
  c0 = __uint_as_float(0x4B000000u | (t & 0xffu)) - 8388608.f;
  c1 = __uint_as_float(0x4B000000u | ((t >> 16) & 0xffu)) - 8388608.f;
}

// Codes of several parts (3, 5, 6, 7 bits): each part of pair P moved to mantissa bit AT plus its bit
// offset in the code (SHF + LOP3 per part, both halves at once) and OR-ed into t.
template <int BITS, int P, int AT>
__device__ __forceinline__ uint32_t assemble_parts(const uint32_t (&words)[BITS], uint32_t t) {
#pragma unroll
  for (int i = 0; i < num_parts(BITS); ++i) {
    const int w = part_width(BITS, i);
    const int sh = part_shift(BITS, i);
    const int at = AT + sh;
    const int per_word = 16 / w;
    const uint32_t word = words[sh + P / per_word];
    const int from = w * (P % per_word);  // bit of the pair's element 0 in the word
    const uint32_t moved = from >= at ? word >> (from - at) : word << (at - from);
    const uint32_t mask = ((1u << w) - 1u) << at;
    t = and_or(moved, mask | (mask << 16), t);  // one LOP3: t | (moved & mask)
  }
  return t;
}

// ---- decode: one element pair -> z + s v as a T2 ------------------------------------------------------
// `words`: the lane's BITS words of one layout block; `ss` / `zz`: (s, s) and (z, z) of the row. The
// pair index P is a constant after unrolling, so every shift amount, mask and constant is an
// immediate. The code c becomes the exact value v = 2c - L in fp16 / bf16 (|v| <= 255 fits), and one
// FMA gives z + s v rounded once: the same number as dequantizing in float and rounding.
template <typename T, int BITS, int P>
__device__ __forceinline__ uint32_t decode_pair(const uint32_t (&words)[BITS], uint32_t ss, uint32_t zz) {
  using E = Elem<T>;
  using T2 = typename E::T2;
  constexpr int kL = (1 << BITS) - 1;
  if constexpr (BITS == 8 && std::is_same<T, __nv_bfloat16>::value) {
    // bf16, 8 bits: v up to 255 does not fit bf16's 8 significant bits; go through fp32.
    float c0, c1;
    code8_pair_as_floats<P>(words, c0, c1);
    const float v0 = 2.f * c0 - float(kL), v1 = 2.f * c1 - float(kL);
    const float2 sf = __bfloat1622float2(from_u32<T2>(ss)), zf = __bfloat1622float2(from_u32<T2>(zz));
    return as_u32(E::floats2(fmaf(v0, sf.x, zf.x), fmaf(v1, sf.y, zf.y)));
  } else if constexpr (num_parts(BITS) == 1) {
    // One part (1, 2, 4 or 8 bits): the code stays at mantissa position u in 1..kUMax (u >= 1 keeps
    // the constant below exact), reached with the shift amounts the pairs of a word share (ptxas
    // keeps one SHF per distinct amount): t = magic + c 2^u, so v = t 2^(1-u) - (2^(m+1-u) + L) is
    // one exact FMA.
    constexpr int kUMax = E::kMantissa - BITS;
    static_assert(kUMax >= 1, "code must fit under the magic's exponent");
    constexpr int kPerWord = 16 / BITS;
    constexpr int kFrom = BITS * (P % kPerWord);
    constexpr int kU = 1 + (kFrom + kUMax - 1) % kUMax;
    constexpr int kShift = kFrom - kU;  // -1 for the pair at bit 0
    constexpr uint32_t kMask = ((1u << BITS) - 1u) << kU;
    const uint32_t word = words[P / kPerWord];
    const uint32_t moved = kShift >= 0 ? word >> kShift : word << (-kShift);
    const uint32_t t = and_or(moved, kMask | (kMask << 16), E::kMagic);
    const T2 v = E::fma2(from_u32<T2>(t), from_u32<T2>(E::pow2(1 - kU, false)),
                         from_u32<T2>(E::integer(-((1 << (E::kMantissa + 1 - kU)) + kL))));
    return as_u32(E::fma2(v, from_u32<T2>(ss), from_u32<T2>(zz)));
  } else {
    // Several parts (3, 5, 6, 7 bits): the code assembled at the bottom of the mantissa.
    const uint32_t t = assemble_parts<BITS, P, 0>(words, E::kMagic);
    // t = magic + c (exact); c = t - magic; v = 2 c - L (exact); z + s v (one rounding).
    const T2 c = E::sub2(from_u32<T2>(t), E::magic());
    const T2 v = E::fma2(c, from_u32<T2>(E::integer(2)), from_u32<T2>(E::integer(-kL)));
    return as_u32(E::fma2(v, from_u32<T2>(ss), from_u32<T2>(zz)));
  }
}

// ---- decode kernel: one element pair -> beta + c, exact (scales applied after the mma) -------------------
// The decode kernel multiplies by s and adds z in fp32 after the mma, once per scale group, so a weight
// only has to reach the tensor core as its code c. One LOP3 puts a pair's code bits (both halves) into
// the mantissa of a constant 2^e, at bit position u with e = mantissa bits - u: the fp16 / bf16 value is
// then beta + c with beta = 2^e, exact. The kernel removes sum(beta x) with one more mma per k-step
// whose A registers are the constant betas (bias_a). Two rules fix u per pair P = 4 s + 2 h + r:
//  * the pairs of the two row halves (h = 0, 1) with the same channels get the same u, hence the same
//    beta: one bias row pattern serves all 16 rows, and the bias mma's rows 8-15 are free for the sum of
//    x (ones), which the offsets need;
//  * u in [kULo, kUMax], kULo chosen so that beta is at most 2^6 (fp16) / 2^7 (bf16) times the code's
//    unit: taking sum(beta x) back out of the fp32 accumulator costs at most 6-7 of its 24 bits;
//    within that window, the h = 0 pairs of a word are assigned in order of their bit position to
//    windows [S + kULo, S + kUMax] of a shift S, so the word needs few distinct shifts (pairs sharing
//    one shift cost one LOP3 each): 1-bit fp16 four shifts per 16 pairs, 2-bit three per 8, 4-bit three
//    per 4.
// Codes of several parts (3, 5, 6, 7 bits) are assembled at the top of the mantissa (u = kUMax, beta =
// 2^bits). bf16 with 8-bit codes has no room (7 mantissa bits): c goes through fp32 (exact), beta = 0.
template <typename T, int BITS>
struct RawCode {
  using E = Elem<T>;
  static constexpr bool kViaFloat = BITS == 8 && std::is_same<T, __nv_bfloat16>::value;
  static constexpr bool kOnePart = num_parts(BITS) == 1;
  static constexpr int kUMax = E::kMantissa - BITS;
  static constexpr int kUWant = E::kMantissa - (E::kMantissa == 10 ? 6 : 7);
  static constexpr int kULo = kUWant < 0 ? 0 : (kUWant > kUMax ? kUMax : kUWant);
  static constexpr int kPerWord = 16 / BITS;  // one-part codes: pairs per word
  static constexpr int from(int P) { return BITS * (P % kPerWord); }  // bit of element 0 in its word
  // shift S of the window that holds the h = 0 pair at bit `from0`, walking the h = 0 pairs' positions
  // upwards (with 2 pairs per word, every position is one)
  static constexpr int window_shift(int from0) {
    int S = 0;
    bool open = false;
    for (int f = 0; f < kPerWord; ++f) {
      if (kPerWord > 2 && (f & 2)) continue;  // an h = 1 pair
      const int fr = BITS * f;
      if (!open || fr - S > kUMax) S = fr - kULo, open = true;
      if (fr == from0) return S;
    }
    return 0;
  }
  static constexpr int u(int P) { return kOnePart ? from(P & ~2) - window_shift(from(P & ~2)) : kUMax; }
  // bits of beta (both halves): 0 when the code goes through fp32
  static constexpr uint32_t beta(int P) { return kViaFloat ? 0u : E::pow2(E::kMantissa - u(P), false); }
};

template <typename T, int BITS, int P>
__device__ __forceinline__ uint32_t decode_raw_pair(const uint32_t (&words)[BITS]) {
  using R = RawCode<T, BITS>;
  if constexpr (R::kViaFloat) {
    float c0, c1;
    code8_pair_as_floats<P>(words, c0, c1);
    return as_u32(Elem<T>::floats2(c0, c1));
  } else if constexpr (R::kOnePart) {
    constexpr int kU = R::u(P);
    static_assert(kU >= 0 && kU <= R::kUMax, "code must fit in the mantissa");
    constexpr int kShift = R::from(P) - kU;
    constexpr uint32_t kMask = ((1u << BITS) - 1u) << kU;
    const uint32_t word = words[P / R::kPerWord];
    const uint32_t moved = kShift >= 0 ? word >> kShift : word << (-kShift);
    return and_or(moved, kMask | (kMask << 16), R::beta(P));
  } else {
    return assemble_parts<BITS, P, R::kUMax>(words, R::beta(P));  // the code at the top of the mantissa
  }
}

// (s, s) and (z, z) from the (s, z) word of a row.
__device__ __forceinline__ void split_sz(uint32_t sz, uint32_t& ss, uint32_t& zz) {
  ss = __byte_perm(sz, 0, 0x1010);
  zz = __byte_perm(sz, 0, 0x3232);
}

// The two B registers of mma k-step s and row half h of a layout block: pairs 4 s + 2 h and
// 4 s + 2 h + 1. s and h are constants after unrolling, so the branches fold to one decode each.
template <typename T, int BITS>
__device__ __forceinline__ void decode_b(int s, int h, const uint32_t (&words)[BITS], uint32_t sv, uint32_t zv,
                                         uint32_t& b0, uint32_t& b1) {
#define BIPOLAR_DECODE_CASE(S, H)                                \
  if (s == S && h == H) {                                        \
    b0 = decode_pair<T, BITS, 4 * S + 2 * H + 0>(words, sv, zv); \
    b1 = decode_pair<T, BITS, 4 * S + 2 * H + 1>(words, sv, zv); \
  }
  BIPOLAR_DECODE_CASE(0, 0) BIPOLAR_DECODE_CASE(0, 1) BIPOLAR_DECODE_CASE(1, 0) BIPOLAR_DECODE_CASE(1, 1)
  BIPOLAR_DECODE_CASE(2, 0) BIPOLAR_DECODE_CASE(2, 1) BIPOLAR_DECODE_CASE(3, 0) BIPOLAR_DECODE_CASE(3, 1)
#undef BIPOLAR_DECODE_CASE
}

// Output elements n and n + 1 (n even) of a row of N: one 4-byte store when both exist and are aligned.
template <typename T, typename T2>
__device__ __forceinline__ void store_pair(T* dst, T2 pair, int n, int N) {
  if (n + 1 < N && (N % 2) == 0) {
    *reinterpret_cast<T2*>(dst) = pair;
  } else {
    dst[0] = pair.x;
    if (n + 1 < N) dst[1] = pair.y;
  }
}

// ---- memory ---------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy global -> shared; src_bytes = 0 writes zeros (rows past M, channels past K).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Streaming loads of a part's w words (read once: not kept in L1).
template <int W>
__device__ __forceinline__ void ldg_stream(const uint32_t* src, uint32_t* dst) {
  if constexpr (W == 1) {
    asm volatile("ld.global.nc.L1::no_allocate.b32 %0, [%1];\n" : "=r"(dst[0]) : "l"(src));
  } else if constexpr (W == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.b32 {%0, %1}, [%2];\n" : "=r"(dst[0]), "=r"(dst[1]) : "l"(src));
  } else {
#pragma unroll
    for (int i = 0; i < W / 4; ++i)
      asm volatile("ld.global.nc.L1::no_allocate.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(dst[4 * i]), "=r"(dst[4 * i + 1]), "=r"(dst[4 * i + 2]), "=r"(dst[4 * i + 3])
                   : "l"(src + 4 * i));
  }
}

// W words of a part from shared memory (the layout's 4w-byte pieces: one vector load).
template <int W>
__device__ __forceinline__ void lds_words(const uint32_t* src, uint32_t* dst) {
  if constexpr (W == 1) {
    dst[0] = src[0];
  } else if constexpr (W == 2) {
    const uint2 q = *reinterpret_cast<const uint2*>(src);
    dst[0] = q.x, dst[1] = q.y;
  } else {
#pragma unroll
    for (int i = 0; i < W / 4; ++i) {
      const uint4 q = reinterpret_cast<const uint4*>(src)[i];
      dst[4 * i] = q.x, dst[4 * i + 1] = q.y, dst[4 * i + 2] = q.z, dst[4 * i + 3] = q.w;
    }
  }
}

// A lane's BITS words of one layout block (part by part: [part][lane][w words]): streamed from HBM, or
// (SHARED) read from a copy of the block in shared memory.
template <int BITS, bool SHARED = false>
__device__ __forceinline__ void read_block(const uint32_t* blk, int lane, uint32_t (&words)[BITS]) {
  auto load = [&](auto width, int sh) {
    constexpr int w = decltype(width)::value;
    if constexpr (SHARED) lds_words<w>(blk + sh * 32 + lane * w, &words[sh]);
    else ldg_stream<w>(blk + sh * 32 + lane * w, &words[sh]);
  };
#pragma unroll
  for (int i = 0; i < num_parts(BITS); ++i) {
    const int w = part_width(BITS, i), sh = part_shift(BITS, i);
    if (w == 8) load(std::integral_constant<int, 8>{}, sh);
    else if (w == 4) load(std::integral_constant<int, 4>{}, sh);
    else if (w == 2) load(std::integral_constant<int, 2>{}, sh);
    else load(std::integral_constant<int, 1>{}, sh);
  }
}

// x tile in shared memory: row m holds SK channels as SK / 8 chunks of 16 bytes; chunk c is stored at
// c ^ (m % 8) so that ldmatrix's 8 row addresses (same c, 8 consecutive m) hit 8 different bank
// groups (rows are a multiple of 128 bytes apart, which would otherwise be an 8-way conflict).
__device__ __forceinline__ int swizzle(int m, int c) { return c ^ (m & 7); }

// ---- the mid-batch kernel (M 9..128, use_decode_kernel and ops.A16_FUSED_MAX_M) ------------------------
// Roles as in the decode kernel below (mma computes y^T = W x^T: decoded weights are A, tokens B), but
// with many tokens the x rows no longer fit in shared memory whole and every byte of x a CTA reads is
// paid once per CTA: so here the 8 warps of a CTA split N, not K. Each warp owns one 16-row layout
// block row (the CTA 128 output columns); all warps walk the same K range in lockstep over stages of
// 128 channels. A cp.async pipeline of kStages stages brings each stage's x tile, weight blocks and
// (s, z) rows into shared memory, so every load is requested kStages - 1 stages before it is used
// and no warp waits on one load at a time (weights streamed straight into registers, two blocks in
// flight per warp, left this kernel bound by HBM latency: 45 us at M = 64 on 11008 x 4096 whatever
// the bit width).
// * x: row-major, 16-byte chunks XOR-swizzled by row so that ldmatrix's 8 row addresses hit 8
//   different bank groups.
// * weights: each warp's blocks as they lie in HBM ([part][lane][w words] per block), so a lane reads
//   its part words with one 4w-byte load and consecutive lanes hit consecutive banks.
// * (s, z): the warp's 16 words of each scale row the stage touches (up to 4 at group size 32).
// One decoded A fragment feeds TG mma (8 tokens each): the decode is paid once per weight and M-tile.
// M > 8 TG runs more M-tiles (grid.z; the weights come again, from L2). Few column tiles (N = 4096:
// 32) would leave most SMs idle, so K is split over grid.y: the splits add fp32 partial sums into a
// zeroed workspace (red.global.add), which the op converts to the output dtype.
template <int BITS, int TG_>
struct MidConfig {
  static constexpr int TG = TG_;         // token groups of 8 per M-tile
  static constexpr int MT = 8 * TG_;     // tokens per M-tile
  static constexpr int WARPS = 8;
  static constexpr int NT = kBlockN * WARPS;  // output columns per CTA
  static constexpr int kThreads = kWarpSize * WARPS;
  static constexpr int kStageBlocks = kMidStageBlocks;  // layout blocks (64 channels) per stage
  static constexpr int SK = kBlockK * kStageBlocks;
  static constexpr int kXBytes = MT * SK * 2;
  static constexpr int kWarpWWords = kStageBlocks * 32 * BITS;  // one warp's weight words of a stage
  static constexpr int kWBytes = WARPS * kWarpWWords * 4;
  static constexpr int kSRows = SK / 32;  // most scale rows a stage touches (group size 32)
  static constexpr int kSBytes = WARPS * kSRows * kBlockN * 4;
  static constexpr int kStageBytes = kXBytes + kWBytes + kSBytes;
  static constexpr int kStages = mid_stages(BITS, MT);
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static constexpr int kMinBlocks = mid_ctas_per_sm(MT);  // CTAs per SM (gemm_a16_kb_per_split counts them)
  static_assert(kSmemBytes == mid_smem_bytes(BITS, MT), "the op's K split counts this shared memory");
  static_assert(NT == kMidTileN && (MT == 16 || MT == 32 || MT == 64), "the op's K split (gemm_a16_kb_per_split) assumes these tiles");
};

template <typename T, int BITS, class C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) gemm_mid_a16_kernel(Problem p) {
  using E = Elem<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int g = lane / 4;
  const int nb = blockIdx.x * C::WARPS + warp;  // this warp's 16-row layout block row
  const bool active = nb < p.Np / kBlockN;       // the last CTA may reach past Np (warp-uniform)
  const int kblocks = p.Kp / kBlockK;
  const int kb_lo = blockIdx.y * p.kb_per_split;
  const int kb_hi = min(kblocks, kb_lo + p.kb_per_split);
  const int nstages = (kb_hi - kb_lo + C::kStageBlocks - 1) / C::kStageBlocks;
  const int m0 = blockIdx.z * C::MT;
  const int mv = min(C::MT, p.M - m0);  // tokens of this M-tile
  constexpr int kBlockWords = 32 * BITS;
  const T* x = static_cast<const T*>(p.x);
  const uint32_t* wrow = p.qweight + size_t(active ? nb : 0) * kblocks * kBlockWords;
  const uint32_t* scales = static_cast<const uint32_t*>(p.scales) + (active ? nb : 0) * kBlockN;
  // scale rows of a stage: one per group the stage's channels touch (stages start on group boundaries
  // or inside a group, so the first is the group of the stage's first channel)
  const int srows = p.group_shift >= 7 ? 1 : (C::SK >> p.group_shift);
  auto stage_x = [&](int buf) { return reinterpret_cast<T*>(smem + buf * C::kStageBytes); };
  auto stage_w = [&](int buf) {
    return reinterpret_cast<uint32_t*>(smem + buf * C::kStageBytes + C::kXBytes) + warp * C::kWarpWWords;
  };
  auto stage_s = [&](int buf) {
    return reinterpret_cast<uint32_t*>(smem + buf * C::kStageBytes + C::kXBytes + C::kWBytes) +
           warp * C::kSRows * kBlockN;
  };

  // Stage `st` (blocks kb_lo + kStageBlocks st ...) into buffer `buf`. The last stage of a split may be
  // shorter; x channels past K are zero-filled; x rows past the tile's tokens are not loaded (they only
  // reach output columns that are never stored). Every address below is a per-thread constant plus a
  // per-stage offset: the first version's general loops cost more instructions than the mma.
  constexpr int kRowChunks = C::SK / 8;                  // 16-byte chunks of an x row in a stage
  constexpr int kRowsPerPass = C::kThreads / kRowChunks;  // x rows one pass of the CTA's threads covers
  static_assert(C::MT % kRowsPerPass == 0, "whole passes");
  const int xc = tid % kRowChunks, xr = tid / kRowChunks;
  const T* xsrc = x + int64_t(m0 + xr) * p.ldx + 8 * xc;
  const int64_t xstep = int64_t(kRowsPerPass) * p.ldx;
  // swizzle(m, xc) with m = xr + kRowsPerPass i depends on m % 8 = xr % 8 only (kRowsPerPass % 8 == 0)
  const int xdst = (xr * kRowChunks + swizzle(xr, xc)) * 8;
  constexpr int kWChunks = 8 * BITS;  // 16-byte chunks of one layout block
  auto load_stage = [&](int st, int buf) {
    const int kb0 = kb_lo + st * C::kStageBlocks;
    const int nblk = min(C::kStageBlocks, kb_hi - kb0);
    T* xs = stage_x(buf) + xdst;
    const int k = kb0 * kBlockK + 8 * xc;
    const bool kin = k < (kb0 + nblk) * kBlockK;  // a chunk of the stage's blocks
    const bool kok = k < p.K;
#pragma unroll
    for (int i = 0; i < C::MT / kRowsPerPass; ++i)
      if (kin && xr + kRowsPerPass * i < mv)
        cp_async16(xs + i * kRowsPerPass * kRowChunks * 8, kok ? xsrc + i * xstep + kb0 * kBlockK : x, kok ? 16 : 0);
    if (!active) return;  // warp-uniform
    // weights: the warp's nblk blocks, contiguous in HBM
    uint32_t* ws = stage_w(buf);
    const uint32_t* wsrc = wrow + size_t(kb0) * kBlockWords;
#pragma unroll
    for (int i = 0; i < (C::kStageBlocks * kWChunks + kWarpSize - 1) / kWarpSize; ++i) {
      const int c = lane + kWarpSize * i;
      if (c < nblk * kWChunks) cp_async16(ws + 4 * c, wsrc + 4 * c, 16);
    }
    // (s, z): the warp's 16 words (4 chunks) of each scale row
    if (lane < 4 * srows) {
      const int r = lane / 4;
      const int grp = min(((kb0 * kBlockK) >> p.group_shift) + r, p.Gp - 1);
      cp_async16(stage_s(buf) + 16 * r + 4 * (lane % 4), scales + size_t(grp) * p.Np + 4 * (lane % 4), 16);
    }
  };

  float acc[C::TG][4];
#pragma unroll
  for (int q = 0; q < C::TG; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[q][e] = 0.f;

  // ldmatrix.x4 row address of this lane for token group q: row 8 q + lane % 8, chunk 4 sp + lane / 8 of
  // a block (matrices 0-3 = channels 0-7, 8-15 of k-step 2 sp, then of k-step 2 sp + 1). Rows past the
  // tile's tokens hold stale data: they only reach output columns (tokens) that are never stored.
  // The swizzle depends on the row only through lane % 8, so token group q is a constant offset.
  const uint32_t lane_row = (lane % 8) * (C::SK / 8);
  constexpr uint32_t kGroupBytes = 8 * (C::SK / 8) * 16;

  // One stage: its blocks one after the other. The ncu profile of the first version (ldmatrix then its
  // two mma, per token group) showed the warps waiting on each ldmatrix and on each mma's accumulator
  // (16 warps per SM are too few to hide that). So the next block's weight words and (s, z) are read
  // while this one computes, a k-step pair's TG ldmatrix are issued before its mma, and consecutive mma
  // go to different accumulators.
  auto load_block = [&](int buf, int j, int kb, int g0, uint32_t (&words)[BITS], uint32_t (&ss)[4], uint32_t (&zz)[4]) {
    read_block<BITS, true>(stage_w(buf) + j * kBlockWords, lane, words);
    // (s, z) of channel halves 0-31 / 32-63 of the block, rows g (h = 0) and g + 8 (h = 1): [2 half + h]
    const uint32_t* ss_row = stage_s(buf) + g;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = ((kb * kBlockK + 32 * half) >> p.group_shift) - g0;
#pragma unroll
      for (int h = 0; h < 2; ++h) split_sz(ss_row[16 * r + 8 * h], ss[2 * half + h], zz[2 * half + h]);
    }
  };
  auto compute_stage = [&](int st, int buf) {
    if (!active) return;  // warp-uniform; the warp still takes part in the barriers
    const int kb0 = kb_lo + st * C::kStageBlocks;
    const int g0 = (kb0 * kBlockK) >> p.group_shift;
    const uint32_t xbase = smem_addr(stage_x(buf)) + lane_row * 16;
    uint32_t words[2][BITS], ss[2][4], zz[2][4];
    load_block(buf, 0, kb0, g0, words[0], ss[0], zz[0]);
#pragma unroll
    for (int j = 0; j < C::kStageBlocks; ++j) {
      const int kb = kb0 + j;
      if (kb >= kb_hi) break;  // CTA-uniform
      if (j + 1 < C::kStageBlocks && kb + 1 < kb_hi) load_block(buf, j + 1, kb + 1, g0, words[(j + 1) % 2], ss[(j + 1) % 2], zz[(j + 1) % 2]);
      const uint32_t(&w)[BITS] = words[j % 2];
#pragma unroll
      for (int sp = 0; sp < 2; ++sp) {
        const uint32_t base = xbase + swizzle(lane, 8 * j + 4 * sp + lane / 8) * 16;
        uint32_t b[C::TG][4];
#pragma unroll
        for (int q = 0; q < C::TG; ++q)
          asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                       : "=r"(b[q][0]), "=r"(b[q][1]), "=r"(b[q][2]), "=r"(b[q][3]) : "r"(base + q * kGroupBytes));
        // A fragments of k-steps 2 sp + u (rows 0-7: h = 0 -> a0 / a2, rows 8-15: h = 1 -> a1 / a3)
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          uint32_t a[4];
          decode_b<T, BITS>(2 * sp + u, 0, w, ss[j % 2][2 * sp], zz[j % 2][2 * sp], a[0], a[2]);
          decode_b<T, BITS>(2 * sp + u, 1, w, ss[j % 2][2 * sp + 1], zz[j % 2][2 * sp + 1], a[1], a[3]);
#pragma unroll
          for (int q = 0; q < C::TG; ++q) E::mma(acc[q], a, b[q][2 * u], b[q][2 * u + 1]);
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < nstages) load_stage(s, s);
    cp_async_commit();
  }
  for (int st = 0; st < nstages; ++st) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // stage st visible to all; buffer (st - 1) % kStages free again
    if (st + C::kStages - 1 < nstages) load_stage(st + C::kStages - 1, (st + C::kStages - 1) % C::kStages);
    cp_async_commit();
    compute_stage(st, st % C::kStages);
  }
  cp_async_wait<0>();

  // C fragment (rows = output columns, columns = tokens): d0, d1 = column nb 16 + g, tokens 2 t + {0, 1};
  // d2, d3 = column + 8.
  if (!active) return;
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int q = 0; q < C::TG; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 8 * q + 2 * (lane % 4) + (e % 2);
      const int n = nb * kBlockN + g + 8 * (e / 2);
      if (m >= mv || n >= p.N) continue;
      const size_t i = size_t(m0 + m) * p.N + n;
      if (p.partial != nullptr) atomicAdd(p.partial + i, acc[q][e]);  // compiles to RED.ADD.F32
      else y[i] = E::from_float(acc[q][e]);
    }
}

// ---- the decode kernel (M <= 16) ------------------------------------------------------------------
// At decode the weights are everything: 1 to 16 activation rows meet every weight exactly once, so
// this kernel keeps weights out of shared memory and away from barriers, and spends as few
// instructions per weight as it can. Each warp streams its layout blocks from HBM straight into
// registers, D blocks at a time (two chunks in flight), turns each pair of codes into beta + c with
// one LOP3 (decode_raw_pair: no scale, no offset) and issues mma. A CTA owns NT = 16 NB output columns
// across all of K; its WARPS warps split K into contiguous runs of layout blocks and sum their
// partial tiles through shared memory once, at the end.
// Roles swapped against the larger-M kernel: the mma computes y^T = W x^T, the 16 decoded weight rows
// of a layout block are the A operand (the layout's two n8 B fragments are exactly the four A
// registers) and 8 tokens are the B operand. At M <= 8 no tensor-core row is padding and no zero
// registers travel through the loop; M 9..16 (MT = 16) issues one mma per 8 tokens.
// Scales after the mma: with t = beta + c, W = z + s (2 c - L) and, over one scale group of a row,
//   sum_k W x = s (2 sum t x - u) + z sum x,   u = 2 sum beta x + L sum x (the same for every row).
// sum t x accumulates in fp32 (tsum) over the warp's blocks of the group; one more mma per k-step,
// shared by the NB block rows, gets sum beta x (rows 0-7, A = the constant betas) and sum x (rows
// 8-15, A = ones) into bsum; at the group's end (or the run's) three FFMA per output fold them into
// acc. So W is used exactly (not rounded to fp16 / bf16 first), and the fold runs once per group and
// warp, not once per weight pair.
template <int BITS, int MT_, int WARPS_, int D_ = 1, int NB_ = 2, int GC_ = (D_ == 2 ? 1 : 0)>
struct DecodeConfig {
  static constexpr int MT = MT_;
  static constexpr int TG = MT_ / 8;  // groups of 8 tokens: the mma's N
  static constexpr int NB = NB_;
  static constexpr int WARPS = WARPS_;
  static constexpr int NT = kBlockN * NB_;
  static constexpr int kThreads = kWarpSize * WARPS_;
  // layout blocks per warp and chunk (two chunks in registers: one decoded while the next loads), chosen
  // by use_two_block_chunks; a chunk of D > 1 blocks lies inside one scale group (one (s, z) word per
  // row), so that its scale words take no more registers than a one-block chunk's.
  static constexpr int D = D_;
  static_assert(D_ == 1 || D_ == 2, "chunks of 1 or 2 blocks");
  // chunks per scale group when the launch knows it (launch_decode_chunks), else 0: every warp's run then
  // starts on a group and each group is 1 chunk (two-block chunks: they run only with 128-channel
  // groups) or 2 (one-block chunks, 128-channel groups, runs of an even number of blocks). The group's
  // first mma then start from a zero C operand and its fold comes at its last chunk's end, with no
  // test or register reset in the loop (0: tests per block, and resets).
  static constexpr int kGroupChunks = GC_;
  static_assert(GC_ == 0 || GC_ * D_ == 2, "known groups are 128 channels");
  // partial tiles of the final sum, [WARPS][MT][NT + 4]: the + 4 spreads the 4 lanes that share an
  // output row (t = 0..3, tokens 2 t, 2 t + 1) over different banks
  static constexpr int kRedStride = NT + 4;
  static constexpr int kSmemBytes = WARPS_ * MT_ * kRedStride * 4;
  // 24 warps per SM (<= 80 registers a thread): the loads in flight are what keeps HBM busy. 16
  // tokens (twice the B fragments and accumulators) and 5-8 bit weights (their two chunks alone are
  // 4 BITS registers) need more registers: 16 warps. launch_decode_tile sizes the CTAs by this.
  // A CTA of 32 warps (8 tokens, 1, 2 or 4 bits: decode_warps32_bits) fills an SM alone: 1024
  // threads, 64 registers a thread.
  static constexpr int kThreadsPerSm = WARPS_ == 32 ? 1024 : ((MT_ == 16 || BITS >= 5) ? 512 : 768);
  static constexpr int kMinBlocks = kThreadsPerSm / kThreads > 0 ? kThreadsPerSm / kThreads : 1;
  static_assert(MT_ == 8 || MT_ == 16, "decode tiles are 8 or 16 tokens");
  static_assert(kSmemBytes <= 48 * 1024, "no opt-in needed");
};

// The decode kernel's fold of one scale group (gemv_a16_kernel): per output
//   acc += s (2 tsum - u) + z sum x,   u = 2 sum beta x + L sum x (per token: shared by every row),
// three FFMA per output, and s, z straight from their fp16 / bf16 pair (forming 2 s and z - L s per row
// instead cost two more instructions per row and group). `reset` (a literal at every call site, so the
// branch folds away): then tsum and bsum start the next group at zero (else the next group's first mma
// starts from a zero C operand: DecodeConfig::kGroupChunks).
// STEP 2 (one token) folds only the elements of even tokens (e = 0, 2: token 2 t, token 0 in the lanes
// that store it): the odd ones hold copies of token 0 (every B column reads row 0 when M = 1) that are
// never stored, so they may keep accumulating, and a third of the fold's instructions go.
template <int STEP, int NB, int TG>
__device__ __forceinline__ void fold_group(float (&acc)[NB][TG][4], float (&tsum)[NB][TG][4], float (&bsum)[TG][4],
                                           const float (&s)[NB][2], const float (&z)[NB][2], float L, bool reset) {
  float u[TG][2];
#pragma unroll
  for (int q = 0; q < TG; ++q)
#pragma unroll
    for (int e = 0; e < 2; e += STEP) u[q][e] = fmaf(L, bsum[q][2 + e], bsum[q][e] + bsum[q][e]);
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int q = 0; q < TG; ++q)
#pragma unroll
      for (int e = 0; e < 4; e += STEP) {
        const int h = e / 2;
        acc[b][q][e] = fmaf(s[b][h], fmaf(2.f, tsum[b][q][e], -u[q][e % 2]), fmaf(z[b][h], bsum[q][2 + e % 2], acc[b][q][e]));
        if (reset) tsum[b][q][e] = 0.f;
      }
  if (reset) {
#pragma unroll
    for (int q = 0; q < TG; ++q)
#pragma unroll
      for (int e = 0; e < 4; e += STEP) bsum[q][e] = 0.f;
  }
}

// Programmatic dependent launch (sm_90+): wait for the previous kernel of the stream (its memory
// visible) / let the next one start its prologue. No-ops when the kernel was launched without PDL.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// x in shared memory (X_SMEM), per token row, in mma order: the B fragment of k-step s of a 64-channel
// block is x words kw + t and kw + 4 + t (kw = 32 kb + 8 s, t = lane % 4), i.e. word 4 j + t of the
// block for j = 0..7; they are stored at 8 t + j, so a lane's eight words of a block are two 16-byte
// loads. Rows are Kp / 2 + 4 words apart: the two token rows of a quarter warp's 16-byte loads start
// 4 banks apart (conflict-free); at M = 1 every lane reads row 0 (a broadcast).
__device__ __forceinline__ int x_smem_word(int w) { return (w & ~31) | ((w & 3) << 3) | ((w >> 2) & 7); }

// X_SMEM: the CTA first copies its x rows (M x Kp, zero-filled past K) into shared memory in the order
// above; otherwise (x too large: many rows of a long K) the fragments come from global memory (L1 / L2).
template <typename T, int BITS, class C, bool X_SMEM>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks) gemv_a16_kernel(Problem p) {
  using E = Elem<T>;
  using T2 = typename E::T2;
  using R = RawCode<T, BITS>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: A row / B column g, k pair t
  const int nb0 = blockIdx.x * C::NB;    // first 16-row layout block of the CTA
  const int kblocks = p.Kp / kBlockK;
  constexpr int kBlockWords = 32 * BITS;
  constexpr int D = C::D;
  constexpr int NB = C::NB;
  constexpr int TG = C::TG;
  constexpr float kL = float((1 << BITS) - 1);
  const int row_words = kblocks * kBlockWords;  // one 16-row block row across all of K (< 2^31 words)
  const uint32_t* scales = static_cast<const uint32_t*>(p.scales) + nb0 * kBlockN + g;  // (s, z) words
  const T* x = static_cast<const T*>(p.x);
  constexpr int GC = C::kGroupChunks;
  // group size 32: a 64-channel block has two scale rows (never with known groups, which are 128 wide)
  const bool two_groups = GC == 0 && p.group_shift < 6;
  // This warp's run of layout blocks [kb_begin, kb_end): contiguous, so that a scale group's blocks
  // are folded once. The launch (use_two_block_chunks) picks D = 2 only when D divides per_warp and the
  // group's blocks, so every chunk starts on a multiple of D and lies inside one scale group.
  const int per_warp = (kblocks + C::WARPS - 1) / C::WARPS;
  const int kb_begin = min(warp * per_warp, kblocks);
  const int kb_end = min(kb_begin + per_warp, kblocks);
  const uint32_t* wbase = p.qweight + size_t(nb0) * row_words + size_t(kb_begin) * kBlockWords;
  // B columns of this lane: tokens g (and g + 8 when TG = 2). A token past M reads row M - 1 instead:
  // its output column is never stored, so no lane needs a zero row or a predicate.
  int xrow[TG];
#pragma unroll
  for (int q = 0; q < TG; ++q) xrow[q] = min(g + 8 * q, p.M - 1);
  const int xrow_words = p.Kp / 2 + 4;  // shared row stride in words
  const int kpairs = p.K / 2;            // x words of a row
  // acc: the output tile; tsum: sum t x of the group being accumulated, per block row; bsum: sum beta x
  // ([0], [1]: tokens 2 t, 2 t + 1) and sum x ([2], [3]) of that group
  float acc[NB][TG][4], tsum[NB][TG][4], bsum[TG][4];
#pragma unroll
  for (int q = 0; q < TG; ++q) {
#pragma unroll
    for (int e = 0; e < 4; ++e) bsum[q][e] = 0.f;
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[b][q][e] = tsum[b][q][e] = 0.f;
  }

  // A chunk: D consecutive layout blocks of the warp x NB block rows of weight words, and their (s, z)
  // words per row half h (the scale row of channels 0-31 of the chunk: one group).
  using Words = uint32_t[D][NB][BITS];
  using Sz = uint32_t[NB][2];
  // Pointers advanced per chunk: to the next chunk's weights, and (kGroupChunks) to the next group's
  // (s, z) row, moved on after a group's last chunk is requested (`last`: a literal at each call).
  // Recomputing both addresses from kb0 took about a dozen integer instructions a chunk. Not in the
  // 32-warp CTA: at 64 registers the two pointers made W4 spill 40 bytes instead of 16.
  constexpr bool kAdvance = C::WARPS != 32;
  const uint32_t* wnext = wbase;
  const uint32_t* snext = scales + ((kb_begin * kBlockK) >> p.group_shift) * p.Np;
  auto load_chunk = [&](Words& words, Sz& sz, int kb0, bool last) {
    if (kb0 >= kb_end) return;  // warp-uniform
    if constexpr (!kAdvance) wnext = wbase + (kb0 - kb_begin) * kBlockWords;
    const uint32_t* srow = GC != 0 && kAdvance ? snext : scales + ((kb0 * kBlockK) >> p.group_shift) * p.Np;
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h) sz[b][h] = __ldg(srow + b * kBlockN + 8 * h);
#pragma unroll
    for (int j = 0; j < D; ++j) {
      if (kb0 + j < kb_end) {
#pragma unroll
        for (int b = 0; b < NB; ++b) read_block<BITS>(wnext + j * kBlockWords + b * row_words, lane, words[j][b]);
      }
    }
    if constexpr (kAdvance) {
      wnext += D * kBlockWords;
      if (GC != 0 && last) snext += p.Np;
    }
  };
  // The end of a scale group: s and z from the (s, z) words of rows g, g + 8 of each block row, then
  // fold_group (with one token, M = 1, only the even tokens' elements; a warp-uniform branch).
  const bool one_token = TG == 1 && p.M == 1 && p.one_token_fold;
  // reset false only where the next k-step is a chunk's first (kGroupChunks: its mma start from zero)
  // (a literal at every call: the branch on it folds away; a generic lambda here crashed nvcc 13.0)
  auto fold = [&](const uint32_t (&sz)[NB][2], bool reset) {
    float sf[NB][2], zf[NB][2];
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const T2 v = from_u32<T2>(sz[b][h]);
        sf[b][h] = __low2float(v);
        zf[b][h] = __high2float(v);
      }
    if (one_token) fold_group<2>(acc, tsum, bsum, sf, zf, kL, reset);
    else fold_group<1>(acc, tsum, bsum, sf, zf, kL, reset);
  };
  // starts / ends (literals; kGroupChunks only): the chunk starts / ends a scale group
  auto compute_chunk = [&](const Words& words, const Sz& sz, int kb0, bool starts, bool ends) {
#pragma unroll
    for (int j = 0; j < D; ++j) {
      const int kb = kb0 + j;
      if (kb >= kb_end) break;  // warp-uniform
      // B fragments of the block's 4 k-steps per token group: xb[q][2 s + r] = x words 32 kb + 8 s + 4 r + t
      uint32_t xb[TG][8];
#pragma unroll
      for (int q = 0; q < TG; ++q) {
        if constexpr (X_SMEM) {
          // rows are zero-filled up to Kp: no bounds to check
          const uint4* src = reinterpret_cast<const uint4*>(
              reinterpret_cast<const uint32_t*>(smem) + xrow[q] * xrow_words + kb * 32 + 8 * t);
          const uint4 lo = src[0], hi = src[1];
          xb[q][0] = lo.x; xb[q][1] = lo.y; xb[q][2] = lo.z; xb[q][3] = lo.w;
          xb[q][4] = hi.x; xb[q][5] = hi.y; xb[q][6] = hi.z; xb[q][7] = hi.w;
        } else {
          const uint32_t* src = reinterpret_cast<const uint32_t*>(x + int64_t(xrow[q]) * p.ldx) + kb * 32 + t;
#pragma unroll
          for (int i = 0; i < 8; ++i) xb[q][i] = kb * 32 + 4 * i + t < kpairs ? __ldg(src + 4 * i) : 0u;
        }
      }
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        // a group's first k-step: its mma start from zero (the last fold left the previous group's sums)
        const bool zero = starts && j == 0 && s == 0;
        // bias mma: rows 0-7 (a0, a2) the betas of pairs 4 s, 4 s + 1 (those of rows 8-15 are equal),
        // rows 8-15 (a1, a3) ones
        const uint32_t ab[4] = {R::beta(4 * s), E::pow2(0, false), R::beta(4 * s + 1), E::pow2(0, false)};
#pragma unroll
        for (int q = 0; q < TG; ++q) E::mma(bsum[q], ab, xb[q][2 * s], xb[q][2 * s + 1], zero);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          // A of rows 0-7 (h = 0) and 8-15 (h = 1): a0 / a2 = pairs 4 s + 0 / 1, a1 / a3 = pairs 4 s + 2 / 3
          uint32_t a[4];
#define BIPOLAR_RAW_CASE(S)                                       \
  if (s == S) {                                                   \
    a[0] = decode_raw_pair<T, BITS, 4 * S + 0>(words[j][b]);      \
    a[1] = decode_raw_pair<T, BITS, 4 * S + 2>(words[j][b]);      \
    a[2] = decode_raw_pair<T, BITS, 4 * S + 1>(words[j][b]);      \
    a[3] = decode_raw_pair<T, BITS, 4 * S + 3>(words[j][b]);      \
  }
          BIPOLAR_RAW_CASE(0) BIPOLAR_RAW_CASE(1) BIPOLAR_RAW_CASE(2) BIPOLAR_RAW_CASE(3)
#undef BIPOLAR_RAW_CASE
#pragma unroll
          for (int q = 0; q < TG; ++q) E::mma(tsum[b][q], a, xb[q][2 * s], xb[q][2 * s + 1], zero);
        }
        // group size 32: channels 0-31 of the block are a group of their own
        if (s == 1 && two_groups) fold(sz, true);
      }
      if constexpr (GC != 0) continue;  // folded after the group's last chunk
      // The group ends with this block (or the warp's run does): fold. For 32-channel groups, the
      // second half's (s, z) row is the next one, read here (from L2).
      if (two_groups) {
        const uint32_t* srow2 = scales + ((kb * kBlockK + 32) >> p.group_shift) * p.Np;
        uint32_t sz2[NB][2];
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
          for (int h = 0; h < 2; ++h) sz2[b][h] = __ldg(srow2 + b * kBlockN + 8 * h);
        fold(sz2, true);
      } else if (kb + 1 == kb_end || (((kb + 1) * kBlockK) >> p.group_shift) != ((kb * kBlockK) >> p.group_shift)) {
        fold(sz, true);
      }
    }
    // the group ends (a run ends at a group's end too, or after a group's first chunk: below); the next
    // chunk starts from zero
    if (ends) fold(sz, false);
  };

  // Two chunks in registers: the next one's loads are in flight while this one is decoded.
  Words wa, wb;
  Sz sa, sb;
  int kb0 = kb_begin;
  // The first weights are requested while x comes into shared memory and, under PDL (Problem.pdl),
  // before the previous kernel of the stream has finished: weights and scales do not depend on it, x
  // does (griddepcontrol.wait).
  load_chunk(wa, sa, kb0, GC == 1);
  if (p.pdl) grid_dependency_wait();
  if constexpr (X_SMEM) {
    uint32_t* xs = reinterpret_cast<uint32_t*>(smem);
    const int chunks = p.Kp / 8;  // 16-byte pieces of a row (K is a multiple of 8: all in or all out)
    for (int m = 0; m < p.M; ++m)
      for (int c = threadIdx.x; c < chunks; c += C::kThreads) {
        const int w0 = 4 * c;
        const uint4 v = w0 < kpairs ? *reinterpret_cast<const uint4*>(x + int64_t(m) * p.ldx + 2 * w0)
                                    : make_uint4(0, 0, 0, 0);
        uint32_t* row = xs + m * xrow_words;
        row[x_smem_word(w0 + 0)] = v.x;
        row[x_smem_word(w0 + 1)] = v.y;
        row[x_smem_word(w0 + 2)] = v.z;
        row[x_smem_word(w0 + 3)] = v.w;
      }
    __syncthreads();  // x rows visible to every warp
  }
  // With two chunks per group, wa holds the group's first (runs start on a group) and wb its second.
  while (kb0 < kb_end) {
    load_chunk(wb, sb, kb0 + D, GC != 0);
    compute_chunk(wa, sa, kb0, GC != 0, GC == 1);
    kb0 += D;
    if (kb0 >= kb_end) {
      if constexpr (GC == 2) fold(sa, false);  // the last warp's run may end after a group's first block
      break;
    }
    load_chunk(wa, sa, kb0 + D, GC == 1);
    compute_chunk(wb, sb, kb0, GC == 1, GC != 0);
    kb0 += D;
  }
  if (p.pdl) grid_dependents_launch();  // the next kernel may start requesting its weights

  // The warps' partial tiles -> shared memory (after every warp is done with x there) -> summed -> y.
  // C fragment of mma m16n8 (rows = output columns n, columns = tokens m): d0, d1 = row g, tokens
  // 2 t + {0, 1}; d2, d3 = row g + 8.
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);  // [WARPS][MT][kRedStride]
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int q = 0; q < TG; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = 8 * q + 2 * t + (e % 2);
        const int n = b * kBlockN + g + 8 * (e / 2);
        red[(warp * C::MT + m) * C::kRedStride + n] = acc[b][q][e];
      }
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  const int n0 = nb0 * kBlockN;
  for (int i = threadIdx.x; i < C::MT * C::NT / 2; i += C::kThreads) {
    const int m = i / (C::NT / 2), n = 2 * (i % (C::NT / 2));
    if (m >= p.M || n0 + n >= p.N) continue;
    float v0 = 0.f, v1 = 0.f;
#pragma unroll
    for (int w = 0; w < C::WARPS; ++w) {
      v0 += red[(w * C::MT + m) * C::kRedStride + n];
      v1 += red[(w * C::MT + m) * C::kRedStride + n + 1];
    }
    store_pair<T>(y + size_t(m) * p.N + n0 + n, E::floats2(v0, v1), n0 + n, p.N);
  }
}

// ---- dequantize kernel: W[N, K] dense (for large M: dequantize, then cuBLAS) ------------------------
// One warp per kDequantBlocks consecutive layout blocks (16 rows x 64 channels each): it first requests
// all their weight words (one vector load per part, streaming) and (s, z) words (one per row half, two
// with 32-channel groups), then per block decodes its lane's 16 pairs into a shared tile and writes the
// tile as 16 rows of 128 contiguous bytes (full cache lines; storing the pairs straight from the
// fragment order would write 16-byte pieces of 8 rows at a time). (The first version loaded the words
// one 4-byte load at a time and an (s, z) word per pair step, 8 per block, one block per warp: W4 on
// 14336 x 4096 took about 97 us, half the copy bandwidth.)
constexpr int kDequantBlocks = 2;
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequantize_a16_kernel(Problem p) {
  constexpr int kRow = kBlockK + 8;  // padded row (elements): 144 bytes, so the pair writes spread over banks
  __shared__ __align__(16) T tile[kWarps][kBlockN * kRow];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int kblocks = p.Kp / kBlockK;
  const int64_t nblocks = int64_t(p.Np / kBlockN) * kblocks;
  const int64_t blk0 = (int64_t(blockIdx.x) * kWarps + warp) * kDequantBlocks;
  if (blk0 >= nblocks) return;  // whole warp; no block-wide barrier below
  const uint32_t* scales = static_cast<const uint32_t*>(p.scales);
  const bool two_groups = p.group_shift < 6;  // 32-channel groups: channels 0-31 and 32-63 differ
  uint32_t words[kDequantBlocks][BITS];
  uint32_t sz[kDequantBlocks][2][2];  // [block][row half h][channel half]
  int nbs[kDequantBlocks], kbs[kDequantBlocks];  // each block's block row and 64-channel column
#pragma unroll
  for (int b = 0; b < kDequantBlocks; ++b) {
    const int64_t blk = blk0 + b;
    if (blk >= nblocks) break;
    read_block<BITS>(p.qweight + blk * (32 * BITS), lane, words[b]);
    const int nb = nbs[b] = int(blk / kblocks), kb = kbs[b] = int(blk % kblocks);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t* srow = scales + nb * kBlockN + 8 * h + lane / 4;
      sz[b][h][0] = __ldg(srow + size_t((kb * kBlockK) >> p.group_shift) * p.Np);
      sz[b][h][1] = two_groups ? __ldg(srow + size_t((kb * kBlockK + 32) >> p.group_shift) * p.Np) : sz[b][h][0];
    }
  }
  T* t = tile[warp];
  T* w_out = static_cast<T*>(p.y);
  const bool vec = (p.K % 8) == 0;  // rows of W start on 16-byte boundaries
#pragma unroll
  for (int b = 0; b < kDequantBlocks; ++b) {
    if (blk0 + b >= nblocks) break;
    const int nb = nbs[b], kb = kbs[b];
    if (b > 0) __syncwarp();  // the previous block's tile has been written out
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 8 * h + lane / 4;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int kl = 16 * s + 2 * (lane % 4);
        uint32_t aa, bb;
        split_sz(sz[b][h][s / 2], aa, bb);
        uint32_t v0 = 0, v1 = 0;
        decode_b<T, BITS>(s, h, words[b], aa, bb, v0, v1);
        *reinterpret_cast<uint32_t*>(t + r * kRow + kl) = v0;
        *reinterpret_cast<uint32_t*>(t + r * kRow + kl + 8) = v1;
      }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = lane + 32 * i;  // 16-byte chunk: row c / 8, elements 8 (c % 8) ..
      const int r = c / 8, kl = 8 * (c % 8);
      const int n = nb * kBlockN + r, k = kb * kBlockK + kl;
      if (n >= p.N || k >= p.K) continue;
      T* dst = w_out + size_t(n) * p.K + k;
      if (vec) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(t + r * kRow + kl);
      } else {
        for (int e = 0; e < 8 && k + e < p.K; ++e) dst[e] = t[r * kRow + kl + e];
      }
    }
  }
}

template <typename T, int BITS, int TG>
void launch_mid(const Problem& p, cudaStream_t stream) {
  using C = MidConfig<BITS, TG>;
  opt_in_shared_memory<gemm_mid_a16_kernel<T, BITS, C>>(C::kSmemBytes);
  const int splits = (p.Kp / kBlockK + p.kb_per_split - 1) / p.kb_per_split;
  const dim3 grid((p.Np + C::NT - 1) / C::NT, splits, (p.M + C::MT - 1) / C::MT);
  gemm_mid_a16_kernel<T, BITS, C><<<grid, C::kThreads, C::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x rows in shared memory up to this size (launch_decode_tile counts it in the CTAs an SM holds).
constexpr int kDecodeXSmemMax = 64 * 1024;

// Shared memory of the decode kernel's x rows (Kp + 8 elements apart), 0 when they do not fit (x then
// comes from global memory).
inline int decode_x_smem_bytes(const Problem& p) {
  const int bytes = p.M * (p.Kp + 8) * 2;
  return bytes <= kDecodeXSmemMax ? bytes : 0;
}

// A kernel launch on `stream`, with programmatic dependent launch when `pdl` (Problem.pdl: sm_90+).
template <typename Kernel>
void launch_kernel(Kernel kernel, dim3 grid, int threads, int smem, bool pdl, const Problem& p, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

template <typename T, int BITS, class C>
void launch_decode(const Problem& p, cudaStream_t stream) {
  const int x_bytes = decode_x_smem_bytes(p);
  const dim3 grid(p.Np / C::NT);
  // x rows in shared memory when they fit (kDecodeXSmemMax, and the device's opt-in limit: less on Ada).
  // The 32-warp CTA is built only with x in shared memory (from global memory it spills at 64 registers);
  // launch_decode_tile picks it only when x fits.
  constexpr bool kXSmemOnly = C::WARPS == 32;
  if (kXSmemOnly || (x_bytes > 0 && x_bytes <= p.smem_optin)) {
    opt_in_shared_memory<gemv_a16_kernel<T, BITS, C, true>>(std::min(kDecodeXSmemMax, p.smem_optin));
    launch_kernel(gemv_a16_kernel<T, BITS, C, true>, grid, C::kThreads, std::max(x_bytes, C::kSmemBytes), p.pdl, p, stream);
  } else if constexpr (!kXSmemOnly) {
    launch_kernel(gemv_a16_kernel<T, BITS, C, false>, grid, C::kThreads, C::kSmemBytes, p.pdl, p, stream);
  }
}

// Decode CTA: 32 output columns (two 16-row layout blocks: each A fragment serves 4 mma), WARPS warps
// along K. An SM holds DecodeConfig::kThreadsPerSm / 32 warps of this kernel (24 or 16; 32 in one CTA of
// 32 warps, below, on layers of at most one CTA per SM with a long K); else the CTA size is
// the largest of 16, 8, 4, 2 warps with which all Np / 32 CTAs are resident at once (one wave: a second,
// partial wave runs its CTAs' latency chains after the first ones', at low occupancy), counting the x
// rows in shared memory. On an H100 (132 SMs) at M = 1 and 2 bits: N = 4096 16 warps, 11008 8, 22016 4.
// Measured at M = 1 (11008 x 4096, 4096 x 4096, 22016 x 4096 W2 with 2 / 4 / 8 / 16 warps and 16 warps
// per SM, benchmarks/results/kernels_decode_warps_sweep_h100.txt): the time follows the warps resident,
// 15.9 / 11.4 / 12.5 (1.3 waves) / 14.3 us (2 waves) at 11008. BIPOLAR_A16_DECODE_WARPS=2|4|8|16|32
// (Problem::decode_warps) overrides the choice, for tuning (32 only where the 32-warp CTA can run; else 16).
// The 32-warp decode CTA (one per SM, 64 registers a thread): for one-part codes of 1, 2 or 4 bits (3 bits,
// two parts, was 1-9% slower) and runs of at least kDecodeWarps32MinBlocks layout blocks (K >= 8192).
// Measured on an H100 at M = 1 against 16 warps, two interleaved runs each
// (benchmarks/results/kernels_decode_warps32_h100.txt): W1 / W2 6-12% faster on 4096 x 11008,
// 4096 x 14336 and 2048 x 8192, W4 4-6% faster on the last two and within 1% on 4096 x 11008; on
// K = 4096 within -3..+5% (W4 slower), so 16 warps there. (At 64 registers W1 / W2 do not spill; W4 spills 24-40 bytes
// and is still faster where it is used.)
constexpr bool decode_warps32_bits(int bits) { return bits == 1 || bits == 2 || bits == 4; }
constexpr int kDecodeWarps32MinBlocks = 128;
constexpr int kSmemPerSm = 228 * 1024;  // H100 / A100 (less on Ada: then fewer CTAs per SM, still correct)

// Two layout blocks per chunk of the decode kernel at 1 and 2 bits (at 2 bits 16 bytes of weights per lane
// and block row, as one block has at 4 bits; launch_decode_chunks asks only there), else one: one when the
// scale groups are not 128 channels (a chunk is one whole group, DecodeConfig::kGroupChunks), when a warp's run of `per_warp`
// blocks is odd (a longer, rounded-up run would leave the CTA's last warps idle), or when
// BIPOLAR_A16_DECODE_CHUNK=1 (`max_blocks`). Measured on an H100, one build, M = 1 / 8 / 16, W1 / W2, group 128, two runs of
// two-block chunks against one of one-block chunks (kernels_decode_chunks_h100.json): two-block chunks
// 5-11% faster at M = 8 (11008 x 4096 W1 12.6 -> 11.0 us, W2 12.1 -> 11.2; 4096 x 4096 W1 6.4 -> 5.9),
// within noise at M = 1 (11008 x 4096 W2 9.2 / 9.4 us), slower where the runs were rounded up (4096 x
// 11008, 11 blocks per warp: M = 16 W2 17.8 -> 18.7), hence the rule. Four-block chunks at 1 bit
// spilled at 80 registers: not built.
inline bool use_two_block_chunks(int group_shift, int per_warp, int max_blocks) {
  const bool one_group = group_shift == 7;  // 128-channel groups: a chunk is one group (kGroupChunks 1)
  return max_blocks >= 2 && one_group && per_warp % 2 == 0;
}

// One-block chunks with 128-channel groups and runs of an even number of blocks: two chunks per group
// (DecodeConfig::kGroupChunks = 2), else group ends tested per block.
template <typename T, int BITS, int MT, int WARPS>
void launch_decode_chunks(const Problem& p, cudaStream_t stream) {
  const int per_warp = (p.Kp / kBlockK + WARPS - 1) / WARPS;  // as gemv_a16_kernel splits K
  if constexpr (BITS <= 2 && WARPS != 32) {  // (32 warps: two-block chunks spill at 64 registers)
    if (use_two_block_chunks(p.group_shift, per_warp, p.decode_chunk_max))
      return launch_decode<T, BITS, DecodeConfig<BITS, MT, WARPS, 2>>(p, stream);
  }
  if (p.group_shift == 7 && per_warp % 2 == 0)
    return launch_decode<T, BITS, DecodeConfig<BITS, MT, WARPS, 1, 2, 2>>(p, stream);
  launch_decode<T, BITS, DecodeConfig<BITS, MT, WARPS, 1>>(p, stream);
}

template <typename T, int BITS, int MT>
void launch_decode_tile(const Problem& p, cudaStream_t stream) {
  using C16 = DecodeConfig<BITS, MT, 16>;
  const int x_bytes = decode_x_smem_bytes(p);
  // shared memory of a CTA of w warps: x or the partial tiles of the final sum (DecodeConfig::kSmemBytes),
  // + the driver's reserve per CTA
  auto smem_bytes = [&](int w) { return std::max(x_bytes, w * C16::MT * C16::kRedStride * 4) + 1024; };
  // 32 warps: built for 8 tokens at 1, 2 or 4 bits; run with x in shared memory (from global memory it spills)
  constexpr bool kHas32 = MT == 8 && decode_warps32_bits(BITS);
  const bool can32 = kHas32 && x_bytes > 0 && smem_bytes(32) <= p.smem_optin;
  int warps = p.decode_warps;
  if (warps == 0) {
    const int64_t ctas = p.Np / C16::NT;
    int best = 0, best_resident = 0;
    // one 32-warp CTA per SM: layers with at most one 32-column tile per SM (N <= 4224 on an H100) and
    // a long K
    if (can32 && ctas <= p.sms && p.Kp / kBlockK >= kDecodeWarps32MinBlocks) warps = 32;
    for (int w = 16; w >= 2 && warps == 0; w /= 2) {
      const int smem = smem_bytes(w);
      const int per_sm = std::min(C16::kThreadsPerSm / kWarpSize / w, kSmemPerSm / smem);
      if (ctas <= int64_t(p.sms) * per_sm) warps = w;  // the largest CTA with one wave
      if (per_sm * w > best_resident) best = w, best_resident = per_sm * w;
    }
    if (warps == 0) warps = best;  // several waves: the most warps resident per SM
  }
  if constexpr (kHas32) {
    if (warps == 32 && can32) return launch_decode_chunks<T, BITS, MT, 32>(p, stream);
  }
  if (warps == 16 || warps == 32) launch_decode_chunks<T, BITS, MT, 16>(p, stream);
  else if (warps == 8) launch_decode_chunks<T, BITS, MT, 8>(p, stream);
  else if (warps == 4) launch_decode_chunks<T, BITS, MT, 4>(p, stream);
  else launch_decode_chunks<T, BITS, MT, 2>(p, stream);
}

}  // namespace

// Kernel choice by M (use_decode_kernel): the decode kernel (gemv_a16_kernel, 8 or 16 tokens per mma
// tile), else the mid-batch kernel with M-tiles of 16, 32 or 64 tokens (the op dequantizes and calls
// cuBLAS beyond A16_FUSED_MAX_M tokens, vllm_bipolar/ops.py).
template <typename T, int BITS>
void launch_gemm(const Problem& p, cudaStream_t stream) {
  const bool decode = use_decode_kernel(p.M, p.N, p.decode_max_m);
  if (decode && p.M <= 8) launch_decode_tile<T, BITS, 8>(p, stream);
  else if (decode) launch_decode_tile<T, BITS, kDecodeMaxM>(p, stream);
  else if (mid_tile_tokens(p.M) == 16) launch_mid<T, BITS, 2>(p, stream);
  else if (mid_tile_tokens(p.M) == 32) launch_mid<T, BITS, 4>(p, stream);
  else launch_mid<T, BITS, 8>(p, stream);
}

template <typename T, int BITS>
void launch_dequantize(const Problem& p, cudaStream_t stream) {
  const int64_t blocks = int64_t(p.Np / kBlockN) * (p.Kp / kBlockK);
  const int64_t per_cta = int64_t(kWarps) * kDequantBlocks;
  const int64_t ctas = (blocks + per_cta - 1) / per_cta;
  dequantize_a16_kernel<T, BITS><<<unsigned(ctas), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Explicit instantiation of one weight width for one element type: one file per (width, type),
// bipolar_gemm_a16_w<BITS>_<fp16|bf16>.cu, so the build compiles them in parallel (a width with
// several code parts, e.g. 7 = 4 + 2 + 1, took 2 minutes of nvcc for both types in one file).
#define BIPOLAR_GEMM_A16_INSTANTIATE(T, BITS)                                    \
  template void launch_gemm<T, BITS>(const Problem& p, cudaStream_t stream);     \
  template void launch_dequantize<T, BITS>(const Problem& p, cudaStream_t stream);

}  // namespace a16
}  // namespace bipolar
#endif  // BIPOLAR_GEMM_A16_KERNELS
