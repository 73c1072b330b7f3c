// Element-level number formats of the DeepSeek-V4 KV cache, as scalar codecs.
//
// These are the reference definitions: every SIMD kernel in kvc must produce
// the same bits as these functions. The normative description (with the
// golden vectors that pin it) is docs/formats.md; spec §4.
//
//   bf16   1-8-7,  fp32 -> bf16 by round-to-nearest-even
//   E4M3   1-4-3,  bias 7, no infinities, max 448, 0x7F/0xFF are NaN
//   E2M1   1-2-1,  magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even
//   UE8M0  8-bit biased exponent of a power of two, 2^(byte - 127)
//
// Header-only; no dependencies beyond the standard library.
#ifndef KVC_NUMBER_FORMATS_H_
#define KVC_NUMBER_FORMATS_H_

#include <cstdint>
#include <cstring>

namespace kvc {

// ---------------------------------------------------------------------------
// Bit casts.

inline uint32_t F32Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float F32FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ---------------------------------------------------------------------------
// bfloat16. A plain 16-bit pattern; engines hand kvc arrays of these.

struct Bf16 {
  uint16_t bits;
};
static_assert(sizeof(Bf16) == 2, "Bf16 must be exactly 16 bits");

// fp32 -> bf16 bits, round-to-nearest-even. NaN becomes the canonical quiet
// NaN with the input's sign (0x7FC0 / 0xFFC0); ±inf stays ±inf; values that
// round past the largest finite bf16 become ±inf (IEEE behaviour).
inline uint16_t Bf16BitsFromF32(float f) {
  const uint32_t u = F32Bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7FC0u);
  }
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7FFFu + lsb) >> 16);
}

inline Bf16 ToBf16(float f) { return Bf16{Bf16BitsFromF32(f)}; }

inline float F32FromBf16Bits(uint16_t bits) {
  return F32FromBits(static_cast<uint32_t>(bits) << 16);
}

inline float ToF32(Bf16 b) { return F32FromBf16Bits(b.bits); }

// fp32 -> the nearest bf16 value, still as fp32 (RNE; see Bf16BitsFromF32).
inline float RoundToBf16(float f) { return F32FromBf16Bits(Bf16BitsFromF32(f)); }

// True iff the bf16 pattern is ±inf or NaN (exponent field all ones).
inline bool IsNonFiniteBf16(uint16_t bits) { return (bits & 0x7F80u) == 0x7F80u; }

// ---------------------------------------------------------------------------
// E4M3 (OCP FP8 "e4m3fn").

constexpr float kE4M3Max = 448.0f;
constexpr uint8_t kE4M3NaN = 0x7F;

// fp32 -> E4M3 code, round-to-nearest-even, saturating: |x| >= 448 (including
// ±inf) gives ±448 (0x7E / 0xFE). NaN gives 0x7F with the input's sign bit.
// The sign bit is kept for zeros (-0.0 -> 0x80), as the official cast does.
inline uint8_t E4M3FromF32(float x) {
  const uint32_t u = F32Bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint8_t>(sign | kE4M3NaN);
  if (a >= 0x43E00000u) return static_cast<uint8_t>(sign | 0x7Eu);  // >= 448
  if (a < 0x3C800000u) {
    // Below the smallest normal (2^-6): multiples of 2^-9. Adding 2^14 (whose
    // ulp is 2^-9) rounds |x| to that grid with RNE; the low bits count quanta.
    const uint32_t q = F32Bits(F32FromBits(a) + 16384.0f) - 0x46800000u;
    return static_cast<uint8_t>(sign | q);  // q in 0..8; 8 is the smallest normal
  }
  // Normal: keep 3 mantissa bits with RNE; a carry correctly bumps the exponent.
  const uint32_t rounded = a + 0x7FFFFu + ((a >> 20) & 1u);
  return static_cast<uint8_t>(sign | ((rounded >> 20) - (120u << 3)));
}

// E4M3 code -> fp32 (exact). 0x7F and 0xFF decode to NaN.
inline float F32FromE4M3(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t em = code & 0x7Fu;
  if (em == kE4M3NaN) return F32FromBits(sign | 0x7FC00000u);
  const uint32_t exponent = em >> 3;
  const uint32_t mantissa = em & 7u;
  float magnitude;
  if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * (1.0f / 512.0f);  // m * 2^-9
  } else {
    magnitude = F32FromBits(((exponent + 120u) << 23) | (mantissa << 20));
  }
  return F32FromBits(F32Bits(magnitude) | sign);
}

// ---------------------------------------------------------------------------
// E2M1 (OCP FP4). A code is a nibble: sign << 3 | magnitude index.

constexpr float kE2M1Max = 6.0f;
constexpr float kE2M1Magnitudes[8] = {0.0f, 0.5f, 1.0f, 1.5f,
                                      2.0f, 3.0f, 4.0f, 6.0f};

// The magnitude index of |x| (x already clamped to [-6, 6]): nearest value,
// ties to the even mantissa (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
// 3.5->4, 5->4). |x| > 6 gives 7; NaN gives 7 (callers validate first).
inline uint8_t E2M1MagnitudeIndex(float abs_x) {
  return static_cast<uint8_t>((abs_x > 0.25f) + (abs_x >= 0.75f) +
                              (abs_x > 1.25f) + (abs_x >= 1.75f) +
                              (abs_x > 2.5f) + (abs_x >= 3.5f) + (abs_x > 5.0f));
}

// fp32 -> E2M1 nibble. The sign is `x < 0` (as the official kernel computes
// it): -0.0 encodes as +0 (0x0), while -0.1 rounds to -0 (0x8).
inline uint8_t E2M1FromF32(float x) {
  const float abs_x = x < 0.0f ? -x : x;
  return static_cast<uint8_t>(((x < 0.0f) ? 0x8u : 0x0u) | E2M1MagnitudeIndex(abs_x));
}

// Twice the E2M1 value of each nibble: small integers in [-12, 12], so E2M1
// products and their block sums are exact integers (the index-score kernels).
constexpr int8_t kTwiceE2M1[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// E2M1 nibble (low 4 bits of `code`) -> fp32 (exact).
inline float F32FromE2M1(uint8_t code) {
  const float magnitude = kE2M1Magnitudes[code & 7u];
  return (code & 8u) ? -magnitude : magnitude;
}

// ---------------------------------------------------------------------------
// UE8M0 power-of-two scales and the block rules built on them.

// UE8M0 byte -> 2^(byte-127) as fp32. Byte 0 is 2^-127 (an fp32 subnormal);
// byte 255 is NaN (OCP MX convention).
inline float F32FromUe8m0(uint8_t byte) {
  if (byte == 255) return F32FromBits(0x7FC00000u);
  if (byte == 0) return F32FromBits(0x00400000u);
  return F32FromBits(static_cast<uint32_t>(byte) << 23);
}

// UE8M0 byte of 2^ceil(log2 v), computed from the bits of v (spec §4): the
// exponent field, plus one if any mantissa bit is set. Requires v to be a
// positive normal fp32 (the block rules guarantee this for finite inputs);
// v = +inf gives 255 (NaN scale), which the kernels never store.
inline uint8_t Ue8m0CeilLog2(float v) {
  const uint32_t u = F32Bits(v);
  const uint32_t exponent_field = (u >> 23) & 0xFFu;
  const uint32_t round_up = (u & 0x7FFFFFu) != 0 ? 1u : 0u;
  const uint32_t byte = exponent_field + round_up;
  return static_cast<uint8_t>(byte > 255u ? 255u : byte);
}

// The scale of one quantization block: s = 2^(byte-127), and 1/s (exact).
struct BlockScale {
  uint8_t byte;
  float scale;
  float inverse;  // x * inverse == x / scale exactly (scale is a power of two)
};

inline BlockScale BlockScaleFromByte(uint8_t byte) {
  // Exact for every byte 0..254: 2^-127 and 2^127 are both representable.
  return BlockScale{byte, F32FromUe8m0(byte), F32FromUe8m0(static_cast<uint8_t>(254 - byte))};
}

constexpr int kFp8BlockSize = 64;  // elements per UE8M0 scale in KV rows
constexpr int kFp4BlockSize = 32;  // elements per UE8M0 scale in index keys
constexpr float kFp8AmaxFloor = 1e-4f;
constexpr float kFp4AmaxFloor = 6.0f * 1.1754943508222875e-38f;  // 6 * 2^-126

// FP8 block rule: amax = max(amax, 1e-4); v = amax * fp32(1/448) (a multiply,
// as the official kernel does); s = 2^ceil(log2 v). `amax` = max |x| of the
// block, finite and >= 0.
inline BlockScale Fp8BlockScale(float amax) {
  const float floored = amax > kFp8AmaxFloor ? amax : kFp8AmaxFloor;
  return BlockScaleFromByte(Ue8m0CeilLog2(floored * (1.0f / 448.0f)));
}

// FP4 block rule: amax = max(amax, 6 * 2^-126); v = amax * fp32(1/6).
inline BlockScale Fp4BlockScale(float amax) {
  const float floored = amax > kFp4AmaxFloor ? amax : kFp4AmaxFloor;
  return BlockScaleFromByte(Ue8m0CeilLog2(floored * (1.0f / 6.0f)));
}

// E4M3 code of x in a block with scale s: E4M3(clamp(x / s, -448, 448)).
inline uint8_t Fp8Encode(float x, const BlockScale& s) {
  float y = x * s.inverse;
  y = y < -kE4M3Max ? -kE4M3Max : (y > kE4M3Max ? kE4M3Max : y);
  return E4M3FromF32(y);
}

// E2M1 nibble of x in a block with scale s: E2M1(clamp(x / s, -6, 6)).
inline uint8_t Fp4Encode(float x, const BlockScale& s) {
  float y = x * s.inverse;
  y = y < -kE2M1Max ? -kE2M1Max : (y > kE2M1Max ? kE2M1Max : y);
  return E2M1FromF32(y);
}

}  // namespace kvc

#endif  // KVC_NUMBER_FORMATS_H_
