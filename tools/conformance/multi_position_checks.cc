// Multi-position selection checks (Cache::SelectAttentionSets), through
// kvc::Cache, on the layer cases (index spaces and tolerances:
// tests/golden/README.md):
//
//   <case>/prefill_attention_set  the prefill appended as one chunk, then
//        every prefill position selected in ONE call: each position's set,
//        in the prefill index space (token positions < prefill, then
//        prefill + j for entry j), equals its official attn_idx row. On CSA
//        the window positions, and the entries of every position that sees
//        at most index_topk of them (all picked), must be exact; where the
//        top-k chooses, >= 99.5 % of the official picks (topk_overlap's rule:
//        the official scores were rounded to bf16).
//   win, hca/verify_attention_set  the decode steps four at a time, as an
//        MTP verify step takes them: append four tokens in one chunk, then
//        select for the four positions in one call (draft_slots 3): each
//        equals the official decode-step set (ring slot p mod window, then
//        window + j), with every window row found in the ring. A partial
//        last group is fine.
//   csa/verify_topk_overlap  the same on CSA: window parts exact, >= 99.5 %
//        of the official entry picks.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "kvc/indexer.h"
#include "src/status.h"
#include "tools/conformance/conformance.h"
#include "tools/conformance/golden_layer.h"

namespace kvc::conformance {
namespace {

constexpr int64_t kVerifyGroup = 4;                                // an MTP step: a token and its drafts
constexpr int32_t kDraftSlots = static_cast<int32_t>(kVerifyGroup) - 1;  // so all four find their window rows

// What a run of positions' selections agree with the official sets.
struct Agreement {
  int64_t positions = 0;
  int64_t window_mismatches = 0;   // positions whose window part differs
  int64_t missing_rows = 0;        // window rows not in the ring (-1) where the check needs them all
  int64_t exact_mismatches = 0;    // positions whose entries must be exact (all visible picked) and differ
  int64_t official_picks = 0;      // entries the official sets pick
  int64_t shared_picks = 0;        // of which kvc picks too
  int64_t entry_mismatches = 0;    // positions whose entries differ at all

  double Overlap() const {
    return official_picks > 0 ? static_cast<double>(shared_picks) / static_cast<double>(official_picks) : 1.0;
  }
  std::string Figure(const std::string& what) const {
    return absl::StrCat(positions, " positions ", what, ", ", window_mismatches, " window sets differ",
                        missing_rows > 0 ? absl::StrCat(" (", missing_rows, " rows not in the ring)") : "", ", ",
                        entry_mismatches, " entry sets differ; ", shared_picks, " of ", official_picks,
                        " official entry picks (", Percent(Overlap()), ")");
  }
};

// Compares query i of `sets` with the official set `official`, where window
// position p is index window_index(p) and entry j is entry_base + j.
// `exact_entries`: the entries must equal the official ones (not only
// overlap); `need_rows`: every window row must be in the ring.
template <typename WindowIndex>
void Compare(const PositionSets& sets, int64_t i, const std::set<int32_t>& official, WindowIndex window_index,
             int64_t entry_base, bool exact_entries, bool need_rows, Agreement& a) {
  std::set<int32_t> window, entries;
  bool missing = false;
  for (int64_t k = sets.window_offsets[static_cast<size_t>(i)]; k < sets.window_offsets[static_cast<size_t>(i) + 1]; ++k) {
    window.insert(window_index(sets.window_positions[static_cast<size_t>(k)]));
    missing |= sets.window_indices[static_cast<size_t>(k)] < 0;
  }
  for (int64_t k = sets.compressed_offsets[static_cast<size_t>(i)]; k < sets.compressed_offsets[static_cast<size_t>(i) + 1]; ++k) {
    entries.insert(static_cast<int32_t>(entry_base + sets.entries[static_cast<size_t>(k)]));
  }
  std::set<int32_t> official_window, official_entries;
  for (const int32_t x : official) (x < entry_base ? official_window : official_entries).insert(x);
  ++a.positions;
  a.window_mismatches += window != official_window ? 1 : 0;
  a.missing_rows += need_rows && missing ? 1 : 0;
  a.entry_mismatches += entries != official_entries ? 1 : 0;
  a.exact_mismatches += exact_entries && entries != official_entries ? 1 : 0;
  for (const int32_t x : official_entries) {
    ++a.official_picks;
    a.shared_picks += static_cast<int64_t>(entries.count(x));
  }
}

// The index queries of positions [first, first + count) (CSA), and
// pointers to them for SelectAttentionSets.
struct PreparedQueries {
  std::vector<IndexQuery> queries;
  std::vector<const IndexQuery*> pointers;
};
absl::StatusOr<PreparedQueries> Prepare(const GoldenSelection& selection, const Cache& cache, LayerKind kind,
                                        int64_t first, int64_t count) {
  PreparedQueries q;
  if (kind != LayerKind::kCsa) return q;
  q.queries.reserve(static_cast<size_t>(count));
  for (int64_t t = first; t < first + count; ++t) {
    KVC_ASSIGN_OR_RETURN(IndexQuery query, selection.Query(cache, t));
    q.queries.push_back(std::move(query));
  }
  for (const IndexQuery& query : q.queries) q.pointers.push_back(&query);
  return q;
}

absl::Status CheckPrefill(const GoldenCase& golden, const GoldenLayer& c, const GoldenSelection& selection,
                          Report& report) {
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<Cache> cache, c.MakeCache());
  KVC_ASSIGN_OR_RETURN(const SequenceId seq, cache->CreateSequence());
  KVC_RETURN_IF_ERROR(c.Append(*cache, seq, 0, c.prefill));
  KVC_ASSIGN_OR_RETURN(const PreparedQueries q, Prepare(selection, *cache, c.kind, 0, c.prefill));
  KVC_ASSIGN_OR_RETURN(const PositionSets sets, cache->SelectAttentionSets(seq, 0, 0, c.prefill, q.pointers));
  Agreement a;
  for (int64_t t = 0; t < c.prefill; ++t) {
    // Every visible entry is picked when there are at most index_topk of them.
    const bool all_picked = c.kind != LayerKind::kCsa || (t + 1) / c.ratio <= c.index_topk;
    Compare(sets, t, selection.Official(t), [](int64_t p) { return static_cast<int32_t>(p); }, c.prefill, all_picked,
            /*need_rows=*/false, a);
  }
  const bool passed = a.positions > 0 && a.window_mismatches == 0 && a.exact_mismatches == 0 &&
                      (c.kind == LayerKind::kCsa ? a.Overlap() >= 0.995 : a.entry_mismatches == 0);
  report.Add(golden.name(), "prefill_attention_set", passed,
             absl::StrCat(a.Figure(absl::StrCat("of a prefill of ", c.prefill, " in one call")),
                          c.kind == LayerKind::kCsa ? "; limit 99.5 % where the top-k chooses" : ""));
  return absl::OkStatus();
}

absl::Status CheckVerify(const GoldenCase& golden, const GoldenLayer& c, const GoldenSelection& selection,
                         Report& report) {
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<Cache> cache, c.MakeCache(kDraftSlots));
  KVC_ASSIGN_OR_RETURN(const SequenceId seq, cache->CreateSequence());
  KVC_RETURN_IF_ERROR(c.Append(*cache, seq, 0, c.prefill));
  SelectionScratch scratch;
  PositionSets sets;
  Agreement a;
  int64_t steps = 0;
  for (int64_t first = c.prefill; first < c.tokens; first += kVerifyGroup) {
    const int64_t n = std::min(kVerifyGroup, c.tokens - first);
    KVC_RETURN_IF_ERROR(c.Append(*cache, seq, first, n));
    KVC_ASSIGN_OR_RETURN(const PreparedQueries q, Prepare(selection, *cache, c.kind, first, n));
    KVC_RETURN_IF_ERROR(cache->SelectAttentionSets(seq, 0, first, n, q.pointers, &scratch, &sets));
    ++steps;
    for (int64_t i = 0; i < n; ++i) {
      Compare(sets, i, selection.Official(first + i), [&](int64_t p) { return static_cast<int32_t>(p % c.window); },
              c.window, /*exact_entries=*/c.kind != LayerKind::kCsa, /*need_rows=*/true, a);
    }
  }
  const std::string figure = a.Figure(absl::StrCat("in ", steps, " verify steps of ", kVerifyGroup));
  if (c.kind == LayerKind::kCsa) {
    report.Add(golden.name(), "verify_topk_overlap",
               a.positions > 0 && a.window_mismatches == 0 && a.missing_rows == 0 && a.Overlap() >= 0.995,
               absl::StrCat(figure, "; limit 99.5 %"));
  } else {
    report.Add(golden.name(), "verify_attention_set",
               a.positions > 0 && a.window_mismatches == 0 && a.missing_rows == 0 && a.entry_mismatches == 0, figure);
  }
  return absl::OkStatus();
}

}  // namespace

void RunMultiPositionChecks(const GoldenCase& golden, Report& report) {
  const absl::StatusOr<GoldenLayer> c = GoldenLayer::Load(golden);
  absl::StatusOr<GoldenSelection> selection =
      c.ok() ? GoldenSelection::Load(golden, *c) : absl::StatusOr<GoldenSelection>(c.status());
  if (!selection.ok()) {
    report.Error(golden.name(), "multi_position", selection.status());
    return;
  }
  if (const absl::Status s = CheckPrefill(golden, *c, *selection, report); !s.ok()) {
    report.Error(golden.name(), "prefill_attention_set", s);
  }
  if (const absl::Status s = CheckVerify(golden, *c, *selection, report); !s.ok()) {
    report.Error(golden.name(), c->kind == LayerKind::kCsa ? "verify_topk_overlap" : "verify_attention_set", s);
  }
}

}  // namespace kvc::conformance
