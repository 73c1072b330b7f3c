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
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "bench/roofline.h"
#include "benchmark/benchmark.h"
#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "kvc/executor.h"
#include "src/status.h"
#include "tools/synthetic_model.h"

namespace kvc::bench {
namespace {

constexpr int64_t kMillion = int64_t{1} << 20;

// An executor whose thread count changes between benchmarks: the cache is
// prefilled once per model (untimed, on every core) and each /threads:N run
// decodes on N threads.
class SwitchableExecutor final : public Executor {
 public:
  void Use(int threads) {
    if (pools_[threads] == nullptr) pools_[threads] = *ThreadPoolExecutor(threads);
    current_ = pools_[threads].get();
  }
  int concurrency() const override { return current_->concurrency(); }
  void ParallelFor(int64_t count, absl::FunctionRef<void(int64_t)> task) override { current_->ParallelFor(count, task); }

 private:
  std::unique_ptr<Executor> pools_[65];
  Executor* current_ = &InlineExecutor();
};

// One model's cache holding a 1M-token sequence, kept across the
// benchmarks of that model (the previous model's is freed first).
struct Prefilled {
  std::string name;
  std::unique_ptr<tools::SyntheticModel> synthetic;
  SwitchableExecutor executor;
  std::unique_ptr<Cache> cache;
  SequenceId seq = 0;
  int64_t t = kMillion;
};

absl::StatusOr<Prefilled*> PrefilledCache(const ModelSpec& preset) {
  static std::unique_ptr<Prefilled> held;
  if (held != nullptr && held->name == preset.name) return held.get();
  held.reset();
  auto p = std::make_unique<Prefilled>();
  p->name = preset.name;
  ModelSpec spec = preset;
  spec.max_context = kMillion + 4096;
  p->synthetic = std::make_unique<tools::SyntheticModel>(spec, 8192);
  p->executor.Use(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  CacheOptions options;
  options.history_bytes = int64_t{12} << 30;
  options.executor = &p->executor;
  KVC_ASSIGN_OR_RETURN(p->cache, Cache::Create(p->synthetic->spec(), options));
  KVC_ASSIGN_OR_RETURN(p->seq, p->cache->CreateSequence());
  for (int64_t at = 0; at < kMillion; at += p->synthetic->chunk_tokens()) {  // untimed prefill
    KVC_RETURN_IF_ERROR(p->synthetic->Append(*p->cache, p->seq, at, p->synthetic->chunk_tokens()));
    if (at % (kMillion / 8) == 0) std::fprintf(stderr, "  %s: prefill %lld of %lld tokens\n", spec.name.c_str(), static_cast<long long>(at), static_cast<long long>(kMillion));
  }
  held = std::move(p);
  return held.get();
}

void RunDecode(benchmark::State& state, const ModelSpec& preset) {
  const absl::StatusOr<Prefilled*> prefilled = PrefilledCache(preset);
  if (!prefilled.ok()) return state.SkipWithError(prefilled.status().ToString().c_str());
  Prefilled& p = **prefilled;
  const ModelSpec& spec = p.synthetic->spec();
  p.executor.Use(static_cast<int>(state.range(0)));
  tools::SyntheticModel::StepStats stats;
  for (auto _ : state) {
    if (!p.synthetic->DecodeStep(*p.cache, p.seq, p.t++, &stats, &p.executor).ok()) return state.SkipWithError("decode step failed");
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

// /threads:N: decoding on N threads (the cache's executor), read against the
// N-thread rooflines. Time per iteration = time per token.
void BM_DecodeStep_V4Flash_1M(benchmark::State& state) { RunDecode(state, ModelSpec::V4Flash()); }
void BM_DecodeStep_V4Pro_1M(benchmark::State& state) { RunDecode(state, ModelSpec::V4Pro()); }
BENCHMARK(BM_DecodeStep_V4Flash_1M)->ArgName("threads")->Arg(1)->Arg(2)->Iterations(8)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DecodeStep_V4Pro_1M)->ArgName("threads")->Arg(1)->Arg(2)->Iterations(8)->UseRealTime()->Unit(benchmark::kMillisecond);
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
