#include "kvc/cache.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvc/compressor.h"
#include "kvc/page_pool.h"
#include "kvc/row_kernels.h"
#include "kvc/status.h"

namespace kvc {
namespace {

// The parts of a 584-byte KV row (row_formats.h).
constexpr int64_t kKvDataBytes = FormatInfo(RowFormat::kKvFp8).data_bytes;    // codes + bf16 RoPE dims
constexpr int64_t kKvScaleBytes = FormatInfo(RowFormat::kKvFp8).scale_bytes;  // UE8M0 scales + padding
constexpr int64_t kKvRowBytes = FormatInfo(RowFormat::kKvFp8).row_bytes;

// fp32 values per token row of a compressor's state: kv and score (+ape), each
// width_factor * dim wide (spec §5).
int64_t StateRowFloats(int width_factor, int dim) { return 2 * int64_t{width_factor} * dim; }

// Compressed entries (and index keys) that exist once `length` tokens are in.
int64_t EntriesAt(LayerKind kind, int64_t length) {
  const int ratio = CompressRatio(kind);
  return ratio == 0 ? 0 : length / ratio;
}

// One layer of one sequence.
struct LayerStreams {
  int64_t length = 0;  // tokens appended
  int64_t floor = 0;   // smallest length a Truncate may restore
  std::vector<PageId> ring;         // ceil(window / rows_per_page) pages, private
  PageId rollback = kNoPage;        // rollback_depth records, private (none if depth 0)
  std::vector<PageId> compressed;   // history pages, shared between forks
  int64_t compressed_rows = 0;
  std::vector<PageId> keys;         // history pages (CSA), shared between forks
  int64_t key_rows = 0;
  PageId state = kNoPage;           // main compressor state (CSA, HCA), private
  PageId indexer_state = kNoPage;   // indexer compressor state (CSA), private
};

struct Sequence {
  mutable std::mutex mu;  // guards the members below
  bool freed = false;
  std::vector<LayerStreams> layers;
};

}  // namespace

const char* ComponentName(Component component) {
  switch (component) {
    case Component::kWindowRing: return "window ring";
    case Component::kCompressedRows: return "compressed rows";
    case Component::kIndexKeys: return "index keys";
    case Component::kCompressorState: return "compressor state";
  }
  return "?";
}

int64_t CacheUsage::used_bytes() const {
  int64_t total = 0;
  for (const ComponentUsage& c : components) total += c.used_bytes;
  return total;
}

int64_t CacheUsage::reserved_bytes() const {
  int64_t total = 0;
  for (const ComponentUsage& c : components) total += c.reserved_bytes;
  return total;
}

int64_t SequenceUsage::total_bytes() const {
  int64_t total = 0;
  for (const int64_t b : bytes) total += b;
  return total;
}

struct Cache::Impl {
  ModelSpec spec;
  CacheOptions options;
  std::unique_ptr<Arena> history_arena;
  std::unique_ptr<Arena> state_arena;
  // State class.
  std::unique_ptr<PagePool> ring_pool;
  std::unique_ptr<PagePool> rollback_pool;
  std::unique_ptr<PagePool> csa_state_pool;
  std::unique_ptr<PagePool> csa_indexer_state_pool;
  std::unique_ptr<PagePool> hca_state_pool;
  // History class.
  std::unique_ptr<PagePool> compressed_pool;
  std::unique_ptr<PagePool> keys_pool;
  std::unique_ptr<RopeTable> compressed_rope;  // CSA/HCA layers' RoPE

  mutable std::mutex mu;  // guards the members below
  std::unordered_map<SequenceId, std::shared_ptr<Sequence>> sequences;
  SequenceId next_id = 1;

  int32_t window() const { return spec.window; }
  int32_t depth() const { return options.rollback_depth; }
  int32_t rows_per_page() const { return options.rows_per_page; }
  int64_t ring_pages() const { return (window() + rows_per_page() - 1) / rows_per_page(); }

  absl::StatusOr<std::shared_ptr<Sequence>> Find(SequenceId id) const {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = sequences.find(id);
    if (it == sequences.end()) return absl::NotFoundError(absl::StrCat("no sequence ", id));
    return it->second;
  }

  // A live sequence with its lock held; kNotFound for unknown or freed ids.
  struct Locked {
    std::shared_ptr<Sequence> seq;
    std::unique_lock<std::mutex> lock;
    std::vector<LayerStreams>& layers() const { return seq->layers; }
  };
  absl::StatusOr<Locked> Lock(SequenceId id) const {
    KVC_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq, Find(id));
    std::unique_lock<std::mutex> lock(seq->mu);
    if (seq->freed) return absl::NotFoundError(absl::StrCat("sequence ", id, " was freed"));
    return Locked{std::move(seq), std::move(lock)};
  }

  absl::Status CheckLayer(int layer) const {
    if (layer < 0 || layer >= static_cast<int>(spec.layers.size())) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is outside [0, ", spec.layers.size(), ")"));
    }
    return absl::OkStatus();
  }

  PagePool* StatePool(LayerKind kind) const {
    return kind == LayerKind::kCsa ? csa_state_pool.get() : kind == LayerKind::kHca ? hca_state_pool.get() : nullptr;
  }

  // --- Window ring and rollback records ---------------------------------

  PackedRows RingPage(const LayerStreams& ls, int64_t page) const {
    return PageFooterRows(RowFormat::kKvFp8, ring_pool->Data(ls.ring[static_cast<size_t>(page)]), rows_per_page());
  }
  // The one-row view of ring slot `slot`.
  PackedRows RingSlot(const LayerStreams& ls, int64_t slot) const {
    return RingPage(ls, slot / rows_per_page()).Slice(slot % rows_per_page(), 1);
  }
  // Rollback record i: a contiguous 584-byte row, plus the position whose
  // append evicted it (-1: none).
  PackedRows RollbackRow(const LayerStreams& ls, int64_t i) const {
    return ContiguousRows(RowFormat::kKvFp8, rollback_pool->Data(ls.rollback), depth()).Slice(i, 1);
  }
  int64_t* RollbackEvictors(const LayerStreams& ls) const {
    return reinterpret_cast<int64_t*>(rollback_pool->Data(ls.rollback) + depth() * kKvRowBytes);
  }

  WindowRingView RingView(const LayerStreams& ls) const {
    WindowRingView view;
    view.rows_per_page = rows_per_page();
    view.window = window();
    view.length = ls.length;
    for (int64_t p = 0; p < ring_pages(); ++p) view.pages.push_back(RingPage(ls, p));
    return view;
  }

  static void CopyRow(ConstPackedRows from, PackedRows to) {
    std::memcpy(to.data, from.data, kKvDataBytes);
    std::memcpy(to.scales, from.scales, kKvScaleBytes);
  }
  static void ZeroRow(PackedRows row) {
    std::memset(row.data, 0, kKvDataBytes);
    std::memset(row.scales, 0, kKvScaleBytes);
  }

  // Writes tokens [L, L + n) (rows validated finite) into the ring. Only the
  // rows that survive are quantized: the last `window` into their slots, and
  // for the last `depth` positions q the row each evicts (position q - W,
  // from the old ring or from this chunk) into rollback record q mod depth.
  void WriteWindow(LayerStreams& ls, absl::Span<const Bf16> rows) const {
    const int64_t L = ls.length;
    const int64_t n = static_cast<int64_t>(rows.size()) / kHeadDim;
    const int64_t W = window();
    auto quantize = [&](int64_t position, PackedRows to) {
      const absl::Status s = QuantizeKvRows(rows.subspan(static_cast<size_t>((position - L) * kHeadDim), kHeadDim), to);
      (void)s;  // cannot fail: the rows were validated and the view is well-formed
    };
    if (depth() > 0) {
      int64_t* evictors = RollbackEvictors(ls);
      for (int64_t q = std::max(L, L + n - depth()); q < L + n; ++q) {
        const int64_t evicted = q - W;
        const PackedRows record = RollbackRow(ls, q % depth());
        if (evicted < 0) {
          ZeroRow(record);
        } else if (evicted < L) {
          CopyRow(RingSlot(ls, evicted % W), record);
        } else {
          quantize(evicted, record);
        }
        evictors[q % depth()] = q;
      }
    }
    // Ring slots, in runs that stay inside one page.
    for (int64_t p = std::max(L, L + n - W); p < L + n;) {
      const int64_t slot = p % W;
      const int64_t in_page = slot % rows_per_page();
      int64_t run = std::min({L + n - p, W - slot, rows_per_page() - in_page});
      const absl::Status s = QuantizeKvRows(rows.subspan(static_cast<size_t>((p - L) * kHeadDim), static_cast<size_t>(run * kHeadDim)),
                                            RingPage(ls, slot / rows_per_page()).Slice(in_page, run));
      (void)s;  // cannot fail, as above
      p += run;
    }
  }

  // --- History streams ----------------------------------------------------

  struct History {
    std::vector<PageId>* pages;
    int64_t* rows;
    PagePool* pool;
    RowFormat format;
    int64_t per_page;
  };
  History CompressedOf(LayerStreams& ls) const {
    return {&ls.compressed, &ls.compressed_rows, compressed_pool.get(), RowFormat::kKvFp8, rows_per_page()};
  }
  History KeysOf(LayerStreams& ls) const {
    return {&ls.keys, &ls.key_rows, keys_pool.get(), RowFormat::kIndexFp4, options.keys_per_page};
  }
  PackedRows HistoryPage(const History& h, size_t page) const {
    return PageFooterRows(h.format, h.pool->Data((*h.pages)[page]), h.per_page);
  }

  // The pages `n` more rows of a history stream need: new pages, plus a
  // private copy of a partial last page shared with a fork. Allocated now
  // (all or nothing); Commit uses them, Abandon returns them.
  struct HistoryPlan {
    std::vector<PageId> fresh;
    bool copy_last = false;
  };
  absl::StatusOr<HistoryPlan> PlanHistory(const History& h, int64_t n) const {
    HistoryPlan plan;
    const int64_t rows = *h.rows;
    plan.copy_last = n > 0 && rows % h.per_page != 0 && h.pool->RefCount(h.pages->back()) > 1;
    const int64_t new_pages = (rows + n + h.per_page - 1) / h.per_page - static_cast<int64_t>(h.pages->size());
    KVC_RETURN_IF_ERROR(h.pool->Allocate(new_pages + (plan.copy_last ? 1 : 0), &plan.fresh));
    return plan;
  }
  static void AbandonHistory(const History& h, const HistoryPlan& plan) {
    for (const PageId id : plan.fresh) h.pool->Unref(id);
  }

  // Writes validated rows into the planned pages (cannot fail).
  void CommitHistory(const History& h, const HistoryPlan& plan, absl::Span<const Bf16> values, int dims,
                     absl::Status (*quantize)(absl::Span<const Bf16>, PackedRows)) const {
    const int64_t n = static_cast<int64_t>(values.size()) / dims;
    const int64_t rows = *h.rows;
    size_t next = 0;
    if (plan.copy_last) {  // copy-on-write of the page this sequence shares
      const PageId shared = h.pages->back();
      std::memcpy(h.pool->Data(plan.fresh[next]), h.pool->Data(shared), static_cast<size_t>(h.pool->page_bytes()));
      h.pool->Unref(shared);
      h.pages->back() = plan.fresh[next++];
    }
    while (next < plan.fresh.size()) h.pages->push_back(plan.fresh[next++]);
    for (int64_t i = 0; i < n;) {
      const int64_t at = rows + i;
      const int64_t run = std::min(n - i, h.per_page - at % h.per_page);
      const absl::Status s = quantize(values.subspan(static_cast<size_t>(i * dims), static_cast<size_t>(run * dims)),
                                      HistoryPage(h, static_cast<size_t>(at / h.per_page)).Slice(at % h.per_page, run));
      (void)s;  // cannot fail: validated values, well-formed view
      i += run;
    }
    *h.rows += n;
  }

  absl::Status AppendHistory(const History& h, absl::Span<const Bf16> values, int dims,
                             absl::Status (*quantize)(absl::Span<const Bf16>, PackedRows)) const {
    KVC_ASSIGN_OR_RETURN(const HistoryPlan plan, PlanHistory(h, static_cast<int64_t>(values.size()) / dims));
    CommitHistory(h, plan, values, dims, quantize);
    return absl::OkStatus();
  }

  // --- Compressors ---------------------------------------------------------

  // One compressor of one layer: its geometry, the engine's parameters, its
  // state ring (token rows kv ‖ score + ape, slot = t mod capacity) and the
  // chunk being appended.
  struct CompressorRun {
    CompressorGeometry g;
    const CompressorParams* params;
    float* state;
    int64_t capacity;  // token rows in the state ring
    const float* kv;     // chunk projections, n x width
    const float* score;  // without ape
    int64_t first;       // position of the chunk's first token
  };

  int64_t StateCapacity(const CompressorGeometry& g) const { return g.span() + depth(); }

  CompressorRun RunFor(const LayerStreams& ls, bool indexer, const LayerSpec& spec_layer, const LayerTokens& t) const {
    CompressorRun run;
    run.g = indexer ? IndexerCompressor(spec.index_dim) : MainCompressor(spec_layer.kind, spec.head_dim);
    run.params = indexer ? &spec_layer.indexer : &spec_layer.compressor;
    PagePool* pool = indexer ? csa_indexer_state_pool.get() : StatePool(spec_layer.kind);
    run.state = reinterpret_cast<float*>(pool->Data(indexer ? ls.indexer_state : ls.state));
    run.capacity = StateCapacity(run.g);
    run.kv = indexer ? t.indexer_kv.data() : t.compressor_kv.data();
    run.score = indexer ? t.indexer_score.data() : t.compressor_score.data();
    run.first = ls.length;
    return run;
  }

  // Token t's `half` (0 or 1) as a pooling slot: from the state ring if it
  // was appended before this chunk (its score already holds ape), else from
  // the chunk (ape added on the fly).
  static PoolSlot Slot(const CompressorRun& run, int64_t t, int half) {
    const int64_t width = run.g.width();
    const int64_t offset = half * run.g.dim;
    if (t < run.first) {
      const float* row = run.state + (t % run.capacity) * 2 * width;
      return {row + offset, row + width + offset, nullptr};
    }
    const int64_t i = t - run.first;
    return {run.kv + i * width + offset, run.score + i * width + offset,
            run.params->ape.data() + (t % run.g.ratio) * width + offset};
  }

  // Entry i of a compressor: pools its window's slots, then norm + RoPE with
  // the given (cos, sin) pairs into `out` (dim bf16 values).
  void ComputeEntry(const CompressorRun& run, int64_t i, const float* cos_sin, float* pooled, Bf16* out) const {
    const CompressorGeometry& g = run.g;
    PoolSlot slots[256];
    int count = 0;
    if (g.overlap && i > 0) {  // the previous window's first halves (none for entry 0)
      for (int j = 0; j < g.ratio; ++j) slots[count++] = Slot(run, (i - 1) * g.ratio + j, 0);
    }
    for (int j = 0; j < g.ratio; ++j) slots[count++] = Slot(run, i * g.ratio + j, g.overlap ? 1 : 0);
    PoolChannels(slots, count, g.dim, pooled);
    NormRope(pooled, g.dim, run.params->norm_weight.data(), static_cast<float>(spec.norm_eps), cos_sin, out);
  }

  // The entries (and, with an indexer, keys) of the windows that close with
  // tokens [from, to) of the chunk, written at their index relative to the
  // chunk's first closed window; changes nothing in the cache.
  void ComputeEntries(const CompressorRun& main, const CompressorRun* indexer, int64_t from, int64_t to,
                      std::vector<Bf16>& entries, std::vector<Bf16>& keys) const {
    const int m = main.g.ratio;
    const int64_t first_entry = main.first / m;
    std::vector<float> pooled(static_cast<size_t>(main.g.dim));
    float cos_sin[64];
    for (int64_t i = from / m; i < to / m; ++i) {
      compressed_rope->At(i * m, cos_sin);       // shared by the entry and its index key
      const size_t at = static_cast<size_t>(i - first_entry);
      ComputeEntry(main, i, cos_sin, pooled.data(), &entries[at * static_cast<size_t>(main.g.dim)]);
      if (indexer != nullptr) {
        ComputeEntry(*indexer, i, cos_sin, pooled.data(), &keys[at * static_cast<size_t>(indexer->g.dim)]);
      }
    }
  }

  // Keeps the chunk's last tokens (as many as the ring holds) in the state
  // ring: kv, then score + ape.
  static void WriteState(const CompressorRun& run, int64_t n) {
    const int64_t width = run.g.width();
    for (int64_t t = std::max(run.first, run.first + n - run.capacity); t < run.first + n; ++t) {
      const PoolSlot src = Slot(run, t, 0);
      float* row = run.state + (t % run.capacity) * 2 * width;
      std::memcpy(row, src.kv, static_cast<size_t>(width) * sizeof(float));
      for (int64_t c = 0; c < width; ++c) row[width + c] = src.score[c] + src.ape[c];
    }
  }

  HistoryView ViewOf(const History& h) const {
    HistoryView view;
    view.rows_per_page = static_cast<int32_t>(h.per_page);
    view.rows = *h.rows;
    for (size_t p = 0; p < h.pages->size(); ++p) view.pages.push_back(HistoryPage(h, p));
    return view;
  }

  // --- Page ownership ---------------------------------------------------

  // The private state pages of a new sequence (or fork), all or nothing.
  absl::Status AllocateState(std::vector<LayerStreams>& layers) const {
    int64_t csa = 0, hca = 0;
    for (const LayerSpec& l : spec.layers) {
      csa += l.kind == LayerKind::kCsa ? 1 : 0;
      hca += l.kind == LayerKind::kHca ? 1 : 0;
    }
    const int64_t n_layers = static_cast<int64_t>(spec.layers.size());
    struct Need {
      PagePool* pool;
      int64_t n;
      std::vector<PageId> pages;
    } needs[] = {{ring_pool.get(), n_layers * ring_pages(), {}},
                 {rollback_pool.get(), depth() > 0 ? n_layers : 0, {}},
                 {csa_state_pool.get(), csa, {}},
                 {csa_indexer_state_pool.get(), csa, {}},
                 {hca_state_pool.get(), hca, {}}};
    for (Need& need : needs) {
      const absl::Status s = need.n > 0 ? need.pool->Allocate(need.n, &need.pages) : absl::OkStatus();
      if (!s.ok()) {
        for (Need& taken : needs) {
          for (const PageId id : taken.pages) taken.pool->Unref(id);
        }
        return s;
      }
    }
    layers.assign(spec.layers.size(), LayerStreams{});
    size_t ring_i = 0, csa_i = 0, hca_i = 0;
    for (size_t i = 0; i < layers.size(); ++i) {
      LayerStreams& ls = layers[i];
      for (int64_t p = 0; p < ring_pages(); ++p) ls.ring.push_back(needs[0].pages[ring_i++]);
      if (depth() > 0) {
        ls.rollback = needs[1].pages[i];
        std::fill_n(RollbackEvictors(ls), depth(), int64_t{-1});
      }
      if (spec.layers[i].kind == LayerKind::kCsa) {
        ls.state = needs[2].pages[csa_i];
        ls.indexer_state = needs[3].pages[csa_i++];
      } else if (spec.layers[i].kind == LayerKind::kHca) {
        ls.state = needs[4].pages[hca_i++];
      }
    }
    return absl::OkStatus();
  }

  // Drops every page reference of `layers`.
  void Release(std::vector<LayerStreams>& layers) const {
    for (size_t i = 0; i < layers.size(); ++i) {
      LayerStreams& ls = layers[i];
      for (const PageId id : ls.ring) ring_pool->Unref(id);
      if (ls.rollback != kNoPage) rollback_pool->Unref(ls.rollback);
      for (const PageId id : ls.compressed) compressed_pool->Unref(id);
      for (const PageId id : ls.keys) keys_pool->Unref(id);
      if (ls.state != kNoPage) StatePool(spec.layers[i].kind)->Unref(ls.state);
      if (ls.indexer_state != kNoPage) csa_indexer_state_pool->Unref(ls.indexer_state);
    }
    layers.clear();
  }

  absl::Status SameLengthEverywhere(const std::vector<LayerStreams>& layers, SequenceId id, const char* what) const {
    for (size_t i = 1; i < layers.size(); ++i) {
      if (layers[i].length != layers[0].length) {
        return absl::FailedPreconditionError(absl::StrCat(what, " sequence ", id, ": layer ", i, " holds ",
                                                          layers[i].length, " tokens but layer 0 holds ",
                                                          layers[0].length, "; finish the step first"));
      }
    }
    return absl::OkStatus();
  }
};

Cache::Cache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Cache::~Cache() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (auto& [id, seq] : impl_->sequences) {
    std::lock_guard<std::mutex> seq_lock(seq->mu);
    impl_->Release(seq->layers);
  }
}

absl::StatusOr<std::unique_ptr<Cache>> Cache::Create(ModelSpec spec, CacheOptions options) {
  KVC_RETURN_IF_ERROR(spec.Validate());
  if (options.rollback_depth < 0 || options.rollback_depth > spec.window) {
    return absl::InvalidArgumentError(absl::StrCat("rollback_depth ", options.rollback_depth,
                                                   " must be in [0, window = ", spec.window, "]"));
  }
  if (options.rows_per_page < 1 || options.rows_per_page > 4096 || options.keys_per_page < 1 ||
      options.keys_per_page > 65536) {
    return absl::InvalidArgumentError("rows_per_page must be in [1, 4096] and keys_per_page in [1, 65536]");
  }
  if (options.history_region.empty() && options.history_bytes < 0) {
    return absl::InvalidArgumentError("history_bytes must be >= 0");
  }
  if (options.state_region.empty() && options.state_bytes < 0) {
    return absl::InvalidArgumentError("state_bytes must be >= 0");
  }
  auto impl = std::make_unique<Impl>();
  impl->spec = std::move(spec);
  impl->options = options;
  impl->history_arena = options.history_region.empty()
                            ? std::make_unique<Arena>("history", options.history_bytes)
                            : std::make_unique<Arena>("history", options.history_region);
  impl->state_arena = options.state_region.empty() ? std::make_unique<Arena>("state", options.state_bytes)
                                                   : std::make_unique<Arena>("state", options.state_region);
  const int64_t D = options.rollback_depth;
  const int64_t d = impl->spec.head_dim, di = impl->spec.index_dim;
  Arena* state = impl->state_arena.get();
  Arena* history = impl->history_arena.get();
  impl->ring_pool = std::make_unique<PagePool>("window ring", PageBytes(RowFormat::kKvFp8, options.rows_per_page), state);
  impl->rollback_pool = std::make_unique<PagePool>("rollback rows", D * (kKvRowBytes + 8), state);
  // Compressor state keeps the open window(s) plus D token rows for rollback.
  impl->csa_state_pool = std::make_unique<PagePool>(
      "CSA compressor state", (2 * 4 + D) * StateRowFloats(2, static_cast<int>(d)) * 4, state);
  impl->csa_indexer_state_pool = std::make_unique<PagePool>(
      "CSA indexer state", (2 * 4 + D) * StateRowFloats(2, static_cast<int>(di)) * 4, state);
  impl->hca_state_pool = std::make_unique<PagePool>(
      "HCA compressor state", (128 + D) * StateRowFloats(1, static_cast<int>(d)) * 4, state);
  impl->compressed_pool = std::make_unique<PagePool>("compressed rows", PageBytes(RowFormat::kKvFp8, options.rows_per_page), history);
  impl->keys_pool = std::make_unique<PagePool>("index keys", PageBytes(RowFormat::kIndexFp4, options.keys_per_page), history);
  impl->compressed_rope = std::make_unique<RopeTable>(impl->spec.compressed_rope);
  return std::unique_ptr<Cache>(new Cache(std::move(impl)));
}

absl::StatusOr<SequenceId> Cache::CreateSequence() {
  auto seq = std::make_shared<Sequence>();
  {
    std::lock_guard<std::mutex> seq_lock(seq->mu);
    KVC_RETURN_IF_ERROR(impl_->AllocateState(seq->layers));
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  const SequenceId id = impl_->next_id++;
  impl_->sequences.emplace(id, std::move(seq));
  return id;
}

namespace {

// True if kvc computes this layer's compressed entries (its ModelSpec carries
// the compressor parameters); false for window-only layers and for compressed
// layers whose engine brings its own entries.
bool KvcCompresses(const LayerSpec& layer) {
  return layer.kind != LayerKind::kWindow && !layer.compressor.ape.empty();
}

// The four projection inputs of a chunk: what each is called, how wide its
// rows are, and whether this layer takes it.
struct Projection {
  absl::Span<const float> values;
  const char* name;
  int64_t width;
  bool used;
};

std::array<Projection, 4> Projections(const ModelSpec& spec, const LayerSpec& l, const LayerTokens& t) {
  const bool main = KvcCompresses(l), indexer = main && l.kind == LayerKind::kCsa;
  const int64_t w = MainCompressor(l.kind, spec.head_dim).width(), iw = IndexerCompressor(spec.index_dim).width();
  return {{{t.compressor_kv, "compressor_kv", w, main},
           {t.compressor_score, "compressor_score", w, main},
           {t.indexer_kv, "indexer_kv", iw, indexer},
           {t.indexer_score, "indexer_score", iw, indexer}}};
}

// The projections a chunk of n tokens must carry on this layer (shapes only).
absl::Status CheckProjectionShapes(const ModelSpec& spec, int layer, const LayerTokens& t, int64_t n) {
  const LayerSpec& l = spec.layers[static_cast<size_t>(layer)];
  for (const Projection& input : Projections(spec, l, t)) {
    if (!input.used) {
      if (!input.values.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "Append: layer ", layer, " (", LayerKindName(l.kind), ") takes no ", input.name,
            l.kind == LayerKind::kWindow ? "" : "; set ModelSpec.layers[i].compressor (and .indexer) for kvc to compress it"));
      }
      continue;
    }
    if (static_cast<int64_t>(input.values.size()) != n * input.width) {
      return absl::InvalidArgumentError(absl::StrCat("Append: layer ", layer, " ", input.name, " holds ",
                                                     input.values.size(), " values; expected ", n, " x ", input.width));
    }
  }
  return absl::OkStatus();
}

// Finiteness of tokens [from, to) of every input of a chunk (shapes checked).
// On a refusal the whole input is checked again, so the message names the
// row within the chunk.
absl::Status CheckFiniteSlice(const LayerTokens& t, int64_t from, int64_t to, const LayerSpec& l, const ModelSpec& spec) {
  auto rows = [&](auto span, int64_t width) {
    return span.subspan(static_cast<size_t>(from * width), static_cast<size_t>((to - from) * width));
  };
  if (!CheckFiniteRows(rows(t.window_rows, kHeadDim), kHeadDim, "Append: window_rows").ok()) {
    return CheckFiniteRows(t.window_rows, kHeadDim, "Append: window_rows");
  }
  for (const Projection& input : Projections(spec, l, t)) {
    if (!input.used) continue;
    const std::string what = absl::StrCat("Append: ", input.name);
    if (!CheckFiniteF32(rows(input.values, input.width), input.width, what.c_str()).ok()) {
      return CheckFiniteF32(input.values, input.width, what.c_str());
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Cache::Append(SequenceId id, int layer, int64_t position, const LayerTokens& tokens) {
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  LayerStreams& ls = seq.layers()[static_cast<size_t>(layer)];
  const LayerSpec& layer_spec = impl_->spec.layers[static_cast<size_t>(layer)];
  if (tokens.window_rows.size() % kHeadDim != 0) {
    return absl::InvalidArgumentError(absl::StrCat("Append: window_rows holds ", tokens.window_rows.size(),
                                                   " values, not a whole number of 512-value rows"));
  }
  const int64_t n = static_cast<int64_t>(tokens.window_rows.size()) / kHeadDim;
  if (position != ls.length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Append: sequence ", id, " layer ", layer, " holds ", ls.length, " tokens; position ", position,
        position < ls.length ? " repeats tokens already appended" : " would leave a gap"));
  }
  if (n > impl_->spec.max_context - position) {
    return absl::OutOfRangeError(absl::StrCat("Append: ", position, " + ", n, " tokens exceed max_context ",
                                              impl_->spec.max_context));
  }
  KVC_RETURN_IF_ERROR(CheckProjectionShapes(impl_->spec, layer, tokens, n));
  const bool compresses = KvcCompresses(layer_spec);
  const bool indexes = compresses && layer_spec.kind == LayerKind::kCsa;
  Impl::CompressorRun main_run, indexer_run;
  std::vector<Bf16> entries, keys;
  if (compresses) {
    main_run = impl_->RunFor(ls, false, layer_spec, tokens);
    const int64_t closed = (position + n) / main_run.g.ratio - position / main_run.g.ratio;
    entries.resize(static_cast<size_t>(closed * kHeadDim));
    if (indexes) {
      indexer_run = impl_->RunFor(ls, true, layer_spec, tokens);
      keys.resize(static_cast<size_t>(closed * kIndexDim));
    }
  }
  // Validate and compute slice by slice, so a slice's inputs are still in
  // cache when its entries are pooled. Nothing in the cache changes here.
  constexpr int64_t kSlice = 512;
  for (int64_t from = 0; from < n; from += kSlice) {
    const int64_t to = std::min(n, from + kSlice);
    KVC_RETURN_IF_ERROR(CheckFiniteSlice(tokens, from, to, layer_spec, impl_->spec));
    if (compresses) {
      impl_->ComputeEntries(main_run, indexes ? &indexer_run : nullptr, position + from, position + to, entries, keys);
    }
  }
  if (n == 0) return absl::OkStatus();

  // Plan the entries' pages: a refusal still leaves the cache as it was.
  Impl::HistoryPlan entry_plan, key_plan;
  if (compresses) {
    KVC_ASSIGN_OR_RETURN(entry_plan, impl_->PlanHistory(impl_->CompressedOf(ls), static_cast<int64_t>(entries.size()) / kHeadDim));
  }
  if (indexes) {
    absl::StatusOr<Impl::HistoryPlan> plan =
        impl_->PlanHistory(impl_->KeysOf(ls), static_cast<int64_t>(keys.size()) / kIndexDim);
    if (!plan.ok()) {
      Impl::AbandonHistory(impl_->CompressedOf(ls), entry_plan);
      return plan.status();
    }
    key_plan = *std::move(plan);
  }

  // Apply (cannot fail).
  impl_->WriteWindow(ls, tokens.window_rows);
  if (compresses) {
    Impl::WriteState(main_run, n);
    impl_->CommitHistory(impl_->CompressedOf(ls), entry_plan, entries, kHeadDim, QuantizeKvRows);
  }
  if (indexes) {
    Impl::WriteState(indexer_run, n);
    impl_->CommitHistory(impl_->KeysOf(ls), key_plan, keys, kIndexDim, QuantizeIndexKeys);
  }
  ls.length += n;
  ls.floor = std::max(ls.floor, ls.length - impl_->depth());
  return absl::OkStatus();
}

namespace {

// Shared checks of the two history appends; returns the number of rows.
absl::StatusOr<int64_t> CheckHistoryAppend(const ModelSpec& spec, int layer, const LayerStreams& ls, int64_t stored,
                                           int64_t first, size_t values, int dims, bool keys, const char* what) {
  const LayerKind kind = spec.layers[static_cast<size_t>(layer)].kind;
  if (KvcCompresses(spec.layers[static_cast<size_t>(layer)])) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, ": kvc computes layer ", layer, "'s entries from the projections passed to Append"));
  }
  if (keys ? kind != LayerKind::kCsa : kind == LayerKind::kWindow) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": layer ", layer, " is a ", LayerKindName(kind),
                                                   " layer, which has no ", keys ? "index keys" : "compressed rows"));
  }
  if (values % static_cast<size_t>(dims) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", values, " values are not whole ", dims, "-value rows"));
  }
  const int64_t n = static_cast<int64_t>(values) / dims;
  if (first != stored) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": layer ", layer, " holds ", stored, " entries; entry ",
                                                   first, first < stored ? " repeats one" : " would leave a gap"));
  }
  const int64_t closed = EntriesAt(kind, ls.length);
  if (n > closed - first) {
    return absl::OutOfRangeError(absl::StrCat(what, ": entries up to ", first + n, " but layer ", layer, " has ",
                                              ls.length, " tokens, which close ", closed, " windows"));
  }
  return n;
}

}  // namespace

absl::Status Cache::AppendCompressedRows(SequenceId id, int layer, int64_t first, absl::Span<const Bf16> rows) {
  constexpr const char* kWhat = "AppendCompressedRows";
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  LayerStreams& ls = seq.layers()[static_cast<size_t>(layer)];
  KVC_ASSIGN_OR_RETURN(const int64_t n, CheckHistoryAppend(impl_->spec, layer, ls, ls.compressed_rows, first,
                                                           rows.size(), kHeadDim, false, kWhat));
  KVC_RETURN_IF_ERROR(CheckFiniteRows(rows, kHeadDim, kWhat));
  if (n == 0) return absl::OkStatus();
  return impl_->AppendHistory(impl_->CompressedOf(ls), rows, kHeadDim, QuantizeKvRows);
}

absl::Status Cache::AppendIndexKeys(SequenceId id, int layer, int64_t first, absl::Span<const Bf16> keys) {
  constexpr const char* kWhat = "AppendIndexKeys";
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  LayerStreams& ls = seq.layers()[static_cast<size_t>(layer)];
  KVC_ASSIGN_OR_RETURN(const int64_t n, CheckHistoryAppend(impl_->spec, layer, ls, ls.key_rows, first, keys.size(),
                                                           kIndexDim, true, kWhat));
  // The key kernel also refuses |x| > 2^120 (its Hadamard could overflow);
  // check here too so that nothing is written on a refusal.
  for (size_t i = 0; i < keys.size(); ++i) {
    const float x = ToF32(keys[i]);
    if (!(std::fabs(x) <= 0x1p120f)) {
      return absl::InvalidArgumentError(absl::StrCat(kWhat, ": key ", i / kIndexDim, " dim ", i % kIndexDim,
                                                     std::isnan(x) ? " is NaN" : std::isinf(x) ? " is infinite"
                                                                                                : " exceeds 2^120"));
    }
  }
  if (n == 0) return absl::OkStatus();
  return impl_->AppendHistory(impl_->KeysOf(ls), keys, kIndexDim, QuantizeIndexKeys);
}

absl::StatusOr<HistoryView> Cache::CompressedRows(SequenceId id, int layer) const {
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  return impl_->ViewOf(impl_->CompressedOf(seq.layers()[static_cast<size_t>(layer)]));
}

absl::StatusOr<HistoryView> Cache::IndexKeys(SequenceId id, int layer) const {
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  return impl_->ViewOf(impl_->KeysOf(seq.layers()[static_cast<size_t>(layer)]));
}

absl::StatusOr<SequenceId> Cache::Fork(SequenceId id) {
  KVC_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> parent, impl_->Find(id));
  auto child = std::make_shared<Sequence>();
  {
    std::lock_guard<std::mutex> parent_lock(parent->mu);
    if (parent->freed) return absl::NotFoundError(absl::StrCat("sequence ", id, " was freed"));
    KVC_RETURN_IF_ERROR(impl_->SameLengthEverywhere(parent->layers, id, "Fork:"));
    std::lock_guard<std::mutex> child_lock(child->mu);
    KVC_RETURN_IF_ERROR(impl_->AllocateState(child->layers));
    // Apply (cannot fail): copy private state, share history.
    for (size_t i = 0; i < parent->layers.size(); ++i) {
      const LayerStreams& from = parent->layers[i];
      LayerStreams& to = child->layers[i];
      auto copy = [](const PagePool* pool, PageId from_page, PageId to_page) {
        std::memcpy(pool->Data(to_page), pool->Data(from_page), static_cast<size_t>(pool->page_bytes()));
      };
      for (size_t p = 0; p < from.ring.size(); ++p) copy(impl_->ring_pool.get(), from.ring[p], to.ring[p]);
      if (from.rollback != kNoPage) copy(impl_->rollback_pool.get(), from.rollback, to.rollback);
      if (from.state != kNoPage) copy(impl_->StatePool(impl_->spec.layers[i].kind), from.state, to.state);
      if (from.indexer_state != kNoPage) copy(impl_->csa_indexer_state_pool.get(), from.indexer_state, to.indexer_state);
      for (const PageId page : from.compressed) impl_->compressed_pool->Ref(page);
      for (const PageId page : from.keys) impl_->keys_pool->Ref(page);
      to.compressed = from.compressed;
      to.compressed_rows = from.compressed_rows;
      to.keys = from.keys;
      to.key_rows = from.key_rows;
      to.length = from.length;
      to.floor = from.floor;
    }
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  const SequenceId child_id = impl_->next_id++;
  impl_->sequences.emplace(child_id, std::move(child));
  return child_id;
}

absl::Status Cache::Truncate(SequenceId id, int64_t length) {
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  KVC_RETURN_IF_ERROR(impl_->SameLengthEverywhere(seq.layers(), id, "Truncate:"));
  const int64_t current = seq.layers()[0].length;
  if (length < 0 || length > current) {
    return absl::InvalidArgumentError(absl::StrCat("Truncate: sequence ", id, " holds ", current,
                                                   " tokens; cannot truncate to ", length));
  }
  int64_t floor = 0;
  for (const LayerStreams& ls : seq.layers()) floor = std::max(floor, ls.floor);
  if (length < floor) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Truncate: sequence ", id, " can be rolled back to ", floor, " tokens at the least (rollback_depth ",
        impl_->depth(), "), not to ", length));
  }
  const int64_t W = impl_->window();
  const int64_t D = impl_->depth();
  for (const LayerStreams& ls : seq.layers()) {  // the invariant the floor guarantees
    for (int64_t q = length; q < current; ++q) {
      if (impl_->RollbackEvictors(ls)[q % D] != q) {
        return absl::InternalError(absl::StrCat("Truncate: rollback record of position ", q, " is missing"));
      }
    }
  }
  // Apply (cannot fail).
  for (size_t i = 0; i < seq.layers().size(); ++i) {
    LayerStreams& ls = seq.layers()[i];
    int64_t* evictors = length < current ? impl_->RollbackEvictors(ls) : nullptr;
    for (int64_t q = current - 1; q >= length; --q) {
      Impl::CopyRow(impl_->RollbackRow(ls, q % D), impl_->RingSlot(ls, q % W));
      evictors[q % D] = -1;
    }
    const LayerKind kind = impl_->spec.layers[i].kind;
    auto shrink = [](std::vector<PageId>& pages, int64_t& rows, int64_t keep_rows, int64_t per_page, PagePool* pool) {
      rows = std::min(rows, keep_rows);
      const size_t keep_pages = static_cast<size_t>((rows + per_page - 1) / per_page);
      while (pages.size() > keep_pages) {
        pool->Unref(pages.back());
        pages.pop_back();
      }
    };
    shrink(ls.compressed, ls.compressed_rows, EntriesAt(kind, length), impl_->rows_per_page(),
           impl_->compressed_pool.get());
    shrink(ls.keys, ls.key_rows, kind == LayerKind::kCsa ? EntriesAt(kind, length) : 0,
           impl_->options.keys_per_page, impl_->keys_pool.get());
    ls.length = length;
  }
  return absl::OkStatus();
}

absl::Status Cache::Free(SequenceId id) {
  std::shared_ptr<Sequence> seq;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    const auto it = impl_->sequences.find(id);
    if (it == impl_->sequences.end()) return absl::NotFoundError(absl::StrCat("no sequence ", id));
    seq = std::move(it->second);
    impl_->sequences.erase(it);
  }
  std::lock_guard<std::mutex> seq_lock(seq->mu);
  seq->freed = true;
  impl_->Release(seq->layers);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Cache::Length(SequenceId id, int layer) const {
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  return seq.layers()[static_cast<size_t>(layer)].length;
}

absl::StatusOr<int64_t> Cache::RollbackFloor(SequenceId id) const {
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  int64_t floor = 0;
  for (const LayerStreams& ls : seq.layers()) floor = std::max(floor, ls.floor);
  return floor;
}

absl::StatusOr<WindowRingView> Cache::Window(SequenceId id, int layer) const {
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  return impl_->RingView(seq.layers()[static_cast<size_t>(layer)]);
}

absl::Status Cache::ReadWindow(SequenceId id, int layer, absl::Span<Bf16> out) const {
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  if (out.size() != static_cast<size_t>(impl_->window()) * kHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("ReadWindow: out holds ", out.size(), " values, expected ",
                                                   impl_->window(), " x ", kHeadDim));
  }
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));  // held while reading: no Append interleaves
  const WindowRingView view = impl_->RingView(seq.layers()[static_cast<size_t>(layer)]);
  for (size_t p = 0; p < view.pages.size(); ++p) {
    const int64_t first = static_cast<int64_t>(p) * view.rows_per_page;
    const int64_t rows = std::min<int64_t>(view.rows_per_page, view.window - first);
    KVC_RETURN_IF_ERROR(DequantizeKvRows(view.pages[p].Slice(0, rows),
                                         out.subspan(static_cast<size_t>(first * kHeadDim),
                                                     static_cast<size_t>(rows * kHeadDim))));
  }
  return absl::OkStatus();
}

CacheUsage Cache::Usage() const {
  CacheUsage usage;
  const struct {
    Component component;
    const PagePool* pool;
  } pools[] = {{Component::kWindowRing, impl_->ring_pool.get()},
               {Component::kWindowRing, impl_->rollback_pool.get()},
               {Component::kCompressorState, impl_->csa_state_pool.get()},
               {Component::kCompressorState, impl_->csa_indexer_state_pool.get()},
               {Component::kCompressorState, impl_->hca_state_pool.get()},
               {Component::kCompressedRows, impl_->compressed_pool.get()},
               {Component::kIndexKeys, impl_->keys_pool.get()}};
  for (const auto& p : pools) {
    const PoolStats stats = p.pool->Stats();
    ComponentUsage& c = usage.components[static_cast<int>(p.component)];
    c.used_bytes += stats.used_bytes();
    c.reserved_bytes += stats.reserved_bytes();
    c.pages += stats.used_pages;
  }
  usage.history_limit_bytes = impl_->history_arena->limit_bytes();
  usage.state_limit_bytes = impl_->state_arena->limit_bytes();
  std::lock_guard<std::mutex> lock(impl_->mu);
  usage.sequences = static_cast<int64_t>(impl_->sequences.size());
  return usage;
}

absl::StatusOr<SequenceUsage> Cache::Usage(SequenceId id) const {
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  SequenceUsage usage;
  auto add = [&](Component c, const PagePool* pool, PageId page) {
    usage.bytes[static_cast<int>(c)] += pool->page_bytes();
    if (pool->RefCount(page) > 1) usage.shared_bytes += pool->page_bytes();
  };
  for (size_t i = 0; i < seq.layers().size(); ++i) {
    const LayerStreams& ls = seq.layers()[i];
    for (const PageId p : ls.ring) add(Component::kWindowRing, impl_->ring_pool.get(), p);
    if (ls.rollback != kNoPage) add(Component::kWindowRing, impl_->rollback_pool.get(), ls.rollback);
    for (const PageId p : ls.compressed) add(Component::kCompressedRows, impl_->compressed_pool.get(), p);
    for (const PageId p : ls.keys) add(Component::kIndexKeys, impl_->keys_pool.get(), p);
    if (ls.state != kNoPage) add(Component::kCompressorState, impl_->StatePool(impl_->spec.layers[i].kind), ls.state);
    if (ls.indexer_state != kNoPage) {
      add(Component::kCompressorState, impl_->csa_indexer_state_pool.get(), ls.indexer_state);
    }
  }
  return usage;
}

absl::StatusOr<IndexQuery> Cache::PrepareIndexQuery(int64_t position, absl::Span<const Bf16> q_raw,
                                                    absl::Span<const float> weights) const {
  if (position < 0 || position >= impl_->spec.max_context) {
    return absl::OutOfRangeError(absl::StrCat("PrepareIndexQuery: position ", position, " is outside [0, ",
                                              impl_->spec.max_context, ")"));
  }
  float cos_sin[64];
  impl_->compressed_rope->At(position, cos_sin);
  return IndexQuery::Prepare(q_raw, weights, cos_sin);
}

absl::StatusOr<AttentionSet> Cache::SelectAttentionSet(SequenceId id, int layer, const IndexQuery* query,
                                                       std::vector<float>* index_scores) const {
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  const LayerKind kind = impl_->spec.layers[static_cast<size_t>(layer)].kind;
  if (kind == LayerKind::kCsa && query == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("SelectAttentionSet: layer ", layer, " is a CSA layer; it needs an index query"));
  }
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  LayerStreams& ls = seq.layers()[static_cast<size_t>(layer)];
  if (ls.length == 0) return absl::FailedPreconditionError("SelectAttentionSet: the layer holds no tokens");
  AttentionSet set;
  set.position = ls.length - 1;
  const int64_t W = impl_->window();
  for (int64_t p = std::max<int64_t>(0, ls.length - W); p < ls.length; ++p) {
    const PackedRows row = impl_->RingSlot(ls, p % W);
    set.indices.push_back(static_cast<int32_t>(p % W));
    set.rows.push_back({row.data, row.scales});
  }
  if (kind == LayerKind::kWindow) return set;
  const int64_t visible = std::min(EntriesAt(kind, ls.length), ls.compressed_rows);
  std::vector<int64_t> entries;
  if (kind == LayerKind::kHca) {
    for (int64_t j = 0; j < visible; ++j) entries.push_back(j);
  } else {
    const int64_t keyed = std::min(visible, ls.key_rows);
    std::vector<float> scores(static_cast<size_t>(keyed));
    const Impl::History keys = impl_->KeysOf(ls);
    for (int64_t first = 0; first < keyed; first += keys.per_page) {
      const int64_t n = std::min(keys.per_page, keyed - first);
      KVC_RETURN_IF_ERROR(ScoreIndexKeys(*query, impl_->HistoryPage(keys, static_cast<size_t>(first / keys.per_page)).Slice(0, n),
                                         absl::MakeSpan(scores).subspan(static_cast<size_t>(first))));
    }
    entries = TopK(scores, impl_->spec.index_topk);
    if (index_scores != nullptr) *index_scores = std::move(scores);
  }
  const Impl::History rows = impl_->CompressedOf(ls);
  for (const int64_t j : entries) {
    const PackedRows row = impl_->HistoryPage(rows, static_cast<size_t>(j / rows.per_page)).Slice(j % rows.per_page, 1);
    set.indices.push_back(static_cast<int32_t>(W + j));
    set.rows.push_back({row.data, row.scales});
  }
  return set;
}

namespace {

template <typename Out>
absl::Status GatherRows(const AttentionSet& set, absl::Span<Out> out) {
  if (out.size() != set.rows.size() * kHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("GatherAttentionRows: out holds ", out.size(), " values, expected ",
                                                   set.rows.size(), " x 512"));
  }
  for (size_t i = 0; i < set.rows.size(); ++i) {
    const ConstPackedRows row{set.rows[i].data, set.rows[i].scales, 576, 8, 1};
    KVC_RETURN_IF_ERROR(DequantizeKvRows(row, out.subspan(i * kHeadDim, kHeadDim)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status GatherAttentionRows(const AttentionSet& set, absl::Span<float> out) { return GatherRows(set, out); }
absl::Status GatherAttentionRows(const AttentionSet& set, absl::Span<Bf16> out) { return GatherRows(set, out); }

const ModelSpec& Cache::spec() const { return impl_->spec; }
const CacheOptions& Cache::options() const { return impl_->options; }

}  // namespace kvc
