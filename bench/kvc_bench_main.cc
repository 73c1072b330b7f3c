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

// Benchmark base name -> reference base name, filled by RegisterRoofline().
std::map<std::string, std::string>& References() {
  static auto* references = new std::map<std::string, std::string>;
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
      const auto it = run.counters.find("bytes_per_second");
      if (it == run.counters.end()) continue;
      bytes_per_second_[name] = it->second.value;
      if (median) medians_.insert(name);
    }
    ConsoleReporter::ReportRuns(runs);
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    fmt::print("\nRatios to rooflines measured in this run (SIMD target {}):\n", ActiveSimdTargetName());
    fmt::print("{:<52}{:>12}{:>14}{:>8}\n", "benchmark", "GB/s", "roofline GB/s", "ratio");
    for (const auto& [name, bps] : bytes_per_second_) {
      const auto ref = References().find(BaseName(name));
      if (ref == References().end()) continue;
      // The roofline run at the same thread count.
      const auto roof = std::find_if(bytes_per_second_.begin(), bytes_per_second_.end(), [&](const auto& run) {
        return BaseName(run.first) == ref->second && Threads(run.first) == Threads(name);
      });
      if (roof == bytes_per_second_.end()) continue;
      fmt::print("{:<52}{:>12.2f}{:>14.2f}{:>8.2f}  (vs {}, {} thread{})\n", name, bps / 1e9, roof->second / 1e9,
                 bps / roof->second, ref->second, Threads(name), Threads(name) > 1 ? "s" : "");
    }
  }

 private:
  std::map<std::string, double> bytes_per_second_;
  std::set<std::string> medians_;
};

}  // namespace

bool RegisterRoofline(const std::string& name, const std::string& reference) {
  References()[name] = reference;
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
