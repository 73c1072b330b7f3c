// Reader for the safetensors format (8-byte little-endian header length, a
// JSON header naming each tensor's dtype, shape and byte range, then the raw
// little-endian data). kvc uses it for the golden vectors; engines can use it
// to load test data. Every structural fact is validated on open, so accessors
// never read out of bounds, whatever the file holds: the header is strict
// JSON (json.h), every dtype is known, every shape's byte size fits int64 and
// equals its data_offsets span, and the tensors tile the data section exactly
// (in any order: no overlap, no hole, nothing after the last one), as the
// reference implementation requires. Errors name the tensor.
#ifndef KVC_SRC_SAFETENSORS_H_
#define KVC_SRC_SAFETENSORS_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "src/json.h"

namespace kvc {

enum class DType : uint8_t { kBool, kU8, kI8, kU16, kI16, kF16, kBF16, kU32, kI32, kF32, kU64, kI64, kF64 };

// "BF16", "F32", ... as safetensors spells them.
const char* DTypeName(DType dtype);
int DTypeSize(DType dtype);  // bytes per element

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  int64_t elements;  // product of shape
  int64_t offset;    // bytes from the start of the data section
  int64_t bytes;     // elements * DTypeSize(dtype)
};

class SafetensorsFile {
 public:
  // Largest header accepted (the format's own limit is 100 MB).
  static constexpr int64_t kMaxHeaderBytes = 100 << 20;

  // Reads and validates a whole file. kNotFound if it cannot be opened;
  // kInvalidArgument naming the tensor or the header offset if malformed.
  static absl::StatusOr<SafetensorsFile> Read(const std::string& path);
  // Validates an in-memory file image (takes ownership).
  static absl::StatusOr<SafetensorsFile> Parse(std::string bytes);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(absl::string_view name) const;

  // The `__metadata__` object of the header (string values only), or null.
  const JsonValue* metadata() const { return header_.Find("__metadata__"); }

  // The raw little-endian bytes of a tensor of this file.
  absl::Span<const uint8_t> Bytes(const TensorInfo& tensor) const;

  // Copies tensor `name` into a vector of T, checking that T matches its
  // dtype's size and kind and that its shape equals `shape` (-1 = any extent).
  template <typename T>
  absl::StatusOr<std::vector<T>> Get(absl::string_view name, DType dtype,
                                     const std::vector<int64_t>& shape,
                                     const TensorInfo** info = nullptr) const {
    const TensorInfo* t = nullptr;
    absl::Status status = Check(name, dtype, sizeof(T), shape, &t);
    if (!status.ok()) return status;
    std::vector<T> out(static_cast<size_t>(t->elements));
    if (t->bytes > 0) std::memcpy(out.data(), Bytes(*t).data(), static_cast<size_t>(t->bytes));
    if (info != nullptr) *info = t;
    return out;
  }

 private:
  absl::Status Check(absl::string_view name, DType dtype, size_t element_size,
                     const std::vector<int64_t>& shape, const TensorInfo** out) const;

  std::string bytes_;
  int64_t data_start_ = 0;
  JsonValue header_;
  std::vector<TensorInfo> tensors_;
};

// Builds a safetensors file image: tensors are laid out in the order added.
class SafetensorsWriter {
 public:
  // `bytes` must hold exactly product(shape) * DTypeSize(dtype) bytes.
  absl::Status Add(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                   absl::Span<const uint8_t> bytes);
  // `meta` becomes __metadata__ = {"meta": meta}, as in kvc's golden files.
  void SetMetadata(absl::string_view meta) { meta_ = std::string(meta); }
  std::string Serialize() const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    int64_t offset;
    int64_t bytes;
  };
  std::vector<Entry> entries_;
  std::string data_;
  std::string meta_;
};

}  // namespace kvc

#endif  // KVC_SRC_SAFETENSORS_H_
