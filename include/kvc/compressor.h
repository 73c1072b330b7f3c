// The compressor that turns projected tokens into compressed entries (spec
// §3): per-channel softmax pooling over a window, bf16, RMSNorm, RoPE at the
// window's first position, then FP8 (main, 584-byte rows) or Hadamard + FP4
// (indexer, 68-byte keys).
//
// This header holds the geometry, the RoPE tables (§3a) and the scalar
// reference of each step; src/compressor_kernels.cc has the SIMD versions,
// tested bit-identical to these on every target. The cache runs them
// (cache.h: LayerTokens carries the projections).
#ifndef KVC_COMPRESSOR_H_
#define KVC_COMPRESSOR_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvc/model_spec.h"
#include "kvc/number_formats.h"

namespace kvc {

// One compressor stream: entry i pools tokens [i*ratio, i*ratio + ratio)
// (and, with overlap, the first halves of the previous window's tokens).
struct CompressorGeometry {
  int ratio = 0;         // m: 4 (CSA) or 128 (HCA)
  int dim = 0;           // d: 512 (main) or 128 (indexer)
  bool overlap = false;  // CSA's two-half scheme: projections are 2*d wide
  int width() const { return overlap ? 2 * dim : dim; }  // c*d floats per projection
  int slots() const { return overlap ? 2 * ratio : ratio; }
  // Token rows of state kept so the next entry can be formed: the open window
  // and, with overlap, the previous one.
  int span() const { return overlap ? 2 * ratio : ratio; }
};

CompressorGeometry MainCompressor(LayerKind kind, int head_dim);  // CSA or HCA
CompressorGeometry IndexerCompressor(int index_dim);              // CSA's indexer

// ---------------------------------------------------------------------------
// RoPE tables (spec §3a).

// (cos, sin) of every pair (j = 0..31) at any position, for one RopeSpec:
// the engine's table if it gave one, else kvc's own: freq_j = 1 / base^(2j/64)
// in fp32 (fp32 pow, fp32 division, as the official code), the YaRN blend in
// fp32 in the official order, angle fp32(p) * freq_j in fp32, and correctly
// rounded cos and sin of that angle.
class RopeTable {
 public:
  explicit RopeTable(const RopeSpec& spec);
  // Writes 64 floats: cos_sin[2j] = cos θ_j, cos_sin[2j + 1] = sin θ_j.
  // Requires 0 <= position (< the engine table's positions, if any).
  void At(int64_t position, float* cos_sin) const;
  const float* frequencies() const { return freq_; }

 private:
  float freq_[32];
  absl::Span<const float> engine_table_;
};

// ---------------------------------------------------------------------------
// Scalar reference.

// exp(x) for x <= 0 as used by the softmax: Cody-Waite reduction and a
// degree-6 polynomial, every operation a separate fp32 op (so the SIMD
// version matches bit for bit); 0 below -87. Within 2 ulp of exp.
inline float SoftmaxExp(float x) {
  if (!(x >= -87.0f)) return 0.0f;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  return y * F32FromBits(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// One token's contribution to a window: kv and score rows (score without
// ape) and the ape row to add (null if score already includes it).
struct PoolSlot {
  const float* kv;
  const float* score;
  const float* ape;
};

// out[ch] = Σ_j w_j kv_j[ch] with w_j = exp(s_j - max s) / Σ exp(s - max)
// per channel (s_j = score_j + ape_j), over `n` slots and `channels` channels;
// sums run over j in order.
inline void PoolRef(const PoolSlot* slots, int n, int64_t channels, float* out) {
  for (int64_t ch = 0; ch < channels; ++ch) {
    float s[256], e[256];
    float max = -INFINITY;
    for (int j = 0; j < n; ++j) {
      s[j] = slots[j].ape != nullptr ? slots[j].score[ch] + slots[j].ape[ch] : slots[j].score[ch];
      max = s[j] > max ? s[j] : max;
    }
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
      e[j] = SoftmaxExp(s[j] - max);
      sum += e[j];
    }
    float acc = 0.0f;
    for (int j = 0; j < n; ++j) acc += (e[j] / sum) * slots[j].kv[ch];
    out[ch] = acc;
  }
}

// Σ x_i² in kvc's canonical order: 16 running sums (x_i into sum i mod 16),
// then halving (sum k += sum k+8, k+4, k+2, k+1). `n` a multiple of 16.
inline float SumSquaresRef(const float* x, int n) {
  float acc[16] = {};
  for (int i = 0; i < n; ++i) acc[i % 16] += x[i] * x[i];
  for (int width = 8; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  return acc[0];
}

// RoPE on `x`'s last 64 values (pairs 2j, 2j+1), each product rounded, then
// bf16: (a, b) -> (a*c - b*s, a*s + b*c).
inline void RotateLast64(float* x, int dim, const float* cos_sin) {
  float* r = x + dim - 64;
  for (int j = 0; j < 32; ++j) {
    const float a = r[2 * j], b = r[2 * j + 1];
    const float c = cos_sin[2 * j], s = cos_sin[2 * j + 1];
    r[2 * j] = RoundToBf16(a * c - b * s);
    r[2 * j + 1] = RoundToBf16(a * s + b * c);
  }
}

// Steps 3-4 of spec §3 on a pooled row: y = bf16(pooled);
// r = 1 / sqrt(mean(y²) + eps); out = bf16(weight * (y * r)); RoPE on the
// last 64 dims at the entry's position -> bf16 row of `dim` values.
inline void NormRopeRef(const float* pooled, int dim, const float* weight, float eps, const float* cos_sin,
                        Bf16* out) {
  float y[512];
  for (int i = 0; i < dim; ++i) y[i] = RoundToBf16(pooled[i]);
  const float mean = SumSquaresRef(y, dim) / static_cast<float>(dim);
  const float r = 1.0f / std::sqrt(mean + eps);
  for (int i = 0; i < dim; ++i) y[i] = RoundToBf16(weight[i] * (y[i] * r));
  RotateLast64(y, dim, cos_sin);
  for (int i = 0; i < dim; ++i) out[i] = ToBf16(y[i]);
}

// ---------------------------------------------------------------------------
// SIMD kernels (dynamic dispatch), bit-identical to the references above.
// Preconditions are the caller's (the cache validates): finite inputs,
// n <= 256 slots, dim a multiple of 64 and <= 512. Finite inputs can still
// give non-finite outputs (a pooled sum beyond bf16, a huge norm weight,
// RoPE of values near bf16's limit); the cache checks every output row
// before it stores anything.

void PoolChannels(const PoolSlot* slots, int n, int64_t channels, float* out);
void NormRope(const float* pooled, int dim, const float* weight, float eps, const float* cos_sin, Bf16* out);

}  // namespace kvc

#endif  // KVC_COMPRESSOR_H_
