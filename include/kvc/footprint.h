// Analytic KV-cache footprints: DeepSeek-V4 (from any ModelSpec, in kvc's
// FP8/FP4 formats or all-bf16) and the caches people compare it with
// (DeepSeek-V3.2, DeepSeek-V3 MLA, MHA, GQA). Spec §6. Used by
// kvc-footprint; engines can use it for admission decisions.
#ifndef KVC_FOOTPRINT_H_
#define KVC_FOOTPRINT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvc/model_spec.h"

namespace kvc {

enum class StorageFormat { kFp8, kBf16 };

struct FootprintComponent {
  std::string name;
  double bytes = 0;  // per token (growing parts) or per sequence (constants)
};

// A cache's memory as a function of context length: growing components (per
// token, amortised) and per-sequence constants.
struct FootprintModel {
  std::string name;
  std::vector<FootprintComponent> per_token;
  std::vector<FootprintComponent> per_sequence;
  // For V4 models: the spec (for exact entry counts and --measure).
  bool is_v4 = false;
  ModelSpec spec;
  StorageFormat format = StorageFormat::kFp8;

  double BytesPerToken() const;
  double ConstantBytes() const;
  // Exact bytes of each growing component at `tokens` (for V4: whole entries
  // only, floor(tokens / ratio)), in per_token order.
  std::vector<double> ComponentBytes(int64_t tokens) const;
  double TotalBytes(int64_t tokens) const;  // growing + constants
};

// V4 from a spec: CSA rows and keys (one per 4 tokens), HCA rows (one per 128);
// constants: window ring (W rows per layer) and compressor state (fp32, the
// open windows: 80 KiB per CSA layer, 512 KiB per HCA layer).
FootprintModel V4Footprint(const ModelSpec& spec, StorageFormat format);

// A model by name: "v4-pro", "v4-flash", "deepseek-v3.2", "deepseek-v3",
// "llama3-70b", "mha:LAYERS:HEADS:HEAD_DIM[:BYTES]",
// "gqa:LAYERS:KV_HEADS:HEAD_DIM[:BYTES]" (BYTES per element, default 2 =
// bf16), or a path to a Hugging Face config.json (a V4 model). kNotFound or
// kInvalidArgument naming what is wrong.
absl::StatusOr<FootprintModel> FootprintByName(absl::string_view name, StorageFormat format);

}  // namespace kvc

#endif  // KVC_FOOTPRINT_H_
