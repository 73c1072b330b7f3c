#include "kvc/json.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

TEST(Json, ParsesEveryKindOfValue) {
  auto v = JsonValue::Parse(R"( {"a": [1, -2.5e3, true, false, null], "s": "x\"\\\/\u00e9\ud83d\ude00\n", "o": {}} )");
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_TRUE(v->is_object());
  const JsonValue* a = v->Find("a");
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(a->array().size(), 5u);
  EXPECT_TRUE(a->array()[0].is_integer());
  EXPECT_EQ(a->array()[1].number(), -2500.0);
  EXPECT_FALSE(a->array()[1].is_integer() && a->array()[1].number() != -2500.0);
  EXPECT_TRUE(a->array()[2].bool_value());
  EXPECT_TRUE(a->array()[4].is_null());
  EXPECT_EQ(v->Find("s")->string(), "x\"\\/\xc3\xa9\xf0\x9f\x98\x80\n");
  EXPECT_TRUE(v->Find("o")->is_object());
  EXPECT_EQ(v->Find("missing"), nullptr);
}

TEST(Json, RejectsMalformedInputWithItsOffset) {
  const char* bad[] = {"", "{", "[1,]", "{\"a\":1,}", "01", "1.", "1e", "-", "\"abc",
                       "\"\\x\"", "\"\\ud800\"", "tru", "{\"a\" 1}", "[1] 2", "1e999",
                       "{\"k\":1,\"k\":2}", "\"\x01\""};
  for (const char* text : bad) {
    auto v = JsonValue::Parse(text);
    EXPECT_FALSE(v.ok()) << "accepted: " << text;
    if (!v.ok()) {
      EXPECT_THAT(std::string(v.status().message()), HasSubstr("at byte")) << text;
    }
  }
}

TEST(Json, DeepNestingIsAnErrorNotACrash) {
  const std::string deep(100000, '[');
  auto v = JsonValue::Parse(deep);
  ASSERT_FALSE(v.ok());
  EXPECT_THAT(std::string(v.status().message()), HasSubstr("nesting"));
  std::string ok_depth = std::string(60, '[') + std::string(60, ']');
  EXPECT_TRUE(JsonValue::Parse(ok_depth).ok());
}

}  // namespace
}  // namespace kvc
