#include "src/json.h"

#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
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

TEST(Json, RefusesInvalidUtf8NamingTheOffset) {
  struct Case {
    std::string text;
    int offset;  // of the first byte of the bad sequence
  } cases[] = {
      {"\"\xC0\xAF\"", 1},              // overlong '/' (2 bytes)
      {"\"\xC1\xBF\"", 1},              // overlong (2 bytes)
      {"\"ab\xE0\x80\xAF\"", 3},        // overlong (3 bytes)
      {"\"\xF0\x80\x80\xAF\"", 1},      // overlong (4 bytes)
      {"\"x\xED\xA0\x80\"", 2},         // U+D800, a surrogate, encoded in UTF-8
      {"\"\xED\xBF\xBF\"", 1},          // U+DFFF
      {"\"\xF4\x90\x80\x80\"", 1},      // U+110000
      {"\"\xF5\x80\x80\x80\"", 1},      // lead byte beyond U+10FFFF
      {"\"\xFF\"", 1},
      {"\"\xE2\x82\"", 1},              // truncated by the closing quote
      {"\"\xE2\x82", 1},                 // truncated by the end of input
      {"\"\xF0\x9F\x98 \"", 1},         // truncated by a space
      {"\"\x80\"", 1},                   // lone continuation byte
      {"\"\xC3\xA9\xA9\"", 3},          // continuation byte after a complete sequence
      {"{\"k\xC3\":1}", 3},               // in a key
      {"[1, \"\xC0\x80\"]", 5},          // overlong NUL
  };
  for (const Case& c : cases) {
    auto v = JsonValue::Parse(c.text);
    ASSERT_FALSE(v.ok()) << "accepted: " << testing::PrintToString(c.text);
    EXPECT_THAT(std::string(v.status().message()),
                HasSubstr(absl::StrCat("invalid UTF-8 at byte ", c.offset)))
        << testing::PrintToString(c.text);
  }
  // Every well-formed sequence length, up to U+10FFFF and U+FFFF, still parses.
  const std::string good = "\xC2\x80\xC3\xA9\xE2\x82\xAC\xED\x9F\xBF\xEE\x80\x80\xEF\xBF\xBF"
                           "\xF0\x90\x80\x80\xF0\x9F\x98\x80\xF4\x8F\xBF\xBF";
  auto v = JsonValue::Parse("\"" + good + "\"");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->string(), good);
}

TEST(Json, RefusesUnpairedSurrogateEscapes) {
  for (const char* text : {"\"\\ud800\"", "\"\\ud800x\"", "\"\\ud800\\u0041\"", "\"\\ud800\\ud800\"",
                           "\"\\udc00\"", "\"\\uDFFF\\ud800\"", "\"\\ud83d"}) {
    auto v = JsonValue::Parse(text);
    ASSERT_FALSE(v.ok()) << "accepted: " << text;
    EXPECT_THAT(std::string(v.status().message()), HasSubstr("at byte")) << text;
  }
  auto v = JsonValue::Parse("\"\\uD83D\\uDE00\\u0000\"");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->string(), std::string("\xF0\x9F\x98\x80\0", 5));
}

int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size_pages = 0, resident_pages = 0;
  statm >> size_pages >> resident_pages;
  return resident_pages * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

// A 16 MiB array of small numbers used to cost ~1 GB (96 bytes per value).
// json.h documents at most 8 bytes per input byte for a parsed document.
TEST(Json, MemoryIsBoundedByTheInputSize) {
  std::string text = "[0";
  while (text.size() + 3 <= (size_t{1} << 24)) text += ",0";
  text += "]";
  const int64_t before = ResidentBytes();
  auto v = JsonValue::Parse(text);
  const int64_t grown = ResidentBytes() - before;
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_EQ(v->array().size(), (text.size() - 1) / 2);
  EXPECT_TRUE(v->array().back().is_integer());
  EXPECT_LT(grown, 200'000'000) << "RSS grew by " << grown << " bytes for " << text.size() << " bytes of JSON";
}

TEST(Json, RefusesInputOverTheCapNamingIt) {
  std::string text(JsonValue::kMaxInputBytes + 1, ' ');
  text[0] = '0';
  auto v = JsonValue::Parse(text);
  ASSERT_FALSE(v.ok());
  EXPECT_THAT(std::string(v.status().message()), HasSubstr(absl::StrCat(JsonValue::kMaxInputBytes)));
  text.pop_back();  // exactly at the cap: whitespace after a value is fine
  EXPECT_TRUE(JsonValue::Parse(text).ok());
}

TEST(Json, CopiesAreDeepAndMovesKeepPointersValid) {
  auto parsed = JsonValue::Parse(R"({"a": [1, {"b": "xy"}], "c": "z"})");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const JsonValue* b = parsed->Find("a")->array()[1].Find("b");
  JsonValue moved = *std::move(parsed);
  EXPECT_EQ(b->string(), "xy");  // the tree did not move
  JsonValue copy = moved;
  JsonValue sub = moved.Find("a")->array()[1];
  moved = JsonValue();
  EXPECT_EQ(copy.Find("a")->array()[1].Find("b")->string(), "xy");
  EXPECT_EQ(copy.Find("c")->string(), "z");
  EXPECT_EQ(sub.Find("b")->string(), "xy");
  EXPECT_TRUE(moved.is_null());
}

}  // namespace
}  // namespace kvc
