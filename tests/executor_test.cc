// Executors (include/kvc/executor.h), and kvc's results through them: the
// same bits and the same refusals whatever the thread count.
#include "kvc/executor.h"

#include <atomic>
#include <limits>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/indexer.h"
#include "kvc/row_kernels.h"
#include "tests/testing/tiny_model.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

// An executor on plain std::threads (one per task chunk, started per call):
// ThreadSanitizer sees its synchronization, unlike oneTBB's (scripts/test.sh
// runs the SpawnedThreads tests under TSan).
class SpawningExecutor final : public Executor {
 public:
  explicit SpawningExecutor(int threads) : threads_(threads) {}
  int concurrency() const override { return threads_; }
  void ParallelFor(int64_t count, absl::FunctionRef<void(int64_t)> task) override {
    std::atomic<int64_t> next{0};
    auto worker = [&] {
      for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) task(i);
    };
    std::vector<std::thread> threads;
    for (int t = 1; t < threads_; ++t) threads.emplace_back(worker);
    worker();
    for (std::thread& t : threads) t.join();
  }

 private:
  int threads_;
};

TEST(Executor, InlineRunsEveryTaskInOrderOnTheCaller) {
  std::vector<int64_t> order;
  const std::thread::id caller = std::this_thread::get_id();
  InlineExecutor().ParallelFor(5, [&](int64_t i) {
    EXPECT_EQ(std::this_thread::get_id(), caller);
    order.push_back(i);
  });
  EXPECT_EQ(order, (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(InlineExecutor().concurrency(), 1);
  EXPECT_EQ(&ExecutorOrInline(nullptr), &InlineExecutor());
}

TEST(Executor, ThreadPoolRunsEveryTaskOnceWithinItsConcurrency) {
  EXPECT_EQ(ThreadPoolExecutor(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ThreadPoolExecutor(1025).status().code(), absl::StatusCode::kInvalidArgument);
  for (const int threads : {1, 2, 3}) {
    const std::unique_ptr<Executor> pool = *ThreadPoolExecutor(threads);
    EXPECT_EQ(pool->concurrency(), threads);
    for (const int64_t count : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{1000}}) {
      std::vector<std::atomic<int>> runs(static_cast<size_t>(count));
      std::atomic<int> running{0}, most{0};
      pool->ParallelFor(count, [&](int64_t i) {
        const int now = running.fetch_add(1) + 1;
        for (int seen = most.load(); now > seen && !most.compare_exchange_weak(seen, now);) {
        }
        runs[static_cast<size_t>(i)].fetch_add(1);
        running.fetch_sub(1);
      });
      for (int64_t i = 0; i < count; ++i) ASSERT_EQ(runs[static_cast<size_t>(i)].load(), 1) << threads << " threads, task " << i;
      EXPECT_LE(most.load(), threads);
    }
    // Nested: a task's own ParallelFor joins the arena and completes.
    std::atomic<int64_t> inner{0};
    pool->ParallelFor(4, [&](int64_t) { pool->ParallelFor(8, [&](int64_t) { inner.fetch_add(1); }); });
    EXPECT_EQ(inner.load(), 32);
  }
}

std::vector<std::unique_ptr<Executor>> Executors(bool spawned_only) {
  std::vector<std::unique_ptr<Executor>> out;
  out.push_back(std::make_unique<SpawningExecutor>(2));
  out.push_back(std::make_unique<SpawningExecutor>(5));
  if (!spawned_only) {
    out.push_back(*ThreadPoolExecutor(2));
    out.push_back(*ThreadPoolExecutor(3));
  }
  return out;
}

void ScoresAreIdenticalOnEveryExecutor(bool spawned_only) {
  std::mt19937 rng(1);
  std::vector<Bf16> q_raw(64 * kIndexDim), key_raw(20000 * kIndexDim);
  std::normal_distribution<float> normal;
  for (Bf16& x : q_raw) x = ToBf16(normal(rng));
  for (Bf16& x : key_raw) x = ToBf16(normal(rng));
  std::vector<float> w(64);
  for (float& x : w) x = normal(rng) * 0.1f;
  float cos_sin[64];
  for (int j = 0; j < 32; ++j) cos_sin[2 * j] = 1.0f, cos_sin[2 * j + 1] = 0.0f;
  const IndexQuery q = *IndexQuery::Prepare(q_raw, w, cos_sin);
  const int64_t n = 20000;
  std::vector<uint8_t> page(static_cast<size_t>(n) * 68);
  const PackedRows keys = PageFooterRows(RowFormat::kIndexFp4, page.data(), n);
  ASSERT_TRUE(QuantizeIndexKeys(key_raw, keys).ok());
  for (int64_t j = 0; j < n; j += 7) keys.row_scales(j)[j % 4] = static_cast<uint8_t>(j % 13);  // tiny scales too
  std::vector<float> expected(static_cast<size_t>(n));
  ASSERT_TRUE(ScoreIndexKeys(q, keys, absl::MakeSpan(expected)).ok());
  for (const auto& executor : Executors(spawned_only)) {
    std::vector<float> scores(static_cast<size_t>(n), -1.0f);
    ASSERT_TRUE(ScoreIndexKeys(q, keys, absl::MakeSpan(scores), executor.get()).ok());
    for (int64_t j = 0; j < n; ++j) {
      ASSERT_EQ(F32Bits(scores[static_cast<size_t>(j)]), F32Bits(expected[static_cast<size_t>(j)])) << executor->concurrency() << " threads, key " << j;
    }
  }
  // A refusal: the same message, and no score written.
  keys.row_scales(17000)[1] = 255;
  const absl::Status single = ScoreIndexKeys(q, keys, absl::MakeSpan(expected));
  ASSERT_FALSE(single.ok());
  for (const auto& executor : Executors(spawned_only)) {
    std::vector<float> scores(static_cast<size_t>(n), -1.0f);
    const absl::Status threaded = ScoreIndexKeys(q, keys, absl::MakeSpan(scores), executor.get());
    EXPECT_EQ(threaded, single);
    EXPECT_EQ(scores, std::vector<float>(static_cast<size_t>(n), -1.0f));
  }
}

// Prefill (compressors in 512-token slices) and selection (paged index
// scoring) through executors: every stored byte, every selected set and
// every index score equal the single-threaded ones; a refusal in a late
// slice is the same and changes nothing.
void CacheIsIdenticalOnEveryExecutor(bool spawned_only) {
  testing::TinyModel model;
  std::vector<std::unique_ptr<Executor>> executors = Executors(spawned_only);
  executors.insert(executors.begin(), nullptr);  // the reference: the calling thread
  std::vector<std::unique_ptr<Cache>> caches;
  std::vector<SequenceId> seqs;
  for (const auto& executor : executors) {
    CacheOptions options;
    options.history_bytes = 64 << 20;
    options.state_bytes = 64 << 20;
    options.executor = executor.get();
    caches.push_back(*Cache::Create(model.spec(), options));
    seqs.push_back(*caches.back()->CreateSequence());
    ASSERT_TRUE(model.Grow(*caches.back(), seqs.back(), 6000, 42, 2500).ok());  // chunks of several slices
  }
  const std::string reference = testing::ObservableBytes(*caches[0], seqs[0]);
  std::mt19937 rng(3);
  std::vector<Bf16> q_raw(static_cast<size_t>(model.spec().index_heads) * kIndexDim);
  std::normal_distribution<float> normal;
  for (Bf16& x : q_raw) x = ToBf16(normal(rng));
  const IndexQuery q = *caches[0]->PrepareIndexQuery(5999, q_raw, std::vector<float>(static_cast<size_t>(model.spec().index_heads), 0.05f));
  std::vector<float> reference_scores;
  const AttentionSet reference_set = *caches[0]->SelectAttentionSet(seqs[0], testing::TinyModel::kCsaLayer, &q, &reference_scores);
  for (size_t i = 1; i < caches.size(); ++i) {
    EXPECT_EQ(testing::ObservableBytes(*caches[i], seqs[i]), reference) << executors[i]->concurrency() << " threads";
    std::vector<float> scores;
    const AttentionSet set = *caches[i]->SelectAttentionSet(seqs[i], testing::TinyModel::kCsaLayer, &q, &scores);
    EXPECT_EQ(set.indices, reference_set.indices);
    ASSERT_EQ(scores.size(), reference_scores.size());
    for (size_t j = 0; j < scores.size(); ++j) ASSERT_EQ(F32Bits(scores[j]), F32Bits(reference_scores[j])) << j;
  }
  // A chunk whose fourth slice holds a NaN: the same refusal, nothing changed.
  const int64_t n = 2048;
  std::vector<Bf16> window(static_cast<size_t>(n) * kHeadDim, ToBf16(0.5f));
  std::vector<float> kv(static_cast<size_t>(n) * 1024, 0.25f), score(kv.size(), 0.1f), ikv(static_cast<size_t>(n) * 256, 0.25f),
      iscore(ikv.size(), 0.1f);
  kv[static_cast<size_t>(1700 * 1024 + 5)] = std::numeric_limits<float>::quiet_NaN();
  LayerTokens tokens{window, kv, score, ikv, iscore};
  const absl::Status single = caches[0]->Append(seqs[0], testing::TinyModel::kCsaLayer, 6000, tokens);
  ASSERT_FALSE(single.ok());
  EXPECT_THAT(std::string(single.message()), HasSubstr("row 1700"));
  for (size_t i = 1; i < caches.size(); ++i) {
    EXPECT_EQ(caches[i]->Append(seqs[i], testing::TinyModel::kCsaLayer, 6000, tokens), single);
    EXPECT_EQ(testing::ObservableBytes(*caches[i], seqs[i]), reference);
  }
}

// Selection over 20,000 index keys an engine appended (many scoring tasks):
// the same set and scores on every executor; a NaN scale refused alike.
void SelectionIsIdenticalOnEveryExecutor(bool spawned_only) {
  ModelSpec spec = ModelSpec::V4Flash();
  spec.layers.assign(1, LayerSpec{});
  spec.layers[0].kind = LayerKind::kCsa;
  spec.window = 8;
  const int64_t entries = 20000, tokens = 4 * entries;
  spec.max_context = tokens;
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  auto random = [&](size_t n) {
    std::vector<Bf16> v(n);
    for (Bf16& x : v) x = ToBf16(normal(rng));
    return v;
  };
  const std::vector<Bf16> window = random(static_cast<size_t>(spec.window) * kHeadDim), rows = random(static_cast<size_t>(entries) * kHeadDim),
                          keys = random(static_cast<size_t>(entries) * kIndexDim), q_raw = random(64 * kIndexDim);
  std::vector<std::unique_ptr<Executor>> executors = Executors(spawned_only);
  executors.insert(executors.begin(), nullptr);
  std::vector<float> reference_scores;
  AttentionSet reference_set;
  absl::Status reference_refusal;
  for (size_t i = 0; i < executors.size(); ++i) {
    CacheOptions options;
    options.history_bytes = 256 << 20;
    options.rollback_depth = 4;
    options.executor = executors[i].get();
    auto cache = *Cache::Create(spec, options);
    const SequenceId seq = *cache->CreateSequence();
    for (int64_t at = 0; at < tokens; at += spec.window) {
      ASSERT_TRUE(cache->Append(seq, 0, at, {window}).ok());
    }
    ASSERT_TRUE(cache->AppendCompressedRows(seq, 0, 0, rows).ok());
    ASSERT_TRUE(cache->AppendIndexKeys(seq, 0, 0, keys).ok());
    const IndexQuery q = *cache->PrepareIndexQuery(tokens - 1, q_raw, std::vector<float>(64, 0.05f));
    std::vector<float> scores;
    const AttentionSet set = *cache->SelectAttentionSet(seq, 0, &q, &scores);
    if (i == 0) {
      reference_scores = scores;
      reference_set = set;
    } else {
      EXPECT_EQ(set.indices, reference_set.indices) << executors[i]->concurrency() << " threads";
      ASSERT_EQ(scores.size(), reference_scores.size());
      for (size_t j = 0; j < scores.size(); ++j) ASSERT_EQ(F32Bits(scores[j]), F32Bits(reference_scores[j])) << j;
    }
    // Keys from a snapshot or engine with NaN scales, in two late pages: the
    // first one is named.
    const HistoryView view = *cache->IndexKeys(seq, 0);
    const_cast<uint8_t*>(view.pages[300].row_scales(3))[2] = 255;
    const_cast<uint8_t*>(view.pages[200].row_scales(9))[0] = 255;
    const absl::Status refused = cache->SelectAttentionSet(seq, 0, &q).status();
    EXPECT_THAT(std::string(refused.message()), HasSubstr("index keys from entry 12800: ScoreIndexKeys: key 9 block 0"));
    if (i == 0) reference_refusal = refused;
    EXPECT_EQ(refused, reference_refusal);
  }
}

TEST(ThreadsGiveIdenticalResults, SelectionSpawnedThreads) { SelectionIsIdenticalOnEveryExecutor(true); }
TEST(ThreadsGiveIdenticalResults, Selection) { SelectionIsIdenticalOnEveryExecutor(false); }
TEST(ThreadsGiveIdenticalResults, ScoresSpawnedThreads) { ScoresAreIdenticalOnEveryExecutor(true); }
TEST(ThreadsGiveIdenticalResults, Scores) { ScoresAreIdenticalOnEveryExecutor(false); }
TEST(ThreadsGiveIdenticalResults, CacheSpawnedThreads) { CacheIsIdenticalOnEveryExecutor(true); }
TEST(ThreadsGiveIdenticalResults, Cache) { CacheIsIdenticalOnEveryExecutor(false); }

}  // namespace
}  // namespace kvc
