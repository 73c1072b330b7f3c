// Snapshots: the exact state of sequences in a file, restored bit for bit.
//
// A snapshot stores what the cache stores, verbatim: every 584-byte
// compressed row and 68-byte index key, each layer's window ring (slot order),
// rollback records, compressor state rings, lengths and rollback floors
// (format: docs/reliability.md). Every block of the file carries a CRC-32C
// and the file names the model it belongs to, so a damaged, truncated,
// foreign or wrong-model file is refused with an error naming the problem.
//
// Saves are atomic. A first save (or one that compacts) writes a new file
// in the directory of `path` without a name (O_TMPFILE; where the file
// system lacks it, under a unique name `path`.tmp-<16 hex> created
// exclusively, never through a link planted there), with the mode of the
// snapshot it replaces, else 0600; flushed, it gets a unique name and is
// renamed over `path`. An incremental save appends only what is new
// (history rows the file lacks, the changed per-layer state) and a commit
// block last, then flushes. A save killed half-way therefore leaves either
// the old file or the old file plus an unfinished tail, which readers
// ignore: the previous snapshot stays usable (and no temporary file stays,
// except where O_TMPFILE is unsupported: FindLeftoverTempFiles).
//
// `path` must be a regular file or absent: a FIFO, device, socket or
// directory there is refused by saves, restores and inspection alike (a
// file-system error, errno EINVAL, EISDIR for a directory; never blocking,
// never writing into it). A symlink at `path` to an existing file is
// followed: saves update that file in place (a rewrite's new file is made
// beside it); a dangling symlink is replaced by the snapshot.
//
// Threads: a save locks each sequence while it writes it (appends to that
// sequence wait; other sequences run on), so each sequence is saved at one
// consistent point. Saving to the same path from two threads at once is the
// caller's to avoid.
#ifndef KVC_SNAPSHOT_H_
#define KVC_SNAPSHOT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvc/cache.h"

namespace kvc {

// The on-disk format this build writes and reads.
constexpr uint32_t kSnapshotFormatVersion = 1;

struct SaveOptions {
  // Append to an existing snapshot at `path` when it is a sound snapshot of
  // this model: history rows it already holds for these sequences (from an
  // earlier save of them, or of the snapshot they were restored from) are
  // not written again. Before appending, the file is checked as a restore
  // checks it (every committed block's checksum, every referenced block's
  // contents; it is read once: the +1-token save of a 1M-token sequence,
  // 3.72 GB, took 0.98 s in the main job), so a save never builds on a file that
  // could not be restored. The file is rewritten whole instead when it is
  // missing, damaged or for another model, or when more than half of it
  // would be superseded data. false: always write a fresh file.
  bool incremental = true;
};

struct SaveStats {
  int64_t bytes_written = 0;   // appended, or the size of the new file
  int64_t rows_written = 0;    // compressed rows and index keys written
  int64_t rows_reused = 0;     // already in the file, referenced again
  int64_t file_bytes = 0;      // size of the file after the save
  bool rewrote = false;        // a fresh file was written (not appended)
  // false only when a rewrite's file was written, flushed and renamed over
  // `path`, but flushing the directory afterwards failed (`directory_sync`
  // says why): the new snapshot is in place and complete, and reads and
  // later saves use it, but after a system crash `path` may show the
  // previous file again (intact, as it was before this save).
  bool durable = true;
  absl::Status directory_sync;
};

// Saves `sequences` (in that order) to `path`. kNotFound for an unknown id
// (nothing written). A failing file-system call is reported with the code
// of its errno (kNotFound, kPermissionDenied, kResourceExhausted for ENOSPC,
// kOutOfRange for EFBIG, ...) naming the path, and FileSystemErrno(status)
// gives that errno. What is on disk after each outcome:
//   OK, durable     the new snapshot is at `path`, flushed.
//   OK, !durable    as above, but the directory entry may not be (SaveStats).
//   any error       `path` holds the previous snapshot as it was (or nothing,
//                   if there was none), and no temporary file is left; a
//                   failed append may leave a tail past the last commit,
//                   which readers ignore and the next save removes.
// A failed save changes nothing in the sequences either: the next
// incremental save appends to the previous file as if it had not run.
absl::StatusOr<SaveStats> SaveSnapshot(const Cache& cache, absl::Span<const SequenceId> sequences,
                                       const std::string& path, const SaveOptions& options = {});
// Saves every live sequence of the cache.
absl::StatusOr<SaveStats> SaveCacheSnapshot(const Cache& cache, const std::string& path,
                                            const SaveOptions& options = {});

// Restores every sequence of the snapshot at `path` into `cache` as new
// sequences and returns their ids, in the snapshot's order. The cache must
// be for the same model (layer kinds, dimensions, RoPE, compressor
// parameters) and rollback depth: kFailedPrecondition naming the first
// difference otherwise. kDataLoss for a damaged file (naming the block; also
// a header or block whose numbers are out of range), kInvalidArgument for a
// file that is not a snapshot or has another format version,
// kResourceExhausted when the pages do not fit, a failing file-system call
// as for SaveSnapshot (FileSystemErrno tells). Every block of the committed
// part of the file is checked, also those a later save superseded: a
// restore refuses exactly the files VerifySnapshot refuses (and files of
// another model). On any error the cache is exactly as it was.
absl::StatusOr<std::vector<SequenceId>> RestoreSnapshot(Cache& cache, const std::string& path);

struct SnapshotLayerInfo {
  int64_t length = 0;
  int64_t rollback_floor = 0;
  int64_t compressed_rows = 0;
  int64_t index_keys = 0;
};

struct SnapshotSequenceInfo {
  SequenceId saved_id = 0;  // its id in the cache that saved it
  std::vector<SnapshotLayerInfo> layers;
};

struct SnapshotInfo {
  uint32_t format_version = 0;
  std::string model_name;
  std::string layer_kinds;  // one letter per layer: W (window), C (CSA), H (HCA)
  int32_t rollback_depth = 0;
  uint64_t model_fingerprint = 0;  // CRC-32C of the model description (and parameters)
  int64_t saves = 0;                // commits in the file (1 + incremental saves)
  int64_t file_bytes = 0;
  int64_t live_bytes = 0;           // blocks the last commit refers to
  int64_t unfinished_bytes = 0;     // an interrupted save's tail, ignored
  int64_t blocks = 0;               // blocks in the file
  int64_t blocks_verified = 0;      // blocks whose checksum was checked
  std::vector<SnapshotSequenceInfo> sequences;
};

// What the file holds, from its header, block headers and last commit
// (payload checksums of the commit and model blocks only).
absl::StatusOr<SnapshotInfo> ReadSnapshotInfo(const std::string& path);
// ReadSnapshotInfo plus the checksum of every block in the file (also the
// ones no longer referenced). kDataLoss naming the first bad block.
absl::StatusOr<SnapshotInfo> VerifySnapshot(const std::string& path);

// The temporary files a full save to `path` left beside it (or beside the
// file a symlink at `path` points to): `path` + ".tmp-" + 16 lowercase hex
// digits, full paths, sorted. Only a save killed where the file system lacks
// O_TMPFILE (or killed in the instant between naming its finished file and
// renaming it over `path`) leaves one; delete them when no save to `path`
// is running. Nothing is deleted here. An error only if the directory
// cannot be read.
absl::StatusOr<std::vector<std::string>> FindLeftoverTempFiles(const std::string& path);

// The errno of a status that reports a failing file-system call (opening,
// reading, writing, flushing, renaming a snapshot file); 0 for any other
// status. The C API reports exactly these as KVC_ERR_IO.
int FileSystemErrno(const absl::Status& status);

}  // namespace kvc

#endif  // KVC_SNAPSHOT_H_
