// Scalar reference codecs for whole rows: the definition every SIMD kernel in
// src/row_kernels.cc is tested against, bit for bit. Straightforward loops in
// the order of the spec (§3-§5); not meant to be fast.
//
// Preconditions (callers validate; see row_kernels.h): inputs finite, and for
// index keys |x| <= 2^120 so the Hadamard transform cannot overflow.
#ifndef KVC_REFERENCE_CODECS_H_
#define KVC_REFERENCE_CODECS_H_

#include <cstdint>
#include <cstring>

#include "kvc/number_formats.h"
#include "kvc/row_formats.h"

namespace kvc {

// fp32(128^-0.5), the factor applied after the Hadamard butterflies: the
// double 128**-0.5 rounded once to fp32, as the official code passes it.
constexpr float kHadamardScale = static_cast<float>(0.08838834764831845);

// ---------------------------------------------------------------------------
// KV rows (584 bytes).

// Quantizes one 512-dim bf16 row: dims 0..447 by the FP8 block rule in 7
// blocks of 64, dims 448..511 copied as bf16. Writes 576 data bytes and 8
// scale bytes (7 UE8M0 + one zero padding byte).
inline void QuantizeKvRowRef(const Bf16* in, uint8_t* data, uint8_t* scales) {
  for (int block = 0; block < kNopeDim / kFp8BlockSize; ++block) {
    const Bf16* x = in + block * kFp8BlockSize;
    float amax = 0.0f;
    for (int i = 0; i < kFp8BlockSize; ++i) {
      const float a = ToF32(x[i]) < 0.0f ? -ToF32(x[i]) : ToF32(x[i]);
      amax = a > amax ? a : amax;
    }
    const BlockScale s = Fp8BlockScale(amax);
    for (int i = 0; i < kFp8BlockSize; ++i) {
      data[block * kFp8BlockSize + i] = Fp8Encode(ToF32(x[i]), s);
    }
    scales[block] = s.byte;
  }
  std::memcpy(data + kNopeDim, in + kNopeDim, 2 * kRopeDim);
  scales[kNopeDim / kFp8BlockSize] = 0;
}

// Dequantizes one stored KV row to fp32: code * scale for dims 0..447, the
// stored bf16 for dims 448..511. Exact for every byte pattern (no UB): NaN
// codes and a 255 scale byte give NaN.
inline void DequantizeKvRowRef(const uint8_t* data, const uint8_t* scales, float* out) {
  for (int i = 0; i < kNopeDim; ++i) {
    out[i] = F32FromE4M3(data[i]) * F32FromUe8m0(scales[i / kFp8BlockSize]);
  }
  for (int i = 0; i < kRopeDim; ++i) {
    uint16_t bits;
    std::memcpy(&bits, data + kNopeDim + 2 * i, 2);
    out[kNopeDim + i] = F32FromBf16Bits(bits);
  }
}

// ---------------------------------------------------------------------------
// Hadamard-128 and index keys (68 bytes).

// In place: Sylvester/Walsh-Hadamard butterflies (stages h = 1, 2, ..., 64;
// pairs (k, k + h) in blocks of 2h become (a + b, a - b)) in fp32, then
// multiplied by fp32(128^-0.5). No bf16 rounding here.
inline void HadamardTransformRef(float* x) {
  for (int h = 1; h < kIndexDim; h *= 2) {
    for (int base = 0; base < kIndexDim; base += 2 * h) {
      for (int k = base; k < base + h; ++k) {
        const float a = x[k];
        const float b = x[k + h];
        x[k] = a + b;
        x[k + h] = a - b;
      }
    }
  }
  for (int i = 0; i < kIndexDim; ++i) x[i] *= kHadamardScale;
}

// FP4-quantizes 128 values (already rotated and bf16-rounded) by the FP4
// block rule in 4 blocks of 32; packs codes two per byte (element 2k in the
// low nibble of byte k) and writes 4 UE8M0 scale bytes.
inline void QuantizeFp4Ref(const float* x, uint8_t* codes, uint8_t* scales) {
  uint8_t nibbles[kIndexDim];
  for (int block = 0; block < kIndexDim / kFp4BlockSize; ++block) {
    const float* xb = x + block * kFp4BlockSize;
    float amax = 0.0f;
    for (int i = 0; i < kFp4BlockSize; ++i) {
      const float a = xb[i] < 0.0f ? -xb[i] : xb[i];
      amax = a > amax ? a : amax;
    }
    const BlockScale s = Fp4BlockScale(amax);
    for (int i = 0; i < kFp4BlockSize; ++i) {
      nibbles[block * kFp4BlockSize + i] = Fp4Encode(xb[i], s);
    }
    scales[block] = s.byte;
  }
  for (int k = 0; k < kIndexDim / 2; ++k) {
    codes[k] = static_cast<uint8_t>(nibbles[2 * k] | (nibbles[2 * k + 1] << 4));
  }
}

// Index key (or prepared index query) from a 128-dim bf16 vector: Hadamard,
// bf16 rounding, then FP4 (spec §3 step 5).
inline void QuantizeIndexKeyRef(const Bf16* in, uint8_t* codes, uint8_t* scales) {
  float x[kIndexDim];
  for (int i = 0; i < kIndexDim; ++i) x[i] = ToF32(in[i]);
  HadamardTransformRef(x);
  for (int i = 0; i < kIndexDim; ++i) x[i] = RoundToBf16(x[i]);
  QuantizeFp4Ref(x, codes, scales);
}

// Dequantizes one stored index key to fp32 (exact; a 255 scale byte gives NaN).
inline void DequantizeIndexKeyRef(const uint8_t* codes, const uint8_t* scales, float* out) {
  for (int i = 0; i < kIndexDim; ++i) {
    const uint8_t nibble = static_cast<uint8_t>((codes[i / 2] >> (4 * (i & 1))) & 0xF);
    out[i] = F32FromE2M1(nibble) * F32FromUe8m0(scales[i / kFp4BlockSize]);
  }
}

}  // namespace kvc

#endif  // KVC_REFERENCE_CODECS_H_
