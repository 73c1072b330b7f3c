// Internal to kvc (not installed): a history part of the cache: one
// append-only stream of rows (CSA or HCA compressed rows) or index keys (CSA
// keys). A sequence's table of the stream covers its longest layer; its ids
// are shared with forks (refcounted) and copied on the first write into a
// shared page, in every layer of the stream at once.
#ifndef KVC_SRC_HISTORY_STREAM_H_
#define KVC_SRC_HISTORY_STREAM_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "kvc/cache.h"
#include "kvc/executor.h"
#include "kvc/number_formats.h"
#include "kvc/row_formats.h"
#include "src/stream_part.h"

namespace kvc {
namespace cache_internal {

class HistoryStream final : public StreamPart {
 public:
  // Stream s: kCsaRowsStream, kCsaKeysStream or kHcaRowsStream.
  HistoryStream(PageStore& store, int s);

  int stream() const { return stream_; }
  RowFormat format() const { return format_; }
  int64_t per_page() const { return per_page_; }
  // The rows layer `layer` holds in this stream.
  int64_t& Rows(Sequence& seq, int layer) const {
    LayerStreams& ls = seq.layers[static_cast<size_t>(layer)];
    return keys_ ? ls.key_rows : ls.compressed_rows;
  }
  int64_t Rows(const Sequence& seq, int layer) const {
    const LayerStreams& ls = seq.layers[static_cast<size_t>(layer)];
    return keys_ ? ls.key_rows : ls.compressed_rows;
  }

  void Reserve(Sequence&, std::vector<PageStore::Request>*) const override {}  // empty at creation
  void Fork(const Sequence& parent, Sequence& child, std::vector<PageCopy>*) const override;  // shares every page
  // Drops the rows past the entries `length` tokens close, and the pages no
  // layer needs any more.
  void Truncate(Sequence& seq, int64_t current, int64_t length) const override;
  void Release(Sequence& seq) const override { ReleaseTable(store_, seq, stream_); }

  // Page p of the sequence's table in `layer`, as rows.
  PackedRows Page(const Sequence& seq, int layer, size_t p) const {
    return PageFooterRows(format_, store_.Page(stream_, layer, seq.tables[static_cast<size_t>(stream_)][p]), per_page_);
  }
  // Rows [first, first + n) of `layer`, inside one page.
  PackedRows RowsAt(const Sequence& seq, int layer, int64_t first, int64_t n) const {
    return Page(seq, layer, static_cast<size_t>(first / per_page_)).Slice(first % per_page_, n);
  }
  // The index of row j in the stream's array (page id x rows per page + offset).
  int32_t RowIndex(const Sequence& seq, int64_t j) const {
    return static_cast<int32_t>(seq.tables[static_cast<size_t>(stream_)][static_cast<size_t>(j / per_page_)] * per_page_ +
                                j % per_page_);
  }
  HistoryView View(const Sequence& seq, int layer) const;

  // The pages `n` more rows of `layer` need: new pages past the table, plus
  // a private copy of every page of the table they write into that is shared
  // with a fork (copied in every layer of the stream). Allocated now (all or
  // nothing), with room in the table for them first, so that Commit
  // allocates nothing; Commit uses them, Abandon returns them.
  struct Plan {
    std::vector<PageId> fresh;
    std::vector<size_t> copies;  // table positions to copy, ascending
  };
  absl::StatusOr<Plan> PlanAppend(Sequence& seq, int layer, int64_t n, Executor* prefault_executor = nullptr) const;
  void Abandon(const Plan& plan) const {
    for (const PageId id : plan.fresh) store_.Unref(stream_, id);
  }
  // Takes the planned pages into the stream and writes n rows through
  // write(i, run, to): rows [i, i + run) of the input into `to`. The caller
  // checked the rows against what `write` accepts, so this does not fail; a
  // refusal would be a broken invariant and is returned, not dropped (the
  // pages are in the stream either way: nothing leaks).
  template <typename Write>
  absl::Status Commit(Sequence& seq, int layer, const Plan& plan, int64_t n, Write write,
                      Executor* executor = nullptr) const;
  // Plan + Commit of bf16 values quantized by `quantize` (dims values per row).
  absl::Status Append(Sequence& seq, int layer, absl::Span<const Bf16> values, int dims,
                      absl::Status (*quantize)(absl::Span<const Bf16>, PackedRows)) const;

  // Restore: pages for `rows` rows (the longest layer's) into an empty
  // table, then each layer's rows from contiguous rows in the snapshot's
  // encoding (RestoreRows at `first`, then SetRows). Encoding is RowsAt.
  absl::Status ReserveRows(Sequence& seq, int64_t rows) const;
  void RestoreRows(Sequence& seq, int layer, int64_t first, ConstPackedRows from) const;

 private:
  PageStore& store_;
  int stream_;
  bool keys_;
  RowFormat format_;
  int64_t per_page_;
  LayerKind kind_;
};

template <typename Write>
absl::Status HistoryStream::Commit(Sequence& seq, int layer, const Plan& plan, int64_t n, Write write,
                                   Executor* executor) const {
  std::vector<PageId>& table = seq.tables[static_cast<size_t>(stream_)];
  int64_t& stored = Rows(seq, layer);
  size_t next = 0;
  for (const size_t p : plan.copies) {  // copy-on-write, in every layer of the stream
    const PageId shared = table[p];
    store_.CopyPage(stream_, shared, plan.fresh[next], nullptr);  // Append: not in page-manager mode
    store_.Unref(stream_, shared);
    table[p] = plan.fresh[next++];
  }
  while (next < plan.fresh.size()) table.push_back(plan.fresh[next++]);
  // The rows' runs, one per page; written through the executor when there
  // are enough of them (the writers are independent: disjoint rows).
  constexpr int64_t kRowsPerTask = 256;
  const int tasks = executor == nullptr ? 1 : static_cast<int>(std::min<int64_t>(executor->concurrency(), n / kRowsPerTask));
  absl::Status refused;
  if (tasks <= 1) {
    for (int64_t i = 0; i < n;) {
      const int64_t at = stored + i;
      const int64_t run = std::min(n - i, per_page_ - at % per_page_);
      refused.Update(write(i, run, RowsAt(seq, layer, at, run)));
      i += run;
    }
  } else {
    struct Run {
      int64_t first, rows;
      PackedRows to;
    };
    std::vector<Run> runs;
    for (int64_t i = 0; i < n;) {
      const int64_t at = stored + i;
      const int64_t run = std::min(n - i, per_page_ - at % per_page_);
      runs.push_back({i, run, RowsAt(seq, layer, at, run)});
      i += run;
    }
    std::vector<absl::Status> statuses(runs.size());
    executor->ParallelFor(static_cast<int64_t>(runs.size()), [&](int64_t r) {
      const Run& run = runs[static_cast<size_t>(r)];
      statuses[static_cast<size_t>(r)] = write(run.first, run.rows, run.to);
    });
    for (const absl::Status& s : statuses) refused.Update(s);
  }
  if (!refused.ok()) return absl::InternalError(absl::StrCat("a checked row was refused: ", refused.message()));
  stored += n;
  return absl::OkStatus();
}

}  // namespace cache_internal
}  // namespace kvc

#endif  // KVC_SRC_HISTORY_STREAM_H_
