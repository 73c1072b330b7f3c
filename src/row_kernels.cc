// SIMD kernels behind row_kernels.h, compiled once per Highway target
// (hwy/foreach_target.h re-includes this file). The HWY_ONCE section at the
// end validates arguments and dispatches.
//
// Bit-exactness: every kernel performs the same fp32 operations, in the same
// order per element, as its scalar reference in reference_codecs.h; the only
// reductions (block amax) are max(), which is order-independent. Scales are
// computed by the very same scalar functions (number_formats.h).

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <type_traits>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/row_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kvc/number_formats.h"
#include "kvc/reference_codecs.h"
#include "kvc/row_formats.h"

#ifndef KVC_ROW_KERNELS_SHARED_
#define KVC_ROW_KERNELS_SHARED_
#include <cmath>
#include "src/fp_exact.h"
namespace kvc {
namespace row_exact {

using fp_exact::RoundToF32;
using fp_exact::F32BitsOf;
inline double F64FromF32Bits(uint32_t u) { return fp_exact::FromF32Bits(u); }

// QuantizeIndexKeyRef, emulated: Hadamard butterflies and the 128^-0.5
// scale each rounded to fp32, bf16 rounding on the bits, then the FP4 block
// rule and E2M1 codes of y = fl(x * 2^k), compared in fp64 (exact).
inline void QuantizeIndexKeyEmulated(const Bf16* in, uint8_t* codes, uint8_t* scales) {
  double x[kIndexDim];
  for (int i = 0; i < kIndexDim; ++i) x[i] = F64FromF32Bits(static_cast<uint32_t>(in[i].bits) << 16);
  for (int h = 1; h < kIndexDim; h *= 2) {
    for (int base = 0; base < kIndexDim; base += 2 * h) {
      for (int k = base; k < base + h; ++k) {
        const double a = x[k], b = x[k + h];
        x[k] = RoundToF32(a + b);
        x[k + h] = RoundToF32(a - b);
      }
    }
  }
  uint32_t bits[kIndexDim];
  for (int i = 0; i < kIndexDim; ++i) {
    const uint32_t scaled = F32BitsOf(RoundToF32(x[i] * static_cast<double>(kHadamardScale)));
    bits[i] = static_cast<uint32_t>(Bf16BitsFromF32(F32FromBits(scaled))) << 16;  // integer rounding only
  }
  uint8_t nibbles[kIndexDim];
  for (int block = 0; block < kIndexDim / kFp4BlockSize; ++block) {
    uint32_t amax = 0;
    for (int i = block * kFp4BlockSize; i < (block + 1) * kFp4BlockSize; ++i) amax = std::max(amax, bits[i] & 0x7FFFFFFFu);
    const uint32_t floor_bits = F32Bits(kFp4AmaxFloor);
    const BlockScale s = Fp4BlockScale(F32FromBits(amax > floor_bits ? amax : floor_bits));
    for (int i = block * kFp4BlockSize; i < (block + 1) * kFp4BlockSize; ++i) {
      const double y = RoundToF32(std::ldexp(F64FromF32Bits(bits[i]), 127 - s.byte));
      const double clamped = std::min(std::max(y, -6.0), 6.0);
      const double a = std::fabs(clamped);
      const int index = (a > 0.25) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0);
      nibbles[i] = static_cast<uint8_t>((clamped < 0.0 ? 8 : 0) | index);
    }
    scales[block] = s.byte;
  }
  for (int i = 0; i < kIndexDim / 2; ++i) codes[i] = static_cast<uint8_t>(nibbles[2 * i] | (nibbles[2 * i + 1] << 4));
}

}  // namespace row_exact
}  // namespace kvc
#endif  // KVC_ROW_KERNELS_SHARED_

HWY_BEFORE_NAMESPACE();
namespace kvc {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DU32 = hn::RebindToUnsigned<DF>;
using DI32 = hn::RebindToSigned<DF>;
using DU16 = hn::Rebind<uint16_t, DF>;  // as many u16 lanes as DF has floats
using DU8 = hn::Rebind<uint8_t, DF>;    // as many u8 lanes as DF has floats
using VF = hn::Vec<DF>;
using VU32 = hn::Vec<DU32>;

// N bf16 values at p, as fp32 lanes (exact).
HWY_INLINE VF LoadBf16(DF df, const Bf16* p) {
  const DU32 du32;
  const DU16 du16;
  const auto bits = hn::PromoteTo(du32, hn::LoadU(du16, reinterpret_cast<const uint16_t*>(p)));
  return hn::BitCast(df, hn::ShiftLeft<16>(bits));
}

// bf16 bits of v (round-to-nearest-even) in the low half of u32 lanes; NaN
// becomes the canonical quiet NaN with v's sign (as Bf16BitsFromF32).
HWY_INLINE VU32 Bf16BitsRne(DF df, VF v) {
  const DU32 du32;
  const VU32 u = hn::BitCast(du32, v);
  const VU32 lsb = hn::And(hn::ShiftRight<16>(u), hn::Set(du32, 1u));
  const VU32 rounded = hn::ShiftRight<16>(hn::Add(hn::Add(u, hn::Set(du32, 0x7FFFu)), lsb));
  const VU32 nan = hn::Or(hn::And(hn::ShiftRight<16>(u), hn::Set(du32, 0x8000u)),
                          hn::Set(du32, 0x7FC0u));
  // NaN by an integer compare: a float compare would meet subnormal values.
  const DI32 di32;
  const auto is_nan = hn::Gt(hn::BitCast(di32, hn::And(u, hn::Set(du32, 0x7FFFFFFFu))), hn::Set(di32, 0x7F800000));
  (void)df;
  return hn::IfThenElse(hn::RebindMask(du32, is_nan), nan, rounded);
}

HWY_INLINE VF RoundToBf16(DF df, VF v) {
  return hn::BitCast(df, hn::ShiftLeft<16>(Bf16BitsRne(df, v)));
}

HWY_INLINE void StoreValues(DF df, VF v, float* out) { hn::StoreU(v, df, out); }

HWY_INLINE void StoreValues(DF df, VF v, Bf16* out) {
  const DI32 di32;
  const DU16 du16;
  hn::StoreU(hn::DemoteTo(du16, hn::BitCast(di32, Bf16BitsRne(df, v))), du16,
             reinterpret_cast<uint16_t*>(out));
}

// E4M3 codes of y = x / s inside an FP8 block, in u32 lanes, from y's sign
// (bit 31) and |y| bits: the bits of E4M3FromF32(clamp(y, ±448)) without the
// clamp. The block rule bounds |y| <= amax / v <= 448 * (1 + 2^-22) (v =
// amax * fp32(1/448) has two roundings of 2^-24 each, and s >= v), and every
// |y| in (448, 464) rounds to 448 anyway, so the clamp could never change a
// code. Saves two ops/vector. |y| is 0 or at least 2^-11 (normal): the one
// fp32 addition below never meets a subnormal.
HWY_INLINE VU32 E4M3CodesInBlock(DF df, VU32 sign_bit, VU32 a) {
  const DU32 du32;
  const DI32 di32;
  const VU32 sign = hn::ShiftRight<24>(sign_bit);
  // Normal range: keep 3 mantissa bits, RNE; rebias the exponent 127 -> 7.
  const VU32 lsb = hn::And(hn::ShiftRight<20>(a), hn::Set(du32, 1u));
  const VU32 rounded = hn::Add(hn::Add(a, hn::Set(du32, 0x7FFFFu)), lsb);
  const VU32 normal = hn::Sub(hn::ShiftRight<20>(rounded), hn::Set(du32, 120u << 3));
  // Below 2^-6: round to multiples of 2^-9 by adding 2^14 (ulp 2^-9).
  const VF shifted = hn::Add(hn::BitCast(df, a), hn::Set(df, 16384.0f));
  const VU32 subnormal = hn::Sub(hn::BitCast(du32, shifted), hn::Set(du32, 0x46800000u));
  const auto is_subnormal =
      hn::RebindMask(du32, hn::Lt(hn::BitCast(di32, a), hn::Set(di32, 0x3C800000)));
  return hn::Or(sign, hn::IfThenElse(is_subnormal, subnormal, normal));
}

// The block scales from the block's largest |x| bits (as Fp8BlockScale and
// Fp4BlockScale, whose comparison with the floor would meet a subnormal
// amax): for non-negative floats, an integer max of the bits is the max.
HWY_INLINE BlockScale Fp8BlockScaleFromBits(uint32_t amax_bits) {
  const uint32_t floor_bits = F32Bits(kFp8AmaxFloor);
  return Fp8BlockScale(F32FromBits(amax_bits > floor_bits ? amax_bits : floor_bits));
}
HWY_INLINE BlockScale Fp4BlockScaleFromBits(uint32_t amax_bits) {
  const uint32_t floor_bits = F32Bits(kFp4AmaxFloor);
  return Fp4BlockScale(F32FromBits(amax_bits > floor_bits ? amax_bits : floor_bits));
}

// v * 2^e exactly, for an E4M3 value v (at most 4 significant bits, |v| >=
// 2^-9), ±0 or NaN, and e in [-127, -118], without a subnormal operation: a
// normal product is v's bits plus e in the exponent; a subnormal one is
// |v| * 2^(e+149) (a normal fp32 product, an integer below 2^23 then, since
// v has few bits) as the integer count of 2^-149 units.
HWY_INLINE VF ScaleE4M3Exactly(DF df, VF v, int e) {
  const DU32 du32;
  const DI32 di32;
  const VU32 u = hn::BitCast(du32, v);
  const VU32 a = hn::And(u, hn::Set(du32, 0x7FFFFFFFu));
  const VF units = hn::Mul(hn::BitCast(df, a), hn::BitCast(df, hn::Set(du32, static_cast<uint32_t>(e + 149 + 127) << 23)));
  const auto subnormal = hn::RebindMask(du32, hn::Lt(hn::BitCast(di32, units), hn::Set(di32, (23 + 127) << 23)));
  const VU32 normal = hn::Add(u, hn::BitCast(du32, hn::Set(di32, e * (1 << 23))));
  const VU32 tiny = hn::Or(hn::And(u, hn::Set(du32, 0x80000000u)), hn::BitCast(du32, hn::ConvertTo(di32, units)));
  const auto nan = hn::RebindMask(du32, hn::Gt(hn::BitCast(di32, a), hn::Set(di32, 0x7F800000)));
  return hn::BitCast(df, hn::IfThenElse(nan, u, hn::IfThenElse(subnormal, tiny, normal)));
}

// fp32 values of E4M3 codes (as F32FromE4M3), codes in u32 lanes.
HWY_INLINE VF E4M3Values(DF df, VU32 code) {
  const DU32 du32;
  const DI32 di32;
  const VU32 sign = hn::ShiftLeft<24>(hn::And(code, hn::Set(du32, 0x80u)));
  const VU32 em = hn::And(code, hn::Set(du32, 0x7Fu));
  const VF normal = hn::BitCast(df, hn::Add(hn::ShiftLeft<20>(em), hn::Set(du32, 120u << 23)));
  const VF subnormal = hn::Mul(hn::ConvertTo(df, hn::BitCast(di32, em)), hn::Set(df, 1.0f / 512.0f));
  const auto is_subnormal = hn::RebindMask(df, hn::Lt(hn::BitCast(di32, em), hn::Set(di32, 8)));
  const auto is_nan = hn::RebindMask(df, hn::Eq(em, hn::Set(du32, 0x7Fu)));
  VF magnitude = hn::IfThenElse(is_subnormal, subnormal, normal);
  magnitude = hn::IfThenElse(is_nan, hn::BitCast(df, hn::Set(du32, 0x7FC00000u)), magnitude);
  return hn::BitCast(df, hn::Or(hn::BitCast(du32, magnitude), sign));
}

// E2M1 nibbles of y (as E2M1FromF32 after clamping to ±6), in u32 lanes.
HWY_INLINE VU32 E2M1Codes(DF df, VF y) {
  const DU32 du32;
  const VF clamped = hn::Min(hn::Max(y, hn::Set(df, -kE2M1Max)), hn::Set(df, kE2M1Max));
  const VF a = hn::Abs(clamped);
  const VU32 one = hn::Set(du32, 1u);
  // Sum of the thresholds |y| passes: the magnitude index (ties to even).
  VU32 index = hn::IfThenElseZero(hn::RebindMask(du32, hn::Gt(a, hn::Set(df, 0.25f))), one);
  index = hn::Add(index, hn::IfThenElseZero(hn::RebindMask(du32, hn::Ge(a, hn::Set(df, 0.75f))), one));
  index = hn::Add(index, hn::IfThenElseZero(hn::RebindMask(du32, hn::Gt(a, hn::Set(df, 1.25f))), one));
  index = hn::Add(index, hn::IfThenElseZero(hn::RebindMask(du32, hn::Ge(a, hn::Set(df, 1.75f))), one));
  index = hn::Add(index, hn::IfThenElseZero(hn::RebindMask(du32, hn::Gt(a, hn::Set(df, 2.5f))), one));
  index = hn::Add(index, hn::IfThenElseZero(hn::RebindMask(du32, hn::Ge(a, hn::Set(df, 3.5f))), one));
  index = hn::Add(index, hn::IfThenElseZero(hn::RebindMask(du32, hn::Gt(a, hn::Set(df, 5.0f))), one));
  const VU32 sign =
      hn::IfThenElseZero(hn::RebindMask(du32, hn::Lt(clamped, hn::Zero(df))), hn::Set(du32, 8u));
  return hn::Or(index, sign);
}

// Largest |x| bit pattern over `count` floats produced by `load(i)` (count a
// multiple of N). Non-negative IEEE floats order like their bit patterns, so
// one integer max yields both the block amax (as bits) and a non-finite test
// (result >= 0x7F800000); unlike a float max it cannot lose a NaN.
// With min_nonzero_bits, also the smallest nonzero |x| bits there (all
// ones if none).
template <class LoadFn>
HWY_INLINE uint32_t MaxAbsBits(DF df, size_t count, const LoadFn& load, uint32_t* min_nonzero_bits = nullptr) {
  const DI32 di32;
  const DU32 du32;
  auto vmax = hn::Zero(di32);
  auto vmin = hn::Set(du32, 0xFFFFFFFFu);
  const auto abs_mask = hn::Set(di32, 0x7FFFFFFF);
  for (size_t i = 0; i < count; i += hn::Lanes(df)) {
    const auto a = hn::And(hn::BitCast(di32, load(i)), abs_mask);
    vmax = hn::Max(vmax, a);
    if (min_nonzero_bits != nullptr) vmin = hn::Min(vmin, hn::Sub(hn::BitCast(du32, a), hn::Set(du32, 1u)));
  }
  if (min_nonzero_bits != nullptr) *min_nonzero_bits = hn::GetLane(hn::MinOfLanes(du32, vmin)) + 1u - (hn::GetLane(hn::MinOfLanes(du32, vmin)) == 0xFFFFFFFFu ? 1u : 0u);
  return static_cast<uint32_t>(hn::GetLane(hn::MaxOfLanes(di32, vmax)));
}

// The same from `count` bf16 values at p, read as int16 lanes (twice the
// values per vector, no widening): bf16 |bits| order like |values| too.
// Returns fp32 bits (the bf16 bits << 16). count: a multiple of the lanes.
HWY_INLINE uint32_t MaxAbsBitsBf16(const Bf16* p, size_t count) {
  const hn::ScalableTag<int16_t> d16;
  auto vmax = hn::Zero(d16);
  const auto abs_mask = hn::Set(d16, static_cast<int16_t>(0x7FFF));
  const int16_t* bits = reinterpret_cast<const int16_t*>(p);
  for (size_t i = 0; i < count; i += hn::Lanes(d16)) {
    vmax = hn::Max(vmax, hn::And(hn::LoadU(d16, bits + i), abs_mask));
  }
  return static_cast<uint32_t>(static_cast<uint16_t>(hn::GetLane(hn::MaxOfLanes(d16, vmax)))) << 16;
}

// The smallest nonzero |x| of `count` bf16 values as fp32 bits, or
// 0xFFFF0000 if all are ±0 (int16 lanes: |bits| - 1 wraps zeros to the top).
HWY_INLINE uint32_t MinNonzeroAbsBitsBf16(const Bf16* p, size_t count) {
  const hn::ScalableTag<uint16_t> d16;
  auto vmin = hn::Set(d16, uint16_t{0xFFFF});
  const auto abs_mask = hn::Set(d16, uint16_t{0x7FFF});
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(p);
  for (size_t i = 0; i < count; i += hn::Lanes(d16)) {
    vmin = hn::Min(vmin, hn::Sub(hn::And(hn::LoadU(d16, bits + i), abs_mask), hn::Set(d16, uint16_t{1})));
  }
  return (static_cast<uint32_t>(static_cast<uint16_t>(hn::GetLane(hn::MinOfLanes(d16, vmin)) + 1u)) << 16) |
         (hn::GetLane(hn::MinOfLanes(d16, vmin)) == 0xFFFF ? 0xFFFF0000u : 0u);
}

// E2M1 codes of one FP4 block of x (fp32 bits u, each normal or ±0) with
// 1/s = 2^k, k <= 0: lanes with |x| < 2^(-126-k) would make y = x * 2^k
// tiny; they get magnitude 0 and the reference's sign, set iff x < 0 and
// fl(x * 2^k) != 0, i.e. |x| > 2^(-150-k) (`nonzero_above`, as bits).
HWY_INLINE VU32 E2M1CodesWithTinyLanes(DF df, VU32 u, VF inverse, VU32 tiny_below, VU32 nonzero_above) {
  const DU32 du32;
  const DI32 di32;
  const VU32 a = hn::And(u, hn::Set(du32, 0x7FFFFFFFu));
  const auto tiny = hn::RebindMask(du32, hn::Lt(hn::BitCast(di32, a), hn::BitCast(di32, tiny_below)));
  const VU32 codes = E2M1Codes(df, hn::Mul(hn::BitCast(df, hn::IfThenZeroElse(tiny, u)), inverse));
  const auto negative = hn::RebindMask(du32, hn::Lt(hn::BitCast(di32, u), hn::Zero(di32)));
  const auto signed_zero = hn::And(hn::And(tiny, negative), hn::RebindMask(du32, hn::Gt(hn::BitCast(di32, a), hn::BitCast(di32, nonzero_above))));
  return hn::Or(codes, hn::IfThenElseZero(signed_zero, hn::Set(du32, 8u)));
}

constexpr uint32_t kInfinityBits = 0x7F800000u;
// NoPE values at or above this (fp32 bits) would read back as ±inf
// (kMaxKvNopeBf16Bits).
constexpr uint32_t kKvNopeLimitBits = (uint32_t{kMaxKvNopeBf16Bits} + 1) << 16;
// Index-key inputs above 2^120 could overflow the Hadamard sums in fp32
// (128 * 2^120 < FLT_MAX); real keys are O(1).
constexpr uint32_t kIndexKeyLimitBits = (120u + 127u) << 23;
// Index-key rows whose nonzero values are all at least 2^-115 take the fp32
// path without meeting a subnormal (QuantizeIndexKeys).
constexpr uint32_t kHadamardSafeBits = (127u - 115u) << 23;

// ---------------------------------------------------------------------------
// KV rows.

// Returns -1, or the index of the first row holding ±inf/NaN or a NoPE value
// that would read back as ±inf; that row and all after it are left unwritten.
int64_t QuantizeKvRows(const Bf16* in, int64_t count, uint8_t* data, int64_t data_stride,
                       uint8_t* scales, int64_t scale_stride) {
  const DF df;
  const DU8 du8;
  const DU32 du32;
  const DI32 di32;
  const size_t lanes = hn::Lanes(df);
  constexpr int kBlocks = kNopeDim / kFp8BlockSize;
  for (int64_t r = 0; r < count; ++r) {
    const Bf16* x = in + r * kHeadDim;
    // Pass 1 (brings the 1 KiB row into L1): block maxima and the finiteness
    // check of all 512 dims, before anything of this row is written.
    uint32_t amax_bits[kBlocks];
    for (int block = 0; block < kBlocks; ++block) {
      amax_bits[block] = MaxAbsBitsBf16(x + block * kFp8BlockSize, kFp8BlockSize);
    }
    const uint32_t rope_bits = MaxAbsBitsBf16(x + kNopeDim, kRopeDim);
    uint32_t nope_max = 0;
    for (const uint32_t b : amax_bits) nope_max = b > nope_max ? b : nope_max;
    if (nope_max >= kKvNopeLimitBits || rope_bits >= kInfinityBits) return r;

    // Pass 2: encode from L1.
    uint8_t* row = data + r * data_stride;
    uint8_t* row_scales = scales + r * scale_stride;
    for (int block = 0; block < kBlocks; ++block) {
      const Bf16* xb = x + block * kFp8BlockSize;
      const BlockScale s = Fp8BlockScaleFromBits(amax_bits[block]);
      // y = x * 2^k (k = 127 - byte, in [-120, 22] above the 1e-4 floor).
      // |y| < 2^-11 codes as sign | 0; those lanes (|x| < 2^(byte - 138), every
      // subnormal x among them) become ±0, and the others scale by an exponent
      // add (|y| >= 2^-11: normal and exact, as the reference's multiply).
      const VU32 small = hn::Set(du32, static_cast<uint32_t>(s.byte - 11) << 23);
      const VU32 k_bits = hn::Set(du32, static_cast<uint32_t>(127 - s.byte) << 23);
      for (size_t i = 0; i < kFp8BlockSize; i += lanes) {
        const VU32 u = hn::BitCast(du32, LoadBf16(df, xb + i));
        const VU32 a = hn::And(u, hn::Set(du32, 0x7FFFFFFFu));
        const VU32 y = hn::IfThenZeroElse(hn::RebindMask(du32, hn::Lt(hn::BitCast(di32, a), hn::BitCast(di32, small))),
                                          hn::Add(a, k_bits));
        const VU32 codes = E4M3CodesInBlock(df, hn::And(u, hn::Set(du32, 0x80000000u)), y);
        hn::StoreU(hn::U8FromU32(codes), du8, row + block * kFp8BlockSize + i);
      }
      row_scales[block] = s.byte;
    }
    std::memcpy(row + kNopeDim, x + kNopeDim, 2 * kRopeDim);
    row_scales[kBlocks] = 0;
  }
  return -1;
}

// Dequantizes one row (data, scales) into 512 values of `out`.
template <typename Out>
HWY_INLINE void DequantizeKvRow(const uint8_t* data, const uint8_t* scales, Out* out) {
  const DF df;
  const DU32 du32;
  const DU8 du8;
  const size_t lanes = hn::Lanes(df);
  for (int block = 0; block < kNopeDim / kFp8BlockSize; ++block) {
    const int base = block * kFp8BlockSize;
    const uint8_t byte = scales[block];
    if (byte >= 10) {  // scale >= 2^-117 (or NaN): |code value| >= 2^-9 keeps every product normal
      const VF scale = hn::Set(df, F32FromUe8m0(byte));
      for (size_t i = 0; i < kFp8BlockSize; i += lanes) {
        const VU32 codes = hn::PromoteTo(du32, hn::LoadU(du8, data + base + i));
        StoreValues(df, hn::Mul(E4M3Values(df, codes), scale), out + base + i);
      }
    } else {  // tiny scales (an engine's rows): exact products, built from the bits
      for (size_t i = 0; i < kFp8BlockSize; i += lanes) {
        const VU32 codes = hn::PromoteTo(du32, hn::LoadU(du8, data + base + i));
        StoreValues(df, ScaleE4M3Exactly(df, E4M3Values(df, codes), byte - 127), out + base + i);
      }
    }
  }
  const Bf16* rope = reinterpret_cast<const Bf16*>(data + kNopeDim);
  for (size_t i = 0; i < kRopeDim; i += lanes) {
    StoreValues(df, LoadBf16(df, rope + i), out + kNopeDim + i);
  }
}

template <typename Out>
void DequantizeKvRowsT(const uint8_t* data, int64_t data_stride, const uint8_t* scales,
                       int64_t scale_stride, const int64_t* rows, int64_t count, Out* out) {
  for (int64_t r = 0; r < count; ++r) {
    const int64_t src = rows != nullptr ? rows[r] : r;
    DequantizeKvRow(data + src * data_stride, scales + src * scale_stride, out + r * kHeadDim);
  }
}

void DequantizeKvRowsToBf16(const uint8_t* data, int64_t data_stride, const uint8_t* scales,
                            int64_t scale_stride, const int64_t* rows, int64_t count, Bf16* out) {
  DequantizeKvRowsT(data, data_stride, scales, scale_stride, rows, count, out);
}

void DequantizeKvRowsToF32(const uint8_t* data, int64_t data_stride, const uint8_t* scales,
                           int64_t scale_stride, const int64_t* rows, int64_t count, float* out) {
  DequantizeKvRowsT(data, data_stride, scales, scale_stride, rows, count, out);
}

// ---------------------------------------------------------------------------
// Index keys: Hadamard-128 -> bf16 -> FP4.

// Returns -1, or the index of the first key holding a value with
// |x| > 2^120 or ±inf/NaN; that key and all after it are left unwritten.
int64_t QuantizeIndexKeys(const Bf16* in, int64_t count, uint8_t* data, int64_t data_stride,
                          uint8_t* scales, int64_t scale_stride) {
  const DF df;
  const DU32 du32;
  const DU8 du8;
  const size_t lanes = hn::Lanes(df);

  // Butterfly stages with h < lanes happen inside a vector: lane i pairs with
  // lane i ^ h. With p = v[i ^ h], the result is p + v on lanes without bit h
  // (a + b) and p + (-v) on lanes with it (a - b): exactly the reference's
  // two operations. One permutation table and sign mask per in-vector stage.
  constexpr size_t kMaxLanes = 64;
  HWY_ALIGN int32_t permute[8][kMaxLanes];
  HWY_ALIGN uint32_t negate[8][kMaxLanes];
  int in_vector_stages = 0;
  for (size_t h = 1; h < lanes; h *= 2, ++in_vector_stages) {
    for (size_t i = 0; i < lanes; ++i) {
      permute[in_vector_stages][i] = static_cast<int32_t>(i ^ h);
      negate[in_vector_stages][i] = (i & h) ? 0x80000000u : 0u;
    }
  }

  HWY_ALIGN float x[kIndexDim];
  HWY_ALIGN uint8_t nibbles[kIndexDim];
  const VF hadamard_scale = hn::Set(df, kHadamardScale);
  for (int64_t r = 0; r < count; ++r) {
    const Bf16* key = in + r * kIndexDim;
    if (MaxAbsBitsBf16(key, kIndexDim) > kIndexKeyLimitBits) {
      return r;
    }
    // With every nonzero |input| >= 2^-115 (a multiple of 2^-122), every
    // butterfly value is 0 or >= 2^-122 and every scaled one 0 or >= 2^-126:
    // no fp32 operation below meets a subnormal. Rows with smaller values
    // (which no model produces) are quantized by the fp64 emulation.
    if (MinNonzeroAbsBitsBf16(key, kIndexDim) < kHadamardSafeBits) {
      row_exact::QuantizeIndexKeyEmulated(key, data + r * data_stride, scales + r * scale_stride);
      continue;
    }
    for (size_t i = 0; i < kIndexDim; i += lanes) {
      VF v = LoadBf16(df, key + i);
      for (int stage = 0; stage < in_vector_stages; ++stage) {
        const VF partner = hn::TableLookupLanes(v, hn::SetTableIndices(df, permute[stage]));
        const VF signed_v = hn::BitCast(df, hn::Xor(hn::BitCast(du32, v), hn::Load(du32, negate[stage])));
        v = hn::Add(partner, signed_v);
      }
      hn::Store(v, df, x + i);
    }
    for (size_t h = lanes; h < kIndexDim; h *= 2) {
      for (size_t base = 0; base < kIndexDim; base += 2 * h) {
        for (size_t k = base; k < base + h; k += lanes) {
          const VF a = hn::Load(df, x + k);
          const VF b = hn::Load(df, x + k + h);
          hn::Store(hn::Add(a, b), df, x + k);
          hn::Store(hn::Sub(a, b), df, x + k + h);
        }
      }
    }
    for (size_t i = 0; i < kIndexDim; i += lanes) {
      hn::Store(RoundToBf16(df, hn::Mul(hn::Load(df, x + i), hadamard_scale)), df, x + i);
    }

    uint8_t* key_scales = scales + r * scale_stride;
    for (int block = 0; block < kIndexDim / kFp4BlockSize; ++block) {
      const float* xb = x + block * kFp4BlockSize;
      uint32_t min_bits = 0;
      const uint32_t amax_bits = MaxAbsBits(df, kFp4BlockSize, [&](size_t i) { return hn::Load(df, xb + i); }, &min_bits);
      const BlockScale s = Fp4BlockScaleFromBits(amax_bits);
      const VF inverse = hn::Set(df, s.inverse);
      // y = x * 2^k is tiny for |x| < 2^(-126-k): possible only for k < 0
      // (x is 0 or normal here), i.e. blocks with values above 6 next to
      // values near 2^-126.
      const int k = 127 - s.byte;
      const uint32_t tiny_below = k < 0 ? static_cast<uint32_t>(1 - k) << 23 : 0;
      if (min_bits >= tiny_below) {
        for (size_t i = 0; i < kFp4BlockSize; i += lanes) {
          const VU32 codes = E2M1Codes(df, hn::Mul(hn::Load(df, xb + i), inverse));
          hn::StoreU(hn::U8FromU32(codes), du8, nibbles + block * kFp4BlockSize + i);
        }
      } else {
        // 2^(-150-k) as bits: subnormal for k in [-23, -1], normal below.
        const uint32_t nonzero_above = k >= -23 ? 1u << (-1 - k) : static_cast<uint32_t>(-23 - k) << 23;
        for (size_t i = 0; i < kFp4BlockSize; i += lanes) {
          const VU32 codes = E2M1CodesWithTinyLanes(df, hn::BitCast(du32, hn::Load(df, xb + i)), inverse,
                                                    hn::Set(du32, tiny_below), hn::Set(du32, nonzero_above));
          hn::StoreU(hn::U8FromU32(codes), du8, nibbles + block * kFp4BlockSize + i);
        }
      }
      key_scales[block] = s.byte;
    }

    // Pack nibble pairs: read byte pairs as little-endian u16 (n0 | n1 << 8)
    // and form n0 | n1 << 4.
    const hn::ScalableTag<uint16_t> d16;
    const hn::RebindToSigned<decltype(d16)> di16;
    const hn::Rebind<uint8_t, decltype(d16)> d8;
    uint8_t* packed = data + r * data_stride;
    for (size_t k = 0; k < kIndexDim / 2; k += hn::Lanes(d16)) {
      const auto pair = hn::LoadU(d16, reinterpret_cast<const uint16_t*>(nibbles) + k);
      const auto low = hn::And(pair, hn::Set(d16, 0x000Fu));
      const auto high = hn::And(hn::ShiftRight<4>(pair), hn::Set(d16, 0x00F0u));
      hn::StoreU(hn::DemoteTo(d8, hn::BitCast(di16, hn::Or(low, high))), d8, packed + k);
    }
  }
  return -1;
}

// Returns -1, or the first of `count` rows of `dims` bf16 values (dims a
// multiple of the int16 lanes) that holds ±inf or NaN.
int64_t FindNonFiniteRow(const Bf16* in, int64_t count, int64_t dims) {
  for (int64_t r = 0; r < count; ++r) {
    if (MaxAbsBitsBf16(in + r * dims, static_cast<size_t>(dims)) >= kInfinityBits) return r;
  }
  return -1;
}

// Returns -1, or the first of `count` 512-value KV rows that QuantizeKvRows
// refuses (a NoPE value beyond kMaxKvNopeBf16Bits, a RoPE value ±inf/NaN).
int64_t FindUnstorableKvRow(const Bf16* in, int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    const Bf16* x = in + r * kHeadDim;
    if (MaxAbsBitsBf16(x, kNopeDim) >= kKvNopeLimitBits || MaxAbsBitsBf16(x + kNopeDim, kRopeDim) >= kInfinityBits) return r;
  }
  return -1;
}

// Returns -1, or the index of the first of `count` floats that is ±inf/NaN.
int64_t FindNonFiniteF32(const float* in, int64_t count) {
  const DF df;
  const DI32 di32;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const auto abs_mask = hn::Set(di32, 0x7FFFFFFF);
  const auto largest_finite = hn::Set(di32, static_cast<int32_t>(kInfinityBits - 1));
  int64_t i = 0;
  for (; i + 4 * lanes <= count; i += 4 * lanes) {  // 4 vectors per test: one branch per 64 floats
    auto m = hn::Max(hn::And(hn::BitCast(di32, hn::LoadU(df, in + i)), abs_mask),
                     hn::And(hn::BitCast(di32, hn::LoadU(df, in + i + lanes)), abs_mask));
    m = hn::Max(m, hn::And(hn::BitCast(di32, hn::LoadU(df, in + i + 2 * lanes)), abs_mask));
    m = hn::Max(m, hn::And(hn::BitCast(di32, hn::LoadU(df, in + i + 3 * lanes)), abs_mask));
    if (!hn::AllFalse(di32, hn::Gt(m, largest_finite))) break;  // the scalar tail pinpoints it
  }
  for (; i < count; ++i) {
    if ((F32Bits(in[i]) & 0x7FFFFFFFu) >= kInfinityBits) return i;
  }
  return -1;
}

int64_t TargetForDispatch() { return HWY_TARGET; }

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kvc
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "kvc/row_kernels.h"
#include "src/status.h"

namespace kvc {

HWY_EXPORT(QuantizeKvRows);
HWY_EXPORT(DequantizeKvRowsToBf16);
HWY_EXPORT(DequantizeKvRowsToF32);
HWY_EXPORT(QuantizeIndexKeys);
HWY_EXPORT(FindNonFiniteRow);
HWY_EXPORT(FindUnstorableKvRow);
HWY_EXPORT(FindNonFiniteF32);
HWY_EXPORT(TargetForDispatch);

namespace {

absl::Status CheckRows(const ConstPackedRows& rows, RowFormat format, const char* what) {
  const RowFormatInfo& f = FormatInfo(format);
  if (rows.count < 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": negative row count ", rows.count));
  }
  if (rows.count == 0) return absl::OkStatus();
  if (rows.data == nullptr || rows.scales == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": null data or scale pointer for ",
                                              rows.count, " rows"));
  }
  if (rows.data_stride < f.data_bytes || rows.scale_stride < f.scale_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": strides (data ", rows.data_stride, " B, scales ", rows.scale_stride,
        " B) are smaller than a ", f.name, " row's parts (", f.data_bytes, " B, ",
        f.scale_bytes, " B)"));
  }
  return absl::OkStatus();
}

// `values` must hold exactly rows * dims elements.
absl::Status CheckValueCount(size_t values, int64_t rows, int dims, const char* what) {
  if (rows < 0 || values % static_cast<size_t>(dims) != 0 ||
      values / static_cast<size_t>(dims) != static_cast<uint64_t>(rows)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": expected ", rows, " rows x ", dims,
                                              " values, got ", values, " values"));
  }
  return absl::OkStatus();
}

// What a quantizing kernel accepts: |bf16 bits| <= max_bits for every dim
// (`limit` names that bound in messages), except that dims from
// `rest_from` on may be any finite value.
struct ValueLimit {
  uint16_t max_bits;
  const char* limit;
  int rest_from;
};
constexpr ValueLimit kAnyFinite = {kMaxFiniteBf16Bits, "", 1 << 30};
constexpr ValueLimit kKvRowLimit = {
    kMaxKvNopeBf16Bits, "is at least 248 x 2^120 in magnitude (its FP8 code would round to 2^128: infinity)", kNopeDim};
constexpr ValueLimit kIndexKeyLimit = {0x7B80, "exceeds 2^120 in magnitude", 1 << 30};

// The error for row `bad_row` of `in`, which the kernel refused: names the
// first offending dim and what is wrong with it.
absl::Status RejectedRow(absl::Span<const Bf16> in, int64_t bad_row, int dims, const ValueLimit& limit,
                         const char* what) {
  for (int i = 0; i < dims; ++i) {
    const Bf16 v = in[static_cast<size_t>(bad_row * dims + i)];
    const uint16_t magnitude = v.bits & 0x7FFF;
    if (magnitude <= (i < limit.rest_from ? limit.max_bits : kMaxFiniteBf16Bits)) continue;
    const std::string kind = magnitude > 0x7F80 ? "is NaN" : magnitude == 0x7F80 ? "is infinite"
                                                                                  : std::string(limit.limit);
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": input row ", bad_row, " dim ", i, " ", kind, " (bf16 bits 0x",
        absl::Hex(v.bits, absl::kZeroPad4), ")"));
  }
  return absl::InternalError(absl::StrCat(what, ": row ", bad_row, " rejected without cause"));
}

absl::Status CheckGatherIndices(absl::Span<const int64_t> rows, int64_t available) {
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] < 0 || rows[i] >= available) {
      return absl::OutOfRangeError(absl::StrCat("GatherDequantizeKvRows: rows[", i, "] = ",
                                                rows[i], " is outside [0, ", available, ")"));
    }
  }
  return absl::OkStatus();
}

template <typename Out>
absl::Status DequantizeKvRowsImpl(ConstPackedRows in, const int64_t* rows, int64_t count,
                                  absl::Span<Out> out, const char* what) {
  KVC_RETURN_IF_ERROR(CheckRows(in, RowFormat::kKvFp8, what));
  KVC_RETURN_IF_ERROR(CheckValueCount(out.size(), count, kHeadDim, what));
  if (count == 0) return absl::OkStatus();
  if constexpr (std::is_same<Out, float>::value) {
    HWY_DYNAMIC_DISPATCH(DequantizeKvRowsToF32)(in.data, in.data_stride, in.scales,
                                                in.scale_stride, rows, count, out.data());
  } else {
    HWY_DYNAMIC_DISPATCH(DequantizeKvRowsToBf16)(in.data, in.data_stride, in.scales,
                                                 in.scale_stride, rows, count, out.data());
  }
  return absl::OkStatus();
}

// Shared front end of the quantizing kernels: argument checks, dispatch, and
// the error for a row the kernel refused (values beyond `limit` or non-finite).
using QuantizeKernel = int64_t (*)(const Bf16*, int64_t, uint8_t*, int64_t, uint8_t*, int64_t);
absl::Status QuantizeRows(absl::Span<const Bf16> in, PackedRows out, RowFormat format, const ValueLimit& limit,
                          QuantizeKernel kernel, const char* what) {
  const int dims = FormatInfo(format).dims;
  KVC_RETURN_IF_ERROR(CheckRows(out, format, what));
  KVC_RETURN_IF_ERROR(CheckValueCount(in.size(), out.count, dims, what));
  if (out.count == 0) return absl::OkStatus();
  const int64_t bad = kernel(in.data(), out.count, out.data, out.data_stride, out.scales, out.scale_stride);
  if (bad >= 0) {
    const absl::Status rejected = RejectedRow(in, bad, dims, limit, what);
    return absl::InvalidArgumentError(absl::StrCat(rejected.message(), "; rows before it were written, it and later rows were not"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status QuantizeKvRows(absl::Span<const Bf16> in, PackedRows out) {
  return QuantizeRows(in, out, RowFormat::kKvFp8, kKvRowLimit, HWY_DYNAMIC_DISPATCH(QuantizeKvRows), "QuantizeKvRows");
}

absl::Status CheckKvRows(absl::Span<const Bf16> values, const char* what) {
  if (values.size() % kHeadDim != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", values.size(), " values are not whole rows of ", kHeadDim));
  }
  const int64_t rows = static_cast<int64_t>(values.size()) / kHeadDim;
  const int64_t bad = HWY_DYNAMIC_DISPATCH(FindUnstorableKvRow)(values.data(), rows);
  if (bad < 0) return absl::OkStatus();
  return RejectedRow(values, bad, kHeadDim, kKvRowLimit, what);
}

absl::Status CheckFiniteRows(absl::Span<const Bf16> values, int dims, const char* what) {
  if (dims <= 0 || dims % 64 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": rows of ", dims, " values; expected a multiple of 64"));
  }
  if (values.size() % static_cast<size_t>(dims) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", values.size(), " values are not whole rows of ", dims));
  }
  const int64_t rows = static_cast<int64_t>(values.size()) / dims;
  const int64_t bad = HWY_DYNAMIC_DISPATCH(FindNonFiniteRow)(values.data(), rows, dims);
  if (bad < 0) return absl::OkStatus();
  return RejectedRow(values, bad, dims, kAnyFinite, what);
}

absl::Status CheckFiniteF32(absl::Span<const float> values, int64_t width, const char* what) {
  const int64_t bad = HWY_DYNAMIC_DISPATCH(FindNonFiniteF32)(values.data(), static_cast<int64_t>(values.size()));
  if (bad < 0) return absl::OkStatus();
  const float x = values[static_cast<size_t>(bad)];
  return absl::InvalidArgumentError(absl::StrCat(what, " row ", bad / width, " column ", bad % width,
                                                 std::isnan(x) ? " is NaN" : " is infinite"));
}

absl::Status DequantizeKvRows(ConstPackedRows in, absl::Span<Bf16> out) {
  return DequantizeKvRowsImpl(in, nullptr, in.count, out, "DequantizeKvRows");
}

absl::Status DequantizeKvRows(ConstPackedRows in, absl::Span<float> out) {
  return DequantizeKvRowsImpl(in, nullptr, in.count, out, "DequantizeKvRows");
}

absl::Status GatherDequantizeKvRows(ConstPackedRows in, absl::Span<const int64_t> rows,
                                    absl::Span<Bf16> out) {
  KVC_RETURN_IF_ERROR(CheckGatherIndices(rows, in.count));
  return DequantizeKvRowsImpl(in, rows.data(), static_cast<int64_t>(rows.size()), out,
                              "GatherDequantizeKvRows");
}

absl::Status GatherDequantizeKvRows(ConstPackedRows in, absl::Span<const int64_t> rows,
                                    absl::Span<float> out) {
  KVC_RETURN_IF_ERROR(CheckGatherIndices(rows, in.count));
  return DequantizeKvRowsImpl(in, rows.data(), static_cast<int64_t>(rows.size()), out,
                              "GatherDequantizeKvRows");
}

absl::Status QuantizeIndexKeys(absl::Span<const Bf16> in, PackedRows out) {
  return QuantizeRows(in, out, RowFormat::kIndexFp4, kIndexKeyLimit, HWY_DYNAMIC_DISPATCH(QuantizeIndexKeys),
                      "QuantizeIndexKeys");
}

absl::Status DequantizeIndexKeys(ConstPackedRows in, absl::Span<float> out) {
  constexpr const char* kWhat = "DequantizeIndexKeys";
  KVC_RETURN_IF_ERROR(CheckRows(in, RowFormat::kIndexFp4, kWhat));
  KVC_RETURN_IF_ERROR(CheckValueCount(out.size(), in.count, kIndexDim, kWhat));
  for (int64_t r = 0; r < in.count; ++r) {
    DequantizeIndexKeyRef(in.row_data(r), in.row_scales(r), out.data() + r * kIndexDim);
  }
  return absl::OkStatus();
}

std::vector<int64_t> SimdTargets() { return hwy::SupportedAndGeneratedTargets(); }

std::string ActiveSimdTargetName() {
  return hwy::TargetName(HWY_DYNAMIC_DISPATCH(TargetForDispatch)());
}

std::string SimdTargetName(int64_t target) { return hwy::TargetName(target); }

}  // namespace kvc
#endif  // HWY_ONCE
