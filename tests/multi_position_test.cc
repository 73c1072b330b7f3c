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

// --- Selecting for several positions ----------------------------------------

// A sequence's history as segments: positions [previous end, end) of every
// layer come from TinyModel inputs of `seed`.
struct Segment {
  int64_t end;
  uint64_t seed;
};

// Grows `seq` (every layer) to `to` tokens along `history`.
absl::Status GrowAlong(const TinyModel& model, Cache& cache, SequenceId seq, const std::vector<Segment>& history,
                       int64_t to, int64_t chunk = 37) {
  for (const Segment& s : history) {
    const absl::Status grown = model.Grow(cache, seq, std::min(s.end, to), s.seed, chunk);
    if (!grown.ok() || s.end >= to) return grown;
  }
  return absl::OkStatus();
}

// The index query of position t: q and weights drawn from two distributions
// (odd positions: heavy-tailed q and some negative weights).
struct Queries {
  const Cache* cache;
  std::vector<IndexQuery> prepared;  // by position - base
  int64_t base = 0;

  Queries(const Cache& c, int64_t first, int64_t count) : cache(&c), base(first) {
    const int heads = c.spec().index_heads;
    for (int64_t t = first; t < first + count; ++t) {
      std::mt19937 rng(static_cast<uint32_t>(1000 + t));
      std::normal_distribution<float> normal(0.0f, 1.0f);
      std::cauchy_distribution<float> cauchy(0.0f, 0.5f);
      std::vector<Bf16> q(static_cast<size_t>(heads) * kIndexDim);
      for (Bf16& v : q) v = ToBf16(t % 2 == 1 ? std::clamp(cauchy(rng), -1e4f, 1e4f) : normal(rng));
      std::vector<float> w(static_cast<size_t>(heads));
      for (int h = 0; h < heads; ++h) w[static_cast<size_t>(h)] = t % 2 == 1 && h % 3 == 0 ? -0.2f : 0.1f + 0.01f * static_cast<float>(h);
      prepared.push_back(*c.PrepareIndexQuery(t, q, w));
    }
  }
  std::vector<const IndexQuery*> Pointers() const {
    std::vector<const IndexQuery*> out;
    for (const IndexQuery& q : prepared) out.push_back(&q);
    return out;
  }
  const IndexQuery& At(int64_t t) const { return prepared[static_cast<size_t>(t - base)]; }
};

// Row `index` of a layer's page array: its 576 data and 8 scale bytes.
std::vector<uint8_t> ArrayRow(const PageArray& a, int32_t index) {
  const uint8_t* page = a.base + int64_t{index / a.rows_per_page} * a.page_bytes;
  const uint8_t* data = page + int64_t{index % a.rows_per_page} * a.row_data_bytes;
  const uint8_t* scales = page + int64_t{a.rows_per_page} * a.row_data_bytes + int64_t{index % a.rows_per_page} * a.row_scale_bytes;
  std::vector<uint8_t> row(data, data + a.row_data_bytes);
  row.insert(row.end(), scales, scales + a.row_scale_bytes);
  return row;
}
std::vector<uint8_t> RefRow(const RowRef& r) {
  std::vector<uint8_t> row(r.data, r.data + 576);
  row.insert(row.end(), r.scales, r.scales + 8);
  return row;
}

// Checks `sets` (selected in `cache` for a sequence whose layer `layer`
// holds `length` tokens) against the decode route: a fresh sequence of a
// cache without draft slots grown along `history` to each position t + 1,
// where SelectAttentionSet selects for its last position t.
void ExpectTheDecodeRoute(const TinyModel& model, const Cache& cache, int layer, int64_t length,
                          const PositionSets& sets, const std::vector<Segment>& history, const Queries& queries,
                          const std::string& what) {
  auto reference = *Cache::Create(model.spec(), TinyOptions(0));
  const SequenceId ref = *reference->CreateSequence();
  const int64_t W = cache.spec().window;
  const int64_t R = W + cache.options().draft_slots;
  const LayerKind kind = cache.spec().layers[static_cast<size_t>(layer)].kind;
  const PageArray window = *cache.LayerPages(layer, Stream::kWindow);
  const absl::StatusOr<PageArray> rows =
      cache.LayerPages(layer, kind == LayerKind::kCsa ? Stream::kCsaRows : Stream::kHcaRows);
  ASSERT_EQ(sets.window_offsets.size(), sets.compressed_offsets.size());
  ASSERT_EQ(sets.window_positions.size(), sets.window_indices.size());
  ASSERT_EQ(sets.entries.size(), sets.compressed_indices.size());
  for (int64_t i = 0; i < sets.count(); ++i) {
    const int64_t t = sets.first + i;
    ASSERT_TRUE(GrowAlong(model, *reference, ref, history, t + 1, 5).ok());
    const AttentionSet want = *reference->SelectAttentionSet(ref, layer, kind == LayerKind::kCsa ? &queries.At(t) : nullptr);
    const std::string at = what + ", layer " + std::to_string(layer) + ", position " + std::to_string(t);
    // Window: positions max(0, t - W + 1) .. t, rows as the decode route stored them.
    const int64_t w0 = sets.window_offsets[static_cast<size_t>(i)], w1 = sets.window_offsets[static_cast<size_t>(i) + 1];
    const int64_t windowed = std::min(t + 1, W);
    ASSERT_EQ(w1 - w0, windowed) << at;
    for (int64_t k = 0; k < windowed; ++k) {
      const int64_t p = sets.window_positions[static_cast<size_t>(w0 + k)];
      const int32_t index = sets.window_indices[static_cast<size_t>(w0 + k)];
      ASSERT_EQ(p, t - windowed + 1 + k) << at;
      ASSERT_EQ(want.indices[static_cast<size_t>(k)], p % W) << at;  // the decode route's slot of p
      if (p < length - R) {
        EXPECT_EQ(index, -1) << at << ": window position " << p << " is no longer in the ring";
      } else {
        ASSERT_GE(index, 0) << at << ": window position " << p << " is in the ring";
        EXPECT_EQ(ArrayRow(window, index), RefRow(want.rows[static_cast<size_t>(k)])) << at << ": window position " << p;
      }
    }
    // Compressed entries: the decode route's, rows byte for byte.
    const int64_t c0 = sets.compressed_offsets[static_cast<size_t>(i)], c1 = sets.compressed_offsets[static_cast<size_t>(i) + 1];
    std::vector<int64_t> want_entries;
    for (size_t k = static_cast<size_t>(windowed); k < want.indices.size(); ++k) want_entries.push_back(want.indices[k] - W);
    const std::vector<int64_t> got(sets.entries.begin() + c0, sets.entries.begin() + c1);
    ASSERT_EQ(got, want_entries) << at;
    for (int64_t k = 0; k < c1 - c0; ++k) {
      ASSERT_TRUE(rows.ok());
      EXPECT_EQ(ArrayRow(*rows, sets.compressed_indices[static_cast<size_t>(c0 + k)]),
                RefRow(want.rows[static_cast<size_t>(windowed + k)]))
          << at << ": entry " << got[static_cast<size_t>(k)];
    }
  }
}

// Selects positions [first, first + count) of every layer of `seq` and
// checks each against the decode route.
void CheckEveryLayer(const TinyModel& model, const Cache& cache, SequenceId seq, int64_t first, int64_t count,
                     const std::vector<Segment>& history, const std::string& what) {
  const Queries queries(cache, first, count);
  const std::vector<const IndexQuery*> pointers = queries.Pointers();
  for (int layer = 0; layer < 3; ++layer) {
    const bool csa = layer == TinyModel::kCsaLayer;
    const absl::StatusOr<PositionSets> sets =
        cache.SelectAttentionSets(seq, layer, first, count, csa ? absl::MakeConstSpan(pointers) : absl::Span<const IndexQuery* const>());
    ASSERT_TRUE(sets.ok()) << what << ": " << sets.status();
    ASSERT_EQ(sets->count(), count);
    ExpectTheDecodeRoute(model, cache, layer, *cache.Length(seq, layer), *sets, history, queries, what);
  }
}

TEST(SelectAttentionSets, AVerifyStepGivesEachDraftItsDecodeSet) {
  const TinyModel model;
  for (const int32_t draft : {0, 3, 8}) {
    auto cache = *Cache::Create(model.spec(), TinyOptions(draft));
    const SequenceId seq = *cache->CreateSequence();
    const std::vector<Segment> history = {{1000, 21}};
    ASSERT_TRUE(GrowAlong(model, *cache, seq, history, 150).ok());
    // Verify steps of 1..5 drafts: append them, then select for all.
    int64_t at = 150;
    for (const int64_t drafts : {4, 1, 5, 2}) {
      ASSERT_TRUE(GrowAlong(model, *cache, seq, history, at + drafts).ok());
      CheckEveryLayer(model, *cache, seq, at, drafts, history, "draft_slots " + std::to_string(draft) + ", verify at " + std::to_string(at));
      at += drafts;
    }
    // Positions further back than the last draft_slots + 1 (some rows -1).
    CheckEveryLayer(model, *cache, seq, at - 30, 30, history, "draft_slots " + std::to_string(draft) + ", 30 back");
  }
}

TEST(SelectAttentionSets, APrefillChunkGivesEveryPositionItsCausalSet) {
  const TinyModel model;
  const std::vector<Segment> history = {{1000, 22}};
  for (const int32_t draft : {0, 5}) {
    auto cache = *Cache::Create(model.spec(), TinyOptions(draft));
    // One chunk from 0 (entries of CSA and one HCA window close inside it).
    const SequenceId seq = *cache->CreateSequence();
    ASSERT_TRUE(GrowAlong(model, *cache, seq, history, 140, 140).ok());
    CheckEveryLayer(model, *cache, seq, 0, 140, history, "prefill of 140, draft_slots " + std::to_string(draft));
    // A second chunk after it: its first positions see rows of the first.
    ASSERT_TRUE(GrowAlong(model, *cache, seq, history, 160, 20).ok());
    CheckEveryLayer(model, *cache, seq, 140, 20, history, "chunk 140..160, draft_slots " + std::to_string(draft));
  }
}

TEST(SelectAttentionSets, AfterForksTruncationAndRestoreAsBefore) {
  const TinyModel model;
  for (const int32_t draft : {0, 4}) {
    const std::string what = "draft_slots " + std::to_string(draft);
    auto cache = *Cache::Create(model.spec(), TinyOptions(draft));
    const SequenceId parent = *cache->CreateSequence();
    ASSERT_TRUE(GrowAlong(model, *cache, parent, {{1000, 31}}, 140).ok());
    // A fork drafting something else shares the parent's history pages.
    const SequenceId fork = *cache->Fork(parent);
    const std::vector<Segment> forked = {{140, 31}, {1000, 32}};
    ASSERT_TRUE(GrowAlong(model, *cache, fork, forked, 144).ok());
    CheckEveryLayer(model, *cache, fork, 140, 4, forked, what + ", fork");
    // Rejected drafts: truncate, then accept others.
    ASSERT_TRUE(cache->Truncate(fork, 141).ok());
    const std::vector<Segment> redrafted = {{140, 31}, {141, 32}, {1000, 33}};
    ASSERT_TRUE(GrowAlong(model, *cache, fork, redrafted, 145).ok());
    CheckEveryLayer(model, *cache, fork, 141, 4, redrafted, what + ", after truncation");
    // The parent is untouched by its fork.
    ASSERT_TRUE(GrowAlong(model, *cache, parent, {{1000, 31}}, 143).ok());
    CheckEveryLayer(model, *cache, parent, 139, 4, {{1000, 31}}, what + ", parent");
    // Restored from a snapshot.
    const std::string path = TempPath("select_" + std::to_string(draft) + ".kvcsnap");
    ASSERT_TRUE(SaveSnapshot(*cache, {fork}, path).ok());
    auto restored = *Cache::Create(model.spec(), TinyOptions(draft));
    const SequenceId copy = (*RestoreSnapshot(*restored, path))[0];
    std::remove(path.c_str());
    CheckEveryLayer(model, *restored, copy, 141, 4, redrafted, what + ", restored");
    ASSERT_TRUE(GrowAlong(model, *restored, copy, redrafted, 149).ok());
    CheckEveryLayer(model, *restored, copy, 145, 4, redrafted, what + ", restored, next step");
  }
}

TEST(SelectAttentionSets, RefusalsNameWhatIsWrongAndChangeNothing) {
  const TinyModel model;
  auto cache = *Cache::Create(model.spec(), TinyOptions(3));
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 60, 41).ok());
  const Queries queries(*cache, 56, 4);
  const std::vector<const IndexQuery*> four = queries.Pointers();
  const std::string bytes_before = ObservableBytes(*cache, seq);
  const int64_t used_before = cache->Usage().used_bytes();
  SelectionScratch scratch;
  PositionSets kept = *cache->SelectAttentionSets(seq, TinyModel::kCsaLayer, 56, 4, four);
  const PositionSets snapshot = kept;
  auto expect_refused = [&](int layer, int64_t first, int64_t count, absl::Span<const IndexQuery* const> q,
                            absl::StatusCode code, const std::string& message, SequenceId id) {
    const absl::Status s = cache->SelectAttentionSets(id, layer, first, count, q, &scratch, &kept);
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(message));
    EXPECT_EQ(kept.entries, snapshot.entries);  // *out unchanged
    EXPECT_EQ(kept.window_indices, snapshot.window_indices);
    EXPECT_EQ(kept.first, snapshot.first);
    EXPECT_EQ(ObservableBytes(*cache, seq), bytes_before);
    EXPECT_EQ(cache->Usage().used_bytes(), used_before);
  };
  using absl::StatusCode;
  const int csa = TinyModel::kCsaLayer, hca = TinyModel::kHcaLayer, win = TinyModel::kWindowLayer;
  expect_refused(csa, 58, 4, four, StatusCode::kOutOfRange, "positions [58, 58 + 4) of layer 1, which holds 60 tokens: position 60 is not in it", seq);
  expect_refused(win, 60, 1, {}, StatusCode::kOutOfRange, "position 60 is not in it", seq);
  expect_refused(hca, 61, 0, {}, StatusCode::kOutOfRange, "position 61 is not in it", seq);
  expect_refused(hca, INT64_MAX, 2, {}, StatusCode::kOutOfRange, "holds 60 tokens", seq);
  expect_refused(hca, 59, INT64_MAX, {}, StatusCode::kOutOfRange, "position 60 is not in it", seq);
  expect_refused(hca, -1, 2, {}, StatusCode::kInvalidArgument, "first -1 and count 2 must be >= 0", seq);
  expect_refused(hca, 3, -2, {}, StatusCode::kInvalidArgument, "first 3 and count -2 must be >= 0", seq);
  expect_refused(csa, 56, 4, {}, StatusCode::kInvalidArgument, "layer 1 is a CSA layer: it needs one index query per position, 4, not 0", seq);
  expect_refused(csa, 56, 3, four, StatusCode::kInvalidArgument, "one index query per position, 3, not 4", seq);
  const std::vector<const IndexQuery*> holey = {four[0], four[1], nullptr, four[3]};
  expect_refused(csa, 56, 4, holey, StatusCode::kInvalidArgument, "query 2 (position 58) is missing", seq);
  expect_refused(hca, 56, 4, absl::MakeConstSpan(four).first(2), StatusCode::kInvalidArgument,
                 "2 index queries for 4 positions (layer 2 uses none", seq);
  expect_refused(3, 56, 4, four, StatusCode::kInvalidArgument, "layer 3 is outside [0, 3)", seq);
  expect_refused(csa, 56, 4, four, StatusCode::kNotFound, "no sequence", seq + 100);
  // Queries on a non-CSA layer: none, or one per position (ignored).
  EXPECT_TRUE(cache->SelectAttentionSets(seq, hca, 56, 4, four).ok());
  EXPECT_EQ(cache->SelectAttentionSets(seq, hca, 56, 4, four)->entries, cache->SelectAttentionSets(seq, hca, 56, 4)->entries);
  // No positions: empty sets.
  const PositionSets none = *cache->SelectAttentionSets(seq, csa, 60, 0, {});
  EXPECT_EQ(none.count(), 0);
  EXPECT_EQ(none.window_offsets, std::vector<int64_t>{0});
  EXPECT_EQ(none.compressed_offsets, std::vector<int64_t>{0});
  const SequenceId empty = *cache->CreateSequence();
  EXPECT_EQ(cache->SelectAttentionSets(empty, win, 0, 1).status().code(), StatusCode::kOutOfRange);
  EXPECT_TRUE(cache->SelectAttentionSets(empty, win, 0, 0).ok());
}

TEST(SelectAttentionSets, MidStepLayersAnswerForTheirOwnLength) {
  // Layer 0 has the verify step's tokens, layer 1 not yet: each layer is
  // selected against what it holds.
  const TinyModel model;
  auto cache = *Cache::Create(model.spec(), TinyOptions(3));
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 100, 51).ok());
  ASSERT_TRUE(model.AppendLayer(*cache, seq, TinyModel::kWindowLayer, 100, 4, 51).ok());
  EXPECT_TRUE(cache->SelectAttentionSets(seq, TinyModel::kWindowLayer, 100, 4).ok());
  const Queries queries(*cache, 100, 4);
  EXPECT_EQ(cache->SelectAttentionSets(seq, TinyModel::kCsaLayer, 100, 4, queries.Pointers()).status().code(),
            absl::StatusCode::kOutOfRange);
}

// Checks each window and compressed index of `sets` against the block-table
// formula of `cache` (ring slot p mod R; entry j), and the -1 rule: a window
// position is -1 exactly when it is below `oldest`.
void ExpectTheTableFormula(const Cache& cache, SequenceId seq, const PositionSets& sets, int64_t oldest,
                           const std::string& what) {
  const int64_t R = cache.spec().window + cache.options().draft_slots;
  const int64_t B = cache.options().rows_per_page;
  const std::vector<int32_t> ring = *cache.BlockTable(seq, Stream::kWindow);
  for (size_t k = 0; k < sets.window_positions.size(); ++k) {
    const int64_t p = sets.window_positions[k];
    const int64_t slot = p % R;
    EXPECT_EQ(sets.window_indices[k], p < oldest ? -1 : ring[static_cast<size_t>(slot / B)] * B + slot % B)
        << what << ": window position " << p;
  }
  if (sets.entries.empty()) return;
  const std::vector<int32_t> rows = *cache.BlockTable(seq, Stream::kHcaRows);
  for (size_t k = 0; k < sets.entries.size(); ++k) {
    const int64_t j = sets.entries[k];
    EXPECT_EQ(sets.compressed_indices[k], rows[static_cast<size_t>(j / B)] * B + j % B) << what << ": entry " << j;
  }
}

TEST(SelectAttentionSets, PageManagerModeGivesIndicesOnlyAndCountsTheOpenStep) {
  const TinyModel model;
  CacheOptions options = TinyOptions(4);  // draft_slots >= rollback_depth (4)
  options.page_manager = true;
  auto managed = *Cache::Create(model.spec(), options);  // no arrays at all: kvc reads no byte
  auto writing = *Cache::Create(model.spec(), TinyOptions(4));
  const SequenceId a = *managed->CreateSequence(), b = *writing->CreateSequence();
  for (int64_t at = 0; at < 300; at += 50) {
    const StepPlan plan = *managed->PlanStep({{a, 50}});
    ASSERT_TRUE(managed->CommitStep(plan.epoch).ok());
    ASSERT_TRUE(managed->CompleteSteps(plan.epoch).ok());
  }
  ASSERT_TRUE(model.Grow(*writing, b, 300, 61).ok());
  const int win = TinyModel::kWindowLayer, hca = TinyModel::kHcaLayer;
  // A verify step of four, planned and not yet committed: its positions count.
  const StepPlan verify = *managed->PlanStep({{a, 4}});
  ASSERT_TRUE(model.Grow(*writing, b, 304, 61).ok());
  for (const int layer : {win, hca}) {
    const PositionSets x = *managed->SelectAttentionSets(a, layer, 300, 4);
    const PositionSets y = *writing->SelectAttentionSets(b, layer, 300, 4);
    EXPECT_EQ(x.window_offsets, y.window_offsets);
    EXPECT_EQ(x.window_positions, y.window_positions);
    EXPECT_EQ(x.compressed_offsets, y.compressed_offsets);
    EXPECT_EQ(x.entries, y.entries);  // HCA: entries 0 and 1 (the step closes none)
    ExpectTheTableFormula(*managed, a, x, 0, "open step, layer " + std::to_string(layer));
  }
  EXPECT_EQ(managed->SelectAttentionSets(a, hca, 300, 4)->entries.size(), 8u);  // 2 entries x 4 positions
  EXPECT_EQ(managed->SelectAttentionSets(a, win, 300, 5).status().code(), absl::StatusCode::kOutOfRange);
  const Queries queries(*managed, 300, 4);
  const absl::Status csa = managed->SelectAttentionSets(a, TinyModel::kCsaLayer, 300, 4, queries.Pointers()).status();
  EXPECT_EQ(csa.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(csa.message()), HasSubstr("page-manager mode"));
  ASSERT_TRUE(managed->CommitStep(verify.epoch).ok());
  EXPECT_EQ(managed->SelectAttentionSets(a, hca, 300, 4)->entries, writing->SelectAttentionSets(b, hca, 300, 4)->entries);

  // Rejected drafts: truncate by 3. kvc's mode puts the evicted rows back;
  // in page-manager mode the ring keeps the drafts' rows, so it holds
  // positions from 304 - 20 on only, until the sequence grows past 304.
  ASSERT_TRUE(managed->Truncate(a, 301).ok());
  ASSERT_TRUE(writing->Truncate(b, 301).ok());
  const PositionSets x = *managed->SelectAttentionSets(a, win, 280, 21);
  const PositionSets y = *writing->SelectAttentionSets(b, win, 280, 21);
  EXPECT_EQ(x.window_positions, y.window_positions);
  ExpectTheTableFormula(*managed, a, x, 304 - 20, "page-manager mode after a truncation");
  ExpectTheTableFormula(*writing, b, y, 301 - 20, "kvc's mode after a truncation");
  EXPECT_TRUE(std::count(x.window_indices.begin(), x.window_indices.end(), -1) >
              std::count(y.window_indices.begin(), y.window_indices.end(), -1));
}

}  // namespace
}  // namespace kvc
