#include "kvc/footprint.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kvc/row_formats.h"
#include "src/status.h"
#include "src/page_store.h"

namespace kvc {

double FootprintModel::BytesPerToken() const {
  double total = 0;
  for (const FootprintComponent& c : per_token) total += c.bytes;
  return total;
}

double FootprintModel::ConstantBytes() const {
  double total = 0;
  for (const FootprintComponent& c : per_sequence) total += c.bytes;
  return total;
}

std::vector<double> FootprintModel::ComponentBytes(int64_t tokens) const {
  std::vector<double> out;
  if (!is_v4) {
    for (const FootprintComponent& c : per_token) out.push_back(c.bytes * static_cast<double>(tokens));
    return out;
  }
  // V4: whole entries only. Components are csa rows, csa keys, hca rows.
  const RowFormat row = format == StorageFormat::kFp8 ? RowFormat::kKvFp8 : RowFormat::kKvBf16;
  const RowFormat key = format == StorageFormat::kFp8 ? RowFormat::kIndexFp4 : RowFormat::kIndexBf16;
  double csa_rows = 0, csa_keys = 0, hca_rows = 0;
  for (const LayerSpec& l : spec.layers) {
    const double entries = l.kind == LayerKind::kWindow ? 0.0 : static_cast<double>(tokens / CompressRatio(l.kind));
    if (l.kind == LayerKind::kCsa) {
      csa_rows += entries * FormatInfo(row).row_bytes;
      csa_keys += entries * FormatInfo(key).row_bytes;
    } else if (l.kind == LayerKind::kHca) {
      hca_rows += entries * FormatInfo(row).row_bytes;
    }
  }
  return {csa_rows, csa_keys, hca_rows};
}

double FootprintModel::TotalBytes(int64_t tokens) const {
  double total = ConstantBytes();
  for (const double b : ComponentBytes(tokens)) total += b;
  return total;
}

FootprintModel V4Footprint(const ModelSpec& spec, StorageFormat format) {
  FootprintModel m;
  m.is_v4 = true;
  m.spec = spec;
  m.format = format;
  m.name = spec.name + (format == StorageFormat::kBf16 ? " (bf16)" : "");
  const double row = FormatInfo(format == StorageFormat::kFp8 ? RowFormat::kKvFp8 : RowFormat::kKvBf16).row_bytes;
  const double key = FormatInfo(format == StorageFormat::kFp8 ? RowFormat::kIndexFp4 : RowFormat::kIndexBf16).row_bytes;
  const double csa = spec.CountLayers(LayerKind::kCsa), hca = spec.CountLayers(LayerKind::kHca);
  const double csa_ratio = CompressRatio(LayerKind::kCsa), hca_ratio = CompressRatio(LayerKind::kHca);
  m.per_token = {{"csa_rows", csa * row / csa_ratio}, {"csa_index_keys", csa * key / csa_ratio}, {"hca_rows", hca * row / hca_ratio}};
  const double layers = static_cast<double>(spec.layers.size());
  // Compressor state: fp32 kv and score rows of the open windows (spec §6),
  // as the cache's state pages hold them (without rollback_depth's rows).
  auto state_bytes = [&](LayerKind kind) {
    const cache_internal::LayerParts parts = cache_internal::PartsOf(kind);
    double bytes = 0;
    for (const int s : {parts.main_state, parts.indexer_state}) {
      if (s < 0) continue;
      const CompressorGeometry g = cache_internal::StateCompressor(s, spec.head_dim, spec.index_dim);
      bytes += static_cast<double>(cache_internal::StateFloats(g, 0)) * sizeof(float);
    }
    return bytes;
  };
  const double csa_state = state_bytes(LayerKind::kCsa);
  const double hca_state = state_bytes(LayerKind::kHca);
  m.per_sequence = {{"window_ring", layers * spec.window * row},
                    {"compressor_state", csa * csa_state + hca * hca_state}};
  return m;
}

namespace {

FootprintModel PerTokenModel(std::string name, double bytes_per_token) {
  FootprintModel m;
  m.name = std::move(name);
  m.per_token = {{"kv", bytes_per_token}};
  return m;
}

}  // namespace

absl::StatusOr<FootprintModel> FootprintByName(absl::string_view name, StorageFormat format) {
  if (name == "v4-pro") return V4Footprint(ModelSpec::V4Pro(), format);
  if (name == "v4-flash") return V4Footprint(ModelSpec::V4Flash(), format);
  if (name == "deepseek-v3.2") {
    FootprintModel m;
    m.name = "DeepSeek-V3.2";
    m.per_token = {{"mla_rows", 61.0 * 656}, {"index_keys", 61.0 * 132}};  // FP8 MLA rows + FP8 index keys
    return m;
  }
  if (name == "deepseek-v3") return PerTokenModel("DeepSeek-V3 (MLA, bf16)", 61.0 * 576 * 2);
  if (name == "llama3-70b") return PerTokenModel("Llama-3-70B (GQA 80x8x128, bf16)", 80.0 * 2 * 8 * 128 * 2);
  if (absl::StartsWith(name, "mha:") || absl::StartsWith(name, "gqa:")) {
    const std::vector<std::string> parts = absl::StrSplit(name, ':');
    if (parts.size() != 4 && parts.size() != 5) {
      return absl::InvalidArgumentError(absl::StrCat("model \"", name, "\": expected ", parts[0],
                                                     ":LAYERS:HEADS:HEAD_DIM[:BYTES]"));
    }
    int64_t v[4] = {0, 0, 0, 2};
    for (size_t i = 1; i < parts.size(); ++i) {
      if (!absl::SimpleAtoi(parts[i], &v[i - 1]) || v[i - 1] <= 0 || v[i - 1] > (1 << 20)) {
        return absl::InvalidArgumentError(absl::StrCat("model \"", name, "\": \"", parts[i], "\" is not a positive integer"));
      }
    }
    return PerTokenModel(absl::StrCat(parts[0] == "mha" ? "MHA " : "GQA ", v[0], "x", v[1], "x", v[2],
                                      v[3] == 2 ? " bf16" : absl::StrCat(" ", v[3], "-byte")),
                         2.0 * static_cast<double>(v[0] * v[1] * v[2] * v[3]));  // K and V
  }
  if (absl::EndsWith(name, ".json")) {
    KVC_ASSIGN_OR_RETURN(const ModelSpec spec, ModelSpec::FromHuggingFaceConfigFile(std::string(name)));
    return V4Footprint(spec, format);
  }
  return absl::NotFoundError(absl::StrCat("unknown model \"", name,
                                          "\" (v4-pro, v4-flash, deepseek-v3.2, deepseek-v3, llama3-70b, "
                                          "mha:L:H:D[:B], gqa:L:H:D[:B], or a config.json)"));
}

}  // namespace kvc
