#include "tools/conformance/conformance.h"

#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvc::conformance {

void Report::Add(const std::string& case_name, const std::string& check, bool passed,
                 const std::string& figure) {
  const std::string name = absl::StrCat(case_name, "/", check);
  out_ << (passed ? "PASS " : "FAIL ") << name << "  " << figure << "\n" << std::flush;
  if (passed) {
    ++passed_;
  } else {
    ++failed_;
    failed_checks_.push_back(name);
  }
}

std::string Percent(double fraction) {
  const int64_t hundredths = static_cast<int64_t>(std::llround(fraction * 10000));
  return absl::StrCat(hundredths / 100, ".", hundredths % 100 < 10 ? "0" : "", hundredths % 100, " %");
}

absl::StatusOr<GoldenCase> GoldenCase::Open(const std::string& dir, const std::string& name) {
  GoldenCase golden;
  golden.name_ = name;
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Read(absl::StrCat(dir, "/", name, ".safetensors"));
  if (!file.ok()) return file.status();
  golden.file_ = *std::move(file);
  const JsonValue* metadata = golden.file_.metadata();
  const JsonValue* meta = metadata != nullptr ? metadata->Find("meta") : nullptr;
  if (meta != nullptr) {
    if (!meta->is_string()) return absl::InvalidArgumentError("__metadata__.meta is not a string");
    absl::StatusOr<JsonValue> parsed = JsonValue::Parse(meta->string());
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("__metadata__.meta: ", parsed.status().message()));
    }
    golden.meta_ = *std::move(parsed);
  }
  return golden;
}

absl::StatusOr<int64_t> GoldenCase::MetaInt(const std::string& key) const {
  const JsonValue* v = meta_.Find(key);
  if (v == nullptr || !v->is_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": metadata has no integer \"", key, "\""));
  }
  return static_cast<int64_t>(v->number());
}

absl::StatusOr<double> GoldenCase::MetaNumber(const std::string& key) const {
  const JsonValue* v = meta_.Find(key);
  if (v == nullptr || !v->is_number()) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": metadata has no number \"", key, "\""));
  }
  return v->number();
}

Summary RunConformance(const std::string& dir, std::ostream& out) {
  Report report(out);
  // Each case and the checks the library runs on it.
  const struct {
    const char* name;
    std::vector<void (*)(const GoldenCase&, Report&)> checks;
  } cases[] = {{"codec", {RunCodecChecks}},
               {"win", {RunWindowChecks, RunCompressorChecks, RunIndexerChecks, RunMultiPositionChecks}},
               {"csa", {RunWindowChecks, RunCompressorChecks, RunIndexerChecks, RunMultiPositionChecks}},
               {"hca", {RunWindowChecks, RunCompressorChecks, RunIndexerChecks, RunMultiPositionChecks}}};
  for (const auto& c : cases) {
    absl::StatusOr<GoldenCase> golden = GoldenCase::Open(dir, c.name);
    if (!golden.ok()) {
      report.Error(c.name, "load", golden.status());
      continue;
    }
    for (const auto& run : c.checks) run(*golden, report);
  }
  out << report.passed() << " passed, " << report.failed() << " failed\n";
  return {report.passed(), report.failed()};
}

}  // namespace kvc::conformance
