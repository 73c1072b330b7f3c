// Example: embedding kvc::Cache the way an inference engine's step loop does.
//
//   1. build the cache from the model description (preset or config.json),
//   2. prefill a prompt in chunks, layer by layer,
//   3. decode token by token,
//   4. speculative decoding: append 4 draft tokens, reject 3, roll back,
//   5. fork the sequence for a second branch (history shared, state copied),
//   6. hand the window ring's pages to a kernel without copying.
//
// The engine owns all matrix products; here random rows stand in for each
// layer's post-RMSNorm, post-RoPE KV row.
#include <cstdio>
#include <random>
#include <vector>

#include "kvc/cache.h"

namespace {

std::vector<kvc::Bf16> FakeKvRows(int64_t tokens, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<kvc::Bf16> rows(static_cast<size_t>(tokens) * kvc::kHeadDim);
  for (kvc::Bf16& v : rows) v = kvc::ToBf16(normal(rng));
  return rows;
}

// One model step over `tokens` new tokens: every layer appends its rows.
bool Step(kvc::Cache& cache, kvc::SequenceId seq, int64_t position, int64_t tokens, std::mt19937& rng) {
  for (int layer = 0; layer < static_cast<int>(cache.spec().layers.size()); ++layer) {
    const std::vector<kvc::Bf16> rows = FakeKvRows(tokens, rng);  // the engine's wkv + norm + RoPE output
    const absl::Status s = cache.Append(seq, layer, position, {rows});
    if (!s.ok()) {
      std::fprintf(stderr, "append: %s\n", s.ToString().c_str());
      return false;
    }
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(1);
  kvc::CacheOptions options;
  options.state_bytes = int64_t{256} << 20;
  absl::StatusOr<std::unique_ptr<kvc::Cache>> created = kvc::Cache::Create(kvc::ModelSpec::V4Flash(), options);
  if (!created.ok()) {
    std::fprintf(stderr, "%s\n", created.status().ToString().c_str());
    return 1;
  }
  kvc::Cache& cache = **created;
  const kvc::SequenceId seq = *cache.CreateSequence();

  // Prefill 1,000 prompt tokens in chunks of 256, then decode 20 tokens.
  int64_t length = 0;
  for (const int64_t chunk : {256, 256, 256, 232}) {
    if (!Step(cache, seq, length, chunk, rng)) return 1;
    length += chunk;
  }
  for (int i = 0; i < 20; ++i) {
    if (!Step(cache, seq, length, 1, rng)) return 1;
    ++length;
  }

  // Speculative decoding: 4 draft tokens in one step; the target accepts 1.
  if (!Step(cache, seq, length, 4, rng)) return 1;
  if (!cache.Truncate(seq, length + 1).ok()) return 1;
  length += 1;

  // A second branch from here: history is shared, window and state copied.
  const kvc::SequenceId branch = *cache.Fork(seq);
  if (!Step(cache, branch, length, 1, rng)) return 1;

  // Zero-copy: layer 2's ring pages, as a GPU kernel would take them.
  const kvc::WindowRingView ring = *cache.Window(seq, 2);
  std::printf("sequence %lld: %lld tokens; layer 2 ring = %zu pages of %d rows (slot = position mod %d)\n",
              static_cast<long long>(seq), static_cast<long long>(ring.length), ring.pages.size(),
              ring.rows_per_page, ring.window);

  const kvc::CacheUsage usage = cache.Usage();
  for (int c = 0; c < kvc::kNumComponents; ++c) {
    std::printf("  %-18s %10lld bytes used\n", kvc::ComponentName(static_cast<kvc::Component>(c)),
                static_cast<long long>(usage.components[c].used_bytes));
  }
  std::printf("  rollback floor %lld, branch length %lld\n", static_cast<long long>(*cache.RollbackFloor(seq)),
              static_cast<long long>(*cache.Length(branch, 0)));
  return (cache.Free(branch).ok() && cache.Free(seq).ok() && cache.Usage().used_bytes() == 0) ? 0 : 1;
}
