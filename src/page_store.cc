#include "src/page_store.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvc/compressor.h"
#include "kvc/row_formats.h"
#include "src/status.h"

namespace kvc {
namespace cache_internal {
namespace {

constexpr int64_t kAlignment = 64;

int64_t RoundUp(int64_t bytes, int64_t to) { return (bytes + to - 1) / to * to; }

}  // namespace

std::array<StreamSpec, kStreamCount> StreamSpecs(const ModelSpec& spec, const CacheOptions& options) {
  const int32_t B = options.rows_per_page, K = options.keys_per_page, D = options.rollback_depth;
  const RowFormatInfo& kv = FormatInfo(RowFormat::kKvFp8);
  const RowFormatInfo& key = FormatInfo(RowFormat::kIndexFp4);
  std::array<StreamSpec, kStreamCount> s;
  auto rows = [](StreamSpec& out, const char* name, StreamClass cls, Component c, const RowFormatInfo& f,
                 RowFormat format, int32_t per_page) {
    out.name = name;
    out.cls = cls;
    out.component = c;
    out.page_bytes = PageBytes(format, per_page);  // a multiple of 576 (rows) or 64 (keys)
    out.rows_per_page = per_page;
    out.row_data_bytes = f.data_bytes;
    out.row_scale_bytes = f.scale_bytes;
  };
  // A compressor's state: one page per sequence holding its ring of
  // StateRows token rows of 2 x width fp32 (kv, then score + ape).
  auto state = [&](int st, const char* name) {
    StreamSpec& out = s[static_cast<size_t>(st)];
    const CompressorGeometry g = StateCompressor(st, spec.head_dim, spec.index_dim);
    out.name = name;
    out.cls = StreamClass::kState;
    out.component = Component::kCompressorState;
    out.rows_per_page = static_cast<int32_t>(StateRows(g, D));
    out.row_data_bytes = 2 * g.width() * static_cast<int32_t>(sizeof(float));  // a multiple of 64
    out.page_bytes = int64_t{out.rows_per_page} * out.row_data_bytes;
  };
  rows(s[kWindowStream], "window ring", StreamClass::kState, Component::kWindowRing, kv, RowFormat::kKvFp8, B);
  rows(s[kCsaRowsStream], "CSA compressed rows", StreamClass::kHistory, Component::kCompressedRows, kv,
       RowFormat::kKvFp8, B);
  rows(s[kCsaKeysStream], "CSA index keys", StreamClass::kHistory, Component::kIndexKeys, key, RowFormat::kIndexFp4, K);
  rows(s[kHcaRowsStream], "HCA compressed rows", StreamClass::kHistory, Component::kCompressedRows, kv,
       RowFormat::kKvFp8, B);
  state(kCsaStateStream, "CSA compressor state");
  state(kCsaIndexerStateStream, "CSA indexer state");
  state(kHcaStateStream, "HCA compressor state");
  // Rollback: D records of 584 B, then the D positions that evicted them.
  // None in page-manager mode, where rollback is bookkeeping only.
  StreamSpec& rollback = s[kRollbackStream];
  rollback.name = "rollback rows";
  rollback.cls = StreamClass::kState;
  rollback.component = Component::kWindowRing;
  rollback.page_bytes = RoundUp(int64_t{D} * (kv.row_bytes + 8), kAlignment);
  for (int32_t i = 0; i < static_cast<int32_t>(spec.layers.size()); ++i) {
    const LayerKind kind = spec.layers[static_cast<size_t>(i)].kind;
    s[kWindowStream].layers.push_back(i);
    if (D > 0 && !options.page_manager) s[kRollbackStream].layers.push_back(i);
    const LayerParts parts = PartsOf(kind);  // the layer kind's streams, stated once
    for (const int st : {parts.rows, parts.keys, parts.main_state, parts.indexer_state}) {
      if (st >= 0) s[static_cast<size_t>(st)].layers.push_back(i);
    }
  }
  return s;
}

namespace {

// The most pages a stream's arrays may have: ids are int32, and so are the
// row indices engines take (id x rows_per_page + offset, see AttentionSet).
int64_t MaxPages(const StreamSpec& spec) {
  const int64_t ids = std::numeric_limits<PageId>::max();
  return spec.rows_per_page > 0 ? ids / spec.rows_per_page : ids;
}

// The engine's arrays, checked: arrays[s][layer] (empty span: none given).
absl::StatusOr<std::array<std::vector<absl::Span<uint8_t>>, kPublicStreams>> EngineArrays(
    const std::array<StreamSpec, kStreamCount>& specs, const ModelSpec& model, const CacheOptions& options) {
  const size_t n_layers = model.layers.size();
  std::array<std::vector<absl::Span<uint8_t>>, kPublicStreams> arrays;
  std::array<std::vector<bool>, kPublicStreams> given;
  for (int s = 0; s < kPublicStreams; ++s) {
    arrays[static_cast<size_t>(s)].resize(n_layers);
    given[static_cast<size_t>(s)].assign(n_layers, false);
  }
  for (const EngineArray& a : options.engine_arrays) {
    const int s = static_cast<int>(a.stream);
    if (s < 0 || s >= kPublicStreams) {
      return absl::InvalidArgumentError(absl::StrCat("engine_arrays: layer ", a.layer, ": stream ", s,
                                                     " is not a Stream (0..", kPublicStreams - 1, ")"));
    }
    const StreamSpec& spec = specs[static_cast<size_t>(s)];
    const std::string what = absl::StrCat("engine_arrays: layer ", a.layer, " stream ", spec.name);
    if (a.layer < 0 || a.layer >= static_cast<int32_t>(n_layers)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": the model has ", n_layers, " layers"));
    }
    if (!std::binary_search(spec.layers.begin(), spec.layers.end(), a.layer)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": a ", LayerKindName(model.layers[static_cast<size_t>(a.layer)].kind),
                                                     " layer has no such stream"));
    }
    if (given[static_cast<size_t>(s)][static_cast<size_t>(a.layer)]) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": given twice"));
    }
    if (reinterpret_cast<uintptr_t>(a.bytes.data()) % kAlignment != 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": base is not 64-byte aligned"));
    }
    if (static_cast<int64_t>(a.bytes.size()) < spec.page_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": ", a.bytes.size(), " bytes hold no page of ",
                                                     spec.page_bytes, " B"));
    }
    given[static_cast<size_t>(s)][static_cast<size_t>(a.layer)] = true;
    arrays[static_cast<size_t>(s)][static_cast<size_t>(a.layer)] = a.bytes;
  }
  // No two arrays may share a byte: a layer would write another's pages.
  struct Range {
    uintptr_t begin, end;
    const EngineArray* array;
  };
  std::vector<Range> ranges;
  for (const EngineArray& a : options.engine_arrays) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(a.bytes.data());
    ranges.push_back({begin, begin + a.bytes.size(), &a});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& x, const Range& y) { return x.begin < y.begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      const EngineArray& a = *ranges[i - 1].array;
      const EngineArray& b = *ranges[i].array;
      return absl::InvalidArgumentError(absl::StrCat("engine_arrays: layer ", a.layer, " stream ", StreamName(a.stream),
                                                     " and layer ", b.layer, " stream ", StreamName(b.stream),
                                                     " overlap; every array needs memory of its own"));
    }
  }
  // All or none per group: the window arrays, the history arrays, and the
  // compressor state arrays.
  const std::vector<std::vector<int>> classes = {{kWindowStream},
                                                 {kCsaRowsStream, kCsaKeysStream, kHcaRowsStream},
                                                 {kCsaStateStream, kCsaIndexerStateStream, kHcaStateStream}};
  for (const std::vector<int>& cls : classes) {
    bool any = false;
    for (const int s : cls) {
      for (const int32_t l : specs[static_cast<size_t>(s)].layers) any |= given[static_cast<size_t>(s)][static_cast<size_t>(l)];
    }
    if (!any) continue;
    for (const int s : cls) {
      const StreamSpec& spec = specs[static_cast<size_t>(s)];
      int64_t pages = -1;
      for (const int32_t l : spec.layers) {
        const absl::Span<uint8_t> a = arrays[static_cast<size_t>(s)][static_cast<size_t>(l)];
        if (!given[static_cast<size_t>(s)][static_cast<size_t>(l)]) {
          return absl::InvalidArgumentError(absl::StrCat(
              "engine_arrays: layer ", l, " stream ", spec.name, " is missing (arrays are given for every layer of ",
              s == kWindowStream ? "the window stream" : IsStateStream(s) ? "the compressor state streams" : "the history streams",
              " or for none)"));
        }
        const int64_t n = static_cast<int64_t>(a.size()) / spec.page_bytes;
        if (pages >= 0 && n != pages) {
          return absl::InvalidArgumentError(absl::StrCat("engine_arrays: layer ", l, " stream ", spec.name, " holds ",
                                                         n, " pages of ", spec.page_bytes, " B but layer ",
                                                         spec.layers[0], " holds ", pages,
                                                         "; every layer of a stream holds the same number"));
        }
        pages = n;
      }
    }
  }
  return arrays;
}

}  // namespace

absl::StatusOr<std::unique_ptr<PageStore>> PageStore::Create(const ModelSpec& model, const CacheOptions& options) {
  const std::array<StreamSpec, kStreamCount> specs = StreamSpecs(model, options);
  KVC_ASSIGN_OR_RETURN(const auto engine, EngineArrays(specs, model, options));
  std::unique_ptr<PageStore> store(new PageStore());
  store->page_manager_ = options.page_manager;
  store->limit_[static_cast<int>(StreamClass::kHistory)] = options.history_bytes;
  store->limit_[static_cast<int>(StreamClass::kState)] = options.state_bytes;
  store->prefix_limit_ = options.prefix_bytes;
  const size_t n_layers = model.layers.size();
  int kvc_streams = 0;
  for (int s = 0; s < kStreamCount; ++s) {
    Stream& st = store->streams_[static_cast<size_t>(s)];
    st.spec = specs[static_cast<size_t>(s)];
    st.bases.assign(n_layers, nullptr);
    if (st.spec.layers.empty()) continue;
    st.engine_owned = s < kPublicStreams && !engine[static_cast<size_t>(s)][static_cast<size_t>(st.spec.layers[0])].empty();
    if (st.engine_owned) {
      const int64_t n = static_cast<int64_t>(engine[static_cast<size_t>(s)][static_cast<size_t>(st.spec.layers[0])].size()) /
                        st.spec.page_bytes;
      st.num_pages = std::min<int64_t>(n, MaxPages(st.spec));
      for (const int32_t l : st.spec.layers) st.bases[static_cast<size_t>(l)] = engine[static_cast<size_t>(s)][static_cast<size_t>(l)].data();
    } else {
      ++kvc_streams;
    }
  }
  // kvc's arrays: each stream may use its whole class budget, within int32
  // ids and an equal share of the address-space cap; halve the cap until the
  // system grants the mappings.
  for (int64_t cap = kVirtualAddressCap;; cap /= 2) {
    bool mapped = true;
    for (int s = 0; s < kStreamCount && mapped; ++s) {
      Stream& st = store->streams_[static_cast<size_t>(s)];
      if (st.spec.layers.empty() || st.engine_owned) continue;
      const int64_t id_bytes = st.spec.page_bytes * static_cast<int64_t>(st.spec.layers.size());
      // Room for the class's live pages and for the prefix cache's.
      const int64_t class_limit = std::max<int64_t>(0, store->limit_[static_cast<int>(st.spec.cls)]);
      const int64_t budget = class_limit > INT64_MAX - store->prefix_limit_ ? INT64_MAX : class_limit + store->prefix_limit_;
      st.num_pages = std::min({budget / id_bytes, MaxPages(st.spec), cap / kvc_streams / id_bytes});
      if (st.num_pages == 0 || store->page_manager_) continue;  // page-manager mode: ids only, no memory
      const int64_t bytes = st.num_pages * st.spec.page_bytes;
      for (const int32_t l : st.spec.layers) {
        void* p = ::mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
          mapped = false;
          break;
        }
        store->mappings_.emplace_back(static_cast<uint8_t*>(p), bytes);
        st.bases[static_cast<size_t>(l)] = static_cast<uint8_t*>(p);
      }
    }
    if (mapped) break;
    for (const auto& [p, bytes] : store->mappings_) ::munmap(p, static_cast<size_t>(bytes));
    store->mappings_.clear();
    if (cap < (int64_t{1} << 30)) {
      return absl::ResourceExhaustedError("Cache: the system refused address space for the page arrays");
    }
  }
  return store;
}

PageStore::~PageStore() {
  for (const auto& [p, bytes] : mappings_) ::munmap(p, static_cast<size_t>(bytes));
}

absl::Status PageStore::Allocate(absl::Span<const Request> requests, Executor* prefault_executor) {
  return AllocateIds(requests, false, prefault_executor);
}

absl::Status PageStore::AllocatePinned(absl::Span<const Request> requests) { return AllocateIds(requests, true, nullptr); }

absl::Status PageStore::AllocateIds(absl::Span<const Request> requests, bool pinned, Executor* prefault_executor) {
  // Grant under the lock (all or nothing); zero the pages after it.
  std::vector<std::pair<int, PageId>> to_zero;
  // Per stream, the ids created by this call in kvc's own arrays: [first, end).
  PageId fresh_first[kStreamCount] = {}, fresh_end[kStreamCount] = {};
  {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t need[kStreamCount] = {};
    for (const Request& r : requests) {
      if (r.n < 0) return absl::InvalidArgumentError(absl::StrCat(spec(r.stream).name, ": cannot allocate ", r.n, " pages"));
      need[r.stream] += r.n;
    }
    int64_t class_need[2] = {0, 0};
    for (int s = 0; s < kStreamCount; ++s) {
      if (need[s] == 0) continue;
      const Stream& st = streams_[static_cast<size_t>(s)];
      const int c = static_cast<int>(st.spec.cls);
      const int64_t free_ids = static_cast<int64_t>(st.free.size());
      const int64_t created = static_cast<int64_t>(st.refcount.size());
      const int64_t id_bytes = this->id_bytes(s);
      const int64_t left = pinned ? prefix_limit_ - prefix_used_[0] - prefix_used_[1] - class_need[0] - class_need[1]
                                  : limit_[c] - used_[c] - class_need[c];
      // Division, not multiplication: n may be anything.
      if (need[s] - free_ids > st.num_pages - created || need[s] > left / id_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat(
            st.spec.name, ": needs ", need[s], " pages (", st.spec.page_bytes, " B x ", layers(s), " layers = ",
            id_bytes, " B each); ", st.num_pages - st.used, " of ", st.num_pages, " pages free; the ",
            pinned ? "prefix" : c == static_cast<int>(StreamClass::kHistory) ? "history" : "state", " budget has ",
            pinned ? prefix_limit_ - prefix_used_[0] - prefix_used_[1] : limit_[c] - used_[c], " of ",
            pinned ? prefix_limit_ : limit_[c], " bytes free"));
      }
      class_need[c] += need[s] * id_bytes;
    }
    try {  // room in every table first, so that nothing after it can fail
      for (int s = 0; s < kStreamCount; ++s) {
        if (need[s] == 0) continue;
        Stream& st = streams_[static_cast<size_t>(s)];
        const size_t created = st.refcount.size() + static_cast<size_t>(std::max<int64_t>(0, need[s] - static_cast<int64_t>(st.free.size())));
        if (st.refcount.capacity() < created) st.refcount.reserve(std::max(created, 2 * st.refcount.capacity()));
        if (st.pins.capacity() < created) st.pins.reserve(std::max(created, 2 * st.pins.capacity()));
        if (st.free.capacity() < created) st.free.reserve(std::max(created, 2 * st.free.capacity()));
        if (page_manager_ && st.deferred.capacity() < created) st.deferred.reserve(std::max(created, 2 * st.deferred.capacity()));
      }
      size_t total = 0;
      for (const Request& r : requests) {
        r.out->reserve(r.out->size() + static_cast<size_t>(r.n));
        total += static_cast<size_t>(r.n);
      }
      to_zero.reserve(total);
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError("page store: the system refused memory for the page tables");
    }
    for (const Request& r : requests) {
      Stream& st = streams_[static_cast<size_t>(r.stream)];
      for (int64_t i = 0; i < r.n; ++i) {
        PageId id;
        if (!st.free.empty()) {
          id = st.free.back();
          st.free.pop_back();
          st.refcount[static_cast<size_t>(id)] = 1;
          st.pins[static_cast<size_t>(id)] = pinned ? 1 : 0;
          if (!page_manager_) to_zero.emplace_back(r.stream, id);  // written before
        } else {
          id = static_cast<PageId>(st.refcount.size());
          st.refcount.push_back(1);
          st.pins.push_back(pinned ? 1 : 0);
          if (st.engine_owned && !page_manager_) to_zero.emplace_back(r.stream, id);  // kvc's fresh pages are zero
          if (!st.engine_owned && !page_manager_) {  // ids are created in order: one range per stream
            if (fresh_end[r.stream] == fresh_first[r.stream]) fresh_first[r.stream] = id;
            fresh_end[r.stream] = id + 1;
          }
        }
        r.out->push_back(id);
      }
      st.used += r.n;
      if (pinned) {
        st.pinned += r.n;
        st.cached += r.n;
      }
    }
    int64_t* const used = pinned ? prefix_used_ : used_;
    used[0] += class_need[0];
    used[1] += class_need[1];
  }
  for (const auto& [s, id] : to_zero) {
    for (const int32_t l : spec(s).layers) std::memset(Page(s, l, id), 0, static_cast<size_t>(spec(s).page_bytes));
  }
  for (int s = 0; s < kStreamCount; ++s) {
    if (fresh_end[s] > fresh_first[s]) Prefault(s, fresh_first[s], fresh_end[s], prefault_executor);
  }
  return absl::OkStatus();
}

// Fresh pages of kvc's arrays have never been touched: the writes that
// follow the grant would take one page fault per OS page (a trap each; ~8%
// of a 1M-token prefill in a VM). One MADV_POPULATE_WRITE per layer maps the
// whole range in a single call instead. Contents are unchanged (fresh pages
// read as zero either way), so a concurrent writer of a neighbouring id
// sharing an OS page is unaffected. A hint only: where the kernel refuses it
// (before Linux 5.14: EINVAL; ENOMEM under memory pressure) the pages fault
// in on first write, as without it. The kernel zeroes every page it maps
// (a tenth of a 1M-token prefill's time in a VM), so Append's grants run the
// layers' calls through its executor: a fresh id is mapped in all 21 CSA
// layers' arrays at once, which one thread did while the other core waited.
// Then one store of a zero per OS page that lies wholly in the fresh ids'
// bytes (no one else can be writing there; pages shared with a neighbouring
// id are left alone): a guest with shadow page tables still traps on the
// first write to each populated page (~5 us in the VM of
// docs/performance.md), and taking those traps here, in a burst, beat taking
// them in the row kernels' stores (fresh V4-Flash 1M-token prefill, two
// threads: 20.1 vs 21.0 s, medians of 8 interleaved runs).
// Grants under 1 MiB in all (a decode step's) stay on this thread.
void PageStore::Prefault(int s, PageId first, PageId end, Executor* executor) const {
  const int64_t page_bytes = spec(s).page_bytes;
  static const uintptr_t os_page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const std::vector<int32_t>& layers = spec(s).layers;
  const bool parallel = (end - first) * page_bytes * static_cast<int64_t>(layers.size()) >= (int64_t{1} << 20);
  std::atomic<bool> refused{false};
  ExecutorOrInline(parallel ? executor : nullptr).ParallelFor(static_cast<int64_t>(layers.size()), [&](int64_t i) {
    if (refused.load(std::memory_order_relaxed)) return;  // see above: the rest fault in as written
    const int32_t l = layers[static_cast<size_t>(i)];
    const uintptr_t begin = reinterpret_cast<uintptr_t>(Page(s, l, first)) & ~(os_page - 1);
    const uintptr_t stop = reinterpret_cast<uintptr_t>(Page(s, l, first)) + static_cast<uintptr_t>((end - first) * page_bytes);
    if (::madvise(reinterpret_cast<void*>(begin), stop - begin, MADV_POPULATE_WRITE) != 0) {
      refused.store(true, std::memory_order_relaxed);
      return;
    }
    const uintptr_t inside = (reinterpret_cast<uintptr_t>(Page(s, l, first)) + os_page - 1) & ~(os_page - 1);
    for (uintptr_t p = inside; p + os_page <= stop; p += os_page) *reinterpret_cast<volatile uint8_t*>(p) = 0;
  });
}

void PageStore::Ref(int s, PageId id) {
  std::lock_guard<std::mutex> lock(mu_);
  Stream& st = streams_[static_cast<size_t>(s)];
  const size_t i = static_cast<size_t>(id);
  if (st.refcount[i]++ == st.pins[i] && st.pins[i] > 0) ToLive(s);
}

void PageStore::Unref(int s, PageId id) {
  bool over_budget = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Stream& st = streams_[static_cast<size_t>(s)];
    const size_t i = static_cast<size_t>(id);
    if (--st.refcount[i] == 0) {
      Release(s, id);
    } else if (st.refcount[i] == st.pins[i]) {
      ToCacheOnly(s);  // its last live reference went
      over_budget = prefix_used_[0] + prefix_used_[1] > prefix_limit_;
    }
  }
  if (over_budget && over_budget_hook_) over_budget_hook_();
}

void PageStore::Release(int s, PageId id) {
  Stream& st = streams_[static_cast<size_t>(s)];
  if (page_manager_ && epoch_ > completed_epoch_) {  // a running step may still read it
    st.deferred.emplace_back(epoch_, id);             // capacity reserved when the id was created
    return;                                           // counted where it was (if anywhere) until CompleteSteps
  }
  Free(s, id);
}

void PageStore::Free(int s, PageId id) {
  Stream& st = streams_[static_cast<size_t>(s)];
  int32_t& pins = st.pins[static_cast<size_t>(id)];
  if (pins == -1) {
    pins = 0;  // an evicted prefix's page: it left the prefix budget when its last pin went
  } else {
    used_[static_cast<int>(st.spec.cls)] -= id_bytes(s);
  }
  st.free.push_back(id);  // capacity reserved when the id was created
  --st.used;
}

void PageStore::ToCacheOnly(int s) {
  const int c = static_cast<int>(spec(s).cls);
  used_[c] -= id_bytes(s);
  prefix_used_[c] += id_bytes(s);
  ++streams_[static_cast<size_t>(s)].cached;
}

void PageStore::ToLive(int s) {
  const int c = static_cast<int>(spec(s).cls);
  prefix_used_[c] -= id_bytes(s);
  used_[c] += id_bytes(s);
  --streams_[static_cast<size_t>(s)].cached;
}

void PageStore::Pin(int s, PageId id) {
  std::lock_guard<std::mutex> lock(mu_);
  Stream& st = streams_[static_cast<size_t>(s)];
  const size_t i = static_cast<size_t>(id);
  ++st.refcount[i];  // cache-only stays cache-only, live stays live
  if (st.pins[i]++ == 0) ++st.pinned;
}

void PageStore::Unpin(int s, PageId id) {
  std::lock_guard<std::mutex> lock(mu_);
  Stream& st = streams_[static_cast<size_t>(s)];
  const size_t i = static_cast<size_t>(id);
  // Dropping a pin with its reference keeps a cache-only id cache-only and
  // a live id live; only the last reference frees.
  --st.refcount[i];
  if (--st.pins[i] == 0) --st.pinned;
  if (st.refcount[i] == 0) {  // it was cache-only: its last reference was this pin
    // It leaves the prefix budget now, even if a running step may still read
    // it (page-manager mode; it is then reused only after CompleteSteps):
    // the prefix is gone, and a publish must not wait for the device to
    // find the room it made. pins -1 marks it counted in no budget.
    --st.cached;
    prefix_used_[static_cast<int>(st.spec.cls)] -= id_bytes(s);
    st.pins[i] = -1;
    Release(s, id);
  }
}

uint64_t PageStore::BeginStep() {
  std::lock_guard<std::mutex> lock(mu_);
  return ++epoch_;
}

int64_t PageStore::CompleteSteps(uint64_t epoch) {
  std::lock_guard<std::mutex> lock(mu_);
  completed_epoch_ = std::max(completed_epoch_, std::min(epoch, epoch_));
  int64_t released = 0;
  for (int s = 0; s < kStreamCount; ++s) {
    Stream& st = streams_[static_cast<size_t>(s)];
    size_t kept = 0;
    for (const auto& [tag, id] : st.deferred) {  // tags ascend: ids wait in the order they were freed
      if (tag > completed_epoch_) {
        st.deferred[kept++] = {tag, id};
        continue;
      }
      Free(s, id);
      ++released;
    }
    st.deferred.resize(kept);
  }
  return released;
}

uint64_t PageStore::epoch() const {
  std::lock_guard<std::mutex> lock(mu_);
  return epoch_;
}

uint64_t PageStore::completed_epoch() const {
  std::lock_guard<std::mutex> lock(mu_);
  return completed_epoch_;
}

absl::Status PageStore::RefLive(absl::Span<const std::pair<int, PageId>> ids) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t need[2] = {0, 0};  // bytes moving from the prefix budget to each class
  int first_short[2] = {-1, -1};
  for (const auto& [s, id] : ids) {
    const Stream& st = streams_[static_cast<size_t>(s)];
    const size_t i = static_cast<size_t>(id);
    if (st.refcount[i] == st.pins[i]) {
      const int c = static_cast<int>(st.spec.cls);
      need[c] += id_bytes(s);
      if (first_short[c] < 0) first_short[c] = s;
    }
  }
  for (int c = 0; c < 2; ++c) {
    if (need[c] > limit_[c] - used_[c]) {
      return absl::ResourceExhaustedError(absl::StrCat(
          spec(first_short[c]).name, ": a cached prefix's pages of ", need[c], " B become live; the ",
          c == static_cast<int>(StreamClass::kHistory) ? "history" : "state", " budget has ", limit_[c] - used_[c],
          " of ", limit_[c], " bytes free"));
    }
  }
  for (const auto& [s, id] : ids) {
    Stream& st = streams_[static_cast<size_t>(s)];
    const size_t i = static_cast<size_t>(id);
    if (st.refcount[i]++ == st.pins[i]) ToLive(s);
  }
  return absl::OkStatus();
}

int32_t PageStore::PinCount(int s, PageId id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return std::max(0, streams_[static_cast<size_t>(s)].pins[static_cast<size_t>(id)]);
}

int64_t PageStore::prefix_used() const {
  std::lock_guard<std::mutex> lock(mu_);
  return prefix_used_[0] + prefix_used_[1];
}

int64_t PageStore::prefix_used(StreamClass c) const {
  std::lock_guard<std::mutex> lock(mu_);
  return prefix_used_[static_cast<int>(c)];
}

int32_t PageStore::RefCount(int s, PageId id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return streams_[static_cast<size_t>(s)].refcount[static_cast<size_t>(id)];
}

void PageStore::CopyPage(int s, PageId from, PageId to, std::vector<PageCopy>* engine_copies) const {
  if (page_manager_) {
    engine_copies->push_back({static_cast<kvc::Stream>(s), from, to});
    return;
  }
  for (const int32_t l : spec(s).layers) {
    std::memcpy(Page(s, l, to), Page(s, l, from), static_cast<size_t>(spec(s).page_bytes));
  }
}

PageStore::Stats PageStore::StreamStats(int s) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Stream& st = streams_[static_cast<size_t>(s)];
  return {st.used, static_cast<int64_t>(st.refcount.size()), static_cast<int64_t>(st.deferred.size()), st.pinned,
          st.cached};
}

}  // namespace cache_internal
}  // namespace kvc
