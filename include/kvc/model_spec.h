// The model description a kvc::Cache is built from: which kind each layer is,
// the dimensions of its streams, RoPE, and where the engine's per-layer
// compressor parameters live. Presets for DeepSeek-V4-Flash and -Pro (spec
// §1), or loaded from a Hugging Face config.json.
#ifndef KVC_MODEL_SPEC_H_
#define KVC_MODEL_SPEC_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvc {

// Stable numbering (stored in snapshots, exposed in the C API).
enum class LayerKind : uint8_t {
  kWindow = 0,  // sliding window only ("SWA"), compress ratio 0
  kCsa = 1,     // compressed sparse attention, ratio 4, with an indexer
  kHca = 2,     // heavily compressed attention, ratio 128
};

const char* LayerKindName(LayerKind kind);
// Tokens per compressed entry: 0 (window-only), 4 (CSA) or 128 (HCA).
int CompressRatio(LayerKind kind);
// Projections per token handed to the main compressor, in units of head_dim:
// 2 for CSA (the overlapping two-half scheme), 1 for HCA, 0 for window-only.
int CompressorWidthFactor(LayerKind kind);

// YaRN frequency blending (spec §3a). factor == 1 means plain RoPE.
struct YarnSpec {
  double factor = 1.0;
  int64_t original_max_positions = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

struct RopeSpec {
  double theta = 10000.0;
  YarnSpec yarn;
  // Optional engine-supplied table, used wherever kvc rotates (spec §3a):
  // (cos, sin) for position p and pair j at [(p * 32 + j) * 2 + {0, 1}].
  // Non-owning; must outlive the cache. Empty: kvc computes its own
  // (correctly rounded) table.
  absl::Span<const float> engine_table;
};

// The engine's learned parameters of one compressor, as non-owning views that
// must outlive the cache. Needed once compressor projections are appended.
struct CompressorParams {
  absl::Span<const float> ape;          // [ratio][width_factor * dim] position bias of the scores
  absl::Span<const float> norm_weight;  // [dim] RMSNorm weight
};

struct LayerSpec {
  LayerKind kind = LayerKind::kWindow;
  CompressorParams compressor;  // CSA and HCA layers (dim = head_dim)
  CompressorParams indexer;     // CSA layers (dim = index_dim)
};

// The most lightning-indexer heads kvc scores (IndexQuery::Prepare's bound
// on fp32 rounding in the score sum assumes at most this many).
constexpr int32_t kMaxIndexHeads = 4096;

struct ModelSpec {
  std::string name;
  std::vector<LayerSpec> layers;

  int32_t head_dim = 512;    // KV row dims; kvc's row format requires 512
  int32_t rope_dim = 64;     // trailing RoPE dims of a row; requires 64
  int32_t window = 128;      // sliding-window rows per layer
  int32_t index_heads = 64;  // lightning-indexer query heads, 1..kMaxIndexHeads
  int32_t index_dim = 128;   // index key dims; requires 128 (Hadamard-128)
  int32_t index_topk = 512;  // compressed entries a CSA query attends to
  int64_t max_context = int64_t{1} << 20;  // tokens
  double norm_eps = 1e-6;                  // compressor RMSNorm epsilon

  RopeSpec window_rope;      // window-only layers: theta 10000, no YaRN
  RopeSpec compressed_rope;  // CSA/HCA layers: theta 160000 + YaRN

  // DeepSeek-V4-Flash: 43 layers [0,0] + [4,128]*20 + [4], top-k 512.
  static ModelSpec V4Flash();
  // DeepSeek-V4-Pro: 61 layers [128,128] + [4,128]*29 + [4], top-k 1024.
  static ModelSpec V4Pro();
  // "v4-flash" or "v4-pro"; kNotFound otherwise.
  static absl::StatusOr<ModelSpec> Preset(absl::string_view name);

  // From the text of a Hugging Face config.json (DeepSeek-V4 keys:
  // num_hidden_layers, compress_ratios, sliding_window, head_dim,
  // qk_rope_head_dim, index_n_heads, index_head_dim, index_topk,
  // max_position_embeddings, rope_theta, compress_rope_theta, rope_scaling,
  // rms_norm_eps, num_nextn_predict_layers). compress_ratios may list the MTP
  // layers after the main ones; with include_mtp they become extra
  // window-only layers. Missing, mistyped or inconsistent keys are
  // kInvalidArgument naming the key. Text over kMaxConfigBytes (1 MiB; HF
  // config.json files are a few KB) is kInvalidArgument naming the cap.
  static constexpr size_t kMaxConfigBytes = 1 << 20;
  static absl::StatusOr<ModelSpec> FromHuggingFaceConfig(absl::string_view json,
                                                         bool include_mtp = false);
  static absl::StatusOr<ModelSpec> FromHuggingFaceConfigFile(const std::string& path,
                                                             bool include_mtp = false);

  // Checks every field and every set of compressor parameters; the first
  // problem is returned as kInvalidArgument naming the field (and layer).
  absl::Status Validate() const;

  int CountLayers(LayerKind kind) const;
  const RopeSpec& RopeFor(LayerKind kind) const {
    return kind == LayerKind::kWindow ? window_rope : compressed_rope;
  }
};

}  // namespace kvc

#endif  // KVC_MODEL_SPEC_H_
