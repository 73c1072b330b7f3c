// SIMD kernels behind indexer.h: index scores and the top-k filter.
// Compiled once per Highway target.
//
// Scores: lanes are keys (a vector of N keys is scored against one head at
// a time), so the per-block scaling runs once per N keys; the arithmetic and
// how it avoids every subnormal fp32 operation while reproducing
// IndexScoreRef's bits are in src/indexer_layout.h. Per key group:
//   1. the keys' codes in the target's layout (AVX3_DL: 64 keys transposed
//      and decoded to unsigned bytes for vpdpbusd, 2*E2M1 + 12, or when every
//      block exponent of the group is within 3 of its key's smallest,
//      2*E2M1 * 2^d_b + 96, so one accumulator per head runs over all four
//      blocks; elsewhere the codes as exact floats), and per lane the key's
//      block exponents;
//   2. per lane the path (fast, scaled by 2^sigma, or fp64 emulation) and the
//      block scale exponents to add;
//   3. per active head: the 4 exact block sums, scaled in the exponent
//      domain, summed in order, relu, times the weight, into running sum
//      h mod 16; then the halving, and (scaled path) the unscaling.
// Identical bits on every target.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/indexer_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kvc/indexer.h"
#include "src/indexer_layout.h"

#include "src/fp_exact.h"

HWY_BEFORE_NAMESPACE();
namespace kvc {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using DU = hn::RebindToUnsigned<DF>;
using VF = hn::Vec<DF>;
using VI = hn::Vec<DI>;
using MI = hn::Mask<DI>;

constexpr int kMaxLanes = HWY_MAX_BYTES / 4;
constexpr int32_t kBig = 1 << 20;

// IndexScoreRef of one key, emulated in fp64 with explicit fp32 rounding:
// for keys whose block scales span more than the scaled path holds.
float ScoreKeyEmulated(const IndexQuery& q, const uint8_t* codes, const uint8_t* scales) {
  double partial[16] = {};
  for (int h = 0; h < q.heads(); ++h) {
    const IndexKeyFp4& stored = q.stored(h);
    double s = 0.0;
    for (int b = 0; b < 4; ++b) {
      int acc = 0;
      for (int e = 32 * b; e < 32 * b + 32; ++e) {
        acc += kTwiceE2M1[(stored.codes[e / 2] >> (4 * (e & 1))) & 0xF] * kTwiceE2M1[(codes[e / 2] >> (4 * (e & 1))) & 0xF];
      }
      const int exponent = stored.scales[b] - 129 + scales[b] - 127;  // fl(s_q/4 * s_k): 0 below 2^-149
      const double t = exponent >= -149 ? std::ldexp(static_cast<double>(acc), exponent) : 0.0;  // an fp32 value
      s = fp_exact::RoundToF32(s + t);
    }
    const double relu = s > 0.0 ? s : 0.0;
    const double w = fp_exact::FromF32(q.weights()[h]);
    partial[h % 16] = fp_exact::RoundToF32(partial[h % 16] + fp_exact::RoundToF32(relu * w));
  }
  for (int width = 8; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) partial[k] = fp_exact::RoundToF32(partial[k] + partial[k + width]);
  }
  return fp_exact::ToF32(partial[0]);
}

// Per key group: each lane's path and the exponents its blocks add.
struct GroupSetup {
  VI key_bits[4];  // (ke' + sigma) << 23 per lane and block
  VI sigma;        // 0 (fast lanes) or the lane's scaling exponent
  VI relu_min_field;  // sigma + 128: see WeightedRelu
  VI underflow;    // (sigma - 22) << 23: a block scale field below it is fl(...) = 0 (scaled path)
  bool scaled = false;
  // Integer block sums (src/indexer_layout.h): per lane and block the shift
  // ke_b - ke_min, and ke_min << 23; usable when every lane's shifts plus the
  // query's are at most 9.
  VI key_shift[4];
  VI min_key_bits;
#if HWY_TARGET != HWY_SCALAR
  // Scaled path: per half of the lanes, in fp64, 2^(sigma-126) (the top of
  // the reference's subnormal range, scaled) and 2^(sigma-149+52) (whose ulp
  // is its grid): WeightedRelu's constants, once per group.
  hn::Vec<hn::Rebind<double, hn::Half<DF>>> grid_top[2], grid_c[2];
#endif
  bool integer_sums = false;
  // Integer sums with every lane's shifts at most 3: the shifts can ride in
  // the key bytes themselves (AVX3_DL's prescaled keys).
  bool prescalable = false;
};

// From the lanes' block scale bytes and zero-block masks. Returns false if
// some lane can take neither the fast nor the scaled path.
HWY_INLINE bool SetupGroup(const IndexQueryScoringView& v, const VI* bytes, const MI* zero, GroupSetup* g) {
  const DI di;
  const VI big = hn::Set(di, kBig), small = hn::Set(di, -kBig);
  VI kmin = big, kmax = small, ke[4];
  for (int b = 0; b < 4; ++b) {
    ke[b] = hn::Sub(bytes[b], hn::Set(di, 127));
    kmin = hn::Min(kmin, hn::IfThenElse(zero[b], big, ke[b]));
    kmax = hn::Max(kmax, hn::IfThenElse(zero[b], small, ke[b]));
  }
  const MI all_zero = hn::Eq(kmin, big);
  const MI fast = hn::Or(all_zero, v.fast_allowed ? hn::Gt(kmin, hn::Set(di, v.fast_min_key_exp - 1)) : hn::FirstN(di, 0));
  const VI wanted = hn::Max(hn::Set(di, 23), hn::Sub(hn::Set(di, -126 - v.min_q_exp), kmin));
  g->sigma = hn::IfThenZeroElse(fast, wanted);
  g->relu_min_field = hn::Add(g->sigma, hn::Set(di, 128));  // every group: see grid_top below
  const MI feasible = hn::Or(fast, hn::Lt(hn::Add(kmax, g->sigma), hn::Set(di, v.key_exp_limit + 1)));
  if (!hn::AllTrue(di, feasible)) return false;
  g->scaled = !v.fast_allowed || !hn::AllTrue(di, fast);
  const VI zero_exp = hn::IfThenElse(all_zero, hn::Set(di, v.neutral_key_exp), kmin);
  for (int b = 0; b < 4; ++b) {
    g->key_bits[b] = hn::ShiftLeft<23>(hn::Add(hn::IfThenElse(zero[b], zero_exp, ke[b]), g->sigma));
  }
  g->underflow = hn::ShiftLeft<23>(hn::Sub(g->sigma, hn::Set(di, 22)));
#if HWY_TARGET != HWY_SCALAR
  // Set for every group, scaled or not: a group of key vectors is scored on
  // the scaled path when any of its vectors needs it, and then a fast
  // vector's lanes (sigma 0) read these too (2^-126 and 2^-97: no change).
  {
    const hn::Half<DF> dh;
    const hn::Rebind<double, decltype(dh)> dd;
    const hn::Rebind<int64_t, decltype(dh)> di64;
    const hn::Rebind<int32_t, decltype(dh)> dh32;
    const hn::Vec<decltype(dh32)> halves[2] = {hn::LowerHalf(dh32, g->sigma), hn::UpperHalf(dh32, g->sigma)};
    for (int half = 0; half < 2; ++half) {
      const auto sig = hn::PromoteTo(di64, halves[half]);
      g->grid_top[half] = hn::BitCast(dd, hn::ShiftLeft<52>(hn::Add(sig, hn::Set(di64, 1023 - 126))));
      g->grid_c[half] = hn::BitCast(dd, hn::ShiftLeft<52>(hn::Add(sig, hn::Set(di64, 1023 - 126 + 29))));
    }
  }
#endif
  if (!g->scaled && v.max_q_shift >= 0) {
    VI widest = hn::Zero(di);
    for (int b = 0; b < 4; ++b) {
      g->key_shift[b] = hn::IfThenZeroElse(hn::Or(zero[b], all_zero), hn::Sub(ke[b], kmin));
      widest = hn::Max(widest, g->key_shift[b]);
    }
    g->min_key_bits = hn::ShiftLeft<23>(zero_exp);
    g->integer_sums = hn::AllTrue(di, hn::Lt(widest, hn::Set(di, 9 - v.max_q_shift + 1)));
    g->prescalable = g->integer_sums && hn::AllTrue(di, hn::Lt(widest, hn::Set(di, 4)));
  }
  return true;
}

// t = acc * fl(s_q/4 * s_k) for one block: the scale's fp32 bits are the
// head's exponent bits plus the lane's; in the scaled path a block whose
// unscaled exponent is below -149 contributes +0 (the reference's scale
// product rounds to 0).
template <bool kScaled>
HWY_INLINE VF BlockTerm(VF acc, int32_t head_bits, const GroupSetup& g, int b) {
  const DF df;
  const DI di;
  const VI bits = hn::Add(hn::Set(di, head_bits), g.key_bits[b]);
  const VF t = hn::Mul(acc, hn::BitCast(df, bits));
  if (!kScaled) return t;
  return hn::IfThenZeroElse(hn::RebindMask(df, hn::Lt(bits, g.underflow)), t);
}

// relu * w. Scaled path: the reference rounds products below 2^-126 to the
// grid 2^-149, i.e. 2^(sigma-149) here; the product is exact in fp64, where
// that rounding is an addition and a subtraction.
template <bool kScaled>
HWY_INLINE VF WeightedRelu(VF s, float w, double w64, const GroupSetup& g) {
  const DF df;
  const VF relu = hn::Max(s, hn::Zero(df));
  if (!kScaled) return hn::Mul(relu, hn::Set(df, w));
#if HWY_TARGET == HWY_SCALAR
  const double x = static_cast<double>(hn::GetLane(relu)) * w64;
  const int sigma = hn::GetLane(g.sigma);
  const double grid_top = std::ldexp(1.0, sigma - 126);
  const double a = std::fabs(x);
  const double c = std::ldexp(1.0, sigma - 126 + 29);  // 2^(sigma-149+52): ulp 2^(sigma-149)
  const double y = a < grid_top ? std::copysign((a + c) - c, x) : x;
  return hn::Set(df, static_cast<float>(y));
#else
  // Every lane 0 or with relu and w normal and the exact product at least
  // 2^(sigma-126) (2^-126 unscaled: normal in the reference, so rounded as
  // fp32's multiply rounds it, with no subnormal operand or result): the
  // field test relu_field + w_field - 254 >= sigma - 126. Tiny keys' scores
  // usually pass; the rest take fp64, where gridding is exact.
  const DI di;
  const int w_field = static_cast<int>((F32Bits(w) >> 23) & 0xFF);
  if (w_field != 0) {
    const VI bits = hn::BitCast(di, relu);
    const VI field = hn::ShiftRight<23>(hn::And(bits, hn::Set(di, 0x7F800000)));
    const VI need = hn::Max(hn::Sub(g.relu_min_field, hn::Set(di, w_field)), hn::Set(di, 1));
    const auto ok = hn::Or(hn::Eq(hn::And(bits, hn::Set(di, 0x7FFFFFFF)), hn::Zero(di)), hn::Gt(hn::Add(field, hn::Set(di, 1)), need));  // field >= need
    if (hn::AllTrue(di, ok)) return hn::Mul(relu, hn::Set(df, w));
  }
  const hn::Half<DF> dh;
  const hn::Rebind<double, decltype(dh)> dd;
  auto half_product = [&](hn::Vec<decltype(dh)> r, int half) {
    const auto x = hn::Mul(hn::PromoteTo(dd, r), hn::Set(dd, w64));
    const auto a = hn::Abs(x);
    const auto c = g.grid_c[half];
    const auto gridded = hn::CopySignToAbs(hn::Sub(hn::Add(a, c), c), x);
    return hn::DemoteTo(dh, hn::IfThenElse(hn::Lt(a, g.grid_top[half]), gridded, x));
  };
  const auto lo = half_product(hn::LowerHalf(dh, relu), 0);
  const auto hi = half_product(hn::UpperHalf(dh, relu), 1);
  return hn::Combine(df, hi, lo);
#endif
}

// The scaled path's score (on the 2^(sigma-149) grid, scaled by 2^sigma)
// back to its fp32 bits, with integer operations.
HWY_INLINE VF Unscale(VF scaled, VI sigma) {
  const DF df;
  const DU du;
  const DI di;
  const auto u = hn::BitCast(du, scaled);
  const auto sign = hn::And(u, hn::Set(du, 0x80000000u));
  const VI field = hn::BitCast(di, hn::ShiftRight<23>(hn::And(u, hn::Set(du, 0x7F800000u))));
  const VI new_field = hn::Sub(field, sigma);
  const auto normal = hn::Sub(u, hn::BitCast(du, hn::ShiftLeft<23>(sigma)));
  // Subnormal result: the significand shifted right by 1 - new_field (exact).
  const auto significand = hn::Or(hn::And(u, hn::Set(du, 0x7FFFFFu)), hn::Set(du, 0x800000u));
  const VI shift = hn::Max(hn::Min(hn::Sub(hn::Set(di, 1), new_field), hn::Set(di, 31)), hn::Zero(di));
  const auto sub = hn::Or(sign, hn::Shr(significand, hn::BitCast(du, shift)));
  const auto is_zero = hn::Eq(hn::And(u, hn::Set(du, 0x7FFFFFFFu)), hn::Zero(du));
  const auto result = hn::IfThenElse(hn::RebindMask(du, hn::Gt(new_field, hn::Zero(di))), normal, sub);
  return hn::BitCast(df, hn::IfThenElse(is_zero, u, result));
}

// Running sums 0..15 halved into the score of each lane.
HWY_INLINE VF Halve(VF* partial) {
  for (int width = 8; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) partial[k] = hn::Add(partial[k], partial[k + width]);
  }
  return partial[0];
}

#if HWY_TARGET == HWY_AVX3_DL
// Highway's AVX3_DL target string enables the 256-bit AVX-VNNI but not the
// 512-bit AVX512-VNNI, though Highway picks AVX3_DL only on CPUs that have it.
// The key loop is compiled for both (a superset of the target, so Highway ops
// still inline into it).
#define KVC_VNNI512 __attribute__((target(HWY_TARGET_STR ",avx512vnni")))

// How a key group's four block sums of a head are combined:
//   kFloat: each block sum converted and scaled on its own (any exponents);
//   kInteger: block sums shifted by the lane's d_b and added as integers;
//   kPrescaled: the keys' bytes already carry 2^d_b, one accumulator for all
//     128 codes (no per-block work at all).
enum class BlockSums { kFloat, kInteger, kPrescaled };

// Keys in the VNNI layout: for key vector kv and group g (codes 4g..4g+3),
// 16 lanes (keys) of 4 unsigned bytes, 2*E2M1 + 12 (kFloat, kInteger) or
// 2*E2M1 * 2^d_b + 96 (kPrescaled, d_b <= 3: 0..192). Built in two steps, as
// the encoding depends on both key vectors' setup: a 16 x 16 transpose of the
// packed keys' dwords (columns), then each dword's 8 nibbles -> two groups'
// bytes (vpmultishiftqb picks nibbles, vpermb maps them).
constexpr int kMaxKv = 4;  // key vectors scored together: 64 keys
struct VnniKeys {
  alignas(64) uint8_t u8[kMaxKv][32][64];
  alignas(64) uint8_t column[kMaxKv][16][64];  // column d, lane i: dword d of key i's packed codes
  VI bytes[kMaxKv][4];
  MI zero[kMaxKv][4];
};

KVC_VNNI512 HWY_INLINE void TransposeVnniKeys(const uint8_t* codes, int64_t code_stride, const uint8_t* scales,
                                             int64_t scale_stride, int64_t count, int kv, VnniKeys* keys) {
  __m512i r[16];
  __m512i all_scales;  // lane i: key i's 4 scale bytes
  if (count >= 16) {
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(codes + i * code_stride);
    if (scale_stride == 4) {  // the page-footer layout: 64 contiguous bytes
      all_scales = _mm512_loadu_si512(scales);
    } else {
      alignas(64) uint32_t scale_words[16];
      for (int i = 0; i < 16; ++i) std::memcpy(&scale_words[i], scales + i * scale_stride, 4);
      all_scales = _mm512_load_si512(scale_words);
    }
  } else {
    alignas(64) uint32_t scale_words[16] = {};
    for (int i = 0; i < 16; ++i) {
      r[i] = i < count ? _mm512_loadu_si512(codes + i * code_stride) : _mm512_setzero_si512();
      if (i < count) std::memcpy(&scale_words[i], scales + i * scale_stride, 4);
    }
    all_scales = _mm512_load_si512(scale_words);
  }
  __m512i t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  // u[4k + x], 128-bit lane L: dword 4L + x of keys 4k..4k+3. Transpose the
  // 128-bit lanes: column d = 4L + x gets lane k from u[4k + x].
  __m512i column[16];
  for (int x = 0; x < 4; ++x) {
    const __m512i w0 = _mm512_shuffle_i32x4(u[x], u[4 + x], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(u[x], u[4 + x], 0xEE);
    const __m512i w2 = _mm512_shuffle_i32x4(u[8 + x], u[12 + x], 0x44);
    const __m512i w3 = _mm512_shuffle_i32x4(u[8 + x], u[12 + x], 0xEE);
    column[x] = _mm512_shuffle_i32x4(w0, w2, 0x88);
    column[4 + x] = _mm512_shuffle_i32x4(w0, w2, 0xDD);
    column[8 + x] = _mm512_shuffle_i32x4(w1, w3, 0x88);
    column[12 + x] = _mm512_shuffle_i32x4(w1, w3, 0xDD);
  }
  for (int d = 0; d < 16; ++d) _mm512_store_si512(keys->column[kv][d], column[d]);
  // Block b is codes 32b..32b+31: packed dwords 4b..4b+3. Zero codes are
  // nibbles 0 and 8.
  const __m512i magnitude = _mm512_set1_epi32(0x77777777);
  for (int b = 0; b < 4; ++b) {
    const __m512i any = _mm512_or_si512(_mm512_or_si512(column[4 * b], column[4 * b + 1]),
                                        _mm512_or_si512(column[4 * b + 2], column[4 * b + 3]));
    keys->zero[kv][b] = MI{_mm512_testn_epi32_mask(any, magnitude)};
    keys->bytes[kv][b] = VI{_mm512_and_si512(_mm512_srli_epi32(all_scales, 8 * b), _mm512_set1_epi32(0xFF))};
  }
}

// vpermb's table for prescaled keys: entry 16d + n is 96 + 2*E2M1(n) * 2^d.
struct PrescaledTable {
  alignas(64) uint8_t bytes[64];
};
constexpr PrescaledTable MakePrescaledTable() {
  PrescaledTable t{};
  for (int i = 0; i < 64; ++i) t.bytes[i] = static_cast<uint8_t>(96 + kTwiceE2M1[i & 15] * (1 << (i >> 4)));
  return t;
}
constexpr PrescaledTable kPrescaledTable = MakePrescaledTable();

// Columns -> bytes. `prescale`: the group's setup whose key_shift (d_b <= 3
// per lane) the bytes carry (kPrescaled), or nullptr (2*E2M1 + 12).
KVC_VNNI512 HWY_INLINE void EncodeVnniKeys(int kv, const GroupSetup* prescale, VnniKeys* keys) {
  // vpermb indexes 64 bytes by the low 6 bits: nibble in bits 0-3; for
  // prescaled keys the shift d in bits 4-5 picks the table's quarter d.
  const __m512i plain = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i table = prescale != nullptr ? _mm512_load_si512(kPrescaledTable.bytes) : plain;
  const __m512i low_groups = _mm512_set1_epi64(0x2C2824200C080400LL);   // nibbles 0-3 of each dword
  const __m512i high_groups = _mm512_set1_epi64(0x3C3834301C181410LL);  // nibbles 4-7
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int b = 0; b < 4; ++b) {
    // Each byte: d_b << 4 of its lane (0 for plain keys).
    const __m512i quarter = prescale != nullptr
                                ? _mm512_mullo_epi32(prescale->key_shift[b].raw, _mm512_set1_epi32(0x10101010))
                                : _mm512_setzero_si512();
    for (int d = 4 * b; d < 4 * b + 4; ++d) {
      const __m512i column = _mm512_load_si512(keys->column[kv][d]);
      // (picked & 0x0F) | quarter
      const __m512i lo = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(low_groups, column), nibble, quarter, 0xEA);
      const __m512i hi = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(high_groups, column), nibble, quarter, 0xEA);
      _mm512_store_si512(keys->u8[kv][2 * d], _mm512_permutexvar_epi8(lo, table));
      _mm512_store_si512(keys->u8[kv][2 * d + 1], _mm512_permutexvar_epi8(hi, table));
    }
  }
}

// s = fl(sum * 2^(head's min exponent + key lane's min exponent)): an exact
// integer block sum (prescaled or shifted) converted once and scaled by the
// fp32 whose bits are the head's exponent bits plus the lane's.
template <int kSlots, int kKv>
KVC_VNNI512 HWY_INLINE void ScaleIntegerSums(const IndexQueryScoringView& v, int first, const GroupSetup* setup,
                                            const __m512i (&sum)[kSlots][kKv], VF (&s)[kSlots][kKv]) {
  for (int i = 0; i < kSlots; ++i) {
    const __m512i head_bits = _mm512_set1_epi32(v.min_scale_bits[first + i]);
    for (int kv = 0; kv < kKv; ++kv) {
      const __m512 scale = _mm512_castsi512_ps(_mm512_add_epi32(head_bits, setup[kv].min_key_bits.raw));
      s[i][kv] = VF{_mm512_mul_ps(_mm512_cvtepi32_ps(sum[i][kv]), scale)};
    }
  }
}

// Scores the slots [first, first + kSlots) of one running sum against kKv
// key vectors, adding relu * w into partial[kv] in slot order, the block
// sums combined as kSums says.
template <int kSlots, int kKv, bool kScaled, BlockSums kSums>
KVC_VNNI512 HWY_INLINE void ScoreSlotsVnni(const IndexQueryScoringView& v, int first, const uint8_t* key_u8,
                                          const GroupSetup* setup, VF* partial) {
  // The key vectors are read from L1 for every chunk of slots: hide the
  // pointer, or GCC hoists all 64 loads out of the slot loop and spills them.
  asm volatile("" : "+r"(key_u8));
  VF s[kSlots][kKv];
  if constexpr (kSums == BlockSums::kPrescaled) {
    // One accumulator per slot and key vector over all 32 groups, starting
    // at -96 * Σ shifted codes (undoing the keys' +96); the exact integer
    // Σ_b acc_b * 2^(d_b + q_b), then one conversion and scale.
    __m512i acc[kSlots][kKv];
    for (int i = 0; i < kSlots; ++i) {
      const __m512i start = _mm512_set1_epi32(v.offset_prescaled[first + i]);
      for (int kv = 0; kv < kKv; ++kv) acc[i][kv] = start;
    }
#pragma GCC unroll 32
    for (int g = 0; g < 32; ++g) {
      __m512i key[kKv];
      for (int kv = 0; kv < kKv; ++kv) key[kv] = _mm512_load_si512(key_u8 + (kv * 32 + g) * 64);
      for (int i = 0; i < kSlots; ++i) {
        int32_t four;
        std::memcpy(&four, v.codes_shifted + static_cast<size_t>(first + i) * 128 + 4 * g, 4);
        const __m512i q4 = _mm512_set1_epi32(four);
        for (int kv = 0; kv < kKv; ++kv) acc[i][kv] = _mm512_dpbusd_epi32(acc[i][kv], key[kv], q4);
      }
    }
    ScaleIntegerSums<kSlots, kKv>(v, first, setup, acc, s);
  } else {
    constexpr bool kIntSums = kSums == BlockSums::kInteger;
    const int8_t* codes = kIntSums ? v.codes_shifted : v.codes;
    const int32_t* offsets = kIntSums ? v.offset_shifted : v.offset;
    __m512i sum[kSlots][kKv];
    // Fully unrolled, so that the accumulators stay in registers (a rolled
    // group loop made GCC copy them between registers every iteration).
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) {
      // Each block sum starts at -12 * Σ codes (undoing the keys' +12), so no
      // subtraction per head and block.
      __m512i acc[kSlots][kKv];
      for (int i = 0; i < kSlots; ++i) {
        const __m512i start = _mm512_set1_epi32(offsets[static_cast<size_t>(first + i) * 4 + static_cast<size_t>(b)]);
        for (int kv = 0; kv < kKv; ++kv) acc[i][kv] = start;
      }
#pragma GCC unroll 8
      for (int g = 8 * b; g < 8 * b + 8; ++g) {
        __m512i key[kKv];
        for (int kv = 0; kv < kKv; ++kv) key[kv] = _mm512_load_si512(key_u8 + (kv * 32 + g) * 64);
        for (int i = 0; i < kSlots; ++i) {
          int32_t four;
          std::memcpy(&four, codes + static_cast<size_t>(first + i) * 128 + 4 * g, 4);
          const __m512i q4 = _mm512_set1_epi32(four);
          for (int kv = 0; kv < kKv; ++kv) acc[i][kv] = _mm512_dpbusd_epi32(acc[i][kv], key[kv], q4);
        }
      }
      for (int i = 0; i < kSlots; ++i) {
        const size_t at = static_cast<size_t>(first + i) * 4 + static_cast<size_t>(b);
        for (int kv = 0; kv < kKv; ++kv) {
          if (kIntSums) {
            const __m512i t = _mm512_sllv_epi32(acc[i][kv], setup[kv].key_shift[b].raw);
            sum[i][kv] = b == 0 ? t : _mm512_add_epi32(sum[i][kv], t);
          } else {
            const VF exact = VF{_mm512_cvtepi32_ps(acc[i][kv])};
            const VF t = BlockTerm<kScaled>(exact, v.scale_bits[at], setup[kv], b);
            s[i][kv] = b == 0 ? t : hn::Add(s[i][kv], t);
          }
        }
      }
    }
    if (kIntSums) ScaleIntegerSums<kSlots, kKv>(v, first, setup, sum, s);
  }
  for (int i = 0; i < kSlots; ++i) {
    for (int kv = 0; kv < kKv; ++kv) {
      partial[kv] = hn::Add(partial[kv], WeightedRelu<kScaled>(s[i][kv], v.weight[first + i], v.weight_f64[first + i], setup[kv]));
    }
  }
}

// Key vectors [kv0, kv0 + kKv) of `keys` into partial[kv0 ...].
template <int kKv, bool kScaled, BlockSums kSums>
KVC_VNNI512 void ScoreGroupVnni(const IndexQueryScoringView& v, const VnniKeys& keys, int kv0, const GroupSetup* all_setup,
                                VF (*all_partial)[16]) {
  const DF df;
  const uint8_t* key_u8 = &keys.u8[kv0][0][0];
  const GroupSetup* setup = all_setup + kv0;
  VF(*partial)[16] = all_partial + kv0;
  for (int p = 0; p < 16; ++p) {
    VF sum[kKv];
    for (int kv = 0; kv < kKv; ++kv) sum[kv] = hn::Zero(df);
    int slot = v.group_begin[p];
    const int end = v.group_begin[p + 1];
    for (; slot + 4 <= end; slot += 4) ScoreSlotsVnni<4, kKv, kScaled, kSums>(v, slot, key_u8, setup, sum);
    if (end - slot == 3) ScoreSlotsVnni<3, kKv, kScaled, kSums>(v, slot, key_u8, setup, sum);
    if (end - slot == 2) ScoreSlotsVnni<2, kKv, kScaled, kSums>(v, slot, key_u8, setup, sum);
    if (end - slot == 1) ScoreSlotsVnni<1, kKv, kScaled, kSums>(v, slot, key_u8, setup, sum);
    for (int kv = 0; kv < kKv; ++kv) partial[kv][p] = sum[kv];
  }
}

// The kvs key vectors of a group. Prescaled keys are scored four vectors
// (16 accumulators) at a time; the other paths keep per-block state beside
// the accumulators and take two at a time (four would spill).
KVC_VNNI512 void ScoreGroupVnniDispatch(int kvs, bool scaled, BlockSums sums, const IndexQueryScoringView& v,
                                        const VnniKeys& keys, const GroupSetup* setup, VF (*partial)[16]) {
  if (!scaled && sums == BlockSums::kPrescaled) {
    switch (kvs) {
      case 4: return ScoreGroupVnni<4, false, BlockSums::kPrescaled>(v, keys, 0, setup, partial);
      case 3: return ScoreGroupVnni<3, false, BlockSums::kPrescaled>(v, keys, 0, setup, partial);
      case 2: return ScoreGroupVnni<2, false, BlockSums::kPrescaled>(v, keys, 0, setup, partial);
      default: return ScoreGroupVnni<1, false, BlockSums::kPrescaled>(v, keys, 0, setup, partial);
    }
  }
  for (int kv0 = 0; kv0 < kvs; kv0 += 2) {
    const bool pair = kvs - kv0 >= 2;
    if (scaled) {
      pair ? ScoreGroupVnni<2, true, BlockSums::kFloat>(v, keys, kv0, setup, partial)
           : ScoreGroupVnni<1, true, BlockSums::kFloat>(v, keys, kv0, setup, partial);
    } else if (sums == BlockSums::kInteger) {
      pair ? ScoreGroupVnni<2, false, BlockSums::kInteger>(v, keys, kv0, setup, partial)
           : ScoreGroupVnni<1, false, BlockSums::kInteger>(v, keys, kv0, setup, partial);
    } else {
      pair ? ScoreGroupVnni<2, false, BlockSums::kFloat>(v, keys, kv0, setup, partial)
           : ScoreGroupVnni<1, false, BlockSums::kFloat>(v, keys, kv0, setup, partial);
    }
  }
}

KVC_VNNI512 void ScoreKeysVnni(const IndexQueryScoringView& v, const IndexQuery& q, const uint8_t* codes,
                               int64_t code_stride, const uint8_t* scales, int64_t scale_stride, int64_t n, float* out) {
  constexpr int kKv = kMaxKv;
  VnniKeys keys;
  for (int64_t j = 0; j < n; j += 16 * kKv) {
    const int64_t count = n - j < 16 * kKv ? n - j : 16 * kKv;
    const int kvs = static_cast<int>((count + 15) / 16);
    // The next group's codes and scales, while this one is scored.
    for (int64_t k = j + 16 * kKv; k < std::min<int64_t>(n, j + 32 * kKv); ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(codes + k * code_stride), _MM_HINT_T0);
    }
    _mm_prefetch(reinterpret_cast<const char*>(scales + std::min<int64_t>(n - 1, j + 16 * kKv) * scale_stride), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(scales + std::min<int64_t>(n - 1, j + 32 * kKv - 1) * scale_stride), _MM_HINT_T0);
    GroupSetup setup[kKv];
    bool feasible = true, scaled = false;
    for (int kv = 0; kv < kvs; ++kv) {
      const int64_t first = j + 16 * kv;
      TransposeVnniKeys(codes + first * code_stride, code_stride, scales + first * scale_stride, scale_stride,
                        count - 16 * kv, kv, &keys);
      feasible = feasible && SetupGroup(v, keys.bytes[kv], keys.zero[kv], &setup[kv]);
      scaled = scaled || setup[kv].scaled;
    }
    if (!feasible) {
      for (int64_t k = j; k < j + count; ++k) out[k] = ScoreKeyEmulated(q, codes + k * code_stride, scales + k * scale_stride);
      continue;
    }
    bool integer_sums = !scaled, prescaled = !scaled;
    for (int kv = 0; kv < kvs; ++kv) {
      integer_sums = integer_sums && setup[kv].integer_sums;
      prescaled = prescaled && setup[kv].prescalable;
    }
    const BlockSums sums = prescaled ? BlockSums::kPrescaled : integer_sums ? BlockSums::kInteger : BlockSums::kFloat;
    for (int kv = 0; kv < kvs; ++kv) EncodeVnniKeys(kv, prescaled ? &setup[kv] : nullptr, &keys);
    VF partial[kKv][16];
    ScoreGroupVnniDispatch(kvs, scaled, sums, v, keys, setup, partial);
    for (int kv = 0; kv < kvs; ++kv) {
      VF score = Halve(partial[kv]);
      if (scaled) score = Unscale(score, setup[kv].sigma);
      const int64_t first = j + 16 * kv;
      const int64_t lanes = count - 16 * kv < 16 ? count - 16 * kv : 16;
      if (lanes == 16) {
        hn::StoreU(score, DF(), out + first);
      } else {
        HWY_ALIGN float tail[16];
        hn::Store(score, DF(), tail);
        for (int64_t i = 0; i < lanes; ++i) out[first + i] = tail[i];
      }
    }
  }
}
#endif  // HWY_TARGET == HWY_AVX3_DL

// Other targets: the keys' codes as exact floats, [128][N] per group; block
// sums by exact fp32 multiply-adds of small integers.
template <bool kScaled>
void ScoreGroupGeneric(const IndexQueryScoringView& v, const float* key_f, const GroupSetup& setup, VF* partial) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  for (int p = 0; p < 16; ++p) {
    VF sum = hn::Zero(df);
    for (int slot = v.group_begin[p]; slot < v.group_begin[p + 1]; ++slot) {
      const float* qc = v.codes_f32 + static_cast<size_t>(slot) * 128;
      VF s = hn::Zero(df);
      for (int b = 0; b < 4; ++b) {
        VF acc = hn::Zero(df);  // an exact integer in every lane
        for (int e = 32 * b; e < 32 * b + 32; ++e) acc = hn::MulAdd(hn::Load(df, key_f + static_cast<size_t>(e) * lanes), hn::Set(df, qc[e]), acc);
        const VF t = BlockTerm<kScaled>(acc, v.scale_bits[slot * 4 + b], setup, b);
        s = b == 0 ? t : hn::Add(s, t);
      }
      sum = hn::Add(sum, WeightedRelu<kScaled>(s, v.weight[slot], v.weight_f64[slot], setup));
    }
    partial[p] = sum;
  }
}

// Scores n keys (any strides) with the view `v` of query q.
void ScoreKeysWith(const IndexQueryScoringView& v, const IndexQuery& q, const uint8_t* codes, int64_t code_stride,
                   const uint8_t* scales, int64_t scale_stride, int64_t n, float* out) {
#if HWY_TARGET == HWY_AVX3_DL
  ScoreKeysVnni(v, q, codes, code_stride, scales, scale_stride, n, out);
#else
  const DF df;
  const DI di;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  HWY_ALIGN float key_f[128 * kMaxLanes];
  HWY_ALIGN int32_t bytes[4][kMaxLanes];
  HWY_ALIGN int32_t zero[4][kMaxLanes];
  HWY_ALIGN float score[kMaxLanes];
  for (int64_t j = 0; j < n; j += lanes) {
    const int64_t count = n - j < lanes ? n - j : lanes;
    for (int64_t i = 0; i < lanes; ++i) {
      const uint8_t* k = codes + (j + i) * code_stride;
      for (int b = 0; b < 4; ++b) {
        bool all_zero = true;
        for (int e = 32 * b; e < 32 * b + 32; ++e) {
          const int8_t c = i < count ? kTwiceE2M1[(k[e / 2] >> (4 * (e & 1))) & 0xF] : 0;
          key_f[static_cast<size_t>(e * lanes + i)] = c;
          all_zero = all_zero && c == 0;
        }
        bytes[b][i] = i < count ? scales[(j + i) * scale_stride + b] : 0;
        zero[b][i] = all_zero ? -1 : 0;
      }
    }
    VI byte_v[4];
    MI zero_m[4];
    for (int b = 0; b < 4; ++b) {
      byte_v[b] = hn::Load(di, bytes[b]);
      zero_m[b] = hn::Ne(hn::Load(di, zero[b]), hn::Zero(di));
    }
    GroupSetup setup;
    if (!SetupGroup(v, byte_v, zero_m, &setup)) {
      for (int64_t k = j; k < j + count; ++k) out[k] = ScoreKeyEmulated(q, codes + k * code_stride, scales + k * scale_stride);
      continue;
    }
    VF partial[16];
    setup.scaled ? ScoreGroupGeneric<true>(v, key_f, setup, partial) : ScoreGroupGeneric<false>(v, key_f, setup, partial);
    VF result = Halve(partial);
    if (setup.scaled) result = Unscale(result, setup.sigma);
    hn::Store(result, df, score);
    for (int64_t i = 0; i < count; ++i) out[j + i] = score[i];
  }
#endif
}

void ScoreKeys(const IndexQuery& q, const uint8_t* codes, int64_t code_stride, const uint8_t* scales,
               int64_t scale_stride, int64_t n, float* out) {
  ScoreKeysWith(IndexQueryScoringView(q), q, codes, code_stride, scales, scale_stride, n, out);
}

// Scores `count` pages of keys (page i's scores at out + i * keys_per_page),
// the query's view built once and the next page prefetched while one is
// scored: the cache's paged scoring without a call per page.
void ScoreKeyPages(const IndexQuery& q, const ConstPackedRows* pages, int64_t count, int64_t keys_per_page, float* out) {
  const IndexQueryScoringView v(q);
  for (int64_t i = 0; i < count; ++i) {
    if (i + 1 < count) {
      const ConstPackedRows& next = pages[i + 1];
      for (int64_t line = 0; line < next.count * next.data_stride; line += 64) __builtin_prefetch(next.data + line);
      for (int64_t line = 0; line < next.count * next.scale_stride; line += 64) __builtin_prefetch(next.scales + line);
    }
    const ConstPackedRows& page = pages[i];
    ScoreKeysWith(v, q, page.data, page.data_stride, page.scales, page.scale_stride, page.count, out + i * keys_per_page);
  }
}

// Writes the indices i with scores[i] >= threshold to `out` (room for n)
// and returns how many. Skips whole vectors of scores all below the threshold
// (NaN is not below it, so no NaN is skipped; only vectors with a hit or a NaN
// are looked at again); stops at the first NaN, setting *first_nan to its
// index (left alone otherwise). Compares integer keys that order like the
// scores (-0 = +0): no float compare meets a subnormal score.
HWY_INLINE VI OrderKeys(VF v) {
  const DI di;
  const VI bits = hn::BitCast(di, v);
  const VI negative = hn::Sub(hn::Set(di, static_cast<int32_t>(0x80000000u)), bits);  // -0 -> 0
  return hn::IfThenElse(hn::Lt(bits, hn::Zero(di)), negative, bits);
}
HWY_INLINE MI IsNaNBits(VF v) {
  const DI di;
  return hn::Gt(hn::And(hn::BitCast(di, v), hn::Set(di, 0x7FFFFFFF)), hn::Set(di, 0x7F800000));
}
inline int32_t OrderKey(float f) {
  const int32_t bits = static_cast<int32_t>(F32Bits(f));
  return bits >= 0 ? bits : static_cast<int32_t>(0x80000000u) - bits;
}

int64_t FilterAtLeast(const float* scores, int64_t n, float threshold, int64_t* out, int64_t* first_nan) {
  const DF df;
  const DI di;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int32_t t_key = OrderKey(threshold);
  const VI t = hn::Set(di, t_key);
  auto below = [&](VF v) { return hn::And(hn::Lt(OrderKeys(v), t), hn::Not(IsNaNBits(v))); };
  int64_t count = 0, i = 0;
  for (; i + 4 * lanes <= n; i += 4 * lanes) {
    const VF v0 = hn::LoadU(df, scores + i), v1 = hn::LoadU(df, scores + i + lanes);
    const VF v2 = hn::LoadU(df, scores + i + 2 * lanes), v3 = hn::LoadU(df, scores + i + 3 * lanes);
    if (hn::AllTrue(di, hn::And(hn::And(below(v0), below(v1)), hn::And(below(v2), below(v3))))) continue;
    if (!hn::AllFalse(di, hn::Or(hn::Or(IsNaNBits(v0), IsNaNBits(v1)), hn::Or(IsNaNBits(v2), IsNaNBits(v3))))) {
      for (int64_t k = i; k < i + 4 * lanes; ++k) {
        if ((F32Bits(scores[k]) & 0x7FFFFFFFu) > 0x7F800000u) {
          *first_nan = k;
          return count;
        }
      }
    }
    for (int64_t k = i; k < i + 4 * lanes; ++k) {
      if (OrderKey(scores[k]) >= t_key) out[count++] = k;
    }
  }
  for (; i < n; ++i) {
    if ((F32Bits(scores[i]) & 0x7FFFFFFFu) > 0x7F800000u) {
      *first_nan = i;
      return count;
    }
    if (OrderKey(scores[i]) >= t_key) out[count++] = i;
  }
  return count;
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kvc
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvc {

HWY_EXPORT(ScoreKeys);
HWY_EXPORT(ScoreKeyPages);
HWY_EXPORT(FilterAtLeast);

void ScoreKeyPagesDispatch(const IndexQuery& q, const ConstPackedRows* pages, int64_t count, int64_t keys_per_page,
                           float* out) {
  HWY_DYNAMIC_DISPATCH(ScoreKeyPages)(q, pages, count, keys_per_page, out);
}

void ScoreKeysDispatch(const IndexQuery& q, const uint8_t* codes, int64_t code_stride, const uint8_t* scales,
                       int64_t scale_stride, int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(ScoreKeys)(q, codes, code_stride, scales, scale_stride, n, out);
}

int64_t FilterAtLeastDispatch(const float* scores, int64_t n, float threshold, int64_t* out, int64_t* first_nan) {
  return HWY_DYNAMIC_DISPATCH(FilterAtLeast)(scores, n, threshold, out, first_nan);
}

}  // namespace kvc
#endif  // HWY_ONCE
