// Planned steps and page-manager mode under attack: what an adversary or a
// buggy engine does to PlanStep / CommitStep / AbortStep / CompleteSteps,
// Fork with copies, and their C API (cache.h, "Planned batch steps";
// docs/embedding.md section 4). Each test states the contract it holds kvc
// to. Its own binary: it replaces the global operator new so that a chosen
// allocation fails (a failed call must change nothing, whichever
// allocation fails).
//
// StepAdversarialConcurrency.* also run under ThreadSanitizer
// (scripts/test.sh).
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/kvc.h"
#include "kvc/snapshot.h"
#include "tests/testing/tiny_model.h"

// --- Allocation failure injection ------------------------------------------
namespace {
// >= 0: the allocation that many allocations from now (on this thread) throws
// std::bad_alloc, once.
thread_local int64_t t_fail_in = -1;
thread_local bool t_fault_fired = false;
}  // namespace

// Not inlined: GCC would otherwise pair its built-in knowledge of new with
// the free() below and warn (-Wmismatched-new-delete).
[[gnu::noinline]] void* operator new(std::size_t n) {
  if (t_fail_in >= 0) {
    if (t_fail_in == 0) {
      t_fail_in = -1;
      t_fault_fired = true;
      throw std::bad_alloc();
    }
    --t_fail_in;
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void* operator new[](std::size_t n) { return operator new(n); }
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KVC_TEST_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define KVC_TEST_SANITIZER 1
#endif
#endif

namespace kvc {
namespace {

using ::testing::HasSubstr;
using testing::TinyModel;

constexpr int kLayers = 3;

CacheOptions Options(bool page_manager, int32_t depth = 4, int32_t draft_slots = 4, int32_t rows_per_page = 8) {
  CacheOptions o;
  o.rollback_depth = depth;
  o.draft_slots = draft_slots;
  o.rows_per_page = rows_per_page;
  o.keys_per_page = rows_per_page;
  o.page_manager = page_manager;
  return o;
}

// Every block table of `seq` (empty where the model lacks the stream).
std::vector<std::vector<int32_t>> Tables(const Cache& cache, SequenceId seq) {
  std::vector<std::vector<int32_t>> out;
  for (int s = 0; s < kNumStreams; ++s) out.push_back(cache.BlockTable(seq, static_cast<Stream>(s)).value_or(std::vector<int32_t>{}));
  return out;
}

// Usage as numbers; reserved bytes (every id ever handed out: a high-water
// mark) are left out where `with_reserved` is false -- the contract is
// "contents, lengths and used bytes" (cache.h).
std::vector<int64_t> UsageNumbers(const CacheUsage& u, bool with_reserved = true) {
  std::vector<int64_t> v;
  for (const ComponentUsage& c : u.components) {
    v.push_back(c.used_bytes);
    v.push_back(with_reserved ? c.reserved_bytes : 0);
    v.push_back(c.pages);
  }
  for (const int64_t x : {u.history_limit_bytes, u.state_limit_bytes, u.sequences, u.open_steps, u.deferred_pages,
                          static_cast<int64_t>(u.epoch), static_cast<int64_t>(u.completed_epoch)}) {
    v.push_back(x);
  }
  return v;
}

// Whether `seq` is in an open step, without changing anything: Truncate
// refuses a sequence in a step before it looks at the length (and refuses a
// length above the current one with kInvalidArgument otherwise).
bool InStep(Cache& cache, SequenceId seq) {
  const int64_t length = cache.Length(seq, 0).value_or(0);
  return cache.Truncate(seq, length + 1).code() == absl::StatusCode::kFailedPrecondition;
}

// What a caller can observe of the cache's bookkeeping: usage, and per
// sequence its tables, lengths, floor and whether it is in a step.
struct Observed {
  std::vector<int64_t> usage;
  std::map<SequenceId, std::tuple<std::vector<std::vector<int32_t>>, std::vector<int64_t>, bool>> seqs;
  bool operator==(const Observed& o) const { return usage == o.usage && seqs == o.seqs; }
};
Observed Observe(Cache& cache, const std::vector<SequenceId>& ids) {
  Observed out;
  out.usage = UsageNumbers(cache.Usage(), /*with_reserved=*/false);
  for (const SequenceId id : ids) {
    std::vector<int64_t> numbers;
    for (int layer = 0; layer < kLayers; ++layer) numbers.push_back(cache.Length(id, layer).value_or(-1));
    numbers.push_back(cache.RollbackFloor(id).value_or(-1));
    out.seqs[id] = {Tables(cache, id), numbers, InStep(cache, id)};
  }
  return out;
}

std::string Describe(const Observed& o) {
  std::string s = "usage";
  for (const int64_t x : o.usage) s += " " + std::to_string(x);
  for (const auto& [id, v] : o.seqs) {
    s += "; seq " + std::to_string(id) + (std::get<2>(v) ? " in step" : "") + " pages";
    for (const auto& t : std::get<0>(v)) s += " " + std::to_string(t.size());
  }
  return s;
}

// What a sequence holds as kvc's views show it (kvc's mode), floor aside.
std::string Held(const Cache& cache, SequenceId seq) {
  std::string bytes = testing::ObservableBytes(cache, seq);
  return bytes.substr(sizeof(int64_t));
}

// Runs `call` with its k-th allocation failing, for k = 0, 1, ... until a run
// in which no allocation failed (that one must succeed). After every run in
// which one failed, the call must have failed (a status or std::bad_alloc)
// and left everything `ids` and Usage show exactly as it was.
template <typename Call>
void EachAllocationFailing(Cache& cache, const std::vector<SequenceId>& ids, const char* what, Call call) {
  const Observed before = Observe(cache, ids);
  for (int64_t k = 0; k < 20000; ++k) {
    absl::Status status;
    bool threw = false;
    t_fault_fired = false;
    t_fail_in = k;
    try {
      status = call();
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    t_fail_in = -1;
    if (!t_fault_fired) {
      ASSERT_FALSE(threw);
      ASSERT_TRUE(status.ok()) << what << ": " << status;
      return;
    }
    if (!threw && status.ok()) return;  // the call absorbed the failure (and did its work)
    const Observed after = Observe(cache, ids);
    ASSERT_TRUE(after == before) << what << ": allocation " << k << " failed ("
                                 << (threw ? "std::bad_alloc escaped" : status.ToString())
                                 << ") and the cache changed:\n before: " << Describe(before)
                                 << "\n after:  " << Describe(after);
  }
  FAIL() << what << ": still failing after 20000 allocations";
}

// --- The all-or-nothing contract under failing allocations ---------------

// Diagnosis (src/cache_step.cc, PlanStep): the "Apply (cannot fail, bar
// memory for the plan's own vectors)" phase runs after store.Allocate has
// granted the pages and allocates at every turn -- std::make_unique<OpenStep>,
// the layers_at_plan copy, table.push_back, replaced/copies/abort_copies
// push_backs, the slots, and open_steps.emplace (the last line). A
// std::bad_alloc there leaks the granted page ids (Usage grows for good),
// leaves tables half applied, and -- once seq.step is set but before
// open_steps.emplace -- wedges the sequences in a step that CommitStep and
// AbortStep cannot find (kNotFound) and Free refuses ("open step") forever.
// Not only injected: on a window-only model with max_context up to 2^40,
// PlanStep({{seq, 2^36}}) passes every check and Allocate, then runs out of
// memory building the 2^36-entry slot lists. The C API's Guarded turns the
// exception into KVC_ERR_RESOURCE_EXHAUSTED, promising the cache is as it was.
TEST(StepAdversarial, APlanThatRunsOutOfMemoryChangesNothing) {
  TinyModel model;
  for (const bool page_manager : {false, true}) {
    SCOPED_TRACE(page_manager ? "page-manager mode" : "kvc's mode");
    std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(page_manager));
    const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
    // a holds 30 tokens (a partial CSA page), and a fork shares it.
    const StepPlan grow = *cache->PlanStep({{a, 30}, {b, 3}});
    if (!page_manager) {
      for (int layer = 0; layer < kLayers; ++layer) {
        ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 0, 30, 1).ok());
        ASSERT_TRUE(model.AppendLayer(*cache, b, layer, 0, 3, 1).ok());
      }
    }
    ASSERT_TRUE(cache->CommitStep(grow.epoch).ok());
    std::vector<PageCopy> copies;
    const SequenceId fork = *cache->Fork(a, page_manager ? &copies : nullptr);
    // A batch with a copy-on-write (a and its fork write into the shared
    // page), a checkpoint (b's 9 tokens > depth 4) and new pages.
    std::optional<absl::StatusOr<StepPlan>> plan;
    EachAllocationFailing(*cache, {a, b, fork}, "PlanStep", [&] {
      plan.emplace(cache->PlanStep({{a, 3}, {fork, 2}, {b, 9}}));
      return plan->status();
    });
    if (plan && plan->ok()) {
      EXPECT_TRUE(cache->AbortStep((*plan)->epoch).ok());
    }
  }
}

#ifndef KVC_TEST_SANITIZER  // sanitizers reserve more address space than any limit set here
// In a child process: a window-only model with max_context 2^40 and a step
// of 2^31 tokens (every check passes: no history pages, a checkpoint of the
// ring), under an address-space limit 1 GiB above what the process uses.
// Exit status: 0 refused with nothing changed, 1 planned (its int32 indptr
// cannot count 2^31 slots), 2 std::bad_alloc escaped, 3 refused but the
// cache changed (pages kept, or the sequence left in a step).
int PlanATooLargeStep() {
  TinyModel model;
  ModelSpec spec = model.spec();
  for (LayerSpec& l : spec.layers) l = LayerSpec{};  // window-only
  spec.max_context = int64_t{1} << 40;
  std::unique_ptr<Cache> cache = *Cache::Create(spec, Options(true));
  const SequenceId a = *cache->CreateSequence();
  const std::vector<int64_t> before = UsageNumbers(cache->Usage());
  FILE* f = std::fopen("/proc/self/statm", "r");
  long pages = 0;
  if (f == nullptr || std::fscanf(f, "%ld", &pages) != 1) return 4;
  std::fclose(f);
  struct rlimit limit;
  ::getrlimit(RLIMIT_AS, &limit);
  limit.rlim_cur = static_cast<rlim_t>(pages * ::sysconf(_SC_PAGESIZE) + (int64_t{1} << 30));
  if (::setrlimit(RLIMIT_AS, &limit) != 0) return 4;
  try {
    const absl::StatusOr<StepPlan> plan = cache->PlanStep({{a, int64_t{1} << 31}});
    if (plan.ok()) return 1;
    std::fprintf(stderr, "refused: %s\n", plan.status().ToString().c_str());
  } catch (const std::bad_alloc&) {
    return 2;
  }
  return UsageNumbers(cache->Usage()) == before && !InStep(*cache, a) ? 0 : 3;
}
#endif

// Diagnosis (src/cache_step.cc, PlanStep, the slots' `out.indptr.push_back(
// static_cast<int32_t>(out.slots.size()))`): nothing bounds a step's slot
// count, so 2^31 tokens on a window-only model (max_context may be 2^40)
// pass every check, get their pages, and then either wrap the int32 indptr
// or -- first, in practice -- exhaust memory building 2^31 slots after the
// pages were granted (see APlanThatRunsOutOfMemoryChangesNothing).
TEST(StepAdversarial, AStepTooLargeForItsSlotListsIsRefused) {
#ifdef KVC_TEST_SANITIZER
  GTEST_SKIP() << "sanitizers reserve more address space than any limit this test can set";
#else
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) ::_exit(PlanATooLargeStep());
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: planned; 2: std::bad_alloc escaped; 3: the cache changed";
#endif
}

// Diagnosis (src/cache_internal.h, Impl::AllocateState, and cache.cc Fork):
// AllocateState grants the pages (store->Allocate) and only then allocates
// seq.layers (`seq.layers.assign(...)`); Fork then copies the parent's
// history tables into the child's (HistoryStream::Fork, `child.tables[s] =
// from`), lists copies into a growing vector (part->Fork -> CopyPage ->
// engine_copies->push_back), and Register emplaces into the sequence map
// (cache_internal.h). A std::bad_alloc after the grant
// destroys the unregistered child without Release: its ring and state page
// ids are never returned (Usage().used_bytes stays up for the cache's
// lifetime). CreateSequence shares the AllocateState half.
TEST(StepAdversarial, AForkOrCreateThatRunsOutOfMemoryChangesNothing) {
  TinyModel model;
  for (const bool page_manager : {false, true}) {
    SCOPED_TRACE(page_manager ? "page-manager mode" : "kvc's mode");
    std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(page_manager));
    const SequenceId a = *cache->CreateSequence();
    const StepPlan grow = *cache->PlanStep({{a, 40}});  // history pages the fork shares
    if (!page_manager) {
      for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 0, 40, 1).ok());
    }
    ASSERT_TRUE(cache->CommitStep(grow.epoch).ok());
    ASSERT_TRUE(cache->CompleteSteps(grow.epoch).ok());
    std::vector<PageCopy> copies;
    EachAllocationFailing(*cache, {a}, "Fork", [&] {
      const absl::StatusOr<SequenceId> child = cache->Fork(a, page_manager ? &copies : nullptr);
      return child.status();
    });
    const std::vector<SequenceId> ids = {a, a + 1};
    EachAllocationFailing(*cache, ids, "CreateSequence", [&] { return cache->CreateSequence().status(); });
  }
}

// kvc's mode, outside any step: an Append (and an AppendRows) that needs a
// new history page, with each of its allocations failing in turn, changes
// nothing -- no bytes, no pages.
TEST(StepAdversarial, AnAppendThatRunsOutOfMemoryChangesNothing) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(false));
  const SequenceId a = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, a, 30, 1).ok());
  const SequenceId fork = *cache->Fork(a);  // the partial CSA page is shared: copied on write
  // Tokens 30..33 of the CSA layer: entry 7 into the shared page, entry 8 a new page.
  const TinyModel::Inputs in = model.InputsFor(1, 30, 6, 1);
  const std::string bytes_before = testing::ObservableBytes(*cache, a);
  EachAllocationFailing(*cache, {a, fork}, "Append", [&] {
    const absl::Status appended = cache->Append(a, 1, 30, in.tokens());
    if (!appended.ok() || t_fault_fired) {
      EXPECT_EQ(testing::ObservableBytes(*cache, a), bytes_before) << "a failed Append wrote bytes";
    }
    return appended;
  });
}

// The calls that end steps and release pages change their state only where
// nothing can fail: with any allocation failing they either finish or
// change nothing.
TEST(StepAdversarial, CommitAbortCompleteFreeAndTruncateSurviveFailingAllocations) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true));
  const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
  const StepPlan first = *cache->PlanStep({{a, 40}, {b, 3}});
  EachAllocationFailing(*cache, {a, b}, "CommitStep", [&] { return cache->CommitStep(first.epoch); });
  const StepPlan second = *cache->PlanStep({{a, 9}, {b, 2}});
  EachAllocationFailing(*cache, {a, b}, "AbortStep", [&] { return cache->AbortStep(second.epoch); });
  EachAllocationFailing(*cache, {a, b}, "Truncate", [&] { return cache->Truncate(a, 38); });
  EachAllocationFailing(*cache, {a}, "Free", [&] { return cache->Free(b); });
  EachAllocationFailing(*cache, {a}, "CompleteSteps", [&] { return cache->CompleteSteps(second.epoch).status(); });
  EXPECT_EQ(cache->Usage().deferred_pages, 0);
}

// --- Page-manager mode never touches a page byte ---------------------------

// Engine arrays kvc may not touch: every public (layer, stream) array mapped
// PROT_NONE, so that any read or write of a page byte kills the test.
struct UntouchableMemory {
  std::vector<std::pair<void*, size_t>> maps;
  std::vector<EngineArray> arrays;
  UntouchableMemory(const ModelSpec& spec, const CacheOptions& options, int64_t pages) {
    const std::vector<StreamGeometry> geometry = Cache::PageGeometry(spec, options).value();
    for (const StreamGeometry& g : geometry) {
      for (const int32_t layer : g.layers) {
        const size_t bytes = static_cast<size_t>(pages * g.page_bytes);
        void* p = ::mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) std::abort();
        maps.emplace_back(p, bytes);
        arrays.push_back({layer, g.stream, absl::Span<uint8_t>(static_cast<uint8_t*>(p), bytes)});
      }
    }
  }
  ~UntouchableMemory() {
    for (const auto& [p, n] : maps) ::munmap(p, n);
  }
};

// Everything an engine does in page-manager mode, over memory that faults
// on any access: create, prefill chunks (checkpointed), decode, verify,
// copy-on-write of a fork's shared pages, truncation, aborts of both kinds,
// frees under running steps, completion, every table and usage query, and
// every call that would touch bytes (refused, not faulting).
void RunEngineLoopWithoutTouching(const TinyModel& model, CacheOptions options, bool with_arrays) {
  UntouchableMemory memory(model.spec(), options, 256);
  if (with_arrays) options.engine_arrays = memory.arrays;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), options);
  const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
  StepPlan plan = *cache->PlanStep({{a, 130}, {b, 7}});
  ASSERT_TRUE(cache->CommitStep(plan.epoch).ok());
  std::vector<PageCopy> copies;
  const SequenceId fork = *cache->Fork(a, &copies);
  EXPECT_FALSE(copies.empty());
  plan = *cache->PlanStep({{a, 4}, {fork, 3}, {b, 1}});
  ASSERT_TRUE(cache->CommitStep(plan.epoch).ok());
  ASSERT_TRUE(cache->Truncate(a, *cache->RollbackFloor(a)).ok());
  plan = *cache->PlanStep({{a, 2}, {b, 30}});
  ASSERT_TRUE(cache->AbortStep(plan.epoch).ok());
  plan = *cache->PlanStep({{fork, 1}});
  ASSERT_TRUE(cache->Free(b).ok());
  ASSERT_TRUE(cache->CommitStep(plan.epoch).ok());
  EXPECT_TRUE(cache->CompleteSteps(plan.epoch).ok());
  int answered = 0;  // queries answered (others: a stream the layer or model lacks, CSR of a ring)
  for (const SequenceId s : {a, fork}) {
    for (int st = 0; st < kNumStreams; ++st) {
      const Stream stream = static_cast<Stream>(st);
      answered += cache->BlockTable(s, stream).ok();
      answered += cache->BatchBlockTables({s}, stream).ok();
      answered += cache->BatchBlockTablesCsr({s}, stream).ok();
      for (int layer = 0; layer < kLayers; ++layer) {
        answered += cache->StreamRows(s, layer, stream).ok();
        answered += cache->LayerPages(layer, stream).ok();
      }
    }
    EXPECT_TRUE(cache->Usage(s).ok());
  }
  // Per sequence: 7 block tables, 7 dense, 3 CSR (history streams), and
  // 1 + 5 + 3 streams over the three layers, twice (rows and arrays).
  EXPECT_EQ(answered, 2 * (7 + 7 + 3 + 2 * 9));
  // Selection for several positions: indices only on window and HCA layers
  // (no byte read), inside an open step too; CSA layers refused.
  {
    const int64_t length = *cache->Length(a, 0);
    for (const int layer : {0, 2}) {
      const absl::StatusOr<PositionSets> sets = cache->SelectAttentionSets(a, layer, length - 3, 3);
      ASSERT_TRUE(sets.ok()) << sets.status();
      EXPECT_EQ(sets->count(), 3);
    }
    const StepPlan open = *cache->PlanStep({{a, 4}});
    EXPECT_TRUE(cache->SelectAttentionSets(a, 2, length, 4).ok());
    EXPECT_EQ(cache->SelectAttentionSets(a, 1, length, 4, {nullptr, nullptr, nullptr, nullptr}).status().code(),
              absl::StatusCode::kFailedPrecondition);
    ASSERT_TRUE(cache->AbortStep(open.epoch).ok());
  }
  // Calls that would touch bytes, with real inputs: refused before reading any.
  const TinyModel::Inputs in = model.InputsFor(1, *cache->Length(a, 1), 2, 1);
  std::vector<Bf16> window(16 * kHeadDim);
  std::vector<uint8_t> row_bytes(2 * 584);
  std::vector<Bf16> entries(kHeadDim), keys(kIndexDim);
  for (const absl::Status& s :
       {cache->Append(a, 1, *cache->Length(a, 1), in.tokens()), cache->ReadWindow(a, 0, absl::MakeSpan(window)),
        cache->Window(a, 0).status(), cache->CompressedRows(a, 1).status(), cache->IndexKeys(a, 1).status(),
        cache->AppendRows(a, 1, Stream::kCsaRows, *cache->StreamRows(a, 1, Stream::kCsaRows), row_bytes),
        cache->AppendCompressedRows(a, 2, 0, entries), cache->AppendIndexKeys(a, 1, 0, keys),
        cache->SelectAttentionSet(a, 0, nullptr).status(), cache->SelectAttentionSet(a, 2, nullptr).status(),
        SaveSnapshot(*cache, {a}, ::testing::TempDir() + "kvc_adv_untouched.kvcsnap").status(),
        RestoreSnapshot(*cache, ::testing::TempDir() + "kvc_adv_untouched.kvcsnap").status()}) {
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  }
  ASSERT_TRUE(cache->Free(fork).ok());
  ASSERT_TRUE(cache->Free(a).ok());
  cache.reset();  // the destructor too
}

TEST(StepAdversarial, PageManagerModeNeverTouchesEngineMemory) {
  TinyModel model;
  RunEngineLoopWithoutTouching(model, Options(true), /*with_arrays=*/true);
  RunEngineLoopWithoutTouching(model, Options(true, /*depth=*/0, /*draft_slots=*/0), true);
  RunEngineLoopWithoutTouching(model, Options(true, 16, 16, 64), true);
  RunEngineLoopWithoutTouching(model, Options(true), /*with_arrays=*/false);
}

// --- Accounting --------------------------------------------------------------

TEST(StepAdversarial, RefusedPlansChangeNothing) {
  TinyModel model;
  for (const bool page_manager : {false, true}) {
    SCOPED_TRACE(page_manager ? "page-manager mode" : "kvc's mode");
    std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(page_manager));
    const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence(), c = *cache->CreateSequence();
    const StepPlan open = *cache->PlanStep({{c, 2}});
    const std::vector<SequenceId> ids = {a, b, c};
    const Observed before = Observe(*cache, ids);
    const int64_t max = model.spec().max_context;
    for (const std::vector<StepRequest>& batch : std::vector<std::vector<StepRequest>>{
             {{a, 0}},
             {{a, -1}},
             {{a, 1}, {b, INT64_MIN}},
             {{a, INT64_MAX}},
             {{a, 1}, {b, max + 1}},
             {{a, 1}, {a, 2}},
             {{a, 1}, {b, 1}, {a, 1}},
             {{a, 1}, {999, 1}},
             {{a, 1}, {-1, 1}},
             {{a, 1}, {c, 1}},  // c is in a step
         }) {
      const absl::StatusOr<StepPlan> refused = cache->PlanStep(batch);
      EXPECT_FALSE(refused.ok());
      EXPECT_TRUE(Observe(*cache, ids) == before) << refused.status() << "\n" << Describe(Observe(*cache, ids));
    }
    EXPECT_TRUE(cache->AbortStep(open.epoch).ok());
  }
}

// The history budget exactly filled: a plan needing every byte fits, one a
// byte short is refused naming the stream and changes nothing.
TEST(StepAdversarial, APlanFillingTheBudgetExactlyFitsAndOneByteLessDoesNot) {
  TinyModel model;
  for (const bool page_manager : {false, true}) {
    SCOPED_TRACE(page_manager ? "page-manager mode" : "kvc's mode");
    const std::vector<StreamGeometry> g = *Cache::PageGeometry(model.spec(), Options(page_manager));
    // 64 tokens: 16 CSA rows and 16 keys (2 pages each at 8 per page), no HCA row.
    const int64_t exact = 2 * (g[1].page_bytes + g[2].page_bytes);
    for (const int64_t budget : {exact - 1, exact}) {
      CacheOptions o = Options(page_manager);
      o.history_bytes = budget;
      std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), o);
      const SequenceId a = *cache->CreateSequence();
      const Observed before = Observe(*cache, {a});
      const absl::StatusOr<StepPlan> plan = cache->PlanStep({{a, 64}});
      if (budget < exact) {
        EXPECT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted);
        EXPECT_THAT(std::string(plan.status().message()), HasSubstr("CSA"));
        EXPECT_TRUE(Observe(*cache, {a}) == before);
        continue;
      }
      ASSERT_TRUE(plan.ok()) << plan.status();
      const CacheUsage full = cache->Usage();
      EXPECT_EQ(full.components[1].used_bytes + full.components[2].used_bytes, exact);
      // Full: one more CSA row (4 tokens) is refused; the step is unharmed.
      const SequenceId b = *cache->CreateSequence();
      EXPECT_EQ(cache->PlanStep({{b, 4}}).status().code(), absl::StatusCode::kResourceExhausted);
      EXPECT_TRUE(cache->PlanStep({{b, 3}}).ok());  // closes no entry: needs no history page
    }
  }
}

// Page-manager mode over engine arrays of 8 pages each: a plan filling the
// CSA arrays exactly fits (with the checkpoint of its ring in the window
// array), one more row is refused naming the stream though the byte budget
// is unlimited, and nothing changes.
TEST(StepAdversarial, EngineArraysBoundThePlanLikeTheBudget) {
  TinyModel model;
  CacheOptions o = Options(true);
  o.history_bytes = INT64_MAX;
  o.state_bytes = INT64_MAX;
  UntouchableMemory memory(model.spec(), o, 8);
  o.engine_arrays = memory.arrays;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), o);
  const SequenceId a = *cache->CreateSequence();
  const StepPlan fill = *cache->PlanStep({{a, 256}});  // 64 CSA rows and keys: 8 pages each
  ASSERT_TRUE(cache->CommitStep(fill.epoch).ok());
  ASSERT_TRUE(cache->CompleteSteps(fill.epoch).ok());
  EXPECT_EQ(cache->BlockTable(a, Stream::kCsaRows)->size(), 8u);
  const Observed before = Observe(*cache, {a});
  const absl::StatusOr<StepPlan> refused = cache->PlanStep({{a, 4}});  // CSA row 64: a ninth page
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("CSA"));
  EXPECT_TRUE(Observe(*cache, {a}) == before);
  const StepPlan fits = *cache->PlanStep({{a, 3}});  // 259 tokens close no row
  ASSERT_TRUE(cache->CommitStep(fits.epoch).ok());
  // Rings of 3 window pages: a's, a second one; a third does not fit in 8
  // (the checkpoint's copies went with the commit).
  EXPECT_TRUE(cache->CreateSequence().ok());
  EXPECT_EQ(cache->CreateSequence().status().code(), absl::StatusCode::kResourceExhausted);
}

// kvc's mode with an engine that compresses its HCA layer itself: the rows
// it appends inside a step (AppendLayer -> AppendCompressedRows) use the
// planned pages -- a private copy of the page shared with a fork, no new
// allocation -- and an abort gives the shared page back.
TEST(StepAdversarial, EngineCompressedRowsInsideAStepUseThePlannedPages) {
  TinyModel model(/*hca_by_kvc=*/false);
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(false));
  const SequenceId a = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, a, 250, 1).ok());  // HCA row 0: a partial page
  const SequenceId fork = *cache->Fork(a);
  const std::string a_before = Held(*cache, a), fork_before = Held(*cache, fork);
  const auto a_tables = Tables(*cache, a);
  const int64_t used = cache->Usage().used_bytes();
  const StepPlan plan = *cache->PlanStep({{a, 10}, {fork, 10}});  // closes HCA row 1 into the shared page
  const int64_t planned = cache->Usage().used_bytes();
  EXPECT_GT(planned, used);
  for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 250, 10, 1).ok());
  EXPECT_EQ(cache->Usage().used_bytes(), planned) << "appends inside a step allocate nothing";
  EXPECT_EQ(*cache->StreamRows(a, 2, Stream::kHcaRows), 2);
  ASSERT_TRUE(cache->AbortStep(plan.epoch).ok());
  EXPECT_EQ(cache->Usage().used_bytes(), used);
  EXPECT_EQ(Tables(*cache, a), a_tables);
  EXPECT_EQ(Held(*cache, a), a_before);
  const StepPlan again = *cache->PlanStep({{a, 10}});
  for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 250, 10, 1).ok());
  ASSERT_TRUE(cache->CommitStep(again.epoch).ok());
  const SequenceId reference = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, reference, 260, 1).ok());
  EXPECT_EQ(Held(*cache, a), Held(*cache, reference));
  EXPECT_EQ(Held(*cache, fork), fork_before);
}

// Page-manager mode: a page freed under a running step stays counted against
// the budget until CompleteSteps, and its id is not handed out meanwhile.
TEST(StepAdversarial, DeferredPagesHoldTheirBudgetUntilTheDeviceIsDone) {
  TinyModel model;
  const std::vector<StreamGeometry> g = *Cache::PageGeometry(model.spec(), Options(true));
  CacheOptions o = Options(true);
  o.history_bytes = 2 * (g[1].page_bytes + g[2].page_bytes);
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), o);
  const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
  const StepPlan first = *cache->PlanStep({{a, 64}});
  ASSERT_TRUE(cache->CommitStep(first.epoch).ok());
  int64_t a_ids = 0;
  for (const auto& t : Tables(*cache, a)) a_ids += static_cast<int64_t>(t.size());
  ASSERT_TRUE(cache->Free(a).ok());  // step `first` may still run on the device
  EXPECT_GT(cache->Usage().deferred_pages, 0);
  const Observed before = Observe(*cache, {b});
  EXPECT_EQ(cache->PlanStep({{b, 4}}).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(Observe(*cache, {b}) == before);
  // Completing an earlier epoch (0: none) releases nothing.
  EXPECT_EQ(*cache->CompleteSteps(0), 0);
  EXPECT_EQ(cache->PlanStep({{b, 4}}).status().code(), absl::StatusCode::kResourceExhausted);
  // Every id a held, and the checkpoint pages of `first` (64 tokens > depth:
  // its ring and state pages), dropped at its commit while it may still run.
  EXPECT_EQ(*cache->CompleteSteps(first.epoch), a_ids + static_cast<int64_t>(first.copies.size()));
  const StepPlan second = *cache->PlanStep({{b, 64}});
  ASSERT_TRUE(cache->CommitStep(second.epoch).ok());
}

TEST(StepAdversarial, CompleteStepsAcceptsAnyPlannedEpochInAnyOrder) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true));
  EXPECT_EQ(*cache->CompleteSteps(0), 0);  // nothing planned yet: epoch 0 is "none"
  EXPECT_EQ(cache->CompleteSteps(1).status().code(), absl::StatusCode::kInvalidArgument);
  const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
  const StepPlan one = *cache->PlanStep({{a, 9}});
  const StepPlan two = *cache->PlanStep({{b, 9}});
  ASSERT_TRUE(cache->CommitStep(one.epoch).ok());
  ASSERT_TRUE(cache->Free(a).ok());  // freed while steps up to `two` may run: waits for two
  const CacheUsage held = cache->Usage();
  for (const uint64_t huge : {two.epoch + 1, uint64_t{1} << 63, UINT64_MAX}) {
    EXPECT_EQ(cache->CompleteSteps(huge).status().code(), absl::StatusCode::kInvalidArgument) << huge;
    EXPECT_EQ(UsageNumbers(cache->Usage()), UsageNumbers(held));
  }
  EXPECT_EQ(*cache->CompleteSteps(one.epoch), 0) << "a's pages were freed while step two may run";
  EXPECT_EQ(cache->Usage().completed_epoch, one.epoch);
  EXPECT_GT(*cache->CompleteSteps(two.epoch), 0);
  EXPECT_EQ(*cache->CompleteSteps(one.epoch), 0);  // out of order: the completed epoch does not go back
  EXPECT_EQ(cache->Usage().completed_epoch, two.epoch);
  EXPECT_EQ(cache->Usage().deferred_pages, 0);
  ASSERT_TRUE(cache->AbortStep(two.epoch).ok());  // completed before it ended: its frees are immediate
  EXPECT_EQ(cache->Usage().deferred_pages, 0);
}

// A random engine in page-manager mode: an id that was freed while a step
// may still run is never handed out (in a block table or as a copy's
// destination) before CompleteSteps covers the step it was freed under.
TEST(StepAdversarial, FreedIdsAreNotHandedOutWhileAStepMayRun) {
  TinyModel model;
  for (const uint64_t seed : {1u, 2u, 3u, 4u}) {
    SCOPED_TRACE(seed);
    std::mt19937_64 rng(seed);
    std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true, 2, 3, 4));
    using Id = std::pair<int, int32_t>;
    std::vector<SequenceId> live;
    std::vector<StepPlan> open;
    std::set<Id> known;           // ids the engine knows of and kvc holds
    std::map<Id, uint64_t> waiting;  // freed under a running step: id -> epoch it waits for
    auto check = [&](const std::vector<PageCopy>& copies) {
      std::set<Id> now, held;
      for (const SequenceId s : live) {
        const auto t = Tables(*cache, s);
        for (int st = 0; st < kNumStreams; ++st) {
          for (const int32_t id : t[static_cast<size_t>(st)]) now.insert({st, id});
        }
      }
      for (const StepPlan& p : open) {
        for (const PageCopy& c : p.copies) {
          held.insert({static_cast<int>(c.stream), c.src});
          held.insert({static_cast<int>(c.stream), c.dst});
        }
      }
      std::set<Id> appear = now;
      for (const PageCopy& c : copies) appear.insert({static_cast<int>(c.stream), c.dst});
      for (const Id& id : appear) {
        if (known.count(id)) continue;
        EXPECT_EQ(waiting.count(id), 0u) << "stream " << id.first << " id " << id.second
                                         << " handed out before the step it was freed under completed";
        known.insert(id);
      }
      const CacheUsage u = cache->Usage();
      for (auto it = known.begin(); it != known.end();) {
        if (now.count(*it) || held.count(*it)) {
          ++it;
          continue;
        }
        if (u.epoch > u.completed_epoch) waiting[*it] = u.epoch;
        it = known.erase(it);
      }
    };
    for (int op = 0; op < 400; ++op) {
      const int what = static_cast<int>(rng() % 10);
      std::vector<PageCopy> copies;
      if (live.size() < 2 || what == 0) {
        live.push_back(*cache->CreateSequence());
      } else if (what == 1 && live.size() < 6) {
        const absl::StatusOr<SequenceId> child = cache->Fork(live[rng() % live.size()], &copies);
        if (child.ok()) live.push_back(*child);
      } else if (what <= 4) {
        std::vector<StepRequest> batch;
        for (const SequenceId s : live) {
          if (rng() % 2 && !InStep(*cache, s)) batch.push_back({s, static_cast<int64_t>(1 + rng() % 9)});
        }
        const absl::StatusOr<StepPlan> plan = cache->PlanStep(batch);
        if (plan.ok()) {
          open.push_back(*plan);
          copies = plan->copies;
        }
      } else if (what <= 6 && !open.empty()) {
        const size_t k = rng() % open.size();
        const uint64_t epoch = open[k].epoch;
        open.erase(open.begin() + static_cast<std::ptrdiff_t>(k));
        ASSERT_TRUE((rng() % 3 ? cache->CommitStep(epoch) : cache->AbortStep(epoch)).ok());
      } else if (what == 7) {
        const SequenceId s = live[rng() % live.size()];
        const int64_t floor = *cache->RollbackFloor(s), length = *cache->Length(s, 0);
        const absl::Status cut =
            cache->Truncate(s, floor + static_cast<int64_t>(rng() % static_cast<uint64_t>(length - floor + 1)));
        EXPECT_TRUE(cut.ok() || cut.code() == absl::StatusCode::kFailedPrecondition) << cut;  // in a step
      } else if (what == 8) {
        const size_t k = rng() % live.size();
        if (cache->Free(live[k]).ok()) live.erase(live.begin() + static_cast<std::ptrdiff_t>(k));
      } else {
        const uint64_t epoch = rng() % (cache->Usage().epoch + 1);
        ASSERT_TRUE(cache->CompleteSteps(epoch).ok());
        const uint64_t completed = cache->Usage().completed_epoch;
        for (auto it = waiting.begin(); it != waiting.end();) it = it->second <= completed ? waiting.erase(it) : std::next(it);
      }
      check(copies);
      if (HasFailure()) return;
    }
  }
}

// --- Aborts at every boundary -------------------------------------------------

// kvc's mode: a step aborted after partial writes -- at the rollback depth,
// one past it (checkpointed), across a CSA page boundary, across an HCA
// window, on a fork sharing the partial pages, at depth 0 -- leaves every
// byte, table and counter as planned; the same tokens re-planned then give a
// sequence equal to one that never saw the aborted step.
TEST(StepAdversarial, AbortAfterPartialWritesThenReplanTheSameTokens) {
  TinyModel model;
  struct Case {
    int32_t depth;
    int64_t start, n;
  };
  for (const Case c : {Case{4, 37, 4}, Case{4, 37, 5}, Case{4, 30, 3}, Case{4, 35, 2}, Case{4, 126, 4},
                       Case{4, 120, 40}, Case{0, 37, 1}, Case{0, 30, 6}, Case{1, 31, 1}, Case{1, 31, 2}}) {
    SCOPED_TRACE(::testing::Message() << "depth " << c.depth << " start " << c.start << " n " << c.n);
    std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(false, c.depth, c.depth));
    const SequenceId a = *cache->CreateSequence();
    ASSERT_TRUE(model.Grow(*cache, a, c.start, 1).ok());
    const SequenceId fork = *cache->Fork(a);
    const std::string a_before = Held(*cache, a), fork_before = Held(*cache, fork);
    const auto a_tables = Tables(*cache, a), fork_tables = Tables(*cache, fork);
    const int64_t floor = *cache->RollbackFloor(a);
    const CacheUsage usage = cache->Usage();
    const StepPlan plan = *cache->PlanStep({{a, c.n}, {fork, c.n}});
    for (int layer = 0; layer < kLayers; ++layer) {
      ASSERT_TRUE(model.AppendLayer(*cache, a, layer, c.start, c.n, 9).ok());
      if (layer != 1) {
        ASSERT_TRUE(model.AppendLayer(*cache, fork, layer, c.start, c.n - 1, 8).ok());
      }
    }
    ASSERT_TRUE(cache->AbortStep(plan.epoch).ok());
    for (int comp = 0; comp < kNumComponents; ++comp) {
      EXPECT_EQ(cache->Usage().components[comp].used_bytes, usage.components[comp].used_bytes) << comp;
    }
    EXPECT_EQ(Held(*cache, a), a_before);
    EXPECT_EQ(Held(*cache, fork), fork_before);
    EXPECT_EQ(Tables(*cache, a), a_tables) << "the shared pages come back";
    EXPECT_EQ(Tables(*cache, fork), fork_tables);
    const int64_t floor_now = *cache->RollbackFloor(a);
    EXPECT_EQ(floor_now, c.n > c.depth ? floor : std::max(floor, c.start + c.n - c.depth));
    // The same tokens again, committed: a equals a sequence grown straight there.
    const StepPlan again = *cache->PlanStep({{a, c.n}});
    for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(model.AppendLayer(*cache, a, layer, c.start, c.n, 1).ok());
    ASSERT_TRUE(cache->CommitStep(again.epoch).ok());
    const SequenceId reference = *cache->CreateSequence();
    ASSERT_TRUE(model.Grow(*cache, reference, c.start + c.n, 1).ok());
    EXPECT_EQ(Held(*cache, a), Held(*cache, reference));
    ASSERT_TRUE(model.Grow(*cache, a, c.start + c.n + 140, 1).ok());
    ASSERT_TRUE(model.Grow(*cache, reference, c.start + c.n + 140, 1).ok());
    EXPECT_EQ(Held(*cache, a), Held(*cache, reference));
    EXPECT_EQ(Held(*cache, fork), fork_before) << "the fork never saw a's tokens";
  }
}

// Page-manager mode: the same aborts give back the planned tables exactly,
// and once the device is done, exactly the planned usage; abort copies exist
// exactly for steps longer than the rollback depth.
TEST(StepAdversarial, PageManagerAbortsGiveBackTablesAndUsage) {
  TinyModel model;
  for (const int32_t depth : {0, 1, 4}) {
    for (const int64_t n : {1, 2, 4, 5, 9, 40}) {
      SCOPED_TRACE(::testing::Message() << "depth " << depth << " n " << n);
      std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true, depth, depth));
      const SequenceId a = *cache->CreateSequence();
      const StepPlan grow = *cache->PlanStep({{a, 30}});
      ASSERT_TRUE(cache->CommitStep(grow.epoch).ok());
      std::vector<PageCopy> copies;
      const SequenceId fork = *cache->Fork(a, &copies);
      ASSERT_TRUE(cache->CompleteSteps(grow.epoch).ok());
      const Observed before = Observe(*cache, {a, fork});
      const int64_t floor = *cache->RollbackFloor(a);
      const StepPlan plan = *cache->PlanStep({{a, n}, {fork, n}});
      EXPECT_EQ(plan.abort_copies.empty(), n <= depth);
      bool cow = false;
      for (const PageCopy& c : plan.copies) cow |= c.stream == Stream::kCsaRows;
      EXPECT_EQ(cow, n >= 2) << "30 -> 32 closes CSA entry 7 into the shared partial page";
      ASSERT_TRUE(cache->AbortStep(plan.epoch).ok());
      ASSERT_TRUE(cache->CompleteSteps(plan.epoch).ok());
      Observed after = Observe(*cache, {a, fork});
      EXPECT_EQ(*cache->RollbackFloor(a), n > depth ? floor : std::max(floor, 30 + n - depth));
      // The epochs moved on, ids were created (reserved bytes: every id ever
      // handed out), and the floor is checked above; the rest is as before.
      ASSERT_EQ(before.usage.size(), after.usage.size());
      for (const size_t i : {size_t{1}, size_t{4}, size_t{7}, size_t{10}, after.usage.size() - 1, after.usage.size() - 2}) {
        after.usage[i] = before.usage[i];
      }
      std::get<1>(after.seqs[a]).back() = std::get<1>(before.seqs.at(a)).back();
      std::get<1>(after.seqs[fork]).back() = std::get<1>(before.seqs.at(fork)).back();
      EXPECT_TRUE(after == before) << "\n before: " << Describe(before) << "\n after:  " << Describe(after);
    }
  }
}

// --- Limits ----------------------------------------------------------------

TEST(StepAdversarial, MaxContextEdges) {
  TinyModel model;
  ModelSpec spec = model.spec();
  spec.max_context = 64;
  for (const bool page_manager : {false, true}) {
    SCOPED_TRACE(page_manager ? "page-manager mode" : "kvc's mode");
    std::unique_ptr<Cache> cache = *Cache::Create(spec, Options(page_manager));
    const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
    EXPECT_EQ(cache->PlanStep({{b, 65}}).status().code(), absl::StatusCode::kOutOfRange);
    const StepPlan full = *cache->PlanStep({{a, 64}});  // exactly max_context
    if (!page_manager) {
      for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 0, 64, 1).ok());
    }
    ASSERT_TRUE(cache->CommitStep(full.epoch).ok());
    EXPECT_EQ(*cache->Length(a, 2), 64);
    const Observed before = Observe(*cache, {a, b});
    EXPECT_EQ(cache->PlanStep({{b, 1}, {a, 1}}).status().code(), absl::StatusCode::kOutOfRange);
    EXPECT_TRUE(Observe(*cache, {a, b}) == before);
    // Rolled back, it may step to the edge again.
    ASSERT_TRUE(cache->Truncate(a, 62).ok());
    EXPECT_EQ(cache->PlanStep({{a, 3}}).status().code(), absl::StatusCode::kOutOfRange);
    EXPECT_TRUE(cache->PlanStep({{a, 2}}).ok());
  }
}

TEST(StepAdversarial, DraftSlotsAndRollbackDepthRules) {
  TinyModel model;
  auto created = [&](bool pm, int32_t depth, int32_t draft) {
    const absl::Status a = Cache::Create(model.spec(), Options(pm, depth, draft)).status();
    const absl::Status b = Cache::PageGeometry(model.spec(), Options(pm, depth, draft)).status();
    EXPECT_EQ(a.code(), b.code()) << "PageGeometry and Create agree";
    return a.code();
  };
  EXPECT_EQ(created(true, 4, 3), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(created(true, 4, 4), absl::StatusCode::kOk);
  EXPECT_EQ(created(true, 0, 0), absl::StatusCode::kOk);
  EXPECT_EQ(created(true, 16, kMaxDraftSlots), absl::StatusCode::kOk);
  EXPECT_EQ(created(true, 16, kMaxDraftSlots + 1), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(created(false, 16, 0), absl::StatusCode::kOk);
  EXPECT_EQ(created(false, 17, 17), absl::StatusCode::kInvalidArgument);  // depth beyond the window (16)
  EXPECT_EQ(created(true, -1, 0), absl::StatusCode::kInvalidArgument);
  // Page-manager mode at depth 0 rolls nothing back: every step is checkpointed.
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true, 0, 0));
  const SequenceId a = *cache->CreateSequence();
  const StepPlan one = *cache->PlanStep({{a, 1}});
  EXPECT_FALSE(one.abort_copies.empty());
  ASSERT_TRUE(cache->CommitStep(one.epoch).ok());
  EXPECT_EQ(*cache->RollbackFloor(a), 1);
  EXPECT_EQ(cache->Truncate(a, 0).code(), absl::StatusCode::kFailedPrecondition);
}

// --- Mid-step views ---------------------------------------------------------

// Diagnosis (src/cache.cc, BatchBlockTablesCsr's last_page_len line, fed by
// Impl::TableOf in src/cache_internal.h): mid-step the block table already
// covers the planned rows (PlanStep pushes the new pages), but TableOf's
// `rows` is still the committed count (StreamRowsOf reads LayerStreams,
// advanced only by Append or CommitStep). The CSR then lists every planned
// page with last_page_len = clamp(rows - (pages - 1) x B, 0, B) -- 0 when
// the step adds a page -- so FlashInfer's (pages - 1) x B + last_page_len is
// neither the committed nor the planned row count, and a middle page that
// holds no row is counted full. Here: 8 rows committed (one full page), a
// step to 18 rows: 3 pages, last_page_len 0, FlashInfer reads 16 rows.
// Fixed: a mid-step history table describes the planned rows (what the
// step's attention reads once the rows are written), Impl::TableOf.
TEST(StepAdversarial, CsrBlockTablesMidStepDescribeOneRowCount) {
  TinyModel model;
  for (const bool page_manager : {true, false}) {
    SCOPED_TRACE(page_manager ? "page-manager mode" : "kvc's mode");
    std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(page_manager));
    const SequenceId a = *cache->CreateSequence();
    const StepPlan grow = *cache->PlanStep({{a, 32}});
    if (!page_manager) {
      for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 0, 32, 1).ok());
    }
    ASSERT_TRUE(cache->CommitStep(grow.epoch).ok());
    const StepPlan step = *cache->PlanStep({{a, 40}});  // CSA rows 8 -> 18
    for (const Stream stream : {Stream::kCsaRows, Stream::kCsaKeys}) {
      const CsrBlockTables csr = *cache->BatchBlockTablesCsr({a}, stream);
      const int64_t pages = csr.indptr[1] - csr.indptr[0];
      const int64_t rows = (pages - 1) * 8 + csr.last_page_len[0];
      EXPECT_GE(csr.last_page_len[0], 1) << StreamName(stream) << ": a listed last page holds no row";
      EXPECT_EQ(rows, 18) << StreamName(stream) << ": " << pages << " pages, last_page_len "
                                           << csr.last_page_len[0] << " describe " << rows << " rows";
    }
    ASSERT_TRUE(cache->AbortStep(step.epoch).ok());
  }
}

// Diagnosis (src/cache_internal.h, Impl::StreamRowsOf, the kWindow line
// `min(length, ring_slots())`): in page-manager mode a truncation leaves the
// rows the engine wrote past the new length in their slots (no rollback
// records put the evicted ones back: LayerStreams::ring_end), so the ring
// holds the positions [ring_end - ring_slots, length), fewer than
// min(length, ring_slots). StreamRows(kWindow) -- "the ring's valid slots"
// -- and the dense tables' rows for kWindow still count the slots whose
// positions were overwritten; an engine reading that many positions back
// from the last one reads the truncated drafts' rows as older positions.
// Here (window 16 + 4 draft slots, 40 tokens, truncated to 36): slots of
// positions 16..19 hold 36..39, so 16 positions are held, not 20.
TEST(StepAdversarial, PageManagerStreamRowsCountOnlyRingRowsStillHeld) {
  TinyModel model;
  for (const bool page_manager : {true, false}) {
    SCOPED_TRACE(page_manager ? "page-manager mode" : "kvc's mode");
    std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(page_manager));
    const SequenceId a = *cache->CreateSequence();
    auto step = [&](int64_t n) {
      const StepPlan plan = *cache->PlanStep({{a, n}});
      if (!page_manager) {
        for (int layer = 0; layer < kLayers; ++layer) {
          ASSERT_TRUE(model.AppendLayer(*cache, a, layer, plan.first_position[0], n, 1).ok());
        }
      }
      ASSERT_TRUE(cache->CommitStep(plan.epoch).ok());
    };
    step(40);
    EXPECT_EQ(*cache->StreamRows(a, 0, Stream::kWindow), 20);
    ASSERT_TRUE(cache->Truncate(a, 36).ok());
    // kvc's mode: the rollback records put positions 16..19 back.
    const int64_t held = page_manager ? 16 : 20;
    EXPECT_EQ(*cache->StreamRows(a, 0, Stream::kWindow), held);
    EXPECT_EQ(cache->BatchBlockTables({a}, Stream::kWindow)->rows[0], held);
    step(2);  // 38 tokens; the ring was written up to 40
    EXPECT_EQ(*cache->StreamRows(a, 0, Stream::kWindow), page_manager ? 18 : 20);
    step(2);
    EXPECT_EQ(*cache->StreamRows(a, 0, Stream::kWindow), 20);
  }
}

// Diagnosis (src/cache_step.cc, AbortStep, `if (impl.page_manager()) { ...
// ls.ring_end = std::max(ls.ring_end, step.start + step.new_tokens) }`): the
// abort of a checkpointed step (longer than rollback_depth) moves ring_end
// past the planned length as if the engine's rows stayed in the ring -- but
// the engine made plan.abort_copies (or wrote nothing), so the ring is the
// checkpoint: as planned. kvc then believes the positions before the step
// were overwritten: StreamRows(kWindow) (and SelectAttentionSets' window
// indices, which follow ring_end) report no window at all until the
// sequence grows past the aborted step's end -- after an aborted prefill
// chunk, the next decode step would attend to no window row.
TEST(StepAdversarial, PageManagerCheckpointedAbortKeepsTheRing) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true));
  const SequenceId a = *cache->CreateSequence();
  const StepPlan grow = *cache->PlanStep({{a, 40}});
  ASSERT_TRUE(cache->CommitStep(grow.epoch).ok());
  ASSERT_EQ(*cache->StreamRows(a, 0, Stream::kWindow), 20);
  const StepPlan chunk = *cache->PlanStep({{a, 30}});  // > depth 4: checkpointed
  ASSERT_FALSE(chunk.abort_copies.empty());
  ASSERT_TRUE(cache->AbortStep(chunk.epoch).ok());  // after the engine made chunk.abort_copies
  EXPECT_EQ(*cache->StreamRows(a, 0, Stream::kWindow), 20) << "the checkpoint put positions 20..39 back";
  // The next query (position 39) attends to its whole window: positions 24..39.
  const PositionSets sets = *cache->SelectAttentionSets(a, 0, 39, 1);
  ASSERT_EQ(sets.window_indices.size(), 16u);
  EXPECT_EQ(std::count(sets.window_indices.begin(), sets.window_indices.end(), -1), 0)
      << "window rows restored by the abort copies reported missing";
  // Without a checkpoint the engine's rows stay: 3 drafts over positions 20..22.
  const StepPlan drafts = *cache->PlanStep({{a, 3}});
  ASSERT_TRUE(drafts.abort_copies.empty());
  ASSERT_TRUE(cache->AbortStep(drafts.epoch).ok());
  EXPECT_EQ(*cache->StreamRows(a, 0, Stream::kWindow), 17);
  const std::vector<int32_t> after_drafts = cache->SelectAttentionSets(a, 0, 39, 1)->window_indices;
  EXPECT_EQ(std::count(after_drafts.begin(), after_drafts.end(), -1), 0);
}

// Diagnosis (src/cache_internal.h, Impl::StreamRowsOf, the state-stream line
// `min(length, store->spec(s).rows_per_page)`): a compressor state ring is
// not put back by a truncation in either mode (CompressorState::Truncate does
// nothing: the depth extra rows keep what the open windows need), so after
// one the slots of the truncated positions hold their stale rows and the
// ring holds [furthest length written - capacity, length), fewer than
// min(length, capacity) -- yet StreamRows counts them all. Nothing tracks the
// furthest length written to the state (ring_end is the window's, and kvc's
// mode resets it on Truncate). Fixed: LayerStreams::state_end records it.
TEST(StepAdversarial, StateStreamRowsCountOnlyRowsStillHeld) {
  TinyModel model;
  for (const bool page_manager : {false, true}) {
    SCOPED_TRACE(page_manager ? "page-manager mode" : "kvc's mode");
    std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(page_manager));
    const SequenceId a = *cache->CreateSequence();
    const StepPlan plan = *cache->PlanStep({{a, 40}});
    if (!page_manager) {
      for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 0, 40, 1).ok());
    }
    ASSERT_TRUE(cache->CommitStep(plan.epoch).ok());
    ASSERT_TRUE(cache->Truncate(a, 37).ok());
    const int64_t capacity = cache->LayerPages(1, Stream::kCsaState)->rows_per_page;
    ASSERT_LT(capacity, 37);
    EXPECT_EQ(*cache->StreamRows(a, 1, Stream::kCsaState), 37 - (40 - capacity));
  }
}

// Page-manager mode: a verify step's selection inside the open step (its
// tokens count as held) equals the same selection after the commit, across
// an HCA entry closing in the step; after an abort the query before the
// step selects as before it.
TEST(StepAdversarial, PageManagerSelectionInsideAStepEqualsAfterIt) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true));
  const SequenceId a = *cache->CreateSequence();
  const StepPlan grow = *cache->PlanStep({{a, 126}});
  ASSERT_TRUE(cache->CommitStep(grow.epoch).ok());
  auto same = [](const PositionSets& x, const PositionSets& y) {
    return x.window_offsets == y.window_offsets && x.window_positions == y.window_positions &&
           x.window_indices == y.window_indices && x.compressed_offsets == y.compressed_offsets &&
           x.entries == y.entries && x.compressed_indices == y.compressed_indices;
  };
  const PositionSets before_hca = *cache->SelectAttentionSets(a, 2, 125, 1);
  const PositionSets before_window = *cache->SelectAttentionSets(a, 0, 125, 1);
  const StepPlan abort_me = *cache->PlanStep({{a, 4}});
  ASSERT_TRUE(cache->AbortStep(abort_me.epoch).ok());
  EXPECT_TRUE(same(*cache->SelectAttentionSets(a, 2, 125, 1), before_hca));
  EXPECT_TRUE(same(*cache->SelectAttentionSets(a, 0, 125, 1), before_window));
  const StepPlan verify = *cache->PlanStep({{a, 4}});  // positions 126..129: HCA entry 0 closes with token 127
  const PositionSets inside_hca = *cache->SelectAttentionSets(a, 2, 126, 4);
  const PositionSets inside_window = *cache->SelectAttentionSets(a, 0, 126, 4);
  EXPECT_EQ(inside_hca.entries, (std::vector<int64_t>{0, 0, 0}));  // positions 127..129 see entry 0 (tokens 0..127)
  ASSERT_TRUE(cache->CommitStep(verify.epoch).ok());
  EXPECT_TRUE(same(*cache->SelectAttentionSets(a, 2, 126, 4), inside_hca));
  EXPECT_TRUE(same(*cache->SelectAttentionSets(a, 0, 126, 4), inside_window));
  // Every window index inside the step is a slot the plan wrote or the ring held.
  for (const int32_t i : inside_window.window_indices) EXPECT_GE(i, 0);
}

// kvc's mode mid-step: a layer already appended selects as a sequence grown
// straight to that length; a layer not yet appended as before the step;
// block tables cover the planned rows at once.
TEST(StepAdversarial, SelectionMidStepSeesEachLayerAsAppended) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(false));
  const SequenceId a = *cache->CreateSequence(), reference = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, a, 200, 1).ok());
  ASSERT_TRUE(model.Grow(*cache, reference, 203, 1).ok());
  const std::vector<float> qf = testing::DetValues(5, 4 * kIndexDim, 1.0f);
  std::vector<Bf16> q(qf.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = ToBf16(qf[i]);
  const std::vector<float> weights(4, 0.25f);
  auto picks = [&](SequenceId s, int layer, int64_t position) {
    const IndexQuery query = *cache->PrepareIndexQuery(position, q, weights);
    const AttentionSet set = *cache->SelectAttentionSet(s, layer, layer == 1 ? &query : nullptr);
    std::string bytes;
    for (const RowRef& r : set.rows) {
      bytes.append(reinterpret_cast<const char*>(r.data), 576);
      bytes.append(reinterpret_cast<const char*>(r.scales), 8);
    }
    return std::make_pair(set.indices, bytes);
  };
  const auto hca_before = picks(a, 2, 199);
  const StepPlan plan = *cache->PlanStep({{a, 3}});
  ASSERT_TRUE(model.AppendLayer(*cache, a, 1, 200, 3, 1).ok());
  ASSERT_TRUE(model.AppendLayer(*cache, a, 0, 200, 3, 1).ok());
  EXPECT_EQ(picks(a, 1, 202), picks(reference, 1, 202));
  EXPECT_EQ(picks(a, 0, 202), picks(reference, 0, 202));
  EXPECT_EQ(picks(a, 2, 199), hca_before);
  EXPECT_EQ(cache->BlockTable(a, Stream::kCsaRows)->size(), cache->BlockTable(reference, Stream::kCsaRows)->size())
      << "the table covers the planned rows at once";
  ASSERT_TRUE(model.AppendLayer(*cache, a, 2, 200, 3, 1).ok());
  ASSERT_TRUE(cache->CommitStep(plan.epoch).ok());
  EXPECT_EQ(picks(a, 2, 202), picks(reference, 2, 202));
}

TEST(StepAdversarial, SnapshotsOfASequenceInAStepAreRefused) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(false));
  const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, a, 20, 1).ok());
  ASSERT_TRUE(model.Grow(*cache, b, 20, 1).ok());
  const std::string path = ::testing::TempDir() + "kvc_adv_open_step_" + std::to_string(::getpid()) + ".kvcsnap";
  std::remove(path.c_str());
  const StepPlan plan = *cache->PlanStep({{a, 2}});
  ASSERT_TRUE(model.AppendLayer(*cache, a, 0, 20, 2, 1).ok());  // layers differ now
  EXPECT_EQ(SaveSnapshot(*cache, {a}, path).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(SaveSnapshot(*cache, {b, a}, path).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(::access(path.c_str(), F_OK), 0) << "a refused first save leaves no file";
  ASSERT_TRUE(SaveSnapshot(*cache, {b}, path).ok());
  ASSERT_TRUE(cache->AbortStep(plan.epoch).ok());
  const std::string path_a = path + ".a";
  ASSERT_TRUE(SaveSnapshot(*cache, {a}, path_a).ok());
  const std::vector<SequenceId> restored = *RestoreSnapshot(*cache, path_a);
  ASSERT_EQ(restored.size(), 1u);
  EXPECT_EQ(testing::ObservableBytes(*cache, restored[0]), testing::ObservableBytes(*cache, a));
  // The restored sequence steps like any other.
  const StepPlan next = *cache->PlanStep({{restored[0], 5}, {a, 5}});
  for (int layer = 0; layer < kLayers; ++layer) {
    ASSERT_TRUE(model.AppendLayer(*cache, restored[0], layer, 20, 5, 2).ok());
    ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 20, 5, 2).ok());
  }
  ASSERT_TRUE(cache->CommitStep(next.epoch).ok());
  EXPECT_EQ(testing::ObservableBytes(*cache, restored[0]), testing::ObservableBytes(*cache, a));
  std::remove(path.c_str());
  std::remove(path_a.c_str());
}

TEST(StepAdversarial, AnEmptyBatchIsAStepThatEnds) {
  TinyModel model;
  for (const bool page_manager : {false, true}) {
    std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(page_manager));
    const absl::StatusOr<StepPlan> plan = cache->PlanStep({});
    if (!plan.ok()) {
      EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
      continue;
    }
    for (int s = 0; s < kNumStreams; ++s) EXPECT_TRUE(plan->slots[s].slots.empty());
    EXPECT_TRUE(cache->CommitStep(plan->epoch).ok());
    EXPECT_EQ(cache->Usage().open_steps, 0);
  }
}

// --- The C API, misused ----------------------------------------------------

constexpr char kConfig[] =
    "{\"num_hidden_layers\": 3, \"compress_ratios\": [0, 4, 128], \"sliding_window\": 16, \"head_dim\": 512,"
    " \"qk_rope_head_dim\": 64, \"index_n_heads\": 64, \"index_head_dim\": 128, \"index_topk\": 8,"
    " \"max_position_embeddings\": 4096, \"rope_theta\": 10000, \"compress_rope_theta\": 160000,"
    " \"rms_norm_eps\": 1e-06}";

struct CCache {
  kvc_cache* cache = nullptr;
  explicit CCache(int page_manager) {
    kvc_options o;
    kvc_options_default(&o);
    o.page_manager = page_manager;
    o.draft_slots = 16;
    o.rows_per_page = 8;
    EXPECT_EQ(kvc_cache_create_from_config(kConfig, sizeof(kConfig) - 1, &o, &cache), KVC_OK) << kvc_last_error();
  }
  ~CCache() { kvc_cache_destroy(cache); }
  std::vector<int64_t> Usage() const {
    kvc_usage u;
    EXPECT_EQ(kvc_cache_usage(cache, &u), KVC_OK);
    std::vector<int64_t> v(u.used_bytes, u.used_bytes + KVC_NUM_COMPONENTS);
    v.insert(v.end(), u.reserved_bytes, u.reserved_bytes + KVC_NUM_COMPONENTS);
    for (const int64_t x : {u.sequences, u.open_steps, u.deferred_pages, static_cast<int64_t>(u.epoch),
                            static_cast<int64_t>(u.completed_epoch)}) {
      v.push_back(x);
    }
    return v;
  }
};

TEST(StepAdversarial, CApiMisuseIsRefusedAndChangesNothing) {
  for (const int page_manager : {0, 1}) {
    SCOPED_TRACE(page_manager);
    CCache c(page_manager);
    kvc_seq a = 0, b = 0;
    ASSERT_EQ(kvc_seq_create(c.cache, &a), KVC_OK);
    ASSERT_EQ(kvc_seq_create(c.cache, &b), KVC_OK);
    const std::vector<int64_t> before = c.Usage();
    kvc_step_plan* plan = nullptr;
    const kvc_seq seqs[2] = {a, b};
    int64_t tokens[2] = {1, 1};
    EXPECT_EQ(kvc_step_plan_create(nullptr, seqs, tokens, 2, &plan), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_create(c.cache, seqs, tokens, 2, nullptr), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_create(c.cache, nullptr, tokens, 2, &plan), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_create(c.cache, seqs, nullptr, 2, &plan), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_create(c.cache, seqs, tokens, -1, &plan), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_create(c.cache, seqs, tokens, INT64_MIN, &plan), KVC_ERR_INVALID_ARGUMENT);
    for (const int64_t n : {int64_t{0}, int64_t{-3}, INT64_MIN}) {
      tokens[1] = n;
      EXPECT_EQ(kvc_step_plan_create(c.cache, seqs, tokens, 2, &plan), KVC_ERR_INVALID_ARGUMENT) << n;
    }
    for (const int64_t n : {int64_t{4097}, INT64_MAX}) {
      tokens[1] = n;
      EXPECT_EQ(kvc_step_plan_create(c.cache, seqs, tokens, 2, &plan), KVC_ERR_OUT_OF_RANGE) << n;
    }
    const kvc_seq twice[2] = {a, a};
    tokens[1] = 1;
    EXPECT_EQ(kvc_step_plan_create(c.cache, twice, tokens, 2, &plan), KVC_ERR_INVALID_ARGUMENT);
    const kvc_seq unknown[2] = {a, 12345};
    EXPECT_EQ(kvc_step_plan_create(c.cache, unknown, tokens, 2, &plan), KVC_ERR_NOT_FOUND);
    EXPECT_EQ(plan, nullptr) << "a refused create writes no plan";
    EXPECT_EQ(c.Usage(), before);

    EXPECT_EQ(kvc_step_commit(nullptr, 1), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_abort(nullptr, 1), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_commit(c.cache, 0), KVC_ERR_NOT_FOUND);
    EXPECT_EQ(kvc_step_abort(c.cache, UINT64_MAX), KVC_ERR_NOT_FOUND);
    EXPECT_EQ(kvc_steps_complete(nullptr, 0, nullptr), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_steps_complete(c.cache, UINT64_MAX, nullptr), KVC_ERR_INVALID_ARGUMENT);
    int64_t released = -1;
    EXPECT_EQ(kvc_steps_complete(c.cache, 0, &released), KVC_OK);
    EXPECT_EQ(released, 0);
    EXPECT_EQ(c.Usage(), before);

    // A plan destroyed before its step ends: the step stays open, by epoch.
    tokens[0] = 20;
    tokens[1] = 1;
    ASSERT_EQ(kvc_step_plan_create(c.cache, seqs, tokens, 2, &plan), KVC_OK) << kvc_last_error();
    uint64_t epoch = 0;
    EXPECT_EQ(kvc_step_plan_epoch(plan, nullptr), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_epoch(nullptr, &epoch), KVC_ERR_INVALID_ARGUMENT);
    ASSERT_EQ(kvc_step_plan_epoch(plan, &epoch), KVC_OK);
    const int32_t* indptr = nullptr;
    const int64_t* slots = nullptr;
    int64_t count = 0;
    for (const int32_t stream : {-1, 7, 8, INT32_MIN, INT32_MAX}) {
      EXPECT_EQ(kvc_step_plan_slots(plan, stream, &indptr, &slots, &count), KVC_ERR_INVALID_ARGUMENT) << stream;
    }
    EXPECT_EQ(kvc_step_plan_slots(nullptr, 0, &indptr, &slots, &count), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_slots(plan, 0, nullptr, &slots, &count), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_slots(plan, 0, &indptr, nullptr, &count), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_slots(plan, 0, &indptr, &slots, nullptr), KVC_ERR_INVALID_ARGUMENT);
    ASSERT_EQ(kvc_step_plan_slots(plan, KVC_STREAM_WINDOW, &indptr, &slots, &count), KVC_OK);
    EXPECT_EQ(count, 21);
    EXPECT_EQ(indptr[2], 21);
    const kvc_page_copy* copies = nullptr;
    EXPECT_EQ(kvc_step_plan_copies(nullptr, &copies, &count), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_copies(plan, nullptr, &count), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_step_plan_abort_copies(plan, &copies, nullptr), KVC_ERR_INVALID_ARGUMENT);
    kvc_step_plan_destroy(plan);
    // Fork of a sequence in the step: refused whatever the buffer.
    kvc_seq child = -7;
    std::vector<kvc_page_copy> buffer(64);
    int64_t needed = -1;
    EXPECT_EQ(kvc_seq_fork_pages(c.cache, a, &child, buffer.data(), 64, &needed), KVC_ERR_FAILED_PRECONDITION);
    EXPECT_EQ(child, -7);
    if (page_manager) {
      ASSERT_EQ(kvc_step_commit(c.cache, epoch), KVC_OK);  // the engine wrote the rows
    } else {
      ASSERT_EQ(kvc_step_abort(c.cache, epoch), KVC_OK);
    }
    EXPECT_EQ(kvc_step_commit(c.cache, epoch), KVC_ERR_NOT_FOUND);
    EXPECT_EQ(kvc_step_abort(c.cache, epoch), KVC_ERR_NOT_FOUND);

    // kvc_seq_fork_pages at the edges of its buffer.
    const std::vector<int64_t> unforked = c.Usage();
    EXPECT_EQ(kvc_seq_fork_pages(nullptr, a, &child, buffer.data(), 64, &needed), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_seq_fork_pages(c.cache, a, nullptr, buffer.data(), 64, &needed), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_seq_fork_pages(c.cache, a, &child, buffer.data(), 64, nullptr), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_seq_fork_pages(c.cache, a, &child, buffer.data(), -1, &needed), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_seq_fork_pages(c.cache, a, &child, nullptr, 1, &needed), KVC_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(kvc_seq_fork_pages(c.cache, 999, &child, buffer.data(), 64, &needed), KVC_ERR_NOT_FOUND);
    EXPECT_EQ(c.Usage(), unforked);
    // Window ring (16 + 16 rows at 8 per page: 4 pages) and three state pages.
    const int64_t expect = page_manager ? 4 + 3 : 0;
    if (page_manager) {
      EXPECT_EQ(kvc_seq_fork_pages(c.cache, a, &child, nullptr, 0, &needed), KVC_ERR_OUT_OF_RANGE);
      EXPECT_EQ(needed, expect);
      needed = -1;
      EXPECT_EQ(kvc_seq_fork_pages(c.cache, a, &child, buffer.data(), expect - 1, &needed), KVC_ERR_OUT_OF_RANGE);
      EXPECT_EQ(needed, expect);
      EXPECT_EQ(child, -7);
      EXPECT_EQ(c.Usage(), unforked) << "nothing forked";
    }
    std::vector<kvc_page_copy> exact(static_cast<size_t>(std::max<int64_t>(expect, 1)), kvc_page_copy{-1, -1, -1});
    ASSERT_EQ(kvc_seq_fork_pages(c.cache, a, &child, exact.data(), expect, &needed), KVC_OK) << kvc_last_error();
    EXPECT_EQ(needed, expect);
    for (int64_t i = 0; i < expect; ++i) {
      EXPECT_GE(exact[static_cast<size_t>(i)].stream, 0);
      EXPECT_NE(exact[static_cast<size_t>(i)].src, exact[static_cast<size_t>(i)].dst);
    }
    EXPECT_EQ(kvc_seq_free(c.cache, child), KVC_OK);
    // An empty batch, as the C API takes it (seqs may be NULL).
    kvc_step_plan* empty = nullptr;
    const int code = kvc_step_plan_create(c.cache, nullptr, nullptr, 0, &empty);
    if (code == KVC_OK) {
      ASSERT_EQ(kvc_step_plan_epoch(empty, &epoch), KVC_OK);
      EXPECT_EQ(kvc_step_plan_slots(empty, KVC_STREAM_WINDOW, &indptr, &slots, &count), KVC_OK);
      EXPECT_EQ(count, 0);
      EXPECT_EQ(kvc_step_commit(c.cache, epoch), KVC_OK);
      kvc_step_plan_destroy(empty);
    } else {
      EXPECT_EQ(code, KVC_ERR_INVALID_ARGUMENT);
    }
  }
}

// The C API's own promise: a failing allocation inside kvc_step_plan_create
// or kvc_seq_fork_pages is KVC_ERR_RESOURCE_EXHAUSTED and the cache is as it
// was. Diagnoses: APlanThatRunsOutOfMemoryChangesNothing and
// AForkOrCreateThatRunsOutOfMemoryChangesNothing; and in src/c_api.cc,
// kvc_step_plan_create converts the plan's copies to C structs after
// PlanStep opened the step (`plan->copies = ToCCopies(...)`) and undoes a
// failure with AbortStep -- which, in page-manager mode, holds the plan's
// new pages as deferred until kvc_steps_complete (and the epoch has moved
// on): the failed call leaves used bytes and deferred_pages up.
TEST(StepAdversarial, CApiAllocationFailuresLeaveTheCacheAsItWas) {
  CCache c(1);
  kvc_seq a = 0;
  ASSERT_EQ(kvc_seq_create(c.cache, &a), KVC_OK);
  std::vector<kvc_page_copy> buffer(64);
  for (const int call : {0, 1}) {
    int64_t released = 0;
    ASSERT_EQ(kvc_steps_complete(c.cache, static_cast<uint64_t>(c.Usage()[KVC_NUM_COMPONENTS * 2 + 3]), &released), KVC_OK);
    const std::vector<int64_t> before = c.Usage();
    for (int64_t k = 0;; ++k) {
      ASSERT_LT(k, 20000);
      kvc_step_plan* plan = nullptr;
      kvc_seq child = 0;
      int64_t count = 0;
      const int64_t tokens = 40;
      t_fault_fired = false;
      t_fail_in = k;
      const int code = call == 0 ? kvc_step_plan_create(c.cache, &a, &tokens, 1, &plan)
                                 : kvc_seq_fork_pages(c.cache, a, &child, buffer.data(), 64, &count);
      t_fail_in = -1;
      if (code == KVC_OK) {
        if (call == 0) {
          // The copies, as C structs: a getter that runs out of memory fails alone.
          const kvc_page_copy* copies = nullptr;
          int64_t n = -1;
          t_fail_in = 0;
          EXPECT_EQ(kvc_step_plan_copies(plan, &copies, &n), KVC_ERR_RESOURCE_EXHAUSTED);
          t_fail_in = -1;
          ASSERT_EQ(kvc_step_plan_copies(plan, &copies, &n), KVC_OK);
          EXPECT_GT(n, 0);  // 40 tokens > depth 16: the checkpoint's copies
          ASSERT_EQ(kvc_step_plan_abort_copies(plan, &copies, &n), KVC_OK);
          EXPECT_GT(n, 0);
          uint64_t epoch = 0;
          ASSERT_EQ(kvc_step_plan_epoch(plan, &epoch), KVC_OK);
          ASSERT_EQ(kvc_step_abort(c.cache, epoch), KVC_OK);
          kvc_step_plan_destroy(plan);
        } else {
          ASSERT_EQ(kvc_seq_free(c.cache, child), KVC_OK);
        }
        break;
      }
      ASSERT_TRUE(t_fault_fired) << kvc_last_error();
      ASSERT_EQ(code, KVC_ERR_RESOURCE_EXHAUSTED) << kvc_last_error();
      std::vector<int64_t> now = c.Usage();
      ASSERT_EQ(now, before) << (call == 0 ? "kvc_step_plan_create" : "kvc_seq_fork_pages") << ": allocation " << k
                             << " failed (" << kvc_last_error() << ") and the usage changed";
    }
  }
}

// --- Concurrency (also under ThreadSanitizer) -------------------------------

// Diagnosis (src/cache.cc, Cache::~Cache): the destructor locks the cache's
// mutex (impl_->mu) and then each live sequence's (seq->mu), while PlanStep
// (its last lines, open_steps.emplace under impl.mu with the batch's
// sequence locks held) -- and Free, and CommitStep/AbortStep -- take a
// sequence's lock first and the cache's second. No call may run during
// destruction, so it cannot deadlock; but ThreadSanitizer reports the
// lock-order inversion (and halts, as CI runs it) in any program that steps
// a sequence and destroys the cache with it still live -- an engine's own
// TSan build included. Only a ThreadSanitizer build sees this one fail.
TEST(StepAdversarialConcurrency, DestroyingACacheWithLiveSequencesAfterAStep) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true));
  const SequenceId a = *cache->CreateSequence();
  const StepPlan plan = *cache->PlanStep({{a, 1}});
  ASSERT_TRUE(cache->CommitStep(plan.epoch).ok());
  cache.reset();  // a still live
}

// Two threads end the same step at once, one committing, one aborting:
// exactly one wins, and the sequence is as the winner left it.
TEST(StepAdversarialConcurrency, OneStepEndsOnceWhoeverRacesToEndIt) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true));
  const SequenceId a = *cache->CreateSequence();
  for (int round = 0; round < 200; ++round) {
    const int64_t start = *cache->Length(a, 0);
    const StepPlan plan = *cache->PlanStep({{a, 1 + round % 6}});
    std::atomic<int> ready{0};
    absl::Status committed, aborted;
    std::thread t1([&] {
      ready.fetch_add(1);
      while (ready.load() < 2) {
      }
      committed = cache->CommitStep(plan.epoch);
    });
    std::thread t2([&] {
      ready.fetch_add(1);
      while (ready.load() < 2) {
      }
      aborted = cache->AbortStep(plan.epoch);
    });
    t1.join();
    t2.join();
    ASSERT_NE(committed.ok(), aborted.ok()) << committed << " / " << aborted;
    const absl::Status& loser = committed.ok() ? aborted : committed;
    EXPECT_EQ(loser.code(), absl::StatusCode::kNotFound) << loser;
    EXPECT_EQ(*cache->Length(a, 2), committed.ok() ? start + 1 + round % 6 : start);
    EXPECT_EQ(cache->Usage().open_steps, 0);
  }
}

// Engine threads stepping their own sequences (plan, commit or abort, fork,
// truncate, free) while a saboteur ends random epochs and frees random ids,
// and a completer calls CompleteSteps and reads usage and tables. Every call
// either works or is refused cleanly; at the end, with everything freed and
// completed, the cache holds no page.
TEST(StepAdversarialConcurrency, StepsForksFreesAndCompletionsRace) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(true, 2, 2, 4));
  std::atomic<bool> stop{false};
  std::atomic<int64_t> bad{0};
  auto expect_clean = [&](const absl::Status& s) {
    if (s.ok()) return;
    switch (s.code()) {
      case absl::StatusCode::kNotFound:
      case absl::StatusCode::kFailedPrecondition:
      case absl::StatusCode::kInvalidArgument:  // e.g. a truncation above a length another thread changed
        return;
      default:
        bad.fetch_add(1);
        ADD_FAILURE() << s;
    }
  };
  std::vector<std::thread> engines;
  for (int t = 0; t < 3; ++t) {
    engines.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t) + 11);
      std::vector<SequenceId> mine;
      for (int i = 0; i < 300; ++i) {
        if (mine.size() < 2) {
          mine.push_back(*cache->CreateSequence());
          continue;
        }
        const int what = static_cast<int>(rng() % 6);
        if (what <= 2) {
          std::vector<StepRequest> batch;
          for (const SequenceId s : mine) {
            if (rng() % 2) batch.push_back({s, static_cast<int64_t>(1 + rng() % 7)});
          }
          const absl::StatusOr<StepPlan> plan = cache->PlanStep(batch);
          expect_clean(plan.status());
          if (plan.ok()) expect_clean(rng() % 3 ? cache->CommitStep(plan->epoch) : cache->AbortStep(plan->epoch));
        } else if (what == 3 && mine.size() < 5) {
          std::vector<PageCopy> copies;
          const absl::StatusOr<SequenceId> child = cache->Fork(mine[rng() % mine.size()], &copies);
          expect_clean(child.status());
          if (child.ok()) mine.push_back(*child);
        } else if (what == 4) {
          const SequenceId s = mine[rng() % mine.size()];
          const absl::StatusOr<int64_t> floor = cache->RollbackFloor(s);
          if (floor.ok()) expect_clean(cache->Truncate(s, *floor));
        } else {
          const size_t k = rng() % mine.size();
          const absl::Status freed = cache->Free(mine[k]);
          expect_clean(freed);
          if (freed.ok() || freed.code() == absl::StatusCode::kNotFound) mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(k));
        }
      }
      for (const SequenceId s : mine) expect_clean(cache->Free(s));
    });
  }
  std::thread saboteur([&] {
    std::mt19937_64 rng(99);
    while (!stop.load()) {
      const uint64_t epoch = cache->Usage().epoch;
      if (epoch == 0) continue;
      const uint64_t target = epoch - rng() % std::min<uint64_t>(epoch, 3);
      expect_clean(rng() % 2 ? cache->CommitStep(target) : cache->AbortStep(target));
      if (rng() % 8 == 0) expect_clean(cache->Free(static_cast<SequenceId>(1 + rng() % 40)));
    }
  });
  std::thread completer([&] {
    std::mt19937_64 rng(7);
    while (!stop.load()) {
      const CacheUsage u = cache->Usage();
      if (u.epoch > 0) {
        EXPECT_TRUE(cache->CompleteSteps(u.epoch - rng() % std::min<uint64_t>(u.epoch, 2)).ok());
      }
      const SequenceId s = static_cast<SequenceId>(1 + rng() % 40);
      for (const absl::Status& st : {cache->BlockTable(s, Stream::kCsaRows).status(),
                                     cache->BatchBlockTablesCsr({s}, Stream::kHcaRows).status(), cache->Usage(s).status()}) {
        expect_clean(st);
      }
    }
  });
  for (std::thread& t : engines) t.join();
  stop.store(true);
  saboteur.join();
  completer.join();
  // Steps the saboteur ended and frees it did leave nothing behind; steps
  // nobody ended (a plan whose owner lost its commit to the saboteur's
  // abort) are none: every plan was ended by someone.
  const CacheUsage end_usage = cache->Usage();
  EXPECT_EQ(end_usage.open_steps, 0);
  EXPECT_EQ(end_usage.sequences, 0);
  ASSERT_TRUE(cache->CompleteSteps(end_usage.epoch).ok());
  EXPECT_EQ(cache->Usage().used_bytes(), 0);
  EXPECT_EQ(cache->Usage().deferred_pages, 0);
  EXPECT_EQ(bad.load(), 0);
}

// kvc's mode: a thread steps one sequence token by token (plan, Append every
// layer, commit) while another forks, frees the forks, truncates to the
// current length and saves snapshots of it. Each of those works or is
// refused because of the open step; the stepped sequence ends equal to one
// grown straight to its length.
TEST(StepAdversarialConcurrency, PlanStepRacesForkFreeTruncateAndSnapshot) {
  TinyModel model;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), Options(false));
  const SequenceId a = *cache->CreateSequence();
  const std::string path = ::testing::TempDir() + "kvc_adv_race_" + std::to_string(::getpid()) + ".kvcsnap";
  std::atomic<bool> done{false};
  std::thread stepper([&] {
    for (int i = 0; i < 80; ++i) {
      const absl::StatusOr<StepPlan> plan = cache->PlanStep({{a, 1}});
      ASSERT_TRUE(plan.ok()) << plan.status();
      const int64_t t = plan->first_position[0];  // another thread may have rolled a back
      for (int layer = 0; layer < kLayers; ++layer) EXPECT_TRUE(model.AppendLayer(*cache, a, layer, t, 1, 1).ok());
      EXPECT_TRUE(cache->CommitStep(plan->epoch).ok());
    }
    done.store(true);
  });
  std::thread other([&] {
    auto allowed = [](const absl::Status& s) {
      return s.ok() || s.code() == absl::StatusCode::kFailedPrecondition;
    };
    int i = 0;
    while (!done.load()) {
      switch (i++ % 3) {
        case 0: {
          const absl::StatusOr<SequenceId> child = cache->Fork(a);
          EXPECT_TRUE(allowed(child.status())) << child.status();
          if (child.ok()) {
            EXPECT_TRUE(cache->Free(*child).ok());
          }
          break;
        }
        case 1: {  // a rollback as far as allowed (the floor may have risen since)
          const absl::StatusOr<int64_t> floor = cache->RollbackFloor(a);
          if (floor.ok()) {
            EXPECT_TRUE(allowed(cache->Truncate(a, *floor)));
          }
          break;
        }
        default: {
          const absl::StatusOr<SaveStats> saved = SaveSnapshot(*cache, {a}, path);
          EXPECT_TRUE(allowed(saved.status())) << saved.status();
        }
      }
    }
  });
  stepper.join();
  other.join();
  // Inputs depend only on (seed, layer, position): however often a was rolled
  // back, it holds what a sequence grown straight to its length holds.
  const SequenceId reference = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, reference, *cache->Length(a, 0), 1).ok());
  EXPECT_EQ(Held(*cache, a), Held(*cache, reference));
  std::remove(path.c_str());
}

}  // namespace
}  // namespace kvc
