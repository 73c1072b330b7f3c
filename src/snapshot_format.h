// The snapshot file format, version 1: layout, encoding, and the checked
// reading and writing of each part (docs/reliability.md). Internal to kvc
// (not installed); snapshot.cc puts a cache's sequences through it.
//
//   file header   64 B: magic, version, file tag, committed bytes, saves,
//                 offset of the last commit; CRC-32C of the rest
//   blocks        32 B header (magic, type, payload bytes, payload CRC,
//                 header CRC) + payload:
//     model       the model description (key/value text), once per file
//     rows        up to one cache page of 584-byte rows or 68-byte keys of
//                 one layer's history stream, verbatim
//     state       one layer's window ring, rollback records and compressor
//                 state rings, with its length and rollback floor
//     commit      per sequence and layer: the state block, and per history
//                 stream the row count and the row blocks ("extents") that
//                 hold its rows in order
//
// The header's `committed` field is the end of the last commit; a save
// appends blocks after it and moves it last, so bytes beyond it belong to an
// interrupted save and are ignored. All integers little-endian.
#ifndef KVC_SRC_SNAPSHOT_FORMAT_H_
#define KVC_SRC_SNAPSHOT_FORMAT_H_

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kvc/compressor.h"
#include "src/crc32c.h"
#include "kvc/model_spec.h"
#include "kvc/row_formats.h"
#include "kvc/snapshot.h"
#include "src/status.h"
#include "src/page_store.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "snapshots are little-endian and written natively");

namespace kvc::snapshot_format {

// --- Layout constants --------------------------------------------------------

constexpr char kFileMagic[8] = {'K', 'V', 'C', 'S', 'N', 'A', 'P', '\n'};
constexpr int64_t kFileHeaderBytes = 64;
constexpr uint32_t kBlockMagic = 0x4B4C4253u;  // "SBLK"
constexpr int64_t kBlockHeaderBytes = 32;

enum class BlockType : uint32_t { kModel = 1, kRows = 2, kState = 3, kCommit = 4 };

const char* BlockTypeName(BlockType type);

// The first of n contiguous stored 584-byte rows (68-byte keys) kvc could
// not have written, or -1: a NaN E4M3 code or UE8M0 scale, a block that
// reads back as infinity (a scale above 2^120, or the code of 256 at 2^120),
// a non-finite bf16 RoPE dim, nonzero padding; for keys, a block scale
// above 2^121 (what the largest accepted key input gets). A restore and
// Cache::AppendRows refuse them.
int64_t FirstInvalidKvRow(const uint8_t* rows, int64_t n);
int64_t FirstInvalidKey(const uint8_t* keys, int64_t n);

// The two history streams of a layer.
constexpr int kStreams = 2;
constexpr const char* kStreamName[kStreams] = {"compressed rows", "index keys"};
constexpr RowFormat kStreamFormat[kStreams] = {RowFormat::kKvFp8, RowFormat::kIndexFp4};

// --- Little-endian encoding ---------------------------------------------------

class Encoder {
 public:
  template <typename T>
  void Put(T value) {
    static_assert(std::is_trivially_copyable<T>::value, "plain values only");
    bytes_.append(reinterpret_cast<const char*>(&value), sizeof(T));
  }
  void PutBytes(const void* data, size_t n) { bytes_.append(static_cast<const char*>(data), n); }
  void PutString(const std::string& s) {
    Put<uint32_t>(static_cast<uint32_t>(s.size()));
    bytes_ += s;
  }
  std::string& bytes() { return bytes_; }

 private:
  std::string bytes_;
};

// Bounds-checked reading of a payload. Failure is sticky: after one read
// runs past the end, every later one fails too (ok() tells).
class Decoder {
 public:
  Decoder(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  template <typename T>
  bool Get(T* value) {
    const uint8_t* p = Bytes(sizeof(T));
    if (p == nullptr) return false;
    std::memcpy(value, p, sizeof(T));
    return true;
  }
  const uint8_t* Bytes(uint64_t n) {
    if (!ok_ || size_ - at_ < n || data_ == nullptr) {
      ok_ = false;
      return nullptr;
    }
    const uint8_t* p = data_ + at_;
    at_ += static_cast<size_t>(n);
    return p;
  }
  bool GetString(std::string* s) {
    uint32_t n = 0;
    if (!Get(&n)) return false;
    const uint8_t* p = Bytes(n);
    if (p == nullptr) return false;
    s->assign(reinterpret_cast<const char*>(p), n);
    return true;
  }
  size_t remaining() const { return size_ - at_; }
  bool ok() const { return ok_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t at_ = 0;
  bool ok_ = true;
};

// --- Files ----------------------------------------------------------------------

// The file-system calls a save makes once it has begun writing: the real
// ones, or a test's that fails one of them on purpose (SaveSnapshotUsing).
// A failing call returns -1 with errno set, as the system call does.
class FileSystem {
 public:
  virtual ~FileSystem() = default;
  virtual ssize_t Pwrite(int fd, const void* data, size_t n, off_t offset) { return ::pwrite(fd, data, n, offset); }
  virtual int Fsync(int fd) { return ::fsync(fd); }
  virtual int Rename(const char* from, const char* to);
  // open(dir, O_TMPFILE | flags, mode): a new file without a name in `dir`.
  virtual int OpenUnnamed(const char* dir, int flags, mode_t mode) { return ::open(dir, flags | O_TMPFILE, mode); }
  static FileSystem& Real();
};

// The status of a failed system call (`what`, e.g. "cannot open", on `path`):
// the code and message of errno, and errno as a payload (FileSystemErrno in
// kvc/snapshot.h), so that callers can tell a file-system failure from a
// refusal with the same code.
absl::Status IoError(const std::string& what, const std::string& path);

// `status` with `context` appended to its message, payloads kept.
absl::Status WithContext(const absl::Status& status, const std::string& context);

// An open file descriptor with whole-buffer reads and writes.
class File {
 public:
  static absl::StatusOr<File> Open(const std::string& path, int flags, FileSystem& fs = FileSystem::Real()) {
    const int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0600);
    if (fd < 0) return IoError("cannot open", path);
    return File(fd, path, fs);
  }
  // Opens `path`, which must be a regular file (a symlink to one is
  // followed): opening never blocks (O_NONBLOCK, cleared once open, so a
  // FIFO cannot hang it), and a FIFO, device, socket or directory is
  // refused (NotRegularFileError) before anything is read or written.
  static absl::StatusOr<File> OpenRegular(const std::string& path, int flags, FileSystem& fs = FileSystem::Real());
  // A new file named `prefix` + a random suffix, read-write. O_CREAT|O_EXCL|
  // O_NOFOLLOW: never an existing file, never through a link planted there.
  // Permission bits: exactly `mode` when `exact_mode`, else `mode` less the
  // umask.
  static absl::StatusOr<File> CreateUnique(const std::string& prefix, mode_t mode, bool exact_mode, FileSystem& fs);
  // A new, empty file, read-write, that is to replace `target` (Replace).
  // Where the file system supports O_TMPFILE it has no name until Replace,
  // so a process that dies before then leaves nothing behind; elsewhere it
  // is CreateUnique(target + ".tmp-"). Permission bits as CreateUnique's.
  static absl::StatusOr<File> CreateReplacementFor(const std::string& target, mode_t mode, bool exact_mode,
                                                   FileSystem& fs);
  // Puts this file (written and flushed) in place of `target`: names it
  // `target` + ".tmp-" + 16 hex digits if it has no name yet (linkat, which
  // never replaces anything), then renames it over `target`. On failure the
  // file may have that name: Discard removes it.
  absl::Status Replace(const std::string& target);
  // Removes the name of a replacement that was not put in place (none for
  // one still unnamed).
  absl::Status Discard();
  File(File&& other) noexcept
      : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)), fs_(other.fs_), named_(other.named_) {}
  File& operator=(File&& other) = delete;
  File(const File&) = delete;
  ~File() {
    if (fd_ >= 0) ::close(fd_);
  }

  absl::StatusOr<int64_t> Size() const {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return IoError("cannot stat", path_);
    return static_cast<int64_t>(st.st_size);
  }
  // Exactly `n` bytes at `offset`; kDataLoss if the file ends first.
  absl::Status ReadAt(int64_t offset, void* out, size_t n) const {
    auto* p = static_cast<uint8_t*>(out);
    while (n > 0) {
      const ssize_t got = ::pread(fd_, p, n, static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) return IoError("cannot read", path_);
      if (got == 0) {
        return absl::DataLossError(absl::StrCat(path_, ": file ends at offset ", offset, ", inside data it refers to"));
      }
      p += got;
      n -= static_cast<size_t>(got);
      offset += got;
    }
    return absl::OkStatus();
  }
  absl::Status WriteAt(int64_t offset, const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
      const ssize_t put = fs_->Pwrite(fd_, p, n, static_cast<off_t>(offset));
      if (put < 0 && errno == EINTR) continue;
      if (put < 0) return IoError("cannot write", path_);
      p += put;
      n -= static_cast<size_t>(put);
      offset += put;
    }
    return absl::OkStatus();
  }
  absl::Status Sync() {
    if (fs_->Fsync(fd_) != 0) return IoError("cannot flush", path_);
    return absl::OkStatus();
  }
  absl::Status Truncate(int64_t size) {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) return IoError("cannot truncate", path_);
    return absl::OkStatus();
  }
  const std::string& path() const { return path_; }

 private:
  File(int fd, std::string path, FileSystem& fs, bool named = true)
      : fd_(fd), path_(std::move(path)), fs_(&fs), named_(named) {}
  int fd_;
  std::string path_;  // for messages; an unnamed file's says what it is for
  FileSystem* fs_;
  bool named_;  // false: O_TMPFILE, not linked yet
};

// A refusal to use `path`, which is not a regular file (st_mode `mode`), as a
// snapshot: a file-system error (FileSystemErrno) with errno EISDIR for a
// directory, EINVAL for a FIFO, device or socket, naming the path and its type.
absl::Status NotRegularFileError(const std::string& path, mode_t mode);

// Where a save to `path` acts (ResolveSymlink(path)): whether a file is
// there and its mode. A FIFO, device, socket or directory there is refused
// (NotRegularFileError): a save neither writes into one nor replaces it.
struct SaveTarget {
  std::string path;
  bool exists = false;
  mode_t mode = 0;
};
absl::StatusOr<SaveTarget> ResolveSaveTarget(const std::string& path);

// The directory part of `path` ("." for a bare name).
std::string DirectoryOf(const std::string& path);

// The file a symlink at `path` points to (realpath), when `path` is a symlink
// to an existing file; else `path`.
std::string ResolveSymlink(const std::string& path);

// Flushes the directory entry of `path` (after a rename).
absl::Status SyncDirectoryOf(const std::string& path, FileSystem& fs = FileSystem::Real());

// --- File header ---------------------------------------------------------------

struct FileHeader {
  uint32_t version = kSnapshotFormatVersion;
  uint64_t file_tag = 0;      // random, drawn when the file is created
  int64_t committed = 0;      // end of the last commit block
  int64_t saves = 0;          // commits so far
  int64_t last_commit = 0;    // offset of the last commit block
};

std::array<uint8_t, kFileHeaderBytes> EncodeHeader(const FileHeader& h);

absl::StatusOr<FileHeader> DecodeHeader(const uint8_t* bytes, const std::string& path);

// --- Blocks --------------------------------------------------------------------

struct BlockHeader {
  BlockType type;
  uint64_t payload_bytes;
  uint32_t payload_crc;
};

// Reads and checks the header of the block at `offset`, which must end by
// `limit` (and be of type `want`, unless null).
absl::StatusOr<BlockHeader> ReadBlockHeader(const File& f, int64_t offset, int64_t limit, const BlockType* want);

// The payload of the block at `offset` into `payload` (resized; a buffer
// reused across blocks costs no allocation), checksum verified.
absl::Status ReadBlockInto(const File& f, int64_t offset, int64_t limit, BlockType want, std::vector<uint8_t>* payload);

absl::StatusOr<std::vector<uint8_t>> ReadBlock(const File& f, int64_t offset, int64_t limit, BlockType want);

// --- The model a snapshot belongs to -------------------------------------------

// Everything a restored sequence's bytes and later results depend on, as
// named text fields (compared field by field, so a mismatch names itself).
// The model's name is shown but not compared.
struct ModelDescription {
  std::string name;
  std::vector<std::pair<std::string, std::string>> fields;

  const std::string* Find(const std::string& key) const {
    for (const auto& [k, v] : fields) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  std::string Encode() const {
    Encoder e;
    e.PutString(name);
    e.Put<uint32_t>(static_cast<uint32_t>(fields.size()));
    for (const auto& [k, v] : fields) {
      e.PutString(k);
      e.PutString(v);
    }
    return std::move(e.bytes());
  }
  uint32_t Fingerprint() const {
    uint32_t crc = 0;
    for (const auto& [k, v] : fields) {
      crc = Crc32c(k.data(), k.size(), crc);
      crc = Crc32c(v.data(), v.size(), crc);
    }
    return crc;
  }
};

absl::StatusOr<ModelDescription> DecodeModel(const std::vector<uint8_t>& payload, const std::string& path);

// kFailedPrecondition naming the first field where the snapshot's model and
// the cache's differ. A field only one side has reads as its default on the
// other where it has one ("draft_slots": "0"), else as missing.
absl::Status CheckSameModel(const ModelDescription& file, const ModelDescription& cache, const std::string& path);

// The shapes a snapshot's blocks must have, from its model description
// (so a file can be verified without a cache of its model).
struct Geometry {
  std::vector<LayerKind> kinds;
  std::vector<bool> compresses;  // kvc computes the layer's entries (state saved)
  int64_t window = 0, depth = 0, head_dim = 0, index_dim = 0, max_context = 0;
  int64_t ring_slots = 0;  // window + draft_slots: the rows of a state block's ring

  // The state sections: cache_internal::StateFloats of the layer's state
  // streams (the cache's CompressorState parts hold exactly these).
  int64_t MainStateFloats(size_t layer) const {
    return compresses[layer] ? StateFloatsOf(cache_internal::PartsOf(kinds[layer]).main_state) : 0;
  }
  int64_t IndexerStateFloats(size_t layer) const {
    return compresses[layer] ? StateFloatsOf(cache_internal::PartsOf(kinds[layer]).indexer_state) : 0;
  }
  int64_t StateFloatsOf(int s) const {
    if (s < 0) return 0;
    return cache_internal::StateFloats(
        cache_internal::StateCompressor(s, static_cast<int>(head_dim), static_cast<int>(index_dim)), depth);
  }
};

absl::StatusOr<Geometry> GeometryOf(const ModelDescription& m, const std::string& path);

// --- Commit (the manifest of one save) -------------------------------------------

struct Extent {
  int64_t offset;  // of a rows block
  uint32_t rows;   // used from the start of it
};

struct StreamEntry {
  int64_t rows = 0;
  std::vector<Extent> extents;
};

struct LayerEntry {
  int64_t state_offset = 0;
  int64_t length = 0;  // as in the state block (kept here for info and reuse)
  int64_t floor = 0;
  StreamEntry streams[kStreams];
};

struct SequenceEntry {
  uint64_t tag = 0;
  int64_t saved_id = 0;
  std::vector<LayerEntry> layers;
};

struct Commit {
  int64_t model_offset = 0;
  std::vector<SequenceEntry> sequences;
};

std::string EncodeCommit(const Commit& c);

// Decodes a commit and checks its structure against the geometry: counts,
// offsets before the commit, extents summing to the row counts.
absl::StatusOr<Commit> DecodeCommit(const std::vector<uint8_t>& payload, const Geometry& g, int64_t commit_offset,
                                    const std::string& path);

// --- Opening a snapshot ------------------------------------------------------------

struct OpenedSnapshot {
  std::unique_ptr<File> file;
  FileHeader header;
  int64_t file_bytes = 0;
  ModelDescription model;
  Geometry geometry;
  Commit commit;
};

// Header, model and last commit (checksums of those verified).
absl::StatusOr<OpenedSnapshot> OpenSnapshot(const std::string& path, int flags = O_RDONLY,
                                           FileSystem& fs = FileSystem::Real());

// --- Row and state blocks ----------------------------------------------------------------

// A rows block: [first, first + count) of one layer's stream (pointing into
// the caller's buffer).
struct RowsBlock {
  const uint8_t* rows = nullptr;  // count x row_bytes, verbatim
  int64_t first = 0;
  uint32_t count = 0;
};

std::string EncodeRowsPreamble(uint32_t layer, int stream, int64_t first, uint32_t count);

// Reads the rows block at `offset`, which must hold at least `rows` rows of
// (layer, stream) starting at row `first`, all valid.
absl::StatusOr<RowsBlock> ReadRows(const File& f, int64_t offset, int64_t limit, size_t layer, int stream,
                                   int64_t first, uint32_t rows, std::vector<uint8_t>* buffer);

// A state block: one layer's private pages, pointing into the caller's buffer.
struct StateBlock {
  const uint8_t* ring = nullptr;       // ring_slots x 584 B, slot order
  const uint8_t* rollback = nullptr;   // depth x 584 B
  const uint8_t* evictors = nullptr;   // depth x int64 (position whose append evicted the record; -1 none)
  const uint8_t* main_state = nullptr;     // MainStateFloats x fp32
  const uint8_t* indexer_state = nullptr;  // IndexerStateFloats x fp32
};

// Reads the state block at `offset` for layer `layer` at (length, floor) as
// the commit says, and checks every invariant the cache relies on.
absl::StatusOr<StateBlock> ReadState(const File& f, int64_t offset, int64_t limit, const Geometry& g, size_t layer,
                                     int64_t length, int64_t floor, std::vector<uint8_t>* buffer);

// --- Writing -----------------------------------------------------------------------

uint64_t NewTag();

// Appends blocks at the end of a file, buffered. A block is built in place:
// Begin(), append its payload to payload(), End().
class BlockWriter {
 public:
  BlockWriter(File* file, int64_t offset) : file_(file), flushed_(offset) {}

  void Begin() {
    start_ = buffer_.size();
    buffer_.append(static_cast<size_t>(kBlockHeaderBytes), '\0');
  }
  std::string& payload() { return buffer_; }
  // Writes the header of the block begun last; returns the block's offset.
  absl::StatusOr<int64_t> End(BlockType type) {
    char* header = &buffer_[start_];
    const uint32_t magic = kBlockMagic, t = static_cast<uint32_t>(type);
    const uint64_t n = buffer_.size() - start_ - kBlockHeaderBytes;
    const uint32_t crc = Crc32c(header + kBlockHeaderBytes, n);
    std::memcpy(header, &magic, 4);
    std::memcpy(header + 4, &t, 4);
    std::memcpy(header + 8, &n, 8);
    std::memcpy(header + 16, &crc, 4);
    const uint32_t header_crc = Crc32c(header, kBlockHeaderBytes - 4);
    std::memcpy(header + kBlockHeaderBytes - 4, &header_crc, 4);
    const int64_t at = flushed_ + static_cast<int64_t>(start_);
    bytes_ += kBlockHeaderBytes + static_cast<int64_t>(n);
    if (buffer_.size() >= (size_t{8} << 20)) KVC_RETURN_IF_ERROR(Flush());
    return at;
  }
  absl::StatusOr<int64_t> Add(BlockType type, const std::string& payload) {
    Begin();
    buffer_ += payload;
    return End(type);
  }
  absl::Status Flush() {
    KVC_RETURN_IF_ERROR(file_->WriteAt(flushed_, buffer_.data(), buffer_.size()));
    flushed_ += static_cast<int64_t>(buffer_.size());
    buffer_.clear();
    return absl::OkStatus();
  }
  int64_t offset() const { return flushed_ + static_cast<int64_t>(buffer_.size()); }
  int64_t bytes() const { return bytes_; }

 private:
  File* file_;
  int64_t flushed_;  // file offset of buffer_[0]
  int64_t bytes_ = 0;
  size_t start_ = 0;
  std::string buffer_;
};

// The offsets of the blocks the last commit refers to (model, state, rows),
// sorted, plus the commit itself.
std::vector<int64_t> ReferencedBlocks(const OpenedSnapshot& s);

struct BlockScan {
  int64_t blocks = 0;
  int64_t live_bytes = kFileHeaderBytes;  // header + referenced blocks
};

// Walks every block header of the committed bytes (they must tile them
// exactly, and every referenced offset must start a block). With
// `check_superseded`, also verifies the payload checksum of every block the
// last commit no longer refers to: together with the referenced blocks,
// which a restore reads and checks as it loads them, every byte of the
// file is then checked exactly once.
absl::StatusOr<BlockScan> ScanBlocks(const OpenedSnapshot& s, bool check_superseded);

// Everything a restore checks in the file apart from the model: ScanBlocks
// with the superseded blocks' checksums, then every referenced state and
// rows block read and checked (ReadState, ReadRows). What VerifySnapshot
// and an incremental save (before it builds on the file) run.
absl::StatusOr<BlockScan> VerifyBlocks(const OpenedSnapshot& s);

// --- The cache side, for tests ---------------------------------------------------

// SaveSnapshot making its file-system calls through `fs` (defined in
// snapshot.cc): how tests make a write, a flush or the directory sync fail.
absl::StatusOr<SaveStats> SaveSnapshotUsing(FileSystem& fs, const Cache& cache,
                                            absl::Span<const SequenceId> sequences, const std::string& path,
                                            const SaveOptions& options);

}  // namespace kvc::snapshot_format

#endif  // KVC_SRC_SNAPSHOT_FORMAT_H_
