// A small strict JSON reader (RFC 8259) for the files kvc reads: safetensors
// headers and Hugging Face config.json. Not a general-purpose library: it
// parses into an immutable tree and rejects anything malformed with a status
// naming the byte offset. Depth is capped so hostile input cannot overflow
// the stack; duplicate object keys are rejected.
#ifndef KVC_JSON_H_
#define KVC_JSON_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvc {

class JsonValue {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  using Member = std::pair<std::string, JsonValue>;

  static constexpr int kMaxDepth = 64;

  // Parses a complete document (surrounding whitespace allowed).
  static absl::StatusOr<JsonValue> Parse(absl::string_view text);

  JsonValue() = default;

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  // Accessors; each requires the matching type (else returns a default).
  bool bool_value() const { return bool_; }
  double number() const { return number_; }
  const std::string& string() const { return string_; }
  const std::vector<JsonValue>& array() const { return array_; }
  const std::vector<Member>& object() const { return object_; }

  // True iff this is a number with an exact int64 value.
  bool is_integer() const;

  // The member named `key` of an object, or nullptr (also for non-objects).
  const JsonValue* Find(absl::string_view key) const;

  static const char* TypeName(Type type);

 private:
  friend class JsonParser;
  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0.0;
  std::string string_;
  std::vector<JsonValue> array_;
  std::vector<Member> object_;
};

}  // namespace kvc

#endif  // KVC_JSON_H_
