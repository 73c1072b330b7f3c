#include "kvc/cache.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/reference_codecs.h"
#include "kvc/row_kernels.h"
#include "kvc/snapshot.h"
#include "tests/testing/reference_model.h"

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

// A history stream read back through its view (dequantized KV rows).
std::vector<uint16_t> CompressedBits(const Cache& cache, SequenceId seq, int layer) {
  auto view = cache.CompressedRows(seq, layer);
  EXPECT_TRUE(view.ok());
  std::vector<uint16_t> bits;
  std::vector<Bf16> row(kHeadDim);
  for (int64_t i = 0; i < view->rows; ++i) {
    EXPECT_TRUE(DequantizeKvRows(view->pages[static_cast<size_t>(i / view->rows_per_page)].Slice(i % view->rows_per_page, 1),
                                 absl::MakeSpan(row)).ok());
    for (const Bf16& v : row) bits.push_back(v.bits);
  }
  return bits;
}

using testing::ReferenceBits;

// The ring after the first `length` rows of `history`.
std::vector<uint16_t> ExpectedWindow(const std::vector<Bf16>& history, int64_t length, int window) {
  return testing::ExpectedWindow(std::vector<Bf16>(history.begin(), history.begin() + length * kHeadDim), window);
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
  // A finite NoPE value of 248 x 2^120 or more would read back as infinity (row_kernels.h).
  rows[static_cast<size_t>(12 * kHeadDim + 17)] = Bf16{0xFF78};
  expect_unchanged(cache->Append(seq, 1, 10, {Rows(rows, 10, 5)}), absl::StatusCode::kInvalidArgument,
                   "input row 2 dim 17 is at least 248 x 2^120");
  rows[static_cast<size_t>(12 * kHeadDim + 17)] = Bf16{0xFF77};  // the largest that reads back finite
  rows[static_cast<size_t>(12 * kHeadDim + 511)] = Bf16{0x7F7F};  // RoPE dims hold any finite bf16
  ASSERT_TRUE(CheckKvRows(Rows(rows, 10, 5), "rows").ok());
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
    std::vector<Bf16> entries[3];  // compressed rows of layers 1 (CSA) and 2 (HCA)
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
    } else if (op == 9) {  // compressed entries for every closed window
      for (int layer = 1; layer < 3; ++layer) {
        const int64_t have = static_cast<int64_t>(m.entries[layer].size()) / kHeadDim;
        const int64_t closed = m.length / (layer == 1 ? 4 : 128);
        const std::vector<Bf16> rows = RandomRows(closed - have, rng);
        ASSERT_TRUE(cache->AppendCompressedRows(seq, layer, have, rows).ok());
        m.entries[layer].insert(m.entries[layer].end(), rows.begin(), rows.end());
      }
    } else if (op == 7) {  // truncate, sometimes beyond the floor (must fail)
      const int64_t target = m.length - static_cast<int64_t>(rng() % 8);
      const absl::Status s = cache->Truncate(seq, target);
      if (target >= m.floor && target >= 0) {
        ASSERT_TRUE(s.ok()) << s;
        m.length = target;
        m.history.resize(static_cast<size_t>(target * kHeadDim));
        for (int layer = 1; layer < 3; ++layer) {
          const size_t keep = static_cast<size_t>(target / (layer == 1 ? 4 : 128)) * kHeadDim;
          if (m.entries[layer].size() > keep) m.entries[layer].resize(keep);
        }
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
    for (int layer = 1; layer < 3; ++layer) {
      ASSERT_EQ(CompressedBits(*cache, seq, layer), ReferenceBits(m.entries[layer])) << "step " << step;
    }
    // Shared pages are counted once in the cache's total and in full by each
    // sequence that references them.
    const CacheUsage usage = cache->Usage();
    int64_t referenced = 0, unshared = 0;
    for (const auto& [id, model] : live) {
      const SequenceUsage u = *cache->Usage(id);
      referenced += u.total_bytes();
      unshared += u.total_bytes() - u.shared_bytes;
    }
    ASSERT_LE(usage.used_bytes(), referenced);
    ASSERT_GE(usage.used_bytes(), unshared);
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
  EXPECT_THAT(std::string(third.status().message()), HasSubstr("state budget"));
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

TEST(Cache, HistoryAppendsAreValidatedAndOrdered) {
  std::mt19937 rng(8);
  auto cache = MakeCache();
  const SequenceId seq = *cache->CreateSequence();
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(seq, layer, 0, {RandomRows(10, rng)}).ok());
  const std::vector<Bf16> entries = RandomRows(3, rng);
  // Window-only layers have no compressed rows; HCA layers have no keys.
  EXPECT_THAT(std::string(cache->AppendCompressedRows(seq, 0, 0, entries).message()), HasSubstr("window layer"));
  EXPECT_THAT(std::string(cache->AppendIndexKeys(seq, 2, 0, std::vector<Bf16>(128)).message()), HasSubstr("hca layer"));
  // 10 tokens close 2 CSA windows: a third entry does not exist yet.
  EXPECT_EQ(cache->AppendCompressedRows(seq, 1, 0, entries).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->AppendCompressedRows(seq, 2, 0, Rows(entries, 0, 1)).code(), absl::StatusCode::kOutOfRange);
  ASSERT_TRUE(cache->AppendCompressedRows(seq, 1, 0, Rows(entries, 0, 1)).ok());
  EXPECT_THAT(std::string(cache->AppendCompressedRows(seq, 1, 0, Rows(entries, 1, 1)).message()), HasSubstr("repeats"));
  EXPECT_THAT(std::string(cache->AppendCompressedRows(seq, 1, 2, Rows(entries, 1, 1)).message()), HasSubstr("gap"));
  std::vector<Bf16> huge(entries.begin() + kHeadDim, entries.begin() + 2 * kHeadDim);
  huge[300] = Bf16{0x7F78};  // finite, but its FP8 code would read back as infinity
  EXPECT_THAT(std::string(cache->AppendCompressedRows(seq, 1, 1, huge).message()), HasSubstr("row 0 dim 300 is at least 248 x 2^120"));
  EXPECT_EQ(cache->CompressedRows(seq, 1)->rows, 1);
  std::vector<Bf16> keys = RandomRows(1, rng);
  keys.resize(2 * kIndexDim, ToBf16(0.5f));
  keys[kIndexDim + 3] = ToBf16(std::exp2(121.0f));
  EXPECT_THAT(std::string(cache->AppendIndexKeys(seq, 1, 0, keys).message()), HasSubstr("key 1 dim 3 exceeds 2^120"));
  EXPECT_EQ(cache->IndexKeys(seq, 1)->rows, 0);
  keys[kIndexDim + 3] = ToBf16(1.0f);
  ASSERT_TRUE(cache->AppendIndexKeys(seq, 1, 0, keys).ok());
  // The stored keys are the kernels' bytes.
  const HistoryView view = *cache->IndexKeys(seq, 1);
  ASSERT_EQ(view.rows, 2);
  IndexKeyFp4 expected;
  QuantizeIndexKeyRef(&keys[kIndexDim], expected.codes, expected.scales);
  EXPECT_EQ(0, std::memcmp(view.pages[0].row_data(1), expected.codes, 64));
  EXPECT_EQ(0, std::memcmp(view.pages[0].row_scales(1), expected.scales, 4));
  EXPECT_EQ(CompressedBits(*cache, seq, 1), ReferenceBits(std::vector<Bf16>(entries.begin(), entries.begin() + kHeadDim)));
}

TEST(Cache, ForksShareHistoryPagesAndCopyAPartialPageOnWrite) {
  std::mt19937 rng(9);
  auto cache = MakeCache();  // 5 rows per page
  const SequenceId parent = *cache->CreateSequence();
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(parent, layer, 0, {RandomRows(40, rng)}).ok());
  const std::vector<Bf16> first = RandomRows(7, rng);  // pages: 5 + 2 (partial)
  ASSERT_TRUE(cache->AppendCompressedRows(parent, 1, 0, first).ok());
  const SequenceId child = *cache->Fork(parent);
  const int64_t page = 3456;  // 5 rows x 584 B = 2,920, padded to 6 x 576
  const int64_t history_used = cache->Usage().components[static_cast<int>(Component::kCompressedRows)].used_bytes;
  EXPECT_EQ(history_used, 2 * page);  // shared pages counted once
  EXPECT_EQ(cache->Usage(child)->shared_bytes, 2 * page);

  // The child writes into the shared partial page: it gets its own copy.
  const std::vector<Bf16> child_rows = RandomRows(2, rng);
  ASSERT_TRUE(cache->AppendCompressedRows(child, 1, 7, child_rows).ok());
  EXPECT_EQ(cache->Usage().components[static_cast<int>(Component::kCompressedRows)].used_bytes, 3 * page);
  EXPECT_EQ(cache->Usage(child)->shared_bytes, page);
  EXPECT_EQ(CompressedBits(*cache, parent, 1), ReferenceBits(first));
  std::vector<Bf16> child_all = first;
  child_all.insert(child_all.end(), child_rows.begin(), child_rows.end());
  EXPECT_EQ(CompressedBits(*cache, child, 1), ReferenceBits(child_all));
  // The parent's partial page is now its own: writing needs no copy.
  ASSERT_TRUE(cache->AppendCompressedRows(parent, 1, 7, RandomRows(1, rng)).ok());
  EXPECT_EQ(cache->Usage().components[static_cast<int>(Component::kCompressedRows)].used_bytes, 3 * page);

  // Truncating drops entries past the new length and pages no longer needed.
  ASSERT_TRUE(cache->Truncate(child, 36).ok());  // 9 entries still exist at 36 tokens
  EXPECT_EQ(cache->CompressedRows(child, 1)->rows, 9);
  ASSERT_TRUE(cache->Free(parent).ok());
  EXPECT_EQ(cache->Usage(child)->shared_bytes, 0);
  EXPECT_EQ(CompressedBits(*cache, child, 1), ReferenceBits(child_all));
}

TEST(Cache, HistoryExhaustionNamesThePoolAndChangesNothing) {
  CacheOptions options = SmallOptions();
  options.history_bytes = 2 * 3456;  // two compressed-row pages of 5 rows
  auto cache = MakeCache(SmallSpec(), options);
  std::mt19937 rng(10);
  const SequenceId seq = *cache->CreateSequence();
  for (int layer = 0; layer < 3; ++layer) ASSERT_TRUE(cache->Append(seq, layer, 0, {RandomRows(60, rng)}).ok());
  ASSERT_TRUE(cache->AppendCompressedRows(seq, 1, 0, RandomRows(8, rng)).ok());
  const std::vector<uint16_t> before = CompressedBits(*cache, seq, 1);
  const absl::Status s = cache->AppendCompressedRows(seq, 1, 8, RandomRows(5, rng));  // needs a third page
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("compressed rows"));
  EXPECT_EQ(CompressedBits(*cache, seq, 1), before);
  EXPECT_EQ(cache->CompressedRows(seq, 1)->rows, 8);
  EXPECT_TRUE(cache->AppendCompressedRows(seq, 1, 8, RandomRows(2, rng)).ok());  // still fits
}

TEST(Cache, LongSequenceFootprintIsSpecSixPlusPageRounding) {
  // One CSA and one HCA layer at 65,536 tokens, real geometry.
  ModelSpec spec = ModelSpec::V4Pro();
  spec.layers.resize(2);
  spec.layers[0].kind = LayerKind::kCsa;
  spec.layers[1].kind = LayerKind::kHca;
  auto cache = MakeCache(spec, CacheOptions{});
  std::mt19937 rng(11);
  const SequenceId seq = *cache->CreateSequence();
  const int64_t tokens = 65536;
  const std::vector<Bf16> rows = RandomRows(128, rng);
  for (int64_t at = 0; at < tokens; at += 128) {
    for (int layer = 0; layer < 2; ++layer) ASSERT_TRUE(cache->Append(seq, layer, at, {rows}).ok());
  }
  ASSERT_TRUE(cache->AppendCompressedRows(seq, 0, 0, RandomRows(tokens / 4, rng)).ok());
  std::vector<Bf16> keys(static_cast<size_t>(tokens / 4) * kIndexDim, ToBf16(0.25f));
  ASSERT_TRUE(cache->AppendIndexKeys(seq, 0, 0, keys).ok());
  ASSERT_TRUE(cache->AppendCompressedRows(seq, 1, 0, RandomRows(tokens / 128, rng)).ok());

  const SequenceUsage usage = *cache->Usage(seq);
  const int64_t rows_bytes = usage.bytes[static_cast<int>(Component::kCompressedRows)];
  const int64_t keys_bytes = usage.bytes[static_cast<int>(Component::kIndexKeys)];
  // Pages: CSA 16,384 rows / 64 = 256 pages, HCA 512 rows = 8 pages; keys 256 pages.
  EXPECT_EQ(rows_bytes, (256 + 8) * 37440);
  EXPECT_EQ(keys_bytes, 256 * 4352);
  // Spec §6: 163 B/token (CSA) + 4.5625 B/token (HCA); pages add 64 B per 37,376.
  const double spec_bytes = (163.0 + 4.5625) * tokens;
  EXPECT_NEAR(static_cast<double>(rows_bytes + keys_bytes) / spec_bytes, 1.0, 0.002);
}

// --- Pages as an engine addresses them ---------------------------------------

// Two layers of each history stream: W, CSA, HCA, CSA, HCA (window 12 in
// pages of 5 rows, rollback depth 5).
ModelSpec TwoOfEachSpec() {
  ModelSpec spec = SmallSpec();
  spec.layers.resize(5);
  spec.layers[3].kind = LayerKind::kCsa;
  spec.layers[4].kind = LayerKind::kHca;
  return spec;
}

// Every page of every stream of `seq`: the block table's ids are in
// [0, num_pages), once each, and the cache's own views (ring pages, history
// pages) are at base + id x page_bytes of each layer's array, its scales at
// the footer. Layers without a stream report kNotFound.
void ExpectAddressable(const Cache& cache, SequenceId seq) {
  const int layers = static_cast<int>(cache.spec().layers.size());
  for (int s = 0; s < kNumStreams; ++s) {
    const Stream stream = static_cast<Stream>(s);
    const absl::StatusOr<std::vector<int32_t>> table = cache.BlockTable(seq, stream);
    bool any = false;
    for (int layer = 0; layer < layers; ++layer) {
      const absl::StatusOr<PageArray> pages = cache.LayerPages(layer, stream);
      if (!pages.ok()) {
        EXPECT_EQ(pages.status().code(), absl::StatusCode::kNotFound) << pages.status();
        EXPECT_EQ(cache.StreamRows(seq, layer, stream).status().code(), absl::StatusCode::kNotFound);
        continue;
      }
      any = true;
      ASSERT_TRUE(table.ok()) << table.status();
      std::vector<int32_t> sorted = *table;
      std::sort(sorted.begin(), sorted.end());
      EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "a page twice in one table";
      for (const int32_t id : *table) {
        EXPECT_GE(id, 0);
        EXPECT_LT(id, pages->num_pages);
      }
      std::vector<const uint8_t*> views;
      const int64_t rows = *cache.StreamRows(seq, layer, stream);
      if (s >= static_cast<int>(Stream::kCsaState)) {  // a compressor's state ring: one page per sequence
        EXPECT_EQ(table->size(), 1u);
        // The ring's tokens still held: every open window's (span = capacity
        // - rollback depth), at most the whole ring (after a truncation or a
        // restore, the rows past the length written before are gone).
        const int64_t length = *cache.Length(seq, layer);
        EXPECT_LE(rows, std::min<int64_t>(length, pages->rows_per_page));
        EXPECT_GE(rows, std::min<int64_t>(length, pages->rows_per_page - cache.options().rollback_depth));
        EXPECT_EQ(pages->page_bytes, int64_t{pages->rows_per_page} * pages->row_data_bytes);
        continue;
      }
      if (stream == Stream::kWindow) {
        const WindowRingView ring = *cache.Window(seq, layer);
        EXPECT_EQ(rows, std::min<int64_t>(ring.length, ring.window));
        for (const ConstPackedRows& page : ring.pages) views.push_back(page.data);
      } else {
        const HistoryView h = stream == Stream::kCsaKeys ? *cache.IndexKeys(seq, layer) : *cache.CompressedRows(seq, layer);
        EXPECT_EQ(h.rows, rows);
        EXPECT_LE((rows + pages->rows_per_page - 1) / pages->rows_per_page, static_cast<int64_t>(table->size()));
        for (const ConstPackedRows& page : h.pages) {
          views.push_back(page.data);
          EXPECT_EQ(page.scales, page.data + int64_t{pages->rows_per_page} * pages->row_data_bytes);
        }
      }
      ASSERT_EQ(views.size(), table->size()) << StreamName(stream) << " layer " << layer;
      for (size_t k = 0; k < views.size(); ++k) {
        EXPECT_EQ(views[k], pages->base + int64_t{(*table)[k]} * pages->page_bytes)
            << StreamName(stream) << " layer " << layer << " page " << k;
      }
    }
    if (!any) {
      EXPECT_EQ(table.status().code(), absl::StatusCode::kNotFound);
    }
  }
}

// Fills every layer of `seq` up to `tokens`, with compressed rows and keys
// for every window closed (the engine's own compressor: no parameters).
void Fill(Cache& cache, SequenceId seq, int64_t tokens, std::mt19937& rng) {
  for (int layer = 0; layer < static_cast<int>(cache.spec().layers.size()); ++layer) {
    const int64_t at = *cache.Length(seq, layer);
    ASSERT_TRUE(cache.Append(seq, layer, at, {RandomRows(tokens - at, rng)}).ok());
    const LayerKind kind = cache.spec().layers[static_cast<size_t>(layer)].kind;
    if (kind == LayerKind::kWindow) continue;
    const int64_t entries = tokens / (kind == LayerKind::kCsa ? 4 : 128);
    const int64_t have = cache.CompressedRows(seq, layer)->rows;
    ASSERT_TRUE(cache.AppendCompressedRows(seq, layer, have, RandomRows(entries - have, rng)).ok());
    if (kind == LayerKind::kCsa) {
      const int64_t keys = cache.IndexKeys(seq, layer)->rows;
      std::vector<Bf16> k(static_cast<size_t>((entries - keys) * kIndexDim));
      for (size_t i = 0; i < k.size(); ++i) k[i] = ToBf16(static_cast<float>(rng() % 100) / 50.0f - 1.0f);
      ASSERT_TRUE(cache.AppendIndexKeys(seq, layer, keys, k).ok());
    }
  }
}

TEST(Cache, EveryPageIsAtBasePlusIdTimesPageBytes) {
  std::mt19937 rng(21);
  CacheOptions options = SmallOptions();
  options.keys_per_page = 3;
  auto cache = MakeCache(TwoOfEachSpec(), options);
  const SequenceId a = *cache->CreateSequence();
  Fill(*cache, a, 150, rng);  // 37 CSA entries (8 pages), 1 HCA entry
  const SequenceId b = *cache->Fork(a);
  Fill(*cache, b, 270, rng);  // writes into a's shared partial pages: copies
  const SequenceId c = *cache->CreateSequence();
  Fill(*cache, c, 40, rng);
  ASSERT_TRUE(cache->Truncate(b, 266).ok());
  for (const SequenceId seq : {a, b, c}) ExpectAddressable(*cache, seq);
  // Ring pages are private: no window id in two sequences.
  std::vector<int32_t> ring;
  for (const SequenceId seq : {a, b, c}) {
    const std::vector<int32_t> t = *cache->BlockTable(seq, Stream::kWindow);
    EXPECT_EQ(t.size(), 3u);  // ceil(12 / 5)
    ring.insert(ring.end(), t.begin(), t.end());
  }
  std::sort(ring.begin(), ring.end());
  EXPECT_EQ(std::adjacent_find(ring.begin(), ring.end()), ring.end());
  // After a snapshot round trip, the restored sequences too, with the same rows.
  const std::string path = ::testing::TempDir() + "kvc_cache_pages_" + std::to_string(::getpid());
  ASSERT_TRUE(SaveSnapshot(*cache, {a, b, c}, path).ok());
  ASSERT_TRUE(cache->Free(c).ok());
  const std::vector<SequenceId> restored = *RestoreSnapshot(*cache, path);
  ASSERT_EQ(restored.size(), 3u);
  for (const SequenceId seq : restored) ExpectAddressable(*cache, seq);
  for (int layer : {1, 2, 3, 4}) {
    EXPECT_EQ(CompressedBits(*cache, restored[1], layer), CompressedBits(*cache, b, layer));
  }
  std::remove(path.c_str());
}

TEST(Cache, ForkCopiesASharedPageInEveryLayerOfTheStream) {
  std::mt19937 rng(22);
  auto cache = MakeCache(TwoOfEachSpec());  // 5 rows per page
  const SequenceId parent = *cache->CreateSequence();
  for (int layer = 0; layer < 5; ++layer) ASSERT_TRUE(cache->Append(parent, layer, 0, {RandomRows(40, rng)}).ok());
  for (const int layer : {1, 3}) ASSERT_TRUE(cache->AppendCompressedRows(parent, layer, 0, RandomRows(7, rng)).ok());
  const SequenceId child = *cache->Fork(parent);
  const std::vector<int32_t> shared = *cache->BlockTable(parent, Stream::kCsaRows);
  ASSERT_EQ(shared.size(), 2u);
  EXPECT_EQ(*cache->BlockTable(child, Stream::kCsaRows), shared);  // history ids shared
  const int64_t page = 3456 * 2;  // a page in each of the two CSA layers
  const auto csa_rows_used = [&] {
    return cache->Usage().components[static_cast<int>(Component::kCompressedRows)].used_bytes;
  };
  EXPECT_EQ(csa_rows_used(), 2 * page);
  const std::vector<uint16_t> parent3 = CompressedBits(*cache, parent, 3);

  // Layer 1 of the child writes into the shared partial page: a new id,
  // holding the page's bytes in BOTH CSA layers.
  ASSERT_TRUE(cache->AppendCompressedRows(child, 1, 7, RandomRows(1, rng)).ok());
  const std::vector<int32_t> own = *cache->BlockTable(child, Stream::kCsaRows);
  EXPECT_EQ(own[0], shared[0]);
  EXPECT_NE(own[1], shared[1]);
  EXPECT_EQ(*cache->BlockTable(parent, Stream::kCsaRows), shared);
  EXPECT_EQ(csa_rows_used(), 3 * page);
  EXPECT_EQ(CompressedBits(*cache, child, 3), parent3);  // layer 3 read through the copy
  // Layer 3 of the child then writes into its own page: no further copy.
  ASSERT_TRUE(cache->AppendCompressedRows(child, 3, 7, RandomRows(2, rng)).ok());
  EXPECT_EQ(*cache->BlockTable(child, Stream::kCsaRows), own);
  EXPECT_EQ(csa_rows_used(), 3 * page);
  EXPECT_EQ(CompressedBits(*cache, parent, 3), parent3);
  // Layers at different row counts: the table covers the longest (9 rows).
  EXPECT_EQ(*cache->StreamRows(child, 1, Stream::kCsaRows), 8);
  EXPECT_EQ(*cache->StreamRows(child, 3, Stream::kCsaRows), 9);
  ExpectAddressable(*cache, parent);
  ExpectAddressable(*cache, child);
}

TEST(Cache, BatchBlockTablesDenseAndCsr) {
  std::mt19937 rng(23);
  auto cache = MakeCache(TwoOfEachSpec());
  const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence(), c = *cache->CreateSequence();
  Fill(*cache, a, 60, rng);   // 15 CSA rows: 3 pages, last full
  Fill(*cache, b, 28, rng);   // 7: 2 pages, last holds 2
  const std::vector<SequenceId> batch = {a, b, c};
  const DenseBlockTables dense = *cache->BatchBlockTables(batch, Stream::kCsaRows);
  const CsrBlockTables csr = *cache->BatchBlockTablesCsr(batch, Stream::kCsaRows);
  EXPECT_EQ(dense.max_blocks, 3);
  EXPECT_EQ(dense.blocks, (std::vector<int32_t>{3, 2, 0}));
  EXPECT_EQ(dense.rows, (std::vector<int64_t>{15, 7, 0}));
  EXPECT_EQ(csr.indptr, (std::vector<int32_t>{0, 3, 5, 5}));
  EXPECT_EQ(csr.last_page_len, (std::vector<int32_t>{5, 2, 0}));
  for (size_t i = 0; i < batch.size(); ++i) {
    const std::vector<int32_t> t = *cache->BlockTable(batch[i], Stream::kCsaRows);
    for (int64_t k = 0; k < dense.max_blocks; ++k) {
      EXPECT_EQ(dense.ids[i * 3 + static_cast<size_t>(k)], k < static_cast<int64_t>(t.size()) ? t[static_cast<size_t>(k)] : -1);
    }
    EXPECT_EQ(std::vector<int32_t>(csr.indices.begin() + csr.indptr[i], csr.indices.begin() + csr.indptr[i + 1]), t);
  }
  // The window: every sequence has its ring pages.
  EXPECT_EQ(cache->BatchBlockTables(batch, Stream::kWindow)->blocks, (std::vector<int32_t>{3, 3, 3}));
  // ...but no CSR form: FlashInfer's (pages - 1) x B + last_page_len = rows
  // cannot hold for ring slots (a short ring has all its pages, rows in slot order).
  EXPECT_THAT(std::string(cache->BatchBlockTablesCsr(batch, Stream::kWindow).status().message()),
              HasSubstr("is a ring"));
  EXPECT_EQ(cache->BatchBlockTablesCsr(batch, Stream::kCsaState).status().code(), absl::StatusCode::kInvalidArgument);
  // A stream no layer has, an unknown sequence.
  auto window_only = MakeCache([] {
    ModelSpec spec = SmallSpec();
    spec.layers.resize(1);
    return spec;
  }());
  const SequenceId w = *window_only->CreateSequence();
  EXPECT_EQ(window_only->BlockTable(w, Stream::kCsaRows).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(window_only->LayerPages(0, Stream::kHcaRows).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache->BatchBlockTables({a, 999}, Stream::kCsaRows).status().code(), absl::StatusCode::kNotFound);
}

TEST(Cache, AttentionSetIndicesAddressThePageArrays) {
  std::mt19937 rng(24);
  auto cache = MakeCache(TwoOfEachSpec());
  const SequenceId seq = *cache->CreateSequence();
  Fill(*cache, seq, 300, rng);
  const SequenceId child = *cache->Fork(seq);
  Fill(*cache, child, 303, rng);
  std::vector<Bf16> q(static_cast<size_t>(cache->spec().index_heads) * kIndexDim, ToBf16(0.5f));
  std::vector<float> w(static_cast<size_t>(cache->spec().index_heads), 1.0f);
  const IndexQuery query = *cache->PrepareIndexQuery(302, q, w);
  for (int layer = 0; layer < 5; ++layer) {
    const AttentionSet set = *cache->SelectAttentionSet(child, layer, &query);
    const PageArray window = *cache->LayerPages(layer, Stream::kWindow);
    ASSERT_EQ(set.window_indices.size(), 12u);
    for (size_t i = 0; i < set.window_indices.size(); ++i) {
      const int32_t x = set.window_indices[i];
      const uint8_t* page = window.base + int64_t{x / window.rows_per_page} * window.page_bytes;
      EXPECT_EQ(set.rows[i].data, page + int64_t{x % window.rows_per_page} * window.row_data_bytes);
      EXPECT_EQ(set.rows[i].scales, page + int64_t{window.rows_per_page} * window.row_data_bytes +
                                        int64_t{x % window.rows_per_page} * window.row_scale_bytes);
    }
    const LayerKind kind = cache->spec().layers[static_cast<size_t>(layer)].kind;
    if (kind == LayerKind::kWindow) {
      EXPECT_TRUE(set.compressed_indices.empty());
      continue;
    }
    const PageArray rows = *cache->LayerPages(layer, kind == LayerKind::kCsa ? Stream::kCsaRows : Stream::kHcaRows);
    ASSERT_EQ(set.window_indices.size() + set.compressed_indices.size(), set.rows.size());
    EXPECT_FALSE(set.compressed_indices.empty());
    for (size_t k = 0; k < set.compressed_indices.size(); ++k) {
      const int32_t x = set.compressed_indices[k];
      const uint8_t* page = rows.base + int64_t{x / rows.rows_per_page} * rows.page_bytes;
      EXPECT_EQ(set.rows[12 + k].data, page + int64_t{x % rows.rows_per_page} * rows.row_data_bytes);
    }
  }
}

TEST(Cache, AppendRowsTakesStoredBytesAndRefusesWhatKvcCannotHaveWritten) {
  std::mt19937 rng(25);
  auto source = MakeCache(TwoOfEachSpec());
  const SequenceId from = *source->CreateSequence();
  Fill(*source, from, 40, rng);  // 10 CSA rows and keys
  auto cache = MakeCache(TwoOfEachSpec());
  const SequenceId seq = *cache->CreateSequence();
  for (int layer = 0; layer < 5; ++layer) ASSERT_TRUE(cache->Append(seq, layer, 0, {RandomRows(40, rng)}).ok());
  // The source's rows and keys of layer 1, contiguous.
  auto contiguous = [](const HistoryView& h, int row_bytes) {
    std::vector<uint8_t> out;
    const int data = row_bytes == 584 ? 576 : 64;
    for (int64_t r = 0; r < h.rows; ++r) {
      const ConstPackedRows& page = h.pages[static_cast<size_t>(r / h.rows_per_page)];
      out.insert(out.end(), page.row_data(r % h.rows_per_page), page.row_data(r % h.rows_per_page) + data);
      out.insert(out.end(), page.row_scales(r % h.rows_per_page), page.row_scales(r % h.rows_per_page) + row_bytes - data);
    }
    return out;
  };
  const std::vector<uint8_t> rows = contiguous(*source->CompressedRows(from, 1), 584);
  const std::vector<uint8_t> keys = contiguous(*source->IndexKeys(from, 1), 68);
  ASSERT_EQ(rows.size(), 10u * 584);
  const auto code = [](const absl::Status& s) { return s.code(); };
  // Refusals change nothing.
  EXPECT_EQ(code(cache->AppendRows(seq, 1, Stream::kWindow, 0, rows)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(cache->AppendRows(seq, 0, Stream::kCsaRows, 0, rows)), absl::StatusCode::kNotFound);
  EXPECT_EQ(code(cache->AppendRows(seq, 2, Stream::kCsaKeys, 0, keys)), absl::StatusCode::kNotFound);
  EXPECT_EQ(code(cache->AppendRows(seq, 1, Stream::kCsaRows, 1, rows)), absl::StatusCode::kInvalidArgument);  // gap
  EXPECT_EQ(code(cache->AppendRows(seq, 1, Stream::kCsaRows, 0, absl::MakeConstSpan(rows).first(583))),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> too_many = rows;
  too_many.insert(too_many.end(), rows.begin(), rows.begin() + 584);  // 11 rows; 40 tokens close 10 windows
  EXPECT_EQ(code(cache->AppendRows(seq, 1, Stream::kCsaRows, 0, too_many)), absl::StatusCode::kOutOfRange);
  struct Bad {
    const char* what;
    size_t byte;
    uint8_t value;
  };
  for (const Bad& bad : {Bad{"NaN E4M3 code", 3 * 584 + 100, 0x7F}, Bad{"NaN scale", 3 * 584 + 577, 0xFF},
                         Bad{"non-finite RoPE dim", 3 * 584 + 448 + 11, 0x7F}, Bad{"padding", 3 * 584 + 583, 1}}) {
    std::vector<uint8_t> broken = rows;
    broken[bad.byte] = bad.value;
    if (std::string(bad.what) == "non-finite RoPE dim") broken[bad.byte - 1] = 0x80;  // 0x7F80: +inf
    const absl::Status s = cache->AppendRows(seq, 1, Stream::kCsaRows, 0, broken);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad.what;
    EXPECT_THAT(std::string(s.message()), HasSubstr("row 3 ")) << bad.what;
  }
  std::vector<uint8_t> bad_key = keys;
  bad_key[2 * 68 + 65] = 0xFF;
  EXPECT_THAT(std::string(cache->AppendRows(seq, 1, Stream::kCsaKeys, 0, bad_key).message()), HasSubstr("row 2 "));
  // The largest key scale kvc writes is 2^121 (byte 248: the Hadamard of 128
  // values of 2^120); a larger one would block every query's scoring.
  {
    std::vector<Bf16> extreme(kIndexDim, Bf16{0x7B80});  // 2^120, the largest key input
    std::vector<uint8_t> key(68);
    ASSERT_TRUE(QuantizeIndexKeys(extreme, ContiguousRows(RowFormat::kIndexFp4, key.data(), 1)).ok());
    EXPECT_EQ(*std::max_element(key.begin() + 64, key.end()), 248);
  }
  bad_key = keys;
  bad_key[2 * 68 + 65] = 249;
  EXPECT_THAT(std::string(cache->AppendRows(seq, 1, Stream::kCsaKeys, 0, bad_key).message()), HasSubstr("row 2 "));
  EXPECT_EQ(*cache->StreamRows(seq, 1, Stream::kCsaRows), 0);
  EXPECT_EQ(*cache->StreamRows(seq, 1, Stream::kCsaKeys), 0);
  EXPECT_EQ(cache->Usage().components[static_cast<int>(Component::kCompressedRows)].used_bytes, 0);
  // Accepted: stored byte for byte, in two calls.
  ASSERT_TRUE(cache->AppendRows(seq, 1, Stream::kCsaRows, 0, absl::MakeConstSpan(rows).first(4 * 584)).ok());
  ASSERT_TRUE(cache->AppendRows(seq, 1, Stream::kCsaRows, 4, absl::MakeConstSpan(rows).subspan(4 * 584)).ok());
  ASSERT_TRUE(cache->AppendRows(seq, 1, Stream::kCsaKeys, 0, keys).ok());
  EXPECT_EQ(contiguous(*cache->CompressedRows(seq, 1), 584), rows);
  EXPECT_EQ(contiguous(*cache->IndexKeys(seq, 1), 68), keys);
  EXPECT_EQ(CompressedBits(*cache, seq, 1), CompressedBits(*source, from, 1));
  ExpectAddressable(*cache, seq);
}

TEST(Cache, BudgetRefusalsChangeNoTable) {
  std::mt19937 rng(26);
  CacheOptions options = SmallOptions();
  options.history_bytes = 3 * 2 * 3456 + 100;  // 3 CSA row ids (a page in each of 2 layers)
  auto cache = MakeCache(TwoOfEachSpec(), options);
  const SequenceId seq = *cache->CreateSequence();
  for (int layer = 0; layer < 5; ++layer) ASSERT_TRUE(cache->Append(seq, layer, 0, {RandomRows(80, rng)}).ok());
  ASSERT_TRUE(cache->AppendCompressedRows(seq, 1, 0, RandomRows(12, rng)).ok());
  const std::vector<int32_t> before = *cache->BlockTable(seq, Stream::kCsaRows);
  const CacheUsage usage = cache->Usage();
  const absl::Status s = cache->AppendCompressedRows(seq, 3, 0, RandomRows(16, rng));  // needs a 4th id
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(s.message()), HasSubstr("CSA compressed rows: needs 1 pages"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("history budget"));
  EXPECT_EQ(*cache->BlockTable(seq, Stream::kCsaRows), before);
  EXPECT_EQ(*cache->StreamRows(seq, 3, Stream::kCsaRows), 0);
  EXPECT_EQ(cache->Usage().used_bytes(), usage.used_bytes());
  EXPECT_TRUE(cache->AppendCompressedRows(seq, 3, 0, RandomRows(15, rng)).ok());  // the same 3 pages
  EXPECT_EQ(*cache->BlockTable(seq, Stream::kCsaRows), before);
}

TEST(Cache, PageGeometryTellsAnEngineWhatToAllocate) {
  const std::vector<StreamGeometry> g = *Cache::PageGeometry(ModelSpec::V4Pro(), CacheOptions{});
  ASSERT_EQ(g.size(), 7u);
  EXPECT_EQ(g[0].page_bytes, 37440);  // 64 x 584 = 37,376 rounded up to 65 x 576
  EXPECT_EQ(g[1].page_bytes, 37440);
  EXPECT_EQ(g[2].page_bytes, 4352);   // 64 x 68
  EXPECT_EQ(g[3].page_bytes, 37440);
  EXPECT_EQ(g[0].layers.size(), 61u);
  EXPECT_EQ(g[1].layers.size(), 30u);  // V4-Pro: 30 CSA and 31 HCA layers
  EXPECT_EQ(g[3].layers.size(), 31u);
  EXPECT_EQ(g[1].layers, g[2].layers);
  EXPECT_EQ(g[2].row_data_bytes, 64);
  EXPECT_EQ(g[2].row_scale_bytes, 4);
  // Compressor state rings (rollback depth 16): CSA span 8, HCA span 128
  // token rows; a row is kv then score + ape, 2 x width fp32.
  EXPECT_EQ(g[4].rows_per_page, 8 + 16);
  EXPECT_EQ(g[4].row_data_bytes, 2 * 1024 * 4);
  EXPECT_EQ(g[5].rows_per_page, 8 + 16);
  EXPECT_EQ(g[5].row_data_bytes, 2 * 256 * 4);
  EXPECT_EQ(g[6].rows_per_page, 128 + 16);
  EXPECT_EQ(g[6].row_data_bytes, 2 * 512 * 4);
  EXPECT_EQ(g[6].page_bytes, 144 * 4096);
  EXPECT_EQ(g[4].layers, g[1].layers);
  EXPECT_EQ(g[6].layers, g[3].layers);
  CacheOptions bad;
  bad.rows_per_page = 0;
  EXPECT_EQ(Cache::PageGeometry(ModelSpec::V4Pro(), bad).status().code(), absl::StatusCode::kInvalidArgument);
}

// 64-byte aligned engine memory.
struct AlignedBuffer {
  explicit AlignedBuffer(int64_t bytes) : storage(static_cast<size_t>(bytes) + 64) {}
  absl::Span<uint8_t> span(int64_t bytes) {
    uint8_t* p = storage.data() + (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64;
    return {p, static_cast<size_t>(bytes)};
  }
  std::vector<uint8_t> storage;
};

TEST(Cache, EngineArraysHoldEveryPage) {
  const ModelSpec spec = TwoOfEachSpec();
  CacheOptions options = SmallOptions();
  const std::vector<StreamGeometry> geometry = *Cache::PageGeometry(spec, options);
  const int64_t pages[kNumStreams] = {10, 20, 7, 4, 12, 12, 12};  // per stream
  std::vector<std::unique_ptr<AlignedBuffer>> buffers;
  std::vector<EngineArray> arrays;
  for (const StreamGeometry& g : geometry) {
    const int64_t bytes = pages[static_cast<int>(g.stream)] * g.page_bytes + 100;  // a partial page is ignored
    for (const int32_t layer : g.layers) {
      buffers.push_back(std::make_unique<AlignedBuffer>(bytes));
      arrays.push_back({layer, g.stream, buffers.back()->span(bytes)});
      std::fill(arrays.back().bytes.begin(), arrays.back().bytes.end(), uint8_t{0xAB});  // pages are zeroed when handed out
    }
  }
  options.engine_arrays = arrays;
  auto cache = MakeCache(spec, options);
  std::mt19937 rng(27);
  const SequenceId a = *cache->CreateSequence();
  Fill(*cache, a, 50, rng);
  const SequenceId b = *cache->Fork(a);
  Fill(*cache, b, 60, rng);
  for (const SequenceId seq : {a, b}) ExpectAddressable(*cache, seq);
  for (const EngineArray& e : arrays) {
    const PageArray p = *cache->LayerPages(e.layer, e.stream);
    EXPECT_EQ(p.base, e.bytes.data());
    EXPECT_EQ(p.num_pages, pages[static_cast<int>(e.stream)]);
  }
  // Unwritten ring slots read as zero although the engine's memory was not.
  const SequenceId fresh = *cache->CreateSequence();
  EXPECT_EQ(Window(*cache, fresh, 0), std::vector<uint16_t>(12 * kHeadDim, 0));
  // Out of pages: 10 window ids hold 3 sequences of 3 pages (a, b, fresh) and no 4th.
  EXPECT_EQ(cache->CreateSequence().status().code(), absl::StatusCode::kResourceExhausted);

  // Refused: a missing array, a misaligned base, disagreeing sizes, a stream the layer lacks.
  auto refused = [&](std::vector<EngineArray> given, const std::string& message) {
    CacheOptions o = SmallOptions();
    o.engine_arrays = std::move(given);
    const absl::Status s = Cache::Create(spec, o).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << message;
    EXPECT_THAT(std::string(s.message()), HasSubstr(message));
  };
  std::vector<EngineArray> missing = arrays;
  missing.erase(missing.begin() + 2);  // the window array of layer 2
  refused(missing, "layer 2 stream window ring is missing");
  std::vector<EngineArray> misaligned = arrays;
  misaligned[0].bytes = misaligned[0].bytes.subspan(1);
  refused(misaligned, "layer 0 stream window ring: base is not 64-byte aligned");
  std::vector<EngineArray> unequal = arrays;
  unequal[1].bytes = unequal[1].bytes.first(static_cast<size_t>(5 * geometry[0].page_bytes));
  refused(unequal, "layer 1 stream window ring holds 5 pages");
  std::vector<EngineArray> lacking = arrays;
  lacking.push_back({0, Stream::kCsaKeys, arrays[0].bytes});
  refused(lacking, "layer 0 stream CSA index keys: a window layer has no such stream");
  std::vector<EngineArray> overlapping = arrays;  // layer 1's window array is layer 0's
  overlapping[1].bytes = overlapping[0].bytes;
  refused(overlapping, "overlap");
  overlapping = arrays;  // a history array reusing a window array's tail
  overlapping.back().bytes = arrays[0].bytes.subspan(static_cast<size_t>(geometry[0].page_bytes));
  if (overlapping.back().bytes.size() >= static_cast<size_t>(geometry[static_cast<int>(overlapping.back().stream)].page_bytes)) {
    refused(overlapping, "overlap");
  }
}

// Row indices an engine takes (id x rows_per_page + offset) are int32: a
// stream's arrays never have more pages than keep them so, even when the
// budget and the address space would allow more.
TEST(Cache, PagesAreCappedSoRowIndicesFitInt32) {
  CacheOptions options;
  options.rows_per_page = 4096;
  options.rollback_depth = 0;
  options.state_bytes = std::numeric_limits<int64_t>::max();
  options.history_bytes = std::numeric_limits<int64_t>::max();
  auto cache = MakeCache(SmallSpec(), options);
  for (int layer = 0; layer < 3; ++layer) {
    for (const Stream stream : {Stream::kWindow, Stream::kCsaRows, Stream::kHcaRows}) {
      const absl::StatusOr<PageArray> pages = cache->LayerPages(layer, stream);
      if (!pages.ok()) continue;
      EXPECT_GT(pages->num_pages, 0);
      EXPECT_LE(pages->num_pages * pages->rows_per_page, std::numeric_limits<int32_t>::max())
          << "layer " << layer << " " << StreamName(stream);
    }
  }
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


// Resident memory of this process (bytes), from /proc/self/statm.
int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// Resident bytes per byte of touched memory: TSan adds 4 shadow bytes.
#if defined(__SANITIZE_THREAD__)
constexpr int64_t kResidentPerByte = 5;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr int64_t kResidentPerByte = 5;
#else
constexpr int64_t kResidentPerByte = 1;
#endif
#else
constexpr int64_t kResidentPerByte = 1;
#endif

// Bookkeeping grows with the pages in use, not with the byte limits: huge
// limits ("no limit") and tiny pages cost nothing until used.
TEST(Cache, HugeLimitsAndTinyPagesCostNothingUntilUsed) {
  constexpr int64_t kMaxGrowth = 16 << 20;
  struct Case {
    const char* name;
    CacheOptions options;
  };
  std::vector<Case> cases(4);
  cases[0].name = "history_bytes = state_bytes = INT64_MAX";
  cases[0].options.history_bytes = INT64_MAX;
  cases[0].options.state_bytes = INT64_MAX;
  cases[1].name = "rollback_depth = 0";
  cases[1].options.rollback_depth = 0;
  cases[2].name = "keys_per_page = 1";
  cases[2].options.keys_per_page = 1;
  cases[3].name = "rows_per_page = 1 with INT64_MAX limits";
  cases[3].options.rows_per_page = 1;
  cases[3].options.history_bytes = INT64_MAX;
  cases[3].options.state_bytes = INT64_MAX;
  for (const Case& c : cases) {
    const int64_t before = ResidentBytes();
    auto cache = Cache::Create(ModelSpec::V4Flash(), c.options);
    ASSERT_TRUE(cache.ok()) << c.name << ": " << cache.status();
    EXPECT_LT(ResidentBytes() - before, kMaxGrowth) << c.name;
    // And the cache works: a sequence, a few tokens, a fork, a truncate.
    std::mt19937 rng(13);
    const SequenceId seq = *(*cache)->CreateSequence();
    const std::vector<Bf16> rows = RandomRows(20, rng);
    for (int layer = 0; layer < static_cast<int>((*cache)->spec().layers.size()); ++layer) {
      ASSERT_TRUE((*cache)->Append(seq, layer, 0, {rows}).ok()) << c.name;
    }
    const SequenceId child = *(*cache)->Fork(seq);
    EXPECT_EQ(Window(**cache, child, 0), Window(**cache, seq, 0)) << c.name;
    if (c.options.rollback_depth > 0) {
      EXPECT_TRUE((*cache)->Truncate(seq, 19).ok()) << c.name;
    }
    // Beyond the pages themselves (all zero-filled, so resident), little.
    const int64_t pages = (*cache)->Usage().reserved_bytes();
    EXPECT_LT(ResidentBytes() - before - kResidentPerByte * pages, kMaxGrowth) << c.name << ": " << pages << " B of pages";
  }
}

}  // namespace
}  // namespace kvc
