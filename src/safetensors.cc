#include "src/safetensors.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kvc {

static_assert(static_cast<uint64_t>(SafetensorsFile::kMaxHeaderBytes) <= JsonValue::kMaxInputBytes,
              "every header the size check lets through fits the JSON reader's cap");

namespace {

struct DTypeFacts {
  DType dtype;
  const char* name;
  int size;
};

constexpr DTypeFacts kDTypes[] = {
    {DType::kBool, "BOOL", 1}, {DType::kU8, "U8", 1},     {DType::kI8, "I8", 1},
    {DType::kU16, "U16", 2},   {DType::kI16, "I16", 2},   {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kU32, "U32", 4},   {DType::kI32, "I32", 4},
    {DType::kF32, "F32", 4},   {DType::kU64, "U64", 8},   {DType::kI64, "I64", 8},
    {DType::kF64, "F64", 8},
};

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status ParseTensor(absl::string_view name, const JsonValue& entry, int64_t data_bytes,
                         TensorInfo& out) {
  auto bad = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors: tensor \"", name, "\": ", what));
  };
  if (!entry.is_object()) return bad("header entry is not an object");
  const JsonValue* dtype = entry.Find("dtype");
  const JsonValue* shape = entry.Find("shape");
  const JsonValue* offsets = entry.Find("data_offsets");
  if (dtype == nullptr || !dtype->is_string()) return bad("missing string \"dtype\"");
  if (shape == nullptr || !shape->is_array()) return bad("missing array \"shape\"");
  if (offsets == nullptr || !offsets->is_array() || offsets->array().size() != 2) {
    return bad("\"data_offsets\" must be [begin, end]");
  }
  const DTypeFacts* facts = nullptr;
  for (const DTypeFacts& f : kDTypes) {
    if (dtype->string() == f.name) facts = &f;
  }
  if (facts == nullptr) return bad(absl::StrCat("unknown dtype \"", dtype->string(), "\""));

  out.name = std::string(name);
  out.dtype = facts->dtype;
  out.elements = 1;
  for (const JsonValue& extent : shape->array()) {
    if (!extent.is_integer() || extent.number() < 0) return bad("shape extents must be integers >= 0");
    const int64_t e = static_cast<int64_t>(extent.number());
    if (e != 0 && out.elements > std::numeric_limits<int64_t>::max() / 8 / e) {
      return bad("shape is too large");
    }
    out.shape.push_back(e);
    out.elements *= e;
  }
  for (const JsonValue& o : offsets->array()) {
    if (!o.is_integer() || o.number() < 0) return bad("data_offsets must be integers >= 0");
  }
  const int64_t begin = static_cast<int64_t>(offsets->array()[0].number());
  const int64_t end = static_cast<int64_t>(offsets->array()[1].number());
  out.offset = begin;
  out.bytes = out.elements * facts->size;
  if (begin > end || end > data_bytes) {
    return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] outside the ", data_bytes,
                            "-byte data section"));
  }
  if (end - begin != out.bytes) {
    return bad(absl::StrCat("data_offsets span ", end - begin, " bytes but ", facts->name, " ",
                            ShapeString(out.shape), " needs ", out.bytes));
  }
  return absl::OkStatus();
}

// The tensors must tile the data section exactly, in some order (as the
// reference implementation requires): sorted by offset, each begins where
// the previous one ends, the first at 0 and the last at the section's end.
// Offsets and sizes were checked against the section, so sums cannot overflow.
absl::Status CheckTiling(const std::vector<TensorInfo>& tensors, int64_t data_bytes) {
  std::vector<const TensorInfo*> order;
  order.reserve(tensors.size());
  for (const TensorInfo& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return std::tie(a->offset, a->bytes, a->name) < std::tie(b->offset, b->bytes, b->name);
  });
  int64_t end = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo* t : order) {
    if (t->offset < end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors: tensor \"", t->name, "\": data_offsets [", t->offset, ", ", t->offset + t->bytes,
          "] overlap tensor \"", previous->name, "\" [", previous->offset, ", ", end, "]"));
    }
    if (t->offset > end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors: tensor \"", t->name, "\": data_offsets begin at ", t->offset, ", leaving bytes [", end,
          ", ", t->offset, ") of the data section unused"));
    }
    end = t->offset + t->bytes;
    previous = t;
  }
  if (end != data_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors: bytes [", end, ", ", data_bytes, ") of the ", data_bytes,
                     "-byte data section are unused",
                     previous != nullptr ? absl::StrCat(" (the last tensor, \"", previous->name, "\", ends at ", end, ")")
                                         : std::string(" (no tensors)")));
  }
  return absl::OkStatus();
}

}  // namespace

const char* DTypeName(DType dtype) {
  for (const DTypeFacts& f : kDTypes) {
    if (f.dtype == dtype) return f.name;
  }
  return "?";
}

int DTypeSize(DType dtype) {
  for (const DTypeFacts& f : kDTypes) {
    if (f.dtype == dtype) return f.size;
  }
  return 0;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  absl::StatusOr<SafetensorsFile> file = Parse(std::move(bytes));
  if (!file.ok()) {
    return absl::Status(file.status().code(), absl::StrCat(path, ": ", file.status().message()));
  }
  return file;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Parse(std::string bytes) {
  SafetensorsFile file;
  file.bytes_ = std::move(bytes);
  const int64_t size = static_cast<int64_t>(file.bytes_.size());
  if (size < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors: file is ", size, " bytes, shorter than the 8-byte header length"));
  }
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) {
    header_bytes = (header_bytes << 8) | static_cast<uint8_t>(file.bytes_[static_cast<size_t>(i)]);
  }
  if (header_bytes > static_cast<uint64_t>(kMaxHeaderBytes) ||
      static_cast<int64_t>(header_bytes) > size - 8) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors: header length ", header_bytes,
                                              " exceeds the file (", size, " bytes)"));
  }
  file.data_start_ = 8 + static_cast<int64_t>(header_bytes);
  absl::StatusOr<JsonValue> header =
      JsonValue::Parse(absl::string_view(file.bytes_).substr(8, header_bytes));
  if (!header.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors header: ", header.status().message()));
  }
  if (!header->is_object()) return absl::InvalidArgumentError("safetensors: header is not a JSON object");
  file.header_ = *std::move(header);
  const int64_t data_bytes = size - file.data_start_;
  for (const JsonValue::Member& member : file.header_.object()) {
    if (member.first == "__metadata__") {
      if (!member.second.is_object()) return absl::InvalidArgumentError("safetensors: __metadata__ is not an object");
      for (const JsonValue::Member& entry : member.second.object()) {  // the format: string to string
        if (!entry.second.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat("safetensors: __metadata__ value \"", entry.first, "\" is not a string"));
        }
      }
      continue;
    }
    TensorInfo info;
    absl::Status status = ParseTensor(member.first, member.second, data_bytes, info);
    if (!status.ok()) return status;
    file.tensors_.push_back(std::move(info));
  }
  absl::Status tiled = CheckTiling(file.tensors_, data_bytes);
  if (!tiled.ok()) return tiled;
  return file;
}

const TensorInfo* SafetensorsFile::Find(absl::string_view name) const {
  for (const TensorInfo& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

absl::Span<const uint8_t> SafetensorsFile::Bytes(const TensorInfo& tensor) const {
  return absl::Span<const uint8_t>(
      reinterpret_cast<const uint8_t*>(bytes_.data()) + data_start_ + tensor.offset,
      static_cast<size_t>(tensor.bytes));
}

absl::Status SafetensorsFile::Check(absl::string_view name, DType dtype, size_t element_size,
                                    const std::vector<int64_t>& shape,
                                    const TensorInfo** out) const {
  const TensorInfo* t = Find(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("no tensor \"", name, "\""));
  if (t->dtype != dtype || static_cast<size_t>(DTypeSize(dtype)) != element_size) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" is ", DTypeName(t->dtype),
                                              ", expected ", DTypeName(dtype)));
  }
  bool matches = t->shape.size() == shape.size();
  for (size_t i = 0; matches && i < shape.size(); ++i) {
    matches = shape[i] < 0 || shape[i] == t->shape[i];
  }
  if (!matches) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" has shape ",
                                              ShapeString(t->shape), ", expected ",
                                              ShapeString(shape), " (-1 = any)"));
  }
  *out = t;
  return absl::OkStatus();
}

namespace {

// JSON string literal for `s` (kvc only writes ASCII names and metadata).
std::string JsonQuote(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += absl::StrCat("\\u00", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace

absl::Status SafetensorsWriter::Add(const std::string& name, DType dtype,
                                    const std::vector<int64_t>& shape,
                                    absl::Span<const uint8_t> bytes) {
  int64_t elements = 1;
  for (const int64_t e : shape) {
    if (e < 0) return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\": negative extent"));
    elements *= e;
  }
  if (static_cast<int64_t>(bytes.size()) != elements * DTypeSize(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\": ", bytes.size(),
                                                   " bytes for ", ShapeString(shape), " ",
                                                   DTypeName(dtype)));
  }
  for (const Entry& e : entries_) {
    if (e.name == name) return absl::AlreadyExistsError(absl::StrCat("tensor \"", name, "\" added twice"));
  }
  entries_.push_back({name, dtype, shape, static_cast<int64_t>(data_.size()),
                      static_cast<int64_t>(bytes.size())});
  data_.append(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  return absl::OkStatus();
}

std::string SafetensorsWriter::Serialize() const {
  std::string header = "{";
  if (!meta_.empty()) header += absl::StrCat("\"__metadata__\":{\"meta\":", JsonQuote(meta_), "}");
  for (const Entry& e : entries_) {
    if (header.size() > 1) header += ",";
    header += absl::StrCat(JsonQuote(e.name), ":{\"dtype\":\"", DTypeName(e.dtype),
                           "\",\"shape\":", ShapeString(e.shape), ",\"data_offsets\":[",
                           e.offset, ",", e.offset + e.bytes, "]}");
  }
  header += "}";
  while ((header.size() + 8) % 8 != 0) header += ' ';  // align the data section
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) {
    out[static_cast<size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  }
  return out + header + data_;
}

}  // namespace kvc
