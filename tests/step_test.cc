// Planned batch steps and page-manager mode (cache.h, "Planned batch
// steps"). The central test runs one engine loop twice -- kvc writing the
// bytes (Append inside planned steps), and an "engine" writing them itself
// through the plans' slots with kvc's kernels into its own arrays, kvc in
// page-manager mode -- and compares every byte.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/compressor.h"
#include "kvc/row_formats.h"
#include "kvc/row_kernels.h"
#include "src/compressor_run.h"
#include "tests/testing/engine_writer.h"
#include "tests/testing/tiny_model.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;
using testing::TinyModel;

constexpr int kLayers = 3;

CacheOptions SmallOptions() {
  CacheOptions o;
  o.rollback_depth = 4;
  o.draft_slots = 4;
  o.rows_per_page = 8;
  o.keys_per_page = 8;
  return o;
}

using testing::EngineCopy;
using testing::EngineMemory;
using testing::EngineWrite;

// The two caches of the loop: `kvc` writes its own bytes (into engine
// arrays, so both can be compared byte for byte), `engine` is in
// page-manager mode over the engine's arrays.
struct TwoCaches {
  TinyModel model;
  EngineMemory kvc_memory{model.spec(), SmallOptions(), 64};
  EngineMemory engine_memory{model.spec(), SmallOptions(), 64};
  std::unique_ptr<Cache> kvc, engine;
  TwoCaches() {
    CacheOptions a = SmallOptions();
    a.engine_arrays = kvc_memory.arrays;
    kvc = *Cache::Create(model.spec(), a);
    CacheOptions b = SmallOptions();
    b.engine_arrays = engine_memory.arrays;
    b.page_manager = true;
    engine = *Cache::Create(model.spec(), b);
  }

  // Plans the same step in both and returns the two plans (same ids: both
  // caches hand out ids in the same order).
  std::pair<StepPlan, StepPlan> Plan(const std::vector<StepRequest>& batch) {
    absl::StatusOr<StepPlan> a = kvc->PlanStep(batch);
    absl::StatusOr<StepPlan> b = engine->PlanStep(batch);
    EXPECT_TRUE(a.ok()) << a.status();
    EXPECT_TRUE(b.ok()) << b.status();
    for (int s = 0; s < kNumStreams; ++s) {
      EXPECT_EQ(a->slots[s].indptr, b->slots[s].indptr) << StreamName(static_cast<Stream>(s));
      EXPECT_EQ(a->slots[s].slots, b->slots[s].slots) << StreamName(static_cast<Stream>(s));
    }
    EXPECT_TRUE(a->copies.empty());  // kvc copies itself
    EngineCopy(*engine, b->copies);
    return {*std::move(a), *std::move(b)};
  }
  // Writes `layers` of every request of both plans (kvc: Append; engine: slots).
  void Write(const std::pair<StepPlan, StepPlan>& plans, int layers, uint64_t seed) {
    for (size_t b = 0; b < plans.first.seqs.size(); ++b) {
      for (int layer = 0; layer < layers; ++layer) {
        ASSERT_TRUE(model.AppendLayer(*kvc, plans.first.seqs[b], layer, plans.first.first_position[b],
                                      plans.first.new_tokens[b], seed)
                        .ok());
        EngineWrite(*engine, model, plans.second, b, layer, seed);
      }
    }
  }
  void Step(const std::vector<StepRequest>& batch, uint64_t seed) {
    const auto plans = Plan(batch);
    Write(plans, kLayers, seed);
    ASSERT_TRUE(kvc->CommitStep(plans.first.epoch).ok());
    ASSERT_TRUE(engine->CommitStep(plans.second.epoch).ok());
    ASSERT_TRUE(engine->CompleteSteps(plans.second.epoch).ok());  // the "device" is done
  }
  SequenceId Create() {
    const SequenceId a = *kvc->CreateSequence(), b = *engine->CreateSequence();
    EXPECT_EQ(a, b);
    return a;
  }
};

// Every byte of every public array of both caches.
void ExpectSameArrays(const TwoCaches& c) {
  for (size_t i = 0; i < c.kvc_memory.arrays.size(); ++i) {
    const EngineArray& a = c.kvc_memory.arrays[i];
    const EngineArray& b = c.engine_memory.arrays[i];
    EXPECT_TRUE(std::equal(a.bytes.begin(), a.bytes.end(), b.bytes.begin()))
        << "layer " << a.layer << " " << StreamName(a.stream);
  }
}

// The rows a sequence holds, read through block tables alone: per layer the
// ring slots of its last `window_positions` positions, every history row,
// and the compressor state rows of its last `capacity` tokens.
std::string HeldRows(const Cache& cache, SequenceId seq, int64_t window_positions) {
  std::string out;
  auto put = [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  for (int layer = 0; layer < kLayers; ++layer) {
    const int64_t length = *cache.Length(seq, layer);
    put(&length, sizeof(length));
    for (int s = 0; s < kNumStreams; ++s) {
      const Stream stream = static_cast<Stream>(s);
      const absl::StatusOr<PageArray> a = cache.LayerPages(layer, stream);
      if (!a.ok()) continue;
      const std::vector<int32_t> ids = *cache.BlockTable(seq, stream);
      auto put_row = [&](int64_t r) {  // row r of the sequence's stream
        const uint8_t* page = a->base + int64_t{ids[static_cast<size_t>(r / a->rows_per_page)]} * a->page_bytes;
        put(page + r % a->rows_per_page * a->row_data_bytes, static_cast<size_t>(a->row_data_bytes));
        put(page + int64_t{a->rows_per_page} * a->row_data_bytes + r % a->rows_per_page * a->row_scale_bytes,
            static_cast<size_t>(a->row_scale_bytes));
      };
      if (stream == Stream::kWindow || s >= static_cast<int>(Stream::kCsaState)) {  // rings
        const int64_t ring = stream == Stream::kWindow ? cache.spec().window + cache.options().draft_slots : a->rows_per_page;
        const int64_t held = stream == Stream::kWindow ? window_positions : ring;
        for (int64_t t = std::max<int64_t>(0, length - held); t < length; ++t) put_row(t % ring);
      } else {
        const int64_t rows = *cache.StreamRows(seq, layer, stream);
        for (int64_t r = 0; r < rows; ++r) put_row(r);
      }
    }
  }
  return out;
}

TEST(Steps, AnEngineWritingThroughSlotsGetsKvcsBytesExactly) {
  TwoCaches c;
  const SequenceId a = c.Create();
  c.Step({{a, 40}}, 1);  // a prefill chunk (longer than the rollback depth: checkpointed)
  const SequenceId b = c.Create();
  c.Step({{a, 1}, {b, 21}}, 1);
  ExpectSameArrays(c);

  // A fork: kvc copies the ring and state pages itself; the engine is told.
  std::vector<PageCopy> copies;
  const SequenceId fork_a = *c.kvc->Fork(a);
  const SequenceId fork_b = *c.engine->Fork(a, &copies);
  ASSERT_EQ(fork_a, fork_b);
  EXPECT_FALSE(copies.empty());
  for (const PageCopy& copy : copies) EXPECT_TRUE(copy.stream == Stream::kWindow || copy.stream >= Stream::kCsaState);
  EngineCopy(*c.engine, copies);
  EXPECT_EQ(c.engine->Fork(a).status().code(), absl::StatusCode::kFailedPrecondition);  // copies would be lost

  // A verify step of four drafts on the parent and the fork (which share a
  // partially filled history page: copied on write) and a decode token.
  {
    const auto plans = c.Plan({{a, 4}, {fork_a, 4}, {b, 1}});
    bool cow = false;
    for (const PageCopy& copy : plans.second.copies) cow |= copy.stream == Stream::kCsaRows;
    EXPECT_TRUE(cow) << "the fork's first write into a shared CSA page is a copy-on-write";
    c.Write(plans, kLayers, 2);
    ASSERT_TRUE(c.kvc->CommitStep(plans.first.epoch).ok());
    ASSERT_TRUE(c.engine->CommitStep(plans.second.epoch).ok());
    ASSERT_TRUE(c.engine->CompleteSteps(plans.second.epoch).ok());
  }
  ExpectSameArrays(c);  // nothing freed yet: every byte of every array

  // Three drafts rejected: a rollback (bookkeeping only for the engine).
  ASSERT_TRUE(c.kvc->Truncate(a, 42).ok());
  ASSERT_TRUE(c.engine->Truncate(a, 42).ok());
  // A step that fails after some layers were written, aborted as a whole.
  {
    const auto plans = c.Plan({{a, 2}, {fork_a, 3}});
    c.Write(plans, 2, 3);
    ASSERT_TRUE(c.kvc->AbortStep(plans.first.epoch).ok());
    EngineCopy(*c.engine, plans.second.abort_copies);
    ASSERT_TRUE(c.engine->AbortStep(plans.second.epoch).ok());
    ASSERT_TRUE(c.engine->CompleteSteps(plans.second.epoch).ok());
    EXPECT_EQ(*c.kvc->Length(a, 0), 42);
    EXPECT_EQ(*c.engine->Length(a, 2), 42);
  }
  // A long step aborted after every layer was written: the checkpoint
  // brings the ring and compressor state back.
  {
    const auto plans = c.Plan({{a, 30}, {b, 30}});
    EXPECT_FALSE(plans.second.abort_copies.empty());
    c.Write(plans, kLayers, 4);
    ASSERT_TRUE(c.kvc->AbortStep(plans.first.epoch).ok());
    EngineCopy(*c.engine, plans.second.abort_copies);
    ASSERT_TRUE(c.engine->AbortStep(plans.second.epoch).ok());
    ASSERT_TRUE(c.engine->CompleteSteps(plans.second.epoch).ok());
  }
  // After a truncation or an abort the engine's ring still holds the rows
  // it wrote past the new length (kvc's put the evicted ones back), so only
  // the last `window` positions -- what a query at the last position reads
  // -- are the same; the rest converge as the sequence grows again.
  const int64_t window = c.model.spec().window, ring = window + SmallOptions().draft_slots;
  EXPECT_EQ(HeldRows(*c.kvc, a, window), HeldRows(*c.engine, a, window));
  EXPECT_EQ(HeldRows(*c.kvc, b, window), HeldRows(*c.engine, b, window));
  c.Step({{a, 30}, {b, 30}}, 5);
  for (int i = 0; i < 140; ++i) c.Step({{a, 1}, {b, 1}, {fork_a, 1}}, 6);  // past an HCA window (128)
  for (const SequenceId s : {a, b, fork_a}) {
    EXPECT_EQ(*c.kvc->Length(s, 2), *c.engine->Length(s, 2));
    for (int st = 0; st < kNumStreams; ++st) {
      EXPECT_EQ(*c.kvc->BlockTable(s, static_cast<Stream>(st)), *c.engine->BlockTable(s, static_cast<Stream>(st)));
    }
    EXPECT_EQ(HeldRows(*c.kvc, s, ring), HeldRows(*c.engine, s, ring)) << "sequence " << s;
    EXPECT_GT(*c.kvc->StreamRows(s, 2, Stream::kHcaRows), 0);
  }
  // The same pages in use, bar kvc's rollback records (the engine's cache
  // has none: its ring's draft slots serve a rollback).
  const CacheUsage kvc_usage = c.kvc->Usage(), engine_usage = c.engine->Usage();
  for (const Component k : {Component::kCompressedRows, Component::kIndexKeys, Component::kCompressorState}) {
    EXPECT_EQ(kvc_usage.components[static_cast<int>(k)].used_bytes, engine_usage.components[static_cast<int>(k)].used_bytes);
  }
  const int64_t rollback_page = (4 * 592 + 63) / 64 * 64;  // 4 records of 584 B + an 8-byte position
  EXPECT_EQ(kvc_usage.components[0].used_bytes - engine_usage.components[0].used_bytes, 3 * kLayers * rollback_page);
}

// A kvc-mode cache of the tiny model, with a small history budget.
std::unique_ptr<Cache> SmallCache(const TinyModel& model, int64_t history_bytes = int64_t{1} << 30) {
  CacheOptions o = SmallOptions();
  o.history_bytes = history_bytes;
  return *Cache::Create(model.spec(), o);
}

TEST(Steps, APlanIsAllOrNothing) {
  TinyModel model;
  // Room for 3 CSA row pages and 3 key pages (ids cost a page in each of the stream's layers).
  const std::vector<StreamGeometry> g = *Cache::PageGeometry(model.spec(), SmallOptions());
  const int64_t budget = 3 * (g[1].page_bytes + g[2].page_bytes);
  std::unique_ptr<Cache> cache = SmallCache(model, budget);
  const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
  const CacheUsage before = cache->Usage();
  // a alone fits (64 tokens: 16 CSA rows = 2 pages); a and b together do not.
  const absl::StatusOr<StepPlan> refused = cache->PlanStep({{a, 64}, {b, 64}});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("CSA"));
  EXPECT_EQ(cache->Usage().used_bytes(), before.used_bytes());
  EXPECT_EQ(cache->Usage().open_steps, 0);
  EXPECT_TRUE(cache->BlockTable(a, Stream::kCsaRows)->empty());
  EXPECT_TRUE(cache->BlockTable(b, Stream::kCsaRows)->empty());
  // Nothing of it is left: the same sequences can step again.
  const absl::StatusOr<StepPlan> plan = cache->PlanStep({{a, 64}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(cache->BlockTable(a, Stream::kCsaRows)->size(), 2u);  // the table covers the step's rows already
  EXPECT_EQ(plan->slots[1].slots.size(), 16u);
  EXPECT_EQ(plan->slots[2].slots.size(), 16u);
  EXPECT_TRUE(plan->slots[3].slots.empty());  // no HCA window closes in 64 tokens
  const int64_t used = cache->Usage().used_bytes();
  for (int layer = 0; layer < kLayers; ++layer) ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 0, 64, 1).ok());
  EXPECT_EQ(cache->Usage().used_bytes(), used) << "Append inside a step allocates nothing";
  EXPECT_TRUE(cache->CommitStep(plan->epoch).ok());
}

TEST(Steps, RefusalsNameTheProblemAndChangeNothing) {
  TinyModel model;
  std::unique_ptr<Cache> cache = SmallCache(model);
  const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
  auto code = [&](std::vector<StepRequest> batch) { return cache->PlanStep(batch).status().code(); };
  EXPECT_EQ(code({{a, 0}}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({{a, 1}, {a, 1}}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({{a, 1}, {999, 1}}), absl::StatusCode::kNotFound);
  EXPECT_EQ(code({{a, model.spec().max_context + 1}}), absl::StatusCode::kOutOfRange);
  ASSERT_TRUE(model.AppendLayer(*cache, b, 0, 0, 5, 1).ok());  // b's layers differ in length
  EXPECT_THAT(std::string(cache->PlanStep({{b, 1}}).status().message()), HasSubstr("finish the step first"));
  EXPECT_EQ(cache->Usage().open_steps, 0);

  const StepPlan plan = *cache->PlanStep({{a, 6}});
  EXPECT_EQ(code({{a, 1}}), absl::StatusCode::kFailedPrecondition);  // already in a step
  EXPECT_EQ(cache->Truncate(a, 0).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache->Fork(a).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(cache->Free(a).message()), HasSubstr("open step"));
  EXPECT_TRUE(cache->Length(a, 0).ok()) << "a refused Free leaves the sequence";
  // Appends stay within the plan.
  EXPECT_EQ(model.AppendLayer(*cache, a, 0, 0, 7, 1).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(model.AppendLayer(*cache, a, 0, 0, 6, 1).ok());
  // A commit with a layer short is refused, and the step stays open.
  EXPECT_THAT(std::string(cache->CommitStep(plan.epoch).message()), HasSubstr("layer 1 holds 0 tokens"));
  EXPECT_EQ(cache->Usage().open_steps, 1);
  EXPECT_TRUE(cache->AbortStep(plan.epoch).ok());
  EXPECT_EQ(cache->CommitStep(plan.epoch).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache->AbortStep(plan.epoch + 7).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache->CompleteSteps(plan.epoch + 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(cache->Free(a).ok());
}

// What a sequence holds, as kvc's own views show it (kvc's mode).
std::string Observable(const Cache& cache, SequenceId seq) { return testing::ObservableBytes(cache, seq); }

TEST(Steps, AbortPutsEverySequenceBackAsPlanned) {
  TinyModel model;
  for (const int64_t n : {3, 4, 25}) {  // within the rollback depth (records), at it, beyond it (checkpoint)
    std::unique_ptr<Cache> cache = SmallCache(model);
    const SequenceId a = *cache->CreateSequence();
    ASSERT_TRUE(model.Grow(*cache, a, 37, 1).ok());
    const SequenceId fork = *cache->Fork(a);  // history shared: the step copies on write
    const std::string before = Observable(*cache, a), fork_before = Observable(*cache, fork);
    const int64_t floor = *cache->RollbackFloor(a);
    const CacheUsage usage = cache->Usage();
    const StepPlan plan = *cache->PlanStep({{a, n}, {fork, n}});
    for (int layer = 0; layer < kLayers; ++layer) {
      ASSERT_TRUE(model.AppendLayer(*cache, a, layer, 37, n, 9).ok());
      if (layer < 2) {
        ASSERT_TRUE(model.AppendLayer(*cache, fork, layer, 37, n, 8).ok());
      }
    }
    ASSERT_TRUE(cache->AbortStep(plan.epoch).ok());
    EXPECT_EQ(cache->Usage().used_bytes(), usage.used_bytes()) << n;
    EXPECT_EQ(cache->Usage().open_steps, 0);
    // Lengths, ring, rows and keys as they were; the floor as after an
    // append and truncate (exactly as it was when a checkpoint was taken).
    const int64_t floor_now = *cache->RollbackFloor(a);
    EXPECT_EQ(floor_now, n > 4 ? floor : std::max(floor, 37 + n - 4)) << n;
    std::string now = Observable(*cache, a);
    std::memcpy(now.data(), before.data(), sizeof(int64_t));  // the floor, checked above
    EXPECT_EQ(now, before) << n;
    std::string fork_now = Observable(*cache, fork);
    std::memcpy(fork_now.data(), fork_before.data(), sizeof(int64_t));
    EXPECT_EQ(fork_now, fork_before) << n;
    // ... and the sequence continues as one that never saw the step.
    ASSERT_TRUE(model.Grow(*cache, a, 80, 1).ok());
    const SequenceId fresh = *cache->CreateSequence();
    ASSERT_TRUE(model.Grow(*cache, fresh, 80, 1).ok());
    std::string grown = Observable(*cache, a), reference = Observable(*cache, fresh);
    std::memcpy(grown.data(), reference.data(), sizeof(int64_t));
    EXPECT_EQ(grown, reference) << n;
  }
}

TEST(Steps, PageFreesWaitForTheDeviceInPageManagerMode) {
  TinyModel model;
  CacheOptions o = SmallOptions();
  o.page_manager = true;  // no engine arrays: ids only
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), o);
  EXPECT_EQ(cache->LayerPages(0, Stream::kWindow)->base, nullptr);
  const SequenceId a = *cache->CreateSequence(), b = *cache->CreateSequence();
  const StepPlan first = *cache->PlanStep({{a, 40}, {b, 40}});
  ASSERT_TRUE(cache->CommitStep(first.epoch).ok());
  EXPECT_EQ(*cache->Length(a, 1), 40);
  EXPECT_EQ(*cache->StreamRows(a, 1, Stream::kCsaRows), 10);
  const int64_t used = cache->Usage().used_bytes();
  // The device may still run step `first` when b is freed: its pages wait.
  const std::vector<int32_t> b_pages = cache->BlockTable(b, Stream::kCsaRows).value();
  ASSERT_EQ(b_pages.size(), 2u);
  ASSERT_TRUE(cache->Free(b).ok());
  EXPECT_EQ(cache->Usage().used_bytes(), used);
  EXPECT_GT(cache->Usage().deferred_pages, 0);
  const SequenceId c = *cache->CreateSequence();
  const StepPlan second = *cache->PlanStep({{c, 40}});
  const std::vector<int32_t> c_pages = cache->BlockTable(c, Stream::kCsaRows).value();
  for (const int32_t id : c_pages) {
    EXPECT_EQ(std::count(b_pages.begin(), b_pages.end(), id), 0) << "a page freed under a running step was handed out again";
  }
  // b was freed under step `first`: its pages are reusable once the device
  // finished that step.
  EXPECT_GT(*cache->CompleteSteps(first.epoch), 0);
  EXPECT_EQ(cache->Usage().deferred_pages, 0);
  ASSERT_TRUE(cache->CommitStep(second.epoch).ok());
  const CacheUsage usage = cache->Usage();
  EXPECT_EQ(usage.completed_epoch, first.epoch);
  EXPECT_EQ(usage.epoch, second.epoch);
  // Bytes are the engine's: every call that would touch them is refused.
  EXPECT_EQ(cache->Append(a, 0, 40, {}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache->Window(a, 0).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache->CompressedRows(a, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache->AppendRows(a, 1, Stream::kCsaRows, 10, {}).code(), absl::StatusCode::kFailedPrecondition);
  // Without draft slots to spare, a page-manager cache could not roll back.
  o.draft_slots = 2;
  EXPECT_THAT(std::string(Cache::Create(model.spec(), o).status().message()), HasSubstr("draft_slots >= rollback_depth"));
}

TEST(Steps, OnlyPagesTheStepWritesIntoAreCopiedOnWrite) {
  TinyModel model;
  CacheOptions o = SmallOptions();
  o.page_manager = true;
  std::unique_ptr<Cache> cache = *Cache::Create(model.spec(), o);
  const SequenceId a = *cache->CreateSequence();
  const StepPlan grow = *cache->PlanStep({{a, 130}});  // 32 CSA entries, 1 HCA entry: partial pages
  ASSERT_TRUE(cache->CommitStep(grow.epoch).ok());
  std::vector<PageCopy> copies;
  const SequenceId fork = *cache->Fork(a, &copies);
  // 130 -> 131 closes no entry: the shared partial pages stay shared.
  const StepPlan one = *cache->PlanStep({{fork, 1}});
  EXPECT_TRUE(one.copies.empty()) << one.copies.size() << " copies; the first is of " << StreamName(one.copies[0].stream);
  ASSERT_TRUE(cache->AbortStep(one.epoch).ok());
  // 130 -> 132 closes CSA entry 32 (a new page: nothing to copy) ...
  const StepPlan two = *cache->PlanStep({{fork, 2}});
  EXPECT_TRUE(two.copies.empty());
  ASSERT_TRUE(cache->CommitStep(two.epoch).ok());
  // The parent's next entries (32, 33) start a page of its own; its shared
  // HCA page is not written either.
  const StepPlan four = *cache->PlanStep({{a, 6}});
  for (const PageCopy& c : four.copies) EXPECT_NE(c.stream, Stream::kHcaRows);
  ASSERT_TRUE(cache->CommitStep(four.epoch).ok());
}

}  // namespace
}  // namespace kvc
