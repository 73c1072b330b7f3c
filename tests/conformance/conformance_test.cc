// The conformance runner passes on the golden vectors and on re-shaped copies
// of them (it assumes nothing about their sizes), fails exactly the check
// whose expected values were altered, and reports unreadable input clearly.
#include "tools/conformance/conformance.h"

#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvc::conformance {
namespace {

using ::testing::HasSubstr;

const char* const kNamedCodecChecks[] = {
    "codec/e4m3_table", "codec/e4m3_cast",  "codec/bf16_cast", "codec/e2m1_ties",
    "codec/fp8_codes",  "codec/fp8_scales", "codec/fp8_values", "codec/hadamard",
    "codec/fp4_codes",  "codec/fp4_scales", "codec/fp4_values"};

// A fresh temporary directory, removed with its files at scope exit.
class TempDir {
 public:
  TempDir() {
    char pattern[] = "/tmp/kvc-conformance-XXXXXX";
    path_ = mkdtemp(pattern);
  }
  ~TempDir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Rewrites codec.safetensors into `dir`, passing each tensor's bytes through
// `edit(name, info, bytes)`, which may also change its shape.
void RewriteCodec(const std::string& dir,
                  const std::function<void(const TensorInfo&, std::vector<int64_t>&, std::vector<uint8_t>&)>& edit) {
  auto golden = SafetensorsFile::Read(std::string(KVC_GOLDEN_DIR) + "/codec.safetensors");
  ASSERT_TRUE(golden.ok()) << golden.status();
  SafetensorsWriter writer;
  writer.SetMetadata(golden->metadata()->Find("meta")->string());
  for (const TensorInfo& t : golden->tensors()) {
    std::vector<uint8_t> bytes(golden->Bytes(t).begin(), golden->Bytes(t).end());
    std::vector<int64_t> shape = t.shape;
    edit(t, shape, bytes);
    ASSERT_TRUE(writer.Add(t.name, t.dtype, shape, bytes).ok()) << t.name;
  }
  std::ofstream(dir + "/codec.safetensors", std::ios::binary) << writer.Serialize();
}

struct RunResult {
  Summary summary;
  std::string output;
};

RunResult RunOn(const std::string& dir) {
  std::ostringstream out;
  const Summary summary = RunConformance(dir, out);
  return {summary, out.str()};
}

TEST(Conformance, PassesEveryNamedCheckOnTheGoldenVectors) {
  const RunResult run = RunOn(KVC_GOLDEN_DIR);
  EXPECT_EQ(run.summary.failed, 0) << run.output;
  EXPECT_GE(run.summary.passed, 11);
  for (const char* check : kNamedCodecChecks) {
    EXPECT_THAT(run.output, HasSubstr(std::string("PASS ") + check + "  ")) << check;
  }
  EXPECT_THAT(run.output, HasSubstr(std::to_string(run.summary.passed) + " passed, 0 failed\n"));
}

TEST(Conformance, PassesOnDataOfOtherShapes) {
  // Keep every other row, in reverse order, of every row-wise tensor, and the
  // second half of the 1-D cast vectors: other lengths, same schema.
  TempDir dir;
  RewriteCodec(dir.path(), [](const TensorInfo& t, std::vector<int64_t>& shape, std::vector<uint8_t>& bytes) {
    if (t.name == "e4m3_table" || t.name.rfind("e2m1_tie", 0) == 0) return;
    const size_t rows = static_cast<size_t>(shape[0]);
    const size_t row_bytes = bytes.size() / rows;
    std::vector<uint8_t> kept;
    if (shape.size() == 1) {
      kept.assign(bytes.begin() + static_cast<long>(rows / 2 * row_bytes), bytes.end());
      shape[0] = static_cast<int64_t>(rows - rows / 2);
    } else {
      for (size_t r = rows; r-- > 0;) {
        if (r % 2 == 1) continue;
        kept.insert(kept.end(), bytes.begin() + static_cast<long>(r * row_bytes),
                    bytes.begin() + static_cast<long>((r + 1) * row_bytes));
      }
      shape[0] = static_cast<int64_t>((rows + 1) / 2);
    }
    bytes = kept;
  });
  const RunResult run = RunOn(dir.path());
  EXPECT_EQ(run.summary.failed, 0) << run.output;
  EXPECT_GE(run.summary.passed, 11);
}

TEST(Conformance, FailsExactlyTheCheckWhoseExpectationWasAltered) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"e4m3_table", "codec/e4m3_table"},   {"e4m3_cast_codes", "codec/e4m3_cast"},
      {"bf16_cast_bits", "codec/bf16_cast"}, {"e2m1_tie_out", "codec/e2m1_ties"},
      {"fp8_codes", "codec/fp8_codes"},     {"fp8_scale_bytes", "codec/fp8_scales"},
      {"fp8_out", "codec/fp8_values"},      {"fp4_codes", "codec/fp4_codes"},
      {"fp4_scale_bytes", "codec/fp4_scales"}, {"fp4_out", "codec/fp4_values"},
  };
  for (const auto& [tensor, check] : cases) {
    TempDir dir;
    RewriteCodec(dir.path(), [&](const TensorInfo& t, std::vector<int64_t>&, std::vector<uint8_t>& bytes) {
      if (t.name == tensor) bytes[bytes.size() / 2 + 1] ^= 0x01;  // one low bit, mid-tensor
    });
    const RunResult run = RunOn(dir.path());
    EXPECT_THAT(run.output, HasSubstr("FAIL " + check + "  ")) << tensor;
    std::set<std::string> failed;
    std::istringstream lines(run.output);
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("FAIL ", 0) == 0) failed.insert(line.substr(5, line.find("  ") - 5));
    }
    // The FP4 kernel check compares against fp4_codes/scales too.
    std::set<std::string> allowed = {check};
    if (tensor == "fp4_codes" || tensor == "fp4_scale_bytes") allowed.insert("codec/index_key_kernel");
    for (const std::string& f : failed) EXPECT_TRUE(allowed.count(f)) << tensor << " also failed " << f;
  }
}

TEST(Conformance, MissingOrMalformedFilesAreClearFailures) {
  TempDir empty;
  RunResult run = RunOn(empty.path());
  EXPECT_EQ(run.summary.passed, 0);
  EXPECT_THAT(run.output, HasSubstr("FAIL codec/load  cannot open"));

  TempDir truncated;
  std::ifstream in(std::string(KVC_GOLDEN_DIR) + "/codec.safetensors", std::ios::binary);
  std::string image((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream(truncated.path() + "/codec.safetensors", std::ios::binary) << image.substr(0, image.size() / 2);
  run = RunOn(truncated.path());
  EXPECT_EQ(run.summary.passed, 0);
  EXPECT_THAT(run.output, HasSubstr("FAIL codec/load"));
  EXPECT_THAT(run.output, HasSubstr("outside the"));

  TempDir wrong_shape;
  RewriteCodec(wrong_shape.path(), [](const TensorInfo& t, std::vector<int64_t>& shape, std::vector<uint8_t>& bytes) {
    if (t.name == "fp8_scale_bytes") {  // 7 scale bytes per row -> 6
      bytes.resize(bytes.size() / 7 * 6);
      shape[1] = 6;
    }
  });
  run = RunOn(wrong_shape.path());
  EXPECT_THAT(run.output, HasSubstr("FAIL codec/fp8_rows  tensor \"fp8_scale_bytes\" has shape"));
}

int RunExecutable(const std::string& args, std::string* output) {
  FILE* pipe = popen((std::string(KVC_CONFORMANCE_EXE) + " " + args + " 2>&1").c_str(), "r");
  std::array<char, 4096> buffer;
  size_t n;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) output->append(buffer.data(), n);
  const int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(ConformanceExecutable, ExitStatusFollowsTheResult) {
  std::string out;
  EXPECT_EQ(RunExecutable(KVC_GOLDEN_DIR, &out), 0);
  EXPECT_THAT(out, HasSubstr(" passed, 0 failed"));
  out.clear();
  EXPECT_EQ(RunExecutable("/nonexistent-dir", &out), 1);
  EXPECT_THAT(out, HasSubstr("0 passed, 1 failed"));
  out.clear();
  EXPECT_EQ(RunExecutable("", &out), 2);
  EXPECT_THAT(out, HasSubstr("usage: kvc-conformance DIR"));
}

}  // namespace
}  // namespace kvc::conformance
