// A layer case of the golden files (win, csa, hca) loaded for driving a
// kvc::Cache: its inputs, parameters and the official RoPE table.
#ifndef KVC_TOOLS_CONFORMANCE_GOLDEN_LAYER_H_
#define KVC_TOOLS_CONFORMANCE_GOLDEN_LAYER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kvc/cache.h"
#include "tools/conformance/conformance.h"

namespace kvc::conformance {

struct GoldenLayer {
  LayerKind kind = LayerKind::kWindow;
  int64_t tokens = 0, prefill = 0, ratio = 0, window = 0;
  double norm_eps = 1e-6;
  std::vector<uint16_t> window_rows;                      // win_kv_in
  std::vector<float> kv, score, ape, norm_w;              // main compressor (CSA, HCA)
  std::vector<float> idx_kv, idx_score, idx_ape, idx_norm_w;  // CSA indexer
  std::vector<float> rope;                                // official (cos, sin), tokens x 32 x 2

  static absl::StatusOr<GoldenLayer> Load(const GoldenCase& golden);

  // A one-layer cache of this kind that compresses with the case's
  // parameters and the official RoPE table. The GoldenLayer must outlive it.
  absl::StatusOr<std::unique_ptr<Cache>> MakeCache() const;
  // Appends tokens [at, at + n) with every input the layer takes.
  absl::Status Append(Cache& cache, SequenceId seq, int64_t at, int64_t n) const;
};

}  // namespace kvc::conformance

#endif  // KVC_TOOLS_CONFORMANCE_GOLDEN_LAYER_H_
