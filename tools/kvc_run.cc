// kvc-run: the README's main job. One sequence of a DeepSeek-V4 model,
// end to end on a real kvc::Cache: prefill (default 1,048,576 tokens in
// chunks of 8,192 through the compressors), then decode steps (append one
// token to every layer, prepare the CSA index queries, score + top-k, gather
// every layer's attention set). Prints progress, then a summary (memory by
// component against the analytic figure, prefill tokens/s, decode ms/token by
// stage) and writes it as JSON. Last, the sequence is snapshotted (a full
// save, one more decode step, an incremental save), restored into a second
// cache and compared with the original byte for byte; the file is removed.
//
//   kvc-run [--model v4-flash|v4-pro|CONFIG.json] [--tokens N] [--decode-steps K] [--json FILE]
//           [--snapshot FILE|none]
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <vector>
#include <string>

#include "absl/strings/numbers.h"
#include "fmt/core.h"
#include "kvc/cache.h"
#include "kvc/footprint.h"
#include "kvc/row_kernels.h"
#include "kvc/snapshot.h"
#include "tools/synthetic_model.h"

namespace {

int Usage(const std::string& error) {
  if (!error.empty()) fmt::print(stderr, "kvc-run: {}\n", error);
  fmt::print(stderr, "usage: kvc-run [--model v4-flash|v4-pro|CONFIG.json] [--tokens N] [--decode-steps K] [--json FILE]\n"
                     "               [--snapshot FILE|none]\n");
  return 2;
}

void Progress(int64_t done, int64_t total, double seconds) {
  const int percent = static_cast<int>(100 * done / total);
  const double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0;
  if (isatty(fileno(stderr))) {
    const int filled = percent * 40 / 100;
    fmt::print(stderr, "\r  prefill [{}{}] {:3}%  {} tokens  {:.0f} tokens/s", std::string(static_cast<size_t>(filled), '#'),
               std::string(static_cast<size_t>(40 - filled), '.'), percent, done, rate);
    if (done == total) fmt::print(stderr, "\n");
  } else {
    fmt::print(stderr, "  prefill {:3}%  {} of {} tokens  {:.0f} tokens/s\n", percent, done, total, rate);
  }
}

// Whether sequence `a` of cache `x` and `b` of `y` hold the same bytes: per
// layer the length, every window-ring slot, compressed row and index key.
bool SameBytes(const kvc::Cache& x, kvc::SequenceId a, const kvc::Cache& y, kvc::SequenceId b) {
  auto same_rows = [](const std::vector<kvc::ConstPackedRows>& p, int32_t p_rows, const std::vector<kvc::ConstPackedRows>& q,
                      int32_t q_rows, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const kvc::ConstPackedRows& u = p[static_cast<size_t>(i / p_rows)];
      const kvc::ConstPackedRows& v = q[static_cast<size_t>(i / q_rows)];
      if (std::memcmp(u.row_data(i % p_rows), v.row_data(i % q_rows), static_cast<size_t>(u.data_stride)) != 0 ||
          std::memcmp(u.row_scales(i % p_rows), v.row_scales(i % q_rows), static_cast<size_t>(u.scale_stride)) != 0) {
        return false;
      }
    }
    return true;
  };
  for (int layer = 0; layer < static_cast<int>(x.spec().layers.size()); ++layer) {
    const auto ring_a = x.Window(a, layer), ring_b = y.Window(b, layer);
    if (!ring_a.ok() || !ring_b.ok() || ring_a->length != ring_b->length ||
        !same_rows(ring_a->pages, ring_a->rows_per_page, ring_b->pages, ring_b->rows_per_page, ring_a->window)) {
      return false;
    }
    for (const bool keys : {false, true}) {
      const auto u = keys ? x.IndexKeys(a, layer) : x.CompressedRows(a, layer);
      const auto v = keys ? y.IndexKeys(b, layer) : y.CompressedRows(b, layer);
      if (!u.ok() || !v.ok() || u->rows != v->rows || !same_rows(u->pages, u->rows_per_page, v->pages, v->rows_per_page, u->rows)) {
        return false;
      }
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = "v4-flash", json_path = "kvc-run.json", snapshot_path = "kvc-run.kvcsnap";
  int64_t tokens = 1048576, steps = 8;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
    if (arg == "--help" || arg == "-h") return Usage("");
    if (value == nullptr) return Usage("unknown or incomplete argument " + arg);
    ++i;
    if (arg == "--model") {
      model = value;
    } else if (arg == "--tokens") {
      if (!absl::SimpleAtoi(value, &tokens) || tokens < 1 || tokens > (int64_t{1} << 30)) return Usage("--tokens takes 1..2^30");
    } else if (arg == "--decode-steps") {
      if (!absl::SimpleAtoi(value, &steps) || steps < 0 || steps > 10000) return Usage("--decode-steps takes 0..10000");
    } else if (arg == "--json") {
      json_path = value;
    } else if (arg == "--snapshot") {
      snapshot_path = value;
    } else {
      return Usage("unknown argument " + arg);
    }
  }
  absl::StatusOr<kvc::FootprintModel> analytic = kvc::FootprintByName(model, kvc::StorageFormat::kFp8);
  if (!analytic.ok() || !analytic->is_v4) {
    return Usage(analytic.ok() ? model + " is not a DeepSeek-V4 model" : std::string(analytic.status().message()));
  }
  kvc::ModelSpec spec = analytic->spec;
  spec.max_context = std::max(spec.max_context, tokens + steps);
  const kvc::tools::SyntheticModel synthetic(spec, 8192);
  kvc::CacheOptions options;  // the defaults: rollback depth 16, 64-row pages
  options.history_bytes = static_cast<int64_t>(analytic->TotalBytes(tokens + steps) * 1.05) + (int64_t{256} << 20);
  auto cache = kvc::Cache::Create(synthetic.spec(), options);
  if (!cache.ok()) {
    fmt::print(stderr, "kvc-run: {}\n", std::string(cache.status().message()));
    return 1;
  }
  const kvc::SequenceId seq = *(*cache)->CreateSequence();
  fmt::print("kvc-run: {} ({} layers), one sequence of {} tokens + {} decode steps, SIMD target {}\n", spec.name,
             spec.layers.size(), tokens, steps, kvc::ActiveSimdTargetName());
  std::fflush(stdout);

  // Prefill.
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  int64_t last_report = -1;
  for (int64_t at = 0; at < tokens;) {
    const int64_t n = std::min(synthetic.chunk_tokens(), tokens - at);
    if (const absl::Status s = synthetic.Append(**cache, seq, at, n); !s.ok()) {
      fmt::print(stderr, "\nkvc-run: {}\n", std::string(s.message()));
      return 1;
    }
    at += n;
    if (isatty(fileno(stderr)) || at == tokens || at * 20 / tokens != last_report) {
      Progress(at, tokens, elapsed());
      last_report = at * 20 / tokens;
    }
  }
  const double prefill_seconds = elapsed();

  // Decode.
  kvc::tools::SyntheticModel::StepStats stats;
  for (int64_t t = tokens; t < tokens + steps; ++t) {
    if (const absl::Status s = synthetic.DecodeStep(**cache, seq, t, &stats); !s.ok()) {
      fmt::print(stderr, "kvc-run: decode: {}\n", std::string(s.message()));
      return 1;
    }
    fmt::print(stderr, "  decode step {} of {}: {:.1f} ms\n", stats.steps, steps,
               1e3 * stats.total() / static_cast<double>(stats.steps));
  }

  // Summary.
  const kvc::CacheUsage usage = (*cache)->Usage();
  const int64_t length = tokens + steps;
  const double analytic_bytes = analytic->TotalBytes(length);
  const int64_t rss = kvc::tools::PeakRssBytes();
  auto ms = [&](double seconds) { return steps > 0 ? 1e3 * seconds / static_cast<double>(steps) : 0.0; };
  fmt::print("\nmemory after {} tokens (bytes in use)\n", length);
  for (int c = 0; c < kvc::kNumComponents; ++c) {
    fmt::print("  {:<20}{:>16}\n", kvc::ComponentName(static_cast<kvc::Component>(c)), usage.components[c].used_bytes);
  }
  fmt::print("  {:<20}{:>16}  = {:.4f} x analytic {:.0f} (spec §6 + constants; the rest is page rounding\n"
             "  {:<20}{:>16}    and the rollback reserve of {} tokens)\n",
             "total", usage.used_bytes(), static_cast<double>(usage.used_bytes()) / analytic_bytes, analytic_bytes,
             "peak RSS", rss, options.rollback_depth);
  fmt::print("\nprefill   {:.1f} s, {:.0f} tokens/s ({} layers, chunks of {})\n", prefill_seconds,
             static_cast<double>(tokens) / prefill_seconds, spec.layers.size(), synthetic.chunk_tokens());
  if (steps > 0) {
    fmt::print("decode    {:.1f} ms/token: append {:.1f}, index queries {:.2f}, score + top-k + sets {:.1f}, gather {:.1f}\n",
               ms(stats.total()), ms(stats.append), ms(stats.index_query), ms(stats.select), ms(stats.gather));
    fmt::print("          per step: {} keys scored, {} rows gathered\n", stats.keys_scored / steps, stats.rows_gathered / steps);
  }

  // Snapshot: save, one more token, incremental save, restore, compare.
  struct {
    double save_s = 0, incremental_s = 0, restore_s = 0;
    int64_t file_bytes = 0, incremental_bytes = 0;
    bool identical = false;
  } snap;
  if (snapshot_path != "none") {
    auto timed = [&](auto&& f) {
      const auto t0 = std::chrono::steady_clock::now();
      f();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    absl::StatusOr<kvc::SaveStats> saved, grown;
    fmt::print(stderr, "  snapshot: saving {} tokens to {}\n", length, snapshot_path);
    snap.save_s = timed([&] { saved = kvc::SaveSnapshot(**cache, {seq}, snapshot_path); });
    kvc::tools::SyntheticModel::StepStats extra;  // not part of the decode figures above
    if (saved.ok() && synthetic.DecodeStep(**cache, seq, length, &extra).ok()) {
      snap.incremental_s = timed([&] { grown = kvc::SaveSnapshot(**cache, {seq}, snapshot_path); });
    }
    if (!saved.ok() || !grown.ok()) {
      fmt::print(stderr, "kvc-run: snapshot: {}\n", std::string((saved.ok() ? grown : saved).status().message()));
      return 1;
    }
    snap.file_bytes = grown->file_bytes;
    snap.incremental_bytes = grown->bytes_written;
    fmt::print(stderr, "  snapshot: restoring into a second cache\n");
    auto second = kvc::Cache::Create(synthetic.spec(), options);
    absl::StatusOr<std::vector<kvc::SequenceId>> restored;
    snap.restore_s = timed([&] { restored = kvc::RestoreSnapshot(**second, snapshot_path); });
    if (!restored.ok()) {
      fmt::print(stderr, "kvc-run: restore: {}\n", std::string(restored.status().message()));
      return 1;
    }
    snap.identical = SameBytes(**cache, seq, **second, (*restored)[0]);
    std::remove(snapshot_path.c_str());
    fmt::print("snapshot  {:.2f} GB saved in {:.1f} s ({:.2f} GB/s); +1 token: {:.1f} MB appended in {:.2f} s; "
               "restored in {:.1f} s ({:.2f} GB/s); restored sequence {}\n",
               1e-9 * static_cast<double>(saved->file_bytes), snap.save_s,
               1e-9 * static_cast<double>(saved->file_bytes) / snap.save_s, 1e-6 * static_cast<double>(snap.incremental_bytes),
               snap.incremental_s, snap.restore_s, 1e-9 * static_cast<double>(snap.file_bytes) / snap.restore_s,
               snap.identical ? "identical to the original, byte for byte" : "DIFFERS from the original");
    if (!snap.identical) return 1;
  }

  std::string components;
  for (int c = 0; c < kvc::kNumComponents; ++c) {
    components += fmt::format("{}\"{}\": {}", c ? ", " : "", kvc::ComponentName(static_cast<kvc::Component>(c)),
                              usage.components[c].used_bytes);
  }
  std::ofstream json(json_path);
  json << fmt::format(
      "{{\"model\": \"{}\", \"layers\": {}, \"tokens\": {}, \"simd_target\": \"{}\",\n"
      " \"memory\": {{\"components\": {{{}}}, \"used_bytes\": {}, \"analytic_bytes\": {:.0f}, \"peak_rss_bytes\": {}}},\n"
      " \"prefill\": {{\"tokens\": {}, \"seconds\": {:.3f}, \"tokens_per_second\": {:.1f}, \"chunk_tokens\": {}}},\n"
      " \"decode\": {{\"steps\": {}, \"ms_per_token\": {:.3f}, \"append_ms\": {:.3f}, \"index_query_ms\": {:.3f}, "
      "\"select_ms\": {:.3f}, \"gather_ms\": {:.3f}, \"keys_scored_per_step\": {}, \"rows_gathered_per_step\": {}}},\n"
      " \"snapshot\": {{\"file_bytes\": {}, \"save_seconds\": {:.3f}, \"incremental_bytes\": {}, \"incremental_seconds\": {:.3f}, "
      "\"restore_seconds\": {:.3f}, \"identical\": {}}}}}\n",
      spec.name, spec.layers.size(), length, kvc::ActiveSimdTargetName(), components, usage.used_bytes(), analytic_bytes, rss,
      tokens, prefill_seconds, static_cast<double>(tokens) / prefill_seconds, synthetic.chunk_tokens(), steps,
      ms(stats.total()), ms(stats.append), ms(stats.index_query), ms(stats.select), ms(stats.gather),
      steps > 0 ? stats.keys_scored / steps : 0, steps > 0 ? stats.rows_gathered / steps : 0, snap.file_bytes, snap.save_s,
      snap.incremental_bytes, snap.incremental_s, snap.restore_s, snap.identical);
  if (!json) {
    fmt::print(stderr, "kvc-run: cannot write {}\n", json_path);
    return 1;
  }
  fmt::print("\nsummary written to {}\n", json_path);
  return 0;
}
