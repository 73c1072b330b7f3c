// SIMD kernels behind compressor.h (PoolChannels, NormRope), compiled once
// per Highway target. Each performs, per element, the fp32 operations of its
// scalar reference in the same order; the one reduction across channels
// (RMSNorm's sum of squares) uses the reference's canonical 16-sum order.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/compressor_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kvc/compressor.h"
#include "src/compressor_run.h"
#include "src/fp_exact.h"

#ifndef KVC_COMPRESSOR_KERNELS_SHARED_
#define KVC_COMPRESSOR_KERNELS_SHARED_
namespace kvc {
namespace compressor_exact {

// Pooling's weighting of one channel (PoolRef's last loop), emulated in
// fp64 (src/fp_exact.h): for channels where w = e / sum or w * kv would be
// subnormal. e: the slots' exp values (normal or 0), sum their sum.
inline float WeightedSumEmulated(const float* e, size_t e_stride, int n, float sum, const PoolSlot* slots, int64_t ch) {
  const double total = fp_exact::FromF32(sum);
  double acc = 0.0;
  for (int j = 0; j < n; ++j) {
    const double w = fp_exact::RoundToF32(fp_exact::FromF32(e[static_cast<size_t>(j) * e_stride]) / total);
    acc = fp_exact::RoundToF32(acc + fp_exact::RoundToF32(w * fp_exact::FromF32(slots[j].kv[ch])));
  }
  return fp_exact::ToF32(acc);
}

// NormRopeRef emulated in fp64, for rows whose fp32 intermediates could be
// subnormal.
inline void NormRopeEmulated(const float* pooled, int dim, const float* weight, float eps, const float* cos_sin, Bf16* out) {
  using fp_exact::RoundToF32;
  auto bf16 = [](double x) { return fp_exact::FromF32Bits(static_cast<uint32_t>(Bf16BitsFromF32(fp_exact::ToF32(x))) << 16); };
  double y[512];
  for (int i = 0; i < dim; ++i) y[i] = fp_exact::FromF32Bits(static_cast<uint32_t>(Bf16BitsFromF32(pooled[i])) << 16);
  double acc[16] = {};
  for (int i = 0; i < dim; ++i) acc[i % 16] = RoundToF32(acc[i % 16] + RoundToF32(y[i] * y[i]));
  for (int width = 8; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] = RoundToF32(acc[k] + acc[k + width]);
  }
  const double mean = RoundToF32(acc[0] / static_cast<double>(dim));
  const double r = RoundToF32(1.0 / RoundToF32(std::sqrt(RoundToF32(mean + fp_exact::FromF32(eps)))));
  for (int i = 0; i < dim; ++i) y[i] = bf16(RoundToF32(fp_exact::FromF32(weight[i]) * RoundToF32(y[i] * r)));
  double* rope = y + dim - 64;
  for (int j = 0; j < 32; ++j) {
    const double a = rope[2 * j], b = rope[2 * j + 1];
    const double c = fp_exact::FromF32(cos_sin[2 * j]), sn = fp_exact::FromF32(cos_sin[2 * j + 1]);
    rope[2 * j] = bf16(RoundToF32(RoundToF32(a * c) - RoundToF32(b * sn)));
    rope[2 * j + 1] = bf16(RoundToF32(RoundToF32(a * sn) + RoundToF32(b * c)));
  }
  for (int i = 0; i < dim; ++i) out[i] = Bf16{static_cast<uint16_t>(fp_exact::F32BitsOf(y[i]) >> 16)};
}

}  // namespace compressor_exact
}  // namespace kvc
#endif  // KVC_COMPRESSOR_KERNELS_SHARED_

HWY_BEFORE_NAMESPACE();
namespace kvc {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;
constexpr size_t kMaxLanes = HWY_MAX_BYTES / sizeof(float);

// SoftmaxExp, lane-wise, op for op, for lanes x >= -87, on kN vectors in
// place (x[i] <- exp(x[i])). Each step is issued for all kN vectors before
// the next: exp is a chain of ~20 dependent operations, and the out-of-order
// window alone kept too few chains in flight (pooling in cache 13-18 %
// slower one vector at a time).
template <size_t kN>
HWY_INLINE void ExpInRangeN(DF df, VF* HWY_RESTRICT x) {
  const hn::RebindToSigned<DF> di;
  const VF magic = hn::Set(df, 12582912.0f);  // 1.5 x 2^23
  // 2^n: t is 1.5 x 2^23 + n exactly (|n| <= 126), so its bits are those of
  // 1.5 x 2^23 plus n, and (bits(t) << 23) + ((127 - bits(1.5 x 2^23)) << 23)
  // (mod 2^32) is (n + 127) << 23: n's conversion to an integer, for free.
  const auto k = hn::Set(di, static_cast<int32_t>((127u - 0x4B400000u) << 23));
  VF r[kN], p[kN], scale[kN];
  for (size_t i = 0; i < kN; ++i) {
    const VF t = hn::Add(hn::Mul(x[i], hn::Set(df, 1.44269504088896341f)), magic);
    const VF n = hn::Sub(t, magic);
    scale[i] = hn::BitCast(df, hn::Add(hn::ShiftLeft<23>(hn::BitCast(di, t)), k));
    r[i] = hn::Sub(x[i], hn::Mul(n, hn::Set(df, 0.693359375f)));
    r[i] = hn::Sub(r[i], hn::Mul(n, hn::Set(df, -2.12194440e-4f)));
  }
  for (size_t i = 0; i < kN; ++i) p[i] = hn::Add(hn::Mul(hn::Set(df, 1.9875691500e-4f), r[i]), hn::Set(df, 1.3981999507e-3f));
  for (size_t i = 0; i < kN; ++i) p[i] = hn::Add(hn::Mul(p[i], r[i]), hn::Set(df, 8.3334519073e-3f));
  for (size_t i = 0; i < kN; ++i) p[i] = hn::Add(hn::Mul(p[i], r[i]), hn::Set(df, 4.1665795894e-2f));
  for (size_t i = 0; i < kN; ++i) p[i] = hn::Add(hn::Mul(p[i], r[i]), hn::Set(df, 1.6666665459e-1f));
  for (size_t i = 0; i < kN; ++i) p[i] = hn::Add(hn::Mul(p[i], r[i]), hn::Set(df, 5.0000001201e-1f));
  for (size_t i = 0; i < kN; ++i) {
    const VF y = hn::Add(hn::Add(hn::Mul(p[i], hn::Mul(r[i], r[i])), r[i]), hn::Set(df, 1.0f));
    x[i] = hn::Mul(y, scale[i]);
  }
}

// SoftmaxExp, lane-wise, op for op, on kN vectors in place.
template <size_t kN>
HWY_INLINE void ExpN(DF df, VF* HWY_RESTRICT x) {
  hn::Mask<DF> in_range[kN];
  for (size_t i = 0; i < kN; ++i) in_range[i] = hn::Ge(x[i], hn::Set(df, -87.0f));
  ExpInRangeN<kN>(df, x);
  for (size_t i = 0; i < kN; ++i) x[i] = hn::IfThenElseZero(in_range[i], x[i]);
}

// |v| below 2^-90 -> +0, by an integer compare (pooling's scores: see
// PoolChannels; the sign of a zero score never changes an exp).
HWY_INLINE VF FlushTiny(DF df, VF v) {
  const hn::RebindToSigned<DF> di;
  const auto a = hn::And(hn::BitCast(di, v), hn::Set(di, 0x7FFFFFFF));
  return hn::IfThenZeroElse(hn::RebindMask(df, hn::Lt(a, hn::Set(di, (127 - 90) << 23))), v);
}

// Pooling without a subnormal operation, bit-identical to PoolRef:
// - Scores: only e_j = SoftmaxExp(s_j - max) matters, and SoftmaxExp(x) is
//   exactly 1 for |x| < 2^-26. Setting scores, ape and s below 2^-90 to ±0
//   changes no e_j: such a value either leaves a sum unchanged (next to one
//   >= 2^-66) or everything it meets is below 2^-65, where every x it makes is
//   below 2^-26 either way. Then every sum and difference is 0 or a multiple
//   of 2^-113 (so normal);
//   x below 2^-26 is set to 0, and x is clamped at -87 before exp's
//   arithmetic (lanes below are zeroed anyway; further down, exp's scale
//   factor could be a tiny normal).
// - Weighting, fast: with every nonzero e >= 2^-117 (w = e / sum >= 2^-125,
//   sum <= 256) and every nonzero |w * kv| >= 2^-103 (so the running sums are
//   multiples of 2^-126), nothing is subnormal.
// - Weighting, scaled (channels where some e or product is smaller, e.g.
//   scores spread over ~60 or more): the running sum is kept scaled by
//   2^sigma (sums of scaled exact values round as the reference's, and its
//   subnormal sums are exact); each product carries the factor on kv, or on
//   e for the lanes with tiny e; the rare lanes where the reference's w or
//   w * kv is subnormal (rounded to 2^-149) are recomputed in fp64.
// - Subnormal kv: the fp64 emulation.
//
// kCheckInputs: returns false (out partly written) if some slot's kv or
// score + ape (s) is not finite in a channel; the scan costs three integer
// operations per slot and vector (Append's fast path checks the projections
// where pooling reads them).
template <bool kCheckInputs>
HWY_INLINE bool PoolChannelsImpl(const PoolSlot* slots, int n, int64_t ch_begin, int64_t ch_end, float* out) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const hn::RebindToUnsigned<DF> du;
  const size_t lanes = hn::Lanes(df);
  HWY_ALIGN float e_buf[256 * kMaxLanes];
  HWY_ALIGN float sum_buf[kMaxLanes];
  HWY_ALIGN float fix[kMaxLanes];
  HWY_ALIGN int32_t bad_lane[kMaxLanes];
  for (int64_t ch = ch_begin; ch < ch_end; ch += static_cast<int64_t>(lanes)) {
    VF max = hn::Set(df, -INFINITY);
    auto kv_min = hn::Set(du, 0xFFFFFFFFu);  // smallest nonzero |kv| bits - 1
    auto worst = hn::Zero(du);               // largest |s| or |kv| bits (kCheckInputs)
    for (int j = 0; j < n; ++j) {
      // A sum of two values that are 0 or >= 2^-90 is 0 or a multiple of
      // 2^-113: normal, and it needs no flush of its own. (Nor does the
      // flush change whether the sum is finite.)
      VF s = FlushTiny(df, hn::LoadU(df, slots[j].score + ch));
      if (slots[j].ape != nullptr) s = hn::Add(s, FlushTiny(df, hn::LoadU(df, slots[j].ape + ch)));
      hn::Store(s, df, e_buf + static_cast<size_t>(j) * lanes);
      max = hn::Max(max, s);
      const auto kv_abs = hn::And(hn::BitCast(du, hn::LoadU(df, slots[j].kv + ch)), hn::Set(du, 0x7FFFFFFFu));
      kv_min = hn::Min(kv_min, hn::Sub(kv_abs, hn::Set(du, 1u)));
      if (kCheckInputs) worst = hn::Max(worst, hn::Max(kv_abs, hn::And(hn::BitCast(du, s), hn::Set(du, 0x7FFFFFFFu))));
    }
    if (kCheckInputs && !hn::AllTrue(du, hn::Lt(worst, hn::Set(du, 0x7F800000u)))) return false;
    VF sum = hn::Zero(df);
    auto e_min = hn::Set(du, 0xFFFFFFFFu);  // smallest nonzero e bits - 1
    // e for kSlots slots from j, their exps interleaved (as PoolGroup's).
    const auto exp_slots = [&](auto slots_tag, int j) {
      constexpr size_t kSlots = decltype(slots_tag)::value;
      VF x[kSlots], e[kSlots];
      for (size_t q = 0; q < kSlots; ++q) {
        x[q] = hn::Sub(hn::Load(df, e_buf + (static_cast<size_t>(j) + q) * lanes), max);
        const auto tiny = hn::Lt(hn::And(hn::BitCast(di, x[q]), hn::Set(di, 0x7FFFFFFF)), hn::Set(di, (127 - 26) << 23));
        x[q] = hn::IfThenZeroElse(hn::RebindMask(df, tiny), x[q]);
        e[q] = hn::Max(x[q], hn::Set(df, -87.0f));
      }
      ExpN<kSlots>(df, e);
      for (size_t q = 0; q < kSlots; ++q) {
        e[q] = hn::IfThenZeroElse(hn::Lt(x[q], hn::Set(df, -87.0f)), e[q]);
        hn::Store(e[q], df, e_buf + (static_cast<size_t>(j) + q) * lanes);
        sum = hn::Add(sum, e[q]);
        e_min = hn::Min(e_min, hn::Sub(hn::BitCast(du, e[q]), hn::Set(du, 1u)));
      }
    };
    int first = 0;
    for (; first + 8 <= n; first += 8) exp_slots(std::integral_constant<size_t, 8>(), first);
    for (; first < n; ++first) exp_slots(std::integral_constant<size_t, 1>(), first);
    // Lane-wise exponent fields of the smallest nonzero e and |kv| (all-zero
    // lanes: 255, no bound).
    const auto field = [&](hn::Vec<decltype(du)> bits_minus_one) {
      return hn::BitCast(di, hn::ShiftRight<23>(hn::Add(bits_minus_one, hn::Set(du, 1u))));
    };
    const auto zero_e = hn::Eq(e_min, hn::Set(du, 0xFFFFFFFFu)), zero_kv = hn::Eq(kv_min, hn::Set(du, 0xFFFFFFFFu));
    const auto e_field = hn::IfThenElse(hn::RebindMask(di, zero_e), hn::Set(di, 255), field(e_min));
    const auto kv_field = hn::IfThenElse(hn::RebindMask(di, zero_kv), hn::Set(di, 255), field(kv_min));
    // e >= 2^-117; e / 256 * |kv| >= 2^-103, i.e. (e_field - 127) - 8 + (kv_field - 127) >= -103.
    const auto e_ok = hn::Gt(e_field, hn::Set(di, 127 - 117 - 1));
    const auto product_ok = hn::Gt(hn::Add(e_field, kv_field), hn::Set(di, 2 * 127 + 8 - 103 - 1));
    if (hn::AllTrue(di, hn::And(e_ok, product_ok))) {
      VF acc = hn::Zero(df);
      for (int j = 0; j < n; ++j) {
        const VF w = hn::Div(hn::Load(df, e_buf + static_cast<size_t>(j) * lanes), sum);
        acc = hn::Add(acc, hn::Mul(w, hn::LoadU(df, slots[j].kv + ch)));
      }
      hn::StoreU(acc, df, out + ch);
      continue;
    }
    hn::Store(sum, df, sum_buf);
    auto kv_max = hn::Zero(du);  // (only this rare path needs it)
    for (int j = 0; j < n; ++j) {
      kv_max = hn::Max(kv_max, hn::And(hn::BitCast(du, hn::LoadU(df, slots[j].kv + ch)), hn::Set(du, 0x7FFFFFFFu)));
    }
    const int kv_max_field = static_cast<int>(hn::GetLane(hn::MaxOfLanes(du, kv_max)) >> 23);
    const int sigma = std::min(64, 125 - (kv_max_field - 127));
    if (!hn::AllFalse(di, hn::Eq(kv_field, hn::Zero(di))) || sigma < 23) {  // subnormal kv, or huge next to tiny
      for (size_t i = 0; i < lanes; ++i) {
        out[ch + static_cast<int64_t>(i)] =
            compressor_exact::WeightedSumEmulated(e_buf + i, lanes, n, sum_buf[i], slots, ch + static_cast<int64_t>(i));
      }
      continue;
    }
    const auto sigma_bits = hn::Set(du, static_cast<uint32_t>(sigma) << 23);
    const auto scaled_min = hn::Set(du, static_cast<uint32_t>(sigma - 126 + 127) << 23);  // 2^(sigma-126)
    VF acc = hn::Zero(df);
    for (int j = 0; j < n; ++j) {
      const VF e = hn::Load(df, e_buf + static_cast<size_t>(j) * lanes);
      const auto e_bits = hn::BitCast(du, e);
      const auto tiny_e = hn::RebindMask(df, hn::And(hn::Gt(hn::BitCast(di, e_bits), hn::Zero(di)),
                                                     hn::Lt(hn::BitCast(di, e_bits), hn::Set(di, (127 - 117) << 23))));
      const VF kv = hn::LoadU(df, slots[j].kv + ch);
      const auto kv_abs = hn::And(hn::BitCast(du, kv), hn::Set(du, 0x7FFFFFFFu));
      const VF kv_scaled = hn::IfThenElse(hn::RebindMask(df, hn::Eq(kv_abs, hn::Zero(du))), kv,
                                          hn::BitCast(df, hn::Add(hn::BitCast(du, kv), sigma_bits)));
      const VF w = hn::Div(hn::IfThenElse(tiny_e, hn::BitCast(df, hn::Add(e_bits, sigma_bits)), e), sum);
      const VF p = hn::Mul(w, hn::IfThenElse(tiny_e, kv, kv_scaled));
      // Where the reference's w (tiny e lanes) or product is below 2^-126.
      const auto w_small = hn::And(tiny_e, hn::RebindMask(df, hn::Lt(hn::BitCast(di, w), hn::BitCast(di, scaled_min))));
      // (|p| - 1 wraps a zero product, which is exact, to the top.)
      const auto p_small = hn::RebindMask(df, hn::Lt(hn::Sub(hn::And(hn::BitCast(du, p), hn::Set(du, 0x7FFFFFFFu)), hn::Set(du, 1u)),
                                                     hn::Sub(scaled_min, hn::Set(du, 1u))));
      const auto bad = hn::Or(w_small, p_small);
      VF term = p;
      if (!hn::AllFalse(df, bad)) {
        hn::Store(p, df, fix);
        hn::Store(hn::VecFromMask(di, hn::RebindMask(di, bad)), di, bad_lane);
        for (size_t i = 0; i < lanes; ++i) {
          if (bad_lane[i] == 0) continue;
          const double w64 = fp_exact::RoundToF32(static_cast<double>(e_buf[static_cast<size_t>(j) * lanes + i]) / static_cast<double>(sum_buf[i]));
          const double product = fp_exact::RoundToF32(w64 * static_cast<double>(slots[j].kv[ch + static_cast<int64_t>(i)]));
          fix[i] = static_cast<float>(std::ldexp(product, sigma));  // normal: the grid 2^-149 scales to >= 2^-126
        }
        term = hn::Load(df, fix);
      }
      acc = hn::Add(acc, term);
    }
    // Unscale: acc is the reference's sum times 2^sigma, on its grid.
    const auto u = hn::BitCast(du, acc);
    const auto a = hn::And(u, hn::Set(du, 0x7FFFFFFFu));
    const auto new_field = hn::Sub(hn::BitCast(di, hn::ShiftRight<23>(a)), hn::Set(di, sigma));
    const auto normal = hn::Sub(u, sigma_bits);
    const auto significand = hn::Or(hn::And(a, hn::Set(du, 0x7FFFFFu)), hn::Set(du, 0x800000u));
    const auto shift = hn::BitCast(du, hn::Max(hn::Min(hn::Sub(hn::Set(di, 1), new_field), hn::Set(di, 31)), hn::Zero(di)));
    const auto sub = hn::Or(hn::And(u, hn::Set(du, 0x80000000u)), hn::Shr(significand, shift));
    const auto result = hn::IfThenElse(hn::RebindMask(du, hn::Gt(new_field, hn::Zero(di))), normal, sub);
    hn::StoreU(hn::BitCast(df, hn::IfThenElse(hn::Eq(a, hn::Zero(du)), u, result)), df, out + ch);
  }
  return true;
}

void PoolChannels(const PoolSlot* slots, int n, int64_t channels, float* out) {
  PoolChannelsImpl<false>(slots, n, 0, channels, out);
}

// PoolChannelsIfFinite's common case, kGroup vectors of channels from ch at
// a time (so each slot's row is read in runs of kGroup lines, which the
// hardware prefetchers follow, and the per-slot work is amortized): 1 when
// out is written; -1 otherwise (PoolChannelsImpl then handles the group).
// Op for op PoolChannelsImpl's fast path, when every x = s - max >= -80
// (checked on x_min = fl(s_min - max) <= every x): no exp clamps, every e
// normal and >= 2^-117, and a bound e >= 2^E (E = trunc(x_min log2 e - 2) <=
// its floor - 1) for the products' check (e / 256 * |kv| >= 2^-103).
// Non-finite inputs need no scan of their own: an infinite s makes x_min
// -inf or NaN, a NaN s makes x_min or every e of its lane NaN, and a
// non-finite kv (times w > 0) a non-finite sum, so -1 follows from the range
// check or the check of the sums. kFlushApe: ape may hold values below 2^-90
// (else its flush changes nothing and is skipped).
// Walks a ReadAhead's lines, `per_slot` software prefetches per pooling slot.
struct Prefetcher {
  const ReadAhead* ahead = nullptr;
  int64_t per_slot = 0;
  int run = 0;
  int64_t line = 0;
  HWY_INLINE void Next() {
    for (int64_t k = 0; k < per_slot && run < ahead->count; ++k) {
      __builtin_prefetch(ahead->run[run] + line * 16, 0, 3);
      if (++line == ahead->lines[run]) {
        line = 0;
        ++run;
      }
    }
  }
};

template <size_t kGroup, bool kFlushApe>
HWY_INLINE int PoolGroup(const PoolSlot* slots, int n, int64_t ch, float* HWY_RESTRICT e_buf, float* out, Prefetcher& pf) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const hn::RebindToUnsigned<DF> du;
  using VU = hn::Vec<decltype(du)>;
  const size_t lanes = hn::Lanes(df);
  const size_t stride = kGroup * lanes;  // e_buf floats per slot
  VF max[kGroup], s_min[kGroup];
  VU kv_min[kGroup];  // smallest nonzero |kv| bits - 1
  for (size_t g = 0; g < kGroup; ++g) {
    max[g] = hn::Set(df, -INFINITY);
    s_min[g] = hn::Set(df, INFINITY);
    kv_min[g] = hn::Set(du, 0xFFFFFFFFu);
  }
  const VU abs_mask = hn::Set(du, 0x7FFFFFFFu), one = hn::Set(du, 1u);
  for (int j = 0; j < n; ++j) {
    const float* score = slots[j].score + ch;
    const float* ape = slots[j].ape;
    const float* kv = slots[j].kv + ch;
    float* e_at = e_buf + static_cast<size_t>(j) * stride;
    pf.Next();
    auto step = [&](size_t g, VF s) {
      hn::Store(s, df, e_at + g * lanes);
      max[g] = hn::Max(max[g], s);
      s_min[g] = hn::Min(s_min[g], s);
      kv_min[g] = hn::Min(kv_min[g], hn::Sub(hn::And(hn::BitCast(du, hn::LoadU(df, kv + g * lanes)), abs_mask), one));
    };
    if (ape != nullptr) {
      ape += ch;
      for (size_t g = 0; g < kGroup; ++g) {
        const VF a = hn::LoadU(df, ape + g * lanes);
        step(g, hn::Add(FlushTiny(df, hn::LoadU(df, score + g * lanes)), kFlushApe ? FlushTiny(df, a) : a));
      }
    } else {
      for (size_t g = 0; g < kGroup; ++g) step(g, FlushTiny(df, hn::LoadU(df, score + g * lanes)));
    }
  }
  bool in_range = true;
  for (size_t g = 0; g < kGroup; ++g) {
    const VF x_min = hn::Sub(s_min[g], max[g]);
    const auto e_exp = hn::ConvertTo(di, hn::Sub(hn::Mul(x_min, hn::Set(df, 1.44269504f)), hn::Set(df, 2.0f)));
    const auto zero_kv = hn::Eq(kv_min[g], hn::Set(du, 0xFFFFFFFFu));
    const auto kv_field = hn::IfThenElse(hn::RebindMask(di, zero_kv), hn::Set(di, 255),
                                         hn::BitCast(di, hn::ShiftRight<23>(hn::Add(kv_min[g], one))));
    // e >= 2^(e_exp); e / 256 * |kv| >= 2^-103: e_exp - 8 + kv_field - 127 >= -103.
    const auto ok = hn::And(hn::RebindMask(di, hn::Ge(x_min, hn::Set(df, -80.0f))),
                            hn::Gt(hn::Add(e_exp, kv_field), hn::Set(di, 127 + 8 - 103 - 1)));
    in_range = in_range && hn::AllTrue(di, ok);
  }
  if (!in_range) return -1;
  VF sum[kGroup];
  for (size_t g = 0; g < kGroup; ++g) sum[g] = hn::Zero(df);
  // e = exp(s - max) for kSlots slots from j, 16 vectors' exps at a time.
  const auto exp_slots = [&](auto slots_tag, int j) {
    constexpr size_t kSlots = decltype(slots_tag)::value;
    VF x[kSlots * kGroup];
    for (size_t q = 0; q < kSlots; ++q) {
      const float* e_at = e_buf + (static_cast<size_t>(j) + q) * stride;
      for (size_t g = 0; g < kGroup; ++g) {
        // x <= 0, and 0 or at most -2^-113 (a normal float): |x| < 2^-26 is
        // one compare.
        const VF d = hn::Sub(hn::Load(df, e_at + g * lanes), max[g]);
        x[q * kGroup + g] = hn::IfThenZeroElse(hn::Gt(d, hn::Set(df, -0x1p-26f)), d);
      }
    }
    ExpInRangeN<kSlots * kGroup>(df, x);
    for (size_t q = 0; q < kSlots; ++q) {
      float* e_at = e_buf + (static_cast<size_t>(j) + q) * stride;
      for (size_t g = 0; g < kGroup; ++g) {
        hn::Store(x[q * kGroup + g], df, e_at + g * lanes);
        sum[g] = hn::Add(sum[g], x[q * kGroup + g]);
      }
    }
  };
  constexpr size_t kSlotsPerPass = std::max<size_t>(1, 16 / kGroup);
  int first = 0;
  for (; first + static_cast<int>(kSlotsPerPass) <= n; first += static_cast<int>(kSlotsPerPass)) {
    exp_slots(std::integral_constant<size_t, kSlotsPerPass>(), first);
  }
  for (; first < n; ++first) exp_slots(std::integral_constant<size_t, 1>(), first);
  VF acc[kGroup];
  for (size_t g = 0; g < kGroup; ++g) acc[g] = hn::Zero(df);
  for (int j = 0; j < n; ++j) {
    const float* e_at = e_buf + static_cast<size_t>(j) * stride;
    const float* kv = slots[j].kv + ch;
    for (size_t g = 0; g < kGroup; ++g) {
      acc[g] = hn::Add(acc[g], hn::Mul(hn::Div(hn::Load(df, e_at + g * lanes), sum[g]), hn::LoadU(df, kv + g * lanes)));
    }
  }
  for (size_t g = 0; g < kGroup; ++g) {
    if (!hn::AllTrue(du, hn::Lt(hn::And(hn::BitCast(du, acc[g]), abs_mask), hn::Set(du, 0x7F800000u)))) return -1;
  }
  for (size_t g = 0; g < kGroup; ++g) hn::StoreU(acc[g], df, out + ch + static_cast<int64_t>(g * lanes));
  return 1;
}

// The groups of kGroup vectors of channels from `ch` on, then the rest;
// `ahead`'s prefetches spread over the groups' slots (one in 8 CSA slots'
// first passes issues 10 of a window's 640).
template <size_t kGroup>
HWY_INLINE bool PoolGroups(const PoolSlot* slots, int n, int64_t channels, float* out, bool ape_has_tiny,
                           float* e_buf, const ReadAhead* ahead) {
  const int64_t step = static_cast<int64_t>(kGroup * hn::Lanes(DF()));
  Prefetcher pf;
  if (ahead != nullptr && n > 0) {
    const int64_t groups = std::max<int64_t>(1, channels / step);
    pf.ahead = ahead;
    pf.per_slot = (ahead->total_lines + groups * n - 1) / (groups * n);
  }
  int64_t ch = 0;
  for (; ch + step <= channels; ch += step) {
    const int done = ape_has_tiny ? PoolGroup<kGroup, true>(slots, n, ch, e_buf, out, pf)
                                  : PoolGroup<kGroup, false>(slots, n, ch, e_buf, out, pf);
    if (done < 0 && !PoolChannelsImpl<true>(slots, n, ch, ch + step, out)) return false;
  }
  return PoolChannelsImpl<true>(slots, n, ch, channels, out);
}

// Long windows (HCA's 128 slots) take 8 vectors of channels at a time: each
// pass over the slots touches one 4 KiB page per slot row, and a wider group
// halves the passes (TLB misses) per window.
bool PoolChannelsIfFinite(const PoolSlot* slots, int n, int64_t channels, float* out, bool ape_has_tiny,
                          const ReadAhead* ahead) {
  HWY_ALIGN float e_buf[256 * 4 * kMaxLanes];
  if (n > 16 && n <= 128) return PoolGroups<8>(slots, n, channels, out, ape_has_tiny, e_buf, ahead);
  return PoolGroups<4>(slots, n, channels, out, ape_has_tiny, e_buf, ahead);
}

// bf16(v) as fp32 (RNE; inputs are finite here).
HWY_INLINE VF RoundBf16(DF df, VF v) {
  const hn::RebindToUnsigned<DF> du;
  const auto u = hn::BitCast(du, v);
  const auto lsb = hn::And(hn::ShiftRight<16>(u), hn::Set(du, 1u));
  const auto rounded = hn::And(hn::Add(hn::Add(u, hn::Set(du, 0x7FFFu)), lsb), hn::Set(du, 0xFFFF0000u));
  return hn::BitCast(df, rounded);
}

// The exponent field of the smallest nonzero |x| over n floats (n a
// multiple of the lanes), 255 if all are ±0: integer operations only.
HWY_INLINE int MinNonzeroField(DF df, const float* x, int n) {
  const hn::RebindToUnsigned<DF> du;
  auto m = hn::Set(du, 0xFFFFFFFFu);
  for (int i = 0; i < n; i += static_cast<int>(hn::Lanes(df))) {
    m = hn::Min(m, hn::Sub(hn::And(hn::BitCast(du, hn::LoadU(df, x + i)), hn::Set(du, 0x7FFFFFFFu)), hn::Set(du, 1u)));
  }
  const uint32_t smallest = hn::GetLane(hn::MinOfLanes(du, m));
  return smallest == 0xFFFFFFFFu ? 255 : static_cast<int>((smallest + 1) >> 23);
}

// RMSNorm + RoPE without a subnormal operation, bit-identical to
// NormRopeRef. Every nonzero y^2 is normal when |y| >= 2^-63, their mean when
// some |y| >= 2^-58; then y * r, weight * (y * r) and RoPE's products are at
// least 2^(e_y + e_r), 2^(e_w + e_y + e_r) and 2^(e_w + e_y + e_r + e_cs)
// (e_*: the smallest nonzero exponents), and RoPE's differences, of products
// >= 2^-103, are multiples of 2^-126. Rows outside these bounds (tiny
// values: no model's RMSNorm input) go through the fp64 emulation.
void NormRope(const float* pooled, int dim, const float* weight, float eps, const float* cos_sin, Bf16* out) {
  const DF df;
  const hn::RebindToUnsigned<DF> du;
  const size_t lanes = hn::Lanes(df);
  HWY_ALIGN float y[512];
  auto y_max = hn::Zero(du);
  auto y_min = hn::Set(du, 0xFFFFFFFFu);  // smallest nonzero |y| bits - 1
  for (int i = 0; i < dim; i += static_cast<int>(lanes)) {
    const VF v = RoundBf16(df, hn::LoadU(df, pooled + i));
    hn::Store(v, df, y + i);
    const auto a = hn::And(hn::BitCast(du, v), hn::Set(du, 0x7FFFFFFFu));
    y_max = hn::Max(y_max, a);
    y_min = hn::Min(y_min, hn::Sub(a, hn::Set(du, 1u)));
  }
  const uint32_t largest = hn::GetLane(hn::MaxOfLanes(du, y_max));
  const uint32_t smallest_m1 = hn::GetLane(hn::MinOfLanes(du, y_min));
  const int e_y = smallest_m1 == 0xFFFFFFFFu ? 255 : static_cast<int>((smallest_m1 + 1) >> 23);
  const int eps_field = static_cast<int>((F32Bits(eps) >> 23) & 0xFF);
  const bool all_zero = largest == 0;
  if (!(all_zero || (e_y >= 127 - 63 && static_cast<int>(largest >> 23) >= 127 - 58)) ||
      (eps_field == 0 && (F32Bits(eps) & 0x7FFFFFFFu) != 0)) {
    return compressor_exact::NormRopeEmulated(pooled, dim, weight, eps, cos_sin, out);
  }
  // The 16 running sums of SumSquaresRef, held as 16 / lanes vectors.
  HWY_ALIGN float acc[16];
  const size_t vectors = 16 / lanes;
  for (size_t v = 0; v < vectors; ++v) {
    VF a = hn::Zero(df);
    for (int i = static_cast<int>(v * lanes); i < dim; i += 16) {
      const VF x = hn::Load(df, y + i);
      a = hn::Add(a, hn::Mul(x, x));
    }
    hn::Store(a, df, acc + v * lanes);
  }
  for (int width = 8; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  const float mean = acc[0] / static_cast<float>(dim);
  const float r_scalar = 1.0f / std::sqrt(mean + eps);
  if (!all_zero) {
    const int e_r = static_cast<int>((F32Bits(r_scalar) >> 23) & 0xFF) - 127;
    const int e_w = MinNonzeroField(df, weight, dim) - 127;
    const int e_cs = MinNonzeroField(df, cos_sin, 64) - 127;
    const int e_ymin = e_y - 127;
    if (e_ymin + e_r < -126 || e_w + e_ymin + e_r < -126 || e_w + e_ymin + e_r + e_cs < -103) {
      return compressor_exact::NormRopeEmulated(pooled, dim, weight, eps, cos_sin, out);
    }
  }
  const VF r = hn::Set(df, r_scalar);
  for (int i = 0; i < dim; i += static_cast<int>(lanes)) {
    const VF v = hn::Mul(hn::LoadU(df, weight + i), hn::Mul(hn::Load(df, y + i), r));
    hn::Store(RoundBf16(df, v), df, y + i);
  }
  RotateLast64(y, dim, cos_sin);  // its products and sums are normal: checked above
  // The top halves of the (bf16-valued) floats: a saturating demotion of
  // values below 2^16 is exact.
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint16_t, DF> du16;
  for (int i = 0; i < dim; i += static_cast<int>(lanes)) {
    const auto top = hn::BitCast(di, hn::ShiftRight<16>(hn::BitCast(du, hn::Load(df, y + i))));
    hn::StoreU(hn::DemoteTo(du16, top), du16, reinterpret_cast<uint16_t*>(out) + i);
  }
}

// The largest |x| of n bf16 values, as bits without the sign (0x7F80: inf;
// above: NaN); n a multiple of 64.
uint16_t MaxMagnitudeBits(const Bf16* v, int64_t n) {
  const hn::ScalableTag<int16_t> d16;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d16));
  auto m = hn::Zero(d16);  // magnitudes < 2^15: a signed max
  for (int64_t i = 0; i < n; i += lanes) {
    m = hn::Max(m, hn::And(hn::LoadU(d16, reinterpret_cast<const int16_t*>(v) + i), hn::Set(d16, 0x7FFF)));
  }
  return static_cast<uint16_t>(hn::GetLane(hn::MaxOfLanes(d16, m)));
}

// The first i < n with fl(score[i] + ape[i]) = ±inf, or -1 (n a multiple
// of the lanes). Values below 2^-90 are set to 0 first: that cannot change
// whether a sum overflows, and keeps every sum free of subnormals.
int64_t FindScorePlusApeOverflow(const float* score, const float* ape, int64_t n) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  for (int64_t i = 0; i < n; i += lanes) {
    const VF sum = hn::Add(FlushTiny(df, hn::LoadU(df, score + i)), FlushTiny(df, hn::LoadU(df, ape + i)));
    const auto a = hn::And(hn::BitCast(di, sum), hn::Set(di, 0x7FFFFFFF));
    if (hn::AllFalse(di, hn::Gt(a, hn::Set(di, 0x7F7FFFFF)))) continue;
    for (int64_t k = i; k < i + lanes; ++k) {
      const uint32_t exact = fp_exact::F32BitsOf(fp_exact::RoundToF32(fp_exact::FromF32(score[k]) + fp_exact::FromF32(ape[k])));
      if ((exact & 0x7FFFFFFFu) >= 0x7F800000u) return k;
    }
  }
  return -1;
}

// out[i] = fl(score[i] + ape[i]) for i < n (n a multiple of the lanes),
// bit for bit, without a subnormal operation: sums of values that are 0 or
// at least 2^-103 are 0 or at least 2^-126; lanes with a smaller input are
// added in fp64 (src/fp_exact.h).
void AddScoreAndApe(const float* score, const float* ape, float* out, int64_t n) {
  const DF df;
  const hn::RebindToUnsigned<DF> du;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const auto small = hn::Set(du, ((127u - 103u) << 23) - 1u);  // |x| - 1 below this: 0 < |x| < 2^-103
  for (int64_t i = 0; i < n; i += lanes) {
    const VF s = hn::LoadU(df, score + i), a = hn::LoadU(df, ape + i);
    auto tiny = [&](VF v) {
      return hn::Lt(hn::Sub(hn::And(hn::BitCast(du, v), hn::Set(du, 0x7FFFFFFFu)), hn::Set(du, 1u)), small);
    };
    if (hn::AllFalse(du, hn::Or(tiny(s), tiny(a)))) {
      hn::StoreU(hn::Add(s, a), df, out + i);
      continue;
    }
    for (int64_t k = i; k < i + lanes; ++k) out[k] = fp_exact::ToF32(fp_exact::FromF32(score[k]) + fp_exact::FromF32(ape[k]));
  }
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kvc
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvc {

HWY_EXPORT(PoolChannels);
HWY_EXPORT(PoolChannelsIfFinite);
HWY_EXPORT(MaxMagnitudeBits);
HWY_EXPORT(NormRope);
HWY_EXPORT(FindScorePlusApeOverflow);
HWY_EXPORT(AddScoreAndApe);

int64_t FindScorePlusApeOverflow(const float* score, const float* ape, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(FindScorePlusApeOverflow)(score, ape, n);
}

void AddScoreAndApe(const float* score, const float* ape, float* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AddScoreAndApe)(score, ape, out, n);
}

void PoolChannels(const PoolSlot* slots, int n, int64_t channels, float* out) {
  HWY_DYNAMIC_DISPATCH(PoolChannels)(slots, n, channels, out);
}

bool PoolChannelsIfFinite(const PoolSlot* slots, int n, int64_t channels, float* out, bool ape_has_tiny,
                          const ReadAhead* ahead) {
  return HWY_DYNAMIC_DISPATCH(PoolChannelsIfFinite)(slots, n, channels, out, ape_has_tiny, ahead);
}

uint16_t MaxMagnitudeBits(const Bf16* v, int64_t n) { return HWY_DYNAMIC_DISPATCH(MaxMagnitudeBits)(v, n); }

void NormRope(const float* pooled, int dim, const float* weight, float eps, const float* cos_sin, Bf16* out) {
  HWY_DYNAMIC_DISPATCH(NormRope)(pooled, dim, weight, eps, cos_sin, out);
}

}  // namespace kvc
#endif  // HWY_ONCE
