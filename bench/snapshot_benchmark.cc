// Snapshots of a V4-Flash sequence (prefilled through the compressors before
// timing): a full save (written, flushed, renamed), an incremental save after
// one more decode token, and a restore from the (page-cached) file.
//
// Counters, read against rooflines measured in the same run:
//   bytes_per_second: file bytes written (saves) vs BM_FileWrite, the same
//     volume written sequentially in 8 MiB writes and flushed; file bytes
//     restored vs BM_Memcpy (the file is in the page cache, so a restore is a
//     copy into pages plus checksums).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/roofline.h"
#include "benchmark/benchmark.h"
#include "kvc/cache.h"
#include "kvc/snapshot.h"
#include "tools/synthetic_model.h"

namespace kvc::bench {
namespace {

std::string SnapshotPath() { return absl::StrCat("/tmp/kvc_bench_", ::getpid(), ".kvcsnap"); }

// One prefilled V4-Flash sequence per length, shared by the benchmarks.
struct Prefilled {
  std::unique_ptr<tools::SyntheticModel> synthetic;
  std::unique_ptr<Cache> cache;
  SequenceId seq = 0;
  int64_t length = 0;
};

Prefilled* PrefilledFlash(int64_t tokens) {
  static std::map<int64_t, Prefilled> made;
  Prefilled& p = made[tokens];
  if (p.cache != nullptr) return &p;
  ModelSpec spec = ModelSpec::V4Flash();
  spec.max_context = tokens + 4096;
  p.synthetic = std::make_unique<tools::SyntheticModel>(spec, 8192);
  CacheOptions options;
  options.history_bytes = int64_t{6} << 30;
  p.cache = *Cache::Create(p.synthetic->spec(), options);
  p.seq = *p.cache->CreateSequence();
  for (int64_t at = 0; at < tokens; at += p.synthetic->chunk_tokens()) {
    if (!p.synthetic->Append(*p.cache, p.seq, at, std::min(p.synthetic->chunk_tokens(), tokens - at)).ok()) return nullptr;
  }
  p.length = tokens;
  return &p;
}

void BM_SnapshotSave_V4Flash(benchmark::State& state) {
  Prefilled* p = PrefilledFlash(state.range(0));
  if (p == nullptr) return state.SkipWithError("prefill failed");
  const std::string path = SnapshotPath();
  SaveOptions fresh;
  fresh.incremental = false;
  int64_t bytes = 0;
  for (auto _ : state) {
    const absl::StatusOr<SaveStats> s = SaveSnapshot(*p->cache, {p->seq}, path, fresh);
    if (!s.ok()) return state.SkipWithError(s.status().ToString().c_str());
    bytes += s->bytes_written;
  }
  state.SetBytesProcessed(bytes);
  state.SetLabel(absl::StrCat(p->length, " tokens, ", bytes / state.iterations() / (1 << 20), " MiB file"));
}

// One more token in every layer, then an incremental save: new rows and the
// changed per-layer state only.
void BM_SnapshotIncremental_V4Flash(benchmark::State& state) {
  Prefilled* p = PrefilledFlash(state.range(0));
  if (p == nullptr) return state.SkipWithError("prefill failed");
  const std::string path = SnapshotPath();
  if (!SaveSnapshot(*p->cache, {p->seq}, path).ok()) return state.SkipWithError("first save failed");
  tools::SyntheticModel::StepStats stats;
  int64_t bytes = 0;
  for (auto _ : state) {
    state.PauseTiming();
    if (!p->synthetic->DecodeStep(*p->cache, p->seq, p->length++, &stats).ok()) return state.SkipWithError("step failed");
    state.ResumeTiming();
    const absl::StatusOr<SaveStats> s = SaveSnapshot(*p->cache, {p->seq}, path);
    if (!s.ok()) return state.SkipWithError(s.status().ToString().c_str());
    bytes += s->bytes_written;
  }
  state.SetBytesProcessed(bytes);
  state.SetLabel(absl::StrCat(bytes / state.iterations() / 1024, " KiB appended per save"));
}

void BM_SnapshotRestore_V4Flash(benchmark::State& state) {
  Prefilled* p = PrefilledFlash(state.range(0));
  if (p == nullptr) return state.SkipWithError("prefill failed");
  const std::string path = SnapshotPath();
  SaveOptions fresh;
  fresh.incremental = false;
  const absl::StatusOr<SaveStats> saved = SaveSnapshot(*p->cache, {p->seq}, path, fresh);
  if (!saved.ok()) return state.SkipWithError("save failed");
  CacheOptions options;
  options.history_bytes = int64_t{6} << 30;
  auto target = *Cache::Create(p->synthetic->spec(), options);
  for (auto _ : state) {
    const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*target, path);
    if (!ids.ok()) return state.SkipWithError(ids.status().ToString().c_str());
    state.PauseTiming();
    if (const absl::Status freed = target->Free((*ids)[0]); !freed.ok()) return state.SkipWithError(freed.ToString().c_str());
    state.ResumeTiming();
  }
  state.SetBytesProcessed(state.iterations() * saved->file_bytes);
  std::remove(path.c_str());
}

BENCHMARK(BM_SnapshotSave_V4Flash)->Arg(1 << 17)->Arg(1 << 20)->Iterations(2)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SnapshotIncremental_V4Flash)->Arg(1 << 20)->Iterations(8)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SnapshotRestore_V4Flash)->Arg(1 << 17)->Arg(1 << 20)->Iterations(2)->UseRealTime()->Unit(benchmark::kMillisecond);
KVC_BENCHMARK_ROOFLINE(BM_SnapshotSave_V4Flash, "BM_FileWrite");
KVC_BENCHMARK_ROOFLINE(BM_SnapshotIncremental_V4Flash, "BM_FileWrite");
KVC_BENCHMARK_ROOFLINE(BM_SnapshotRestore_V4Flash, "BM_FirstTouch");
KVC_BENCHMARK_ROOFLINE_TAGGED(BM_SnapshotRestore_V4Flash, memcpy, "BM_Memcpy");

// Sequential file write bandwidth: 1 GiB in 8 MiB writes, then fsync.
void BM_FileWrite(benchmark::State& state) {
  const std::string path = SnapshotPath() + ".write";
  std::vector<char> chunk(size_t{8} << 20, 'x');
  constexpr int kChunks = 128;
  for (auto _ : state) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    for (int i = 0; i < kChunks; ++i) {
      if (::write(fd, chunk.data(), chunk.size()) != static_cast<ssize_t>(chunk.size())) state.SkipWithError("write failed");
    }
    ::fsync(fd);
    ::close(fd);
  }
  std::remove(path.c_str());
  state.SetBytesProcessed(state.iterations() * kChunks * static_cast<int64_t>(chunk.size()));
  state.SetLabel("1 GiB, 8 MiB writes, fsync");
}
BENCHMARK(BM_FileWrite)->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);

// Zero-filling 1 GiB of freshly allocated memory, then freeing it.
void BM_FirstTouch(benchmark::State& state) {
  constexpr size_t kBytes = size_t{1} << 30;
  for (auto _ : state) {
    std::unique_ptr<char[]> block(new char[kBytes]);
    std::memset(block.get(), 0, kBytes);
    benchmark::DoNotOptimize(block.get());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(kBytes));
  state.SetLabel("1 GiB new[] + memset");
}
BENCHMARK(BM_FirstTouch)->Iterations(3)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvc::bench
