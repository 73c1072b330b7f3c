#include "kvc/indexer.h"
#include "kvc/model_spec.h"

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvc/compressor.h"
#include "kvc/reference_codecs.h"
#include "kvc/row_kernels.h"
#include "src/status.h"

namespace kvc {
namespace {

int8_t Code(const uint8_t* packed, int e) { return kTwiceE2M1[(packed[e / 2] >> (4 * (e & 1))) & 0xF]; }

}  // namespace

absl::StatusOr<IndexQuery> IndexQuery::Prepare(absl::Span<const Bf16> q_raw, absl::Span<const float> weights,
                                               const float* cos_sin) {
  IndexQuery q;
  KVC_RETURN_IF_ERROR(Prepare(q_raw, weights, cos_sin, &q));
  return q;
}

absl::Status IndexQuery::Prepare(absl::Span<const Bf16> q_raw, absl::Span<const float> weights, const float* cos_sin,
                                 IndexQuery* out) {
  const int64_t heads = static_cast<int64_t>(weights.size());
  if (heads < 1 || heads > kMaxIndexHeads || q_raw.size() != static_cast<size_t>(heads) * kIndexDim) {
    return absl::InvalidArgumentError(absl::StrCat("IndexQuery: ", q_raw.size(), " query values for ", heads,
                                                   " head weights; expected heads x 128 with 1..4096 heads"));
  }
  for (size_t i = 0; i < q_raw.size(); ++i) {
    const float x = ToF32(q_raw[i]);
    if (!(std::fabs(x) <= 0x1p120f)) {
      return absl::InvalidArgumentError(absl::StrCat("IndexQuery: head ", i / kIndexDim, " dim ", i % kIndexDim,
                                                     std::isfinite(x) ? " exceeds 2^120" : " is not finite"));
    }
  }
  for (size_t h = 0; h < weights.size(); ++h) {
    if (!std::isfinite(weights[h])) return absl::InvalidArgumentError(absl::StrCat("IndexQuery: weight ", h, " is not finite"));
  }
  IndexQuery& q = *out;  // assign() below reuses its buffers
  q.heads_ = static_cast<int>(heads);
  q.padded_ = (q.heads_ + 15) / 16 * 16;
  const size_t padded = static_cast<size_t>(q.padded_);
  q.stored_.assign(static_cast<size_t>(heads), IndexKeyFp4{});
  q.q_f32_.assign(kIndexDim * padded, 0.0f);
  q.q_s8_.assign(kIndexDim * padded, 0);
  q.q_offset_.assign(4 * padded, 0);
  q.q_scale_.assign(4 * padded, 0.0f);
  q.weights_.assign(padded, 0.0f);
  // RoPE on every head's last 64 dims, then the index-key pipeline (spec §3)
  // for all heads at once through the SIMD kernel (bit-identical to
  // QuantizeIndexKeyRef; the values were range-checked above).
  // 16 heads at a time through a buffer on the stack (rows are independent).
  constexpr int kHeadsPerPass = 16;
  Bf16 rotated[kHeadsPerPass * kIndexDim];
  for (int first = 0; first < q.heads_; first += kHeadsPerPass) {
    const int count = std::min(kHeadsPerPass, q.heads_ - first);
    for (int h = first; h < first + count; ++h) {
      float x[kIndexDim];
      for (int i = 0; i < kIndexDim; ++i) x[i] = ToF32(q_raw[static_cast<size_t>(h * kIndexDim + i)]);
      RotateLast64(x, kIndexDim, cos_sin);
      for (int i = 0; i < kIndexDim; ++i) rotated[(h - first) * kIndexDim + i] = ToBf16(x[i]);
    }
    const absl::Status quantized = QuantizeIndexKeys(
        absl::MakeConstSpan(rotated, static_cast<size_t>(count) * kIndexDim),
        ContiguousRows(RowFormat::kIndexFp4, reinterpret_cast<uint8_t*>(q.stored_.data() + first), count));
    if (!quantized.ok()) return quantized;
  }
  for (int h = 0; h < q.heads_; ++h) {
    const IndexKeyFp4& stored = q.stored_[static_cast<size_t>(h)];
    const size_t hs = static_cast<size_t>(h);
    for (int e = 0; e < kIndexDim; ++e) {
      const int8_t c = Code(stored.codes, e);
      q.q_f32_[static_cast<size_t>(e) * padded + hs] = c;
      q.q_s8_[((static_cast<size_t>(e / 4) * (padded / 16) + hs / 16) * 16 + hs % 16) * 4 + static_cast<size_t>(e % 4)] = c;
      q.q_offset_[static_cast<size_t>(e / 32) * padded + hs] += 12 * c;
    }
    for (int b = 0; b < 4; ++b) q.q_scale_[static_cast<size_t>(b) * padded + hs] = F32FromUe8m0(stored.scales[b]) * 0.25f;
    q.weights_[hs] = weights[hs];
  }
  // The score bound (indexer.h, max_key_scale_byte): |q_h · k| <= c_h *
  // (largest key scale), c_h = Σ_b (s_q/4) * 12 * Σ_e |code_e| (key codes are
  // at most 12 in magnitude); scaled by |w_h| and summed over heads. A head of
  // weight 0 still multiplies (relu(inf) * 0 = NaN), hence the max.
  double largest_head = 0.0, weighted = 0.0, largest_term = -1.0;
  for (int h = 0; h < q.heads_; ++h) {
    double q_h = 0.0;
    for (int b = 0; b < 4; ++b) {
      int abs_codes = 0;
      for (int e = 32 * b; e < 32 * b + 32; ++e) abs_codes += std::abs(int{Code(q.stored_[static_cast<size_t>(h)].codes, e)});
      q_h += 12.0 * abs_codes * q.q_scale_[static_cast<size_t>(b) * padded + static_cast<size_t>(h)];
    }
    const double term = std::fabs(double{weights[static_cast<size_t>(h)]}) * q_h;
    largest_head = std::max(largest_head, q_h);
    weighted += term;
    if (std::max(term, q_h) > largest_term) {
      largest_term = std::max(term, q_h);
      q.limiting_head_ = h;
    }
  }
  const double bound_per_unit_key_scale = std::max(largest_head, weighted);
  constexpr double kScoreLimit = 0x1p128 * (1.0 - 0x1p-12);
  int byte = 254;
  while (byte >= 0 && std::ldexp(bound_per_unit_key_scale, byte - 127) > kScoreLimit) --byte;
  if (byte < 0) {
    const size_t h = static_cast<size_t>(q.limiting_head_);
    return absl::InvalidArgumentError(absl::StrCat(
        "IndexQuery: head ", h, " (weight ", weights[h], ", largest block scale 2^",
        *std::max_element(q.stored_[h].scales, q.stored_[h].scales + 4) - 127,
        ") makes scores overflow fp32 against every key, even of block scale 2^-127"));
  }
  q.max_key_scale_byte_ = byte;
  return absl::OkStatus();
}

std::vector<float> IndexQuery::Values() const {
  std::vector<float> out(static_cast<size_t>(heads_) * kIndexDim);
  for (int h = 0; h < heads_; ++h) {
    DequantizeIndexKeyRef(stored_[static_cast<size_t>(h)].codes, stored_[static_cast<size_t>(h)].scales,
                          &out[static_cast<size_t>(h) * kIndexDim]);
  }
  return out;
}

float IndexScoreRef(const IndexQuery& q, const uint8_t* codes, const uint8_t* scales) {
  const size_t padded = static_cast<size_t>(q.padded_heads());
  float partial[16] = {};
  for (size_t h = 0; h < padded; ++h) {
    float s = 0.0f;
    for (int b = 0; b < 4; ++b) {
      float acc = 0.0f;  // an exact integer
      for (int e = 32 * b; e < 32 * b + 32; ++e) acc += q.q_f32()[static_cast<size_t>(e) * padded + h] * Code(codes, e);
      s += acc * (q.q_scale()[static_cast<size_t>(b) * padded + h] * F32FromUe8m0(scales[b]));
    }
    const float relu = s > 0.0f ? s : 0.0f;
    partial[h % 16] += relu * q.weights()[h];
  }
  for (int width = 8; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) partial[k] += partial[k + width];
  }
  return partial[0];
}

// Implemented in indexer_kernels.cc (dynamic dispatch).
void ScoreKeysDispatch(const IndexQuery& q, const uint8_t* codes, int64_t code_stride, const uint8_t* scales,
                       int64_t scale_stride, int64_t n, float* out);
int64_t FilterAtLeastDispatch(const float* scores, int64_t n, float threshold, int64_t* out, int64_t* first_nan);

namespace {

// The first key scale byte above the query's limit (one byte compare per
// block, outside the scoring loop; only a refusal looks for the culprit).
absl::Status CheckKeyScales(const IndexQuery& query, const ConstPackedRows& keys) {
  const int limit = query.max_key_scale_byte();
  uint8_t largest = 0;
  if (keys.scale_stride == 4) {  // the page-footer layout: one vectorized max over 4 * count bytes
    for (int64_t i = 0; i < 4 * keys.count; ++i) largest = std::max(largest, keys.scales[i]);
  } else {
    for (int64_t j = 0; j < keys.count; ++j) {
      const uint8_t* s = keys.scales + j * keys.scale_stride;
      largest = std::max(largest, std::max(std::max(s[0], s[1]), std::max(s[2], s[3])));
    }
  }
  if (largest <= limit) return absl::OkStatus();
  for (int64_t j = 0; j < keys.count; ++j) {
    for (int b = 0; b < 4; ++b) {
      const int byte = keys.scales[j * keys.scale_stride + b];
      if (byte <= limit) continue;
      return absl::InvalidArgumentError(absl::StrCat(
          "ScoreIndexKeys: key ", j, " block ", b, " has scale ",
          byte == 255 ? std::string("byte 255 (NaN)") : absl::StrCat("2^", byte - 127),
          "; this query scores keys with block scales up to 2^", limit - 127,
          " without overflowing fp32 (its largest term: head ", query.limiting_head(), ")"));
    }
  }
  return absl::InternalError("ScoreIndexKeys: scale check found no culprit");
}

}  // namespace

absl::Status ScoreIndexKeys(const IndexQuery& query, ConstPackedRows keys, absl::Span<float> scores) {
  if (keys.count < 0 || scores.size() < static_cast<size_t>(keys.count)) {
    return absl::InvalidArgumentError(absl::StrCat("ScoreIndexKeys: ", keys.count, " keys but room for ", scores.size(), " scores"));
  }
  if (keys.count == 0) return absl::OkStatus();
  if (keys.data == nullptr || keys.scales == nullptr || keys.data_stride < 64 || keys.scale_stride < 4) {
    return absl::InvalidArgumentError("ScoreIndexKeys: keys view has null pointers or strides below 64 / 4 bytes");
  }
  const absl::Status scales_ok = CheckKeyScales(query, keys);
  if (!scales_ok.ok()) return scales_ok;
  ScoreKeysDispatch(query, keys.data, keys.data_stride, keys.scales, keys.scale_stride, keys.count, scores.data());
  return absl::OkStatus();
}

namespace {

int64_t FirstNaN(absl::Span<const float> scores) {
  for (size_t i = 0; i < scores.size(); ++i) {
    if (std::isnan(scores[i])) return static_cast<int64_t>(i);
  }
  return -1;
}

// TopK's selection into *out (cleared first); sets *first_nan (and selects
// nothing) if scores hold NaN, before any comparison sees one.
void SelectTopK(absl::Span<const float> scores, int64_t k, int64_t* first_nan, TopKScratch& scratch,
                std::vector<int64_t>* out) {
  const int64_t n = static_cast<int64_t>(scores.size());
  k = std::min(k, n);
  *first_nan = -1;
  out->clear();
  if (k <= 0) return;
  // Higher score first, then the lower index (a strict weak order: no NaN).
  auto better = [&](int64_t a, int64_t b) {
    return scores[static_cast<size_t>(a)] > scores[static_cast<size_t>(b)] ||
           (scores[static_cast<size_t>(a)] == scores[static_cast<size_t>(b)] && a < b);
  };
  // Room for every index. Grown, never shrunk: a later call of the same
  // size allocates and zeroes nothing (the filter writes only the few
  // thousand it keeps).
  std::vector<int64_t>& candidates = scratch.candidates;
  if (static_cast<int64_t>(candidates.size()) < n) candidates.resize(static_cast<size_t>(n));
  int64_t count = 0;
  if (k < n) {
    // A threshold that keeps a little more than k: the rank-(k*s/n + margin)
    // score of an evenly spaced sample of s scores.
    const int64_t s = std::min<int64_t>(n, 4096);
    std::vector<float>& sample = scratch.sample;
    sample.resize(static_cast<size_t>(s));
    bool sample_has_nan = false;
    for (int64_t i = 0; i < s; ++i) {
      sample[static_cast<size_t>(i)] = scores[static_cast<size_t>(i * n / s)];
      sample_has_nan |= std::isnan(sample[static_cast<size_t>(i)]);
    }
    if (sample_has_nan) {
      *first_nan = FirstNaN(scores);
      return;
    }
    const int64_t rank = std::min<int64_t>(s - 1, k * s / n + 2 * static_cast<int64_t>(std::sqrt(static_cast<double>(k * s / n))) + 8);
    std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
    const float threshold = sample[static_cast<size_t>(rank)];
    count = FilterAtLeastDispatch(scores.data(), n, threshold, candidates.data(), first_nan);
    if (*first_nan >= 0) return;
  } else {
    *first_nan = FirstNaN(scores);
    if (*first_nan >= 0) return;
  }
  // The filter saw every score: no NaN below.
  if (count < k) {  // the sample was unlucky (or k == n): take everything
    for (int64_t i = 0; i < n; ++i) candidates[static_cast<size_t>(i)] = i;
    count = n;
  }
  const auto first = candidates.begin();
  std::nth_element(first, first + (k - 1), first + count, better);
  out->assign(first, first + k);
  std::sort(out->begin(), out->end());
}

}  // namespace

absl::Status TopK(absl::Span<const float> scores, int64_t k, std::vector<int64_t>* out, TopKScratch* scratch) {
  if (k < 0) return absl::InvalidArgumentError(absl::StrCat("TopK: k = ", k, " is negative"));
  int64_t first_nan = -1;
  SelectTopK(scores, k, &first_nan, *scratch, out);
  if (k == 0) {  // nothing selected, but the promise holds: NaN is refused
    const auto nan = std::find_if(scores.begin(), scores.end(), [](float s) { return std::isnan(s); });
    if (nan != scores.end()) first_nan = nan - scores.begin();
  }
  if (first_nan >= 0) {
    return absl::InvalidArgumentError(absl::StrCat("TopK: score ", first_nan, " is NaN"));
  }
  return absl::OkStatus();
}

absl::Status TopK(absl::Span<const float> scores, int64_t k, std::vector<int64_t>* out) {
  TopKScratch scratch;
  std::vector<int64_t> picked;
  KVC_RETURN_IF_ERROR(TopK(scores, k, &picked, &scratch));
  *out = std::move(picked);
  return absl::OkStatus();
}

std::vector<int64_t> TopK(absl::Span<const float> scores, int64_t k) {
  TopKScratch scratch;
  int64_t first_nan = -1;
  std::vector<int64_t> picked;
  SelectTopK(scores, k, &first_nan, scratch, &picked);
  if (first_nan < 0) return picked;
  std::vector<float> ordered(scores.begin(), scores.end());  // NaN counts as -inf
  for (float& s : ordered) s = std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
  SelectTopK(ordered, k, &first_nan, scratch, &picked);
  return picked;
}

absl::Status SparseAttentionRef(absl::Span<const Bf16> q, absl::Span<const float> rows, absl::Span<const float> sinks,
                                absl::Span<float> out) {
  const size_t heads = sinks.size();
  if (q.size() != heads * kHeadDim || out.size() != heads * kHeadDim || rows.size() % kHeadDim != 0) {
    return absl::InvalidArgumentError("SparseAttentionRef: expected q and out of heads x 512, rows of n x 512");
  }
  const size_t n = rows.size() / kHeadDim;
  const float scale = static_cast<float>(1.0 / std::sqrt(512.0));
  std::vector<float> logits(n);
  for (size_t h = 0; h < heads; ++h) {
    float max = sinks[h];
    for (size_t j = 0; j < n; ++j) {
      float dot = 0.0f;
      for (int i = 0; i < kHeadDim; ++i) dot += ToF32(q[h * kHeadDim + i]) * rows[j * kHeadDim + i];
      logits[j] = dot * scale;
      max = std::max(max, logits[j]);
    }
    float denominator = std::exp(sinks[h] - max);
    for (size_t j = 0; j < n; ++j) denominator += std::exp(logits[j] - max);
    float* o = &out[h * kHeadDim];
    std::fill(o, o + kHeadDim, 0.0f);
    for (size_t j = 0; j < n; ++j) {
      const float p = std::exp(logits[j] - max) / denominator;
      for (int i = 0; i < kHeadDim; ++i) o[i] += p * rows[j * kHeadDim + i];
    }
  }
  return absl::OkStatus();
}

}  // namespace kvc
