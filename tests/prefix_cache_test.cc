// Prefix caching (Cache::PublishPrefix, CreateSequenceFromPrefix; docs/prefix-cache.md):
// a sequence restored from a published prefix continues byte for byte as one
// that appended the tokens itself, at every boundary kind; refusals change
// nothing; eviction keeps the budget and never takes a live sequence's pages;
// the page references match a reference model; concurrent publishers and
// matchers (run under ThreadSanitizer by scripts/test.sh).
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <map>
#include <ostream>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/snapshot.h"
#include "src/cache_internal.h"
#include "tests/testing/engine_writer.h"
#include "tests/testing/tiny_model.h"

namespace kvc {

// The prefix cache's pages and the sequences' tables, for the tests (a
// friend of Cache).
class PrefixAccess {
 public:
  using Tables = std::array<std::vector<int32_t>, cache_internal::kStreamCount>;
  struct Refs {
    std::vector<int32_t> refs, pins;  // per created id
  };
  static std::array<Refs, cache_internal::kStreamCount> AllRefs(const Cache& cache) {
    const cache_internal::PageStore& store = *cache.impl_->store;
    std::array<Refs, cache_internal::kStreamCount> out;
    for (int s = 0; s < cache_internal::kStreamCount; ++s) {
      if (!store.present(s)) continue;
      const int64_t created = store.StreamStats(s).created_ids;
      for (int32_t id = 0; id < created; ++id) {
        out[static_cast<size_t>(s)].refs.push_back(store.RefCount(s, id));
        out[static_cast<size_t>(s)].pins.push_back(store.PinCount(s, id));
      }
    }
    return out;
  }
  static int64_t IdBytes(const Cache& cache, int s) { return cache.impl_->store->id_bytes(s); }
  static int64_t CheckpointBytes(const Cache& cache) { return cache.impl_->prefix->checkpoint_bytes(); }
  static Tables SequenceTables(const Cache& cache, SequenceId id) {
    auto locked = cache.impl_->Lock(id);
    EXPECT_TRUE(locked.ok());
    Tables out;
    if (!locked.ok()) return out;
    for (int s = 0; s < cache_internal::kStreamCount; ++s) out[static_cast<size_t>(s)] = locked->seq->tables[static_cast<size_t>(s)];
    return out;
  }
  struct Entry {
    uint64_t last_hash;
    int64_t tokens;
    Tables tables;
  };
  // In eviction order.
  static std::vector<Entry> Entries(const Cache& cache) {
    std::lock_guard<std::mutex> lock(cache.impl_->prefix->mu());
    std::vector<Entry> out;
    for (const auto* e : cache.impl_->prefix->Entries()) {
      Entry entry{e->last_hash, e->tokens, {}};
      for (int s = 0; s < cache_internal::kStreamCount; ++s) entry.tables[static_cast<size_t>(s)] = e->tables[static_cast<size_t>(s)];
      out.push_back(std::move(entry));
    }
    return out;
  }
};

namespace {

using ::testing::HasSubstr;
using testing::SplitMix64;
using testing::TinyModel;

constexpr int64_t kB = 128;  // prefix_block_tokens in these tests

// What a sequence's tokens are: segments of TinyModel inputs, [previous end,
// end) drawn with `seed`. Two scripts that agree on a block give the same
// bytes there, and the same block hash.
struct Segment {
  int64_t end;
  uint64_t seed;
};
using Script = std::vector<Segment>;

uint64_t SeedAt(const Script& script, int64_t t) {
  for (const Segment& s : script) {
    if (t < s.end) return s.seed;
  }
  return script.back().seed;
}

// The engine's chain hashes of the first `blocks` blocks: hash i folds every
// token of blocks 0..i (here: the seed each token was drawn with).
std::vector<uint64_t> Chain(const Script& script, int64_t blocks) {
  std::vector<uint64_t> out;
  uint64_t h = 0x6b76632d70726566ull;
  for (int64_t i = 0; i < blocks; ++i) {
    for (int64_t t = i * kB; t < (i + 1) * kB; ++t) h = SplitMix64(h ^ (SeedAt(script, t) * 0x100000001b3ull + 7));
    out.push_back(h);
  }
  return out;
}

// Appends the script's tokens [Length, to) to every layer, in chunks of `chunk`.
absl::Status GrowTo(const TinyModel& model, Cache& cache, SequenceId seq, const Script& script, int64_t to,
                    int64_t chunk = 37) {
  KVC_ASSIGN_OR_RETURN(int64_t at, cache.Length(seq, 0));
  for (const Segment& s : script) {
    if (at >= to) break;
    if (s.end <= at) continue;
    const int64_t end = std::min(s.end, to);
    KVC_RETURN_IF_ERROR(model.Grow(cache, seq, end, s.seed, chunk));
    at = end;
  }
  if (at < to) KVC_RETURN_IF_ERROR(model.Grow(cache, seq, to, script.back().seed, chunk));
  return absl::OkStatus();
}

// Every observable byte but the rollback floor (a restored sequence's floor
// is the prefix's length; a fresh one's is D tokens lower).
std::string Observed(const Cache& cache, SequenceId seq) { return testing::ObservableBytes(cache, seq).substr(sizeof(int64_t)); }

CacheOptions Options(int32_t rows_per_page, int32_t depth) {
  CacheOptions o;
  o.rows_per_page = rows_per_page;
  o.keys_per_page = rows_per_page + 2;  // CSA rows and keys pages end at different tokens
  o.rollback_depth = depth;
  o.prefix_block_tokens = static_cast<int32_t>(kB);
  o.history_bytes = int64_t{256} << 20;
  o.state_bytes = int64_t{256} << 20;
  o.prefix_bytes = int64_t{256} << 20;
  return o;
}

std::unique_ptr<Cache> MakeCache(ModelSpec spec, CacheOptions options) {
  auto cache = Cache::Create(std::move(spec), std::move(options));
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? *std::move(cache) : nullptr;
}

ModelSpec WithWindow(const TinyModel& model, int32_t window) {
  ModelSpec spec = model.spec();
  spec.window = window;
  return spec;
}

// --- Byte identity -----------------------------------------------------------

struct Boundary {
  const char* name;
  int32_t window;
  int32_t rows_per_page;
  int32_t depth;
  bool hca_by_kvc;  // else the engine appends the HCA layer's rows
  int64_t blocks;   // published prefix
  int64_t passed;   // tokens the publisher holds beyond it when publishing
};

void PrintTo(const Boundary& b, std::ostream* os) { *os << b.name; }

class PrefixContinuation : public ::testing::TestWithParam<Boundary> {};

// Publishes a prefix, frees its publisher, restores it and continues with
// other tokens in uneven chunks; after every chunk the restored sequence
// holds exactly the bytes of one that appended everything itself.
TEST_P(PrefixContinuation, IsByteIdenticalToAppendingTheTokens) {
  const Boundary& b = GetParam();
  const TinyModel model(b.hca_by_kvc);
  auto cache = MakeCache(WithWindow(model, b.window), Options(b.rows_per_page, b.depth));
  ASSERT_NE(cache, nullptr);
  const int64_t P = b.blocks * kB;
  const Script prompt = {{P + b.passed, 11}, {INT64_MAX, 12}};  // the publisher's tokens
  const Script script = {{P, 11}, {INT64_MAX, 21}};             // the same prefix, then others

  const SequenceId publisher = *cache->CreateSequence();
  ASSERT_TRUE(GrowTo(model, *cache, publisher, prompt, P + b.passed).ok());
  const std::vector<uint64_t> chain = Chain(prompt, b.blocks);
  ASSERT_TRUE(cache->PublishPrefix(publisher, chain).ok());
  std::map<Stream, std::vector<int32_t>> published;
  for (const Stream s : {Stream::kCsaRows, Stream::kCsaKeys, Stream::kHcaRows}) published[s] = *cache->BlockTable(publisher, s);
  ASSERT_TRUE(cache->Free(publisher).ok());

  // The engine passes its whole prompt's chain: the published blocks match.
  std::vector<uint64_t> longer = Chain(script, b.blocks + 3);
  ASSERT_EQ(std::vector<uint64_t>(longer.begin(), longer.begin() + b.blocks), chain);
  const absl::StatusOr<Cache::PrefixMatch> match = cache->CreateSequenceFromPrefix(longer);
  ASSERT_TRUE(match.ok()) << match.status();
  EXPECT_EQ(match->tokens, P);
  EXPECT_EQ(match->shared_tokens, P);
  const SequenceId reused = match->seq;
  EXPECT_EQ(*cache->RollbackFloor(reused), P);
  for (const Stream s : {Stream::kCsaRows, Stream::kCsaKeys, Stream::kHcaRows}) {  // shared, not copied
    const std::vector<int32_t> ids = *cache->BlockTable(reused, s);
    ASSERT_LE(ids.size(), published[s].size());
    EXPECT_TRUE(std::equal(ids.begin(), ids.end(), published[s].begin())) << StreamName(s);
  }

  const SequenceId fresh = *cache->CreateSequence();
  ASSERT_TRUE(GrowTo(model, *cache, fresh, script, P).ok());
  ASSERT_EQ(Observed(*cache, reused), Observed(*cache, fresh));
  // Continue in chunks that stop mid-CSA window (the entry straddling P reads
  // the restored state's previous window), with the HCA window open, and
  // past a full ring.
  int64_t length = P;
  for (const int64_t chunk : {1, 2, 1, 5, 70, 3, 128, 57, 200}) {
    length += chunk;
    ASSERT_TRUE(GrowTo(model, *cache, reused, script, length, chunk).ok());
    ASSERT_TRUE(GrowTo(model, *cache, fresh, script, length, 17).ok());
    ASSERT_EQ(Observed(*cache, reused), Observed(*cache, fresh)) << "at " << length;
    if (length - P >= b.depth) {  // the rollback floors agree again
      ASSERT_EQ(testing::ObservableBytes(*cache, reused), testing::ObservableBytes(*cache, fresh)) << "at " << length;
    }
  }
  // Rolling back within the continuation is exact too.
  const int64_t back = std::max<int64_t>(*cache->RollbackFloor(reused), length - b.depth);
  ASSERT_TRUE(cache->Truncate(reused, back).ok());
  ASSERT_TRUE(cache->Truncate(fresh, back).ok());
  EXPECT_EQ(testing::ObservableBytes(*cache, reused), testing::ObservableBytes(*cache, fresh));
}

INSTANTIATE_TEST_SUITE_P(
    Boundaries, PrefixContinuation,
    ::testing::Values(
        Boundary{"RingWrappedPartialPages", 16, 5, 5, true, 1, 0},
        Boundary{"ThreeBlocks", 16, 5, 5, true, 3, 0},
        Boundary{"WindowNotDividingB_EngineHca_PassedBy3", 12, 7, 4, false, 2, 3},
        Boundary{"FullWindowRingNotWrapped", 128, 64, 16, true, 1, 0},
        Boundary{"FullWindowPassedBy16_HcaAndCsaWindowsOpen", 128, 64, 16, true, 2, 16},
        Boundary{"PassedBy9_EngineHca", 20, 64, 16, false, 2, 9},
        Boundary{"NoRollbackDepth", 16, 5, 0, true, 2, 0}),
    [](const ::testing::TestParamInfo<Boundary>& param) { return std::string(param.param.name); });

// --- Publish and match ---------------------------------------------------------

class PrefixCacheTest : public ::testing::Test {
 protected:
  PrefixCacheTest() : cache_(MakeCache(model_.spec(), Options(5, 5))) {}

  SequenceId Grown(const Script& script, int64_t length) {
    const SequenceId seq = *cache_->CreateSequence();
    EXPECT_TRUE(GrowTo(model_, *cache_, seq, script, length).ok());
    return seq;
  }
  void Publish(const Script& script, int64_t blocks, bool free = true) {
    const SequenceId seq = Grown(script, blocks * kB);
    ASSERT_TRUE(cache_->PublishPrefix(seq, Chain(script, blocks)).ok());
    if (free) {
      ASSERT_TRUE(cache_->Free(seq).ok());
    }
  }

  const TinyModel model_;
  std::unique_ptr<Cache> cache_;
};

TEST_F(PrefixCacheTest, TheLongestPublishedPrefixOfTheChainIsRestored) {
  const Script a = {{INT64_MAX, 1}};
  Publish(a, 1);
  Publish(a, 3);
  // The whole chain and more: block 3 is not published, block 2 (3 blocks) is.
  Cache::PrefixMatch m = *cache_->CreateSequenceFromPrefix(Chain(a, 5));
  EXPECT_EQ(m.tokens, 3 * kB);
  EXPECT_EQ(m.shared_tokens, 3 * kB);
  // A chain that leaves `a` after 2 blocks: the 1-block prefix; its history
  // holds 2 of the blocks.
  const Script b = {{2 * kB, 1}, {INT64_MAX, 2}};
  m = *cache_->CreateSequenceFromPrefix(Chain(b, 4));
  EXPECT_EQ(m.tokens, kB);
  EXPECT_EQ(m.shared_tokens, 2 * kB);
  EXPECT_EQ(*cache_->Length(m.seq, 1), kB);
  // LookupPrefix says the same without creating or counting.
  const CacheUsage before = cache_->Usage();
  const Cache::PrefixMatch look = cache_->LookupPrefix(Chain(b, 4));
  EXPECT_EQ(look.seq, 0);
  EXPECT_EQ(look.tokens, kB);
  EXPECT_EQ(look.shared_tokens, 2 * kB);
  EXPECT_EQ(cache_->Usage().sequences, before.sequences);
  EXPECT_EQ(cache_->Usage().prefix.hits, before.prefix.hits);
  // Nothing in common: an empty sequence, a miss.
  m = *cache_->CreateSequenceFromPrefix(Chain({{INT64_MAX, 3}}, 2));
  EXPECT_EQ(m.tokens, 0);
  EXPECT_EQ(m.shared_tokens, 0);
  EXPECT_EQ(*cache_->Length(m.seq, 0), 0);
  m = *cache_->CreateSequenceFromPrefix({});
  EXPECT_EQ(m.tokens, 0);
  const PrefixUsage u = cache_->Usage().prefix;
  EXPECT_EQ(u.hits, 2);
  EXPECT_EQ(u.misses, 2);
  EXPECT_EQ(u.tokens_reused, 4 * kB);
  EXPECT_EQ(u.published, 2);
  EXPECT_EQ(u.prefixes, 2);
  EXPECT_EQ(u.cached_tokens, 3 * kB);  // distinct blocks: the 1-block prefix's is the 3-block one's first
  // Publishing a prefix again only refreshes it.
  Publish(a, 3);
  EXPECT_EQ(cache_->Usage().prefix.published, 2);
}

TEST_F(PrefixCacheTest, APrefixOutlivesItsPublisherAndCostsItsPagesOnlyOnceTheyAreCacheOnly) {
  const Script a = {{INT64_MAX, 1}};
  const SequenceId publisher = Grown(a, 2 * kB);
  const CacheUsage live = cache_->Usage();
  ASSERT_TRUE(cache_->PublishPrefix(publisher, Chain(a, 2)).ok());
  const int64_t checkpoint = PrefixAccess::CheckpointBytes(*cache_);
  // The ring (ceil(16 / 5) = 4 pages) and the CSA main and indexer states, in every layer.
  EXPECT_EQ(checkpoint, 4 * PrefixAccess::IdBytes(*cache_, cache_internal::kWindowStream) +
                            PrefixAccess::IdBytes(*cache_, cache_internal::kCsaStateStream) +
                            PrefixAccess::IdBytes(*cache_, cache_internal::kCsaIndexerStateStream));
  PrefixUsage u = cache_->Usage().prefix;
  EXPECT_EQ(u.checkpoint_bytes, checkpoint);
  EXPECT_EQ(u.history_bytes, 0);  // its history is the publisher's, live
  const int64_t history = live.components[static_cast<int>(Component::kCompressedRows)].used_bytes +
                          live.components[static_cast<int>(Component::kIndexKeys)].used_bytes;
  EXPECT_EQ(u.shared_bytes, history);
  ASSERT_TRUE(cache_->Free(publisher).ok());
  u = cache_->Usage().prefix;
  EXPECT_EQ(u.history_bytes, history);  // now only the cache holds it
  EXPECT_EQ(u.shared_bytes, 0);
  EXPECT_EQ(u.cached_bytes, history + checkpoint);
  EXPECT_EQ(cache_->Usage().used_bytes(), history + checkpoint);
  // A sequence restored from it takes the history back into the live budget.
  const SequenceId reused = cache_->CreateSequenceFromPrefix(Chain(a, 2))->seq;
  u = cache_->Usage().prefix;
  EXPECT_EQ(u.history_bytes, 0);
  EXPECT_EQ(u.shared_bytes, history);
  ASSERT_TRUE(cache_->Free(reused).ok());
  EXPECT_EQ(cache_->Usage().prefix.history_bytes, history);
}

TEST_F(PrefixCacheTest, PublishRefusalsChangeNothing) {
  const Script a = {{INT64_MAX, 1}};
  const SequenceId seq = Grown(a, 2 * kB + 6);  // passed 2 blocks by 6 > D = 5
  const std::string bytes = testing::ObservableBytes(*cache_, seq);
  const CacheUsage before = cache_->Usage();
  auto unchanged = [&](const absl::Status& status, absl::StatusCode code, const char* says) {
    EXPECT_EQ(status.code(), code) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(says));
    EXPECT_EQ(testing::ObservableBytes(*cache_, seq), bytes);
    const CacheUsage after = cache_->Usage();
    EXPECT_EQ(after.used_bytes(), before.used_bytes());
    EXPECT_EQ(after.prefix.prefixes, before.prefix.prefixes);
    EXPECT_EQ(after.prefix.cached_bytes, before.prefix.cached_bytes);
  };
  unchanged(cache_->PublishPrefix(seq, Chain(a, 2)), absl::StatusCode::kFailedPrecondition, "has passed 256 tokens by 6");
  unchanged(cache_->PublishPrefix(seq, Chain(a, 3)), absl::StatusCode::kFailedPrecondition, "fewer than");
  unchanged(cache_->PublishPrefix(seq, {}), absl::StatusCode::kInvalidArgument, "no block hashes");
  unchanged(cache_->PublishPrefix(seq, std::vector<uint64_t>(1000, 1)), absl::StatusCode::kInvalidArgument,
            "exceed max_context");
  unchanged(cache_->PublishPrefix(12345, Chain(a, 1)), absl::StatusCode::kNotFound, "no sequence");
  // Mid-step: one layer ahead.
  ASSERT_TRUE(model_.AppendLayer(*cache_, seq, 0, 2 * kB + 6, 2, 1).ok());
  const std::string mid = testing::ObservableBytes(*cache_, seq);
  const absl::Status mid_step = cache_->PublishPrefix(seq, Chain(a, 2));
  EXPECT_EQ(mid_step.code(), absl::StatusCode::kFailedPrecondition) << mid_step;
  EXPECT_EQ(testing::ObservableBytes(*cache_, seq), mid);

  // A hash naming a different block of a published chain.
  Publish(a, 2);
  const CacheUsage published = cache_->Usage();
  const SequenceId other = Grown({{INT64_MAX, 2}}, kB);
  std::vector<uint64_t> bad = Chain(a, 2);
  bad.erase(bad.begin());  // a's block 1 hash as block 0
  const absl::Status collision = cache_->PublishPrefix(other, bad);
  EXPECT_EQ(collision.code(), absl::StatusCode::kInvalidArgument) << collision;
  EXPECT_THAT(std::string(collision.message()), HasSubstr("already names block 1"));
  const absl::Status twice = cache_->PublishPrefix(Grown({{INT64_MAX, 2}}, 2 * kB), {77, 77});
  EXPECT_EQ(twice.code(), absl::StatusCode::kInvalidArgument) << twice;
  EXPECT_EQ(cache_->Usage().prefix.prefixes, published.prefix.prefixes);
  EXPECT_EQ(cache_->Usage().prefix.cached_bytes, published.prefix.cached_bytes);
}

TEST(PrefixCache, EngineCompressedLayersMustHoldThePrefixRows) {
  const TinyModel model(/*hca_by_kvc=*/false);
  auto cache = MakeCache(model.spec(), Options(5, 5));
  const SequenceId seq = *cache->CreateSequence();
  // Every layer's tokens, but the HCA layer's engine has not appended the
  // entry its window closed.
  ASSERT_TRUE(model.AppendLayer(*cache, seq, TinyModel::kWindowLayer, 0, kB, 1).ok());
  ASSERT_TRUE(model.AppendLayer(*cache, seq, TinyModel::kCsaLayer, 0, kB, 1).ok());
  const std::vector<Bf16> rows(static_cast<size_t>(kB) * kHeadDim, ToBf16(0.5f));
  ASSERT_TRUE(cache->Append(seq, TinyModel::kHcaLayer, 0, {rows}).ok());
  const CacheUsage before = cache->Usage();
  const absl::Status s = cache->PublishPrefix(seq, {1});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("layer 2 holds 0 HCA compressed rows"));
  EXPECT_EQ(cache->Usage().used_bytes(), before.used_bytes());
  EXPECT_EQ(cache->Usage().prefix.prefixes, 0);
  const std::vector<Bf16> entry(kHeadDim, ToBf16(0.25f));
  ASSERT_TRUE(cache->AppendCompressedRows(seq, TinyModel::kHcaLayer, 0, entry).ok());
  EXPECT_TRUE(cache->PublishPrefix(seq, {1}).ok());
}

TEST(PrefixCache, OptionsAndBudgetsAreChecked) {
  const TinyModel model;
  CacheOptions options = Options(5, 5);
  for (const int32_t b : {0, 100, 64, 1 << 21}) {
    options.prefix_block_tokens = b;
    EXPECT_EQ(Cache::Create(model.spec(), options).status().code(), absl::StatusCode::kInvalidArgument) << b;
  }
  options.prefix_block_tokens = 256;
  options.prefix_bytes = -1;
  EXPECT_EQ(Cache::Create(model.spec(), options).status().code(), absl::StatusCode::kInvalidArgument);
  // A budget smaller than one checkpoint: nothing can be published.
  options.prefix_bytes = 1000;
  auto cache = MakeCache(model.spec(), options);
  EXPECT_EQ(cache->PrefixBlockTokens(), 256);
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 256, 1).ok());
  const absl::Status s = cache->PublishPrefix(seq, {5});
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("prefix_bytes"));
  EXPECT_EQ(cache->Usage().prefix.prefixes, 0);
  EXPECT_EQ(cache->Usage().prefix.cached_bytes, 0);
}

// Restoring moves history only the cache held into the live history budget:
// when it has no room, the restore is refused and changes nothing.
TEST(PrefixCache, ARestoreTheHistoryBudgetCannotTakeIsRefused) {
  const TinyModel model;
  const Script a = {{INT64_MAX, 1}}, b = {{INT64_MAX, 2}};
  int64_t one_sequence = 0;
  {
    auto probe = MakeCache(model.spec(), Options(5, 5));
    const SequenceId seq = *probe->CreateSequence();
    ASSERT_TRUE(GrowTo(model, *probe, seq, a, 2 * kB).ok());
    const CacheUsage u = probe->Usage();
    one_sequence = u.components[static_cast<int>(Component::kCompressedRows)].used_bytes +
                   u.components[static_cast<int>(Component::kIndexKeys)].used_bytes;
  }
  CacheOptions options = Options(5, 5);
  options.history_bytes = one_sequence;
  auto cache = MakeCache(model.spec(), options);
  const SequenceId publisher = *cache->CreateSequence();
  ASSERT_TRUE(GrowTo(model, *cache, publisher, a, 2 * kB).ok());
  ASSERT_TRUE(cache->PublishPrefix(publisher, Chain(a, 2)).ok());
  ASSERT_TRUE(cache->Free(publisher).ok());  // its history is cache-only now: the live budget is free
  const SequenceId other = *cache->CreateSequence();
  ASSERT_TRUE(GrowTo(model, *cache, other, b, 2 * kB).ok());  // and full again
  const CacheUsage before = cache->Usage();
  const absl::StatusOr<Cache::PrefixMatch> m = cache->CreateSequenceFromPrefix(Chain(a, 2));
  EXPECT_EQ(m.status().code(), absl::StatusCode::kResourceExhausted) << m.status();
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("history budget"));
  const CacheUsage after = cache->Usage();
  EXPECT_EQ(after.sequences, before.sequences);
  EXPECT_EQ(after.used_bytes(), before.used_bytes());
  EXPECT_EQ(after.prefix.cached_bytes, before.prefix.cached_bytes);
  EXPECT_EQ(after.prefix.hits + after.prefix.misses, before.prefix.hits + before.prefix.misses);
  // With room again it works.
  ASSERT_TRUE(cache->Free(other).ok());
  EXPECT_EQ(cache->CreateSequenceFromPrefix(Chain(a, 2))->tokens, 2 * kB);
}

// --- Eviction --------------------------------------------------------------------

TEST(PrefixCache, EvictionKeepsTheBudgetAndNeverTakesALiveSequencesPages) {
  const TinyModel model;
  CacheOptions options = Options(5, 5);
  auto probe = MakeCache(model.spec(), options);
  const int64_t checkpoint = PrefixAccess::CheckpointBytes(*probe);
  options.prefix_bytes = 4 * checkpoint;  // a few prefixes and their history
  auto cache = MakeCache(model.spec(), options);
  // A restored sequence keeps working however many prefixes go.
  const Script kept = {{INT64_MAX, 100}};
  const SequenceId publisher = *cache->CreateSequence();
  ASSERT_TRUE(GrowTo(model, *cache, publisher, kept, 2 * kB).ok());
  ASSERT_TRUE(cache->PublishPrefix(publisher, Chain(kept, 2)).ok());
  ASSERT_TRUE(cache->Free(publisher).ok());
  const SequenceId holder = cache->CreateSequenceFromPrefix(Chain(kept, 2))->seq;
  int64_t evicted = 0;
  for (uint64_t seed = 1; seed <= 12; ++seed) {
    const Script s = {{INT64_MAX, seed}};
    const SequenceId seq = *cache->CreateSequence();
    ASSERT_TRUE(GrowTo(model, *cache, seq, s, 2 * kB).ok());
    ASSERT_TRUE(cache->PublishPrefix(seq, Chain(s, 2)).ok());
    ASSERT_TRUE(cache->Free(seq).ok());
    const PrefixUsage u = cache->Usage().prefix;
    EXPECT_LE(u.cached_bytes, options.prefix_bytes) << "after publishing " << seed;
    evicted = u.evictions;
  }
  EXPECT_GT(evicted, 0);
  // The newest prefix is there and restores exactly; the oldest ones went.
  const Script last = {{INT64_MAX, 12}};
  Cache::PrefixMatch m = *cache->CreateSequenceFromPrefix(Chain(last, 2));
  EXPECT_EQ(m.tokens, 2 * kB);
  const SequenceId fresh = *cache->CreateSequence();
  ASSERT_TRUE(GrowTo(model, *cache, fresh, last, 2 * kB).ok());
  EXPECT_EQ(Observed(*cache, m.seq), Observed(*cache, fresh));
  ASSERT_TRUE(GrowTo(model, *cache, m.seq, last, 3 * kB + 9).ok());
  ASSERT_TRUE(GrowTo(model, *cache, fresh, last, 3 * kB + 9).ok());
  EXPECT_EQ(testing::ObservableBytes(*cache, m.seq), testing::ObservableBytes(*cache, fresh));
  EXPECT_EQ(cache->CreateSequenceFromPrefix(Chain({{INT64_MAX, 1}}, 2))->tokens, 0);
  // The holder's pages were never taken: it continues exactly.
  const SequenceId again = *cache->CreateSequence();
  ASSERT_TRUE(GrowTo(model, *cache, again, kept, 3 * kB + 1).ok());
  ASSERT_TRUE(GrowTo(model, *cache, holder, kept, 3 * kB + 1).ok());
  EXPECT_EQ(Observed(*cache, holder), Observed(*cache, again));
}

TEST(PrefixCache, APrefixThatIsHitOutlivesNewerOnesThatAreNot) {
  const TinyModel model;
  CacheOptions options = Options(5, 5);
  auto probe = MakeCache(model.spec(), options);
  options.prefix_bytes = 3 * PrefixAccess::CheckpointBytes(*probe);
  auto cache = MakeCache(model.spec(), options);
  const Script hot = {{INT64_MAX, 1000}};
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(GrowTo(model, *cache, seq, hot, kB).ok());
  ASSERT_TRUE(cache->PublishPrefix(seq, Chain(hot, 1)).ok());
  ASSERT_TRUE(cache->Free(seq).ok());
  for (uint64_t seed = 1; seed <= 10; ++seed) {
    const Cache::PrefixMatch m = *cache->CreateSequenceFromPrefix(Chain(hot, 1));
    EXPECT_EQ(m.tokens, kB) << "request " << seed;
    ASSERT_TRUE(cache->Free(m.seq).ok());
    const Script cold = {{INT64_MAX, seed}};
    const SequenceId c = *cache->CreateSequence();
    ASSERT_TRUE(GrowTo(model, *cache, c, cold, kB).ok());
    ASSERT_TRUE(cache->PublishPrefix(c, Chain(cold, 1)).ok());
    ASSERT_TRUE(cache->Free(c).ok());
  }
  EXPECT_GT(cache->Usage().prefix.evictions, 5);
  EXPECT_EQ(cache->LookupPrefix(Chain(hot, 1)).tokens, kB);
}

// --- Forks and rollbacks around publish points ---------------------------------

TEST_F(PrefixCacheTest, RollingBackOrForkingThePublisherLeavesThePrefixIntact) {
  const Script a = {{INT64_MAX, 1}};
  const Script b = {{2 * kB - 3, 1}, {INT64_MAX, 2}};  // a's first 2 blocks minus 3 tokens, then others
  const SequenceId publisher = Grown(a, 2 * kB);
  ASSERT_TRUE(cache_->PublishPrefix(publisher, Chain(a, 2)).ok());
  const SequenceId fork = *cache_->Fork(publisher);
  // The publisher goes back 3 tokens and takes another path: it writes into
  // the pages the prefix holds, which copies them first.
  ASSERT_TRUE(cache_->Truncate(publisher, 2 * kB - 3).ok());
  ASSERT_TRUE(GrowTo(model_, *cache_, publisher, b, 3 * kB + 50).ok());
  // The fork continues a.
  ASSERT_TRUE(GrowTo(model_, *cache_, fork, a, 3 * kB).ok());
  // The fork publishes the longer prefix (it shares the first one's blocks).
  ASSERT_TRUE(cache_->PublishPrefix(fork, Chain(a, 3)).ok());
  const SequenceId fresh_b = Grown(b, 3 * kB + 50);
  EXPECT_EQ(testing::ObservableBytes(*cache_, publisher), testing::ObservableBytes(*cache_, fresh_b));
  ASSERT_TRUE(cache_->Free(publisher).ok());
  ASSERT_TRUE(cache_->Free(fork).ok());
  for (const int64_t blocks : {2, 3}) {
    const Cache::PrefixMatch m = *cache_->CreateSequenceFromPrefix(Chain(a, blocks));
    EXPECT_EQ(m.tokens, blocks * kB);
    const SequenceId fresh = Grown(a, blocks * kB);
    EXPECT_EQ(Observed(*cache_, m.seq), Observed(*cache_, fresh));
    // A restored sequence forks, rolls back (not below the prefix) and
    // continues like the others.
    const SequenceId child = *cache_->Fork(m.seq);
    EXPECT_EQ(cache_->Truncate(m.seq, blocks * kB - 1).code(), absl::StatusCode::kFailedPrecondition);
    ASSERT_TRUE(GrowTo(model_, *cache_, m.seq, a, blocks * kB + 4).ok());
    ASSERT_TRUE(cache_->Truncate(m.seq, blocks * kB + 1).ok());
    ASSERT_TRUE(GrowTo(model_, *cache_, m.seq, a, blocks * kB + 140).ok());
    ASSERT_TRUE(GrowTo(model_, *cache_, child, a, blocks * kB + 140).ok());
    ASSERT_TRUE(GrowTo(model_, *cache_, fresh, a, blocks * kB + 140).ok());
    EXPECT_EQ(testing::ObservableBytes(*cache_, m.seq), testing::ObservableBytes(*cache_, fresh));
    EXPECT_EQ(testing::ObservableBytes(*cache_, child), testing::ObservableBytes(*cache_, fresh));
  }
}

TEST_F(PrefixCacheTest, ARestoredSequencePublishesItsLongerPrefix) {
  const Script a = {{INT64_MAX, 1}};
  Publish(a, 1);
  const Cache::PrefixMatch m = *cache_->CreateSequenceFromPrefix(Chain(a, 3));
  ASSERT_EQ(m.tokens, kB);
  ASSERT_TRUE(GrowTo(model_, *cache_, m.seq, a, 3 * kB + 2).ok());
  ASSERT_TRUE(cache_->PublishPrefix(m.seq, Chain(a, 3)).ok());  // passed by 2
  ASSERT_TRUE(cache_->Free(m.seq).ok());
  const Cache::PrefixMatch again = *cache_->CreateSequenceFromPrefix(Chain(a, 4));
  EXPECT_EQ(again.tokens, 3 * kB);
  const SequenceId fresh = Grown(a, 3 * kB);
  EXPECT_EQ(Observed(*cache_, again.seq), Observed(*cache_, fresh));
  ASSERT_TRUE(GrowTo(model_, *cache_, again.seq, a, 4 * kB + 3).ok());
  ASSERT_TRUE(GrowTo(model_, *cache_, fresh, a, 4 * kB + 3).ok());
  EXPECT_EQ(testing::ObservableBytes(*cache_, again.seq), testing::ObservableBytes(*cache_, fresh));
}

// A publish is refused while the sequence is in an open step (its layers
// may be half written).
TEST_F(PrefixCacheTest, APublishWaitsForTheOpenStep) {
  const Script a = {{INT64_MAX, 1}};
  const SequenceId seq = Grown(a, kB);
  const absl::StatusOr<StepPlan> plan = cache_->PlanStep({{seq, 3}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  const absl::Status s = cache_->PublishPrefix(seq, Chain(a, 1));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("open step"));
  ASSERT_TRUE(cache_->AbortStep(plan->epoch).ok());
  EXPECT_TRUE(cache_->PublishPrefix(seq, Chain(a, 1)).ok());
}

// A restored sequence saved to a snapshot and restored from it is the same
// sequence: it continues like one that appended everything.
TEST_F(PrefixCacheTest, ARestoredSequenceSurvivesASnapshot) {
  const Script a = {{INT64_MAX, 1}};
  Publish(a, 2);
  const SequenceId reused = cache_->CreateSequenceFromPrefix(Chain(a, 2))->seq;
  ASSERT_TRUE(GrowTo(model_, *cache_, reused, a, 2 * kB + 3).ok());
  const std::string path = ::testing::TempDir() + "/prefix_restored.kvcsnap";
  ASSERT_TRUE(SaveSnapshot(*cache_, {reused}, path).ok());
  const absl::StatusOr<std::vector<SequenceId>> back = RestoreSnapshot(*cache_, path);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 1u);
  EXPECT_EQ(testing::ObservableBytes(*cache_, (*back)[0]), testing::ObservableBytes(*cache_, reused));
  const SequenceId fresh = Grown(a, 2 * kB + 3);
  for (const SequenceId s : {(*back)[0], fresh}) ASSERT_TRUE(GrowTo(model_, *cache_, s, a, 3 * kB + 11).ok());
  EXPECT_EQ(testing::ObservableBytes(*cache_, (*back)[0]), testing::ObservableBytes(*cache_, fresh));
  std::remove(path.c_str());
}

// --- Page-manager mode -----------------------------------------------------------

using testing::EngineCopy;
using testing::EngineMemory;
using testing::EngineWrite;

// The rows a sequence holds, read through block tables and page arrays
// alone (what an engine kernel reads): per layer its length, the ring slots
// of its last `window` positions, every history row, and the compressor
// state rows of the tokens in [from, length) the state ring holds.
std::string HeldRows(const Cache& cache, SequenceId seq, int64_t from) {
  std::string out;
  auto put = [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  const int64_t window = cache.spec().window, ring = window + cache.options().draft_slots;
  for (int layer = 0; layer < static_cast<int>(cache.spec().layers.size()); ++layer) {
    const int64_t length = *cache.Length(seq, layer);
    put(&length, sizeof(length));
    for (int s = 0; s < kNumStreams; ++s) {
      const Stream stream = static_cast<Stream>(s);
      const absl::StatusOr<PageArray> a = cache.LayerPages(layer, stream);
      if (!a.ok()) continue;
      const std::vector<int32_t> ids = *cache.BlockTable(seq, stream);
      auto put_row = [&](int64_t r) {
        const uint8_t* page = a->base + int64_t{ids[static_cast<size_t>(r / a->rows_per_page)]} * a->page_bytes;
        put(page + r % a->rows_per_page * a->row_data_bytes, static_cast<size_t>(a->row_data_bytes));
        put(page + int64_t{a->rows_per_page} * a->row_data_bytes + r % a->rows_per_page * a->row_scale_bytes,
            static_cast<size_t>(a->row_scale_bytes));
      };
      if (stream == Stream::kWindow) {
        for (int64_t t = std::max<int64_t>(0, length - window); t < length; ++t) put_row(t % ring);
      } else if (s >= static_cast<int>(Stream::kCsaState)) {
        for (int64_t t = std::max(from, length - a->rows_per_page); t < length; ++t) put_row(t % a->rows_per_page);
      } else {
        const int64_t rows = *cache.StreamRows(seq, layer, stream);
        for (int64_t r = 0; r < rows; ++r) put_row(r);
      }
    }
  }
  return out;
}

// kvc writing its own bytes and an engine in page-manager mode writing
// through the plans' slots and making the copies kvc lists (the checkpoint
// on publish, its restore on reuse) hold the same rows at every point, and
// the restored sequences hold those of a sequence that appended everything.
TEST(PrefixCachePageManager, AnEngineMakingTheListedCopiesRestoresKvcsBytes) {
  const TinyModel model;
  CacheOptions o;
  o.rollback_depth = 4;
  o.draft_slots = 4;
  o.rows_per_page = 8;
  o.keys_per_page = 8;
  o.prefix_block_tokens = static_cast<int32_t>(kB);
  EngineMemory kvc_memory(model.spec(), o, 128), engine_memory(model.spec(), o, 128);
  CacheOptions ko = o, eo = o;
  ko.engine_arrays = kvc_memory.arrays;
  eo.engine_arrays = engine_memory.arrays;
  eo.page_manager = true;
  std::unique_ptr<Cache> kvc = *Cache::Create(model.spec(), ko), engine = *Cache::Create(model.spec(), eo);
  auto step = [&](SequenceId seq, int64_t n, uint64_t seed) {
    const absl::StatusOr<StepPlan> a = kvc->PlanStep({{seq, n}});
    const absl::StatusOr<StepPlan> b = engine->PlanStep({{seq, n}});
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
    EngineCopy(*engine, b->copies);
    for (int layer = 0; layer < 3; ++layer) {
      ASSERT_TRUE(model.AppendLayer(*kvc, seq, layer, a->first_position[0], n, seed).ok());
      EngineWrite(*engine, model, *b, 0, layer, seed);
    }
    ASSERT_TRUE(kvc->CommitStep(a->epoch).ok());
    ASSERT_TRUE(engine->CommitStep(b->epoch).ok());
    ASSERT_TRUE(engine->CompleteSteps(b->epoch).ok());  // the "device" is done
  };
  auto create = [&] {
    const SequenceId a = *kvc->CreateSequence(), b = *engine->CreateSequence();
    EXPECT_EQ(a, b);
    return a;
  };
  auto publish = [&](SequenceId seq, const std::vector<uint64_t>& chain) {
    ASSERT_TRUE(kvc->PublishPrefix(seq, chain).ok());
    std::vector<PageCopy> copies;
    ASSERT_TRUE(engine->PublishPrefix(seq, chain, &copies).ok());
    EXPECT_FALSE(copies.empty());
    for (const PageCopy& c : copies) EXPECT_TRUE(c.stream == Stream::kWindow || c.stream == Stream::kCsaState ||
                                                 c.stream == Stream::kCsaIndexerState);
    EngineCopy(*engine, copies);
  };
  auto restore = [&](const std::vector<uint64_t>& chain, int64_t tokens) {
    const Cache::PrefixMatch a = *kvc->CreateSequenceFromPrefix(chain);
    std::vector<PageCopy> copies;
    const Cache::PrefixMatch b = *engine->CreateSequenceFromPrefix(chain, &copies);
    EXPECT_EQ(a.seq, b.seq);
    EXPECT_EQ(a.tokens, tokens);
    EXPECT_EQ(b.tokens, tokens);
    EngineCopy(*engine, copies);
    return a.seq;
  };

  const std::vector<uint64_t> chain = {0xA1, 0xA2}, passed = {0xB1}, too_far = {0xC1};
  const SequenceId p = create();
  step(p, 60, 1);
  step(p, 68, 1);  // 1 block
  publish(p, {chain[0]});
  EXPECT_EQ(engine->PublishPrefix(p, {chain[0]}).code(), absl::StatusCode::kFailedPrecondition);  // copies would be lost
  EXPECT_EQ(engine->CreateSequenceFromPrefix(chain).status().code(), absl::StatusCode::kFailedPrecondition);
  step(p, 1, 2);
  step(p, 30, 2);  // writes into pages the prefix shares: copied on write
  // Passed by 3 <= rollback_depth: still possible; by 5: refused in both modes.
  const SequenceId q = create();
  step(q, 131, 3);
  publish(q, passed);
  const SequenceId r = create();
  step(r, 133, 5);
  std::vector<PageCopy> copies;
  EXPECT_EQ(kvc->PublishPrefix(r, too_far).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(engine->PublishPrefix(r, too_far, &copies).code(), absl::StatusCode::kFailedPrecondition);
  for (const SequenceId s : {p, q, r}) {
    ASSERT_TRUE(kvc->Free(s).ok());
    ASSERT_TRUE(engine->Free(s).ok());
  }

  // Reuse both prefixes and grow past an HCA window; the reference appends
  // everything itself in kvc's cache.
  for (const auto& [prefix, seed] : {std::make_pair(std::vector<uint64_t>{chain[0], chain[1]}, uint64_t{1}),
                                     std::make_pair(passed, uint64_t{3})}) {
    const SequenceId reused = restore(prefix, kB);
    const SequenceId fresh = create();  // in both, so that both hand out the same ids
    ASSERT_TRUE(model.Grow(*kvc, fresh, kB, seed).ok());
    EXPECT_EQ(HeldRows(*kvc, reused, kB), HeldRows(*engine, reused, kB));
    EXPECT_EQ(HeldRows(*kvc, reused, kB), HeldRows(*kvc, fresh, kB));
    int64_t length = kB;
    for (const int64_t n : {1, 3, 40, 100, 30}) {
      step(reused, n, 9);
      ASSERT_TRUE(model.Grow(*kvc, fresh, length + n, 9, n).ok());
      length += n;
      EXPECT_EQ(HeldRows(*kvc, reused, kB), HeldRows(*engine, reused, kB)) << "at " << length;
      EXPECT_EQ(HeldRows(*kvc, reused, kB), HeldRows(*kvc, fresh, kB)) << "at " << length;
    }
    ASSERT_TRUE(kvc->Free(fresh).ok());
    ASSERT_TRUE(engine->Free(fresh).ok());
  }
  EXPECT_EQ(kvc->Usage().prefix.hits, 2);
  EXPECT_EQ(engine->Usage().prefix.hits, 2);
  EXPECT_EQ(kvc->Usage().prefix.cached_bytes, engine->Usage().prefix.cached_bytes);
}

// Page-manager mode: an evicted checkpoint's pages wait for the device like
// every freed page (they are reused only after CompleteSteps), but leave the
// prefix budget at once, so a publish that evicts is not refused for room
// the device still holds.
TEST(PrefixCachePageManager, AnEvictedCheckpointWaitsForTheDeviceOutsideTheBudget) {
  const TinyModel model;
  CacheOptions o;
  o.page_manager = true;
  o.rollback_depth = 4;
  o.draft_slots = 4;
  o.rows_per_page = 8;
  o.keys_per_page = 8;
  o.prefix_block_tokens = static_cast<int32_t>(kB);
  std::unique_ptr<Cache> probe = *Cache::Create(model.spec(), o);
  o.prefix_bytes = PrefixAccess::CheckpointBytes(*probe);  // one checkpoint
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), o);
  auto grown = [&](int64_t tokens) {
    const SequenceId seq = *cache->CreateSequence();
    const StepPlan plan = *cache->PlanStep({{seq, tokens}});  // the engine writes the rows
    EXPECT_TRUE(cache->CommitStep(plan.epoch).ok());
    EXPECT_TRUE(cache->CompleteSteps(plan.epoch).ok());
    return seq;
  };
  const SequenceId a = grown(kB), b = grown(kB), c = grown(kB);
  std::vector<PageCopy> copies;
  ASSERT_TRUE(cache->PublishPrefix(a, {1}, &copies).ok());
  const std::vector<int32_t> first = PrefixAccess::Entries(*cache)[0].tables[cache_internal::kWindowStream];
  const int64_t deferred = cache->Usage().deferred_pages;
  const StepPlan running = *cache->PlanStep({{a, 1}});  // a step the device may be running
  ASSERT_TRUE(cache->PublishPrefix(b, {2}, &copies).ok());  // evicts prefix 1
  CacheUsage u = cache->Usage();
  EXPECT_EQ(u.prefix.evictions, 1);
  EXPECT_EQ(u.prefix.checkpoint_bytes, o.prefix_bytes);  // prefix 2's alone
  EXPECT_GT(u.deferred_pages, deferred);                  // prefix 1's wait
  const std::vector<int32_t> second = PrefixAccess::Entries(*cache)[0].tables[cache_internal::kWindowStream];
  for (const int32_t id : second) {
    EXPECT_EQ(std::count(first.begin(), first.end(), id), 0) << "a page the running step may read was reused";
  }
  ASSERT_TRUE(cache->PublishPrefix(c, {3}, &copies).ok());  // evicts prefix 2 while the step runs
  EXPECT_EQ(cache->Usage().prefix.evictions, 2);
  ASSERT_TRUE(cache->CommitStep(running.epoch).ok());
  ASSERT_TRUE(cache->CompleteSteps(running.epoch).ok());
  EXPECT_EQ(cache->Usage().deferred_pages, deferred);
  EXPECT_EQ(cache->Usage().prefix.checkpoint_bytes, o.prefix_bytes);
  EXPECT_EQ(cache->LookupPrefix({3}).tokens, kB);
}

// --- Page references against a reference model --------------------------------

// Random operations (create, restore, grow, fork, truncate, publish, free)
// under a small prefix budget; after each, every page's references and pins
// equal what the model derives: one reference per live table and per held
// prefix that lists it, one pin per prefix; a prefix's history is the pages
// its publisher had; what a restore finds is the model's longest held
// prefix; the cache-only bytes are the budget's and fit it.
TEST(PrefixCache, PageReferencesMatchAReferenceModel) {
  const TinyModel model;
  CacheOptions options = Options(5, 5);
  auto probe = MakeCache(model.spec(), options);
  options.prefix_bytes = 3 * PrefixAccess::CheckpointBytes(*probe);
  auto cache = MakeCache(model.spec(), options);
  const std::vector<Script> scripts = {{{INT64_MAX, 1}},
                                       {{2 * kB, 1}, {INT64_MAX, 2}},
                                       {{3 * kB + 40, 1}, {INT64_MAX, 3}},
                                       {{kB, 1}, {INT64_MAX, 5}},
                                       {{kB + 1, 4}, {INT64_MAX, 6}},
                                       {{INT64_MAX, 4}}};
  struct Live {
    size_t script;
  };
  std::map<SequenceId, Live> live;
  struct Held {
    int64_t tokens;
    PrefixAccess::Tables tables;
  };
  std::map<uint64_t, Held> held;  // the model's prefixes, by last hash
  constexpr int kHistory[] = {cache_internal::kCsaRowsStream, cache_internal::kCsaKeysStream, cache_internal::kHcaRowsStream};
  std::mt19937 rng(7);
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };

  auto check = [&](const std::string& after) {
    SCOPED_TRACE(after);
    // Prefixes: the cache holds a subset of the model's (evictions), with
    // the tables the model recorded.
    std::map<uint64_t, Held> now;
    for (const PrefixAccess::Entry& e : PrefixAccess::Entries(*cache)) {
      const auto it = held.find(e.last_hash);
      ASSERT_NE(it, held.end());
      EXPECT_EQ(e.tokens, it->second.tokens);
      for (const int s : kHistory) EXPECT_EQ(e.tables[static_cast<size_t>(s)], it->second.tables[static_cast<size_t>(s)]);
      now[e.last_hash] = Held{e.tokens, e.tables};
    }
    held = now;
    std::array<std::map<int32_t, std::pair<int, int>>, cache_internal::kStreamCount> expect;  // id -> (refs, pins)
    for (const auto& [id, l] : live) {
      const PrefixAccess::Tables t = PrefixAccess::SequenceTables(*cache, id);
      for (int s = 0; s < cache_internal::kStreamCount; ++s) {
        for (const int32_t page : t[static_cast<size_t>(s)]) ++expect[static_cast<size_t>(s)][page].first;
      }
    }
    for (const auto& [hash, h] : held) {
      for (int s = 0; s < cache_internal::kStreamCount; ++s) {
        for (const int32_t page : h.tables[static_cast<size_t>(s)]) {
          ++expect[static_cast<size_t>(s)][page].first;
          ++expect[static_cast<size_t>(s)][page].second;
        }
      }
    }
    const auto refs = PrefixAccess::AllRefs(*cache);
    int64_t cache_only = 0, shared = 0;
    for (int s = 0; s < cache_internal::kStreamCount; ++s) {
      const auto& r = refs[static_cast<size_t>(s)];
      for (int32_t id = 0; id < static_cast<int32_t>(r.refs.size()); ++id) {
        const auto it = expect[static_cast<size_t>(s)].find(id);
        const std::pair<int, int> want = it == expect[static_cast<size_t>(s)].end() ? std::make_pair(0, 0) : it->second;
        ASSERT_EQ(r.refs[static_cast<size_t>(id)], want.first) << "stream " << s << " id " << id;
        ASSERT_EQ(r.pins[static_cast<size_t>(id)], want.second) << "stream " << s << " id " << id;
        if (want.second > 0) (want.first == want.second ? cache_only : shared) += PrefixAccess::IdBytes(*cache, s);
      }
      if (!expect[static_cast<size_t>(s)].empty()) {  // no table lists an id never handed out
        EXPECT_LT(expect[static_cast<size_t>(s)].rbegin()->first, static_cast<int32_t>(r.refs.size()));
      }
    }
    const PrefixUsage u = cache->Usage().prefix;
    EXPECT_EQ(u.cached_bytes, cache_only);
    EXPECT_EQ(u.shared_bytes, shared);
    EXPECT_EQ(u.prefixes, static_cast<int64_t>(held.size()));
    EXPECT_LE(u.cached_bytes, options.prefix_bytes);
  };

  for (int op = 0; op < 500; ++op) {
    const int kind = static_cast<int>(rng() % 11);
    std::vector<SequenceId> ids;
    for (const auto& [id, l] : live) ids.push_back(id);
    if (kind <= 1 || ids.empty()) {  // restore (or create) a sequence following a script
      const size_t script = pick(scripts.size());
      const std::vector<uint64_t> chain = Chain(scripts[script], 6);
      // The model's longest held prefix of the chain.
      int64_t want = 0;
      const Held* from = nullptr;
      for (size_t i = 0; i < chain.size(); ++i) {
        const auto it = held.find(chain[i]);
        if (it != held.end()) want = it->second.tokens, from = &it->second;
      }
      const absl::StatusOr<Cache::PrefixMatch> m = cache->CreateSequenceFromPrefix(chain);
      ASSERT_TRUE(m.ok()) << m.status();
      ASSERT_EQ(m->tokens, want) << "op " << op;
      if (from != nullptr) {
        const PrefixAccess::Tables t = PrefixAccess::SequenceTables(*cache, m->seq);
        for (const int s : kHistory) EXPECT_EQ(t[static_cast<size_t>(s)], from->tables[static_cast<size_t>(s)]);
      }
      live[m->seq] = {script};
      if (want > 0 && rng() % 4 == 0) {  // and its bytes
        const SequenceId fresh = *cache->CreateSequence();
        ASSERT_TRUE(GrowTo(model, *cache, fresh, scripts[script], want).ok());
        EXPECT_EQ(Observed(*cache, m->seq), Observed(*cache, fresh));
        ASSERT_TRUE(cache->Free(fresh).ok());
      }
      check("restore");
      continue;
    }
    const SequenceId id = ids[pick(ids.size())];
    const Live l = live[id];
    const int64_t length = *cache->Length(id, 0);
    if (kind <= 3) {  // grow, often to a block boundary
      const int64_t to = rng() % 2 == 0 ? (length / kB + 1) * kB : length + 1 + static_cast<int64_t>(rng() % 150);
      if (to > 6 * kB) continue;
      ASSERT_TRUE(GrowTo(model, *cache, id, scripts[l.script], to, 1 + static_cast<int64_t>(rng() % 60)).ok());
      check("grow");
    } else if (kind <= 6) {  // publish what the sequence can
      if (length < kB) continue;
      const int64_t blocks = length / kB - static_cast<int64_t>(rng() % 2);
      if (blocks < 1) continue;
      const int64_t floor = *cache->RollbackFloor(id);
      const std::vector<uint64_t> chain = Chain(scripts[l.script], blocks);
      const bool known = held.count(chain.back()) > 0;
      PrefixAccess::Tables before = PrefixAccess::SequenceTables(*cache, id);
      const absl::Status s = cache->PublishPrefix(id, chain);
      if (blocks * kB < floor) {
        ASSERT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
      } else {
        ASSERT_TRUE(s.ok()) << s;
        if (!known) {  // the model's record: the publisher's pages covering the prefix
          Held h{blocks * kB, {}};
          const int64_t per_page[] = {options.rows_per_page, options.keys_per_page, options.rows_per_page};
          const int64_t rows[] = {blocks * kB / 4, blocks * kB / 4, blocks * kB / 128};
          for (int k = 0; k < 3; ++k) {
            const auto& t = before[static_cast<size_t>(kHistory[k])];
            h.tables[static_cast<size_t>(kHistory[k])].assign(t.begin(), t.begin() + (rows[k] + per_page[k] - 1) / per_page[k]);
          }
          // Its checkpoint pages are new: take them from the cache.
          for (const PrefixAccess::Entry& e : PrefixAccess::Entries(*cache)) {
            if (e.last_hash != chain.back()) continue;
            for (const int s2 : {cache_internal::kWindowStream, cache_internal::kCsaStateStream,
                                 cache_internal::kCsaIndexerStateStream}) {
              h.tables[static_cast<size_t>(s2)] = e.tables[static_cast<size_t>(s2)];
              for (const int32_t page : e.tables[static_cast<size_t>(s2)]) {
                for (const auto& [other, o] : live) {
                  const std::vector<int32_t> t = PrefixAccess::SequenceTables(*cache, other)[static_cast<size_t>(s2)];
                  EXPECT_EQ(std::count(t.begin(), t.end(), page), 0) << "a checkpoint page is a live sequence's";
                }
              }
            }
          }
          held[chain.back()] = h;
        }
      }
      check("publish");
    } else if (kind == 7) {
      const SequenceId child = *cache->Fork(id);
      live[child] = l;
      check("fork");
    } else if (kind == 8) {
      const int64_t floor = *cache->RollbackFloor(id);
      const int64_t to = floor + static_cast<int64_t>(rng() % static_cast<uint64_t>(length - floor + 1));
      ASSERT_TRUE(cache->Truncate(id, to).ok());
      check("truncate");
    } else {
      ASSERT_TRUE(cache->Free(id).ok());
      live.erase(id);
      check("free");
    }
  }
  const PrefixUsage u = cache->Usage().prefix;
  EXPECT_GT(u.evictions, 0);
  EXPECT_GT(u.hits, 0);
  std::printf("published %lld, evicted %lld, hits %lld, misses %lld\n", static_cast<long long>(u.published),
              static_cast<long long>(u.evictions), static_cast<long long>(u.hits), static_cast<long long>(u.misses));
}

// --- Concurrency (ThreadSanitizer) ----------------------------------------------

// Threads restore, grow, publish and free sequences of scripts that share a
// "system prompt", under a budget that keeps evicting; every restored and
// published sequence is checked against bytes computed beforehand.
TEST(PrefixCacheConcurrency, PublishersAndMatchersAgreeWithASingleThreadedReference) {
  const TinyModel model;
  CacheOptions options = Options(5, 5);
  constexpr int kScripts = 4, kBlocks = 3;
  std::vector<Script> scripts;
  for (int i = 0; i < kScripts; ++i) scripts.push_back({{kB, 1}, {INT64_MAX, 10 + static_cast<uint64_t>(i)}});
  // The reference: every (script, blocks) state, appended directly.
  std::vector<std::vector<std::string>> expected(kScripts);
  {
    auto reference = MakeCache(model.spec(), options);
    for (int i = 0; i < kScripts; ++i) {
      const SequenceId seq = *reference->CreateSequence();
      expected[static_cast<size_t>(i)].push_back(Observed(*reference, seq));
      for (int b = 1; b <= kBlocks; ++b) {
        ASSERT_TRUE(GrowTo(model, *reference, seq, scripts[static_cast<size_t>(i)], b * kB).ok());
        expected[static_cast<size_t>(i)].push_back(Observed(*reference, seq));
      }
    }
    options.prefix_bytes = 3 * PrefixAccess::CheckpointBytes(*reference);
  }
  auto cache = MakeCache(model.spec(), options);
  std::atomic<int> failures{0};
  std::atomic<bool> done{false};
  auto worker = [&](int thread) {
    std::mt19937 rng(static_cast<uint32_t>(thread));
    for (int iteration = 0; iteration < 12; ++iteration) {
      const int script = static_cast<int>(rng() % kScripts);
      const Script& s = scripts[static_cast<size_t>(script)];
      const absl::StatusOr<Cache::PrefixMatch> m = cache->CreateSequenceFromPrefix(Chain(s, kBlocks));
      if (!m.ok() || Observed(*cache, m->seq) != expected[static_cast<size_t>(script)][static_cast<size_t>(m->tokens / kB)]) {
        ++failures;
        continue;
      }
      const int64_t blocks = std::min<int64_t>(kBlocks, m->tokens / kB + 1 + static_cast<int64_t>(rng() % 2));
      bool ok = GrowTo(model, *cache, m->seq, s, blocks * kB, 29).ok();
      ok = ok && Observed(*cache, m->seq) == expected[static_cast<size_t>(script)][static_cast<size_t>(blocks)];
      const absl::Status published = cache->PublishPrefix(m->seq, Chain(s, blocks));
      ok = ok && (published.ok() || published.code() == absl::StatusCode::kResourceExhausted);
      ok = ok && cache->Free(m->seq).ok();
      if (!ok) ++failures;
    }
  };
  std::thread reader([&] {  // the accounting, polled throughout
    while (!done) {
      const CacheUsage u = cache->Usage();
      if (u.prefix.cached_bytes < 0 || u.prefix.hits < 0) ++failures;
      if (cache->LookupPrefix(Chain(scripts[0], kBlocks)).tokens % kB != 0) ++failures;
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back(worker, t);
  for (std::thread& t : threads) t.join();
  done = true;
  reader.join();
  EXPECT_EQ(failures.load(), 0);
  const CacheUsage u = cache->Usage();
  EXPECT_EQ(u.sequences, 0);
  EXPECT_LE(u.prefix.cached_bytes, options.prefix_bytes);
  EXPECT_EQ(u.used_bytes(), u.prefix.cached_bytes);  // every page left is a cached prefix's
  EXPECT_GT(u.prefix.hits, 0);
}

}  // namespace
}  // namespace kvc
