// Prefix caching (docs/prefix-cache.md): the Cache methods that publish a
// sequence's prefix and create sequences from published ones. The index,
// the pages each prefix holds and eviction are src/prefix_cache.h.
#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "src/cache_internal.h"
#include "src/status.h"

namespace kvc {

using cache_internal::PrefixCache;

namespace {

// Kind of the layers of history stream s (kCsaRowsStream, kCsaKeysStream:
// CSA; kHcaRowsStream: HCA).
LayerKind HistoryKind(int s) { return s == cache_internal::kHcaRowsStream ? LayerKind::kHca : LayerKind::kCsa; }

// The hashes as blocks: kInvalidArgument for none, or for more blocks than
// max_context holds (so n x B cannot overflow).
absl::Status CheckBlocks(absl::Span<const uint64_t> hashes, int64_t block_tokens, int64_t max_context,
                         const char* what) {
  const int64_t most = max_context / block_tokens;
  if (static_cast<int64_t>(hashes.size()) > most) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", hashes.size(), " blocks of ", block_tokens,
                                                   " tokens exceed max_context ", max_context, " (", most,
                                                   " blocks at most)"));
  }
  return absl::OkStatus();
}

}  // namespace

int64_t Cache::PrefixBlockTokens() const { return impl_->options.prefix_block_tokens; }

absl::Status Cache::PublishPrefix(SequenceId id, absl::Span<const uint64_t> hashes) {
  if (impl_->page_manager()) {
    return absl::FailedPreconditionError(
        "PublishPrefix: in page-manager mode the engine copies the checkpoint; call PublishPrefix(seq, hashes, "
        "&engine_copies)");
  }
  return PublishPrefix(id, hashes, nullptr);
}

absl::Status Cache::PublishPrefix(SequenceId id, absl::Span<const uint64_t> hashes,
                                  std::vector<PageCopy>* engine_copies) {
  constexpr const char* kWhat = "PublishPrefix";
  if (impl_->page_manager() && engine_copies == nullptr) {
    return absl::InvalidArgumentError("PublishPrefix: page-manager mode needs engine_copies for the copies the engine makes");
  }
  const int64_t B = PrefixBlockTokens();
  if (hashes.empty()) return absl::InvalidArgumentError(absl::StrCat(kWhat, ": no block hashes"));
  KVC_RETURN_IF_ERROR(CheckBlocks(hashes, B, impl_->spec.max_context, kWhat));
  const int64_t P = static_cast<int64_t>(hashes.size()) * B;
  KVC_ASSIGN_OR_RETURN(const Impl::Locked locked, impl_->Lock(id));
  const Sequence& seq = *locked.seq;
  KVC_RETURN_IF_ERROR(Impl::RefuseInStep(seq, id, kWhat));
  KVC_RETURN_IF_ERROR(impl_->SameLengthEverywhere(seq.layers, id, "PublishPrefix:"));
  const int64_t L = seq.layers[0].length;
  if (L < P) {
    return absl::FailedPreconditionError(absl::StrCat(kWhat, ": sequence ", id, " holds ", L, " tokens, fewer than the ",
                                                      hashes.size(), " blocks of ", B, " = ", P, " to publish"));
  }
  // The ring and compressor state at P: in kvc's mode the rollback records
  // put back what [P, L) evicted (P >= the floor); in page-manager mode the
  // ring and state rings still hold it while their furthest write is within
  // rollback_depth of P (draft_slots >= rollback_depth).
  int64_t floor = 0, ring_end = 0;
  for (const LayerStreams& ls : seq.layers) {
    floor = std::max(floor, ls.floor);
    ring_end = std::max(ring_end, ls.ring_end);
  }
  if (P < floor || ring_end - P > impl_->depth()) {
    return absl::FailedPreconditionError(absl::StrCat(
        kWhat, ": sequence ", id, " has passed ", P, " tokens by ", std::max(L, ring_end) - P,
        "; its ring and compressor state at ", P, " are gone (rollback floor ", floor, ", rollback_depth ",
        impl_->depth(), "): publish when the length is a multiple of ", B));
  }
  // Engine-compressed layers must hold the prefix's rows and keys.
  for (int layer = 0; layer < static_cast<int>(seq.layers.size()); ++layer) {
    const LayerKind kind = impl_->KindOf(layer);
    const int64_t need = EntriesAt(kind, P);
    for (const HistoryStream* part : {impl_->RowsOf(layer), impl_->KeysOf(layer)}) {
      if (part == nullptr || part->Rows(seq, layer) >= need) continue;
      return absl::FailedPreconditionError(absl::StrCat(
          kWhat, ": layer ", layer, " holds ", part->Rows(seq, layer), " ", impl_->store->spec(part->stream()).name,
          " but the ", P, " tokens close ", need, " windows; append them first"));
    }
  }
  KVC_RETURN_IF_ERROR(impl_->window_part->CheckTruncate(seq, L, P));

  // The prefix's history: the ids covering its rows, as the sequence has them.
  std::array<std::vector<PageId>, cache_internal::kStreamCount> tables;
  for (const int s : {cache_internal::kCsaRowsStream, cache_internal::kCsaKeysStream, cache_internal::kHcaRowsStream}) {
    const HistoryStream* part = impl_->History(s);
    if (part == nullptr) continue;
    const int64_t rows = EntriesAt(HistoryKind(s), P);
    const std::vector<PageId>& have = seq.tables[static_cast<size_t>(s)];
    const size_t pages = static_cast<size_t>((rows + part->per_page() - 1) / part->per_page());
    tables[static_cast<size_t>(s)].assign(have.begin(), have.begin() + static_cast<std::ptrdiff_t>(pages));
  }

  PrefixCache& cache = *impl_->prefix;
  std::lock_guard<std::mutex> prefix_lock(cache.mu());
  KVC_RETURN_IF_ERROR(cache.CheckChain(hashes));
  if (PrefixCache::Entry* held = cache.Exact(hashes)) {
    cache.Refresh(*held);
    return absl::OkStatus();
  }
  KVC_RETURN_IF_ERROR(cache.MakeRoom(cache.checkpoint_bytes()));
  std::vector<PageStore::Request> requests;
  for (const PrefixCache::CheckpointStream& c : cache.checkpoint()) {
    requests.push_back({c.stream, c.pages, &tables[static_cast<size_t>(c.stream)]});
  }
  KVC_RETURN_IF_ERROR(impl_->store->AllocatePinned(requests));
  // The checkpoint: the ring as it was at P, the CSA states as they are (they
  // keep rollback_depth tokens beyond the open windows, so the rows P reads
  // are still there). Nothing below fails.
  std::vector<PageCopy> copies;
  impl_->window_part->CopyRingAt(seq, L, P, tables[cache_internal::kWindowStream], &copies);
  for (const PrefixCache::CheckpointStream& c : cache.checkpoint()) {
    if (c.stream == cache_internal::kWindowStream) continue;
    impl_->store->CopyPage(c.stream, seq.tables[static_cast<size_t>(c.stream)][0],
                           tables[static_cast<size_t>(c.stream)][0], &copies);
  }
  std::vector<int64_t> ring_ends;
  for (const LayerStreams& ls : seq.layers) ring_ends.push_back(impl_->page_manager() ? ls.ring_end : P);
  cache.Insert(hashes, std::move(tables), std::move(ring_ends));
  if (engine_copies != nullptr) *engine_copies = std::move(copies);
  return absl::OkStatus();
}

Cache::PrefixMatch Cache::LookupPrefix(absl::Span<const uint64_t> hashes) const {
  const int64_t B = PrefixBlockTokens();
  hashes = hashes.subspan(0, static_cast<size_t>(impl_->spec.max_context / B));
  PrefixCache& cache = *impl_->prefix;
  std::lock_guard<std::mutex> prefix_lock(cache.mu());
  const PrefixCache::Found found = cache.Find(hashes);
  PrefixMatch match;
  match.tokens = found.entry == nullptr ? 0 : found.entry->tokens;
  match.shared_tokens = found.shared_blocks * B;
  return match;
}

absl::StatusOr<Cache::PrefixMatch> Cache::CreateSequenceFromPrefix(absl::Span<const uint64_t> hashes) {
  if (impl_->page_manager()) {
    return absl::FailedPreconditionError(
        "CreateSequenceFromPrefix: in page-manager mode the engine copies the checkpoint; call "
        "CreateSequenceFromPrefix(hashes, &engine_copies)");
  }
  return CreateSequenceFromPrefix(hashes, nullptr);
}

absl::StatusOr<Cache::PrefixMatch> Cache::CreateSequenceFromPrefix(absl::Span<const uint64_t> hashes,
                                                                   std::vector<PageCopy>* engine_copies) {
  if (impl_->page_manager() && engine_copies == nullptr) {
    return absl::InvalidArgumentError(
        "CreateSequenceFromPrefix: page-manager mode needs engine_copies for the copies the engine makes");
  }
  const int64_t B = PrefixBlockTokens();
  std::vector<PageCopy> copies;
  KVC_RETURN_IF_ERROR(CheckBlocks(hashes, B, impl_->spec.max_context, "CreateSequenceFromPrefix"));
  auto seq = std::make_shared<Sequence>();
  PrefixMatch match;
  {
    std::lock_guard<std::mutex> seq_lock(seq->mu);  // not registered yet: no one else can reach it
    // Its own ring, rollback and state pages, zeroed, before the prefix
    // cache's lock: they do not depend on the match.
    KVC_RETURN_IF_ERROR(impl_->AllocateState(*seq));
    PrefixCache& cache = *impl_->prefix;
    std::lock_guard<std::mutex> prefix_lock(cache.mu());
    const PrefixCache::Found found = cache.Find(hashes);
    match.shared_tokens = found.shared_blocks * B;
    if (found.entry == nullptr) {
      cache.Miss();
    } else {
      PrefixCache::Entry& entry = *found.entry;
      // The history pages become the sequence's too: those only the cache
      // held move to the history budget, which must take them.
      std::vector<std::pair<int, PageId>> shared;
      for (const int s : {cache_internal::kCsaRowsStream, cache_internal::kCsaKeysStream, cache_internal::kHcaRowsStream}) {
        for (const PageId page : entry.tables[static_cast<size_t>(s)]) shared.emplace_back(s, page);
      }
      if (const absl::Status adopted = impl_->store->RefLive(shared); !adopted.ok()) {
        impl_->Release(*seq);
        return absl::Status(adopted.code(), absl::StrCat("CreateSequenceFromPrefix: ", adopted.message()));
      }
      for (const int s : {cache_internal::kCsaRowsStream, cache_internal::kCsaKeysStream, cache_internal::kHcaRowsStream}) {
        seq->tables[static_cast<size_t>(s)] = entry.tables[static_cast<size_t>(s)];
      }
      for (const PrefixCache::CheckpointStream& c : cache.checkpoint()) {
        for (int64_t k = 0; k < c.pages; ++k) {
          impl_->store->CopyPage(c.stream, entry.tables[static_cast<size_t>(c.stream)][static_cast<size_t>(k)],
                                 seq->tables[static_cast<size_t>(c.stream)][static_cast<size_t>(k)], &copies);
        }
      }
      // The HCA state stays zero: at a multiple of 128 tokens its window has
      // just closed, and the next entry reads only tokens appended from here.
      for (int layer = 0; layer < static_cast<int>(seq->layers.size()); ++layer) {
        LayerStreams& ls = seq->layers[static_cast<size_t>(layer)];
        const LayerKind kind = impl_->KindOf(layer);
        ls.length = entry.tokens;
        ls.floor = entry.tokens;  // the rollback records start here
        ls.ring_end = entry.ring_ends[static_cast<size_t>(layer)];
        // The checkpointed state rings were written up to at most `depth`
        // past the prefix (a publish refuses a sequence further along).
        ls.state_end = entry.tokens + impl_->depth();
        if (impl_->RowsOf(layer) != nullptr) ls.compressed_rows = EntriesAt(kind, entry.tokens);
        if (impl_->KeysOf(layer) != nullptr) ls.key_rows = EntriesAt(kind, entry.tokens);
      }
      cache.Hit(entry);
      match.tokens = entry.tokens;
    }
  }
  match.seq = impl_->Register(std::move(seq));
  if (engine_copies != nullptr) *engine_copies = std::move(copies);
  return match;
}

}  // namespace kvc
