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

// A page of n FP4 index keys as PageFooterRows lays them out (n x 64 code
// bytes, then n x 4 UE8M0 scale bytes): random codes, scale bytes uniform in
// [lo, hi]; with zero_one_in > 0, one scale byte in zero_one_in (at random)
// is 0 instead (a block scaled to 2^-127). Keys whose block exponents spread
// or sit at the range's ends: what the scaled scoring paths must handle.
inline std::vector<uint8_t> RandomIndexKeyPage(int64_t n, int lo, int hi, int zero_one_in, std::mt19937& rng) {
  std::vector<uint8_t> page(static_cast<size_t>(n) * 68);
  const size_t codes = static_cast<size_t>(n) * 64;
  std::uniform_int_distribution<int> byte(lo, hi);
  for (size_t i = 0; i < codes; ++i) page[i] = static_cast<uint8_t>(rng());
  for (size_t i = codes; i < page.size(); ++i) {
    page[i] = zero_one_in > 0 && rng() % static_cast<unsigned>(zero_one_in) == 0 ? 0 : static_cast<uint8_t>(byte(rng));
  }
  return page;
}

}  // namespace kvc::testing

#endif  // KVC_TESTS_TESTING_DISTRIBUTIONS_H_
