// Internal to kvc: index scoring over a paged key stream, for
// Cache::SelectAttentionSet.
#ifndef KVC_SRC_INDEXER_INTERNAL_H_
#define KVC_SRC_INDEXER_INTERNAL_H_

#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvc/executor.h"
#include "kvc/indexer.h"
#include "kvc/row_formats.h"

namespace kvc {

// ScoreIndexKeys over `pages` pages of keys, page(p) the view of page p,
// whose scores go to scores[first(p) ..], first(p) = p * keys_per_page (every
// page but the last holds keys_per_page keys). The pages are split across
// the executor's tasks (nullptr: the calling thread); the scores are the
// same bits whatever the split. On a refusal returns the first refusing page
// in page order (its status, *failed_page = p), as scoring the pages one by
// one would; scores are then unspecified.
absl::Status ScoreIndexKeyPages(const IndexQuery& query, int64_t pages, int64_t keys_per_page,
                                absl::FunctionRef<ConstPackedRows(int64_t)> page, absl::Span<float> scores,
                                Executor* executor, int64_t* failed_page);

}  // namespace kvc

#endif  // KVC_SRC_INDEXER_INTERNAL_H_
