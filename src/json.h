// A small strict JSON reader (RFC 8259) for the files kvc reads: safetensors
// headers and Hugging Face config.json. Not a general-purpose library: it
// parses into an immutable tree and rejects anything malformed with a status
// naming the byte offset:
//   - text must be UTF-8 (RFC 3629): overlong forms, surrogates encoded in
//     UTF-8, code points above U+10FFFF, truncated sequences and stray
//     continuation bytes are refused; \u escapes must pair their surrogates;
//   - nesting deeper than kMaxDepth (so hostile input cannot overflow the
//     stack), duplicate object keys and numbers outside the double range are
//     refused; input over kMaxInputBytes is refused naming the cap.
// Memory is bounded by the input size: a parsed document is one allocation of
// 16 bytes per array element, 32 per object member and 1 per decoded string
// byte, at most 8 bytes per input byte (a 16 MiB array of one-digit numbers
// takes 128 MiB); while parsing, up to 4 more bytes per input byte are used
// and then freed.
#ifndef KVC_SRC_JSON_H_
#define KVC_SRC_JSON_H_

#include <cstddef>
#include <cstdint>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace kvc {

class JsonValue {
 public:
  enum class Type : uint8_t { kNull, kBool, kNumber, kString, kArray, kObject };
  // Keys point into the document that holds the object.
  using Member = std::pair<absl::string_view, JsonValue>;

  static constexpr int kMaxDepth = 64;
  static constexpr size_t kMaxInputBytes = 100 << 20;  // the safetensors header limit

  // Parses a complete document (surrounding whitespace allowed).
  static absl::StatusOr<JsonValue> Parse(absl::string_view text);

  JsonValue() = default;
  // A copy is deep (it owns a new tree); a move keeps the tree where it is,
  // so pointers and views into a document stay valid while it lives.
  JsonValue(const JsonValue& other);
  JsonValue& operator=(const JsonValue& other);
  JsonValue(JsonValue&& other) noexcept;
  JsonValue& operator=(JsonValue&& other) noexcept;
  ~JsonValue();

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  // Accessors; each requires the matching type (else returns false, 0 or
  // empty). Views and spans live as long as the document.
  bool bool_value() const { return type_ == Type::kBool && bool_; }
  double number() const { return type_ == Type::kNumber ? number_ : 0.0; }
  absl::string_view string() const {
    return type_ == Type::kString ? absl::string_view(chars_, size_) : absl::string_view();
  }
  absl::Span<const JsonValue> array() const {
    return type_ == Type::kArray ? absl::Span<const JsonValue>(elements_, size_) : absl::Span<const JsonValue>();
  }
  absl::Span<const Member> object() const {
    return type_ == Type::kObject ? absl::Span<const Member>(members_, size_) : absl::Span<const Member>();
  }

  // True iff this is a number with an exact int64 value.
  bool is_integer() const;

  // The member named `key` of an object, or nullptr (also for non-objects).
  const JsonValue* Find(absl::string_view key) const;

  static const char* TypeName(Type type);

 private:
  friend class JsonParser;
  friend class JsonTreeBuilder;

  void Release();
  void TakeFrom(JsonValue& other);  // leaves `other` null

  // 16 bytes. A document's root owns one block holding every array, member
  // list and string of the tree (its own children first, so the pointer
  // below is the block's start); values inside the block own nothing.
  Type type_ = Type::kNull;
  bool bool_ = false;
  bool owns_block_ = false;
  uint32_t size_ = 0;  // string bytes, array elements or object members
  union {
    double number_ = 0.0;
    const char* chars_;
    const JsonValue* elements_;
    const Member* members_;
  };
};

}  // namespace kvc

#endif  // KVC_SRC_JSON_H_
