// The "engine" of page-manager tests: memory for every public array, and
// the writes and copies an engine makes through a StepPlan's slots and the
// copies kvc lists, with kvc's own kernels (so its bytes can be compared
// with kvc's). Used by tests/step_test.cc and tests/prefix_cache_test.cc.
#ifndef KVC_TESTS_TESTING_ENGINE_WRITER_H_
#define KVC_TESTS_TESTING_ENGINE_WRITER_H_

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/compressor.h"
#include "kvc/row_formats.h"
#include "kvc/row_kernels.h"
#include "src/compressor_run.h"
#include "tests/testing/tiny_model.h"

namespace kvc::testing {

// 64-byte aligned, zeroed engine memory for every public (layer, stream)
// array of the model.
struct EngineMemory {
  std::vector<std::unique_ptr<uint8_t[]>> storage;
  std::vector<EngineArray> arrays;
  EngineMemory(const ModelSpec& spec, const CacheOptions& options, int64_t pages) {
    const std::vector<StreamGeometry> geometry = Cache::PageGeometry(spec, options).value();
    for (const StreamGeometry& g : geometry) {
      for (const int32_t layer : g.layers) {
        const int64_t bytes = pages * g.page_bytes;
        storage.emplace_back(new uint8_t[static_cast<size_t>(bytes) + 64]());
        uint8_t* p = storage.back().get();
        p += (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64;
        arrays.push_back({layer, g.stream, absl::Span<uint8_t>(p, static_cast<size_t>(bytes))});
      }
    }
  }
};

// Row `slot` of an array, the way an engine kernel addresses it.
inline PackedRows RowAt(const PageArray& a, RowFormat format, int64_t slot) {
  return PageFooterRows(format, a.base + slot / a.rows_per_page * a.page_bytes, a.rows_per_page)
      .Slice(slot % a.rows_per_page, 1);
}

// The "engine": writes tokens [start, start + n) of `layer` of request b of
// `plan` through the plan's slots, computing the compressed entries and
// index keys with kvc's compressor kernels over the state rows it keeps in
// the compressor state pages, exactly as kvc's own Append would.
inline void EngineWrite(const Cache& cache, const TinyModel& model, const StepPlan& plan, size_t b, int layer, uint64_t seed) {
  const int64_t start = plan.first_position[b], n = plan.new_tokens[b];
  const TinyModel::Inputs in = model.InputsFor(layer, start, n, seed);
  auto slots = [&](Stream s) {
    const StepSlots& st = plan.slots[static_cast<int>(s)];
    return std::vector<int64_t>(st.slots.begin() + st.indptr[b], st.slots.begin() + st.indptr[b + 1]);
  };
  const PageArray window = *cache.LayerPages(layer, Stream::kWindow);
  const std::vector<int64_t> window_slots = slots(Stream::kWindow);
  ASSERT_EQ(static_cast<int64_t>(window_slots.size()), n);
  for (int64_t i = 0; i < n; ++i) {
    if (window_slots[static_cast<size_t>(i)] < 0) continue;
    ASSERT_TRUE(QuantizeKvRows(absl::MakeConstSpan(in.window).subspan(static_cast<size_t>(i * kHeadDim), kHeadDim),
                               RowAt(window, RowFormat::kKvFp8, window_slots[static_cast<size_t>(i)]))
                    .ok());
  }
  const LayerSpec& l = cache.spec().layers[static_cast<size_t>(layer)];
  if (l.kind == LayerKind::kWindow) return;
  const bool csa = l.kind == LayerKind::kCsa;
  const SequenceId seq = plan.seqs[b];
  auto run_for = [&](bool indexer) {
    const Stream state_stream = indexer ? Stream::kCsaIndexerState : csa ? Stream::kCsaState : Stream::kHcaState;
    const PageArray state = *cache.LayerPages(layer, state_stream);
    const int32_t page = (*cache.BlockTable(seq, state_stream))[0];
    // The plan's state slots name rows of that page: position t at t mod capacity.
    const std::vector<int64_t> state_slots = slots(state_stream);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t slot = state_slots[static_cast<size_t>(i)];
      if (slot >= 0) {
        EXPECT_EQ(slot, int64_t{page} * state.rows_per_page + (start + i) % state.rows_per_page);
      }
    }
    CompressorRun run;
    run.g = indexer ? IndexerCompressor(cache.spec().index_dim) : MainCompressor(l.kind, cache.spec().head_dim);
    run.params = indexer ? &l.indexer : &l.compressor;
    run.state = reinterpret_cast<float*>(state.base + int64_t{page} * state.page_bytes);
    run.capacity = state.rows_per_page;
    run.kv = indexer ? in.ikv.data() : in.kv.data();
    run.score = indexer ? in.iscore.data() : in.score.data();
    run.first = start;
    run.layer = layer;
    run.indexer = indexer;
    run.norm_eps = static_cast<float>(cache.spec().norm_eps);
    return run;
  };
  const CompressorRun main = run_for(false);
  CompressorRun indexer;
  if (csa) indexer = run_for(true);
  const int ratio = main.g.ratio;
  const int64_t closed = (start + n) / ratio - start / ratio;
  std::vector<Bf16> entries(static_cast<size_t>(closed * kHeadDim)), keys(static_cast<size_t>(closed * kIndexDim));
  const RopeTable rope(cache.spec().compressed_rope);
  const RopeRows rope_rows(rope, start / ratio * ratio, start + n, ratio);
  ASSERT_TRUE(CheckScorePlusApe(main, 0, n).ok());
  ASSERT_TRUE(ComputeEntries(main, csa ? &indexer : nullptr, rope_rows, start, start + n, absl::MakeSpan(entries),
                             absl::MakeSpan(keys))
                  .ok());
  WriteState(main, n);
  if (csa) WriteState(indexer, n);
  const Stream rows_stream = csa ? Stream::kCsaRows : Stream::kHcaRows;
  const PageArray rows = *cache.LayerPages(layer, rows_stream);
  const std::vector<int64_t> row_slots = slots(rows_stream);
  ASSERT_EQ(static_cast<int64_t>(row_slots.size()), closed);
  for (int64_t k = 0; k < closed; ++k) {
    ASSERT_TRUE(QuantizeKvRows(absl::MakeConstSpan(entries).subspan(static_cast<size_t>(k * kHeadDim), kHeadDim),
                               RowAt(rows, RowFormat::kKvFp8, row_slots[static_cast<size_t>(k)]))
                    .ok());
  }
  if (!csa) return;
  const PageArray key_pages = *cache.LayerPages(layer, Stream::kCsaKeys);
  const std::vector<int64_t> key_slots = slots(Stream::kCsaKeys);
  ASSERT_EQ(static_cast<int64_t>(key_slots.size()), closed);
  for (int64_t k = 0; k < closed; ++k) {
    ASSERT_TRUE(QuantizeIndexKeys(absl::MakeConstSpan(keys).subspan(static_cast<size_t>(k * kIndexDim), kIndexDim),
                                  RowAt(key_pages, RowFormat::kIndexFp4, key_slots[static_cast<size_t>(k)]))
                    .ok());
  }
}

// Makes the page copies kvc listed, in every layer's array of the stream.
inline void EngineCopy(const Cache& cache, const std::vector<PageCopy>& copies) {
  for (const PageCopy& c : copies) {
    for (int layer = 0; layer < static_cast<int>(cache.spec().layers.size()); ++layer) {
      const absl::StatusOr<PageArray> a = cache.LayerPages(layer, c.stream);
      if (!a.ok()) continue;
      std::memmove(a->base + int64_t{c.dst} * a->page_bytes, a->base + int64_t{c.src} * a->page_bytes,
                   static_cast<size_t>(a->page_bytes));
    }
  }
}

}  // namespace kvc::testing

#endif  // KVC_TESTS_TESTING_ENGINE_WRITER_H_
