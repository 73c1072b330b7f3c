// SIMD kernels behind indexer.h: index scores (lanes = heads) and the top-k
// filter. Compiled once per Highway target.
//
// Score of one key: for each head vector, per 32-element block an exact
// integer dot product (AVX3_DL: VNNI vpdpbusd on int8 codes, the key offset
// by +12 to be unsigned and corrected per block; elsewhere exact fp32
// multiply-adds of the same small integers), scaled once, blocks summed in
// order, relu, head weight, and the 16-running-sum order over heads of
// IndexScoreRef. Identical bits on every target.
#include <cstddef>
#include <cstdint>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/indexer_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kvc/indexer.h"

HWY_BEFORE_NAMESPACE();
namespace kvc {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

constexpr int8_t kTwiceE2M1[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

void ScoreKeys(const IndexQuery& q, const uint8_t* codes, int64_t code_stride, const uint8_t* scales,
               int64_t scale_stride, int64_t n, float* out) {
  const DF df;
  const size_t lanes = hn::Lanes(df);
  const size_t padded = static_cast<size_t>(q.padded_heads());
  const size_t vectors = padded / lanes;       // head vectors
  const size_t partials = 16 / lanes;          // running sums (16 lanes in all)
#if HWY_TARGET == HWY_AVX3_DL
  HWY_ALIGN uint8_t key_u8[128];  // 2*E2M1 + 12, unsigned for vpdpbusd
#else
  HWY_ALIGN float key_f[128];     // 2*E2M1 as exact floats
#endif
  HWY_ALIGN float partial[16];
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* k = codes + j * code_stride;
    for (int e = 0; e < 128; ++e) {  // decode the key once for all heads
      const int8_t c = kTwiceE2M1[(k[e / 2] >> (4 * (e & 1))) & 0xF];
#if HWY_TARGET == HWY_AVX3_DL
      key_u8[e] = static_cast<uint8_t>(c + 12);
#else
      key_f[e] = c;
#endif
    }
    const uint8_t* key_scales = scales + j * scale_stride;
    VF sums[16];
    for (size_t p = 0; p < partials; ++p) sums[p] = hn::Zero(df);
    for (size_t v = 0; v < vectors; ++v) {
      VF s = hn::Zero(df);
      for (int b = 0; b < 4; ++b) {
        VF acc;
#if HWY_TARGET == HWY_AVX3_DL
        // AVX-VNNI (VEX, 256-bit; the target enables avxvnni): two vpdpbusd
        // per 16 heads, 32 int8 MACs each.
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
        for (int g = 8 * b; g < 8 * b + 8; ++g) {
          int32_t four;
          __builtin_memcpy(&four, key_u8 + 4 * g, 4);
          const __m256i k4 = _mm256_set1_epi32(four);
          const int8_t* qv = q.q_s8() + (static_cast<size_t>(g) * (padded / 16) + v) * 64;
          lo = _mm256_dpbusd_avx_epi32(lo, k4, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv)));
          hi = _mm256_dpbusd_avx_epi32(hi, k4, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv + 32)));
        }
        __m512i acc_i = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        acc_i = _mm512_sub_epi32(acc_i, _mm512_loadu_si512(q.q_offset() + static_cast<size_t>(b) * padded + v * lanes));
        acc = VF{_mm512_cvtepi32_ps(acc_i)};
#else
        acc = hn::Zero(df);
        for (int e = 32 * b; e < 32 * b + 32; ++e) {
          acc = hn::MulAdd(hn::LoadU(df, q.q_f32() + static_cast<size_t>(e) * padded + v * lanes), hn::Set(df, key_f[e]), acc);
        }
#endif
        const VF scale = hn::Mul(hn::LoadU(df, q.q_scale() + static_cast<size_t>(b) * padded + v * lanes),
                                 hn::Set(df, F32FromUe8m0(key_scales[b])));
        s = hn::Add(s, hn::Mul(acc, scale));
      }
      const VF relu = hn::Max(s, hn::Zero(df));
      sums[v % partials] = hn::Add(sums[v % partials], hn::Mul(relu, hn::LoadU(df, q.weights() + v * lanes)));
    }
    for (size_t p = 0; p < partials; ++p) hn::Store(sums[p], df, partial + p * lanes);
    for (int width = 8; width >= 1; width /= 2) {
      for (int i = 0; i < width; ++i) partial[i] += partial[i + width];
    }
    out[j] = partial[0];
  }
}

// Writes the indices i with scores[i] >= threshold to `out` (which has room
// for n + 64) and returns how many. Skips whole vectors without a hit.
int64_t FilterAtLeast(const float* scores, int64_t n, float threshold, int64_t* out) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF t = hn::Set(df, threshold);
  int64_t count = 0, i = 0;
  for (; i + 4 * lanes <= n; i += 4 * lanes) {
    const auto hit = hn::Or(hn::Or(hn::Ge(hn::LoadU(df, scores + i), t), hn::Ge(hn::LoadU(df, scores + i + lanes), t)),
                            hn::Or(hn::Ge(hn::LoadU(df, scores + i + 2 * lanes), t),
                                   hn::Ge(hn::LoadU(df, scores + i + 3 * lanes), t)));
    if (hn::AllFalse(df, hit)) continue;
    for (int64_t k = i; k < i + 4 * lanes; ++k) {
      if (scores[k] >= threshold) out[count++] = k;
    }
  }
  for (; i < n; ++i) {
    if (scores[i] >= threshold) out[count++] = i;
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
HWY_EXPORT(FilterAtLeast);

void ScoreKeysDispatch(const IndexQuery& q, const uint8_t* codes, int64_t code_stride, const uint8_t* scales,
                       int64_t scale_stride, int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(ScoreKeys)(q, codes, code_stride, scales, scale_stride, n, out);
}

int64_t FilterAtLeastDispatch(const float* scores, int64_t n, float threshold, int64_t* out) {
  return HWY_DYNAMIC_DISPATCH(FilterAtLeast)(scores, n, threshold, out);
}

}  // namespace kvc
#endif  // HWY_ONCE
