#include "kvc/cache.h"

#include <algorithm>
#include <array>
#include <atomic>
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
#include "kvc/row_kernels.h"
#include "src/indexer_internal.h"
#include "src/status.h"
#include "src/cache_internal.h"
#include "src/snapshot_format.h"

namespace kvc {

const char* ComponentName(Component component) {
  switch (component) {
    case Component::kWindowRing: return "window ring";
    case Component::kCompressedRows: return "compressed rows";
    case Component::kIndexKeys: return "index keys";
    case Component::kCompressorState: return "compressor state";
  }
  return "?";
}

const char* StreamName(Stream stream) {
  switch (stream) {
    case Stream::kWindow: return "window";
    case Stream::kCsaRows: return "CSA rows";
    case Stream::kCsaKeys: return "CSA keys";
    case Stream::kHcaRows: return "HCA rows";
    case Stream::kCsaState: return "CSA state";
    case Stream::kCsaIndexerState: return "CSA indexer state";
    case Stream::kHcaState: return "HCA state";
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


Cache::Cache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Cache::~Cache() {
  // The sequences are taken out under the cache's lock and released under
  // their own after it: every call takes a sequence's lock before the
  // cache's, and so does this (no call may run during destruction; this
  // keeps ThreadSanitizer's lock-order graph acyclic).
  std::unordered_map<SequenceId, std::shared_ptr<Sequence>> sequences;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    sequences.swap(impl_->sequences);
  }
  for (auto& [id, seq] : sequences) {
    std::lock_guard<std::mutex> seq_lock(seq->mu);
    impl_->Release(*seq);
  }
}

namespace {

absl::Status CheckOptions(const ModelSpec& spec, const CacheOptions& options) {
  KVC_RETURN_IF_ERROR(spec.Validate());
  if (options.rollback_depth < 0 || options.rollback_depth > spec.window) {
    return absl::InvalidArgumentError(absl::StrCat("rollback_depth ", options.rollback_depth,
                                                   " must be in [0, window = ", spec.window, "]"));
  }
  if (options.draft_slots < 0 || options.draft_slots > kMaxDraftSlots) {
    return absl::InvalidArgumentError(absl::StrCat("draft_slots ", options.draft_slots, " must be in [0, ",
                                                   kMaxDraftSlots, "]"));
  }
  if (options.page_manager && options.draft_slots < options.rollback_depth) {
    return absl::InvalidArgumentError(absl::StrCat(
        "page_manager needs draft_slots >= rollback_depth (", options.draft_slots, " < ", options.rollback_depth,
        "): without rollback records, the ring itself must still hold the rows a truncation brings back"));
  }
  if (options.rows_per_page < 1 || options.rows_per_page > 4096 || options.keys_per_page < 1 ||
      options.keys_per_page > 65536) {
    return absl::InvalidArgumentError("rows_per_page must be in [1, 4096] and keys_per_page in [1, 65536]");
  }
  if (options.history_bytes < 0) return absl::InvalidArgumentError("history_bytes must be >= 0");
  if (options.state_bytes < 0) return absl::InvalidArgumentError("state_bytes must be >= 0");
  if (options.prefix_bytes < 0) return absl::InvalidArgumentError("prefix_bytes must be >= 0");
  if (options.prefix_block_tokens < 128 || options.prefix_block_tokens % 128 != 0 ||
      options.prefix_block_tokens > (1 << 20)) {
    return absl::InvalidArgumentError(absl::StrCat("prefix_block_tokens ", options.prefix_block_tokens,
                                                   " must be a multiple of 128 in [128, 2^20]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<StreamGeometry>> Cache::PageGeometry(const ModelSpec& spec, const CacheOptions& options) {
  KVC_RETURN_IF_ERROR(CheckOptions(spec, options));
  const auto specs = cache_internal::StreamSpecs(spec, options);
  std::vector<StreamGeometry> out;
  for (int s = 0; s < kNumStreams; ++s) {
    const cache_internal::StreamSpec& st = specs[static_cast<size_t>(s)];
    out.push_back({static_cast<Stream>(s), st.page_bytes, st.rows_per_page, st.row_data_bytes, st.row_scale_bytes,
                   st.layers});
  }
  out[static_cast<size_t>(Stream::kWindow)].ring_slots = int64_t{spec.window} + options.draft_slots;
  return out;
}

absl::StatusOr<std::unique_ptr<Cache>> Cache::Create(ModelSpec spec, CacheOptions options) {
  KVC_RETURN_IF_ERROR(CheckOptions(spec, options));
  auto impl = std::make_unique<Impl>();
  impl->spec = std::move(spec);
  impl->options = std::move(options);
  KVC_ASSIGN_OR_RETURN(impl->store, PageStore::Create(impl->spec, impl->options));
  impl->compressed_rope = std::make_unique<RopeTable>(impl->spec.compressed_rope);
  impl->rope_memo = std::make_unique<RopeMemo>(*impl->compressed_rope);
  for (const LayerSpec& l : impl->spec.layers) {
    auto has_tiny = [](absl::Span<const float> ape) {
      return std::any_of(ape.begin(), ape.end(), [](float x) { return x != 0.0f && std::fabs(x) < 0x1p-90f; });
    };
    impl->ape_has_tiny.push_back({has_tiny(l.compressor.ape), has_tiny(l.indexer.ape)});
  }
  impl->Compose();
  return std::unique_ptr<Cache>(new Cache(std::move(impl)));
}

absl::StatusOr<SequenceId> Cache::CreateSequence() {
  auto seq = std::make_shared<Sequence>();
  {
    std::lock_guard<std::mutex> seq_lock(seq->mu);
    KVC_RETURN_IF_ERROR(impl_->AllocateState(*seq));
  }
  return impl_->Register(std::move(seq));
}

namespace {

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

// Writes bf16 values quantized by `quantize` (dims values per row), as a
// HistoryStream::Commit writer.
auto Quantizer(absl::Span<const Bf16> values, int dims, absl::Status (*quantize)(absl::Span<const Bf16>, PackedRows)) {
  return [values, dims, quantize](int64_t i, int64_t run, PackedRows to) {
    return quantize(values.subspan(static_cast<size_t>(i * dims), static_cast<size_t>(run * dims)), to);
  };
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
  if (!CheckKvRows(rows(t.window_rows, kHeadDim), "Append: window_rows").ok()) {
    return CheckKvRows(t.window_rows, "Append: window_rows");
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

// Whether the chunk rows pooling did not read (UnpooledTokens) hold finite
// kv and score and a finite score + ape: what the exact path's checks ask.
bool UnpooledRowsValid(const CompressorRun& main, const CompressorRun* indexer, int64_t n) {
  for (const CompressorRun* run : {&main, indexer}) {
    if (run == nullptr) continue;
    const int64_t from = UnpooledTokens(*run, n), width = run->g.width();
    const size_t values = static_cast<size_t>((n - from) * width);
    if (!CheckFiniteF32(absl::MakeConstSpan(run->kv + from * width, values), width, "").ok() ||
        !CheckFiniteF32(absl::MakeConstSpan(run->score + from * width, values), width, "").ok() ||
        !CheckScorePlusApe(*run, from, n).ok()) {
      return false;
    }
  }
  return true;
}

}  // namespace

absl::Status Cache::Append(SequenceId id, int layer, int64_t position, const LayerTokens& tokens) {
  KVC_RETURN_IF_ERROR(impl_->RefuseInPageManagerMode("Append"));
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  Sequence& sq = *seq.seq;
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
  if (sq.step != nullptr && position + n > sq.step->start + sq.step->new_tokens) {  // the step reserved no more
    return absl::FailedPreconditionError(absl::StrCat("Append: sequence ", id, " is in step ", sq.step->epoch,
                                                      ", which plans tokens up to ", sq.step->start + sq.step->new_tokens,
                                                      "; ", position, " + ", n, " go beyond"));
  }
  KVC_RETURN_IF_ERROR(CheckProjectionShapes(impl_->spec, layer, tokens, n));
  const bool compresses = KvcCompresses(layer_spec);
  const bool indexes = compresses && layer_spec.kind == LayerKind::kCsa;
  CompressorRun main_run, indexer_run;
  std::unique_ptr<Bf16[]> computed;  // the entries, then the keys (every value written before it is read)
  absl::Span<Bf16> entries, keys;
  if (compresses) {
    main_run = impl_->RunFor(sq, false, layer, tokens);
    const size_t closed = static_cast<size_t>((position + n) / main_run.g.ratio - position / main_run.g.ratio);
    const size_t key_values = indexes ? closed * kIndexDim : 0;
    computed.reset(new Bf16[closed * kHeadDim + key_values]);
    entries = absl::MakeSpan(computed.get(), closed * kHeadDim);
    keys = absl::MakeSpan(computed.get() + closed * kHeadDim, key_values);
    if (indexes) indexer_run = impl_->RunFor(sq, true, layer, tokens);
  }
  // Validate and compute slice by slice (independent: each writes its own
  // entries), through the executor. Nothing in the cache changes here.
  // Fast path: pooling checks the projections it reads as it reads them
  // (one pass over them, not two), and the rows it does not read (the open
  // windows') are checked after. Whenever it is not sure (any refusal, or a
  // pooled sum it cannot vouch for), the exact path runs instead: every
  // check of a slice, in order, then its entries, slice by slice, so the
  // refusal returned is always the first in that order.
  constexpr int64_t kSlice = 512;
  const int64_t slices = (n + kSlice - 1) / kSlice;
  // RoPE rows of the windows that close: a chunk's through the memo (a CSA
  // layer's rows serve every layer appending the same chunk); a few tokens'
  // computed here (at most a window or two).
  std::shared_ptr<const RopeRows> rope_rows;
  if (compresses) {
    const int64_t m = main_run.g.ratio;
    rope_rows = n >= 128 ? impl_->rope_memo->Rows(position / 128 * 128, position + n, m)
                         : std::make_shared<const RopeRows>(*impl_->compressed_rope, position / m * m, position + n, m);
  }
  auto valid_slice = [&](int64_t s) {
    const int64_t from = s * kSlice, to = std::min(n, from + kSlice);
    if (!CheckKvRows(tokens.window_rows.subspan(static_cast<size_t>(from * kHeadDim), static_cast<size_t>((to - from) * kHeadDim)),
                     "").ok()) {
      return false;
    }
    return !compresses || ComputeEntriesIfValid(main_run, indexes ? &indexer_run : nullptr, *rope_rows, position + from,
                                                position + to, entries, keys);
  };
  auto exact_slice = [&](int64_t s) -> absl::Status {
    const int64_t from = s * kSlice, to = std::min(n, from + kSlice);
    KVC_RETURN_IF_ERROR(CheckFiniteSlice(tokens, from, to, layer_spec, impl_->spec));
    if (compresses) {
      KVC_RETURN_IF_ERROR(CheckScorePlusApe(main_run, from, to));
      if (indexes) KVC_RETURN_IF_ERROR(CheckScorePlusApe(indexer_run, from, to));
      KVC_RETURN_IF_ERROR(ComputeEntries(main_run, indexes ? &indexer_run : nullptr, *rope_rows, position + from,
                                         position + to, entries, keys));
    }
    return absl::OkStatus();
  };
  bool valid = true;
  Executor& executor = ExecutorOrInline(impl_->options.executor);
  if (slices <= 1 || executor.concurrency() == 1) {
    for (int64_t s = 0; s < slices && valid; ++s) valid = valid_slice(s);
  } else {
    std::vector<char> slice_valid(static_cast<size_t>(slices));
    executor.ParallelFor(slices, [&](int64_t s) { slice_valid[static_cast<size_t>(s)] = valid_slice(s); });
    valid = std::all_of(slice_valid.begin(), slice_valid.end(), [](char v) { return v != 0; });
  }
  if (valid && compresses) valid = UnpooledRowsValid(main_run, indexes ? &indexer_run : nullptr, n);
  if (!valid) {
    for (int64_t s = 0; s < slices; ++s) KVC_RETURN_IF_ERROR(exact_slice(s));
  }
  if (n == 0) return absl::OkStatus();

  // Plan the entries' pages: a refusal still leaves the cache as it was.
  const HistoryStream* entry_part = impl_->RowsOf(layer);
  const HistoryStream* key_part = impl_->KeysOf(layer);
  HistoryStream::Plan entry_plan, key_plan;
  if (compresses) {
    KVC_ASSIGN_OR_RETURN(entry_plan,
                         entry_part->PlanAppend(sq, layer, static_cast<int64_t>(entries.size()) / kHeadDim, &executor));
  }
  if (indexes) {
    absl::StatusOr<HistoryStream::Plan> plan;
    try {  // the entries' pages are granted: a std::bad_alloc must give them back
      plan = key_part->PlanAppend(sq, layer, static_cast<int64_t>(keys.size()) / kIndexDim, &executor);
    } catch (...) {
      entry_part->Abandon(entry_plan);
      throw;
    }
    if (!plan.ok()) {
      entry_part->Abandon(entry_plan);
      return plan.status();
    }
    key_plan = *std::move(plan);
  }

  // Apply. Every row was checked above against what the row kernels accept
  // (window rows finite; entries and keys by CheckEntry), so nothing here
  // fails; a refusal would be a broken invariant, reported as kInternal.
  absl::Status applied = impl_->window_part->Write(sq, layer, tokens.window_rows);
  if (compresses) {
    WriteState(main_run, n);
    applied.Update(entry_part->Commit(sq, layer, entry_plan, static_cast<int64_t>(entries.size()) / kHeadDim,
                                      Quantizer(entries, kHeadDim, QuantizeKvRows), &executor));
  }
  if (indexes) {
    WriteState(indexer_run, n);
    applied.Update(key_part->Commit(sq, layer, key_plan, static_cast<int64_t>(keys.size()) / kIndexDim,
                                    Quantizer(keys, kIndexDim, QuantizeIndexKeys), &executor));
  }
  ls.length += n;
  ls.ring_end = ls.length;
  ls.state_end = std::max(ls.state_end, ls.length);
  ls.floor = std::max(ls.floor, ls.length - impl_->depth());
  if (!applied.ok()) return absl::InternalError(absl::StrCat("Append: ", applied.message()));
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
  KVC_RETURN_IF_ERROR(impl_->RefuseInPageManagerMode(kWhat));
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  LayerStreams& ls = seq.layers()[static_cast<size_t>(layer)];
  KVC_ASSIGN_OR_RETURN(const int64_t n, CheckHistoryAppend(impl_->spec, layer, ls, ls.compressed_rows, first,
                                                           rows.size(), kHeadDim, false, kWhat));
  KVC_RETURN_IF_ERROR(CheckKvRows(rows, kWhat));
  if (n == 0) return absl::OkStatus();
  return impl_->RowsOf(layer)->Append(*seq.seq, layer, rows, kHeadDim, QuantizeKvRows);
}

absl::Status Cache::AppendIndexKeys(SequenceId id, int layer, int64_t first, absl::Span<const Bf16> keys) {
  constexpr const char* kWhat = "AppendIndexKeys";
  KVC_RETURN_IF_ERROR(impl_->RefuseInPageManagerMode(kWhat));
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
  return impl_->KeysOf(layer)->Append(*seq.seq, layer, keys, kIndexDim, QuantizeIndexKeys);
}

absl::StatusOr<HistoryView> Cache::CompressedRows(SequenceId id, int layer) const {
  KVC_RETURN_IF_ERROR(impl_->RefuseInPageManagerMode("CompressedRows"));
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  if (const HistoryStream* part = impl_->RowsOf(layer)) return part->View(*seq.seq, layer);
  HistoryView none;  // a window layer: no rows
  none.rows_per_page = impl_->options.rows_per_page;
  return none;
}

absl::StatusOr<HistoryView> Cache::IndexKeys(SequenceId id, int layer) const {
  KVC_RETURN_IF_ERROR(impl_->RefuseInPageManagerMode("IndexKeys"));
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  if (const HistoryStream* part = impl_->KeysOf(layer)) return part->View(*seq.seq, layer);
  HistoryView none;  // not a CSA layer: no keys
  none.rows_per_page = impl_->options.keys_per_page;
  return none;
}

absl::StatusOr<SequenceId> Cache::Fork(SequenceId id) {
  if (impl_->page_manager()) {
    return absl::FailedPreconditionError(
        "Fork: in page-manager mode the engine copies the child's pages; call Fork(seq, &engine_copies)");
  }
  return Fork(id, nullptr);
}

absl::StatusOr<SequenceId> Cache::Fork(SequenceId id, std::vector<PageCopy>* engine_copies) {
  if (impl_->page_manager() && engine_copies == nullptr) {
    return absl::InvalidArgumentError("Fork: page-manager mode needs engine_copies for the copies the engine makes");
  }
  KVC_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> parent, impl_->Find(id));
  auto child = std::make_shared<Sequence>();
  std::vector<PageCopy> copies;
  {
    std::lock_guard<std::mutex> parent_lock(parent->mu);
    if (parent->freed) return absl::NotFoundError(absl::StrCat("sequence ", id, " was freed"));
    KVC_RETURN_IF_ERROR(Impl::RefuseInStep(*parent, id, "Fork"));
    KVC_RETURN_IF_ERROR(impl_->SameLengthEverywhere(parent->layers, id, "Fork:"));
    std::lock_guard<std::mutex> child_lock(child->mu);
    // Room first for the shared history tables and the copies the parts
    // list: once the child's pages are granted nothing may allocate (a
    // std::bad_alloc would drop the unregistered child with its pages).
    size_t private_pages = 0;
    for (int s = 0; s < cache_internal::kStreamCount; ++s) {
      const std::vector<PageId>& table = parent->tables[static_cast<size_t>(s)];
      if (impl_->History(s) != nullptr) {
        child->tables[static_cast<size_t>(s)].reserve(table.size());
      } else {
        private_pages += table.size();
      }
    }
    if (impl_->page_manager()) copies.reserve(private_pages);
    KVC_RETURN_IF_ERROR(impl_->AllocateState(*child));
    // Apply (cannot fail): every part copies its private pages in every
    // layer (lists them, in page-manager mode) and shares the history.
    for (const StreamPart* part : impl_->all_parts) part->Fork(*parent, *child, &copies);
    child->layers = parent->layers;
    // Same history as the parent: the parent's snapshot entry serves it too.
    child->snapshot_tag = parent->snapshot_tag;
    child->snapshot_low_water = parent->snapshot_low_water;
  }
  if (engine_copies != nullptr) *engine_copies = std::move(copies);
  return impl_->Register(std::move(child));
}

absl::Status Cache::Truncate(SequenceId id, int64_t length) {
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  KVC_RETURN_IF_ERROR(Impl::RefuseInStep(*seq.seq, id, "Truncate"));
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
  KVC_RETURN_IF_ERROR(impl_->window_part->CheckTruncate(*seq.seq, current, length));
  // Apply (cannot fail).
  for (const StreamPart* part : impl_->all_parts) part->Truncate(*seq.seq, current, length);
  for (LayerStreams& ls : seq.layers()) {
    ls.length = length;
    if (!impl_->page_manager()) ls.ring_end = length;  // the rollback records put the evicted rows back
  }
  seq.seq->snapshot_low_water = std::min(seq.seq->snapshot_low_water, length);
  return absl::OkStatus();
}

absl::Status Cache::Free(SequenceId id) {
  // Lock the sequence before unregistering it, so that a refusal leaves it
  // registered (the lock order is the sequence's, then the cache's).
  KVC_ASSIGN_OR_RETURN(Impl::Locked locked, impl_->Lock(id));
  KVC_RETURN_IF_ERROR(Impl::RefuseInStep(*locked.seq, id, "Free"));
  std::shared_ptr<Sequence> seq = locked.seq;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->sequences.erase(id);
  }
  seq->freed = true;
  impl_->Release(*seq);
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
  KVC_RETURN_IF_ERROR(impl_->RefuseInPageManagerMode("Window"));
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  return impl_->window_part->View(*seq.seq, layer);
}

absl::Status Cache::ReadWindow(SequenceId id, int layer, absl::Span<Bf16> out) const {
  KVC_RETURN_IF_ERROR(impl_->RefuseInPageManagerMode("ReadWindow"));
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  if (out.size() != static_cast<size_t>(impl_->window()) * kHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("ReadWindow: out holds ", out.size(), " values, expected ",
                                                   impl_->window(), " x ", kHeadDim));
  }
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));  // held while reading: no Append interleaves
  // Official slot s holds the position p in [length - W, length) with
  // p mod W == s (none below 0: zero), read from its ring slot p mod R.
  const int64_t W = impl_->window(), length = seq.layers()[static_cast<size_t>(layer)].length;
  const WindowStream& window = *impl_->window_part;
  for (int64_t p = length - W; p < length; ++p) {
    const absl::Span<Bf16> to = out.subspan(static_cast<size_t>(((p % W + W) % W) * kHeadDim), kHeadDim);
    if (p < 0) {
      std::fill(to.begin(), to.end(), Bf16{});
    } else {
      KVC_RETURN_IF_ERROR(DequantizeKvRows(window.RingSlot(*seq.seq, layer, window.SlotOf(p)), to));
    }
  }
  return absl::OkStatus();
}

CacheUsage Cache::Usage() const {
  CacheUsage usage;
  const PageStore& store = *impl_->store;
  for (int s = 0; s < cache_internal::kStreamCount; ++s) {
    if (!store.present(s)) continue;
    const PageStore::Stats stats = store.StreamStats(s);
    ComponentUsage& c = usage.components[static_cast<int>(store.spec(s).component)];
    c.used_bytes += stats.used_ids * store.id_bytes(s);
    c.reserved_bytes += stats.created_ids * store.id_bytes(s);
    c.pages += stats.used_ids * store.layers(s);
  }
  usage.history_limit_bytes = store.limit(cache_internal::StreamClass::kHistory);
  usage.state_limit_bytes = store.limit(cache_internal::StreamClass::kState);
  for (int s = 0; s < cache_internal::kStreamCount; ++s) {
    if (store.present(s)) usage.deferred_pages += store.StreamStats(s).deferred_ids * store.layers(s);
  }
  usage.epoch = store.epoch();
  usage.completed_epoch = store.completed_epoch();
  {
    std::lock_guard<std::mutex> prefix_lock(impl_->prefix->mu());
    usage.prefix = impl_->prefix->Usage();
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  usage.sequences = static_cast<int64_t>(impl_->sequences.size());
  usage.open_steps = static_cast<int64_t>(impl_->open_steps.size());
  return usage;
}

absl::StatusOr<SequenceUsage> Cache::Usage(SequenceId id) const {
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  SequenceUsage usage;
  const PageStore& store = *impl_->store;
  for (int s = 0; s < cache_internal::kStreamCount; ++s) {
    for (const PageId page : seq.seq->tables[static_cast<size_t>(s)]) {
      usage.bytes[static_cast<int>(store.spec(s).component)] += store.id_bytes(s);
      if (store.RefCount(s, page) > 1) usage.shared_bytes += store.id_bytes(s);
    }
  }
  return usage;
}

absl::Status Cache::PrepareIndexQuery(int64_t position, absl::Span<const Bf16> q_raw, absl::Span<const float> weights,
                                      IndexQuery* out) const {
  if (position < 0 || position >= impl_->spec.max_context) {
    return absl::OutOfRangeError(absl::StrCat("PrepareIndexQuery: position ", position, " is outside [0, ",
                                              impl_->spec.max_context, ")"));
  }
  float cos_sin[64];
  impl_->compressed_rope->At(position, cos_sin);
  return IndexQuery::Prepare(q_raw, weights, cos_sin, out);
}

absl::StatusOr<IndexQuery> Cache::PrepareIndexQuery(int64_t position, absl::Span<const Bf16> q_raw,
                                                    absl::Span<const float> weights) const {
  IndexQuery query;
  KVC_RETURN_IF_ERROR(PrepareIndexQuery(position, q_raw, weights, &query));
  return query;
}

namespace {

// The index scores of `query` against index keys [0, n) of `layer` into
// *scores (resized to n), page by page, the pages split across `executor`'s
// tasks (src/indexer_internal.h; nullptr: this thread). A refusal names the
// first refusing page's first entry (the kernel counts keys from the page
// start).
absl::Status ScoreKeys(const HistoryStream& keys, const Sequence& sq, int layer, const IndexQuery& query, int64_t n,
                       std::vector<float>* scores, Executor* executor) {
  scores->resize(static_cast<size_t>(n));
  const int64_t per_page = keys.per_page();
  int64_t failed_page = 0;
  const absl::Status scored = ScoreIndexKeyPages(
      query, (n + per_page - 1) / per_page, per_page,
      [&](int64_t p) { return ConstPackedRows(keys.RowsAt(sq, layer, p * per_page, std::min(per_page, n - p * per_page))); },
      absl::MakeSpan(*scores), executor, &failed_page);
  if (!scored.ok()) {
    return absl::Status(scored.code(), absl::StrCat("index keys from entry ", failed_page * per_page, ": ", scored.message()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<AttentionSet> Cache::SelectAttentionSet(SequenceId id, int layer, const IndexQuery* query,
                                                       std::vector<float>* index_scores) const {
  SelectionScratch scratch;
  AttentionSet set;
  KVC_RETURN_IF_ERROR(SelectAttentionSet(id, layer, query, &scratch, &set));
  if (index_scores != nullptr && impl_->KindOf(layer) == LayerKind::kCsa) *index_scores = std::move(scratch.scores);
  return set;
}

absl::Status Cache::SelectAttentionSet(SequenceId id, int layer, const IndexQuery* query, SelectionScratch* scratch,
                                       AttentionSet* out) const {
  KVC_RETURN_IF_ERROR(impl_->RefuseInPageManagerMode("SelectAttentionSet"));
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  const LayerKind kind = impl_->spec.layers[static_cast<size_t>(layer)].kind;
  if (kind == LayerKind::kCsa && query == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("SelectAttentionSet: layer ", layer, " is a CSA layer; it needs an index query"));
  }
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  Sequence& sq = *seq.seq;
  LayerStreams& ls = seq.layers()[static_cast<size_t>(layer)];
  if (ls.length == 0) return absl::FailedPreconditionError("SelectAttentionSet: the layer holds no tokens");
  AttentionSet& set = *out;
  set.position = ls.length - 1;
  set.indices.clear();
  set.rows.clear();
  set.window_indices.clear();
  set.compressed_indices.clear();
  const int64_t W = impl_->window();
  const WindowStream& window = *impl_->window_part;
  for (int64_t p = std::max<int64_t>(0, ls.length - W); p < ls.length; ++p) {
    const int64_t slot = window.SlotOf(p);
    const PackedRows row = window.RingSlot(sq, layer, slot);
    set.indices.push_back(static_cast<int32_t>(p % W));  // official slot
    set.window_indices.push_back(window.SlotIndex(sq, slot));
    set.rows.push_back({row.data, row.scales});
  }
  if (kind == LayerKind::kWindow) return absl::OkStatus();
  const int64_t visible = std::min(EntriesAt(kind, ls.length), ls.compressed_rows);
  const HistoryStream& rows = *impl_->RowsOf(layer);
  auto add = [&](int64_t j) {
    const PackedRows row = rows.RowsAt(sq, layer, j, 1);
    set.indices.push_back(static_cast<int32_t>(W + j));
    set.compressed_indices.push_back(rows.RowIndex(sq, j));
    set.rows.push_back({row.data, row.scales});
  };
  if (kind == LayerKind::kHca) {
    for (int64_t j = 0; j < visible; ++j) add(j);
    return absl::OkStatus();
  }
  const int64_t keyed = std::min(visible, ls.key_rows);
  if (const absl::Status scored = ScoreKeys(*impl_->KeysOf(layer), sq, layer, *query, keyed, &scratch->scores,
                                                 impl_->options.executor);
      !scored.ok()) {
    return absl::Status(scored.code(), absl::StrCat("SelectAttentionSet: layer ", layer, ", ", scored.message()));
  }
  KVC_RETURN_IF_ERROR(TopK(scratch->scores, impl_->spec.index_topk, &scratch->entries, &scratch->topk));
  for (const int64_t j : scratch->entries) add(j);
  return absl::OkStatus();
}

// --- Selecting for several positions ---------------------------------------

absl::StatusOr<PositionSets> Cache::SelectAttentionSets(SequenceId id, int layer, int64_t first, int64_t count,
                                                        absl::Span<const IndexQuery* const> queries) const {
  SelectionScratch scratch;
  PositionSets sets;
  KVC_RETURN_IF_ERROR(SelectAttentionSets(id, layer, first, count, queries, &scratch, &sets));
  return sets;
}

absl::Status Cache::SelectAttentionSets(SequenceId id, int layer, int64_t first, int64_t count,
                                        absl::Span<const IndexQuery* const> queries, SelectionScratch* scratch,
                                        PositionSets* out) const {
  constexpr const char* kWhat = "SelectAttentionSets";
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  if (scratch == nullptr || out == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": scratch and out are required"));
  }
  if (first < 0 || count < 0) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": first ", first, " and count ", count, " must be >= 0"));
  }
  const LayerKind kind = impl_->KindOf(layer);
  if (impl_->page_manager() && kind == LayerKind::kCsa) {
    return absl::FailedPreconditionError(absl::StrCat(
        kWhat, ": layer ", layer, " is a CSA layer, whose selection reads its index keys; in page-manager mode kvc "
        "never reads page bytes (the engine scores the keys and picks the top-k)"));
  }
  // The positions first (a caller sizing its query array by them learns of
  // a position past the end, not of a query count).
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  const Sequence& sq = *seq.seq;
  const LayerStreams& ls = seq.layers()[static_cast<size_t>(layer)];
  // What the layer holds for selection. In page-manager mode an open step's
  // tokens count: the engine writes their rows through the plan's slots
  // (the block tables already cover them) before its attention kernel reads
  // them, and they join the length at CommitStep.
  int64_t length = ls.length, entries_held = ls.compressed_rows, ring_end = ls.ring_end;
  if (impl_->page_manager() && sq.step != nullptr) {
    length = sq.step->start + sq.step->new_tokens;
    entries_held = EntriesAt(kind, length);
    ring_end = std::max(ring_end, length);
  }
  if (first > length || count > length - first) {
    return absl::OutOfRangeError(absl::StrCat(kWhat, ": positions [", first, ", ", first, " + ", count, ") of layer ",
                                              layer, ", which holds ", length, " tokens: position ",
                                              std::max(first, length), " is not in it (append it first)"));
  }
  const int64_t given = static_cast<int64_t>(queries.size());
  if (kind == LayerKind::kCsa && given != count) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": layer ", layer, " is a CSA layer: it needs one index query "
                                                   "per position, ", count, ", not ", given));
  }
  if (kind != LayerKind::kCsa && given != 0 && given != count) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": ", given, " index queries for ", count, " positions (layer ",
                                                   layer, " uses none: pass none or one per position)"));
  }
  if (kind == LayerKind::kCsa) {
    for (int64_t i = 0; i < count; ++i) {
      if (queries[static_cast<size_t>(i)] == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(kWhat, ": query ", i, " (position ", first + i, ") is missing"));
      }
    }
  }
  PositionSets& sets = *out;
  sets.first = first;
  for (auto* v : {&sets.window_offsets, &sets.window_positions, &sets.compressed_offsets, &sets.entries}) v->clear();
  sets.window_indices.clear();
  sets.compressed_indices.clear();
  sets.window_offsets.push_back(0);
  sets.compressed_offsets.push_back(0);
  const int64_t W = impl_->window();
  const WindowStream& window = *impl_->window_part;
  // The ring holds positions [ring_end - ring_slots, length): older ones were
  // overwritten (ring_end: the furthest length written, = length but in
  // page-manager mode after a truncation or an abort).
  const int64_t oldest_in_ring = ring_end - window.ring_slots();
  const HistoryStream* rows = impl_->RowsOf(layer);
  for (int64_t t = first; t < first + count; ++t) {
    for (int64_t p = std::max<int64_t>(0, t - W + 1); p <= t; ++p) {
      sets.window_positions.push_back(p);
      sets.window_indices.push_back(p >= oldest_in_ring ? window.SlotIndex(sq, window.SlotOf(p)) : -1);
    }
    sets.window_offsets.push_back(static_cast<int64_t>(sets.window_positions.size()));
    if (rows != nullptr) {
      const int64_t visible = std::min(EntriesAt(kind, t + 1), entries_held);
      auto add = [&](int64_t j) {
        sets.entries.push_back(j);
        sets.compressed_indices.push_back(rows->RowIndex(sq, j));
      };
      if (kind == LayerKind::kHca) {
        for (int64_t j = 0; j < visible; ++j) add(j);
      } else {
        const int64_t keyed = std::min(visible, ls.key_rows);
        const IndexQuery& query = *queries[static_cast<size_t>(t - first)];
        if (const absl::Status scored = ScoreKeys(*impl_->KeysOf(layer), sq, layer, query, keyed, &scratch->scores,
                                                       impl_->options.executor);
            !scored.ok()) {
          return absl::Status(scored.code(), absl::StrCat(kWhat, ": layer ", layer, ", position ", t, ", ",
                                                          scored.message()));
        }
        KVC_RETURN_IF_ERROR(TopK(scratch->scores, impl_->spec.index_topk, &scratch->entries, &scratch->topk));
        for (const int64_t j : scratch->entries) add(j);
      }
    }
    sets.compressed_offsets.push_back(static_cast<int64_t>(sets.entries.size()));
  }
  return absl::OkStatus();
}

namespace {

// Dequantizes rows [begin, end) of the set. Rows that do not follow their
// predecessor in memory (a CSA layer's top-k: random rows of a pool of
// ~150 MB at 1M tokens) are all prefetched first, and runs of rows that do
// (an HCA layer's, page by page) go to the kernel in one call, left to the
// hardware prefetcher. Measured on a Zen 5 VM, 1,152 random rows: 160-170 ns
// per row against 450-500 without the prefetch pass; prefetching 8 or 64 rows
// ahead inside the loop did not help, nor did prefetching the runs.
template <typename Out>
absl::Status GatherBlock(const AttentionSet& set, int64_t begin, int64_t end, absl::Span<Out> out) {
  constexpr int64_t kKvDataBytes = FormatInfo(RowFormat::kKvFp8).data_bytes;    // 576
  constexpr int64_t kKvScaleBytes = FormatInfo(RowFormat::kKvFp8).scale_bytes;  // 8
  const auto follows = [&](int64_t k) {
    const RowRef& prev = set.rows[static_cast<size_t>(k - 1)];
    const RowRef& row = set.rows[static_cast<size_t>(k)];
    return row.data == prev.data + kKvDataBytes && row.scales == prev.scales + kKvScaleBytes;
  };
  for (int64_t k = begin; k < end; ++k) {
    if (k > begin && follows(k)) continue;
    const RowRef& row = set.rows[static_cast<size_t>(k)];
    for (int64_t line = 0; line < kKvDataBytes; line += 64) __builtin_prefetch(row.data + line);
    __builtin_prefetch(row.scales);
  }
  for (int64_t i = begin; i < end;) {
    int64_t n = 1;
    while (i + n < end && follows(i + n)) ++n;
    const RowRef& first = set.rows[static_cast<size_t>(i)];
    KVC_RETURN_IF_ERROR(DequantizeKvRows(ConstPackedRows{first.data, first.scales, kKvDataBytes, kKvScaleBytes, n},
                                         out.subspan(static_cast<size_t>(i) * kHeadDim, static_cast<size_t>(n) * kHeadDim)));
    i += n;
  }
  return absl::OkStatus();
}

template <typename Out>
absl::Status GatherRows(const AttentionSet& set, absl::Span<Out> out, Executor* executor) {
  if (out.size() != set.rows.size() * kHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("GatherAttentionRows: out holds ", out.size(), " values, expected ",
                                                   set.rows.size(), " x 512"));
  }
  for (size_t i = 0; i < set.rows.size(); ++i) {
    if (set.rows[i].data == nullptr || set.rows[i].scales == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("GatherAttentionRows: row ", i, " of ", set.rows.size(),
                                                     " has a null data or scale pointer"));
    }
  }
  constexpr int64_t kBlockRows = 512;
  const int64_t rows = static_cast<int64_t>(set.rows.size());
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  // Every row checked above: a kernel refusal would be a broken invariant.
  std::atomic<bool> failed{false};
  auto block = [&](int64_t b) {
    if (!GatherBlock(set, b * kBlockRows, std::min(rows, (b + 1) * kBlockRows), out).ok()) failed = true;
  };
  Executor& run = ExecutorOrInline(executor);
  if (blocks <= 1 || run.concurrency() == 1) {
    for (int64_t b = 0; b < blocks; ++b) block(b);
  } else {
    run.ParallelFor(blocks, block);
  }
  if (failed) return absl::InternalError("GatherAttentionRows: the row kernel refused a checked row");
  return absl::OkStatus();
}

}  // namespace

absl::Status GatherAttentionRows(const AttentionSet& set, absl::Span<float> out, Executor* executor) {
  return GatherRows(set, out, executor);
}
absl::Status GatherAttentionRows(const AttentionSet& set, absl::Span<Bf16> out, Executor* executor) {
  return GatherRows(set, out, executor);
}

// --- Pages as an engine kernel addresses them ------------------------------

namespace {

absl::Status CheckStream(Stream stream) {
  const int s = static_cast<int>(stream);
  if (s < 0 || s >= kNumStreams) {
    return absl::InvalidArgumentError(absl::StrCat("stream ", s, " is not a Stream (0..", kNumStreams - 1, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PageArray> Cache::LayerPages(int layer, Stream stream) const {
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_RETURN_IF_ERROR(CheckStream(stream));
  KVC_RETURN_IF_ERROR(impl_->CheckHasStream(layer, stream));
  const int s = static_cast<int>(stream);
  const PageStore& store = *impl_->store;
  const cache_internal::StreamSpec& st = store.spec(s);
  return PageArray{store.base(s, layer), st.page_bytes, store.num_pages(s), st.rows_per_page, st.row_data_bytes,
                   st.row_scale_bytes};
}

absl::StatusOr<std::vector<int32_t>> Cache::BlockTable(SequenceId id, Stream stream) const {
  KVC_RETURN_IF_ERROR(CheckStream(stream));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  KVC_ASSIGN_OR_RETURN(const Impl::TableRows t, impl_->TableOf(*seq.seq, stream));
  return *t.ids;
}

absl::StatusOr<DenseBlockTables> Cache::BatchBlockTables(absl::Span<const SequenceId> ids, Stream stream) const {
  KVC_RETURN_IF_ERROR(CheckStream(stream));
  std::vector<std::vector<int32_t>> tables;
  DenseBlockTables out;
  for (const SequenceId id : ids) {
    KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
    KVC_ASSIGN_OR_RETURN(const Impl::TableRows t, impl_->TableOf(*seq.seq, stream));
    tables.push_back(*t.ids);
    out.blocks.push_back(static_cast<int32_t>(t.ids->size()));
    out.rows.push_back(t.rows);
    out.max_blocks = std::max<int64_t>(out.max_blocks, static_cast<int64_t>(t.ids->size()));
  }
  out.ids.assign(tables.size() * static_cast<size_t>(out.max_blocks), -1);
  for (size_t b = 0; b < tables.size(); ++b) {
    std::copy(tables[b].begin(), tables[b].end(), out.ids.begin() + static_cast<std::ptrdiff_t>(b * static_cast<size_t>(out.max_blocks)));
  }
  return out;
}

absl::StatusOr<CsrBlockTables> Cache::BatchBlockTablesCsr(absl::Span<const SequenceId> ids, Stream stream) const {
  KVC_RETURN_IF_ERROR(CheckStream(stream));
  if (stream == Stream::kWindow || cache_internal::IsStateStream(static_cast<int>(stream))) {  // ring slots, not a prefix of the pages
    return absl::InvalidArgumentError(absl::StrCat(
        "BatchBlockTablesCsr: the ", StreamName(stream),
        " stream is a ring (slot = position mod its rows), not a paged sequence; address it with BlockTable, "
        "a StepPlan's slots or an AttentionSet's window_indices"));
  }
  CsrBlockTables out;
  out.indptr.push_back(0);
  for (const SequenceId id : ids) {
    KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
    KVC_ASSIGN_OR_RETURN(const Impl::TableRows t, impl_->TableOf(*seq.seq, stream));
    if (out.indices.size() + t.ids->size() > static_cast<size_t>(INT32_MAX)) {
      return absl::OutOfRangeError("BatchBlockTablesCsr: more than 2^31 - 1 pages");
    }
    out.indices.insert(out.indices.end(), t.ids->begin(), t.ids->end());
    out.indptr.push_back(static_cast<int32_t>(out.indices.size()));
    const int64_t pages = static_cast<int64_t>(t.ids->size());
    out.last_page_len.push_back(
        pages == 0 ? 0 : static_cast<int32_t>(std::clamp<int64_t>(t.rows - (pages - 1) * t.per_page, 0, t.per_page)));
  }
  return out;
}

absl::StatusOr<int64_t> Cache::StreamRows(SequenceId id, int layer, Stream stream) const {
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_RETURN_IF_ERROR(CheckStream(stream));
  KVC_RETURN_IF_ERROR(impl_->CheckHasStream(layer, stream));
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  return impl_->StreamRowsOf(*seq.seq, layer, static_cast<int>(stream));
}

absl::Status Cache::AppendRows(SequenceId id, int layer, Stream stream, int64_t first, absl::Span<const uint8_t> rows) {
  constexpr const char* kWhat = "AppendRows";
  KVC_RETURN_IF_ERROR(impl_->CheckLayer(layer));
  KVC_RETURN_IF_ERROR(CheckStream(stream));
  KVC_RETURN_IF_ERROR(impl_->RefuseInPageManagerMode(kWhat));
  if (stream == Stream::kWindow || cache_internal::IsStateStream(static_cast<int>(stream))) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": ", StreamName(stream), " rows are written by Append"));
  }
  if (const absl::Status has = impl_->CheckHasStream(layer, stream); !has.ok()) {
    return absl::Status(has.code(), absl::StrCat(kWhat, ": ", has.message()));
  }
  const bool keys = stream == Stream::kCsaKeys;
  const RowFormat format = keys ? RowFormat::kIndexFp4 : RowFormat::kKvFp8;
  const int64_t row_bytes = FormatInfo(format).row_bytes;
  KVC_ASSIGN_OR_RETURN(const Impl::Locked seq, impl_->Lock(id));
  LayerStreams& ls = seq.layers()[static_cast<size_t>(layer)];
  const std::string what = absl::StrCat(kWhat, " (", StreamName(stream), ")");
  if (static_cast<int64_t>(rows.size()) % row_bytes != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", rows.size(), " bytes are not whole ", row_bytes, "-byte rows"));
  }
  // Shapes and order as AppendCompressedRows / AppendIndexKeys check them
  // (counted in rows: one "value" per row here).
  KVC_ASSIGN_OR_RETURN(const int64_t n,
                       CheckHistoryAppend(impl_->spec, layer, ls, keys ? ls.key_rows : ls.compressed_rows, first,
                                          rows.size() / static_cast<size_t>(row_bytes), 1, keys, what.c_str()));
  const int64_t bad = keys ? snapshot_format::FirstInvalidKey(rows.data(), n)
                           : snapshot_format::FirstInvalidKvRow(rows.data(), n);
  if (bad >= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": row ", bad, " (entry ", first + bad, ") is not one kvc could have written (",
        keys ? "a NaN UE8M0 scale" : "a NaN E4M3 code or UE8M0 scale, a non-finite RoPE dim or nonzero padding", ")"));
  }
  if (n == 0) return absl::OkStatus();
  const HistoryStream& h = *impl_->History(static_cast<int>(stream));
  KVC_ASSIGN_OR_RETURN(const HistoryStream::Plan plan, h.PlanAppend(*seq.seq, layer, n));
  return h.Commit(*seq.seq, layer, plan, n, [&](int64_t i, int64_t run, PackedRows to) {
    CopyRows(format, ContiguousRows(format, rows.data() + i * row_bytes, run), to);
    return absl::OkStatus();
  });
}

const ModelSpec& Cache::spec() const { return impl_->spec; }
const CacheOptions& Cache::options() const { return impl_->options; }

}  // namespace kvc
