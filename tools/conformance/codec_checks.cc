// Codec checks: element codecs, the FP8 and FP4 block rules and Hadamard-128
// against codec.safetensors, bit for bit. FP8 rows and index keys go through
// the production SIMD kernels (row_kernels.h); the rest through the scalar
// codecs they are built on.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvc/number_formats.h"
#include "kvc/reference_codecs.h"
#include "kvc/row_kernels.h"
#include "src/status.h"
#include "tools/conformance/conformance.h"

namespace kvc::conformance {
namespace {

std::string Figure(int64_t mismatches, int64_t total, const char* unit, int64_t first) {
  std::string figure = absl::StrCat(total, " ", unit, ", ", mismatches, " differ");
  if (mismatches > 0) absl::StrAppend(&figure, " (first at ", first, ")");
  return figure;
}

template <typename T>
void Compare(Report& report, const GoldenCase& golden, const char* check, const std::vector<T>& got,
             const std::vector<T>& expected, const char* unit) {
  int64_t first = -1;
  const int64_t mismatches = CountMismatches(got, expected, &first);
  report.Add(golden.name(), check, mismatches == 0 && !expected.empty(),
             Figure(mismatches, static_cast<int64_t>(expected.size()), unit, first));
}

std::vector<uint16_t> Bf16BitsOf(const std::vector<float>& values) {
  std::vector<uint16_t> bits(values.size());
  for (size_t i = 0; i < values.size(); ++i) bits[i] = Bf16BitsFromF32(values[i]);
  return bits;
}

// --- element codecs --------------------------------------------------------

absl::Status CheckE4M3Table(const GoldenCase& golden, Report& report) {
  KVC_ASSIGN_OR_RETURN(std::vector<float> table, golden.file().Get<float>("e4m3_table", DType::kF32, {256}));
  std::vector<uint32_t> got(256), expected(256);
  for (int code = 0; code < 256; ++code) {
    const float value = F32FromE4M3(static_cast<uint8_t>(code));
    // NaN payloads are not part of the format: any NaN matches any NaN.
    const bool both_nan = std::isnan(value) && std::isnan(table[static_cast<size_t>(code)]);
    got[static_cast<size_t>(code)] = both_nan ? 0x7FC00000u : F32Bits(value);
    expected[static_cast<size_t>(code)] = both_nan ? 0x7FC00000u : F32Bits(table[static_cast<size_t>(code)]);
  }
  Compare(report, golden, "e4m3_table", got, expected, "codes");
  return absl::OkStatus();
}

// Element-wise check: `expected[i]` must equal `fn(in[i])` bit for bit, for
// 1-D tensors `in_name` and `expected_name` of equal length.
template <typename In, typename Out, typename Fn>
absl::Status CheckElementwise(const GoldenCase& golden, Report& report, const char* check,
                              const char* in_name, DType in_dtype, const char* expected_name,
                              DType expected_dtype, const Fn& fn) {
  const TensorInfo* info = nullptr;
  KVC_ASSIGN_OR_RETURN(std::vector<In> in, golden.file().Get<In>(in_name, in_dtype, {-1}, &info));
  KVC_ASSIGN_OR_RETURN(std::vector<Out> expected,
                       golden.file().Get<Out>(expected_name, expected_dtype, {info->shape[0]}));
  std::vector<Out> got(in.size());
  for (size_t i = 0; i < in.size(); ++i) got[i] = fn(in[i]);
  Compare(report, golden, check, got, expected, "values");
  return absl::OkStatus();
}

absl::Status CheckE4M3Cast(const GoldenCase& golden, Report& report) {
  return CheckElementwise<float, uint8_t>(golden, report, "e4m3_cast", "e4m3_cast_in", DType::kF32,
                                          "e4m3_cast_codes", DType::kU8, E4M3FromF32);
}

absl::Status CheckBf16Cast(const GoldenCase& golden, Report& report) {
  return CheckElementwise<float, int16_t>(golden, report, "bf16_cast", "bf16_cast_in", DType::kF32,
                                          "bf16_cast_bits", DType::kI16, [](float x) {
                                            return static_cast<int16_t>(Bf16BitsFromF32(x));
                                          });
}

absl::Status CheckE2M1Ties(const GoldenCase& golden, Report& report) {
  // Scale 1: plain E2M1 rounding, with the block rule's clamp. Compared as
  // bits, so -0.0 and +0.0 differ.
  const BlockScale unit = BlockScaleFromByte(127);
  return CheckElementwise<float, uint32_t>(golden, report, "e2m1_ties", "e2m1_tie_in", DType::kF32,
                                           "e2m1_tie_out", DType::kF32, [&](float x) {
                                             return F32Bits(F32FromE2M1(Fp4Encode(x, unit)));
                                           });
}

// --- FP8 rows through the SIMD kernels -------------------------------------

absl::Status CheckFp8Rows(const GoldenCase& golden, Report& report) {
  const TensorInfo* info = nullptr;
  KVC_ASSIGN_OR_RETURN(std::vector<uint16_t> in, golden.file().Get<uint16_t>("fp8_in", DType::kBF16, {-1, -1}, &info));
  const int64_t rows = info->shape[0], width = info->shape[1];
  if (width <= 0 || width > kNopeDim || width % kFp8BlockSize != 0) {
    return absl::InvalidArgumentError(absl::StrCat("fp8_in has ", width, " columns; expected a multiple of 64 up to 448"));
  }
  const int64_t blocks = width / kFp8BlockSize;
  KVC_ASSIGN_OR_RETURN(std::vector<uint8_t> codes, golden.file().Get<uint8_t>("fp8_codes", DType::kU8, {rows, width}));
  KVC_ASSIGN_OR_RETURN(std::vector<uint8_t> scales, golden.file().Get<uint8_t>("fp8_scale_bytes", DType::kU8, {rows, blocks}));
  KVC_ASSIGN_OR_RETURN(std::vector<uint16_t> values, golden.file().Get<uint16_t>("fp8_out", DType::kBF16, {rows, width}));

  // Each golden row becomes the leading dims of a 512-dim row (rest zero).
  std::vector<Bf16> padded(static_cast<size_t>(rows) * kHeadDim, Bf16{0});
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < width; ++i) padded[static_cast<size_t>(r * kHeadDim + i)].bits = in[static_cast<size_t>(r * width + i)];
  }
  std::vector<uint8_t> stored(static_cast<size_t>(rows) * sizeof(KvRowFp8));
  const PackedRows view = ContiguousRows(RowFormat::kKvFp8, stored.data(), rows);
  KVC_RETURN_IF_ERROR(QuantizeKvRows(padded, view));
  std::vector<Bf16> dequantized(padded.size());
  KVC_RETURN_IF_ERROR(DequantizeKvRows(view, absl::MakeSpan(dequantized)));

  std::vector<uint8_t> got_codes, got_scales;
  std::vector<uint16_t> got_values;
  for (int64_t r = 0; r < rows; ++r) {
    got_codes.insert(got_codes.end(), view.row_data(r), view.row_data(r) + width);
    got_scales.insert(got_scales.end(), view.row_scales(r), view.row_scales(r) + blocks);
    for (int64_t i = 0; i < width; ++i) got_values.push_back(dequantized[static_cast<size_t>(r * kHeadDim + i)].bits);
  }
  Compare(report, golden, "fp8_codes", got_codes, codes, "codes");
  Compare(report, golden, "fp8_scales", got_scales, scales, "scales");
  Compare(report, golden, "fp8_values", got_values, values, "values");
  return absl::OkStatus();
}

// --- Hadamard and FP4 ------------------------------------------------------

absl::Status CheckHadamardAndFp4(const GoldenCase& golden, Report& report) {
  const TensorInfo* info = nullptr;
  KVC_ASSIGN_OR_RETURN(std::vector<uint16_t> had_in,
                       golden.file().Get<uint16_t>("had_in", DType::kBF16, {-1, kIndexDim}, &info));
  const int64_t rows = info->shape[0];
  KVC_ASSIGN_OR_RETURN(std::vector<uint16_t> had_out, golden.file().Get<uint16_t>("had_out", DType::kBF16, {rows, kIndexDim}));
  KVC_ASSIGN_OR_RETURN(std::vector<uint8_t> codes, golden.file().Get<uint8_t>("fp4_codes", DType::kU8, {rows, kIndexDim}));
  KVC_ASSIGN_OR_RETURN(std::vector<uint8_t> scales, golden.file().Get<uint8_t>("fp4_scale_bytes", DType::kU8, {rows, 4}));
  KVC_ASSIGN_OR_RETURN(std::vector<uint16_t> values, golden.file().Get<uint16_t>("fp4_out", DType::kBF16, {rows, kIndexDim}));

  // Hadamard-128 alone (fp32 butterflies, 128^-0.5, bf16).
  std::vector<float> rotated(had_in.size());
  for (size_t i = 0; i < had_in.size(); ++i) rotated[i] = F32FromBf16Bits(had_in[i]);
  for (int64_t r = 0; r < rows; ++r) HadamardTransformRef(rotated.data() + r * kIndexDim);
  Compare(report, golden, "hadamard", Bf16BitsOf(rotated), had_out, "values");

  // FP4 block rule alone, on the official rotated values.
  std::vector<uint8_t> got_codes, got_scales;
  std::vector<float> got_values;
  for (int64_t r = 0; r < rows; ++r) {
    float x[kIndexDim];
    for (int i = 0; i < kIndexDim; ++i) x[i] = F32FromBf16Bits(had_out[static_cast<size_t>(r * kIndexDim + i)]);
    IndexKeyFp4 key;
    QuantizeFp4Ref(x, key.codes, key.scales);
    float dequantized[kIndexDim];
    DequantizeIndexKeyRef(key.codes, key.scales, dequantized);
    for (int i = 0; i < kIndexDim; ++i) {
      got_codes.push_back(static_cast<uint8_t>((key.codes[i / 2] >> (4 * (i % 2))) & 0xF));
      got_values.push_back(dequantized[i]);
    }
    got_scales.insert(got_scales.end(), key.scales, key.scales + 4);
  }
  Compare(report, golden, "fp4_codes", got_codes, codes, "codes");
  Compare(report, golden, "fp4_scales", got_scales, scales, "scales");
  Compare(report, golden, "fp4_values", Bf16BitsOf(got_values), values, "values");

  // The production kernel end to end: had_in -> 68-byte keys.
  std::vector<Bf16> keys_in(had_in.size());
  for (size_t i = 0; i < had_in.size(); ++i) keys_in[i].bits = had_in[i];
  std::vector<uint8_t> stored(static_cast<size_t>(rows) * sizeof(IndexKeyFp4));
  const PackedRows view = ContiguousRows(RowFormat::kIndexFp4, stored.data(), rows);
  KVC_RETURN_IF_ERROR(QuantizeIndexKeys(keys_in, view));
  std::vector<uint8_t> kernel_bytes, expected_bytes;
  for (int64_t r = 0; r < rows; ++r) {
    kernel_bytes.insert(kernel_bytes.end(), view.row_data(r), view.row_data(r) + sizeof(IndexKeyFp4));
    for (int k = 0; k < kIndexDim / 2; ++k) {
      const size_t at = static_cast<size_t>(r * kIndexDim + 2 * k);
      expected_bytes.push_back(static_cast<uint8_t>(codes[at] | (codes[at + 1] << 4)));
    }
    for (int b = 0; b < 4; ++b) expected_bytes.push_back(scales[static_cast<size_t>(r * 4 + b)]);
  }
  Compare(report, golden, "index_key_kernel", kernel_bytes, expected_bytes, "key bytes");
  return absl::OkStatus();
}

}  // namespace

void RunCodecChecks(const GoldenCase& golden, Report& report) {
  struct Check {
    const char* name;  // reported if the check cannot read its inputs
    absl::Status (*run)(const GoldenCase&, Report&);
  };
  const Check checks[] = {
      {"e4m3_table", CheckE4M3Table}, {"e4m3_cast", CheckE4M3Cast},
      {"bf16_cast", CheckBf16Cast},   {"e2m1_ties", CheckE2M1Ties},
      {"fp8_rows", CheckFp8Rows},     {"hadamard_fp4", CheckHadamardAndFp4},
  };
  for (const Check& check : checks) {
    const absl::Status status = check.run(golden, report);
    if (!status.ok()) report.Error(golden.name(), check.name, status);
  }
}

}  // namespace kvc::conformance
