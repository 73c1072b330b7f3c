// Internal to kvc (not installed): the cache's storage, as paged streams.
//
// A stream is one kind of page (window ring, CSA rows, ...) with one id
// space shared by every layer that has the stream: id b names page b of
// every such layer's array, at base + b x page_bytes. A PageStore holds the
// eight streams of a cache (seven public, the rollback records internal),
// their per-layer arrays (anonymous mappings kvc reserves, engine memory, or
// none at all in page-manager mode), one id allocator per stream (refcounts,
// free list; grows with use, never with the limit) and the byte budgets of
// the two lifetime classes (docs/layout.md).
//
// Page-manager mode (CacheOptions::page_manager): the store never reads or
// writes a page (no zeroing, no copies: callers hand copies to the engine),
// and an id whose last reference goes while a step may still be running on
// the device waits until CompleteSteps says that step is done.
#ifndef KVC_SRC_PAGE_STORE_H_
#define KVC_SRC_PAGE_STORE_H_

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvc/cache.h"
#include "kvc/compressor.h"
#include "kvc/executor.h"
#include "kvc/model_spec.h"

namespace kvc {
namespace cache_internal {

using PageId = int32_t;
constexpr PageId kNoPage = -1;

// Stream numbers: the public ones (Stream), then the internal one.
enum StreamIndex : int {
  kWindowStream = 0,
  kCsaRowsStream = 1,
  kCsaKeysStream = 2,
  kHcaRowsStream = 3,
  kCsaStateStream = 4,          // CSA main compressor state
  kCsaIndexerStateStream = 5,   // CSA indexer compressor state
  kHcaStateStream = 6,          // HCA compressor state
  kRollbackStream = 7,          // rollback records, all layers (none at depth 0 or in page-manager mode)
};
constexpr int kStreamCount = 8;
constexpr int kPublicStreams = kNumStreams;
static_assert(kPublicStreams == 7, "Stream and StreamIndex number the public streams alike");
// Whether stream s is a compressor state stream (a ring of token rows, one page per sequence).
constexpr bool IsStateStream(int s) { return s >= kCsaStateStream && s <= kHcaStateStream; }

// The streams of one layer kind, beyond the window ring (every layer) and
// the rollback records (every layer at rollback_depth > 0); -1: none. The
// one place that says which parts a layer kind is composed of: the page
// store's layer lists, the cache and the snapshot all ask it.
struct LayerParts {
  int rows = -1;           // history: compressed rows (kCsaRowsStream, kHcaRowsStream)
  int keys = -1;           // history: index keys (kCsaKeysStream)
  int main_state = -1;     // compressor state of the main compressor
  int indexer_state = -1;  // compressor state of the indexer's compressor
};
constexpr LayerParts PartsOf(LayerKind kind) {
  return kind == LayerKind::kCsa   ? LayerParts{kCsaRowsStream, kCsaKeysStream, kCsaStateStream, kCsaIndexerStateStream}
         : kind == LayerKind::kHca ? LayerParts{kHcaRowsStream, -1, kHcaStateStream, -1}
                                   : LayerParts{};
}

enum class StreamClass : uint8_t { kHistory, kState };

// The compressor of state stream s (kCsaStateStream, kCsaIndexerStateStream,
// kHcaStateStream).
inline CompressorGeometry StateCompressor(int s, int head_dim, int index_dim) {
  return s == kCsaIndexerStateStream ? IndexerCompressor(index_dim)
                                     : MainCompressor(s == kHcaStateStream ? LayerKind::kHca : LayerKind::kCsa, head_dim);
}
// A compressor's state, stated once (the cache's state pages, the snapshot's
// state sections and the footprint model use these): a ring of span +
// rollback_depth token rows, each kv then score + ape, width() fp32 values
// each; slot t mod rows.
inline int64_t StateRows(const CompressorGeometry& g, int64_t depth) { return g.span() + depth; }
inline int64_t StateFloats(const CompressorGeometry& g, int64_t depth) { return StateRows(g, depth) * 2 * g.width(); }

// What a stream is, before any memory: its page geometry and its layers.
struct StreamSpec {
  const char* name = "";
  StreamClass cls = StreamClass::kState;
  Component component = Component::kWindowRing;
  int64_t page_bytes = 0;       // a multiple of 64 (of 576 for 584-byte rows)
  // Rows of a page: 584-byte rows or 68-byte keys; a compressor state page
  // holds its ring of StateRows token rows (one page per sequence); 0 for
  // the rollback records (internal, no rows an engine addresses).
  int32_t rows_per_page = 0;
  int32_t row_data_bytes = 0;   // 576 or 64; a state row's 2 x width fp32 values
  int32_t row_scale_bytes = 0;  // 8 or 4; 0 for state rows
  std::vector<int32_t> layers;  // ascending; empty: the model has no such stream
};

// Every stream's spec, from the model and options (which Cache::Create has
// validated). Stated once: the cache, PageGeometry and the docs use it.
std::array<StreamSpec, kStreamCount> StreamSpecs(const ModelSpec& spec, const CacheOptions& options);

// Reserved address space for all of kvc's own arrays together.
constexpr int64_t kVirtualAddressCap = int64_t{32} << 40;

class PageStore {
 public:
  // Checks the engine's arrays (kInvalidArgument naming layer and stream),
  // sizes each stream (docs/layout.md, "Page arrays") and reserves kvc's own
  // arrays (address space only: no memory until pages are written).
  static absl::StatusOr<std::unique_ptr<PageStore>> Create(const ModelSpec& spec, const CacheOptions& options);
  ~PageStore();
  PageStore(const PageStore&) = delete;
  PageStore& operator=(const PageStore&) = delete;

  const StreamSpec& spec(int s) const { return streams_[static_cast<size_t>(s)].spec; }
  // Page-manager mode: the store never touches page bytes (CopyPage and Page
  // must not be called; arrays may be absent, base() then nullptr).
  bool page_manager() const { return page_manager_; }
  bool present(int s) const { return !spec(s).layers.empty(); }
  int64_t num_pages(int s) const { return streams_[static_cast<size_t>(s)].num_pages; }
  int64_t layers(int s) const { return static_cast<int64_t>(spec(s).layers.size()); }
  // Bytes one id costs the class budget: a page in every layer of the stream.
  int64_t id_bytes(int s) const { return spec(s).page_bytes * layers(s); }
  // Layer `layer`'s array of stream s (nullptr if the layer lacks it).
  uint8_t* base(int s, int layer) const { return streams_[static_cast<size_t>(s)].bases[static_cast<size_t>(layer)]; }
  // Page `id` of stream s in `layer`. Lock-free: arrays never move.
  uint8_t* Page(int s, int layer, PageId id) const { return base(s, layer) + int64_t{id} * spec(s).page_bytes; }

  // n new ids of stream s, appended to *out (refcount 1, the page zeroed in
  // every layer). Several requests are granted together or not at all:
  // kResourceExhausted naming the stream, its need, what is free and the
  // class budget; nothing changes on a refusal.
  struct Request {
    int stream;
    int64_t n;
    std::vector<PageId>* out;
  };
  // `prefault_executor`: maps the fresh pages through it (nullptr: this
  // thread). Only for callers that hold no cache-wide lock (Append's page
  // planning, under its sequence's lock like Append's other tasks).
  absl::Status Allocate(absl::Span<const Request> requests, Executor* prefault_executor = nullptr);
  absl::Status Allocate(int s, int64_t n, std::vector<PageId>* out, Executor* prefault_executor = nullptr) {
    return Allocate({Request{s, n, out}}, prefault_executor);
  }

  void Ref(int s, PageId id);
  void Unref(int s, PageId id);  // frees the id with its last reference; allocates nothing
  int32_t RefCount(int s, PageId id) const;

  // --- Prefix cache references (src/prefix_cache.h) ----------------------
  // A pin is a reference the prefix cache holds. An id with more references
  // than pins is live: it counts against its class budget, as above. An id
  // whose every reference is a pin is cache-only: it counts against the
  // prefix budget (CacheOptions::prefix_bytes) instead, so cached prefixes
  // and live sequences never take each other's memory. Ids move between the
  // two as references come and go.
  //
  // n new ids of each request (pinned, cache-only, zeroed), all or none:
  // kResourceExhausted when the prefix budget or the stream's pages cannot
  // supply them; nothing changes on a refusal.
  absl::Status AllocatePinned(absl::Span<const Request> requests);
  void Pin(int s, PageId id);    // one more reference, a pin (the id is in use)
  void Unpin(int s, PageId id);  // drops a pin and its reference; frees the id with its last
  // One more live reference to each id (distinct ids, each in use), all or
  // none: ids that were cache-only move to their class budget, which must
  // have room (kResourceExhausted naming the stream otherwise).
  absl::Status RefLive(absl::Span<const std::pair<int, PageId>> ids);
  int32_t PinCount(int s, PageId id) const;
  // Called (without the store's lock) after an Unref made an id cache-only
  // and the cache-only bytes exceed the prefix budget: the prefix cache
  // evicts there. Set once, before any sequence exists. Callers of Unref
  // must not hold the prefix cache's lock (Unpin never calls it).
  void SetOverBudgetHook(std::function<void()> hook) { over_budget_hook_ = std::move(hook); }
  int64_t prefix_limit() const { return prefix_limit_; }
  // Bytes of cache-only ids, all streams; and of one class.
  int64_t prefix_used() const;
  int64_t prefix_used(StreamClass c) const;

  // Copies page `from` onto page `to` in every layer of stream s; in
  // page-manager mode appends the copy to *engine_copies instead (the engine
  // makes it; required non-null there).
  void CopyPage(int s, PageId from, PageId to, std::vector<PageCopy>* engine_copies) const;

  // Steps (page-manager mode): BeginStep hands out the next epoch; an id
  // freed while a step up to the current epoch may still run on the device
  // is kept (in use, counted) until CompleteSteps(epoch >= that one). Outside
  // page-manager mode ids are reusable at once.
  uint64_t BeginStep();
  // Makes the ids waiting on steps <= epoch reusable; returns how many.
  int64_t CompleteSteps(uint64_t epoch);
  uint64_t epoch() const;            // the last epoch handed out (0: none)
  uint64_t completed_epoch() const;  // the last epoch CompleteSteps was told of

  struct Stats {
    int64_t used_ids = 0;     // referenced at least once, or waiting on a step (deferred)
    int64_t created_ids = 0;  // ever handed out (high water)
    int64_t deferred_ids = 0; // of used_ids: unreferenced, waiting for CompleteSteps
    int64_t pinned_ids = 0;   // of the used, pinned at least once
    int64_t cached_ids = 0;   // of the pinned, cache-only (every reference a pin)
  };
  Stats StreamStats(int s) const;
  int64_t limit(StreamClass c) const { return limit_[static_cast<int>(c)]; }

 private:
  struct Stream {
    StreamSpec spec;
    std::vector<uint8_t*> bases;  // per model layer
    int64_t num_pages = 0;
    bool engine_owned = false;    // else one anonymous mapping per layer's array
    // Guarded by mu_:
    std::vector<int32_t> refcount;  // one per created id
    std::vector<int32_t> pins;      // one per created id: the references that are pins
    std::vector<PageId> free;       // capacity >= created: Unref never allocates
    // Page-manager mode: unreferenced ids waiting for their epoch to complete
    // (capacity >= created, as `free`).
    std::vector<std::pair<uint64_t, PageId>> deferred;
    int64_t used = 0;
    int64_t pinned = 0;  // ids with pins > 0
    int64_t cached = 0;  // ids with pins == refcount > 0
  };
  // Allocate and AllocatePinned (under mu_ for the grant).
  absl::Status AllocateIds(absl::Span<const Request> requests, bool pinned, Executor* prefault_executor);
  // Maps ids [first, end) of kvc's own array of stream s in every layer, the
  // layers split across `executor` when there is enough to map (page_store.cc).
  void Prefault(int s, PageId first, PageId end, Executor* executor) const;
  // The id moved between live and cache-only: its bytes change budget.
  void ToCacheOnly(int s);
  void ToLive(int s);
  // An id's last reference went: free it now, or when the steps that may
  // read it complete (page-manager mode; it stays counted in its class
  // budget until then, unless it was a cached prefix's: pins -1).
  void Release(int s, PageId id);
  void Free(int s, PageId id);
  PageStore() = default;

  std::array<Stream, kStreamCount> streams_;
  std::vector<std::pair<uint8_t*, int64_t>> mappings_;  // kvc's arrays, unmapped by the destructor
  int64_t limit_[2] = {0, 0};
  bool page_manager_ = false;
  int64_t prefix_limit_ = 0;
  std::function<void()> over_budget_hook_;
  mutable std::mutex mu_;  // guards the id tables, used_, prefix_used_ and the epochs
  int64_t used_[2] = {0, 0};  // bytes of live ids, per class
  int64_t prefix_used_[2] = {0, 0};  // bytes of cache-only ids, per class
  uint64_t epoch_ = 0, completed_epoch_ = 0;
};

}  // namespace cache_internal
}  // namespace kvc

#endif  // KVC_SRC_PAGE_STORE_H_
