// Element codecs, checked exhaustively against independent definitions
// (std::ldexp / nearest-by-search), not against the code under test.
#include "kvc/number_formats.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kvc {
namespace {

// E4M3 value by its textbook definition.
double E4M3Definition(int code) {
  const int sign = code >> 7, exponent = (code >> 3) & 15, mantissa = code & 7;
  const double magnitude = exponent == 0 ? std::ldexp(mantissa, -9)
                                         : std::ldexp(8 + mantissa, exponent - 10);
  return sign ? -magnitude : magnitude;
}

TEST(E4M3, DecodesEveryCodeByDefinition) {
  for (int code = 0; code < 256; ++code) {
    const float value = F32FromE4M3(static_cast<uint8_t>(code));
    if ((code & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(value)) << code;
      continue;
    }
    EXPECT_EQ(static_cast<double>(value), E4M3Definition(code)) << "code " << code;
    EXPECT_EQ(std::signbit(value), (code & 0x80) != 0) << code;
  }
  EXPECT_EQ(F32FromE4M3(0x7E), 448.0f);
  EXPECT_EQ(F32FromE4M3(0x01), std::ldexp(1.0f, -9));
}

TEST(E4M3, EncodesEveryCodeBackToItself) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7F) == 0x7F) continue;
    EXPECT_EQ(E4M3FromF32(F32FromE4M3(static_cast<uint8_t>(code))), code) << code;
  }
}

// Nearest non-NaN E4M3 magnitude code by exhaustive search, ties to the even
// code (even mantissa LSB), saturating at 448.
int NearestE4M3ByMagnitudeSearch(double a) {
  int best = 0;
  for (int code = 1; code < 0x7F; ++code) {
    const double d_best = std::fabs(E4M3Definition(best) - a);
    const double d = std::fabs(E4M3Definition(code) - a);
    if (d < d_best || (d == d_best && (code & 1) == 0)) best = code;
  }
  return best;
}

TEST(E4M3, RoundsToNearestEvenIncludingEveryMidpoint) {
  std::vector<double> probes;
  for (int code = 0; code < 0x7E; ++code) {
    const double lo = E4M3Definition(code), hi = E4M3Definition(code + 1);
    const double mid = (lo + hi) / 2;
    probes.insert(probes.end(), {lo, hi, mid, std::nextafter(mid, lo), std::nextafter(mid, hi)});
  }
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> log_magnitude(-12, std::log2(448.0));
  for (int i = 0; i < 20000; ++i) probes.push_back(std::exp2(log_magnitude(rng)));
  for (double probe : probes) {
    const float x = static_cast<float>(probe);
    for (float signed_x : {x, -x}) {
      const int expected = NearestE4M3ByMagnitudeSearch(std::fabs(static_cast<double>(signed_x))) |
                           (std::signbit(signed_x) ? 0x80 : 0);
      ASSERT_EQ(E4M3FromF32(signed_x), expected) << signed_x;
    }
  }
}

TEST(E4M3, SaturatesAndMapsNaN) {
  EXPECT_EQ(E4M3FromF32(448.0f), 0x7E);
  EXPECT_EQ(E4M3FromF32(1e30f), 0x7E);
  EXPECT_EQ(E4M3FromF32(-std::numeric_limits<float>::infinity()), 0xFE);
  EXPECT_EQ(E4M3FromF32(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(E4M3FromF32(-std::numeric_limits<float>::quiet_NaN()), 0xFF);
  EXPECT_EQ(E4M3FromF32(-0.0f), 0x80);
  EXPECT_EQ(E4M3FromF32(std::ldexp(1.0f, -10)), 0x00);  // tie 0 | 2^-9 -> even
}

TEST(E2M1, DecodesAndRoundTripsEveryCode) {
  const float expected[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  for (int code = 0; code < 16; ++code) {
    const float v = F32FromE2M1(static_cast<uint8_t>(code));
    EXPECT_EQ(std::fabs(v), expected[code & 7]);
    EXPECT_EQ(std::signbit(v), (code & 8) != 0);
    if (code != 8) {
      EXPECT_EQ(E2M1FromF32(v), code);  // -0.0 encodes as +0
    }
  }
}

TEST(E2M1, TwiceTheValueTableIsExact) {
  for (int code = 0; code < 16; ++code) EXPECT_EQ(kTwiceE2M1[code], 2.0f * F32FromE2M1(static_cast<uint8_t>(code))) << code;
}

TEST(E2M1, RoundsToNearestEvenAgainstSearch) {
  // Exhaustive over a fine grid of [0, 8] that hits every midpoint exactly.
  for (int i = 0; i <= 8 * 64; ++i) {
    const float a = static_cast<float>(i) / 64.0f;
    int best = 0;
    for (int code = 1; code < 8; ++code) {
      const float d_best = std::fabs(kE2M1Magnitudes[best] - a);
      const float d = std::fabs(kE2M1Magnitudes[code] - a);
      if (d < d_best || (d == d_best && (code & 1) == 0)) best = code;
    }
    EXPECT_EQ(E2M1FromF32(a), best) << a;
    EXPECT_EQ(E2M1FromF32(-a), a == 0.0f ? 0 : (8 | best)) << -a;
  }
}

TEST(Bf16, AllPatternsRoundTrip) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float f = F32FromBf16Bits(static_cast<uint16_t>(bits));
    const uint16_t back = Bf16BitsFromF32(f);
    if (std::isnan(f)) {
      EXPECT_EQ(back, (bits & 0x8000u) | 0x7FC0u);
      EXPECT_TRUE(IsNonFiniteBf16(static_cast<uint16_t>(bits)));
    } else {
      EXPECT_EQ(back, bits);
      EXPECT_EQ(IsNonFiniteBf16(static_cast<uint16_t>(bits)), std::isinf(f));
    }
  }
}

// RNE by definition: the nearer of the two bf16 neighbours (computed in
// double, exact here), ties to the even pattern.
uint16_t Bf16ByDefinition(float f) {
  const uint32_t u = F32Bits(f);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double x = f, a = F32FromBf16Bits(lo);
  if (static_cast<double>(F32FromBits(static_cast<uint32_t>(lo) << 16)) == x) return lo;
  // hi may be +-inf when lo is the largest finite; RNE then overflows to inf.
  const double b = std::isinf(F32FromBf16Bits(hi)) ? std::ldexp(std::copysign(1.0, x), 128)
                                                    : static_cast<double>(F32FromBf16Bits(hi));
  const double da = std::fabs(x - a), db = std::fabs(b - x);
  if (da < db) return lo;
  if (db < da) return hi;
  return (lo & 1) ? hi : lo;
}

TEST(Bf16, RandomFp32RoundsToNearestEven) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 1000000; ++i) {
    const float f = F32FromBits(any_bits(rng));
    if (std::isnan(f)) continue;
    ASSERT_EQ(Bf16BitsFromF32(f), Bf16ByDefinition(f)) << std::hexfloat << f;
  }
  // Exact ties both ways, and the overflow edge.
  EXPECT_EQ(Bf16BitsFromF32(F32FromBits(0x3F808000u)), 0x3F80);  // tie, even below
  EXPECT_EQ(Bf16BitsFromF32(F32FromBits(0x3F818000u)), 0x3F82);  // tie, even above
  EXPECT_EQ(Bf16BitsFromF32(F32FromBits(0x7F7FFFFFu)), 0x7F80);  // FLT_MAX -> inf
}

TEST(Ue8m0, CeilLog2FromBitsMatchesMath) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> exponent(-125, 126);
  for (int i = 0; i < 100000; ++i) {
    const float v = static_cast<float>(std::exp2(exponent(rng)));
    const int expected = static_cast<int>(std::ceil(std::log2(static_cast<double>(v)))) + 127;
    ASSERT_EQ(Ue8m0CeilLog2(v), expected) << std::hexfloat << v;
  }
  EXPECT_EQ(Ue8m0CeilLog2(1.0f), 127);
  EXPECT_EQ(Ue8m0CeilLog2(std::nextafter(1.0f, 2.0f)), 128);
  EXPECT_EQ(Ue8m0CeilLog2(std::numeric_limits<float>::infinity()), 255);
}

TEST(Ue8m0, EveryScaleAndItsInverseAreExact) {
  for (int byte = 0; byte < 255; ++byte) {
    const BlockScale s = BlockScaleFromByte(static_cast<uint8_t>(byte));
    EXPECT_EQ(static_cast<double>(s.scale), std::ldexp(1.0, byte - 127)) << byte;
    EXPECT_EQ(static_cast<double>(s.inverse), std::ldexp(1.0, 127 - byte)) << byte;
  }
  EXPECT_TRUE(std::isnan(F32FromUe8m0(255)));
}

TEST(BlockRules, Fp8UsesTheMultiplyAndTheFloor) {
  // 448 * fp32(1/448) is a hair above 1, so the scale is 2, not 1.
  EXPECT_EQ(Fp8BlockScale(448.0f).scale, 448.0f * (1.0f / 448.0f) > 1.0f ? 2.0f : 1.0f);
  // Below the 1e-4 floor every block gets the floor's scale.
  EXPECT_EQ(Fp8BlockScale(0.0f).byte, Fp8BlockScale(1e-4f).byte);
  EXPECT_EQ(Fp8BlockScale(0.0f).byte, Fp8BlockScale(1e-9f).byte);
  EXPECT_EQ(static_cast<double>(Fp8BlockScale(1e-4f).scale),
            std::exp2(std::ceil(std::log2(static_cast<double>(1e-4f * (1.0f / 448.0f))))));
  // The largest value of a block always encodes at or below 448.
  for (float amax : {1e-3f, 0.3f, 1.0f, 447.9f, 448.0f, 1000.0f, 3e38f}) {
    const BlockScale s = Fp8BlockScale(amax);
    EXPECT_LE(amax * s.inverse, 448.0f * (1.0f + 1e-6f)) << amax;
    EXPECT_NE(Fp8Encode(amax, s) & 0x7F, 0x7F) << amax;
  }
}

TEST(BlockRules, Fp4FloorAndClamp) {
  EXPECT_EQ(Fp4BlockScale(0.0f).byte, Ue8m0CeilLog2(kFp4AmaxFloor * (1.0f / 6.0f)));
  const BlockScale s = Fp4BlockScale(6.0f);
  EXPECT_EQ(Fp4Encode(6.0f, s) & 7, 7);
  EXPECT_EQ(Fp4Encode(-100.0f, s), 0xF);  // clamps to -6
}

}  // namespace
}  // namespace kvc
