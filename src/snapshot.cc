// Snapshots of a cache's sequences (kvc/snapshot.h): the cache side. What a
// sequence is made of is in src/cache_internal.h; how it is laid out in a
// file, and read back with every check, in src/snapshot_format.h.
#include "kvc/snapshot.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "src/crc32c.h"
#include "src/status.h"
#include "src/cache_internal.h"
#include "src/snapshot_format.h"

namespace kvc {

// The friend of Cache through which snapshots reach its private state.
class SnapshotAccess {
 public:
  using Impl = Cache::Impl;
  static Impl& Of(const Cache& cache) { return *cache.impl_; }
};

namespace {

using Impl = SnapshotAccess::Impl;
using snapshot_format::BlockScan;
using snapshot_format::BlockType;
using snapshot_format::BlockWriter;
using snapshot_format::CheckSameModel;
using snapshot_format::Commit;
using snapshot_format::EncodeCommit;
using snapshot_format::EncodeHeader;
using snapshot_format::EncodeRowsPreamble;
using snapshot_format::Encoder;
using snapshot_format::Extent;
using snapshot_format::File;
using snapshot_format::FileSystem;
using snapshot_format::FileHeader;
using snapshot_format::Geometry;
using snapshot_format::GeometryOf;
using snapshot_format::IoError;
using snapshot_format::kFileHeaderBytes;
using snapshot_format::kStreamFormat;
using snapshot_format::kStreams;
using snapshot_format::LayerEntry;
using snapshot_format::ModelDescription;
using snapshot_format::NewTag;
using snapshot_format::OpenedSnapshot;
using snapshot_format::OpenSnapshot;
using snapshot_format::ReadRows;
using snapshot_format::ReadState;
using snapshot_format::RowsBlock;
using snapshot_format::ScanBlocks;
using snapshot_format::SequenceEntry;
using snapshot_format::StateBlock;
using snapshot_format::StreamEntry;
using snapshot_format::SyncDirectoryOf;
using snapshot_format::VerifyBlocks;
using snapshot_format::WithContext;

// --- The model as this cache describes it, and writing its sequences -------

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
  // The state blocks' rings hold window + draft_slots rows. Absent (what
  // every file before draft slots has) means 0, so a cache without draft
  // slots describes itself, and writes its files, exactly as before.
  if (impl.options.draft_slots != 0) add("draft_slots", absl::StrCat(impl.options.draft_slots));
  for (size_t i = 0; i < s.layers.size(); ++i) {
    m.fields.emplace_back(absl::StrCat("layer ", i, " compressor"), ParamsText(s.layers[i].compressor));
    m.fields.emplace_back(absl::StrCat("layer ", i, " indexer"), ParamsText(s.layers[i].indexer));
  }
  return m;
}

// Writes one sequence (its lock held): rows the file already holds for it
// are referenced again, the rest written. Section sizes come from the same
// Geometry a reader checks them against. Returns its commit entry.
absl::StatusOr<SequenceEntry> WriteSequence(const Impl& impl, const Geometry& geometry, Sequence& seq, SequenceId id,
                                            const SequenceEntry* prior, BlockWriter& out, SaveStats& stats) {
  SequenceEntry entry;
  entry.tag = NewTag();
  entry.saved_id = id;
  const int64_t low = seq.snapshot_low_water;
  for (size_t i = 0; i < seq.layers.size(); ++i) {
    const int li = static_cast<int>(i);
    LayerStreams& ls = seq.layers[i];
    const LayerKind kind = impl.spec.layers[i].kind;
    const LayerEntry* before = prior != nullptr ? &prior->layers[i] : nullptr;
    LayerEntry layer;
    layer.length = ls.length;
    layer.floor = ls.floor;
    const HistoryStream* histories[kStreams] = {impl.RowsOf(li), impl.KeysOf(li)};
    for (int st = 0; st < kStreams; ++st) {
      const HistoryStream* h = histories[st];
      StreamEntry& stream = layer.streams[st];
      stream.rows = h != nullptr ? h->Rows(seq, li) : 0;
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
        const uint32_t n = static_cast<uint32_t>(std::min(stream.rows - r, h->per_page() - r % h->per_page()));
        const ConstPackedRows rows = h->RowsAt(seq, li, r, n);
        out.Begin();
        std::string& payload = out.payload();
        payload += EncodeRowsPreamble(static_cast<uint32_t>(i), st, r, n);
        // Then the rows verbatim, data part then scale part (appended, not
        // CopyRows into a resized string: no zero-fill of 3.5 GB at 1M tokens).
        for (uint32_t k = 0; k < n; ++k) {
          payload.append(reinterpret_cast<const char*>(rows.row_data(k)), static_cast<size_t>(FormatInfo(h->format()).data_bytes));
          payload.append(reinterpret_cast<const char*>(rows.row_scales(k)), static_cast<size_t>(FormatInfo(h->format()).scale_bytes));
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
      // The parts in the block's order: ring and rollback, main state, indexer state.
      impl.window_part->Encode(seq, li, e);
      const LayerParts parts = PartsOf(kind);
      if (geometry.MainStateFloats(i) > 0) impl.State(parts.main_state)->Encode(seq, li, e);
      if (geometry.IndexerStateFloats(i) > 0) impl.State(parts.indexer_state)->Encode(seq, li, e);
      KVC_ASSIGN_OR_RETURN(layer.state_offset, out.Add(BlockType::kState, e.bytes()));
    }
    entry.layers.push_back(std::move(layer));
  }
  return entry;
}

// A sequence's incremental state as a save found it and as it set it (under
// the sequence's lock, so that a Truncate after it lowers the new low water).
struct Written {
  Sequence* seq;
  uint64_t tag;  // this save's
  uint64_t prior_tag;
  int64_t prior_low_water;
};

// Puts back what a failed save set: the prior tag, and the low water it
// would have now had the save not run. That is min(prior, now): the low
// water never exceeds the sequence's shortest layer, so the save's value
// was >= the prior one, and a Truncate since lowered `now` to its length.
// Left alone if another save (to another path) has set its own tag since.
void Undo(const Written& w) {
  std::lock_guard<std::mutex> lock(w.seq->mu);
  if (w.seq->snapshot_tag != w.tag) return;
  w.seq->snapshot_tag = w.prior_tag;
  w.seq->snapshot_low_water = std::min(w.prior_low_water, w.seq->snapshot_low_water);
}

// Puts an appended-to file back to its previous commit after a failed save:
// the previous header (when the new one may have reached the file) and no
// tail past it.
absl::Status RestorePreviousCommit(File& file, const FileHeader& previous, bool header_written) {
  if (header_written) {
    const auto raw = EncodeHeader(previous);
    KVC_RETURN_IF_ERROR(file.WriteAt(0, raw.data(), raw.size()));
    KVC_RETURN_IF_ERROR(file.Sync());
  }
  return file.Truncate(previous.committed);
}

}  // namespace

namespace {

// `skip_freed`: leave out sequences freed while the save runs (whole-cache
// saves); otherwise that is kNotFound.
absl::StatusOr<SaveStats> Save(FileSystem& fs, const Cache& cache, absl::Span<const SequenceId> ids,
                               const std::string& path_given, const SaveOptions& options, bool skip_freed) {
  // The file a symlink at `path_given` points to: appends and rewrites both
  // update it in place. Not a FIFO, device or directory (refused here,
  // before anything is opened or written).
  KVC_ASSIGN_OR_RETURN(const snapshot_format::SaveTarget target, snapshot_format::ResolveSaveTarget(path_given));
  const std::string& path = target.path;
  Impl& impl = SnapshotAccess::Of(cache);
  KVC_RETURN_IF_ERROR(impl.RefuseInPageManagerMode("SaveSnapshot"));
  std::vector<std::pair<SequenceId, std::shared_ptr<Sequence>>> seqs;
  for (const SequenceId id : ids) {
    absl::StatusOr<std::shared_ptr<Sequence>> seq = impl.Find(id);
    if (!seq.ok() && skip_freed) continue;
    if (!seq.ok()) return seq.status();
    seqs.emplace_back(id, *std::move(seq));
  }
  const ModelDescription model = Describe(impl);
  KVC_ASSIGN_OR_RETURN(const Geometry geometry, GeometryOf(model, path));

  // Append to the existing file if a restore would accept it (every block
  // checked: never build on a damaged file) and it is not mostly superseded
  // data; otherwise write a fresh one.
  std::optional<OpenedSnapshot> existing;
  if (options.incremental) {
    absl::StatusOr<OpenedSnapshot> s = OpenSnapshot(path, O_RDWR, fs);
    if (s.ok() && CheckSameModel(s->model, model, path).ok()) {
      const absl::StatusOr<BlockScan> scan = VerifyBlocks(*s);
      if (scan.ok() && 2 * scan->live_bytes >= s->header.committed) existing = *std::move(s);
    }
  }
  SaveStats stats;
  stats.rewrote = !existing.has_value();
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
    // Unnamed until complete (or a unique new name beside `path`); the mode
    // of the file it replaces, else 0600.
    KVC_ASSIGN_OR_RETURN(File f, File::CreateReplacementFor(path, target.exists ? (target.mode & 0777) : 0600,
                                                            target.exists, fs));
    owned = std::make_unique<File>(std::move(f));
    file = owned.get();
    header.file_tag = NewTag();
    header.committed = kFileHeaderBytes;
  }
  const FileHeader previous = header;
  BlockWriter out(file, header.committed);
  std::vector<Written> written;
  bool header_written = false;
  absl::Status status = [&]() -> absl::Status {
    if (!existing) {
      KVC_ASSIGN_OR_RETURN(commit.model_offset, out.Add(BlockType::kModel, model.Encode()));
    }
    for (const auto& [id, seq] : seqs) {
      std::lock_guard<std::mutex> lock(seq->mu);
      if (seq->freed && skip_freed) continue;
      if (seq->freed) return absl::NotFoundError(absl::StrCat("sequence ", id, " was freed"));
      KVC_RETURN_IF_ERROR(Impl::RefuseInStep(*seq, id, "SaveSnapshot"));  // its layers may be mid-step
      const SequenceEntry* prior = nullptr;
      if (existing && seq->snapshot_tag != 0) {
        for (const SequenceEntry& e : existing->commit.sequences) {
          if (e.tag == seq->snapshot_tag) prior = &e;
        }
      }
      KVC_ASSIGN_OR_RETURN(SequenceEntry entry, WriteSequence(impl, geometry, *seq, id, prior, out, stats));
      int64_t shortest = entry.layers.empty() ? 0 : entry.layers[0].length;
      for (const LayerEntry& l : entry.layers) shortest = std::min(shortest, l.length);
      written.push_back({seq.get(), entry.tag, seq->snapshot_tag, seq->snapshot_low_water});
      seq->snapshot_tag = entry.tag;  // undone below if the save fails
      seq->snapshot_low_water = shortest;
      commit.sequences.push_back(std::move(entry));
    }
    KVC_ASSIGN_OR_RETURN(header.last_commit, out.Add(BlockType::kCommit, EncodeCommit(commit)));
    KVC_RETURN_IF_ERROR(out.Flush());
    KVC_RETURN_IF_ERROR(file->Sync());  // the blocks are durable before the header points at them
    header.committed = out.offset();
    header.saves += 1;
    const auto raw = EncodeHeader(header);
    header_written = true;  // from here the file may hold the new header
    KVC_RETURN_IF_ERROR(file->WriteAt(0, raw.data(), raw.size()));
    KVC_RETURN_IF_ERROR(file->Sync());
    if (!existing) {
      KVC_RETURN_IF_ERROR(file->Replace(path));
      // The new file is in place whatever happens now: report, don't fail.
      stats.directory_sync = SyncDirectoryOf(path, fs);
      stats.durable = stats.directory_sync.ok();
    }
    return absl::OkStatus();
  }();
  if (!status.ok()) {
    for (auto w = written.rbegin(); w != written.rend(); ++w) Undo(*w);
    if (existing) {
      const absl::Status undo = RestorePreviousCommit(*file, previous, header_written);
      if (!undo.ok()) {
        status = WithContext(status, absl::StrCat("; restoring the previous commit failed too (", undo.message(),
                                                  "): the file holds the previous commit or this save's, "
                                                  "each complete"));
      }
    } else if (const absl::Status discard = file->Discard(); !discard.ok()) {
      status = WithContext(status, absl::StrCat("; the temporary file ", file->path(), " could not be removed (",
                                                discard.message(), ")"));
    }
    return status;
  }
  stats.bytes_written = out.bytes() + kFileHeaderBytes;
  stats.file_bytes = header.committed;
  return stats;
}

}  // namespace

namespace snapshot_format {

absl::StatusOr<SaveStats> SaveSnapshotUsing(FileSystem& fs, const Cache& cache, absl::Span<const SequenceId> ids,
                                            const std::string& path, const SaveOptions& options) {
  return Save(fs, cache, ids, path, options, /*skip_freed=*/false);
}

}  // namespace snapshot_format

absl::StatusOr<SaveStats> SaveSnapshot(const Cache& cache, absl::Span<const SequenceId> ids, const std::string& path,
                                       const SaveOptions& options) {
  return Save(FileSystem::Real(), cache, ids, path, options, /*skip_freed=*/false);
}

absl::StatusOr<SaveStats> SaveCacheSnapshot(const Cache& cache, const std::string& path, const SaveOptions& options) {
  return Save(FileSystem::Real(), cache, SnapshotAccess::Of(cache).Ids(), path, options, /*skip_freed=*/true);
}

absl::StatusOr<std::vector<SequenceId>> RestoreSnapshot(Cache& cache, const std::string& path) {
  Impl& impl = SnapshotAccess::Of(cache);
  KVC_RETURN_IF_ERROR(impl.RefuseInPageManagerMode("RestoreSnapshot"));
  KVC_ASSIGN_OR_RETURN(const OpenedSnapshot snap, OpenSnapshot(path));
  KVC_RETURN_IF_ERROR(CheckSameModel(snap.model, Describe(impl), path));
  KVC_RETURN_IF_ERROR(ScanBlocks(snap, /*check_superseded=*/true).status());
  const Geometry& g = snap.geometry;
  const File& f = *snap.file;
  const int64_t limit = snap.header.last_commit;

  // Build every sequence aside; only when all are complete do they join the cache.
  std::vector<std::shared_ptr<Sequence>> built;
  auto release_all = [&]() {
    for (const std::shared_ptr<Sequence>& seq : built) impl.Release(*seq);
  };
  std::vector<uint8_t> buffer;  // one block at a time
  absl::Status status = [&]() -> absl::Status {
    for (const SequenceEntry& entry : snap.commit.sequences) {
      auto seq = std::make_shared<Sequence>();
      KVC_RETURN_IF_ERROR(impl.AllocateState(*seq));
      built.push_back(seq);
      // The history tables first: each covers its stream's longest layer.
      int64_t longest[cache_internal::kStreamCount] = {};
      for (size_t i = 0; i < entry.layers.size(); ++i) {
        const int li = static_cast<int>(i);
        const HistoryStream* histories[kStreams] = {impl.RowsOf(li), impl.KeysOf(li)};
        for (int st = 0; st < kStreams; ++st) {
          const int64_t rows = entry.layers[i].streams[st].rows;
          if (rows == 0) continue;
          if (histories[st] == nullptr) {
            return absl::DataLossError(absl::StrCat(path, ": layer ", i, " has no ", st == 0 ? "compressed rows" : "index keys",
                                                    " but the snapshot holds ", rows));
          }
          longest[histories[st]->stream()] = std::max(longest[histories[st]->stream()], rows);
        }
      }
      for (const auto& h : impl.histories) {
        if (h != nullptr) KVC_RETURN_IF_ERROR(h->ReserveRows(*seq, longest[h->stream()]));
      }
      int64_t shortest = entry.layers.empty() ? 0 : entry.layers[0].length;
      for (size_t i = 0; i < entry.layers.size(); ++i) {
        const int li = static_cast<int>(i);
        const LayerEntry& le = entry.layers[i];
        LayerStreams& ls = seq->layers[i];
        shortest = std::min(shortest, le.length);
        KVC_ASSIGN_OR_RETURN(const StateBlock state,
                             ReadState(f, le.state_offset, limit, g, i, le.length, le.floor, &buffer));
        impl.window_part->Restore(*seq, li, state);
        const LayerParts parts = PartsOf(g.kinds[i]);
        if (parts.main_state >= 0 && g.MainStateFloats(i) > 0) impl.State(parts.main_state)->Restore(*seq, li, state.main_state);
        if (parts.indexer_state >= 0 && g.IndexerStateFloats(i) > 0) {
          impl.State(parts.indexer_state)->Restore(*seq, li, state.indexer_state);
        }
        ls.length = le.length;
        ls.ring_end = le.length;
        // How far the saved state ring was written is not in the file; at
        // most `depth` past the floor (a truncation never goes below it).
        ls.state_end = std::max(le.length, le.floor + impl.depth());
        ls.floor = le.floor;
        const HistoryStream* histories[kStreams] = {impl.RowsOf(li), impl.KeysOf(li)};
        for (int st = 0; st < kStreams; ++st) {
          const HistoryStream* h = histories[st];
          if (h == nullptr) continue;  // no rows (checked above)
          const StreamEntry& stream = le.streams[st];
          const RowFormat format = kStreamFormat[st];
          int64_t r = 0;
          for (const Extent& x : stream.extents) {
            KVC_ASSIGN_OR_RETURN(const RowsBlock block, ReadRows(f, x.offset, limit, i, st, r, x.rows, &buffer));
            h->RestoreRows(*seq, li, r, ContiguousRows(format, block.rows, x.rows));
            r += x.rows;
          }
          h->Rows(*seq, li) = stream.rows;
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
  // Verifying: every block, as a restore reads it (superseded ones by their checksum).
  KVC_ASSIGN_OR_RETURN(const BlockScan scan, verify_payloads ? VerifyBlocks(snap) : ScanBlocks(snap, false));
  info.blocks = scan.blocks;
  info.live_bytes = scan.live_bytes;
  if (verify_payloads) info.blocks_verified = info.blocks;
  return info;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> FindLeftoverTempFiles(const std::string& path) {
  const std::string file = snapshot_format::ResolveSymlink(path);
  const std::string dir = snapshot_format::DirectoryOf(file);
  const std::string prefix = file.substr(file.find_last_of('/') + 1) + ".tmp-";  // npos + 1 == 0
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return IoError("cannot list the directory", dir);
  std::vector<std::string> found;
  for (const dirent* e = ::readdir(d); e != nullptr; e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() != prefix.size() + 16 || name.compare(0, prefix.size(), prefix) != 0) continue;
    const bool hex = std::all_of(name.begin() + static_cast<std::ptrdiff_t>(prefix.size()), name.end(),
                                 [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
    if (hex) found.push_back(file.find('/') == std::string::npos ? name : dir + (dir == "/" ? "" : "/") + name);
  }
  ::closedir(d);
  std::sort(found.begin(), found.end());
  return found;
}

absl::StatusOr<SnapshotInfo> ReadSnapshotInfo(const std::string& path) { return Inspect(path, false); }
absl::StatusOr<SnapshotInfo> VerifySnapshot(const std::string& path) { return Inspect(path, true); }

}  // namespace kvc
