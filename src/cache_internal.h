// Internal to kvc (not installed): the per-layer streams of a sequence and
// the cache's private state, shared by the cache (cache.cc) and snapshots
// (snapshot.cc), which store and restore exactly these members.
#ifndef KVC_SRC_CACHE_INTERNAL_H_
#define KVC_SRC_CACHE_INTERNAL_H_

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
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
#include "kvc/status.h"
#include "src/page_store.h"

namespace kvc {
namespace cache_internal {

// The parts of a 584-byte KV row (row_formats.h).
constexpr int64_t kKvDataBytes = FormatInfo(RowFormat::kKvFp8).data_bytes;    // codes + bf16 RoPE dims
constexpr int64_t kKvScaleBytes = FormatInfo(RowFormat::kKvFp8).scale_bytes;  // UE8M0 scales + padding
constexpr int64_t kKvRowBytes = FormatInfo(RowFormat::kKvFp8).row_bytes;

// fp32 values per token row of a compressor's state: kv and score (+ape), each
// width_factor * dim wide (spec §5).
inline int64_t StateRowFloats(int width_factor, int dim) { return 2 * int64_t{width_factor} * dim; }

// Compressed entries (and index keys) that exist once `length` tokens are in.
inline int64_t EntriesAt(LayerKind kind, int64_t length) {
  const int ratio = CompressRatio(kind);
  return ratio == 0 ? 0 : length / ratio;
}

// True if kvc computes this layer's compressed entries (its ModelSpec carries
// the compressor parameters); false for window-only layers and for compressed
// layers whose engine brings its own entries.
inline bool KvcCompresses(const LayerSpec& layer) {
  return layer.kind != LayerKind::kWindow && !layer.compressor.ape.empty();
}

// One layer of one sequence: its position and its rows in the history
// streams. Its pages are the sequence's (Sequence::tables).
struct LayerStreams {
  int64_t length = 0;  // tokens appended
  int64_t floor = 0;   // smallest length a Truncate may restore
  int64_t compressed_rows = 0;  // in kCsaRows (CSA) or kHcaRows (HCA)
  int64_t key_rows = 0;         // in kCsaKeys (CSA)
};

struct Sequence {
  mutable std::mutex mu;  // guards the members below
  bool freed = false;
  std::vector<LayerStreams> layers;
  // One block table per stream, shared by every layer of it (StreamIndex):
  // window ring ceil(W / B) ids; history streams the pages covering the
  // longest layer; rollback and compressor state one id each (if present).
  std::array<std::vector<PageId>, kStreamCount> tables;
  // Incremental snapshots (snapshot.cc): the history rows of this sequence
  // equal those of the snapshot entry tagged `snapshot_tag` in every layer
  // below EntriesAt(kind, snapshot_low_water) (the entry's own row counts
  // permitting). Each save draws a fresh tag; Truncate lowers the low water.
  // 0: no such snapshot.
  uint64_t snapshot_tag = 0;
  int64_t snapshot_low_water = 0;
};

}  // namespace cache_internal

using cache_internal::EntriesAt;
using cache_internal::kKvDataBytes;
using cache_internal::kKvRowBytes;
using cache_internal::kKvScaleBytes;
using cache_internal::KvcCompresses;
using cache_internal::LayerStreams;
using cache_internal::PageId;
using cache_internal::PageStore;
using cache_internal::kNoPage;
using cache_internal::Sequence;
using cache_internal::StateRowFloats;

struct Cache::Impl {
  ModelSpec spec;
  CacheOptions options;
  std::unique_ptr<PageStore> store;  // every stream's arrays, ids and budgets
  std::unique_ptr<RopeTable> compressed_rope;  // CSA/HCA layers' RoPE
  std::vector<PageId> no_pages;  // the (empty) table of a layer without the stream

  mutable std::mutex mu;  // guards the members below
  std::unordered_map<SequenceId, std::shared_ptr<Sequence>> sequences;
  SequenceId next_id = 1;

  int32_t window() const { return spec.window; }
  int32_t depth() const { return options.rollback_depth; }
  int32_t rows_per_page() const { return options.rows_per_page; }
  int64_t ring_pages() const { return (window() + rows_per_page() - 1) / rows_per_page(); }

  // Adds a fully built sequence and returns its new id.
  SequenceId Register(std::shared_ptr<Sequence> seq) {
    std::lock_guard<std::mutex> lock(mu);
    const SequenceId id = next_id++;
    sequences.emplace(id, std::move(seq));
    return id;
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

  absl::Status CheckLayer(int layer) const {
    if (layer < 0 || layer >= static_cast<int>(spec.layers.size())) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is outside [0, ", spec.layers.size(), ")"));
    }
    return absl::OkStatus();
  }

  LayerKind KindOf(int layer) const { return spec.layers[static_cast<size_t>(layer)].kind; }
  // The layer's compressed-rows stream (-1 for a window layer) and its main
  // compressor state stream (-1 likewise).
  int RowsStream(int layer) const {
    const LayerKind k = KindOf(layer);
    return k == LayerKind::kCsa ? cache_internal::kCsaRowsStream : k == LayerKind::kHca ? cache_internal::kHcaRowsStream : -1;
  }
  int StateStream(int layer) const {
    const LayerKind k = KindOf(layer);
    return k == LayerKind::kCsa ? cache_internal::kCsaStateStream : k == LayerKind::kHca ? cache_internal::kHcaStateStream : -1;
  }
  // Whether `layer` has public stream s.
  bool HasStream(int layer, int s) const {
    const std::vector<int32_t>& l = store->spec(s).layers;
    return std::binary_search(l.begin(), l.end(), layer);
  }
  // The one page of a per-sequence stream (rollback, compressor state).
  uint8_t* OnePage(const Sequence& seq, int s, int layer) const {
    return store->Page(s, layer, seq.tables[static_cast<size_t>(s)][0]);
  }

  // --- Window part: ring and rollback records ----------------------------

  PackedRows RingPage(const Sequence& seq, int layer, int64_t page) const {
    return PageFooterRows(RowFormat::kKvFp8,
                          store->Page(cache_internal::kWindowStream, layer,
                                      seq.tables[cache_internal::kWindowStream][static_cast<size_t>(page)]),
                          rows_per_page());
  }
  // The one-row view of ring slot `slot`.
  PackedRows RingSlot(const Sequence& seq, int layer, int64_t slot) const {
    return RingPage(seq, layer, slot / rows_per_page()).Slice(slot % rows_per_page(), 1);
  }
  // Rollback record i: a contiguous 584-byte row, plus the position whose
  // append evicted it (-1: none).
  uint8_t* RollbackData(const Sequence& seq, int layer) const {
    return OnePage(seq, cache_internal::kRollbackStream, layer);
  }
  PackedRows RollbackRow(const Sequence& seq, int layer, int64_t i) const {
    return ContiguousRows(RowFormat::kKvFp8, RollbackData(seq, layer), depth()).Slice(i, 1);
  }
  int64_t* RollbackEvictors(const Sequence& seq, int layer) const {
    return reinterpret_cast<int64_t*>(RollbackData(seq, layer) + depth() * kKvRowBytes);
  }

  WindowRingView RingView(const Sequence& seq, int layer) const {
    WindowRingView view;
    view.rows_per_page = rows_per_page();
    view.window = window();
    view.length = seq.layers[static_cast<size_t>(layer)].length;
    for (int64_t p = 0; p < ring_pages(); ++p) view.pages.push_back(RingPage(seq, layer, p));
    return view;
  }

  static void CopyRow(ConstPackedRows from, PackedRows to) { CopyRows(RowFormat::kKvFp8, from.Slice(0, 1), to); }
  static void ZeroRow(PackedRows row) {
    std::memset(row.data, 0, kKvDataBytes);
    std::memset(row.scales, 0, kKvScaleBytes);
  }

  // Writes tokens [L, L + n) into the ring. Only the rows that survive are
  // quantized: the last `window` into their slots, and for the last `depth`
  // positions q the row each evicts (position q - W, from the old ring or
  // from this chunk) into rollback record q mod depth. The caller checked
  // the rows finite (all QuantizeKvRows refuses), so this does not fail; a
  // refusal would be a broken invariant and is returned, not dropped.
  absl::Status WriteWindow(const Sequence& seq, int layer, absl::Span<const Bf16> rows) const {
    const int64_t L = seq.layers[static_cast<size_t>(layer)].length;
    const int64_t n = static_cast<int64_t>(rows.size()) / kHeadDim;
    const int64_t W = window();
    auto quantize = [&](int64_t position, PackedRows to) {
      return QuantizeKvRows(rows.subspan(static_cast<size_t>((position - L) * kHeadDim), kHeadDim), to);
    };
    if (depth() > 0) {
      int64_t* evictors = RollbackEvictors(seq, layer);
      for (int64_t q = std::max(L, L + n - depth()); q < L + n; ++q) {
        const int64_t evicted = q - W;
        const PackedRows record = RollbackRow(seq, layer, q % depth());
        if (evicted < 0) {
          ZeroRow(record);
        } else if (evicted < L) {
          CopyRow(RingSlot(seq, layer, evicted % W), record);
        } else {
          KVC_RETURN_IF_ERROR(quantize(evicted, record));
        }
        evictors[q % depth()] = q;
      }
    }
    // Ring slots, in runs that stay inside one page.
    for (int64_t p = std::max(L, L + n - W); p < L + n;) {
      const int64_t slot = p % W;
      const int64_t in_page = slot % rows_per_page();
      int64_t run = std::min({L + n - p, W - slot, rows_per_page() - in_page});
      KVC_RETURN_IF_ERROR(QuantizeKvRows(rows.subspan(static_cast<size_t>((p - L) * kHeadDim), static_cast<size_t>(run * kHeadDim)),
                                         RingPage(seq, layer, slot / rows_per_page()).Slice(in_page, run)));
      p += run;
    }
    return absl::OkStatus();
  }

  // --- History part: append-only rows, shared between forks -------------

  // One layer's side of one history stream of a sequence: the stream's
  // table (shared by its layers) and this layer's row count.
  struct History {
    std::vector<PageId>* pages;
    int64_t* rows;
    int stream;  // -1: the layer has no such stream (no pages, no rows)
    int layer;
    RowFormat format;
    int64_t per_page;
  };
  History HistoryOf(Sequence& seq, int layer, int stream, bool keys) const {
    LayerStreams& ls = seq.layers[static_cast<size_t>(layer)];
    History h{stream < 0 ? const_cast<std::vector<PageId>*>(&no_pages) : &seq.tables[static_cast<size_t>(stream)],
              keys ? &ls.key_rows : &ls.compressed_rows, stream, layer,
              keys ? RowFormat::kIndexFp4 : RowFormat::kKvFp8,
              keys ? options.keys_per_page : options.rows_per_page};
    return h;
  }
  History CompressedOf(Sequence& seq, int layer) const { return HistoryOf(seq, layer, RowsStream(layer), false); }
  History KeysOf(Sequence& seq, int layer) const {
    return HistoryOf(seq, layer, KindOf(layer) == LayerKind::kCsa ? cache_internal::kCsaKeysStream : -1, true);
  }
  PackedRows HistoryPage(const History& h, size_t page) const {
    return PageFooterRows(h.format, store->Page(h.stream, h.layer, (*h.pages)[page]), h.per_page);
  }

  // The pages `n` more rows of one layer need: new pages past the table, plus
  // a private copy of every page of the table they write into that is shared
  // with a fork (copied in every layer of the stream). Allocated now (all or
  // nothing); CommitHistory uses them, AbandonHistory returns them.
  struct HistoryPlan {
    std::vector<PageId> fresh;
    std::vector<size_t> copies;  // table positions to copy, ascending
  };
  absl::StatusOr<HistoryPlan> PlanHistory(const History& h, int64_t n) const {
    HistoryPlan plan;
    if (n <= 0) return plan;
    const int64_t rows = *h.rows;
    const int64_t end = (rows + n + h.per_page - 1) / h.per_page;
    const int64_t have = static_cast<int64_t>(h.pages->size());
    for (int64_t p = rows / h.per_page; p < std::min(end, have); ++p) {
      if (store->RefCount(h.stream, (*h.pages)[static_cast<size_t>(p)]) > 1) plan.copies.push_back(static_cast<size_t>(p));
    }
    const int64_t new_pages = std::max<int64_t>(0, end - have);
    KVC_RETURN_IF_ERROR(store->Allocate(h.stream, new_pages + static_cast<int64_t>(plan.copies.size()), &plan.fresh));
    return plan;
  }
  void AbandonHistory(const History& h, const HistoryPlan& plan) const {
    for (const PageId id : plan.fresh) store->Unref(h.stream, id);
  }

  // Takes the planned pages into the stream and writes n rows through
  // write(i, run, to): rows [i, i + run) of the input into `to`. The caller
  // checked the rows against what `write` accepts, so this does not fail; a
  // refusal would be a broken invariant and is returned, not dropped (the
  // pages are in the stream either way: nothing leaks).
  template <typename Write>
  absl::Status CommitHistory(const History& h, const HistoryPlan& plan, int64_t n, Write write) const {
    const int64_t rows = *h.rows;
    size_t next = 0;
    for (const size_t p : plan.copies) {  // copy-on-write, in every layer of the stream
      const PageId shared = (*h.pages)[p];
      store->CopyPage(h.stream, shared, plan.fresh[next]);
      store->Unref(h.stream, shared);
      (*h.pages)[p] = plan.fresh[next++];
    }
    while (next < plan.fresh.size()) h.pages->push_back(plan.fresh[next++]);
    for (int64_t i = 0; i < n;) {
      const int64_t at = rows + i;
      const int64_t run = std::min(n - i, h.per_page - at % h.per_page);
      const absl::Status s = write(i, run, HistoryPage(h, static_cast<size_t>(at / h.per_page)).Slice(at % h.per_page, run));
      if (!s.ok()) return absl::InternalError(absl::StrCat("a checked row was refused: ", s.message()));
      i += run;
    }
    *h.rows += n;
    return absl::OkStatus();
  }
  // Writes bf16 values quantized by `quantize` (dims values per row).
  static auto Quantizer(absl::Span<const Bf16> values, int dims,
                        absl::Status (*quantize)(absl::Span<const Bf16>, PackedRows)) {
    return [values, dims, quantize](int64_t i, int64_t run, PackedRows to) {
      return quantize(values.subspan(static_cast<size_t>(i * dims), static_cast<size_t>(run * dims)), to);
    };
  }

  absl::Status AppendHistory(const History& h, absl::Span<const Bf16> values, int dims,
                             absl::Status (*quantize)(absl::Span<const Bf16>, PackedRows)) const {
    const int64_t n = static_cast<int64_t>(values.size()) / dims;
    KVC_ASSIGN_OR_RETURN(const HistoryPlan plan, PlanHistory(h, n));
    return CommitHistory(h, plan, n, Quantizer(values, dims, quantize));
  }

  // Drops the rows of `seq`'s history streams past the entries `length`
  // tokens close, in every layer, and the pages no layer needs any more.
  void TruncateHistory(Sequence& seq, int64_t length) const {
    int64_t longest[cache_internal::kStreamCount] = {};
    for (int i = 0; i < static_cast<int>(seq.layers.size()); ++i) {
      LayerStreams& ls = seq.layers[static_cast<size_t>(i)];
      const int64_t keep = EntriesAt(KindOf(i), length);
      ls.compressed_rows = std::min(ls.compressed_rows, keep);
      ls.key_rows = std::min(ls.key_rows, keep);
      if (RowsStream(i) >= 0) longest[RowsStream(i)] = std::max(longest[RowsStream(i)], ls.compressed_rows);
      if (KindOf(i) == LayerKind::kCsa) {
        longest[cache_internal::kCsaKeysStream] = std::max(longest[cache_internal::kCsaKeysStream], ls.key_rows);
      }
    }
    for (const int s : {cache_internal::kCsaRowsStream, cache_internal::kCsaKeysStream, cache_internal::kHcaRowsStream}) {
      const int64_t per_page = store->spec(s).rows_per_page;
      std::vector<PageId>& table = seq.tables[static_cast<size_t>(s)];
      const size_t keep_pages = static_cast<size_t>((longest[s] + per_page - 1) / per_page);
      while (table.size() > keep_pages) {
        store->Unref(s, table.back());
        table.pop_back();
      }
    }
  }

  // --- Compressors ---------------------------------------------------------

  // One compressor of one layer: its geometry, the engine's parameters, its
  // state ring (token rows kv ‖ score + ape, slot = t mod capacity) and the
  // chunk being appended.
  struct CompressorRun {
    CompressorGeometry g;
    const CompressorParams* params;
    float* state;
    int64_t capacity;  // token rows in the state ring
    const float* kv;     // chunk projections, n x width
    const float* score;  // without ape
    int64_t first;       // position of the chunk's first token
    int layer;           // for messages
    bool indexer;        // CSA's indexer (index keys) rather than the main compressor
  };

  int64_t StateCapacity(const CompressorGeometry& g) const { return g.span() + depth(); }

  // The layer's compressor state page (main or indexer).
  uint8_t* StateData(const Sequence& seq, int layer, bool indexer) const {
    return OnePage(seq, indexer ? cache_internal::kCsaIndexerStateStream : StateStream(layer), layer);
  }

  CompressorRun RunFor(const Sequence& seq, bool indexer, int layer, const LayerTokens& t) const {
    const LayerSpec& spec_layer = spec.layers[static_cast<size_t>(layer)];
    const LayerStreams& ls = seq.layers[static_cast<size_t>(layer)];
    CompressorRun run;
    run.g = indexer ? IndexerCompressor(spec.index_dim) : MainCompressor(spec_layer.kind, spec.head_dim);
    run.params = indexer ? &spec_layer.indexer : &spec_layer.compressor;
    run.state = reinterpret_cast<float*>(StateData(seq, layer, indexer));
    run.capacity = StateCapacity(run.g);
    run.kv = indexer ? t.indexer_kv.data() : t.compressor_kv.data();
    run.score = indexer ? t.indexer_score.data() : t.compressor_score.data();
    run.first = ls.length;
    run.layer = layer;
    run.indexer = indexer;
    return run;
  }

  // Token t's `half` (0 or 1) as a pooling slot: from the state ring if it
  // was appended before this chunk (its score already holds ape), else from
  // the chunk (ape added on the fly).
  static PoolSlot Slot(const CompressorRun& run, int64_t t, int half) {
    const int64_t width = run.g.width();
    const int64_t offset = half * run.g.dim;
    if (t < run.first) {
      const float* row = run.state + (t % run.capacity) * 2 * width;
      return {row + offset, row + width + offset, nullptr};
    }
    const int64_t i = t - run.first;
    return {run.kv + i * width + offset, run.score + i * width + offset,
            run.params->ape.data() + (t % run.g.ratio) * width + offset};
  }

  // The pooling slots of entry i (at most 256), with each slot's token.
  static int EntrySlots(const CompressorRun& run, int64_t i, PoolSlot* slots, int64_t* tokens) {
    const CompressorGeometry& g = run.g;
    int count = 0;
    auto add = [&](int64_t t, int half) {
      tokens[count] = t;
      slots[count++] = Slot(run, t, half);
    };
    if (g.overlap && i > 0) {  // the previous window's first halves (none for entry 0)
      for (int j = 0; j < g.ratio; ++j) add((i - 1) * g.ratio + j, 0);
    }
    for (int j = 0; j < g.ratio; ++j) add(i * g.ratio + j, g.overlap ? 1 : 0);
    return count;
  }

  // Entry i of a compressor: pools its window's slots, then norm + RoPE with
  // the given (cos, sin) pairs into `out` (dim bf16 values).
  void ComputeEntry(const CompressorRun& run, int64_t i, const float* cos_sin, float* pooled, Bf16* out) const {
    PoolSlot slots[256];
    int64_t tokens[256];
    const int count = EntrySlots(run, i, slots, tokens);
    PoolChannels(slots, count, run.g.dim, pooled);
    NormRope(pooled, run.g.dim, run.params->norm_weight.data(), static_cast<float>(spec.norm_eps), cos_sin, out);
  }

  // The largest bf16 magnitudes (bits without the sign) the row kernels
  // store (row_kernels.cc): any finite value in a KV row; up to 2^120 in an
  // index key (its Hadamard must not overflow).
  static constexpr uint16_t kMaxKeyBits = 0x7B80;  // 2^120

  // OK if QuantizeKvRows (main) or QuantizeIndexKeys (indexer) accepts the
  // computed row `out` of entry i; else kInvalidArgument naming the layer,
  // the entry's tokens, the channel, the cause and the token that dominates it.
  absl::Status CheckEntry(const CompressorRun& run, int64_t i, const Bf16* out) const {
    // Entries: NoPE dims up to kMaxKvNopeBf16Bits, RoPE dims any finite value.
    const uint16_t max_bits = run.indexer ? kMaxKeyBits : kMaxKvNopeBf16Bits;
    const int limited_dims = run.indexer ? run.g.dim : kNopeDim;
    uint16_t largest = 0, largest_rest = 0;
    for (int c = 0; c < limited_dims; ++c) largest = std::max<uint16_t>(largest, out[c].bits & 0x7FFF);
    for (int c = limited_dims; c < run.g.dim; ++c) largest_rest = std::max<uint16_t>(largest_rest, out[c].bits & 0x7FFF);
    if (largest <= max_bits && largest_rest <= kMaxFiniteBf16Bits) return absl::OkStatus();
    return RefusedEntry(run, i, out, max_bits, std::max(largest, largest_rest) >= 0x7F80);
  }

  absl::Status RefusedEntry(const CompressorRun& run, int64_t i, const Bf16* out, uint16_t max_bits,
                            bool non_finite) const {
    const CompressorGeometry& g = run.g;
    PoolSlot slots[256];
    int64_t tokens[256];
    const int count = EntrySlots(run, i, slots, tokens);
    std::vector<float> pooled(static_cast<size_t>(g.dim));
    PoolChannels(slots, count, g.dim, pooled.data());
    const char* kv_name = run.indexer ? "indexer_kv" : "compressor_kv";
    // The cause: a pooled value bf16 cannot hold, else RMSNorm and RoPE.
    int channel = -1;
    std::string cause;
    for (int c = 0; c < g.dim && channel < 0; ++c) {
      const float x = pooled[static_cast<size_t>(c)];
      if (std::isfinite(RoundToBf16(x))) continue;
      channel = c;
      cause = absl::StrCat("the pooled ", kv_name, " there, ", x, std::isfinite(x) ? ", exceeds bf16's range" : ", overflows fp32");
    }
    for (int c = 0; c < g.dim && channel < 0; ++c) {
      if ((out[c].bits & 0x7FFF) <= (run.indexer || c < kNopeDim ? max_bits : kMaxFiniteBf16Bits)) continue;
      channel = c;
      cause = absl::StrCat("RMSNorm (norm_weight ", run.params->norm_weight[static_cast<size_t>(c)],
                           ") and RoPE make it ", ToF32(out[c]));
    }
    if (channel < 0) return absl::InternalError(absl::StrCat("Append: layer ", run.layer, ": entry ", i, " refused without cause"));
    // The token that dominates that channel: the largest softmax weight x |kv|.
    int top = 0;
    {
      float s[256], max = -INFINITY, best = -1.0f;
      for (int j = 0; j < count; ++j) {
        s[j] = slots[j].ape != nullptr ? slots[j].score[channel] + slots[j].ape[channel] : slots[j].score[channel];
        max = std::max(max, s[j]);
      }
      for (int j = 0; j < count; ++j) {
        const float weight = SoftmaxExp(s[j] - max) * std::fabs(slots[j].kv[channel]);
        if (weight > best) best = weight, top = j;
      }
    }
    const int64_t column = (g.overlap && tokens[top] >= i * g.ratio ? g.dim : 0) + channel;
    const int64_t first_token = g.overlap && i > 0 ? (i - 1) * g.ratio : i * g.ratio;
    return absl::InvalidArgumentError(absl::StrCat(
        "Append: layer ", run.layer, ": ", run.indexer ? "index key " : "compressed entry ", i, " (tokens [",
        first_token, ", ", (i + 1) * g.ratio, ")) would ",
        non_finite     ? "not be finite"
        : run.indexer  ? "exceed 2^120 (the index key limit)"
                       : "read back as infinity (|x| >= 248 x 2^120 rounds to the FP8 code of 2^128)",
        " at channel ", channel, ": ",
        cause, "; it comes mostly from position ", tokens[top], "'s ", kv_name, " column ", column, " (",
        slots[top].kv[channel], ")"));
  }

  // Refuses tokens [first + from, first + to) of the chunk if a score + ape
  // overflows fp32: that sum is what the state ring keeps for the token (and
  // what a snapshot stores), so it must be finite.
  static absl::Status CheckScorePlusApe(const CompressorRun& run, int64_t from, int64_t to) {
    const int64_t width = run.g.width();
    for (int64_t i = from; i < to; ++i) {
      const float* score = run.score + i * width;
      const float* ape = run.params->ape.data() + ((run.first + i) % run.g.ratio) * width;
      int overflow = 0;
      for (int64_t c = 0; c < width; ++c) {
        const float sum = score[c] + ape[c];
        overflow |= (sum - sum != 0.0f);  // inf - inf is NaN
      }
      if (overflow == 0) continue;
      for (int64_t c = 0; c < width; ++c) {
        if (std::isfinite(score[c] + ape[c])) continue;
        return absl::InvalidArgumentError(absl::StrCat(
            "Append: layer ", run.layer, " ", run.indexer ? "indexer_score" : "compressor_score", " at position ",
            run.first + i, " channel ", c, ": score ", score[c], " + ape ", ape[c],
            " overflows fp32 (the compressor state keeps that sum)"));
      }
    }
    return absl::OkStatus();
  }

  // The entries (and, with an indexer, keys) of the windows that close with
  // tokens [from, to) of the chunk, written at their index relative to the
  // chunk's first closed window; changes nothing in the cache. Refuses an
  // entry or key the row kernels would not store (CheckEntry).
  absl::Status ComputeEntries(const CompressorRun& main, const CompressorRun* indexer, int64_t from, int64_t to,
                      std::vector<Bf16>& entries, std::vector<Bf16>& keys) const {
    const int m = main.g.ratio;
    const int64_t first_entry = main.first / m;
    std::vector<float> pooled(static_cast<size_t>(main.g.dim));
    float cos_sin[64];
    for (int64_t i = from / m; i < to / m; ++i) {
      compressed_rope->At(i * m, cos_sin);       // shared by the entry and its index key
      const size_t at = static_cast<size_t>(i - first_entry);
      Bf16* entry = &entries[at * static_cast<size_t>(main.g.dim)];
      ComputeEntry(main, i, cos_sin, pooled.data(), entry);
      KVC_RETURN_IF_ERROR(CheckEntry(main, i, entry));
      if (indexer != nullptr) {
        Bf16* key = &keys[at * static_cast<size_t>(indexer->g.dim)];
        ComputeEntry(*indexer, i, cos_sin, pooled.data(), key);
        KVC_RETURN_IF_ERROR(CheckEntry(*indexer, i, key));
      }
    }
    return absl::OkStatus();
  }

  // Keeps the chunk's last tokens (as many as the ring holds) in the state
  // ring: kv, then score + ape.
  static void WriteState(const CompressorRun& run, int64_t n) {
    const int64_t width = run.g.width();
    for (int64_t t = std::max(run.first, run.first + n - run.capacity); t < run.first + n; ++t) {
      const PoolSlot src = Slot(run, t, 0);
      float* row = run.state + (t % run.capacity) * 2 * width;
      std::memcpy(row, src.kv, static_cast<size_t>(width) * sizeof(float));
      for (int64_t c = 0; c < width; ++c) row[width + c] = src.score[c] + src.ape[c];
    }
  }

  HistoryView ViewOf(const History& h) const {
    HistoryView view;
    view.rows_per_page = static_cast<int32_t>(h.per_page);
    view.rows = *h.rows;
    for (size_t p = 0; p < h.pages->size(); ++p) view.pages.push_back(HistoryPage(h, p));
    return view;
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
    for (const int32_t l : store->spec(s).layers) {
      const LayerStreams& ls = seq.layers[static_cast<size_t>(l)];
      rows = std::max(rows, s == cache_internal::kWindowStream    ? std::min<int64_t>(ls.length, window())
                            : s == cache_internal::kCsaKeysStream ? ls.key_rows
                                                                  : ls.compressed_rows);
    }
    return TableRows{&seq.tables[static_cast<size_t>(s)], rows, store->spec(s).rows_per_page};
  }

  // --- State part: the pages a sequence holds from its creation ----------

  // Private to a sequence, constant size, copied on fork.
  static constexpr int kStateStreams[] = {cache_internal::kWindowStream, cache_internal::kRollbackStream,
                                          cache_internal::kCsaStateStream, cache_internal::kCsaIndexerStateStream,
                                          cache_internal::kHcaStateStream};

  // The private pages of a new sequence (or fork): ring, rollback records,
  // compressor state, all or nothing. Rollback records start empty.
  absl::Status AllocateState(Sequence& seq) const {
    std::vector<PageStore::Request> requests;
    for (const int s : kStateStreams) {
      if (!store->present(s)) continue;
      requests.push_back({s, s == cache_internal::kWindowStream ? ring_pages() : 1, &seq.tables[static_cast<size_t>(s)]});
    }
    KVC_RETURN_IF_ERROR(store->Allocate(requests));
    seq.layers.assign(spec.layers.size(), LayerStreams{});
    if (depth() > 0) {
      for (int i = 0; i < static_cast<int>(seq.layers.size()); ++i) std::fill_n(RollbackEvictors(seq, i), depth(), int64_t{-1});
    }
    return absl::OkStatus();
  }

  // Drops every page reference of `seq`.
  void Release(Sequence& seq) const {
    for (int s = 0; s < cache_internal::kStreamCount; ++s) {
      for (const PageId id : seq.tables[static_cast<size_t>(s)]) store->Unref(s, id);
      seq.tables[static_cast<size_t>(s)].clear();
    }
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
