// Draft ring slots (CacheOptions::draft_slots) and multi-position selection
// (Cache::SelectAttentionSets).
//
// The ring of window + draft_slots rows is checked against rows quantized by
// the scalar reference codecs, against a cache without draft slots fed the
// same rows, and against a sequence that never saw the truncated tokens;
// snapshots carry the whole ring and refuse a cache with other draft slots.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/reference_codecs.h"
#include "kvc/row_kernels.h"
#include "kvc/snapshot.h"
#include "tests/testing/reference_model.h"
#include "tests/testing/tiny_model.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;
using testing::ObservableBytes;
using testing::TinyModel;

// Window 12 in pages of 5 rows; layers window-only, CSA, HCA without
// compressor parameters (only window rows are appended here).
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

CacheOptions SmallOptions(int32_t draft_slots) {
  CacheOptions options;
  options.rollback_depth = 5;
  options.rows_per_page = 5;
  options.draft_slots = draft_slots;
  options.history_bytes = 1 << 20;
  options.state_bytes = 64 << 20;
  return options;
}

std::unique_ptr<Cache> MakeCache(int32_t draft_slots, ModelSpec spec = SmallSpec()) {
  auto cache = Cache::Create(std::move(spec), SmallOptions(draft_slots));
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? *std::move(cache) : nullptr;
}

// Rows of two distributions: N(0, 3) and, every third row, wide magnitudes
// (several binades per row, zeros), so FP8 blocks see different scales.
std::vector<Bf16> MixedRows(int64_t rows, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_int_distribution<int> exponent(-20, 20);
  std::vector<Bf16> out(static_cast<size_t>(rows) * kHeadDim);
  for (int64_t r = 0; r < rows; ++r) {
    for (int c = 0; c < kHeadDim; ++c) {
      const float x = r % 3 == 2 ? (c % 7 == 0 ? 0.0f : std::ldexp(normal(rng), exponent(rng))) : normal(rng);
      out[static_cast<size_t>(r * kHeadDim + c)] = ToBf16(x);
    }
  }
  return out;
}

absl::Span<const Bf16> Rows(const std::vector<Bf16>& all, int64_t first, int64_t n) {
  return absl::MakeConstSpan(all).subspan(static_cast<size_t>(first * kHeadDim), static_cast<size_t>(n * kHeadDim));
}

absl::Status AppendAll(Cache& cache, SequenceId seq, const std::vector<Bf16>& rows, int64_t first, int64_t n) {
  for (int layer = 0; layer < 3; ++layer) {
    const absl::Status s = cache.Append(seq, layer, first, {Rows(rows, first, n)});
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

// Every ring slot's 584 bytes, in slot order, through the zero-copy view.
std::vector<uint8_t> RingBytes(const Cache& cache, SequenceId seq, int layer) {
  const WindowRingView view = *cache.Window(seq, layer);
  std::vector<uint8_t> bytes;
  for (int64_t s = 0; s < view.ring_slots; ++s) {
    const ConstPackedRows& page = view.pages[static_cast<size_t>(s / view.rows_per_page)];
    bytes.insert(bytes.end(), page.row_data(s % view.rows_per_page), page.row_data(s % view.rows_per_page) + 576);
    bytes.insert(bytes.end(), page.row_scales(s % view.rows_per_page), page.row_scales(s % view.rows_per_page) + 8);
  }
  return bytes;
}

// Ring slot s of the view, dequantized, as bf16 bits.
std::vector<uint16_t> SlotBits(const WindowRingView& view, int64_t s) {
  std::vector<Bf16> row(kHeadDim);
  EXPECT_TRUE(DequantizeKvRows(view.pages[static_cast<size_t>(s / view.rows_per_page)].Slice(s % view.rows_per_page, 1),
                               absl::MakeSpan(row))
                  .ok());
  std::vector<uint16_t> bits(kHeadDim);
  for (int i = 0; i < kHeadDim; ++i) bits[static_cast<size_t>(i)] = row[static_cast<size_t>(i)].bits;
  return bits;
}

std::vector<uint16_t> ReadWindowBits(const Cache& cache, SequenceId seq, int layer) {
  std::vector<Bf16> out(static_cast<size_t>(cache.spec().window) * kHeadDim);
  EXPECT_TRUE(cache.ReadWindow(seq, layer, absl::MakeSpan(out)).ok());
  std::vector<uint16_t> bits(out.size());
  for (size_t i = 0; i < out.size(); ++i) bits[i] = out[i].bits;
  return bits;
}

// --- The ring of window + draft_slots rows ----------------------------------

TEST(DraftSlots, RingHoldsTheLastWindowPlusDraftPositionsAtPositionModR) {
  std::mt19937 rng(101);
  const int64_t total = 70;
  const std::vector<Bf16> rows = MixedRows(total, rng);
  const std::vector<uint16_t> stored = testing::ReferenceBits(rows);  // each row as the reference stores it
  for (const int32_t draft : {0, 1, 3, 8, 13}) {
    auto cache = MakeCache(draft);
    const int64_t R = 12 + draft;
    const std::vector<std::vector<int64_t>> chunkings = {{1}, {4}, {R}, {R + 1}, {3, 29, 1, 2}, {total}};
    std::vector<std::vector<uint8_t>> finals;
    for (const auto& chunks : chunkings) {
      const SequenceId seq = *cache->CreateSequence();
      for (int64_t at = 0, i = 0; at < total; ++i) {
        const int64_t n = std::min(chunks[static_cast<size_t>(i) % chunks.size()], total - at);
        ASSERT_TRUE(AppendAll(*cache, seq, rows, at, n).ok());
        at += n;
        const WindowRingView view = *cache->Window(seq, 1);
        ASSERT_EQ(view.ring_slots, R);
        ASSERT_EQ(view.window, 12);
        ASSERT_EQ(static_cast<int64_t>(view.pages.size()), (R + 4) / 5);
        EXPECT_EQ(*cache->StreamRows(seq, 1, Stream::kWindow), std::min(at, R));
        for (int64_t s = 0; s < R; ++s) {
          // The position in slot s: the latest p < at with p mod R == s.
          const int64_t p = at - 1 - ((at - 1 - s) % R + R) % R;
          const std::vector<uint16_t> want =
              p >= 0 ? std::vector<uint16_t>(stored.begin() + p * kHeadDim, stored.begin() + (p + 1) * kHeadDim)
                     : std::vector<uint16_t>(kHeadDim, 0);
          ASSERT_EQ(SlotBits(view, s), want) << "draft " << draft << " at " << at << " slot " << s;
        }
        // ReadWindow keeps the official window: slot p mod 12 for the last 12.
        ASSERT_EQ(ReadWindowBits(*cache, seq, 0), testing::ExpectedWindow(std::vector<Bf16>(rows.begin(), rows.begin() + at * kHeadDim), 12))
            << "draft " << draft << " at " << at;
      }
      finals.push_back(RingBytes(*cache, seq, 2));
    }
    for (size_t i = 1; i < finals.size(); ++i) EXPECT_EQ(finals[i], finals[0]) << "draft " << draft << " chunking " << i;
  }
}

TEST(DraftSlots, TruncateGivesTheWholeRingOfASequenceThatNeverSawTheTokens) {
  std::mt19937 rng(102);
  const std::vector<Bf16> rows = MixedRows(120, rng);
  for (const int32_t draft : {2, 7}) {
    auto cache = MakeCache(draft);
    for (const int64_t length : {3, 12, 14, 19, 20, 40, 57}) {
      for (int64_t back = 0; back <= 5; ++back) {
        const int64_t target = std::max<int64_t>(0, length - back);
        const SequenceId seq = *cache->CreateSequence();
        for (int64_t at = 0; at < length; at += 4) ASSERT_TRUE(AppendAll(*cache, seq, rows, at, std::min<int64_t>(4, length - at)).ok());
        ASSERT_TRUE(cache->Truncate(seq, target).ok()) << length << " -> " << target;
        const SequenceId fresh = *cache->CreateSequence();
        ASSERT_TRUE(AppendAll(*cache, fresh, rows, 0, target).ok());
        for (int layer = 0; layer < 3; ++layer) {
          EXPECT_EQ(RingBytes(*cache, seq, layer), RingBytes(*cache, fresh, layer))
              << "draft " << draft << ": " << length << " -> " << target;
        }
        // And both continue alike.
        ASSERT_TRUE(AppendAll(*cache, seq, rows, target, 9).ok());
        ASSERT_TRUE(AppendAll(*cache, fresh, rows, target, 9).ok());
        EXPECT_EQ(RingBytes(*cache, seq, 1), RingBytes(*cache, fresh, 1));
        ASSERT_TRUE(cache->Free(seq).ok());
        ASSERT_TRUE(cache->Free(fresh).ok());
      }
    }
    EXPECT_EQ(cache->Usage().used_bytes(), 0);
  }
}

TEST(DraftSlots, SelectionKeepsTheOfficialIndicesAndAddressesTheRealRingSlots) {
  std::mt19937 rng(103);
  const std::vector<Bf16> rows = MixedRows(60, rng);
  auto plain = MakeCache(0);
  auto drafted = MakeCache(5);
  const SequenceId a = *plain->CreateSequence();
  const SequenceId b = *drafted->CreateSequence();
  for (const int64_t n : {1, 6, 11, 42}) {
    const int64_t at = *plain->Length(a, 0);
    ASSERT_TRUE(AppendAll(*plain, a, rows, at, n).ok());
    ASSERT_TRUE(AppendAll(*drafted, b, rows, at, n).ok());
    const int64_t length = at + n;
    const AttentionSet x = *plain->SelectAttentionSet(a, 0, nullptr);
    const AttentionSet y = *drafted->SelectAttentionSet(b, 0, nullptr);
    EXPECT_EQ(y.indices, x.indices);  // official: p mod 12
    ASSERT_EQ(y.rows.size(), x.rows.size());
    const PageArray window = *drafted->LayerPages(0, Stream::kWindow);
    const std::vector<int32_t> ids = *drafted->BlockTable(b, Stream::kWindow);
    ASSERT_EQ(ids.size(), 4u);  // ceil(17 / 5)
    for (size_t i = 0; i < y.rows.size(); ++i) {
      EXPECT_EQ(std::memcmp(y.rows[i].data, x.rows[i].data, 576), 0);
      EXPECT_EQ(std::memcmp(y.rows[i].scales, x.rows[i].scales, 8), 0);
      const int64_t p = std::max<int64_t>(0, length - 12) + static_cast<int64_t>(i);
      const int64_t slot = p % 17;
      EXPECT_EQ(y.window_indices[i], ids[static_cast<size_t>(slot / 5)] * 5 + slot % 5) << "position " << p;
      const int32_t r = y.window_indices[i];
      EXPECT_EQ(y.rows[i].data, window.base + int64_t{r / 5} * window.page_bytes + (r % 5) * 576);
    }
  }
}

TEST(DraftSlots, ForkCopiesTheWholeRing) {
  std::mt19937 rng(104);
  const std::vector<Bf16> rows = MixedRows(50, rng);
  auto cache = MakeCache(6);
  const SequenceId parent = *cache->CreateSequence();
  ASSERT_TRUE(AppendAll(*cache, parent, rows, 0, 31).ok());
  const SequenceId child = *cache->Fork(parent);
  for (int layer = 0; layer < 3; ++layer) EXPECT_EQ(RingBytes(*cache, child, layer), RingBytes(*cache, parent, layer));
  ASSERT_TRUE(AppendAll(*cache, child, rows, 31, 4).ok());
  ASSERT_TRUE(cache->Truncate(child, 31).ok());
  EXPECT_EQ(RingBytes(*cache, child, 1), RingBytes(*cache, parent, 1));
}

TEST(DraftSlots, OptionsAreValidatedAndSizeTheRing) {
  for (const int32_t bad : {-1, kMaxDraftSlots + 1, INT32_MAX}) {
    CacheOptions options;
    options.draft_slots = bad;
    const absl::Status s = Cache::Create(ModelSpec::V4Flash(), options).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(s.message()), HasSubstr("draft_slots " + std::to_string(bad) + " must be in [0, 4096]"));
    EXPECT_EQ(Cache::PageGeometry(ModelSpec::V4Flash(), options).status().code(), absl::StatusCode::kInvalidArgument);
  }
  CacheOptions options;
  options.draft_slots = kMaxDraftSlots;
  EXPECT_TRUE(Cache::Create(ModelSpec::V4Flash(), options).ok());
  options.draft_slots = 3;
  const std::vector<StreamGeometry> g = *Cache::PageGeometry(ModelSpec::V4Pro(), options);
  EXPECT_EQ(g[0].ring_slots, 131);
  EXPECT_EQ(g[0].page_bytes, 37440);  // pages keep their size; a ring holds 3 of them
  EXPECT_EQ(g[1].ring_slots, 0);
  EXPECT_EQ((*Cache::PageGeometry(ModelSpec::V4Pro(), CacheOptions{}))[0].ring_slots, 128);
  // A sequence's state: ceil(R / B) ring pages per layer.
  options.state_bytes = int64_t{1} << 30;
  auto cache = *Cache::Create(ModelSpec::V4Flash(), options);
  const SequenceId seq = *cache->CreateSequence();
  EXPECT_EQ(cache->BlockTable(seq, Stream::kWindow)->size(), 3u);
  const int64_t layers = static_cast<int64_t>(cache->spec().layers.size());
  EXPECT_EQ(cache->Usage(seq)->bytes[static_cast<int>(Component::kWindowRing)],
            3 * 37440 * layers + layers * 16 * 592);  // ring pages + rollback records (D = 16)
}

// --- Snapshots of a ring with draft slots ------------------------------------

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "kvc_multipos_" + std::to_string(::getpid()) + "_" + name;
}

CacheOptions TinyOptions(int32_t draft_slots) {
  CacheOptions o;
  o.rollback_depth = 4;
  o.rows_per_page = 8;
  o.keys_per_page = 16;
  o.draft_slots = draft_slots;
  o.history_bytes = int64_t{64} << 20;
  o.state_bytes = int64_t{64} << 20;
  return o;
}

TEST(DraftSlots, SnapshotsCarryTheWholeRingAndRestoreOnlyWithTheSameDraftSlots) {
  const TinyModel model;
  auto cache = *Cache::Create(model.spec(), TinyOptions(5));
  const SequenceId a = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, a, 150, 11, 7).ok());
  const SequenceId b = *cache->Fork(a);
  ASSERT_TRUE(model.Grow(*cache, b, 163, 12, 5).ok());
  ASSERT_TRUE(cache->Truncate(b, 160).ok());  // rollback records in use
  const std::string path = TempPath("draft5.kvcsnap");
  ASSERT_TRUE(SaveSnapshot(*cache, {a, b}, path).ok());

  auto restored = *Cache::Create(model.spec(), TinyOptions(5));
  const std::vector<SequenceId> ids = *RestoreSnapshot(*restored, path);
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(ObservableBytes(*restored, ids[0]), ObservableBytes(*cache, a));
  EXPECT_EQ(ObservableBytes(*restored, ids[1]), ObservableBytes(*cache, b));
  // It rolls back and continues like the original (the extra slots came back).
  ASSERT_EQ(*restored->RollbackFloor(ids[1]), 159);
  ASSERT_TRUE(restored->Truncate(ids[1], 159).ok());
  ASSERT_TRUE(cache->Truncate(b, 159).ok());
  ASSERT_TRUE(model.Grow(*restored, ids[1], 200, 13, 3).ok());
  ASSERT_TRUE(model.Grow(*cache, b, 200, 13, 3).ok());
  EXPECT_EQ(ObservableBytes(*restored, ids[1]), ObservableBytes(*cache, b));

  // Another draft_slots is refused, naming it, and restores nothing.
  for (const int32_t other : {0, 4, 6}) {
    auto wrong = *Cache::Create(model.spec(), TinyOptions(other));
    const absl::Status s = RestoreSnapshot(*wrong, path).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << other;
    EXPECT_THAT(std::string(s.message()),
                HasSubstr("draft_slots is \"5\" in the snapshot but \"" + std::to_string(other) + "\" in this cache"));
    EXPECT_EQ(wrong->Usage().sequences, 0);
    EXPECT_EQ(wrong->Usage().used_bytes(), 0);
  }
  std::remove(path.c_str());
}

TEST(DraftSlots, AFileWithoutDraftSlotsIsRefusedByACacheWithThem) {
  // The checked-in sample (saved before draft slots existed) and a fresh
  // save of a cache without draft slots describe the same model; a cache
  // with draft slots refuses both.
  const TinyModel model(/*hca_by_kvc=*/false);
  auto plain = *Cache::Create(model.spec(), TinyOptions(0));
  const std::vector<SequenceId> ids = *RestoreSnapshot(*plain, KVC_SAMPLE_SNAPSHOT);
  const std::string path = TempPath("draft0.kvcsnap");
  ASSERT_TRUE(SaveSnapshot(*plain, ids, path).ok());
  EXPECT_EQ(ReadSnapshotInfo(path)->model_fingerprint, ReadSnapshotInfo(KVC_SAMPLE_SNAPSHOT)->model_fingerprint);
  for (const std::string& file : {std::string(KVC_SAMPLE_SNAPSHOT), path}) {
    auto drafted = *Cache::Create(model.spec(), TinyOptions(3));
    const absl::Status s = RestoreSnapshot(*drafted, file).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(s.message()), HasSubstr("draft_slots is \"0\" in the snapshot but \"3\" in this cache"));
    EXPECT_EQ(drafted->Usage().sequences, 0);
  }
  // A drafted cache's file has another fingerprint.
  auto drafted = *Cache::Create(model.spec(), TinyOptions(3));
  const SequenceId seq = *drafted->CreateSequence();
  ASSERT_TRUE(model.Grow(*drafted, seq, 40, 3).ok());
  const std::string drafted_path = TempPath("draft3.kvcsnap");
  ASSERT_TRUE(SaveSnapshot(*drafted, {seq}, drafted_path).ok());
  EXPECT_NE(ReadSnapshotInfo(drafted_path)->model_fingerprint, ReadSnapshotInfo(path)->model_fingerprint);
  std::remove(path.c_str());
  std::remove(drafted_path.c_str());
}

}  // namespace
}  // namespace kvc
