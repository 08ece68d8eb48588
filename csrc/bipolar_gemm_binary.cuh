// WpAq bipolar GEMM on binary tensor cores (mma.sync .b1 AND.popc, sm_80+): the kernel family
// behind bipolar_kernels::gemm_binary (host side in bipolar_gemm_binary.cu).
//
// Math (DESIGN.md section 2). Weights: p bit planes B_i, activations: q bit planes A_j, both bipolar
// (bit 1 = +1, bit 0 = -1). Over a group g of K_g real input channels,
//   I[m,n,g] = sum_{i,j} 2^(i+j) (4 popc(A_j & B_i) - 2 popc(A_j) - 2 popc(B_i) + K_g)
//            = 4 T - 2 Lw PA[m] - 2 La PB[n] + K_g Lw La
// with T = sum_s 2^s acc_s, acc_s = sum_{i+j=s} popc(A_j & B_i) (the tensor-core part),
// PA = sum_j 2^j popc(A_j), PB = sum_i 2^i popc(B_i), Lw = 2^p - 1, La = 2^q - 1; and the per-group
// activation value sum S[m,g] = 2 PA - La K_g. The output is
//   y[m,n] = s_x[m] * sum_g (s[n,g] * I[m,n,g] + z[n,g] * S[m,g]).
// Padding bits past K are 0 in both operands (checkpoint rule, and the activation quantizer writes
// 0s), so the AND popcounts and PA/PB are exact with K_g the real (unpadded) group length.
//
// No popcount in the main loop: PA per (group, row) comes precomputed (bipolar_kernels::
// binary_group_sums on the activation planes, staged in shared memory with each pipeline stage), and
// every term that depends on the column alone is summed over the groups once, at load time:
//   I = J + C,  J = 4 T - 2 Lw PA (the kernel's part),  C[n,g] = K_g Lw La - 2 La PB[n,g]
//   y[m,n] = s_x[m] * (sum_g (s[n,g] J[m,n,g] + z[n,g] S[m,g]) + col_bias[n]),  col_bias = sum_g s C
// (vllm_bipolar/kernels/cuda_binary_gemm.py, prepare_binary_weights). (Counting PA and PB in the
// kernel took POPCs at a quarter of the issue rate, or extra BMMAs, at every k slice: ncu on the H100
// had W1A1 with per-row groups stalled on those POPCs, 23 instructions per BMMA.)
//
// Accumulators: plane pairs with the same i+j share one int32 accumulator (p+q-1 of them instead
// of p*q: 15 rather than 64 for W8A8), the 2^s weights are applied once per group in the epilogue.
// J is combined in 32-bit modular arithmetic: exact as long as |J| <= 2 K_g Lw La < 2^31, which
// the host checks (W8A8: groups up to 16,512 channels).
//
// Files: this header holds the templates (over weight bits P, activation bits Q and the MMA k
// shape); bipolar_gemm_binary_w<P>.cu instantiate them per weight width (parallel compilation),
// each defining launch_binary_w<P>, which dispatches over Q and the k shape at run time.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "tensor_core_utils.cuh"  // DType, cp.async / ldmatrix wrappers, store_elem

namespace bipolar {
namespace binary {

struct Problem {
  const uint32_t* a;         // activation planes [Q, M, W]
  const float* a_scales;     // [M] per-token scales s_x
  const int* a_sums;         // PA per group and row, int32 [G, a_sums_stride] (binary_group_sums)
  int a_sums_stride;         // M rounded up to 4 (rows of a group 16-byte aligned)
  const float* col_bias;     // [N] sum_g s[n,g] C[n,g] (prepare_binary_weights)
  const uint32_t* b;         // weight planes [P, N, W] (checkpoint layout, format version 1)
  const float* sz;           // (s, z) per group and column, fp32 [G, sz_stride, 2] (z = 0 when symmetric):
                             // scales / zeros [N, G] copied at load time (prepare_binary_weights),
                             // group-major so that a pipeline stage brings the (s, z) of its groups
                             // and BN columns in 16-byte pieces
  int sz_stride;             // columns per group row of sz (N rounded up to even: rows 16-byte aligned)
  void* out;                 // [M, N] of `dtype`
  int M, N, K, W, G;         // W = ceil(K / 32) words per row, G groups
  int group_words;           // words per group (a multiple of 4); W rounded up to 8 when one group per row
  int group_bits;            // channels per group (K when group_size == -1)
  bool vec16;                // 16-byte cp.async possible (W % 4 == 0 and 16-byte aligned bases)
  bool magic;                // every |J| < 2^22 (2 K_g Lw La < 2^22): exact float conversion by a magic add
  DType dtype;
};

// Declared per weight width; defined in bipolar_gemm_binary_w<P>.cu. k128: use m16n8k128 (groups
// that end in the middle of a 256-bit step, e.g. group_size 128 or 384); else m16n8k256.
#define BIPOLAR_BINARY_DECLARE(P) void launch_binary_w##P(int q, bool k128, const Problem& p, cudaStream_t stream);
BIPOLAR_BINARY_DECLARE(1)
BIPOLAR_BINARY_DECLARE(2)
BIPOLAR_BINARY_DECLARE(3)
BIPOLAR_BINARY_DECLARE(4)
BIPOLAR_BINARY_DECLARE(5)
BIPOLAR_BINARY_DECLARE(6)
BIPOLAR_BINARY_DECLARE(7)
BIPOLAR_BINARY_DECLARE(8)
#undef BIPOLAR_BINARY_DECLARE

}  // namespace binary
}  // namespace bipolar

#ifdef BIPOLAR_GEMM_BINARY_KERNELS  // kernel bodies: only in the per-width files

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_launch.cuh"

namespace bipolar {
namespace binary {

constexpr int kStageWords = 16;  // one pipeline stage covers 512 bits of K (16 words) of every plane

// Scale groups one pipeline stage (16 words of K) can touch: groups are 4 words (128 channels) or more,
// and multiples of 4 words, so at most 4 (group size 128; 2 for 256 or 384, 1 for larger groups).
constexpr int kStageGroups = 4;
// Dynamic shared memory of a CTA at most (every supported GPU has more opt-in shared memory).
constexpr int kMaxSmemBytes = 64 * 1024;

// Tile shape per (P, Q): the accumulators take (P+Q-1) * WM * WN * 4 registers per thread, kept
// under ~100 so that wide combinations do not spill. 2 x 2 warps per CTA.
template <int P, int Q>
struct Tile {
  static constexpr int kShifts = P + Q - 1;
  // n8 tiles per warp. (Two at three shift accumulators took W2A2 from 247 to 128 registers, 2 -> 4 CTAs
  // per SM, but was 6% slower at M = 4096 on the H100: c1b32a6.)
  static constexpr int WN = kShifts <= 3 ? 4 : (kShifts <= 11 ? 2 : 1);
  // m16 tiles per warp: 2, unless the registers or two pipeline stages in 48 KiB (W1A6) forbid it
  static constexpr int WM = (kShifts <= 6 && 2 * (Q * 64 + P * 16 * WN) * 16 * 4 <= 48 * 1024) ? 2 : 1;
  static constexpr int kWarpsM = 2, kWarpsN = 2;
  static constexpr int BM = 16 * WM * kWarpsM;
  static constexpr int BN = 8 * WN * kWarpsN;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  // Shared memory per stage: every activation plane of BM rows and every weight plane of BN rows,
  // 16 words each. Layout [plane][row][16 words]; the four 16-byte chunks of a row are permuted
  // (chunk ^= (row >> 1) & 3), which makes the fragment loads below (8 rows x 4 consecutive words
  // per instruction) hit 32 distinct banks, while keeping each 16-byte chunk contiguous for cp.async.
  static constexpr int kAWords = Q * BM * kStageWords;
  static constexpr int kBWords = P * BN * kStageWords;
  // (s, z) of the stage's groups (fp32 pairs, [kStageGroups][BN][2]): staged with the planes, so the
  // epilogue reads them from shared memory. (Loading them from global memory at the group's end left
  // every warp waiting on those loads: ncu on the H100, W1A1 at M = 4096, had the conversions of the
  // loaded scales as the top stall sites, 19% of all samples in long-scoreboard waits.)
  static constexpr int kSzWords = kStageGroups * BN * 2;
  // PA of the stage's groups and the tile's rows (int32 [kStageGroups][BM]), for the same reason
  static constexpr int kPaWords = kStageGroups * BM;
  static constexpr int kStage = kAWords + kBWords + kSzWords + kPaWords;
  // Pipeline depth: as many stages (2..4) as fit kMaxSmemBytes. A stage is only a few hundred MMAs,
  // so several copies must be in flight to cover the global latency.
  static constexpr int kStageBytes = kStage * 4;
  static constexpr int kPipe = (4 * kStageBytes <= kMaxSmemBytes) ? 4 : ((3 * kStageBytes <= kMaxSmemBytes) ? 3 : 2);
  static constexpr int kSmemBytes = kPipe * kStageBytes;
  // CTAs per SM the register budget is held to (launch bounds): 4 (<= 128 registers) for W1A1, whose
  // tile fits that without spilling (164 registers unbounded); two accumulators and more spill there.
  static constexpr int kMinBlocks = kShifts == 1 ? 4 : 1;
  static_assert(2 * kStageBytes <= kMaxSmemBytes, "two pipeline stages must fit kMaxSmemBytes");
};

__device__ __forceinline__ int swz(int row, int word) { return row * kStageWords + (word ^ (((row >> 1) & 3) << 2)); }

// D += popc(A & B) over 256 bits. Fragments (PTX ISA, mma .m16n8k256 .b1; g = lane / 4,
// t = lane % 4): a0 = A[row g][bits 32t..32t+31], a1 = A[row g+8][same], a2 = A[row g][bits
// 128+32t..], a3 = A[row g+8][bits 128+32t..]; b0 = B[col g][bits 32t..], b1 = B[col g][bits
// 128+32t..]; c0, c1 = C[row g][cols 2t, 2t+1], c2, c3 = C[row g+8][cols 2t, 2t+1].
// (Only the pairing of A's and B's k positions matters for a popcount, and the loads below use
// the same word for both.)
__device__ __forceinline__ void bmma_k256(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D += popc(A & B) over 128 bits: a0 = A[row g][bits 32t..], a1 = A[row g+8][bits 32t..],
// b0 = B[col g][bits 32t..]; C as above.
__device__ __forceinline__ void bmma_k128(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile(
      "mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(b0));
}

// Same two instructions with C = 0: the first MMA of each shift accumulator in a new group, so the
// accumulators never need clearing (a group of 128 channels is a single k128 step).
__device__ __forceinline__ void bmma_k256_zero(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};\n"
      : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(0));
}

__device__ __forceinline__ void bmma_k128_zero(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile(
      "mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%7,%7,%7,%7};\n"
      : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
      : "r"(a0), "r"(a1), "r"(b0), "r"(0));
}

// All P*Q plane-pair MMAs of one k slice for the warp tile. Pairs are grouped by shift s = i + j;
// with kFresh (first slice of a group) the first pair of each shift overwrites its accumulator.
template <int P, int Q, int WM, int WN, bool K128, bool kFresh>
__device__ __forceinline__ void mma_slice(int (&acc)[P + Q - 1][WM][WN][4], const uint32_t (&af)[Q][WM][K128 ? 2 : 4],
                                          const uint32_t (&bf)[P][WN][K128 ? 1 : 2]) {
#pragma unroll
  for (int s = 0; s < P + Q - 1; ++s) {
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const int j = s - i;
      if (j < 0 || j >= Q) continue;
      const bool first = kFresh && (i == (s - Q + 1 > 0 ? s - Q + 1 : 0));  // smallest valid i for this s
#pragma unroll
      for (int mi = 0; mi < WM; ++mi)
#pragma unroll
        for (int ni = 0; ni < WN; ++ni) {
          if constexpr (K128) {
            if (first) bmma_k128_zero(acc[s][mi][ni], af[j][mi][0], af[j][mi][1], bf[i][ni][0]);
            else bmma_k128(acc[s][mi][ni], af[j][mi][0], af[j][mi][1], bf[i][ni][0]);
          } else {
            if (first) bmma_k256_zero(acc[s][mi][ni], af[j][mi], bf[i][ni]);
            else bmma_k256(acc[s][mi][ni], af[j][mi], bf[i][ni]);
          }
        }
    }
  }
}

// Copy the bit planes of stage `st` (words 16 st .. 16 st + 15 of every plane row of the tile) into
// shared memory, for any W and alignment (StageCopier::copy_planes is the fast path of aligned
// problems; StageCopier::copy_group_terms brings the stage's (s, z) and PA in both cases). Rows past M / N and words
// past W are zero-filled (they then add nothing to any popcount).
template <int P, int Q>
__device__ __forceinline__ void load_stage(uint32_t* sm, const Problem& p, int m0, int n0, int st) {
  using TL = Tile<P, Q>;
  constexpr int kARows = Q * TL::BM, kRows = kARows + P * TL::BN;
  const int w0 = st * kStageWords;
  // one item = one 16-byte chunk (4 words) of one plane row
  constexpr int kChunks = kStageWords / 4;
  for (int item = threadIdx.x; item < kRows * kChunks; item += TL::kThreads) {
    const int r = item / kChunks, chunk = item % kChunks;
    const uint32_t* src;
    uint32_t* dst;
    bool row_ok;
    int row;
    if (r < kARows) {
      const int plane = r / TL::BM;
      row = r % TL::BM;
      row_ok = m0 + row < p.M;
      src = p.a + (int64_t(plane) * p.M + (row_ok ? m0 + row : 0)) * p.W;
      dst = sm + plane * TL::BM * kStageWords;
    } else {
      const int rb = r - kARows, plane = rb / TL::BN;
      row = rb % TL::BN;
      row_ok = n0 + row < p.N;
      src = p.b + (int64_t(plane) * p.N + (row_ok ? n0 + row : 0)) * p.W;
      dst = sm + TL::kAWords + plane * TL::BN * kStageWords;
    }
    const int w = w0 + chunk * 4;
    uint32_t* d = dst + swz(row, chunk * 4);
    if (p.vec16) {
      const bool ok = row_ok && w < p.W;  // W % 4 == 0: a chunk is all in or all out
      cp_async16(d, ok ? src + w : src, ok);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = row_ok && w + e < p.W;
        cp_async4(d + e, ok ? src + w + e : src, ok);
      }
    }
  }
}

// Stage copies with every per-thread quantity worked out once: the planes of vec16 problems (W % 4 == 0
// and 16-byte aligned planes; others use load_stage) and, for every problem, the (s, z) of the groups
// the stage's words touch (group g_first + gi at [gi][column][2], zero-filled past N). ncu on the H100 had load_stage's per-item index arithmetic (divisions, the
// generic-to-shared conversion of every destination) among the hottest instructions of the kernel.
// Every thread copies the same 16-byte chunk (tid % 4) of kPasses plane rows, kRowsPerPass rows apart;
// since Q * BM and P * BN are multiples of kRowsPerPass, whether pass i reads activations or weights
// is known at compile time, and a stage row's offset in the buffer is its row index times 16 words
// (activation rows first, then weight rows) plus the swizzled chunk, which is the same for every pass.
template <int P, int Q>
struct StageCopier {
  using TL = Tile<P, Q>;
  static constexpr int kChunks = kStageWords / 4;
  static constexpr int kRowsPerPass = TL::kThreads / kChunks;
  static constexpr int kARows = Q * TL::BM, kRows = kARows + P * TL::BN;
  // tiles whose weight rows are not whole passes (P * BN = 80 or 112: W5A8, W7A6) keep load_stage
  static constexpr bool kUsable = kARows % kRowsPerPass == 0 && kRows % kRowsPerPass == 0;
  static constexpr int kAPasses = kARows / kRowsPerPass, kPasses = kUsable ? kRows / kRowsPerPass : 1;
  static constexpr int kSzChunks = kStageGroups * TL::BN / 2;  // 16-byte (s, z) chunks of two columns
  static constexpr int kPaChunks = kStageGroups * TL::BM / 4;  // 16-byte PA chunks of four rows
  static_assert(kSzChunks <= TL::kThreads && kPaChunks <= TL::kThreads, "one chunk of each per thread at most");

  int rowidx[kPasses];  // plane * M + row (activations) or plane * N + row (weights), rows clamped
  uint32_t okmask;      // bit i: pass i's row is inside M / N
  uint32_t dst0;        // byte offset of pass 0's chunk in a stage buffer
  int w_off;            // this thread's word in a stage: 4 * (tid % kChunks)
  int sz_gi, sz_col;    // (s, z) chunk: stage group and first column (sz_gi = kStageGroups: none)
  uint32_t sz_dst;      // its byte offset in a stage buffer
  int pa_gi, pa_row;    // PA chunk: stage group and first row (pa_gi = kStageGroups: none)
  uint32_t pa_dst;

  __device__ __forceinline__ StageCopier(const Problem& p, int m0, int n0) {
    const int tid = threadIdx.x;
    const int chunk = tid % kChunks, r0 = tid / kChunks;
    w_off = 4 * chunk;
    dst0 = uint32_t(swz(r0, 4 * chunk)) * 4u;  // swz(r0 + 32 i, .) = swz(r0, .) + 32 i * 16
    okmask = 0;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int r = r0 + i * kRowsPerPass;
      bool ok;
      if (i < kAPasses) {
        const int plane = r / TL::BM, row = r % TL::BM;
        ok = m0 + row < p.M;
        rowidx[i] = plane * p.M + (ok ? m0 + row : 0);
      } else {
        const int rb = r - kARows, plane = rb / TL::BN, row = rb % TL::BN;
        ok = n0 + row < p.N;
        rowidx[i] = plane * p.N + (ok ? n0 + row : 0);
      }
      okmask |= uint32_t(ok) << i;
    }
    sz_gi = tid < kSzChunks ? tid / (TL::BN / 2) : kStageGroups;
    sz_col = n0 + 2 * (tid % (TL::BN / 2));
    sz_dst = uint32_t(TL::kAWords + TL::kBWords + (sz_gi * TL::BN + 2 * (tid % (TL::BN / 2))) * 2) * 4u;
    pa_gi = tid < kPaChunks ? tid / (TL::BM / 4) : kStageGroups;
    pa_row = m0 + 4 * (tid % (TL::BM / 4));
    pa_dst = uint32_t(TL::kAWords + TL::kBWords + TL::kSzWords + pa_gi * TL::BM + 4 * (tid % (TL::BM / 4))) * 4u;
  }

  // Stage st's planes into the buffer at shared address `buf` (bytes).
  __device__ __forceinline__ void copy_planes(const Problem& p, uint32_t buf, int st) const {
    const int w = st * kStageWords + w_off;
    const bool win = w < p.W;  // W % 4 == 0: a chunk is all in or all out
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const bool ok = win && ((okmask >> i) & 1u);
      const uint32_t* base = i < kAPasses ? p.a : p.b;
      const uint32_t* src = base + (ok ? int64_t(rowidx[i]) * p.W + w : 0);
      cp_async16_s(buf + dst0 + uint32_t(i * kRowsPerPass * kStageWords * 4), src, ok);
    }
  }

  // Stage st's (s, z) pairs (16-byte chunks of two columns) and PA (chunks of four rows): one chunk of
  // each per thread at most. a_sums rows are padded to a multiple of 4 (zeros), so a chunk is all in or out.
  __device__ __forceinline__ void copy_group_terms(const Problem& p, uint32_t buf, int st) const {
    const int w0 = st * kStageWords;
    const int g_first = w0 / p.group_words;
    const int g_last = min(p.G - 1, (min(w0 + kStageWords, p.W) - 1) / p.group_words);
    if (sz_gi < kStageGroups) {
      const bool ok = g_first + sz_gi <= g_last && sz_col < p.N;
      const float* src = p.sz + (ok ? (int64_t(g_first + sz_gi) * p.sz_stride + sz_col) * 2 : 0);
      cp_async16_s(buf + sz_dst, src, ok);
    }
    if (pa_gi < kStageGroups) {
      const bool ok = g_first + pa_gi <= g_last && pa_row < p.a_sums_stride;
      const int* src = p.a_sums + (ok ? int64_t(g_first + pa_gi) * p.a_sums_stride + pa_row : 0);
      cp_async16_s(buf + pa_dst, src, ok);
    }
  }
};

// Group end: fold the integer sums of the finished group into `out` (the MMA accumulators are
// overwritten by the next group's first MMAs). Per element this is the shift combination
// T = sum_s acc_s << s, one multiply-add with the row term (J = 4 T - 2 Lw PA), one int -> float
// conversion and two FMAs. kMagic (|J| < 2^22, checked on the host): the conversion is an integer
// add of 0x4B400000 (folded into the row term) and one float subtraction of 1.5 * 2^23, exact,
// instead of a quarter-rate I2F.
// `sz_cols`: the (s, z) pairs of this group in shared memory, at the warp tile's first column;
// `pa_rows`: PA of this group in shared memory, at the warp tile's first row.
template <int P, int Q, bool kMagic>
__device__ __forceinline__ void epilogue(const Problem& p, int grp, int g, int t,
                                       const int (&acc)[P + Q - 1][Tile<P, Q>::WM][Tile<P, Q>::WN][4],
                                       float (&out)[Tile<P, Q>::WM][Tile<P, Q>::WN][4], const float* sz_cols,
                                       const int* pa_rows) {
  constexpr int WM = Tile<P, Q>::WM, WN = Tile<P, Q>::WN, NS = P + Q - 1;
  float sc[WN][2], zc[WN][2];
#pragma unroll
  for (int ni = 0; ni < WN; ++ni) {
    // columns 8 ni + 2 t and + 1: one 16-byte read of their two (s, z) pairs
    const float4 v = *reinterpret_cast<const float4*>(sz_cols + (ni * 8 + 2 * t) * 2);
    sc[ni][0] = v.x, zc[ni][0] = v.y, sc[ni][1] = v.z, zc[ni][1] = v.w;
  }
  constexpr uint32_t Lw = (1u << P) - 1, La = (1u << Q) - 1;
  const int kg = min(p.K, (grp + 1) * p.group_bits) - grp * p.group_bits;  // real channels in the group
  uint32_t row_term[WM][2];
  float srow[WM][2];
#pragma unroll
  for (int mi = 0; mi < WM; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t pa_v = uint32_t(pa_rows[mi * 16 + h * 8 + g]);  // row g (+8) of m16 tile mi
      row_term[mi][h] = (kMagic ? 0x4B400000u : 0u) - 2u * Lw * pa_v;
      srow[mi][h] = float(int(2u * pa_v - La * uint32_t(kg)));  // S[m, g]
    }
#pragma unroll
  for (int ni = 0; ni < WN; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int mi = 0; mi < WM; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int c = h * 2 + e;
          uint32_t tsum = uint32_t(acc[0][mi][ni][c]);
#pragma unroll
          for (int s = 1; s < NS; ++s) tsum += uint32_t(acc[s][mi][ni][c]) << s;
          const uint32_t u = 4u * tsum + row_term[mi][h];  // J (+ magic), mod 2^32
          const float jval = kMagic ? __fsub_rn(__int_as_float(int(u)), 12582912.0f) : float(int(u));
          out[mi][ni][c] = fmaf(sc[ni][e], jval, fmaf(zc[ni][e], srow[mi][h], out[mi][ni][c]));
        }
}

template <int P, int Q, bool K128>
__global__ void __launch_bounds__(Tile<P, Q>::kThreads, Tile<P, Q>::kMinBlocks)
    gemm_binary_kernel(const Problem p) {
  using TL = Tile<P, Q>;
  constexpr int WM = TL::WM, WN = TL::WN, NS = TL::kShifts;
  extern __shared__ __align__(16) uint32_t smem_raw[];  // kPipe pipeline buffers of kStage words
  auto smem = [&](int buf) { return smem_raw + buf * TL::kStage; };

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int warp_m = warp / TL::kWarpsN, warp_n = warp % TL::kWarpsN;
  const int m0 = blockIdx.y * TL::BM, n0 = blockIdx.x * TL::BN;
  const int wm0 = warp_m * WM * 16, wn0 = warp_n * WN * 8;  // warp tile origin inside the CTA tile

  int acc[NS][WM][WN][4];  // popc(A_j & B_i) summed over pairs with i + j = s, current group
  float out[WM][WN][4];    // sum over finished groups of s * J + z * S
#pragma unroll
  for (int mi = 0; mi < WM; ++mi)
#pragma unroll
    for (int ni = 0; ni < WN; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        out[mi][ni][c] = 0.f;
#pragma unroll
        for (int s = 0; s < NS; ++s) acc[s][mi][ni][c] = 0;
      }

  // Multi-stage cp.async pipeline (kPipe buffers): stage st + kPipe - 1 is requested while stage st
  // is computed; one barrier per stage (it also guarantees that the buffer refilled next was
  // finished by every warp in the previous iteration).
  constexpr int kPipe = TL::kPipe;
  const int stages = (p.W + kStageWords - 1) / kStageWords;
  const StageCopier<P, Q> copier(p, m0, n0);
  // ldmatrix row of this lane within an m16 A tile (matrices 1 and 3 are rows 8-15) and its chunk half
  const int lm_row_a = (lane & 7) + 8 * ((lane >> 3) & 1), lm_hi_a = lane >> 4;
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  auto fill = [&](int buf, int stage) {
    const uint32_t addr = smem_base + uint32_t(buf * TL::kStageBytes);
    if (StageCopier<P, Q>::kUsable && p.vec16) copier.copy_planes(p, addr, stage);
    else load_stage<P, Q>(smem(buf), p, m0, n0, stage);
    copier.copy_group_terms(p, addr, stage);
  };
#pragma unroll
  for (int s0 = 0; s0 < kPipe - 1; ++s0) {
    if (s0 < stages) fill(s0, s0);
    cp_async_commit();  // empty groups keep the wait_group arithmetic uniform
  }
  // Group bookkeeping by counters (no division per slice): the current group, the word its end is at,
  // and whether the next slice opens a group (its first MMA of each shift overwrites the accumulator).
  int grp = 0, group_end = p.group_words;
  bool fresh = true;
  for (int st = 0; st < stages; ++st) {
    cp_async_wait<kPipe - 2>();  // stage st has landed (this thread's copies)
    __syncthreads();             // ... and everyone's; buffer (st - 1) % kPipe is free again
    if (st + kPipe - 1 < stages) fill((st + kPipe - 1) % kPipe, st + kPipe - 1);
    cp_async_commit();
    const uint32_t* sa = smem(st % kPipe);
    const uint32_t sa_addr = smem_base + uint32_t((st % kPipe) * TL::kStageBytes);  // shared addresses (bytes)
    const uint32_t sb_addr = sa_addr + uint32_t(TL::kAWords * 4);
    const float* ssz = reinterpret_cast<const float*>(sa + TL::kAWords + TL::kBWords) + wn0 * 2;  // this warp's columns
    const int* spa = reinterpret_cast<const int*>(sa + TL::kAWords + TL::kBWords + TL::kSzWords) + wm0;  // ... rows
    const int g_first = grp;  // group of the stage's first word (load_stage staged its (s, z) first)
    // k slices of this stage: 256 bits each (K128 = false), or 128 bits each (K128 = true)
    constexpr int kSliceWords = K128 ? 4 : 8;
    constexpr int kSlices = kStageWords / kSliceWords;
#pragma unroll
    for (int sl = 0; sl < kSlices; ++sl) {
      const int w_lo = st * kStageWords + sl * kSliceWords;
      if (w_lo >= p.W) break;  // rest of the last stage past the end of K (uniform)
      // Fragments of every plane of the warp tile, loaded once and reused by all P*Q pairings, with
      // ldmatrix: an 8 x 8 b16 matrix is 8 rows of 16 bytes (4 words), and lane l receives word l % 4
      // of row l / 4: exactly the b1 fragment (row g, word t) of one 16-byte chunk of K. One ldmatrix.x4
      // replaces four 32-bit shared loads (A, k256: rows g / g + 8 x chunks lo / hi; B: 4 n8 tiles at
      // k128, 2 tiles x 2 chunks at k256); the swizzle keeps each chunk contiguous.
      uint32_t af[Q][WM][K128 ? 2 : 4];
      uint32_t bf[P][WN][K128 ? 1 : 2];
#pragma unroll
      for (int j = 0; j < Q; ++j)
#pragma unroll
        for (int mi = 0; mi < WM; ++mi) {
          // matrices: rows 0-7 / 8-15 of the m16 tile (lane / 8 odd: + 8), chunk lo / hi (lane / 16)
          const int row = wm0 + mi * 16 + lm_row_a;
          const int chunk = K128 ? sl : 2 * sl + lm_hi_a;
          const uint32_t addr = sa_addr + uint32_t((j * TL::BM * kStageWords + swz(row, 4 * chunk)) * 4);
          if constexpr (K128) ldsm_x2(addr, af[j][mi][0], af[j][mi][1]);
          else ldsm_x4(addr, af[j][mi][0], af[j][mi][1], af[j][mi][2], af[j][mi][3]);
        }
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const uint32_t bbase = sb_addr + uint32_t(i * TL::BN * kStageWords * 4);
        if constexpr (K128) {
          // matrix q (= lane / 8) is n8 tile ni0 + q: up to 4 tiles per ldmatrix
#pragma unroll
          for (int ni0 = 0; ni0 < WN; ni0 += 4) {
            constexpr int kN = WN < 4 ? WN : 4;
            const int row = wn0 + ni0 * 8 + (lane & (8 * kN - 1));
            const uint32_t addr = bbase + uint32_t(swz(row, 4 * sl) * 4);
            if constexpr (kN == 4) ldsm_x4(addr, bf[i][ni0][0], bf[i][ni0 + 1][0], bf[i][ni0 + 2][0], bf[i][ni0 + 3][0]);
            else if constexpr (kN == 2) ldsm_x2(addr, bf[i][ni0][0], bf[i][ni0 + 1][0]);
            else ldsm_x1(addr, bf[i][ni0][0]);
          }
        } else {
          // matrix q is n8 tile ni0 + q / 2, chunk lo / hi = q % 2: two tiles per ldmatrix.x4
#pragma unroll
          for (int ni0 = 0; ni0 < WN; ni0 += 2) {
            if constexpr (WN >= 2) {
              const int row = wn0 + (ni0 + (lane >> 4)) * 8 + (lane & 7);
              const uint32_t addr = bbase + uint32_t(swz(row, 4 * (2 * sl + ((lane >> 3) & 1))) * 4);
              ldsm_x4(addr, bf[i][ni0][0], bf[i][ni0][1], bf[i][ni0 + 1][0], bf[i][ni0 + 1][1]);
            } else {
              const int row = wn0 + (lane & 7);
              const uint32_t addr = bbase + uint32_t(swz(row, 4 * (2 * sl + ((lane >> 3) & 1))) * 4);
              ldsm_x2(addr, bf[i][ni0][0], bf[i][ni0][1]);
            }
          }
        }
      }
      // slices never straddle a group (groups are whole slices), so the group ends exactly at group_end
      const int w_hi = w_lo + kSliceWords;
      const bool closes = w_hi == group_end || w_hi >= p.W;
      if (fresh) mma_slice<P, Q, WM, WN, K128, true>(acc, af, bf);
      else mma_slice<P, Q, WM, WN, K128, false>(acc, af, bf);
      fresh = closes;
      if (closes) {
        const float* sz_cols = ssz + (grp - g_first) * TL::BN * 2;
        const int* pa_rows = spa + (grp - g_first) * TL::BM;
        if (p.magic) epilogue<P, Q, true>(p, grp, g, t, acc, out, sz_cols, pa_rows);
        else epilogue<P, Q, false>(p, grp, g, t, acc, out, sz_cols, pa_rows);
        ++grp;
        group_end += p.group_words;
      }
    }
  }
  cp_async_wait<0>();

  // y = s_x * (out + col_bias)
  store_scaled_tile(p.out, p.dtype, p.M, p.N, m0 + wm0, n0 + wn0, g, t, out, p.a_scales, p.col_bias);
}

template <int P, int Q, bool K128>
void launch(const Problem& p, cudaStream_t stream) {
  using TL = Tile<P, Q>;
  if (TL::kSmemBytes > 48 * 1024) opt_in_shared_memory<gemm_binary_kernel<P, Q, K128>>(TL::kSmemBytes);
  const dim3 grid((p.N + TL::BN - 1) / TL::BN, (p.M + TL::BM - 1) / TL::BM);
  gemm_binary_kernel<P, Q, K128><<<grid, TL::kThreads, TL::kSmemBytes, stream>>>(p);
}

template <int P>
void launch_q(int q, bool k128, const Problem& p, cudaStream_t stream) {
#define BIPOLAR_BINARY_CASE(Q)                          \
  case Q:                                               \
    if (k128) launch<P, Q, true>(p, stream);            \
    else launch<P, Q, false>(p, stream);                \
    break;
  switch (q) {
    BIPOLAR_BINARY_CASE(1)
    BIPOLAR_BINARY_CASE(2)
    BIPOLAR_BINARY_CASE(3)
    BIPOLAR_BINARY_CASE(4)
    BIPOLAR_BINARY_CASE(5)
    BIPOLAR_BINARY_CASE(6)
    BIPOLAR_BINARY_CASE(7)
    BIPOLAR_BINARY_CASE(8)
    default: break;  // validated by the host
  }
#undef BIPOLAR_BINARY_CASE
}

}  // namespace binary
}  // namespace bipolar

#define BIPOLAR_GEMM_BINARY_INSTANTIATE(P)                                                 \
  namespace bipolar {                                                                      \
  namespace binary {                                                                       \
  void launch_binary_w##P(int q, bool k128, const Problem& p, cudaStream_t stream) {      \
    launch_q<P>(q, k128, p, stream);                                                       \
  }                                                                                        \
  }                                                                                        \
  }

#endif  // BIPOLAR_GEMM_BINARY_KERNELS
