// Concurrency stress: threads mutate, save and restore their own sequences
// while all of them fork and read one shared parent, one of them saves the
// whole cache, and another thread polls the accounting.
// Run under ThreadSanitizer by scripts/test.sh; in plain builds it still
// checks every sequence against a per-thread model and the invariants at
// the end.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/snapshot.h"
#include "tests/testing/reference_model.h"

namespace kvc {
namespace {

constexpr int kWindow = 12;
constexpr int kLayers = 3;
constexpr int kDepth = 5;

std::vector<Bf16> RandomRows(int64_t rows, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<Bf16> out(static_cast<size_t>(rows) * kHeadDim);
  for (Bf16& v : out) v = ToBf16(normal(rng));
  return out;
}

bool WindowMatches(const Cache& cache, SequenceId seq, const std::vector<Bf16>& history) {
  const std::vector<uint16_t> expected = testing::ExpectedWindow(history, kWindow);
  std::vector<Bf16> got(expected.size());
  for (int layer = 0; layer < kLayers; ++layer) {
    if (!cache.ReadWindow(seq, layer, absl::MakeSpan(got)).ok()) return false;
    for (size_t i = 0; i < got.size(); ++i) {
      if (got[i].bits != expected[i]) return false;
    }
  }
  return true;
}

TEST(CacheStress, ConcurrentOperationsOnManySequences) {
  ModelSpec spec = ModelSpec::V4Flash();
  spec.layers.resize(kLayers);
  spec.layers[0].kind = LayerKind::kWindow;
  spec.layers[1].kind = LayerKind::kCsa;
  spec.layers[2].kind = LayerKind::kHca;
  spec.window = kWindow;
  spec.max_context = 1 << 20;
  CacheOptions options;
  options.rollback_depth = kDepth;
  options.rows_per_page = 5;
  options.state_bytes = int64_t{256} << 20;
  options.history_bytes = 1 << 20;
  auto cache = *Cache::Create(spec, options);

  // The shared parent every thread forks from.
  std::mt19937 setup_rng(99);
  const std::vector<Bf16> parent_rows = RandomRows(20, setup_rng);
  const SequenceId parent = *cache->CreateSequence();
  for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(cache->Append(parent, layer, 0, {parent_rows}).ok());
  // 3 of the 5 closed CSA windows' entries on layer 1: a partial page that
  // every fork shares and must copy on its first compressed-row write.
  ASSERT_TRUE(cache->AppendCompressedRows(parent, 1, 0, RandomRows(3, setup_rng)).ok());
  auto compressed_bytes = [&](SequenceId seq) {
    std::vector<uint8_t> bytes;
    const HistoryView view = *cache->CompressedRows(seq, 1);
    for (int64_t i = 0; i < view.rows; ++i) {
      const ConstPackedRows& page = view.pages[static_cast<size_t>(i / view.rows_per_page)];
      bytes.insert(bytes.end(), page.row_data(i % view.rows_per_page), page.row_data(i % view.rows_per_page) + 576);
    }
    return bytes;
  };
  const std::vector<uint8_t> parent_compressed = compressed_bytes(parent);

  constexpr int kThreads = 4;
  constexpr int kSteps = 300;
  std::atomic<int64_t> operations{0}, saves{0}, restores{0};
  std::atomic<int> failures{0};
  std::atomic<bool> done{false};

  std::thread poller([&] {
    while (!done.load()) {
      const CacheUsage usage = cache->Usage();
      if (usage.used_bytes() > usage.reserved_bytes()) failures.fetch_add(1);
    }
  });
  std::vector<std::thread> workers;
  for (int w = 0; w < kThreads; ++w) {
    workers.emplace_back([&, w] {
      std::mt19937 rng(static_cast<uint32_t>(w + 1));
      std::map<SequenceId, std::vector<Bf16>> mine;  // sequence -> its history
      std::map<SequenceId, int64_t> floors;
      const std::string path = ::testing::TempDir() + "kvc_stress_" + std::to_string(::getpid()) + "_" + std::to_string(w);
      for (int step = 0; step < kSteps; ++step) {
        const int op = static_cast<int>(rng() % 10);
        if (mine.empty() || op == 0) {
          auto seq = op == 0 && rng() % 2 ? cache->Fork(parent) : cache->CreateSequence();
          if (!seq.ok()) { failures.fetch_add(1); continue; }
          const bool forked = cache->Length(*seq, 0).value_or(0) > 0;
          mine[*seq] = forked ? parent_rows : std::vector<Bf16>{};
          floors[*seq] = forked ? 20 - kDepth : 0;
          operations.fetch_add(1);
          continue;
        }
        auto it = mine.begin();
        std::advance(it, static_cast<long>(rng() % mine.size()));
        const SequenceId seq = it->first;
        std::vector<Bf16>& history = it->second;
        const int64_t length = static_cast<int64_t>(history.size()) / kHeadDim;
        if (op <= 4) {
          const std::vector<Bf16> rows = RandomRows(1 + rng() % 9, rng);
          for (int layer = 0; layer < kLayers; ++layer) {
            if (!cache->Append(seq, layer, length, {rows}).ok()) failures.fetch_add(1);
          }
          // Compressed rows for the CSA windows now closed: forks of the
          // parent copy its shared page on their first write.
          const int64_t have = cache->CompressedRows(seq, 1)->rows;
          const int64_t closed = (length + static_cast<int64_t>(rows.size()) / kHeadDim) / 4;
          if (!cache->AppendCompressedRows(seq, 1, have, RandomRows(closed - have, rng)).ok()) failures.fetch_add(1);
          history.insert(history.end(), rows.begin(), rows.end());
          floors[seq] = std::max(floors[seq], length + static_cast<int64_t>(rows.size()) / kHeadDim - kDepth);
        } else if (op == 5) {
          const int64_t target = std::max(floors[seq], length - static_cast<int64_t>(rng() % (kDepth + 1)));
          if (!cache->Truncate(seq, target).ok()) failures.fetch_add(1);
          history.resize(static_cast<size_t>(target * kHeadDim));
        } else if (op == 6) {
          if (!WindowMatches(*cache, parent, parent_rows)) failures.fetch_add(1);
        } else if (op == 8) {
          // Save (incrementally, to this thread's file) and restore as a new
          // sequence, which must equal the saved one.
          if (!SaveSnapshot(*cache, {seq}, path).ok()) { failures.fetch_add(1); continue; }
          saves.fetch_add(1);
          const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*cache, path);
          if (!ids.ok()) {
            if (ids.status().code() != absl::StatusCode::kResourceExhausted) failures.fetch_add(1);
            continue;
          }
          restores.fetch_add(1);
          const SequenceId copy = (*ids)[0];
          if (!WindowMatches(*cache, copy, history) || compressed_bytes(copy) != compressed_bytes(seq)) {
            failures.fetch_add(1);
          }
          floors[copy] = floors[seq];
          mine[copy] = history;
        } else if (op == 9 && w == 0) {
          if (!SaveCacheSnapshot(*cache, path + "_all").ok() || !VerifySnapshot(path + "_all").ok()) {
            failures.fetch_add(1);
          }
          saves.fetch_add(1);
        } else {
          if (!cache->Free(seq).ok()) failures.fetch_add(1);
          floors.erase(seq);
          mine.erase(it);
        }
        operations.fetch_add(1);
      }
      for (const auto& [seq, history] : mine) {
        if (!WindowMatches(*cache, seq, history)) failures.fetch_add(1);
        if (!cache->Free(seq).ok()) failures.fetch_add(1);
      }
      std::remove(path.c_str());
      std::remove((path + "_all").c_str());
    });
  }
  for (std::thread& t : workers) t.join();
  done.store(true);
  poller.join();

  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(operations.load(), kThreads * kSteps / 2);
  EXPECT_GT(saves.load(), 0);
  EXPECT_GT(restores.load(), 0);
  std::printf("[ stress   ] %lld operations, %lld saves, %lld restores on %d threads\n",
              static_cast<long long>(operations.load()), static_cast<long long>(saves.load()),
              static_cast<long long>(restores.load()), kThreads);
  EXPECT_TRUE(WindowMatches(*cache, parent, parent_rows));
  EXPECT_EQ(compressed_bytes(parent), parent_compressed);  // no fork wrote into the shared page
  ASSERT_TRUE(cache->Free(parent).ok());
  const CacheUsage end = cache->Usage();
  EXPECT_EQ(end.sequences, 0);
  EXPECT_EQ(end.used_bytes(), 0);  // nothing leaked
  EXPECT_LE(end.reserved_bytes(), end.state_limit_bytes + end.history_limit_bytes);
}

}  // namespace
}  // namespace kvc
