// The C API (kvc.h) over kvc::Cache: argument checks for what C can get
// wrong (null pointers, negative counts), status codes, thread-local errors.
#include "kvc/kvc.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <new>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "kvc/compressor.h"
#include "kvc/snapshot.h"

struct kvc_cache {
  // The copies of the engine's parameters that the cache's ModelSpec views.
  // Declared before `cache`, so it outlives it.
  std::vector<float> params;
  std::unique_ptr<kvc::Cache> cache;
};

struct kvc_index_query {
  kvc::IndexQuery query;
};

struct kvc_step_plan {
  kvc::StepPlan plan;
  // The copies as C structs, made on the first kvc_step_plan_copies /
  // kvc_step_plan_abort_copies: kvc_step_plan_create allocates nothing once
  // the step is open, and a conversion that runs out of memory fails that
  // getter alone (it is tried again on the next call).
  mutable std::mutex convert_mu;
  mutable bool converted = false;  // guarded by convert_mu; the vectors are fixed once it is set
  mutable std::vector<kvc_page_copy> copies, abort_copies;
};

namespace {

thread_local std::string last_error;

int Fail(int code, std::string message) {
  last_error = std::move(message);
  return code;
}

// Codes by the kind of failure: a file-system failure is KVC_ERR_IO whatever
// its errno's code (ENOENT would read as an unknown sequence, ENOSPC as a
// full pool, EISDIR as another model).
int FromStatus(const absl::Status& status) {
  if (status.ok()) return KVC_OK;
  int code = KVC_ERR_INTERNAL;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument: code = KVC_ERR_INVALID_ARGUMENT; break;
    case absl::StatusCode::kNotFound: code = KVC_ERR_NOT_FOUND; break;
    case absl::StatusCode::kOutOfRange: code = KVC_ERR_OUT_OF_RANGE; break;
    case absl::StatusCode::kFailedPrecondition: code = KVC_ERR_FAILED_PRECONDITION; break;
    case absl::StatusCode::kResourceExhausted: code = KVC_ERR_RESOURCE_EXHAUSTED; break;
    case absl::StatusCode::kDataLoss: code = KVC_ERR_DATA_LOSS; break;
    default: break;
  }
  if (kvc::FileSystemErrno(status) != 0) code = KVC_ERR_IO;
  return Fail(code, std::string(status.message()));
}

// Every entry point that returns a code runs its body through this: no C++
// exception leaves the C API. std::bad_alloc becomes
// KVC_ERR_RESOURCE_EXHAUSTED, any other exception KVC_ERR_INTERNAL, with a
// message naming `function`. The body gets `function` for its own messages.
template <typename Body>
int Guarded(const char* function, Body&& body) noexcept {
  int code = KVC_ERR_INTERNAL;
  const char* what = "unknown exception";
  try {
    return body(function);
  } catch (const std::bad_alloc&) {
    code = KVC_ERR_RESOURCE_EXHAUSTED;
    what = "out of memory";
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
  }
  try {
    last_error = absl::StrCat(function, ": ", what);
  } catch (...) {  // no memory for the message either: the code alone
    last_error.clear();
  }
  return code;
}

#define KVC_C_REQUIRE(pointer)                                                                              \
  do {                                                                                                      \
    if ((pointer) == nullptr) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": " #pointer " is NULL")); \
  } while (0)

// The stream numbered `stream` (KVC_STREAM_*), or an error naming it.
absl::StatusOr<kvc::Stream> ToStream(int32_t stream, const char* function) {
  if (stream < 0 || stream >= kvc::kNumStreams) {
    return absl::InvalidArgumentError(absl::StrCat(function, ": stream ", stream, " is not a KVC_STREAM_* number"));
  }
  return static_cast<kvc::Stream>(stream);
}

// Copies min(values.size(), capacity) values to `out` and pads the rest of
// its capacity with `pad`.
template <typename T>
void WriteCapped(const std::vector<T>& values, T* out, int64_t capacity, T pad) {
  const size_t n = static_cast<size_t>(capacity);
  const size_t written = std::min(values.size(), n);
  std::copy_n(values.begin(), written, out);
  if (out != nullptr) std::fill(out + written, out + n, pad);
}

// The sequences and stream of a batch block-table call, checked.
struct BatchArgs {
  absl::Span<const kvc::SequenceId> seqs;
  kvc::Stream stream;
};
absl::StatusOr<BatchArgs> CheckBatch(const kvc_seq* seqs, int64_t batch, int32_t stream, int64_t capacity,
                                     const char* function) {
  if (capacity < 0) return absl::InvalidArgumentError(absl::StrCat(function, ": capacity ", capacity, " < 0"));
  if (batch < 0) return absl::InvalidArgumentError(absl::StrCat(function, ": batch ", batch, " is negative"));
  if (batch > 0 && seqs == nullptr) return absl::InvalidArgumentError(absl::StrCat(function, ": seqs is NULL"));
  const absl::StatusOr<kvc::Stream> s = ToStream(stream, function);
  if (!s.ok()) return s.status();
  return BatchArgs{absl::MakeConstSpan(seqs, static_cast<size_t>(batch)), *s};
}

// The chain hashes of a prefix call, checked for what C can get wrong.
absl::StatusOr<absl::Span<const uint64_t>> Hashes(const uint64_t* hashes, int64_t count, const char* function) {
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat(function, ": count ", count, " is negative"));
  if (hashes == nullptr && count > 0) {
    return absl::InvalidArgumentError(absl::StrCat(function, ": block_hashes is NULL with count ", count));
  }
  return absl::MakeConstSpan(hashes, static_cast<size_t>(count));
}

// The kind of `layer` of the cache, or an error naming the layer.
absl::StatusOr<kvc::LayerKind> KindOf(const kvc_cache& cache, int32_t layer, const char* function) {
  const std::vector<kvc::LayerSpec>& layers = cache.cache->spec().layers;
  if (layer < 0 || static_cast<size_t>(layer) >= layers.size()) {
    return absl::InvalidArgumentError(absl::StrCat(function, ": layer ", layer, " is outside [0, ", layers.size(), ")"));
  }
  return layers[static_cast<size_t>(layer)].kind;
}

absl::StatusOr<kvc::CacheOptions> ToOptions(const kvc_options* options) {
  kvc::CacheOptions out;
  if (options == nullptr) return out;
  out.history_bytes = options->history_bytes;
  out.state_bytes = options->state_bytes;
  out.rollback_depth = options->rollback_depth;
  out.rows_per_page = options->rows_per_page;
  out.keys_per_page = options->keys_per_page;
  out.draft_slots = options->draft_slots;
  out.page_manager = options->page_manager != 0;
  out.prefix_bytes = options->prefix_bytes;
  out.prefix_block_tokens = options->prefix_block_tokens;
  const int64_t n = options->num_engine_arrays;
  if (n < 0 || (n > 0 && options->engine_arrays == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat("options: num_engine_arrays ", n, " with engine_arrays ",
                                                   options->engine_arrays == nullptr ? "NULL" : "set"));
  }
  for (int64_t i = 0; i < n; ++i) {
    const kvc_engine_array& a = options->engine_arrays[i];
    if (a.bytes < 0 || (a.base == nullptr && a.bytes > 0)) {
      return absl::InvalidArgumentError(absl::StrCat("options: engine_arrays[", i, "] (layer ", a.layer, "): ",
                                                     a.bytes < 0 ? "bytes < 0" : "base is NULL"));
    }
    out.engine_arrays.push_back({a.layer, static_cast<kvc::Stream>(a.stream),
                                 absl::MakeSpan(static_cast<uint8_t*>(a.base), static_cast<size_t>(a.bytes))});
  }
  return out;
}

// A view of `count` floats at `p`, after checking what C can get wrong: a
// negative count, a NULL pointer with a count. Messages start with `where`
// and name `field` (its count is field + "_count").
absl::StatusOr<absl::Span<const float>> View(const float* p, int64_t count, absl::string_view where,
                                             absl::string_view field) {
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat(where, field, "_count ", count, " is negative"));
  if (p == nullptr && count > 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, field, " is NULL with ", field, "_count ", count));
  }
  return absl::MakeConstSpan(p, static_cast<size_t>(count));
}

absl::Status SetParams(const kvc_compressor_params& in, absl::string_view where, absl::string_view field,
                       kvc::CompressorParams* out) {
  absl::StatusOr<absl::Span<const float>> ape = View(in.ape, in.ape_count, where, absl::StrCat(field, ".ape"));
  if (!ape.ok()) return ape.status();
  absl::StatusOr<absl::Span<const float>> norm =
      View(in.norm_weight, in.norm_weight_count, where, absl::StrCat(field, ".norm_weight"));
  if (!norm.ok()) return norm.status();
  *out = {*ape, *norm};
  return absl::OkStatus();
}

// Points `spec` at the caller's buffers and checks them (ModelSpec::Validate
// checks sizes before it reads values, so a wrong count reads nothing past
// the expected size), then copies every buffer into `storage` and points
// `spec` there. Messages name the layer and field.
absl::Status ApplyParams(const kvc_model_params& params, kvc::ModelSpec& spec, std::vector<float>& storage) {
  const int64_t num_layers = static_cast<int64_t>(spec.layers.size());
  if (params.layers == nullptr ? params.num_layers != 0 : params.num_layers != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("params->num_layers ", params.num_layers, " with layers ",
                                                   params.layers == nullptr ? "NULL" : "given", "; the model has ",
                                                   num_layers, " layers"));
  }
  for (int64_t i = 0; params.layers != nullptr && i < num_layers; ++i) {
    kvc::LayerSpec& layer = spec.layers[static_cast<size_t>(i)];
    const kvc_layer_params& in = params.layers[i];
    const std::string where = absl::StrCat("layer ", i, ": ");
    auto given = [](const kvc_compressor_params& p) {
      return p.ape != nullptr || p.ape_count != 0 || p.norm_weight != nullptr || p.norm_weight_count != 0;
    };
    // Validate only looks at ape for these; a lone norm_weight must not pass unnoticed.
    if (layer.kind == kvc::LayerKind::kWindow && (given(in.compressor) || given(in.indexer))) {
      return absl::InvalidArgumentError(absl::StrCat(where, "a window-only layer has no compressor or indexer"));
    }
    if (layer.kind == kvc::LayerKind::kHca && given(in.indexer)) {
      return absl::InvalidArgumentError(absl::StrCat(where, "an HCA layer has no indexer"));
    }
    for (const auto& [c, field, target] : {std::make_tuple(&in.compressor, "compressor", &layer.compressor),
                                           std::make_tuple(&in.indexer, "indexer", &layer.indexer)}) {
      const absl::Status set = SetParams(*c, where, field, target);
      if (!set.ok()) return set;
    }
  }
  absl::StatusOr<absl::Span<const float>> compressed_rope =
      View(params.compressed_rope_table, params.compressed_rope_table_count, "params->", "compressed_rope_table");
  if (!compressed_rope.ok()) return compressed_rope.status();
  absl::StatusOr<absl::Span<const float>> window_rope =
      View(params.window_rope_table, params.window_rope_table_count, "params->", "window_rope_table");
  if (!window_rope.ok()) return window_rope.status();
  spec.compressed_rope.engine_table = *compressed_rope;
  spec.window_rope.engine_table = *window_rope;
  const absl::Status valid = spec.Validate();
  if (!valid.ok()) return valid;

  // Every view of the spec, to be re-pointed at its copy.
  std::vector<absl::Span<const float>*> views = {&spec.compressed_rope.engine_table, &spec.window_rope.engine_table};
  for (kvc::LayerSpec& layer : spec.layers) {
    views.insert(views.end(), {&layer.compressor.ape, &layer.compressor.norm_weight, &layer.indexer.ape,
                               &layer.indexer.norm_weight});
  }
  size_t total = 0;
  for (const absl::Span<const float>* v : views) total += v->size();
  storage.assign(total, 0.0f);  // never resized below: the spans stay valid
  size_t at = 0;
  for (absl::Span<const float>* v : views) {
    std::copy(v->begin(), v->end(), storage.begin() + static_cast<std::ptrdiff_t>(at));
    *v = absl::MakeConstSpan(storage.data() + at, v->size());
    at += v->size();
  }
  return absl::OkStatus();
}

int Create(absl::StatusOr<kvc::ModelSpec> spec, const kvc_options* options, const kvc_model_params* params,
           kvc_cache** out) {
  if (!spec.ok()) return FromStatus(spec.status());
  std::vector<float> storage;  // declared before `cache`: outlives it on every path
  if (params != nullptr) {
    const absl::Status applied = ApplyParams(*params, *spec, storage);
    if (!applied.ok()) return FromStatus(applied);
  }
  absl::StatusOr<kvc::CacheOptions> cache_options = ToOptions(options);
  if (!cache_options.ok()) return FromStatus(cache_options.status());
  absl::StatusOr<std::unique_ptr<kvc::Cache>> cache = kvc::Cache::Create(*std::move(spec), *std::move(cache_options));
  if (!cache.ok()) return FromStatus(cache.status());
  // Moving the vector keeps its buffer, which the cache's spec views.
  *out = new kvc_cache{std::move(storage), *std::move(cache)};
  return KVC_OK;
}

// (Helpers returning C++ types stay outside extern "C".)
std::vector<kvc_page_copy> ToCCopies(const std::vector<kvc::PageCopy>& copies) {
  std::vector<kvc_page_copy> out;
  out.reserve(copies.size());
  for (const kvc::PageCopy& c : copies) out.push_back({static_cast<int32_t>(c.stream), c.src, c.dst});
  return out;
}

// The most page copies a prefix call lists (page-manager mode): the ring's
// pages and one page of each CSA compressor state; none in kvc's mode.
absl::StatusOr<int64_t> CheckpointCopies(const kvc_cache& cache) {
  const kvc::CacheOptions& options = cache.cache->options();
  if (!options.page_manager) return 0;
  absl::StatusOr<std::vector<kvc::StreamGeometry>> geometry = kvc::Cache::PageGeometry(cache.cache->spec(), options);
  if (!geometry.ok()) return geometry.status();
  const kvc::StreamGeometry& window = (*geometry)[static_cast<size_t>(kvc::Stream::kWindow)];
  int64_t copies = (window.ring_slots + window.rows_per_page - 1) / window.rows_per_page;
  for (const kvc::Stream s : {kvc::Stream::kCsaState, kvc::Stream::kCsaIndexerState}) {
    if (!(*geometry)[static_cast<size_t>(s)].layers.empty()) ++copies;
  }
  return copies;
}

}  // namespace

extern "C" {

// The functions without a code cannot throw: they copy plain values,
// delete (destructors do not throw) or return static strings.
void kvc_options_default(kvc_options* options) {
  if (options == nullptr) return;
  const kvc::CacheOptions d;
  *options = kvc_options{d.history_bytes, d.state_bytes, d.rollback_depth, d.rows_per_page, d.keys_per_page, nullptr, 0,
                         d.draft_slots, d.page_manager ? 1 : 0, d.prefix_bytes, d.prefix_block_tokens};
}

int kvc_cache_create(const char* preset, const kvc_options* options, kvc_cache** out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(preset);
    KVC_C_REQUIRE(out);
    return Create(kvc::ModelSpec::Preset(preset), options, nullptr, out);
  });
}

int kvc_cache_create_with_params(const char* preset, const kvc_options* options, const kvc_model_params* params,
                                 kvc_cache** out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(preset);
    KVC_C_REQUIRE(out);
    return Create(kvc::ModelSpec::Preset(preset), options, params, out);
  });
}

int kvc_cache_create_from_config_with_params(const char* config_json, size_t length, const kvc_options* options,
                                             const kvc_model_params* params, kvc_cache** out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(config_json);
    KVC_C_REQUIRE(out);
    return Create(kvc::ModelSpec::FromHuggingFaceConfig(absl::string_view(config_json, length)), options, params,
                  out);
  });
}

int kvc_cache_create_from_config(const char* config_json, size_t length, const kvc_options* options,
                                 kvc_cache** out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(config_json);
    KVC_C_REQUIRE(out);
    return Create(kvc::ModelSpec::FromHuggingFaceConfig(absl::string_view(config_json, length)), options, nullptr,
                  out);
  });
}

void kvc_cache_destroy(kvc_cache* cache) { delete cache; }

int kvc_cache_num_layers(const kvc_cache* cache, int32_t* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    *out = static_cast<int32_t>(cache->cache->spec().layers.size());
    return KVC_OK;
  });
}

int kvc_cache_layer_kind(const kvc_cache* cache, int32_t layer, int32_t* kind) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(kind);
    const absl::StatusOr<kvc::LayerKind> k = KindOf(*cache, layer, function);
    if (!k.ok()) return FromStatus(k.status());
    *kind = static_cast<int32_t>(*k);
    return KVC_OK;
  });
}

int kvc_cache_usage(const kvc_cache* cache, kvc_usage* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    const kvc::CacheUsage usage = cache->cache->Usage();
    for (int i = 0; i < KVC_NUM_COMPONENTS; ++i) {
      out->used_bytes[i] = usage.components[i].used_bytes;
      out->reserved_bytes[i] = usage.components[i].reserved_bytes;
    }
    out->history_limit_bytes = usage.history_limit_bytes;
    out->state_limit_bytes = usage.state_limit_bytes;
    out->sequences = usage.sequences;
    out->open_steps = usage.open_steps;
    out->deferred_pages = usage.deferred_pages;
    out->epoch = usage.epoch;
    out->completed_epoch = usage.completed_epoch;
    return KVC_OK;
  });
}

int kvc_seq_create(kvc_cache* cache, kvc_seq* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    absl::StatusOr<kvc::SequenceId> seq = cache->cache->CreateSequence();
    if (!seq.ok()) return FromStatus(seq.status());
    *out = *seq;
    return KVC_OK;
  });
}

int kvc_seq_append(kvc_cache* cache, kvc_seq seq, int32_t layer, int64_t position, const uint16_t* window_rows,
                   int64_t count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    if (count < 0 || count > INT64_MAX / KVC_HEAD_DIM) {
      return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat("kvc_seq_append: count ", count, " is out of range"));
    }
    if (count > 0) KVC_C_REQUIRE(window_rows);
    const auto* rows = reinterpret_cast<const kvc::Bf16*>(window_rows);
    return FromStatus(cache->cache->Append(seq, layer, position,
                                           {absl::MakeConstSpan(rows, static_cast<size_t>(count * KVC_HEAD_DIM))}));
  });
}

int kvc_seq_append_tokens(kvc_cache* cache, kvc_seq seq, int32_t layer, int64_t position,
                          const kvc_layer_tokens* tokens) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(tokens);
    const kvc::ModelSpec& spec = cache->cache->spec();
    if (layer < 0 || layer >= static_cast<int32_t>(spec.layers.size())) {
      return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat("kvc_seq_append_tokens: layer ", layer, " is out of range"));
    }
    const int64_t count = tokens->count;
    if (count < 0 || count > INT64_MAX / 1024) {
      return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat("kvc_seq_append_tokens: count ", count, " is out of range"));
    }
    if (count > 0) KVC_C_REQUIRE(tokens->window_rows);
    const kvc::LayerKind kind = spec.layers[static_cast<size_t>(layer)].kind;
    const int64_t main_width = kvc::MainCompressor(kind, spec.head_dim).width();
    const int64_t index_width = kvc::IndexerCompressor(spec.index_dim).width();
    // A NULL array is an empty span; a non-NULL one spans count rows.
    auto floats = [&](const float* p, int64_t width) {
      return p == nullptr ? absl::Span<const float>() : absl::MakeConstSpan(p, static_cast<size_t>(count * width));
    };
    kvc::LayerTokens t;
    t.window_rows = absl::MakeConstSpan(reinterpret_cast<const kvc::Bf16*>(tokens->window_rows),
                                        static_cast<size_t>(count * KVC_HEAD_DIM));
    t.compressor_kv = floats(tokens->compressor_kv, main_width);
    t.compressor_score = floats(tokens->compressor_score, main_width);
    t.indexer_kv = floats(tokens->indexer_kv, index_width);
    t.indexer_score = floats(tokens->indexer_score, index_width);
    return FromStatus(cache->cache->Append(seq, layer, position, t));
  });
}

int kvc_seq_fork(kvc_cache* cache, kvc_seq seq, kvc_seq* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    absl::StatusOr<kvc::SequenceId> child = cache->cache->Fork(seq);
    if (!child.ok()) return FromStatus(child.status());
    *out = *child;
    return KVC_OK;
  });
}

int kvc_seq_truncate(kvc_cache* cache, kvc_seq seq, int64_t length) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    return FromStatus(cache->cache->Truncate(seq, length));
  });
}

int kvc_seq_free(kvc_cache* cache, kvc_seq seq) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    return FromStatus(cache->cache->Free(seq));
  });
}

int kvc_seq_length(const kvc_cache* cache, kvc_seq seq, int32_t layer, int64_t* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    absl::StatusOr<int64_t> length = cache->cache->Length(seq, layer);
    if (!length.ok()) return FromStatus(length.status());
    *out = *length;
    return KVC_OK;
  });
}

int kvc_seq_rollback_floor(const kvc_cache* cache, kvc_seq seq, int64_t* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    absl::StatusOr<int64_t> floor = cache->cache->RollbackFloor(seq);
    if (!floor.ok()) return FromStatus(floor.status());
    *out = *floor;
    return KVC_OK;
  });
}

int kvc_seq_read_window(const kvc_cache* cache, kvc_seq seq, int32_t layer, uint16_t* out, int64_t out_values) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    if (out_values < 0) return Fail(KVC_ERR_INVALID_ARGUMENT, "kvc_seq_read_window: out_values < 0");
    return FromStatus(cache->cache->ReadWindow(
        seq, layer, absl::MakeSpan(reinterpret_cast<kvc::Bf16*>(out), static_cast<size_t>(out_values))));
  });
}

int kvc_index_query_prepare(const kvc_cache* cache, int64_t position, const uint16_t* q_raw, const float* weights,
                            int32_t heads, kvc_index_query** out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(q_raw);
    KVC_C_REQUIRE(weights);
    KVC_C_REQUIRE(out);
    if (heads < 1) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": heads ", heads, " is not positive"));
    const size_t n = static_cast<size_t>(heads);
    absl::StatusOr<kvc::IndexQuery> query = cache->cache->PrepareIndexQuery(
        position, absl::MakeConstSpan(reinterpret_cast<const kvc::Bf16*>(q_raw), n * KVC_INDEX_DIM),
        absl::MakeConstSpan(weights, n));
    if (!query.ok()) return FromStatus(query.status());
    *out = new kvc_index_query{*std::move(query)};
    return KVC_OK;
  });
}

void kvc_index_query_destroy(kvc_index_query* query) { delete query; }

int kvc_index_scores(const kvc_cache* cache, kvc_seq seq, int32_t layer, const kvc_index_query* query, float* out,
                     int64_t capacity, int64_t* count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(query);
    KVC_C_REQUIRE(count);
    if (capacity < 0) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": capacity ", capacity, " < 0"));
    if (capacity > 0) KVC_C_REQUIRE(out);
    const absl::StatusOr<kvc::LayerKind> k = KindOf(*cache, layer, function);
    if (!k.ok()) return FromStatus(k.status());
    const kvc::LayerKind kind = *k;
    if (kind != kvc::LayerKind::kCsa) {
      return Fail(KVC_ERR_INVALID_ARGUMENT,
                  absl::StrCat(function, ": layer ", layer, " is ", kind == kvc::LayerKind::kHca ? "HCA" : "window-only",
                               "; only CSA layers have index keys"));
    }
    std::vector<float> scores;
    const absl::StatusOr<kvc::AttentionSet> set = cache->cache->SelectAttentionSet(seq, layer, &query->query, &scores);
    if (!set.ok()) return FromStatus(set.status());
    const size_t written = std::min(scores.size(), static_cast<size_t>(capacity));
    std::copy_n(scores.begin(), written, out);
    *count = static_cast<int64_t>(scores.size());
    return KVC_OK;
  });
}

int kvc_layer_pages(const kvc_cache* cache, int32_t layer, int32_t stream, kvc_page_array* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    const absl::StatusOr<kvc::Stream> s = ToStream(stream, function);
    if (!s.ok()) return FromStatus(s.status());
    const absl::StatusOr<kvc::PageArray> pages = cache->cache->LayerPages(layer, *s);
    if (!pages.ok()) return FromStatus(pages.status());
    *out = {pages->base, pages->page_bytes, pages->num_pages, pages->rows_per_page, pages->row_data_bytes,
            pages->row_scale_bytes};
    return KVC_OK;
  });
}

int kvc_page_geometry(const char* preset, const char* config_json, size_t config_length, const kvc_options* options,
                      int32_t stream, kvc_page_array* out, int32_t* layers, int32_t capacity, int32_t* count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(out);
    KVC_C_REQUIRE(count);
    if (capacity < 0) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": capacity ", capacity, " < 0"));
    if (capacity > 0) KVC_C_REQUIRE(layers);
    if (preset == nullptr) KVC_C_REQUIRE(config_json);
    const absl::StatusOr<kvc::Stream> s = ToStream(stream, function);
    if (!s.ok()) return FromStatus(s.status());
    const absl::StatusOr<kvc::ModelSpec> spec =
        preset != nullptr ? kvc::ModelSpec::Preset(preset)
                          : kvc::ModelSpec::FromHuggingFaceConfig(absl::string_view(config_json, config_length));
    if (!spec.ok()) return FromStatus(spec.status());
    const absl::StatusOr<kvc::CacheOptions> cache_options = ToOptions(options);
    if (!cache_options.ok()) return FromStatus(cache_options.status());
    const absl::StatusOr<std::vector<kvc::StreamGeometry>> geometry = kvc::Cache::PageGeometry(*spec, *cache_options);
    if (!geometry.ok()) return FromStatus(geometry.status());
    const kvc::StreamGeometry& g = (*geometry)[static_cast<size_t>(stream)];
    *out = {nullptr, g.page_bytes, 0, g.rows_per_page, g.row_data_bytes, g.row_scale_bytes};
    std::copy_n(g.layers.begin(), std::min(g.layers.size(), static_cast<size_t>(capacity)), layers);
    *count = static_cast<int32_t>(g.layers.size());
    return KVC_OK;
  });
}

int kvc_seq_block_table(const kvc_cache* cache, kvc_seq seq, int32_t stream, int32_t* ids, int64_t capacity,
                        int64_t* count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(count);
    if (capacity < 0) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": capacity ", capacity, " < 0"));
    if (capacity > 0) KVC_C_REQUIRE(ids);
    const absl::StatusOr<kvc::Stream> s = ToStream(stream, function);
    if (!s.ok()) return FromStatus(s.status());
    const absl::StatusOr<std::vector<int32_t>> table = cache->cache->BlockTable(seq, *s);
    if (!table.ok()) return FromStatus(table.status());
    const size_t written = std::min(table->size(), static_cast<size_t>(capacity));
    std::copy_n(table->begin(), written, ids);
    *count = static_cast<int64_t>(table->size());
    return KVC_OK;
  });
}

int kvc_batch_block_tables(const kvc_cache* cache, const kvc_seq* seqs, int64_t batch, int32_t stream, int32_t* ids,
                           int64_t capacity, int64_t* max_blocks, int32_t* blocks, int64_t* rows) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(max_blocks);
    const absl::StatusOr<BatchArgs> args = CheckBatch(seqs, batch, stream, capacity, function);
    if (!args.ok()) return FromStatus(args.status());
    const absl::StatusOr<kvc::DenseBlockTables> tables = cache->cache->BatchBlockTables(args->seqs, args->stream);
    if (!tables.ok()) return FromStatus(tables.status());
    *max_blocks = tables->max_blocks;
    if (static_cast<int64_t>(tables->ids.size()) > capacity) {
      return Fail(KVC_ERR_OUT_OF_RANGE, absl::StrCat(function, ": the table needs ", tables->ids.size(),
                                                     " ids (batch ", batch, " x max_blocks ", tables->max_blocks,
                                                     "); capacity is ", capacity));
    }
    if (!tables->ids.empty()) KVC_C_REQUIRE(ids);
    std::copy(tables->ids.begin(), tables->ids.end(), ids);
    if (blocks != nullptr) std::copy(tables->blocks.begin(), tables->blocks.end(), blocks);
    if (rows != nullptr) std::copy(tables->rows.begin(), tables->rows.end(), rows);
    return KVC_OK;
  });
}

int kvc_batch_block_tables_csr(const kvc_cache* cache, const kvc_seq* seqs, int64_t batch, int32_t stream,
                               int32_t* indptr, int32_t* indices, int64_t capacity, int64_t* count,
                               int32_t* last_page_len) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(indptr);
    KVC_C_REQUIRE(count);
    if (batch > 0) KVC_C_REQUIRE(last_page_len);
    const absl::StatusOr<BatchArgs> args = CheckBatch(seqs, batch, stream, capacity, function);
    if (!args.ok()) return FromStatus(args.status());
    const absl::StatusOr<kvc::CsrBlockTables> tables = cache->cache->BatchBlockTablesCsr(args->seqs, args->stream);
    if (!tables.ok()) return FromStatus(tables.status());
    *count = static_cast<int64_t>(tables->indices.size());
    if (*count > capacity) {
      return Fail(KVC_ERR_OUT_OF_RANGE,
                  absl::StrCat(function, ": the batch has ", *count, " pages; capacity is ", capacity));
    }
    if (*count > 0) KVC_C_REQUIRE(indices);
    std::copy(tables->indptr.begin(), tables->indptr.end(), indptr);
    std::copy(tables->indices.begin(), tables->indices.end(), indices);
    std::copy(tables->last_page_len.begin(), tables->last_page_len.end(), last_page_len);
    return KVC_OK;
  });
}

int kvc_seq_append_rows(kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t stream, int64_t first, const uint8_t* rows,
                        int64_t count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    if (count < 0) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": count ", count, " < 0"));
    if (count > 0) KVC_C_REQUIRE(rows);
    const absl::StatusOr<kvc::Stream> s = ToStream(stream, function);
    if (!s.ok()) return FromStatus(s.status());
    const int64_t row_bytes = *s == kvc::Stream::kCsaKeys ? kvc::FormatInfo(kvc::RowFormat::kIndexFp4).row_bytes
                                                          : kvc::FormatInfo(kvc::RowFormat::kKvFp8).row_bytes;
    if (count > std::numeric_limits<int64_t>::max() / row_bytes) {
      return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": count ", count, " is out of range"));
    }
    return FromStatus(cache->cache->AppendRows(seq, layer, *s, first,
                                               absl::MakeConstSpan(rows, static_cast<size_t>(count * row_bytes))));
  });
}

int kvc_seq_stream_rows(const kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t stream, int64_t* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    const absl::StatusOr<kvc::Stream> s = ToStream(stream, function);
    if (!s.ok()) return FromStatus(s.status());
    const absl::StatusOr<int64_t> rows = cache->cache->StreamRows(seq, layer, *s);
    if (!rows.ok()) return FromStatus(rows.status());
    *out = *rows;
    return KVC_OK;
  });
}

int kvc_seq_select(const kvc_cache* cache, kvc_seq seq, int32_t layer, const kvc_index_query* query,
                   int32_t* window_indices, int64_t window_capacity, int64_t* window_count, int32_t* compressed_indices,
                   int64_t compressed_capacity, int64_t* compressed_count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(window_count);
    KVC_C_REQUIRE(compressed_count);
    if (window_capacity < 0 || compressed_capacity < 0) {
      return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": capacities (", window_capacity, ", ",
                                                         compressed_capacity, ") must be >= 0"));
    }
    if (window_capacity > 0) KVC_C_REQUIRE(window_indices);
    if (compressed_capacity > 0) KVC_C_REQUIRE(compressed_indices);
    const absl::StatusOr<kvc::LayerKind> k = KindOf(*cache, layer, function);
    if (!k.ok()) return FromStatus(k.status());
    const bool csa = *k == kvc::LayerKind::kCsa;
    if (csa && query == nullptr) {
      return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": layer ", layer, " is CSA: it needs an index query"));
    }
    const absl::StatusOr<kvc::AttentionSet> set =
        cache->cache->SelectAttentionSet(seq, layer, csa ? &query->query : nullptr);
    if (!set.ok()) return FromStatus(set.status());
    WriteCapped(set->window_indices, window_indices, window_capacity, int32_t{-1});
    WriteCapped(set->compressed_indices, compressed_indices, compressed_capacity, int32_t{-1});
    *window_count = static_cast<int64_t>(set->window_indices.size());
    *compressed_count = static_cast<int64_t>(set->compressed_indices.size());
    return KVC_OK;
  });
}

int kvc_seq_select_positions(const kvc_cache* cache, kvc_seq seq, int32_t layer, int64_t first, int64_t count,
                             const kvc_index_query* const* queries, kvc_position_sets* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    out->window_total = -1;
    out->compressed_total = -1;
    KVC_C_REQUIRE(out->window_offsets);
    KVC_C_REQUIRE(out->compressed_offsets);
    if (out->window_capacity < 0 || out->compressed_capacity < 0) {
      return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": capacities (", out->window_capacity, ", ",
                                                         out->compressed_capacity, ") must be >= 0"));
    }
    if (out->window_capacity > 0) KVC_C_REQUIRE(out->window_indices);
    if (out->compressed_capacity > 0) KVC_C_REQUIRE(out->compressed_indices);
    // Read `count` query pointers only for positions the layer holds (the
    // selection refuses the others, naming the first missing position).
    const absl::StatusOr<int64_t> length = cache->cache->Length(seq, layer);
    if (!length.ok()) return FromStatus(length.status());
    const bool held = first >= 0 && count >= 0 && first <= *length && count <= *length - first;
    std::vector<const kvc::IndexQuery*> pointers;
    if (queries != nullptr && held) {
      pointers.reserve(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) pointers.push_back(queries[i] != nullptr ? &queries[i]->query : nullptr);
    }
    const absl::StatusOr<kvc::PositionSets> sets = cache->cache->SelectAttentionSets(seq, layer, first, count, pointers);
    if (!sets.ok()) return FromStatus(sets.status());
    out->window_total = static_cast<int64_t>(sets->window_indices.size());
    out->compressed_total = static_cast<int64_t>(sets->compressed_indices.size());
    if (out->window_total > out->window_capacity || out->compressed_total > out->compressed_capacity) {
      return Fail(KVC_ERR_OUT_OF_RANGE,
                  absl::StrCat(function, ": the sets hold ", out->window_total, " window and ", out->compressed_total,
                               " compressed rows; capacities are ", out->window_capacity, " and ",
                               out->compressed_capacity));
    }
    std::copy(sets->window_offsets.begin(), sets->window_offsets.end(), out->window_offsets);
    std::copy(sets->compressed_offsets.begin(), sets->compressed_offsets.end(), out->compressed_offsets);
    std::copy(sets->window_indices.begin(), sets->window_indices.end(), out->window_indices);
    std::copy(sets->compressed_indices.begin(), sets->compressed_indices.end(), out->compressed_indices);
    if (out->window_positions != nullptr) {
      std::copy(sets->window_positions.begin(), sets->window_positions.end(), out->window_positions);
    }
    if (out->entries != nullptr) std::copy(sets->entries.begin(), sets->entries.end(), out->entries);
    return KVC_OK;
  });
}

int kvc_snapshot_save(const kvc_cache* cache, const kvc_seq* seqs, size_t count, const char* path, int incremental) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(path);
    if (count > 0) KVC_C_REQUIRE(seqs);
    kvc::SaveOptions options;
    options.incremental = incremental != 0;
    return FromStatus(kvc::SaveSnapshot(*cache->cache, absl::MakeConstSpan(seqs, count), path, options).status());
  });
}

int kvc_snapshot_restore(kvc_cache* cache, const char* path, kvc_seq* out, size_t capacity, size_t* count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(path);
    KVC_C_REQUIRE(count);
    if (capacity > 0) KVC_C_REQUIRE(out);
    const absl::StatusOr<kvc::SnapshotInfo> info = kvc::ReadSnapshotInfo(path);
    if (!info.ok()) return FromStatus(info.status());
    auto too_small = [&](size_t needed) {
      *count = needed;
      return Fail(KVC_ERR_OUT_OF_RANGE, absl::StrCat("kvc_snapshot_restore: ", path, " holds ", needed,
                                                     " sequences; out has room for ", capacity));
    };
    if (info->sequences.size() > capacity) return too_small(info->sequences.size());
    absl::StatusOr<std::vector<kvc::SequenceId>> ids = kvc::RestoreSnapshot(*cache->cache, path);
    if (!ids.ok()) return FromStatus(ids.status());
    if (ids->size() > capacity) {  // the file changed since it was inspected
      for (const kvc::SequenceId id : *ids) {
      const absl::Status freed = cache->cache->Free(id);  // ours, just made: only a bug could fail it
      if (!freed.ok()) return FromStatus(freed);
    }
      return too_small(ids->size());
    }
    std::copy(ids->begin(), ids->end(), out);
    *count = ids->size();
    return KVC_OK;
  });
}

// --- Planned batch steps ----------------------------------------------------

int kvc_step_plan_create(kvc_cache* cache, const kvc_seq* seqs, const int64_t* new_tokens, int64_t batch,
                         kvc_step_plan** out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    if (batch < 0) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": batch ", batch, " is negative"));
    if (batch > 0) {
      KVC_C_REQUIRE(seqs);
      KVC_C_REQUIRE(new_tokens);
    }
    std::vector<kvc::StepRequest> requests;
    for (int64_t b = 0; b < batch; ++b) requests.push_back({seqs[b], new_tokens[b]});
    auto plan = std::make_unique<kvc_step_plan>();
    absl::StatusOr<kvc::StepPlan> planned = cache->cache->PlanStep(requests);
    if (!planned.ok()) return FromStatus(planned.status());
    plan->plan = *std::move(planned);  // the step is open: nothing below allocates
    *out = plan.release();
    return KVC_OK;
  });
}

void kvc_step_plan_destroy(kvc_step_plan* plan) { delete plan; }

int kvc_step_plan_epoch(const kvc_step_plan* plan, uint64_t* epoch) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(plan);
    KVC_C_REQUIRE(epoch);
    *epoch = plan->plan.epoch;
    return KVC_OK;
  });
}

int kvc_step_plan_slots(const kvc_step_plan* plan, int32_t stream, const int32_t** indptr, const int64_t** slots,
                        int64_t* num_slots) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(plan);
    KVC_C_REQUIRE(indptr);
    KVC_C_REQUIRE(slots);
    KVC_C_REQUIRE(num_slots);
    const absl::StatusOr<kvc::Stream> s = ToStream(stream, function);
    if (!s.ok()) return FromStatus(s.status());
    const kvc::StepSlots& st = plan->plan.slots[static_cast<int>(*s)];
    *indptr = st.indptr.empty() ? nullptr : st.indptr.data();
    *slots = st.slots.data();
    *num_slots = static_cast<int64_t>(st.slots.size());
    return KVC_OK;
  });
}

namespace {

// The plan's copies as C structs (kvc_step_plan::converted).
void ConvertCopies(const kvc_step_plan& plan) {
  std::lock_guard<std::mutex> lock(plan.convert_mu);
  if (plan.converted) return;
  std::vector<kvc_page_copy> copies = ToCCopies(plan.plan.copies);
  std::vector<kvc_page_copy> abort_copies = ToCCopies(plan.plan.abort_copies);
  plan.copies = std::move(copies);
  plan.abort_copies = std::move(abort_copies);
  plan.converted = true;
}

}  // namespace

int kvc_step_plan_copies(const kvc_step_plan* plan, const kvc_page_copy** copies, int64_t* count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(plan);
    KVC_C_REQUIRE(copies);
    KVC_C_REQUIRE(count);
    ConvertCopies(*plan);
    *copies = plan->copies.data();
    *count = static_cast<int64_t>(plan->copies.size());
    return KVC_OK;
  });
}

int kvc_step_plan_abort_copies(const kvc_step_plan* plan, const kvc_page_copy** copies, int64_t* count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(plan);
    KVC_C_REQUIRE(copies);
    KVC_C_REQUIRE(count);
    ConvertCopies(*plan);
    *copies = plan->abort_copies.data();
    *count = static_cast<int64_t>(plan->abort_copies.size());
    return KVC_OK;
  });
}

int kvc_step_commit(kvc_cache* cache, uint64_t epoch) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    return FromStatus(cache->cache->CommitStep(epoch));
  });
}

int kvc_step_abort(kvc_cache* cache, uint64_t epoch) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    return FromStatus(cache->cache->AbortStep(epoch));
  });
}

int kvc_steps_complete(kvc_cache* cache, uint64_t epoch, int64_t* released) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    const absl::StatusOr<int64_t> n = cache->cache->CompleteSteps(epoch);
    if (!n.ok()) return FromStatus(n.status());
    if (released != nullptr) *released = *n;
    return KVC_OK;
  });
}

int kvc_seq_fork_pages(kvc_cache* cache, kvc_seq seq, kvc_seq* out, kvc_page_copy* copies, int64_t capacity,
                       int64_t* count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    KVC_C_REQUIRE(count);
    if (capacity < 0) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": capacity ", capacity, " < 0"));
    if (capacity > 0) KVC_C_REQUIRE(copies);
    // The copies a fork lists: the parent's private pages (ring and state).
    int64_t needed = 0;
    if (cache->cache->options().page_manager) {
      for (const kvc::Stream s : {kvc::Stream::kWindow, kvc::Stream::kCsaState, kvc::Stream::kCsaIndexerState,
                                  kvc::Stream::kHcaState}) {
        const absl::StatusOr<std::vector<int32_t>> table = cache->cache->BlockTable(seq, s);
        if (table.ok()) {
          needed += static_cast<int64_t>(table->size());
        } else if (s == kvc::Stream::kWindow) {
          return FromStatus(table.status());  // an unknown sequence
        }
      }
    }
    if (needed > capacity) {
      *count = needed;
      return Fail(KVC_ERR_OUT_OF_RANGE, absl::StrCat(function, ": the fork lists ", needed,
                                                     " page copies; capacity is ", capacity));
    }
    std::vector<kvc::PageCopy> listed;
    absl::StatusOr<kvc::SequenceId> child = cache->cache->Fork(seq, &listed);
    if (!child.ok()) return FromStatus(child.status());
    for (size_t i = 0; i < listed.size(); ++i) {  // no allocation once the child exists
      copies[i] = {static_cast<int32_t>(listed[i].stream), listed[i].src, listed[i].dst};
    }
    *count = static_cast<int64_t>(listed.size());
    *out = *child;
    return KVC_OK;
  });
}

// --- Prefix caching ----------------------------------------------------------

int kvc_prefix_block_tokens(const kvc_cache* cache, int64_t* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    *out = cache->cache->PrefixBlockTokens();
    return KVC_OK;
  });
}

int kvc_prefix_publish(kvc_cache* cache, kvc_seq seq, const uint64_t* block_hashes, int64_t count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    const absl::StatusOr<absl::Span<const uint64_t>> hashes = Hashes(block_hashes, count, function);
    if (!hashes.ok()) return FromStatus(hashes.status());
    return FromStatus(cache->cache->PublishPrefix(seq, *hashes));
  });
}

int kvc_seq_create_from_prefix(kvc_cache* cache, const uint64_t* block_hashes, int64_t count, kvc_seq* out,
                               int64_t* tokens) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    KVC_C_REQUIRE(tokens);
    const absl::StatusOr<absl::Span<const uint64_t>> hashes = Hashes(block_hashes, count, function);
    if (!hashes.ok()) return FromStatus(hashes.status());
    const absl::StatusOr<kvc::Cache::PrefixMatch> match = cache->cache->CreateSequenceFromPrefix(*hashes);
    if (!match.ok()) return FromStatus(match.status());
    *out = match->seq;
    *tokens = match->tokens;
    return KVC_OK;
  });
}

int kvc_prefix_lookup(const kvc_cache* cache, const uint64_t* block_hashes, int64_t count, int64_t* tokens,
                      int64_t* shared_tokens) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(tokens);
    const absl::StatusOr<absl::Span<const uint64_t>> hashes = Hashes(block_hashes, count, function);
    if (!hashes.ok()) return FromStatus(hashes.status());
    const kvc::Cache::PrefixMatch match = cache->cache->LookupPrefix(*hashes);
    *tokens = match.tokens;
    if (shared_tokens != nullptr) *shared_tokens = match.shared_tokens;
    return KVC_OK;
  });
}

int kvc_cache_prefix_usage(const kvc_cache* cache, kvc_prefix_usage* out) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    const kvc::PrefixUsage u = cache->cache->Usage().prefix;
    *out = kvc_prefix_usage{u.limit_bytes, u.cached_bytes, u.history_bytes, u.checkpoint_bytes,
                            u.shared_bytes, u.prefixes,    u.cached_tokens, u.hits,
                            u.misses,       u.tokens_reused, u.published,  u.evictions};
    return KVC_OK;
  });
}

namespace {

// Checks a page-copy buffer; OK when `capacity` holds the most copies a
// prefix call lists (else KVC_ERR_OUT_OF_RANGE with *copy_count the need).
int CheckCopyBuffer(const kvc_cache& cache, const kvc_page_copy* copies, int64_t capacity, int64_t* copy_count,
                    const char* function) {
  if (capacity < 0) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": capacity ", capacity, " < 0"));
  if (capacity > 0 && copies == nullptr) return Fail(KVC_ERR_INVALID_ARGUMENT, absl::StrCat(function, ": copies is NULL"));
  const absl::StatusOr<int64_t> needed = CheckpointCopies(cache);
  if (!needed.ok()) return FromStatus(needed.status());
  if (*needed > capacity) {
    *copy_count = *needed;
    return Fail(KVC_ERR_OUT_OF_RANGE, absl::StrCat(function, ": the call may list ", *needed,
                                                   " page copies; capacity is ", capacity));
  }
  return KVC_OK;
}

void WriteCopies(const std::vector<kvc::PageCopy>& listed, kvc_page_copy* copies, int64_t* copy_count) {
  for (size_t i = 0; i < listed.size(); ++i) copies[i] = {static_cast<int32_t>(listed[i].stream), listed[i].src, listed[i].dst};
  *copy_count = static_cast<int64_t>(listed.size());
}

}  // namespace

int kvc_prefix_publish_pages(kvc_cache* cache, kvc_seq seq, const uint64_t* block_hashes, int64_t count,
                             kvc_page_copy* copies, int64_t capacity, int64_t* copy_count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(copy_count);
    const absl::StatusOr<absl::Span<const uint64_t>> hashes = Hashes(block_hashes, count, function);
    if (!hashes.ok()) return FromStatus(hashes.status());
    if (const int rc = CheckCopyBuffer(*cache, copies, capacity, copy_count, function); rc != KVC_OK) return rc;
    std::vector<kvc::PageCopy> listed;
    const absl::Status published = cache->cache->PublishPrefix(seq, *hashes, &listed);
    if (!published.ok()) return FromStatus(published);
    WriteCopies(listed, copies, copy_count);
    return KVC_OK;
  });
}

int kvc_seq_create_from_prefix_pages(kvc_cache* cache, const uint64_t* block_hashes, int64_t count, kvc_seq* out,
                                     int64_t* tokens, kvc_page_copy* copies, int64_t capacity, int64_t* copy_count) {
  return Guarded(__func__, [&](const char* function) -> int {
    KVC_C_REQUIRE(cache);
    KVC_C_REQUIRE(out);
    KVC_C_REQUIRE(tokens);
    KVC_C_REQUIRE(copy_count);
    const absl::StatusOr<absl::Span<const uint64_t>> hashes = Hashes(block_hashes, count, function);
    if (!hashes.ok()) return FromStatus(hashes.status());
    if (const int rc = CheckCopyBuffer(*cache, copies, capacity, copy_count, function); rc != KVC_OK) return rc;
    std::vector<kvc::PageCopy> listed;
    const absl::StatusOr<kvc::Cache::PrefixMatch> match = cache->cache->CreateSequenceFromPrefix(*hashes, &listed);
    if (!match.ok()) return FromStatus(match.status());
    *out = match->seq;
    *tokens = match->tokens;
    WriteCopies(listed, copies, copy_count);
    return KVC_OK;
  });
}

const char* kvc_last_error(void) { return last_error.c_str(); }

const char* kvc_component_name(int component) {
  if (component < 0 || component >= KVC_NUM_COMPONENTS) return "?";
  return kvc::ComponentName(static_cast<kvc::Component>(component));
}

}  // extern "C"
