// Example: store KV rows in a page laid out the way FlashMLA / vLLM / SGLang
// pages are (576-byte row data first, 8-byte scale footer after), then gather
// the rows a query attends to back into a bf16 buffer.
//
// An engine owns the page memory; kvc only needs a view of it.
#include <cmath>
#include <cstdio>
#include <vector>

#include "kvc/row_kernels.h"

int main() {
  constexpr int kRowsPerPage = 64;
  const kvc::RowFormatInfo& format = kvc::FormatInfo(kvc::RowFormat::kKvFp8);

  // 1. The engine's page: 64 rows * 584 bytes = 37,376 bytes (a multiple of 576).
  std::vector<uint8_t> page(kRowsPerPage * format.row_bytes);
  const kvc::PackedRows rows = kvc::PageFooterRows(kvc::RowFormat::kKvFp8, page.data(), kRowsPerPage);

  // 2. The layer's KV for 64 tokens (after the engine's RMSNorm and RoPE), bf16.
  std::vector<kvc::Bf16> kv(kRowsPerPage * kvc::kHeadDim);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = kvc::ToBf16(std::cos(0.01f * static_cast<float>(i)));

  if (absl::Status s = kvc::QuantizeKvRows(kv, rows); !s.ok()) {
    std::fprintf(stderr, "quantize: %s\n", s.ToString().c_str());
    return 1;
  }

  // 3. A query attends to tokens 3, 17 and 63: dequantize just those rows.
  const std::vector<int64_t> selected = {3, 17, 63};
  std::vector<kvc::Bf16> gathered(selected.size() * kvc::kHeadDim);
  if (absl::Status s = kvc::GatherDequantizeKvRows(rows, selected, absl::MakeSpan(gathered)); !s.ok()) {
    std::fprintf(stderr, "gather: %s\n", s.ToString().c_str());
    return 1;
  }

  // 4. Bad input is an error, not a crash: token 64 is not in this page.
  const std::vector<int64_t> out_of_page = {64};
  const absl::Status bad = kvc::GatherDequantizeKvRows(rows, out_of_page, absl::MakeSpan(gathered).first(kvc::kHeadDim));

  double worst = 0;
  for (size_t r = 0; r < selected.size(); ++r) {
    for (int i = 0; i < kvc::kHeadDim; ++i) {
      const float original = kvc::ToF32(kv[static_cast<size_t>(selected[r]) * kvc::kHeadDim + i]);
      worst = std::fmax(worst, std::fabs(kvc::ToF32(gathered[r * kvc::kHeadDim + i]) - original));
    }
  }
  std::printf("page: %d rows, %zu bytes (%d B/row); gathered %zu rows, max |error| %.4f\n", kRowsPerPage,
              page.size(), format.row_bytes, selected.size(), worst);
  std::printf("out-of-page gather: %s\n", bad.ToString().c_str());
  return (worst < 0.07 && bad.code() == absl::StatusCode::kOutOfRange) ? 0 : 1;
}
