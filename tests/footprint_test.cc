// Footprint figures: spec §6 from the library, and the kvc-footprint tool
// (JSON, --measure against a real cache, SVG, errors).
#include "kvc/footprint.h"

#include <array>
#include <cstdio>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "src/json.h"
#include "tests/testing/run_program.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

double PerToken(const char* name, StorageFormat format = StorageFormat::kFp8) {
  auto m = FootprintByName(name, format);
  EXPECT_TRUE(m.ok()) << name << ": " << m.status();
  return m.ok() ? m->BytesPerToken() : 0;
}

TEST(Footprint, ReproducesTheSpecSixTable) {
  EXPECT_DOUBLE_EQ(PerToken("v4-pro"), 5031.4375);     // 30 x 163 + 31 x 4.5625
  EXPECT_DOUBLE_EQ(PerToken("v4-flash"), 3514.25);     // 21 x 163 + 20 x 4.5625
  EXPECT_DOUBLE_EQ(PerToken("v4-pro", StorageFormat::kBf16), 9848.0);
  EXPECT_DOUBLE_EQ(PerToken("deepseek-v3.2"), 48068.0);
  EXPECT_DOUBLE_EQ(PerToken("deepseek-v3"), 70272.0);
  EXPECT_DOUBLE_EQ(PerToken("gqa:61:8:128"), 249856.0);
  EXPECT_DOUBLE_EQ(PerToken("llama3-70b"), 327680.0);
  EXPECT_DOUBLE_EQ(PerToken("mha:80:64:128"), 2621440.0);
  EXPECT_DOUBLE_EQ(PerToken("gqa:61:8:128:1"), 124928.0);  // an 8-bit cache
  // The published ratios: 10.5 % and 2.0 % (Pro), 7.3 % (Flash).
  EXPECT_NEAR(100 * PerToken("v4-pro") / PerToken("deepseek-v3.2"), 10.47, 0.01);
  EXPECT_NEAR(100 * PerToken("v4-pro") / PerToken("gqa:61:8:128"), 2.01, 0.01);
  EXPECT_NEAR(100 * PerToken("v4-flash") / PerToken("deepseek-v3.2"), 7.31, 0.01);
  // 1M tokens of V4-Pro: 4.91 GiB of history.
  const FootprintModel pro = *FootprintByName("v4-pro", StorageFormat::kFp8);
  double history = 0;
  for (const double b : pro.ComponentBytes(1 << 20)) history += b;
  EXPECT_NEAR(history / (1 << 30), 4.91, 0.005);
  // Per-sequence constants (spec §6): ring 128 x 584 per layer; state 80 KiB CSA, 512 KiB HCA.
  EXPECT_DOUBLE_EQ(pro.per_sequence[0].bytes, 61.0 * 128 * 584);
  EXPECT_DOUBLE_EQ(pro.per_sequence[1].bytes, 30.0 * 80 * 1024 + 31.0 * 512 * 1024);
  // Whole entries only: 7 tokens hold one CSA entry per layer, no HCA entry.
  EXPECT_DOUBLE_EQ(pro.ComponentBytes(7)[0], 30.0 * 584);
  EXPECT_DOUBLE_EQ(pro.ComponentBytes(7)[2], 0.0);
}

TEST(Footprint, NamesAreParsedStrictly) {
  EXPECT_EQ(FootprintByName("v5", StorageFormat::kFp8).status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(FootprintByName("gqa:61:8", StorageFormat::kFp8).status().message()),
              HasSubstr("expected gqa:LAYERS:HEADS:HEAD_DIM"));
  EXPECT_THAT(std::string(FootprintByName("mha:80:x:128", StorageFormat::kFp8).status().message()),
              HasSubstr("\"x\" is not a positive integer"));
  EXPECT_EQ(FootprintByName("/nonexistent/config.json", StorageFormat::kFp8).status().code(),
            absl::StatusCode::kNotFound);
}

int RunTool(const std::string& args, std::string* out) {
  return testing::RunProgram(KVC_FOOTPRINT_EXE, args, out, /*stderr_too=*/false);
}

TEST(FootprintTool, JsonHasEveryFieldAndMeasureEqualsAnalyticPlusPageRounding) {
  std::string out;
  ASSERT_EQ(RunTool("--model v4-flash,deepseek-v3.2 --tokens 5000,12345 --baseline deepseek-v3.2 --json --measure", &out), 0);
  auto json = JsonValue::Parse(out);
  ASSERT_TRUE(json.ok()) << json.status() << "\n" << out;
  ASSERT_EQ(json->array().size(), 4u);  // 2 models x 2 lengths
  for (const JsonValue& row : json->array()) {
    for (const char* field : {"model", "tokens", "bytes_per_token", "total_bytes", "per_sequence_constant_bytes",
                              "components", "ratio_to_baseline"}) {
      EXPECT_NE(row.Find(field), nullptr) << field;
    }
    if (row.Find("model")->string() != "DeepSeek-V4-Flash") {
      EXPECT_EQ(row.Find("measured_total_bytes"), nullptr);  // only V4 models are measured
      continue;
    }
    // The cache's own accounting is the analytic figure plus page rounding, exactly.
    const double measured = row.Find("measured_total_bytes")->number();
    EXPECT_EQ(measured, row.Find("total_bytes")->number() + row.Find("page_rounding_bytes")->number());
    EXPECT_NEAR(row.Find("ratio_to_baseline")->number(),
                row.Find("total_bytes")->number() / (48068.0 * row.Find("tokens")->number()), 1e-6);
  }
}

TEST(FootprintTool, WritesALabelledSvgAndRejectsBadArguments) {
  const std::string svg_path = ::testing::TempDir() + "/footprint.svg";
  std::string out;
  ASSERT_EQ(RunTool("--model v4-pro,llama3-70b --svg " + svg_path, &out), 0);
  std::ifstream in(svg_path);
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_THAT(svg, HasSubstr("<svg"));
  EXPECT_THAT(svg, HasSubstr("DeepSeek-V4-Pro"));
  EXPECT_THAT(svg, HasSubstr("Llama-3-70B"));
  EXPECT_THAT(svg, HasSubstr("context length (tokens)"));
  out.clear();
  EXPECT_EQ(RunTool("--tokens 0", &out), 2);
  EXPECT_EQ(RunTool("--format fp16", &out), 2);
  EXPECT_EQ(RunTool("--bogus", &out), 2);
  EXPECT_EQ(RunTool("--model nope", &out), 1);
}

}  // namespace
}  // namespace kvc
