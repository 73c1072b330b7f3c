// Internal to kvc (not installed): the prefix cache (docs/prefix-cache.md):
// the published prefixes, found by the engine's chain hashes, the pages each
// one holds, and their eviction. The Cache methods that publish and restore
// prefixes (src/cache_prefix.cc) use it; it knows pages, not sequences.
//
// A prefix of n blocks (tokens [0, n x B)) holds
//   - history: per history stream, the page ids covering its rows, pinned
//     (PageStore::Pin). Full pages are the very ids its publisher and every
//     sequence restored from it use; a partial last page is shared too and
//     copied by whichever sequence writes into it first (copy-on-write).
//   - a checkpoint: its own pages of the window ring and of the CSA main and
//     indexer compressor states, copies of the publisher's at n x B. (At a
//     multiple of 128 the HCA window has just closed, so its state holds
//     nothing a continuation reads.)
// Pinned pages that no live sequence references count against the prefix
// budget (PageStore); eviction drops whole prefixes, lowest priority first,
// until the cache-only bytes fit.
//
// The block index: every block of every held prefix, by hash, with its
// position and its parent's hash. Hashes are checked against it when
// published (one hash, one block), so a chain that matches it block by block
// is the chain of the prefix found at its end.
//
// Eviction is GreedyDual-Size (Cao and Irani, 1997): a prefix's priority is
// L + tokens / MiB it keeps, set when published and on every hit; the lowest
// goes first and L rises to it. Recency (L grows as prefixes go) weighted by
// what a hit saves per byte kept: a hit saves prefilling `tokens` tokens, and
// needs all of its pages kept.
//
// Thread safety: every method requires mu() held (the caller also holds the
// lock of any sequence it reads; order: sequence, then prefix cache, then
// page store).
#ifndef KVC_SRC_PREFIX_CACHE_H_
#define KVC_SRC_PREFIX_CACHE_H_

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvc/cache.h"
#include "src/page_store.h"

namespace kvc {
namespace cache_internal {

class PrefixCache {
 public:
  // One stream of a checkpoint and the pages it takes per prefix.
  struct CheckpointStream {
    int stream;
    int64_t pages;
  };
  // The checkpoint of a model: ring_pages of the window stream, one page of
  // each CSA compressor state the store has.
  static std::vector<CheckpointStream> CheckpointStreams(const PageStore& store, int64_t ring_pages);

  struct Entry {
    uint64_t last_hash = 0;
    int64_t blocks = 0;
    int64_t tokens = 0;  // blocks x B
    // History streams: the ids covering the prefix's rows; checkpoint
    // streams: its checkpoint pages. Every id pinned once by this entry.
    std::array<std::vector<PageId>, kStreamCount> tables;
    // Per layer: the furthest length whose rows the checkpoint's ring holds
    // (LayerStreams::ring_end; `tokens` unless a page-manager publisher had
    // passed them).
    std::vector<int64_t> ring_ends;
    int64_t bytes = 0;  // id bytes of every page it holds
    double priority = 0;
    uint64_t stamp = 0;  // when published or last hit (ties: older first)
  };

  PrefixCache(PageStore& store, int64_t block_tokens, std::vector<CheckpointStream> checkpoint);
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  std::mutex& mu() const { return mu_; }
  int64_t block_tokens() const { return block_tokens_; }
  const std::vector<CheckpointStream>& checkpoint() const { return checkpoint_; }
  // Bytes of one checkpoint (its pages' id bytes).
  int64_t checkpoint_bytes() const { return checkpoint_bytes_; }

  // kInvalidArgument if a hash of the chain names another block in the
  // index (another position or parent) or appears twice in the chain.
  absl::Status CheckChain(absl::Span<const uint64_t> hashes) const;

  // The leading blocks of `hashes` the index holds (block by block: hash,
  // position, parent), and the prefix with the most of them (null: none).
  struct Found {
    int64_t shared_blocks = 0;
    Entry* entry = nullptr;
  };
  Found Find(absl::Span<const uint64_t> hashes);
  // The prefix named by the whole chain (checked by CheckChain), or null.
  Entry* Exact(absl::Span<const uint64_t> hashes);

  // Evicts prefixes until the cache-only bytes plus `bytes` fit the prefix
  // budget. kResourceExhausted (evicting nothing) if `bytes` alone exceeds it.
  absl::Status MakeRoom(int64_t bytes);
  // Evicts prefixes while the cache-only bytes exceed the budget (pages
  // become cache-only when sequences let go of them).
  void Trim();

  // Adds a prefix of `hashes` (checked): pins every id of the history
  // streams' tables; the checkpoint streams' tables hold ids allocated
  // pinned for it (PageStore::AllocatePinned), which it takes over.
  void Insert(absl::Span<const uint64_t> hashes, std::array<std::vector<PageId>, kStreamCount> tables,
              std::vector<int64_t> ring_ends);
  // A hit on `entry` (restored): counts it and refreshes its priority.
  void Hit(Entry& entry);
  void Miss() { ++misses_; }
  // Publishing an entry already held refreshes it.
  void Refresh(Entry& entry);

  // Counters and contents (bytes from the page store).
  PrefixUsage Usage() const;
  // Every prefix held, in eviction order (first evicted first).
  std::vector<const Entry*> Entries() const;

 private:
  struct Block {
    int64_t depth;    // its block number in the chain
    uint64_t parent;  // the hash of block depth - 1 (unused for depth 0)
    int64_t refs;     // the prefixes holding it
  };
  void SetPriority(Entry& entry);
  void Evict(Entry& entry);

  mutable std::mutex mu_;
  PageStore& store_;
  const int64_t block_tokens_;
  const std::vector<CheckpointStream> checkpoint_;
  int64_t checkpoint_bytes_ = 0;

  std::unordered_map<uint64_t, Entry> entries_;  // by the hash of their last block
  std::unordered_map<uint64_t, Block> blocks_;   // every block of every entry
  std::map<std::pair<double, uint64_t>, uint64_t> order_;  // (priority, stamp) -> last hash
  double inflation_ = 0;  // L: the priority of the last prefix evicted
  uint64_t clock_ = 0;
  int64_t hits_ = 0, misses_ = 0, tokens_reused_ = 0, published_ = 0, evictions_ = 0;
};

}  // namespace cache_internal
}  // namespace kvc

#endif  // KVC_SRC_PREFIX_CACHE_H_
