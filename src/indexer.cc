#include "kvc/indexer.h"
#include "kvc/model_spec.h"

#include <algorithm>
#include <array>
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
#include "src/fp_exact.h"
#include "src/indexer_internal.h"
#include "src/status.h"

namespace kvc {
namespace {

int8_t Code(const uint8_t* packed, int e) { return kTwiceE2M1[(packed[e / 2] >> (4 * (e & 1))) & 0xF]; }

// The kernels' layout of a prepared query (src/indexer_layout.h).
void BuildScoringLayout(IndexQuery& q, std::vector<int32_t>& slot_head, std::vector<int32_t>& group_begin,
                        std::vector<int8_t>& codes, std::vector<float>& codes_f32, std::vector<int32_t>& offset,
                        std::vector<int32_t>& scale_bits, std::vector<float>& weight, std::vector<double>& weight_f64,
                        std::vector<int8_t>& codes_shifted, std::vector<int32_t>& offset_shifted,
                        std::vector<int32_t>& offset_prescaled, std::vector<int32_t>& min_scale_bits, int& max_q_shift,
                        int& min_q_exp, int& fast_min_key_exp, int& neutral_key_exp, bool& fast_allowed) {
  slot_head.clear();
  group_begin.assign(17, 0);
  auto block_is_zero = [&](int h, int b) {
    for (int e = 32 * b; e < 32 * b + 32; ++e) {
      if (Code(q.stored(h).codes, e) != 0) return false;
    }
    return true;
  };
  // Active heads, grouped by h mod 16 (the running sum they add into).
  for (int p = 0; p < 16; ++p) {
    group_begin[static_cast<size_t>(p)] = static_cast<int32_t>(slot_head.size());
    for (int h = p; h < q.heads(); h += 16) {
      const bool zero = block_is_zero(h, 0) && block_is_zero(h, 1) && block_is_zero(h, 2) && block_is_zero(h, 3);
      if (q.weights()[h] != 0.0f && !zero) slot_head.push_back(h);
    }
  }
  group_begin[16] = static_cast<int32_t>(slot_head.size());
  const size_t slots = slot_head.size();
  codes.assign(slots * kIndexDim, 0);
  codes_f32.assign(slots * kIndexDim, 0.0f);
  offset.assign(slots * 4, 0);
  scale_bits.assign(slots * 4, 0);
  weight.assign(slots, 0.0f);
  weight_f64.assign(slots, 0.0);
  // Exponents: qe = byte - 129 (s_q/4), over nonzero blocks; e_w of |w|.
  int q_min = 1 << 20, q_max = -(1 << 20), weighted_min = 1 << 20;
  bool positive = false, negative = false;
  fast_allowed = true;
  for (size_t slot = 0; slot < slots; ++slot) {
    const int h = slot_head[slot];
    const IndexKeyFp4& stored = q.stored(h);
    int head_min = 1 << 20;
    for (int b = 0; b < 4; ++b) {
      int sum = 0;
      for (int e = 32 * b; e < 32 * b + 32; ++e) {
        const int8_t c = Code(stored.codes, e);
        codes[slot * kIndexDim + static_cast<size_t>(e)] = c;
        codes_f32[slot * kIndexDim + static_cast<size_t>(e)] = c;
        sum += c;
      }
      offset[slot * 4 + static_cast<size_t>(b)] = -12 * sum;
      if (block_is_zero(h, b)) continue;
      const int qe = stored.scales[b] - 129;
      head_min = std::min(head_min, qe);
      q_max = std::max(q_max, qe);
    }
    q_min = std::min(q_min, head_min);
    const float w = q.weights()[h];
    weight[slot] = w;
    weight_f64[slot] = fp_exact::FromF32(w);
    const int w_field = static_cast<int>((F32Bits(w) >> 23) & 0xFF);
    if (w_field == 0) fast_allowed = false;  // a subnormal weight: the fast path's relu * w would meet it
    weighted_min = std::min(weighted_min, head_min + w_field - 127);
    (w > 0.0f ? positive : negative) = true;
  }
  if (slots == 0) q_min = q_max = weighted_min = 0;
  for (size_t slot = 0; slot < slots; ++slot) {
    for (int b = 0; b < 4; ++b) {
      const int qe = block_is_zero(slot_head[slot], b) ? q_min : q.stored(slot_head[slot]).scales[b] - 129;
      scale_bits[slot * 4 + static_cast<size_t>(b)] = static_cast<int32_t>(static_cast<uint32_t>(qe + 127) << 23);  // qe + 127 may be -1
    }
  }
  min_q_exp = q_min;
  // Integer block sums: each head's codes shifted so its blocks share the
  // head's smallest exponent (zero blocks: shift 0), if every shift is <= 3.
  codes_shifted.assign(slots * kIndexDim, 0);
  offset_shifted.assign(slots * 4, 0);
  offset_prescaled.assign(slots, 0);
  min_scale_bits.assign(slots, 0);
  max_q_shift = 0;
  for (size_t slot = 0; slot < slots; ++slot) {
    const int h = slot_head[slot];
    int head_min = 1 << 20;
    for (int b = 0; b < 4; ++b) {
      if (!block_is_zero(h, b)) head_min = std::min(head_min, q.stored(h).scales[b] - 129);
    }
    min_scale_bits[slot] = static_cast<int32_t>(static_cast<uint32_t>(head_min + 127) << 23);
    for (int b = 0; b < 4; ++b) {
      const int shift = block_is_zero(h, b) ? 0 : q.stored(h).scales[b] - 129 - head_min;
      max_q_shift = std::max(max_q_shift, shift);
      int sum = 0;
      for (int e = 32 * b; e < 32 * b + 32; ++e) {
        const int c = codes[slot * kIndexDim + static_cast<size_t>(e)] * (1 << std::min(shift, 3));
        codes_shifted[slot * kIndexDim + static_cast<size_t>(e)] = static_cast<int8_t>(c);
        sum += c;
      }
      offset_shifted[slot * 4 + static_cast<size_t>(b)] = -12 * sum;
      offset_prescaled[slot] += -96 * sum;
    }
  }
  if (max_q_shift > 3) max_q_shift = -1;  // not usable: the integer path is off for this query
  // Fast path: every block product >= 2^-126 (q_min + ke_min >= -126), every
  // relu * w >= 2^-126, and with weights of both signs every running sum a
  // multiple of 2^-149 * 2^23 at least (their grid: relu * w's ulp).
  fast_min_key_exp = std::max(-126 - q_min, -126 - weighted_min + (positive && negative ? 23 : 0));
  // The quantizer bounds query scales to 2^-128 .. 2^119, so this range is
  // never empty.
  neutral_key_exp = std::min(std::max(0, -126 - q_min), 127 - q_max);
}

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
    const uint16_t magnitude = q_raw[i].bits & 0x7FFF;  // integer compares: x may be subnormal
    if (magnitude > 0x7B80) {                            // 2^120
      return absl::InvalidArgumentError(absl::StrCat("IndexQuery: head ", i / kIndexDim, " dim ", i % kIndexDim,
                                                     magnitude < 0x7F80 ? " exceeds 2^120" : " is not finite"));
    }
  }
  for (size_t h = 0; h < weights.size(); ++h) {
    if ((F32Bits(weights[h]) & 0x7F800000u) == 0x7F800000u) return absl::InvalidArgumentError(absl::StrCat("IndexQuery: weight ", h, " is not finite"));
  }
  IndexQuery& q = *out;  // assign() below reuses its buffers
  q.heads_ = static_cast<int>(heads);
  q.padded_ = (q.heads_ + 15) / 16 * 16;
  const size_t padded = static_cast<size_t>(q.padded_);
  q.stored_.assign(static_cast<size_t>(heads), IndexKeyFp4{});
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
      fp_exact::RotateLast64NoSubnormal(x, kIndexDim, cos_sin);
      for (int i = 0; i < kIndexDim; ++i) rotated[(h - first) * kIndexDim + i] = ToBf16(x[i]);
    }
    const absl::Status quantized = QuantizeIndexKeys(
        absl::MakeConstSpan(rotated, static_cast<size_t>(count) * kIndexDim),
        ContiguousRows(RowFormat::kIndexFp4, reinterpret_cast<uint8_t*>(q.stored_.data() + first), count));
    if (!quantized.ok()) return quantized;
  }
  for (int h = 0; h < q.heads_; ++h) q.weights_[static_cast<size_t>(h)] = weights[static_cast<size_t>(h)];
  // The score bound (indexer.h, max_key_scale_byte): |q_h · k| <= c_h *
  // (largest key scale), c_h = Σ_b (s_q/4) * 12 * Σ_e |code_e| (key codes are
  // at most 12 in magnitude); scaled by |w_h| and summed over heads. A head of
  // weight 0 still multiplies in the reference (relu(inf) * 0 = NaN), hence
  // the max. In fp64 (s_q/4 = 2^(byte - 129) exactly).
  double largest_head = 0.0, weighted = 0.0, largest_term = -1.0;
  for (int h = 0; h < q.heads_; ++h) {
    double q_h = 0.0;
    for (int b = 0; b < 4; ++b) {
      int abs_codes = 0;
      for (int e = 32 * b; e < 32 * b + 32; ++e) abs_codes += std::abs(int{Code(q.stored_[static_cast<size_t>(h)].codes, e)});
      q_h += 12.0 * abs_codes * std::ldexp(1.0, q.stored_[static_cast<size_t>(h)].scales[b] - 129);
    }
    const double term = std::fabs(fp_exact::FromF32(weights[static_cast<size_t>(h)])) * q_h;
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
  BuildScoringLayout(q, q.slot_head_, q.group_begin_, q.slot_codes_, q.slot_codes_f32_, q.slot_offset_, q.slot_scale_bits_,
                     q.slot_weight_, q.slot_weight_f64_, q.slot_codes_shifted_, q.slot_offset_shifted_,
                     q.slot_offset_prescaled_, q.slot_min_scale_bits_, q.max_q_shift_, q.min_q_exp_, q.fast_min_key_exp_, q.neutral_key_exp_,
                     q.fast_allowed_);
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
    const bool real = h < static_cast<size_t>(q.heads());  // padding heads: codes, scales and weight 0
    float s = 0.0f;
    for (int b = 0; b < 4; ++b) {
      float acc = 0.0f;  // an exact integer
      for (int e = 32 * b; e < 32 * b + 32; ++e) {
        acc += (real ? static_cast<float>(Code(q.stored(static_cast<int>(h)).codes, e)) : 0.0f) * Code(codes, e);
      }
      const float q_scale = real ? F32FromUe8m0(q.stored(static_cast<int>(h)).scales[b]) * 0.25f : 0.0f;
      s += acc * (q_scale * F32FromUe8m0(scales[b]));
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
void ScoreKeyPagesDispatch(const IndexQuery& q, const ConstPackedRows* pages, int64_t count, int64_t keys_per_page,
                           float* out);

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

namespace {

// Tasks for n keys on `executor`: a few per thread for balance on a shared
// machine, each at least 2048 keys (~40 us at 64 heads), at most kMaxKeyTasks.
constexpr int64_t kMaxKeyTasks = 64;
int64_t KeyTasks(int64_t n, const Executor& executor) {
  const int64_t by_size = n / 2048;
  const int64_t wanted = executor.concurrency() == 1 ? 1 : 4 * int64_t{executor.concurrency()};
  return std::max<int64_t>(1, std::min({by_size, wanted, kMaxKeyTasks}));
}

}  // namespace

absl::Status ScoreIndexKeys(const IndexQuery& query, ConstPackedRows keys, absl::Span<float> scores, Executor* executor) {
  Executor& ex = ExecutorOrInline(executor);
  const int64_t tasks = KeyTasks(keys.count, ex);
  if (tasks == 1) return ScoreIndexKeys(query, keys, scores);
  if (keys.count < 0 || scores.size() < static_cast<size_t>(keys.count)) {
    return absl::InvalidArgumentError(absl::StrCat("ScoreIndexKeys: ", keys.count, " keys but room for ", scores.size(), " scores"));
  }
  if (keys.data == nullptr || keys.scales == nullptr || keys.data_stride < 64 || keys.scale_stride < 4) {
    return absl::InvalidArgumentError("ScoreIndexKeys: keys view has null pointers or strides below 64 / 4 bytes");
  }
  KVC_RETURN_IF_ERROR(CheckKeyScales(query, keys));
  const int64_t per_task = (keys.count + tasks - 1) / tasks / 32 * 32 + 32;
  ex.ParallelFor((keys.count + per_task - 1) / per_task, [&](int64_t t) {
    const int64_t first = t * per_task, n = std::min(per_task, keys.count - first);
    ScoreKeysDispatch(query, keys.data + first * keys.data_stride, keys.data_stride, keys.scales + first * keys.scale_stride,
                      keys.scale_stride, n, scores.data() + first);
  });
  return absl::OkStatus();
}

absl::Status ScoreIndexKeyPages(const IndexQuery& query, int64_t pages, int64_t keys_per_page,
                                absl::FunctionRef<ConstPackedRows(int64_t)> page, absl::Span<float> scores,
                                Executor* executor, int64_t* failed_page) {
  Executor& ex = ExecutorOrInline(executor);
  const int64_t tasks = std::min(pages, KeyTasks(pages * keys_per_page, ex));
  const int64_t per_task = tasks > 0 ? (pages + tasks - 1) / tasks : 0;
  // Each task scores its pages in order and stops at its first refusal; the
  // first refusal overall is the one of the lowest page.
  struct Refusal {
    int64_t page = -1;
    absl::Status status;
  };
  Refusal inline_refusal;
  std::array<Refusal, kMaxKeyTasks> refusals;  // on the stack: the decode path allocates nothing
  // Each task takes its pages in batches: checks their views, scores the
  // batch in one kernel call, then checks the scales it just read (in cache
  // now; checking first made every page's footer a DRAM miss on the critical
  // path). The first refusal in page order stops the task; the scores are
  // unspecified then, as the contract allows (the kernels give any scale
  // byte defined, if meaningless, results).
  auto run = [&](int64_t t, Refusal& refusal) {
    constexpr int64_t kBatch = 64;
    ConstPackedRows batch[kBatch];
    const int64_t end = std::min(pages, (t + 1) * per_task);
    for (int64_t first = t * per_task; first < end; first += kBatch) {
      int64_t count = std::min(kBatch, end - first);
      absl::Status bad_view;
      for (int64_t i = 0; i < count; ++i) {
        batch[i] = page(first + i);
        const ConstPackedRows& keys = batch[i];
        if (keys.count > 0 && (keys.data == nullptr || keys.scales == nullptr || keys.data_stride < 64 || keys.scale_stride < 4)) {
          bad_view = absl::InvalidArgumentError("ScoreIndexKeys: keys view has null pointers or strides below 64 / 4 bytes");
          count = i;  // score and check the pages before it
          break;
        }
      }
      ScoreKeyPagesDispatch(query, batch, count, keys_per_page, scores.data() + first * keys_per_page);
      for (int64_t i = 0; i < count; ++i) {
        absl::Status checked = CheckKeyScales(query, batch[i]);
        if (!checked.ok()) {
          refusal = {first + i, std::move(checked)};
          return;
        }
      }
      if (!bad_view.ok()) {
        refusal = {first + count, std::move(bad_view)};
        return;
      }
    }
  };
  if (tasks <= 1) {
    run(0, inline_refusal);
  } else {
    ex.ParallelFor(tasks, [&](int64_t t) { run(t, refusals[static_cast<size_t>(t)]); });
    for (int64_t t = 0; t < tasks && inline_refusal.page < 0; ++t) {
      if (refusals[static_cast<size_t>(t)].page >= 0) inline_refusal = std::move(refusals[static_cast<size_t>(t)]);
    }
  }
  if (inline_refusal.page < 0) return absl::OkStatus();
  *failed_page = inline_refusal.page;
  return inline_refusal.status;
}

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

// Scores compared as integers: for non-NaN floats the key orders as the
// value (-0 and +0 alike), and no float comparison meets a subnormal score
// (tiny keys give subnormal scores; an fp32 compare of one may cost Intel
// cores an assist).
inline int32_t OrderKey(float f) {
  const int32_t bits = static_cast<int32_t>(F32Bits(f));
  if (bits == static_cast<int32_t>(0x80000000u)) return 0;  // -0 = +0
  return bits >= 0 ? bits : static_cast<int32_t>(0x80000000u) - bits;
}
inline bool IsNaNBits(float f) { return (F32Bits(f) & 0x7FFFFFFFu) > 0x7F800000u; }

int64_t FirstNaN(absl::Span<const float> scores) {
  for (size_t i = 0; i < scores.size(); ++i) {
    if (IsNaNBits(scores[i])) return static_cast<int64_t>(i);
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
    const int32_t ka = OrderKey(scores[static_cast<size_t>(a)]), kb = OrderKey(scores[static_cast<size_t>(b)]);
    return ka > kb || (ka == kb && a < b);
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
      sample_has_nan |= IsNaNBits(sample[static_cast<size_t>(i)]);
    }
    if (sample_has_nan) {
      *first_nan = FirstNaN(scores);
      return;
    }
    const int64_t rank = std::min<int64_t>(s - 1, k * s / n + 2 * static_cast<int64_t>(std::sqrt(static_cast<double>(k * s / n))) + 8);
    std::nth_element(sample.begin(), sample.begin() + rank, sample.end(),
                     [](float a, float b) { return OrderKey(a) > OrderKey(b); });
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
    const auto nan = std::find_if(scores.begin(), scores.end(), [](float s) { return IsNaNBits(s); });
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
  for (float& s : ordered) s = IsNaNBits(s) ? -std::numeric_limits<float>::infinity() : s;
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
