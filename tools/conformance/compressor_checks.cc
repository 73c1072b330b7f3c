// Compressor checks, through kvc::Cache, on the csa and hca cases:
//
//   <case>/compressed_entries            the stored 584-byte rows, after the
//                                        golden's chunking, dequantize to
//                                        comp_entries bit for bit
//   <case>/compressed_entries_rechunked  the same after other chunkings
//   csa/index_keys, csa/index_keys_rechunked   the 68-byte keys vs idx_entries
//
// and, on every layer case, <case>/rope_table: kvc's own RoPE table (spec
// §3a, correctly rounded) within one ulp of the official rope_freqs. The
// compressor checks feed the official table, as the spec prescribes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "kvc/compressor.h"
#include "kvc/row_kernels.h"
#include "src/status.h"
#include "tools/conformance/conformance.h"
#include "tools/conformance/golden_layer.h"

namespace kvc::conformance {
namespace {

// The official entries and keys, bf16 bits.
struct Expected {
  std::vector<uint16_t> entries, keys;
};

struct Stored {
  std::vector<uint16_t> entries, keys;  // dequantized, bf16 bits
};

// Size of chunk i: chunks[0] first, then chunks[1..] in a cycle (so {P, 1}
// is a prefill of P followed by one-token steps).
int64_t ChunkSize(const std::vector<int64_t>& chunks, int64_t i) {
  if (i == 0 || chunks.size() == 1) return chunks[0];
  return chunks[1 + static_cast<size_t>(i - 1) % (chunks.size() - 1)];
}

// Appends the case in the chunk sizes of ChunkSize and reads back what the
// cache stored.
absl::StatusOr<Stored> Run(const GoldenLayer& c, const std::vector<int64_t>& chunks) {
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<Cache> cache, c.MakeCache());
  KVC_ASSIGN_OR_RETURN(const SequenceId seq, cache->CreateSequence());
  const bool csa = c.kind == LayerKind::kCsa;
  for (int64_t at = 0, i = 0; at < c.tokens; ++i) {
    const int64_t n = std::min(ChunkSize(chunks, i), c.tokens - at);
    KVC_RETURN_IF_ERROR(c.Append(*cache, seq, at, n));
    at += n;
  }
  Stored out;
  KVC_ASSIGN_OR_RETURN(const HistoryView rows, cache->CompressedRows(seq, 0));
  std::vector<Bf16> row(kHeadDim);
  for (int64_t i = 0; i < rows.rows; ++i) {
    KVC_RETURN_IF_ERROR(DequantizeKvRows(
        rows.pages[static_cast<size_t>(i / rows.rows_per_page)].Slice(i % rows.rows_per_page, 1), absl::MakeSpan(row)));
    for (const Bf16& v : row) out.entries.push_back(v.bits);
  }
  if (csa) {
    KVC_ASSIGN_OR_RETURN(const HistoryView keys, cache->IndexKeys(seq, 0));
    std::vector<float> key(kIndexDim);
    for (int64_t i = 0; i < keys.rows; ++i) {
      KVC_RETURN_IF_ERROR(DequantizeIndexKeys(
          keys.pages[static_cast<size_t>(i / keys.rows_per_page)].Slice(i % keys.rows_per_page, 1), absl::MakeSpan(key)));
      for (const float v : key) out.keys.push_back(Bf16BitsFromF32(v));
    }
  }
  return out;
}

std::string Differ(int64_t mismatches, int64_t values, int64_t first, int64_t dims) {
  std::string s = absl::StrCat(values / dims, " entries, ", mismatches, " values differ");
  if (mismatches > 0) absl::StrAppend(&s, " (first in entry ", first / dims, ")");
  return s;
}

absl::Status CheckCompressor(const GoldenCase& golden, const GoldenLayer& c, const Expected& expected, Report& report) {
  // The golden's own chunking: the prefill, then one token at a time.
  std::vector<int64_t> golden_chunks = {std::max<int64_t>(c.prefill, 1), 1};
  KVC_ASSIGN_OR_RETURN(const Stored stored, Run(c, golden_chunks));
  int64_t first = -1;
  int64_t bad = CountMismatches(stored.entries, expected.entries, &first);
  report.Add(golden.name(), "compressed_entries", bad == 0 && !expected.entries.empty(),
             Differ(bad, static_cast<int64_t>(expected.entries.size()), first, kHeadDim));
  if (c.kind == LayerKind::kCsa) {
    bad = CountMismatches(stored.keys, expected.keys, &first);
    report.Add(golden.name(), "index_keys", bad == 0 && !expected.keys.empty(),
               Differ(bad, static_cast<int64_t>(expected.keys.size()), first, kIndexDim));
  }
  // Other chunkings: all at once, one by one, 7, ratio + 1 (a chunk closing
  // a window and starting the next), chunks longer than several windows.
  const std::vector<std::vector<int64_t>> chunkings = {
      {c.tokens, 1}, {1, 1}, {7, 7}, {c.ratio + 1, c.ratio + 1}, {3, 2 * c.ratio + 5, 1, 130}};
  int64_t bad_entries = 0, bad_keys = 0;
  for (const auto& chunks : chunkings) {
    KVC_ASSIGN_OR_RETURN(const Stored s, Run(c, chunks));
    bad_entries += CountMismatches(s.entries, expected.entries) != 0 ? 1 : 0;
    bad_keys += CountMismatches(s.keys, expected.keys) != 0 ? 1 : 0;
  }
  report.Add(golden.name(), "compressed_entries_rechunked", bad_entries == 0,
             absl::StrCat(chunkings.size(), " chunkings, ", bad_entries, " differ from comp_entries"));
  if (c.kind == LayerKind::kCsa) {
    report.Add(golden.name(), "index_keys_rechunked", bad_keys == 0,
               absl::StrCat(chunkings.size(), " chunkings, ", bad_keys, " differ from idx_entries"));
  }
  return absl::OkStatus();
}

// fp32 values a and b are within one ulp (same sign).
int64_t UlpDistance(float a, float b) {
  const int64_t ia = static_cast<int32_t>(F32Bits(a)), ib = static_cast<int32_t>(F32Bits(b));
  return ia > ib ? ia - ib : ib - ia;
}

absl::Status CheckRopeTable(const GoldenCase& golden, Report& report) {
  const TensorInfo* info = nullptr;
  KVC_ASSIGN_OR_RETURN(const std::vector<float> official,
                       golden.file().Get<float>("rope_freqs", DType::kF32, {-1, 32, 2}, &info));
  KVC_ASSIGN_OR_RETURN(const int64_t ratio, golden.MetaInt("ratio"));
  // The layer's RoPE parameters, from the metadata (spec §1, §3a).
  RopeSpec rope;
  KVC_ASSIGN_OR_RETURN(rope.theta, golden.MetaNumber(ratio == 0 ? "rope_theta" : "compress_rope_theta"));
  if (ratio != 0) {
    KVC_ASSIGN_OR_RETURN(rope.yarn.factor, golden.MetaNumber("yarn_factor"));
    KVC_ASSIGN_OR_RETURN(rope.yarn.original_max_positions, golden.MetaInt("yarn_original"));
    KVC_ASSIGN_OR_RETURN(rope.yarn.beta_fast, golden.MetaNumber("beta_fast"));
    KVC_ASSIGN_OR_RETURN(rope.yarn.beta_slow, golden.MetaNumber("beta_slow"));
  }
  const RopeTable table(rope);
  int64_t worst = 0, off_by_one = 0;
  float row[64];
  for (int64_t p = 0; p < info->shape[0]; ++p) {
    table.At(p, row);
    for (int i = 0; i < 64; ++i) {
      const int64_t d = UlpDistance(row[i], official[static_cast<size_t>(p * 64 + i)]);
      worst = std::max(worst, d);
      off_by_one += d == 1 ? 1 : 0;
    }
  }
  const int64_t values = info->shape[0] * 64;
  const int64_t per_mille = values > 0 ? off_by_one * 1000 / values : 0;
  report.Add(golden.name(), "rope_table", worst <= 1,
             absl::StrCat(values, " values, max ", worst, " ulp from the official table, ", off_by_one, " (",
                          per_mille / 10, ".", per_mille % 10, " %) one ulp off"));
  return absl::OkStatus();
}

}  // namespace

void RunCompressorChecks(const GoldenCase& golden, Report& report) {
  const absl::Status rope = CheckRopeTable(golden, report);
  if (!rope.ok()) report.Error(golden.name(), "rope_table", rope);
  absl::StatusOr<int64_t> ratio = golden.MetaInt("ratio");
  if (ratio.ok() && *ratio == 0) return;  // window-only: no compressor
  absl::StatusOr<GoldenLayer> c = GoldenLayer::Load(golden);
  Expected expected;
  if (c.ok()) {
    absl::StatusOr<std::vector<uint16_t>> entries =
        golden.file().Get<uint16_t>("comp_entries", DType::kBF16, {c->tokens / c->ratio, kHeadDim});
    absl::StatusOr<std::vector<uint16_t>> keys =
        c->kind == LayerKind::kCsa ? golden.file().Get<uint16_t>("idx_entries", DType::kBF16, {c->tokens / 4, kIndexDim})
                                   : absl::StatusOr<std::vector<uint16_t>>(std::vector<uint16_t>{});
    if (!entries.ok() || !keys.ok()) c = !entries.ok() ? entries.status() : keys.status();
    if (c.ok()) expected = {*std::move(entries), *std::move(keys)};
  }
  if (!c.ok()) {
    report.Error(golden.name(), "compressor", c.status());
    return;
  }
  const absl::Status status = CheckCompressor(golden, *c, expected, report);
  if (!status.ok()) report.Error(golden.name(), "compressed_entries", status);
}

}  // namespace kvc::conformance
