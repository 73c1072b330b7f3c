// The programs, run as a user runs them: kvc-run (the README's main job) at a
// reduced size through every stage and through each way it can fail;
// kvc-run and kvc-footprint JSON with names that need escaping; the flags of
// every program refusing bad values; kvc_bench's standard output formats.
#include <sched.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/run_program.h"

namespace kvc {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

// `s` as one shell word.
std::string Quote(const std::string& s) {
  std::string out = "'";
  for (const char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// A fresh empty directory under the test's temp dir, removed with its contents at scope exit.
struct ScratchDir {
  explicit ScratchDir(const std::string& name) : path(::testing::TempDir() + "/" + name + ".XXXXXX") {
    EXPECT_NE(mkdtemp(path.data()), nullptr) << path;
  }
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  std::string path;
};

std::set<std::string> Files(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.insert(entry.path().filename().string());
  return names;
}

// Runs `program args` in `dir` (stdout and stderr into `out`); the exit status.
int RunIn(const std::string& dir, const std::string& program, const std::string& args, std::string* out,
          bool stderr_too = true) {
  return testing::RunProgram("cd " + Quote(dir) + " && " + Quote(program), args, out, stderr_too);
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
}

// A V4-Flash-shaped config.json (43 layers + one MTP entry) with the given
// model_type and max_position_embeddings.
std::string FlashConfig(const std::string& model_type, int64_t max_positions) {
  nlohmann::json ratios = {0, 0};
  for (int i = 0; i < 20; ++i) ratios.insert(ratios.end(), {4, 128});
  ratios.insert(ratios.end(), {4, 0});
  const nlohmann::json config = {
      {"model_type", model_type}, {"num_hidden_layers", 43}, {"num_nextn_predict_layers", 1},
      {"compress_ratios", ratios}, {"sliding_window", 128}, {"head_dim", 512}, {"qk_rope_head_dim", 64},
      {"index_n_heads", 64}, {"index_head_dim", 128}, {"index_topk", 512}, {"max_position_embeddings", max_positions},
      {"rope_theta", 10000}, {"compress_rope_theta", 160000}, {"rms_norm_eps", 1e-6},
      {"rope_scaling",
       {{"beta_fast", 32}, {"beta_slow", 1}, {"factor", 16}, {"original_max_position_embeddings", 4096}, {"type", "yarn"}}},
  };
  return config.dump();
}

std::string WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
  return path;
}

constexpr char kSmallRun[] = "--tokens 5000 --decode-steps 2";  // 5,002 tokens, +1 for the incremental save

TEST(KvcRun, ReducedRunTakesEveryStageAndLeavesOnlyTheJson) {
  const ScratchDir scratch("run");
  const std::string& dir = scratch.path;
  std::string out;
  ASSERT_EQ(RunIn(dir, KVC_RUN_EXE, std::string(kSmallRun) + " --json out.json --snapshot run.kvcsnap", &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("prefill 100%"));
  EXPECT_THAT(out, HasSubstr("decode step 2 of 2"));
  EXPECT_THAT(out, HasSubstr("restored sequence identical to the original"));
  EXPECT_EQ(Files(dir), std::set<std::string>{"out.json"});
  const nlohmann::json summary = ReadJson(dir + "/out.json");
  ASSERT_FALSE(summary.is_discarded());
  EXPECT_EQ(summary["model"], "DeepSeek-V4-Flash");
  EXPECT_EQ(summary["tokens"], 5002);
  EXPECT_EQ(summary["decode"]["steps"], 2);
  // The mean over both steps is the mean of the first and the warm one.
  const nlohmann::json& decode = summary["decode"];
  EXPECT_GT(decode["first_step_ms"].get<double>(), 0);
  EXPECT_GT(decode["warm_ms_per_token"].get<double>(), 0);
  EXPECT_NEAR(decode["ms_per_token"].get<double>(),
              (decode["first_step_ms"].get<double>() + decode["warm_ms_per_token"].get<double>()) / 2,
              1e-9 * decode["ms_per_token"].get<double>());
  EXPECT_THAT(out, HasSubstr("first step "));
  EXPECT_EQ(summary["snapshot"]["identical"], true);
  EXPECT_GT(summary["snapshot"]["incremental_bytes"].get<int64_t>(), 0);
  EXPECT_LT(summary["snapshot"]["incremental_bytes"].get<int64_t>(), summary["snapshot"]["file_bytes"].get<int64_t>());
}

// The model's own max_context equals tokens + decode steps: the run sizes the
// cache for the incremental save's extra token too.
TEST(KvcRun, RunsAtTheModelsMaxContextEdge) {
  const ScratchDir scratch("edge");
  const std::string& dir = scratch.path;
  const std::string config = WriteFile(dir + "/config.json", FlashConfig("deepseek_v4", 5002));
  std::string out;
  EXPECT_EQ(RunIn(dir, KVC_RUN_EXE, std::string(kSmallRun) + " --model config.json --json out.json", &out), 0) << out;
  EXPECT_EQ(Files(dir), (std::set<std::string>{"config.json", "out.json"}));
}

TEST(KvcRun, ExactlyFittingMaxContextSucceeds) {
  const ScratchDir scratch("fits");
  const std::string& dir = scratch.path;
  std::string out;
  EXPECT_EQ(RunIn(dir, KVC_RUN_EXE, std::string(kSmallRun) + " --max-context 5003", &out), 0) << out;
  EXPECT_EQ(Files(dir), std::set<std::string>{"kvc-run.json"});
}

// Each way the run can fail: exit 1, the stage and the library's reason on
// stderr, and no file left (no snapshot, no JSON).
struct Failure {
  std::string args;
  std::string stage;   // what kvc-run says failed
  std::string reason;  // from the library
};

TEST(KvcRun, EveryFailurePrintsItsCauseAndLeavesNoFile) {
  const std::vector<Failure> failures = {
      {"--max-context 5002", "decode step at token 5002 (before the incremental save): ", "exceed"},  // one token short
      {"--max-context 5001", "decode step at token 5001: ", "max_context"},
      {"--max-context 4000", "prefill of tokens 0..4999: ", "exceed max_context 4000"},
      {"--snapshot no-such-dir/run.kvcsnap", "snapshot save: ", "no-such-dir"},
  };
  for (const Failure& f : failures) {
    SCOPED_TRACE(f.args);
    const ScratchDir scratch("fail");
    const std::string& dir = scratch.path;
    std::string out;
    EXPECT_EQ(RunIn(dir, KVC_RUN_EXE, std::string(kSmallRun) + " " + f.args, &out), 1) << out;
    EXPECT_THAT(out, HasSubstr("kvc-run: " + f.stage));
    EXPECT_THAT(out, HasSubstr(f.reason));
    EXPECT_EQ(Files(dir), std::set<std::string>{});
  }
}

// A file-size limit between the full and the grown file: the incremental save
// fails (SIGXFSZ ignored, so write() reports EFBIG), and the file goes too.
// (prlimit, util-linux: sh's `ulimit -f` counts in 512- or 1024-byte blocks.)
TEST(KvcRun, FailedIncrementalSaveLeavesNoFile) {
  const ScratchDir scratch("grow");
  const std::string& dir = scratch.path;
  std::string out;
  ASSERT_EQ(RunIn(dir, KVC_RUN_EXE, std::string(kSmallRun) + " --json sizes.json", &out), 0) << out;
  const nlohmann::json sizes = ReadJson(dir + "/sizes.json");
  fs::remove(dir + "/sizes.json");
  const int64_t full = sizes["snapshot"]["file_bytes"].get<int64_t>() - sizes["snapshot"]["incremental_bytes"].get<int64_t>();
  const int64_t limit = full + sizes["snapshot"]["incremental_bytes"].get<int64_t>() / 2;
  out.clear();
  const std::string program = "trap '' XFSZ; prlimit --fsize=" + std::to_string(limit) + " " + KVC_RUN_EXE;
  EXPECT_EQ(testing::RunProgram("cd " + Quote(dir) + " && " + program, kSmallRun, &out, true), 1) << out;
  EXPECT_THAT(out, HasSubstr("kvc-run: incremental snapshot save: "));
  EXPECT_EQ(Files(dir), std::set<std::string>{});
}

// kvc-run removes the scratch snapshot it wrote, never a file it found: an
// existing --snapshot path is refused before anything runs, and the file is kept.
TEST(KvcRun, AnExistingSnapshotPathIsRefusedAndKept) {
  const ScratchDir scratch("existing");
  const std::string& dir = scratch.path;
  WriteFile(dir + "/precious.kvcsnap", "my precious data");
  std::string out;
  EXPECT_EQ(RunIn(dir, KVC_RUN_EXE, std::string(kSmallRun) + " --snapshot precious.kvcsnap", &out), 1) << out;
  EXPECT_THAT(out, HasSubstr("precious.kvcsnap exists"));
  EXPECT_EQ(Files(dir), std::set<std::string>{"precious.kvcsnap"});
  std::ifstream in(dir + "/precious.kvcsnap");
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), "my precious data");
}

// --help is not an error: the usage on stdout, exit 0.
TEST(ToolsFlags, HelpPrintsTheUsageAndExitsZero) {
  for (const std::string program : {KVC_RUN_EXE, KVC_DEMO_EXE, KVC_FOOTPRINT_EXE}) {
    std::string out;
    EXPECT_EQ(testing::RunProgram(program, "--help", &out, false), 0) << program;
    EXPECT_THAT(out, HasSubstr("usage:")) << program;
  }
}

// Totals beyond int64 (an MHA model at 2^40 tokens) stay positive JSON numbers.
TEST(ToolsJson, FootprintTotalsBeyondInt64StayPositive) {
  std::string out;
  ASSERT_EQ(testing::RunProgram(KVC_FOOTPRINT_EXE, "--json --tokens 1099511627776 --model mha:128:128:128:4", &out, false), 0);
  const nlohmann::json footprint = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(footprint.is_discarded()) << out;
  EXPECT_GT(footprint[0]["total_bytes"].get<double>(), 0x1p63) << out;
  for (const auto& [name, bytes] : footprint[0]["components"].items()) EXPECT_GE(bytes.get<double>(), 0) << name;
}

// A model name and paths holding a quote and a backslash come out as valid JSON.
TEST(ToolsJson, NamesThatNeedEscapingStayValidJson) {
  const std::string name = "v4 \"quoted\" \\ name";
  const ScratchDir scratch("q\"u\\o'te");
  const std::string& dir = scratch.path;
  WriteFile(dir + "/config.json", FlashConfig(name, 1048576));
  std::string out;
  ASSERT_EQ(RunIn(dir, KVC_RUN_EXE, "--tokens 300 --decode-steps 1 --model config.json --json " + Quote("a\"b\\c.json"), &out), 0)
      << out;
  const nlohmann::json run = ReadJson(dir + "/a\"b\\c.json");
  ASSERT_FALSE(run.is_discarded());
  EXPECT_EQ(run["model"], name);

  out.clear();
  ASSERT_EQ(testing::RunProgram(KVC_FOOTPRINT_EXE, "--json --tokens 1000 --model " + Quote(dir + "/config.json"), &out, false), 0);
  const nlohmann::json footprint = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(footprint.is_discarded()) << out;
  ASSERT_EQ(footprint.size(), 1u);
  EXPECT_EQ(footprint[0]["model"], name);
  EXPECT_EQ(footprint[0]["tokens"], 1000);
}

TEST(ToolsFlags, BadValuesAreRefusedWithAMessageAndExitTwo) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {KVC_RUN_EXE, "--tokens abc"},       {KVC_RUN_EXE, "--tokens 0"},          {KVC_RUN_EXE, "--tokens=12x"},
      {KVC_RUN_EXE, "--decode-steps -1"},  {KVC_RUN_EXE, "--max-context 1e3"},   {KVC_RUN_EXE, "--tokens"},
      {KVC_RUN_EXE, "--bogus 1"},          {KVC_RUN_EXE, "stray"},               {KVC_DEMO_EXE, "--rows 12abc"},
      {KVC_DEMO_EXE, "--rows 0"},          {KVC_DEMO_EXE, "--rows 99999999999999999999"}, {KVC_DEMO_EXE, "--rows"},
      {KVC_DEMO_EXE, "--rows=-5"},         {KVC_FOOTPRINT_EXE, "--tokens 1x"},   {KVC_FOOTPRINT_EXE, "--tokens 5,,6"},
      {KVC_FOOTPRINT_EXE, "--format fp16"}, {KVC_FOOTPRINT_EXE, "--measure=maybe"},
  };
  for (const auto& [program, args] : bad) {
    std::string out;
    EXPECT_EQ(testing::RunProgram(program, args, &out, true), 2) << program << " " << args << "\n" << out;
    EXPECT_THAT(out, HasSubstr("usage:")) << program << " " << args;
    const std::string flag = args.substr(0, args.find_first_of(" ="));
    if (flag != "stray") {
      EXPECT_THAT(out, HasSubstr(flag)) << program << " " << args;
    }
  }
  std::string out;
  EXPECT_EQ(testing::RunProgram(KVC_DEMO_EXE, "--rows=1000", &out, false), 0) << out;
  EXPECT_THAT(out, HasSubstr("1000 KV rows"));
}

#ifdef KVC_BENCH_EXE
// Google Benchmark's own flags: --benchmark_format=json prints JSON, and
// --benchmark_out writes it; both carry the roofline ratios as counters.
TEST(KvcBench, JsonOutputCarriesRooflineRatios) {
  const ScratchDir scratch("bench");
  const std::string& dir = scratch.path;
  const std::string args = "--benchmark_filter='^BM_(TopK|NthElement)_1M/' --benchmark_min_time=0.01 --benchmark_format=json";
  std::string out;
  ASSERT_EQ(RunIn(dir, KVC_BENCH_EXE, args + " --benchmark_out=out.json --benchmark_out_format=json", &out, false), 0) << out;
  for (const nlohmann::json& report : {nlohmann::json::parse(out, nullptr, false), ReadJson(dir + "/out.json")}) {
    ASSERT_FALSE(report.is_discarded()) << out;
    EXPECT_TRUE(report["context"].contains("kvc_simd_target"));
    std::map<std::string, nlohmann::json> runs;
    for (const nlohmann::json& run : report["benchmarks"]) {
      const std::string name = run["name"];
      runs[name.substr(0, name.find('/'))] = run;  // "BM_TopK_1M/real_time"
    }
    ASSERT_EQ(runs.count("BM_TopK_1M"), 1u) << report.dump();
    ASSERT_EQ(runs.count("BM_NthElement_1M"), 1u) << report.dump();
    const nlohmann::json& topk = runs["BM_TopK_1M"];
    ASSERT_TRUE(topk.contains("items_per_second/BM_NthElement_1M")) << topk.dump();
    const double expected = topk["items_per_second"].get<double>() / runs["BM_NthElement_1M"]["items_per_second"].get<double>();
    EXPECT_NEAR(topk["items_per_second/BM_NthElement_1M"].get<double>(), expected, 1e-6 * expected);
  }
  out.clear();
  ASSERT_EQ(RunIn(dir, KVC_BENCH_EXE, "--benchmark_filter='^BM_(TopK|NthElement)_1M/' --benchmark_min_time=0.01 "
                                      "--benchmark_format=csv", &out, false), 0) << out;
  EXPECT_THAT(out, HasSubstr("items_per_second/BM_NthElement_1M"));
  EXPECT_THAT(out, Not(HasSubstr("Ratios to rooflines")));
}

// A roofline whose two threads share one CPU (taskset) runs at about its
// one-thread rate: the ratio table notes that it overstates. A reference run
// on one thread only (BM_NthElement_1M) gets no note.
TEST(KvcBench, FlatMultiThreadRooflineGetsANote) {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  ASSERT_EQ(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
  int cpu = 0;
  while (cpu < CPU_SETSIZE && !CPU_ISSET(cpu, &allowed)) ++cpu;
  ASSERT_LT(cpu, CPU_SETSIZE);
  std::string out;
  ASSERT_EQ(testing::RunProgram("taskset -c " + std::to_string(cpu) + " " + Quote(KVC_BENCH_EXE),
                                "--benchmark_filter='^BM_(Memcpy|TopK_1M|NthElement_1M)/' "
                                "--benchmark_min_time=0.2",
                                &out, false),
            0)
      << out;
  EXPECT_THAT(out, HasSubstr("Ratios to rooflines"));
  EXPECT_THAT(out, HasSubstr("note: BM_Memcpy/real_time/threads:2 measured")) << out;
  EXPECT_THAT(out, Not(HasSubstr("note: BM_Memcpy/real_time/threads:1"))) << out;
  EXPECT_THAT(out, Not(HasSubstr("note: BM_NthElement"))) << out;
}
#endif

}  // namespace
}  // namespace kvc
