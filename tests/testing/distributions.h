// Input distributions the kernels must handle exactly and at the speed of
// N(0,1) data: realistic N(0,1), all zeros, huge magnitudes, tiny ones (down
// into the subnormal range, where every fp32 operation would cost Intel
// cores a microcode assist) and a per-element mix of all of them.
#ifndef KVC_TESTS_TESTING_DISTRIBUTIONS_H_
#define KVC_TESTS_TESTING_DISTRIBUTIONS_H_

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kvc/number_formats.h"

namespace kvc::testing {

enum class Distribution { kNormal, kZeros, kHuge, kTiny, kMixed };

inline const std::vector<Distribution>& AllDistributions() {
  static const std::vector<Distribution> all = {Distribution::kNormal, Distribution::kZeros, Distribution::kHuge,
                                                Distribution::kTiny, Distribution::kMixed};
  return all;
}

inline std::string Name(Distribution d) {
  switch (d) {
    case Distribution::kNormal: return "normal";
    case Distribution::kZeros: return "zeros";
    case Distribution::kHuge: return "huge";
    case Distribution::kTiny: return "tiny";
    case Distribution::kMixed: return "mixed";
  }
  return "?";
}

// n values: N(0,1) times 2^huge_exp (kHuge) or 2^tiny_exp (kTiny, default:
// about half of them subnormal in fp32); kMixed picks one of the four per
// element.
inline std::vector<float> Floats(Distribution d, size_t n, std::mt19937& rng, int huge_exp = 100, int tiny_exp = -138) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) {
    Distribution kind = d;
    if (d == Distribution::kMixed) kind = static_cast<Distribution>(rng() % 4);
    const float g = normal(rng);
    switch (kind) {
      case Distribution::kNormal: x = g; break;
      case Distribution::kZeros: x = (rng() & 1) ? 0.0f : -0.0f; break;
      case Distribution::kHuge: x = std::ldexp(g, huge_exp); break;
      default: x = static_cast<float>(std::ldexp(static_cast<double>(g), tiny_exp)); break;
    }
  }
  return v;
}

// The same as bf16 (kTiny default: around 2^-128, many bf16 subnormals).
inline std::vector<Bf16> Bf16s(Distribution d, size_t n, std::mt19937& rng, int huge_exp = 100, int tiny_exp = -128) {
  const std::vector<float> f = Floats(d, n, rng, huge_exp, tiny_exp);
  std::vector<Bf16> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = Bf16{Bf16BitsFromF32(f[i])};
  return out;
}

}  // namespace kvc::testing

#endif  // KVC_TESTS_TESTING_DISTRIBUTIONS_H_
