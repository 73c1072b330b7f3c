// Snapshots: restore equals the original byte for byte and continues like
// an uninterrupted run; incremental saves write only what is new; damaged,
// truncated, foreign and wrong-model files are refused without touching the
// cache; a writer killed mid-save leaves the previous snapshot usable.
#include "kvc/snapshot.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "src/crc32c.h"
#include "src/snapshot_format.h"
#include "tests/testing/run_program.h"
#include "tests/testing/tiny_model.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;
using testing::ObservableBytes;
using testing::TinyModel;

constexpr uint64_t kSeed = 7;

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "kvc_snapshot_" + std::to_string(::getpid()) + "_" + name;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

CacheOptions SmallOptions() {
  CacheOptions o;
  o.rollback_depth = 4;
  o.rows_per_page = 8;  // several pages per stream, partial last pages
  o.keys_per_page = 16;
  o.history_bytes = int64_t{64} << 20;
  o.state_bytes = int64_t{64} << 20;
  return o;
}

std::unique_ptr<Cache> NewCache(const TinyModel& model, CacheOptions options = SmallOptions()) {
  return *Cache::Create(model.spec(), options);
}

// The CSA layer's attention set for a deterministic query, as indices.
std::vector<int32_t> Selection(const Cache& cache, SequenceId seq) {
  std::vector<Bf16> q(static_cast<size_t>(cache.spec().index_heads) * kIndexDim);
  for (size_t i = 0; i < q.size(); ++i) q[i] = ToBf16(testing::DetValue(99, i, 1.0f));
  const std::vector<float> w(static_cast<size_t>(cache.spec().index_heads), 0.5f);
  const int64_t t = *cache.Length(seq, TinyModel::kCsaLayer) - 1;
  const IndexQuery query = *cache.PrepareIndexQuery(t, q, w);
  return cache.SelectAttentionSet(seq, TinyModel::kCsaLayer, &query)->indices;
}

TEST(Crc32c, KnownValuesAndBothPathsAgree) {
  // RFC 3720 B.4 check values and the common "123456789" check.
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
  std::vector<uint8_t> bytes(32, 0);
  EXPECT_EQ(Crc32c(bytes.data(), 32), 0x8A9136AAu);
  std::fill(bytes.begin(), bytes.end(), 0xFF);
  EXPECT_EQ(Crc32c(bytes.data(), 32), 0x62A8AB43u);
  for (int i = 0; i < 32; ++i) bytes[static_cast<size_t>(i)] = static_cast<uint8_t>(i);
  EXPECT_EQ(Crc32c(bytes.data(), 32), 0x46DD794Eu);
  std::mt19937 rng(3);
  std::vector<uint8_t> data(10000);
  for (uint8_t& b : data) b = static_cast<uint8_t>(rng());
  for (const size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{63}, size_t{4097}, size_t{10000}}) {
    EXPECT_EQ(Crc32c(data.data(), n), Crc32cPortable(data.data(), n)) << n;
    const size_t half = n / 3;  // continuation
    EXPECT_EQ(Crc32c(data.data() + half, n - half, Crc32c(data.data(), half)), Crc32c(data.data(), n)) << n;
  }
}

// Save at many lengths (empty, inside the first window, at and past window
// and HCA boundaries), restore into a fresh cache, then continue both and
// roll both back: every observable byte and selection stays equal.
TEST(Snapshot, RestoreEqualsOriginalAndContinuesLikeIt) {
  const TinyModel model;
  for (const int64_t length : {0, 1, 7, 16, 23, 127, 128, 131, 300}) {
    SCOPED_TRACE(length);
    auto original = NewCache(model);
    const SequenceId seq = *original->CreateSequence();
    ASSERT_TRUE(model.Grow(*original, seq, length, kSeed, 1 + length % 11).ok());
    const std::string path = TempPath("roundtrip");
    const absl::StatusOr<SaveStats> saved = SaveSnapshot(*original, {seq}, path);
    ASSERT_TRUE(saved.ok()) << saved.status();
    EXPECT_TRUE(saved->rewrote);

    auto restored = NewCache(model);
    const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*restored, path);
    ASSERT_TRUE(ids.ok()) << ids.status();
    ASSERT_EQ(ids->size(), 1u);
    const SequenceId copy = (*ids)[0];
    EXPECT_EQ(ObservableBytes(*restored, copy), ObservableBytes(*original, seq));
    EXPECT_EQ(restored->Usage(copy)->total_bytes(), original->Usage(seq)->total_bytes());

    // Continue both with the same tokens (different chunking), then roll back.
    ASSERT_TRUE(model.Grow(*original, seq, length + 150, kSeed, 13).ok());
    ASSERT_TRUE(model.Grow(*restored, copy, length + 150, kSeed, 50).ok());
    EXPECT_EQ(ObservableBytes(*restored, copy), ObservableBytes(*original, seq));
    EXPECT_EQ(Selection(*restored, copy), Selection(*original, seq));
    ASSERT_TRUE(original->Truncate(seq, length + 147).ok());
    ASSERT_TRUE(restored->Truncate(copy, length + 147).ok());
    ASSERT_TRUE(model.Grow(*original, seq, length + 160, kSeed + 1).ok());
    ASSERT_TRUE(model.Grow(*restored, copy, length + 160, kSeed + 1).ok());
    EXPECT_EQ(ObservableBytes(*restored, copy), ObservableBytes(*original, seq));
    EXPECT_EQ(Selection(*restored, copy), Selection(*original, seq));
    std::remove(path.c_str());
  }
}

TEST(Snapshot, RollbackAcrossTheSavePointStillWorks) {
  // Saved right after appends: the rollback records travel with the state.
  const TinyModel model;
  auto original = NewCache(model);
  const SequenceId seq = *original->CreateSequence();
  ASSERT_TRUE(model.Grow(*original, seq, 203, kSeed).ok());
  const std::string path = TempPath("rollback");
  ASSERT_TRUE(SaveSnapshot(*original, {seq}, path).ok());
  auto restored = NewCache(model);
  const SequenceId copy = (*RestoreSnapshot(*restored, path))[0];
  EXPECT_EQ(*restored->RollbackFloor(copy), 199);
  ASSERT_TRUE(original->Truncate(seq, 199).ok());
  ASSERT_TRUE(restored->Truncate(copy, 199).ok());
  EXPECT_EQ(ObservableBytes(*restored, copy), ObservableBytes(*original, seq));
  EXPECT_EQ(restored->Truncate(copy, 198).code(), absl::StatusCode::kFailedPrecondition);
  std::remove(path.c_str());
}

TEST(Snapshot, WholeCacheWithForksAndEngineCompressedLayer) {
  const TinyModel model(/*hca_by_kvc=*/false);
  auto original = NewCache(model);
  const SequenceId a = *original->CreateSequence();
  ASSERT_TRUE(model.Grow(*original, a, 260, kSeed).ok());
  const SequenceId b = *original->Fork(a);
  ASSERT_TRUE(model.Grow(*original, b, 300, kSeed + 5).ok());
  const SequenceId c = *original->CreateSequence();  // empty
  const std::string path = TempPath("whole");
  ASSERT_TRUE(SaveCacheSnapshot(*original, path).ok());
  const SnapshotInfo info = *VerifySnapshot(path);
  ASSERT_EQ(info.sequences.size(), 3u);
  EXPECT_EQ(info.sequences[1].saved_id, b);
  EXPECT_EQ(info.layer_kinds, "WCH");
  EXPECT_EQ(info.sequences[1].layers[2].compressed_rows, 2);
  auto restored = NewCache(model);
  const std::vector<SequenceId> ids = *RestoreSnapshot(*restored, path);
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ObservableBytes(*restored, ids[0]), ObservableBytes(*original, a));
  EXPECT_EQ(ObservableBytes(*restored, ids[1]), ObservableBytes(*original, b));
  EXPECT_EQ(ObservableBytes(*restored, ids[2]), ObservableBytes(*original, c));
  std::remove(path.c_str());
}

// Rows of one layer's history streams that a save of `seq` holds.
int64_t HistoryRows(const Cache& cache, SequenceId seq) {
  int64_t rows = 0;
  for (int layer = 0; layer < 3; ++layer) rows += cache.CompressedRows(seq, layer)->rows + cache.IndexKeys(seq, layer)->rows;
  return rows;
}

TEST(Snapshot, IncrementalSavesWriteOnlyWhatIsNew) {
  const TinyModel model;
  auto cache = NewCache(model);
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 600, kSeed).ok());
  const std::string path = TempPath("incremental");
  const SaveStats first = *SaveSnapshot(*cache, {seq}, path);
  EXPECT_TRUE(first.rewrote);
  EXPECT_EQ(first.rows_written, HistoryRows(*cache, seq));
  const int64_t rows_600 = HistoryRows(*cache, seq);

  // Grow and save again: only the new rows are written.
  ASSERT_TRUE(model.Grow(*cache, seq, 700, kSeed).ok());
  const SaveStats second = *SaveSnapshot(*cache, {seq}, path);
  EXPECT_FALSE(second.rewrote);
  EXPECT_EQ(second.rows_reused, rows_600);
  EXPECT_EQ(second.rows_written, HistoryRows(*cache, seq) - rows_600);
  EXPECT_LT(second.bytes_written, first.bytes_written);
  EXPECT_EQ(second.file_bytes, static_cast<int64_t>(ReadFile(path).size()));
  auto check = [&](const char* when) {
    auto restored = NewCache(model);
    const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*restored, path);
    ASSERT_TRUE(ids.ok()) << when << ": " << ids.status();
    EXPECT_EQ(ObservableBytes(*restored, (*ids)[0]), ObservableBytes(*cache, seq)) << when;
  };
  check("after growing");

  // A restored sequence keeps appending to (a copy of) the file it came from.
  {
    const std::string copy_path = TempPath("incremental_copy");
    WriteFile(copy_path, ReadFile(path));
    auto restored = NewCache(model);
    const SequenceId copy = (*RestoreSnapshot(*restored, copy_path))[0];
    ASSERT_TRUE(model.Grow(*restored, copy, 750, kSeed).ok());
    const SaveStats s = *SaveSnapshot(*restored, {copy}, copy_path);
    EXPECT_FALSE(s.rewrote);
    EXPECT_EQ(s.rows_reused, HistoryRows(*cache, seq));
    EXPECT_EQ(s.rows_written, HistoryRows(*restored, copy) - HistoryRows(*cache, seq));
    std::remove(copy_path.c_str());
  }

  // Nothing changed: nothing but the commit is written.
  const SaveStats same = *SaveSnapshot(*cache, {seq}, path);
  EXPECT_EQ(same.rows_written, 0);
  check("unchanged");

  // Roll back into saved rows and append different tokens: the rows after
  // the rollback point are rewritten, those before it reused.
  ASSERT_TRUE(cache->Truncate(seq, 697).ok());
  ASSERT_TRUE(model.Grow(*cache, seq, 720, kSeed + 9).ok());
  const SaveStats diverged = *SaveSnapshot(*cache, {seq}, path);
  EXPECT_EQ(diverged.rows_reused, 174 + 174 + 5);  // CSA rows and keys below 697/4, HCA rows below 697/128
  check("after rollback and divergence");

  ASSERT_TRUE(model.Grow(*cache, seq, 800, kSeed + 9).ok());

  // Once more than half the file is superseded, a save compacts it.
  bool compacted = false;
  for (int round = 0; round < 40 && !compacted; ++round) {
    ASSERT_TRUE(cache->Truncate(seq, 797).ok());
    ASSERT_TRUE(model.Grow(*cache, seq, 800, kSeed + 9).ok());
    const SaveStats s = *SaveSnapshot(*cache, {seq}, path);
    compacted = s.rewrote;
  }
  EXPECT_TRUE(compacted);
  const SnapshotInfo info = *VerifySnapshot(path);
  EXPECT_EQ(info.saves, 1);
  EXPECT_EQ(info.live_bytes, info.file_bytes);
  check("after compaction");
  std::remove(path.c_str());
}

// --- Faults ------------------------------------------------------------------

class SnapshotFaults : public ::testing::Test {
 protected:
  void SetUp() override {
    source_ = NewCache(model_);
    const SequenceId seq = *source_->CreateSequence();
    ASSERT_TRUE(model_.Grow(*source_, seq, 150, kSeed).ok());
    path_ = TempPath("faults");
    ASSERT_TRUE(SaveSnapshot(*source_, {seq}, path_).ok());
    // Second, incremental save: the file has two commits.
    ASSERT_TRUE(model_.Grow(*source_, seq, 170, kSeed).ok());
    ASSERT_TRUE(SaveSnapshot(*source_, {seq}, path_).ok());
    good_ = ReadFile(path_);
    // The cache restores go into holds one sequence already.
    target_ = NewCache(model_);
    resident_ = *target_->CreateSequence();
    ASSERT_TRUE(model_.Grow(*target_, resident_, 90, kSeed + 3).ok());
    resident_bytes_ = ObservableBytes(*target_, resident_);
    usage_ = target_->Usage();
  }
  void TearDown() override { std::remove(path_.c_str()); }

  // Restores `bytes`; on failure checks that the cache is untouched.
  absl::Status TryRestore(const std::string& bytes) {
    WriteFile(path_, bytes);
    const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*target_, path_);
    if (ids.ok()) {
      for (const SequenceId id : *ids) EXPECT_TRUE(target_->Free(id).ok());
      return absl::OkStatus();
    }
    EXPECT_EQ(ObservableBytes(*target_, resident_), resident_bytes_);
    const CacheUsage now = target_->Usage();
    EXPECT_EQ(now.sequences, usage_.sequences);
    EXPECT_EQ(now.used_bytes(), usage_.used_bytes());
    return ids.status();
  }

  TinyModel model_;
  std::unique_ptr<Cache> source_, target_;
  SequenceId resident_ = 0;
  std::string path_, good_, resident_bytes_;
  CacheUsage usage_;
};

TEST_F(SnapshotFaults, GoodFileRestores) { EXPECT_TRUE(TryRestore(good_).ok()); }

TEST_F(SnapshotFaults, EveryTruncationIsRefused) {
  int refused = 0;
  for (size_t cut = 0; cut < good_.size(); cut += 1 + cut / 16) {
    const absl::Status s = TryRestore(good_.substr(0, cut));
    EXPECT_FALSE(s.ok()) << "cut at " << cut;
    refused += !s.ok();
    if (cut >= 64) {
      EXPECT_THAT(s.message(), HasSubstr("truncated")) << cut;
    }
  }
  EXPECT_GT(refused, 50);
  std::printf("[ truncate ] %d truncations of a %zu-byte file, each refused\n", refused, good_.size());
}

TEST_F(SnapshotFaults, EveryBitFlipInHeadersAndRandomBitFlipsAreRefused) {
  // All bits of the file header and the last 600 bytes (commit and block
  // headers), and 400 random bits anywhere.
  std::vector<size_t> bits;
  for (size_t bit = 0; bit < 64 * 8; ++bit) bits.push_back(bit);
  for (size_t byte = good_.size() - 600; byte < good_.size(); ++byte) bits.push_back(byte * 8 + byte % 8);
  std::mt19937_64 rng(5);
  for (int i = 0; i < 400; ++i) bits.push_back(rng() % (good_.size() * 8));
  for (const size_t bit : bits) {
    std::string bad = good_;
    bad[bit / 8] = static_cast<char>(bad[bit / 8] ^ (1 << (bit % 8)));
    const absl::Status s = TryRestore(bad);
    EXPECT_TRUE(s.code() == absl::StatusCode::kDataLoss || s.code() == absl::StatusCode::kInvalidArgument)
        << "bit " << bit << ": " << s;
    EXPECT_FALSE(VerifySnapshot(path_).ok()) << "bit " << bit;
  }
  std::printf("[ flips    ] %zu single-bit flips, each refused by restore and by verify\n", bits.size());
}

TEST_F(SnapshotFaults, UnfinishedSaveTailIsIgnored) {
  // What a writer killed mid-append leaves: the previous commit is intact.
  std::string torn = good_ + std::string(1000, '\x5A');
  ASSERT_TRUE(TryRestore(torn).ok());
  WriteFile(path_, torn);
  const SnapshotInfo info = *VerifySnapshot(path_);
  EXPECT_EQ(info.unfinished_bytes, 1000);
  EXPECT_EQ(info.saves, 2);
}

TEST_F(SnapshotFaults, OtherFormatVersionIsNamed) {
  std::string v2 = good_;
  v2[8] = 2;  // the version field; header checksum recomputed like a real v2 file
  const uint32_t crc = Crc32c(v2.data(), 60);
  std::memcpy(&v2[60], &crc, 4);
  const absl::Status s = TryRestore(v2);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("format version 2"));
}

TEST_F(SnapshotFaults, NotASnapshot) {
  EXPECT_THAT(TryRestore("").message(), HasSubstr("not a kvc snapshot"));
  EXPECT_THAT(TryRestore(std::string(4096, 'x')).message(), HasSubstr("not a kvc snapshot"));
  EXPECT_EQ(RestoreSnapshot(*target_, TempPath("missing")).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SnapshotFaults, WrongModelIsNamed) {
  WriteFile(path_, good_);
  auto expect_refused = [&](ModelSpec spec, CacheOptions options, const char* field) {
    auto other = *Cache::Create(std::move(spec), options);
    const absl::Status s = RestoreSnapshot(*other, path_).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << field;
    EXPECT_THAT(s.message(), HasSubstr(field));
    EXPECT_EQ(other->Usage().sequences, 0);
  };
  ModelSpec spec = model_.spec();
  spec.window = 32;
  expect_refused(spec, SmallOptions(), "window");
  spec = model_.spec();
  spec.layers[2].kind = LayerKind::kCsa;
  spec.layers[2].compressor = spec.layers[1].compressor;
  spec.layers[2].indexer = spec.layers[1].indexer;
  expect_refused(spec, SmallOptions(), "layer_kinds");
  CacheOptions depth = SmallOptions();
  depth.rollback_depth = 8;
  expect_refused(model_.spec(), depth, "rollback_depth");
  const TinyModel engine_hca(/*hca_by_kvc=*/false);
  expect_refused(engine_hca.spec(), SmallOptions(), "layer 2 compressor");
  std::vector<float> other_norm(512, 1.0f);
  spec = model_.spec();
  spec.layers[1].compressor.norm_weight = other_norm;
  expect_refused(spec, SmallOptions(), "layer 1 compressor");
  expect_refused(ModelSpec::V4Flash(), SmallOptions(), "layer_kinds");
  // Page sizes are not part of the model: restoring with others works.
  CacheOptions pages = SmallOptions();
  pages.rows_per_page = 3;
  pages.keys_per_page = 64;
  auto repaged = *Cache::Create(model_.spec(), pages);
  const SequenceId copy = (*RestoreSnapshot(*repaged, path_))[0];
  auto plain = NewCache(model_);
  const SequenceId again = (*RestoreSnapshot(*plain, path_))[0];
  EXPECT_EQ(ObservableBytes(*repaged, copy), ObservableBytes(*plain, again));
}

TEST_F(SnapshotFaults, NoRoomLeavesTheCacheAsItWas) {
  CacheOptions tight = SmallOptions();
  tight.history_bytes = 40000;  // the resident sequence fits, the snapshot's does not
  target_ = *Cache::Create(model_.spec(), tight);
  resident_ = *target_->CreateSequence();
  ASSERT_TRUE(model_.Grow(*target_, resident_, 90, kSeed + 3).ok());
  resident_bytes_ = ObservableBytes(*target_, resident_);
  usage_ = target_->Usage();
  const absl::Status s = TryRestore(good_);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
}

TEST(Snapshot, SaveOfUnknownSequenceWritesNothing) {
  const TinyModel model;
  auto cache = NewCache(model);
  const SequenceId seq = *cache->CreateSequence();
  const std::string path = TempPath("unknown");
  EXPECT_EQ(SaveSnapshot(*cache, {seq, 42}, path).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(RestoreSnapshot(*cache, path).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(SaveSnapshot(*cache, {seq}, "/nonexistent-dir/x.kvcsnap").status().code(), absl::StatusCode::kNotFound);
}

// --- Building on a file, failed saves, the temp file, crafted headers ----------

// The blocks of a snapshot: offset, type and whether the last commit refers to it.
struct BlockAt {
  int64_t offset;
  snapshot_format::BlockType type;
  bool referenced;
};

std::vector<BlockAt> Blocks(const std::string& path) {
  using namespace snapshot_format;
  const absl::StatusOr<OpenedSnapshot> s = OpenSnapshot(path);
  EXPECT_TRUE(s.ok()) << s.status();
  if (!s.ok()) return {};
  const std::vector<int64_t> referenced = ReferencedBlocks(*s);
  std::vector<BlockAt> blocks;
  for (int64_t at = kFileHeaderBytes; at < s->header.committed;) {
    const absl::StatusOr<BlockHeader> h = ReadBlockHeader(*s->file, at, s->header.committed, nullptr);
    EXPECT_TRUE(h.ok()) << h.status();
    if (!h.ok()) return {};
    blocks.push_back({at, h->type, std::binary_search(referenced.begin(), referenced.end(), at)});
    at += kBlockHeaderBytes + static_cast<int64_t>(h->payload_bytes);
  }
  return blocks;
}

// Flips one payload bit of the first block of `type` that is (or is not) referenced.
void FlipPayloadBit(const std::string& path, snapshot_format::BlockType type, bool referenced) {
  for (const BlockAt& b : Blocks(path)) {
    if (b.type != type || b.referenced != referenced) continue;
    std::string bytes = ReadFile(path);
    const size_t at = static_cast<size_t>(b.offset + snapshot_format::kBlockHeaderBytes + 20);
    bytes[at] = static_cast<char>(bytes[at] ^ 0x04);
    WriteFile(path, bytes);
    return;
  }
  ADD_FAILURE() << "no such block";
}

// A payload bit flipped in a superseded or a still-referenced block: the next
// incremental save rewrites the file whole, and the result restores.
TEST(SnapshotDamage, IncrementalSaveOntoADamagedFileRewritesIt) {
  const TinyModel model;
  for (const bool referenced : {false, true}) {
    for (const auto type : {snapshot_format::BlockType::kState, snapshot_format::BlockType::kRows}) {
      SCOPED_TRACE(::testing::Message() << "referenced " << referenced << " type " << static_cast<int>(type));
      auto cache = NewCache(model);
      const SequenceId seq = *cache->CreateSequence();
      const std::string path = TempPath("damaged");
      // Long enough that rows outweigh the (superseded) state blocks: no compaction.
      ASSERT_TRUE(model.Grow(*cache, seq, 5996, kSeed, 500).ok());
      ASSERT_TRUE(SaveSnapshot(*cache, {seq}, path).ok());
      ASSERT_TRUE(model.Grow(*cache, seq, 6000, kSeed).ok());
      ASSERT_TRUE(SaveSnapshot(*cache, {seq}, path).ok());  // CSA row 1499 in blocks of its own
      // Roll back and diverge: those blocks and the state blocks are superseded.
      ASSERT_TRUE(cache->Truncate(seq, 5997).ok());
      ASSERT_TRUE(model.Grow(*cache, seq, 6000, kSeed + 1).ok());
      ASSERT_TRUE(SaveSnapshot(*cache, {seq}, path).ok());
      FlipPayloadBit(path, type, referenced);
      ASSERT_FALSE(VerifySnapshot(path).ok());
      ASSERT_TRUE(model.Grow(*cache, seq, 6020, kSeed).ok());
      const absl::StatusOr<SaveStats> s = SaveSnapshot(*cache, {seq}, path);
      ASSERT_TRUE(s.ok()) << s.status();
      EXPECT_TRUE(s->rewrote);
      EXPECT_EQ(s->rows_reused, 0);
      EXPECT_TRUE(VerifySnapshot(path).ok()) << VerifySnapshot(path).status();
      auto restored = NewCache(model);
      const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*restored, path);
      ASSERT_TRUE(ids.ok()) << ids.status();
      EXPECT_EQ(ObservableBytes(*restored, (*ids)[0]), ObservableBytes(*cache, seq));
      std::remove(path.c_str());
    }
  }
}

// RLIMIT_FSIZE for the scope (SIGXFSZ ignored, so a write past it fails with EFBIG).
class FileSizeLimit {
 public:
  explicit FileSizeLimit(int64_t bytes) {
    old_handler_ = ::signal(SIGXFSZ, SIG_IGN);
    ::getrlimit(RLIMIT_FSIZE, &old_);
    struct rlimit limit = old_;
    limit.rlim_cur = static_cast<rlim_t>(bytes);
    EXPECT_EQ(::setrlimit(RLIMIT_FSIZE, &limit), 0);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    ::signal(SIGXFSZ, old_handler_);
  }

 private:
  struct rlimit old_;
  sighandler_t old_handler_;
};

// A save that fails (file size limit) changes nothing: the next save still
// appends only what is new, to the file the last good save wrote.
TEST(SnapshotFailedSave, ChangesNoIncrementalState) {
  const TinyModel model;
  for (const bool failing_save_incremental : {true, false}) {
    SCOPED_TRACE(failing_save_incremental);
    auto cache = NewCache(model);
    const SequenceId seq = *cache->CreateSequence();
    const std::string path = TempPath("failed_save");
    ASSERT_TRUE(model.Grow(*cache, seq, 600, kSeed).ok());
    const SaveStats first = *SaveSnapshot(*cache, {seq}, path);
    const int64_t rows_600 = HistoryRows(*cache, seq);
    const std::string before = ReadFile(path);
    ASSERT_TRUE(model.Grow(*cache, seq, 700, kSeed).ok());
    {
      const FileSizeLimit limit(first.file_bytes + 100);
      SaveOptions options;
      options.incremental = failing_save_incremental;
      const absl::StatusOr<SaveStats> failed = SaveSnapshot(*cache, {seq}, path, options);
      ASSERT_FALSE(failed.ok());
      EXPECT_THAT(failed.status().message(), HasSubstr(path));
    }
    EXPECT_EQ(ReadFile(path), before);  // the previous file, byte for byte
    const absl::StatusOr<SaveStats> next = SaveSnapshot(*cache, {seq}, path);
    ASSERT_TRUE(next.ok()) << next.status();
    EXPECT_FALSE(next->rewrote);
    EXPECT_EQ(next->rows_reused, rows_600);
    EXPECT_EQ(next->rows_written, HistoryRows(*cache, seq) - rows_600);
    EXPECT_LT(next->bytes_written, first.bytes_written);  // a rewrite would write more than the first save
    auto restored = NewCache(model);
    const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*restored, path);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(ObservableBytes(*restored, (*ids)[0]), ObservableBytes(*cache, seq));
    std::remove(path.c_str());
  }
}

mode_t ModeOf(const std::string& path) {
  struct stat st;
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

// The files in the directory of `path` whose names start with its file name.
std::vector<std::string> FilesBeside(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  const std::string dir = path.substr(0, slash), name = path.substr(slash + 1);
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  for (dirent* e = d != nullptr ? ::readdir(d) : nullptr; e != nullptr; e = ::readdir(d)) {
    if (std::string(e->d_name).rfind(name, 0) == 0) names.push_back(e->d_name);
  }
  if (d != nullptr) ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

// A full save never writes through a symlink planted where it makes its
// temporary file, and leaves no file but the snapshot behind.
TEST(SnapshotTempFile, NeverFollowsAPlantedSymlink) {
  const TinyModel model;
  auto cache = NewCache(model);
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 150, kSeed).ok());
  const std::string path = TempPath("symlink.kvcsnap"), victim = TempPath("victim");
  WriteFile(victim, "precious");
  std::remove(path.c_str());
  for (const char* suffix : {".tmp", ".tmp.0", ".tmp0", "~", ".new", ".partial"}) {
    ASSERT_EQ(::symlink(victim.c_str(), (path + suffix).c_str()), 0) << suffix;
  }
  // Half the rounds where O_TMPFILE is unsupported (the named temporary file).
  struct NoUnnamedFiles : snapshot_format::FileSystem {
    int OpenUnnamed(const char*, int, mode_t) override {
      errno = EOPNOTSUPP;
      return -1;
    }
  } no_unnamed_files;
  for (int round = 0; round < 4; ++round) {
    SaveOptions full;
    full.incremental = false;
    snapshot_format::FileSystem& fs = round % 2 == 0 ? snapshot_format::FileSystem::Real() : no_unnamed_files;
    const absl::StatusOr<SaveStats> s = snapshot_format::SaveSnapshotUsing(fs, *cache, {seq}, path, full);
    ASSERT_TRUE(s.ok()) << s.status();
  }
  EXPECT_EQ(ReadFile(victim), "precious");
  EXPECT_TRUE(VerifySnapshot(path).ok());
  EXPECT_EQ(FilesBeside(path).size(), 7u);  // the snapshot and the 6 links: no temp file left
  for (const char* suffix : {".tmp", ".tmp.0", ".tmp0", "~", ".new", ".partial"}) std::remove((path + suffix).c_str());
  std::remove(path.c_str());
  std::remove(victim.c_str());
}

// A rewrite keeps the mode of the snapshot it replaces; a new one is 0600,
// whatever the umask lets through.
TEST(SnapshotTempFile, KeepsTheModeAndCreatesPrivateFiles) {
  const TinyModel model;
  auto cache = NewCache(model);
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 150, kSeed).ok());
  const std::string path = TempPath("mode.kvcsnap");
  std::remove(path.c_str());
  const mode_t old_umask = ::umask(0);
  ASSERT_TRUE(SaveSnapshot(*cache, {seq}, path).ok());
  EXPECT_EQ(ModeOf(path), 0600u);
  SaveOptions full;
  full.incremental = false;
  ASSERT_TRUE(SaveSnapshot(*cache, {seq}, path, full).ok());
  EXPECT_EQ(ModeOf(path), 0600u);
  ASSERT_EQ(::chmod(path.c_str(), 0640), 0);
  ASSERT_TRUE(SaveSnapshot(*cache, {seq}, path, full).ok());
  EXPECT_EQ(ModeOf(path), 0640u);
  ::umask(old_umask);
  std::remove(path.c_str());
}

// Header fields a crafted file sets so that offset arithmetic would overflow
// (checksum recomputed): refused as damaged, with no undefined behaviour.
TEST_F(SnapshotFaults, CraftedHeaderOffsetsAreDataLoss) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  const struct {
    int64_t committed, last_commit;
  } cases[] = {{kMax, kMax - 8}, {kMax, kMax - 31}, {kMax, kMax - 32}, {kMax - 8, kMax - 40},
               {kMax, 64}, {96, std::numeric_limits<int64_t>::min()}, {std::numeric_limits<int64_t>::min(), 64}};
  for (const auto& c : cases) {
    SCOPED_TRACE(::testing::Message() << "committed " << c.committed << " last commit " << c.last_commit);
    std::string bad = good_;
    std::memcpy(&bad[24], &c.committed, 8);
    std::memcpy(&bad[40], &c.last_commit, 8);
    const uint32_t crc = Crc32c(bad.data(), 60);
    std::memcpy(&bad[60], &crc, 4);
    EXPECT_EQ(TryRestore(bad).code(), absl::StatusCode::kDataLoss);
    EXPECT_EQ(VerifySnapshot(path_).status().code(), absl::StatusCode::kDataLoss);
    auto cache = NewCache(model_);
    const SequenceId seq = *cache->CreateSequence();
    ASSERT_TRUE(model_.Grow(*cache, seq, 20, kSeed).ok());
    const absl::StatusOr<SaveStats> s = SaveSnapshot(*cache, {seq}, path_);  // rewrites it
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_TRUE(s->rewrote);
  }
}

// Rows QuantizeKvRows cannot have written, checksums recomputed: a block
// scale above 2^120, or the E4M3 code of 256 at 2^120 (256 x 2^120 = 2^128
// reads back as infinity), or a NaN code. Refused as damaged; the largest
// code it can write at 2^120 (240) restores.
TEST_F(SnapshotFaults, RowsThatReadBackNonFiniteAreDataLoss) {
  using namespace snapshot_format;
  int64_t rows_block = -1;
  for (const BlockAt& b : Blocks(path_)) {
    if (b.type != BlockType::kRows || !b.referenced) continue;
    uint8_t stream = 0;
    std::memcpy(&stream, &good_[static_cast<size_t>(b.offset + kBlockHeaderBytes + 4)], 1);
    if (stream == 0) {
      rows_block = b.offset;
      break;
    }
  }
  ASSERT_GE(rows_block, 0) << "no referenced compressed-rows block";
  const size_t header = static_cast<size_t>(rows_block), payload = header + kBlockHeaderBytes;
  const size_t row0 = payload + 4 + 1 + 8 + 4;  // layer, stream, first, count
  uint64_t payload_bytes = 0;
  std::memcpy(&payload_bytes, &good_[header + 8], 8);
  auto with_row0 = [&](uint8_t code, uint8_t scale_byte) {
    std::string bytes = good_;
    for (size_t i = 0; i < 64; ++i) bytes[row0 + i] = 0x30;  // block 0: codes that fit any scale (1.0)
    bytes[row0 + 3] = static_cast<char>(code);                  // dim 3
    bytes[row0 + 576] = static_cast<char>(scale_byte);          // block 0's scale
    const uint32_t crc = Crc32c(&bytes[payload], payload_bytes);
    std::memcpy(&bytes[header + 16], &crc, 4);
    const uint32_t header_crc = Crc32c(&bytes[header], kBlockHeaderBytes - 4);
    std::memcpy(&bytes[header + kBlockHeaderBytes - 4], &header_crc, 4);
    return bytes;
  };
  const struct {
    uint8_t code, scale;
    bool valid;
  } cases[] = {{0x77, 127 + 120, true},  {0xF7, 127 + 120, true}, {0x78, 127 + 120, false},
               {0xF8, 127 + 120, false}, {0x01, 127 + 121, false}, {0x7F, 100, false}};
  for (const auto& c : cases) {
    SCOPED_TRACE(::testing::Message() << "code 0x" << std::hex << int{c.code} << " scale byte " << std::dec << int{c.scale});
    const std::string bytes = with_row0(c.code, c.scale);
    const absl::Status restored = TryRestore(bytes);
    if (c.valid) {
      EXPECT_TRUE(restored.ok()) << restored;
      continue;
    }
    EXPECT_EQ(restored.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(restored.message()), HasSubstr("kvc cannot have written"));
    EXPECT_EQ(VerifySnapshot(path_).status().code(), absl::StatusCode::kDataLoss);
  }
}

// The real file system with chosen calls failing (errno set as the system would).
class FailingFileSystem : public snapshot_format::FileSystem {
 public:
  int write_errno = 0;            // every pwrite fails with it
  int directory_sync_errno = 0;   // every fsync of a directory fails with it
  int file_sync_errno = 0;        // the fsync of a regular file numbered `failing_file_sync` (from 1) fails
  int failing_file_sync = 0;
  int file_syncs = 0;

  ssize_t Pwrite(int fd, const void* data, size_t n, off_t offset) override {
    if (write_errno != 0) return Fail(write_errno);
    return FileSystem::Pwrite(fd, data, n, offset);
  }
  int Fsync(int fd) override {
    struct stat st;
    if (::fstat(fd, &st) != 0) return -1;
    if (S_ISDIR(st.st_mode) && directory_sync_errno != 0) return Fail(directory_sync_errno);
    if (!S_ISDIR(st.st_mode) && ++file_syncs == failing_file_sync) return Fail(file_sync_errno);
    return FileSystem::Fsync(fd);
  }

 private:
  static int Fail(int error) {
    errno = error;
    return -1;
  }
};

// Flushing the directory fails after the rename: the save reports what is
// on disk (the new file, in place) as OK but not durable, and the sequences
// go on from the new file.
TEST(SnapshotDirectorySync, FailureAfterTheRenameReportsTheNewFileInPlace) {
  const TinyModel model;
  auto cache = NewCache(model);
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 300, kSeed).ok());
  const std::string path = TempPath("dirsync.kvcsnap");
  ASSERT_TRUE(SaveSnapshot(*cache, {seq}, path).ok());
  ASSERT_TRUE(model.Grow(*cache, seq, 400, kSeed).ok());
  FailingFileSystem fs;
  fs.directory_sync_errno = EIO;
  SaveOptions full;
  full.incremental = false;
  const absl::StatusOr<SaveStats> s = snapshot_format::SaveSnapshotUsing(fs, *cache, {seq}, path, full);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(s->rewrote);
  EXPECT_FALSE(s->durable);
  EXPECT_THAT(s->directory_sync.message(), HasSubstr("cannot flush"));
  EXPECT_EQ(FileSystemErrno(s->directory_sync), EIO);
  EXPECT_EQ(s->file_bytes, static_cast<int64_t>(ReadFile(path).size()));
  EXPECT_EQ(FilesBeside(path).size(), 1u);  // no temporary file left
  auto restored = NewCache(model);
  const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*restored, path);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(ObservableBytes(*restored, (*ids)[0]), ObservableBytes(*cache, seq));
  // The sequence's next save appends to the new file.
  ASSERT_TRUE(model.Grow(*cache, seq, 420, kSeed).ok());
  const absl::StatusOr<SaveStats> next = SaveSnapshot(*cache, {seq}, path);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_FALSE(next->rewrote);
  EXPECT_TRUE(next->durable);
  std::remove(path.c_str());
}

// A full disk (ENOSPC) or a failing flush of the new header: an error naming
// the path, marked as a file-system failure, and the previous file as it was.
TEST(SnapshotIoErrors, AreMarkedAndLeaveThePreviousFile) {
  const TinyModel model;
  auto cache = NewCache(model);
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 300, kSeed).ok());
  const std::string path = TempPath("io.kvcsnap");
  ASSERT_TRUE(SaveSnapshot(*cache, {seq}, path).ok());
  const std::string before = ReadFile(path);
  ASSERT_TRUE(model.Grow(*cache, seq, 400, kSeed).ok());
  for (const bool incremental : {true, false}) {
    SCOPED_TRACE(incremental);
    SaveOptions options;
    options.incremental = incremental;
    FailingFileSystem full_disk;
    full_disk.write_errno = ENOSPC;
    const absl::Status s = snapshot_format::SaveSnapshotUsing(full_disk, *cache, {seq}, path, options).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
    EXPECT_EQ(FileSystemErrno(s), ENOSPC);
    EXPECT_THAT(s.message(), HasSubstr(path));
    EXPECT_EQ(ReadFile(path), before);
    EXPECT_EQ(FilesBeside(path).size(), 1u);

    FailingFileSystem header_sync;  // the blocks' flush works, the header's fails
    header_sync.file_sync_errno = EIO;
    header_sync.failing_file_sync = 2;
    const absl::Status h = snapshot_format::SaveSnapshotUsing(header_sync, *cache, {seq}, path, options).status();
    EXPECT_EQ(FileSystemErrno(h), EIO) << h;
    EXPECT_EQ(ReadFile(path), before);
    EXPECT_EQ(FilesBeside(path).size(), 1u);
  }
  EXPECT_EQ(FileSystemErrno(absl::NotFoundError("no errno")), 0);
  // Nothing changed: the next save appends to the previous file.
  const absl::StatusOr<SaveStats> next = SaveSnapshot(*cache, {seq}, path);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_FALSE(next->rewrote);
  EXPECT_GT(next->rows_reused, 0);
  std::remove(path.c_str());
}

// The crafted files of the snapshot fuzzer's corpus (overflow_*: header and
// block fields at the edge of int64 arithmetic, checksums valid).
TEST(SnapshotCorpus, CraftedOverflowFilesAreDataLoss) {
  const std::string sample = KVC_SAMPLE_SNAPSHOT;  // <source>/tests/data/sample.kvcsnap
  const std::string dir = sample.substr(0, sample.rfind("/data/")) + "/fuzz/corpus/snapshot/";
  int files = 0;
  for (const std::string& name : FilesBeside(dir + "overflow_")) {
    SCOPED_TRACE(name);
    ++files;
    EXPECT_EQ(VerifySnapshot(dir + name).status().code(), absl::StatusCode::kDataLoss) << VerifySnapshot(dir + name).status();
    const TinyModel model;
    auto cache = NewCache(model);
    EXPECT_EQ(RestoreSnapshot(*cache, dir + name).status().code(), absl::StatusCode::kDataLoss);
    EXPECT_EQ(cache->Usage().sequences, 0);
  }
  EXPECT_GE(files, 3);
}

// --- A writer killed mid-save ----------------------------------------------------

// Saves `length` tokens of the test sequence to `path` (a full save).
void SaveGrownSequence(const TinyModel& model, const std::string& path, int64_t length) {
  auto cache = NewCache(model);
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, length, kSeed).ok());
  ASSERT_TRUE(SaveSnapshot(*cache, {seq}, path).ok());
}

// The child saves in a loop, growing its sequence between saves (every
// third save a full rewrite); once it has saved, the parent kills it at a
// random moment. The file must then restore to exactly one of the states
// the child saved, and at least one kill must have interrupted a write.
TEST(SnapshotCrash, KilledWriterLeavesThePreviousSnapshotUsable) {
  const TinyModel model;
  const std::string path = TempPath("crash");
  constexpr int64_t kStart = 400, kStep = 40;
  ASSERT_NO_FATAL_FAILURE(SaveGrownSequence(model, path, kStart));
  std::mt19937 rng(11);
  // 30 kills anywhere. How many land mid-write is chance (a save spends
  // much of its time checking the file it appends to), so it is only
  // reported: WriterKilledMidIncrementalSaveKeepsThePreviousCommit and the
  // full-save tests below kill inside a write every time.
  int interrupted = 0, kills = 0;
  for (int trial = 0; trial < 30; ++trial) {
    int ready[2];  // the child writes a byte after each of its first two saves
    ASSERT_EQ(::pipe(ready), 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::close(ready[0]);
      auto cache = NewCache(model);
      const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*cache, path);
      if (!ids.ok()) ::_exit(4);
      const SequenceId seq = (*ids)[0];
      for (int save = 0;; ++save) {
        const int64_t length = *cache->Length(seq, 0);
        if (!model.Grow(*cache, seq, length + kStep, kSeed).ok()) ::_exit(2);
        SaveOptions options;
        options.incremental = save % 3 != 2;
        if (!SaveSnapshot(*cache, {seq}, path, options).ok()) ::_exit(3);
        if (save < 2 && ::write(ready[1], "x", 1) != 1) ::_exit(5);
      }
    }
    ::close(ready[1]);
    char byte = 0;
    ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "the writer died before its first save";
    const auto first = std::chrono::steady_clock::now();
    ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "the writer died before its second save";
    ::close(ready[0]);
    // Anywhere in the next three grow-and-save cycles, timed on this one (a
    // fixed window missed every save where a cycle outlasts it: sanitizers on
    // a slow machine spent it all growing and checking).
    const auto cycle = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - first);
    const uint64_t window_us = std::max<uint64_t>(1000, 3 * static_cast<uint64_t>(cycle.count()));
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % window_us));
    ASSERT_EQ(::kill(child, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << "the writer failed by itself: exit " << WEXITSTATUS(status);
    ++kills;

    const absl::StatusOr<SnapshotInfo> info = ReadSnapshotInfo(path);
    ASSERT_TRUE(info.ok()) << "trial " << trial << ": " << info.status();
    // A named temporary file is left only where O_TMPFILE is unsupported, or
    // by a kill between naming the finished file and renaming it.
    const absl::StatusOr<std::vector<std::string>> left = FindLeftoverTempFiles(path);
    ASSERT_TRUE(left.ok()) << left.status();
    interrupted += info->unfinished_bytes > 0 || !left->empty();
    for (const std::string& temp : *left) std::remove(temp.c_str());
    auto restored = NewCache(model);
    const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*restored, path);
    ASSERT_TRUE(ids.ok()) << "trial " << trial << ": " << ids.status();
    const int64_t length = *restored->Length((*ids)[0], 0);
    ASSERT_EQ((length - kStart) % kStep, 0) << length;
    auto reference = NewCache(model);
    const SequenceId expected = *reference->CreateSequence();
    ASSERT_TRUE(model.Grow(*reference, expected, length, kSeed).ok());
    EXPECT_EQ(ObservableBytes(*restored, (*ids)[0]), ObservableBytes(*reference, expected)) << "trial " << trial;
  }
  std::printf("[ crash    ] %d writers killed, %d of them mid-save (unfinished tail or temporary file left)\n",
              kills, interrupted);
  std::remove(path.c_str());
}

// --- A full save killed while it writes --------------------------------------------

// The real file system, except that the first write of a save goes through
// and then the process stops (tells the parent on `ready`, then waits to be
// killed); `unnamed_errno` != 0 makes O_TMPFILE unsupported.
class StallingFileSystem : public snapshot_format::FileSystem {
 public:
  explicit StallingFileSystem(int ready) : ready_(ready) {}
  int unnamed_errno = 0;
  ssize_t Pwrite(int fd, const void* data, size_t n, off_t offset) override {
    const ssize_t put = FileSystem::Pwrite(fd, data, n, offset);
    if (::write(ready_, "x", 1) != 1) ::_exit(5);
    for (;;) ::pause();
    return put;
  }
  int OpenUnnamed(const char* dir, int flags, mode_t mode) override {
    if (unnamed_errno == 0) return FileSystem::OpenUnnamed(dir, flags, mode);
    errno = unnamed_errno;
    return -1;
  }

 private:
  int ready_;
};

// Whether the directory of `path` supports O_TMPFILE.
bool UnnamedFilesSupported(const std::string& path) {
  const int fd = ::open(path.substr(0, path.find_last_of('/')).c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd >= 0) ::close(fd);
  return fd >= 0;
}

// Saves `length` tokens of a sequence to `path` in a save that a child
// process makes and is SIGKILLed in the middle of (after its first write).
// A full save grows a new sequence; an incremental one restores `path`'s
// sequence first and appends what it grew since.
void KillASaveMidWrite(const TinyModel& model, const std::string& path, int64_t length, int unnamed_errno,
                       bool incremental) {
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(ready[0]);
    auto cache = NewCache(model);
    SequenceId seq = 0;
    if (incremental) {
      const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*cache, path);
      if (!ids.ok() || ids->size() != 1) ::_exit(4);
      seq = (*ids)[0];
    } else {
      seq = *cache->CreateSequence();
    }
    if (!model.Grow(*cache, seq, length, kSeed).ok()) ::_exit(2);
    StallingFileSystem fs(ready[1]);
    fs.unnamed_errno = unnamed_errno;
    SaveOptions options;
    options.incremental = incremental;
    const absl::StatusOr<SaveStats> saved = snapshot_format::SaveSnapshotUsing(fs, *cache, {seq}, path, options);
    ::_exit(saved.ok() ? 3 : 6);  // the save returned: it never wrote
  }
  ::close(ready[1]);
  char byte = 0;
  const ssize_t got = ::read(ready[0], &byte, 1);
  ::close(ready[0]);
  ASSERT_EQ(::kill(child, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_EQ(got, 1) << "the writer never wrote: exit " << WEXITSTATUS(status);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
}

// The snapshot at `path` restores to `length` tokens of the test sequence.
void ExpectRestoresTo(const TinyModel& model, const std::string& path, int64_t length) {
  auto restored = NewCache(model);
  const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*restored, path);
  ASSERT_TRUE(ids.ok()) << ids.status();
  auto reference = NewCache(model);
  const SequenceId expected = *reference->CreateSequence();
  ASSERT_TRUE(model.Grow(*reference, expected, length, kSeed).ok());
  EXPECT_TRUE(ObservableBytes(*restored, (*ids)[0]) == ObservableBytes(*reference, expected)) << "restored state differs";
}

// Killed after an incremental save's first write, a writer leaves the
// previous commit plus an unfinished tail: the file reports the tail,
// restores to the previous commit, and the next save drops the tail.
TEST(SnapshotCrash, WriterKilledMidIncrementalSaveKeepsThePreviousCommit) {
  const TinyModel model;
  const std::string path = TempPath("killed_incremental.kvcsnap");
  ASSERT_NO_FATAL_FAILURE(SaveGrownSequence(model, path, 300));
  const absl::StatusOr<SnapshotInfo> before = ReadSnapshotInfo(path);
  ASSERT_TRUE(before.ok()) << before.status();
  KillASaveMidWrite(model, path, 400, 0, true);
  const absl::StatusOr<SnapshotInfo> info = ReadSnapshotInfo(path);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_GT(info->unfinished_bytes, 0) << "the killed save appended nothing";
  EXPECT_EQ(before->unfinished_bytes, 0);
  ExpectRestoresTo(model, path, 300);
  // A later incremental save appends after the previous commit.
  {
    auto cache = NewCache(model);
    const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*cache, path);
    ASSERT_TRUE(ids.ok()) << ids.status();
    ASSERT_TRUE(model.Grow(*cache, (*ids)[0], 340, kSeed).ok());
    ASSERT_TRUE(SaveSnapshot(*cache, {(*ids)[0]}, path).ok());
  }
  const absl::StatusOr<SnapshotInfo> after = ReadSnapshotInfo(path);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->unfinished_bytes, 0);
  EXPECT_EQ(after->saves, before->saves + 1) << "the save after the kill rewrote the file instead of appending";
  ExpectRestoresTo(model, path, 340);
  std::remove(path.c_str());
}

// Killed in the middle of writing a full save, a writer leaves nothing but
// the previous snapshot: the new file had no name yet (O_TMPFILE).
TEST(SnapshotCrash, WriterKilledMidFullSaveLeavesNoTempFile) {
  const TinyModel model;
  const std::string path = TempPath("killed_full.kvcsnap");
  ASSERT_NO_FATAL_FAILURE(SaveGrownSequence(model, path, 300));
  KillASaveMidWrite(model, path, 400, 0, false);
  ExpectRestoresTo(model, path, 300);
  const std::vector<std::string> beside = FilesBeside(path);
  for (const std::string& name : beside) {
    if (name != beside[0]) ::unlink((path.substr(0, path.find_last_of('/') + 1) + name).c_str());
  }
  std::remove(path.c_str());
  if (!UnnamedFilesSupported(path)) {
    GTEST_SKIP() << "O_TMPFILE is not supported in " << ::testing::TempDir()
                 << ": a killed full save leaves its named temporary file there";
  }
  EXPECT_EQ(beside, std::vector<std::string>{"kvc_snapshot_" + std::to_string(::getpid()) + "_killed_full.kvcsnap"})
      << "a temporary file was left";
}

// Where O_TMPFILE is not supported the new file is named path.tmp-<16 hex>;
// one left by a killed writer is what FindLeftoverTempFiles and
// `kvc-snapshot info` and `verify` report (nothing is deleted).
TEST(SnapshotCrash, NamedTempFileLeftByAKilledWriterIsReported) {
  const TinyModel model;
  const std::string path = TempPath("killed_named.kvcsnap");
  ASSERT_NO_FATAL_FAILURE(SaveGrownSequence(model, path, 300));
  const absl::StatusOr<std::vector<std::string>> none = FindLeftoverTempFiles(path);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());
  WriteFile(path + ".tmp-0123456789abcdeg", "not hex");  // not a temp file's name: never reported
  WriteFile(path + ".tmp-0123456789ABCDEF", "upper case");
  KillASaveMidWrite(model, path, 400, EOPNOTSUPP, false);
  ExpectRestoresTo(model, path, 300);
  const absl::StatusOr<std::vector<std::string>> left = FindLeftoverTempFiles(path);
  ASSERT_TRUE(left.ok()) << left.status();
  ASSERT_EQ(left->size(), 1u);
  const std::string& temp = (*left)[0];
  EXPECT_EQ(temp.size(), path.size() + 5 + 16);
  EXPECT_EQ(temp.rfind(path + ".tmp-", 0), 0u) << temp;
  EXPECT_GT(ReadFile(temp).size(), 0u);
#ifdef KVC_SNAPSHOT_EXE
  for (const char* command : {"info ", "verify "}) {
    std::string out;
    EXPECT_EQ(testing::RunProgram(KVC_SNAPSHOT_EXE, command + path, &out, true), 0) << out;
    EXPECT_THAT(out, HasSubstr(temp));
    EXPECT_THAT(out, ::testing::Not(HasSubstr("abcdeg")));
    EXPECT_THAT(out, ::testing::Not(HasSubstr("ABCDEF")));
  }
#endif
  EXPECT_TRUE(::access(temp.c_str(), F_OK) == 0) << "reporting deleted it";
  ::unlink(temp.c_str());
  std::remove((path + ".tmp-0123456789abcdeg").c_str());
  std::remove((path + ".tmp-0123456789ABCDEF").c_str());
  std::remove(path.c_str());
}

// --- Paths that are not regular files -------------------------------------------

// How `call` ended in a child process given 5 s: "refused" (a file-system
// error, `error`, naming `path`), "hung", "accepted", or the other error.
std::string RunGuarded(const std::function<absl::Status()>& call, const std::string& path, int error, bool drop_root) {
  int report[2];
  if (::pipe(report) != 0) return "pipe failed";
  const pid_t child = ::fork();
  if (child < 0) return "fork failed";
  if (child == 0) {
    ::close(report[0]);
    ::alarm(5);
    // A regression must not replace a device node: never as root.
    if (drop_root && ::geteuid() == 0 && ::setresuid(65534, 65534, 65534) != 0) ::_exit(6);
    const absl::Status s = call();
    std::string what = s.ok() ? "accepted" : std::string(s.ToString());
    if (FileSystemErrno(s) == error && s.message().find(path) != absl::string_view::npos) what = "refused";
    if (::write(report[1], what.data(), what.size()) < 0) ::_exit(5);
    ::_exit(0);
  }
  ::close(report[1]);
  std::string what;
  char buffer[512];
  for (ssize_t got; (got = ::read(report[0], buffer, sizeof(buffer))) > 0;) what.append(buffer, static_cast<size_t>(got));
  ::close(report[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM) return "hung";
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return "child failed: " + std::to_string(status);
  return what;
}

mode_t TypeOf(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0 ? (st.st_mode & S_IFMT) : 0;
}

// Restoring, inspecting, verifying or saving onto a FIFO, a device or a
// directory neither blocks nor writes into it nor replaces it: a
// file-system error (EINVAL, EISDIR for a directory; KVC_ERR_IO through the
// C API) naming the path.
TEST(SnapshotSpecialFiles, AreRefusedWithoutBlockingOrWriting) {
  const TinyModel model;
  const std::string fifo = TempPath("fifo.kvcsnap"), dir = TempPath("dir.kvcsnap");
  std::remove(fifo.c_str());
  ::rmdir(dir.c_str());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
  struct Case {
    std::string path;
    int error;
    bool drop_root;
  };
  for (const Case& c : {Case{fifo, EINVAL, false}, Case{"/dev/null", EINVAL, true}, Case{dir, EISDIR, false}}) {
    SCOPED_TRACE(c.path);
    const mode_t type = TypeOf(c.path);
    const std::string& path = c.path;
    EXPECT_EQ(RunGuarded([&] {
      auto cache = NewCache(model);
      return RestoreSnapshot(*cache, path).status();
    }, path, c.error, c.drop_root), "refused");
    EXPECT_EQ(RunGuarded([&] { return ReadSnapshotInfo(path).status(); }, path, c.error, c.drop_root), "refused");
    EXPECT_EQ(RunGuarded([&] { return VerifySnapshot(path).status(); }, path, c.error, c.drop_root), "refused");
    for (const bool incremental : {true, false}) {
      SCOPED_TRACE(incremental);
      EXPECT_EQ(RunGuarded([&] {
        auto cache = NewCache(model);
        const SequenceId seq = *cache->CreateSequence();
        if (!model.Grow(*cache, seq, 150, kSeed).ok()) return absl::InternalError("grow");
        SaveOptions options;
        options.incremental = incremental;
        return SaveSnapshot(*cache, {seq}, path, options).status();
      }, path, c.error, c.drop_root), "refused");
      EXPECT_EQ(TypeOf(path), type) << "replaced";
    }
    if (path != "/dev/null") {
      EXPECT_EQ(FilesBeside(path).size(), 1u);  // no temporary file left
    }
  }
  std::remove(fifo.c_str());
  ::rmdir(dir.c_str());
}

// --- A symlink at the path ---------------------------------------------------------

// Saves through a symlink update the file it points to, appending or
// rewriting: the link stays a link, and the rewrite's new file is made in
// the target's directory.
TEST(SnapshotSymlink, SavesUpdateTheTargetInPlace) {
  const TinyModel model;
  auto cache = NewCache(model);
  const SequenceId seq = *cache->CreateSequence();
  ASSERT_TRUE(model.Grow(*cache, seq, 150, kSeed).ok());
  const std::string target = TempPath("target.kvcsnap"), link = TempPath("link.kvcsnap");
  std::remove(target.c_str());
  std::remove(link.c_str());
  ASSERT_TRUE(SaveSnapshot(*cache, {seq}, target).ok());
  ASSERT_EQ(::symlink(target.c_str(), link.c_str()), 0);
  ASSERT_TRUE(model.Grow(*cache, seq, 200, kSeed).ok());
  const absl::StatusOr<SaveStats> appended = SaveSnapshot(*cache, {seq}, link);
  ASSERT_TRUE(appended.ok()) << appended.status();
  EXPECT_FALSE(appended->rewrote);
  ASSERT_TRUE(model.Grow(*cache, seq, 250, kSeed).ok());
  SaveOptions full;
  full.incremental = false;
  const absl::StatusOr<SaveStats> rewritten = SaveSnapshot(*cache, {seq}, link, full);
  ASSERT_TRUE(rewritten.ok()) << rewritten.status();
  EXPECT_TRUE(rewritten->rewrote);
  EXPECT_EQ(TypeOf(link), static_cast<mode_t>(S_IFLNK)) << "the rewrite replaced the link";
  ExpectRestoresTo(model, target, 250);
  ExpectRestoresTo(model, link, 250);
  EXPECT_EQ(FilesBeside(target).size(), 1u);
  EXPECT_EQ(FilesBeside(link).size(), 1u);
  std::remove(link.c_str());
  std::remove(target.c_str());
}

// --- The checked-in sample -----------------------------------------------------

// tests/data/sample.kvcsnap: two sequences of the tiny model (engine-made HCA
// entries), saved, grown and saved again incrementally. Restoring it must
// give exactly what recomputing those steps gives: the format this build
// reads is the one earlier builds wrote. KVC_WRITE_SAMPLE=1 rewrites it
// (only when the format version changes).
struct SampleSteps {
  TinyModel model{/*hca_by_kvc=*/false};
  std::unique_ptr<Cache> cache = NewCache(model);
  SequenceId a = 0, b = 0;
  void Before() {
    a = *cache->CreateSequence();
    ASSERT_TRUE(model.Grow(*cache, a, 150, kSeed).ok());
    b = *cache->Fork(a);
    ASSERT_TRUE(model.Grow(*cache, b, 170, kSeed + 1).ok());
  }
  void After() {
    ASSERT_TRUE(cache->Truncate(a, 148).ok());
    ASSERT_TRUE(model.Grow(*cache, a, 160, kSeed + 2).ok());
  }
};

TEST(SampleSnapshot, RestoresToTheStateItWasMadeFrom) {
  const std::string sample = KVC_SAMPLE_SNAPSHOT;
  SampleSteps steps;
  steps.Before();
  if (std::getenv("KVC_WRITE_SAMPLE") != nullptr) {
    std::remove(sample.c_str());
    ASSERT_TRUE(SaveSnapshot(*steps.cache, {steps.a, steps.b}, sample).ok());
    steps.After();
    ASSERT_TRUE(SaveSnapshot(*steps.cache, {steps.a, steps.b}, sample).ok());
    GTEST_SKIP() << "wrote " << sample;
  }
  steps.After();
  const absl::StatusOr<SnapshotInfo> info = VerifySnapshot(sample);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->saves, 2);
  EXPECT_EQ(info->format_version, kSnapshotFormatVersion);
  auto restored = NewCache(steps.model);
  const absl::StatusOr<std::vector<SequenceId>> ids = RestoreSnapshot(*restored, sample);
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_EQ(ids->size(), 2u);
  EXPECT_EQ(ObservableBytes(*restored, (*ids)[0]), ObservableBytes(*steps.cache, steps.a));
  EXPECT_EQ(ObservableBytes(*restored, (*ids)[1]), ObservableBytes(*steps.cache, steps.b));
  // And it continues like the original.
  ASSERT_TRUE(steps.model.Grow(*restored, (*ids)[0], 200, kSeed + 2).ok());
  ASSERT_TRUE(steps.model.Grow(*steps.cache, steps.a, 200, kSeed + 2).ok());
  EXPECT_EQ(ObservableBytes(*restored, (*ids)[0]), ObservableBytes(*steps.cache, steps.a));
}

#ifdef KVC_SNAPSHOT_EXE
TEST(SnapshotTool, InfoAndVerifyWithExitStatus) {
  const std::string sample = KVC_SAMPLE_SNAPSHOT;
  std::string out;
  EXPECT_EQ(testing::RunProgram(KVC_SNAPSHOT_EXE, "verify " + sample, &out, true), 0) << out;
  EXPECT_THAT(out, HasSubstr("OK: 33 blocks verified"));
  EXPECT_THAT(out, HasSubstr("3 layers: WCH"));
  out.clear();
  EXPECT_EQ(testing::RunProgram(KVC_SNAPSHOT_EXE, "info " + sample, &out, true), 0) << out;
  EXPECT_THAT(out, HasSubstr("170 tokens, rollback floor 166"));

  const std::string bytes = ReadFile(sample);
  const std::string path = TempPath("tool");
  WriteFile(path, bytes.substr(0, bytes.size() - 1));
  out.clear();
  EXPECT_EQ(testing::RunProgram(KVC_SNAPSHOT_EXE, "verify " + path, &out, true), 1);
  EXPECT_THAT(out, HasSubstr("truncated"));
  std::string flipped = bytes;
  flipped[1000] = static_cast<char>(flipped[1000] ^ 0x10);  // inside the first block, superseded or not
  WriteFile(path, flipped);
  out.clear();
  EXPECT_EQ(testing::RunProgram(KVC_SNAPSHOT_EXE, "verify " + path, &out, true), 1);
  EXPECT_THAT(out, HasSubstr("checksum mismatch"));
  EXPECT_EQ(testing::RunProgram(KVC_SNAPSHOT_EXE, "check " + path, &out, true), 2);
  std::remove(path.c_str());
}
#endif

}  // namespace
}  // namespace kvc
