// A layer case of the golden files (win, csa, hca) loaded for driving a
// kvc::Cache: its inputs, parameters and the official RoPE table.
#ifndef KVC_TOOLS_CONFORMANCE_GOLDEN_LAYER_H_
#define KVC_TOOLS_CONFORMANCE_GOLDEN_LAYER_H_

#include <cstdint>
#include <memory>
#include <set>
#include <vector>

#include "absl/status/statusor.h"
#include "kvc/cache.h"
#include "kvc/indexer.h"
#include "tools/conformance/conformance.h"

namespace kvc::conformance {

struct GoldenLayer {
  LayerKind kind = LayerKind::kWindow;
  int64_t tokens = 0, prefill = 0, ratio = 0, window = 0;
  int64_t index_topk = 0;  // CSA: the official top-k (metadata "index_topk")
  double norm_eps = 1e-6;
  std::vector<uint16_t> window_rows;                      // win_kv_in
  std::vector<float> kv, score, ape, norm_w;              // main compressor (CSA, HCA)
  std::vector<float> idx_kv, idx_score, idx_ape, idx_norm_w;  // CSA indexer
  std::vector<float> rope;                                // official (cos, sin), tokens x 32 x 2

  static absl::StatusOr<GoldenLayer> Load(const GoldenCase& golden);

  // A one-layer cache of this kind that compresses with the case's
  // parameters and the official RoPE table, its ring holding window +
  // draft_slots rows. The GoldenLayer must outlive it.
  absl::StatusOr<std::unique_ptr<Cache>> MakeCache(int32_t draft_slots = 0) const;
  // Appends tokens [at, at + n) with every input the layer takes.
  absl::Status Append(Cache& cache, SequenceId seq, int64_t at, int64_t n) const;
};

// What the official code selected in a layer case, and (CSA) the inputs of
// its index queries: attn_idx, idx_q_raw, idx_w.
struct GoldenSelection {
  int64_t width = 0;  // attn_idx columns (128 + k)
  std::vector<int32_t> attn_idx;  // tokens x width, -1 = none
  int64_t index_heads = 0;
  std::vector<uint16_t> q_raw, w;  // CSA: tokens x heads x 128, tokens x heads (bf16)

  static absl::StatusOr<GoldenSelection> Load(const GoldenCase& golden, const GoldenLayer& layer);
  // The official set of query t: attn_idx row t without the -1s (golden
  // README: prefill rows in the prefill index space, decode rows in the
  // decode one).
  std::set<int32_t> Official(int64_t t) const;
  // The index query of token t, prepared by `cache` (CSA cases).
  absl::StatusOr<IndexQuery> Query(const Cache& cache, int64_t t) const;
};

}  // namespace kvc::conformance

#endif  // KVC_TOOLS_CONFORMANCE_GOLDEN_LAYER_H_
