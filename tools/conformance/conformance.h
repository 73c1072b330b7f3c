// The conformance runner: checks kvc against golden vectors captured from the
// official DeepSeek-V4 inference code (schema: tests/golden/README.md).
//
// Each check prints one line, `PASS <case>/<check> <figure>` or
// `FAIL <case>/<check> <figure>`; a case whose file is missing or malformed
// fails as `<case>/load` with the reason. Nothing here assumes the shapes,
// seeds or lengths of kvc's own golden files: everything is read from the
// file and validated.
#ifndef KVC_TOOLS_CONFORMANCE_CONFORMANCE_H_
#define KVC_TOOLS_CONFORMANCE_CONFORMANCE_H_

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "src/json.h"
#include "src/safetensors.h"

namespace kvc::conformance {

// Collects check results and prints each line as it is added.
class Report {
 public:
  explicit Report(std::ostream& out) : out_(out) {}

  void Add(const std::string& case_name, const std::string& check, bool passed,
           const std::string& figure);
  // Marks a check failed because its inputs could not be read.
  void Error(const std::string& case_name, const std::string& check, const absl::Status& status) {
    Add(case_name, check, false, std::string(status.message()));
  }

  int passed() const { return passed_; }
  int failed() const { return failed_; }
  const std::vector<std::string>& failed_checks() const { return failed_checks_; }

 private:
  std::ostream& out_;
  int passed_ = 0;
  int failed_ = 0;
  std::vector<std::string> failed_checks_;
};

// One golden file: the tensors plus the parsed `__metadata__.meta` object.
class GoldenCase {
 public:
  static absl::StatusOr<GoldenCase> Open(const std::string& dir, const std::string& name);

  const std::string& name() const { return name_; }
  const SafetensorsFile& file() const { return file_; }
  // An integer parameter of the metadata (e.g. "ratio", "prefill").
  absl::StatusOr<int64_t> MetaInt(const std::string& key) const;
  // A numeric parameter (e.g. "norm_eps", "rope_theta").
  absl::StatusOr<double> MetaNumber(const std::string& key) const;

 private:
  std::string name_;
  SafetensorsFile file_;
  JsonValue meta_;
};

// A fraction as a percentage with two decimals ("99.95 %").
std::string Percent(double fraction);

// Number of positions where a and b differ, comparing bit patterns.
template <typename T>
int64_t CountMismatches(const std::vector<T>& a, const std::vector<T>& b, int64_t* first = nullptr) {
  int64_t mismatches = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (a[i] != b[i]) {
      if (mismatches == 0 && first != nullptr) *first = static_cast<int64_t>(i);
      ++mismatches;
    }
  }
  return mismatches + static_cast<int64_t>(a.size() > b.size() ? a.size() - b.size() : b.size() - a.size());
}

// Codec checks on codec.safetensors: codec/e4m3_table, e4m3_cast, bf16_cast,
// e2m1_ties, fp8_codes, fp8_scales, fp8_values, hadamard, fp4_codes,
// fp4_scales, fp4_values, index_key_kernel.
void RunCodecChecks(const GoldenCase& golden, Report& report);

// Window-stream checks through kvc::Cache on a layer case (win, csa, hca):
// <case>/window_rows, ring_after_prefill, ring_final, ring_rechunked.
void RunWindowChecks(const GoldenCase& golden, Report& report);

// Compressor checks through kvc::Cache on the csa and hca cases
// (compressed_entries[_rechunked], csa: index_keys[_rechunked]) and
// <case>/rope_table on every layer case.
void RunCompressorChecks(const GoldenCase& golden, Report& report);

// Indexer and attention checks through kvc::Cache on the decode steps of a
// layer case: csa index_queries, index_scores, topk_overlap; hca and win
// attention_set; attention_out on all three.
void RunIndexerChecks(const GoldenCase& golden, Report& report);

// Multi-position selection (Cache::SelectAttentionSets) on a layer case:
// <case>/prefill_attention_set on all three; win and hca
// verify_attention_set, csa verify_topk_overlap.
void RunMultiPositionChecks(const GoldenCase& golden, Report& report);

struct Summary {
  int passed;
  int failed;
};

// Runs every case the library can check on the files in `dir`.
Summary RunConformance(const std::string& dir, std::ostream& out);

}  // namespace kvc::conformance

#endif  // KVC_TOOLS_CONFORMANCE_CONFORMANCE_H_
