// Example: kvc as the cache manager of a serving engine whose kernels own
// the bytes (page-manager mode), the way vLLM's scheduler drives its KV
// cache manager:
//
//   1. the engine allocates its page arrays (here host memory standing in
//      for GPU memory) from Cache::PageGeometry and hands their addresses in;
//   2. every step, one PlanStep for the whole batch reserves every page and
//      returns the slot of every row the step writes (slot_mapping), plus
//      the page copies (copy-on-write, checkpoints) to make first;
//   3. the engine's "kernels" write window rows, compressed entries, index
//      keys and compressor state through those slots; CommitStep;
//   4. a prefill chunk (its 300 causal sets selected in one call), decode
//      steps, a draft-verify step (4 drafts selected for in one call per
//      layer, 2 accepted: commit and roll back), a failed step (AbortStep),
//      a fork (its page copies), a free (held until the device is done);
//   5. prefix caching: the first block of a prompt is published under its
//      chain hash (the engine copies the ring and compressor-state
//      checkpoint), and a new request with the same prompt starts from it
//      (the engine copies the checkpoint back; the history pages are shared);
//   6. finally every row is read back through block tables and page arrays
//      and checked against what the engine wrote.
//
// The engine brings its own compressor (its layers have no compressor
// parameters): here deterministic rows stand in for every kernel output.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "kvc/cache.h"
#include "kvc/row_formats.h"
#include "kvc/row_kernels.h"

namespace {

using kvc::Stream;

// A kernel output standing in for the engine's: row `index` of `what`
// (stream, layer, sequence), 512 bf16 values (128 for a key).
std::vector<kvc::Bf16> EngineRow(int what, int layer, kvc::SequenceId seq, int64_t index, int dims) {
  std::vector<kvc::Bf16> row(static_cast<size_t>(dims));
  uint32_t x = static_cast<uint32_t>(what * 7919 + layer * 104729 + seq * 1299709 + index * 15485863) | 1u;
  for (kvc::Bf16& v : row) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;  // xorshift32
    v = kvc::ToBf16(static_cast<float>(static_cast<int32_t>(x % 2001) - 1000) / 256.0f);
  }
  return row;
}

// The engine: its arrays, and its record of the rows it wrote (for the check).
struct Engine {
  const kvc::ModelSpec& spec;
  std::vector<std::unique_ptr<uint8_t[]>> memory;
  std::vector<kvc::EngineArray> arrays;
  // (stream, layer, seq, row) -> the sequence whose forward pass wrote it
  // (a fork's rows before the fork are its parent's).
  std::map<std::tuple<int, int, kvc::SequenceId, int64_t>, kvc::SequenceId> author;
  int64_t rows_written = 0;

  Engine(const kvc::ModelSpec& model, const kvc::CacheOptions& options, int64_t pages) : spec(model) {
    const std::vector<kvc::StreamGeometry> geometry = kvc::Cache::PageGeometry(model, options).value();
    for (const kvc::StreamGeometry& g : geometry) {
      for (const int32_t layer : g.layers) {  // cudaMalloc stand-in, 64-byte aligned
        const int64_t bytes = pages * g.page_bytes;
        memory.emplace_back(new uint8_t[static_cast<size_t>(bytes) + 64]);
        uint8_t* base = memory.back().get() + (64 - reinterpret_cast<uintptr_t>(memory.back().get()) % 64) % 64;
        arrays.push_back({layer, g.stream, {base, static_cast<size_t>(bytes)}});
      }
    }
  }

  // A fork: the child holds what the parent wrote.
  void Fork(kvc::SequenceId parent, kvc::SequenceId child) {
    std::vector<std::pair<std::tuple<int, int, kvc::SequenceId, int64_t>, kvc::SequenceId>> add;
    for (const auto& [key, who] : author) {
      if (std::get<2>(key) == parent) add.push_back({{std::get<0>(key), std::get<1>(key), child, std::get<3>(key)}, who});
    }
    author.insert(add.begin(), add.end());
  }

  // A request restored from a prefix of `tokens` tokens: it holds the rows
  // `from` wrote for those tokens (its window rows and closed entries).
  void Adopt(kvc::SequenceId from, kvc::SequenceId to, int64_t tokens) {
    std::vector<std::pair<std::tuple<int, int, kvc::SequenceId, int64_t>, kvc::SequenceId>> add;
    for (const auto& [key, who] : author) {
      const Stream s = static_cast<Stream>(std::get<0>(key));
      const int64_t rows = s == Stream::kWindow ? tokens : s == Stream::kHcaRows ? tokens / 128 : tokens / 4;
      if (std::get<2>(key) == from && std::get<3>(key) < rows) {
        add.push_back({{std::get<0>(key), std::get<1>(key), to, std::get<3>(key)}, who});
      }
    }
    author.insert(add.begin(), add.end());
  }

  // The page-copy kernel: page src onto dst in every layer of the stream.
  void Copy(const kvc::Cache& cache, const std::vector<kvc::PageCopy>& copies) const {
    for (const kvc::PageCopy& c : copies) {
      for (int layer = 0; layer < static_cast<int>(spec.layers.size()); ++layer) {
        const absl::StatusOr<kvc::PageArray> a = cache.LayerPages(layer, c.stream);
        if (a.ok()) std::memcpy(a->base + c.dst * a->page_bytes, a->base + c.src * a->page_bytes, a->page_bytes);
      }
    }
  }

  // The "forward pass" of request b of `plan`: every layer writes its rows
  // through the plan's slots (a -1 slot is skipped).
  void Forward(const kvc::Cache& cache, const kvc::StepPlan& plan, size_t b, int layers) {
    const kvc::SequenceId seq = plan.seqs[b];
    for (int layer = 0; layer < layers; ++layer) {
      for (const Stream s : {Stream::kWindow, Stream::kCsaRows, Stream::kCsaKeys, Stream::kHcaRows}) {
        const absl::StatusOr<kvc::PageArray> a = cache.LayerPages(layer, s);
        if (!a.ok()) continue;  // the layer has no such stream
        const kvc::StepSlots& slots = plan.slots[static_cast<int>(s)];
        // Row numbers: positions for the window, entry numbers otherwise.
        const int ratio = s == Stream::kHcaRows ? 128 : 4;
        const int64_t first = s == Stream::kWindow ? plan.first_position[b] : plan.first_position[b] / ratio;
        const bool key = s == Stream::kCsaKeys;
        for (int32_t i = slots.indptr[b]; i < slots.indptr[b + 1]; ++i) {
          const int64_t slot = slots.slots[static_cast<size_t>(i)];
          if (slot < 0) continue;
          const int64_t row = first + (i - slots.indptr[b]);
          const std::vector<kvc::Bf16> values = EngineRow(static_cast<int>(s), layer, seq, row, key ? kvc::kIndexDim : kvc::kHeadDim);
          kvc::PackedRows to = kvc::PageFooterRows(key ? kvc::RowFormat::kIndexFp4 : kvc::RowFormat::kKvFp8,
                                                   a->base + slot / a->rows_per_page * a->page_bytes, a->rows_per_page)
                                   .Slice(slot % a->rows_per_page, 1);
          const absl::Status s_ok = key ? kvc::QuantizeIndexKeys(values, to) : kvc::QuantizeKvRows(values, to);
          if (!s_ok.ok()) std::fprintf(stderr, "kernel refused a row: %s\n", s_ok.ToString().c_str());
          author[{static_cast<int>(s), layer, seq, row}] = seq;
          ++rows_written;
        }
      }
    }
  }
};

// Reads every row `seq` holds through its block tables and the page arrays
// and compares it with the engine's row (quantized again): mismatches.
int64_t CheckSequence(const kvc::Cache& cache, const Engine& engine, kvc::SequenceId seq, int64_t* rows_read) {
  int64_t mismatches = 0;
  for (int layer = 0; layer < static_cast<int>(cache.spec().layers.size()); ++layer) {
    const int64_t length = *cache.Length(seq, layer);
    for (const Stream s : {Stream::kWindow, Stream::kCsaRows, Stream::kCsaKeys, Stream::kHcaRows}) {
      const absl::StatusOr<kvc::PageArray> a = cache.LayerPages(layer, s);
      if (!a.ok()) continue;
      const std::vector<int32_t> ids = *cache.BlockTable(seq, s);
      const bool key = s == Stream::kCsaKeys;
      const kvc::RowFormat format = key ? kvc::RowFormat::kIndexFp4 : kvc::RowFormat::kKvFp8;
      // The window: the last `window` positions (what a query at the last
      // position reads), at ring slot position mod ring; history: every row.
      const int64_t ring = cache.spec().window + cache.options().draft_slots;
      const int64_t first = s == Stream::kWindow ? std::max<int64_t>(0, length - cache.spec().window) : 0;
      const int64_t end = s == Stream::kWindow ? length : *cache.StreamRows(seq, layer, s);
      for (int64_t row = first; row < end; ++row) {
        const int64_t r = s == Stream::kWindow ? row % ring : row;
        const uint8_t* page = a->base + int64_t{ids[static_cast<size_t>(r / a->rows_per_page)]} * a->page_bytes;
        const kvc::ConstPackedRows stored =
            kvc::PageFooterRows(format, page, a->rows_per_page).Slice(r % a->rows_per_page, 1);
        // The row the engine wrote for this position, quantized again.
        std::vector<uint8_t> expect(static_cast<size_t>(kvc::FormatInfo(format).row_bytes));
        const auto who = engine.author.find({static_cast<int>(s), layer, seq, row});
        if (who == engine.author.end()) {
          ++mismatches;
          continue;
        }
        const std::vector<kvc::Bf16> values =
            EngineRow(static_cast<int>(s), layer, who->second, row, key ? kvc::kIndexDim : kvc::kHeadDim);
        const kvc::PackedRows want = kvc::ContiguousRows(format, expect.data(), 1);
        if (!(key ? kvc::QuantizeIndexKeys(values, want) : kvc::QuantizeKvRows(values, want)).ok()) ++mismatches;
        mismatches += std::memcmp(stored.row_data(0), want.row_data(0), static_cast<size_t>(a->row_data_bytes)) != 0 ||
                      std::memcmp(stored.row_scales(0), want.row_scales(0), static_cast<size_t>(a->row_scale_bytes)) != 0;
        ++*rows_read;
      }
    }
  }
  return mismatches;
}

}  // namespace

int main() {
  // A four-layer V4-style model (window, CSA, HCA, CSA) whose compressors run in the engine.
  kvc::ModelSpec spec = kvc::ModelSpec::V4Flash();
  spec.name = "v4-style-4-layers";
  spec.layers.assign(4, kvc::LayerSpec{});
  spec.layers[0].kind = kvc::LayerKind::kWindow;
  spec.layers[1].kind = kvc::LayerKind::kCsa;
  spec.layers[2].kind = kvc::LayerKind::kHca;
  spec.layers[3].kind = kvc::LayerKind::kCsa;
  spec.max_context = 1 << 16;

  kvc::CacheOptions options;
  options.page_manager = true;  // kvc never touches the bytes
  options.draft_slots = 16;     // the ring keeps 128 + 16 rows: verify steps and rollback need no copies
  Engine engine(spec, options, /*pages=*/48);
  options.engine_arrays = engine.arrays;
  absl::StatusOr<std::unique_ptr<kvc::Cache>> created = kvc::Cache::Create(spec, options);
  if (!created.ok()) {
    std::fprintf(stderr, "%s\n", created.status().ToString().c_str());
    return 1;
  }
  kvc::Cache& cache = **created;
  const int layers = static_cast<int>(spec.layers.size());

  // One scheduler step: plan, copy, forward, commit, and (after the
  // device's event) complete.
  auto step = [&](const std::vector<kvc::StepRequest>& batch) -> absl::StatusOr<kvc::StepPlan> {
    absl::StatusOr<kvc::StepPlan> plan = cache.PlanStep(batch);
    if (!plan.ok()) return plan.status();
    engine.Copy(cache, plan->copies);
    for (size_t b = 0; b < batch.size(); ++b) engine.Forward(cache, *plan, b, layers);
    if (absl::Status s = cache.CommitStep(plan->epoch); !s.ok()) return s;
    if (absl::StatusOr<int64_t> done = cache.CompleteSteps(plan->epoch); !done.ok()) return done.status();
    return plan;
  };
  auto report = [](const char* what, const absl::StatusOr<kvc::StepPlan>& plan) {
    if (!plan.ok()) {
      std::fprintf(stderr, "%s: %s\n", what, plan.status().ToString().c_str());
      return false;
    }
    std::printf("%-30s epoch %llu: %zu window slots, %zu CSA rows, %zu HCA rows, %zu page copies\n", what,
                static_cast<unsigned long long>(plan->epoch), plan->slots[0].slots.size(), plan->slots[1].slots.size(),
                plan->slots[3].slots.size(), plan->copies.size());
    return true;
  };

  std::vector<kvc::SequenceId> seqs;
  for (int i = 0; i < 3; ++i) seqs.push_back(*cache.CreateSequence());
  // A prefill chunk per sequence (longer than the rollback depth: kvc
  // checkpoints ring and state pages so the step could be aborted).
  if (!report("prefill chunk", step({{seqs[0], 300}, {seqs[1], 256}, {seqs[2], 64}}))) return 1;
  {  // The chunk's 300 causal sets of the HCA layer in one call: window rows
     // the ring no longer holds (-1) come from the chunk's own activations.
    const kvc::PositionSets sets = *cache.SelectAttentionSets(seqs[0], 2, 0, 300, {});
    const int64_t from_ring = static_cast<int64_t>(
        std::count_if(sets.window_indices.begin(), sets.window_indices.end(), [](int32_t x) { return x >= 0; }));
    std::printf("prefill sets: %lld positions, %zu window rows (%lld in the ring), %zu compressed rows\n",
                static_cast<long long>(sets.count()), sets.window_indices.size(), static_cast<long long>(from_ring),
                sets.compressed_indices.size());
    if (sets.count() != 300 || sets.compressed_indices.size() != 300 - 127 + 300 - 255) return 1;
  }
  // Prefix caching: sequence 1's first block (B = 256 tokens: a system
  // prompt, say) becomes reusable under the engine's chain hash of it; the
  // engine copies the ring and compressor-state checkpoint kvc lists. A new
  // request whose prompt starts with the same block starts from it.
  const std::vector<uint64_t> prompt = {0x5157ull, 0xA11CEull};  // chain hashes of the new request's blocks
  std::vector<kvc::PageCopy> prefix_copies;
  if (absl::Status s = cache.PublishPrefix(seqs[1], {prompt[0]}, &prefix_copies); !s.ok()) {
    return std::fprintf(stderr, "publish: %s\n", s.ToString().c_str()), 1;
  }
  engine.Copy(cache, prefix_copies);
  std::printf("published %lld tokens of sequence %lld: %zu page copies (its checkpoint)\n",
              static_cast<long long>(cache.PrefixBlockTokens()), static_cast<long long>(seqs[1]), prefix_copies.size());
  const absl::StatusOr<kvc::Cache::PrefixMatch> reuse = cache.CreateSequenceFromPrefix(prompt, &prefix_copies);
  if (!reuse.ok()) return std::fprintf(stderr, "reuse: %s\n", reuse.status().ToString().c_str()), 1;
  engine.Copy(cache, prefix_copies);
  engine.Adopt(seqs[1], reuse->seq, reuse->tokens);
  std::printf("new request %lld starts from %lld cached tokens: %zu page copies, history shared\n",
              static_cast<long long>(reuse->seq), static_cast<long long>(reuse->tokens), prefix_copies.size());
  seqs.push_back(reuse->seq);
  for (int i = 0; i < 8; ++i) {
    if (!report("decode", step({{seqs[0], 1}, {seqs[1], 1}, {seqs[2], 1}, {reuse->seq, i == 0 ? 40 : 1}}))) return 1;
  }
  // Draft-verify: four drafts on sequence 0; the target model accepts two.
  // The four positions attend in one call per layer, each with its own
  // causal set (indices into the page arrays), inside the open step.
  const int64_t before_verify = *cache.Length(seqs[0], 0);
  {
    absl::StatusOr<kvc::StepPlan> plan = cache.PlanStep({{seqs[0], 4}, {seqs[1], 1}});
    if (!report("verify 4 drafts", plan)) return 1;
    engine.Copy(cache, plan->copies);
    for (size_t b = 0; b < 2; ++b) engine.Forward(cache, *plan, b, layers);
    int64_t checked = 0, wrong = 0;
    for (const int layer : {0, 2}) {  // the window layer and the HCA layer (CSA: the engine's indexer picks)
      const kvc::PositionSets sets = *cache.SelectAttentionSets(seqs[0], layer, before_verify, 4, {});
      const kvc::PageArray window = *cache.LayerPages(layer, Stream::kWindow);
      const std::vector<int32_t> ids = *cache.BlockTable(seqs[0], Stream::kWindow);
      const int64_t ring = spec.window + options.draft_slots;
      for (int64_t i = 0; i < sets.count(); ++i) {
        const int64_t t = before_verify + i;
        // The last window row of position t is t's own row, just written by the engine.
        const int32_t last = sets.window_indices[static_cast<size_t>(sets.window_offsets[static_cast<size_t>(i) + 1] - 1)];
        const int64_t slot = t % ring;
        wrong += last != ids[static_cast<size_t>(slot / window.rows_per_page)] * window.rows_per_page + slot % window.rows_per_page;
        wrong += sets.window_offsets[static_cast<size_t>(i) + 1] - sets.window_offsets[static_cast<size_t>(i)] != std::min<int64_t>(t + 1, spec.window);
        wrong += sets.compressed_offsets[static_cast<size_t>(i) + 1] - sets.compressed_offsets[static_cast<size_t>(i)] !=
                 (layer == 2 ? (t + 1) / 128 : 0);
        ++checked;
      }
    }
    std::printf("verify: %lld position sets selected in one call per layer, %lld wrong\n", static_cast<long long>(checked),
                static_cast<long long>(wrong));
    if (wrong != 0 || !cache.CommitStep(plan->epoch).ok() || !cache.CompleteSteps(plan->epoch).ok()) return 1;
  }
  if (absl::Status s = cache.Truncate(seqs[0], before_verify + 2); !s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
  // A step that fails after the forward pass started: abort it as a whole.
  {
    absl::StatusOr<kvc::StepPlan> plan = cache.PlanStep({{seqs[1], 40}});
    if (!report("step to abort", plan)) return 1;
    engine.Copy(cache, plan->copies);
    engine.Forward(cache, *plan, 0, 2);          // layers 0 and 1 written, then the failure
    engine.Copy(cache, plan->abort_copies);      // the checkpoints back
    if (!cache.AbortStep(plan->epoch).ok()) return 1;
    if (!cache.CompleteSteps(plan->epoch).ok()) return 1;
  }
  // A branch: kvc lists the ring and state pages the engine copies.
  std::vector<kvc::PageCopy> fork_copies;
  const kvc::SequenceId branch = *cache.Fork(seqs[1], &fork_copies);
  engine.Copy(cache, fork_copies);
  engine.Fork(seqs[1], branch);
  std::printf("fork of sequence %lld: %zu page copies\n", static_cast<long long>(seqs[1]), fork_copies.size());
  seqs.push_back(branch);
  if (!report("decode (branch shares pages)", step({{seqs[1], 1}, {branch, 3}}))) return 1;
  // Sequence 2 finishes while step N may still run on the device.
  const absl::StatusOr<kvc::StepPlan> inflight = cache.PlanStep({{seqs[0], 1}});
  if (!inflight.ok()) return 1;
  engine.Forward(cache, *inflight, 0, layers);
  if (!cache.CommitStep(inflight->epoch).ok() || !cache.Free(seqs[2]).ok()) return 1;
  std::printf("freed sequence %lld under epoch %llu: %lld pages wait for the device\n",
              static_cast<long long>(seqs[2]), static_cast<unsigned long long>(inflight->epoch),
              static_cast<long long>(cache.Usage().deferred_pages));
  const int64_t released = *cache.CompleteSteps(inflight->epoch);
  std::printf("device done with epoch %llu: %lld page ids reusable\n", static_cast<unsigned long long>(inflight->epoch),
              static_cast<long long>(released));

  int64_t rows_read = 0, mismatches = 0;
  for (const kvc::SequenceId s : {seqs[0], seqs[1], branch, reuse->seq}) mismatches += CheckSequence(cache, engine, s, &rows_read);
  const kvc::PrefixUsage prefix = cache.Usage().prefix;
  std::printf("prefix cache: %lld prefix, %lld hit, %lld tokens reused, %lld B cached (%lld B shared with live sequences)\n",
              static_cast<long long>(prefix.prefixes), static_cast<long long>(prefix.hits),
              static_cast<long long>(prefix.tokens_reused), static_cast<long long>(prefix.cached_bytes),
              static_cast<long long>(prefix.shared_bytes));
  std::printf("engine wrote %lld rows; read %lld back through block tables and page arrays: %lld mismatches\n",
              static_cast<long long>(engine.rows_written), static_cast<long long>(rows_read),
              static_cast<long long>(mismatches));
  return mismatches == 0 && rows_read > 0 ? 0 : 1;
}
