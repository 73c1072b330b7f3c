// A program an engine might write first: quantize one row into the cache's
// 584-byte format and read it back. Built by both packaging tests.
#include <cmath>
#include <cstdio>
#include <vector>

#include "kvc/row_kernels.h"

int main() {
  std::vector<kvc::Bf16> row(kvc::kHeadDim);
  for (int i = 0; i < kvc::kHeadDim; ++i) row[i] = kvc::ToBf16(std::sin(0.1f * static_cast<float>(i)));
  kvc::KvRowFp8 stored;
  auto* bytes = reinterpret_cast<uint8_t*>(&stored);
  absl::Status status = kvc::QuantizeKvRows(row, kvc::ContiguousRows(kvc::RowFormat::kKvFp8, bytes, 1));
  std::vector<float> back(kvc::kHeadDim);
  if (status.ok()) {
    status = kvc::DequantizeKvRows(kvc::ContiguousRows(kvc::RowFormat::kKvFp8, static_cast<const uint8_t*>(bytes), 1),
                                   absl::MakeSpan(back));
  }
  if (!status.ok()) {
    std::printf("error: %s\n", status.ToString().c_str());
    return 1;
  }
  double worst = 0;
  for (int i = 0; i < kvc::kHeadDim; ++i) worst = std::fmax(worst, std::fabs(back[i] - kvc::ToF32(row[i])));
  std::printf("consumer: 584-byte row round trip, max error %.4f, SIMD target %s\n", worst,
              kvc::ActiveSimdTargetName().c_str());
  return worst < 0.07 ? 0 : 1;  // E4M3: at most half an ulp of 3 mantissa bits near |x| = 1
}
