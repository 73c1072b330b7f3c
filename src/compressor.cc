#include <cmath>
#include <cstdint>

#include "kvc/compressor.h"

namespace kvc {

CompressorGeometry MainCompressor(LayerKind kind, int head_dim) {
  return CompressorGeometry{CompressRatio(kind), head_dim, kind == LayerKind::kCsa};
}

CompressorGeometry IndexerCompressor(int index_dim) { return CompressorGeometry{4, index_dim, true}; }

RopeTable::RopeTable(const RopeSpec& spec) : engine_table_(spec.engine_table) {
  constexpr int kDim = 64;  // RoPE dims; 32 frequencies
  // fp32 throughout, as the official `1.0 / (base ** (arange(0, 64, 2) / 64))`
  // on float32 tensors: an fp32 pow, then an fp32 division. (A correctly
  // rounded 1/base^x differs from it by one ulp at some j, which then grows
  // with the position in every angle.)
  for (int j = 0; j < kDim / 2; ++j) {
    const float exponent = static_cast<float>(2 * j) / static_cast<float>(kDim);
    freq_[j] = 1.0f / std::pow(static_cast<float>(spec.theta), exponent);
  }
  const YarnSpec& yarn = spec.yarn;
  if (yarn.factor > 1.0) {
    // The official find_correction_range / linear_ramp_factor, in its precisions.
    const double pi = 3.14159265358979323846;
    auto correction = [&](double rotations) {
      return kDim * std::log(static_cast<double>(yarn.original_max_positions) / (rotations * 2 * pi)) /
             (2 * std::log(spec.theta));
    };
    const double low = std::max(std::floor(correction(yarn.beta_fast)), 0.0);
    double high = std::min(std::ceil(correction(yarn.beta_slow)), static_cast<double>(kDim - 1));
    if (low == high) high += 0.001;
    const float factor = static_cast<float>(yarn.factor);
    for (int j = 0; j < kDim / 2; ++j) {
      float ramp = (static_cast<float>(j) - static_cast<float>(low)) / (static_cast<float>(high) - static_cast<float>(low));
      ramp = ramp < 0.0f ? 0.0f : (ramp > 1.0f ? 1.0f : ramp);
      const float smooth = 1.0f - ramp;
      freq_[j] = freq_[j] / factor * (1.0f - smooth) + freq_[j] * smooth;
    }
  }
}

void RopeTable::At(int64_t position, float* cos_sin) const {
  if (!engine_table_.empty()) {
    const float* row = engine_table_.data() + position * 64;
    for (int i = 0; i < 64; ++i) cos_sin[i] = row[i];
    return;
  }
  const float p = static_cast<float>(position);
  for (int j = 0; j < 32; ++j) {
    const double angle = static_cast<double>(p * freq_[j]);  // the fp32 product, as the official code forms it
    cos_sin[2 * j] = static_cast<float>(std::cos(angle));
    cos_sin[2 * j + 1] = static_cast<float>(std::sin(angle));
  }
}

}  // namespace kvc
