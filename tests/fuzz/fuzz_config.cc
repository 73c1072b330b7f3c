// libFuzzer: a Hugging Face config.json either loads into a valid ModelSpec
// (whose footprint can then be computed) or is rejected with a status.
#include <cstddef>
#include <cstdint>

#include "kvc/footprint.h"
#include "kvc/model_spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  for (const bool include_mtp : {false, true}) {
    const absl::StatusOr<kvc::ModelSpec> spec =
        kvc::ModelSpec::FromHuggingFaceConfig(absl::string_view(reinterpret_cast<const char*>(data), size), include_mtp);
    if (!spec.ok()) continue;
    if (!spec->Validate().ok()) __builtin_trap();  // the loader only returns valid specs
    (void)kvc::V4Footprint(*spec, kvc::StorageFormat::kFp8).TotalBytes(1 << 20);
  }
  return 0;
}
