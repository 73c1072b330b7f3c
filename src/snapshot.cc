// Snapshot files (kvc/snapshot.h; format: docs/reliability.md).
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
#include "kvc/snapshot.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvc/compressor.h"
#include "kvc/crc32c.h"
#include "kvc/status.h"
#include "src/cache_internal.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "snapshots are little-endian and written natively");

namespace kvc {

// The friend of Cache through which snapshots reach its private state.
class SnapshotAccess {
 public:
  using Impl = Cache::Impl;
  static Impl& Of(const Cache& cache) { return *cache.impl_; }
};

namespace {

using Impl = SnapshotAccess::Impl;

// --- Layout constants --------------------------------------------------------

constexpr char kFileMagic[8] = {'K', 'V', 'C', 'S', 'N', 'A', 'P', '\n'};
constexpr int64_t kFileHeaderBytes = 64;
constexpr uint32_t kBlockMagic = 0x4B4C4253u;  // "SBLK"
constexpr int64_t kBlockHeaderBytes = 32;

enum class BlockType : uint32_t { kModel = 1, kRows = 2, kState = 3, kCommit = 4 };
const char* BlockTypeName(BlockType type) {
  switch (type) {
    case BlockType::kModel: return "model";
    case BlockType::kRows: return "rows";
    case BlockType::kState: return "state";
    case BlockType::kCommit: return "commit";
  }
  return "?";
}

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

absl::Status IoError(const std::string& what, const std::string& path) {
  return absl::ErrnoToStatus(errno, absl::StrCat(what, " ", path));
}

// An open file descriptor with whole-buffer reads and writes.
class File {
 public:
  static absl::StatusOr<File> Open(const std::string& path, int flags) {
    const int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
    if (fd < 0) return IoError("cannot open", path);
    return File(fd, path);
  }
  File(File&& other) noexcept : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)) {}
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
      const ssize_t put = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
      if (put < 0 && errno == EINTR) continue;
      if (put < 0) return IoError("cannot write", path_);
      p += put;
      n -= static_cast<size_t>(put);
      offset += put;
    }
    return absl::OkStatus();
  }
  absl::Status Sync() {
    if (::fsync(fd_) != 0) return IoError("cannot flush", path_);
    return absl::OkStatus();
  }
  absl::Status Truncate(int64_t size) {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) return IoError("cannot truncate", path_);
    return absl::OkStatus();
  }
  const std::string& path() const { return path_; }

 private:
  File(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
};

// Flushes the directory entry of `path` (after a rename).
absl::Status SyncDirectoryOf(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  KVC_ASSIGN_OR_RETURN(File d, File::Open(dir, O_RDONLY | O_DIRECTORY));
  return d.Sync();
}

// --- File header ---------------------------------------------------------------

struct FileHeader {
  uint32_t version = kSnapshotFormatVersion;
  uint64_t file_tag = 0;      // random, drawn when the file is created
  int64_t committed = 0;      // end of the last commit block
  int64_t saves = 0;          // commits so far
  int64_t last_commit = 0;    // offset of the last commit block
};

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
  if (header_bytes != kFileHeaderBytes || h.saves < 1 || h.last_commit < kFileHeaderBytes ||
      h.committed < h.last_commit + kBlockHeaderBytes) {
    return absl::DataLossError(absl::StrCat(path, ": file header is inconsistent (committed ", h.committed,
                                            ", last commit at ", h.last_commit, ", saves ", h.saves, ")"));
  }
  return h;
}

// --- Blocks --------------------------------------------------------------------

struct BlockHeader {
  BlockType type;
  uint64_t payload_bytes;
  uint32_t payload_crc;
};

// Reads and checks the header of the block at `offset`, which must end by
// `limit` (and be of type `want`, unless null).
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

// The payload of the block at `offset` into `payload` (resized; a buffer
// reused across blocks costs no allocation), checksum verified.
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

char KindLetter(LayerKind kind) { return kind == LayerKind::kCsa ? 'C' : kind == LayerKind::kHca ? 'H' : 'W'; }

std::string RopeText(const RopeSpec& r) {
  return absl::StrFormat("theta %a yarn factor %a original %d beta_fast %a beta_slow %a table %s", r.theta,
                         r.yarn.factor, r.yarn.original_max_positions, r.yarn.beta_fast, r.yarn.beta_slow,
                         r.engine_table.empty()
                             ? std::string("kvc")
                             : absl::StrFormat("engine crc32c %08x", Crc32c(r.engine_table.data(),
                                                                           r.engine_table.size() * sizeof(float))));
}

std::string ParamsText(const CompressorParams& p) {
  if (p.ape.empty()) return "none";
  uint32_t crc = Crc32c(p.ape.data(), p.ape.size() * sizeof(float));
  crc = Crc32c(p.norm_weight.data(), p.norm_weight.size() * sizeof(float), crc);
  return absl::StrFormat("crc32c %08x", crc);
}

ModelDescription Describe(const Impl& impl) {
  const ModelSpec& s = impl.spec;
  ModelDescription m;
  m.name = s.name;
  std::string kinds;
  for (const LayerSpec& l : s.layers) kinds += KindLetter(l.kind);
  auto add = [&](const char* key, std::string value) { m.fields.emplace_back(key, std::move(value)); };
  add("layer_kinds", kinds);
  add("head_dim", absl::StrCat(s.head_dim));
  add("rope_dim", absl::StrCat(s.rope_dim));
  add("window", absl::StrCat(s.window));
  add("index_heads", absl::StrCat(s.index_heads));
  add("index_dim", absl::StrCat(s.index_dim));
  add("index_topk", absl::StrCat(s.index_topk));
  add("max_context", absl::StrCat(s.max_context));
  add("norm_eps", absl::StrFormat("%a", s.norm_eps));
  add("window_rope", RopeText(s.window_rope));
  add("compressed_rope", RopeText(s.compressed_rope));
  add("rollback_depth", absl::StrCat(impl.options.rollback_depth));
  for (size_t i = 0; i < s.layers.size(); ++i) {
    m.fields.emplace_back(absl::StrCat("layer ", i, " compressor"), ParamsText(s.layers[i].compressor));
    m.fields.emplace_back(absl::StrCat("layer ", i, " indexer"), ParamsText(s.layers[i].indexer));
  }
  return m;
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

// kFailedPrecondition naming the first field where the snapshot's model and
// the cache's differ.
absl::Status CheckSameModel(const ModelDescription& file, const ModelDescription& cache, const std::string& path) {
  for (const auto& [key, value] : cache.fields) {
    const std::string* saved = file.Find(key);
    if (saved == nullptr || *saved != value) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, " was saved for another model (\"", file.name, "\"): ", key, " is ",
          saved == nullptr ? "missing" : absl::StrCat("\"", *saved, "\""), " in the snapshot but \"", value,
          "\" in this cache"));
    }
  }
  if (file.fields.size() != cache.fields.size()) {
    return absl::FailedPreconditionError(absl::StrCat(path, " was saved for another model: it describes ",
                                                      file.fields.size(), " fields, this cache ", cache.fields.size()));
  }
  return absl::OkStatus();
}

// The shapes a snapshot's blocks must have, from its model description
// (so a file can be verified without a cache of its model).
struct Geometry {
  std::vector<LayerKind> kinds;
  std::vector<bool> compresses;  // kvc computes the layer's entries (state saved)
  int64_t window = 0, depth = 0, head_dim = 0, index_dim = 0, max_context = 0;

  int64_t MainStateFloats(size_t layer) const {
    if (!compresses[layer]) return 0;
    const CompressorGeometry g = MainCompressor(kinds[layer], static_cast<int>(head_dim));
    return (g.span() + depth) * 2 * g.width();
  }
  int64_t IndexerStateFloats(size_t layer) const {
    if (!compresses[layer] || kinds[layer] != LayerKind::kCsa) return 0;
    const CompressorGeometry g = IndexerCompressor(static_cast<int>(index_dim));
    return (g.span() + depth) * 2 * g.width();
  }
};

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

// Decodes a commit and checks its structure against the geometry: counts,
// offsets before the commit, extents summing to the row counts.
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
        const int64_t most = has ? EntriesAt(g.kinds[i], l.length) : 0;
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
          sum += e.rows;
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
absl::StatusOr<OpenedSnapshot> OpenSnapshot(const std::string& path, int flags = O_RDONLY) {
  OpenedSnapshot s;
  KVC_ASSIGN_OR_RETURN(File f, File::Open(path, flags));
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

// --- Row and state blocks ----------------------------------------------------------------

// Whether stored rows are ones kvc could have written: no NaN codes or
// scales, finite bf16 RoPE dims, zero padding (a file with a valid checksum
// but crafted rows must not feed NaN to attention).
bool KvRowsValid(const uint8_t* rows, int64_t n) {
  for (int64_t r = 0; r < n; ++r, rows += kKvRowBytes) {
    const auto* row = reinterpret_cast<const KvRowFp8*>(rows);
    unsigned bad = 0;
    for (const uint8_t code : row->nope_codes) bad |= (code & 0x7Fu) == 0x7Fu;
    for (int j = 0; j < kRopeDim; ++j) bad |= (row->rope_bf16[2 * j + 1] & 0x7Fu) == 0x7Fu && (row->rope_bf16[2 * j] & 0x80u) != 0;
    for (const uint8_t s : row->scales) bad |= s == 0xFFu;
    bad |= row->padding != 0;
    if (bad != 0) return false;
  }
  return true;
}

bool KeysValid(const uint8_t* keys, int64_t n) {
  for (int64_t r = 0; r < n; ++r, keys += sizeof(IndexKeyFp4)) {
    for (const uint8_t s : reinterpret_cast<const IndexKeyFp4*>(keys)->scales) {
      if (s == 0xFFu) return false;
    }
  }
  return true;
}

// A rows block: [first, first + count) of one layer's stream (pointing into
// the caller's buffer).
struct RowsBlock {
  const uint8_t* rows = nullptr;  // count x row_bytes, verbatim
  int64_t first = 0;
  uint32_t count = 0;
};

std::string EncodeRowsPreamble(uint32_t layer, int stream, int64_t first, uint32_t count) {
  Encoder e;
  e.Put<uint32_t>(layer);
  e.Put<uint8_t>(static_cast<uint8_t>(stream));
  e.Put<int64_t>(first);
  e.Put<uint32_t>(count);
  return std::move(e.bytes());
}

// Reads the rows block at `offset`, which must hold at least `rows` rows of
// (layer, stream) starting at row `first`, all valid.
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
  if (!(stream == 0 ? KvRowsValid(b.rows, rows) : KeysValid(b.rows, rows))) {
    return absl::DataLossError(absl::StrCat(where, " holds rows kvc cannot have written (NaN codes or scales)"));
  }
  return b;
}

// A state block: one layer's private pages, pointing into the caller's buffer.
struct StateBlock {
  const uint8_t* ring = nullptr;       // window x 584 B, slot order
  const uint8_t* rollback = nullptr;   // depth x 584 B
  const uint8_t* evictors = nullptr;   // depth x int64 (position whose append evicted the record; -1 none)
  const uint8_t* main_state = nullptr;     // MainStateFloats x fp32
  const uint8_t* indexer_state = nullptr;  // IndexerStateFloats x fp32
};

bool AllFinite(const uint8_t* bytes, int64_t floats) {
  for (int64_t i = 0; i < floats; ++i) {
    float v;
    std::memcpy(&v, bytes + i * 4, 4);
    if (!std::isfinite(v)) return false;
  }
  return true;
}

// Reads the state block at `offset` for layer `layer` at (length, floor) as
// the commit says, and checks every invariant the cache relies on.
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
  b.ring = d.Bytes(static_cast<uint64_t>(g.window * kKvRowBytes));
  b.rollback = d.Bytes(static_cast<uint64_t>(g.depth * kKvRowBytes));
  b.evictors = d.Bytes(static_cast<uint64_t>(g.depth * 8));
  b.main_state = d.Bytes(static_cast<uint64_t>(main_floats * 4));
  b.indexer_state = d.Bytes(static_cast<uint64_t>(indexer_floats * 4));
  if (!d.ok() || d.remaining() != 0) {
    return absl::DataLossError(absl::StrCat(where, " has ", buffer->size(), " bytes, not the layer's state size"));
  }
  if (!KvRowsValid(b.ring, g.window) || !KvRowsValid(b.rollback, g.depth)) {
    return absl::DataLossError(absl::StrCat(where, " holds window rows kvc cannot have written (NaN codes or scales)"));
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

// --- Writing -----------------------------------------------------------------------

uint64_t NewTag() {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> lock(mu);
  uint64_t tag = 0;
  while (tag == 0) tag = rng();
  return tag;
}

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

// Writes one sequence (its lock held): rows the file already holds for it
// are referenced again, the rest written. Returns its commit entry.
absl::StatusOr<SequenceEntry> WriteSequence(const Impl& impl, Sequence& seq, SequenceId id,
                                            const SequenceEntry* prior, BlockWriter& out, SaveStats& stats) {
  SequenceEntry entry;
  entry.tag = NewTag();
  entry.saved_id = id;
  const int64_t low = seq.snapshot_low_water;
  for (size_t i = 0; i < seq.layers.size(); ++i) {
    LayerStreams& ls = seq.layers[i];
    const LayerKind kind = impl.spec.layers[i].kind;
    const LayerEntry* before = prior != nullptr ? &prior->layers[i] : nullptr;
    LayerEntry layer;
    layer.length = ls.length;
    layer.floor = ls.floor;
    const Impl::History histories[kStreams] = {impl.CompressedOf(ls), impl.KeysOf(ls)};
    for (int st = 0; st < kStreams; ++st) {
      const Impl::History& h = histories[st];
      StreamEntry& stream = layer.streams[st];
      stream.rows = *h.rows;
      // Rows below the low water are those the prior entry saved (unchanged since).
      int64_t kept = 0;
      if (before != nullptr) {
        kept = std::min({before->streams[st].rows, stream.rows, EntriesAt(kind, low)});
        int64_t covered = 0;
        for (const Extent& x : before->streams[st].extents) {
          if (covered >= kept) break;
          const uint32_t use = static_cast<uint32_t>(std::min<int64_t>(x.rows, kept - covered));
          stream.extents.push_back({x.offset, use});
          covered += use;
        }
      }
      stats.rows_reused += kept;
      for (int64_t r = kept; r < stream.rows;) {  // one block per cache page (or the rest of one)
        const uint32_t n = static_cast<uint32_t>(std::min(stream.rows - r, h.per_page - r % h.per_page));
        const ConstPackedRows rows = impl.HistoryPage(h, static_cast<size_t>(r / h.per_page)).Slice(r % h.per_page, n);
        out.Begin();
        std::string& payload = out.payload();
        payload += EncodeRowsPreamble(static_cast<uint32_t>(i), st, r, n);
        for (uint32_t k = 0; k < n; ++k) {  // verbatim: data part, then scale part
          payload.append(reinterpret_cast<const char*>(rows.row_data(k)), static_cast<size_t>(FormatInfo(h.format).data_bytes));
          payload.append(reinterpret_cast<const char*>(rows.row_scales(k)), static_cast<size_t>(FormatInfo(h.format).scale_bytes));
        }
        KVC_ASSIGN_OR_RETURN(const int64_t offset, out.End(BlockType::kRows));
        stream.extents.push_back({offset, n});
        stats.rows_written += n;
        r += n;
      }
    }
    // The state is unchanged if the layer neither grew nor was rolled back
    // since the prior save.
    if (before != nullptr && before->length == ls.length && low >= ls.length && before->floor == ls.floor) {
      layer.state_offset = before->state_offset;
    } else {
      Encoder e;
      e.Put<uint32_t>(static_cast<uint32_t>(i));
      e.Put<int64_t>(ls.length);
      e.Put<int64_t>(ls.floor);
      for (int64_t slot = 0; slot < impl.window(); ++slot) {
        const PackedRows row = impl.RingSlot(ls, slot);
        e.PutBytes(row.data, kKvDataBytes);
        e.PutBytes(row.scales, kKvScaleBytes);
      }
      if (impl.depth() > 0) {
        e.PutBytes(impl.rollback_pool->Data(ls.rollback), static_cast<size_t>(impl.depth() * kKvRowBytes));
        e.PutBytes(impl.RollbackEvictors(ls), static_cast<size_t>(impl.depth()) * 8);
      }
      const bool compresses = KvcCompresses(impl.spec.layers[i]);
      if (compresses) {
        const CompressorGeometry g = MainCompressor(kind, impl.spec.head_dim);
        e.PutBytes(impl.StatePool(kind)->Data(ls.state), static_cast<size_t>(impl.StateCapacity(g) * 2 * g.width() * 4));
        if (kind == LayerKind::kCsa) {
          const CompressorGeometry gi = IndexerCompressor(impl.spec.index_dim);
          e.PutBytes(impl.csa_indexer_state_pool->Data(ls.indexer_state),
                     static_cast<size_t>(impl.StateCapacity(gi) * 2 * gi.width() * 4));
        }
      }
      KVC_ASSIGN_OR_RETURN(layer.state_offset, out.Add(BlockType::kState, e.bytes()));
    }
    entry.layers.push_back(std::move(layer));
  }
  int64_t shortest = seq.layers.empty() ? 0 : seq.layers[0].length;
  for (const LayerStreams& ls : seq.layers) shortest = std::min(shortest, ls.length);
  seq.snapshot_tag = entry.tag;
  seq.snapshot_low_water = shortest;
  return entry;
}

// The offsets of the blocks the last commit refers to (model, state, rows),
// sorted, plus the commit itself.
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

}  // namespace

namespace {

// `skip_freed`: leave out sequences freed while the save runs (whole-cache
// saves); otherwise that is kNotFound.
absl::StatusOr<SaveStats> Save(const Cache& cache, absl::Span<const SequenceId> ids, const std::string& path,
                               const SaveOptions& options, bool skip_freed) {
  Impl& impl = SnapshotAccess::Of(cache);
  std::vector<std::pair<SequenceId, std::shared_ptr<Sequence>>> seqs;
  for (const SequenceId id : ids) {
    absl::StatusOr<std::shared_ptr<Sequence>> seq = impl.Find(id);
    if (!seq.ok() && skip_freed) continue;
    if (!seq.ok()) return seq.status();
    seqs.emplace_back(id, *std::move(seq));
  }
  const ModelDescription model = Describe(impl);

  // Append to the existing file if it is a sound snapshot of this model and
  // not mostly superseded data; otherwise write a fresh one.
  std::optional<OpenedSnapshot> existing;
  if (options.incremental) {
    absl::StatusOr<OpenedSnapshot> s = OpenSnapshot(path, O_RDWR);
    if (s.ok() && CheckSameModel(s->model, model, path).ok()) {
      const absl::StatusOr<BlockScan> scan = ScanBlocks(*s, /*check_superseded=*/false);
      if (scan.ok() && 2 * scan->live_bytes >= s->header.committed) existing = *std::move(s);
    }
  }
  SaveStats stats;
  stats.rewrote = !existing.has_value();
  const std::string write_path = existing ? path : path + ".tmp";
  std::unique_ptr<File> owned;
  File* file = nullptr;
  FileHeader header;
  Commit commit;
  if (existing) {
    file = existing->file.get();
    header = existing->header;
    KVC_RETURN_IF_ERROR(file->Truncate(header.committed));  // drop an interrupted save's tail
    commit.model_offset = existing->commit.model_offset;
  } else {
    KVC_ASSIGN_OR_RETURN(File f, File::Open(write_path, O_RDWR | O_CREAT | O_TRUNC));
    owned = std::make_unique<File>(std::move(f));
    file = owned.get();
    header.file_tag = NewTag();
    header.committed = kFileHeaderBytes;
  }
  BlockWriter out(file, header.committed);
  absl::Status status = [&]() -> absl::Status {
    if (!existing) {
      KVC_ASSIGN_OR_RETURN(commit.model_offset, out.Add(BlockType::kModel, model.Encode()));
    }
    for (const auto& [id, seq] : seqs) {
      std::lock_guard<std::mutex> lock(seq->mu);
      if (seq->freed && skip_freed) continue;
      if (seq->freed) return absl::NotFoundError(absl::StrCat("sequence ", id, " was freed"));
      const SequenceEntry* prior = nullptr;
      if (existing && seq->snapshot_tag != 0) {
        for (const SequenceEntry& e : existing->commit.sequences) {
          if (e.tag == seq->snapshot_tag) prior = &e;
        }
      }
      KVC_ASSIGN_OR_RETURN(SequenceEntry entry, WriteSequence(impl, *seq, id, prior, out, stats));
      commit.sequences.push_back(std::move(entry));
    }
    KVC_ASSIGN_OR_RETURN(header.last_commit, out.Add(BlockType::kCommit, EncodeCommit(commit)));
    KVC_RETURN_IF_ERROR(out.Flush());
    KVC_RETURN_IF_ERROR(file->Sync());  // the blocks are durable before the header points at them
    header.committed = out.offset();
    header.saves += 1;
    const auto raw = EncodeHeader(header);
    KVC_RETURN_IF_ERROR(file->WriteAt(0, raw.data(), raw.size()));
    KVC_RETURN_IF_ERROR(file->Sync());
    if (!existing) {
      if (std::rename(write_path.c_str(), path.c_str()) != 0) return IoError("cannot rename onto", path);
      KVC_RETURN_IF_ERROR(SyncDirectoryOf(path));
    }
    return absl::OkStatus();
  }();
  if (!status.ok()) {
    if (existing) {
      (void)file->Truncate(header.committed);  // best effort; readers ignore the tail anyway
    } else {
      ::unlink(write_path.c_str());
    }
    return status;
  }
  stats.bytes_written = out.bytes() + kFileHeaderBytes;
  stats.file_bytes = header.committed;
  return stats;
}

}  // namespace

absl::StatusOr<SaveStats> SaveSnapshot(const Cache& cache, absl::Span<const SequenceId> ids, const std::string& path,
                                       const SaveOptions& options) {
  return Save(cache, ids, path, options, /*skip_freed=*/false);
}

absl::StatusOr<SaveStats> SaveCacheSnapshot(const Cache& cache, const std::string& path, const SaveOptions& options) {
  return Save(cache, SnapshotAccess::Of(cache).Ids(), path, options, /*skip_freed=*/true);
}

absl::StatusOr<std::vector<SequenceId>> RestoreSnapshot(Cache& cache, const std::string& path) {
  Impl& impl = SnapshotAccess::Of(cache);
  KVC_ASSIGN_OR_RETURN(const OpenedSnapshot snap, OpenSnapshot(path));
  KVC_RETURN_IF_ERROR(CheckSameModel(snap.model, Describe(impl), path));
  KVC_RETURN_IF_ERROR(ScanBlocks(snap, /*check_superseded=*/true).status());
  const Geometry& g = snap.geometry;
  const File& f = *snap.file;
  const int64_t limit = snap.header.last_commit;

  // Build every sequence aside; only when all are complete do they join the cache.
  std::vector<std::shared_ptr<Sequence>> built;
  auto release_all = [&]() {
    for (const std::shared_ptr<Sequence>& seq : built) impl.Release(seq->layers);
  };
  std::vector<uint8_t> buffer;  // one block at a time
  absl::Status status = [&]() -> absl::Status {
    for (const SequenceEntry& entry : snap.commit.sequences) {
      auto seq = std::make_shared<Sequence>();
      KVC_RETURN_IF_ERROR(impl.AllocateState(seq->layers));
      built.push_back(seq);
      int64_t shortest = entry.layers.empty() ? 0 : entry.layers[0].length;
      for (size_t i = 0; i < entry.layers.size(); ++i) {
        const LayerEntry& le = entry.layers[i];
        LayerStreams& ls = seq->layers[i];
        shortest = std::min(shortest, le.length);
        KVC_ASSIGN_OR_RETURN(const StateBlock state,
                             ReadState(f, le.state_offset, limit, g, i, le.length, le.floor, &buffer));
        for (int64_t slot = 0; slot < impl.window(); ++slot) {
          Impl::CopyRow(ContiguousRows(RowFormat::kKvFp8, state.ring + slot * kKvRowBytes, 1), impl.RingSlot(ls, slot));
        }
        if (impl.depth() > 0) {
          std::memcpy(impl.rollback_pool->Data(ls.rollback), state.rollback, static_cast<size_t>(impl.depth() * kKvRowBytes));
          std::memcpy(impl.RollbackEvictors(ls), state.evictors, static_cast<size_t>(impl.depth()) * 8);
        }
        if (ls.state != kNoPage && g.MainStateFloats(i) > 0) {
          std::memcpy(impl.StatePool(g.kinds[i])->Data(ls.state), state.main_state, static_cast<size_t>(g.MainStateFloats(i) * 4));
        }
        if (ls.indexer_state != kNoPage && g.IndexerStateFloats(i) > 0) {
          std::memcpy(impl.csa_indexer_state_pool->Data(ls.indexer_state), state.indexer_state,
                      static_cast<size_t>(g.IndexerStateFloats(i) * 4));
        }
        ls.length = le.length;
        ls.floor = le.floor;
        Impl::History histories[kStreams] = {impl.CompressedOf(ls), impl.KeysOf(ls)};
        for (int st = 0; st < kStreams; ++st) {
          const Impl::History& h = histories[st];
          const StreamEntry& stream = le.streams[st];
          const int64_t pages = (stream.rows + h.per_page - 1) / h.per_page;
          KVC_RETURN_IF_ERROR(h.pool->Allocate(pages, h.pages));
          const RowFormat format = kStreamFormat[st];
          int64_t r = 0;
          for (const Extent& x : stream.extents) {
            KVC_ASSIGN_OR_RETURN(const RowsBlock block, ReadRows(f, x.offset, limit, i, st, r, x.rows, &buffer));
            const ConstPackedRows from = ContiguousRows(format, block.rows, x.rows);
            for (uint32_t k = 0; k < x.rows; ++k, ++r) {
              const PackedRows to = impl.HistoryPage(h, static_cast<size_t>(r / h.per_page)).Slice(r % h.per_page, 1);
              std::memcpy(to.data, from.row_data(k), static_cast<size_t>(FormatInfo(format).data_bytes));
              std::memcpy(to.scales, from.row_scales(k), static_cast<size_t>(FormatInfo(format).scale_bytes));
            }
          }
          *h.rows = stream.rows;
        }
      }
      seq->snapshot_tag = entry.tag;  // a later save to this file appends only what is new
      seq->snapshot_low_water = shortest;
    }
    return absl::OkStatus();
  }();
  if (!status.ok()) {
    release_all();
    return status;
  }
  std::vector<SequenceId> ids;
  for (std::shared_ptr<Sequence>& seq : built) ids.push_back(impl.Register(std::move(seq)));
  return ids;
}

namespace {

absl::StatusOr<SnapshotInfo> Inspect(const std::string& path, bool verify_payloads) {
  KVC_ASSIGN_OR_RETURN(const OpenedSnapshot snap, OpenSnapshot(path));
  SnapshotInfo info;
  info.format_version = snap.header.version;
  info.model_name = snap.model.name;
  info.layer_kinds = *snap.model.Find("layer_kinds");
  info.rollback_depth = static_cast<int32_t>(snap.geometry.depth);
  info.model_fingerprint = snap.model.Fingerprint();
  info.saves = snap.header.saves;
  info.file_bytes = snap.file_bytes;
  info.unfinished_bytes = snap.file_bytes - snap.header.committed;
  for (const SequenceEntry& e : snap.commit.sequences) {
    SnapshotSequenceInfo seq;
    seq.saved_id = e.saved_id;
    for (const LayerEntry& l : e.layers) seq.layers.push_back({l.length, l.floor, l.streams[0].rows, l.streams[1].rows});
    info.sequences.push_back(std::move(seq));
  }
  KVC_ASSIGN_OR_RETURN(const BlockScan scan, ScanBlocks(snap, /*check_superseded=*/verify_payloads));
  info.blocks = scan.blocks;
  info.live_bytes = scan.live_bytes;
  const File& f = *snap.file;
  if (verify_payloads) {  // and what the last commit refers to, as a restore reads it
    std::vector<uint8_t> buffer;
    const Geometry& g = snap.geometry;
    const int64_t limit = snap.header.last_commit;
    for (const SequenceEntry& e : snap.commit.sequences) {
      for (size_t i = 0; i < e.layers.size(); ++i) {
        const LayerEntry& l = e.layers[i];
        KVC_RETURN_IF_ERROR(ReadState(f, l.state_offset, limit, g, i, l.length, l.floor, &buffer).status());
        for (int st = 0; st < kStreams; ++st) {
          int64_t r = 0;
          for (const Extent& x : l.streams[st].extents) {
            KVC_RETURN_IF_ERROR(ReadRows(f, x.offset, limit, i, st, r, x.rows, &buffer).status());
            r += x.rows;
          }
        }
      }
    }
    info.blocks_verified = info.blocks;  // superseded ones by the scan, the rest just now or at open
  }
  return info;
}

}  // namespace

absl::StatusOr<SnapshotInfo> ReadSnapshotInfo(const std::string& path) { return Inspect(path, false); }
absl::StatusOr<SnapshotInfo> VerifySnapshot(const std::string& path) { return Inspect(path, true); }

}  // namespace kvc
