// Internal to kvc (not installed): the cache's private state, Cache::Impl:
// the sequences, their locks, and the parts the cache is composed of
// (src/stream_part.h: window, history, compressor state), which it
// orchestrates. Shared by the cache (cache.cc) and snapshots (snapshot.cc),
// which encode and restore through the parts.
#ifndef KVC_SRC_CACHE_INTERNAL_H_
#define KVC_SRC_CACHE_INTERNAL_H_

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "kvc/compressor.h"
#include "kvc/row_kernels.h"
#include "kvc/status.h"
#include "src/compressor_state.h"
#include "src/history_stream.h"
#include "src/page_store.h"
#include "src/stream_part.h"
#include "src/window_stream.h"

namespace kvc {
namespace cache_internal {

// fp32 values per token row of a compressor's state: kv and score (+ape), each
// width_factor * dim wide (spec §5).
inline int64_t StateRowFloats(int width_factor, int dim) { return 2 * int64_t{width_factor} * dim; }

}  // namespace cache_internal

using cache_internal::CompressorState;
using cache_internal::EntriesAt;
using cache_internal::HistoryStream;
using cache_internal::kKvDataBytes;
using cache_internal::kKvRowBytes;
using cache_internal::kKvScaleBytes;
using cache_internal::KvcCompresses;
using cache_internal::LayerParts;
using cache_internal::LayerStreams;
using cache_internal::PageId;
using cache_internal::PageStore;
using cache_internal::PartsOf;
using cache_internal::kNoPage;
using cache_internal::Sequence;
using cache_internal::StateRowFloats;
using cache_internal::StreamPart;
using cache_internal::WindowStream;

struct Cache::Impl {
  ModelSpec spec;
  CacheOptions options;
  std::unique_ptr<PageStore> store;  // every stream's arrays, ids and budgets
  std::unique_ptr<RopeTable> compressed_rope;  // CSA/HCA layers' RoPE

  // The parts, over `store`: the window (every layer), one history part per
  // history stream and one state part per compressor state stream the model
  // has (null where it has none). `all_parts` lists them all, for what every
  // part does (Reserve, Fork, Truncate, Release).
  std::unique_ptr<WindowStream> window_part;
  std::array<std::unique_ptr<HistoryStream>, cache_internal::kStreamCount> histories;
  std::array<std::unique_ptr<CompressorState>, cache_internal::kStreamCount> states;
  std::vector<const StreamPart*> all_parts;

  mutable std::mutex mu;  // guards the members below
  std::unordered_map<SequenceId, std::shared_ptr<Sequence>> sequences;
  SequenceId next_id = 1;

  // Builds the parts over `store` (set first).
  void Compose() {
    window_part = std::make_unique<WindowStream>(*store, spec.window, options.rollback_depth, options.rows_per_page);
    all_parts.push_back(window_part.get());
    for (const int s : {cache_internal::kCsaRowsStream, cache_internal::kCsaKeysStream, cache_internal::kHcaRowsStream}) {
      if (!store->present(s)) continue;
      histories[static_cast<size_t>(s)] = std::make_unique<HistoryStream>(*store, s);
      all_parts.push_back(histories[static_cast<size_t>(s)].get());
    }
    for (const int s : {cache_internal::kCsaStateStream, cache_internal::kCsaIndexerStateStream,
                        cache_internal::kHcaStateStream}) {
      if (!store->present(s)) continue;
      states[static_cast<size_t>(s)] = std::make_unique<CompressorState>(*store, s, spec, options.rollback_depth);
      all_parts.push_back(states[static_cast<size_t>(s)].get());
    }
  }

  int32_t window() const { return spec.window; }
  int32_t depth() const { return options.rollback_depth; }
  int32_t rows_per_page() const { return options.rows_per_page; }

  // Adds a fully built sequence and returns its new id.
  SequenceId Register(std::shared_ptr<Sequence> seq) {
    std::lock_guard<std::mutex> lock(mu);
    const SequenceId id = next_id++;
    sequences.emplace(id, std::move(seq));
    return id;
  }

  // The live sequences' ids, ascending.
  std::vector<SequenceId> Ids() const {
    std::lock_guard<std::mutex> lock(mu);
    std::vector<SequenceId> ids;
    for (const auto& entry : sequences) ids.push_back(entry.first);
    std::sort(ids.begin(), ids.end());
    return ids;
  }

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

  LayerKind KindOf(int layer) const { return spec.layers[static_cast<size_t>(layer)].kind; }
  LayerParts PartsOfLayer(int layer) const { return PartsOf(KindOf(layer)); }
  // The layer's history part of its compressed rows / index keys (null: none).
  const HistoryStream* RowsOf(int layer) const { return History(PartsOfLayer(layer).rows); }
  const HistoryStream* KeysOf(int layer) const { return History(PartsOfLayer(layer).keys); }
  const HistoryStream* History(int s) const { return s < 0 ? nullptr : histories[static_cast<size_t>(s)].get(); }
  const CompressorState* State(int s) const { return s < 0 ? nullptr : states[static_cast<size_t>(s)].get(); }
  // Whether `layer` has public stream s.
  bool HasStream(int layer, int s) const {
    const std::vector<int32_t>& l = store->spec(s).layers;
    return std::binary_search(l.begin(), l.end(), layer);
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
    int layer;           // for messages
    bool indexer;        // CSA's indexer (index keys) rather than the main compressor
  };

  CompressorRun RunFor(const Sequence& seq, bool indexer, int layer, const LayerTokens& t) const {
    const LayerSpec& spec_layer = spec.layers[static_cast<size_t>(layer)];
    const LayerStreams& ls = seq.layers[static_cast<size_t>(layer)];
    CompressorRun run;
    const LayerParts parts = PartsOf(spec_layer.kind);
    const CompressorState& state = *states[static_cast<size_t>(indexer ? parts.indexer_state : parts.main_state)];
    run.g = state.geometry();
    run.params = indexer ? &spec_layer.indexer : &spec_layer.compressor;
    run.state = state.Rows(seq, layer);
    run.capacity = state.capacity();
    run.kv = indexer ? t.indexer_kv.data() : t.compressor_kv.data();
    run.score = indexer ? t.indexer_score.data() : t.compressor_score.data();
    run.first = ls.length;
    run.layer = layer;
    run.indexer = indexer;
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

  // The pooling slots of entry i (at most 256), with each slot's token.
  static int EntrySlots(const CompressorRun& run, int64_t i, PoolSlot* slots, int64_t* tokens) {
    const CompressorGeometry& g = run.g;
    int count = 0;
    auto add = [&](int64_t t, int half) {
      tokens[count] = t;
      slots[count++] = Slot(run, t, half);
    };
    if (g.overlap && i > 0) {  // the previous window's first halves (none for entry 0)
      for (int j = 0; j < g.ratio; ++j) add((i - 1) * g.ratio + j, 0);
    }
    for (int j = 0; j < g.ratio; ++j) add(i * g.ratio + j, g.overlap ? 1 : 0);
    return count;
  }

  // Entry i of a compressor: pools its window's slots, then norm + RoPE with
  // the given (cos, sin) pairs into `out` (dim bf16 values).
  void ComputeEntry(const CompressorRun& run, int64_t i, const float* cos_sin, float* pooled, Bf16* out) const {
    PoolSlot slots[256];
    int64_t tokens[256];
    const int count = EntrySlots(run, i, slots, tokens);
    PoolChannels(slots, count, run.g.dim, pooled);
    NormRope(pooled, run.g.dim, run.params->norm_weight.data(), static_cast<float>(spec.norm_eps), cos_sin, out);
  }

  // The largest bf16 magnitudes (bits without the sign) the row kernels
  // store (row_kernels.cc): any finite value in a KV row; up to 2^120 in an
  // index key (its Hadamard must not overflow).
  static constexpr uint16_t kMaxKeyBits = 0x7B80;  // 2^120

  // OK if QuantizeKvRows (main) or QuantizeIndexKeys (indexer) accepts the
  // computed row `out` of entry i; else kInvalidArgument naming the layer,
  // the entry's tokens, the channel, the cause and the token that dominates it.
  absl::Status CheckEntry(const CompressorRun& run, int64_t i, const Bf16* out) const {
    // Entries: NoPE dims up to kMaxKvNopeBf16Bits, RoPE dims any finite value.
    const uint16_t max_bits = run.indexer ? kMaxKeyBits : kMaxKvNopeBf16Bits;
    const int limited_dims = run.indexer ? run.g.dim : kNopeDim;
    uint16_t largest = 0, largest_rest = 0;
    for (int c = 0; c < limited_dims; ++c) largest = std::max<uint16_t>(largest, out[c].bits & 0x7FFF);
    for (int c = limited_dims; c < run.g.dim; ++c) largest_rest = std::max<uint16_t>(largest_rest, out[c].bits & 0x7FFF);
    if (largest <= max_bits && largest_rest <= kMaxFiniteBf16Bits) return absl::OkStatus();
    return RefusedEntry(run, i, out, max_bits, std::max(largest, largest_rest) >= 0x7F80);
  }

  absl::Status RefusedEntry(const CompressorRun& run, int64_t i, const Bf16* out, uint16_t max_bits,
                            bool non_finite) const {
    const CompressorGeometry& g = run.g;
    PoolSlot slots[256];
    int64_t tokens[256];
    const int count = EntrySlots(run, i, slots, tokens);
    std::vector<float> pooled(static_cast<size_t>(g.dim));
    PoolChannels(slots, count, g.dim, pooled.data());
    const char* kv_name = run.indexer ? "indexer_kv" : "compressor_kv";
    // The cause: a pooled value bf16 cannot hold, else RMSNorm and RoPE.
    int channel = -1;
    std::string cause;
    for (int c = 0; c < g.dim && channel < 0; ++c) {
      const float x = pooled[static_cast<size_t>(c)];
      if (std::isfinite(RoundToBf16(x))) continue;
      channel = c;
      cause = absl::StrCat("the pooled ", kv_name, " there, ", x, std::isfinite(x) ? ", exceeds bf16's range" : ", overflows fp32");
    }
    for (int c = 0; c < g.dim && channel < 0; ++c) {
      if ((out[c].bits & 0x7FFF) <= (run.indexer || c < kNopeDim ? max_bits : kMaxFiniteBf16Bits)) continue;
      channel = c;
      cause = absl::StrCat("RMSNorm (norm_weight ", run.params->norm_weight[static_cast<size_t>(c)],
                           ") and RoPE make it ", ToF32(out[c]));
    }
    if (channel < 0) return absl::InternalError(absl::StrCat("Append: layer ", run.layer, ": entry ", i, " refused without cause"));
    // The token that dominates that channel: the largest softmax weight x |kv|.
    int top = 0;
    {
      float s[256], max = -INFINITY, best = -1.0f;
      for (int j = 0; j < count; ++j) {
        s[j] = slots[j].ape != nullptr ? slots[j].score[channel] + slots[j].ape[channel] : slots[j].score[channel];
        max = std::max(max, s[j]);
      }
      for (int j = 0; j < count; ++j) {
        const float weight = SoftmaxExp(s[j] - max) * std::fabs(slots[j].kv[channel]);
        if (weight > best) best = weight, top = j;
      }
    }
    const int64_t column = (g.overlap && tokens[top] >= i * g.ratio ? g.dim : 0) + channel;
    const int64_t first_token = g.overlap && i > 0 ? (i - 1) * g.ratio : i * g.ratio;
    return absl::InvalidArgumentError(absl::StrCat(
        "Append: layer ", run.layer, ": ", run.indexer ? "index key " : "compressed entry ", i, " (tokens [",
        first_token, ", ", (i + 1) * g.ratio, ")) would ",
        non_finite     ? "not be finite"
        : run.indexer  ? "exceed 2^120 (the index key limit)"
                       : "read back as infinity (|x| >= 248 x 2^120 rounds to the FP8 code of 2^128)",
        " at channel ", channel, ": ",
        cause, "; it comes mostly from position ", tokens[top], "'s ", kv_name, " column ", column, " (",
        slots[top].kv[channel], ")"));
  }

  // Refuses tokens [first + from, first + to) of the chunk if a score + ape
  // overflows fp32: that sum is what the state ring keeps for the token (and
  // what a snapshot stores), so it must be finite.
  static absl::Status CheckScorePlusApe(const CompressorRun& run, int64_t from, int64_t to) {
    const int64_t width = run.g.width();
    for (int64_t i = from; i < to; ++i) {
      const float* score = run.score + i * width;
      const float* ape = run.params->ape.data() + ((run.first + i) % run.g.ratio) * width;
      int overflow = 0;
      for (int64_t c = 0; c < width; ++c) {
        const float sum = score[c] + ape[c];
        overflow |= (sum - sum != 0.0f);  // inf - inf is NaN
      }
      if (overflow == 0) continue;
      for (int64_t c = 0; c < width; ++c) {
        if (std::isfinite(score[c] + ape[c])) continue;
        return absl::InvalidArgumentError(absl::StrCat(
            "Append: layer ", run.layer, " ", run.indexer ? "indexer_score" : "compressor_score", " at position ",
            run.first + i, " channel ", c, ": score ", score[c], " + ape ", ape[c],
            " overflows fp32 (the compressor state keeps that sum)"));
      }
    }
    return absl::OkStatus();
  }

  // The entries (and, with an indexer, keys) of the windows that close with
  // tokens [from, to) of the chunk, written at their index relative to the
  // chunk's first closed window; changes nothing in the cache. Refuses an
  // entry or key the row kernels would not store (CheckEntry).
  absl::Status ComputeEntries(const CompressorRun& main, const CompressorRun* indexer, int64_t from, int64_t to,
                      std::vector<Bf16>& entries, std::vector<Bf16>& keys) const {
    const int m = main.g.ratio;
    const int64_t first_entry = main.first / m;
    std::vector<float> pooled(static_cast<size_t>(main.g.dim));
    float cos_sin[64];
    for (int64_t i = from / m; i < to / m; ++i) {
      compressed_rope->At(i * m, cos_sin);       // shared by the entry and its index key
      const size_t at = static_cast<size_t>(i - first_entry);
      Bf16* entry = &entries[at * static_cast<size_t>(main.g.dim)];
      ComputeEntry(main, i, cos_sin, pooled.data(), entry);
      KVC_RETURN_IF_ERROR(CheckEntry(main, i, entry));
      if (indexer != nullptr) {
        Bf16* key = &keys[at * static_cast<size_t>(indexer->g.dim)];
        ComputeEntry(*indexer, i, cos_sin, pooled.data(), key);
        KVC_RETURN_IF_ERROR(CheckEntry(*indexer, i, key));
      }
    }
    return absl::OkStatus();
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

  // A sequence's table of a public stream and the rows it covers (the
  // longest layer's); kNotFound if no layer has the stream.
  struct TableRows {
    const std::vector<PageId>* ids;
    int64_t rows;
    int32_t per_page;
  };
  absl::StatusOr<TableRows> TableOf(const Sequence& seq, Stream stream) const {
    const int s = static_cast<int>(stream);
    if (!store->present(s)) {
      return absl::NotFoundError(absl::StrCat("the model has no layer with a ", StreamName(stream), " stream"));
    }
    int64_t rows = 0;
    for (const int32_t l : store->spec(s).layers) {
      rows = std::max(rows, s == cache_internal::kWindowStream ? std::min<int64_t>(seq.layers[static_cast<size_t>(l)].length, window())
                                                               : History(s)->Rows(seq, l));
    }
    return TableRows{&seq.tables[static_cast<size_t>(s)], rows, store->spec(s).rows_per_page};
  }

  // --- What every part does ------------------------------------------------

  // The pages of a new sequence (or fork) every part holds from its
  // creation, all or nothing, with their first contents.
  absl::Status AllocateState(Sequence& seq) const {
    std::vector<PageStore::Request> requests;
    for (const StreamPart* part : all_parts) part->Reserve(seq, &requests);
    KVC_RETURN_IF_ERROR(store->Allocate(requests));
    seq.layers.assign(spec.layers.size(), LayerStreams{});
    for (const StreamPart* part : all_parts) part->Init(seq);
    return absl::OkStatus();
  }

  // Drops every page reference of `seq`.
  void Release(Sequence& seq) const {
    for (const StreamPart* part : all_parts) part->Release(seq);
    seq.layers.clear();
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

}  // namespace kvc

#endif  // KVC_SRC_CACHE_INTERNAL_H_
