// Row kernel throughput (row_kernels.h) against memcpy of the same bytes.
//
// Bytes counted: the *input* of each kernel (bf16 rows for quantization,
// stored rows for dequantization), and for BM_Memcpy the bytes copied, so a
// ratio of 1.0 means "consumes its input as fast as memcpy copies it".
// Each thread works on its own 64 MiB input, so every pass streams DRAM.
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/roofline.h"
#include "benchmark/benchmark.h"
#include "kvc/row_kernels.h"

namespace kvc::bench {
namespace {

std::vector<Bf16> RandomBf16(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Bf16> out(n);
  for (Bf16& v : out) v = ToBf16(normal(rng));
  return out;
}

void SetLabels(benchmark::State& state, int64_t rows_per_pass, int64_t bytes_per_pass) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * bytes_per_pass);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * rows_per_pass);
  state.SetLabel(ActiveSimdTargetName());
}

constexpr int64_t kKvRowsPerThread = static_cast<int64_t>(kBufferBytesPerThread / (2 * kHeadDim));
constexpr int64_t kKeysPerThread = static_cast<int64_t>(kBufferBytesPerThread / (2 * kIndexDim));

void BM_Memcpy(benchmark::State& state) {
  std::vector<uint8_t> src(kBufferBytesPerThread, 1), dst(kBufferBytesPerThread, 2);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), src.size());
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  SetLabels(state, 0, static_cast<int64_t>(src.size()));
  state.SetLabel("std::memcpy");
}
BENCHMARK(BM_Memcpy)->Threads(1)->Threads(2)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_QuantizeRows(benchmark::State& state) {
  const std::vector<Bf16> in = RandomBf16(static_cast<size_t>(kKvRowsPerThread) * kHeadDim, 1);
  std::vector<uint8_t> out(static_cast<size_t>(kKvRowsPerThread) * sizeof(KvRowFp8));
  const PackedRows rows = ContiguousRows(RowFormat::kKvFp8, out.data(), kKvRowsPerThread);
  for (auto _ : state) {
    if (!QuantizeKvRows(in, rows).ok()) state.SkipWithError("QuantizeKvRows failed");
    benchmark::ClobberMemory();
  }
  SetLabels(state, kKvRowsPerThread, kKvRowsPerThread * 2 * kHeadDim);
}
BENCHMARK(BM_QuantizeRows)->Threads(1)->Threads(2)->UseRealTime()->Unit(benchmark::kMillisecond);
KVC_BENCHMARK_ROOFLINE(BM_QuantizeRows, "BM_Memcpy");

void BM_DequantizeRows(benchmark::State& state) {
  const std::vector<Bf16> in = RandomBf16(static_cast<size_t>(kKvRowsPerThread) * kHeadDim, 2);
  std::vector<uint8_t> stored(static_cast<size_t>(kKvRowsPerThread) * sizeof(KvRowFp8));
  const PackedRows rows = ContiguousRows(RowFormat::kKvFp8, stored.data(), kKvRowsPerThread);
  if (!QuantizeKvRows(in, rows).ok()) state.SkipWithError("QuantizeKvRows failed");
  std::vector<Bf16> out(in.size());
  for (auto _ : state) {
    if (!DequantizeKvRows(rows, absl::MakeSpan(out)).ok()) state.SkipWithError("DequantizeKvRows failed");
    benchmark::ClobberMemory();
  }
  SetLabels(state, kKvRowsPerThread, kKvRowsPerThread * static_cast<int64_t>(sizeof(KvRowFp8)));
}
BENCHMARK(BM_DequantizeRows)->Threads(1)->Threads(2)->UseRealTime()->Unit(benchmark::kMillisecond);
KVC_BENCHMARK_ROOFLINE(BM_DequantizeRows, "BM_Memcpy");

void BM_QuantizeIndexKeys(benchmark::State& state) {
  const std::vector<Bf16> in = RandomBf16(static_cast<size_t>(kKeysPerThread) * kIndexDim, 3);
  std::vector<uint8_t> out(static_cast<size_t>(kKeysPerThread) * sizeof(IndexKeyFp4));
  const PackedRows keys = ContiguousRows(RowFormat::kIndexFp4, out.data(), kKeysPerThread);
  for (auto _ : state) {
    if (!QuantizeIndexKeys(in, keys).ok()) state.SkipWithError("QuantizeIndexKeys failed");
    benchmark::ClobberMemory();
  }
  SetLabels(state, kKeysPerThread, kKeysPerThread * 2 * kIndexDim);
}
BENCHMARK(BM_QuantizeIndexKeys)->Threads(1)->Threads(2)->UseRealTime()->Unit(benchmark::kMillisecond);
KVC_BENCHMARK_ROOFLINE(BM_QuantizeIndexKeys, "BM_Memcpy");

}  // namespace
}  // namespace kvc::bench
