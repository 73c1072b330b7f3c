// The lightning indexer (spec §3-§4): prepared index queries, their scores
// against the FP4 index-key pool, and top-k selection; plus the reference
// sparse attention over a selected set. The cache assembles the set a query
// attends to (Cache::SelectAttentionSet).
#ifndef KVC_INDEXER_H_
#define KVC_INDEXER_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvc/executor.h"
#include "kvc/number_formats.h"
#include "kvc/row_formats.h"

namespace kvc {

// A prepared index query: per head, RoPE (at the query position, on the last
// 64 dims) -> bf16 -> Hadamard-128 -> bf16 -> FP4, exactly as an index key;
// also kept in the layout the scoring kernels read (src/indexer_layout.h:
// the heads that can add to a score, with their codes and scale exponents).
class IndexQuery {
 public:
  // q_raw: heads x 128 bf16 (wq_b output, before RoPE), |x| <= 2^120;
  // weights: `heads` finite fp32 head weights (already scaled by
  // 128^-0.5 * heads^-0.5); cos_sin: 64 floats, the compressed-layer RoPE at
  // the query position. Also refuses (kInvalidArgument, naming the head) a
  // query whose scores would overflow fp32 against every key, even one of
  // block scale 2^-127 (see max_key_scale_byte()).
  static absl::StatusOr<IndexQuery> Prepare(absl::Span<const Bf16> q_raw, absl::Span<const float> weights,
                                            const float* cos_sin);
  // The same into *out, reusing its buffers: allocates nothing when *out
  // was prepared before with as many heads (the decode path's form). On a
  // refusal *out is unspecified until prepared again.
  static absl::Status Prepare(absl::Span<const Bf16> q_raw, absl::Span<const float> weights, const float* cos_sin,
                              IndexQuery* out);

  int heads() const { return heads_; }
  int padded_heads() const { return padded_; }
  // The largest key block scale byte (UE8M0: 2^(byte - 127)) this query
  // scores without any fp32 overflow. With c_h = Σ_blocks (s_q / 4) * 12 *
  // Σ |2·E2M1 code| (the largest |q_h · k| for a key of scale 1: key codes
  // are at most 12 in magnitude) and F = max(max_h c_h, Σ_h |w_h| c_h), every
  // score and every intermediate is at most F * 2^(byte - 127) in magnitude;
  // the byte is the largest with F * 2^(byte - 127) <= 2^128 (1 - 2^-12)
  // (the margin covers the fp32 roundings of up to 4096 heads). With
  // non-negative weights, a key at that scale whose codes are ±12 with the
  // query's signs reaches F: one binade more can overflow. At most 254: byte
  // 255 (NaN) is never scored.
  // ScoreIndexKeys refuses keys above it.
  int max_key_scale_byte() const { return max_key_scale_byte_; }
  // The head with the largest term of F (named in ScoreIndexKeys' refusals).
  int limiting_head() const { return limiting_head_; }
  // The stored 68-byte query of head h (packed E2M1 codes, then 4 scales).
  const IndexKeyFp4& stored(int h) const { return stored_[static_cast<size_t>(h)]; }
  // Dequantized values, heads x 128 (the official `idx_q`).
  std::vector<float> Values() const;

  // The head weights, padded with zeros to padded_heads().
  const float* weights() const { return weights_.data(); }

 private:
  friend struct IndexQueryScoringView;  // src/indexer_layout.h: the kernels' view of the layout below

  int heads_ = 0;
  int padded_ = 0;
  int max_key_scale_byte_ = 254;
  int limiting_head_ = 0;
  std::vector<IndexKeyFp4> stored_;
  std::vector<float> weights_;
  // The scoring layout (src/indexer_layout.h documents each field): the
  // active heads (nonzero weight and codes) as slots grouped by head mod 16,
  // their codes, block offsets, scale exponents and weights, and the key
  // exponent thresholds of the subnormal-free paths.
  std::vector<int32_t> slot_head_;
  std::vector<int32_t> group_begin_;
  std::vector<int8_t> slot_codes_;
  std::vector<float> slot_codes_f32_;
  std::vector<int32_t> slot_offset_;
  std::vector<int32_t> slot_scale_bits_;
  std::vector<float> slot_weight_;
  std::vector<double> slot_weight_f64_;
  std::vector<int8_t> slot_codes_shifted_;
  std::vector<int32_t> slot_offset_shifted_;
  std::vector<int32_t> slot_offset_prescaled_;
  std::vector<int32_t> slot_min_scale_bits_;
  int max_q_shift_ = -1;
  int min_q_exp_ = 0;
  int fast_min_key_exp_ = 0;
  int neutral_key_exp_ = 0;
  bool fast_allowed_ = true;
};

// Index scores of `count` keys (rows of `keys`, 68-byte FP4 keys in any
// layout): score_j = Σ_h w_h · max(0, q_h · k_j). Each 32-element block's
// dot product is an exact integer (2·E2M1 codes are small integers) scaled
// by the two power-of-two scales; blocks are summed in order 0..3, heads in
// kvc's canonical order (16 running sums, then halving). Identical bits on
// every SIMD target (AVX3_DL uses VNNI int8 dot products). Requires
// scores.size() >= keys.count. Every score it writes is finite: a key with a
// block scale byte above query.max_key_scale_byte() (a NaN scale byte 255
// included) is refused with kInvalidArgument naming the key (its index in
// `keys`) and block, before any score is written.
absl::Status ScoreIndexKeys(const IndexQuery& query, ConstPackedRows keys, absl::Span<float> scores);
// The same, the keys split across `executor`'s tasks (nullptr: the calling
// thread): one query's latency on several cores. Identical scores and
// refusals (checked before any score is written).
absl::Status ScoreIndexKeys(const IndexQuery& query, ConstPackedRows keys, absl::Span<float> scores, Executor* executor);

// The scalar reference of one key's score (for tests). Finite for keys whose
// scale bytes are at most query.max_key_scale_byte().
float IndexScoreRef(const IndexQuery& query, const uint8_t* codes, const uint8_t* scales);

// Writes to *out the indices of the min(k, scores.size()) highest scores,
// ascending; ties go to the lower index; ±inf order as numbers. Refuses
// (kInvalidArgument, naming the lowest index) scores holding NaN, whatever k,
// and k < 0, leaving *out unchanged. Does not sort or partition the whole array: a threshold
// from a sample, one SIMD filter pass (which also finds NaN), then exact
// selection among the candidates (linear in scores.size(), typically ~8
// bytes of work per key).
absl::Status TopK(absl::Span<const float> scores, int64_t k, std::vector<int64_t>* out);

// TopK's working buffers, kept by a caller that selects again and again (the
// decode path): a call allocates nothing once the buffers (and *out) have
// grown to the largest scores.size() and k seen.
struct TopKScratch {
  std::vector<float> sample;
  std::vector<int64_t> candidates;
};
// TopK above, through `scratch` and into *out's existing storage. On a
// refusal *out is empty or unchanged.
absl::Status TopK(absl::Span<const float> scores, int64_t k, std::vector<int64_t>* out, TopKScratch* scratch);

// The same selection for scores known to hold no NaN (ScoreIndexKeys'
// output). NaN, if present anyway, counts as -inf (a total order): it is
// never picked while a score above -inf is left.
std::vector<int64_t> TopK(absl::Span<const float> scores, int64_t k);

// Reference sparse attention (spec §3, for CPU engines and tests): for each
// head h, logits l_j = (q_h · k_j) * 512^-0.5 over the n selected rows
// (K = V = the rows), p = softmax over {l_j} ∪ {sink_h} (the sink only in the
// denominator), out_h = Σ_j p_j k_j. q: heads x 512 (bf16), rows: n x 512
// fp32 (dequantized), sinks: heads; out: heads x 512 fp32.
absl::Status SparseAttentionRef(absl::Span<const Bf16> q, absl::Span<const float> rows, absl::Span<const float> sinks,
                                absl::Span<float> out);

}  // namespace kvc

#endif  // KVC_INDEXER_H_
