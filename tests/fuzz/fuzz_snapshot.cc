// libFuzzer: the snapshot loader. Any file either restores (then frees back
// to zero bytes in use) or is refused with a status, leaving the cache
// empty; VerifySnapshot and RestoreSnapshot agree on what is sound.
//
// Checksums would stop almost every mutation at the first block, so the
// custom mutator recomputes them (and the header's commit fields) after
// mutating: the fuzzer then reaches the structural checks behind them.
// KVC_FUZZ_WRITE_SEEDS=DIR writes the seed corpus (tests/fuzz/corpus/snapshot).
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kvc/cache.h"
#include "src/crc32c.h"
#include "kvc/snapshot.h"
#include "src/snapshot_format.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {

// Window 4, rollback depth 2, engine-compressed CSA and HCA layers: small
// files (no compressor state) with every block kind.
kvc::ModelSpec FuzzModel() {
  kvc::ModelSpec spec = kvc::ModelSpec::V4Flash();
  spec.name = "fuzz";
  spec.layers.assign(3, kvc::LayerSpec{});
  spec.layers[0].kind = kvc::LayerKind::kWindow;
  spec.layers[1].kind = kvc::LayerKind::kCsa;
  spec.layers[2].kind = kvc::LayerKind::kHca;
  spec.window = 4;
  spec.max_context = 1 << 12;
  return spec;
}

std::unique_ptr<kvc::Cache> NewCache() {
  kvc::CacheOptions o;
  o.rollback_depth = 2;
  o.rows_per_page = 4;
  o.keys_per_page = 4;
  o.history_bytes = 4 << 20;  // hostile row counts fail fast
  o.state_bytes = 4 << 20;
  return *kvc::Cache::Create(FuzzModel(), o);
}

std::string Path() { return "/tmp/kvc_fuzz_snapshot_" + std::to_string(::getpid()) + ".kvcsnap"; }

void Fill(kvc::Cache& cache, kvc::SequenceId seq, int64_t to, float scale) {
  for (int layer = 0; layer < 3; ++layer) {
    const int64_t from = *cache.Length(seq, layer);
    std::vector<kvc::Bf16> rows(static_cast<size_t>((to - from) * kvc::kHeadDim));
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = kvc::ToBf16(scale * static_cast<float>(i % 97) - 40.0f);
    if (!cache.Append(seq, layer, from, {rows}).ok()) std::abort();
    if (layer == 0) continue;
    const int64_t have = cache.CompressedRows(seq, layer)->rows, want = to / (layer == 1 ? 4 : 128);
    std::vector<kvc::Bf16> entries(static_cast<size_t>((want - have) * kvc::kHeadDim), kvc::ToBf16(scale));
    if (!cache.AppendCompressedRows(seq, layer, have, entries).ok()) std::abort();
    if (layer == 1) {
      const int64_t keys = cache.IndexKeys(seq, layer)->rows;
      std::vector<kvc::Bf16> k(static_cast<size_t>((want - keys) * kvc::kIndexDim), kvc::ToBf16(-scale));
      if (!cache.AppendIndexKeys(seq, layer, keys, k).ok()) std::abort();
    }
  }
}

void WriteSeeds(const std::string& dir) {
  auto cache = NewCache();
  const kvc::SequenceId a = *cache->CreateSequence();
  Fill(*cache, a, 9, 0.5f);
  if (!kvc::SaveSnapshot(*cache, {a}, dir + "/one_sequence.kvcsnap").ok()) std::abort();
  const kvc::SequenceId b = *cache->Fork(a);
  const kvc::SequenceId c = *cache->CreateSequence();
  (void)c;
  Fill(*cache, b, 14, 2.0f);
  const std::string two = dir + "/incremental.kvcsnap";
  if (!kvc::SaveCacheSnapshot(*cache, two).ok()) std::abort();
  if (!cache->Truncate(b, 12).ok()) std::abort();
  Fill(*cache, b, 17, 3.0f);
  if (!kvc::SaveCacheSnapshot(*cache, two).ok()) std::abort();
  std::printf("wrote seeds to %s\n", dir.c_str());
}

template <typename T>
T Load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
void Store(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// Recomputes block checksums, and points the header at the last commit
// (field offsets as in docs/reliability.md).
void FixChecksums(uint8_t* data, size_t size) {
  namespace sf = kvc::snapshot_format;
  constexpr size_t kHeader = sf::kFileHeaderBytes, kBlock = sf::kBlockHeaderBytes;
  if (size < kHeader || std::memcmp(data, sf::kFileMagic, sizeof(sf::kFileMagic)) != 0) return;
  size_t at = kHeader, last_commit = 0, end = 0;
  while (at + kBlock <= size && Load<uint32_t>(data + at) == sf::kBlockMagic) {
    const uint64_t payload = Load<uint64_t>(data + at + 8);
    if (payload > size - at - kBlock) break;
    Store<uint32_t>(data + at + 16, kvc::Crc32c(data + at + kBlock, payload));
    Store<uint32_t>(data + at + kBlock - 4, kvc::Crc32c(data + at, kBlock - 4));
    if (Load<uint32_t>(data + at + 4) == static_cast<uint32_t>(sf::BlockType::kCommit)) last_commit = at;
    at += kBlock + payload;
    if (last_commit != 0 && end < at) end = at;
  }
  if (last_commit != 0 && end == last_commit + kBlock + Load<uint64_t>(data + last_commit + 8)) {
    Store<int64_t>(data + 24, static_cast<int64_t>(end));   // committed
    Store<int64_t>(data + 40, static_cast<int64_t>(last_commit));
  }
  Store<uint32_t>(data + kHeader - 4, kvc::Crc32c(data, kHeader - 4));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("KVC_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::exit(0);
  }
  std::atexit([] { std::remove(Path().c_str()); });
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
  size = LLVMFuzzerMutate(data, size, max_size);
  if (seed % 8 != 0) FixChecksums(data, size);  // mostly; sometimes leave them broken
  return size;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static std::unique_ptr<kvc::Cache> cache = NewCache();
  static const std::string path = Path();
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0) std::abort();

  const absl::StatusOr<kvc::SnapshotInfo> info = kvc::ReadSnapshotInfo(path);
  const absl::StatusOr<kvc::SnapshotInfo> verified = kvc::VerifySnapshot(path);
  const absl::StatusOr<std::vector<kvc::SequenceId>> ids = kvc::RestoreSnapshot(*cache, path);
  // A broken invariant: say which, with the three results, then crash.
  auto fail = [&](const char* what) {
    std::fprintf(stderr, "invariant broken: %s\n  info: %s\n  verify: %s\n  restore: %s\n", what,
                 info.status().ToString().c_str(), verified.status().ToString().c_str(),
                 ids.status().ToString().c_str());
    __builtin_trap();
  };
  if (verified.ok() && !info.ok()) fail("verify accepted what info refused");
  // A sound file restores unless it is for another model or too big here.
  if (verified.ok() && !ids.ok() && ids.status().code() != absl::StatusCode::kFailedPrecondition &&
      ids.status().code() != absl::StatusCode::kResourceExhausted) {
    fail("restore refused a sound file");
  }
  if (ids.ok()) {  // (verify may still refuse a damaged block no commit refers to)
    if (!info.ok() || ids->size() != info->sequences.size()) fail("restore and info disagree");
    for (size_t i = 0; i < ids->size(); ++i) {
      for (int layer = 0; layer < 3; ++layer) {
        if (*cache->Length((*ids)[i], layer) != info->sequences[i].layers[static_cast<size_t>(layer)].length) {
          fail("restored length differs from the file's");
        }
      }
      std::vector<kvc::Bf16> ring(4 * kvc::kHeadDim);
      if (!cache->ReadWindow((*ids)[i], 0, absl::MakeSpan(ring)).ok()) fail("restored window unreadable");
      if (!cache->Free((*ids)[i]).ok()) fail("restored sequence cannot be freed");
    }
  }
  const kvc::CacheUsage usage = cache->Usage();
  if (usage.sequences != 0 || usage.used_bytes() != 0) fail("pages kept after a refusal or free");
  return 0;
}
