// libFuzzer: the safetensors reader validates every offset on open, so every
// accessor of an accepted file stays in bounds.
#include <cstddef>
#include <cstdint>
#include <string>

#include "kvc/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<kvc::SafetensorsFile> file =
      kvc::SafetensorsFile::Parse(std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) return 0;
  uint32_t sum = 0;
  for (const kvc::TensorInfo& t : file->tensors()) {
    for (const uint8_t b : file->Bytes(t)) sum += b;  // every byte of every tensor
    auto copy = file->Get<uint8_t>(t.name, kvc::DType::kU8, {-1});
    (void)copy;
  }
  (void)file->metadata();
  return static_cast<int>(sum & 0);
}
