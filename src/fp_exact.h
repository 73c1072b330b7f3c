// fp32 arithmetic emulated in fp64, for the rare inputs whose fp32
// intermediates would be subnormal (an operation on a subnormal costs Intel
// cores a microcode assist, ~100x a normal one; FTZ/DAZ would change
// results). Each fp32 result is the fp64 result rounded to fp32
// (round-to-nearest-even): fp64 keeps more than 2 * 24 + 2 bits, so rounding
// twice gives the same as rounding once for + - * / and sqrt. Every value
// here is an fp32 value or an exact product of two, at least 2^-298 in
// magnitude: normal in fp64, so no operation meets a subnormal.
#ifndef KVC_SRC_FP_EXACT_H_
#define KVC_SRC_FP_EXACT_H_

#include <cmath>
#include <cstdint>

#include "kvc/compressor.h"
#include "kvc/number_formats.h"

namespace kvc::fp_exact {

// x rounded to fp32, kept in fp64.
inline double RoundToF32(double x) {
  const double a = std::fabs(x);
  if (!(a < 0x1p-126)) return static_cast<double>(static_cast<float>(x));  // normal, inf or NaN
  return std::copysign((a + 0x1p-97) - 0x1p-97, x);  // the subnormal range: multiples of 2^-149
}

// fp32 bits -> the value in fp64, with integer operations only.
inline double FromF32Bits(uint32_t u) {
  const int field = static_cast<int>((u >> 23) & 0xFF);
  const uint32_t mantissa = u & 0x7FFFFFu;
  if (field == 255) return static_cast<double>(F32FromBits(u));  // inf or NaN: not subnormal
  const double magnitude = field == 0 ? std::ldexp(static_cast<double>(mantissa), -149)
                                      : std::ldexp(static_cast<double>(mantissa | 0x800000u), field - 150);
  return (u >> 31) != 0 ? -magnitude : magnitude;
}
inline double FromF32(float x) { return FromF32Bits(F32Bits(x)); }

// The fp32 bits of an fp32 value held in fp64, built from integers when it
// is subnormal.
inline uint32_t F32BitsOf(double x) {
  const double a = std::fabs(x);
  if (!(a < 0x1p-126)) return F32Bits(static_cast<float>(x));
  return (std::signbit(x) ? 0x80000000u : 0u) | static_cast<uint32_t>(a * 0x1p149);
}
inline float ToF32(double x) { return F32FromBits(F32BitsOf(x)); }

// The exponent field of the smallest nonzero |x| among n floats (255: none).
inline int MinNonzeroField(const float* x, int n) {
  uint32_t smallest = 0xFFFFFFFFu;
  for (int i = 0; i < n; ++i) {
    const uint32_t a = F32Bits(x[i]) & 0x7FFFFFFFu;
    if (a != 0 && a < smallest) smallest = a;
  }
  return smallest == 0xFFFFFFFFu ? 255 : static_cast<int>(smallest >> 23);
}

// RotateLast64, bit for bit, without a subnormal operation: when every
// nonzero product is at least 2^-103 (so the sums of two are multiples of
// 2^-126) the fp32 code runs; otherwise an fp64 emulation.
inline void RotateLast64NoSubnormal(float* x, int dim, const float* cos_sin) {
  float* r = x + dim - 64;
  if (MinNonzeroField(r, 64) + MinNonzeroField(cos_sin, 64) - 254 >= -103) return RotateLast64(x, dim, cos_sin);
  for (int j = 0; j < 32; ++j) {
    const double a = FromF32(r[2 * j]), b = FromF32(r[2 * j + 1]);
    const double c = FromF32(cos_sin[2 * j]), s = FromF32(cos_sin[2 * j + 1]);
    const uint32_t first = F32BitsOf(RoundToF32(RoundToF32(a * c) - RoundToF32(b * s)));
    const uint32_t second = F32BitsOf(RoundToF32(RoundToF32(a * s) + RoundToF32(b * c)));
    r[2 * j] = F32FromBf16Bits(Bf16BitsFromF32(F32FromBits(first)));
    r[2 * j + 1] = F32FromBf16Bits(Bf16BitsFromF32(F32FromBits(second)));
  }
}

}  // namespace kvc::fp_exact

#endif  // KVC_SRC_FP_EXACT_H_
