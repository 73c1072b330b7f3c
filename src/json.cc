#include "src/json.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kvc {

static_assert(sizeof(JsonValue) == 16, "json.h documents 16 bytes per array element");
static_assert(sizeof(JsonValue::Member) == 32, "json.h documents 32 bytes per object member");
static_assert(JsonValue::kMaxInputBytes < std::numeric_limits<uint32_t>::max(),
              "sizes of strings and containers fit JsonValue::size_");

// One block for a whole tree: arrays and member lists first, bump-allocated
// in pre-order (so the root's own children come first, at the block's
// start), then the bytes of every string. Sized exactly by a first pass; a
// request beyond the size returns nullptr. Frees the block unless Adopt()
// hands it to the root.
class JsonTreeBuilder {
 public:
  JsonTreeBuilder(size_t node_bytes, size_t char_bytes)
      : block_(node_bytes + char_bytes > 0 ? static_cast<char*>(::operator new(node_bytes + char_bytes)) : nullptr),
        nodes_(block_),
        nodes_end_(block_ + node_bytes),
        chars_(nodes_end_),
        chars_end_(chars_ + char_bytes) {}
  JsonTreeBuilder(const JsonTreeBuilder&) = delete;
  JsonTreeBuilder& operator=(const JsonTreeBuilder&) = delete;
  ~JsonTreeBuilder() { ::operator delete(block_); }

  JsonValue* NewElements(uint32_t n) { return New<JsonValue>(n); }
  JsonValue::Member* NewMembers(uint32_t n) { return New<JsonValue::Member>(n); }
  // The free string bytes; CommitString(used) keeps the first `used` of them.
  char* StringRoom() const { return chars_; }
  size_t StringRoomSize() const { return static_cast<size_t>(chars_end_ - chars_); }
  void CommitString(size_t used) { chars_ += used; }

  // Makes `root` own the block. Its children (or, for a string root, its
  // bytes) were the first thing allocated, so its pointer is the block's
  // start; false (and the block stays here) if that does not hold.
  bool Adopt(JsonValue& root) {
    if (block_ == nullptr) return true;
    const void* start = root.type_ == JsonValue::Type::kString  ? static_cast<const void*>(root.chars_)
                        : root.type_ == JsonValue::Type::kArray ? static_cast<const void*>(root.elements_)
                        : root.type_ == JsonValue::Type::kObject ? static_cast<const void*>(root.members_)
                                                                : nullptr;
    if (start != block_) return false;
    root.owns_block_ = true;
    block_ = nullptr;
    return true;
  }

  // What CopyInto needs for the tree below `value` (not `value` itself).
  static void Measure(const JsonValue& value, size_t& node_bytes, size_t& char_bytes) {
    char_bytes += value.string().size();
    node_bytes += value.array().size() * sizeof(JsonValue) + value.object().size() * sizeof(JsonValue::Member);
    for (const JsonValue& e : value.array()) Measure(e, node_bytes, char_bytes);
    for (const JsonValue::Member& m : value.object()) {
      char_bytes += m.first.size();
      Measure(m.second, node_bytes, char_bytes);
    }
  }

  // Deep copy of `from` into the null value `to`, in pre-order. The block
  // was sized by Measure(from), so no allocation below returns nullptr.
  void CopyInto(const JsonValue& from, JsonValue& to) {
    to.type_ = from.type_;
    to.bool_ = from.bool_;
    to.size_ = from.size_;
    switch (from.type_) {
      case JsonValue::Type::kNull:
      case JsonValue::Type::kBool:
        break;
      case JsonValue::Type::kNumber:
        to.number_ = from.number_;
        break;
      case JsonValue::Type::kString:
        to.chars_ = CopyString(from.string()).data();
        break;
      case JsonValue::Type::kArray: {
        JsonValue* elements = NewElements(from.size_);
        for (uint32_t i = 0; i < from.size_; ++i) CopyInto(from.elements_[i], elements[i]);
        to.elements_ = elements;
        break;
      }
      case JsonValue::Type::kObject: {
        JsonValue::Member* members = NewMembers(from.size_);
        for (uint32_t i = 0; i < from.size_; ++i) {
          members[i].first = CopyString(from.members_[i].first);
          CopyInto(from.members_[i].second, members[i].second);
        }
        to.members_ = members;
        break;
      }
    }
  }

 private:
  template <typename T>
  T* New(uint32_t n) {
    if (n == 0) return nullptr;
    if (static_cast<size_t>(nodes_end_ - nodes_) / sizeof(T) < n) return nullptr;
    T* first = reinterpret_cast<T*>(nodes_);
    for (uint32_t i = 0; i < n; ++i) new (nodes_ + i * sizeof(T)) T();
    nodes_ += n * sizeof(T);
    return first;
  }

  absl::string_view CopyString(absl::string_view s) {
    if (s.empty()) return absl::string_view();
    char* out = chars_;
    std::memcpy(out, s.data(), s.size());
    chars_ += s.size();
    return absl::string_view(out, s.size());
  }

  char* block_;
  char* nodes_;
  char* const nodes_end_;
  char* chars_;
  char* const chars_end_;
};

namespace {

// Length of the well-formed UTF-8 sequence (RFC 3629 §4) that starts with
// the byte text[at] >= 0x80, or 0 if it is not well formed.
size_t Utf8SequenceLength(absl::string_view text, size_t at) {
  const auto byte = [&](size_t k) -> unsigned {
    return at + k < text.size() ? static_cast<unsigned char>(text[at + k]) : 0u;
  };
  const unsigned lead = byte(0);
  size_t length = 0;
  unsigned second_min = 0x80, second_max = 0xBF;
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) second_min = 0xA0;  // overlong below U+0800
    if (lead == 0xED) second_max = 0x9F;  // U+D800..U+DFFF are surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) second_min = 0x90;  // overlong below U+10000
    if (lead == 0xF4) second_max = 0x8F;  // above U+10FFFF
  } else {
    return 0;  // a continuation byte, an overlong lead (C0, C1) or F5..FF
  }
  if (byte(1) < second_min || byte(1) > second_max) return 0;
  for (size_t k = 2; k < length; ++k) {
    if (byte(k) < 0x80 || byte(k) > 0xBF) return 0;
  }
  return length;
}

}  // namespace

// Recursive-descent parser over a string_view; every error names the offset.
// Run twice over the same text: the first pass (no builder) validates and
// records each container's size, in pre-order, and the bytes the tree needs;
// the second builds the tree into a block of exactly that size.
class JsonParser {
 public:
  JsonParser(absl::string_view text, std::vector<uint32_t>& container_sizes, JsonTreeBuilder* builder)
      : text_(text), container_sizes_(container_sizes), builder_(builder) {}

  absl::Status ParseDocument(JsonValue& out) {
    SkipWhitespace();
    absl::Status status = ParseValue(out, 0);
    if (!status.ok()) return status;
    SkipWhitespace();
    if (pos_ != text_.size()) return Error("unexpected characters after the JSON value");
    return absl::OkStatus();
  }

  size_t node_bytes() const { return node_bytes_; }
  size_t char_bytes() const { return char_bytes_; }

 private:
  absl::Status ErrorAt(size_t offset, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat("JSON: ", what, " at byte ", offset));
  }
  absl::Status Error(absl::string_view what) const { return ErrorAt(pos_, what); }
  absl::Status PassesDisagree() const {
    return absl::InternalError(absl::StrCat("JSON: the building pass disagrees with the checking pass at byte ", pos_));
  }

  void SkipWhitespace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  bool Consume(absl::string_view literal) {
    if (text_.substr(pos_, literal.size()) != literal) return false;
    pos_ += literal.size();
    return true;
  }

  absl::Status ParseValue(JsonValue& out, int depth) {
    if (depth >= JsonValue::kMaxDepth) return Error("nesting deeper than 64 levels");
    if (pos_ >= text_.size()) return Error("unexpected end of input");
    const char c = text_[pos_];
    if (c == '{') return ParseContainer(out, depth, JsonValue::Type::kObject);
    if (c == '[') return ParseContainer(out, depth, JsonValue::Type::kArray);
    if (c == '"') {
      absl::string_view s;
      absl::Status status = ParseString(s);
      if (!status.ok()) return status;
      out.type_ = JsonValue::Type::kString;
      out.chars_ = s.data();
      out.size_ = static_cast<uint32_t>(s.size());
      return absl::OkStatus();
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber(out);
    if (Consume("true") || Consume("false")) {
      out.type_ = JsonValue::Type::kBool;
      out.bool_ = c == 't';
      return absl::OkStatus();
    }
    if (Consume("null")) {
      out.type_ = JsonValue::Type::kNull;
      return absl::OkStatus();
    }
    return Error("expected a JSON value");
  }

  // An array or an object. With a builder, its children go straight into
  // slots sized by the first pass; without, into a scratch value.
  absl::Status ParseContainer(JsonValue& out, int depth, JsonValue::Type type) {
    const bool is_object = type == JsonValue::Type::kObject;
    const char close = is_object ? '}' : ']';
    const size_t index = next_container_++;
    uint32_t capacity = 0;
    JsonValue* elements = nullptr;
    JsonValue::Member* members = nullptr;
    if (builder_ == nullptr) {
      container_sizes_.push_back(0);
    } else {
      if (index >= container_sizes_.size()) return PassesDisagree();
      capacity = container_sizes_[index];
      if (is_object) {
        members = builder_->NewMembers(capacity);
      } else {
        elements = builder_->NewElements(capacity);
      }
      if (capacity > 0 && elements == nullptr && members == nullptr) return PassesDisagree();
    }
    ++pos_;  // '{' or '['
    SkipWhitespace();
    uint32_t size = 0;
    if (pos_ < text_.size() && text_[pos_] == close) {
      ++pos_;
    } else {
      while (true) {
        SkipWhitespace();
        if (builder_ != nullptr && size >= capacity) return PassesDisagree();
        JsonValue::Member scratch;
        JsonValue::Member& member = is_object && builder_ != nullptr ? members[size] : scratch;
        JsonValue& value = builder_ == nullptr ? scratch.second : is_object ? members[size].second : elements[size];
        if (is_object) {
          if (pos_ >= text_.size() || text_[pos_] != '"') return Error("expected an object key");
          absl::Status status = ParseString(member.first);
          if (!status.ok()) return status;
          SkipWhitespace();
          if (!Consume(":")) return Error("expected ':'");
          SkipWhitespace();
        }
        absl::Status status = ParseValue(value, depth + 1);
        if (!status.ok()) return status;
        ++size;
        SkipWhitespace();
        if (pos_ < text_.size() && text_[pos_] == close) {
          ++pos_;
          break;
        }
        if (!Consume(",")) return Error(is_object ? "expected ',' or '}'" : "expected ',' or ']'");
      }
    }
    out.type_ = type;
    out.size_ = size;
    if (is_object) {
      out.members_ = members;
    } else {
      out.elements_ = elements;
    }
    if (builder_ == nullptr) {
      container_sizes_[index] = size;
      node_bytes_ += size * (is_object ? sizeof(JsonValue::Member) : sizeof(JsonValue));
      return absl::OkStatus();
    }
    if (size != capacity) return PassesDisagree();
    return is_object ? CheckUniqueKeys(out) : absl::OkStatus();
  }

  // O(n log n), so a hostile header with many keys stays cheap.
  absl::Status CheckUniqueKeys(const JsonValue& object) const {
    std::vector<absl::string_view> keys;
    keys.reserve(object.size_);
    for (const JsonValue::Member& member : object.object()) keys.push_back(member.first);
    std::sort(keys.begin(), keys.end());
    for (size_t i = 1; i < keys.size(); ++i) {
      if (keys[i] == keys[i - 1]) return Error(absl::StrCat("duplicate key \"", keys[i], "\""));
    }
    return absl::OkStatus();
  }

  absl::Status ParseHex4(uint32_t& code) {
    if (text_.size() - pos_ < 4) return Error("truncated \\u escape");
    code = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = text_[pos_++];
      code <<= 4;
      if (h >= '0' && h <= '9') {
        code |= static_cast<uint32_t>(h - '0');
      } else if (h >= 'a' && h <= 'f') {
        code |= static_cast<uint32_t>(h - 'a' + 10);
      } else if (h >= 'A' && h <= 'F') {
        code |= static_cast<uint32_t>(h - 'A' + 10);
      } else {
        return Error("bad hex digit in \\u escape");
      }
    }
    return absl::OkStatus();
  }

  // Decodes the string at pos_ (its opening quote). Without a builder only
  // counts its bytes; with one, `out` views its bytes in the block.
  absl::Status ParseString(absl::string_view& out) {
    char* const room = builder_ != nullptr ? builder_->StringRoom() : nullptr;
    const size_t room_size = builder_ != nullptr ? builder_->StringRoomSize() : 0;
    size_t length = 0;
    bool overflow = false;
    const auto emit = [&](char byte) {
      if (room != nullptr && length < room_size) {
        room[length] = byte;
      } else if (builder_ != nullptr) {
        overflow = true;
      }
      ++length;
    };
    const auto emit_code_point = [&](uint32_t code) {
      if (code < 0x80) {
        emit(static_cast<char>(code));
      } else if (code < 0x800) {
        emit(static_cast<char>(0xC0 | (code >> 6)));
        emit(static_cast<char>(0x80 | (code & 0x3F)));
      } else if (code < 0x10000) {
        emit(static_cast<char>(0xE0 | (code >> 12)));
        emit(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
        emit(static_cast<char>(0x80 | (code & 0x3F)));
      } else {
        emit(static_cast<char>(0xF0 | (code >> 18)));
        emit(static_cast<char>(0x80 | ((code >> 12) & 0x3F)));
        emit(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
        emit(static_cast<char>(0x80 | (code & 0x3F)));
      }
    };
    ++pos_;  // opening quote
    while (true) {
      if (pos_ >= text_.size()) return Error("unterminated string");
      const size_t start = pos_;
      const char c = text_[pos_++];
      if (c == '"') break;
      const unsigned byte = static_cast<unsigned char>(c);
      if (byte < 0x20) return ErrorAt(start, "control character in string");
      if (byte >= 0x80) {
        const size_t n = Utf8SequenceLength(text_, start);
        if (n == 0) return ErrorAt(start, "invalid UTF-8");
        for (size_t k = 0; k < n; ++k) emit(text_[start + k]);
        pos_ = start + n;
        continue;
      }
      if (c != '\\') {
        emit(c);
        continue;
      }
      if (pos_ >= text_.size()) return Error("unterminated escape");
      const char e = text_[pos_++];
      switch (e) {
        case '"': emit('"'); break;
        case '\\': emit('\\'); break;
        case '/': emit('/'); break;
        case 'b': emit('\b'); break;
        case 'f': emit('\f'); break;
        case 'n': emit('\n'); break;
        case 'r': emit('\r'); break;
        case 't': emit('\t'); break;
        case 'u': {
          uint32_t code = 0;
          absl::Status status = ParseHex4(code);
          if (!status.ok()) return status;
          if (code >= 0xD800 && code < 0xDC00) {  // high surrogate: needs a low one
            uint32_t low = 0;
            if (!Consume("\\u")) return ErrorAt(start, "unpaired high surrogate in \\u escape");
            status = ParseHex4(low);
            if (!status.ok()) return status;
            if (low < 0xDC00 || low >= 0xE000) return ErrorAt(start, "unpaired high surrogate in \\u escape");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          } else if (code >= 0xDC00 && code < 0xE000) {
            return ErrorAt(start, "unpaired low surrogate in \\u escape");
          }
          emit_code_point(code);
          break;
        }
        default:
          return ErrorAt(start, "bad escape character");
      }
    }
    if (builder_ == nullptr) {
      char_bytes_ += length;
      out = absl::string_view();
      return absl::OkStatus();
    }
    if (overflow) return PassesDisagree();
    builder_->CommitString(length);
    out = length > 0 ? absl::string_view(room, length) : absl::string_view();
    return absl::OkStatus();
  }

  absl::Status ParseNumber(JsonValue& out) {
    const size_t start = pos_;
    auto digits = [&] {
      const size_t begin = pos_;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      return pos_ - begin;
    };
    if (text_[pos_] == '-') ++pos_;
    if (pos_ < text_.size() && text_[pos_] == '0') {
      ++pos_;
    } else if (digits() == 0) {
      return Error("bad number");
    }
    if (pos_ < text_.size() && text_[pos_] == '.') {
      ++pos_;
      if (digits() == 0) return Error("bad number: no digits after '.'");
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      if (digits() == 0) return Error("bad number: no exponent digits");
    }
    double value = 0.0;
    if (!absl::SimpleAtod(text_.substr(start, pos_ - start), &value) || !std::isfinite(value)) {
      return ErrorAt(start, "number out of range");
    }
    out.type_ = JsonValue::Type::kNumber;
    out.number_ = value;
    return absl::OkStatus();
  }

  absl::string_view text_;
  std::vector<uint32_t>& container_sizes_;  // pre-order; filled by the first pass
  JsonTreeBuilder* builder_;                // null in the first pass
  size_t next_container_ = 0;
  size_t node_bytes_ = 0;
  size_t char_bytes_ = 0;
  size_t pos_ = 0;
};

absl::StatusOr<JsonValue> JsonValue::Parse(absl::string_view text) {
  if (text.size() > kMaxInputBytes) {
    return absl::InvalidArgumentError(absl::StrCat("JSON: input of ", text.size(), " bytes is over the ",
                                                   kMaxInputBytes, "-byte cap (JsonValue::kMaxInputBytes)"));
  }
  std::vector<uint32_t> container_sizes;
  JsonParser check(text, container_sizes, nullptr);
  JsonValue scratch;
  absl::Status status = check.ParseDocument(scratch);
  if (!status.ok()) return status;
  JsonTreeBuilder builder(check.node_bytes(), check.char_bytes());
  JsonValue root;
  status = JsonParser(text, container_sizes, &builder).ParseDocument(root);
  if (!status.ok()) return status;
  if (!builder.Adopt(root)) return absl::InternalError("JSON: the root does not start the tree's block");
  return root;
}

JsonValue::JsonValue(const JsonValue& other) {
  size_t node_bytes = 0;
  size_t char_bytes = 0;
  JsonTreeBuilder::Measure(other, node_bytes, char_bytes);
  JsonTreeBuilder builder(node_bytes, char_bytes);
  builder.CopyInto(other, *this);
  // CopyInto allocates this value's children (or bytes) first, so they start
  // the block and Adopt cannot fail; if it did, the tree would be freed
  // under us, so keep nothing rather than dangle.
  if (!builder.Adopt(*this)) *this = JsonValue();
}

JsonValue& JsonValue::operator=(const JsonValue& other) {
  if (this != &other) *this = JsonValue(other);
  return *this;
}

JsonValue::JsonValue(JsonValue&& other) noexcept { TakeFrom(other); }

JsonValue& JsonValue::operator=(JsonValue&& other) noexcept {
  if (this != &other) {
    Release();
    TakeFrom(other);
  }
  return *this;
}

void JsonValue::TakeFrom(JsonValue& other) {
  type_ = other.type_;
  bool_ = other.bool_;
  owns_block_ = other.owns_block_;
  size_ = other.size_;
  switch (type_) {
    case Type::kNull:
    case Type::kBool: break;
    case Type::kNumber: number_ = other.number_; break;
    case Type::kString: chars_ = other.chars_; break;
    case Type::kArray: elements_ = other.elements_; break;
    case Type::kObject: members_ = other.members_; break;
  }
  other.type_ = Type::kNull;
  other.owns_block_ = false;
  other.size_ = 0;
  other.number_ = 0.0;
}

JsonValue::~JsonValue() { Release(); }

void JsonValue::Release() {
  if (!owns_block_) return;
  // The root's children (or bytes) start its block; values inside the block
  // own nothing, so no destructor of theirs needs to run.
  const void* block = type_ == Type::kString ? static_cast<const void*>(chars_)
                      : type_ == Type::kArray ? static_cast<const void*>(elements_)
                                              : static_cast<const void*>(members_);
  ::operator delete(const_cast<void*>(block));
  owns_block_ = false;
}

bool JsonValue::is_integer() const {
  // 2^63 is exactly representable; values in [-2^63, 2^63) convert safely.
  return type_ == Type::kNumber && std::trunc(number_) == number_ &&
         number_ >= -9223372036854775808.0 && number_ < 9223372036854775808.0;
}

const JsonValue* JsonValue::Find(absl::string_view key) const {
  for (const Member& member : object()) {
    if (member.first == key) return &member.second;
  }
  return nullptr;
}

const char* JsonValue::TypeName(Type type) {
  switch (type) {
    case Type::kNull: return "null";
    case Type::kBool: return "bool";
    case Type::kNumber: return "number";
    case Type::kString: return "string";
    case Type::kArray: return "array";
    case Type::kObject: return "object";
  }
  return "?";
}

}  // namespace kvc
