// The scoring kernels' view of a prepared IndexQuery (src/indexer.cc builds
// it in IndexQuery::Prepare, src/indexer_kernels.cc reads it).
//
// Score of a key (IndexScoreRef, kvc's definition): per head h and block b,
// t = acc_hb * fl(s_q/4 * s_k) with acc_hb the exact integer block dot
// product of the 2*E2M1 codes; s_h = ((t0 + t1) + t2) + t3; the sum over
// heads of relu(s_h) * w_h in 16 running sums (head h into sum h mod 16,
// heads ascending), then halving. All in fp32.
//
// The kernels reproduce those bits without ever giving an fp32 operation a
// subnormal operand or result (Intel cores take a microcode assist for each,
// ~100x a normal operation; FTZ/DAZ would change results, and a library must
// not touch its caller's floating-point mode):
//
// - Only "active" heads are scored: a head of weight ±0, or whose codes are
//   all zero, adds ±0 to a running sum that starts at +0, which changes
//   nothing. Active heads become slots, grouped by h mod 16, ascending.
// - Scales are combined in the exponent domain: with qe = the exponent of
//   s_q/4 and ke that of s_k, fl(s_q/4 * s_k) is 2^(qe+ke) for
//   qe + ke >= -149 and 0 below (2^-150 rounds to even, 0). Its fp32 bits are
//   built with one integer add, never multiplied.
// - A block whose codes are all zero has acc = 0 whatever its scale, so its
//   exponent is replaced by one that keeps 2^(qe+ke) normal (zero query
//   blocks: min_q_exp; zero key blocks: the key's smallest nonzero-block
//   exponent, or neutral_key_exp for an all-zero key).
// - Fast path (per key): every nonzero acc * 2^(qe+ke) is a normal fp32
//   (exactly the reference's product), so every partial sum of s_h is 0 or at
//   least 2^(qe+ke)_min; every relu * w is 0 or at least
//   2^(min_h(qe_h,min + e_w,h) + ke_min) (e_w: w's exponent), and with
//   weights of both signs the running sums can cancel down to 2^-23 of that.
//   fast_min_key_exp is the smallest key exponent (over nonzero blocks) for
//   which all of these are >= 2^-126.
// - Scaled path (keys below that): the whole computation runs on the key
//   scaled by 2^sigma (sigma >= 23): products of a power of two and an
//   integer are exact, sums whose reference result is subnormal are exact
//   (so equal in the scaled domain), normal results round alike; only
//   relu * w, where the reference rounds to the subnormal grid 2^-149, is
//   rounded to 2^(sigma-149) explicitly (in fp64, where the product is
//   exact). The score is unscaled with integer operations.
// - Integer block sums (a refinement of the fast path): when a key's block
//   exponents and the head's differ from their minima by d_b <= 9 in all,
//   every partial sum of s_h is an integer below 2^24 times 2^E_min, so exact:
//   s_h = (Σ_b acc_b << d_b) * 2^E_min, one conversion and one multiply per
//   head instead of four. When every key's d_b is at most 3 (N(0,1) keys:
//   0..2), AVX3_DL puts 2^d_b in the key bytes themselves (prescaled keys),
//   and the integer Σ_b acc_b << d_b comes out of one accumulator.
// - Keys neither path can take (block scales spanning more of the exponent
//   range than the scaled domain holds) are scored by an fp64 emulation of
//   the reference.
#ifndef KVC_SRC_INDEXER_LAYOUT_H_
#define KVC_SRC_INDEXER_LAYOUT_H_

#include <cstdint>

#include "kvc/indexer.h"

namespace kvc {

struct IndexQueryScoringView {
  explicit IndexQueryScoringView(const IndexQuery& q)
      : slots(static_cast<int>(q.slot_head_.size())),
        group_begin(q.group_begin_.data()),
        codes(q.slot_codes_.data()),
        codes_f32(q.slot_codes_f32_.data()),
        offset(q.slot_offset_.data()),
        scale_bits(q.slot_scale_bits_.data()),
        weight(q.slot_weight_.data()),
        weight_f64(q.slot_weight_f64_.data()),
        codes_shifted(q.slot_codes_shifted_.data()),
        offset_shifted(q.slot_offset_shifted_.data()),
        offset_prescaled(q.slot_offset_prescaled_.data()),
        min_scale_bits(q.slot_min_scale_bits_.data()),
        max_q_shift(q.max_q_shift_),
        min_q_exp(q.min_q_exp_),
        fast_min_key_exp(q.fast_min_key_exp_),
        neutral_key_exp(q.neutral_key_exp_),
        key_exp_limit(q.max_key_scale_byte_ - 127),
        fast_allowed(q.fast_allowed_) {}

  int slots;                 // active heads
  const int32_t* group_begin;  // [17]: slots of heads h = p mod 16 are [group_begin[p], group_begin[p+1])
  const int8_t* codes;       // [slot][128] 2*E2M1 codes, in [-12, 12]
  const float* codes_f32;    // [slot][128] the same as floats
  const int32_t* offset;     // [slot][4] -12 * Σ codes of the block: the VNNI path's block sums start there (undoing the keys' +12)
  const int32_t* scale_bits; // [slot][4] (qe + 127) << 23, qe the exponent of s_q/4 (zero blocks: min_q_exp)
  const float* weight;       // [slot]
  const double* weight_f64;  // [slot]
  // Integer block sums (fast path, AVX3_DL): each head's codes times
  // 2^(qe_b - qe_min,h), so that its four block sums share the exponent
  // qe_min,h; usable when that shift is at most 3 (codes * 8 fit int8) for
  // every head: max_q_shift, else -1.
  const int8_t* codes_shifted;    // [slot][128]
  const int32_t* offset_shifted;  // [slot][4] -12 * Σ shifted codes of the block
  // Prescaled keys (AVX3_DL, when every key's block shifts are also <= 3):
  // the key bytes carry their own shift, 2*E2M1 * 2^d_b + 96, so one
  // accumulator runs over all 128 codes, starting here.
  const int32_t* offset_prescaled;  // [slot] -96 * Σ shifted codes of the head
  const int32_t* min_scale_bits;  // [slot] (qe_min,h + 127) << 23
  int max_q_shift;
  int min_q_exp;             // smallest qe over the active slots' nonzero blocks
  int fast_min_key_exp;      // keys whose smallest nonzero-block exponent is at least this take the fast path
  int neutral_key_exp;       // an exponent ke with min_q_exp + ke >= -126 and max qe + ke <= 127 (all-zero keys)
  int key_exp_limit;         // max_key_scale_byte() - 127: the largest key exponent scored
  bool fast_allowed;         // false when an active weight is subnormal: every key takes the scaled path
};

}  // namespace kvc

#endif  // KVC_SRC_INDEXER_LAYOUT_H_
