// libFuzzer: the safetensors reader validates every offset on open, so every
// accessor of an accepted file stays in bounds, and the accepted tensors tile
// the data section exactly (no overlap, no hole, nothing after the last).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "src/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<kvc::SafetensorsFile> file =
      kvc::SafetensorsFile::Parse(std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) return 0;
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | data[i];
  const int64_t data_bytes = static_cast<int64_t>(size - 8 - header_bytes);
  std::vector<std::pair<int64_t, int64_t>> ranges;
  uint32_t sum = 0;
  for (const kvc::TensorInfo& t : file->tensors()) {
    ranges.emplace_back(t.offset, t.offset + t.bytes);
    for (const uint8_t b : file->Bytes(t)) sum += b;  // every byte of every tensor
    auto copy = file->Get<uint8_t>(t.name, kvc::DType::kU8, {-1});
    if (t.dtype == kvc::DType::kU8 && t.shape.size() == 1 && !copy.ok()) __builtin_trap();
  }
  std::sort(ranges.begin(), ranges.end());
  int64_t end = 0;
  for (const auto& r : ranges) {
    if (r.first != end) __builtin_trap();
    end = r.second;
  }
  if (end != data_bytes) __builtin_trap();
  if (file->metadata() != nullptr && !file->metadata()->is_object()) __builtin_trap();
  return static_cast<int>(sum & 0);
}
