// Example: what an engine kernel sees. Every (layer, stream) of a cache is
// one array of equal pages (page b at base + b x page_bytes), and a sequence
// has one block table of int32 page ids per stream, the same for every layer
// of the stream (docs/layout.md). This program fills a sequence, forks it,
// extends the fork, and then reads every row of every stream of the fork
// through nothing but page arrays, block tables and row counts, checking each
// against the cache's own views.
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kvc/cache.h"
#include "kvc/row_kernels.h"

namespace {

std::vector<kvc::Bf16> Random(int64_t values, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<kvc::Bf16> out(static_cast<size_t>(values));
  for (kvc::Bf16& v : out) v = kvc::ToBf16(normal(rng));
  return out;
}

// One step over [at, to): window rows in every layer, and the compressed
// entries and index keys the engine's own compressor produced (this model
// carries no compressor parameters, so kvc takes them ready-made).
bool Step(kvc::Cache& cache, kvc::SequenceId seq, int64_t at, int64_t to, std::mt19937& rng) {
  for (int layer = 0; layer < static_cast<int>(cache.spec().layers.size()); ++layer) {
    if (!cache.Append(seq, layer, at, {Random((to - at) * kvc::kHeadDim, rng)}).ok()) return false;
    const kvc::LayerKind kind = cache.spec().layers[static_cast<size_t>(layer)].kind;
    if (kind == kvc::LayerKind::kWindow) continue;
    const int64_t ratio = kind == kvc::LayerKind::kCsa ? 4 : 128;
    const int64_t from = at / ratio, entries = to / ratio - from;
    if (!cache.AppendCompressedRows(seq, layer, from, Random(entries * kvc::kHeadDim, rng)).ok()) return false;
    if (kind == kvc::LayerKind::kCsa && !cache.AppendIndexKeys(seq, layer, from, Random(entries * kvc::kIndexDim, rng)).ok()) {
      return false;
    }
  }
  return true;
}

}  // namespace

int main() {
  kvc::ModelSpec spec = kvc::ModelSpec::V4Flash();
  spec.layers.resize(6);  // window, window, then CSA, HCA, CSA, HCA
  auto created = kvc::Cache::Create(spec);
  if (!created.ok()) {
    std::fprintf(stderr, "%s\n", created.status().ToString().c_str());
    return 1;
  }
  kvc::Cache& cache = **created;
  std::mt19937 rng(3);
  const kvc::SequenceId parent = *cache.CreateSequence();
  if (!Step(cache, parent, 0, 1000, rng)) return 1;
  const kvc::SequenceId fork = *cache.Fork(parent);  // history ids shared
  if (!Step(cache, fork, 1000, 1300, rng)) return 1;  // writes into shared pages: copied in every layer

  int64_t rows_read = 0, mismatches = 0;
  // The row streams (the compressor state streams hold fp32 rings, which
  // kvc's own compressor reads and writes).
  for (int s = 0; s <= static_cast<int>(kvc::Stream::kHcaRows); ++s) {
    const kvc::Stream stream = static_cast<kvc::Stream>(s);
    const std::vector<int32_t> ids = *cache.BlockTable(fork, stream);  // one table for all layers
    const std::vector<int32_t> parent_ids = *cache.BlockTable(parent, stream);
    int shared = 0;
    for (size_t k = 0; k < ids.size() && k < parent_ids.size(); ++k) shared += ids[k] == parent_ids[k];
    std::printf("%-9s %3zu pages (%d shared with the parent):", kvc::StreamName(stream), ids.size(), shared);
    for (int layer = 0; layer < static_cast<int>(spec.layers.size()); ++layer) {
      const absl::StatusOr<kvc::PageArray> pages = cache.LayerPages(layer, stream);
      if (!pages.ok()) continue;  // kNotFound: this layer has no such stream
      const kvc::PageArray a = *pages;
      const int64_t rows = *cache.StreamRows(fork, layer, stream);
      for (int64_t r = 0; r < rows; ++r) {
        // The engine's arithmetic: page ids[r / R], data then footer scales.
        const int64_t R = a.rows_per_page;
        const uint8_t* page = a.base + int64_t{ids[static_cast<size_t>(r / R)]} * a.page_bytes;
        const uint8_t* data = page + (r % R) * a.row_data_bytes;
        const uint8_t* scales = page + R * a.row_data_bytes + (r % R) * a.row_scale_bytes;
        // The cache's own view of the same row.
        kvc::ConstPackedRows view;
        if (stream == kvc::Stream::kWindow) {
          const kvc::WindowRingView ring = *cache.Window(fork, layer);  // row r = ring slot r
          view = ring.pages[static_cast<size_t>(r / ring.rows_per_page)].Slice(r % ring.rows_per_page, 1);
        } else {
          const kvc::HistoryView h = stream == kvc::Stream::kCsaKeys ? *cache.IndexKeys(fork, layer)
                                                                     : *cache.CompressedRows(fork, layer);
          view = h.pages[static_cast<size_t>(r / h.rows_per_page)].Slice(r % h.rows_per_page, 1);
        }
        mismatches += std::memcmp(data, view.row_data(0), static_cast<size_t>(a.row_data_bytes)) != 0 ||
                      std::memcmp(scales, view.row_scales(0), static_cast<size_t>(a.row_scale_bytes)) != 0;
        ++rows_read;
      }
      std::printf(" L%d=%lld", layer, static_cast<long long>(rows));
    }
    std::printf(" rows\n");
  }
  // A sparse kernel's indices: page_id x R + offset into the layer's arrays.
  std::vector<kvc::Bf16> q(static_cast<size_t>(spec.index_heads) * kvc::kIndexDim, kvc::ToBf16(0.1f));
  std::vector<float> w(static_cast<size_t>(spec.index_heads), 1.0f);
  const kvc::IndexQuery query = *cache.PrepareIndexQuery(1299, q, w);
  const kvc::AttentionSet set = *cache.SelectAttentionSet(fork, 2, &query);
  const kvc::PageArray rows = *cache.LayerPages(2, kvc::Stream::kCsaRows);
  for (size_t k = 0; k < set.compressed_indices.size(); ++k) {
    const int32_t x = set.compressed_indices[k];
    const uint8_t* row = rows.base + int64_t{x / rows.rows_per_page} * rows.page_bytes + int64_t{x % rows.rows_per_page} * rows.row_data_bytes;
    mismatches += row != set.rows[set.window_indices.size() + k].data;
  }
  std::printf("read %lld rows through page arrays and block tables; %zu window + %zu compressed indices; %lld mismatches\n",
              static_cast<long long>(rows_read), set.window_indices.size(), set.compressed_indices.size(),
              static_cast<long long>(mismatches));
  return mismatches == 0 ? 0 : 1;
}
