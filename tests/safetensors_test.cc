#include "src/safetensors.h"

#include <cstdint>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

std::string FileImage(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + header + data;
}

TEST(Safetensors, ReadsTensorsAndMetadata) {
  const std::string data("\x01\x02\x03\x04\x00\x00\x80\x3f", 8);
  auto file = SafetensorsFile::Parse(FileImage(
      R"({"__metadata__":{"meta":"{\"ratio\": 4}"},"a":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]},)"
      R"("f":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
      data));
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_NE(file->metadata(), nullptr);
  EXPECT_EQ(file->metadata()->Find("meta")->string(), "{\"ratio\": 4}");
  auto a = file->Get<uint8_t>("a", DType::kU8, {2, -1});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(*a, (std::vector<uint8_t>{1, 2, 3, 4}));
  auto f = file->Get<float>("f", DType::kF32, {1});
  ASSERT_TRUE(f.ok());
  EXPECT_EQ((*f)[0], 1.0f);
  // Wrong dtype, wrong shape, missing tensor: clear errors.
  EXPECT_THAT(std::string(file->Get<float>("a", DType::kF32, {2, 2}).status().message()),
              HasSubstr("is U8, expected F32"));
  EXPECT_THAT(std::string(file->Get<uint8_t>("a", DType::kU8, {4}).status().message()),
              HasSubstr("has shape [2, 2], expected [4]"));
  EXPECT_EQ(file->Get<uint8_t>("zz", DType::kU8, {4}).status().code(), absl::StatusCode::kNotFound);
}

TEST(Safetensors, RejectsMalformedFiles) {
  const std::string data(8, '\0');
  struct Case {
    std::string image;
    const char* message;
  } cases[] = {
      {"abc", "shorter than"},
      {std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}", "exceeds the file"},
      {FileImage("[]", data), "not a JSON object"},
      {FileImage("{", data), "JSON"},
      {FileImage(R"({"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}})", data), "unknown dtype"},
      {FileImage(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", data), "extents"},
      {FileImage(R"({"a":{"dtype":"U8","shape":[9],"data_offsets":[0,9]}})", data), "outside"},
      {FileImage(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,2]}})", data), "needs 4"},
      {FileImage(R"({"a":{"dtype":"U8","shape":[1]}})", data), "data_offsets"},
      {FileImage(R"({"__metadata__":{"x":1},"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", data),
       "__metadata__ value \"x\" is not a string"},
      {FileImage(R"({"a":{"dtype":"U8","shape":[4611686018427387904,4],"data_offsets":[0,1]}})", data),
       "too large"},
  };
  for (const Case& c : cases) {
    auto file = SafetensorsFile::Parse(c.image);
    ASSERT_FALSE(file.ok()) << c.message;
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(c.message));
  }
  EXPECT_EQ(SafetensorsFile::Read("/nonexistent/x.safetensors").status().code(),
            absl::StatusCode::kNotFound);
}

std::string Entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

// Tensors must tile the data section exactly, in any order: no overlap, no
// hole, nothing after the last tensor.
TEST(Safetensors, RefusesOverlapsHolesAndTrailingBytesNamingTheTensor) {
  const std::string data(8, '\0');
  struct Case {
    std::string header;
    std::vector<const char*> message;
  } cases[] = {
      {"{" + Entry("a", "U8", "[4]", "[0,4]") + "," + Entry("b", "U8", "[4]", "[2,6]") + "," +
           Entry("c", "U8", "[2]", "[6,8]") + "}",
       {"\"b\"", "overlap", "\"a\""}},
      {"{" + Entry("a", "U8", "[8]", "[0,8]") + "," + Entry("b", "U8", "[8]", "[0,8]") + "}",  // aliases
       {"overlap", "\"a\"", "\"b\""}},
      {"{" + Entry("a", "U8", "[2]", "[0,2]") + "," + Entry("b", "U8", "[4]", "[4,8]") + "}",
       {"\"b\"", "[2, 4)", "unused"}},
      {"{" + Entry("a", "U8", "[2]", "[2,4]") + "," + Entry("b", "U8", "[4]", "[4,8]") + "}",
       {"\"a\"", "[0, 2)", "unused"}},
      {"{" + Entry("a", "U8", "[4]", "[0,4]") + "," + Entry("b", "U8", "[2]", "[4,6]") + "}",
       {"\"b\"", "[6, 8)", "unused"}},
      {"{}", {"[0, 8)", "unused"}},
      {"{" + Entry("z", "U8", "[0]", "[2,2]") + "," + Entry("a", "U8", "[8]", "[0,8]") + "}",  // empty, inside a
       {"\"z\"", "overlap"}},
      {"{" + Entry("a", "U8", "[8]", "[0,8]") + "," +
           Entry("b", "U8", "[1]", "[18446744073709551615,18446744073709551616]") + "}",
       {"\"b\"", "data_offsets"}},
      {"{" + Entry("a", "U8", "[8]", "[0,8]") + "," +
           Entry("b", "U8", "[1]", "[9223372036854775806,9223372036854775807]") + "}",
       {"\"b\"", "data_offsets"}},
      {"{" + Entry("a", "U8", "[8]", "[0,8]") + "," + Entry("b", "U8", "[1]", "[8,-9]") + "}",
       {"\"b\"", "data_offsets"}},
      {"{" + Entry("a", "F64", "[4294967296,4294967296]", "[0,8]") + "}", {"\"a\"", "too large"}},
      {"{" + Entry("a", "U16", "[2305843009213693952,4]", "[0,8]") + "}", {"\"a\"", "too large"}},
      {"{" + Entry("a", "U16", "[3]", "[0,8]") + "}", {"\"a\"", "needs 6"}},
  };
  for (const Case& c : cases) {
    auto file = SafetensorsFile::Parse(FileImage(c.header, data));
    ASSERT_FALSE(file.ok()) << c.header;
    for (const char* part : c.message) {
      EXPECT_THAT(std::string(file.status().message()), HasSubstr(part)) << c.header;
    }
  }
}

TEST(Safetensors, AcceptsAnExactTilingInAnyOrderWithEmptyTensors) {
  const std::string data("\x01\x02\x03\x04\x05\x06\x07\x08", 8);
  auto file = SafetensorsFile::Parse(FileImage(
      "{" + Entry("b", "U16", "[2]", "[4,8]") + "," + Entry("e", "F32", "[0,3]", "[4,4]") + "," +
          Entry("a", "U8", "[4]", "[0,4]") + "," + Entry("end", "U8", "[0]", "[8,8]") + "}",
      data));
  ASSERT_TRUE(file.ok()) << file.status();
  auto b = file->Get<uint16_t>("b", DType::kU16, {2});
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)[0], 0x0605);
  EXPECT_TRUE(SafetensorsFile::Parse(FileImage("{}", "")).ok());
}

}  // namespace
}  // namespace kvc
