// kvc_bench: Google Benchmark main that honours the library's own flags
// (--benchmark_format, --benchmark_out, --benchmark_out_format, ...) and reads
// every benchmark's throughput against its roofline measured in the same run:
// on the console as a table after the usual one; in JSON, CSV and the
// --benchmark_out file as a counter named "<counter>/<roofline benchmark>"
// (e.g. "bytes_per_second/BM_Memcpy") on each benchmark that has one.
#include <cstdlib>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bench/roofline.h"
#include "benchmark/benchmark.h"
#include "fmt/core.h"
#include "kvc/row_kernels.h"

// Set by benchmark::Initialize from --benchmark_out and --benchmark_out_format
// (or their BENCHMARK_OUT* environment variables); the library exports them,
// and defines them in namespace benchmark, but declares them only internally.
namespace benchmark {
extern std::string FLAGS_benchmark_out;
extern std::string FLAGS_benchmark_out_format;
}  // namespace benchmark

namespace kvc::bench {
namespace {

struct Roofline {
  std::string reference;  // base name of the roofline benchmark
  std::string counter;    // the rate compared
};

// Benchmark base name -> its rooflines, filled by RegisterRoofline().
std::map<std::string, std::vector<Roofline>>& References() {
  static auto* references = new std::map<std::string, std::vector<Roofline>>;
  return *references;
}

std::string BaseName(const std::string& run_name) { return run_name.substr(0, run_name.find('/')); }
// "threads:N" in a run name, else 1.
int Threads(const std::string& run_name) {
  const size_t at = run_name.find("threads:");
  return at == std::string::npos ? 1 : std::atoi(run_name.c_str() + at + 8);
}

struct Ratio {
  Roofline roofline;
  double value = 0, roof_value = 0;
  std::string CounterName() const { return roofline.counter + "/" + roofline.reference; }
};

// Forwards everything to `inner`, the reporter the flags asked for, and adds
// the roofline ratios. A console reporter keeps printing each benchmark as it
// finishes, then gets the ratio table; any other reporter gets the runs at the
// end (a roofline may run after the benchmarks read against it), each with its
// ratios as counters, in one batch (so CSV's header names every counter).
class RooflineReporter : public benchmark::BenchmarkReporter {
 public:
  explicit RooflineReporter(benchmark::BenchmarkReporter* inner)
      : inner_(inner), console_(dynamic_cast<benchmark::ConsoleReporter*>(inner) != nullptr) {}

  bool ReportContext(const Context& context) override {
    // The library sets the streams on this reporter (e.g. the --benchmark_out file).
    inner_->SetOutputStream(&GetOutputStream());
    inner_->SetErrorStream(&GetErrorStream());
    return inner_->ReportContext(context);
  }

  void ReportRuns(const std::vector<Run>& runs) override {
    // With --benchmark_repetitions the median aggregate stands for the run.
    for (const Run& run : runs) {
      if (run.error_occurred) continue;
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if (run.run_type != Run::RT_Iteration && !median) continue;
      const std::string name = run.run_name.str();
      if (!median && medians_.count(name) != 0) continue;
      for (const auto& [counter, value] : run.counters) rates_[name][counter] = value.value;
      if (median) medians_.insert(name);
    }
    if (console_) {
      inner_->ReportRuns(runs);
    } else {
      held_.insert(held_.end(), runs.begin(), runs.end());
    }
  }

  void Finalize() override {
    if (console_) {
      inner_->Finalize();
      PrintTable();
      return;
    }
    for (Run& run : held_) {
      if (run.error_occurred) continue;
      for (const Ratio& ratio : Ratios(run.run_name.str())) run.counters[ratio.CounterName()] = ratio.value / ratio.roof_value;
    }
    if (!held_.empty()) inner_->ReportRuns(held_);
    inner_->Finalize();
  }

 private:
  // The ratios of run `name` (an iteration run's name, or an aggregate's run name).
  std::vector<Ratio> Ratios(const std::string& name) const {
    std::vector<Ratio> ratios;
    const auto counters = rates_.find(name);
    const auto refs = References().find(BaseName(name));
    if (counters == rates_.end() || refs == References().end()) return ratios;
    for (const Roofline& ref : refs->second) {
      const auto value = counters->second.find(ref.counter);
      if (value == counters->second.end()) continue;
      // The roofline run at the same thread count.
      const double roof = RoofRate(ref.reference, Threads(name), ref.counter);
      if (roof <= 0) continue;
      ratios.push_back({ref, value->second, roof});
    }
    return ratios;
  }

  // `counter` of the first run of roofline `reference` at `threads` threads;
  // 0 if there is none.
  double RoofRate(const std::string& reference, int threads, const std::string& counter) const {
    for (const auto& [name, counters] : rates_) {
      if (BaseName(name) != reference || Threads(name) != threads) continue;
      const auto rate = counters.find(counter);
      if (rate != counters.end()) return rate->second;
    }
    return 0;
  }

  void PrintTable() {
    std::ostream& out = GetOutputStream();
    out << fmt::format("\nRatios to rooflines measured in this run (SIMD target {}):\n", ActiveSimdTargetName());
    out << fmt::format("{:<46}{:>18}{:>12}{:>12}{:>8}\n", "benchmark", "counter", "value (G)", "roofline", "ratio");
    for (const auto& run : rates_) {
      const std::string& name = run.first;
      for (const Ratio& r : Ratios(name)) {
        out << fmt::format("{:<46}{:>18}{:>12.2f}{:>12.2f}{:>8.2f}  (vs {}, {} thread{})\n", name, r.roofline.counter,
                           r.value / 1e9, r.roof_value / 1e9, r.value / r.roof_value, r.roofline.reference, Threads(name),
                           Threads(name) > 1 ? "s" : "");
      }
    }
    PrintFlatRooflines(out);
    out.flush();
  }

  // A roofline whose multi-thread rate is under 1.25 x its one-thread rate
  // was probably measured while the other cores (or the memory) were busy,
  // e.g. a VM whose host took them for a while: the ratios against it then
  // overstate. Only a warning: on a machine where one core nearly saturates
  // memory, a flat copy rate is real.
  void PrintFlatRooflines(std::ostream& out) const {
    std::set<std::pair<std::string, std::string>> used;  // (reference, counter)
    for (const auto& [name, refs] : References()) {
      for (const Roofline& ref : refs) used.insert({ref.reference, ref.counter});
    }
    for (const auto& [reference, counter] : used) {
      const double one = RoofRate(reference, 1, counter);
      if (one <= 0) continue;
      for (const auto& [name, counters] : rates_) {
        if (BaseName(name) != reference || Threads(name) < 2 || counters.count(counter) == 0) continue;
        const double scaling = counters.at(counter) / one;
        if (scaling >= 1.25) continue;
        out << fmt::format("note: {} measured {:.2f} G, {:.2f} x the 1-thread run's {:.2f} G. Unless one core nearly "
                           "saturates this machine, that roofline was measured while the other cores or the memory were "
                           "busy, and the ratios against it overstate; rerun.\n",
                           name, counters.at(counter) / 1e9, scaling, one / 1e9);
      }
    }
  }

  benchmark::BenchmarkReporter* inner_;
  bool console_;
  std::vector<Run> held_;  // runs not yet passed on (reporters other than the console)
  std::map<std::string, std::map<std::string, double>> rates_;  // run -> counter -> rate
  std::set<std::string> medians_;
};

// The reporter --benchmark_out_format names, as the library would make it.
std::unique_ptr<benchmark::BenchmarkReporter> FileReporter(const std::string& format) {
  if (format == "json") return std::make_unique<benchmark::JSONReporter>();
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // CSV is deprecated, but still a format the flag takes
  if (format == "csv") return std::make_unique<benchmark::CSVReporter>();
#pragma GCC diagnostic pop
  return std::make_unique<benchmark::ConsoleReporter>(benchmark::ConsoleReporter::OO_None);
}

}  // namespace

bool RegisterRoofline(const std::string& name, const std::string& reference, const std::string& counter) {
  References()[name].push_back({reference, counter});
  return true;
}

}  // namespace kvc::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);  // exits on a bad --benchmark_format / --benchmark_out_format
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("kvc_simd_target", kvc::ActiveSimdTargetName());
  // The display reporter --benchmark_format (and --benchmark_color,
  // --benchmark_counters_tabular) selects; the library owns it.
  kvc::bench::RooflineReporter display(benchmark::CreateDefaultDisplayReporter());
  std::unique_ptr<benchmark::BenchmarkReporter> file_inner;
  std::unique_ptr<kvc::bench::RooflineReporter> file;
  if (!benchmark::FLAGS_benchmark_out.empty()) {
    file_inner = kvc::bench::FileReporter(benchmark::FLAGS_benchmark_out_format);
    file = std::make_unique<kvc::bench::RooflineReporter>(file_inner.get());
  }
  benchmark::RunSpecifiedBenchmarks(&display, file.get());
  benchmark::Shutdown();
  return 0;
}
