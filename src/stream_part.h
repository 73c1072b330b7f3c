// Internal to kvc (not installed): the common contract of the cache's parts
// (which parts a layer kind has: PartsOf in src/page_store.h).
//
// The cache (Cache::Impl) is composed of simple parts, as llama.cpp builds
// its hybrid cache from simple caches (docs/architecture.md):
//   WindowStream     (src/window_stream.h)     the ring + rollback records
//   HistoryStream    (src/history_stream.h)    append-only rows or keys, one per history stream
//   CompressorState  (src/compressor_state.h)  a compressor's open-window rows, one per state stream
// Each owns some streams of the PageStore and the tables of those streams in
// a Sequence, and implements StreamPart for them; each encodes its share of
// a snapshot and restores it.
#ifndef KVC_SRC_STREAM_PART_H_
#define KVC_SRC_STREAM_PART_H_

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "kvc/cache.h"
#include "kvc/model_spec.h"
#include "kvc/row_formats.h"
#include "src/page_store.h"

namespace kvc {
namespace cache_internal {

// The parts of a 584-byte KV row (row_formats.h).
constexpr int64_t kKvDataBytes = FormatInfo(RowFormat::kKvFp8).data_bytes;    // codes + bf16 RoPE dims
constexpr int64_t kKvScaleBytes = FormatInfo(RowFormat::kKvFp8).scale_bytes;  // UE8M0 scales + padding
constexpr int64_t kKvRowBytes = FormatInfo(RowFormat::kKvFp8).row_bytes;

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
  // The furthest length whose ring rows were written: the ring holds the
  // rows of positions [ring_end - ring slots, length). Equal to `length` in
  // kvc's mode (a truncation or abort puts evicted rows back); in
  // page-manager mode a truncation or abort leaves the later rows in place,
  // so older positions are gone until the sequence grows past ring_end.
  int64_t ring_end = 0;
  // The furthest length whose compressor state rows were written (never
  // lowered by a truncation, in either mode: the state ring keeps `depth`
  // extra rows instead of rollback records). The state ring holds the
  // tokens [max(length, state_end) - capacity, length).
  int64_t state_end = 0;
};

// A sequence's part in an open step (Cache::PlanStep): what the plan
// reserved, and what an abort puts back.
struct OpenStep {
  uint64_t epoch = 0;
  int64_t start = 0;       // every layer's length when planned
  int64_t new_tokens = 0;
  std::vector<LayerStreams> layers_at_plan;
  // Per stream: the table's length when planned, and the shared pages the
  // plan replaced by private copies (table position, original id; the
  // original stays referenced until the step ends).
  std::array<size_t, kStreamCount> table_size{};
  std::array<std::vector<std::pair<size_t, PageId>>, kStreamCount> replaced;
  // A step longer than the rollback depth: a copy of each state stream's
  // pages (ring, rollback records, compressor state), in table order.
  bool checkpointed = false;
  std::array<std::vector<PageId>, kStreamCount> checkpoint;
};

struct Sequence {
  mutable std::mutex mu;  // guards the members below
  bool freed = false;
  std::unique_ptr<OpenStep> step;  // non-null while the sequence is in an open step
  std::vector<LayerStreams> layers;
  // One block table per stream, shared by every layer of it (StreamIndex):
  // window ring ceil(W / B) ids; history streams the pages covering the
  // longest layer; rollback and compressor state one id each (if present).
  // Each part owns the tables of its streams.
  std::array<std::vector<PageId>, kStreamCount> tables;
  // Incremental snapshots (snapshot.cc): the history rows of this sequence
  // equal those of the snapshot entry tagged `snapshot_tag` in every layer
  // below EntriesAt(kind, snapshot_low_water) (the entry's own row counts
  // permitting). Each save draws a fresh tag; Truncate lowers the low water.
  // 0: no such snapshot.
  uint64_t snapshot_tag = 0;
  int64_t snapshot_low_water = 0;
};

// What every part does for the sequences, on the streams it owns. A
// mutation is planned (Reserve: can fail, changes nothing but the request
// list) and then applied (Init, Fork, Truncate, Release: cannot fail). The
// caller holds the sequence's lock.
class StreamPart {
 public:
  virtual ~StreamPart() = default;
  // Adds the pages a new sequence (or fork) holds from its creation to
  // `requests`; the cache grants every part's requests together or none.
  virtual void Reserve(Sequence& seq, std::vector<PageStore::Request>* requests) const = 0;
  // The granted pages' first contents (the store hands them out zeroed).
  virtual void Init(Sequence& /*seq*/) const {}
  // Makes `child` (reserved and granted) hold what `parent` holds: private
  // pages copied (in page-manager mode listed in *engine_copies for the
  // engine), shared pages referenced.
  virtual void Fork(const Sequence& parent, Sequence& child, std::vector<PageCopy>* engine_copies) const = 0;
  // Every layer goes back from `current` to `length` tokens (the cache
  // checked the rollback floor; `layers[i].length` still reads `current`).
  virtual void Truncate(Sequence& seq, int64_t current, int64_t length) const = 0;
  // Drops every page reference of the part's streams.
  virtual void Release(Sequence& seq) const = 0;

 protected:
  // Unrefs and clears the table of stream s.
  static void ReleaseTable(PageStore& store, Sequence& seq, int s) {
    for (const PageId id : seq.tables[static_cast<size_t>(s)]) store.Unref(s, id);
    seq.tables[static_cast<size_t>(s)].clear();
  }
};

}  // namespace cache_internal
}  // namespace kvc

#endif  // KVC_SRC_STREAM_PART_H_
