// Indexer and attention checks, through kvc::Cache, for the decode steps of
// each layer case (tolerances: tests/golden/README.md):
//
//   csa/index_queries   every prepared index query, bit-exact with idx_q
//   csa/index_scores    per decode step, max |kvc - official| <= 2 % of max |official|
//   csa/topk_overlap    share of the official top-k picks kvc also picks >= 99.5 %
//   hca, win/attention_set  the selected rows equal the official attn_idx, as sets
//   <case>/attention_out    reference attention over the official attn_idx
//                           set: per (token, head) relative L2 error <= 1 %
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "kvc/indexer.h"
#include "kvc/row_kernels.h"
#include "src/status.h"
#include "tools/conformance/conformance.h"
#include "tools/conformance/golden_layer.h"

namespace kvc::conformance {
namespace {

absl::Status Check(const GoldenCase& golden, Report& report) {
  KVC_ASSIGN_OR_RETURN(const GoldenLayer c, GoldenLayer::Load(golden));
  KVC_ASSIGN_OR_RETURN(const GoldenSelection selection, GoldenSelection::Load(golden, c));
  const SafetensorsFile& f = golden.file();
  const TensorInfo* info = nullptr;
  KVC_ASSIGN_OR_RETURN(const std::vector<uint16_t> attn_q, f.Get<uint16_t>("attn_q", DType::kBF16, {c.tokens, -1, kHeadDim}, &info));
  const int64_t heads = info->shape[1];
  KVC_ASSIGN_OR_RETURN(const std::vector<float> sinks, f.Get<float>("attn_sink", DType::kF32, {heads}));
  KVC_ASSIGN_OR_RETURN(const std::vector<uint16_t> attn_out, f.Get<uint16_t>("attn_out", DType::kBF16, {c.tokens, heads, kHeadDim}));
  const bool csa = c.kind == LayerKind::kCsa;
  const int64_t index_heads = selection.index_heads;
  std::vector<uint16_t> q_expected;
  std::vector<float> official_scores;
  if (csa) {
    KVC_ASSIGN_OR_RETURN(q_expected, f.Get<uint16_t>("idx_q", DType::kBF16, {c.tokens, index_heads, kIndexDim}));
    KVC_ASSIGN_OR_RETURN(official_scores, f.Get<float>("idx_scores_decode", DType::kF32, {c.tokens, c.tokens / 4}));
  }

  KVC_ASSIGN_OR_RETURN(std::unique_ptr<Cache> cache, c.MakeCache());
  KVC_ASSIGN_OR_RETURN(const SequenceId seq, cache->CreateSequence());
  auto query_for = [&](int64_t t) { return selection.Query(*cache, t); };

  if (csa) {  // every token's prepared query
    std::vector<uint16_t> got;
    for (int64_t t = 0; t < c.tokens; ++t) {
      KVC_ASSIGN_OR_RETURN(const IndexQuery q, query_for(t));
      for (const float v : q.Values()) got.push_back(Bf16BitsFromF32(v));
    }
    int64_t first = -1;
    const int64_t bad = CountMismatches(got, q_expected, &first);
    report.Add(golden.name(), "index_queries", bad == 0,
               absl::StrCat(c.tokens, " queries x ", index_heads, " heads, ", bad, " values differ"));
  }

  // The golden's chunking: the prefill, then one token per decode step.
  KVC_RETURN_IF_ERROR(c.Append(*cache, seq, 0, c.prefill));
  double worst_score = 0, worst_out = 0;
  int64_t official_picks = 0, shared_picks = 0, steps = 0, set_mismatches = 0, outputs = 0, bad_outputs = 0;
  int64_t unstored = 0;  // official indices naming no row kvc stores (an altered or foreign golden)
  std::vector<float> rows, out(static_cast<size_t>(heads) * kHeadDim);
  std::vector<Bf16> row(kHeadDim);
  for (int64_t t = c.prefill; t < c.tokens; ++t) {
    KVC_RETURN_IF_ERROR(c.Append(*cache, seq, t, 1));
    ++steps;
    const std::set<int32_t> official_set = selection.Official(t);
    // kvc's selection.
    std::vector<float> scores;
    std::optional<IndexQuery> q;  // CSA layers only
    if (csa) {
      KVC_ASSIGN_OR_RETURN(q, query_for(t));
    }
    KVC_ASSIGN_OR_RETURN(const AttentionSet set, cache->SelectAttentionSet(seq, 0, q ? &*q : nullptr, &scores));
    if (csa) {
      const int64_t visible = (t + 1) / 4;
      double max_official = 0, max_diff = 0;
      for (int64_t j = 0; j < visible; ++j) {
        const double o = official_scores[static_cast<size_t>(t * (c.tokens / 4) + j)];
        max_official = std::max(max_official, std::fabs(o));
        max_diff = std::max(max_diff, std::fabs(o - scores[static_cast<size_t>(j)]));
      }
      if (max_official > 0) worst_score = std::max(worst_score, max_diff / max_official);
      std::set<int32_t> mine;
      for (const int32_t i : set.indices) {
        if (i >= c.window) mine.insert(i);
      }
      for (const int32_t i : official_set) {
        if (i < c.window) continue;
        ++official_picks;
        shared_picks += mine.count(i);
      }
    } else {
      set_mismatches += std::set<int32_t>(set.indices.begin(), set.indices.end()) != official_set ? 1 : 0;
    }
    // Reference attention over the official set, with the rows kvc stored.
    KVC_ASSIGN_OR_RETURN(const WindowRingView ring, cache->Window(seq, 0));
    KVC_ASSIGN_OR_RETURN(const HistoryView entries, cache->CompressedRows(seq, 0));
    rows.clear();
    for (const int32_t i : official_set) {
      if (i >= c.window && i - c.window >= entries.rows) {
        ++unstored;
        continue;
      }
      const ConstPackedRows source =
          i < c.window ? ring.pages[static_cast<size_t>(i / ring.rows_per_page)].Slice(i % ring.rows_per_page, 1)
                       : entries.pages[static_cast<size_t>((i - c.window) / entries.rows_per_page)].Slice((i - c.window) % entries.rows_per_page, 1);
      KVC_RETURN_IF_ERROR(DequantizeKvRows(source, absl::MakeSpan(row)));
      for (const Bf16 v : row) rows.push_back(ToF32(v));
    }
    const auto* q_attn = reinterpret_cast<const Bf16*>(attn_q.data()) + t * heads * kHeadDim;
    KVC_RETURN_IF_ERROR(SparseAttentionRef(absl::MakeConstSpan(q_attn, static_cast<size_t>(heads * kHeadDim)), rows, sinks,
                                           absl::MakeSpan(out)));
    for (int64_t h = 0; h < heads; ++h) {
      double err = 0, ref = 0;
      for (int i = 0; i < kHeadDim; ++i) {
        const double o = F32FromBf16Bits(attn_out[static_cast<size_t>((t * heads + h) * kHeadDim + i)]);
        const double d = out[static_cast<size_t>(h * kHeadDim + i)] - o;
        err += d * d;
        ref += o * o;
      }
      const double relative = ref > 0 ? std::sqrt(err / ref) : std::sqrt(err);
      worst_out = std::max(worst_out, relative);
      ++outputs;
      bad_outputs += relative > 0.01 ? 1 : 0;
    }
  }
  if (csa) {
    report.Add(golden.name(), "index_scores", worst_score <= 0.02 && steps > 0,
               absl::StrCat(steps, " decode steps, worst max|diff| = ", Percent(worst_score), " of max|official| (limit 2 %)"));
    const double overlap = official_picks > 0 ? static_cast<double>(shared_picks) / static_cast<double>(official_picks) : 0;
    report.Add(golden.name(), "topk_overlap", overlap >= 0.995 && official_picks > 0,
               absl::StrCat(shared_picks, " of ", official_picks, " official picks (", Percent(overlap), "; limit 99.5 %)"));
  } else {
    report.Add(golden.name(), "attention_set", set_mismatches == 0 && steps > 0,
               absl::StrCat(steps, " decode steps, ", set_mismatches, " sets differ"));
  }
  report.Add(golden.name(), "attention_out", bad_outputs == 0 && outputs > 0 && unstored == 0,
             absl::StrCat(outputs, " (step, head) outputs, worst relative L2 error ", Percent(worst_out), " (limit 1 %)",
                          unstored > 0 ? absl::StrCat("; ", unstored, " official indices name no stored row") : ""));
  return absl::OkStatus();
}

}  // namespace

void RunIndexerChecks(const GoldenCase& golden, Report& report) {
  const absl::Status status = Check(golden, report);
  if (!status.ok()) report.Error(golden.name(), "attention", status);
}

}  // namespace kvc::conformance
