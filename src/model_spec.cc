#include "kvc/model_spec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "src/json.h"
#include "src/status.h"

namespace kvc {

const char* LayerKindName(LayerKind kind) {
  switch (kind) {
    case LayerKind::kWindow: return "window";
    case LayerKind::kCsa: return "csa";
    case LayerKind::kHca: return "hca";
  }
  return "?";
}

int CompressRatio(LayerKind kind) {
  switch (kind) {
    case LayerKind::kWindow: return 0;
    case LayerKind::kCsa: return 4;
    case LayerKind::kHca: return 128;
  }
  return 0;
}

int CompressorWidthFactor(LayerKind kind) {
  switch (kind) {
    case LayerKind::kWindow: return 0;
    case LayerKind::kCsa: return 2;
    case LayerKind::kHca: return 1;
  }
  return 0;
}

namespace {

RopeSpec CompressedRope() {
  RopeSpec rope;
  rope.theta = 160000.0;
  rope.yarn = YarnSpec{16.0, 65536, 32.0, 1.0};
  return rope;
}

// Layers from a list of compress ratios; kInvalidArgument for any ratio
// other than 0, 4 and 128.
absl::StatusOr<std::vector<LayerSpec>> LayersFromRatios(const std::vector<int64_t>& ratios) {
  std::vector<LayerSpec> layers;
  for (size_t i = 0; i < ratios.size(); ++i) {
    LayerSpec layer;
    switch (ratios[i]) {
      case 0: layer.kind = LayerKind::kWindow; break;
      case 4: layer.kind = LayerKind::kCsa; break;
      case 128: layer.kind = LayerKind::kHca; break;
      default:
        return absl::InvalidArgumentError(absl::StrCat("compress_ratios[", i, "] = ", ratios[i],
                                                       "; kvc supports 0, 4 and 128"));
    }
    layers.push_back(layer);
  }
  return layers;
}

ModelSpec FromRatios(std::string name, const std::vector<int64_t>& ratios, int32_t topk) {
  ModelSpec spec;
  spec.name = std::move(name);
  spec.layers = *LayersFromRatios(ratios);
  spec.index_topk = topk;
  spec.compressed_rope = CompressedRope();
  return spec;
}

// --- config.json helpers: each names the key it failed on. ---

absl::StatusOr<const JsonValue*> Member(const JsonValue& config, const char* key) {
  const JsonValue* v = config.Find(key);
  if (v == nullptr) return absl::InvalidArgumentError(absl::StrCat("config.json: missing \"", key, "\""));
  return v;
}

absl::StatusOr<int64_t> IntMember(const JsonValue& config, const char* key, int64_t min, int64_t max) {
  KVC_ASSIGN_OR_RETURN(const JsonValue* v, Member(config, key));
  if (!v->is_integer() || v->number() < static_cast<double>(min) || v->number() > static_cast<double>(max)) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: \"", key, "\" must be an integer in [", min,
                                                   ", ", max, "]"));
  }
  return static_cast<int64_t>(v->number());
}

absl::StatusOr<double> PositiveNumber(const JsonValue& config, const char* key, const char* where) {
  KVC_ASSIGN_OR_RETURN(const JsonValue* v, Member(config, key));
  if (!v->is_number() || !(v->number() > 0.0)) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: \"", where, key, "\" must be a positive number"));
  }
  return v->number();
}

// `key` if present, else `fallback`.
absl::StatusOr<int64_t> OptionalInt(const JsonValue& config, const char* key, int64_t fallback, int64_t min,
                                    int64_t max) {
  if (config.Find(key) == nullptr) return fallback;
  return IntMember(config, key, min, max);
}

absl::Status CheckParams(const CompressorParams& p, int64_t ratio, int64_t width, int64_t dim,
                         size_t layer, const char* which) {
  if (p.ape.empty() && p.norm_weight.empty()) return absl::OkStatus();  // not set (yet)
  if (static_cast<int64_t>(p.ape.size()) != ratio * width * dim) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": ", which, ".ape has ", p.ape.size(),
                                                   " values, expected ", ratio, " x ", width * dim));
  }
  if (static_cast<int64_t>(p.norm_weight.size()) != dim) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": ", which, ".norm_weight has ",
                                                   p.norm_weight.size(), " values, expected ", dim));
  }
  for (const float v : p.ape) {
    if (!std::isfinite(v)) return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": ", which, ".ape is not finite"));
  }
  for (const float v : p.norm_weight) {
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": ", which, ".norm_weight is not finite"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckRope(const RopeSpec& rope, const char* which, int64_t max_context) {
  if (!std::isfinite(rope.theta) || rope.theta <= 1.0) {
    return absl::InvalidArgumentError(absl::StrCat(which, ".theta must be finite and > 1"));
  }
  if (!std::isfinite(rope.yarn.factor) || rope.yarn.factor < 1.0) {
    return absl::InvalidArgumentError(absl::StrCat(which, ".yarn.factor must be >= 1"));
  }
  if (rope.yarn.factor > 1.0 &&
      (rope.yarn.original_max_positions <= 0 || !(rope.yarn.beta_fast > rope.yarn.beta_slow) ||
       !(rope.yarn.beta_slow > 0))) {
    return absl::InvalidArgumentError(
        absl::StrCat(which, ".yarn needs original_max_positions > 0 and beta_fast > beta_slow > 0"));
  }
  if (!rope.engine_table.empty()) {
    const int64_t per_position = 64;  // 32 pairs x (cos, sin)
    if (static_cast<int64_t>(rope.engine_table.size()) % per_position != 0) {
      return absl::InvalidArgumentError(absl::StrCat(which, ".engine_table size ", rope.engine_table.size(),
                                                     " is not a multiple of 64 (32 pairs x cos, sin)"));
    }
    if (static_cast<int64_t>(rope.engine_table.size()) / per_position < max_context) {
      return absl::InvalidArgumentError(absl::StrCat(which, ".engine_table covers ",
                                                     rope.engine_table.size() / per_position,
                                                     " positions, fewer than max_context ", max_context));
    }
    const auto bad = std::find_if(rope.engine_table.begin(), rope.engine_table.end(), [](float v) { return !std::isfinite(v); });
    if (bad != rope.engine_table.end()) {
      const int64_t at = bad - rope.engine_table.begin();
      return absl::InvalidArgumentError(absl::StrCat(which, ".engine_table is not finite at position ", at / per_position,
                                                     ", pair ", at % per_position / 2));
    }
  }
  return absl::OkStatus();
}

}  // namespace

ModelSpec ModelSpec::V4Flash() {
  std::vector<int64_t> ratios = {0, 0};
  for (int i = 0; i < 20; ++i) ratios.insert(ratios.end(), {4, 128});
  ratios.push_back(4);
  return FromRatios("DeepSeek-V4-Flash", ratios, 512);
}

ModelSpec ModelSpec::V4Pro() {
  std::vector<int64_t> ratios = {128, 128};
  for (int i = 0; i < 29; ++i) ratios.insert(ratios.end(), {4, 128});
  ratios.push_back(4);
  return FromRatios("DeepSeek-V4-Pro", ratios, 1024);
}

absl::StatusOr<ModelSpec> ModelSpec::Preset(absl::string_view name) {
  if (name == "v4-flash") return V4Flash();
  if (name == "v4-pro") return V4Pro();
  return absl::NotFoundError(absl::StrCat("unknown preset \"", name, "\" (v4-flash, v4-pro)"));
}

absl::StatusOr<ModelSpec> ModelSpec::FromHuggingFaceConfig(absl::string_view json, bool include_mtp) {
  if (json.size() > kMaxConfigBytes) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: ", json.size(), " bytes is over the ",
                                                   kMaxConfigBytes, "-byte cap (ModelSpec::kMaxConfigBytes)"));
  }
  absl::StatusOr<JsonValue> parsed = JsonValue::Parse(json);
  if (!parsed.ok()) return absl::InvalidArgumentError(absl::StrCat("config.json: ", parsed.status().message()));
  const JsonValue& config = *parsed;
  if (!config.is_object()) return absl::InvalidArgumentError("config.json: not a JSON object");

  ModelSpec spec;
  const JsonValue* model_type = config.Find("model_type");
  spec.name = model_type != nullptr && model_type->is_string() ? std::string(model_type->string()) : "hf-config";

  KVC_ASSIGN_OR_RETURN(const int64_t num_layers, IntMember(config, "num_hidden_layers", 1, 1024));
  KVC_ASSIGN_OR_RETURN(const int64_t mtp_layers, OptionalInt(config, "num_nextn_predict_layers", 0, 0, 64));
  KVC_ASSIGN_OR_RETURN(const JsonValue* ratios_json, Member(config, "compress_ratios"));
  if (!ratios_json->is_array()) return absl::InvalidArgumentError("config.json: \"compress_ratios\" must be an array");
  std::vector<int64_t> ratios;
  for (const JsonValue& r : ratios_json->array()) {
    if (!r.is_integer()) return absl::InvalidArgumentError("config.json: \"compress_ratios\" must hold integers");
    ratios.push_back(static_cast<int64_t>(r.number()));
  }
  if (static_cast<int64_t>(ratios.size()) < num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: \"compress_ratios\" has ", ratios.size(),
                                                   " entries, fewer than num_hidden_layers = ", num_layers));
  }
  const int64_t extra = static_cast<int64_t>(ratios.size()) - num_layers;
  if (extra != 0 && extra != mtp_layers) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: \"compress_ratios\" has ", ratios.size(),
                                                   " entries; expected num_hidden_layers (", num_layers,
                                                   ") or that plus num_nextn_predict_layers (", mtp_layers, ")"));
  }
  ratios.resize(static_cast<size_t>(num_layers));
  KVC_ASSIGN_OR_RETURN(spec.layers, LayersFromRatios(ratios));
  if (include_mtp) {
    for (int64_t i = 0; i < mtp_layers; ++i) spec.layers.push_back(LayerSpec{});  // window-only MTP layers
  }

  KVC_ASSIGN_OR_RETURN(const int64_t window, IntMember(config, "sliding_window", 1, 1 << 16));
  KVC_ASSIGN_OR_RETURN(const int64_t head_dim, IntMember(config, "head_dim", 1, 1 << 16));
  KVC_ASSIGN_OR_RETURN(const int64_t rope_dim, IntMember(config, "qk_rope_head_dim", 1, 1 << 16));
  KVC_ASSIGN_OR_RETURN(const int64_t index_heads, OptionalInt(config, "index_n_heads", 64, 1, kMaxIndexHeads));
  KVC_ASSIGN_OR_RETURN(const int64_t index_dim, OptionalInt(config, "index_head_dim", 128, 1, 1 << 16));
  KVC_ASSIGN_OR_RETURN(const int64_t index_topk, IntMember(config, "index_topk", 1, 1 << 20));
  spec.window = static_cast<int32_t>(window);
  spec.head_dim = static_cast<int32_t>(head_dim);
  spec.rope_dim = static_cast<int32_t>(rope_dim);
  spec.index_heads = static_cast<int32_t>(index_heads);
  spec.index_dim = static_cast<int32_t>(index_dim);
  spec.index_topk = static_cast<int32_t>(index_topk);
  KVC_ASSIGN_OR_RETURN(spec.max_context, IntMember(config, "max_position_embeddings", 1, int64_t{1} << 40));
  if (config.Find("rms_norm_eps") != nullptr) {
    KVC_ASSIGN_OR_RETURN(spec.norm_eps, PositiveNumber(config, "rms_norm_eps", ""));
  }
  KVC_ASSIGN_OR_RETURN(spec.window_rope.theta, PositiveNumber(config, "rope_theta", ""));
  spec.compressed_rope.theta = spec.window_rope.theta;
  if (config.Find("compress_rope_theta") != nullptr) {
    KVC_ASSIGN_OR_RETURN(spec.compressed_rope.theta, PositiveNumber(config, "compress_rope_theta", ""));
  }
  // rope_scaling (YaRN) applies to the compressed layers only (spec §1).
  if (const JsonValue* scaling = config.Find("rope_scaling"); scaling != nullptr && !scaling->is_null()) {
    if (!scaling->is_object()) return absl::InvalidArgumentError("config.json: \"rope_scaling\" must be an object");
    const JsonValue* type = scaling->Find("type");
    if (type == nullptr) type = scaling->Find("rope_type");
    if (type == nullptr || !type->is_string() || type->string() != "yarn") {
      return absl::InvalidArgumentError("config.json: \"rope_scaling.type\" must be \"yarn\"");
    }
    YarnSpec& yarn = spec.compressed_rope.yarn;
    KVC_ASSIGN_OR_RETURN(yarn.factor, PositiveNumber(*scaling, "factor", "rope_scaling."));
    KVC_ASSIGN_OR_RETURN(yarn.original_max_positions,
                         IntMember(*scaling, "original_max_position_embeddings", 1, int64_t{1} << 40));
    KVC_ASSIGN_OR_RETURN(yarn.beta_fast, PositiveNumber(*scaling, "beta_fast", "rope_scaling."));
    KVC_ASSIGN_OR_RETURN(yarn.beta_slow, PositiveNumber(*scaling, "beta_slow", "rope_scaling."));
  }
  absl::Status valid = spec.Validate();
  if (!valid.ok()) return absl::InvalidArgumentError(absl::StrCat("config.json: ", valid.message()));
  return spec;
}

absl::StatusOr<ModelSpec> ModelSpec::FromHuggingFaceConfigFile(const std::string& path, bool include_mtp) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  // Reads at most one byte past the cap: enough to know the file is over it.
  std::string text(kMaxConfigBytes + 1, '\0');
  in.read(&text[0], static_cast<std::streamsize>(text.size()));
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  text.resize(static_cast<size_t>(in.gcount()));
  if (text.size() > kMaxConfigBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": config.json: over the ", kMaxConfigBytes,
                                                   "-byte cap (ModelSpec::kMaxConfigBytes)"));
  }
  absl::StatusOr<ModelSpec> spec = FromHuggingFaceConfig(text, include_mtp);
  if (!spec.ok()) return absl::Status(spec.status().code(), absl::StrCat(path, ": ", spec.status().message()));
  return spec;
}

absl::Status ModelSpec::Validate() const {
  if (layers.empty() || layers.size() > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("layers: ", layers.size(), " layers; expected 1..1024"));
  }
  if (head_dim != 512 || rope_dim != 64) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim ", head_dim, " / rope_dim ", rope_dim,
                                                   ": kvc's 584-byte rows hold 512 dims with 64 RoPE dims"));
  }
  if (index_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat("index_dim ", index_dim, ": kvc's index keys are 128-dim"));
  }
  if (window < 1 || window > (1 << 16)) return absl::InvalidArgumentError(absl::StrCat("window ", window, " not in 1..65536"));
  if (index_heads < 1 || index_heads > kMaxIndexHeads) {
    return absl::InvalidArgumentError(absl::StrCat("index_heads ", index_heads, " not in 1..", kMaxIndexHeads));
  }
  if (index_topk < 1) return absl::InvalidArgumentError(absl::StrCat("index_topk ", index_topk, " must be >= 1"));
  if (max_context < 1 || max_context > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError(absl::StrCat("max_context ", max_context, " not in 1..2^40"));
  }
  // RMSNorm adds it in fp32: it must stay positive there.
  if (!(static_cast<float>(norm_eps) > 0.0f) || !std::isfinite(static_cast<float>(norm_eps))) {
    return absl::InvalidArgumentError(absl::StrCat("norm_eps ", norm_eps, " must be > 0 and finite in fp32"));
  }
  KVC_RETURN_IF_ERROR(CheckRope(window_rope, "window_rope", max_context));
  KVC_RETURN_IF_ERROR(CheckRope(compressed_rope, "compressed_rope", max_context));
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerSpec& layer = layers[i];
    if (layer.kind != LayerKind::kWindow && layer.kind != LayerKind::kCsa && layer.kind != LayerKind::kHca) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", i, ": unknown kind ", static_cast<int>(layer.kind)));
    }
    const int ratio = CompressRatio(layer.kind);
    const int width = CompressorWidthFactor(layer.kind);
    if (layer.kind == LayerKind::kWindow) {
      if (!layer.compressor.ape.empty() || !layer.compressor.norm_weight.empty() || !layer.indexer.ape.empty() ||
          !layer.indexer.norm_weight.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", i, ": a window-only layer has no compressor"));
      }
      continue;
    }
    KVC_RETURN_IF_ERROR(CheckParams(layer.compressor, ratio, width, head_dim, i, "compressor"));
    if (layer.kind == LayerKind::kCsa) {
      KVC_RETURN_IF_ERROR(CheckParams(layer.indexer, ratio, width, index_dim, i, "indexer"));
      if (layer.compressor.ape.empty() != layer.indexer.ape.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "layer ", i, ": a CSA layer needs both compressor and indexer parameters, or neither"));
      }
    } else if (!layer.indexer.ape.empty() || !layer.indexer.norm_weight.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", i, ": an HCA layer has no indexer"));
    }
  }
  return absl::OkStatus();
}

int ModelSpec::CountLayers(LayerKind kind) const {
  int n = 0;
  for (const LayerSpec& layer : layers) n += layer.kind == kind ? 1 : 0;
  return n;
}

}  // namespace kvc
