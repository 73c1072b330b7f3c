// kvc-demo: a short tour of kvc's storage formats. Quantizes a batch of synthetic
// attention rows and index keys the way the cache stores them, then reports
// bytes per row, the reconstruction error and the throughput of each kernel.
//
//   kvc-demo [--rows N]     (default 262144 rows = 256 MiB of bf16 input)
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "absl/flags/flag.h"
#include "fmt/core.h"
#include "kvc/reference_codecs.h"
#include "kvc/row_kernels.h"
#include "tools/tool_flags.h"

ABSL_FLAG(int64_t, rows, 262144, "rows of each kind to quantize, 1..16777216");

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// A bar redrawn in place on a terminal; a line per quarter in a log.
void Progress(const char* what, int64_t done, int64_t total, int64_t step) {
  const int64_t percent = 100 * done / total;
  if (isatty(fileno(stderr))) {
    const int width = 40;
    const int filled = static_cast<int>(width * done / total);
    fmt::print(stderr, "\r  {:<22} [{}{}] {:3}%", what, std::string(static_cast<size_t>(filled), '#'),
               std::string(static_cast<size_t>(width - filled), '.'), percent);
    if (done == total) fmt::print(stderr, "\n");
  } else if (done == total || (4 * done / total) != (4 * (done - step) / total)) {
    fmt::print(stderr, "  {:<22} {:3}%\n", what, percent);
  }
}

// Rows shaped like post-RMSNorm activations: unit-scale Gaussians with a few
// outlier channels, which is what makes per-block scales matter.
std::vector<kvc::Bf16> SyntheticRows(int64_t rows, int dims, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<kvc::Bf16> out(static_cast<size_t>(rows) * dims);
  for (size_t i = 0; i < out.size(); ++i) {
    const float outlier = (i % static_cast<size_t>(dims)) % 97 == 0 ? 20.0f : 1.0f;
    out[i] = kvc::ToBf16(normal(rng) * outlier);
  }
  return out;
}

struct ErrorStats {
  double rel_l2 = 0;   // ||x - q|| / ||x|| over all values
  double max_abs = 0;  // max |x - q|
};

ErrorStats Compare(const std::vector<kvc::Bf16>& in, const std::vector<float>& out, int dims,
                   int compared_dims) {
  double err2 = 0, ref2 = 0, max_abs = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    if (static_cast<int>(i % static_cast<size_t>(dims)) >= compared_dims) continue;
    const double x = kvc::ToF32(in[i]), d = x - out[i];
    err2 += d * d;
    ref2 += x * x;
    max_abs = std::fmax(max_abs, std::fabs(d));
  }
  return {std::sqrt(err2 / ref2), max_abs};
}

// Rows [first, first + n) of a row-major array of `dims`-value rows.
absl::Span<const kvc::Bf16> Rows(const std::vector<kvc::Bf16>& all, int64_t first, int64_t n, int dims) {
  return absl::MakeConstSpan(all).subspan(static_cast<size_t>(first * dims), static_cast<size_t>(n * dims));
}

// Runs `fn(first_row, rows)` over `total` rows in chunks, with a progress bar.
template <typename Fn>
double Timed(const char* what, int64_t total, const Fn& fn) {
  const int64_t chunk = 8192;
  const Clock::time_point start = Clock::now();
  for (int64_t first = 0; first < total; first += chunk) {
    const int64_t n = first + chunk < total ? chunk : total - first;
    if (!fn(first, n)) std::exit(1);
    Progress(what, first + n, total, n);
  }
  return Seconds(start);
}

}  // namespace

int main(int argc, char** argv) {
  auto usage = [](const std::string& error) {
    if (!error.empty()) fmt::print(stderr, "kvc-demo: {}\n", error);
    fmt::print(error.empty() ? stdout : stderr, "usage: kvc-demo [--rows N]     (default 262144 rows = 256 MiB of bf16 input)\n");
    return error.empty() ? 0 : 2;  // --help: 0
  };
  const absl::StatusOr<kvc::tools::ParsedArgs> args = kvc::tools::ParseFlags(argc, argv);
  if (!args.ok()) return usage(std::string(args.status().message()));
  if (args->help) return usage("");
  if (!args->positional.empty()) return usage("unexpected argument " + args->positional[0]);
  const int64_t rows = absl::GetFlag(FLAGS_rows);
  if (rows <= 0 || rows > (int64_t{1} << 24)) return usage("--rows must be in 1..16777216");
  using kvc::kHeadDim;
  using kvc::kIndexDim;
  const kvc::RowFormatInfo& kv = kvc::FormatInfo(kvc::RowFormat::kKvFp8);
  const kvc::RowFormatInfo& key = kvc::FormatInfo(kvc::RowFormat::kIndexFp4);
  fmt::print("kvc-demo: {} KV rows ({} dims) and {} index keys ({} dims), SIMD target {}\n", rows,
             kHeadDim, rows, kIndexDim, kvc::ActiveSimdTargetName());
  std::fflush(stdout);  // before the progress lines on stderr

  auto report = [](const absl::Status& s) {
    if (!s.ok()) fmt::print(stderr, "\nkvc-demo: {}\n", s.ToString());
    return s.ok();
  };

  const std::vector<kvc::Bf16> rows_in = SyntheticRows(rows, kHeadDim, 1);
  std::vector<uint8_t> stored(static_cast<size_t>(rows) * kv.row_bytes);
  std::vector<float> restored(rows_in.size());
  const kvc::PackedRows view = kvc::ContiguousRows(kvc::RowFormat::kKvFp8, stored.data(), rows);
  const double t_quantize = Timed("quantize KV rows", rows, [&](int64_t first, int64_t n) {
    return report(kvc::QuantizeKvRows(Rows(rows_in, first, n, kHeadDim), view.Slice(first, n)));
  });
  const double t_dequantize = Timed("dequantize KV rows", rows, [&](int64_t first, int64_t n) {
    return report(kvc::DequantizeKvRows(view.Slice(first, n),
                                        absl::MakeSpan(restored).subspan(static_cast<size_t>(first * kHeadDim),
                                                                         static_cast<size_t>(n * kHeadDim))));
  });

  const std::vector<kvc::Bf16> keys_in = SyntheticRows(rows, kIndexDim, 2);
  std::vector<uint8_t> keys(static_cast<size_t>(rows) * key.row_bytes);
  const kvc::PackedRows key_view = kvc::ContiguousRows(kvc::RowFormat::kIndexFp4, keys.data(), rows);
  const double t_keys = Timed("quantize index keys", rows, [&](int64_t first, int64_t n) {
    return report(kvc::QuantizeIndexKeys(Rows(keys_in, first, n, kIndexDim), key_view.Slice(first, n)));
  });
  std::vector<float> keys_restored(keys_in.size());
  if (!report(kvc::DequantizeIndexKeys(key_view, absl::MakeSpan(keys_restored)))) return 1;
  // An index key is the FP4 image of the *rotated* key: compare against the
  // Hadamard of the input, which is what FP4 approximates.
  std::vector<kvc::Bf16> keys_rotated(keys_in.size());
  for (int64_t r = 0; r < rows; ++r) {
    float x[kIndexDim];
    for (int i = 0; i < kIndexDim; ++i) x[i] = kvc::ToF32(keys_in[static_cast<size_t>(r * kIndexDim + i)]);
    kvc::HadamardTransformRef(x);
    for (int i = 0; i < kIndexDim; ++i) keys_rotated[static_cast<size_t>(r * kIndexDim + i)] = kvc::ToBf16(x[i]);
  }

  const ErrorStats nope = Compare(rows_in, restored, kHeadDim, kvc::kNopeDim);
  const ErrorStats rope = Compare(rows_in, restored, kHeadDim, kHeadDim);
  const ErrorStats fp4 = Compare(keys_rotated, keys_restored, kIndexDim, kIndexDim);
  const double n = static_cast<double>(rows);

  fmt::print("\n{:<26}{:>12}{:>12}{:>14}{:>14}\n", "format", "bytes/row", "vs bf16", "rel. L2 err", "max |err|");
  fmt::print("{:<26}{:>12}{:>11.1f}%{:>14.3e}{:>14.3e}\n", "KV row (FP8 + bf16 RoPE)", kv.row_bytes,
             100.0 * kv.row_bytes / (2 * kHeadDim), rope.rel_l2, rope.max_abs);
  fmt::print("{:<26}{:>12}{:>12}{:>14.3e}{:>14.3e}\n", "  of which dims 0..447", kvc::kNopeDim + 7, "", nope.rel_l2, nope.max_abs);
  fmt::print("{:<26}{:>12}{:>11.1f}%{:>14.3e}{:>14.3e}\n", "index key (FP4)", key.row_bytes,
             100.0 * key.row_bytes / (2 * kIndexDim), fp4.rel_l2, fp4.max_abs);
  fmt::print("\n{:<26}{:>12}{:>16}\n", "kernel (1 thread)", "rows/s", "input GB/s");
  fmt::print("{:<26}{:>12.3e}{:>16.2f}\n", "quantize KV rows", n / t_quantize, n * 2 * kHeadDim / t_quantize / 1e9);
  fmt::print("{:<26}{:>12.3e}{:>16.2f}\n", "dequantize KV rows", n / t_dequantize, n * kv.row_bytes / t_dequantize / 1e9);
  fmt::print("{:<26}{:>12.3e}{:>16.2f}\n", "quantize index keys", n / t_keys, n * 2 * kIndexDim / t_keys / 1e9);
  fmt::print("\nFor throughput against this machine's memcpy, run build/release/bin/kvc_bench.\n");
  return 0;
}
