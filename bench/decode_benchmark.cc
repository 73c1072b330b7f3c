// The 1M-token decode step of a whole V4 model: one sequence holding
// 1,048,576 tokens in every layer (prefilled through the compressors before
// timing); one step appends a token to every layer, prepares the CSA index
// queries, scores and selects (CSA top-k, HCA all, window), and gathers every
// layer's set to fp32. Time per iteration = time per token.
//
// Counters, each read against a roofline measured in the same run:
//   bytes_per_second: bytes touched per step (index keys scored, 584-byte rows
//     gathered, the fp32 rows written, the appended inputs) vs BM_ReadBandwidth;
//   MACs_per_second: index-score multiply-adds vs BM_Int8Peak.
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numeric>
#include <vector>

#include "bench/roofline.h"
#include "benchmark/benchmark.h"
#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "tools/synthetic_model.h"

namespace kvc::bench {
namespace {

constexpr int64_t kMillion = int64_t{1} << 20;

void RunDecode(benchmark::State& state, const ModelSpec& preset) {
  ModelSpec spec = preset;
  spec.max_context = kMillion + 4096;
  const tools::SyntheticModel synthetic(spec, 8192);
  CacheOptions options;
  options.history_bytes = int64_t{12} << 30;
  auto cache = Cache::Create(synthetic.spec(), options);
  if (!cache.ok()) return state.SkipWithError(cache.status().ToString().c_str());
  const SequenceId seq = *(*cache)->CreateSequence();
  for (int64_t at = 0; at < kMillion; at += synthetic.chunk_tokens()) {  // untimed prefill
    if (!synthetic.Append(**cache, seq, at, synthetic.chunk_tokens()).ok()) return state.SkipWithError("prefill failed");
    if (at % (kMillion / 8) == 0) std::fprintf(stderr, "  %s: prefill %lld of %lld tokens\n", spec.name.c_str(), static_cast<long long>(at), static_cast<long long>(kMillion));
  }
  tools::SyntheticModel::StepStats stats;
  int64_t t = kMillion;
  for (auto _ : state) {
    if (!synthetic.DecodeStep(**cache, seq, t++, &stats).ok()) return state.SkipWithError("decode step failed");
  }
  // Bytes appended per token: window row 1 KiB per layer; projections 10 KiB (CSA), 4 KiB (HCA).
  double appended = 0;
  for (const LayerSpec& l : spec.layers) appended += 1024 + (l.kind == LayerKind::kCsa ? 10240 : l.kind == LayerKind::kHca ? 4096 : 0);
  const double steps = static_cast<double>(stats.steps);
  const double touched = static_cast<double>(stats.keys_scored) * 68 + static_cast<double>(stats.rows_gathered) * (584 + 2048) +
                         steps * appended;
  state.SetBytesProcessed(static_cast<int64_t>(touched));
  state.counters["MACs_per_second"] = benchmark::Counter(static_cast<double>(stats.keys_scored) * spec.index_heads * 128,
                                                         benchmark::Counter::kIsRate);
  state.counters["append_ms"] = 1e3 * stats.append / steps;
  state.counters["query_ms"] = 1e3 * stats.index_query / steps;
  state.counters["select_ms"] = 1e3 * stats.select / steps;
  state.counters["gather_ms"] = 1e3 * stats.gather / steps;
  state.SetLabel(absl::StrCat(spec.name, ": ", stats.keys_scored / stats.steps, " keys scored, ",
                              stats.rows_gathered / stats.steps, " rows gathered per token"));
}

void BM_DecodeStep_V4Flash_1M(benchmark::State& state) { RunDecode(state, ModelSpec::V4Flash()); }
void BM_DecodeStep_V4Pro_1M(benchmark::State& state) { RunDecode(state, ModelSpec::V4Pro()); }
BENCHMARK(BM_DecodeStep_V4Flash_1M)->Iterations(8)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeStep_V4Pro_1M)->Iterations(8)->UseRealTime()->Unit(benchmark::kMillisecond);
KVC_BENCHMARK_ROOFLINE(BM_DecodeStep_V4Flash_1M, "BM_ReadBandwidth");
KVC_BENCHMARK_ROOFLINE(BM_DecodeStep_V4Pro_1M, "BM_ReadBandwidth");
KVC_BENCHMARK_ROOFLINE_TAGGED(BM_DecodeStep_V4Flash_1M, macs, "BM_Int8Peak", "MACs_per_second");
KVC_BENCHMARK_ROOFLINE_TAGGED(BM_DecodeStep_V4Pro_1M, macs, "BM_Int8Peak", "MACs_per_second");

// DRAM read bandwidth: summing 256 MiB per thread.
void BM_ReadBandwidth(benchmark::State& state) {
  std::vector<uint64_t> buffer((size_t{256} << 20) / sizeof(uint64_t), 1);
  for (auto _ : state) benchmark::DoNotOptimize(std::accumulate(buffer.begin(), buffer.end(), uint64_t{0}));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(buffer.size() * sizeof(uint64_t)));
  state.SetLabel("sum of 256 MiB");
}
BENCHMARK(BM_ReadBandwidth)->Threads(1)->Threads(2)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvc::bench
