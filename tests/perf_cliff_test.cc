// No performance cliffs: every hot kernel runs each input distribution
// (testing/distributions.h: zeros, huge, tiny) within 2x of its time on
// N(0,1) data. On Intel cores a subnormal operand costs a microcode assist
// (~100x); the subnormal tests prove the kernels never meet one, and this
// test catches any other data-dependent slow path (a fallback taken too
// often).
//
// Timing on a shared machine: each distribution's time is the best of many
// calls, the distributions interleaved round-robin so that a noisy period
// hurts all of them alike. Label "perf": run in the release build only.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvc/compressor.h"
#include "kvc/indexer.h"
#include "kvc/row_kernels.h"
#include "src/compressor_run.h"
#include "tests/testing/distributions.h"

namespace kvc {
namespace {

using testing::Distribution;

constexpr int kRounds = 25;
constexpr double kLimit = 2.0;

struct Case {
  std::string name;
  std::function<void()> run;
};

// Best-of-kRounds seconds per case, interleaved; then every case's ratio to
// the first (N(0,1)).
std::vector<double> BestTimes(const std::vector<Case>& cases) {
  std::vector<double> best(cases.size(), 1e30);
  for (const Case& c : cases) c.run();  // warm up
  for (int round = 0; round < kRounds; ++round) {
    for (size_t i = 0; i < cases.size(); ++i) {
      const auto start = std::chrono::steady_clock::now();
      cases[i].run();
      best[i] = std::min(best[i], std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  return best;
}

// A measurement taken while the host runs something else on the core's
// sibling or caches slows some kernels more than others (index scoring's
// scaled path is bound by vector ALUs, its N(0,1) path by VNNI; measured
// on a shared VM: 1.5-1.8x otherwise, 2.06-2.13x in such a period, N(0,1)
// itself 10-20 % slower then). Over the limit, the cases are timed again, up to
// kAttempts in all, and each case keeps its best over every attempt: a
// real cliff (2x or 28x on every call) fails every attempt.
constexpr int kAttempts = 3;

bool OverLimit(const std::vector<double>& best, size_t asserted) {
  for (size_t i = 1; i < asserted; ++i) {
    if (best[i] > kLimit * best[0]) return true;
  }
  return false;
}

// Asserts cases[1..] within kLimit of cases[0]; `extra` cases are timed and
// printed but not held to the limit (documented slow paths).
void ExpectNoCliff(const std::string& kernel, const std::vector<Case>& cases, size_t asserted) {
  std::vector<double> best = BestTimes(cases);
  int attempts = 1;
  for (; attempts < kAttempts && OverLimit(best, asserted); ++attempts) {
    const std::vector<double> again = BestTimes(cases);
    for (size_t i = 0; i < best.size(); ++i) best[i] = std::min(best[i], again[i]);
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    std::printf("%-20s %-28s %9.3f ms  %5.2fx N(0,1)%s%s\n", kernel.c_str(), cases[i].name.c_str(), 1e3 * best[i],
                best[i] / best[0], i < asserted ? "" : "  (not asserted)",
                attempts > 1 && i == 0 ? (" (best of " + std::to_string(attempts) + " attempts)").c_str() : "");
    if (i < asserted) {
      EXPECT_LE(best[i], kLimit * best[0]) << kernel << " on " << cases[i].name << " takes " << best[i] / best[0]
                                           << "x its time on N(0,1) data";
    }
  }
}

const std::vector<Distribution> kAsserted = {Distribution::kNormal, Distribution::kZeros, Distribution::kHuge,
                                             Distribution::kTiny};

TEST(PerfCliff, ScoreIndexKeys) {
  std::mt19937 rng(1);
  const int64_t n = 16384;
  std::vector<float> w(64);
  std::uniform_real_distribution<float> weight(-0.2f, 0.3f);
  for (float& x : w) x = weight(rng);
  float cos_sin[64];
  for (int j = 0; j < 32; ++j) cos_sin[2 * j] = 1.0f, cos_sin[2 * j + 1] = 0.0f;
  const IndexQuery q = *IndexQuery::Prepare(testing::Bf16s(Distribution::kNormal, 64 * kIndexDim, rng), w, cos_sin);
  // Keys by their block scales: N(0,1) keys quantized; zeros; huge (2^73 ..
  // the query's limit); tiny (2^-127 .. 2^-115: block products, sums and
  // relu * w subnormal in the reference).
  auto keys_with_scales = [&](int lo, int hi) {
    return testing::RandomIndexKeyPage(n, lo, std::min(hi, q.max_key_scale_byte()), 0, rng);
  };
  std::vector<std::vector<uint8_t>> pages;
  pages.emplace_back(static_cast<size_t>(n) * 68);
  ASSERT_TRUE(QuantizeIndexKeys(testing::Bf16s(Distribution::kNormal, static_cast<size_t>(n) * kIndexDim, rng),
                                PageFooterRows(RowFormat::kIndexFp4, pages.back().data(), n)).ok());
  pages.emplace_back(static_cast<size_t>(n) * 68, uint8_t{0});
  pages.push_back(keys_with_scales(200, 254));
  pages.push_back(keys_with_scales(0, 12));
  std::vector<float> scores(static_cast<size_t>(n));
  std::vector<Case> cases;
  const char* names[] = {"normal keys", "zero keys", "huge scales", "tiny scales"};
  for (size_t i = 0; i < pages.size(); ++i) {
    cases.push_back({names[i], [&, i] {
                       if (!ScoreIndexKeys(q, PageFooterRows(RowFormat::kIndexFp4, pages[i].data(), n), absl::MakeSpan(scores)).ok()) std::abort();
                     }});
  }
  ExpectNoCliff("ScoreIndexKeys", cases, cases.size());
}

// The row kernels on bf16 inputs of each distribution (tiny: around 2^-128,
// bf16 subnormals).
TEST(PerfCliff, QuantizeKvRows) {
  std::mt19937 rng(2);
  const int64_t rows = 2048;
  std::vector<std::vector<Bf16>> inputs;
  for (const Distribution d : kAsserted) inputs.push_back(testing::Bf16s(d, static_cast<size_t>(rows) * kHeadDim, rng));
  std::vector<uint8_t> out(static_cast<size_t>(rows) * 584);
  std::vector<Case> cases;
  for (size_t i = 0; i < inputs.size(); ++i) {
    cases.push_back({testing::Name(kAsserted[i]), [&, i] {
                       if (!QuantizeKvRows(inputs[i], ContiguousRows(RowFormat::kKvFp8, out.data(), rows)).ok()) std::abort();
                     }});
  }
  ExpectNoCliff("QuantizeKvRows", cases, cases.size());
}

// Stored rows quantized from each distribution (tiny: every block at the
// 1e-4 amax floor, the smallest scales the FP8 block rule gives), to fp32.
// Rows of random bytes with scale bytes below 10 (outside the block rule;
// an engine may still write them), whose products are subnormal, are
// built from the bits: timed, not asserted.
TEST(PerfCliff, DequantizeKvRows) {
  std::mt19937 rng(3);
  const int64_t rows = 2048;
  std::vector<std::vector<uint8_t>> stored;
  for (const Distribution d : kAsserted) {
    stored.emplace_back(static_cast<size_t>(rows) * 584);
    ASSERT_TRUE(QuantizeKvRows(testing::Bf16s(d, static_cast<size_t>(rows) * kHeadDim, rng),
                               ContiguousRows(RowFormat::kKvFp8, stored.back().data(), rows)).ok());
  }
  stored.emplace_back(static_cast<size_t>(rows) * 584);
  for (int64_t r = 0; r < rows; ++r) {
    for (int i = 0; i < 576; ++i) stored.back()[static_cast<size_t>(r * 584 + i)] = static_cast<uint8_t>(rng() % 0x7F);
    for (int b = 0; b < 8; ++b) stored.back()[static_cast<size_t>(r * 584 + 576 + b)] = static_cast<uint8_t>(rng() % 10);
  }
  std::vector<float> out(static_cast<size_t>(rows) * kHeadDim);
  std::vector<Case> cases;
  for (size_t i = 0; i < stored.size(); ++i) {
    cases.push_back({i < kAsserted.size() ? testing::Name(kAsserted[i]) : std::string("scale bytes < 10"), [&, i] {
                       if (!DequantizeKvRows(ContiguousRows(RowFormat::kKvFp8, stored[i].data(), rows), absl::MakeSpan(out)).ok()) std::abort();
                     }});
  }
  ExpectNoCliff("DequantizeKvRows", cases, kAsserted.size());
}

// Index keys: tiny = around 2^-100 (block scales near 2^-100). Values below
// 2^-115 (bf16 subnormals among them), which no model's RMSNorm output has,
// take the exact fp64 emulation: timed, not asserted.
TEST(PerfCliff, QuantizeIndexKeys) {
  std::mt19937 rng(4);
  const int64_t keys = 4096;
  std::vector<std::vector<Bf16>> inputs;
  for (const Distribution d : kAsserted) inputs.push_back(testing::Bf16s(d, static_cast<size_t>(keys) * kIndexDim, rng, 110, -100));
  inputs.push_back(testing::Bf16s(Distribution::kTiny, static_cast<size_t>(keys) * kIndexDim, rng, 110, -128));
  std::vector<uint8_t> out(static_cast<size_t>(keys) * 68);
  std::vector<Case> cases;
  for (size_t i = 0; i < inputs.size(); ++i) {
    cases.push_back({i < kAsserted.size() ? testing::Name(kAsserted[i]) : std::string("subnormal (2^-128)"), [&, i] {
                       if (!QuantizeIndexKeys(inputs[i], ContiguousRows(RowFormat::kIndexFp4, out.data(), keys)).ok()) std::abort();
                     }});
  }
  ExpectNoCliff("QuantizeIndexKeys", cases, kAsserted.size());
}

// Pooling 512 windows of 8 slots x 512 channels: kv of each distribution
// (tiny: 2^-60) with N(0,1) scores; tiny scores (2^-130, below pooling's
// flush threshold) and scores spread far beyond exp's range (N(0, 2^8)).
// Subnormal kv (2^-138), whose products are subnormal in the reference, take
// the fp64 emulation: timed, not asserted.
TEST(PerfCliff, PoolChannels) {
  std::mt19937 rng(5);
  const int windows = 512, n = 8;
  const int64_t channels = 512;
  struct Input {
    std::string name;
    std::vector<float> kv, score;
  };
  auto make = [&](const std::string& name, Distribution kv_d, int kv_tiny, Distribution score_d, int score_huge) {
    return Input{name, testing::Floats(kv_d, static_cast<size_t>(windows * n * channels), rng, 100, kv_tiny),
                 testing::Floats(score_d, static_cast<size_t>(windows * n * channels), rng, score_huge, -130)};
  };
  std::vector<Input> inputs;
  inputs.push_back(make("normal", Distribution::kNormal, 0, Distribution::kNormal, 0));
  inputs.push_back(make("zero kv", Distribution::kZeros, 0, Distribution::kNormal, 0));
  inputs.push_back(make("huge kv", Distribution::kHuge, 0, Distribution::kNormal, 0));
  inputs.push_back(make("tiny kv (2^-60)", Distribution::kTiny, -60, Distribution::kNormal, 0));
  inputs.push_back(make("tiny scores", Distribution::kNormal, 0, Distribution::kTiny, 0));
  inputs.push_back(make("spread scores", Distribution::kNormal, 0, Distribution::kHuge, 8));
  const size_t asserted = inputs.size();
  inputs.push_back(make("subnormal kv (2^-138)", Distribution::kTiny, -138, Distribution::kNormal, 0));
  std::vector<float> out(static_cast<size_t>(channels));
  // PoolChannels, and Append's path (PoolChannelsIfFinite: its fast groups,
  // or the general kernel where a group is out of their range).
  for (const bool checked : {false, true}) {
    std::vector<Case> cases;
    for (const Input& in : inputs) {
      cases.push_back({in.name, [&in, &out, n, channels, checked] {
                         PoolSlot slots[n];
                         for (int w = 0; w < windows; ++w) {
                           for (int j = 0; j < n; ++j) {
                             const size_t at = static_cast<size_t>((w * n + j) * channels);
                             slots[j] = {in.kv.data() + at, in.score.data() + at, nullptr};
                           }
                           if (!checked) {
                             PoolChannels(slots, n, channels, out.data());
                           } else if (!PoolChannelsIfFinite(slots, n, channels, out.data())) {
                             std::abort();
                           }
                         }
                       }});
    }
    ExpectNoCliff(checked ? "PoolChannelsIfFinite" : "PoolChannels", cases, asserted);
  }
}

// RMSNorm + RoPE of 2048 rows of 512: tiny = 2^-40 (squares near 2^-80);
// rows below 2^-63 (squares subnormal) take the fp64 emulation: timed, not
// asserted.
TEST(PerfCliff, NormRope) {
  std::mt19937 rng(6);
  const int rows = 2048, dim = 512;
  std::vector<std::vector<float>> inputs;
  for (const Distribution d : kAsserted) inputs.push_back(testing::Floats(d, static_cast<size_t>(rows * dim), rng, 60, -40));
  inputs.push_back(testing::Floats(Distribution::kTiny, static_cast<size_t>(rows * dim), rng, 60, -128));
  const std::vector<float> weight = testing::Floats(Distribution::kNormal, dim, rng);
  float cos_sin[64];
  for (int j = 0; j < 32; ++j) cos_sin[2 * j] = std::cos(0.3f * static_cast<float>(j)), cos_sin[2 * j + 1] = std::sin(0.3f * static_cast<float>(j));
  std::vector<Bf16> out(dim);
  std::vector<Case> cases;
  for (size_t i = 0; i < inputs.size(); ++i) {
    cases.push_back({i < kAsserted.size() ? testing::Name(kAsserted[i]) : std::string("subnormal (2^-128)"), [&, i] {
                       for (int r = 0; r < rows; ++r) NormRope(inputs[i].data() + r * dim, dim, weight.data(), 1e-6f, cos_sin, out.data());
                     }});
  }
  ExpectNoCliff("NormRope", cases, kAsserted.size());
}

}  // namespace
}  // namespace kvc
