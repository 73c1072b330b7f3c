#include "src/history_stream.h"

#include "src/status.h"

namespace kvc {
namespace cache_internal {

HistoryStream::HistoryStream(PageStore& store, int s)
    : store_(store),
      stream_(s),
      keys_(s == kCsaKeysStream),
      format_(s == kCsaKeysStream ? RowFormat::kIndexFp4 : RowFormat::kKvFp8),
      per_page_(store.spec(s).rows_per_page),
      kind_(s == kHcaRowsStream ? LayerKind::kHca : LayerKind::kCsa) {}

void HistoryStream::Fork(const Sequence& parent, Sequence& child, std::vector<PageCopy>*) const {
  const std::vector<PageId>& from = parent.tables[static_cast<size_t>(stream_)];
  for (const PageId page : from) store_.Ref(stream_, page);
  child.tables[static_cast<size_t>(stream_)] = from;
}

void HistoryStream::Truncate(Sequence& seq, int64_t /*current*/, int64_t length) const {
  int64_t longest = 0;
  const int64_t keep = EntriesAt(kind_, length);
  for (const int32_t layer : store_.spec(stream_).layers) {
    int64_t& rows = Rows(seq, layer);
    rows = std::min(rows, keep);
    longest = std::max(longest, rows);
  }
  std::vector<PageId>& table = seq.tables[static_cast<size_t>(stream_)];
  const size_t keep_pages = static_cast<size_t>((longest + per_page_ - 1) / per_page_);
  while (table.size() > keep_pages) {
    store_.Unref(stream_, table.back());
    table.pop_back();
  }
}

HistoryView HistoryStream::View(const Sequence& seq, int layer) const {
  HistoryView view;
  view.rows_per_page = static_cast<int32_t>(per_page_);
  view.rows = Rows(seq, layer);
  for (size_t p = 0; p < seq.tables[static_cast<size_t>(stream_)].size(); ++p) view.pages.push_back(Page(seq, layer, p));
  return view;
}

absl::StatusOr<HistoryStream::Plan> HistoryStream::PlanAppend(Sequence& seq, int layer, int64_t n,
                                                              Executor* prefault_executor) const {
  Plan plan;
  if (n <= 0) return plan;
  std::vector<PageId>& table = seq.tables[static_cast<size_t>(stream_)];
  const int64_t rows = Rows(seq, layer);
  const int64_t end = (rows + n + per_page_ - 1) / per_page_;
  const int64_t have = static_cast<int64_t>(table.size());
  for (int64_t p = rows / per_page_; p < std::min(end, have); ++p) {
    if (store_.RefCount(stream_, table[static_cast<size_t>(p)]) > 1) plan.copies.push_back(static_cast<size_t>(p));
  }
  const int64_t new_pages = std::max<int64_t>(0, end - have);
  table.reserve(table.size() + static_cast<size_t>(new_pages));  // Commit's push_back allocates nothing
  KVC_RETURN_IF_ERROR(store_.Allocate(stream_, new_pages + static_cast<int64_t>(plan.copies.size()), &plan.fresh,
                                      prefault_executor));
  return plan;
}

absl::Status HistoryStream::Append(Sequence& seq, int layer, absl::Span<const Bf16> values, int dims,
                                   absl::Status (*quantize)(absl::Span<const Bf16>, PackedRows)) const {
  const int64_t n = static_cast<int64_t>(values.size()) / dims;
  KVC_ASSIGN_OR_RETURN(const Plan plan, PlanAppend(seq, layer, n));
  return Commit(seq, layer, plan, n, [values, dims, quantize](int64_t i, int64_t run, PackedRows to) {
    return quantize(values.subspan(static_cast<size_t>(i * dims), static_cast<size_t>(run * dims)), to);
  });
}

absl::Status HistoryStream::ReserveRows(Sequence& seq, int64_t rows) const {
  return store_.Allocate(stream_, (rows + per_page_ - 1) / per_page_, &seq.tables[static_cast<size_t>(stream_)]);
}

void HistoryStream::RestoreRows(Sequence& seq, int layer, int64_t first, ConstPackedRows from) const {
  for (int64_t k = 0, r = first; k < from.count;) {  // in runs that stay inside one page
    const int64_t n = std::min<int64_t>(from.count - k, per_page_ - r % per_page_);
    CopyRows(format_, from.Slice(k, n), RowsAt(seq, layer, r, n));
    k += n;
    r += n;
  }
}

}  // namespace cache_internal
}  // namespace kvc
