// Internal to kvc (not installed): the window part of the cache: every
// layer's ring of the last R = window + draft_slots rows (kWindowStream,
// ceil(R / B) pages per sequence; position p in slot p mod R) and its
// rollback records (kRollbackStream, one page per sequence: `depth`
// contiguous 584-byte rows, then the `depth` positions whose appends evicted
// them, -1: none; appending position q evicts position q - R).
#ifndef KVC_SRC_WINDOW_STREAM_H_
#define KVC_SRC_WINDOW_STREAM_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvc/cache.h"
#include "kvc/number_formats.h"
#include "kvc/row_formats.h"
#include "src/stream_part.h"

namespace kvc {
namespace snapshot_format {
class Encoder;
struct StateBlock;
}  // namespace snapshot_format

namespace cache_internal {

class WindowStream final : public StreamPart {
 public:
  WindowStream(PageStore& store, int32_t window, int32_t draft_slots, int32_t depth, int32_t rows_per_page)
      : store_(store), window_(window), ring_slots_(int64_t{window} + draft_slots), depth_(depth),
        rows_per_page_(rows_per_page) {}

  int32_t window() const { return window_; }
  int32_t depth() const { return depth_; }
  int32_t rows_per_page() const { return rows_per_page_; }
  // R = window + draft_slots: the ring's rows.
  int64_t ring_slots() const { return ring_slots_; }
  // The ring slot of `position` (>= 0): position mod R.
  int64_t SlotOf(int64_t position) const { return position % ring_slots_; }
  int64_t ring_pages() const { return (ring_slots_ + rows_per_page_ - 1) / rows_per_page_; }

  void Reserve(Sequence& seq, std::vector<PageStore::Request>* requests) const override;
  void Init(Sequence& seq) const override;  // no rollback records yet
  void Fork(const Sequence& parent, Sequence& child, std::vector<PageCopy>* engine_copies) const override;
  // Puts back the rows positions [length, current) evicted (CheckTruncate first).
  void Truncate(Sequence& seq, int64_t current, int64_t length) const override;
  void Release(Sequence& seq) const override;

  // kInternal if a rollback record Truncate needs is missing (the invariant
  // the rollback floor guarantees).
  absl::Status CheckTruncate(const Sequence& seq, int64_t current, int64_t length) const;
  // The same for one layer (a step's abort: layers may differ in length).
  absl::Status CheckTruncateLayer(const Sequence& seq, int layer, int64_t current, int64_t length) const;
  void TruncateLayer(Sequence& seq, int layer, int64_t current, int64_t length) const;

  // Writes tokens [L, L + n) of `layer` (L its length) into the ring; the
  // caller checked the rows finite, so this does not fail (a refusal is a
  // broken invariant, returned).
  absl::Status Write(const Sequence& seq, int layer, absl::Span<const Bf16> rows) const;

  PackedRows RingPage(const Sequence& seq, int layer, int64_t page) const;
  PackedRows RingSlot(const Sequence& seq, int layer, int64_t slot) const {
    return RingPage(seq, layer, slot / rows_per_page_).Slice(slot % rows_per_page_, 1);
  }
  // The window-array index of ring slot `slot` (page id x B + offset).
  int32_t SlotIndex(const Sequence& seq, int64_t slot) const {
    return static_cast<int32_t>(seq.tables[kWindowStream][static_cast<size_t>(slot / rows_per_page_)] * rows_per_page_ +
                                slot % rows_per_page_);
  }
  WindowRingView View(const Sequence& seq, int layer) const;

  // Prefix cache (src/prefix_cache.h): copies the ring pages into the pages
  // `to` (ring_pages() ids) as they were at `length` <= `current` tokens: in
  // kvc's mode the rollback records of [length, current) put back into the
  // copy (the caller checked CheckTruncate); in page-manager mode the copies
  // are listed in *engine_copies, and the copy holds the rows of positions
  // [ring_end - R, ring_end) (the caller checked that covers the window at
  // `length`). The sequence is unchanged.
  void CopyRingAt(const Sequence& seq, int64_t current, int64_t length, const std::vector<PageId>& to,
                  std::vector<PageCopy>* engine_copies) const;

  // Snapshot: appends the layer's ring (R rows in slot order, data then
  // scales each), rollback records and evictors to a state block; Restore
  // reads them back from a checked block (of a cache with the same R).
  void Encode(const Sequence& seq, int layer, snapshot_format::Encoder& e) const;
  void Restore(Sequence& seq, int layer, const snapshot_format::StateBlock& block) const;

 private:
  uint8_t* RollbackData(const Sequence& seq, int layer) const;
  PackedRows RollbackRow(const Sequence& seq, int layer, int64_t i) const {
    return ContiguousRows(RowFormat::kKvFp8, RollbackData(seq, layer), depth_).Slice(i, 1);
  }
  int64_t* RollbackEvictors(const Sequence& seq, int layer) const {
    return reinterpret_cast<int64_t*>(RollbackData(seq, layer) + depth_ * kKvRowBytes);
  }

  PageStore& store_;
  int32_t window_;
  int64_t ring_slots_;
  int32_t depth_, rows_per_page_;
};

}  // namespace cache_internal
}  // namespace kvc

#endif  // KVC_SRC_WINDOW_STREAM_H_
