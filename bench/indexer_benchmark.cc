// Decode-time selection on a CSA layer at 1M tokens: scoring 262,144 FP4
// index keys with 64 heads (2.1 G multiply-adds), and choosing the top 1024.
//
// Rooflines in the same run: BM_Int8Peak (AVX-VNNI vpdpbusd with independent
// accumulators: the int8 multiply-add peak) for scoring, and
// std::nth_element on the same scores for top-k. The key buffers of four
// layers (71 MB) rotate, so keys come from DRAM, not the 32 MiB L3.
#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "bench/roofline.h"
#include "benchmark/benchmark.h"
#include "kvc/cache.h"
#include "kvc/indexer.h"
#include "kvc/row_kernels.h"
#include "kvc/executor.h"
#include "absl/strings/str_cat.h"
#include "tools/int8_peak.h"

namespace kvc::bench {
namespace {

constexpr int64_t kKeys = 262144;  // 1M tokens / 4
constexpr int kHeads = 64;
constexpr int kLayers = 4;
constexpr int64_t kTopK = 1024;

struct Keys {
  std::vector<uint8_t> pages[kLayers];
  Keys() {
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<Bf16> raw(4096 * kIndexDim);
    for (int l = 0; l < kLayers; ++l) {
      pages[l].resize(static_cast<size_t>(kKeys) * 68);
      const PackedRows all = PageFooterRows(RowFormat::kIndexFp4, pages[l].data(), kKeys);
      for (int64_t first = 0; first < kKeys; first += 4096) {
        for (Bf16& v : raw) v = ToBf16(normal(rng));
        // Into the page's footer layout (codes, then scales), as the cache stores keys.
        if (!QuantizeIndexKeys(raw, all.Slice(first, 4096)).ok()) std::abort();
      }
    }
  }
};

const Keys& SharedKeys() {
  static const Keys* keys = new Keys;
  return *keys;
}

IndexQuery Query() {
  std::mt19937 rng(2);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Bf16> q(kHeads * kIndexDim);
  for (Bf16& v : q) v = ToBf16(normal(rng));
  std::vector<float> w(kHeads, 0.02f);
  float cos_sin[64];
  for (int j = 0; j < 32; ++j) {
    cos_sin[2 * j] = 1.0f;
    cos_sin[2 * j + 1] = 0.0f;
  }
  return *IndexQuery::Prepare(q, w, cos_sin);
}

void SetRates(benchmark::State& state, double macs_per_iteration, double keys_per_iteration) {
  state.counters["MACs_per_second"] = benchmark::Counter(static_cast<double>(state.iterations()) * macs_per_iteration,
                                                         benchmark::Counter::kIsRate);
  state.SetItemsProcessed(static_cast<int64_t>(static_cast<double>(state.iterations()) * keys_per_iteration));
}

void BM_IndexerScore_1M(benchmark::State& state) {
  const Keys& keys = SharedKeys();
  const IndexQuery q = Query();
  std::vector<float> scores(kKeys);
  int layer = static_cast<int>(state.thread_index());
  for (auto _ : state) {
    const ConstPackedRows view = PageFooterRows(RowFormat::kIndexFp4, keys.pages[layer].data(), kKeys);
    if (!ScoreIndexKeys(q, view, absl::MakeSpan(scores)).ok()) state.SkipWithError("ScoreIndexKeys failed");
    benchmark::DoNotOptimize(scores.data());
    layer = (layer + 1) % kLayers;
  }
  SetRates(state, double{kKeys} * kHeads * kIndexDim, kKeys);
  state.SetLabel(absl::StrCat(ActiveSimdTargetName(), ", N(0,1) keys"));
}
BENCHMARK(BM_IndexerScore_1M)->Threads(1)->Threads(2)->UseRealTime()->Unit(benchmark::kMillisecond);
KVC_BENCHMARK_ROOFLINE(BM_IndexerScore_1M, "BM_Int8Peak", "MACs_per_second");

// One query's keys split across N threads (an executor of N threads): the
// latency an engine sees for one layer's selection.
void BM_IndexerScore_1M_OneQuery(benchmark::State& state) {
  const Keys& keys = SharedKeys();
  const IndexQuery q = Query();
  const std::unique_ptr<Executor> executor = *ThreadPoolExecutor(static_cast<int>(state.range(0)));
  std::vector<float> scores(kKeys);
  int layer = 0;
  for (auto _ : state) {
    const ConstPackedRows view = PageFooterRows(RowFormat::kIndexFp4, keys.pages[layer].data(), kKeys);
    if (!ScoreIndexKeys(q, view, absl::MakeSpan(scores), executor.get()).ok()) state.SkipWithError("ScoreIndexKeys failed");
    benchmark::DoNotOptimize(scores.data());
    layer = (layer + 1) % kLayers;
  }
  SetRates(state, double{kKeys} * kHeads * kIndexDim, kKeys);
  state.SetLabel(absl::StrCat(ActiveSimdTargetName(), ", N(0,1) keys"));
}
BENCHMARK(BM_IndexerScore_1M_OneQuery)->ArgName("threads")->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
KVC_BENCHMARK_ROOFLINE(BM_IndexerScore_1M_OneQuery, "BM_Int8Peak", "MACs_per_second");

// One CSA layer's whole selection at 1M tokens through the cache
// (Cache::SelectAttentionSet: paged index scoring split across the
// executor's N threads, top-k, the set), keys from N(0,1) values appended by
// the engine (AppendIndexKeys). The decode step's per-layer work, minus the
// gather.
void BM_SelectAttentionSet_1M(benchmark::State& state) {
  const std::unique_ptr<Executor> executor = *ThreadPoolExecutor(static_cast<int>(state.range(0)));
  ModelSpec spec = ModelSpec::V4Flash();
  spec.layers.assign(1, LayerSpec{});
  spec.layers[0].kind = LayerKind::kCsa;
  const int64_t tokens = 4 * kKeys, chunk = 8192;
  spec.max_context = tokens;
  CacheOptions options;
  options.history_bytes = int64_t{1} << 30;
  options.executor = executor.get();
  auto cache = Cache::Create(spec, options);
  if (!cache.ok()) return state.SkipWithError(cache.status().ToString().c_str());
  const SequenceId seq = *(*cache)->CreateSequence();
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  std::vector<Bf16> values(static_cast<size_t>(chunk) * kHeadDim);
  for (Bf16& v : values) v = ToBf16(normal(rng));
  for (int64_t at = 0; at < tokens; at += chunk) {
    if (!(*cache)->Append(seq, 0, at, {values}).ok()) return state.SkipWithError("append");
  }
  for (int64_t at = 0; at < kKeys; at += chunk / 4) {
    const auto rows = absl::MakeConstSpan(values).first(static_cast<size_t>(chunk / 4) * kHeadDim);
    const auto keys = absl::MakeConstSpan(values).subspan(static_cast<size_t>(at % 7) * 128, static_cast<size_t>(chunk / 4) * kIndexDim);
    if (!(*cache)->AppendCompressedRows(seq, 0, at, rows).ok() || !(*cache)->AppendIndexKeys(seq, 0, at, keys).ok()) {
      return state.SkipWithError("append entries");
    }
  }
  std::vector<Bf16> q_raw(kHeads * kIndexDim);
  for (Bf16& v : q_raw) v = ToBf16(normal(rng));
  const IndexQuery q = *(*cache)->PrepareIndexQuery(tokens - 1, q_raw, std::vector<float>(kHeads, 0.02f));
  SelectionScratch scratch;
  AttentionSet set;
  for (auto _ : state) {
    if (!(*cache)->SelectAttentionSet(seq, 0, &q, &scratch, &set).ok()) state.SkipWithError("select");
  }
  SetRates(state, double{kKeys} * kHeads * kIndexDim, kKeys);
  state.SetLabel(absl::StrCat(ActiveSimdTargetName(), ", N(0,1) keys, top ", spec.index_topk));
}
BENCHMARK(BM_SelectAttentionSet_1M)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
KVC_BENCHMARK_ROOFLINE(BM_SelectAttentionSet_1M, "BM_Int8Peak", "MACs_per_second");

void BM_Int8Peak(benchmark::State& state) {
  if (!tools::HaveVnni512()) return state.SkipWithError("no AVX512-VNNI on this CPU");
  constexpr int64_t kIterations = 1 << 20;
  for (auto _ : state) benchmark::DoNotOptimize(tools::VnniLoop(kIterations));
  SetRates(state, double{kIterations} * 8 * 64, 0);  // 8 instructions x 64 int8 MACs
  state.SetLabel("vpdpbusd zmm, 8 accumulators");
}
BENCHMARK(BM_Int8Peak)->Threads(1)->Threads(2)->UseRealTime()->Unit(benchmark::kMillisecond);

std::vector<float> Scores() {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> s(kKeys);
  for (float& x : s) x = normal(rng);
  return s;
}

void BM_TopK_1M(benchmark::State& state) {
  const std::vector<float> scores = Scores();
  for (auto _ : state) benchmark::DoNotOptimize(TopK(scores, kTopK));
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * kKeys);
  state.SetLabel("k = 1024 of 262,144");
}
BENCHMARK(BM_TopK_1M)->UseRealTime()->Unit(benchmark::kMicrosecond);
KVC_BENCHMARK_ROOFLINE(BM_TopK_1M, "BM_NthElement_1M", "items_per_second");

void BM_NthElement_1M(benchmark::State& state) {
  const std::vector<float> scores = Scores();
  std::vector<float> work(scores.size());
  for (auto _ : state) {
    work = scores;  // nth_element reorders its input
    std::nth_element(work.begin(), work.begin() + kTopK, work.end(), std::greater<float>());
    benchmark::DoNotOptimize(work.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * kKeys);
  state.SetLabel("std::nth_element, k = 1024");
}
BENCHMARK(BM_NthElement_1M)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvc::bench
