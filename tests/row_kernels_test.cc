// Every SIMD kernel, on every target this CPU supports, gives exactly the
// bits of its scalar reference (reference_codecs.h); bad arguments are
// rejected and leave the output untouched.
#include "kvc/row_kernels.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "hwy/targets.h"
#include "kvc/reference_codecs.h"
#include "tests/testing/distributions.h"
#include "tests/testing/every_target.h"
#include "tests/testing/subnormal_traps.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

// Rows that exercise every code path: wide magnitude ranges per block (E4M3
// subnormals), zeros, blocks under the 1e-4 floor, exact-448 blocks, huge and
// tiny bf16 values.
std::vector<Bf16> TestRows(int rows, int dims, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_scale(-30.0f, 30.0f);
  std::vector<Bf16> out(static_cast<size_t>(rows) * dims);
  for (int r = 0; r < rows; ++r) {
    const int kind = r % 8;
    const float row_scale = std::exp2(log_scale(rng));
    for (int i = 0; i < dims; ++i) {
      float v = normal(rng) * row_scale;
      if (kind == 1) v = 0.0f;
      if (kind == 2) v *= 1e-12f / row_scale;                      // under the floor
      if (kind == 3) v = (i % 64 == 5) ? 448.0f : normal(rng);     // exact-448 blocks
      if (kind == 4) v = normal(rng) * std::exp2(static_cast<float>(i % 40 - 20));  // wide range
      if (kind == 5 && i % 7 == 0) v = -0.0f;
      if (kind == 6) v = normal(rng) * 1e30f;
      out[static_cast<size_t>(r) * dims + i] = ToBf16(v);
    }
  }
  return out;
}

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> out(n);
  for (uint8_t& b : out) b = static_cast<uint8_t>(rng());
  return out;
}

std::vector<uint32_t> BitsOf(const std::vector<float>& v) {
  std::vector<uint32_t> bits(v.size());
  std::memcpy(bits.data(), v.data(), v.size() * sizeof(float));
  return bits;
}

std::vector<uint16_t> BitsOf(const std::vector<Bf16>& v) {
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) bits[i] = v[i].bits;
  return bits;
}

class RowKernelsTest : public testing::EveryTargetTest {};
KVC_INSTANTIATE_EVERY_TARGET(RowKernelsTest);

TEST_P(RowKernelsTest, DispatchesToTheTargetUnderTest) {
  EXPECT_EQ(ActiveSimdTargetName(), SimdTargetName(GetParam()));
}

constexpr int kKv = static_cast<int>(sizeof(KvRowFp8));
constexpr int kKey = static_cast<int>(sizeof(IndexKeyFp4));

TEST_P(RowKernelsTest, QuantizeKvRowsMatchesReference) {
  const int rows = 203;
  const std::vector<Bf16> in = TestRows(rows, kHeadDim, 1);
  std::vector<uint8_t> simd(static_cast<size_t>(rows) * kKv, 0xAB);
  std::vector<uint8_t> ref(static_cast<size_t>(rows) * kKv, 0xCD);
  ASSERT_TRUE(QuantizeKvRows(in, ContiguousRows(RowFormat::kKvFp8, simd.data(), rows)).ok());
  for (int r = 0; r < rows; ++r) {
    QuantizeKvRowRef(in.data() + r * kHeadDim, ref.data() + r * kKv, ref.data() + r * kKv + 576);
  }
  ASSERT_EQ(simd, ref);
}

TEST_P(RowKernelsTest, QuantizeKvRowsIntoPageFooterLayout) {
  const int rows = 64;
  const std::vector<Bf16> in = TestRows(rows, kHeadDim, 2);
  std::vector<uint8_t> page(static_cast<size_t>(rows) * kKv);
  std::vector<uint8_t> contiguous(page.size());
  const PackedRows paged = PageFooterRows(RowFormat::kKvFp8, page.data(), rows);
  ASSERT_TRUE(QuantizeKvRows(in, paged).ok());
  ASSERT_TRUE(QuantizeKvRows(in, ContiguousRows(RowFormat::kKvFp8, contiguous.data(), rows)).ok());
  for (int r = 0; r < rows; ++r) {
    // Same row bytes, only the placement of the 8 scale bytes differs.
    ASSERT_EQ(0, std::memcmp(page.data() + r * 576, contiguous.data() + r * kKv, 576)) << r;
    ASSERT_EQ(0, std::memcmp(page.data() + rows * 576 + r * 8, contiguous.data() + r * kKv + 576, 8))
        << r;
  }
}

TEST_P(RowKernelsTest, DequantizeKvRowsMatchesReferenceOnAnyBytes) {
  // Arbitrary bytes (NaN codes, extreme scale bytes) and real rows.
  const int rows = 97;
  std::vector<uint8_t> stored = RandomBytes(static_cast<size_t>(rows) * kKv, 3);
  const std::vector<Bf16> in = TestRows(rows / 2, kHeadDim, 4);
  ASSERT_TRUE(QuantizeKvRows(in, ContiguousRows(RowFormat::kKvFp8, stored.data(), rows / 2)).ok());
  const ConstPackedRows view = ContiguousRows(RowFormat::kKvFp8, stored.data(), rows);

  std::vector<float> ref(static_cast<size_t>(rows) * kHeadDim);
  std::vector<Bf16> ref_bf16(ref.size());
  for (int r = 0; r < rows; ++r) {
    DequantizeKvRowRef(view.row_data(r), view.row_scales(r), ref.data() + r * kHeadDim);
  }
  for (size_t i = 0; i < ref.size(); ++i) ref_bf16[i] = ToBf16(ref[i]);

  std::vector<float> f32(ref.size());
  std::vector<Bf16> bf16(ref.size());
  ASSERT_TRUE(DequantizeKvRows(view, absl::MakeSpan(f32)).ok());
  ASSERT_TRUE(DequantizeKvRows(view, absl::MakeSpan(bf16)).ok());
  EXPECT_EQ(BitsOf(f32), BitsOf(ref));
  EXPECT_EQ(BitsOf(bf16), BitsOf(ref_bf16));
}

TEST_P(RowKernelsTest, QuantizeThenDequantizeIsExactOnRepresentableRows) {
  // Block b holds E4M3 values (|v| <= 256) times 2^(b-3), led by 256 * 2^(b-3):
  // its scale is exactly 2^(b-3), so the round trip must be lossless.
  const int rows = 16;
  std::vector<Bf16> in(static_cast<size_t>(rows) * kHeadDim);
  std::mt19937 rng(5);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < kHeadDim; ++i) {
      const float block_scale = std::exp2(static_cast<float>(i / 64 - 3));
      float v = static_cast<float>(rng() % 1000) / 8.0f;  // rope dims: any bf16
      if (i < kNopeDim) {
        const uint8_t code = static_cast<uint8_t>((rng() % 0x79) | (rng() % 2 ? 0x80 : 0));
        v = (i % 64 == 0 ? 256.0f : F32FromE4M3(code)) * block_scale;
      }
      in[static_cast<size_t>(r) * kHeadDim + i] = ToBf16(v);
    }
  }
  std::vector<uint8_t> stored(static_cast<size_t>(rows) * kKv);
  std::vector<Bf16> out(in.size());
  ASSERT_TRUE(QuantizeKvRows(in, ContiguousRows(RowFormat::kKvFp8, stored.data(), rows)).ok());
  ASSERT_TRUE(DequantizeKvRows(ContiguousRows(RowFormat::kKvFp8, stored.data(), rows),
                               absl::MakeSpan(out)).ok());
  EXPECT_EQ(BitsOf(out), BitsOf(in));
}

TEST_P(RowKernelsTest, GatherDequantizeMatchesPerRowDequantize) {
  const int rows = 40;
  const std::vector<Bf16> in = TestRows(rows, kHeadDim, 6);
  std::vector<uint8_t> page(static_cast<size_t>(rows) * kKv);
  const PackedRows view = PageFooterRows(RowFormat::kKvFp8, page.data(), rows);
  ASSERT_TRUE(QuantizeKvRows(in, view).ok());
  const std::vector<int64_t> picks = {39, 0, 7, 7, 21, 38, 1};
  std::vector<float> gathered(picks.size() * kHeadDim);
  ASSERT_TRUE(GatherDequantizeKvRows(view, picks, absl::MakeSpan(gathered)).ok());
  std::vector<Bf16> gathered_bf16(gathered.size());
  ASSERT_TRUE(GatherDequantizeKvRows(view, picks, absl::MakeSpan(gathered_bf16)).ok());
  for (size_t p = 0; p < picks.size(); ++p) {
    std::vector<float> ref(kHeadDim);
    DequantizeKvRowRef(view.row_data(picks[p]), view.row_scales(picks[p]), ref.data());
    for (int i = 0; i < kHeadDim; ++i) {
      ASSERT_EQ(F32Bits(gathered[p * kHeadDim + i]), F32Bits(ref[static_cast<size_t>(i)]));
      ASSERT_EQ(gathered_bf16[p * kHeadDim + i].bits, Bf16BitsFromF32(ref[static_cast<size_t>(i)]));
    }
  }
}

TEST_P(RowKernelsTest, QuantizeIndexKeysMatchesReference) {
  const int keys = 301;
  const std::vector<Bf16> in = TestRows(keys, kIndexDim, 7);
  std::vector<uint8_t> simd(static_cast<size_t>(keys) * kKey, 0xAB);
  std::vector<uint8_t> ref(simd.size(), 0xCD);
  ASSERT_TRUE(QuantizeIndexKeys(in, ContiguousRows(RowFormat::kIndexFp4, simd.data(), keys)).ok());
  for (int k = 0; k < keys; ++k) {
    QuantizeIndexKeyRef(in.data() + k * kIndexDim, ref.data() + k * kKey, ref.data() + k * kKey + 64);
  }
  ASSERT_EQ(simd, ref);

  std::vector<float> values(static_cast<size_t>(keys) * kIndexDim);
  ASSERT_TRUE(DequantizeIndexKeys(ContiguousRows(RowFormat::kIndexFp4, simd.data(), keys),
                                  absl::MakeSpan(values)).ok());
  for (int k = 0; k < keys; ++k) {
    std::vector<float> expected(kIndexDim);
    DequantizeIndexKeyRef(ref.data() + k * kKey, ref.data() + k * kKey + 64, expected.data());
    for (int i = 0; i < kIndexDim; ++i) {
      ASSERT_EQ(F32Bits(values[static_cast<size_t>(k) * kIndexDim + i]),
                F32Bits(expected[static_cast<size_t>(i)]));
    }
  }
}

// Every distribution (testing/distributions.h) gives the reference's bits,
// and no fp operation of the kernels meets a subnormal (stored rows with tiny
// scale bytes, as an engine may write them, included).
TEST_P(RowKernelsTest, EveryDistributionIsExactWithoutSubnormalArithmetic) {
  std::mt19937 rng(21);
  for (const testing::Distribution d : testing::AllDistributions()) {
    const std::string name = testing::Name(d);
    const int rows = 37;
    const std::vector<Bf16> in = testing::Bf16s(d, static_cast<size_t>(rows) * kHeadDim, rng);
    std::vector<uint8_t> simd(static_cast<size_t>(rows) * kKv), ref(simd.size());
    ASSERT_TRUE(QuantizeKvRows(in, ContiguousRows(RowFormat::kKvFp8, simd.data(), rows)).ok()) << name;
    for (int r = 0; r < rows; ++r) QuantizeKvRowRef(in.data() + r * kHeadDim, ref.data() + r * kKv, ref.data() + r * kKv + 576);
    ASSERT_EQ(simd, ref) << name;
    testing::ExpectNoSubnormalOperations("QuantizeKvRows " + name, [&] {
      if (!QuantizeKvRows(in, ContiguousRows(RowFormat::kKvFp8, simd.data(), rows)).ok()) std::abort();
    });

    // Dequantize those rows, and rows of any bytes with tiny scale bytes.
    std::vector<uint8_t> tiny_scales = RandomBytes(simd.size(), 22);
    for (int r = 0; r < rows; ++r) {
      for (int b = 0; b < 8; ++b) tiny_scales[static_cast<size_t>(r) * kKv + 576 + b] = static_cast<uint8_t>(rng() % 24);
    }
    for (const std::vector<uint8_t>* stored : {&simd, &tiny_scales}) {
      const ConstPackedRows view = ContiguousRows(RowFormat::kKvFp8, stored->data(), rows);
      std::vector<float> expected(static_cast<size_t>(rows) * kHeadDim), f32(expected.size());
      std::vector<Bf16> bf16(expected.size());
      for (int r = 0; r < rows; ++r) DequantizeKvRowRef(view.row_data(r), view.row_scales(r), expected.data() + r * kHeadDim);
      ASSERT_TRUE(DequantizeKvRows(view, absl::MakeSpan(f32)).ok());
      ASSERT_TRUE(DequantizeKvRows(view, absl::MakeSpan(bf16)).ok());
      for (size_t i = 0; i < expected.size(); ++i) {
        ASSERT_EQ(F32Bits(f32[i]), F32Bits(expected[i])) << name << " value " << i;
        ASSERT_EQ(bf16[i].bits, Bf16BitsFromF32(expected[i])) << name << " value " << i;
      }
      testing::ExpectNoSubnormalOperations("DequantizeKvRows " + name, [&] {
        if (!DequantizeKvRows(view, absl::MakeSpan(f32)).ok() || !DequantizeKvRows(view, absl::MakeSpan(bf16)).ok()) std::abort();
      });
    }

    const std::vector<Bf16> keys_in = testing::Bf16s(d, static_cast<size_t>(rows) * kIndexDim, rng, 110);
    std::vector<uint8_t> keys(static_cast<size_t>(rows) * kKey), keys_ref(keys.size());
    ASSERT_TRUE(QuantizeIndexKeys(keys_in, ContiguousRows(RowFormat::kIndexFp4, keys.data(), rows)).ok()) << name;
    for (int r = 0; r < rows; ++r) QuantizeIndexKeyRef(keys_in.data() + r * kIndexDim, keys_ref.data() + r * kKey, keys_ref.data() + r * kKey + 64);
    ASSERT_EQ(keys, keys_ref) << name;
    testing::ExpectNoSubnormalOperations("QuantizeIndexKeys " + name, [&] {
      if (!QuantizeIndexKeys(keys_in, ContiguousRows(RowFormat::kIndexFp4, keys.data(), rows)).ok()) std::abort();
    });
  }
}

// Hadamard outputs tiny next to huge ones in the same FP4 block (two equal
// huge inputs cancel in half the outputs, leaving a small input there):
// y = x / s underflows, and the code keeps the reference's sign exactly when
// fl(y) is not 0.
TEST_P(RowKernelsTest, IndexKeyBlocksWithTinyAndHugeValuesAreExact) {
  std::vector<Bf16> in;
  for (const int small_exp : {-20, -40, -49, -50, -51, -60, -110}) {
    for (const float sign : {1.0f, -1.0f}) {
      std::vector<Bf16> key(kIndexDim, ToBf16(0.0f));
      key[0] = key[1] = ToBf16(0x1p100f);
      key[2] = ToBf16(sign * std::ldexp(1.0f, small_exp));
      key[37] = ToBf16(-sign * std::ldexp(1.5f, small_exp));
      in.insert(in.end(), key.begin(), key.end());
    }
  }
  const int keys = static_cast<int>(in.size()) / kIndexDim;
  std::vector<uint8_t> simd(static_cast<size_t>(keys) * kKey), ref(simd.size());
  ASSERT_TRUE(QuantizeIndexKeys(in, ContiguousRows(RowFormat::kIndexFp4, simd.data(), keys)).ok());
  for (int k = 0; k < keys; ++k) QuantizeIndexKeyRef(in.data() + k * kIndexDim, ref.data() + k * kKey, ref.data() + k * kKey + 64);
  ASSERT_EQ(simd, ref);
  testing::ExpectNoSubnormalOperations("QuantizeIndexKeys tiny next to huge", [&] {
    if (!QuantizeIndexKeys(in, ContiguousRows(RowFormat::kIndexFp4, simd.data(), keys)).ok()) std::abort();
  });
}

TEST_P(RowKernelsTest, NonFiniteRowIsRejectedAndItAndLaterRowsAreUntouched) {
  const int rows = 5;
  const int bad_row = 3;
  for (const float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN()}) {
    // A bad value in the FP8 part, and one in the bf16 RoPE part.
    for (const int bad_dim : {100, kHeadDim - 1}) {
      std::vector<Bf16> in = TestRows(rows, kHeadDim, 8);
      std::vector<uint8_t> expected(static_cast<size_t>(rows) * kKv, 0x5A);
      ASSERT_TRUE(QuantizeKvRows(absl::MakeConstSpan(in).first(bad_row * kHeadDim),
                                 ContiguousRows(RowFormat::kKvFp8, expected.data(), bad_row)).ok());
      in[bad_row * kHeadDim + bad_dim] = ToBf16(bad);
      std::vector<uint8_t> out(expected.size(), 0x5A);
      const absl::Status status = QuantizeKvRows(in, ContiguousRows(RowFormat::kKvFp8, out.data(), rows));
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(std::string(status.message()),
                  HasSubstr("row 3 dim " + std::to_string(bad_dim) + (std::isnan(bad) ? " is NaN" : " is infinite")));
      EXPECT_EQ(out, expected);
    }

    std::vector<Bf16> keys = TestRows(rows, kIndexDim, 9);
    std::vector<uint8_t> expected(static_cast<size_t>(rows) * kKey, 0x5A);
    ASSERT_TRUE(QuantizeIndexKeys(absl::MakeConstSpan(keys).first(4 * kIndexDim),
                                  ContiguousRows(RowFormat::kIndexFp4, expected.data(), 4)).ok());
    keys[4 * kIndexDim + 127] = ToBf16(bad);
    std::vector<uint8_t> key_out(expected.size(), 0x5A);
    const absl::Status key_status =
        QuantizeIndexKeys(keys, ContiguousRows(RowFormat::kIndexFp4, key_out.data(), rows));
    EXPECT_EQ(key_status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(key_status.message()), HasSubstr("row 4 dim 127"));
    EXPECT_EQ(key_out, expected);
  }
}

// A finite bf16 NoPE value of magnitude >= 248 x 2^120 (0x7F78) takes the
// block scale 2^120 and rounds to the E4M3 code of 256 (248 is the midpoint of
// 240 and 256; ties go to the even code): 256 x 2^120 = 2^128 reads back as
// infinity. Such rows are refused; the largest accepted value reads back finite.
TEST_P(RowKernelsTest, KvRowsThatWouldReadBackInfiniteAreRejected) {
  const Bf16 largest_ok{0x7F77}, first_bad{0x7F78};
  // The reason, from the scalar reference: 0x7F78 would store a row that reads back as inf.
  {
    std::vector<Bf16> row(kHeadDim, ToBf16(1.0f));
    row[5] = first_bad;
    std::array<uint8_t, 584> bytes = {};
    QuantizeKvRowRef(row.data(), bytes.data(), bytes.data() + 576);
    float back[kHeadDim];
    DequantizeKvRowRef(bytes.data(), bytes.data() + 576, back);
    ASSERT_TRUE(std::isinf(back[5]));
  }
  for (const uint16_t sign : {uint16_t{0}, uint16_t{0x8000}}) {
    for (const int dim : {0, 63, 200, kNopeDim - 1}) {
      std::vector<Bf16> in = TestRows(3, kHeadDim, 11);
      in[kHeadDim + dim] = Bf16{static_cast<uint16_t>(largest_ok.bits | sign)};
      in[kHeadDim + kHeadDim - 1] = Bf16{static_cast<uint16_t>(0x7F7F | sign)};  // RoPE dims: any finite bf16
      std::vector<uint8_t> out(3 * kKv);
      ASSERT_TRUE(QuantizeKvRows(in, ContiguousRows(RowFormat::kKvFp8, out.data(), 3)).ok());
      ASSERT_TRUE(CheckKvRows(in, "rows").ok());
      std::vector<float> back(3 * kHeadDim);
      ASSERT_TRUE(DequantizeKvRows(ContiguousRows(RowFormat::kKvFp8, out.data(), 3), absl::MakeSpan(back)).ok());
      for (const float v : back) ASSERT_TRUE(std::isfinite(v));

      in[kHeadDim + dim] = Bf16{static_cast<uint16_t>(first_bad.bits | sign)};
      std::vector<uint8_t> refused(3 * kKv, 0x5A);
      const absl::Status status = QuantizeKvRows(in, ContiguousRows(RowFormat::kKvFp8, refused.data(), 3));
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(std::string(status.message()), HasSubstr("row 1 dim " + std::to_string(dim) + " is at least 248 x 2^120"));
      EXPECT_TRUE(std::all_of(refused.begin() + kKv, refused.end(), [](uint8_t b) { return b == 0x5A; }));
      EXPECT_THAT(std::string(CheckKvRows(in, "rows").message()), HasSubstr("rows: input row 1 dim " + std::to_string(dim)));
    }
  }
}

TEST_P(RowKernelsTest, CheckFiniteF32FindsTheFirstBadValueAnywhere) {
  std::vector<float> values(1000, 3.0e38f);  // large but finite
  EXPECT_TRUE(CheckFiniteF32(values, 100, "x").ok());
  for (const size_t at : {size_t{0}, size_t{63}, size_t{64}, size_t{517}, size_t{999}}) {  // body and tail
    for (const float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::quiet_NaN()}) {
      std::vector<float> v = values;
      v[at] = bad;
      v[std::min<size_t>(at + 3, 999)] = bad;  // a later one must not be reported
      const absl::Status s = CheckFiniteF32(v, 100, "proj");
      EXPECT_THAT(std::string(s.message()),
                  HasSubstr("proj row " + std::to_string(at / 100) + " column " + std::to_string(at % 100) +
                            (std::isnan(bad) ? " is NaN" : " is infinite")));
    }
  }
}

TEST_P(RowKernelsTest, IndexKeysThatCouldOverflowTheHadamardAreRejected) {
  std::vector<Bf16> keys(2 * kIndexDim, ToBf16(1.0f));
  keys[kIndexDim + 3] = ToBf16(std::exp2(120.0f));  // at the limit: accepted
  std::vector<uint8_t> out(2 * kKey);
  EXPECT_TRUE(QuantizeIndexKeys(keys, ContiguousRows(RowFormat::kIndexFp4, out.data(), 2)).ok());
  keys[kIndexDim + 3] = ToBf16(std::exp2(121.0f));
  const absl::Status status = QuantizeIndexKeys(keys, ContiguousRows(RowFormat::kIndexFp4, out.data(), 2));
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("row 1 dim 3 exceeds 2^120"));
}

TEST(RowKernelsArguments, ShapesStridesPointersAndIndicesAreValidated) {
  std::vector<Bf16> in(2 * kHeadDim, ToBf16(1.0f));
  std::vector<uint8_t> out(2 * kKv);
  PackedRows rows = ContiguousRows(RowFormat::kKvFp8, out.data(), 2);

  // Wrong number of input values.
  EXPECT_EQ(QuantizeKvRows(absl::MakeConstSpan(in).subspan(1), rows).code(),
            absl::StatusCode::kInvalidArgument);
  // Strides too small for a row.
  PackedRows narrow = rows;
  narrow.data_stride = 575;
  EXPECT_THAT(std::string(QuantizeKvRows(in, narrow).message()), HasSubstr("strides"));
  // Null pointers and negative counts.
  PackedRows null_rows = rows;
  null_rows.scales = nullptr;
  EXPECT_EQ(QuantizeKvRows(in, null_rows).code(), absl::StatusCode::kInvalidArgument);
  PackedRows negative = rows;
  negative.count = -1;
  EXPECT_EQ(QuantizeKvRows({}, negative).code(), absl::StatusCode::kInvalidArgument);
  // Zero rows is fine and touches nothing.
  EXPECT_TRUE(QuantizeKvRows({}, ContiguousRows(RowFormat::kKvFp8, static_cast<uint8_t*>(nullptr), 0)).ok());

  ASSERT_TRUE(QuantizeKvRows(in, rows).ok());
  std::vector<float> gathered(kHeadDim, -1.0f);
  const std::vector<int64_t> out_of_range = {2};
  const absl::Status status = GatherDequantizeKvRows(rows, out_of_range, absl::MakeSpan(gathered));
  EXPECT_EQ(status.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(status.message()), HasSubstr("rows[0] = 2"));
  EXPECT_EQ(gathered, std::vector<float>(kHeadDim, -1.0f));
  const std::vector<int64_t> negative_index = {-1};
  EXPECT_EQ(GatherDequantizeKvRows(rows, negative_index, absl::MakeSpan(gathered)).code(),
            absl::StatusCode::kOutOfRange);
  // Output span of the wrong size.
  std::vector<float> small(kHeadDim);
  EXPECT_EQ(DequantizeKvRows(rows, absl::MakeSpan(small)).code(), absl::StatusCode::kInvalidArgument);
}

TEST(SimdTargets, BestFirstWithFallbackAndVnniTargetCompiledIn) {
  const std::vector<int64_t> targets = SimdTargets();
  ASSERT_FALSE(targets.empty());
  for (size_t i = 1; i < targets.size(); ++i) EXPECT_GT(targets[i], targets[i - 1]);
  EXPECT_TRUE(targets.back() == HWY_SCALAR || targets.back() == HWY_EMU128);
  // Highway 1.0.3 builds AVX3_DL (VNNI, BF16) only with HWY_WANT_AVX3_DL; kvc
  // defines it, so on a CPU that has it, it must be available.
  if ((hwy::SupportedTargets() & HWY_AVX3_DL) != 0) {
    EXPECT_EQ(targets.front(), HWY_AVX3_DL);
  }
}

}  // namespace
}  // namespace kvc
