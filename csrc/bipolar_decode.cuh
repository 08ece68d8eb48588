// Bit planes -> fp32 code values, for the weight-only (a_bits = 16) kernels.
//
// Host and device: the kernels use it on the GPU, and csrc/tests/decode_selftest.cu checks it on the
// CPU (built and run by .ci/nvcc_check.sh, no GPU needed).
//
// Input: the BITS plane words of one (row, word) of the checkpoint layout (format version 1):
// bit j of planes[p] is bit p of the code c_j of element j = 0..31 of the word.
//
// Step 1, residue words. Element j = 8 i + e (i = 0..3 "chunk", e = 0..7 "residue") goes to byte i
// of the residue word q[e]. Bit p of c_j moves from bit 8i+e of planes[p] to bit 8i+p+o_e of q[e],
// a shift by k_e - p (k_e = e - o_e) that is the same for the 4 elements of the byte lanes. The
// offsets o_e = BASE + (e mod SPAN) make k_e the same for the SPAN residues of one "family", so
// building all eight q[e] costs ceil(8/SPAN) * BITS shifts and 8 * BITS masked ORs (one LOP3 each)
// per 32 elements: for 4 bits and SPAN 4, 7 shifts + 32 LOP3 instead of 32 + 32.
// BASE = 8 - BITS - SPAN puts the codes as high in the byte as they fit (see step 3: precision).
//
// Step 2, one byte permute per element makes the fp32 value (no int->float conversion):
//   BITS <= 7: byte i of q[e] is (E_e & 1) << 7 | c << o_e with E_e = 135 - o_e, and the permute puts
//              E_e >> 1 above it. The result is the fp32 with exponent E_e and top mantissa bits
//              c << o_e:  f = 2^(8 - o_e) * (1 + c 2^(o_e - 7)) = 2^(8 - o_e) + 2 c   (exact).
//   BITS == 8: the byte is c itself (no room for an exponent bit); under 0x4B it is the fp32
//              2^23 + c, and one subtraction gives f = c (exact).
//
// Step 3, the dot product of one word with activations x_j:
//   F = sum_j x_j f_j,  X = sum_j x_j,  Y = sum_j 2^(8 - o_j) x_j  (Y = sum_o 2^(8-o) X_o, from the
//   per-offset partial sums X_o, which do not depend on the weight row)
//   BITS <= 7:  F - Y = 2 sum_j c_j x_j      BITS == 8:  2 F = 2 sum_j c_j x_j
//   and with v = 2c - L:  sum_j x_j v_j = 2 sum_j c_j x_j - L X  (= 2 sum_p 2^p S_p - L X, S_p the
//   sum of the x_j whose bit p is set). Then acc += s * dot + z * X.
//   Precision: F - Y cancels the 2^(8 - o) terms; with o >= 8 - BITS - SPAN they are at most
//   2^(BITS + SPAN), i.e. at most 2^(SPAN - 1) times the largest 2c: fp32 keeps ~20 exact bits.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define BIPOLAR_HD __host__ __device__ __forceinline__
#else
#define BIPOLAR_HD inline
#endif

namespace bipolar {

BIPOLAR_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, selector);
#else
  const uint64_t v = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((selector >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
#endif
}

BIPOLAR_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// SPAN: residues per family (= number of distinct offsets o_e), 1 <= SPAN <= 8 - BITS for BITS <= 7.
// Larger SPAN: fewer shifts, more per-offset activation sums X_o to keep.
template <int BITS, int SPAN>
struct PlaneDecoder {
  static_assert(BITS >= 1 && BITS <= 8, "weight bits");
  static constexpr bool kExpBit = BITS <= 7;  // the byte has room for the exponent LSB
  static constexpr int kSpan = kExpBit ? SPAN : 1;
  static_assert(!kExpBit || (SPAN >= 1 && SPAN <= 8 - BITS), "code bits c << o must fit in 7 bits");
  static constexpr int kOffsets = kSpan;  // distinct o_e
  static constexpr int kBase = kExpBit ? 8 - BITS - kSpan : 0;  // lowest o_e
  static constexpr float kL = float((1 << BITS) - 1);
  // dot = kScaleF * F - Y - L * X  (Y == 0 when !kExpBit)
  static constexpr float kScaleF = kExpBit ? 1.f : 2.f;

  static BIPOLAR_HD constexpr int offset(int e) { return kExpBit ? kBase + e % kSpan : 0; }
  // Index of e's partial activation sum X_o (0 .. kOffsets-1).
  static BIPOLAR_HD constexpr int slot(int e) { return kExpBit ? e % kSpan : 0; }
  static BIPOLAR_HD constexpr int exponent(int o) { return 135 - o; }
  // Weight of the partial sum X_slot in Y: 2^(8 - o) for o = kBase + slot.
  static BIPOLAR_HD constexpr float omega(int slot_index) { return float(1 << (8 - kBase - slot_index)); }
  // Second operand of the permute for residue e: byte 3 = E >> 1 (BITS <= 7) or 0x4B (BITS == 8).
  static BIPOLAR_HD constexpr uint32_t magic(int e) {
    return kExpBit ? uint32_t(exponent(offset(e)) >> 1) << 24 : 0x4B000000u;
  }

  static BIPOLAR_HD void residue_words(const uint32_t (&planes)[BITS], uint32_t (&q)[8]) {
#pragma unroll
    for (int e = 0; e < 8; ++e) q[e] = (kExpBit && (exponent(offset(e)) & 1)) ? 0x80808080u : 0u;
#pragma unroll
    for (int first = 0; first < 8; first += kSpan) {  // family: residues first .. first + kSpan - 1
      const int k = first - offset(first);               // = e - o_e for every e of the family
#pragma unroll
      for (int p = 0; p < BITS; ++p) {
        const uint32_t shifted = k >= p ? planes[p] >> (k - p) : planes[p] << (p - k);
#pragma unroll
        for (int e = first; e < first + kSpan && e < 8; ++e) q[e] |= shifted & (0x01010101u << (p + offset(e)));
      }
    }
  }

  // f for element 8 * chunk + e, from q[e]. chunk and e are constants after unrolling.
  static BIPOLAR_HD float value(uint32_t qe, int e, int chunk) {
    // The permute's first operand is the constant (bytes 0-3: a register ptxas keeps), the second
    // the residue word (bytes 4-7), so the selector is the immediate.
    if (kExpBit) {
      // result bytes: [0] = [1] = 0 (magic byte 0), [2] = q byte `chunk`, [3] = E >> 1
      return bits_to_float(byte_perm(magic(e), qe, 0x3000u | ((4u + chunk) << 8)));
    } else {
      // result bytes: [0] = q byte `chunk`, [1] = [2] = 0, [3] = 0x4B  ->  2^23 + c
      return bits_to_float(byte_perm(magic(e), qe, 0x3000u | (4u + chunk))) - 8388608.f;
    }
  }
};

}  // namespace bipolar
