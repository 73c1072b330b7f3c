// Command-line and JSON support shared by kvc's programs: flags are declared
// with ABSL_FLAG and parsed here (abseil's parser exits 1 on a bad value and
// on --help; kvc's programs exit 2 on bad usage, so this drives abseil's flag
// reflection itself); JSON is built with nlohmann::json and written here.
#ifndef KVC_TOOLS_TOOL_FLAGS_H_
#define KVC_TOOLS_TOOL_FLAGS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvc::tools {

struct ParsedArgs {
  bool help = false;                    // --help or -h was given
  std::vector<std::string> positional;  // arguments that are not flags, in order
};

// Parses argv[1..] against this program's ABSL_FLAGs: "--name=value",
// "--name value", "--name" / "--noname" for booleans; "-" in a name reads as
// "_" (so --decode-steps sets decode_steps); "--" ends the flags. Returns
// InvalidArgument naming the argument and abseil's reason for an unknown
// flag, a missing value or a value the flag's type does not parse.
absl::StatusOr<ParsedArgs> ParseFlags(int argc, char** argv);

// `value` as JSON text (2-space indent, a final newline); bytes that are not
// UTF-8 are replaced with U+FFFD, so it never throws.
std::string JsonText(const nlohmann::ordered_json& value);

// Writes `value` to `path`; on failure removes what it wrote and says why.
absl::Status WriteJsonFile(const std::string& path, const nlohmann::ordered_json& value);

}  // namespace kvc::tools

#endif  // KVC_TOOLS_TOOL_FLAGS_H_
