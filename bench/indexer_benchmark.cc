// Decode-time selection on a CSA layer at 1M tokens: scoring 262,144 FP4
// index keys with 64 heads (2.1 G multiply-adds), and choosing the top 1024.
//
// Rooflines in the same run: BM_Int8Peak (AVX-VNNI vpdpbusd with independent
// accumulators: the int8 multiply-add peak) for scoring, and
// std::nth_element on the same scores for top-k. The key buffers of four
// layers (71 MB) rotate, so keys come from DRAM, not the 32 MiB L3.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <random>
#include <vector>

#include "bench/roofline.h"
#include "benchmark/benchmark.h"
#include "kvc/indexer.h"
#include "kvc/row_kernels.h"

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
  state.SetLabel(ActiveSimdTargetName());
}
BENCHMARK(BM_IndexerScore_1M)->Threads(1)->Threads(2)->UseRealTime()->Unit(benchmark::kMillisecond);
KVC_BENCHMARK_ROOFLINE(BM_IndexerScore_1M, "BM_Int8Peak", "MACs_per_second");

// The int8 multiply-add peak: 8 independent 512-bit vpdpbusd accumulators,
// kept in registers (an array would put them on the stack and measure
// store-to-load latency instead).
#define KVC_DPBUSD(r) r = _mm512_dpbusd_epi32(r, a, b);
__attribute__((target("avx512f,avx512vnni"))) int VnniLoop(int64_t iterations) {
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  asm volatile("" : "+v"(a), "+v"(b));  // opaque inputs
  __m512i r0 = a, r1 = a, r2 = a, r3 = a, r4 = a, r5 = a, r6 = a, r7 = a;
  for (int64_t n = 0; n < iterations; ++n) {
    KVC_DPBUSD(r0) KVC_DPBUSD(r1) KVC_DPBUSD(r2) KVC_DPBUSD(r3) KVC_DPBUSD(r4) KVC_DPBUSD(r5) KVC_DPBUSD(r6) KVC_DPBUSD(r7)
    asm volatile("" : "+v"(r0), "+v"(r1), "+v"(r2), "+v"(r3), "+v"(r4), "+v"(r5), "+v"(r6), "+v"(r7));
  }
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(r0, r1), _mm512_add_epi32(r2, r3)),
                                             _mm512_add_epi32(_mm512_add_epi32(r4, r5), _mm512_add_epi32(r6, r7))));
  return lanes[0];
}

void BM_Int8Peak(benchmark::State& state) {
  if (!__builtin_cpu_supports("avx512vnni")) return state.SkipWithError("no AVX512-VNNI on this CPU");
  constexpr int64_t kIterations = 1 << 20;
  for (auto _ : state) benchmark::DoNotOptimize(VnniLoop(kIterations));
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
