// The compressor: its kernels against the scalar reference on every SIMD
// target, the RoPE tables, and the cache's compressed streams under any
// chunking, rollback, fork and bad input.
#include "kvc/compressor.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/row_kernels.h"
#include "src/compressor_run.h"
#include "src/rope_rows.h"
#include "tests/testing/tiny_model.h"
#include "tests/testing/every_target.h"
#include "tests/testing/distributions.h"
#include "tests/testing/subnormal_traps.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

TEST(SoftmaxExp, WithinTwoUlpOfExpOverItsRange) {
  int64_t worst = 0;
  for (float x = -86.9f; x <= 0.0f; x += 0.0013f) {
    const float got = SoftmaxExp(x);
    const float want = static_cast<float>(std::exp(static_cast<double>(x)));
    if (want < 1.2e-38f) continue;  // subnormal results: absolute error only
    const int64_t d = std::abs(static_cast<int64_t>(F32Bits(got)) - static_cast<int64_t>(F32Bits(want)));
    worst = std::max(worst, d);
  }
  EXPECT_LE(worst, 2);
  EXPECT_EQ(SoftmaxExp(0.0f), 1.0f);
  EXPECT_EQ(SoftmaxExp(-100.0f), 0.0f);
  EXPECT_EQ(SoftmaxExp(-std::numeric_limits<float>::infinity()), 0.0f);
}

class CompressorKernelsTest : public testing::EveryTargetTest {};
KVC_INSTANTIATE_EVERY_TARGET(CompressorKernelsTest);

std::vector<float> Random(size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

TEST_P(CompressorKernelsTest, PoolChannelsMatchesReference) {
  std::mt19937 rng(1);
  for (const int n : {1, 4, 7, 8, 13, 127, 128, 200}) {  // whole and partial passes of every group width
    for (const int64_t channels : {int64_t{128}, int64_t{512}}) {
      std::vector<std::vector<float>> kv, score, ape;
      std::vector<PoolSlot> slots;
      for (int j = 0; j < n; ++j) {
        kv.push_back(Random(static_cast<size_t>(channels), rng, 2.0f));
        score.push_back(Random(static_cast<size_t>(channels), rng, j % 3 == 0 ? 30.0f : 1.0f));  // wide score ranges
        ape.push_back(Random(static_cast<size_t>(channels), rng, 0.5f));
      }
      for (int j = 0; j < n; ++j) slots.push_back({kv[j].data(), score[j].data(), j % 2 ? ape[j].data() : nullptr});
      std::vector<float> simd(static_cast<size_t>(channels)), checked(simd.size()), ref(static_cast<size_t>(channels));
      PoolChannels(slots.data(), n, channels, simd.data());
      ASSERT_TRUE(PoolChannelsIfFinite(slots.data(), n, channels, checked.data()));
      PoolRef(slots.data(), n, channels, ref.data());
      for (int64_t c = 0; c < channels; ++c) {
        ASSERT_EQ(F32Bits(simd[static_cast<size_t>(c)]), F32Bits(ref[static_cast<size_t>(c)])) << n << " slots, channel " << c;
        ASSERT_EQ(F32Bits(checked[static_cast<size_t>(c)]), F32Bits(ref[static_cast<size_t>(c)])) << n << " slots, channel " << c;
      }
    }
  }
}

// Append's fused check: false exactly when some slot's kv or score is not
// finite, or a score + ape overflows, in any channel (including the last
// channels of a group and those past the last whole group), whatever the
// slot; and the reference's bits whenever true.
TEST_P(CompressorKernelsTest, PoolChannelsIfFiniteRefusesEveryNonFiniteInput) {
  std::mt19937 rng(7);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (const int n : {8, 128}) {
    for (const int64_t channels : {int64_t{128}, int64_t{512}, int64_t{80}}) {
      std::vector<std::vector<float>> kv, score, ape;
      for (int j = 0; j < n; ++j) {
        kv.push_back(Random(static_cast<size_t>(channels), rng, 2.0f));
        score.push_back(Random(static_cast<size_t>(channels), rng, 1.0f));
        ape.push_back(Random(static_cast<size_t>(channels), rng, 0.5f));
      }
      auto slots = [&] {
        std::vector<PoolSlot> out;
        for (int j = 0; j < n; ++j) out.push_back({kv[j].data(), score[j].data(), j % 2 ? ape[j].data() : nullptr});
        return out;
      };
      std::vector<float> out(static_cast<size_t>(channels));
      ASSERT_TRUE(PoolChannelsIfFinite(slots().data(), n, channels, out.data()));
      for (const int j : {0, n / 2 + 1, n - 1}) {
        for (const int64_t c : {int64_t{0}, int64_t{15}, int64_t{63}, int64_t{64}, channels - 1}) {
          const size_t at = static_cast<size_t>(c);
          struct Case { std::vector<float>* row; float value; const char* what; };
          for (const Case& bad : {Case{&kv[static_cast<size_t>(j)], nan, "kv NaN"}, Case{&kv[static_cast<size_t>(j)], -inf, "kv -inf"},
                                  Case{&score[static_cast<size_t>(j)], inf, "score inf"}, Case{&score[static_cast<size_t>(j)], nan, "score NaN"},
                                  Case{&score[static_cast<size_t>(j)], 3.4e38f, "score + ape overflows"}}) {
            const float saved = (*bad.row)[at];
            (*bad.row)[at] = bad.value;
            if (bad.row == &score[static_cast<size_t>(j)] && bad.value == 3.4e38f) {
              if (j % 2 == 0) {  // a slot without ape: an overflow needs ape
                (*bad.row)[at] = saved;
                continue;
              }
              ape[static_cast<size_t>(j)][at] = 3.4e38f;
            }
            EXPECT_FALSE(PoolChannelsIfFinite(slots().data(), n, channels, out.data())) << bad.what << " at slot " << j << " channel " << c;
            (*bad.row)[at] = saved;
            ape[static_cast<size_t>(j)][at] = 0.25f;
          }
          // A large but finite sum is accepted, with the reference's bits.
          if (j % 2 == 1) {
            score[static_cast<size_t>(j)][at] = 1.7e38f;
            ape[static_cast<size_t>(j)][at] = 1.6e38f;
            std::vector<float> ref(out.size());
            ASSERT_TRUE(PoolChannelsIfFinite(slots().data(), n, channels, out.data())) << "slot " << j << " channel " << c;
            PoolRef(slots().data(), n, channels, ref.data());
            for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(F32Bits(out[i]), F32Bits(ref[i])) << "channel " << i;
            score[static_cast<size_t>(j)][at] = 0.5f;
            ape[static_cast<size_t>(j)][at] = 0.25f;
          }
        }
      }
    }
  }
}

TEST_P(CompressorKernelsTest, MaxMagnitudeBitsIsTheLargestMagnitude) {
  std::mt19937 rng(9);
  std::uniform_int_distribution<int> bits(0, 0xFFFF), where(0, 511);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<Bf16> v(512);
    for (Bf16& x : v) x.bits = static_cast<uint16_t>(bits(rng) & (trial % 2 ? 0xBF7F : 0xFFFF));  // some rows without inf/NaN
    if (trial % 5 == 0) v[static_cast<size_t>(where(rng))].bits = 0xFF80;  // -inf
    for (const int64_t n : {int64_t{0}, int64_t{64}, int64_t{448}, int64_t{512}}) {
      uint16_t want = 0;
      for (int64_t i = 0; i < n; ++i) want = std::max<uint16_t>(want, v[static_cast<size_t>(i)].bits & 0x7FFF);
      ASSERT_EQ(MaxMagnitudeBits(v.data(), n), want) << "trial " << trial << " n " << n;
    }
  }
}

TEST_P(CompressorKernelsTest, NormRopeMatchesReference) {
  std::mt19937 rng(2);
  for (const int dim : {128, 512}) {
    for (int trial = 0; trial < 20; ++trial) {
      const std::vector<float> pooled = Random(static_cast<size_t>(dim), rng, trial % 2 ? 1e-3f : 40.0f);
      const std::vector<float> weight = Random(static_cast<size_t>(dim), rng, 1.0f);
      std::vector<float> cos_sin(64);
      for (int j = 0; j < 32; ++j) {
        cos_sin[2 * j] = std::cos(0.3f * static_cast<float>(j + trial));
        cos_sin[2 * j + 1] = std::sin(0.3f * static_cast<float>(j + trial));
      }
      std::vector<Bf16> simd(static_cast<size_t>(dim)), ref(static_cast<size_t>(dim));
      NormRope(pooled.data(), dim, weight.data(), 1e-6f, cos_sin.data(), simd.data());
      NormRopeRef(pooled.data(), dim, weight.data(), 1e-6f, cos_sin.data(), ref.data());
      for (int i = 0; i < dim; ++i) ASSERT_EQ(simd[static_cast<size_t>(i)].bits, ref[static_cast<size_t>(i)].bits) << dim << "/" << i;
    }
  }
}

// Pooling and RMSNorm + RoPE on every distribution (testing/distributions.h):
// the reference's bits, and no fp operation on a subnormal. Scores are tiny,
// N(0,1) or spread far beyond exp's range.
TEST_P(CompressorKernelsTest, EveryDistributionIsExactWithoutSubnormalArithmetic) {
  std::mt19937 rng(31);
  for (const testing::Distribution d : testing::AllDistributions()) {
    for (const testing::Distribution score_d : {testing::Distribution::kNormal, testing::Distribution::kTiny, testing::Distribution::kMixed}) {
      const std::string name = testing::Name(d) + " kv, " + testing::Name(score_d) + " scores";
      const int n = 8;
      const int64_t channels = 512;
      std::vector<std::vector<float>> kv, score, ape;
      std::vector<PoolSlot> slots;
      for (int j = 0; j < n; ++j) {
        kv.push_back(testing::Floats(d, static_cast<size_t>(channels), rng));
        score.push_back(testing::Floats(score_d, static_cast<size_t>(channels), rng, 8));
        ape.push_back(testing::Floats(score_d, static_cast<size_t>(channels), rng, 8));
      }
      for (int j = 0; j < n; ++j) slots.push_back({kv[j].data(), score[j].data(), j % 2 ? ape[j].data() : nullptr});
      std::vector<float> simd(static_cast<size_t>(channels)), checked(simd.size()), ref(simd.size());
      PoolChannels(slots.data(), n, channels, simd.data());
      ASSERT_TRUE(PoolChannelsIfFinite(slots.data(), n, channels, checked.data())) << name;
      PoolRef(slots.data(), n, channels, ref.data());
      for (int64_t c = 0; c < channels; ++c) {
        ASSERT_EQ(F32Bits(simd[static_cast<size_t>(c)]), F32Bits(ref[static_cast<size_t>(c)])) << name << ", channel " << c;
        ASSERT_EQ(F32Bits(checked[static_cast<size_t>(c)]), F32Bits(ref[static_cast<size_t>(c)])) << name << ", channel " << c;
      }
      testing::ExpectNoSubnormalOperations("PoolChannels " + name, [&] { PoolChannels(slots.data(), n, channels, simd.data()); });
      testing::ExpectNoSubnormalOperations("PoolChannelsIfFinite " + name, [&] {
        if (!PoolChannelsIfFinite(slots.data(), n, channels, simd.data())) std::abort();
      });
    }
    for (const int tiny_exp : {-128, -70}) {  // bf16 subnormals; squares below 2^-126
    for (const int dim : {128, 512}) {
      const std::vector<float> pooled = testing::Floats(d, static_cast<size_t>(dim), rng, 60, tiny_exp);
      const std::vector<float> weight = testing::Floats(testing::Distribution::kNormal, static_cast<size_t>(dim), rng);
      std::vector<float> cos_sin(64);
      for (int j = 0; j < 32; ++j) cos_sin[2 * j] = std::cos(0.3f * static_cast<float>(j)), cos_sin[2 * j + 1] = std::sin(0.3f * static_cast<float>(j));
      std::vector<Bf16> simd(static_cast<size_t>(dim)), ref(simd.size());
      NormRope(pooled.data(), dim, weight.data(), 1e-6f, cos_sin.data(), simd.data());
      NormRopeRef(pooled.data(), dim, weight.data(), 1e-6f, cos_sin.data(), ref.data());
      for (int i = 0; i < dim; ++i) ASSERT_EQ(simd[static_cast<size_t>(i)].bits, ref[static_cast<size_t>(i)].bits) << testing::Name(d) << " " << dim << "/" << i;
      testing::ExpectNoSubnormalOperations("NormRope " + testing::Name(d) + " (tiny 2^" + std::to_string(tiny_exp) + ")", [&] {
        NormRope(pooled.data(), dim, weight.data(), 1e-6f, cos_sin.data(), simd.data());
      });
    }
    }
  }
}

// A whole Append through the cache (finiteness checks, score + ape checks,
// pooling, RMSNorm + RoPE, the state ring, FP8 rows and FP4 keys) with
// projections of every distribution meets no subnormal operation, and a
// cache fed the same tokens in other chunks holds the same bytes.
TEST(CompressedStreams, AppendMeetsNoSubnormalOnAnyDistribution) {
  testing::TinyModel model;
  std::mt19937 rng(41);
  for (const testing::Distribution d : testing::AllDistributions()) {
    for (const testing::Distribution score_d : {testing::Distribution::kNormal, testing::Distribution::kTiny}) {
      const std::string name = testing::Name(d) + " kv, " + testing::Name(score_d) + " scores";
      CacheOptions options;
      options.history_bytes = 64 << 20;
      options.state_bytes = 64 << 20;
      auto cache = *Cache::Create(model.spec(), options);
      const SequenceId seq = *cache->CreateSequence();
      const int64_t n = 300;
      const std::vector<Bf16> window = testing::Bf16s(d, static_cast<size_t>(n) * kHeadDim, rng, 60);
      const std::vector<float> kv = testing::Floats(d, static_cast<size_t>(n) * 1024, rng, 60),
                               score = testing::Floats(score_d, static_cast<size_t>(n) * 1024, rng, 60),
                               ikv = testing::Floats(d, static_cast<size_t>(n) * 256, rng, 60),
                               iscore = testing::Floats(score_d, static_cast<size_t>(n) * 256, rng, 60);
      const LayerTokens csa{window, kv, score, ikv, iscore};
      const LayerTokens hca{window, absl::MakeConstSpan(kv).first(static_cast<size_t>(n) * 512),
                            absl::MakeConstSpan(score).first(static_cast<size_t>(n) * 512), {}, {}};
      // The same tokens in two chunks into a second cache: the reference bytes.
      auto split = *Cache::Create(model.spec(), options);
      const SequenceId split_seq = *split->CreateSequence();
      auto part = [&](const LayerTokens& t, int64_t from, int64_t to, int64_t width, int64_t iwidth) {
        auto sub = [&](auto span, int64_t w) { return span.empty() ? span : span.subspan(static_cast<size_t>(from * w), static_cast<size_t>((to - from) * w)); };
        return LayerTokens{sub(t.window_rows, kHeadDim), sub(t.compressor_kv, width), sub(t.compressor_score, width),
                           sub(t.indexer_kv, iwidth), sub(t.indexer_score, iwidth)};
      };
      for (const auto& [from, to] : {std::pair<int64_t, int64_t>{0, 131}, {131, n}}) {
        ASSERT_TRUE(split->Append(split_seq, testing::TinyModel::kCsaLayer, from, part(csa, from, to, 1024, 256)).ok()) << name;
        ASSERT_TRUE(split->Append(split_seq, testing::TinyModel::kHcaLayer, from, part(hca, from, to, 512, 0)).ok()) << name;
      }
      testing::ExpectNoSubnormalOperations("Cache::Append " + name, [&] {
        if (!cache->Append(seq, testing::TinyModel::kCsaLayer, 0, csa).ok()) std::abort();
        if (!cache->Append(seq, testing::TinyModel::kHcaLayer, 0, hca).ok()) std::abort();
      });
      ASSERT_TRUE(cache->Append(seq, testing::TinyModel::kCsaLayer, 0, csa).ok()) << name;
      ASSERT_TRUE(cache->Append(seq, testing::TinyModel::kHcaLayer, 0, hca).ok()) << name;
      for (const int layer : {testing::TinyModel::kCsaLayer, testing::TinyModel::kHcaLayer}) {
        const HistoryView a = *cache->CompressedRows(seq, layer), b = *split->CompressedRows(split_seq, layer);
        ASSERT_EQ(a.rows, b.rows);
        for (int64_t i = 0; i < a.rows; ++i) {
          const ConstPackedRows& pa = a.pages[static_cast<size_t>(i / a.rows_per_page)];
          const ConstPackedRows& pb = b.pages[static_cast<size_t>(i / b.rows_per_page)];
          ASSERT_EQ(0, std::memcmp(pa.row_data(i % a.rows_per_page), pb.row_data(i % b.rows_per_page), 576)) << name << " row " << i;
        }
      }
    }
  }
}

TEST(RopeTable, YarnSlowsOnlyTheLowFrequencies) {
  const ModelSpec spec = ModelSpec::V4Pro();
  const RopeTable plain([&] {
    RopeSpec r = spec.compressed_rope;
    r.yarn.factor = 1.0;
    return r;
  }());
  const RopeTable yarn(spec.compressed_rope);
  // High frequencies (j small) are untouched; the lowest are divided by 16.
  EXPECT_EQ(yarn.frequencies()[0], plain.frequencies()[0]);
  EXPECT_EQ(yarn.frequencies()[31], plain.frequencies()[31] / 16.0f);
  for (int j = 1; j < 32; ++j) EXPECT_LT(yarn.frequencies()[j], yarn.frequencies()[j - 1]);
  float row[64];
  yarn.At(0, row);
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(row[2 * j], 1.0f);
    EXPECT_EQ(row[2 * j + 1], 0.0f);
  }
  // An engine table is used as given.
  std::vector<float> table(64 * 3);
  for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<float>(i);
  RopeSpec engine = spec.compressed_rope;
  engine.engine_table = table;
  RopeTable(engine).At(2, row);
  EXPECT_EQ(row[5], 133.0f);
}

// --- The cache's compressed streams ---------------------------------------

// A CSA and an HCA layer with random parameters, window 16.
struct Model {
  std::vector<float> csa_ape, csa_norm, idx_ape, idx_norm, hca_ape, hca_norm;
  ModelSpec spec;
  explicit Model(std::mt19937& rng)
      : csa_ape(Random(4 * 1024, rng, 0.5f)), csa_norm(Random(512, rng, 1.0f)),
        idx_ape(Random(4 * 256, rng, 0.5f)), idx_norm(Random(128, rng, 1.0f)),
        hca_ape(Random(128 * 512, rng, 0.5f)), hca_norm(Random(512, rng, 1.0f)) {
    spec = ModelSpec::V4Flash();
    spec.layers.assign(2, LayerSpec{});
    spec.layers[0] = {LayerKind::kCsa, {csa_ape, csa_norm}, {idx_ape, idx_norm}};
    spec.layers[1] = {LayerKind::kHca, {hca_ape, hca_norm}, {}};
    spec.window = 16;
    spec.max_context = 1 << 16;
  }
};

// Inputs for tokens [0, n) of both layers.
struct Tokens {
  std::vector<Bf16> rows;
  std::vector<float> csa_kv, csa_score, idx_kv, idx_score, hca_kv, hca_score;
  Tokens(int64_t n, std::mt19937& rng) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    rows.resize(static_cast<size_t>(n) * kHeadDim);
    for (Bf16& v : rows) v = ToBf16(normal(rng));
    const size_t un = static_cast<size_t>(n);
    csa_kv = Random(un * 1024, rng, 1.0f);
    csa_score = Random(un * 1024, rng, 2.0f);
    idx_kv = Random(un * 256, rng, 1.0f);
    idx_score = Random(un * 256, rng, 2.0f);
    hca_kv = Random(un * 512, rng, 1.0f);
    hca_score = Random(un * 512, rng, 2.0f);
  }
  LayerTokens For(int layer, int64_t first, int64_t n) const {
    auto part = [&](const std::vector<float>& v, int64_t w) {
      return absl::MakeConstSpan(v).subspan(static_cast<size_t>(first * w), static_cast<size_t>(n * w));
    };
    LayerTokens t;
    t.window_rows = absl::MakeConstSpan(rows).subspan(static_cast<size_t>(first * kHeadDim), static_cast<size_t>(n * kHeadDim));
    if (layer == 0) {
      t.compressor_kv = part(csa_kv, 1024);
      t.compressor_score = part(csa_score, 1024);
      t.indexer_kv = part(idx_kv, 256);
      t.indexer_score = part(idx_score, 256);
    } else {
      t.compressor_kv = part(hca_kv, 512);
      t.compressor_score = part(hca_score, 512);
    }
    return t;
  }
};

CacheOptions Options() {
  CacheOptions options;
  options.state_bytes = int64_t{256} << 20;
  options.history_bytes = int64_t{64} << 20;
  options.rows_per_page = 8;
  options.keys_per_page = 8;
  return options;
}

// Every byte of both layers' compressed rows and index keys.
std::vector<uint8_t> HistoryBytes(const Cache& cache, SequenceId seq) {
  std::vector<uint8_t> bytes;
  for (int layer = 0; layer < 2; ++layer) {
    for (const bool keys : {false, true}) {
      if (keys && layer == 1) continue;
      const HistoryView view = keys ? *cache.IndexKeys(seq, layer) : *cache.CompressedRows(seq, layer);
      const int64_t data = keys ? 64 : 576, scales = keys ? 4 : 8;
      for (int64_t i = 0; i < view.rows; ++i) {
        const ConstPackedRows& page = view.pages[static_cast<size_t>(i / view.rows_per_page)];
        const int64_t r = i % view.rows_per_page;
        bytes.insert(bytes.end(), page.row_data(r), page.row_data(r) + data);
        bytes.insert(bytes.end(), page.row_scales(r), page.row_scales(r) + scales);
      }
    }
  }
  return bytes;
}

absl::Status AppendAll(Cache& cache, SequenceId seq, const Tokens& tokens, int64_t first, int64_t n) {
  for (int layer = 0; layer < 2; ++layer) {
    const absl::Status s = cache.Append(seq, layer, first, tokens.For(layer, first, n));
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

TEST(CompressedStreams, AnyChunkingGivesTheSameEntries) {
  std::mt19937 rng(3);
  const Model model(rng);
  const int64_t total = 600;  // 150 CSA entries, 4 HCA entries
  const Tokens tokens(total, rng);
  auto cache = *Cache::Create(model.spec, Options());
  std::vector<uint8_t> reference;
  for (const std::vector<int64_t>& chunks :
       {std::vector<int64_t>{1}, {600}, {3, 5}, {127, 1, 129}, {4}, {260, 9, 1}}) {
    const SequenceId seq = *cache->CreateSequence();
    for (int64_t at = 0, i = 0; at < total; ++i) {
      const int64_t n = std::min(chunks[static_cast<size_t>(i) % chunks.size()], total - at);
      ASSERT_TRUE(AppendAll(*cache, seq, tokens, at, n).ok());
      at += n;
    }
    EXPECT_EQ(cache->CompressedRows(seq, 0)->rows, 150);
    EXPECT_EQ(cache->IndexKeys(seq, 0)->rows, 150);
    EXPECT_EQ(cache->CompressedRows(seq, 1)->rows, 4);
    const std::vector<uint8_t> bytes = HistoryBytes(*cache, seq);
    if (reference.empty()) reference = bytes;
    EXPECT_EQ(bytes, reference) << "chunking starting " << chunks[0];
    ASSERT_TRUE(cache->Free(seq).ok());
  }
}

TEST(CompressedStreams, RollbackAndForkContinueExactlyLikeAnUninterruptedRun) {
  std::mt19937 rng(4);
  const Model model(rng);
  const Tokens tokens(400, rng), drafts(400, rng);
  auto cache = *Cache::Create(model.spec, Options());
  const SequenceId straight = *cache->CreateSequence();
  ASSERT_TRUE(AppendAll(*cache, straight, tokens, 0, 400).ok());

  // The same tokens with speculative detours: drafts appended, rolled back.
  const SequenceId detour = *cache->CreateSequence();
  for (int64_t at = 0; at < 400;) {
    const int64_t n = std::min<int64_t>(37, 400 - at);
    ASSERT_TRUE(AppendAll(*cache, detour, tokens, at, n).ok());
    at += n;
    const int64_t draft = std::min<int64_t>(1 + at % 13, 400 - at);  // up to 13 <= depth 16
    if (draft == 0) continue;
    // Drafts are other tokens at the same positions.
    for (int layer = 0; layer < 2; ++layer) ASSERT_TRUE(cache->Append(detour, layer, at, drafts.For(layer, at, draft)).ok());
    ASSERT_TRUE(cache->Truncate(detour, at).ok());
  }
  EXPECT_EQ(HistoryBytes(*cache, detour), HistoryBytes(*cache, straight));

  // A fork continues exactly like its parent given the same tokens.
  const Tokens more(64, rng);
  const SequenceId child = *cache->Fork(straight);
  for (int layer = 0; layer < 2; ++layer) {
    LayerTokens t = more.For(layer, 0, 64);
    ASSERT_TRUE(cache->Append(child, layer, 400, t).ok());
    ASSERT_TRUE(cache->Append(straight, layer, 400, t).ok());
  }
  EXPECT_EQ(HistoryBytes(*cache, child), HistoryBytes(*cache, straight));
}

TEST(CompressedStreams, BadProjectionsAreRejectedAndChangeNothing) {
  std::mt19937 rng(5);
  const Model model(rng);
  Tokens tokens(20, rng);
  auto cache = *Cache::Create(model.spec, Options());
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(AppendAll(*cache, seq, tokens, 0, 6).ok());
  const std::vector<uint8_t> before = HistoryBytes(*cache, seq);

  auto expect_rejected = [&](LayerTokens t, int layer, absl::StatusCode code, const std::string& message) {
    const absl::Status s = cache->Append(seq, layer, 6, t);
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(message));
    EXPECT_EQ(*cache->Length(seq, layer), 6);
    EXPECT_EQ(HistoryBytes(*cache, seq), before);
  };
  LayerTokens t = tokens.For(0, 6, 4);
  t.compressor_kv = t.compressor_kv.first(100);
  expect_rejected(t, 0, absl::StatusCode::kInvalidArgument, "compressor_kv holds 100 values; expected 4 x 1024");
  t = tokens.For(0, 6, 4);
  t.indexer_score = {};
  expect_rejected(t, 0, absl::StatusCode::kInvalidArgument, "indexer_score holds 0 values; expected 4 x 256");
  t = tokens.For(1, 6, 4);
  t.indexer_kv = tokens.For(0, 6, 4).indexer_kv;  // HCA layers have no indexer
  expect_rejected(t, 1, absl::StatusCode::kInvalidArgument, "takes no indexer_kv");
  tokens.csa_score[7 * 1024 + 5] = std::numeric_limits<float>::infinity();
  expect_rejected(tokens.For(0, 6, 4), 0, absl::StatusCode::kInvalidArgument, "compressor_score row 1 column 5 is infinite");
  // kvc computes this layer's entries: external ones are refused.
  EXPECT_EQ(cache->AppendCompressedRows(seq, 0, 1, std::vector<Bf16>(512)).code(), absl::StatusCode::kFailedPrecondition);

  // Projections for a compressed layer without parameters: name the field.
  ModelSpec bare = model.spec;
  bare.layers[1].compressor = {};
  auto no_params = *Cache::Create(bare, Options());
  const SequenceId s2 = *no_params->CreateSequence();
  const absl::Status s = no_params->Append(s2, 1, 0, tokens.For(1, 0, 4));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("set ModelSpec.layers[i].compressor"));
}

// Append checks the projections while pooling reads them and checks the
// rows pooling does not read (the open windows') afterwards; a refusal then
// reruns the checks in order. A non-finite value anywhere in a multi-slice
// chunk -- in a pooled row of any slice, at a slice boundary, in the last
// closed window's first halves (read only by the next entry) or in the open
// window -- is named by its row and column, and changes nothing.
// The RoPE rows a chunk's layers share are RopeTable::At's, bit for bit, at
// every window start they cover; the memo hands out covering rows or computes
// new ones, and rows a caller holds stay valid after the memo moves on.
TEST(RopeRowsTest, RowsAreTheTablesAndTheMemoCoversWhatIsAsked) {
  const RopeTable table(ModelSpec::V4Flash().compressed_rope);
  float want[64];
  for (const int64_t step : {int64_t{4}, int64_t{128}}) {
    const RopeRows rows(table, 1024 * step, 1024 * step + 70 * step + 1, step);
    for (int64_t p = 1024 * step; p <= 1024 * step + 70 * step; p += step) {
      table.At(p, want);
      for (int i = 0; i < 64; ++i) ASSERT_EQ(F32Bits(rows.At(p)[i]), F32Bits(want[i])) << "position " << p << " dim " << i;
    }
  }
  RopeMemo memo(table);
  const std::shared_ptr<const RopeRows> a = memo.Rows(8192, 16384, 4);
  EXPECT_EQ(memo.Rows(8192 + 128, 16000, 128).get(), a.get());  // covered: shared
  const std::shared_ptr<const RopeRows> b = memo.Rows(16384, 24576, 4);
  EXPECT_NE(b.get(), a.get());
  EXPECT_EQ(memo.Rows(16384, 24576, 4).get(), b.get());
  const std::shared_ptr<const RopeRows> c = memo.Rows(32768, 40960, 128);  // HCA's own rows, not kept
  EXPECT_EQ(memo.Rows(16384, 20000, 128).get(), b.get());
  table.At(40960 - 128, want);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(F32Bits(c->At(40960 - 128)[i]), F32Bits(want[i]));
  table.At(9000, want);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(F32Bits(a->At(9000)[i]), F32Bits(want[i]));
  table.At(24572, want);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(F32Bits(b->At(24572)[i]), F32Bits(want[i]));
}

TEST(CompressedStreams, ANonFiniteProjectionAnywhereInAChunkIsNamedAndChangesNothing) {
  std::mt19937 rng(15);
  const Model model(rng);
  const int64_t start = 6, n = 1100;  // three 512-token slices; CSA pools rows < 1094, HCA rows < 1018
  Tokens tokens(start + n, rng);
  auto cache = *Cache::Create(model.spec, Options());
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(AppendAll(*cache, seq, tokens, 0, start).ok());
  const std::vector<uint8_t> before = HistoryBytes(*cache, seq);
  struct Input {
    int layer;
    std::vector<float> Tokens::*values;
    int64_t width;
    const char* name;
    std::vector<int64_t> rows;
  };
  const std::vector<int64_t> csa_rows = {0, 3, 511, 512, 1023, 1093, 1094, 1097, 1099};
  const std::vector<Input> inputs = {
      {0, &Tokens::csa_kv, 1024, "compressor_kv", csa_rows},
      {0, &Tokens::csa_score, 1024, "compressor_score", csa_rows},
      {0, &Tokens::idx_kv, 256, "indexer_kv", csa_rows},
      {0, &Tokens::idx_score, 256, "indexer_score", csa_rows},
      {1, &Tokens::hca_kv, 512, "compressor_kv", {0, 600, 1017, 1018, 1099}},
      {1, &Tokens::hca_score, 512, "compressor_score", {0, 600, 1017, 1018, 1099}},
  };
  for (const Input& in : inputs) {
    for (const int64_t row : in.rows) {
      for (const int64_t column : {int64_t{0}, in.width / 2 + 3, in.width - 1}) {
        for (const float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
          float& at = (tokens.*in.values)[static_cast<size_t>((start + row) * in.width + column)];
          const float saved = at;
          at = bad;
          const absl::Status s = cache->Append(seq, in.layer, start, tokens.For(in.layer, start, n));
          at = saved;
          const std::string expected = absl::StrCat("Append: ", in.name, " row ", row, " column ", column,
                                                    std::isnan(bad) ? " is NaN" : " is infinite");
          EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << expected << ": " << s;
          EXPECT_THAT(std::string(s.message()), HasSubstr(expected));
        }
      }
    }
  }
  EXPECT_EQ(HistoryBytes(*cache, seq), before);
  EXPECT_EQ(*cache->Length(seq, 0), start);
  EXPECT_EQ(*cache->Length(seq, 1), start);
  // Two faults: the first in check order is named (slice 0's refused entry
  // before slice 1's NaN; a slice's NaN before its own refused entry).
  tokens.csa_kv[static_cast<size_t>((start + 700) * 1024 + 9)] = std::numeric_limits<float>::quiet_NaN();
  for (int64_t row = 96; row < 112; ++row) {  // windows whose entries pool FLT_MAX in channel 188: past bf16's range
    tokens.csa_kv[static_cast<size_t>((start + row) * 1024 + 188)] = std::numeric_limits<float>::max();
    tokens.csa_kv[static_cast<size_t>((start + row) * 1024 + 512 + 188)] = std::numeric_limits<float>::max();
  }
  absl::Status s = cache->Append(seq, 0, start, tokens.For(0, start, n));
  EXPECT_THAT(std::string(s.message()), HasSubstr("compressed entry")) << s;
  tokens.csa_kv[static_cast<size_t>((start + 300) * 1024 + 9)] = std::numeric_limits<float>::quiet_NaN();
  s = cache->Append(seq, 0, start, tokens.For(0, start, n));
  EXPECT_THAT(std::string(s.message()), HasSubstr("compressor_kv row 300 column 9 is NaN")) << s;
  EXPECT_EQ(HistoryBytes(*cache, seq), before);
  EXPECT_EQ(*cache->Length(seq, 0), start);
  EXPECT_EQ(*cache->Length(seq, 1), start);
}

TEST(CompressedStreams, HistoryExhaustionDuringAppendChangesNothing) {
  std::mt19937 rng(6);
  const Model model(rng);
  const Tokens tokens(200, rng);
  CacheOptions options = Options();
  options.history_bytes = 3 * 5184;  // three 8-row pages (8 x 584 = 4,672 B padded to 9 x 576)
  auto cache = *Cache::Create(model.spec, options);
  const SequenceId seq = *cache->CreateSequence();
  const absl::Status s = AppendAll(*cache, seq, tokens, 0, 200);  // needs 7 CSA row pages
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(*cache->Length(seq, 0), 0);
  EXPECT_EQ(cache->CompressedRows(seq, 0)->rows, 0);
  EXPECT_EQ(cache->Usage().components[static_cast<int>(Component::kCompressedRows)].used_bytes, 0);
}


// Everything a caller can observe of one sequence of the two-layer model.
struct Observed {
  std::vector<uint8_t> history;
  std::vector<uint16_t> windows;
  std::vector<int64_t> counts;  // lengths, rows, keys, used bytes per component
  bool operator==(const Observed& o) const {
    return history == o.history && windows == o.windows && counts == o.counts;
  }
};

Observed Observe(const Cache& cache, SequenceId seq) {
  Observed o;
  o.history = HistoryBytes(cache, seq);
  for (int layer = 0; layer < 2; ++layer) {
    std::vector<Bf16> window(static_cast<size_t>(cache.spec().window) * kHeadDim);
    EXPECT_TRUE(cache.ReadWindow(seq, layer, absl::MakeSpan(window)).ok());
    for (const Bf16 v : window) o.windows.push_back(v.bits);
    o.counts.push_back(*cache.Length(seq, layer));
    o.counts.push_back(cache.CompressedRows(seq, layer)->rows);
  }
  o.counts.push_back(cache.IndexKeys(seq, 0)->rows);
  const CacheUsage usage = cache.Usage();
  for (const ComponentUsage& c : usage.components) o.counts.push_back(c.used_bytes);
  return o;
}

// Appends clean tokens [first, first + n) of both layers to `seq` (which holds
// [0, first)) and checks its history against a straight run of [0, first + n):
// a refused append left no trace, not even in the compressor state.
void ExpectCleanContinuation(Cache& cache, SequenceId seq, const Tokens& clean, int64_t first, int64_t n) {
  ASSERT_TRUE(AppendAll(cache, seq, clean, first, n).ok());
  const SequenceId straight = *cache.CreateSequence();
  ASSERT_TRUE(AppendAll(cache, straight, clean, 0, first + n).ok());
  EXPECT_EQ(Observe(cache, seq).history, Observe(cache, straight).history);
  ASSERT_TRUE(cache.Free(straight).ok());
}

// Finite projections whose compressed entry or index key would not be finite
// (or, for a key, beyond the key kernel's 2^120) are refused before anything
// changes, naming layer, position and channel. Exactly those: a kv that
// still rounds to a finite bf16 is accepted.
TEST(CompressedStreams, AnEntryThatWouldNotBeFiniteIsRefusedAndChangesNothing) {
  std::mt19937 rng(7);
  Model model(rng);
  // One indexer channel with a norm weight so large that a key dominated by
  // it exceeds 2^120 (|y r| <= sqrt(128) after RMSNorm; ordinary keys stay
  // far below 8 there).
  model.idx_norm[5] = 0x1p117f;
  // And one main-compressor channel whose weight puts an entry dominated by
  // it (|y| ~ sqrt(512) = 22.6) at ~1.96 x 2^127: finite in bf16, but at or
  // above 248 x 2^120, which the FP8 row rounds to 2^128 (infinity).
  // Ordinary entries (|y| < 5) stay below 2^126 there.
  model.csa_norm[9] = 1.39f * 0x1p123f;
  const Tokens clean(300, rng);
  auto cache = *Cache::Create(model.spec, Options());
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(AppendAll(*cache, seq, clean, 0, 126).ok());
  const Observed before = Observe(*cache, seq);

  const float kFltMax = std::numeric_limits<float>::max();
  const float kRoundsToBf16Max = F32FromBits(0x7F7F7FFFu);  // the largest float below bf16's rounding edge
  const float kRoundsToBf16Inf = F32FromBits(0x7F7F8000u);  // the tie, which rounds to inf
  struct Case {
    int layer;
    std::vector<float> Tokens::*kv;
    std::vector<float> Tokens::*score;
    int64_t width, position, column;
    float value;
    std::vector<std::string> expected;  // empty: accepted
  };
  const std::vector<Case> cases = {
      // CSA main: token 129's second half (column 512 + 7) pools into entry 32.
      {0, &Tokens::csa_kv, &Tokens::csa_score, 1024, 129, 512 + 7, kFltMax,
       {"layer 0", "compressed entry 32", "channel 7", "position 129", "compressor_kv column 519"}},
      {0, &Tokens::csa_kv, &Tokens::csa_score, 1024, 129, 512 + 7, kRoundsToBf16Inf, {"channel 7", "position 129"}},
      {0, &Tokens::csa_kv, &Tokens::csa_score, 1024, 129, 512 + 7, kRoundsToBf16Max, {}},
      {0, &Tokens::csa_kv, &Tokens::csa_score, 1024, 129, 512 + 9, 1000.0f,
       {"compressed entry 32", "read back as infinity", "channel 9", "position 129", "norm_weight"}},
      // Token 130's first half pools into entry 33 (the overlap).
      {0, &Tokens::csa_kv, &Tokens::csa_score, 1024, 130, 3, -kFltMax, {"layer 0", "compressed entry 33", "channel 3", "position 130"}},
      // CSA indexer.
      {0, &Tokens::idx_kv, &Tokens::idx_score, 256, 130, 128 + 5, kFltMax,
       {"layer 0", "index key 32", "channel 5", "position 130", "indexer_kv column 133"}},
      // A key above 2^120 is refused too: the key kernel would not store it.
      {0, &Tokens::idx_kv, &Tokens::idx_score, 256, 130, 128 + 5, 1000.0f,
       {"index key 32", "2^120", "channel 5", "position 130", "norm_weight"}},
      // HCA: token 200 pools into entry 1.
      {1, &Tokens::hca_kv, &Tokens::hca_score, 512, 200, 9, -kFltMax,
       {"layer 1", "compressed entry 1", "channel 9", "position 200", "compressor_kv column 9"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "layer " << c.layer << " position " << c.position << " column " << c.column
                                      << " value " << c.value);
    Tokens bad = clean;
    const size_t at = static_cast<size_t>(c.position * c.width + c.column);
    (bad.*c.kv)[at] = c.value;
    (bad.*c.score)[at] = 1e30f;  // all the softmax weight on this token
    const int64_t n = c.layer == 0 ? 14 : 134;  // closes CSA entries 31..34, HCA entries 0..1
    if (c.expected.empty()) {  // on a fork, so that `seq` stays as it was
      const absl::StatusOr<SequenceId> probe = cache->Fork(seq);
      ASSERT_TRUE(probe.ok()) << probe.status();
      const absl::Status s = cache->Append(*probe, c.layer, 126, bad.For(c.layer, 126, n));
      EXPECT_TRUE(s.ok()) << s;
      ASSERT_TRUE(cache->Free(*probe).ok());
      EXPECT_TRUE(Observe(*cache, seq) == before);
      continue;
    }
    const absl::Status s = cache->Append(seq, c.layer, 126, bad.For(c.layer, 126, n));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    for (const std::string& part : c.expected) EXPECT_THAT(std::string(s.message()), HasSubstr(part));
    EXPECT_TRUE(Observe(*cache, seq) == before);
  }
  ExpectCleanContinuation(*cache, seq, clean, 126, 134);
}


// score + ape is what the compressor state keeps for each token (and what a
// snapshot stores): finite inputs whose sum overflows fp32 are refused before
// anything changes, naming layer, position and channel, whether or not the
// token closes a window.
TEST(CompressedStreams, ScorePlusApeOverflowIsRefusedAndChangesNothing) {
  std::mt19937 rng(8);
  Model model(rng);
  const float kFltMax = std::numeric_limits<float>::max();
  // Positions with t mod 4 == 1 (CSA), 2 (indexer) and t mod 128 == 72 (HCA)
  // get a huge ape in one channel each; their scores there are ordinary.
  model.csa_ape[1 * 1024 + 600] = kFltMax;
  model.idx_ape[2 * 256 + 3] = kFltMax;
  model.hca_ape[72 * 512 + 11] = -kFltMax;
  const Tokens clean(300, rng);
  auto cache = *Cache::Create(model.spec, Options());
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(AppendAll(*cache, seq, clean, 0, 130).ok());  // huge ape + ordinary score: accepted
  const Observed before = Observe(*cache, seq);
  struct Case {
    int layer;
    std::vector<float> Tokens::*score;
    int64_t width, position, column;
    float value;
    std::vector<std::string> expected;
  };
  const std::vector<Case> cases = {
      {0, &Tokens::csa_score, 1024, 133, 600, kFltMax, {"layer 0", "compressor_score", "position 133", "channel 600"}},
      {0, &Tokens::idx_score, 256, 134, 3, kFltMax, {"layer 0", "indexer_score", "position 134", "channel 3"}},
      {1, &Tokens::hca_score, 512, 200, 11, -kFltMax, {"layer 1", "compressor_score", "position 200", "channel 11"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "layer " << c.layer << " position " << c.position);
    Tokens bad = clean;
    (bad.*c.score)[static_cast<size_t>(c.position * c.width + c.column)] = c.value;
    const absl::Status s = cache->Append(seq, c.layer, 130, bad.For(c.layer, 130, c.position - 130 + 1));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    for (const std::string& part : c.expected) EXPECT_THAT(std::string(s.message()), HasSubstr(part));
    EXPECT_TRUE(Observe(*cache, seq) == before);
  }
  ExpectCleanContinuation(*cache, seq, clean, 130, 130);
}

// The compressor algorithm without a cache (src/compressor_run.h): a state
// ring the test owns and two chunks of projections in, entries and keys out.
// Quantized, they are byte for byte the rows and keys the cache stores for
// the same chunks.
TEST(CompressorRunTest, ComputesWhatTheCacheStoresWithoutACache) {
  const testing::TinyModel model;
  const ModelSpec& spec = model.spec();
  const int layer = testing::TinyModel::kCsaLayer;
  const LayerSpec& l = spec.layers[layer];
  auto cache = *Cache::Create(spec, CacheOptions{});
  const SequenceId seq = *cache->CreateSequence();
  const int32_t depth = cache->options().rollback_depth;
  const RopeTable rope(spec.compressed_rope);

  CompressorRun main_run{}, indexer_run{};
  main_run.g = MainCompressor(LayerKind::kCsa, spec.head_dim);
  indexer_run.g = IndexerCompressor(spec.index_dim);
  std::vector<float> main_state(static_cast<size_t>((main_run.g.span() + depth) * 2 * main_run.g.width()));
  std::vector<float> indexer_state(static_cast<size_t>((indexer_run.g.span() + depth) * 2 * indexer_run.g.width()));
  for (auto [run, params, state, indexer] :
       {std::tuple{&main_run, &l.compressor, &main_state, false}, std::tuple{&indexer_run, &l.indexer, &indexer_state, true}}) {
    run->params = params;
    run->state = state->data();
    run->capacity = run->g.span() + depth;
    run->layer = layer;
    run->indexer = indexer;
    run->norm_eps = static_cast<float>(spec.norm_eps);
  }

  std::vector<Bf16> entries, keys;  // every chunk's, in order
  int64_t at = 0;
  for (const int64_t n : {37, 40, 3}) {
    auto values = [&](uint64_t stream, int64_t width, float scale) {
      return testing::DetValues(stream * 1000 + static_cast<uint64_t>(at), static_cast<size_t>(n * width), scale);
    };
    std::vector<Bf16> window(static_cast<size_t>(n * kHeadDim), ToBf16(0.5f));
    const std::vector<float> kv = values(1, main_run.g.width(), 1.0f), score = values(2, main_run.g.width(), 2.0f);
    const std::vector<float> ikv = values(3, indexer_run.g.width(), 1.0f), iscore = values(4, indexer_run.g.width(), 2.0f);
    LayerTokens tokens;
    tokens.window_rows = window;
    tokens.compressor_kv = kv;
    tokens.compressor_score = score;
    tokens.indexer_kv = ikv;
    tokens.indexer_score = iscore;
    ASSERT_TRUE(cache->Append(seq, layer, at, tokens).ok());

    main_run.kv = kv.data(), main_run.score = score.data(), main_run.first = at;
    indexer_run.kv = ikv.data(), indexer_run.score = iscore.data(), indexer_run.first = at;
    const int64_t closed = (at + n) / 4 - at / 4;
    std::vector<Bf16> e(static_cast<size_t>(closed * kHeadDim)), k(static_cast<size_t>(closed * kIndexDim));
    ASSERT_TRUE(CheckScorePlusApe(main_run, 0, n).ok());
    ASSERT_TRUE(CheckScorePlusApe(indexer_run, 0, n).ok());
    const RopeRows rows(rope, at / 4 * 4, at + n);
    ASSERT_TRUE(ComputeEntries(main_run, &indexer_run, rows, at, at + n, absl::MakeSpan(e), absl::MakeSpan(k)).ok());
    WriteState(main_run, n);
    WriteState(indexer_run, n);
    entries.insert(entries.end(), e.begin(), e.end());
    keys.insert(keys.end(), k.begin(), k.end());
    at += n;
  }
  ASSERT_EQ(entries.size(), static_cast<size_t>(at / 4 * kHeadDim));

  // Quantized as the cache quantizes them: the same bytes.
  for (const bool key_stream : {false, true}) {
    const RowFormat format = key_stream ? RowFormat::kIndexFp4 : RowFormat::kKvFp8;
    const RowFormatInfo& f = FormatInfo(format);
    const int64_t rows = at / 4;
    std::vector<uint8_t> mine(static_cast<size_t>(rows * f.row_bytes));
    const PackedRows to = ContiguousRows(format, mine.data(), rows);
    ASSERT_TRUE((key_stream ? QuantizeIndexKeys(keys, to) : QuantizeKvRows(entries, to)).ok());
    const HistoryView view = *(key_stream ? cache->IndexKeys(seq, layer) : cache->CompressedRows(seq, layer));
    ASSERT_EQ(view.rows, rows);
    for (int64_t r = 0; r < rows; ++r) {
      const ConstPackedRows stored = view.pages[static_cast<size_t>(r / view.rows_per_page)].Slice(r % view.rows_per_page, 1);
      EXPECT_EQ(0, std::memcmp(stored.data, to.row_data(r), static_cast<size_t>(f.data_bytes))) << "row " << r;
      EXPECT_EQ(0, std::memcmp(stored.scales, to.row_scales(r), static_cast<size_t>(f.scale_bytes))) << "row " << r;
    }
  }
}

}  // namespace
}  // namespace kvc
