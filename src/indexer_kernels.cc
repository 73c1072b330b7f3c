// SIMD kernels behind indexer.h: index scores (lanes = heads) and the top-k
// filter. Compiled once per Highway target.
//
// Score of one key: for each head vector, per 32-element block an exact
// integer dot product (AVX3_DL: VNNI vpdpbusd on int8 codes, the key offset
// by +12 to be unsigned and corrected per block; elsewhere exact fp32
// multiply-adds of the same small integers), scaled once, blocks summed in
// order, relu, head weight, and the 16-running-sum order over heads of
// IndexScoreRef. Identical bits on every target.
#include <cmath>
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

#if HWY_TARGET == HWY_AVX3_DL
// Highway's AVX3_DL target string enables the 256-bit AVX-VNNI but not the
// 512-bit AVX512-VNNI, though Highway picks AVX3_DL only on CPUs that have it.
// The key loop is compiled for both (a superset of the target, so Highway ops
// still inline into it); it is called once per page.
#define KVC_VNNI512 __attribute__((target(HWY_TARGET_STR ",avx512vnni")))

// The 128 codes of a packed key as unsigned bytes 2*E2M1 + 12, in element
// order, with a few vector ops: widen each 16-bit word (4 nibbles = 4
// consecutive elements) to 32 bits, spread its nibbles into the four bytes,
// and map them through a 16-entry table.
KVC_VNNI512 HWY_INLINE void DecodeKeyU8(const uint8_t* packed, uint8_t* out) {
  const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  for (int half = 0; half < 2; ++half) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + 32 * half)));
    const __m512i nibbles = _mm512_or_si512(
        _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi32(0xF)), _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0xF0)), 4)),
        _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0xF00)), 8),
                        _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0xF000)), 12)));
    _mm512_storeu_si512(out + 64 * half, _mm512_shuffle_epi8(table, nibbles));
  }
}

// Scores kKeys keys against head vectors [v0, v0 + kV) (16 heads each),
// adding the weighted relus into each key's running sums. Several keys per
// pass give independent vpdpbusd chains and let each query load feed them all.
template <int kKeys, int kV>
KVC_VNNI512 HWY_INLINE void ScoreHeadVectors(const IndexQuery& q, size_t padded, size_t v0, const uint8_t* key_u8,
                                             const uint8_t* const* key_scales, VF* sums) {
  const DF df;
  VF s[kKeys][kV];
  for (int k = 0; k < kKeys; ++k) {
    for (int v = 0; v < kV; ++v) s[k][v] = hn::Zero(df);
  }
  for (int b = 0; b < 4; ++b) {
    __m512i acc[kKeys][kV];
    for (int k = 0; k < kKeys; ++k) {
      for (int v = 0; v < kV; ++v) acc[k][v] = _mm512_setzero_si512();
    }
    for (int g = 8 * b; g < 8 * b + 8; ++g) {
      const int8_t* qg = q.q_s8() + (static_cast<size_t>(g) * (padded / 16) + v0) * 64;
      __m512i k4[kKeys];
      for (int k = 0; k < kKeys; ++k) {
        int32_t four;
        __builtin_memcpy(&four, key_u8 + 128 * k + 4 * g, 4);
        k4[k] = _mm512_set1_epi32(four);
      }
      for (int v = 0; v < kV; ++v) {
        const __m512i qv = _mm512_loadu_si512(qg + 64 * v);
        for (int k = 0; k < kKeys; ++k) acc[k][v] = _mm512_dpbusd_epi32(acc[k][v], k4[k], qv);
      }
    }
    for (int v = 0; v < kV; ++v) {
      const size_t at = static_cast<size_t>(b) * padded + (v0 + static_cast<size_t>(v)) * 16;
      const __m512i offset = _mm512_loadu_si512(q.q_offset() + at);  // undoes the +12 key offset
      const VF q_scale = hn::LoadU(df, q.q_scale() + at);
      for (int k = 0; k < kKeys; ++k) {
        const VF scale = hn::Mul(q_scale, hn::Set(df, F32FromUe8m0(key_scales[k][b])));
        s[k][v] = hn::Add(s[k][v], hn::Mul(VF{_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[k][v], offset))}, scale));
      }
    }
  }
  for (int v = 0; v < kV; ++v) {
    const VF w = hn::LoadU(df, q.weights() + (v0 + static_cast<size_t>(v)) * 16);
    for (int k = 0; k < kKeys; ++k) sums[k] = hn::Add(sums[k], hn::Mul(hn::Max(s[k][v], hn::Zero(df)), w));
  }
}

// Scores keys [j, j + kKeys): all head vectors, then the halving order.
template <int kKeys>
KVC_VNNI512 HWY_INLINE void ScoreKeyGroup(const IndexQuery& q, size_t padded, const uint8_t* codes, int64_t code_stride,
                                          const uint8_t* scales, int64_t scale_stride, int64_t j, float* out) {
  const DF df;
  HWY_ALIGN uint8_t key_u8[128 * kKeys];
  HWY_ALIGN float partial[16];
  const uint8_t* key_scales[kKeys];
  VF sums[kKeys];
  for (int k = 0; k < kKeys; ++k) {
    DecodeKeyU8(codes + (j + k) * code_stride, key_u8 + 128 * k);
    key_scales[k] = scales + (j + k) * scale_stride;
    sums[k] = hn::Zero(df);
  }
  const size_t vectors = padded / 16;
  size_t v0 = 0;
  for (; v0 + 2 <= vectors; v0 += 2) ScoreHeadVectors<kKeys, 2>(q, padded, v0, key_u8, key_scales, sums);
  for (; v0 < vectors; ++v0) ScoreHeadVectors<kKeys, 1>(q, padded, v0, key_u8, key_scales, sums);
  for (int k = 0; k < kKeys; ++k) {
    hn::Store(sums[k], df, partial);
    for (int width = 8; width >= 1; width /= 2) {
      for (int i = 0; i < width; ++i) partial[i] += partial[i + width];
    }
    out[j + k] = partial[0];
  }
}

KVC_VNNI512 void ScoreKeysVnni(const IndexQuery& q, const uint8_t* codes, int64_t code_stride, const uint8_t* scales,
                               int64_t scale_stride, int64_t n, float* out) {
  const size_t padded = static_cast<size_t>(q.padded_heads());
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) ScoreKeyGroup<4>(q, padded, codes, code_stride, scales, scale_stride, j, out);
  for (; j < n; ++j) ScoreKeyGroup<1>(q, padded, codes, code_stride, scales, scale_stride, j, out);
}
#endif

void ScoreKeys(const IndexQuery& q, const uint8_t* codes, int64_t code_stride, const uint8_t* scales,
               int64_t scale_stride, int64_t n, float* out) {
#if HWY_TARGET == HWY_AVX3_DL
  ScoreKeysVnni(q, codes, code_stride, scales, scale_stride, n, out);
#else
  const DF df;
  const size_t lanes = hn::Lanes(df);
  const size_t padded = static_cast<size_t>(q.padded_heads());
  const size_t vectors = padded / lanes;  // head vectors
  const size_t partials = 16 / lanes;     // running sums (16 lanes in all)
  HWY_ALIGN float key_f[128];  // 2*E2M1 as exact floats
  HWY_ALIGN float partial[16];
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* k = codes + j * code_stride;
    const uint8_t* key_scales = scales + j * scale_stride;
    VF sums[16];
    for (size_t p = 0; p < partials; ++p) sums[p] = hn::Zero(df);
    for (int e = 0; e < 128; ++e) key_f[e] = kTwiceE2M1[(k[e / 2] >> (4 * (e & 1))) & 0xF];
    for (size_t v = 0; v < vectors; ++v) {
      VF s = hn::Zero(df);
      for (int b = 0; b < 4; ++b) {
        VF acc = hn::Zero(df);  // an exact integer in every lane
        for (int e = 32 * b; e < 32 * b + 32; ++e) {
          acc = hn::MulAdd(hn::LoadU(df, q.q_f32() + static_cast<size_t>(e) * padded + v * lanes), hn::Set(df, key_f[e]), acc);
        }
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
#endif
}

// Writes the indices i with scores[i] >= threshold to `out` (room for n)
// and returns how many. Skips whole vectors of scores all below the threshold
// (NaN is not below it, so no NaN is skipped; only vectors with a hit or a NaN
// are looked at again); stops at the first NaN, setting *first_nan to its
// index (left alone otherwise).
int64_t FilterAtLeast(const float* scores, int64_t n, float threshold, int64_t* out, int64_t* first_nan) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF t = hn::Set(df, threshold);
  int64_t count = 0, i = 0;
  for (; i + 4 * lanes <= n; i += 4 * lanes) {
    const VF v0 = hn::LoadU(df, scores + i), v1 = hn::LoadU(df, scores + i + lanes);
    const VF v2 = hn::LoadU(df, scores + i + 2 * lanes), v3 = hn::LoadU(df, scores + i + 3 * lanes);
    if (hn::AllTrue(df, hn::And(hn::And(hn::Lt(v0, t), hn::Lt(v1, t)), hn::And(hn::Lt(v2, t), hn::Lt(v3, t))))) continue;
    if (!hn::AllFalse(df, hn::Or(hn::Or(hn::IsNaN(v0), hn::IsNaN(v1)), hn::Or(hn::IsNaN(v2), hn::IsNaN(v3))))) {
      for (int64_t k = i; k < i + 4 * lanes; ++k) {
        if (std::isnan(scores[k])) {
          *first_nan = k;
          return count;
        }
      }
    }
    for (int64_t k = i; k < i + 4 * lanes; ++k) {
      if (scores[k] >= threshold) out[count++] = k;
    }
  }
  for (; i < n; ++i) {
    if (std::isnan(scores[i])) {
      *first_nan = i;
      return count;
    }
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

int64_t FilterAtLeastDispatch(const float* scores, int64_t n, float threshold, int64_t* out, int64_t* first_nan) {
  return HWY_DYNAMIC_DISPATCH(FilterAtLeast)(scores, n, threshold, out, first_nan);
}

}  // namespace kvc
#endif  // HWY_ONCE
