// Benchmarks report throughput as a ratio to a roofline measured in the same
// run: each benchmark names its reference (e.g. BM_Memcpy at the same thread
// count) and the reporter prints the ratio after all runs.
#ifndef KVC_BENCH_ROOFLINE_H_
#define KVC_BENCH_ROOFLINE_H_

#include <string>

#include "benchmark/benchmark.h"

namespace kvc::bench {

// Buffers per thread: past the 32 MiB L3 so DRAM, not cache, is measured.
constexpr size_t kBufferBytesPerThread = size_t{64} << 20;

// Declares that benchmark `name`'s counter (default: bytes/s) should be read
// against the same counter of benchmark `reference` (e.g. "BM_Memcpy") at the
// same thread count. Use through KVC_BENCHMARK_ROOFLINE next to BENCHMARK().
bool RegisterRoofline(const std::string& name, const std::string& reference,
                      const std::string& counter = "bytes_per_second");

}  // namespace kvc::bench

// Several rooflines per benchmark are fine: give each a distinct tag.
#define KVC_BENCHMARK_ROOFLINE(benchmark_fn, ...) KVC_BENCHMARK_ROOFLINE_TAGGED(benchmark_fn, 0, __VA_ARGS__)
#define KVC_BENCHMARK_ROOFLINE_TAGGED(benchmark_fn, tag, ...) \
  static const bool kvc_roofline_##benchmark_fn##_##tag = ::kvc::bench::RegisterRoofline(#benchmark_fn, __VA_ARGS__)

#endif  // KVC_BENCH_ROOFLINE_H_
