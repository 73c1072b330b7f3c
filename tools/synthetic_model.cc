#include "tools/synthetic_model.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kvc/row_kernels.h"
#include "src/status.h"

namespace kvc::tools {
namespace {

std::vector<float> Random(size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

SyntheticModel::SyntheticModel(ModelSpec spec, int64_t chunk_tokens) : spec_(std::move(spec)), chunk_(chunk_tokens) {
  std::mt19937 rng(1);
  const size_t c = static_cast<size_t>(chunk_);
  csa_ape_ = Random(4 * 1024, rng, 0.5f);
  idx_ape_ = Random(4 * 256, rng, 0.5f);
  hca_ape_ = Random(128 * 512, rng, 0.5f);
  ones_.assign(512, 1.0f);
  const std::vector<float> rows = Random(c * kHeadDim, rng, 1.0f);
  rows_.resize(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) rows_[i] = ToBf16(rows[i]);
  bool csa = false, hca = false;
  for (LayerSpec& l : spec_.layers) {
    if (l.kind == LayerKind::kCsa) {
      l.compressor = {csa_ape_, ones_};
      l.indexer = {idx_ape_, absl::MakeConstSpan(ones_).first(128)};
      csa = true;
    } else if (l.kind == LayerKind::kHca) {
      l.compressor = {hca_ape_, ones_};
      hca = true;
    }
  }
  if (csa) {
    csa_kv_ = Random(c * 1024, rng, 1.0f);
    csa_score_ = Random(c * 1024, rng, 2.0f);
    idx_kv_ = Random(c * 256, rng, 1.0f);
    idx_score_ = Random(c * 256, rng, 2.0f);
  }
  if (hca) {
    hca_kv_ = Random(c * 512, rng, 1.0f);
    hca_score_ = Random(c * 512, rng, 2.0f);
  }
  const std::vector<float> q = Random(static_cast<size_t>(spec_.index_heads) * kIndexDim, rng, 1.0f);
  index_q_.resize(q.size());
  for (size_t i = 0; i < q.size(); ++i) index_q_[i] = ToBf16(q[i]);
  index_w_.assign(static_cast<size_t>(spec_.index_heads), 0.02f);
}

absl::Status SyntheticModel::Append(Cache& cache, SequenceId seq, int64_t first, int64_t n) const {
  const size_t un = static_cast<size_t>(n);
  for (size_t layer = 0; layer < spec_.layers.size(); ++layer) {
    LayerTokens t;
    t.window_rows = absl::MakeConstSpan(rows_).first(un * kHeadDim);
    if (spec_.layers[layer].kind == LayerKind::kCsa) {
      t.compressor_kv = absl::MakeConstSpan(csa_kv_).first(un * 1024);
      t.compressor_score = absl::MakeConstSpan(csa_score_).first(un * 1024);
      t.indexer_kv = absl::MakeConstSpan(idx_kv_).first(un * 256);
      t.indexer_score = absl::MakeConstSpan(idx_score_).first(un * 256);
    } else if (spec_.layers[layer].kind == LayerKind::kHca) {
      t.compressor_kv = absl::MakeConstSpan(hca_kv_).first(un * 512);
      t.compressor_score = absl::MakeConstSpan(hca_score_).first(un * 512);
    }
    KVC_RETURN_IF_ERROR(cache.Append(seq, static_cast<int>(layer), first, t));
  }
  return absl::OkStatus();
}

absl::Status SyntheticModel::DecodeStep(Cache& cache, SequenceId seq, int64_t t, StepStats* stats, Executor* executor) const {
  auto start = std::chrono::steady_clock::now();
  KVC_RETURN_IF_ERROR(Append(cache, seq, t, 1));
  stats->append += Since(start);
  for (size_t layer = 0; layer < spec_.layers.size(); ++layer) {
    const bool csa = spec_.layers[layer].kind == LayerKind::kCsa;
    start = std::chrono::steady_clock::now();
    if (csa) KVC_RETURN_IF_ERROR(cache.PrepareIndexQuery(t, index_q_, index_w_, &query_));  // into its buffers
    stats->index_query += Since(start);
    start = std::chrono::steady_clock::now();
    // Into the previous step's set and scratch: no allocation once grown.
    KVC_RETURN_IF_ERROR(cache.SelectAttentionSet(seq, static_cast<int>(layer), csa ? &query_ : nullptr, &scratch_, &set_));
    const AttentionSet& set = set_;
    stats->select += Since(start);
    if (csa) stats->keys_scored += (t + 1) / 4;
    start = std::chrono::steady_clock::now();
    // Grown, never shrunk: a resize between a CSA layer's 640 rows and an
    // HCA layer's 8,320 would zero 16 MiB per HCA layer for nothing.
    const size_t values = set.rows.size() * kHeadDim;
    if (gathered_.size() < values) gathered_.resize(values);
    KVC_RETURN_IF_ERROR(GatherAttentionRows(set, absl::MakeSpan(gathered_).first(values), executor));
    stats->gather += Since(start);
    stats->rows_gathered += static_cast<int64_t>(set.rows.size());
  }
  ++stats->steps;
  return absl::OkStatus();
}

int64_t PeakRssBytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atoll(line.c_str() + 6) * 1024;
  }
  return 0;
}

}  // namespace kvc::tools
