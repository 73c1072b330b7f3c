// The scalar reference codecs against the official golden vectors
// (tests/golden/codec.safetensors) and against independent math.
#include "kvc/reference_codecs.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "src/safetensors.h"

namespace kvc {
namespace {

class GoldenCodecTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto file = SafetensorsFile::Read(std::string(KVC_GOLDEN_DIR) + "/codec.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    file_ = new SafetensorsFile(*std::move(file));
  }
  static void TearDownTestSuite() { delete file_; }

  template <typename T>
  static std::vector<T> Get(const char* name, DType dtype, std::vector<int64_t> shape,
                            int64_t* rows = nullptr) {
    const TensorInfo* info = nullptr;
    auto v = file_->Get<T>(name, dtype, shape, &info);
    EXPECT_TRUE(v.ok()) << v.status();
    if (!v.ok()) return {};
    if (rows != nullptr) *rows = info->shape[0];
    return *std::move(v);
  }

  static SafetensorsFile* file_;
};
SafetensorsFile* GoldenCodecTest::file_ = nullptr;

TEST_F(GoldenCodecTest, Fp8RowsMatchCodesScalesAndValues) {
  int64_t rows = 0;
  const auto in = Get<uint16_t>("fp8_in", DType::kBF16, {-1, kNopeDim}, &rows);
  const auto codes = Get<uint8_t>("fp8_codes", DType::kU8, {rows, kNopeDim});
  const auto scales = Get<uint8_t>("fp8_scale_bytes", DType::kU8, {rows, 7});
  const auto values = Get<uint16_t>("fp8_out", DType::kBF16, {rows, kNopeDim});
  ASSERT_GT(rows, 0);
  for (int64_t r = 0; r < rows; ++r) {
    Bf16 row[kHeadDim] = {};
    for (int i = 0; i < kNopeDim; ++i) row[i].bits = in[static_cast<size_t>(r * kNopeDim + i)];
    KvRowFp8 stored;
    QuantizeKvRowRef(row, stored.nope_codes, stored.scales);
    float dequantized[kHeadDim];
    DequantizeKvRowRef(stored.nope_codes, stored.scales, dequantized);
    for (int i = 0; i < kNopeDim; ++i) {
      const size_t at = static_cast<size_t>(r * kNopeDim + i);
      ASSERT_EQ(stored.nope_codes[i], codes[at]) << "row " << r << " dim " << i;
      ASSERT_EQ(Bf16BitsFromF32(dequantized[i]), values[at]) << "row " << r << " dim " << i;
    }
    for (int b = 0; b < 7; ++b) ASSERT_EQ(stored.scales[b], scales[static_cast<size_t>(r * 7 + b)]);
    EXPECT_EQ(stored.padding, 0);
  }
}

TEST_F(GoldenCodecTest, HadamardAndFp4MatchOfficialOutputs) {
  int64_t rows = 0;
  const auto had_in = Get<uint16_t>("had_in", DType::kBF16, {-1, kIndexDim}, &rows);
  const auto had_out = Get<uint16_t>("had_out", DType::kBF16, {rows, kIndexDim});
  const auto fp4_codes = Get<uint8_t>("fp4_codes", DType::kU8, {rows, kIndexDim});
  const auto fp4_scales = Get<uint8_t>("fp4_scale_bytes", DType::kU8, {rows, 4});
  const auto fp4_out = Get<uint16_t>("fp4_out", DType::kBF16, {rows, kIndexDim});
  ASSERT_GT(rows, 0);
  for (int64_t r = 0; r < rows; ++r) {
    float x[kIndexDim];
    Bf16 key[kIndexDim];
    for (int i = 0; i < kIndexDim; ++i) {
      key[i].bits = had_in[static_cast<size_t>(r * kIndexDim + i)];
      x[i] = ToF32(key[i]);
    }
    HadamardTransformRef(x);
    for (int i = 0; i < kIndexDim; ++i) {
      ASSERT_EQ(Bf16BitsFromF32(x[i]), had_out[static_cast<size_t>(r * kIndexDim + i)]) << r << "/" << i;
    }
    IndexKeyFp4 stored;
    QuantizeIndexKeyRef(key, stored.codes, stored.scales);
    float values[kIndexDim];
    DequantizeIndexKeyRef(stored.codes, stored.scales, values);
    for (int i = 0; i < kIndexDim; ++i) {
      const size_t at = static_cast<size_t>(r * kIndexDim + i);
      ASSERT_EQ((stored.codes[i / 2] >> (4 * (i % 2))) & 0xF, fp4_codes[at]) << r << "/" << i;
      ASSERT_EQ(Bf16BitsFromF32(values[i]), fp4_out[at]) << r << "/" << i;
    }
    for (int b = 0; b < 4; ++b) ASSERT_EQ(stored.scales[b], fp4_scales[static_cast<size_t>(r * 4 + b)]);
  }
}

TEST(Hadamard, MatchesTheExplicitMatrixAndIsItsOwnInverse) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (int trial = 0; trial < 50; ++trial) {
    float x[kIndexDim], y[kIndexDim];
    for (float& v : x) v = normal(rng);
    std::copy(x, x + kIndexDim, y);
    HadamardTransformRef(y);
    for (int i = 0; i < kIndexDim; ++i) {
      // Sylvester matrix entry: (-1)^popcount(i & j), scaled by 128^-0.5.
      double expected = 0;
      for (int j = 0; j < kIndexDim; ++j) {
        expected += (__builtin_popcount(static_cast<unsigned>(i & j)) % 2 ? -1.0 : 1.0) * x[j];
      }
      expected /= std::sqrt(128.0);
      ASSERT_NEAR(y[i], expected, 1e-5 * (1 + std::fabs(expected)));
    }
    HadamardTransformRef(y);  // orthonormal and symmetric: H(H(x)) = x
    for (int i = 0; i < kIndexDim; ++i) ASSERT_NEAR(y[i], x[i], 1e-5);
  }
}

}  // namespace
}  // namespace kvc
