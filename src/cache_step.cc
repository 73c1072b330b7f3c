// Planned batch steps (cache.h, "Planned batch steps"; docs/embedding.md):
// PlanStep reserves every page a batch's step writes, all or nothing, and
// applies the table changes at once (new history pages, private copies of
// shared pages, checkpoints of a long step's state pages); CommitStep keeps
// them, AbortStep puts every sequence back as it was planned; CompleteSteps
// releases the page frees a running step could still read (page-manager
// mode). The slots of every row the step writes come back in the plan.
#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "src/cache_internal.h"
#include "src/status.h"

namespace kvc {
namespace {

using cache_internal::IsStateStream;
using cache_internal::kRollbackStream;
using cache_internal::kStreamCount;
using cache_internal::kWindowStream;

// The streams whose pages a checkpoint copies: a sequence's private state.
constexpr int kCheckpointStreams[] = {cache_internal::kWindowStream, cache_internal::kCsaStateStream,
                                      cache_internal::kCsaIndexerStateStream, cache_internal::kHcaStateStream,
                                      cache_internal::kRollbackStream};

}  // namespace

absl::StatusOr<StepPlan> Cache::PlanStep(absl::Span<const StepRequest> batch) {
  constexpr const char* kWhat = "PlanStep";
  Impl& impl = *impl_;
  PageStore& store = *impl.store;
  std::vector<SequenceId> ids;
  for (size_t b = 0; b < batch.size(); ++b) {
    if (batch[b].new_tokens < 1) {
      return absl::InvalidArgumentError(absl::StrCat(kWhat, ": request ", b, " (sequence ", batch[b].seq, ") asks for ",
                                                     batch[b].new_tokens, " new tokens; a step appends at least 1"));
    }
    ids.push_back(batch[b].seq);
  }
  KVC_ASSIGN_OR_RETURN(Impl::LockedBatch locked, impl.LockBatch(ids, kWhat));
  const int64_t depth = impl.depth();

  // Plan every sequence: what its tables need. Nothing changes here.
  struct SeqPlan {
    int64_t start = 0, n = 0;
    std::array<std::vector<size_t>, kStreamCount> cow;   // table positions to copy
    std::array<int64_t, kStreamCount> new_pages{};
    std::array<std::vector<PageId>, kStreamCount> fresh;  // granted: copies first, then new pages
    std::array<std::vector<PageId>, kStreamCount> checkpoint;
    bool checkpointed = false;
  };
  std::vector<SeqPlan> plans(batch.size());
  std::vector<PageStore::Request> requests;
  for (size_t b = 0; b < batch.size(); ++b) {
    const Sequence& seq = *locked.seqs[b];
    SeqPlan& p = plans[b];
    KVC_RETURN_IF_ERROR(Impl::RefuseInStep(seq, ids[b], kWhat));
    KVC_RETURN_IF_ERROR(impl.SameLengthEverywhere(seq.layers, ids[b], "PlanStep:"));
    p.start = seq.layers.empty() ? 0 : seq.layers[0].length;
    p.n = batch[b].new_tokens;
    if (p.n > impl.spec.max_context - p.start) {
      return absl::OutOfRangeError(absl::StrCat(kWhat, ": sequence ", ids[b], " holds ", p.start, " tokens; ", p.n,
                                                " more exceed max_context ", impl.spec.max_context));
    }
    for (const HistoryStream* h : {impl.History(cache_internal::kCsaRowsStream), impl.History(cache_internal::kCsaKeysStream),
                                   impl.History(cache_internal::kHcaRowsStream)}) {
      if (h == nullptr) continue;
      const int s = h->stream();
      const std::vector<int32_t>& layers = store.spec(s).layers;
      const int64_t rows_after = EntriesAt(impl.KindOf(layers[0]), p.start + p.n);
      int64_t least = rows_after;  // the first row any layer writes
      for (const int32_t l : layers) least = std::min(least, h->Rows(seq, l));
      const std::vector<PageId>& table = seq.tables[static_cast<size_t>(s)];
      const int64_t end = (rows_after + h->per_page() - 1) / h->per_page();
      const int64_t have = static_cast<int64_t>(table.size());
      // Pages the step writes into: those holding rows [least, rows_after).
      const int64_t first_written = rows_after > least ? least / h->per_page() : end;
      for (int64_t page = first_written; page < std::min(end, have); ++page) {
        if (store.RefCount(s, table[static_cast<size_t>(page)]) > 1) p.cow[static_cast<size_t>(s)].push_back(static_cast<size_t>(page));
      }
      p.new_pages[static_cast<size_t>(s)] = std::max<int64_t>(0, end - have);
      requests.push_back({s, p.new_pages[static_cast<size_t>(s)] + static_cast<int64_t>(p.cow[static_cast<size_t>(s)].size()),
                          &p.fresh[static_cast<size_t>(s)]});
    }
    // A step longer than the rollback depth overwrites what rollback could
    // restore: checkpoint the state pages so an abort can.
    p.checkpointed = p.n > depth;
    if (p.checkpointed) {
      for (const int s : kCheckpointStreams) {
        if (!store.present(s)) continue;
        requests.push_back({s, static_cast<int64_t>(seq.tables[static_cast<size_t>(s)].size()), &p.checkpoint[static_cast<size_t>(s)]});
      }
    }
  }
  // The slots each stream lists (one per token in a ring, one per closed
  // row in a history stream): their indptr is int32.
  std::array<int64_t, kNumStreams> slot_counts{};
  for (int s = 0; s < kNumStreams; ++s) {
    if (!store.present(s)) continue;
    const bool ring = s == kWindowStream || IsStateStream(s);
    const LayerKind kind = impl.KindOf(store.spec(s).layers[0]);
    for (const SeqPlan& p : plans) {
      slot_counts[static_cast<size_t>(s)] += ring ? p.n : EntriesAt(kind, p.start + p.n) - EntriesAt(kind, p.start);
    }
    if (slot_counts[static_cast<size_t>(s)] > std::numeric_limits<int32_t>::max()) {
      return absl::OutOfRangeError(absl::StrCat(kWhat, ": the batch writes ", slot_counts[static_cast<size_t>(s)], " ",
                                                StreamName(static_cast<Stream>(s)),
                                                " rows; a step lists at most 2^31 - 1 per stream (its indptr is int32)"));
    }
  }

  // Every allocation the apply phase needs, made before any page is granted:
  // past store.Allocate nothing may fail, or the granted ids would leak and a
  // sequence could be left in a step no one can end. A std::bad_alloc here
  // leaves the cache as it was.
  StepPlan plan;
  std::vector<std::unique_ptr<OpenStep>> steps(batch.size());
  size_t copies = 0;
  for (size_t b = 0; b < batch.size(); ++b) {
    Sequence& seq = *locked.seqs[b];
    const SeqPlan& p = plans[b];
    steps[b] = std::make_unique<OpenStep>();
    steps[b]->layers_at_plan = seq.layers;
    for (int s = 0; s < kStreamCount; ++s) {
      std::vector<PageId>& table = seq.tables[static_cast<size_t>(s)];
      table.reserve(table.size() + static_cast<size_t>(p.new_pages[static_cast<size_t>(s)]));
      steps[b]->replaced[static_cast<size_t>(s)].reserve(p.cow[static_cast<size_t>(s)].size());
      copies += p.cow[static_cast<size_t>(s)].size();
    }
    if (p.checkpointed) {
      for (const int s : kCheckpointStreams) {
        if (store.present(s)) copies += seq.tables[static_cast<size_t>(s)].size();
      }
    }
  }
  if (store.page_manager()) {
    plan.copies.reserve(copies);
    plan.abort_copies.reserve(copies);
  }
  plan.seqs.reserve(batch.size());
  plan.first_position.reserve(batch.size());
  plan.new_tokens.reserve(batch.size());
  for (int s = 0; s < kNumStreams; ++s) {
    if (!store.present(s)) continue;
    plan.slots[s].indptr.reserve(batch.size() + 1);
    plan.slots[s].slots.reserve(static_cast<size_t>(slot_counts[static_cast<size_t>(s)]));
  }
  std::map<uint64_t, std::vector<SequenceId>> open_entry;  // moved into impl.open_steps without allocating
  open_entry.emplace(0, ids);

  {
    const absl::Status granted = store.Allocate(requests);
    if (!granted.ok()) return absl::Status(granted.code(), absl::StrCat(kWhat, ": ", granted.message()));
  }

  // Apply (allocates nothing: cannot fail).
  plan.epoch = store.BeginStep();
  for (size_t b = 0; b < batch.size(); ++b) {
    Sequence& seq = *locked.seqs[b];
    SeqPlan& p = plans[b];
    std::unique_ptr<OpenStep> step = std::move(steps[b]);
    step->epoch = plan.epoch;
    step->start = p.start;
    step->new_tokens = p.n;
    for (int s = 0; s < kStreamCount; ++s) step->table_size[static_cast<size_t>(s)] = seq.tables[static_cast<size_t>(s)].size();
    for (int s = 0; s < kStreamCount; ++s) {
      std::vector<PageId>& table = seq.tables[static_cast<size_t>(s)];
      const std::vector<PageId>& fresh = p.fresh[static_cast<size_t>(s)];
      size_t next = 0;
      for (const size_t pos : p.cow[static_cast<size_t>(s)]) {  // copy-on-write in every layer; the original stays referenced
        store.CopyPage(s, table[pos], fresh[next], &plan.copies);
        step->replaced[static_cast<size_t>(s)].emplace_back(pos, table[pos]);
        table[pos] = fresh[next++];
      }
      while (next < fresh.size()) table.push_back(fresh[next++]);
    }
    if (p.checkpointed) {
      step->checkpointed = true;
      for (const int s : kCheckpointStreams) {
        const std::vector<PageId>& table = seq.tables[static_cast<size_t>(s)];
        const std::vector<PageId>& copy = p.checkpoint[static_cast<size_t>(s)];
        for (size_t k = 0; k < copy.size(); ++k) {
          store.CopyPage(s, table[k], copy[k], &plan.copies);
          if (store.page_manager()) plan.abort_copies.push_back({static_cast<Stream>(s), copy[k], table[k]});
        }
        step->checkpoint[static_cast<size_t>(s)] = std::move(p.checkpoint[static_cast<size_t>(s)]);
      }
    }
    seq.step = std::move(step);
    plan.seqs.push_back(ids[b]);
    plan.first_position.push_back(p.start);
    plan.new_tokens.push_back(p.n);
  }

  // The slots of every row the step writes, per stream.
  for (int s = 0; s < kNumStreams; ++s) {
    if (!store.present(s)) continue;
    StepSlots& out = plan.slots[s];
    out.indptr.push_back(0);
    const int64_t per_page = store.spec(s).rows_per_page;
    for (size_t b = 0; b < batch.size(); ++b) {
      const std::vector<PageId>& table = locked.seqs[b]->tables[static_cast<size_t>(s)];
      const int64_t start = plans[b].start, end = start + plans[b].n;
      auto index = [&](int64_t row) { return int64_t{table[static_cast<size_t>(row / per_page)]} * per_page + row % per_page; };
      if (s == kWindowStream || IsStateStream(s)) {  // rings: one row per token, the last write of a slot kept
        const int64_t ring = s == kWindowStream ? impl.ring_slots() : per_page;
        for (int64_t t = start; t < end; ++t) out.slots.push_back(t < end - ring ? -1 : index(t % ring));
      } else {
        const LayerKind kind = impl.KindOf(store.spec(s).layers[0]);
        for (int64_t j = EntriesAt(kind, start); j < EntriesAt(kind, end); ++j) out.slots.push_back(index(j));
      }
      out.indptr.push_back(static_cast<int32_t>(out.slots.size()));
    }
  }
  auto entry = open_entry.extract(open_entry.begin());
  entry.key() = plan.epoch;
  std::lock_guard<std::mutex> lock(impl.mu);
  impl.open_steps.insert(std::move(entry));
  return plan;
}

namespace {

// Ends the step for `seq` once its tables are final: drops the references
// the step held (replaced originals, checkpoints).
void EndStep(PageStore& store, Sequence& seq, bool keep_copies) {
  OpenStep& step = *seq.step;
  for (int s = 0; s < kStreamCount; ++s) {
    std::vector<PageId>& table = seq.tables[static_cast<size_t>(s)];
    for (const auto& [pos, original] : step.replaced[static_cast<size_t>(s)]) {
      if (keep_copies) {
        store.Unref(s, original);
      } else {  // back to the shared original
        store.Unref(s, table[pos]);
        table[pos] = original;
      }
    }
    for (const PageId id : step.checkpoint[static_cast<size_t>(s)]) store.Unref(s, id);
  }
  seq.step.reset();
}

}  // namespace

absl::Status Cache::CommitStep(uint64_t epoch) {
  constexpr const char* kWhat = "CommitStep";
  Impl& impl = *impl_;
  PageStore& store = *impl.store;
  KVC_ASSIGN_OR_RETURN(Impl::LockedBatch locked, impl.LockStep(epoch, kWhat));
  if (!impl.page_manager()) {  // kvc wrote the rows: every layer must be there
    for (size_t b = 0; b < locked.seqs.size(); ++b) {
      const Sequence& seq = *locked.seqs[b];
      const int64_t end = seq.step->start + seq.step->new_tokens;
      for (size_t l = 0; l < seq.layers.size(); ++l) {
        if (seq.layers[l].length != end) {
          return absl::FailedPreconditionError(absl::StrCat(
              kWhat, ": step ", epoch, ": sequence ", locked.ids[b], " layer ", l, " holds ", seq.layers[l].length,
              " tokens; the step plans ", end, ". Append every layer, or AbortStep"));
        }
      }
    }
  }
  for (const std::shared_ptr<Sequence>& seq_ptr : locked.seqs) {
    Sequence& seq = *seq_ptr;
    const int64_t end = seq.step->start + seq.step->new_tokens;
    if (impl.page_manager()) {  // the engine wrote every row the plan listed
      for (size_t l = 0; l < seq.layers.size(); ++l) {
        LayerStreams& ls = seq.layers[l];
        const LayerKind kind = impl.KindOf(static_cast<int>(l));
        ls.length = end;
        ls.ring_end = std::max(ls.ring_end, end);
        ls.state_end = std::max(ls.state_end, end);
        ls.floor = std::max(ls.floor, end - impl.depth());
        if (kind != LayerKind::kWindow) ls.compressed_rows = EntriesAt(kind, end);
        if (kind == LayerKind::kCsa) ls.key_rows = EntriesAt(kind, end);
      }
    }
    EndStep(store, seq, /*keep_copies=*/true);
  }
  std::lock_guard<std::mutex> lock(impl.mu);
  impl.open_steps.erase(epoch);
  return absl::OkStatus();
}

absl::Status Cache::AbortStep(uint64_t epoch) {
  constexpr const char* kWhat = "AbortStep";
  Impl& impl = *impl_;
  PageStore& store = *impl.store;
  KVC_ASSIGN_OR_RETURN(Impl::LockedBatch locked, impl.LockStep(epoch, kWhat));
  // Without a checkpoint, the ring comes back through the rollback records:
  // check they are all there before changing anything.
  for (const std::shared_ptr<Sequence>& seq : locked.seqs) {
    if (seq->step->checkpointed) continue;
    for (int l = 0; l < static_cast<int>(seq->layers.size()); ++l) {
      KVC_RETURN_IF_ERROR(impl.window_part->CheckTruncateLayer(*seq, l, seq->layers[static_cast<size_t>(l)].length, seq->step->start));
    }
  }
  for (const std::shared_ptr<Sequence>& seq_ptr : locked.seqs) {
    Sequence& seq = *seq_ptr;
    OpenStep& step = *seq.step;
    int64_t reached = step.start;  // the furthest any layer got
    for (const LayerStreams& ls : seq.layers) reached = std::max(reached, ls.length);
    if (step.checkpointed) {  // ring, rollback records and compressor state back from the copies
      for (const int s : kCheckpointStreams) {
        const std::vector<PageId>& copy = step.checkpoint[static_cast<size_t>(s)];
        for (size_t k = 0; k < copy.size(); ++k) {
          if (!store.page_manager()) store.CopyPage(s, copy[k], seq.tables[static_cast<size_t>(s)][k], nullptr);
        }
      }
    } else {
      for (int l = 0; l < static_cast<int>(seq.layers.size()); ++l) {
        impl.window_part->TruncateLayer(seq, l, seq.layers[static_cast<size_t>(l)].length, step.start);
      }
    }
    // History: the pages the plan added go, the shared originals come back.
    for (int s = 0; s < kStreamCount; ++s) {
      std::vector<PageId>& table = seq.tables[static_cast<size_t>(s)];
      while (table.size() > step.table_size[static_cast<size_t>(s)]) {
        store.Unref(s, table.back());
        table.pop_back();
      }
    }
    seq.layers = step.layers_at_plan;
    if (!step.checkpointed) {
      // What the step overwrote (rollback records, ring or state rows) is
      // gone: a later Truncate can reach back only as far as after an append
      // of `reached` tokens would allow.
      const int64_t written = impl.page_manager() ? step.start + step.new_tokens : reached;
      for (LayerStreams& ls : seq.layers) {
        ls.floor = std::max(ls.floor, written - impl.depth());
        ls.state_end = std::max(ls.state_end, written);  // the state ring keeps what it was written
      }
    }
    if (impl.page_manager() && !step.checkpointed) {  // the engine's ring rows stay where it wrote them
      // (a checkpointed step's abort copies put the ring back as planned)
      for (LayerStreams& ls : seq.layers) ls.ring_end = std::max(ls.ring_end, step.start + step.new_tokens);
    }
    EndStep(store, seq, /*keep_copies=*/false);
  }
  std::lock_guard<std::mutex> lock(impl.mu);
  impl.open_steps.erase(epoch);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Cache::CompleteSteps(uint64_t epoch) {
  PageStore& store = *impl_->store;
  if (epoch > store.epoch()) {
    return absl::InvalidArgumentError(absl::StrCat("CompleteSteps: epoch ", epoch, " was never planned (the last is ",
                                                   store.epoch(), ")"));
  }
  return store.CompleteSteps(epoch);
}

}  // namespace kvc
