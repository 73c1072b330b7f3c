// Internal to kvc (not installed): the cache's private state, Cache::Impl:
// the sequences, their locks, and the parts the cache is composed of
// (src/stream_part.h: window, history, compressor state), which it
// orchestrates. Shared by the cache (cache.cc) and snapshots (snapshot.cc),
// which encode and restore through the parts.
#ifndef KVC_SRC_CACHE_INTERNAL_H_
#define KVC_SRC_CACHE_INTERNAL_H_

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "kvc/compressor.h"
#include "kvc/row_kernels.h"
#include "src/status.h"
#include "src/compressor_run.h"
#include "src/compressor_state.h"
#include "src/history_stream.h"
#include "src/page_store.h"
#include "src/rope_rows.h"
#include "src/prefix_cache.h"
#include "src/stream_part.h"
#include "src/window_stream.h"

namespace kvc {

using cache_internal::CompressorState;
using cache_internal::EntriesAt;
using cache_internal::HistoryStream;
using cache_internal::kKvDataBytes;
using cache_internal::kKvRowBytes;
using cache_internal::kKvScaleBytes;
using cache_internal::KvcCompresses;
using cache_internal::LayerParts;
using cache_internal::LayerStreams;
using cache_internal::OpenStep;
using cache_internal::PageId;
using cache_internal::PageStore;
using cache_internal::PartsOf;
using cache_internal::kNoPage;
using cache_internal::Sequence;
using cache_internal::StreamPart;
using cache_internal::WindowStream;

struct Cache::Impl {
  ModelSpec spec;
  CacheOptions options;
  std::unique_ptr<PageStore> store;  // every stream's arrays, ids and budgets
  std::unique_ptr<RopeTable> compressed_rope;  // CSA/HCA layers' RoPE
  std::unique_ptr<RopeMemo> rope_memo;         // its rows for the chunk the layers are appending
  // Per layer, [main, indexer]: whether the compressor's ape holds a nonzero
  // value below 2^-90 (which pooling sets to 0 before adding it).
  std::vector<std::array<bool, 2>> ape_has_tiny;

  // The parts, over `store`: the window (every layer), one history part per
  // history stream and one state part per compressor state stream the model
  // has (null where it has none). `all_parts` lists them all, for what every
  // part does (Reserve, Fork, Truncate, Release).
  std::unique_ptr<WindowStream> window_part;
  std::array<std::unique_ptr<HistoryStream>, cache_internal::kStreamCount> histories;
  std::array<std::unique_ptr<CompressorState>, cache_internal::kStreamCount> states;
  std::vector<const StreamPart*> all_parts;
  // Published prefixes (src/prefix_cache.h, src/cache_prefix.cc); after
  // `store`, so it goes first.
  std::unique_ptr<cache_internal::PrefixCache> prefix;

  mutable std::mutex mu;  // guards the members below
  std::unordered_map<SequenceId, std::shared_ptr<Sequence>> sequences;
  SequenceId next_id = 1;
  std::map<uint64_t, std::vector<SequenceId>> open_steps;  // epoch -> its sequences (src/cache_step.cc)

  // Builds the parts over `store` (set first).
  void Compose() {
    window_part = std::make_unique<WindowStream>(*store, spec.window, options.draft_slots, options.rollback_depth,
                                                 options.rows_per_page);
    all_parts.push_back(window_part.get());
    for (const int s : {cache_internal::kCsaRowsStream, cache_internal::kCsaKeysStream, cache_internal::kHcaRowsStream}) {
      if (!store->present(s)) continue;
      histories[static_cast<size_t>(s)] = std::make_unique<HistoryStream>(*store, s);
      all_parts.push_back(histories[static_cast<size_t>(s)].get());
    }
    for (const int s : {cache_internal::kCsaStateStream, cache_internal::kCsaIndexerStateStream,
                        cache_internal::kHcaStateStream}) {
      if (!store->present(s)) continue;
      states[static_cast<size_t>(s)] = std::make_unique<CompressorState>(*store, s, spec, options.rollback_depth);
      all_parts.push_back(states[static_cast<size_t>(s)].get());
    }
    prefix = std::make_unique<cache_internal::PrefixCache>(
        *store, options.prefix_block_tokens,
        cache_internal::PrefixCache::CheckpointStreams(*store, window_part->ring_pages()));
    // Pages become cache-only when sequences let go of them (Free, Truncate,
    // copy-on-write): the prefix cache then evicts what no longer fits.
    store->SetOverBudgetHook([cache = prefix.get()] {
      std::lock_guard<std::mutex> lock(cache->mu());
      cache->Trim();
    });
  }

  int32_t window() const { return spec.window; }
  bool page_manager() const { return options.page_manager; }
  // kFailedPrecondition for a call that touches page bytes, in page-manager mode.
  absl::Status RefuseInPageManagerMode(const char* what) const {
    if (!page_manager()) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        what, ": the cache is in page-manager mode, where kvc never reads or writes page bytes; the engine writes "
              "rows through a StepPlan's slots"));
  }
  // kFailedPrecondition while `seq` is in an open step.
  static absl::Status RefuseInStep(const Sequence& seq, SequenceId id, const char* what) {
    if (seq.step == nullptr) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(what, ": sequence ", id, " is in open step ", seq.step->epoch,
                                                      "; commit or abort it first"));
  }
  int64_t ring_slots() const { return window_part->ring_slots(); }  // window + draft_slots
  // The oldest position of `layer` whose window row the ring still holds
  // (LayerStreams::ring_end).
  int64_t OldestRingPosition(const Sequence& seq, int layer) const {
    return std::max<int64_t>(0, seq.layers[static_cast<size_t>(layer)].ring_end - ring_slots());
  }
  int32_t depth() const { return options.rollback_depth; }
  int32_t rows_per_page() const { return options.rows_per_page; }

  // Adds a fully built sequence and returns its new id. If the map cannot
  // grow (std::bad_alloc), the sequence's pages are released before the
  // exception propagates: nothing changed.
  SequenceId Register(std::shared_ptr<Sequence> seq) {
    std::lock_guard<std::mutex> lock(mu);
    try {
      sequences.emplace(next_id, seq);
    } catch (...) {
      Release(*seq);
      throw;
    }
    return next_id++;
  }

  // The live sequences' ids, ascending.
  std::vector<SequenceId> Ids() const {
    std::lock_guard<std::mutex> lock(mu);
    std::vector<SequenceId> ids;
    for (const auto& entry : sequences) ids.push_back(entry.first);
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  absl::StatusOr<std::shared_ptr<Sequence>> Find(SequenceId id) const {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = sequences.find(id);
    if (it == sequences.end()) return absl::NotFoundError(absl::StrCat("no sequence ", id));
    return it->second;
  }

  // A live sequence with its lock held; kNotFound for unknown or freed ids.
  struct Locked {
    std::shared_ptr<Sequence> seq;
    std::unique_lock<std::mutex> lock;
    std::vector<LayerStreams>& layers() const { return seq->layers; }
  };
  absl::StatusOr<Locked> Lock(SequenceId id) const {
    KVC_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, Find(id));
    std::unique_lock<std::mutex> lock(seq->mu);
    if (seq->freed) return absl::NotFoundError(absl::StrCat("sequence ", id, " was freed"));
    return Locked{std::move(seq), std::move(lock)};
  }

  // Several sequences, each locked, in ascending id order (the order every
  // multi-sequence call takes their locks in). kInvalidArgument for an id
  // given twice; kNotFound for an unknown or freed one.
  struct LockedBatch {
    std::vector<SequenceId> ids;                  // in the caller's order
    std::vector<std::shared_ptr<Sequence>> seqs;  // in the caller's order
    std::vector<std::unique_lock<std::mutex>> locks;
  };
  absl::StatusOr<LockedBatch> LockBatch(const std::vector<SequenceId>& ids, const char* what) const {
    LockedBatch batch;
    batch.ids = ids;
    for (const SequenceId id : ids) {
      absl::StatusOr<std::shared_ptr<Sequence>> seq = Find(id);
      if (!seq.ok()) return absl::Status(seq.status().code(), absl::StrCat(what, ": ", seq.status().message()));
      batch.seqs.push_back(*std::move(seq));
    }
    std::vector<size_t> order(ids.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ids[a] < ids[b]; });
    for (size_t k = 0; k < order.size(); ++k) {
      if (k > 0 && ids[order[k]] == ids[order[k - 1]]) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": sequence ", ids[order[k]], " appears twice"));
      }
      batch.locks.emplace_back(batch.seqs[order[k]]->mu);
      if (batch.seqs[order[k]]->freed) {
        return absl::NotFoundError(absl::StrCat(what, ": sequence ", ids[order[k]], " was freed"));
      }
    }
    return batch;
  }
  // The sequences of open step `epoch`, locked; kNotFound for an unknown or
  // finished step.
  absl::StatusOr<LockedBatch> LockStep(uint64_t epoch, const char* what) const {
    std::vector<SequenceId> ids;
    {
      std::lock_guard<std::mutex> lock(mu);
      const auto it = open_steps.find(epoch);
      if (it == open_steps.end()) {
        return absl::NotFoundError(absl::StrCat(what, ": no open step ", epoch, " (committed, aborted or never planned)"));
      }
      ids = it->second;
    }
    KVC_ASSIGN_OR_RETURN(LockedBatch batch, LockBatch(ids, what));
    for (const std::shared_ptr<Sequence>& seq : batch.seqs) {  // another call may have ended it meanwhile
      if (seq->step == nullptr || seq->step->epoch != epoch) {
        return absl::NotFoundError(absl::StrCat(what, ": step ", epoch, " was committed or aborted meanwhile"));
      }
    }
    return batch;
  }

  absl::Status CheckLayer(int layer) const {
    if (layer < 0 || layer >= static_cast<int>(spec.layers.size())) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is outside [0, ", spec.layers.size(), ")"));
    }
    return absl::OkStatus();
  }

  LayerKind KindOf(int layer) const { return spec.layers[static_cast<size_t>(layer)].kind; }
  LayerParts PartsOfLayer(int layer) const { return PartsOf(KindOf(layer)); }
  // The layer's history part of its compressed rows / index keys (null: none).
  const HistoryStream* RowsOf(int layer) const { return History(PartsOfLayer(layer).rows); }
  const HistoryStream* KeysOf(int layer) const { return History(PartsOfLayer(layer).keys); }
  const HistoryStream* History(int s) const { return s < 0 ? nullptr : histories[static_cast<size_t>(s)].get(); }
  const CompressorState* State(int s) const { return s < 0 ? nullptr : states[static_cast<size_t>(s)].get(); }
  // Whether `layer` has public stream s.
  bool HasStream(int layer, int s) const {
    const std::vector<int32_t>& l = store->spec(s).layers;
    return std::binary_search(l.begin(), l.end(), layer);
  }
  // OK if `layer` (checked) has `stream`; else kNotFound naming both.
  absl::Status CheckHasStream(int layer, Stream stream) const {
    if (HasStream(layer, static_cast<int>(stream))) return absl::OkStatus();
    return absl::NotFoundError(absl::StrCat("layer ", layer, " (", LayerKindName(KindOf(layer)), ") has no ",
                                            StreamName(stream), " stream"));
  }

  // --- Compressors (the algorithm: src/compressor_run.h) --------------------

  CompressorRun RunFor(const Sequence& seq, bool indexer, int layer, const LayerTokens& t) const {
    const LayerSpec& spec_layer = spec.layers[static_cast<size_t>(layer)];
    const LayerStreams& ls = seq.layers[static_cast<size_t>(layer)];
    CompressorRun run;
    const LayerParts parts = PartsOf(spec_layer.kind);
    const CompressorState& state = *states[static_cast<size_t>(indexer ? parts.indexer_state : parts.main_state)];
    run.g = state.geometry();
    run.params = indexer ? &spec_layer.indexer : &spec_layer.compressor;
    run.state = state.Rows(seq, layer);
    run.capacity = state.capacity();
    run.kv = indexer ? t.indexer_kv.data() : t.compressor_kv.data();
    run.score = indexer ? t.indexer_score.data() : t.compressor_score.data();
    run.first = ls.length;
    run.ape_has_tiny = ape_has_tiny[static_cast<size_t>(layer)][indexer ? 1 : 0];
    run.layer = layer;
    run.indexer = indexer;
    run.norm_eps = static_cast<float>(spec.norm_eps);
    return run;
  }

  // A sequence's table of a public stream and the rows it covers (the
  // longest layer's); kNotFound if no layer has the stream.
  struct TableRows {
    const std::vector<PageId>* ids;
    int64_t rows;
    int32_t per_page;
  };
  absl::StatusOr<TableRows> TableOf(const Sequence& seq, Stream stream) const {
    const int s = static_cast<int>(stream);
    if (!store->present(s)) {
      return absl::NotFoundError(absl::StrCat("the model has no layer with a ", StreamName(stream), " stream"));
    }
    int64_t rows = 0;
    for (const int32_t l : store->spec(s).layers) rows = std::max(rows, StreamRowsOf(seq, l, s));
    // Mid-step a history table already lists the step's pages: it describes
    // the rows the step will hold (what the step's kernels address).
    if (seq.step != nullptr && History(s) != nullptr) {
      rows = std::max(rows, EntriesAt(KindOf(store->spec(s).layers[0]), seq.step->start + seq.step->new_tokens));
    }
    return TableRows{&seq.tables[static_cast<size_t>(s)], rows, store->spec(s).rows_per_page};
  }

  // Rows `layer` of `seq` holds in public stream s (the layer has it): a
  // ring's valid slots (window, compressor state), a history stream's rows.
  int64_t StreamRowsOf(const Sequence& seq, int layer, int s) const {
    const int64_t length = seq.layers[static_cast<size_t>(layer)].length;
    // The window ring holds positions [OldestRingPosition, length): in
    // page-manager mode a truncation leaves later rows in their slots.
    if (s == cache_internal::kWindowStream) return std::max<int64_t>(0, length - OldestRingPosition(seq, layer));
    if (cache_internal::IsStateStream(s)) {  // tokens [max(length, state_end) - capacity, length)
      const int64_t end = std::max(length, seq.layers[static_cast<size_t>(layer)].state_end);
      return std::max<int64_t>(0, length - std::max<int64_t>(0, end - store->spec(s).rows_per_page));
    }
    return History(s)->Rows(seq, layer);
  }

  // --- What every part does ------------------------------------------------

  // The pages of a new sequence (or fork) every part holds from its
  // creation, all or nothing, with their first contents. Allocates nothing
  // once the pages are granted (a std::bad_alloc before leaves no page).
  absl::Status AllocateState(Sequence& seq) const {
    std::vector<PageStore::Request> requests;
    for (const StreamPart* part : all_parts) part->Reserve(seq, &requests);
    seq.layers.assign(spec.layers.size(), LayerStreams{});
    KVC_RETURN_IF_ERROR(store->Allocate(requests));
    for (const StreamPart* part : all_parts) part->Init(seq);
    return absl::OkStatus();
  }

  // Drops every page reference of `seq`.
  void Release(Sequence& seq) const {
    for (const StreamPart* part : all_parts) part->Release(seq);
    seq.layers.clear();
  }

  absl::Status SameLengthEverywhere(const std::vector<LayerStreams>& layers, SequenceId id, const char* what) const {
    for (size_t i = 1; i < layers.size(); ++i) {
      if (layers[i].length != layers[0].length) {
        return absl::FailedPreconditionError(absl::StrCat(what, " sequence ", id, ": layer ", i, " holds ",
                                                          layers[i].length, " tokens but layer 0 holds ",
                                                          layers[0].length, "; finish the step first"));
      }
    }
    return absl::OkStatus();
  }
};

}  // namespace kvc

#endif  // KVC_SRC_CACHE_INTERNAL_H_
