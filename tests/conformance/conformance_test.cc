// The conformance runner passes on the golden vectors and on re-shaped copies
// of them (it assumes nothing about their sizes), fails exactly the check
// whose expected values were altered, and reports unreadable input clearly.
#include "tools/conformance/conformance.h"

#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/run_program.h"

namespace kvc::conformance {
namespace {

using ::testing::HasSubstr;

const char* const kNamedChecks[] = {
    "codec/e4m3_table", "codec/e4m3_cast",  "codec/bf16_cast",  "codec/e2m1_ties",
    "codec/fp8_codes",  "codec/fp8_scales", "codec/fp8_values", "codec/hadamard",
    "codec/fp4_codes",  "codec/fp4_scales", "codec/fp4_values",
    "win/window_rows",  "win/ring_final",   "win/ring_rechunked",
    "csa/window_rows",  "csa/ring_final",   "csa/ring_rechunked",
    "hca/window_rows",  "hca/ring_final",   "hca/ring_rechunked",
    "win/rope_table",   "csa/rope_table",   "hca/rope_table",
    "csa/compressed_entries", "csa/compressed_entries_rechunked",
    "csa/index_keys",   "csa/index_keys_rechunked",
    "hca/compressed_entries", "hca/compressed_entries_rechunked",
    "csa/topk_overlap",  "win/attention_set", "hca/attention_set",
    "win/prefill_attention_set", "csa/prefill_attention_set", "hca/prefill_attention_set",
    "win/verify_attention_set",  "hca/verify_attention_set",  "csa/verify_topk_overlap"};

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

using Edit = std::function<void(const TensorInfo&, std::vector<int64_t>&, std::vector<uint8_t>&)>;

// Writes `golden_case`.safetensors into `dir`, passing each tensor's bytes
// through `edit(info, shape, bytes)` (which may also change its shape); the
// other golden files are copied unchanged.
void RewriteCase(const std::string& dir, const std::string& golden_case, const Edit& edit) {
  for (const char* name : {"codec", "win", "csa", "hca"}) {
    const std::string from = std::string(KVC_GOLDEN_DIR) + "/" + name + ".safetensors";
    const std::string to = dir + "/" + name + ".safetensors";
    if (name != golden_case) {
      std::filesystem::copy_file(from, to);
      continue;
    }
    auto golden = SafetensorsFile::Read(from);
    ASSERT_TRUE(golden.ok()) << golden.status();
    SafetensorsWriter writer;
    writer.SetMetadata(golden->metadata()->Find("meta")->string());
    for (const TensorInfo& t : golden->tensors()) {
      std::vector<uint8_t> bytes(golden->Bytes(t).begin(), golden->Bytes(t).end());
      std::vector<int64_t> shape = t.shape;
      edit(t, shape, bytes);
      ASSERT_TRUE(writer.Add(t.name, t.dtype, shape, bytes).ok()) << t.name;
    }
    std::ofstream(to, std::ios::binary) << writer.Serialize();
  }
}

void RewriteCodec(const std::string& dir, const Edit& edit) { RewriteCase(dir, "codec", edit); }

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
  EXPECT_GE(run.summary.passed, 31);
  for (const char* check : kNamedChecks) {
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
  EXPECT_GE(run.summary.passed, 31);
}

TEST(Conformance, WindowChecksPassOnAShorterSequence) {
  // The win case cut to its first 250 tokens. The expected final ring is
  // derived from the official stored rows (win_kv_ref): slot p mod 128 holds
  // row p for the last 128 positions.
  constexpr int64_t kTokens = 250, kWindow = 128, kRowBytes = 512 * 2;
  auto golden = SafetensorsFile::Read(std::string(KVC_GOLDEN_DIR) + "/win.safetensors");
  ASSERT_TRUE(golden.ok());
  const TensorInfo* ref = golden->Find("win_kv_ref");
  ASSERT_NE(ref, nullptr);
  const auto ref_bytes = golden->Bytes(*ref);
  TempDir dir;
  RewriteCase(dir.path(), "win", [&](const TensorInfo& t, std::vector<int64_t>& shape, std::vector<uint8_t>& bytes) {
    if (t.name == "ring_final") {
      for (int64_t p = kTokens - kWindow; p < kTokens; ++p) {
        std::memcpy(bytes.data() + (p % kWindow) * kRowBytes, ref_bytes.data() + p * kRowBytes, kRowBytes);
      }
    } else if (shape.size() >= 2 && shape[0] == ref->shape[0]) {  // per-token tensors
      bytes.resize(bytes.size() / static_cast<size_t>(shape[0]) * kTokens);
      shape[0] = kTokens;
    }
  });
  const RunResult run = RunOn(dir.path());
  EXPECT_EQ(run.summary.failed, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("PASS win/ring_final  250 tokens"));
}

TEST(Conformance, FailsExactlyTheCheckWhoseExpectationWasAltered) {
  struct Case {
    std::string golden_case, tensor;
    std::string must_fail;
    std::set<std::string> may_also_fail;
    int64_t row = -1;  // >= 0: alter this row of an int32 matrix (its first index, by 256) instead
  };
  const std::vector<Case> cases = {
      {"codec", "e4m3_table", "codec/e4m3_table", {}},
      {"codec", "e4m3_cast_codes", "codec/e4m3_cast", {}},
      {"codec", "bf16_cast_bits", "codec/bf16_cast", {}},
      {"codec", "e2m1_tie_out", "codec/e2m1_ties", {}},
      {"codec", "fp8_codes", "codec/fp8_codes", {}},
      {"codec", "fp8_scale_bytes", "codec/fp8_scales", {}},
      {"codec", "fp8_out", "codec/fp8_values", {}},
      // The FP4 kernel check compares against fp4_codes/scales too.
      {"codec", "fp4_codes", "codec/fp4_codes", {"codec/index_key_kernel"}},
      {"codec", "fp4_scale_bytes", "codec/fp4_scales", {"codec/index_key_kernel"}},
      {"codec", "fp4_out", "codec/fp4_values", {}},
      {"win", "win_kv_ref", "win/window_rows", {}},
      {"hca", "ring_final", "hca/ring_final", {"hca/ring_rechunked"}},
      {"csa", "ring_after_prefill", "csa/ring_after_prefill", {}},
      {"csa", "comp_entries", "csa/compressed_entries", {"csa/compressed_entries_rechunked"}},
      {"csa", "idx_entries", "csa/index_keys", {"csa/index_keys_rechunked"}},
      {"hca", "comp_entries", "hca/compressed_entries", {"hca/compressed_entries_rechunked"}},
      // An input changed: every check reading it fails, nothing else.
      {"hca", "comp_score_in", "hca/compressed_entries", {"hca/compressed_entries_rechunked", "hca/attention_out"}},
      // The official selections: a prefill row fails the prefill check only;
      // a decode row the decode checks that read it and the verify check.
      {"win", "attn_idx", "win/prefill_attention_set", {}, 30},
      {"csa", "attn_idx", "csa/prefill_attention_set", {}, 20},
      {"hca", "attn_idx", "hca/prefill_attention_set", {}, 70},
      {"win", "attn_idx", "win/verify_attention_set", {"win/attention_set", "win/attention_out"}, 200},
      {"csa", "attn_idx", "csa/verify_topk_overlap", {"csa/topk_overlap", "csa/attention_out"}, 300},
      {"hca", "attn_idx", "hca/verify_attention_set", {"hca/attention_set", "hca/attention_out"}, 525},
  };
  for (const Case& c : cases) {
    TempDir dir;
    RewriteCase(dir.path(), c.golden_case, [&](const TensorInfo& t, std::vector<int64_t>& shape, std::vector<uint8_t>& bytes) {
      if (t.name != c.tensor) return;
      if (c.row >= 0) {  // bit 8 of the row's first int32: an index moves by 256
        bytes[static_cast<size_t>(c.row * shape[1]) * 4 + 1] ^= 0x01;
      } else if (c.tensor.size() > 3 && c.tensor.compare(c.tensor.size() - 3, 3, "_in") == 0) {
        // An input: flip an exponent bit of one fp32 value in the last quarter
        // (a low mantissa bit could vanish in bf16 rounding, as it should).
        bytes[bytes.size() * 3 / 4 / 4 * 4 + 3] ^= 0x40;
      } else {
        // An expected value: one low bit in the last quarter (ring rows
        // there were written).
        bytes[bytes.size() * 3 / 4 + 1] ^= 0x01;
      }
    });
    const RunResult run = RunOn(dir.path());
    std::set<std::string> failed;
    std::istringstream lines(run.output);
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("FAIL ", 0) == 0) failed.insert(line.substr(5, line.find("  ") - 5));
    }
    EXPECT_TRUE(failed.count(c.must_fail)) << c.tensor << " altered, but " << c.must_fail << " passed";
    for (const std::string& f : failed) {
      EXPECT_TRUE(f == c.must_fail || c.may_also_fail.count(f)) << c.tensor << " altered, and " << f << " failed too";
    }
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
  return testing::RunProgram(KVC_CONFORMANCE_EXE, args, output, /*stderr_too=*/true);
}

TEST(ConformanceExecutable, ExitStatusFollowsTheResult) {
  std::string out;
  EXPECT_EQ(RunExecutable(KVC_GOLDEN_DIR, &out), 0);
  EXPECT_THAT(out, HasSubstr(" passed, 0 failed"));
  out.clear();
  EXPECT_EQ(RunExecutable("/nonexistent-dir", &out), 1);
  EXPECT_THAT(out, HasSubstr("0 passed, 4 failed"));  // one load failure per case
  out.clear();
  EXPECT_EQ(RunExecutable("", &out), 2);
  EXPECT_THAT(out, HasSubstr("usage: kvc-conformance DIR"));
}

}  // namespace
}  // namespace kvc::conformance
