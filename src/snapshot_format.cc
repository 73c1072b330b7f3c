#include "src/snapshot_format.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "src/crc32c.h"
#include "src/status.h"

namespace kvc::snapshot_format {
namespace {

constexpr int64_t kKvRowBytes = FormatInfo(RowFormat::kKvFp8).row_bytes;

bool AllFinite(const uint8_t* bytes, int64_t floats) {
  for (int64_t i = 0; i < floats; ++i) {
    float v;
    std::memcpy(&v, bytes + i * 4, 4);
    if (!std::isfinite(v)) return false;
  }
  return true;
}

}  // namespace

// Whether stored rows are ones kvc could have written: no NaN codes or
// scales, finite bf16 RoPE dims, zero padding (a file with a valid checksum
// but crafted rows must not feed NaN to attention).
int64_t FirstInvalidKvRow(const uint8_t* rows, int64_t n) {
  // The kernel's NoPE bound (kMaxKvNopeBf16Bits) keeps every block scale at
  // or below 2^120 (byte 247), and at 2^120 every code below 256 (E4M3
  // 0x78): 256 x 2^120 = 2^128 would read back as infinity.
  constexpr uint8_t kLargestScaleByte = 127 + 120;
  constexpr uint8_t kCode256 = 0x78;  // E4M3 exponent 15, mantissa 0
  for (int64_t r = 0; r < n; ++r, rows += kKvRowBytes) {
    const auto* row = reinterpret_cast<const KvRowFp8*>(rows);
    unsigned bad = 0;
    for (int block = 0; block < kNopeDim / kFp8BlockSize; ++block) {
      // The largest code magnitude of the block (a plain max loop the
      // compiler vectorizes); 0x7F, the largest, is NaN.
      uint8_t magnitude = 0;
      for (int i = 0; i < kFp8BlockSize; ++i) {
        magnitude = std::max<uint8_t>(magnitude, row->nope_codes[block * kFp8BlockSize + i] & 0x7Fu);
      }
      const uint8_t scale = row->scales[block];
      bad |= magnitude == 0x7Fu || scale > kLargestScaleByte || (scale == kLargestScaleByte && magnitude >= kCode256);
    }
    for (int j = 0; j < kRopeDim; ++j) bad |= (row->rope_bf16[2 * j + 1] & 0x7Fu) == 0x7Fu && (row->rope_bf16[2 * j] & 0x80u) != 0;
    bad |= row->padding != 0;
    if (bad != 0) return r;
  }
  return -1;
}

int64_t FirstInvalidKey(const uint8_t* keys, int64_t n) {
  // QuantizeIndexKeys takes values up to 2^120; the largest Hadamard output
  // (128 x 2^120 / sqrt(128)) gets the block scale 2^121 (byte 248). A larger
  // scale (NaN at 255 included) is no key kvc could have written.
  constexpr uint8_t kLargestKeyScaleByte = 127 + 121;
  for (int64_t r = 0; r < n; ++r, keys += sizeof(IndexKeyFp4)) {
    for (const uint8_t s : reinterpret_cast<const IndexKeyFp4*>(keys)->scales) {
      if (s > kLargestKeyScaleByte) return r;
    }
  }
  return -1;
}

const char* BlockTypeName(BlockType type) {
  switch (type) {
    case BlockType::kModel: return "model";
    case BlockType::kRows: return "rows";
    case BlockType::kState: return "state";
    case BlockType::kCommit: return "commit";
  }
  return "?";
}

namespace {
// The payload IoError attaches: errno, as decimal text.
constexpr char kErrnoPayload[] = "kvc/errno";
}  // namespace

int FileSystem::Rename(const char* from, const char* to) { return std::rename(from, to); }

FileSystem& FileSystem::Real() {
  static FileSystem real;
  return real;
}

absl::Status IoError(const std::string& what, const std::string& path) {
  // Not absl::ErrnoToStatus: its lazily built message table is a data race
  // under ThreadSanitizer with Debian's uninstrumented abseil. strerror_r
  // (GNU: returns the message) has no shared state.
  const int error = errno != 0 ? errno : EIO;
  char buffer[128];
  const char* text = strerror_r(error, buffer, sizeof(buffer));
  absl::Status status(absl::ErrnoToStatusCode(error), absl::StrCat(what, " ", path, ": ", text));
  status.SetPayload(kErrnoPayload, absl::Cord(absl::StrCat(error)));
  return status;
}

absl::Status WithContext(const absl::Status& status, const std::string& context) {
  absl::Status out(status.code(), absl::StrCat(status.message(), context));
  status.ForEachPayload([&](absl::string_view url, const absl::Cord& payload) { out.SetPayload(url, payload); });
  return out;
}

absl::StatusOr<File> File::CreateUnique(const std::string& prefix, mode_t mode, bool exact_mode, FileSystem& fs) {
  for (int attempt = 0;; ++attempt) {
    const std::string path = absl::StrCat(prefix, absl::Hex(NewTag(), absl::kZeroPad16));
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0 && errno == EEXIST && attempt < 16) continue;  // taken (or a planted link): draw again
    if (fd < 0) return IoError("cannot create", path);
    File file(fd, path, fs);
    if (exact_mode && ::fchmod(fd, mode) != 0) {
      absl::Status status = IoError("cannot set the mode of", path);
      ::unlink(path.c_str());
      return status;
    }
    return file;
  }
}

std::string DirectoryOf(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

std::string ResolveSymlink(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) return path;
  char* resolved = ::realpath(path.c_str(), nullptr);  // fails for a dangling link
  if (resolved == nullptr) return path;
  std::string out(resolved);
  std::free(resolved);
  return out;
}

absl::Status NotRegularFileError(const std::string& path, mode_t mode) {
  const char* type = S_ISDIR(mode)    ? "a directory"
                     : S_ISFIFO(mode) ? "a FIFO"
                     : S_ISCHR(mode)  ? "a character device"
                     : S_ISBLK(mode)  ? "a block device"
                     : S_ISSOCK(mode) ? "a socket"
                                      : "not a regular file";
  const int error = S_ISDIR(mode) ? EISDIR : EINVAL;
  absl::Status status(absl::ErrnoToStatusCode(error),
                      absl::StrCat(path, " is ", type, ", not a regular file: a snapshot is read from and saved to "
                                   "regular files only"));
  status.SetPayload(kErrnoPayload, absl::Cord(absl::StrCat(error)));
  return status;
}

absl::StatusOr<File> File::OpenRegular(const std::string& path, int flags, FileSystem& fs) {
  KVC_ASSIGN_OR_RETURN(File f, Open(path, flags | O_NONBLOCK, fs));
  struct stat st;
  if (::fstat(f.fd_, &st) != 0) return IoError("cannot stat", path);
  if (!S_ISREG(st.st_mode)) return NotRegularFileError(path, st.st_mode);
  const int status_flags = ::fcntl(f.fd_, F_GETFL);
  if (status_flags < 0 || ::fcntl(f.fd_, F_SETFL, status_flags & ~O_NONBLOCK) != 0) {
    return IoError("cannot clear O_NONBLOCK on", path);
  }
  return f;
}

absl::StatusOr<File> File::CreateReplacementFor(const std::string& target, mode_t mode, bool exact_mode,
                                                FileSystem& fs) {
  const std::string dir = DirectoryOf(target);
  const int fd = fs.OpenUnnamed(dir.c_str(), O_RDWR | O_CLOEXEC, mode);
  if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    return CreateUnique(target + ".tmp-", mode, exact_mode, fs);  // no O_TMPFILE here
  }
  if (fd < 0) return IoError("cannot create a new file in", dir);
  File file(fd, absl::StrCat("the new file for ", target), fs, /*named=*/false);
  if (exact_mode && ::fchmod(fd, mode) != 0) return IoError("cannot set the mode of", file.path_);
  return file;
}

absl::Status File::Replace(const std::string& target) {
  for (int attempt = 0; !named_; ++attempt) {
    const std::string name = absl::StrCat(target, ".tmp-", absl::Hex(NewTag(), absl::kZeroPad16));
    const std::string self = absl::StrCat("/proc/self/fd/", fd_);
    int linked = ::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, name.c_str(), AT_SYMLINK_FOLLOW);
    if (linked != 0 && errno != EEXIST) {  // no /proc: AT_EMPTY_PATH (needs CAP_DAC_READ_SEARCH)
      linked = ::linkat(fd_, "", AT_FDCWD, name.c_str(), AT_EMPTY_PATH);
    }
    if (linked != 0 && errno == EEXIST && attempt < 16) continue;  // taken (or a planted link): draw again
    if (linked != 0) return IoError("cannot give a name to", path_ + " as " + name);
    path_ = name;
    named_ = true;
  }
  if (fs_->Rename(path_.c_str(), target.c_str()) != 0) return IoError("cannot rename onto", target);
  return absl::OkStatus();
}

absl::Status File::Discard() {
  if (named_ && ::unlink(path_.c_str()) != 0) return IoError("cannot remove", path_);
  return absl::OkStatus();
}

absl::StatusOr<SaveTarget> ResolveSaveTarget(const std::string& path) {
  SaveTarget target;
  target.path = ResolveSymlink(path);
  struct stat st;
  if (::stat(target.path.c_str(), &st) != 0) {
    if (errno == ENOENT) return target;  // nothing there yet (or a dangling link, replaced)
    return IoError("cannot stat", target.path);
  }
  if (!S_ISREG(st.st_mode)) return NotRegularFileError(target.path, st.st_mode);
  target.exists = true;
  target.mode = st.st_mode;
  return target;
}

absl::Status SyncDirectoryOf(const std::string& path, FileSystem& fs) {
  KVC_ASSIGN_OR_RETURN(File d, File::Open(DirectoryOf(path), O_RDONLY | O_DIRECTORY, fs));
  return d.Sync();
}

std::array<uint8_t, kFileHeaderBytes> EncodeHeader(const FileHeader& h) {
  std::array<uint8_t, kFileHeaderBytes> out{};
  Encoder e;
  e.PutBytes(kFileMagic, 8);
  e.Put<uint32_t>(h.version);
  e.Put<uint32_t>(static_cast<uint32_t>(kFileHeaderBytes));
  e.Put<uint64_t>(h.file_tag);
  e.Put<int64_t>(h.committed);
  e.Put<int64_t>(h.saves);
  e.Put<int64_t>(h.last_commit);
  std::memcpy(out.data(), e.bytes().data(), e.bytes().size());
  const uint32_t crc = Crc32c(out.data(), kFileHeaderBytes - 4);
  std::memcpy(out.data() + kFileHeaderBytes - 4, &crc, 4);
  return out;
}

absl::StatusOr<FileHeader> DecodeHeader(const uint8_t* bytes, const std::string& path) {
  if (std::memcmp(bytes, kFileMagic, 8) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a kvc snapshot (no KVCSNAP magic)"));
  }
  uint32_t stored_crc;
  std::memcpy(&stored_crc, bytes + kFileHeaderBytes - 4, 4);
  if (Crc32c(bytes, kFileHeaderBytes - 4) != stored_crc) {
    return absl::DataLossError(absl::StrCat(path, ": file header is damaged (checksum mismatch)"));
  }
  Decoder d(bytes + 8, kFileHeaderBytes - 12);
  FileHeader h;
  uint32_t header_bytes = 0;
  d.Get(&h.version);
  d.Get(&header_bytes);
  d.Get(&h.file_tag);
  d.Get(&h.committed);
  d.Get(&h.saves);
  d.Get(&h.last_commit);
  if (h.version != kSnapshotFormatVersion) {
    return absl::InvalidArgumentError(absl::StrCat(path, " has snapshot format version ", h.version,
                                                   "; this build of kvc reads version ", kSnapshotFormatVersion));
  }
  // Numbers from the file: no arithmetic on them may overflow.
  if (header_bytes != kFileHeaderBytes || h.saves < 1 || h.last_commit < kFileHeaderBytes ||
      h.last_commit > std::numeric_limits<int64_t>::max() - kBlockHeaderBytes ||
      h.committed < h.last_commit + kBlockHeaderBytes) {
    return absl::DataLossError(absl::StrCat(path, ": file header is inconsistent (committed ", h.committed,
                                            ", last commit at ", h.last_commit, ", saves ", h.saves, ")"));
  }
  return h;
}

absl::StatusOr<BlockHeader> ReadBlockHeader(const File& f, int64_t offset, int64_t limit, const BlockType* want) {
  const std::string where = absl::StrCat(f.path(), ": block at offset ", offset);
  if (offset < kFileHeaderBytes || offset > limit - kBlockHeaderBytes) {
    return absl::DataLossError(absl::StrCat(where, " lies outside the committed part of the file"));
  }
  uint8_t raw[kBlockHeaderBytes];
  KVC_RETURN_IF_ERROR(f.ReadAt(offset, raw, sizeof(raw)));
  uint32_t magic, type, header_crc;
  BlockHeader h;
  std::memcpy(&magic, raw, 4);
  std::memcpy(&type, raw + 4, 4);
  std::memcpy(&h.payload_bytes, raw + 8, 8);
  std::memcpy(&h.payload_crc, raw + 16, 4);
  std::memcpy(&header_crc, raw + kBlockHeaderBytes - 4, 4);
  if (magic != kBlockMagic || Crc32c(raw, kBlockHeaderBytes - 4) != header_crc) {
    return absl::DataLossError(absl::StrCat(where, " is damaged (block header checksum mismatch)"));
  }
  if (type < 1 || type > 4) return absl::DataLossError(absl::StrCat(where, " has unknown type ", type));
  h.type = static_cast<BlockType>(type);
  if (want != nullptr && h.type != *want) {
    return absl::DataLossError(absl::StrCat(where, " is a ", BlockTypeName(h.type), " block; expected a ",
                                            BlockTypeName(*want), " block"));
  }
  if (h.payload_bytes > static_cast<uint64_t>(limit - offset - kBlockHeaderBytes)) {
    return absl::DataLossError(absl::StrCat(where, " (", BlockTypeName(h.type), ", ", h.payload_bytes,
                                            " bytes) runs past the committed end of the file, ", limit));
  }
  return h;
}

absl::Status ReadBlockInto(const File& f, int64_t offset, int64_t limit, BlockType want, std::vector<uint8_t>* payload) {
  KVC_ASSIGN_OR_RETURN(const BlockHeader h, ReadBlockHeader(f, offset, limit, &want));
  payload->resize(static_cast<size_t>(h.payload_bytes));
  KVC_RETURN_IF_ERROR(f.ReadAt(offset + kBlockHeaderBytes, payload->data(), payload->size()));
  if (Crc32c(payload->data(), payload->size()) != h.payload_crc) {
    return absl::DataLossError(absl::StrCat(f.path(), ": ", BlockTypeName(want), " block at offset ", offset,
                                            " is damaged (payload checksum mismatch)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> ReadBlock(const File& f, int64_t offset, int64_t limit, BlockType want) {
  std::vector<uint8_t> payload;
  KVC_RETURN_IF_ERROR(ReadBlockInto(f, offset, limit, want, &payload));
  return payload;
}

absl::StatusOr<ModelDescription> DecodeModel(const std::vector<uint8_t>& payload, const std::string& path) {
  Decoder d(payload.data(), payload.size());
  ModelDescription m;
  uint32_t n = 0;
  bool ok = d.GetString(&m.name) && d.Get(&n) && n <= 100000;
  for (uint32_t i = 0; ok && i < n; ++i) {
    std::pair<std::string, std::string> field;
    ok = d.GetString(&field.first) && d.GetString(&field.second);
    m.fields.push_back(std::move(field));
  }
  if (!ok || d.remaining() != 0) return absl::DataLossError(absl::StrCat(path, ": model block is malformed"));
  return m;
}

namespace {

// The value a model field has when a description leaves it out (fields added
// after version 1 files were written), or null: the field is required.
const char* FieldDefault(const std::string& key) { return key == "draft_slots" ? "0" : nullptr; }

}  // namespace

absl::Status CheckSameModel(const ModelDescription& file, const ModelDescription& cache, const std::string& path) {
  for (const auto& [key, value] : cache.fields) {
    const std::string* saved = file.Find(key);
    const char* fallback = FieldDefault(key);
    const std::string saved_value = saved != nullptr ? *saved : fallback != nullptr ? fallback : "";
    if ((saved == nullptr && fallback == nullptr) || saved_value != value) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, " was saved for another model (\"", file.name, "\"): ", key, " is ",
          saved == nullptr && fallback == nullptr ? "missing" : absl::StrCat("\"", saved_value, "\""),
          " in the snapshot but \"", value, "\" in this cache"));
    }
  }
  // Fields with a default that only the file has (a cache at the default
  // leaves them out).
  for (const auto& [key, value] : file.fields) {
    const char* fallback = FieldDefault(key);
    if (fallback != nullptr && cache.Find(key) == nullptr && value != fallback) {
      return absl::FailedPreconditionError(absl::StrCat(path, " was saved for another model (\"", file.name, "\"): ",
                                                        key, " is \"", value, "\" in the snapshot but \"", fallback,
                                                        "\" in this cache"));
    }
  }
  if (file.fields.size() != cache.fields.size()) {
    return absl::FailedPreconditionError(absl::StrCat(path, " was saved for another model: it describes ",
                                                      file.fields.size(), " fields, this cache ", cache.fields.size()));
  }
  return absl::OkStatus();
}

absl::StatusOr<Geometry> GeometryOf(const ModelDescription& m, const std::string& path) {
  Geometry g;
  auto number = [&](const char* key, int64_t lo, int64_t hi, int64_t* out) -> absl::Status {
    const std::string* v = m.Find(key);
    if (v == nullptr || !absl::SimpleAtoi(*v, out) || *out < lo || *out > hi) {
      return absl::DataLossError(absl::StrCat(path, ": model block has no valid ", key));
    }
    return absl::OkStatus();
  };
  KVC_RETURN_IF_ERROR(number("window", 1, 1 << 20, &g.window));
  KVC_RETURN_IF_ERROR(number("rollback_depth", 0, g.window, &g.depth));
  int64_t draft_slots = 0;  // absent: 0 (CheckSameModel's default)
  if (m.Find("draft_slots") != nullptr) KVC_RETURN_IF_ERROR(number("draft_slots", 0, kMaxDraftSlots, &draft_slots));
  g.ring_slots = g.window + draft_slots;
  KVC_RETURN_IF_ERROR(number("head_dim", kHeadDim, kHeadDim, &g.head_dim));
  KVC_RETURN_IF_ERROR(number("index_dim", kIndexDim, kIndexDim, &g.index_dim));
  KVC_RETURN_IF_ERROR(number("max_context", 1, int64_t{1} << 40, &g.max_context));
  const std::string* kinds = m.Find("layer_kinds");
  if (kinds == nullptr || kinds->empty() || kinds->size() > 4096) {
    return absl::DataLossError(absl::StrCat(path, ": model block has no valid layer_kinds"));
  }
  for (size_t i = 0; i < kinds->size(); ++i) {
    const char c = (*kinds)[i];
    if (c != 'W' && c != 'C' && c != 'H') return absl::DataLossError(absl::StrCat(path, ": bad layer kind '", std::string(1, c), "'"));
    g.kinds.push_back(c == 'C' ? LayerKind::kCsa : c == 'H' ? LayerKind::kHca : LayerKind::kWindow);
    const std::string* params = m.Find(absl::StrCat("layer ", i, " compressor"));
    if (params == nullptr) return absl::DataLossError(absl::StrCat(path, ": model block lacks layer ", i));
    g.compresses.push_back(c != 'W' && *params != "none");
  }
  return g;
}

std::string EncodeCommit(const Commit& c) {
  Encoder e;
  e.Put<int64_t>(c.model_offset);
  e.Put<uint32_t>(static_cast<uint32_t>(c.sequences.size()));
  for (const SequenceEntry& s : c.sequences) {
    e.Put<uint64_t>(s.tag);
    e.Put<int64_t>(s.saved_id);
    e.Put<uint32_t>(static_cast<uint32_t>(s.layers.size()));
    for (const LayerEntry& l : s.layers) {
      e.Put<int64_t>(l.state_offset);
      e.Put<int64_t>(l.length);
      e.Put<int64_t>(l.floor);
      for (const StreamEntry& st : l.streams) {
        e.Put<int64_t>(st.rows);
        e.Put<uint32_t>(static_cast<uint32_t>(st.extents.size()));
        for (const Extent& x : st.extents) {
          e.Put<int64_t>(x.offset);
          e.Put<uint32_t>(x.rows);
        }
      }
    }
  }
  return std::move(e.bytes());
}

absl::StatusOr<Commit> DecodeCommit(const std::vector<uint8_t>& payload, const Geometry& g, int64_t commit_offset,
                                    const std::string& path) {
  const auto bad = [&](const std::string& what) {
    return absl::DataLossError(absl::StrCat(path, ": commit block is malformed: ", what));
  };
  Decoder d(payload.data(), payload.size());
  Commit c;
  uint32_t sequences = 0;
  if (!d.Get(&c.model_offset) || !d.Get(&sequences)) return bad("truncated");
  // Each sequence needs at least 28 + layers * 64 bytes: bounds the count.
  if (sequences > payload.size() / 28) return bad("sequence count");
  const size_t n_layers = g.kinds.size();
  for (uint32_t s = 0; s < sequences; ++s) {
    SequenceEntry entry;
    uint32_t layers = 0;
    if (!d.Get(&entry.tag) || !d.Get(&entry.saved_id) || !d.Get(&layers)) return bad("truncated");
    if (layers != n_layers) return bad(absl::StrCat("sequence ", s, " has ", layers, " layers, the model ", n_layers));
    entry.layers.resize(n_layers);
    for (size_t i = 0; i < n_layers; ++i) {
      LayerEntry& l = entry.layers[i];
      if (!d.Get(&l.state_offset) || !d.Get(&l.length) || !d.Get(&l.floor)) return bad("truncated");
      if (l.state_offset < kFileHeaderBytes || l.state_offset >= commit_offset) return bad("state offset");
      if (l.length < 0 || l.length > g.max_context || l.floor < std::max<int64_t>(0, l.length - g.depth) ||
          l.floor > l.length) {
        return bad(absl::StrCat("layer ", i, " length ", l.length, " / floor ", l.floor));
      }
      for (int st = 0; st < kStreams; ++st) {
        StreamEntry& stream = l.streams[st];
        uint32_t extents = 0;
        if (!d.Get(&stream.rows) || !d.Get(&extents)) return bad("truncated");
        const bool has = st == 0 ? g.kinds[i] != LayerKind::kWindow : g.kinds[i] == LayerKind::kCsa;
        const int64_t most = has ? l.length / CompressRatio(g.kinds[i]) : 0;  // closed windows
        const bool exact = g.compresses[i];  // kvc keeps exactly the closed windows' entries
        if (stream.rows < 0 || stream.rows > most || (exact && stream.rows != most)) {
          return bad(absl::StrCat("layer ", i, " holds ", stream.rows, " ", kStreamName[st], " at length ", l.length));
        }
        if (extents > d.remaining() / 12) return bad("extent count");
        int64_t sum = 0;
        for (uint32_t x = 0; x < extents; ++x) {
          Extent e;
          if (!d.Get(&e.offset) || !d.Get(&e.rows)) return bad("truncated");
          if (e.offset < kFileHeaderBytes || e.offset >= commit_offset || e.rows == 0) return bad("extent");
          sum += e.rows;  // at most stream.rows + 2^32 (checked each time): no overflow
          if (sum > stream.rows) break;
          stream.extents.push_back(e);
        }
        if (sum != stream.rows) return bad(absl::StrCat("layer ", i, " ", kStreamName[st], " extents hold ", sum,
                                                        " rows, not ", stream.rows));
      }
    }
    c.sequences.push_back(std::move(entry));
  }
  if (d.remaining() != 0) return bad("trailing bytes");
  if (c.model_offset < kFileHeaderBytes || c.model_offset >= commit_offset) return bad("model offset");
  return c;
}

absl::StatusOr<OpenedSnapshot> OpenSnapshot(const std::string& path, int flags, FileSystem& fs) {
  OpenedSnapshot s;
  KVC_ASSIGN_OR_RETURN(File f, File::OpenRegular(path, flags, fs));
  s.file = std::make_unique<File>(std::move(f));
  KVC_ASSIGN_OR_RETURN(s.file_bytes, s.file->Size());
  if (s.file_bytes < kFileHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a kvc snapshot: ", s.file_bytes,
                                                   " bytes, shorter than the 64-byte header"));
  }
  uint8_t raw[kFileHeaderBytes];
  KVC_RETURN_IF_ERROR(s.file->ReadAt(0, raw, sizeof(raw)));
  KVC_ASSIGN_OR_RETURN(s.header, DecodeHeader(raw, path));
  if (s.file_bytes < s.header.committed) {
    return absl::DataLossError(absl::StrCat(path, " is truncated: its header commits ", s.header.committed,
                                            " bytes but the file holds ", s.file_bytes));
  }
  const int64_t end = s.header.committed;
  KVC_ASSIGN_OR_RETURN(const BlockHeader ch, ReadBlockHeader(*s.file, s.header.last_commit, end, nullptr));
  if (ch.type != BlockType::kCommit ||
      s.header.last_commit + kBlockHeaderBytes + static_cast<int64_t>(ch.payload_bytes) != end) {
    return absl::DataLossError(absl::StrCat(path, ": the header's last commit (offset ", s.header.last_commit,
                                            ") is not a commit block ending the committed data"));
  }
  KVC_ASSIGN_OR_RETURN(const std::vector<uint8_t> commit, ReadBlock(*s.file, s.header.last_commit, end, BlockType::kCommit));
  int64_t model_offset = 0;
  if (commit.size() < sizeof(model_offset)) return absl::DataLossError(absl::StrCat(path, ": commit block is malformed"));
  std::memcpy(&model_offset, commit.data(), sizeof(model_offset));
  KVC_ASSIGN_OR_RETURN(const std::vector<uint8_t> model, ReadBlock(*s.file, model_offset, s.header.last_commit, BlockType::kModel));
  KVC_ASSIGN_OR_RETURN(s.model, DecodeModel(model, path));
  KVC_ASSIGN_OR_RETURN(s.geometry, GeometryOf(s.model, path));
  KVC_ASSIGN_OR_RETURN(s.commit, DecodeCommit(commit, s.geometry, s.header.last_commit, path));
  return s;
}

std::string EncodeRowsPreamble(uint32_t layer, int stream, int64_t first, uint32_t count) {
  Encoder e;
  e.Put<uint32_t>(layer);
  e.Put<uint8_t>(static_cast<uint8_t>(stream));
  e.Put<int64_t>(first);
  e.Put<uint32_t>(count);
  return std::move(e.bytes());
}

absl::StatusOr<RowsBlock> ReadRows(const File& f, int64_t offset, int64_t limit, size_t layer, int stream,
                                   int64_t first, uint32_t rows, std::vector<uint8_t>* buffer) {
  RowsBlock b;
  KVC_RETURN_IF_ERROR(ReadBlockInto(f, offset, limit, BlockType::kRows, buffer));
  Decoder d(buffer->data(), buffer->size());
  uint32_t block_layer = 0;
  uint8_t block_stream = 0;
  d.Get(&block_layer);
  d.Get(&block_stream);
  d.Get(&b.first);
  d.Get(&b.count);
  const int64_t row_bytes = FormatInfo(kStreamFormat[stream]).row_bytes;
  const std::string where = absl::StrCat(f.path(), ": rows block at offset ", offset);
  if (!d.ok() || block_layer != layer || block_stream != stream || b.first != first ||
      b.count < rows || d.remaining() != b.count * static_cast<uint64_t>(row_bytes)) {
    return absl::DataLossError(absl::StrCat(where, " does not hold ", kStreamName[stream], " ", first, "..",
                                            first + rows, " of layer ", layer));
  }
  b.rows = d.Bytes(static_cast<uint64_t>(b.count) * static_cast<uint64_t>(row_bytes));
  if (!(stream == 0 ? FirstInvalidKvRow(b.rows, rows) < 0 : FirstInvalidKey(b.rows, rows) < 0)) {
    return absl::DataLossError(absl::StrCat(where, " holds rows kvc cannot have written (NaN codes, non-finite values or padding)"));
  }
  return b;
}

absl::StatusOr<StateBlock> ReadState(const File& f, int64_t offset, int64_t limit, const Geometry& g, size_t layer,
                                     int64_t length, int64_t floor, std::vector<uint8_t>* buffer) {
  StateBlock b;
  KVC_RETURN_IF_ERROR(ReadBlockInto(f, offset, limit, BlockType::kState, buffer));
  const std::string where = absl::StrCat(f.path(), ": state block at offset ", offset, " (layer ", layer, ")");
  Decoder d(buffer->data(), buffer->size());
  uint32_t block_layer = 0;
  int64_t block_length = -1, block_floor = -1;
  d.Get(&block_layer);
  d.Get(&block_length);
  d.Get(&block_floor);
  if (block_layer != layer || block_length != length || block_floor != floor) {
    return absl::DataLossError(absl::StrCat(where, " is for layer ", block_layer, " at length ", block_length,
                                            "; the commit expects layer ", layer, " at ", length));
  }
  const int64_t main_floats = g.MainStateFloats(layer), indexer_floats = g.IndexerStateFloats(layer);
  b.ring = d.Bytes(static_cast<uint64_t>(g.ring_slots * kKvRowBytes));
  b.rollback = d.Bytes(static_cast<uint64_t>(g.depth * kKvRowBytes));
  b.evictors = d.Bytes(static_cast<uint64_t>(g.depth * 8));
  b.main_state = d.Bytes(static_cast<uint64_t>(main_floats * 4));
  b.indexer_state = d.Bytes(static_cast<uint64_t>(indexer_floats * 4));
  if (!d.ok() || d.remaining() != 0) {
    return absl::DataLossError(absl::StrCat(where, " has ", buffer->size(), " bytes, not the layer's state size"));
  }
  if (FirstInvalidKvRow(b.ring, g.ring_slots) >= 0 || FirstInvalidKvRow(b.rollback, g.depth) >= 0) {
    return absl::DataLossError(absl::StrCat(where, " holds window rows kvc cannot have written (NaN codes, non-finite values or padding)"));
  }
  // Rollback records: slot q mod D holds the record of position q (or -1);
  // every position in [floor, length) must have its record.
  for (int64_t slot = 0; slot < g.depth; ++slot) {
    int64_t q;
    std::memcpy(&q, b.evictors + slot * 8, 8);
    if (q != -1 && (q < length - g.depth || q >= length || q % g.depth != slot)) {
      return absl::DataLossError(absl::StrCat(where, ": rollback record ", slot, " names position ", q));
    }
  }
  for (int64_t q = floor; q < length; ++q) {
    int64_t recorded;
    std::memcpy(&recorded, b.evictors + (q % g.depth) * 8, 8);
    if (recorded != q) {
      return absl::DataLossError(absl::StrCat(where, ": the rollback record of position ", q, " is missing"));
    }
  }
  if (!AllFinite(b.main_state, main_floats) || !AllFinite(b.indexer_state, indexer_floats)) {
    return absl::DataLossError(absl::StrCat(where, ": compressor state holds non-finite values"));
  }
  return b;
}

uint64_t NewTag() {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> lock(mu);
  uint64_t tag = 0;
  while (tag == 0) tag = rng();
  return tag;
}

std::vector<int64_t> ReferencedBlocks(const OpenedSnapshot& s) {
  std::vector<int64_t> offsets = {s.commit.model_offset, s.header.last_commit};
  for (const SequenceEntry& e : s.commit.sequences) {
    for (const LayerEntry& l : e.layers) {
      offsets.push_back(l.state_offset);
      for (const StreamEntry& st : l.streams) {
        for (const Extent& x : st.extents) offsets.push_back(x.offset);
      }
    }
  }
  std::sort(offsets.begin(), offsets.end());
  offsets.erase(std::unique(offsets.begin(), offsets.end()), offsets.end());
  return offsets;
}

absl::StatusOr<BlockScan> ScanBlocks(const OpenedSnapshot& s, bool check_superseded) {
  const std::vector<int64_t> referenced = ReferencedBlocks(s);
  const int64_t end = s.header.committed;
  BlockScan scan;
  std::vector<uint8_t> buffer;
  size_t next_ref = 0;
  for (int64_t at = kFileHeaderBytes; at < end;) {
    KVC_ASSIGN_OR_RETURN(const BlockHeader h, ReadBlockHeader(*s.file, at, end, nullptr));
    const int64_t bytes = kBlockHeaderBytes + static_cast<int64_t>(h.payload_bytes);
    const bool live = next_ref < referenced.size() && referenced[next_ref] == at;
    if (live) {
      ++next_ref;
      scan.live_bytes += bytes;
    } else if (check_superseded) {
      KVC_RETURN_IF_ERROR(ReadBlockInto(*s.file, at, end, h.type, &buffer));
    }
    ++scan.blocks;
    at += bytes;
  }
  if (next_ref != referenced.size()) {
    return absl::DataLossError(absl::StrCat(s.file->path(), ": the last commit refers to offset ",
                                            referenced[next_ref], ", where no block starts"));
  }
  return scan;
}

absl::StatusOr<BlockScan> VerifyBlocks(const OpenedSnapshot& s) {
  KVC_ASSIGN_OR_RETURN(const BlockScan scan, ScanBlocks(s, /*check_superseded=*/true));
  std::vector<uint8_t> buffer;
  const int64_t limit = s.header.last_commit;
  for (const SequenceEntry& e : s.commit.sequences) {
    for (size_t i = 0; i < e.layers.size(); ++i) {
      const LayerEntry& l = e.layers[i];
      KVC_RETURN_IF_ERROR(ReadState(*s.file, l.state_offset, limit, s.geometry, i, l.length, l.floor, &buffer).status());
      for (int st = 0; st < kStreams; ++st) {
        int64_t r = 0;
        for (const Extent& x : l.streams[st].extents) {
          KVC_RETURN_IF_ERROR(ReadRows(*s.file, x.offset, limit, i, st, r, x.rows, &buffer).status());
          r += x.rows;
        }
      }
    }
  }
  return scan;
}

}  // namespace kvc::snapshot_format

namespace kvc {

int FileSystemErrno(const absl::Status& status) {
  const absl::optional<absl::Cord> payload = status.GetPayload(snapshot_format::kErrnoPayload);
  int error = 0;
  if (!payload.has_value() || !absl::SimpleAtoi(std::string(*payload), &error)) return 0;
  return error;
}

}  // namespace kvc
