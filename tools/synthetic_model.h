// Synthetic DeepSeek-V4 inputs for whole-model runs (kvc-run, kvc-footprint
// --measure, the 1M-token benchmarks): random compressor parameters, and
// one chunk of random window rows, projections and index queries that every
// layer reuses. Drives a kvc::Cache the way an engine's step loop does.
#ifndef KVC_TOOLS_SYNTHETIC_MODEL_H_
#define KVC_TOOLS_SYNTHETIC_MODEL_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kvc/cache.h"

namespace kvc::tools {

class SyntheticModel {
 public:
  // Copies `spec` and points its compressor parameters at this object's
  // (which must then outlive any cache built from spec()).
  SyntheticModel(ModelSpec spec, int64_t chunk_tokens);
  SyntheticModel(const SyntheticModel&) = delete;
  SyntheticModel& operator=(const SyntheticModel&) = delete;

  const ModelSpec& spec() const { return spec_; }
  int64_t chunk_tokens() const { return chunk_; }

  // Appends tokens [first, first + n) (n <= chunk_tokens) to every layer.
  absl::Status Append(Cache& cache, SequenceId seq, int64_t first, int64_t n) const;

  // Seconds spent in each stage of decode steps, and the work done.
  struct StepStats {
    double append = 0;       // appending the token to every layer (window, state, entries)
    double index_query = 0;  // preparing the CSA layers' index queries
    double select = 0;       // index scoring + top-k (CSA), set assembly (all)
    double gather = 0;       // dequantizing every selected row to fp32
    int64_t steps = 0;
    int64_t rows_gathered = 0;
    int64_t keys_scored = 0;
    double total() const { return append + index_query + select + gather; }
  };
  // One decode step at position t (the sequence holds t tokens): append
  // token t to every layer, then select and gather every layer's set (the
  // cache's executor splits each layer's index scoring; `executor`, if
  // given, the gathering of each set's rows).
  // Not thread-safe: it selects and gathers into this object's scratch buffers.
  absl::Status DecodeStep(Cache& cache, SequenceId seq, int64_t t, StepStats* stats, Executor* executor = nullptr) const;

 private:
  ModelSpec spec_;
  int64_t chunk_;
  std::vector<float> csa_ape_, idx_ape_, hca_ape_, ones_;
  std::vector<Bf16> rows_;
  std::vector<float> csa_kv_, csa_score_, idx_kv_, idx_score_, hca_kv_, hca_score_;
  std::vector<Bf16> index_q_;
  std::vector<float> index_w_;
  // The decode path's reused buffers (DecodeStep allocates nothing for
  // selection once they have grown).
  mutable IndexQuery query_;
  mutable SelectionScratch scratch_;
  mutable AttentionSet set_;
  mutable std::vector<float> gathered_;
};

// Peak resident set of this process in bytes (0 if unknown).
int64_t PeakRssBytes();

}  // namespace kvc::tools

#endif  // KVC_TOOLS_SYNTHETIC_MODEL_H_
