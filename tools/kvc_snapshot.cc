// kvc-snapshot: what a snapshot file holds, and whether it is sound.
//
//   kvc-snapshot info FILE     header, model, sequences (block headers checked)
//   kvc-snapshot verify FILE   info + the checksum and contents of every block
//
// Both also list temporary files a killed full save left beside FILE
// (FILE.tmp-<16 hex>; FindLeftoverTempFiles), without deleting them.
//
// Exit status: 0 sound, 1 damaged or not a snapshot (the reason on stderr),
// 2 bad usage.
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "fmt/core.h"
#include "kvc/snapshot.h"

namespace {

void Print(const kvc::SnapshotInfo& info) {
  fmt::print("format version   {}\n", info.format_version);
  fmt::print("model            {} ({} layers: {})\n", info.model_name, info.layer_kinds.size(), info.layer_kinds);
  fmt::print("model checksum   {:08x}\n", info.model_fingerprint);
  fmt::print("rollback depth   {}\n", info.rollback_depth);
  fmt::print("saves            {}\n", info.saves);
  fmt::print("file             {} bytes, {} blocks, {} bytes live ({:.1f} %)\n", info.file_bytes, info.blocks,
             info.live_bytes, 100.0 * static_cast<double>(info.live_bytes) / static_cast<double>(info.file_bytes));
  if (info.unfinished_bytes > 0) {
    fmt::print("unfinished       {} bytes after the last commit (an interrupted save; ignored)\n",
               info.unfinished_bytes);
  }
  fmt::print("sequences        {}\n", info.sequences.size());
  for (const kvc::SnapshotSequenceInfo& s : info.sequences) {
    int64_t shortest = INT64_MAX, longest = 0, floor = 0, rows = 0, keys = 0;
    for (const kvc::SnapshotLayerInfo& l : s.layers) {
      shortest = std::min(shortest, l.length);
      longest = std::max(longest, l.length);
      floor = std::max(floor, l.rollback_floor);
      rows += l.compressed_rows;
      keys += l.index_keys;
    }
    const std::string length =
        shortest == longest ? fmt::format("{} tokens", longest) : fmt::format("{}..{} tokens (mid-step)", shortest, longest);
    fmt::print("  saved id {:<6} {}, rollback floor {}, {} compressed rows, {} index keys\n", s.saved_id, length,
               floor, rows, keys);
  }
}

// Temporary files a killed full save left beside the snapshot (never
// deleted here: a save to it may be running).
void PrintLeftoverTempFiles(const char* path, std::FILE* out) {
  const absl::StatusOr<std::vector<std::string>> left = kvc::FindLeftoverTempFiles(path);
  if (!left.ok()) {
    fmt::print(out, "leftover temp    cannot check: {}\n", std::string(left.status().message()));
    return;
  }
  for (const std::string& temp : *left) {
    struct stat st;
    const std::string size = ::stat(temp.c_str(), &st) == 0 ? fmt::format("{} bytes", st.st_size) : "size unknown";
    fmt::print(out, "leftover temp    {} ({}): left by a killed full save; delete it if no save to {} is running\n",
               temp, size, path);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::strcmp(argv[1], "info") != 0 && std::strcmp(argv[1], "verify") != 0)) {
    std::fprintf(stderr, "usage: kvc-snapshot info|verify FILE\n");
    return 2;
  }
  const bool verify = std::strcmp(argv[1], "verify") == 0;
  const absl::StatusOr<kvc::SnapshotInfo> info = verify ? kvc::VerifySnapshot(argv[2]) : kvc::ReadSnapshotInfo(argv[2]);
  PrintLeftoverTempFiles(argv[2], info.ok() ? stdout : stderr);
  if (!info.ok()) {
    fmt::print(stderr, "{}: {}\n", verify ? "BAD" : "error", std::string(info.status().ToString()));
    return 1;
  }
  Print(*info);
  if (verify) fmt::print("OK: {} blocks verified, every checksum matches\n", info->blocks_verified);
  return 0;
}
