// Append throughput of the cache's streams: window rows, and the CSA / HCA
// compressors (pooling, norm, RoPE, FP8 rows, Hadamard + FP4 keys), per layer
// kind and for whole V4 models, at 1M tokens.
//
// Bytes counted: the compulsory traffic, i.e. every input read once (window
// row 1 KiB, projections: CSA 8 KiB + indexer 2 KiB, HCA 4 KiB per token)
// and every stored entry written once (584 B per entry, 68 B per key). The
// ratio to BM_Memcpy (same run) is then the fraction of the memory floor.
// Inputs cycle through two chunks of 8,192 tokens (88 MiB for CSA), so they
// come from DRAM, not cache. /threads:N: the cache's executor has N threads
// (kvc::ThreadPoolExecutor), read against the N-thread memcpy.
// BM_FreshPages beside them: what this machine charges per fresh page, the
// part of a prefill into a new cache that is the memory's, not kvc's.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "bench/roofline.h"
#include "benchmark/benchmark.h"
#include "kvc/cache.h"
#include "absl/strings/str_cat.h"
#include "kvc/compressor.h"
#include "kvc/executor.h"
#include "src/status.h"

namespace kvc::bench {
namespace {

constexpr int64_t kChunk = 8192;
constexpr int64_t kMillion = int64_t{1} << 20;

std::vector<float> RandomFloats(size_t n, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// What a fresh cache's memory costs before any byte of it is useful: a
// prefill writes every entry into pages no one touched before (3.7 GB for
// V4-Flash at 1M tokens). Per 4 KiB page: MADV_POPULATE_WRITE (what the page
// store does when it grants fresh pages: the kernel maps and zeroes them),
// then the first store into each page (what the row kernels then do), then
// a second store (a warm page, for comparison). 1 GiB per thread and
// iteration, mapped and unmapped each time (untimed); state.range(0) threads
// of a kvc::ThreadPoolExecutor each take their own GiB, as the page store's
// parallel prefault does. state.range(1) = 1: the range is MADV_HUGEPAGE
// first (2 MiB pages where the kernel has them; kvc does not ask for them).
// Counters: core time per 4 KiB page for each phase (wall time x threads /
// pages), and the wall time per page that a prefill waits for the first two
// phases on this many threads. On bare metal the first store is a cache
// miss at most; in a guest with shadow page tables it can trap to the host
// once per page, and the host may back a page only when it is first written.
void BM_FreshPages(benchmark::State& state) {
  constexpr size_t kBytesPerThread = size_t{1} << 30;
  const int threads = static_cast<int>(state.range(0));
  const bool huge = state.range(1) != 0;
  const std::unique_ptr<Executor> executor = *ThreadPoolExecutor(threads);
  const size_t bytes = kBytesPerThread * static_cast<size_t>(threads);
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  double populate = 0, first = 0, second = 0;
  for (auto _ : state) {
    state.PauseTiming();
    void* map = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return state.SkipWithError("mmap refused the range");
    if (huge && ::madvise(map, bytes, MADV_HUGEPAGE) != 0) {
      ::munmap(map, bytes);
      return state.SkipWithError("MADV_HUGEPAGE refused (no transparent huge pages)");
    }
    uint8_t* const base = static_cast<uint8_t*>(map);
    state.ResumeTiming();
    using Clock = std::chrono::steady_clock;
    std::atomic<bool> refused{false};
    const auto t0 = Clock::now();
    executor->ParallelFor(threads, [&](int64_t t) {
      if (::madvise(base + static_cast<size_t>(t) * kBytesPerThread, kBytesPerThread, MADV_POPULATE_WRITE) != 0) refused = true;
    });
    const auto t1 = Clock::now();
    auto store_each_page = [&](uint8_t value) {
      executor->ParallelFor(threads, [&](int64_t t) {
        volatile uint8_t* bytes_of = base + static_cast<size_t>(t) * kBytesPerThread;
        for (size_t b = 0; b < kBytesPerThread; b += page) bytes_of[b] = value;
      });
    };
    store_each_page(1);
    const auto t2 = Clock::now();
    store_each_page(2);
    const auto t3 = Clock::now();
    state.PauseTiming();
    ::munmap(map, bytes);
    if (refused) return state.SkipWithError("MADV_POPULATE_WRITE refused (Linux < 5.14?)");
    state.ResumeTiming();
    populate += std::chrono::duration<double, std::micro>(t1 - t0).count();
    first += std::chrono::duration<double, std::micro>(t2 - t1).count();
    second += std::chrono::duration<double, std::micro>(t3 - t2).count();
  }
  const double pages = static_cast<double>(state.iterations()) * static_cast<double>(bytes / page);
  state.counters["populate_us_per_page"] = populate * threads / pages;
  state.counters["first_store_us_per_page"] = first * threads / pages;
  state.counters["second_store_us_per_page"] = second * threads / pages;
  state.counters["fresh_wall_us_per_page"] = (populate + first) / pages;
  state.SetLabel(absl::StrCat(huge ? "MADV_HUGEPAGE, " : "", "1 GiB per thread: MADV_POPULATE_WRITE, then one store per OS page, twice"));
}

// Synthetic inputs and parameters, shared by all layers of a kind.
struct Inputs {
  std::vector<Bf16> rows[2];
  std::vector<float> csa_kv[2], csa_score[2], idx_kv[2], idx_score[2], hca_kv[2], hca_score[2];
  std::vector<float> csa_ape, csa_norm, idx_ape, idx_norm, hca_ape, hca_norm;

  explicit Inputs(bool csa, bool hca) {
    for (int c = 0; c < 2; ++c) {
      const std::vector<float> r = RandomFloats(static_cast<size_t>(kChunk) * kHeadDim, 10 + c, 1.0f);
      rows[c].resize(r.size());
      for (size_t i = 0; i < r.size(); ++i) rows[c][i] = ToBf16(r[i]);
      if (csa) {
        csa_kv[c] = RandomFloats(static_cast<size_t>(kChunk) * 1024, 20 + c, 1.0f);
        csa_score[c] = RandomFloats(static_cast<size_t>(kChunk) * 1024, 30 + c, 2.0f);
        idx_kv[c] = RandomFloats(static_cast<size_t>(kChunk) * 256, 40 + c, 1.0f);
        idx_score[c] = RandomFloats(static_cast<size_t>(kChunk) * 256, 50 + c, 2.0f);
      }
      if (hca) {
        hca_kv[c] = RandomFloats(static_cast<size_t>(kChunk) * 512, 60 + c, 1.0f);
        hca_score[c] = RandomFloats(static_cast<size_t>(kChunk) * 512, 70 + c, 2.0f);
      }
    }
    csa_ape = RandomFloats(4 * 1024, 1, 0.5f);
    csa_norm = RandomFloats(512, 2, 1.0f);
    idx_ape = RandomFloats(4 * 256, 3, 0.5f);
    idx_norm = RandomFloats(128, 4, 1.0f);
    hca_ape = RandomFloats(128 * 512, 5, 0.5f);
    hca_norm = RandomFloats(512, 6, 1.0f);
  }

  void SetParams(ModelSpec& spec) const {
    for (LayerSpec& layer : spec.layers) {
      if (layer.kind == LayerKind::kCsa) {
        layer.compressor = {csa_ape, csa_norm};
        layer.indexer = {idx_ape, idx_norm};
      } else if (layer.kind == LayerKind::kHca) {
        layer.compressor = {hca_ape, hca_norm};
      }
    }
  }

  LayerTokens For(LayerKind kind, int chunk) const {
    LayerTokens t;
    t.window_rows = rows[chunk];
    if (kind == LayerKind::kCsa) {
      t.compressor_kv = csa_kv[chunk];
      t.compressor_score = csa_score[chunk];
      t.indexer_kv = idx_kv[chunk];
      t.indexer_score = idx_score[chunk];
    } else if (kind == LayerKind::kHca) {
      t.compressor_kv = hca_kv[chunk];
      t.compressor_score = hca_score[chunk];
    }
    return t;
  }
};

// Compulsory bytes per token of one layer: inputs read once, entries written once.
double BytesPerToken(LayerKind kind) {
  const double window = 2.0 * kHeadDim;
  switch (kind) {
    case LayerKind::kWindow: return window;
    case LayerKind::kCsa: return window + 2 * 1024 * 4 + 2 * 256 * 4 + 584.0 / 4 + 68.0 / 4;
    case LayerKind::kHca: return window + 2 * 512 * 4 + 584.0 / 128;
  }
  return 0;
}

// Appends `tokens` tokens to every layer of a fresh sequence of a fresh
// cache, whose executor has state.range(0) threads. Recycled pages: the
// cache is made, filled by a first sequence of the same length and that
// sequence released before the timing starts (a serving engine's steady
// state: its pages come back zeroed by kvc, not fresh from the kernel).
enum class Pages { kFresh, kRecycled };
void RunAppend(benchmark::State& state, ModelSpec spec, int64_t tokens, Pages pages = Pages::kFresh) {
  const std::unique_ptr<Executor> executor = *ThreadPoolExecutor(static_cast<int>(state.range(0)));
  bool csa = false, hca = false;
  for (const LayerSpec& l : spec.layers) {
    csa |= l.kind == LayerKind::kCsa;
    hca |= l.kind == LayerKind::kHca;
  }
  const Inputs inputs(csa, hca);
  inputs.SetParams(spec);
  CacheOptions options;
  options.history_bytes = int64_t{12} << 30;
  options.executor = executor.get();
  double bytes_per_token = 0;
  for (const LayerSpec& l : spec.layers) bytes_per_token += BytesPerToken(l.kind);
  auto fill = [&](Cache& cache) -> absl::StatusOr<SequenceId> {
    KVC_ASSIGN_OR_RETURN(const SequenceId seq, cache.CreateSequence());
    for (int64_t at = 0, i = 0; at < tokens; at += kChunk, ++i) {
      for (int layer = 0; layer < static_cast<int>(spec.layers.size()); ++layer) {
        const absl::Status s =
            cache.Append(seq, layer, at, inputs.For(spec.layers[static_cast<size_t>(layer)].kind, static_cast<int>(i % 2)));
        if (!s.ok()) return s;
      }
    }
    return seq;
  };
  for (auto _ : state) {
    state.PauseTiming();
    std::unique_ptr<Cache> recycled;
    if (pages == Pages::kRecycled) {
      absl::StatusOr<std::unique_ptr<Cache>> made = Cache::Create(spec, options);
      if (!made.ok()) return state.SkipWithError(made.status().ToString().c_str());
      recycled = *std::move(made);
      const absl::StatusOr<SequenceId> first = fill(*recycled);
      if (!first.ok()) return state.SkipWithError(first.status().ToString().c_str());
      const absl::Status released = recycled->Free(*first);
      if (!released.ok()) return state.SkipWithError(released.ToString().c_str());
    }
    state.ResumeTiming();
    absl::StatusOr<std::unique_ptr<Cache>> cache =
        pages == Pages::kRecycled ? absl::StatusOr<std::unique_ptr<Cache>>(std::move(recycled)) : Cache::Create(spec, options);
    if (!cache.ok()) return state.SkipWithError(cache.status().ToString().c_str());
    const absl::StatusOr<SequenceId> seq = fill(**cache);
    if (!seq.ok()) return state.SkipWithError(seq.status().ToString().c_str());
    state.PauseTiming();
    cache->reset();  // freeing 5 GiB is not part of appending
    state.ResumeTiming();
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * tokens);
  state.SetBytesProcessed(static_cast<int64_t>(static_cast<double>(state.iterations()) * static_cast<double>(tokens) * bytes_per_token));
  state.counters["layers"] = static_cast<double>(spec.layers.size());
  state.SetLabel(absl::StrCat(spec.name, ", ", tokens, " tokens"));
}

ModelSpec OneLayer(LayerKind kind) {
  ModelSpec spec = ModelSpec::V4Pro();
  spec.layers.assign(1, LayerSpec{});
  spec.layers[0].kind = kind;
  spec.name = LayerKindName(kind);
  return spec;
}

void BM_Append_Window(benchmark::State& state) { RunAppend(state, OneLayer(LayerKind::kWindow), kMillion); }
void BM_Append_Csa(benchmark::State& state) { RunAppend(state, OneLayer(LayerKind::kCsa), kMillion); }
void BM_Append_Hca(benchmark::State& state) { RunAppend(state, OneLayer(LayerKind::kHca), kMillion); }
void BM_Prefill_V4Flash_1M(benchmark::State& state) { RunAppend(state, ModelSpec::V4Flash(), kMillion); }
void BM_Prefill_V4Pro_1M(benchmark::State& state) { RunAppend(state, ModelSpec::V4Pro(), kMillion); }
void BM_Prefill_V4Flash_1M_RecycledPages(benchmark::State& state) {
  RunAppend(state, ModelSpec::V4Flash(), kMillion, Pages::kRecycled);
}

BENCHMARK(BM_FreshPages)->ArgNames({"threads", "huge"})->Args({1, 0})->Args({2, 0})->Args({2, 1})->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Append_Window)->ArgName("threads")->Arg(1)->Arg(2)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Append_Csa)->ArgName("threads")->Arg(1)->Arg(2)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Append_Hca)->ArgName("threads")->Arg(1)->Arg(2)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Prefill_V4Flash_1M)->ArgName("threads")->Arg(1)->Arg(2)->Iterations(1)->UseRealTime()->Unit(benchmark::kSecond);
BENCHMARK(BM_Prefill_V4Pro_1M)->ArgName("threads")->Arg(1)->Arg(2)->Iterations(1)->UseRealTime()->Unit(benchmark::kSecond);
BENCHMARK(BM_Prefill_V4Flash_1M_RecycledPages)->ArgName("threads")->Arg(2)->Iterations(1)->UseRealTime()->Unit(benchmark::kSecond);
KVC_BENCHMARK_ROOFLINE(BM_Append_Window, "BM_Memcpy");
KVC_BENCHMARK_ROOFLINE(BM_Append_Csa, "BM_Memcpy");
KVC_BENCHMARK_ROOFLINE(BM_Append_Hca, "BM_Memcpy");
KVC_BENCHMARK_ROOFLINE(BM_Prefill_V4Flash_1M, "BM_Memcpy");
KVC_BENCHMARK_ROOFLINE(BM_Prefill_V4Pro_1M, "BM_Memcpy");
KVC_BENCHMARK_ROOFLINE(BM_Prefill_V4Flash_1M_RecycledPages, "BM_Memcpy");
KVC_BENCHMARK_ROOFLINE_TAGGED(BM_Prefill_V4Pro_1M, read, "BM_ReadBandwidth");

}  // namespace
}  // namespace kvc::bench
