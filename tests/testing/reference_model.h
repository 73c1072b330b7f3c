// The plain full-precision reference the cache tests compare against: what a
// stored row or a window ring must read back as, computed with the scalar
// reference codecs from the rows an engine appended.
#ifndef KVC_TESTS_TESTING_REFERENCE_MODEL_H_
#define KVC_TESTS_TESTING_REFERENCE_MODEL_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kvc/reference_codecs.h"

namespace kvc::testing {

// Quantize-dequantize of 512-dim rows by the scalar reference, as bf16 bits.
inline std::vector<uint16_t> ReferenceBits(const std::vector<Bf16>& rows) {
  std::vector<uint16_t> bits;
  bits.reserve(rows.size());
  for (size_t r = 0; r < rows.size() / kHeadDim; ++r) {
    KvRowFp8 stored;
    QuantizeKvRowRef(&rows[r * kHeadDim], stored.nope_codes, stored.scales);
    float values[kHeadDim];
    DequantizeKvRowRef(stored.nope_codes, stored.scales, values);
    for (const float v : values) bits.push_back(Bf16BitsFromF32(v));
  }
  return bits;
}

// The window ring after appending `history` (row-major 512-dim rows): slot
// p mod window holds the stored row of the latest such position p; slots
// never written are zero.
inline std::vector<uint16_t> ExpectedWindow(const std::vector<Bf16>& history, int window) {
  const int64_t length = static_cast<int64_t>(history.size()) / kHeadDim;
  std::vector<uint16_t> out(static_cast<size_t>(window) * kHeadDim, 0);
  const int64_t first = std::max<int64_t>(0, length - window);
  const std::vector<Bf16> last(history.begin() + first * kHeadDim, history.end());
  const std::vector<uint16_t> stored = ReferenceBits(last);
  for (int64_t p = first; p < length; ++p) {
    std::copy_n(stored.begin() + (p - first) * kHeadDim, kHeadDim, out.begin() + (p % window) * kHeadDim);
  }
  return out;
}

}  // namespace kvc::testing

#endif  // KVC_TESTS_TESTING_REFERENCE_MODEL_H_
