// The decode path allocates nothing per call: with caller-kept buffers
// (IndexQuery, SelectionScratch, AttentionSet), a second selection of every
// layer calls no operator new. Its own binary: it replaces the global
// operator new to count.
#include <atomic>
#include <cstdlib>
#include <new>
#include <vector>

#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/indexer.h"
#include "tests/testing/tiny_model.h"

namespace {
std::atomic<int64_t> g_allocations{0};
}  // namespace

// Not inlined: GCC would otherwise pair its built-in knowledge of new with
// the free() below and warn (-Wmismatched-new-delete).
[[gnu::noinline]] void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void* operator new[](std::size_t n) { return operator new(n); }
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace kvc {
namespace {

TEST(DecodeAllocTest, SelectionWithKeptScratchAllocatesNothing) {
  const testing::TinyModel model;
  auto cache = *Cache::Create(model.spec(), CacheOptions{});
  const SequenceId seq = *cache->CreateSequence();
  // Enough tokens for more CSA entries than index_topk (8) and a few HCA entries.
  ASSERT_TRUE(model.Grow(*cache, seq, 700, /*seed=*/3).ok());
  constexpr int kHeads = 4;
  const std::vector<float> q_f = testing::DetValues(77, kHeads * kIndexDim, 1.0f);
  std::vector<Bf16> q_raw(q_f.size());
  for (size_t i = 0; i < q_f.size(); ++i) q_raw[i] = ToBf16(q_f[i]);
  const std::vector<float> weights(kHeads, 0.25f);

  IndexQuery query;
  SelectionScratch scratch;
  AttentionSet set;
  auto step = [&]() {
    for (int layer = 0; layer < static_cast<int>(model.spec().layers.size()); ++layer) {
      const bool csa = model.spec().layers[static_cast<size_t>(layer)].kind == LayerKind::kCsa;
      if (csa) {
        ASSERT_TRUE(cache->PrepareIndexQuery(699, q_raw, weights, &query).ok());
      }
      ASSERT_TRUE(cache->SelectAttentionSet(seq, layer, csa ? &query : nullptr, &scratch, &set).ok());
    }
  };
  const int64_t warm = g_allocations.load();
  step();  // grows the buffers
  ASSERT_GT(g_allocations.load() - warm, 0) << "the counting operator new is not in use";
  const size_t rows_capacity = set.rows.capacity(), scores_capacity = scratch.scores.capacity();
  const int64_t before = g_allocations.load();
  step();
  EXPECT_EQ(g_allocations.load() - before, 0);
  EXPECT_EQ(set.rows.capacity(), rows_capacity);
  EXPECT_EQ(scratch.scores.capacity(), scores_capacity);

  // And the kept-buffer form selects what the allocating form selects.
  for (int layer = 0; layer < static_cast<int>(model.spec().layers.size()); ++layer) {
    const bool csa = model.spec().layers[static_cast<size_t>(layer)].kind == LayerKind::kCsa;
    const IndexQuery fresh = *cache->PrepareIndexQuery(699, q_raw, weights);
    std::vector<float> scores;
    const AttentionSet expected = *cache->SelectAttentionSet(seq, layer, csa ? &fresh : nullptr, &scores);
    if (csa) {
      ASSERT_TRUE(cache->PrepareIndexQuery(699, q_raw, weights, &query).ok());
    }
    ASSERT_TRUE(cache->SelectAttentionSet(seq, layer, csa ? &query : nullptr, &scratch, &set).ok());
    EXPECT_EQ(set.indices, expected.indices) << "layer " << layer;
    EXPECT_EQ(set.window_indices, expected.window_indices);
    EXPECT_EQ(set.compressed_indices, expected.compressed_indices);
    if (csa) {
      EXPECT_EQ(scratch.scores, scores);
      EXPECT_GT(set.compressed_indices.size(), 0u);
    }
  }
}

// A verify step's selection (SelectAttentionSets, four positions) with kept
// scratch and PositionSets allocates nothing the second time either.
TEST(DecodeAllocTest, MultiPositionSelectionWithKeptBuffersAllocatesNothing) {
  const testing::TinyModel model;
  CacheOptions options;
  options.draft_slots = 3;
  auto cache = *Cache::Create(model.spec(), options);
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 700, /*seed=*/4).ok());
  constexpr int kHeads = 4;
  std::vector<IndexQuery> queries(4);
  std::vector<const IndexQuery*> pointers;
  for (int i = 0; i < 4; ++i) {
    const std::vector<float> q_f = testing::DetValues(80 + static_cast<uint64_t>(i), kHeads * kIndexDim, 1.0f);
    std::vector<Bf16> q_raw(q_f.size());
    for (size_t k = 0; k < q_f.size(); ++k) q_raw[k] = ToBf16(q_f[k]);
    ASSERT_TRUE(cache->PrepareIndexQuery(696 + i, q_raw, std::vector<float>(kHeads, 0.25f), &queries[static_cast<size_t>(i)]).ok());
    pointers.push_back(&queries[static_cast<size_t>(i)]);
  }
  SelectionScratch scratch;
  PositionSets sets;
  auto step = [&]() {
    for (int layer = 0; layer < static_cast<int>(model.spec().layers.size()); ++layer) {
      const bool csa = model.spec().layers[static_cast<size_t>(layer)].kind == LayerKind::kCsa;
      ASSERT_TRUE(cache->SelectAttentionSets(seq, layer, 696, 4, csa ? absl::MakeConstSpan(pointers)
                                                                   : absl::Span<const IndexQuery* const>(),
                                             &scratch, &sets).ok());
    }
  };
  step();  // grows the buffers
  const int64_t before = g_allocations.load();
  step();
  EXPECT_EQ(g_allocations.load() - before, 0);
  // The kept-buffer form selects what the allocating form selects.
  const PositionSets expected = *cache->SelectAttentionSets(seq, testing::TinyModel::kHcaLayer, 696, 4);
  EXPECT_EQ(sets.entries, expected.entries);  // the last layer stepped is the HCA layer
  EXPECT_EQ(sets.window_indices, expected.window_indices);
  EXPECT_GT(sets.entries.size(), 0u);
}

}  // namespace
}  // namespace kvc
