#include "kvc/cache.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/reference_codecs.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

// A small model that exercises page boundaries and wrap-around quickly:
// window 12 in pages of 5 rows (the last page partial), rollback depth 5.
ModelSpec SmallSpec() {
  ModelSpec spec = ModelSpec::V4Flash();
  spec.name = "small";
  spec.layers.resize(3);
  spec.layers[0].kind = LayerKind::kWindow;
  spec.layers[1].kind = LayerKind::kCsa;
  spec.layers[2].kind = LayerKind::kHca;
  spec.window = 12;
  spec.max_context = 4096;
  return spec;
}

CacheOptions SmallOptions() {
  CacheOptions options;
  options.rollback_depth = 5;
  options.rows_per_page = 5;
  options.history_bytes = 1 << 20;
  options.state_bytes = 64 << 20;
  return options;
}

std::unique_ptr<Cache> MakeCache(ModelSpec spec = SmallSpec(), CacheOptions options = SmallOptions()) {
  auto cache = Cache::Create(std::move(spec), options);
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? *std::move(cache) : nullptr;
}

std::vector<Bf16> RandomRows(int64_t rows, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Bf16> out(static_cast<size_t>(rows) * kHeadDim);
  for (Bf16& v : out) v = ToBf16(normal(rng) * 3.0f);
  return out;
}

absl::Span<const Bf16> Rows(const std::vector<Bf16>& all, int64_t first, int64_t n) {
  return absl::MakeConstSpan(all).subspan(static_cast<size_t>(first * kHeadDim), static_cast<size_t>(n * kHeadDim));
}

std::vector<uint16_t> Window(const Cache& cache, SequenceId seq, int layer) {
  std::vector<Bf16> out(static_cast<size_t>(cache.spec().window) * kHeadDim);
  const absl::Status s = cache.ReadWindow(seq, layer, absl::MakeSpan(out));
  EXPECT_TRUE(s.ok()) << s;
  std::vector<uint16_t> bits(out.size());
  for (size_t i = 0; i < out.size(); ++i) bits[i] = out[i].bits;
  return bits;
}

// The raw bytes of a layer's ring pages, as an engine kernel would read them.
std::vector<uint8_t> RingBytes(const Cache& cache, SequenceId seq, int layer) {
  auto view = cache.Window(seq, layer);
  EXPECT_TRUE(view.ok());
  std::vector<uint8_t> bytes;
  for (const ConstPackedRows& page : view->pages) {
    for (int64_t r = 0; r < page.count; ++r) {
      bytes.insert(bytes.end(), page.row_data(r), page.row_data(r) + 576);
      bytes.insert(bytes.end(), page.row_scales(r), page.row_scales(r) + 8);
    }
  }
  return bytes;
}

// The full-precision reference: every row ever appended to a layer.
// Expected ring slot s: quantize-dequantize of the latest position p < length
// with p mod W == s, or zero.
std::vector<uint16_t> ExpectedWindow(const std::vector<Bf16>& history, int64_t length, int window) {
  std::vector<uint16_t> out(static_cast<size_t>(window) * kHeadDim, 0);
  for (int64_t p = std::max<int64_t>(0, length - window); p < length; ++p) {
    KvRowFp8 row;
    QuantizeKvRowRef(&history[static_cast<size_t>(p * kHeadDim)], row.nope_codes, row.scales);
    float values[kHeadDim];
    DequantizeKvRowRef(row.nope_codes, row.scales, values);
    for (int i = 0; i < kHeadDim; ++i) out[static_cast<size_t>((p % window) * kHeadDim + i)] = Bf16BitsFromF32(values[i]);
  }
  return out;
}

TEST(Cache, AnyChunkingGivesTheBytesOfOneByOneAppends) {
  std::mt19937 rng(1);
  const int64_t total = 61;
  const std::vector<Bf16> rows = RandomRows(total, rng);
  auto cache = MakeCache();
  const std::vector<std::vector<int64_t>> chunkings = {
      std::vector<int64_t>(total, 1), {61}, {12, 12, 12, 12, 13}, {11, 1, 30, 19}, {3, 25, 2, 2, 29}};
  std::vector<std::vector<uint8_t>> rings;
  for (const auto& chunks : chunkings) {
    const SequenceId seq = *cache->CreateSequence();
    int64_t at = 0;
    for (const int64_t n : chunks) {
      for (int layer = 0; layer < 3; ++layer) {
        ASSERT_TRUE(cache->Append(seq, layer, at, {Rows(rows, at, n)}).ok());
      }
      at += n;
      for (int layer = 0; layer < 3; ++layer) {
        ASSERT_EQ(Window(*cache, seq, layer), ExpectedWindow(rows, at, 12)) << "after " << at;
      }
    }
    ASSERT_EQ(*cache->RollbackFloor(seq), total - 5);
    rings.push_back(RingBytes(*cache, seq, 1));
  }
  for (size_t i = 1; i < rings.size(); ++i) EXPECT_EQ(rings[i], rings[0]) << "chunking " << i;
}

TEST(Cache, TruncateRestoresExactlyTheRingOfAShorterSequence) {
  std::mt19937 rng(2);
  const std::vector<Bf16> rows = RandomRows(100, rng);
  auto cache = MakeCache();
  for (const int64_t length : {3, 12, 13, 40, 57}) {
    for (int64_t back = 0; back <= 5; ++back) {
      for (const int64_t chunk : {int64_t{1}, int64_t{4}, length}) {
        const SequenceId seq = *cache->CreateSequence();
        for (int64_t at = 0; at < length; at += chunk) {
          ASSERT_TRUE(cache->Append(seq, 0, at, {Rows(rows, at, std::min(chunk, length - at))}).ok());
          ASSERT_TRUE(cache->Append(seq, 1, at, {Rows(rows, at, std::min(chunk, length - at))}).ok());
          ASSERT_TRUE(cache->Append(seq, 2, at, {Rows(rows, at, std::min(chunk, length - at))}).ok());
        }
        const int64_t target = std::max<int64_t>(0, length - back);
        ASSERT_TRUE(cache->Truncate(seq, target).ok()) << length << " -> " << target;
        const SequenceId fresh = *cache->CreateSequence();
        for (int layer = 0; layer < 3; ++layer) {
          ASSERT_TRUE(cache->Append(fresh, layer, 0, {Rows(rows, 0, target)}).ok());
          EXPECT_EQ(RingBytes(*cache, seq, layer), RingBytes(*cache, fresh, layer)) << length << " -> " << target;
          EXPECT_EQ(*cache->Length(seq, layer), target);
        }
        // Continuing after the rollback gives the same as never having rolled back.
        const std::vector<Bf16> more = RandomRows(7, rng);
        for (int layer = 0; layer < 3; ++layer) {
          ASSERT_TRUE(cache->Append(seq, layer, target, {more}).ok());
          ASSERT_TRUE(cache->Append(fresh, layer, target, {more}).ok());
          EXPECT_EQ(RingBytes(*cache, seq, layer), RingBytes(*cache, fresh, layer));
        }
        ASSERT_TRUE(cache->Free(seq).ok());
        ASSERT_TRUE(cache->Free(fresh).ok());
      }
    }
  }
  EXPECT_EQ(cache->Usage().used_bytes(), 0);
}

TEST(Cache, RollbackDepthIsEnforcedAndCumulative) {
  std::mt19937 rng(3);
  const std::vector<Bf16> rows = RandomRows(30, rng);
  auto cache = MakeCache();
  const SequenceId seq = *cache->CreateSequence();
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(seq, layer, 0, {Rows(rows, 0, 30)}).ok());
  const std::vector<uint8_t> before = RingBytes(*cache, seq, 2);
  const absl::Status too_far = cache->Truncate(seq, 24);
  EXPECT_EQ(too_far.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(too_far.message()), HasSubstr("rolled back to 25 tokens at the least"));
  EXPECT_EQ(RingBytes(*cache, seq, 2), before);
  EXPECT_EQ(*cache->Length(seq, 2), 30);
  // Two steps within the depth are fine; the floor does not move with them.
  ASSERT_TRUE(cache->Truncate(seq, 28).ok());
  ASSERT_TRUE(cache->Truncate(seq, 25).ok());
  EXPECT_EQ(cache->Truncate(seq, 24).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(Cache, BadInputIsRejectedAndChangesNothing) {
  std::mt19937 rng(4);
  std::vector<Bf16> rows = RandomRows(20, rng);
  auto cache = MakeCache();
  const SequenceId seq = *cache->CreateSequence();
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(seq, layer, 0, {Rows(rows, 0, 10)}).ok());
  const std::vector<uint8_t> before = RingBytes(*cache, seq, 1);
  const CacheUsage usage_before = cache->Usage();

  auto expect_unchanged = [&](const absl::Status& s, absl::StatusCode code, const std::string& message) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(message));
    EXPECT_EQ(RingBytes(*cache, seq, 1), before);
    EXPECT_EQ(*cache->Length(seq, 1), 10);
    EXPECT_EQ(cache->Usage().used_bytes(), usage_before.used_bytes());
  };
  expect_unchanged(cache->Append(seq, 1, 11, {Rows(rows, 11, 1)}), absl::StatusCode::kInvalidArgument, "would leave a gap");
  expect_unchanged(cache->Append(seq, 1, 9, {Rows(rows, 9, 1)}), absl::StatusCode::kInvalidArgument, "repeats tokens");
  expect_unchanged(cache->Append(seq, 1, 10, {absl::MakeConstSpan(rows).first(700)}), absl::StatusCode::kInvalidArgument,
                   "not a whole number of 512-value rows");
  rows[static_cast<size_t>(13 * kHeadDim + 500)] = ToBf16(std::numeric_limits<float>::quiet_NaN());
  expect_unchanged(cache->Append(seq, 1, 10, {Rows(rows, 10, 5)}), absl::StatusCode::kInvalidArgument,
                   "input row 3 dim 500 is NaN");
  expect_unchanged(cache->Append(seq, 7, 10, {Rows(rows, 10, 1)}), absl::StatusCode::kInvalidArgument,
                   "layer 7 is outside [0, 3)");
  expect_unchanged(cache->Append(seq + 100, 1, 10, {Rows(rows, 10, 1)}), absl::StatusCode::kNotFound, "no sequence");
  expect_unchanged(cache->Truncate(seq, 11), absl::StatusCode::kInvalidArgument, "cannot truncate to 11");
  expect_unchanged(cache->Truncate(seq, -1), absl::StatusCode::kInvalidArgument, "cannot truncate to -1");
  // Layers at different lengths (mid-step): fork and truncate wait for the step.
  ASSERT_TRUE(cache->Append(seq, 0, 10, {Rows(rows, 10, 1)}).ok());
  expect_unchanged(cache->Fork(seq).status(), absl::StatusCode::kFailedPrecondition, "finish the step first");
  expect_unchanged(cache->Truncate(seq, 9), absl::StatusCode::kFailedPrecondition, "finish the step first");

  auto small = SmallSpec();
  small.max_context = 12;
  auto bounded = MakeCache(small);
  const SequenceId s2 = *bounded->CreateSequence();
  EXPECT_EQ(bounded->Append(s2, 0, 0, {Rows(rows, 0, 13)}).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(*bounded->Length(s2, 0), 0);
}

TEST(Cache, ForkSharesNothingMutableAndSurvivesItsParent) {
  std::mt19937 rng(5);
  const std::vector<Bf16> rows = RandomRows(40, rng);
  auto cache = MakeCache();
  const SequenceId parent = *cache->CreateSequence();
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(parent, layer, 0, {Rows(rows, 0, 20)}).ok());
  const SequenceId child = *cache->Fork(parent);
  EXPECT_EQ(RingBytes(*cache, child, 1), RingBytes(*cache, parent, 1));
  EXPECT_EQ(*cache->RollbackFloor(child), *cache->RollbackFloor(parent));

  const std::vector<Bf16> other = RandomRows(5, rng);
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(child, layer, 20, {other}).ok());
  EXPECT_EQ(Window(*cache, parent, 1), ExpectedWindow(rows, 20, 12));
  ASSERT_TRUE(cache->Truncate(child, 20).ok());  // the child rolls back its own ring only
  EXPECT_EQ(RingBytes(*cache, child, 1), RingBytes(*cache, parent, 1));

  ASSERT_TRUE(cache->Free(parent).ok());
  EXPECT_EQ(cache->Length(parent, 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Window(*cache, child, 2), ExpectedWindow(rows, 20, 12));
  EXPECT_EQ(cache->Free(parent).code(), absl::StatusCode::kNotFound);
}

// Random operations on many sequences against the full-precision model; the
// accounting invariants hold throughout and nothing leaks.
TEST(Cache, SimulationAgainstAFullPrecisionReference) {
  std::mt19937 rng(6);
  auto cache = MakeCache();
  struct Model {
    std::vector<Bf16> history;  // all layers get the same rows here
    int64_t length = 0;
    int64_t floor = 0;
  };
  std::map<SequenceId, Model> live;
  for (int step = 0; step < 600; ++step) {
    const int op = static_cast<int>(rng() % 10);
    if (live.empty() || op == 0) {
      live[*cache->CreateSequence()] = Model{};
      continue;
    }
    auto it = live.begin();
    std::advance(it, static_cast<long>(rng() % live.size()));
    const SequenceId seq = it->first;
    Model& m = it->second;
    if (op <= 5) {  // append a chunk of 0..30 tokens
      const int64_t n = rng() % 31;
      const std::vector<Bf16> rows = RandomRows(n, rng);
      for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(seq, layer, m.length, {rows}).ok());
      m.history.insert(m.history.end(), rows.begin(), rows.end());
      m.length += n;
      m.floor = std::max(m.floor, m.length - 5);
    } else if (op == 6) {
      const SequenceId child = *cache->Fork(seq);
      live[child] = m;
    } else if (op == 7) {  // truncate, sometimes beyond the floor (must fail)
      const int64_t target = m.length - static_cast<int64_t>(rng() % 8);
      const absl::Status s = cache->Truncate(seq, target);
      if (target >= m.floor && target >= 0) {
        ASSERT_TRUE(s.ok()) << s;
        m.length = target;
        m.history.resize(static_cast<size_t>(target * kHeadDim));
      } else {
        ASSERT_FALSE(s.ok());
      }
    } else if (op == 8 && live.size() > 1) {
      ASSERT_TRUE(cache->Free(seq).ok());
      live.erase(it);
      continue;
    }
    for (int layer = 0; layer < 3; ++layer) {
      ASSERT_EQ(Window(*cache, seq, layer), ExpectedWindow(m.history, m.length, 12)) << "step " << step;
      ASSERT_EQ(*cache->Length(seq, layer), m.length);
    }
    ASSERT_EQ(*cache->RollbackFloor(seq), m.floor);
    const CacheUsage usage = cache->Usage();
    int64_t per_sequence = 0;
    for (const auto& [id, model] : live) per_sequence += cache->Usage(id)->total_bytes();
    ASSERT_EQ(usage.used_bytes(), per_sequence);  // no history pages yet, so nothing shared
    ASSERT_EQ(usage.sequences, static_cast<int64_t>(live.size()));
  }
  for (const auto& [id, model] : live) ASSERT_TRUE(cache->Free(id).ok());
  const CacheUsage end = cache->Usage();
  EXPECT_EQ(end.used_bytes(), 0);
  EXPECT_GT(end.reserved_bytes(), 0);  // pages stay on the free lists for reuse
}

TEST(Cache, StateBudgetExhaustionNamesThePoolAndChangesNothing) {
  CacheOptions options = SmallOptions();
  auto probe = MakeCache(SmallSpec(), options);
  const SequenceId first = *probe->CreateSequence();
  const int64_t per_sequence = probe->Usage(first)->total_bytes();
  options.state_bytes = per_sequence * 2 + per_sequence / 2;  // room for two sequences
  auto cache = MakeCache(SmallSpec(), options);
  const SequenceId a = *cache->CreateSequence();
  std::mt19937 rng(7);
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(a, layer, 0, {RandomRows(9, rng)}).ok());
  ASSERT_TRUE(cache->Fork(a).ok());
  const CacheUsage before = cache->Usage();
  const absl::StatusOr<SequenceId> third = cache->CreateSequence();
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(third.status().message()), HasSubstr("state arena"));
  const absl::StatusOr<SequenceId> fork = cache->Fork(a);
  EXPECT_EQ(fork.status().code(), absl::StatusCode::kResourceExhausted);
  const CacheUsage after = cache->Usage();
  EXPECT_EQ(after.used_bytes(), before.used_bytes());
  EXPECT_EQ(after.sequences, 2);
}

TEST(Cache, AccountingMatchesTheLayoutFormulas) {
  // The real V4-Pro geometry: window 128 in pages of 64 rows, depth 16.
  auto cache = MakeCache(ModelSpec::V4Pro(), CacheOptions{});
  const SequenceId seq = *cache->CreateSequence();
  const SequenceUsage usage = *cache->Usage(seq);
  const int64_t ring_page = 37440;  // 64 rows * 584 B = 37,376, padded to 65 * 576
  const int64_t rollback_page = 16 * 592;  // 16 rows + their positions
  EXPECT_EQ(usage.bytes[static_cast<int>(Component::kWindowRing)], 61 * (2 * ring_page + rollback_page));
  // State (spec §6: 80 KiB per CSA layer, 512 KiB per HCA layer) plus 16 rollback tokens.
  const int64_t csa = (8 + 16) * 8192 + (8 + 16) * 2048;
  const int64_t hca = (128 + 16) * 4096;
  EXPECT_EQ(usage.bytes[static_cast<int>(Component::kCompressorState)], 30 * csa + 31 * hca);
  EXPECT_EQ(usage.bytes[static_cast<int>(Component::kCompressedRows)], 0);
  EXPECT_EQ(cache->Usage().used_bytes(), usage.total_bytes());
  EXPECT_EQ(cache->Usage().components[static_cast<int>(Component::kWindowRing)].pages, 61 * 3);
}

TEST(Cache, RejectsInconsistentOptions) {
  CacheOptions options;
  options.rollback_depth = 200;  // more than the window
  EXPECT_EQ(Cache::Create(ModelSpec::V4Flash(), options).status().code(), absl::StatusCode::kInvalidArgument);
  options = CacheOptions{};
  options.rows_per_page = 0;
  EXPECT_EQ(Cache::Create(ModelSpec::V4Flash(), options).status().code(), absl::StatusCode::kInvalidArgument);
  ModelSpec bad = ModelSpec::V4Flash();
  bad.head_dim = 576;
  EXPECT_THAT(std::string(Cache::Create(bad).status().message()), HasSubstr("584-byte rows"));
}

}  // namespace
}  // namespace kvc
