// kvc_bench: Google Benchmark main with a reporter that, after the usual
// table, prints every benchmark's throughput as a ratio to its roofline
// measured in the same run.
#include <algorithm>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bench/roofline.h"
#include "benchmark/benchmark.h"
#include "fmt/core.h"
#include "kvc/row_kernels.h"

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

class RooflineReporter : public benchmark::ConsoleReporter {
 public:
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
    ConsoleReporter::ReportRuns(runs);
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    fmt::print("\nRatios to rooflines measured in this run (SIMD target {}):\n", ActiveSimdTargetName());
    fmt::print("{:<46}{:>18}{:>12}{:>12}{:>8}\n", "benchmark", "counter", "value (G)", "roofline", "ratio");
    for (const auto& [name, counters] : rates_) {
      const auto refs = References().find(BaseName(name));
      if (refs == References().end()) continue;
      for (const Roofline& ref : refs->second) {
        const auto value = counters.find(ref.counter);
        if (value == counters.end()) continue;
        // The roofline run at the same thread count.
        const auto roof = std::find_if(rates_.begin(), rates_.end(), [&](const auto& run) {
          return BaseName(run.first) == ref.reference && Threads(run.first) == Threads(name) &&
                 run.second.count(ref.counter) != 0;
        });
        if (roof == rates_.end()) continue;
        const double roof_value = roof->second.at(ref.counter);
        fmt::print("{:<46}{:>18}{:>12.2f}{:>12.2f}{:>8.2f}  (vs {}, {} thread{})\n", name, ref.counter, value->second / 1e9,
                   roof_value / 1e9, value->second / roof_value, ref.reference, Threads(name), Threads(name) > 1 ? "s" : "");
      }
    }
  }

 private:
  std::map<std::string, std::map<std::string, double>> rates_;  // run -> counter -> rate
  std::set<std::string> medians_;
};

}  // namespace

bool RegisterRoofline(const std::string& name, const std::string& reference, const std::string& counter) {
  References()[name].push_back({reference, counter});
  return true;
}

}  // namespace kvc::bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("kvc_simd_target", kvc::ActiveSimdTargetName());
  kvc::bench::RooflineReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
