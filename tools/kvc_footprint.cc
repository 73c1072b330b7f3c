// kvc-footprint: how much KV-cache memory a model needs at given context
// lengths, by component, against a baseline; optionally measured on a real
// kvc::Cache, and plotted.
//
//   kvc-footprint [--model M[,M...]] [--tokens N[,N...]] [--baseline M]
//                 [--format fp8|bf16] [--json] [--svg FILE] [--measure]
//
// Models: v4-pro, v4-flash, deepseek-v3.2, deepseek-v3, llama3-70b,
// mha:LAYERS:HEADS:HEAD_DIM[:BYTES], gqa:LAYERS:KV_HEADS:HEAD_DIM[:BYTES],
// or a path to a DeepSeek-V4 config.json.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_replace.h"
#include "fmt/core.h"
#include "kvc/cache.h"
#include "kvc/footprint.h"
#include "src/status.h"
#include "nlohmann/json.hpp"
#include "tools/synthetic_model.h"
#include "tools/tool_flags.h"

ABSL_FLAG(std::vector<std::string>, model, {}, "models, comma-separated (default: a comparison of six)");
ABSL_FLAG(std::vector<std::string>, tokens, {}, "context lengths, comma-separated, 1..2^40 (default 1048576)");
ABSL_FLAG(std::string, baseline, "", "model each is compared with");
ABSL_FLAG(std::string, format, "fp8", "storage format of V4 models: fp8 or bf16");
ABSL_FLAG(bool, json, false, "print JSON instead of a table");
ABSL_FLAG(std::string, svg, "", "also plot total bytes against context length to this file");
ABSL_FLAG(bool, measure, false, "also measure each V4 model on a real kvc::Cache");

namespace {

using kvc::FootprintModel;

struct Options {
  std::vector<std::string> models;
  std::vector<int64_t> tokens;
  std::string baseline;
  kvc::StorageFormat format = kvc::StorageFormat::kFp8;
  bool json = false;
  bool measure = false;
  std::string svg;
};

// The usage: to stdout for --help (exit 0), else after the error to stderr (exit 2).
int Usage(const std::string& error) {
  if (!error.empty()) fmt::print(stderr, "kvc-footprint: {}\n", error);
  fmt::print(error.empty() ? stdout : stderr,
             "usage: kvc-footprint [--model M[,M...]] [--tokens N[,N...]] [--baseline M]\n"
             "                     [--format fp8|bf16] [--json] [--svg FILE] [--measure]\n"
             "models: v4-pro, v4-flash, deepseek-v3.2, deepseek-v3, llama3-70b,\n"
             "        mha:LAYERS:HEADS:HEAD_DIM[:BYTES], gqa:LAYERS:KV_HEADS:HEAD_DIM[:BYTES], a config.json\n");
  return error.empty() ? 0 : 2;
}

std::string Human(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  return fmt::format("{:.{}f} {}", bytes, u == 0 ? 0 : 2, units[u]);
}

struct Measurement {
  double measured_bytes = 0;   // the cache's own accounting (used bytes)
  double page_rounding = 0;    // bytes pages add over whole rows, from the layout formulas
  int64_t peak_rss = 0;
  double seconds = 0;
};

// Appends `tokens` tokens of synthetic projections to one sequence of a real
// cache (rollback depth 0, so the cache holds exactly the spec's streams) and
// reads its accounting.
absl::StatusOr<Measurement> Measure(const FootprintModel& model, int64_t tokens) {
  kvc::ModelSpec spec = model.spec;
  spec.max_context = std::max<int64_t>(spec.max_context, tokens);
  const kvc::tools::SyntheticModel synthetic(spec, 2048);
  kvc::CacheOptions options;
  options.rollback_depth = 0;
  options.history_bytes = static_cast<int64_t>(model.TotalBytes(tokens) * 1.01) + (int64_t{64} << 20);
  options.state_bytes = static_cast<int64_t>(model.ConstantBytes() * 1.01) + (int64_t{64} << 20);
  KVC_ASSIGN_OR_RETURN(std::unique_ptr<kvc::Cache> cache, kvc::Cache::Create(synthetic.spec(), options));
  KVC_ASSIGN_OR_RETURN(const kvc::SequenceId seq, cache->CreateSequence());
  const auto start = std::chrono::steady_clock::now();
  int last_percent = -1;
  for (int64_t at = 0; at < tokens; at += synthetic.chunk_tokens()) {
    const int64_t n = std::min(synthetic.chunk_tokens(), tokens - at);
    KVC_RETURN_IF_ERROR(synthetic.Append(*cache, seq, at, n));
    const int percent = static_cast<int>(100 * (at + n) / tokens);
    if (percent / 5 != last_percent / 5) {
      fmt::print(stderr, "  measuring {}: {:3}% ({} of {} tokens)\n", model.name, percent, at + n, tokens);
      last_percent = percent;
    }
  }
  Measurement m;
  m.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  m.measured_bytes = static_cast<double>(cache->Usage().used_bytes());
  m.peak_rss = kvc::tools::PeakRssBytes();
  // Page rounding, from the page geometry (docs/layout.md).
  const int64_t rpp = options.rows_per_page, kpp = options.keys_per_page;
  auto rounding = [](kvc::RowFormat format, int64_t rows, int64_t per_page) {
    const int64_t pages = (rows + per_page - 1) / per_page;
    return static_cast<double>(pages * kvc::PageBytes(format, per_page) - rows * kvc::FormatInfo(format).row_bytes);
  };
  for (const kvc::LayerSpec& l : spec.layers) {
    m.page_rounding += rounding(kvc::RowFormat::kKvFp8, spec.window, rpp);
    if (l.kind == kvc::LayerKind::kCsa) {
      m.page_rounding += rounding(kvc::RowFormat::kKvFp8, tokens / 4, rpp) + rounding(kvc::RowFormat::kIndexFp4, tokens / 4, kpp);
    } else if (l.kind == kvc::LayerKind::kHca) {
      m.page_rounding += rounding(kvc::RowFormat::kKvFp8, tokens / 128, rpp);
    }
  }
  return m;
}

// "10 MB", "1 GB", ...: decimal units, for ticks at powers of ten bytes.
std::string DecimalBytes(double bytes) {
  const char* units[] = {"B", "kB", "MB", "GB", "TB", "PB"};
  int u = 0;
  while (bytes >= 1000 && u < 5) {
    bytes /= 1000;
    ++u;
  }
  return fmt::format("{:.0f} {}", bytes, units[u]);
}

// `text` with XML's special characters escaped, for SVG text and attributes.
std::string XmlEscape(const std::string& text) {
  return absl::StrReplaceAll(text, {{"&", "&amp;"}, {"<", "&lt;"}, {">", "&gt;"}, {"\"", "&quot;"}, {"'", "&apos;"}});
}

// A log-log plot of total bytes against context length, one line per model.
std::string Svg(const std::vector<FootprintModel>& models, const std::vector<int64_t>& points) {
  const double w = 920, h = 540, left = 100, right = 300, top = 40, bottom = 60;
  const double x0 = std::log10(static_cast<double>(points.front())), x1 = std::log10(static_cast<double>(points.back()));
  double y_min = 1e300, y_max = 0;
  for (const FootprintModel& m : models) {
    for (const int64_t t : points) {
      y_min = std::min(y_min, m.TotalBytes(t));
      y_max = std::max(y_max, m.TotalBytes(t));
    }
  }
  const double y0 = std::floor(std::log10(std::max(y_min, 1.0))), y1 = std::ceil(std::log10(y_max));
  auto px = [&](double t) { return left + (std::log10(t) - x0) / std::max(x1 - x0, 1e-9) * (w - left - right); };
  auto py = [&](double b) { return h - bottom - (std::log10(b) - y0) / std::max(y1 - y0, 1e-9) * (h - top - bottom); };
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{}\" y=\"22\" font-size=\"15\">KV-cache memory per sequence vs context length (log-log)</text>\n",
      w, h, left);
  for (double e = y0; e <= y1; ++e) {  // horizontal grid at powers of ten bytes
    const double y = py(std::pow(10.0, e));
    svg += fmt::format("<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>\n"
                       "<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n",
                       left, y, w - right, y, left - 6, y + 4, DecimalBytes(std::pow(10.0, e)));
  }
  for (const int64_t t : points) {  // vertical grid at the lengths plotted
    const double x = px(static_cast<double>(t));
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{}\" x2=\"{:.1f}\" y2=\"{}\" stroke=\"#eee\"/>\n"
                       "<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                       x, top, x, h - bottom, x, h - bottom + 16,
                       t >= 1048576 ? fmt::format("{}M", t / 1048576) : t >= 1024 ? fmt::format("{}K", t / 1024) : std::to_string(t));
  }
  svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/>\n"
                     "<line x1=\"{0}\" y1=\"{3}\" x2=\"{0}\" y2=\"{1}\" stroke=\"black\"/>\n"
                     "<text x=\"{4}\" y=\"{5}\" text-anchor=\"middle\">context length (tokens)</text>\n"
                     "<text x=\"22\" y=\"{6}\" transform=\"rotate(-90 22 {6})\" text-anchor=\"middle\">KV cache per sequence (log scale)</text>\n",
                     left, h - bottom, w - right, top, (left + w - right) / 2, h - 18, (top + h - bottom) / 2);
  for (size_t i = 0; i < models.size(); ++i) {
    std::string path;
    for (const int64_t t : points) {
      path += fmt::format("{}{:.1f},{:.1f} ", path.empty() ? "M" : "L", px(static_cast<double>(t)), py(models[i].TotalBytes(t)));
    }
    const char* color = colors[i % 8];
    svg += fmt::format("<path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2.5\"/>\n", path, color);
    const double ly = top + 20 + 22.0 * static_cast<double>(i);
    svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" stroke-width=\"3\"/>"
                       "<text x=\"{4}\" y=\"{5}\">{6}</text>\n",
                       w - right + 15, ly, w - right + 40, color, w - right + 46, ly + 4, XmlEscape(models[i].name));
  }
  return svg + "</svg>\n";
}

}  // namespace

int main(int argc, char** argv) {
  const absl::StatusOr<kvc::tools::ParsedArgs> args = kvc::tools::ParseFlags(argc, argv);
  if (!args.ok()) return Usage(std::string(args.status().message()));
  if (args->help) return Usage("");
  if (!args->positional.empty()) return Usage("unexpected argument " + args->positional[0]);
  Options options;
  options.models = absl::GetFlag(FLAGS_model);
  for (const std::string& t : absl::GetFlag(FLAGS_tokens)) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(t, &n) || n < 1 || n > (int64_t{1} << 40)) {
      return Usage("--tokens takes positive integers up to 2^40, comma-separated; not \"" + t + "\"");
    }
    options.tokens.push_back(n);
  }
  options.baseline = absl::GetFlag(FLAGS_baseline);
  const std::string format = absl::GetFlag(FLAGS_format);
  if (format != "fp8" && format != "bf16") return Usage("--format is fp8 or bf16");
  options.format = format == "bf16" ? kvc::StorageFormat::kBf16 : kvc::StorageFormat::kFp8;
  options.json = absl::GetFlag(FLAGS_json);
  options.svg = absl::GetFlag(FLAGS_svg);
  options.measure = absl::GetFlag(FLAGS_measure);
  if (options.models.empty()) options.models = {"v4-pro", "v4-flash", "deepseek-v3.2", "deepseek-v3", "gqa:61:8:128", "llama3-70b"};
  if (options.tokens.empty()) options.tokens = {1048576};
  std::sort(options.tokens.begin(), options.tokens.end());

  std::vector<FootprintModel> models;
  for (const std::string& name : options.models) {
    absl::StatusOr<FootprintModel> m = kvc::FootprintByName(name, options.format);
    if (!m.ok()) {
      fmt::print(stderr, "kvc-footprint: {}\n", std::string(m.status().message()));
      return 1;
    }
    models.push_back(*std::move(m));
  }
  std::unique_ptr<FootprintModel> baseline;
  if (!options.baseline.empty()) {
    absl::StatusOr<FootprintModel> b = kvc::FootprintByName(options.baseline, kvc::StorageFormat::kFp8);
    if (!b.ok()) {
      fmt::print(stderr, "kvc-footprint: baseline: {}\n", std::string(b.status().message()));
      return 1;
    }
    baseline = std::make_unique<FootprintModel>(*std::move(b));
  }

  nlohmann::ordered_json json = nlohmann::ordered_json::array();
  for (const int64_t tokens : options.tokens) {
    if (!options.json) {
      fmt::print("\n{} tokens{}\n", tokens, baseline ? fmt::format(" (baseline: {})", baseline->name) : "");
      fmt::print("{:<36}{:>14}{:>14}{:>16}{:>12}\n", "model", "B/token", "total", "per-sequence", baseline ? "ratio" : "");
    }
    for (const FootprintModel& m : models) {
      const double total = m.TotalBytes(tokens);
      const double ratio = baseline ? total / baseline->TotalBytes(tokens) : 0;
      absl::StatusOr<Measurement> measured = absl::UnavailableError("not measured");
      if (options.measure && m.is_v4) measured = Measure(m, tokens);
      if (options.measure && m.is_v4 && !measured.ok()) {
        fmt::print(stderr, "kvc-footprint: --measure {}: {}\n", m.name, std::string(measured.status().message()));
        return 1;
      }
      const std::vector<double> parts = m.ComponentBytes(tokens);
      if (options.json) {
        // Whole bytes, as in the table; a total beyond int64 (huge models at
        // 2^40 tokens) stays a JSON number instead of wrapping negative.
        auto bytes = [](double b) {
          return b < 0x1p63 ? nlohmann::ordered_json(std::llround(b)) : nlohmann::ordered_json(b);
        };
        nlohmann::ordered_json components = nlohmann::ordered_json::object();
        for (size_t i = 0; i < m.per_token.size(); ++i) components[m.per_token[i].name] = bytes(parts[i]);
        for (const kvc::FootprintComponent& c : m.per_sequence) components[c.name] = bytes(c.bytes);
        nlohmann::ordered_json row = {{"model", m.name},
                                      {"tokens", tokens},
                                      {"bytes_per_token", m.BytesPerToken()},
                                      {"total_bytes", bytes(total)},
                                      {"per_sequence_constant_bytes", bytes(m.ConstantBytes())},
                                      {"components", components}};
        if (baseline) {
          row["baseline"] = baseline->name;
          row["ratio_to_baseline"] = ratio;
        }
        if (measured.ok()) {
          row["measured_total_bytes"] = bytes(measured->measured_bytes);
          row["page_rounding_bytes"] = bytes(measured->page_rounding);
          row["peak_rss_bytes"] = measured->peak_rss;
          row["measure_seconds"] = measured->seconds;
        }
        json.push_back(std::move(row));
        continue;
      }
      fmt::print("{:<36}{:>14.2f}{:>14}{:>16}{:>12}\n", m.name, m.BytesPerToken(), Human(total), Human(m.ConstantBytes()),
                 baseline ? fmt::format("{:.1f}%", 100 * ratio) : "");
      for (size_t i = 0; i < m.per_token.size() && m.per_token.size() > 1; ++i) {
        fmt::print("    {:<32}{:>14.2f}{:>14}\n", m.per_token[i].name, m.per_token[i].bytes, Human(parts[i]));
      }
      for (const kvc::FootprintComponent& c : m.per_sequence) fmt::print("    {:<32}{:>14}{:>14}\n", c.name, "", Human(c.bytes));
      if (measured.ok()) {
        fmt::print("    measured on a kvc::Cache: {} ({:.0f} B); analytic + page rounding = {:.0f} B; "
                   "peak RSS {} ({:.1f}% over); {:.1f} s\n",
                   Human(measured->measured_bytes), measured->measured_bytes, total + measured->page_rounding,
                   Human(static_cast<double>(measured->peak_rss)),
                   100.0 * (static_cast<double>(measured->peak_rss) / measured->measured_bytes - 1), measured->seconds);
      }
    }
  }
  if (options.json) fmt::print("{}", kvc::tools::JsonText(json));

  if (!options.svg.empty()) {
    std::vector<int64_t> points = options.tokens;
    if (points.size() < 2) points = {1024, 4096, 16384, 65536, 262144, 1048576};
    std::ofstream svg(options.svg);
    if (!svg) {
      fmt::print(stderr, "kvc-footprint: cannot create {}\n", options.svg);
      return 1;
    }
    svg << Svg(models, points);
    svg.close();
    if (!svg) {
      fmt::print(stderr, "kvc-footprint: cannot write {}\n", options.svg);
      std::remove(options.svg.c_str());  // incomplete, and ours
      return 1;
    }
    if (!options.json) fmt::print("\nwrote {}\n", options.svg);
  }
  return 0;
}
