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
//           [--snapshot FILE|none] [--max-context N] [--threads N]
//
// --threads: the cache's executor (kvc::ThreadPoolExecutor; default: every
// core of the machine, 1 = the calling thread only). The decode summary
// reads the decode time against the int8 floor measured on as many threads:
// the index scoring's multiply-adds at this machine's vpdpbusd peak.
//
// Exit status: 0 when every stage succeeded (and the restored sequence is
// identical); 1 when a stage failed, after printing which stage and why;
// 2 on bad usage. Whatever the outcome, no snapshot file is left behind, and
// the JSON summary is written only after every stage succeeded.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "fmt/core.h"
#include "kvc/cache.h"
#include "kvc/executor.h"
#include "kvc/footprint.h"
#include "kvc/row_kernels.h"
#include "kvc/snapshot.h"
#include "nlohmann/json.hpp"
#include "tools/int8_peak.h"
#include "tools/synthetic_model.h"
#include "tools/tool_flags.h"

ABSL_FLAG(std::string, model, "v4-flash", "v4-flash, v4-pro or a DeepSeek-V4 config.json");
ABSL_FLAG(int64_t, tokens, 1048576, "tokens to prefill, 1..2^30");
ABSL_FLAG(int64_t, decode_steps, 8, "decode steps after the prefill, 0..10000");
ABSL_FLAG(std::string, json, "kvc-run.json", "file the JSON summary is written to");
ABSL_FLAG(std::string, snapshot, "kvc-run.kvcsnap", "snapshot file for the save/restore round trip (removed after), or none");
ABSL_FLAG(int64_t, threads, 0, "threads kvc may use (its executor), 1..1024; 0: every core");
ABSL_FLAG(int64_t, max_context, 0,
          "the cache's max_context in tokens; 0 (default): exactly what the run appends (tokens + decode steps, "
          "+1 for the incremental save's token). Smaller values make the run fail where it runs out (for tests)");

namespace {

// Prints the usage (to stdout for --help, exit 0; else after the error to
// stderr, exit 2).
int Usage(const std::string& error) {
  std::FILE* out = error.empty() ? stdout : stderr;
  if (!error.empty()) fmt::print(stderr, "kvc-run: {}\n", error);
  fmt::print(out, "usage: kvc-run [--model v4-flash|v4-pro|CONFIG.json] [--tokens N] [--decode-steps K] [--json FILE]\n"
                  "               [--snapshot FILE|none] [--max-context N] [--threads N]\n");
  return error.empty() ? 0 : 2;
}

// Prints which stage failed and why (the status code too, so the message is
// never empty) and returns the exit status of a failed run.
int Fail(const std::string& stage, const absl::Status& status) {
  fmt::print(stderr, "\nkvc-run: {}: {}\n", stage, status.ToString());
  return 1;
}

// Removes a file when it goes out of scope: armed once the first save has
// written the snapshot, so that every later exit of the run (success or
// failure) removes it. The run refuses to start when the path exists, so
// this never removes a file the run did not write.
class RemoveOnExit {
 public:
  explicit RemoveOnExit(std::string path) : path_(std::move(path)) {}
  RemoveOnExit(const RemoveOnExit&) = delete;
  RemoveOnExit& operator=(const RemoveOnExit&) = delete;
  ~RemoveOnExit() { ::unlink(path_.c_str()); }  // a file only: never a directory named as the snapshot

 private:
  std::string path_;
};

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
        !same_rows(ring_a->pages, ring_a->rows_per_page, ring_b->pages, ring_b->rows_per_page, ring_a->ring_slots)) {
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

int Run(int argc, char** argv) {
  const absl::StatusOr<kvc::tools::ParsedArgs> args = kvc::tools::ParseFlags(argc, argv);
  if (!args.ok()) return Usage(std::string(args.status().message()));
  if (args->help) return Usage("");
  if (!args->positional.empty()) return Usage("unexpected argument " + args->positional[0]);
  const std::string model = absl::GetFlag(FLAGS_model), json_path = absl::GetFlag(FLAGS_json),
                    snapshot_path = absl::GetFlag(FLAGS_snapshot);
  const int64_t tokens = absl::GetFlag(FLAGS_tokens), steps = absl::GetFlag(FLAGS_decode_steps),
                max_context = absl::GetFlag(FLAGS_max_context);
  if (tokens < 1 || tokens > (int64_t{1} << 30)) return Usage("--tokens takes 1..2^30");
  if (steps < 0 || steps > 10000) return Usage("--decode-steps takes 0..10000");
  if (max_context < 0 || max_context > (int64_t{1} << 31)) return Usage("--max-context takes 0..2^31");
  int64_t threads = absl::GetFlag(FLAGS_threads);
  if (threads < 0 || threads > 1024) return Usage("--threads takes 0..1024");
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  if (json_path.empty() || snapshot_path.empty()) return Usage("--json and --snapshot take a file name");
  const bool snapshot = snapshot_path != "none";
  if (struct stat st; snapshot && ::lstat(snapshot_path.c_str(), &st) == 0) {
    fmt::print(stderr, "kvc-run: {} exists. The run saves its scratch snapshot there and removes it afterwards, so it does "
                       "not touch an existing file: remove it, or pass another --snapshot (or none)\n", snapshot_path);
    return 1;
  }

  absl::StatusOr<kvc::FootprintModel> analytic = kvc::FootprintByName(model, kvc::StorageFormat::kFp8);
  if (!analytic.ok() || !analytic->is_v4) {
    return Usage(analytic.ok() ? model + " is not a DeepSeek-V4 model" : std::string(analytic.status().message()));
  }
  // Every token the run appends: the prefill, the decode steps and, with a
  // snapshot, the one token between the full and the incremental save.
  const int64_t length = tokens + steps;
  const int64_t appended = length + (snapshot ? 1 : 0);
  kvc::ModelSpec spec = analytic->spec;
  spec.max_context = max_context > 0 ? max_context : std::max(spec.max_context, appended);
  const kvc::tools::SyntheticModel synthetic(spec, 8192);
  absl::StatusOr<std::unique_ptr<kvc::Executor>> executor = kvc::ThreadPoolExecutor(static_cast<int>(threads));
  if (!executor.ok()) return Fail("creating the executor", executor.status());
  kvc::CacheOptions options;  // the defaults: rollback depth 16, 64-row pages
  options.executor = executor->get();
  options.history_bytes = static_cast<int64_t>(analytic->TotalBytes(appended) * 1.05) + (int64_t{256} << 20);
  absl::StatusOr<std::unique_ptr<kvc::Cache>> cache = kvc::Cache::Create(synthetic.spec(), options);
  if (!cache.ok()) return Fail("creating the cache", cache.status());
  const absl::StatusOr<kvc::SequenceId> created = (*cache)->CreateSequence();
  if (!created.ok()) return Fail("creating the sequence", created.status());
  const kvc::SequenceId seq = *created;
  fmt::print("kvc-run: {} ({} layers), one sequence of {} tokens + {} decode steps, SIMD target {}, {} thread{}\n", spec.name,
             spec.layers.size(), tokens, steps, kvc::ActiveSimdTargetName(), threads, threads > 1 ? "s" : "");
  std::fflush(stdout);

  // Prefill.
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  int64_t last_report = -1;
  for (int64_t at = 0; at < tokens;) {
    const int64_t n = std::min(synthetic.chunk_tokens(), tokens - at);
    if (const absl::Status s = synthetic.Append(**cache, seq, at, n); !s.ok()) {
      return Fail(absl::StrCat("prefill of tokens ", at, "..", at + n - 1), s);
    }
    at += n;
    if (isatty(fileno(stderr)) || at == tokens || at * 20 / tokens != last_report) {
      Progress(at, tokens, elapsed());
      last_report = at * 20 / tokens;
    }
  }
  const double prefill_seconds = elapsed();

  // Decode.
  // The first step runs cold after the prefill (every layer's keys, sets
  // and scratch first touched); the rest are reported apart from it too.
  kvc::tools::SyntheticModel::StepStats stats;
  double first_step_s = 0;
  for (int64_t t = tokens; t < length; ++t) {
    const double before = stats.total();
    if (const absl::Status s = synthetic.DecodeStep(**cache, seq, t, &stats, executor->get()); !s.ok()) {
      return Fail(absl::StrCat("decode step at token ", t), s);
    }
    if (stats.steps == 1) first_step_s = stats.total();
    fmt::print(stderr, "  decode step {} of {}: {:.1f} ms (mean so far {:.1f} ms)\n", stats.steps, steps,
               1e3 * (stats.total() - before), 1e3 * stats.total() / static_cast<double>(stats.steps));
  }
  // Steps 2..K: ms per token (0 with fewer than two steps).
  const double warm_ms = steps > 1 ? 1e3 * (stats.total() - first_step_s) / static_cast<double>(steps - 1) : 0;

  // Summary.
  const kvc::CacheUsage usage = (*cache)->Usage();
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
  // The floor: the step's index multiply-adds at the int8 peak measured now
  // on as many threads (0 without AVX512-VNNI).
  const double macs_per_step = steps > 0 ? static_cast<double>(stats.keys_scored) / static_cast<double>(steps) * spec.index_heads * 128 : 0;
  const double peak = steps > 0 ? kvc::tools::MeasureInt8Peak(**executor) : 0;
  const double floor_ms = peak > 0 ? 1e3 * macs_per_step / peak : 0;
  if (steps > 0) {
    fmt::print("decode    {:.1f} ms/token: append {:.1f}, index queries {:.2f}, score + top-k + sets {:.1f}, gather {:.1f}\n",
               ms(stats.total()), ms(stats.append), ms(stats.index_query), ms(stats.select), ms(stats.gather));
    fmt::print("          per step: {} keys scored, {} rows gathered\n", stats.keys_scored / steps, stats.rows_gathered / steps);
    if (peak > 0) {
      fmt::print("          = {:.2f} x the int8 floor of {:.1f} ms/token ({:.2f} G multiply-adds at the {:.0f} G/s vpdpbusd peak "
                 "measured on {} thread{})\n",
                 ms(stats.total()) / floor_ms, floor_ms, 1e-9 * macs_per_step, 1e-9 * peak, threads, threads > 1 ? "s" : "");
    } else {
      fmt::print("          (no int8 floor: this CPU has no AVX512-VNNI)\n");
    }
    if (steps > 1) {
      fmt::print("          first step {:.1f} ms (cold after the prefill); steps 2..{}: {:.1f} ms/token", 1e3 * first_step_s,
                 steps, warm_ms);
      if (floor_ms > 0) fmt::print(" = {:.2f} x the floor", warm_ms / floor_ms);
      fmt::print("\n");
    }
  }

  // Snapshot: save, one more token, incremental save, restore, compare.
  struct {
    double save_s = 0, incremental_s = 0, restore_s = 0;
    int64_t file_bytes = 0, incremental_bytes = 0;
    bool identical = false;
  } snap;
  if (snapshot) {
    auto timed = [&](auto&& f) {
      const auto t0 = std::chrono::steady_clock::now();
      f();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    absl::StatusOr<kvc::SaveStats> saved, grown;
    fmt::print(stderr, "  snapshot: saving {} tokens to {}\n", length, snapshot_path);
    kvc::SaveOptions fresh;
    fresh.incremental = false;  // a new file: a failed full save leaves none
    snap.save_s = timed([&] { saved = kvc::SaveSnapshot(**cache, {seq}, snapshot_path, fresh); });
    if (!saved.ok()) return Fail("snapshot save", saved.status());
    const RemoveOnExit remove_snapshot(snapshot_path);
    kvc::tools::SyntheticModel::StepStats extra;  // not part of the decode figures above
    if (const absl::Status s = synthetic.DecodeStep(**cache, seq, length, &extra); !s.ok()) {
      return Fail(absl::StrCat("decode step at token ", length, " (before the incremental save)"), s);
    }
    snap.incremental_s = timed([&] { grown = kvc::SaveSnapshot(**cache, {seq}, snapshot_path); });
    if (!grown.ok()) return Fail("incremental snapshot save", grown.status());
    if (grown->rewrote) {  // the file was just written whole and is sound: appending is what must happen
      return Fail("incremental snapshot save", absl::InternalError("it rewrote the whole file instead of appending"));
    }
    for (const kvc::SaveStats* save : {&*saved, &*grown}) {
      if (!save->durable) fmt::print(stderr, "  snapshot: warning: {}\n", save->directory_sync.ToString());
    }
    snap.file_bytes = grown->file_bytes;
    snap.incremental_bytes = grown->bytes_written;
    fmt::print(stderr, "  snapshot: restoring into a second cache\n");
    absl::StatusOr<std::unique_ptr<kvc::Cache>> second = kvc::Cache::Create(synthetic.spec(), options);
    if (!second.ok()) return Fail("creating the cache to restore into", second.status());
    absl::StatusOr<std::vector<kvc::SequenceId>> restored;
    snap.restore_s = timed([&] { restored = kvc::RestoreSnapshot(**second, snapshot_path); });
    if (!restored.ok()) return Fail("snapshot restore", restored.status());
    if (restored->size() != 1) {
      return Fail("snapshot restore", absl::DataLossError(absl::StrCat("restored ", restored->size(), " sequences, saved 1")));
    }
    snap.identical = SameBytes(**cache, seq, **second, restored->front());
    fmt::print("snapshot  {:.2f} GB saved in {:.1f} s ({:.2f} GB/s); +1 token: {:.1f} MB appended in {:.2f} s; "
               "restored in {:.1f} s ({:.2f} GB/s); restored sequence {}\n",
               1e-9 * static_cast<double>(saved->file_bytes), snap.save_s,
               1e-9 * static_cast<double>(saved->file_bytes) / snap.save_s, 1e-6 * static_cast<double>(snap.incremental_bytes),
               snap.incremental_s, snap.restore_s, 1e-9 * static_cast<double>(snap.file_bytes) / snap.restore_s,
               snap.identical ? "identical to the original, byte for byte" : "DIFFERS from the original");
    if (!snap.identical) {
      return Fail("comparison", absl::DataLossError("the restored sequence differs from the original"));
    }
  }

  nlohmann::ordered_json components = nlohmann::ordered_json::object();
  for (int c = 0; c < kvc::kNumComponents; ++c) {
    components[kvc::ComponentName(static_cast<kvc::Component>(c))] = usage.components[c].used_bytes;
  }
  const nlohmann::ordered_json summary = {
      {"model", spec.name},
      {"layers", spec.layers.size()},
      {"tokens", length},
      {"simd_target", kvc::ActiveSimdTargetName()},
      {"threads", threads},
      {"memory",
       {{"components", components}, {"used_bytes", usage.used_bytes()}, {"analytic_bytes", analytic_bytes},
        {"peak_rss_bytes", rss}}},
      {"prefill",
       {{"tokens", tokens}, {"seconds", prefill_seconds}, {"tokens_per_second", static_cast<double>(tokens) / prefill_seconds},
        {"chunk_tokens", synthetic.chunk_tokens()}}},
      {"decode",
       {{"steps", steps}, {"ms_per_token", ms(stats.total())}, {"append_ms", ms(stats.append)},
        {"index_query_ms", ms(stats.index_query)}, {"select_ms", ms(stats.select)}, {"gather_ms", ms(stats.gather)},
        {"keys_scored_per_step", steps > 0 ? stats.keys_scored / steps : 0},
        {"int8_peak_macs_per_second", peak}, {"int8_floor_ms", floor_ms},
        {"vs_int8_floor", floor_ms > 0 ? ms(stats.total()) / floor_ms : 0},
        {"first_step_ms", 1e3 * first_step_s}, {"warm_ms_per_token", warm_ms},
        {"warm_vs_int8_floor", floor_ms > 0 ? warm_ms / floor_ms : 0},
        {"rows_gathered_per_step", steps > 0 ? stats.rows_gathered / steps : 0}}},
      {"snapshot",
       {{"file_bytes", snap.file_bytes}, {"save_seconds", snap.save_s}, {"incremental_bytes", snap.incremental_bytes},
        {"incremental_seconds", snap.incremental_s}, {"restore_seconds", snap.restore_s}, {"identical", snap.identical}}},
  };
  if (const absl::Status s = kvc::tools::WriteJsonFile(json_path, summary); !s.ok()) return Fail("summary", s);
  fmt::print("\nsummary written to {}\n", json_path);
  return 0;
}

}  // namespace

// Run() returns rather than exits, so the snapshot's remover always runs.
int main(int argc, char** argv) { return Run(argc, argv); }
