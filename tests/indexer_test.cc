#include "kvc/indexer.h"

#include <sys/wait.h>

#include <algorithm>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/executor.h"
#include "kvc/row_kernels.h"
#include "tests/testing/distributions.h"
#include "tests/testing/every_target.h"
#include "tests/testing/subnormal_traps.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

std::vector<Bf16> RandomBf16(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<Bf16> v(n);
  for (Bf16& x : v) x = ToBf16(normal(rng));
  return v;
}

IndexQuery RandomQuery(int heads, std::mt19937& rng) {
  std::uniform_real_distribution<float> weight(-0.2f, 0.3f);
  std::vector<float> w(static_cast<size_t>(heads));
  for (float& x : w) x = weight(rng);
  float cos_sin[64];
  for (int j = 0; j < 32; ++j) {
    cos_sin[2 * j] = std::cos(0.1f * static_cast<float>(j));
    cos_sin[2 * j + 1] = std::sin(0.1f * static_cast<float>(j));
  }
  auto q = IndexQuery::Prepare(RandomBf16(static_cast<size_t>(heads) * kIndexDim, rng), w, cos_sin);
  EXPECT_TRUE(q.ok()) << q.status();
  return *std::move(q);
}

// n keys in one page of the footer layout.
std::vector<uint8_t> RandomKeys(int64_t n, std::mt19937& rng) {
  std::vector<uint8_t> page(static_cast<size_t>(n) * 68);
  EXPECT_TRUE(QuantizeIndexKeys(RandomBf16(static_cast<size_t>(n) * kIndexDim, rng, 2.0f),
                                PageFooterRows(RowFormat::kIndexFp4, page.data(), n)).ok());
  return page;
}

class IndexerKernelsTest : public testing::EveryTargetTest {};
KVC_INSTANTIATE_EVERY_TARGET(IndexerKernelsTest);

TEST_P(IndexerKernelsTest, ScoresMatchTheReferenceForAnyHeadCount) {
  std::mt19937 rng(1);
  for (const int heads : {1, 5, 16, 64}) {
    const IndexQuery q = RandomQuery(heads, rng);
    const int64_t n = 150;
    const std::vector<uint8_t> page = RandomKeys(n, rng);
    const ConstPackedRows keys = PageFooterRows(RowFormat::kIndexFp4, page.data(), n);
    std::vector<float> scores(static_cast<size_t>(n));
    ASSERT_TRUE(ScoreIndexKeys(q, keys, absl::MakeSpan(scores)).ok());
    for (int64_t j = 0; j < n; ++j) {
      ASSERT_EQ(F32Bits(scores[static_cast<size_t>(j)]), F32Bits(IndexScoreRef(q, keys.row_data(j), keys.row_scales(j))))
          << heads << " heads, key " << j;
    }
  }
}

// Keys written byte by byte (as an engine or a snapshot may): random codes
// (each block all zero with probability `zero_blocks`) and block scale bytes
// from `scale_byte`.
std::vector<uint8_t> KeysWithScales(int64_t n, std::mt19937& rng, const std::function<int(int64_t, int)>& scale_byte,
                                    double zero_blocks = 0.0) {
  std::vector<uint8_t> page(static_cast<size_t>(n) * 68);
  const PackedRows keys = PageFooterRows(RowFormat::kIndexFp4, page.data(), n);
  std::bernoulli_distribution zero(zero_blocks);
  for (int64_t j = 0; j < n; ++j) {
    for (int b = 0; b < 4; ++b) {
      const bool z = zero(rng);
      for (int i = 16 * b; i < 16 * b + 16; ++i) keys.row_data(j)[i] = z ? static_cast<uint8_t>((rng() & 1) ? 0x88 : 0) : static_cast<uint8_t>(rng());
      keys.row_scales(j)[b] = static_cast<uint8_t>(scale_byte(j, b));
    }
  }
  return page;
}

// The key distributions the scoring kernels must score exactly and without a
// subnormal operation: realistic N(0,1) keys, all-zero keys, keys at the
// largest scales the query accepts, tiny scales (block products, sums and
// relu * w in the subnormal range, and scales that round to 0), scales around
// the fast path's threshold, zero blocks among tiny ones, and keys whose
// blocks span the whole exponent range (the fp64 emulation).
struct KeyDistribution {
  std::string name;
  std::function<std::vector<uint8_t>(int64_t, std::mt19937&, const IndexQuery&)> make;
};

std::vector<KeyDistribution> KeyDistributions() {
  auto uniform = [](int lo, int hi) {
    return [lo, hi](int64_t n, std::mt19937& rng, const IndexQuery& q) {
      const int top = std::min(hi, q.max_key_scale_byte());
      std::uniform_int_distribution<int> byte(std::min(lo, top), top);
      return KeysWithScales(n, rng, [&](int64_t, int) { return byte(rng); });
    };
  };
  return {
      {"normal", [](int64_t n, std::mt19937& rng, const IndexQuery&) {
         std::vector<uint8_t> page(static_cast<size_t>(n) * 68);
         EXPECT_TRUE(QuantizeIndexKeys(RandomBf16(static_cast<size_t>(n) * kIndexDim, rng),
                                       PageFooterRows(RowFormat::kIndexFp4, page.data(), n)).ok());
         return page;
       }},
      {"zeros", [](int64_t n, std::mt19937& rng, const IndexQuery& q) {
         return KeysWithScales(n, rng, [&](int64_t, int) { return static_cast<int>(rng() % (q.max_key_scale_byte() + 1)); }, 1.0);
       }},
      {"huge", uniform(200, 254)},
      {"tiny", uniform(0, 12)},
      {"threshold", uniform(20, 60)},
      {"tiny_with_zero_blocks", [](int64_t n, std::mt19937& rng, const IndexQuery&) {
         return KeysWithScales(n, rng, [&](int64_t, int) { return static_cast<int>(rng() % 8); }, 0.4);
       }},
      {"spanning", [](int64_t n, std::mt19937& rng, const IndexQuery& q) {
         return KeysWithScales(n, rng, [&](int64_t j, int b) { return b == static_cast<int>(j % 4) ? q.max_key_scale_byte() : static_cast<int>(rng() % 4); });
       }},
      {"any", uniform(0, 254)},
      // Block exponents within a key 0..3 apart (the VNNI kernel's prescaled
      // keys), 0..7 apart (its shifted integer block sums), and each key of a
      // group either (the group falls back to the common path).
      {"blocks_within_3", [](int64_t n, std::mt19937& rng, const IndexQuery&) {
         return KeysWithScales(n, rng, [&](int64_t, int) { return 120 + static_cast<int>(rng() % 4); });
       }},
      {"blocks_within_7", [](int64_t n, std::mt19937& rng, const IndexQuery&) {
         return KeysWithScales(n, rng, [&](int64_t, int) { return 118 + static_cast<int>(rng() % 8); });
       }},
      {"blocks_mixed", [](int64_t n, std::mt19937& rng, const IndexQuery&) {
         return KeysWithScales(n, rng, [&](int64_t j, int) { return 118 + static_cast<int>(rng() % (j % 5 == 0 ? 8 : 4)); });
       }},
      // Key vectors (16 keys) that need the scaled path beside fast ones, at
      // a different place in each 64-key group (vectors 1, 6, ...): a group
      // is scored scaled, its fast vectors included, which must not inherit
      // anything from the previous group's scaled vector at their place
      // (with the tiny query: fast keys from 2^9, scaled ones with sigma ~120).
      {"tiny_beside_fast", [](int64_t n, std::mt19937& rng, const IndexQuery&) {
         return KeysWithScales(n, rng, [&](int64_t j, int) { return j / 16 % 5 == 1 ? 1 + static_cast<int>(rng() % 3) : 136 + static_cast<int>(rng() % 5); });
       }},
  };
}

// Queries: N(0,1) with weights of both signs; positive weights; tiny queries;
// subnormal and zero weights, all-zero heads; huge queries.
std::vector<std::pair<std::string, IndexQuery>> QueryDistributions(std::mt19937& rng) {
  float cos_sin[64];
  for (int j = 0; j < 32; ++j) cos_sin[2 * j] = std::cos(0.1f * static_cast<float>(j)), cos_sin[2 * j + 1] = std::sin(0.1f * static_cast<float>(j));
  std::vector<std::pair<std::string, IndexQuery>> out;
  out.emplace_back("mixed_weights", RandomQuery(64, rng));
  std::vector<float> w(64, 0.02f);
  out.emplace_back("positive_weights", *IndexQuery::Prepare(RandomBf16(64 * kIndexDim, rng), w, cos_sin));
  out.emplace_back("tiny_query", *IndexQuery::Prepare(RandomBf16(64 * kIndexDim, rng, 0x1p-118f), w, cos_sin));
  std::vector<Bf16> some_zero = RandomBf16(20 * kIndexDim, rng);
  std::fill(some_zero.begin() + 3 * kIndexDim, some_zero.begin() + 4 * kIndexDim, ToBf16(0.0f));
  std::vector<float> odd(20, -0.3f);
  odd[1] = 0x1p-140f;  // subnormal
  odd[2] = 0.0f;
  odd[5] = -0.0f;
  odd[7] = 0x1p-126f;
  out.emplace_back("odd_weights", *IndexQuery::Prepare(some_zero, odd, cos_sin));
  out.emplace_back("huge_query", *IndexQuery::Prepare(RandomBf16(16 * kIndexDim, rng, 0x1p100f), std::vector<float>(16, 1.0f), cos_sin));
  return out;
}

TEST_P(IndexerKernelsTest, ScoresMatchTheReferenceOnEveryDistribution) {
  std::mt19937 rng(11);
  for (const auto& [query_name, q] : QueryDistributions(rng)) {
    for (const KeyDistribution& dist : KeyDistributions()) {
      for (const int64_t n : {int64_t{141}, int64_t{104}}) {  // 64-key groups and tails of 13 and 40 keys
        const std::vector<uint8_t> page = dist.make(n, rng, q);
        const ConstPackedRows keys = PageFooterRows(RowFormat::kIndexFp4, page.data(), n);
        std::vector<float> scores(static_cast<size_t>(n));
        const absl::Status status = ScoreIndexKeys(q, keys, absl::MakeSpan(scores));
        ASSERT_TRUE(status.ok()) << query_name << " x " << dist.name << ": " << status;
        for (int64_t j = 0; j < n; ++j) {
          ASSERT_EQ(F32Bits(scores[static_cast<size_t>(j)]), F32Bits(IndexScoreRef(q, keys.row_data(j), keys.row_scales(j))))
              << query_name << " x " << dist.name << ", " << n << " keys, key " << j << ": "
              << scores[static_cast<size_t>(j)] << " vs " << IndexScoreRef(q, keys.row_data(j), keys.row_scales(j));
        }
      }
    }
  }
}

// Random sweeps the fixed distributions miss: block scale bytes in random
// windows of 0..74 (the scaled path's range) with zero blocks, and head
// weights N(0,1)-sized, shrunk by up to 2^-40, spread over 2^±20 or partly
// subnormal: each product relu * w either side of the reference's 2^-126
// (where the kernel switches between fp32 and gridded fp64). Every score
// bit-exact, and no subnormal operation on the way.
TEST_P(IndexerKernelsTest, ScoresMatchTheReferenceOverRandomScalesAndWeights) {
  std::mt19937 rng(23);
  for (int trial = 0; trial < 160; ++trial) {
    std::vector<float> w(64);
    for (size_t h = 0; h < w.size(); ++h) {
      float x = std::uniform_real_distribution<float>(-0.3f, 0.3f)(rng);
      if (trial % 4 == 1) x = std::ldexp(x, -std::uniform_int_distribution<int>(0, 40)(rng));
      if (trial % 4 == 2 && h % 7 == 0) x = std::ldexp(x, -135);
      if (trial % 4 == 3) x = std::ldexp(x, std::uniform_int_distribution<int>(-20, 20)(rng));
      w[h] = x;
    }
    float cos_sin[64];
    for (int j = 0; j < 32; ++j) cos_sin[2 * j] = 1.0f, cos_sin[2 * j + 1] = 0.0f;
    const float q_scale = trial % 3 == 0 ? 0x1p-100f : 1.0f;
    IndexQuery q;
    ASSERT_TRUE(IndexQuery::Prepare(RandomBf16(64 * kIndexDim, rng, q_scale), w, cos_sin, &q).ok());
    const int64_t n = 1 + std::uniform_int_distribution<int64_t>(0, 150)(rng);
    const int lo = std::uniform_int_distribution<int>(0, 60)(rng), spread = std::uniform_int_distribution<int>(0, 14)(rng);
    const std::vector<uint8_t> page = testing::RandomIndexKeyPage(n, lo, std::min(lo + spread, q.max_key_scale_byte()), 9, rng);
    const ConstPackedRows keys = PageFooterRows(RowFormat::kIndexFp4, page.data(), n);
    std::vector<float> scores(static_cast<size_t>(n));
    const std::string what = absl::StrCat("trial ", trial, " (scale bytes ", lo, "..", lo + spread, ")");
    testing::ExpectNoSubnormalOperations(what, [&] {
      if (!ScoreIndexKeys(q, keys, absl::MakeSpan(scores)).ok()) std::abort();
    });
    ASSERT_TRUE(ScoreIndexKeys(q, keys, absl::MakeSpan(scores)).ok()) << what;
    for (int64_t j = 0; j < n; ++j) {
      ASSERT_EQ(F32Bits(scores[static_cast<size_t>(j)]), F32Bits(IndexScoreRef(q, keys.row_data(j), keys.row_scales(j))))
          << what << ", key " << j;
    }
  }
}

TEST_P(IndexerKernelsTest, ScoringMeetsNoSubnormalOperation) {
  std::mt19937 rng(12);
  // Preparing a query: tiny (bf16 subnormal) values, RoPE and the index-key pipeline.
  for (const float scale : {1.0f, 0x1p-118f, 0x1p-128f}) {
    const std::vector<Bf16> q_raw = RandomBf16(64 * kIndexDim, rng, scale);
    std::vector<float> w(64, 0.02f);
    float cos_sin[64];
    for (int j = 0; j < 32; ++j) cos_sin[2 * j] = std::cos(0.1f * static_cast<float>(j)), cos_sin[2 * j + 1] = std::sin(0.1f * static_cast<float>(j));
    IndexQuery q;
    ASSERT_TRUE(IndexQuery::Prepare(q_raw, w, cos_sin, &q).ok());
    testing::ExpectNoSubnormalOperations("IndexQuery::Prepare", [&] {
      if (!IndexQuery::Prepare(q_raw, w, cos_sin, &q).ok()) std::abort();
    });
  }
  for (const auto& [query_name, q] : QueryDistributions(rng)) {
    for (const KeyDistribution& dist : KeyDistributions()) {
      const int64_t n = 77;
      const std::vector<uint8_t> page = dist.make(n, rng, q);
      std::vector<float> scores(static_cast<size_t>(n));
      testing::ExpectNoSubnormalOperations(query_name + " x " + dist.name, [&] {
        if (!ScoreIndexKeys(q, PageFooterRows(RowFormat::kIndexFp4, page.data(), n), absl::MakeSpan(scores)).ok()) std::abort();
      });
    }
  }
}

#ifdef KVC_HAVE_SUBNORMAL_TRAPS
// The harness above catches subnormal arithmetic: the scalar reference, which
// multiplies by the subnormal scale 2^-127 of a zero block, dies under it.
TEST(SubnormalTraps, CatchTheReferencesSubnormalArithmetic) {
  std::mt19937 rng(13);
  const IndexQuery q = RandomQuery(16, rng);
  const std::vector<uint8_t> page = KeysWithScales(1, rng, [](int64_t, int) { return 0; });
  const ConstPackedRows keys = PageFooterRows(RowFormat::kIndexFp4, page.data(), 1);
  EXPECT_EXIT(
      {
        testing::RunWithSubnormalTraps([&] { volatile float score = IndexScoreRef(q, keys.row_data(0), keys.row_scales(0)); (void)score; });
        std::_Exit(0);
      },
      // SIGFPE; under AddressSanitizer, which reports the FPE itself, an abort.
      [](int status) { return WIFSIGNALED(status) && (WTERMSIG(status) == SIGFPE || WTERMSIG(status) == SIGABRT); }, "");
}
#endif

TEST_P(IndexerKernelsTest, TopKEqualsBruteForceIncludingTies) {
  std::mt19937 rng(2);
  for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{100000}}) {
    for (const int64_t k : {int64_t{0}, int64_t{1}, int64_t{32}, int64_t{512}, int64_t{2048}, n, n + 5}) {
      for (const int kind : {0, 1, 2}) {  // distinct, heavy ties, all equal
        std::vector<float> scores(static_cast<size_t>(n));
        std::uniform_int_distribution<int> few(0, 9);
        std::normal_distribution<float> normal;
        for (float& s : scores) s = kind == 0 ? normal(rng) : kind == 1 ? static_cast<float>(few(rng)) : 1.0f;
        std::vector<int64_t> order(static_cast<size_t>(n));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
          return scores[static_cast<size_t>(a)] > scores[static_cast<size_t>(b)];
        });
        order.resize(static_cast<size_t>(std::min(k, n)));
        std::sort(order.begin(), order.end());
        ASSERT_EQ(TopK(scores, k), order) << "n " << n << " k " << k << " kind " << kind;
      }
    }
  }
}

// ±2^exponent with random signs: after the Hadamard transform, blocks of
// varied magnitudes up to about 2^(exponent + 3.5).
std::vector<Bf16> SignedPowers(size_t n, int exponent, std::mt19937& rng) {
  std::vector<Bf16> v(n);
  for (Bf16& x : v) x = ToBf16(std::ldexp((rng() & 1) ? -1.0f : 1.0f, exponent));
  return v;
}

// The exact score of key j, from the dequantized values (double: no
// overflow for any stored query and key).
double ExactScore(const IndexQuery& q, const ConstPackedRows& keys, int64_t j) {
  const std::vector<float> qv = q.Values();
  std::vector<float> kv(kIndexDim);
  EXPECT_TRUE(DequantizeIndexKeys(keys.Slice(j, 1), absl::MakeSpan(kv)).ok());
  double score = 0;
  for (int h = 0; h < q.heads(); ++h) {
    double dot = 0;
    for (int e = 0; e < kIndexDim; ++e) dot += double{qv[static_cast<size_t>(h * kIndexDim + e)]} * kv[static_cast<size_t>(e)];
    score += double{q.weights()[h]} * std::max(dot, 0.0);
  }
  return score;
}

// Keys equal to the query (identity RoPE): every head's dot product is as
// large as the codes allow, so the scores reach the fp32 limit first here.
// Every pair of magnitudes is either refused (naming the key and block,
// scores untouched) or scored finite and bit-exact; whatever overflows in
// exact arithmetic is refused.
TEST_P(IndexerKernelsTest, HugeQueriesAndKeysAreRefusedOrScoredFinite) {
  std::mt19937 rng(6);
  float identity[64];
  for (int j = 0; j < 32; ++j) identity[2 * j] = 1.0f, identity[2 * j + 1] = 0.0f;
  const int kHeads = 64;
  const int64_t n = 6;
  const std::vector<Bf16> unit = SignedPowers(kIndexDim, 0, rng);
  double largest_scored = 0;
  int refused = 0;
  for (const int qe : {-40, 0, 30, 50, 60, 100, 119, 120}) {
    for (const int ke : {-40, 0, 30, 50, 60, 100, 119, 120}) {
      std::vector<Bf16> q_raw, key_raw;
      for (int h = 0; h < kHeads; ++h) {
        for (const Bf16 x : unit) q_raw.push_back(ToBf16(std::ldexp(ToF32(x), qe)));
      }
      for (int64_t j = 0; j < n; ++j) {
        for (const Bf16 x : unit) key_raw.push_back(ToBf16(std::ldexp(ToF32(x), ke - static_cast<int>(j))));
      }
      auto q = IndexQuery::Prepare(q_raw, std::vector<float>(kHeads, 1.0f), identity);
      ASSERT_TRUE(q.ok()) << qe << " " << q.status();
      std::vector<uint8_t> page(static_cast<size_t>(n) * 68);
      ASSERT_TRUE(QuantizeIndexKeys(key_raw, PageFooterRows(RowFormat::kIndexFp4, page.data(), n)).ok());
      const ConstPackedRows keys = PageFooterRows(RowFormat::kIndexFp4, page.data(), n);
      std::vector<float> scores(static_cast<size_t>(n), -7.0f);
      const absl::Status status = ScoreIndexKeys(*q, keys, absl::MakeSpan(scores));
      bool overflows = false;
      for (int64_t j = 0; j < n; ++j) overflows |= ExactScore(*q, keys, j) > 0x1.fffffep127;
      if (status.ok()) {
        for (int64_t j = 0; j < n; ++j) {
          const float s = scores[static_cast<size_t>(j)];
          ASSERT_TRUE(std::isfinite(s)) << "query 2^" << qe << " key 2^" << ke << " key " << j << ": " << s;
          ASSERT_EQ(F32Bits(s), F32Bits(IndexScoreRef(*q, keys.row_data(j), keys.row_scales(j))));
          largest_scored = std::max(largest_scored, double{s});
        }
      } else {
        ++refused;
        EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
        EXPECT_THAT(std::string(status.message()), HasSubstr("key 0 block ")) << qe << " " << ke;
        EXPECT_EQ(scores, std::vector<float>(static_cast<size_t>(n), -7.0f)) << "a refused call wrote scores";
      }
      EXPECT_FALSE(overflows && status.ok()) << qe << " " << ke;
      if (qe + ke <= 90) {
        EXPECT_TRUE(status.ok()) << "query 2^" << qe << " key 2^" << ke << ": " << status;
      }
    }
  }
  EXPECT_GT(refused, 0);
  EXPECT_GT(largest_scored, 0x1p120) << "the bound refuses far below the fp32 limit";
}

// A head of weight 0 still multiplies: relu(inf) * 0 would be NaN.
TEST_P(IndexerKernelsTest, ZeroWeightHeadsCannotMakeNaN) {
  std::mt19937 rng(7);
  float identity[64];
  for (int j = 0; j < 32; ++j) identity[2 * j] = 1.0f, identity[2 * j + 1] = 0.0f;
  std::vector<Bf16> q_raw = RandomBf16(kIndexDim, rng);
  const std::vector<Bf16> huge = SignedPowers(kIndexDim, 120, rng);
  q_raw.insert(q_raw.end(), huge.begin(), huge.end());
  auto q = IndexQuery::Prepare(q_raw, std::vector<float>{1.0f, 0.0f}, identity);
  ASSERT_TRUE(q.ok()) << q.status();
  std::vector<uint8_t> page(68);
  ASSERT_TRUE(QuantizeIndexKeys(huge, PageFooterRows(RowFormat::kIndexFp4, page.data(), 1)).ok());
  float score = -7.0f;
  const absl::Status status = ScoreIndexKeys(*q, PageFooterRows(RowFormat::kIndexFp4, page.data(), 1), absl::MakeSpan(&score, 1));
  if (status.ok()) {
    EXPECT_TRUE(std::isfinite(score)) << score;
  } else {
    EXPECT_THAT(std::string(status.message()), HasSubstr("key 0 block "));
  }
  EXPECT_FALSE(status.ok()) << "head 1 alone overflows: " << score;
}

// Stored keys come from snapshots and engines too: a scale byte of 255 (NaN)
// or 254 (2^127) is refused by index, not scored; in the page-footer layout
// (scale stride 4) and with interleaved rows (stride 68).
TEST_P(IndexerKernelsTest, ScoringRefusesNaNAndHugeKeyScales) {
  std::mt19937 rng(8);
  const IndexQuery q = RandomQuery(16, rng);
  const int64_t n = 40;
  for (const uint8_t byte : {uint8_t{255}, uint8_t{254}}) {
    for (const bool footer : {true, false}) {
      const std::vector<uint8_t> page = RandomKeys(n, rng);
      std::vector<uint8_t> rows(page.size());
      const PackedRows keys = footer ? PageFooterRows(RowFormat::kIndexFp4, rows.data(), n)
                                     : ContiguousRows(RowFormat::kIndexFp4, rows.data(), n);
      CopyRows(RowFormat::kIndexFp4, PageFooterRows(RowFormat::kIndexFp4, page.data(), n), keys);
      keys.row_scales(29)[2] = byte;
      std::vector<float> scores(static_cast<size_t>(n), -7.0f);
      const absl::Status status = ScoreIndexKeys(q, keys, absl::MakeSpan(scores));
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << int{byte} << " " << footer << ": " << status;
      EXPECT_THAT(std::string(status.message()), HasSubstr("key 29 block 2")) << int{byte} << " " << footer;
      EXPECT_EQ(scores, std::vector<float>(static_cast<size_t>(n), -7.0f));
    }
  }
}

// Scores from elsewhere may hold NaN: the two-argument TopK ranks NaN below
// every number, so it never picks one while a number is left.
TEST_P(IndexerKernelsTest, TopKNeverPrefersNaN) {
  std::mt19937 rng(9);
  for (const int64_t n : {int64_t{10}, int64_t{5000}, int64_t{100000}}) {
    std::normal_distribution<float> normal;
    std::vector<float> scores(static_cast<size_t>(n));
    for (float& s : scores) s = normal(rng);
    std::vector<int64_t> numbers;
    for (int64_t i = 0; i < n; ++i) {
      if (i % 3 == 1) {
        scores[static_cast<size_t>(i)] = std::numeric_limits<float>::quiet_NaN();
      } else {
        numbers.push_back(i);
      }
    }
    for (const int64_t k : {int64_t{1}, int64_t{4}, static_cast<int64_t>(numbers.size())}) {
      std::vector<int64_t> order = numbers;
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return scores[static_cast<size_t>(a)] > scores[static_cast<size_t>(b)];
      });
      order.resize(static_cast<size_t>(k));
      std::sort(order.begin(), order.end());
      EXPECT_EQ(TopK(scores, k), order) << "n " << n << " k " << k;
    }
  }
}

// The checked TopK refuses NaN by its lowest index, wherever it lies: in the
// threshold sample, only in the filter pass, or with k >= n (no filter).
TEST_P(IndexerKernelsTest, TopKRefusesNaNNamingTheIndex) {
  std::mt19937 rng(10);
  std::normal_distribution<float> normal;
  for (const int64_t n : {int64_t{10}, int64_t{5000}, int64_t{100000}}) {
    for (const int64_t first : {int64_t{0}, int64_t{7}, n - 1}) {
      for (const int64_t k : {int64_t{3}, int64_t{512}, n}) {
        std::vector<float> scores(static_cast<size_t>(n));
        for (float& s : scores) s = normal(rng);
        scores[static_cast<size_t>(first)] = std::numeric_limits<float>::quiet_NaN();
        scores[static_cast<size_t>(n - 1)] = -std::numeric_limits<float>::quiet_NaN();
        std::vector<int64_t> out = {42};
        const absl::Status status = TopK(scores, k, &out);
        EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << n << " " << first << " " << k;
        EXPECT_THAT(std::string(status.message()), HasSubstr(absl::StrCat("score ", first, " is NaN")));
        EXPECT_EQ(out, std::vector<int64_t>{42}) << "a refused call changed its output";
      }
    }
    std::vector<float> finite(static_cast<size_t>(n));
    for (float& s : finite) s = normal(rng);
    finite[1] = std::numeric_limits<float>::infinity();
    finite[2] = -std::numeric_limits<float>::infinity();
    std::vector<int64_t> out;
    ASSERT_TRUE(TopK(finite, 5, &out).ok());
    EXPECT_EQ(out, TopK(finite, 5));
    EXPECT_THAT(out, ::testing::Contains(1)) << "+inf is the highest score";
    EXPECT_THAT(out, ::testing::Not(::testing::Contains(2))) << "-inf is the lowest score";
  }
  // NaN is refused whatever k, and k < 0 is an error, not an empty selection.
  std::vector<float> with_nan(100, 1.0f);
  with_nan[37] = std::numeric_limits<float>::quiet_NaN();
  std::vector<int64_t> untouched = {42};
  EXPECT_THAT(std::string(TopK(with_nan, 0, &untouched).message()), HasSubstr("score 37 is NaN"));
  EXPECT_THAT(std::string(TopK(std::vector<float>(10, 1.0f), -1, &untouched).message()), HasSubstr("k = -1 is negative"));
  EXPECT_EQ(untouched, std::vector<int64_t>{42});
  ASSERT_TRUE(TopK(std::vector<float>(10, 1.0f), 0, &untouched).ok());
  EXPECT_TRUE(untouched.empty());
}

// The decode path on tiny keys and rows (subnormal scores): preparing the
// query, scoring, top-k and gathering meet no subnormal operation, and top-k
// picks what it picks on scores compared as floats.
TEST(Indexer, SelectionOnTinyKeysMeetsNoSubnormal) {
  std::mt19937 rng(21);
  ModelSpec spec = ModelSpec::V4Flash();
  spec.layers.assign(1, LayerSpec{});
  spec.layers[0].kind = LayerKind::kCsa;
  spec.window = 8;
  spec.index_topk = 64;
  CacheOptions options;
  options.rollback_depth = 4;
  auto cache = *Cache::Create(spec, options);
  const SequenceId seq = *cache->CreateSequence();
  const int64_t entries = 3000;
  for (int64_t at = 0; at < 4 * entries; at += 8) ASSERT_TRUE(cache->Append(seq, 0, at, {RandomBf16(8 * kHeadDim, rng, 0x1p-128f)}).ok());
  ASSERT_TRUE(cache->AppendCompressedRows(seq, 0, 0, RandomBf16(entries * kHeadDim, rng, 0x1p-128f)).ok());
  ASSERT_TRUE(cache->AppendIndexKeys(seq, 0, 0, RandomBf16(entries * kIndexDim, rng, 0x1p-124f)).ok());
  const std::vector<Bf16> q_raw = RandomBf16(64 * kIndexDim, rng, 0x1p-20f);
  const std::vector<float> w(64, 0.03f);
  IndexQuery q;
  SelectionScratch scratch;
  AttentionSet set;
  std::vector<float> rows_f32;
  std::vector<Bf16> rows_bf16;
  ASSERT_TRUE(cache->PrepareIndexQuery(4 * entries - 1, q_raw, w, &q).ok());
  ASSERT_TRUE(cache->SelectAttentionSet(seq, 0, &q, &scratch, &set).ok());
  size_t subnormal = 0;
  for (const float x : scratch.scores) subnormal += x != 0.0f && std::fabs(x) < 0x1p-126f;
  EXPECT_GT(subnormal, scratch.scores.size() / 2) << "the scores should be subnormal";
  // Top-k on subnormal scores: the float ordering (ties to the lower index).
  std::vector<int64_t> order(scratch.scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scratch.scores[static_cast<size_t>(a)] > scratch.scores[static_cast<size_t>(b)]; });
  order.resize(64);
  std::sort(order.begin(), order.end());
  EXPECT_EQ(scratch.entries, order);
  rows_f32.resize(set.rows.size() * kHeadDim);
  rows_bf16.resize(set.rows.size() * kHeadDim);
  testing::ExpectNoSubnormalOperations("decode on tiny keys", [&] {
    if (!cache->PrepareIndexQuery(4 * entries - 1, q_raw, w, &q).ok() || !cache->SelectAttentionSet(seq, 0, &q, &scratch, &set).ok() ||
        !GatherAttentionRows(set, absl::MakeSpan(rows_f32)).ok() || !GatherAttentionRows(set, absl::MakeSpan(rows_bf16)).ok()) {
      std::abort();
    }
  });
}

TEST(Indexer, ScoresAreTheMathOfTheDequantizedValues) {
  std::mt19937 rng(3);
  const IndexQuery q = RandomQuery(64, rng);
  const std::vector<float> qv = q.Values();
  const int64_t n = 200;
  const std::vector<uint8_t> page = RandomKeys(n, rng);
  const ConstPackedRows keys = PageFooterRows(RowFormat::kIndexFp4, page.data(), n);
  std::vector<float> scores(static_cast<size_t>(n)), kv(static_cast<size_t>(n) * kIndexDim);
  ASSERT_TRUE(ScoreIndexKeys(q, keys, absl::MakeSpan(scores)).ok());
  ASSERT_TRUE(DequantizeIndexKeys(keys, absl::MakeSpan(kv)).ok());
  for (int64_t j = 0; j < n; ++j) {
    double expected = 0;
    for (int h = 0; h < 64; ++h) {
      double dot = 0;
      for (int e = 0; e < kIndexDim; ++e) dot += double{qv[static_cast<size_t>(h * kIndexDim + e)]} * kv[static_cast<size_t>(j * kIndexDim + e)];
      expected += q.weights()[h] * std::max(dot, 0.0);
    }
    ASSERT_NEAR(scores[static_cast<size_t>(j)], expected, 1e-5 * (1 + std::fabs(expected))) << j;
  }
}

TEST(Indexer, PrepareValidatesItsInputs) {
  std::vector<float> w(4, 0.1f);
  float cos_sin[64] = {1};
  std::mt19937 rng(4);
  std::vector<Bf16> q = RandomBf16(4 * kIndexDim, rng);
  EXPECT_THAT(std::string(IndexQuery::Prepare(absl::MakeConstSpan(q).first(100), w, cos_sin).status().message()),
              HasSubstr("100 query values for 4 head weights"));
  q[kIndexDim + 5] = ToBf16(std::numeric_limits<float>::infinity());
  EXPECT_THAT(std::string(IndexQuery::Prepare(q, w, cos_sin).status().message()), HasSubstr("head 1 dim 5 is not finite"));
  // A query that would overflow fp32 against every key (even scale 2^-127).
  q = SignedPowers(4 * kIndexDim, 120, rng);
  w[2] = std::numeric_limits<float>::max();
  const absl::Status hopeless = IndexQuery::Prepare(q, w, cos_sin).status();
  EXPECT_EQ(hopeless.code(), absl::StatusCode::kInvalidArgument) << hopeless;
  EXPECT_THAT(std::string(hopeless.message()), HasSubstr("head 2"));
}

TEST(Indexer, ReferenceAttentionMatchesTheClosedForm) {
  // One row, one head: p = e^l / (e^l + e^sink); out = p * row.
  std::vector<Bf16> q(kHeadDim, ToBf16(0.0f));
  q[0] = ToBf16(2.0f);
  std::vector<float> row(kHeadDim, 0.5f), out(kHeadDim);
  row[0] = 3.0f;
  const std::vector<float> sink = {0.7f};
  ASSERT_TRUE(SparseAttentionRef(q, row, sink, absl::MakeSpan(out)).ok());
  const double l = 2.0 * 3.0 / std::sqrt(512.0);
  const double p = std::exp(l) / (std::exp(l) + std::exp(0.7));
  EXPECT_NEAR(out[0], p * 3.0, 1e-6);
  EXPECT_NEAR(out[9], p * 0.5, 1e-6);
  EXPECT_FALSE(SparseAttentionRef(q, std::vector<float>(10), sink, absl::MakeSpan(out)).ok());
}

TEST(Indexer, SelectAttentionSetWindowHcaAndCsa) {
  std::mt19937 rng(5);
  ModelSpec spec = ModelSpec::V4Flash();
  spec.layers.assign(3, LayerSpec{});
  spec.layers[0].kind = LayerKind::kWindow;
  spec.layers[1].kind = LayerKind::kCsa;
  spec.layers[2].kind = LayerKind::kHca;
  spec.window = 8;
  spec.index_topk = 3;
  CacheOptions options;
  options.state_bytes = 64 << 20;
  options.history_bytes = 16 << 20;
  options.rollback_depth = 4;
  auto cache = *Cache::Create(spec, options);
  const SequenceId seq = *cache->CreateSequence();
  EXPECT_EQ(cache->SelectAttentionSet(seq, 0, nullptr).status().code(), absl::StatusCode::kFailedPrecondition);
  const int64_t tokens = 300;
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(seq, layer, 0, {RandomBf16(tokens * kHeadDim, rng)}).ok());
  ASSERT_TRUE(cache->AppendCompressedRows(seq, 1, 0, RandomBf16(75 * kHeadDim, rng)).ok());
  ASSERT_TRUE(cache->AppendIndexKeys(seq, 1, 0, RandomBf16(75 * kIndexDim, rng)).ok());
  ASSERT_TRUE(cache->AppendCompressedRows(seq, 2, 0, RandomBf16(2 * kHeadDim, rng)).ok());

  const AttentionSet window = *cache->SelectAttentionSet(seq, 0, nullptr);
  EXPECT_EQ(window.position, 299);
  EXPECT_EQ(window.indices, (std::vector<int32_t>{4, 5, 6, 7, 0, 1, 2, 3}));  // positions 292..299
  const AttentionSet hca = *cache->SelectAttentionSet(seq, 2, nullptr);
  EXPECT_EQ(std::vector<int32_t>(hca.indices.end() - 2, hca.indices.end()), (std::vector<int32_t>{8, 9}));

  EXPECT_EQ(cache->SelectAttentionSet(seq, 1, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  const IndexQuery q = *cache->PrepareIndexQuery(299, RandomBf16(64 * kIndexDim, rng), std::vector<float>(64, 0.1f));
  std::vector<float> scores;
  const AttentionSet csa = *cache->SelectAttentionSet(seq, 1, &q, &scores);
  ASSERT_EQ(scores.size(), 75u);
  ASSERT_EQ(csa.indices.size(), 8u + 3u);
  std::vector<int64_t> picked;
  for (size_t i = 8; i < csa.indices.size(); ++i) picked.push_back(csa.indices[i] - 8);
  EXPECT_EQ(picked, TopK(scores, 3));
  // The gathered rows are the stored rows.
  std::vector<float> gathered(csa.rows.size() * kHeadDim);
  ASSERT_TRUE(GatherAttentionRows(csa, absl::MakeSpan(gathered)).ok());
  std::vector<float> entry(kHeadDim);
  const HistoryView rows = *cache->CompressedRows(seq, 1);
  ASSERT_TRUE(DequantizeKvRows(rows.pages[static_cast<size_t>(picked[0] / rows.rows_per_page)].Slice(picked[0] % rows.rows_per_page, 1),
                               absl::MakeSpan(entry)).ok());
  EXPECT_EQ(std::vector<float>(gathered.begin() + 8 * kHeadDim, gathered.begin() + 9 * kHeadDim), entry);
}

// GatherAttentionRows over a set mixing page-like runs (rows next to each
// other, scales too) with scattered rows, more than one 512-row block: the
// bytes of each row's own DequantizeKvRows, whatever the executor; and a
// refusal writes nothing.
TEST(GatherAttentionRows, MatchesEachRowsDequantizationOnEveryExecutor) {
  std::mt19937 rng(17);
  constexpr int64_t kPool = 3000;
  std::vector<uint8_t> data(static_cast<size_t>(kPool) * 576), scales(static_cast<size_t>(kPool) * 8);
  ASSERT_TRUE(QuantizeKvRows(RandomBf16(static_cast<size_t>(kPool) * kHeadDim, rng, 3.0f),
                             PackedRows{data.data(), scales.data(), 576, 8, kPool}).ok());
  auto ref = [&](int64_t i) { return RowRef{data.data() + i * 576, scales.data() + i * 8}; };
  AttentionSet set;
  for (int64_t i = 2000; i < 2128; ++i) set.rows.push_back(ref(i));  // a run (an HCA layer's page)
  std::uniform_int_distribution<int64_t> any(0, kPool - 1);
  for (int k = 0; k < 700; ++k) set.rows.push_back(ref(any(rng)));  // scattered (a CSA top-k), repeats included
  for (int64_t i = 10; i < 400; ++i) set.rows.push_back(ref(i));     // a run across the block boundary
  set.rows.push_back(RowRef{data.data() + 400 * 576, scales.data() + 401 * 8});  // data follows, scales do not
  std::vector<float> want(set.rows.size() * kHeadDim);
  for (size_t i = 0; i < set.rows.size(); ++i) {
    ASSERT_TRUE(DequantizeKvRows(ConstPackedRows{set.rows[i].data, set.rows[i].scales, 576, 8, 1},
                                 absl::MakeSpan(want).subspan(i * kHeadDim, kHeadDim)).ok());
  }
  std::vector<Bf16> want_bf16(want.size());
  for (size_t i = 0; i < set.rows.size(); ++i) {
    ASSERT_TRUE(DequantizeKvRows(ConstPackedRows{set.rows[i].data, set.rows[i].scales, 576, 8, 1},
                                 absl::MakeSpan(want_bf16).subspan(i * kHeadDim, kHeadDim)).ok());
  }
  const std::unique_ptr<Executor> pool = *ThreadPoolExecutor(2);
  for (Executor* executor : {static_cast<Executor*>(nullptr), &InlineExecutor(), pool.get()}) {
    std::vector<float> got(want.size(), -1.0f);
    ASSERT_TRUE(GatherAttentionRows(set, absl::MakeSpan(got), executor).ok());
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float)));
    std::vector<Bf16> got_bf16(want.size(), Bf16{0x7777});
    ASSERT_TRUE(GatherAttentionRows(set, absl::MakeSpan(got_bf16), executor).ok());
    EXPECT_EQ(0, std::memcmp(got_bf16.data(), want_bf16.data(), want_bf16.size() * sizeof(Bf16)));
  }
  // Refusals, before any row is written.
  std::vector<float> untouched(want.size(), -1.0f);
  std::vector<float> short_out(want.size() - kHeadDim, -1.0f);
  EXPECT_EQ(GatherAttentionRows(set, absl::MakeSpan(short_out), pool.get()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(std::all_of(short_out.begin(), short_out.end(), [](float v) { return v == -1.0f; }));
  AttentionSet broken = set;
  broken.rows[900].scales = nullptr;
  const absl::Status refused = GatherAttentionRows(broken, absl::MakeSpan(untouched), pool.get());
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.message()), ::testing::HasSubstr("row 900"));
  EXPECT_TRUE(std::all_of(untouched.begin(), untouched.end(), [](float v) { return v == -1.0f; }));
}

}  // namespace
}  // namespace kvc
