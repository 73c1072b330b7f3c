// SIMD kernels behind compressor.h (PoolChannels, NormRope), compiled once
// per Highway target. Each performs, per element, the fp32 operations of its
// scalar reference in the same order; the one reduction across channels
// (RMSNorm's sum of squares) uses the reference's canonical 16-sum order.
#include <cstddef>
#include <cstdint>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/compressor_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kvc/compressor.h"

HWY_BEFORE_NAMESPACE();
namespace kvc {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;
constexpr size_t kMaxLanes = HWY_MAX_BYTES / sizeof(float);

// SoftmaxExp, lane-wise, op for op.
HWY_INLINE VF Exp(DF df, VF x) {
  const hn::RebindToSigned<DF> di;
  const VF magic = hn::Set(df, 12582912.0f);
  const VF n = hn::Sub(hn::Add(hn::Mul(x, hn::Set(df, 1.44269504088896341f)), magic), magic);
  VF r = hn::Sub(x, hn::Mul(n, hn::Set(df, 0.693359375f)));
  r = hn::Sub(r, hn::Mul(n, hn::Set(df, -2.12194440e-4f)));
  VF p = hn::Set(df, 1.9875691500e-4f);
  p = hn::Add(hn::Mul(p, r), hn::Set(df, 1.3981999507e-3f));
  p = hn::Add(hn::Mul(p, r), hn::Set(df, 8.3334519073e-3f));
  p = hn::Add(hn::Mul(p, r), hn::Set(df, 4.1665795894e-2f));
  p = hn::Add(hn::Mul(p, r), hn::Set(df, 1.6666665459e-1f));
  p = hn::Add(hn::Mul(p, r), hn::Set(df, 5.0000001201e-1f));
  const VF y = hn::Add(hn::Add(hn::Mul(p, hn::Mul(r, r)), r), hn::Set(df, 1.0f));
  const VF scale = hn::BitCast(df, hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127))));
  return hn::IfThenElseZero(hn::Ge(x, hn::Set(df, -87.0f)), hn::Mul(y, scale));
}

void PoolChannels(const PoolSlot* slots, int n, int64_t channels, float* out) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  HWY_ALIGN float e_buf[256 * kMaxLanes];
  for (int64_t ch = 0; ch < channels; ch += static_cast<int64_t>(lanes)) {
    auto score = [&](int j) {
      const VF s = hn::LoadU(df, slots[j].score + ch);
      return slots[j].ape != nullptr ? hn::Add(s, hn::LoadU(df, slots[j].ape + ch)) : s;
    };
    VF max = hn::Set(df, -INFINITY);
    for (int j = 0; j < n; ++j) max = hn::Max(max, score(j));
    VF sum = hn::Zero(df);
    for (int j = 0; j < n; ++j) {
      const VF e = Exp(df, hn::Sub(score(j), max));
      hn::Store(e, df, e_buf + static_cast<size_t>(j) * lanes);
      sum = hn::Add(sum, e);
    }
    VF acc = hn::Zero(df);
    for (int j = 0; j < n; ++j) {
      const VF w = hn::Div(hn::Load(df, e_buf + static_cast<size_t>(j) * lanes), sum);
      acc = hn::Add(acc, hn::Mul(w, hn::LoadU(df, slots[j].kv + ch)));
    }
    hn::StoreU(acc, df, out + ch);
  }
}

// bf16(v) as fp32 (RNE; inputs are finite here).
HWY_INLINE VF RoundBf16(DF df, VF v) {
  const hn::RebindToUnsigned<DF> du;
  const auto u = hn::BitCast(du, v);
  const auto lsb = hn::And(hn::ShiftRight<16>(u), hn::Set(du, 1u));
  const auto rounded = hn::And(hn::Add(hn::Add(u, hn::Set(du, 0x7FFFu)), lsb), hn::Set(du, 0xFFFF0000u));
  return hn::BitCast(df, rounded);
}

void NormRope(const float* pooled, int dim, const float* weight, float eps, const float* cos_sin, Bf16* out) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  HWY_ALIGN float y[512];
  for (int i = 0; i < dim; i += static_cast<int>(lanes)) hn::Store(RoundBf16(df, hn::LoadU(df, pooled + i)), df, y + i);
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
  const VF r = hn::Set(df, 1.0f / std::sqrt(mean + eps));
  for (int i = 0; i < dim; i += static_cast<int>(lanes)) {
    const VF v = hn::Mul(hn::LoadU(df, weight + i), hn::Mul(hn::Load(df, y + i), r));
    hn::Store(RoundBf16(df, v), df, y + i);
  }
  RotateLast64(y, dim, cos_sin);
  for (int i = 0; i < dim; ++i) out[i] = Bf16{static_cast<uint16_t>(F32Bits(y[i]) >> 16)};
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kvc
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kvc {

HWY_EXPORT(PoolChannels);
HWY_EXPORT(NormRope);

void PoolChannels(const PoolSlot* slots, int n, int64_t channels, float* out) {
  HWY_DYNAMIC_DISPATCH(PoolChannels)(slots, n, channels, out);
}

void NormRope(const float* pooled, int dim, const float* weight, float eps, const float* cos_sin, Bf16* out) {
  HWY_DYNAMIC_DISPATCH(NormRope)(pooled, dim, weight, eps, cos_sin, out);
}

}  // namespace kvc
#endif  // HWY_ONCE
