// Window-stream checks, through kvc::Cache, on any layer case (win, csa, hca):
//
//   <case>/window_rows         every token's stored row, read back right after
//                              its append, dequantizes to win_kv_ref
//   <case>/ring_after_prefill  the ring after the golden's prefill chunk
//   <case>/ring_final          the ring after the golden's chunking (prefill,
//                              then one token at a time) equals ring_final
//   <case>/ring_rechunked      the same after other chunkings
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "kvc/row_kernels.h"
#include "src/status.h"
#include "tools/conformance/conformance.h"

namespace kvc::conformance {
namespace {

struct WindowCase {
  int64_t tokens = 0;
  int64_t prefill = 0;
  int64_t window = 0;
  std::vector<Bf16> rows;  // win_kv_in, tokens x 512
  std::vector<uint16_t> stored_rows;  // win_kv_ref
  std::vector<uint16_t> ring_after_prefill, ring_final;
  LayerKind kind = LayerKind::kWindow;
};

absl::StatusOr<WindowCase> Load(const GoldenCase& golden) {
  WindowCase c;
  const TensorInfo* info = nullptr;
  KVC_ASSIGN_OR_RETURN(std::vector<uint16_t> in, golden.file().Get<uint16_t>("win_kv_in", DType::kBF16, {-1, kHeadDim}, &info));
  c.tokens = info->shape[0];
  KVC_ASSIGN_OR_RETURN(c.stored_rows, golden.file().Get<uint16_t>("win_kv_ref", DType::kBF16, {c.tokens, kHeadDim}));
  KVC_ASSIGN_OR_RETURN(c.ring_final, golden.file().Get<uint16_t>("ring_final", DType::kBF16, {-1, kHeadDim}, &info));
  c.window = info->shape[0];
  KVC_ASSIGN_OR_RETURN(c.ring_after_prefill,
                       golden.file().Get<uint16_t>("ring_after_prefill", DType::kBF16, {c.window, kHeadDim}));
  KVC_ASSIGN_OR_RETURN(c.prefill, golden.MetaInt("prefill"));
  KVC_ASSIGN_OR_RETURN(const int64_t meta_window, golden.MetaInt("window"));
  KVC_ASSIGN_OR_RETURN(const int64_t ratio, golden.MetaInt("ratio"));
  if (meta_window != c.window) {
    return absl::InvalidArgumentError(absl::StrCat("metadata window ", meta_window, " but ring_final has ", c.window, " rows"));
  }
  if (c.prefill < 0 || c.prefill > c.tokens || c.tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("metadata prefill ", c.prefill, " with ", c.tokens, " tokens"));
  }
  c.kind = ratio == 4 ? LayerKind::kCsa : ratio == 128 ? LayerKind::kHca : LayerKind::kWindow;
  c.rows.resize(in.size());
  for (size_t i = 0; i < in.size(); ++i) c.rows[i].bits = in[i];
  return c;
}

// A one-layer cache of the case's kind and window.
absl::StatusOr<std::unique_ptr<Cache>> MakeCache(const WindowCase& c) {
  ModelSpec spec = ModelSpec::V4Flash();
  spec.name = "conformance";
  spec.layers.assign(1, LayerSpec{});
  spec.layers[0].kind = c.kind;
  spec.window = static_cast<int32_t>(c.window);
  spec.max_context = c.tokens;
  CacheOptions options;
  options.state_bytes = int64_t{64} << 20;
  options.history_bytes = int64_t{16} << 20;
  options.rollback_depth = static_cast<int32_t>(std::min<int64_t>(16, c.window));
  return Cache::Create(spec, options);
}

absl::Status Append(Cache& cache, SequenceId seq, const WindowCase& c, int64_t first, int64_t n) {
  return cache.Append(seq, 0, first,
                      {absl::MakeConstSpan(c.rows).subspan(static_cast<size_t>(first * kHeadDim),
                                                           static_cast<size_t>(n * kHeadDim))});
}

absl::StatusOr<std::vector<uint16_t>> Ring(const Cache& cache, SequenceId seq, int64_t window) {
  std::vector<Bf16> ring(static_cast<size_t>(window) * kHeadDim);
  KVC_RETURN_IF_ERROR(cache.ReadWindow(seq, 0, absl::MakeSpan(ring)));
  std::vector<uint16_t> bits(ring.size());
  for (size_t i = 0; i < ring.size(); ++i) bits[i] = ring[i].bits;
  return bits;
}

// Appends in the given chunk sizes (cycled until all tokens are in) and
// returns the final ring.
absl::StatusOr<std::vector<uint16_t>> RingAfterChunking(const WindowCase& c, const std::vector<int64_t>& chunks) {
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<Cache> cache, MakeCache(c));
  KVC_ASSIGN_OR_RETURN(const SequenceId seq, cache->CreateSequence());
  for (int64_t at = 0, i = 0; at < c.tokens; ++i) {
    const int64_t n = std::min(chunks[static_cast<size_t>(i) % chunks.size()], c.tokens - at);
    KVC_RETURN_IF_ERROR(Append(*cache, seq, c, at, n));
    at += n;
  }
  return Ring(*cache, seq, c.window);
}

absl::Status CheckWindowRows(const GoldenCase& golden, const WindowCase& c, Report& report) {
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<Cache> cache, MakeCache(c));
  KVC_ASSIGN_OR_RETURN(const SequenceId seq, cache->CreateSequence());
  std::vector<uint16_t> got(c.stored_rows.size());
  std::vector<Bf16> row(kHeadDim);
  for (int64_t t = 0; t < c.tokens; ++t) {
    KVC_RETURN_IF_ERROR(Append(*cache, seq, c, t, 1));
    KVC_ASSIGN_OR_RETURN(const WindowRingView view, cache->Window(seq, 0));
    const int64_t slot = t % c.window;
    KVC_RETURN_IF_ERROR(DequantizeKvRows(
        view.pages[static_cast<size_t>(slot / view.rows_per_page)].Slice(slot % view.rows_per_page, 1),
        absl::MakeSpan(row)));
    for (int i = 0; i < kHeadDim; ++i) got[static_cast<size_t>(t * kHeadDim + i)] = row[static_cast<size_t>(i)].bits;
  }
  int64_t first = -1;
  const int64_t mismatches = CountMismatches(got, c.stored_rows, &first);
  report.Add(golden.name(), "window_rows", mismatches == 0,
             absl::StrCat(c.tokens, " rows, ", mismatches, " values differ",
                          mismatches ? absl::StrCat(" (first at row ", first / kHeadDim, ")") : ""));
  return absl::OkStatus();
}

absl::Status CheckRingFinal(const GoldenCase& golden, const WindowCase& c, Report& report) {
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<Cache> cache, MakeCache(c));
  KVC_ASSIGN_OR_RETURN(const SequenceId seq, cache->CreateSequence());
  KVC_RETURN_IF_ERROR(Append(*cache, seq, c, 0, c.prefill));
  KVC_ASSIGN_OR_RETURN(const std::vector<uint16_t> after_prefill, Ring(*cache, seq, c.window));
  int64_t first = -1;
  int64_t mismatches = CountMismatches(after_prefill, c.ring_after_prefill, &first);
  report.Add(golden.name(), "ring_after_prefill", mismatches == 0,
             absl::StrCat("prefill of ", c.prefill, ", ", c.window, " slots, ", mismatches, " values differ"));
  for (int64_t t = c.prefill; t < c.tokens; ++t) KVC_RETURN_IF_ERROR(Append(*cache, seq, c, t, 1));
  KVC_ASSIGN_OR_RETURN(const std::vector<uint16_t> final_ring, Ring(*cache, seq, c.window));
  mismatches = CountMismatches(final_ring, c.ring_final, &first);
  report.Add(golden.name(), "ring_final", mismatches == 0,
             absl::StrCat(c.tokens, " tokens, ", c.window, " slots, ", mismatches, " values differ"));
  return absl::OkStatus();
}

absl::Status CheckRingRechunked(const GoldenCase& golden, const WindowCase& c, Report& report) {
  const std::vector<std::vector<int64_t>> chunkings = {
      {c.tokens}, {1}, {7}, {c.window + 1}, {1, 2, 3, 5, 8, 13, 21, 34, 55, 89}, {c.window - 1, 3}};
  int64_t bad_chunkings = 0;
  for (const auto& chunks : chunkings) {
    KVC_ASSIGN_OR_RETURN(const std::vector<uint16_t> ring, RingAfterChunking(c, chunks));
    bad_chunkings += CountMismatches(ring, c.ring_final) != 0 ? 1 : 0;
  }
  report.Add(golden.name(), "ring_rechunked", bad_chunkings == 0,
             absl::StrCat(chunkings.size(), " chunkings, ", bad_chunkings, " differ from ring_final"));
  return absl::OkStatus();
}

}  // namespace

void RunWindowChecks(const GoldenCase& golden, Report& report) {
  const absl::StatusOr<WindowCase> c = Load(golden);
  if (!c.ok()) {
    report.Error(golden.name(), "window", c.status());
    return;
  }
  const struct {
    const char* name;
    absl::Status (*run)(const GoldenCase&, const WindowCase&, Report&);
  } checks[] = {{"window_rows", CheckWindowRows}, {"ring_final", CheckRingFinal}, {"ring_rechunked", CheckRingRechunked}};
  for (const auto& check : checks) {
    const absl::Status status = check.run(golden, *c, report);
    if (!status.ok()) report.Error(golden.name(), check.name, status);
  }
}

}  // namespace kvc::conformance
