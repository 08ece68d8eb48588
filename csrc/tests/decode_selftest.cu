// Host-only check of bipolar_decode.cuh (no GPU needed): for every weight width and decode span,
// random bit planes -> residue words -> fp32 values must give back the codes exactly, and the
// word dot product assembled as the kernel does (F, X_o, Y) must match sum_j x_j v_j in double.
// Built and run by .ci/nvcc_check.sh; exit status 0 on success.
#include "../bipolar_decode.cuh"

#include <cmath>
#include <cstdio>
#include <random>

namespace {

std::mt19937_64 rng(12345);

template <int BITS, int SPAN>
int check(int trials) {
  using Dec = bipolar::PlaneDecoder<BITS, SPAN>;
  std::uniform_real_distribution<float> ux(-4.f, 4.f);
  int bad = 0;
  for (int t = 0; t < trials; ++t) {
    uint32_t planes[BITS];
    for (int p = 0; p < BITS; ++p) planes[p] = uint32_t(rng());
    if (t == 0)
      for (int p = 0; p < BITS; ++p) planes[p] = 0xffffffffu;  // all codes = L
    if (t == 1)
      for (int p = 0; p < BITS; ++p) planes[p] = 0u;  // all codes = 0
    uint32_t q[8];
    Dec::residue_words(planes, q);
    float x[32];
    for (int j = 0; j < 32; ++j) x[j] = ux(rng);
    double F = 0, Xo[8] = {0}, ref = 0, X = 0;
    for (int chunk = 0; chunk < 4; ++chunk)
      for (int e = 0; e < 8; ++e) {
        const int j = 8 * chunk + e;
        int c = 0;
        for (int p = 0; p < BITS; ++p) c |= int((planes[p] >> j) & 1u) << p;
        const float f = Dec::value(q[e], e, chunk);
        const float want = Dec::kExpBit ? float(1 << (8 - Dec::offset(e))) + 2.f * c : float(c);
        if (f != want) {
          if (++bad < 10)
            std::printf("BITS=%d SPAN=%d element %d code %d: decoded %.9g, want %.9g\n", BITS, SPAN, j, c, f, want);
        }
        F += double(x[j]) * f;
        Xo[Dec::slot(e)] += x[j];
        X += x[j];
        ref += double(x[j]) * (2.0 * c - ((1 << BITS) - 1));
      }
    double Y = 0;
    for (int o = 0; o < Dec::kOffsets; ++o) Y += Dec::omega(o) * Xo[o];
    const double dot = (Dec::kExpBit ? F - Y : Dec::kScaleF * F) - Dec::kL * X;
    // the kernel's combine, in float: relative error against sum |x| |v| must stay near fp32 epsilon
    float Ff = 0.f, Xf[8] = {0.f}, Xt = 0.f, absref = 0.f;
    for (int chunk = 0; chunk < 4; ++chunk)
      for (int e = 0; e < 8; ++e) {
        const int j = 8 * chunk + e;
        Ff = std::fma(x[j], Dec::value(q[e], e, chunk), Ff);
        Xf[Dec::slot(e)] += x[j];
        Xt += x[j];
        absref += std::fabs(x[j]) * float((1 << BITS) - 1);
      }
    float Yf = 0.f;
    for (int o = 0; o < Dec::kOffsets; ++o) Yf = std::fma(Dec::omega(o), Xf[o], Yf);
    const float dotf = (Dec::kExpBit ? Ff - Yf : Dec::kScaleF * Ff) - Dec::kL * Xt;
    if (std::fabs(double(dotf) - ref) > 64 * 6e-8 * absref + 1e-6) {
      if (++bad < 10) std::printf("BITS=%d SPAN=%d: fp32 dot %.9g, reference %.12g (scale %.3g)\n", BITS, SPAN, dotf, ref, absref);
    }
    if (std::fabs(dot - ref) > 1e-9 * (1 + std::fabs(ref))) {
      if (++bad < 10) std::printf("BITS=%d SPAN=%d: dot %.12g, reference %.12g\n", BITS, SPAN, dot, ref);
    }
  }
  return bad;
}

template <int BITS>
int check_spans() {
  if constexpr (BITS == 8) {
    return check<8, 1>(2000);
  } else {
    int bad = check<BITS, 1>(2000);
    if constexpr (8 - BITS >= 2) bad += check<BITS, 2>(2000);
    if constexpr (8 - BITS >= 3) bad += check<BITS, 3>(2000);
    if constexpr (8 - BITS >= 4) bad += check<BITS, 4>(2000);
    return bad;
  }
}

}  // namespace

int main() {
  const int bad = check_spans<1>() + check_spans<2>() + check_spans<3>() + check_spans<4>() + check_spans<5>() +
                  check_spans<6>() + check_spans<7>() + check_spans<8>();
  std::printf("decode self-test: %s (%d mismatches)\n", bad ? "FAILED" : "ok", bad);
  return bad ? 1 : 0;
}
