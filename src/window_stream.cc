#include "src/window_stream.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvc/row_kernels.h"
#include "src/status.h"
#include "src/snapshot_format.h"

namespace kvc {
namespace cache_internal {
namespace {

void CopyRow(ConstPackedRows from, PackedRows to) { CopyRows(RowFormat::kKvFp8, from.Slice(0, 1), to); }
void ZeroRow(PackedRows row) {
  std::memset(row.data, 0, kKvDataBytes);
  std::memset(row.scales, 0, kKvScaleBytes);
}

}  // namespace

void WindowStream::Reserve(Sequence& seq, std::vector<PageStore::Request>* requests) const {
  requests->push_back({kWindowStream, ring_pages(), &seq.tables[kWindowStream]});
  if (store_.present(kRollbackStream)) requests->push_back({kRollbackStream, 1, &seq.tables[kRollbackStream]});
}

void WindowStream::Init(Sequence& seq) const {
  if (!store_.present(kRollbackStream)) return;  // depth 0, or page-manager mode
  for (int i = 0; i < static_cast<int>(seq.layers.size()); ++i) std::fill_n(RollbackEvictors(seq, i), depth_, int64_t{-1});
}

void WindowStream::Fork(const Sequence& parent, Sequence& child, std::vector<PageCopy>* engine_copies) const {
  for (const int s : {int{kWindowStream}, int{kRollbackStream}}) {
    const std::vector<PageId>& from = parent.tables[static_cast<size_t>(s)];
    for (size_t k = 0; k < from.size(); ++k) store_.CopyPage(s, from[k], child.tables[static_cast<size_t>(s)][k], engine_copies);
  }
}

absl::Status WindowStream::CheckTruncate(const Sequence& seq, int64_t current, int64_t length) const {
  for (int i = 0; i < static_cast<int>(seq.layers.size()); ++i) KVC_RETURN_IF_ERROR(CheckTruncateLayer(seq, i, current, length));
  return absl::OkStatus();
}

absl::Status WindowStream::CheckTruncateLayer(const Sequence& seq, int layer, int64_t current, int64_t length) const {
  if (!store_.present(kRollbackStream)) return absl::OkStatus();  // nothing evicted is needed back
  for (int64_t q = length; q < current; ++q) {
    if (RollbackEvictors(seq, layer)[q % depth_] != q) {
      return absl::InternalError(absl::StrCat("Truncate: rollback record of position ", q, " is missing"));
    }
  }
  return absl::OkStatus();
}

void WindowStream::Truncate(Sequence& seq, int64_t current, int64_t length) const {
  for (int i = 0; i < static_cast<int>(seq.layers.size()); ++i) TruncateLayer(seq, i, current, length);
}

void WindowStream::TruncateLayer(Sequence& seq, int layer, int64_t current, int64_t length) const {
  if (length >= current || !store_.present(kRollbackStream)) return;
  int64_t* evictors = RollbackEvictors(seq, layer);
  for (int64_t q = current - 1; q >= length; --q) {
    CopyRow(RollbackRow(seq, layer, q % depth_), RingSlot(seq, layer, SlotOf(q)));
    evictors[q % depth_] = -1;
  }
}

void WindowStream::CopyRingAt(const Sequence& seq, int64_t current, int64_t length, const std::vector<PageId>& to,
                              std::vector<PageCopy>* engine_copies) const {
  const std::vector<PageId>& ring = seq.tables[kWindowStream];
  for (size_t k = 0; k < ring.size(); ++k) store_.CopyPage(kWindowStream, ring[k], to[k], engine_copies);
  if (!store_.present(kRollbackStream)) return;  // depth 0 (length == current), or page-manager mode
  for (int i = 0; i < static_cast<int>(seq.layers.size()) && length < current; ++i) {
    for (int64_t q = current - 1; q >= length; --q) {
      const int64_t slot = SlotOf(q);
      const PackedRows page = PageFooterRows(
          RowFormat::kKvFp8, store_.Page(kWindowStream, i, to[static_cast<size_t>(slot / rows_per_page_)]), rows_per_page_);
      CopyRow(RollbackRow(seq, i, q % depth_), page.Slice(slot % rows_per_page_, 1));
    }
  }
}

void WindowStream::Release(Sequence& seq) const {
  ReleaseTable(store_, seq, kWindowStream);
  ReleaseTable(store_, seq, kRollbackStream);
}

uint8_t* WindowStream::RollbackData(const Sequence& seq, int layer) const {
  return store_.Page(kRollbackStream, layer, seq.tables[kRollbackStream][0]);
}

PackedRows WindowStream::RingPage(const Sequence& seq, int layer, int64_t page) const {
  return PageFooterRows(RowFormat::kKvFp8,
                        store_.Page(kWindowStream, layer, seq.tables[kWindowStream][static_cast<size_t>(page)]),
                        rows_per_page_);
}

WindowRingView WindowStream::View(const Sequence& seq, int layer) const {
  WindowRingView view;
  view.rows_per_page = rows_per_page_;
  view.window = window_;
  view.ring_slots = ring_slots_;
  view.length = seq.layers[static_cast<size_t>(layer)].length;
  for (int64_t p = 0; p < ring_pages(); ++p) view.pages.push_back(RingPage(seq, layer, p));
  return view;
}

// Only the rows that survive are quantized: the last R into their slots, and
// for the last `depth` positions q the row each evicts (position q - R, from
// the old ring or from this chunk) into rollback record q mod depth.
absl::Status WindowStream::Write(const Sequence& seq, int layer, absl::Span<const Bf16> rows) const {
  const int64_t L = seq.layers[static_cast<size_t>(layer)].length;
  const int64_t n = static_cast<int64_t>(rows.size()) / kHeadDim;
  const int64_t R = ring_slots_;
  auto quantize = [&](int64_t position, PackedRows to) {
    return QuantizeKvRows(rows.subspan(static_cast<size_t>((position - L) * kHeadDim), kHeadDim), to);
  };
  if (depth_ > 0) {
    int64_t* evictors = RollbackEvictors(seq, layer);
    for (int64_t q = std::max(L, L + n - depth_); q < L + n; ++q) {
      const int64_t evicted = q - R;
      const PackedRows record = RollbackRow(seq, layer, q % depth_);
      if (evicted < 0) {
        ZeroRow(record);
      } else if (evicted < L) {
        CopyRow(RingSlot(seq, layer, SlotOf(evicted)), record);
      } else {
        KVC_RETURN_IF_ERROR(quantize(evicted, record));
      }
      evictors[q % depth_] = q;
    }
  }
  // Ring slots, in runs that stay inside one page.
  for (int64_t p = std::max(L, L + n - R); p < L + n;) {
    const int64_t slot = SlotOf(p);
    const int64_t in_page = slot % rows_per_page_;
    int64_t run = std::min({L + n - p, R - slot, rows_per_page_ - in_page});
    KVC_RETURN_IF_ERROR(QuantizeKvRows(rows.subspan(static_cast<size_t>((p - L) * kHeadDim), static_cast<size_t>(run * kHeadDim)),
                                       RingPage(seq, layer, slot / rows_per_page_).Slice(in_page, run)));
    p += run;
  }
  return absl::OkStatus();
}

void WindowStream::Encode(const Sequence& seq, int layer, snapshot_format::Encoder& e) const {
  for (int64_t slot = 0; slot < ring_slots_; ++slot) {
    const PackedRows row = RingSlot(seq, layer, slot);
    e.PutBytes(row.data, kKvDataBytes);
    e.PutBytes(row.scales, kKvScaleBytes);
  }
  if (depth_ > 0) {
    e.PutBytes(RollbackData(seq, layer), static_cast<size_t>(depth_ * kKvRowBytes));
    e.PutBytes(RollbackEvictors(seq, layer), static_cast<size_t>(depth_) * 8);
  }
}

void WindowStream::Restore(Sequence& seq, int layer, const snapshot_format::StateBlock& block) const {
  const ConstPackedRows ring = ContiguousRows(RowFormat::kKvFp8, block.ring, ring_slots_);
  for (int64_t slot = 0; slot < ring_slots_; slot += rows_per_page_) {  // page by page
    const int64_t n = std::min<int64_t>(rows_per_page_, ring_slots_ - slot);
    CopyRows(RowFormat::kKvFp8, ring.Slice(slot, n), RingPage(seq, layer, slot / rows_per_page_));
  }
  if (depth_ > 0) {
    std::memcpy(RollbackData(seq, layer), block.rollback, static_cast<size_t>(depth_ * kKvRowBytes));
    std::memcpy(RollbackEvictors(seq, layer), block.evictors, static_cast<size_t>(depth_) * 8);
  }
}

}  // namespace cache_internal
}  // namespace kvc
