// kvc-selection: one CSA layer's decode-time selection at 1M tokens, timed,
// for bench/numpy_selection.py to set beside NumPy's: 262,144 FP4 index keys
// (N(0,1) values through QuantizeIndexKeys, the page-footer layout), one
// 64-head query, scores (ScoreIndexKeys through an executor of --threads),
// then the top 1,024 (TopK). Prints one JSON object: the best of --repeats
// runs. With --dump DIR it also writes what NumPy needs, little-endian:
// keys_f32.bin (keys x 128 fp32, the stored keys dequantized),
// query_f32.bin (heads x 128, the stored query dequantized: idx_q),
// weights_f32.bin (heads), kvc_topk_i64.bin (kvc's picks, ascending).
//
//   kvc-selection [--keys N] [--heads H] [--topk K] [--threads T] [--repeats R] [--dump DIR]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "kvc/executor.h"
#include "kvc/indexer.h"
#include "kvc/row_kernels.h"
#include "nlohmann/json.hpp"
#include "tools/tool_flags.h"

ABSL_FLAG(int64_t, keys, 262144, "index keys (1M tokens / 4)");
ABSL_FLAG(int64_t, heads, 64, "index heads, 1..4096");
ABSL_FLAG(int64_t, topk, 1024, "entries selected");
ABSL_FLAG(int64_t, threads, 0, "kvc's executor threads; 0: every core");
ABSL_FLAG(int64_t, repeats, 7, "timed runs (the best is reported)");
ABSL_FLAG(std::string, dump, "", "directory to write the inputs and kvc's picks to");

namespace {

int Fail(const std::string& why) {
  std::fprintf(stderr, "kvc-selection: %s\n", why.c_str());
  return 1;
}

template <typename T>
bool Write(const std::string& path, const std::vector<T>& v) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(T)));
  return static_cast<bool>(out);
}

int Run(int argc, char** argv) {
  const auto args = kvc::tools::ParseFlags(argc, argv);
  if (!args.ok()) return Fail(std::string(args.status().message()));
  const int64_t n = absl::GetFlag(FLAGS_keys), heads = absl::GetFlag(FLAGS_heads), k = absl::GetFlag(FLAGS_topk),
                repeats = absl::GetFlag(FLAGS_repeats);
  int64_t threads = absl::GetFlag(FLAGS_threads);
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  if (n < 1 || n > (int64_t{1} << 26) || heads < 1 || heads > 4096 || k < 1 || repeats < 1 || threads > 1024) {
    return Fail("--keys 1..2^26, --heads 1..4096, --topk >= 1, --repeats >= 1, --threads 0..1024");
  }
  auto executor = kvc::ThreadPoolExecutor(static_cast<int>(threads));
  if (!executor.ok()) return Fail(executor.status().ToString());

  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<kvc::Bf16> raw(static_cast<size_t>(n) * kvc::kIndexDim);
  for (kvc::Bf16& x : raw) x = kvc::ToBf16(normal(rng));
  std::vector<uint8_t> page(static_cast<size_t>(n) * 68);
  const kvc::PackedRows keys = kvc::PageFooterRows(kvc::RowFormat::kIndexFp4, page.data(), n);
  if (!kvc::QuantizeIndexKeys(raw, keys).ok()) return Fail("quantizing the keys");
  std::vector<kvc::Bf16> q_raw(static_cast<size_t>(heads) * kvc::kIndexDim);
  for (kvc::Bf16& x : q_raw) x = kvc::ToBf16(normal(rng));
  std::vector<float> weights(static_cast<size_t>(heads));
  for (float& w : weights) w = 0.01f * normal(rng);
  float identity[64];
  for (int j = 0; j < 32; ++j) identity[2 * j] = 1.0f, identity[2 * j + 1] = 0.0f;
  const auto query = kvc::IndexQuery::Prepare(q_raw, weights, identity);
  if (!query.ok()) return Fail(query.status().ToString());

  std::vector<float> scores(static_cast<size_t>(n));
  std::vector<int64_t> picked;
  kvc::TopKScratch scratch;
  double best_score = 1e30, best_topk = 1e30, best_total = 1e30;
  for (int64_t r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    if (!kvc::ScoreIndexKeys(*query, keys, absl::MakeSpan(scores), executor->get()).ok()) return Fail("scoring");
    const auto t1 = std::chrono::steady_clock::now();
    if (!kvc::TopK(scores, k, &picked, &scratch).ok()) return Fail("top-k");
    const auto t2 = std::chrono::steady_clock::now();
    best_score = std::min(best_score, std::chrono::duration<double>(t1 - t0).count());
    best_topk = std::min(best_topk, std::chrono::duration<double>(t2 - t1).count());
    best_total = std::min(best_total, std::chrono::duration<double>(t2 - t0).count());
  }

  const std::string dump = absl::GetFlag(FLAGS_dump);
  if (!dump.empty()) {
    std::vector<float> keys_f32(static_cast<size_t>(n) * kvc::kIndexDim);
    if (!kvc::DequantizeIndexKeys(keys, absl::MakeSpan(keys_f32)).ok()) return Fail("dequantizing the keys");
    if (!Write(dump + "/keys_f32.bin", keys_f32) || !Write(dump + "/query_f32.bin", query->Values()) ||
        !Write(dump + "/weights_f32.bin", weights) || !Write(dump + "/kvc_topk_i64.bin", picked)) {
      return Fail("writing to " + dump);
    }
  }
  const nlohmann::ordered_json out = {
      {"keys", n}, {"heads", heads}, {"topk", k}, {"threads", threads}, {"simd_target", kvc::ActiveSimdTargetName()},
      {"score_ms", 1e3 * best_score}, {"topk_ms", 1e3 * best_topk}, {"total_ms", 1e3 * best_total},
      {"macs_per_second", static_cast<double>(n) * static_cast<double>(heads) * 128 / best_score}};
  std::printf("%s", kvc::tools::JsonText(out).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
