// libFuzzer: the JSON reader must reject or accept any bytes without UB, and
// an accepted document must be walkable.
#include <cstddef>
#include <cstdint>

#include "kvc/json.h"

namespace {

size_t Walk(const kvc::JsonValue& v, int depth) {
  size_t n = 1 + v.string().size();
  for (const kvc::JsonValue& e : v.array()) n += Walk(e, depth + 1);
  for (const kvc::JsonValue::Member& m : v.object()) n += m.first.size() + Walk(m.second, depth + 1);
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::StatusOr<kvc::JsonValue> v =
      kvc::JsonValue::Parse(absl::string_view(reinterpret_cast<const char*>(data), size));
  if (v.ok()) (void)Walk(*v, 0);
  return 0;
}
