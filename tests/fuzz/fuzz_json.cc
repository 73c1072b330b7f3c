// libFuzzer: the JSON reader must reject or accept any bytes without UB. An
// accepted document must be walkable, hold only valid UTF-8 (checked here by
// decoding, independently of the reader's table), fit the memory bound
// json.h documents, and copy deeply.
#include <cstddef>
#include <cstdint>

#include "src/json.h"

namespace {

// Valid UTF-8 (RFC 3629): shortest form, no surrogates, nothing above U+10FFFF.
bool ValidUtf8(absl::string_view s) {
  static constexpr uint32_t kMinForLength[] = {0, 0, 0x80, 0x800, 0x10000};
  for (size_t i = 0; i < s.size();) {
    const unsigned lead = static_cast<unsigned char>(s[i]);
    const size_t n = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || n > s.size() - i) return false;
    uint32_t code = n == 1 ? lead : lead & (0x7Fu >> n);
    for (size_t k = 1; k < n; ++k) {
      const unsigned c = static_cast<unsigned char>(s[i + k]);
      if ((c >> 6) != 0x2) return false;
      code = (code << 6) | (c & 0x3F);
    }
    if (code < kMinForLength[n] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return false;
    i += n;
  }
  return true;
}

// Counts values and string bytes; adds the tree's bytes below `v` to `tree_bytes`.
size_t Walk(const kvc::JsonValue& v, int depth, size_t& tree_bytes) {
  if (depth >= kvc::JsonValue::kMaxDepth || !ValidUtf8(v.string())) __builtin_trap();
  size_t n = 1 + v.string().size();
  tree_bytes += v.string().size() + v.array().size() * sizeof(kvc::JsonValue) +
                v.object().size() * sizeof(kvc::JsonValue::Member);
  for (const kvc::JsonValue& e : v.array()) n += Walk(e, depth + 1, tree_bytes);
  for (const kvc::JsonValue::Member& m : v.object()) {
    if (!ValidUtf8(m.first)) __builtin_trap();
    tree_bytes += m.first.size();
    n += m.first.size() + Walk(m.second, depth + 1, tree_bytes);
  }
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::StatusOr<kvc::JsonValue> v =
      kvc::JsonValue::Parse(absl::string_view(reinterpret_cast<const char*>(data), size));
  if (!v.ok()) return 0;
  size_t tree_bytes = 0;
  const size_t values = Walk(*v, 0, tree_bytes);
  if (tree_bytes > 8 * size) __builtin_trap();  // json.h: at most 8 bytes per input byte
  const kvc::JsonValue copy = *v;
  size_t copy_bytes = 0;
  if (Walk(copy, 0, copy_bytes) != values || copy_bytes != tree_bytes) __builtin_trap();
  return 0;
}
