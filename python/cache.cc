// kvc.Cache: kvc::Cache for Python (docs/python.md). Every method checks
// its NumPy arguments (binding.h) before it calls kvc, releases the GIL
// while kvc works, and raises kvc.Error with kvc's message when kvc refuses.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kvc/cache.h"
#include "kvc/kvc.h"
#include "kvc/model_spec.h"
#include "kvc/row_formats.h"
#include "kvc/snapshot.h"
#include "python/binding.h"

namespace kvc_python {
namespace {

static_assert(KVC_STREAM_WINDOW == static_cast<int>(kvc::Stream::kWindow) &&
                  KVC_STREAM_CSA_ROWS == static_cast<int>(kvc::Stream::kCsaRows) &&
                  KVC_STREAM_CSA_KEYS == static_cast<int>(kvc::Stream::kCsaKeys) &&
                  KVC_STREAM_HCA_ROWS == static_cast<int>(kvc::Stream::kHcaRows) &&
                  KVC_STREAM_CSA_STATE == static_cast<int>(kvc::Stream::kCsaState) &&
                  KVC_STREAM_CSA_INDEXER_STATE == static_cast<int>(kvc::Stream::kCsaIndexerState) &&
                  KVC_STREAM_HCA_STATE == static_cast<int>(kvc::Stream::kHcaState),
              "kvc.STREAM_* are the C API's numbers");

// A kvc::Cache and what it must not outlive.
struct PyCache {
  // Copies of the engine's compressor parameters, which the cache's
  // ModelSpec views. Declared before `cache`, so they outlive it.
  std::vector<float> params;
  // The objects owning the engine's page arrays (CacheOptions::engine_arrays).
  std::vector<py::object> engine_buffers;
  // The (layer, stream) arrays the engine gave as addresses (page-manager
  // mode): kvc cannot tell host from device memory, so no view is made.
  std::vector<std::pair<int32_t, int32_t>> address_arrays;
  std::vector<kvc::StreamGeometry> geometry;  // indexed by stream
  std::unique_ptr<kvc::Cache> cache;

  kvc::Cache& get() { return *cache; }
  int num_layers() const { return static_cast<int>(cache->spec().layers.size()); }
};

struct PyIndexQuery {
  kvc::IndexQuery query;
};

// What select() returns: index arrays (and, when asked, the rows).
struct PyAttentionSet {
  int64_t position = 0;
  py::object indices, window_indices, compressed_indices, rows;
};

// What select_positions() returns: CSR index arrays, one slice per query.
struct PyPositionSets {
  int64_t first = 0;
  int64_t count = 0;
  py::object window_offsets, window_positions, window_indices, compressed_offsets, entries, compressed_indices;
};

struct PyPrefixMatch {
  kvc::SequenceId seq = 0;
  int64_t tokens = 0;
  int64_t shared_tokens = 0;
};

struct PyDenseTables {
  int64_t max_blocks = 0;
  py::object ids, blocks, rows;
};

struct PyCsrTables {
  py::object indptr, indices, last_page_len;
};

// The options every constructor takes (keyword-only in Python).
struct OptionArgs {
  int64_t history_bytes;
  int64_t state_bytes;
  int32_t rollback_depth;
  int32_t draft_slots;
  int32_t rows_per_page;
  int32_t keys_per_page;
  bool page_manager;
  int64_t prefix_bytes;
  int32_t prefix_block_tokens;
};

kvc::CacheOptions ToOptions(const OptionArgs& a) {
  kvc::CacheOptions o;
  o.history_bytes = a.history_bytes;
  o.state_bytes = a.state_bytes;
  o.rollback_depth = a.rollback_depth;
  o.draft_slots = a.draft_slots;
  o.rows_per_page = a.rows_per_page;
  o.keys_per_page = a.keys_per_page;
  o.page_manager = a.page_manager;
  o.prefix_bytes = a.prefix_bytes;
  o.prefix_block_tokens = a.prefix_block_tokens;
  return o;
}

// A step's page copies as an int32 (n, 3) array: stream, src, dst per row.
py::array CopiesArray(const std::vector<kvc::PageCopy>& copies) {
  std::vector<int32_t> flat;
  flat.reserve(copies.size() * 3);
  for (const kvc::PageCopy& c : copies) flat.insert(flat.end(), {static_cast<int32_t>(c.stream), c.src, c.dst});
  return ToArray(std::move(flat), {static_cast<py::ssize_t>(copies.size()), 3});
}

struct PyStepSlots {
  py::object indptr, slots;
};

struct PyStepPlan {
  uint64_t epoch = 0;
  py::object seqs, first_position, new_tokens, copies, abort_copies;
  py::tuple slots;  // a PyStepSlots per stream
};

// --- compressor parameters ---------------------------------------------------

// Points spec's compressor parameters at copies (in *storage) of the arrays
// in `params`: a sequence of one entry per layer, None or a dict with any of
// compressor_ape, compressor_norm_weight, indexer_ape, indexer_norm_weight
// (float32, shapes (ratio, width x dim) and (dim,)). Structure and arrays are
// checked here (ValueError); completeness and values by kvc (Create).
void ApplyParams(py::handle params, kvc::ModelSpec& spec, std::vector<float>* storage) {
  if (params.is_none()) return;
  if (!py::isinstance<py::sequence>(params) || py::isinstance<py::str>(params)) {
    throw py::value_error(absl::StrCat("params: expected a sequence with one entry per layer; got a ",
                                       Py_TYPE(params.ptr())->tp_name));
  }
  const py::sequence layers = py::reinterpret_borrow<py::sequence>(params);
  if (layers.size() != spec.layers.size()) {
    throw py::value_error(absl::StrCat("params: ", layers.size(), " entries; the model has ", spec.layers.size(), " layers"));
  }
  struct Source {
    py::array array;
    absl::Span<const float>* target;
  };
  std::vector<Source> sources;
  for (size_t i = 0; i < spec.layers.size(); ++i) {
    const py::object entry = layers[i];
    if (entry.is_none()) continue;
    if (!py::isinstance<py::dict>(entry)) {
      throw py::value_error(absl::StrCat("params[", i, "]: expected None or a dict; got a ", Py_TYPE(entry.ptr())->tp_name));
    }
    kvc::LayerSpec& layer = spec.layers[i];
    const int ratio = kvc::CompressRatio(layer.kind);
    const int width = kvc::CompressorWidthFactor(layer.kind);
    const int csa_width = kvc::CompressorWidthFactor(kvc::LayerKind::kCsa);
    const int csa_ratio = kvc::CompressRatio(kvc::LayerKind::kCsa);
    bool given[2][2] = {};  // [compressor, indexer][ape, norm_weight]
    for (const auto& item : py::reinterpret_borrow<py::dict>(entry)) {
      const std::string key = py::str(item.first);
      const std::string name = absl::StrCat("params[", i, "][\"", key, "\"]");
      if (key != "compressor_ape" && key != "compressor_norm_weight" && key != "indexer_ape" && key != "indexer_norm_weight") {
        throw py::value_error(absl::StrCat(name, ": unknown key (compressor_ape, compressor_norm_weight, indexer_ape, "
                                           "indexer_norm_weight)"));
      }
      const bool indexer = absl::StartsWith(key, "indexer_");
      const bool ape = absl::EndsWith(key, "_ape");
      if (layer.kind == kvc::LayerKind::kWindow || (indexer && layer.kind != kvc::LayerKind::kCsa)) {
        throw py::value_error(absl::StrCat(name, ": layer ", i, " is a ", kvc::LayerKindName(layer.kind),
                                           " layer, which has no ", indexer ? "indexer" : "compressor"));
      }
      const int64_t dim = indexer ? spec.index_dim : spec.head_dim;
      const std::vector<int64_t> shape =
          ape ? std::vector<int64_t>{indexer ? csa_ratio : ratio, (indexer ? csa_width : width) * dim} : std::vector<int64_t>{dim};
      kvc::CompressorParams& target = indexer ? layer.indexer : layer.compressor;
      sources.push_back({CheckedArray(item.second, name.c_str(), {Elem::kFloat32, shape}),
                         ape ? &target.ape : &target.norm_weight});
      given[indexer][ape ? 0 : 1] = true;
    }
    for (const int indexer : {0, 1}) {
      // kvc's Validate looks at ape only when deciding that a layer has parameters.
      if (given[indexer][0] != given[indexer][1]) {
        const char* what = indexer ? "indexer" : "compressor";
        throw py::value_error(absl::StrCat("params[", i, "]: ", what, "_ape and ", what, "_norm_weight go together"));
      }
    }
  }
  // Storage is sized once, so the spans stay valid.
  size_t total = 0;
  for (const Source& s : sources) total += static_cast<size_t>(s.array.size());
  storage->assign(total, 0.0f);
  size_t at = 0;
  for (const Source& s : sources) {
    const size_t n = static_cast<size_t>(s.array.size());
    std::copy_n(static_cast<const float*>(s.array.data()), n, storage->begin() + static_cast<std::ptrdiff_t>(at));
    *s.target = absl::MakeConstSpan(storage->data() + at, n);
    at += n;
  }
}

// --- engine arrays ----------------------------------------------------------

// engine_arrays: {(layer, stream): a writable C-contiguous uint8 array, or
// in page-manager mode (address, bytes) ints (device memory: never
// dereferenced)}.
std::vector<kvc::EngineArray> EngineArrays(py::handle arrays, bool page_manager, PyCache* c) {
  std::vector<kvc::EngineArray> out;
  if (arrays.is_none()) return out;
  if (!py::isinstance<py::dict>(arrays)) {
    throw py::value_error(absl::StrCat("engine_arrays: expected a dict {(layer, stream): numpy.uint8 array}; got a ",
                                       Py_TYPE(arrays.ptr())->tp_name));
  }
  for (const auto& item : py::reinterpret_borrow<py::dict>(arrays)) {
    const std::string where = absl::StrCat("engine_arrays[", std::string(py::repr(item.first)), "]");
    int32_t layer = 0, stream = 0;
    try {
      const auto key = item.first.cast<std::pair<int32_t, int32_t>>();
      layer = key.first;
      stream = key.second;
    } catch (const py::cast_error&) {
      throw py::value_error(where + ": keys are (layer, stream) pairs of ints");
    }
    kvc::EngineArray e;
    e.layer = layer;
    e.stream = static_cast<kvc::Stream>(stream);
    if (py::isinstance<py::tuple>(item.second)) {
      if (!page_manager) {
        throw py::value_error(where + ": (address, bytes) is for page-manager mode, where kvc never touches the "
                                      "memory; here kvc writes it: give a writable numpy.uint8 array");
      }
      std::pair<uintptr_t, int64_t> address;
      try {
        address = item.second.cast<std::pair<uintptr_t, int64_t>>();
      } catch (const py::cast_error&) {
        throw py::value_error(where + ": expected (address, bytes) as two non-negative ints");
      }
      if (address.second < 0) throw py::value_error(where + ": bytes is negative");
      e.bytes = absl::MakeSpan(reinterpret_cast<uint8_t*>(address.first), static_cast<size_t>(address.second));
      c->address_arrays.emplace_back(layer, stream);
    } else {
      const py::array a = CheckedArray(item.second, where.c_str(), {Elem::kUint8, {-1, -1}}, /*writable=*/true);
      e.bytes = absl::MakeSpan(static_cast<uint8_t*>(const_cast<void*>(a.data())), static_cast<size_t>(a.nbytes()));
      c->engine_buffers.push_back(a);
    }
    out.push_back(e);
  }
  return out;
}

std::unique_ptr<PyCache> MakeCache(absl::StatusOr<kvc::ModelSpec> spec_or, const OptionArgs& args, py::handle params,
                                   py::handle engine_arrays) {
  kvc::ModelSpec spec = Value(std::move(spec_or));
  auto c = std::make_unique<PyCache>();
  ApplyParams(params, spec, &c->params);
  kvc::CacheOptions options = ToOptions(args);
  options.engine_arrays = EngineArrays(engine_arrays, options.page_manager, c.get());
  absl::StatusOr<std::unique_ptr<kvc::Cache>> cache;
  absl::StatusOr<std::vector<kvc::StreamGeometry>> geometry;
  {
    py::gil_scoped_release release;
    cache = kvc::Cache::Create(spec, options);
    if (cache.ok()) geometry = kvc::Cache::PageGeometry(spec, options);
  }
  c->cache = Value(std::move(cache));
  c->geometry = Value(std::move(geometry));
  return c;
}

// "v4-flash" / "v4-pro", or (a path-like, or a str ending in .json) a config.json.
absl::StatusOr<kvc::ModelSpec> SpecOf(py::handle model, bool include_mtp) {
  if (py::isinstance<py::str>(model)) {
    const std::string name = model.cast<std::string>();
    if (!absl::EndsWith(name, ".json")) return kvc::ModelSpec::Preset(name);
  }
  const std::string path = PathString(model);
  py::gil_scoped_release release;
  return kvc::ModelSpec::FromHuggingFaceConfigFile(path, include_mtp);
}

// --- helpers ----------------------------------------------------------------

kvc::Stream ToStream(int32_t stream) { return static_cast<kvc::Stream>(stream); }  // kvc checks the range

const kvc::StreamGeometry& GeometryOf(const std::vector<kvc::StreamGeometry>& geometry, int32_t stream) {
  if (stream < 0 || stream >= static_cast<int32_t>(geometry.size())) {
    RaiseInvalid(absl::StrCat("stream ", stream, " is not a Stream (0..", kvc::kNumStreams - 1, ")"));
  }
  return geometry[static_cast<size_t>(stream)];
}

py::dict GeometryDict(const kvc::StreamGeometry& g) {
  py::dict d;
  d["stream"] = static_cast<int>(g.stream);
  d["name"] = kvc::StreamName(g.stream);
  d["page_bytes"] = g.page_bytes;
  d["rows_per_page"] = g.rows_per_page;
  d["row_data_bytes"] = g.row_data_bytes;
  d["row_scale_bytes"] = g.row_scale_bytes;
  d["layers"] = g.layers;
  d["ring_slots"] = g.ring_slots;
  return d;
}

// Runs `f` (returning absl::Status) without the GIL and raises on failure.
template <typename F>
void Run(F&& f) {
  absl::Status status;
  {
    py::gil_scoped_release release;
    status = f();
  }
  Check(status);
}

// The same for a StatusOr-returning `f`.
template <typename F>
auto Get(F&& f) -> typename decltype(f())::value_type {
  decltype(f()) result = absl::UnknownError("not run");
  {
    py::gil_scoped_release release;
    result = f();
  }
  return Value(std::move(result));
}

// Expected width of a layer's projections, or -1 (any: kvc decides) for a
// layer out of range or without that compressor.
int64_t ProjectionWidth(const kvc::ModelSpec& spec, int layer, bool indexer) {
  if (layer < 0 || layer >= static_cast<int>(spec.layers.size())) return -1;
  const kvc::LayerKind kind = spec.layers[static_cast<size_t>(layer)].kind;
  if (indexer) return kind == kvc::LayerKind::kCsa ? 2 * int64_t{spec.index_dim} : -1;
  const int factor = kvc::CompressorWidthFactor(kind);
  return factor > 0 ? factor * int64_t{spec.head_dim} : -1;
}

// --- Cache methods ------------------------------------------------------------

void Append(PyCache& c, kvc::SequenceId seq, int layer, int64_t position, py::handle rows, py::handle compressor_kv,
            py::handle compressor_score, py::handle indexer_kv, py::handle indexer_score) {
  const py::array r = CheckedBf16Rows(rows, "rows", kvc::kHeadDim);
  const int64_t n = r.shape(0);
  const kvc::ModelSpec& spec = c.get().spec();
  struct Projection {
    py::handle obj;
    const char* name;
    bool indexer;
    absl::Span<const float> values;  // empty when not given
  };
  Projection projections[] = {{compressor_kv, "compressor_kv", false, {}},
                              {compressor_score, "compressor_score", false, {}},
                              {indexer_kv, "indexer_kv", true, {}},
                              {indexer_score, "indexer_score", true, {}}};
  for (Projection& p : projections) {
    if (p.obj.is_none()) continue;
    // The caller's arguments keep the array alive for the call.
    const py::array a = CheckedArray(p.obj, p.name, {Elem::kFloat32, {n, ProjectionWidth(spec, layer, p.indexer)}});
    p.values = absl::MakeConstSpan(static_cast<const float*>(a.data()), static_cast<size_t>(a.size()));
  }
  kvc::LayerTokens tokens;
  tokens.compressor_kv = projections[0].values;
  tokens.compressor_score = projections[1].values;
  tokens.indexer_kv = projections[2].values;
  tokens.indexer_score = projections[3].values;
  const Bf16Source source = SourceOf(r);
  Run([&] {
    std::vector<kvc::Bf16> storage;
    tokens.window_rows = source.Values(&storage);
    return c.get().Append(seq, layer, position, tokens);
  });
}

void AppendRows(PyCache& c, kvc::SequenceId seq, int layer, int32_t stream, int64_t first, py::handle rows) {
  int64_t width = -1;  // the window stream (refused by kvc) or a number out of range
  if (stream == KVC_STREAM_CSA_ROWS || stream == KVC_STREAM_HCA_ROWS) width = kvc::FormatInfo(kvc::RowFormat::kKvFp8).row_bytes;
  if (stream == KVC_STREAM_CSA_KEYS) width = kvc::FormatInfo(kvc::RowFormat::kIndexFp4).row_bytes;
  const py::array a = CheckedArray(rows, "rows", {Elem::kUint8, {-1, width}});
  const auto bytes = absl::MakeConstSpan(static_cast<const uint8_t*>(a.data()), static_cast<size_t>(a.nbytes()));
  Run([&] { return c.get().AppendRows(seq, layer, ToStream(stream), first, bytes); });
}

void AppendBf16History(PyCache& c, kvc::SequenceId seq, int layer, int64_t first, py::handle rows, bool keys) {
  const py::array r = CheckedBf16Rows(rows, keys ? "keys" : "rows", keys ? kvc::kIndexDim : kvc::kHeadDim);
  const Bf16Source source = SourceOf(r);
  Run([&] {
    std::vector<kvc::Bf16> storage;
    const absl::Span<const kvc::Bf16> values = source.Values(&storage);
    return keys ? c.get().AppendIndexKeys(seq, layer, first, values) : c.get().AppendCompressedRows(seq, layer, first, values);
  });
}

int64_t Length(PyCache& c, kvc::SequenceId seq, std::optional<int> layer) {
  if (layer.has_value()) return Get([&] { return c.get().Length(seq, *layer); });
  return Get([&]() -> absl::StatusOr<int64_t> {
    int64_t length = 0;
    for (int l = 0; l < static_cast<int>(c.get().spec().layers.size()); ++l) {
      absl::StatusOr<int64_t> n = c.get().Length(seq, l);
      if (!n.ok()) return n.status();
      if (l == 0) length = *n;
      if (*n != length) {
        return absl::FailedPreconditionError(absl::StrCat("sequence ", seq, ": its layers hold different lengths (layer 0: ",
                                                          length, ", layer ", l, ": ", *n,
                                                          "): mid-step; pass layer= for one layer's"));
      }
    }
    return length;
  });
}

py::array ReadWindow(PyCache& c, kvc::SequenceId seq, int layer) {
  const int window = c.get().spec().window;
  py::array_t<uint16_t> out({static_cast<py::ssize_t>(window), static_cast<py::ssize_t>(kvc::kHeadDim)});
  const auto values = absl::MakeSpan(reinterpret_cast<kvc::Bf16*>(out.mutable_data()), static_cast<size_t>(out.size()));
  Run([&] { return c.get().ReadWindow(seq, layer, values); });
  return std::move(out);
}

// Contiguous copies of the rows a layer stores in a stream (window: every
// ring slot, in slot order).
py::array ReadRows(PyCache& c, kvc::SequenceId seq, int layer, int32_t stream) {
  const kvc::Stream s = ToStream(stream);
  if (stream >= static_cast<int32_t>(kvc::Stream::kCsaState) && stream < kvc::kNumStreams) {
    RaiseInvalid(absl::StrCat("read_rows: stream ", stream, " (", kvc::StreamName(s),
                              ") holds compressor state, not rows: read it through layer_pages"));
  }
  std::vector<uint8_t> bytes;
  int64_t rows = 0, row_bytes = 0;
  Run([&]() -> absl::Status {
    absl::StatusOr<int64_t> stored = c.get().StreamRows(seq, layer, s);  // checks stream and layer
    if (!stored.ok()) return stored.status();
    const kvc::RowFormat format = s == kvc::Stream::kCsaKeys ? kvc::RowFormat::kIndexFp4 : kvc::RowFormat::kKvFp8;
    row_bytes = kvc::FormatInfo(format).row_bytes;
    std::vector<kvc::ConstPackedRows> pages;
    int32_t per_page = 0;
    if (s == kvc::Stream::kWindow) {
      absl::StatusOr<kvc::WindowRingView> ring = c.get().Window(seq, layer);
      if (!ring.ok()) return ring.status();
      pages = std::move(ring->pages);
      per_page = ring->rows_per_page;
      rows = ring->ring_slots;
    } else {
      absl::StatusOr<kvc::HistoryView> history =
          s == kvc::Stream::kCsaKeys ? c.get().IndexKeys(seq, layer) : c.get().CompressedRows(seq, layer);
      if (!history.ok()) return history.status();
      pages = std::move(history->pages);
      per_page = history->rows_per_page;
      rows = history->rows;
    }
    bytes.resize(static_cast<size_t>(rows * row_bytes));
    const kvc::PackedRows out = kvc::ContiguousRows(format, bytes.data(), rows);
    for (int64_t r = 0; r < rows; ++r) {
      kvc::CopyRows(format, pages[static_cast<size_t>(r / per_page)].Slice(r % per_page, 1), out.Slice(r, 1));
    }
    return absl::OkStatus();
  });
  return ToArray(std::move(bytes), {static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(row_bytes)});
}

// The page array of (layer, stream) as a read-only kvc.PageView (a
// numpy.ndarray subclass) over kvc's memory: no copy; its base is the Python
// Cache object, which therefore lives at least as long as the view.
py::object LayerPages(const py::object& self, int layer, int32_t stream) {
  PyCache& c = self.cast<PyCache&>();
  const kvc::PageArray a = Value(c.get().LayerPages(layer, ToStream(stream)));
  for (const auto& [l, s] : c.address_arrays) {
    if (l == layer && s == stream) {
      Raise(absl::FailedPreconditionError(absl::StrCat(
          "layer_pages: layer ", layer, " stream ", stream,
          " is engine memory given by address (maybe a device's): no NumPy view; page_array() gives the address")));
    }
  }
  if (a.base == nullptr) {
    Raise(absl::FailedPreconditionError(absl::StrCat("layer_pages: layer ", layer, " stream ", stream,
                                                     " has no memory (page-manager mode without engine arrays)")));
  }
  py::array array(py::dtype::of<uint8_t>(), {static_cast<py::ssize_t>(a.num_pages), static_cast<py::ssize_t>(a.page_bytes)},
                  {static_cast<py::ssize_t>(a.page_bytes), py::ssize_t{1}}, a.base, self);
  py::object view = array.attr("view")(py::module_::import("kvc").attr("PageView"));
  view.attr("setflags")(py::arg("write") = false);
  return view;
}

py::dict PageArrayDict(PyCache& c, int layer, int32_t stream) {
  const kvc::PageArray a = Value(c.get().LayerPages(layer, ToStream(stream)));
  py::dict d;
  d["base"] = reinterpret_cast<uintptr_t>(a.base);
  d["page_bytes"] = a.page_bytes;
  d["num_pages"] = a.num_pages;
  d["rows_per_page"] = a.rows_per_page;
  d["row_data_bytes"] = a.row_data_bytes;
  d["row_scale_bytes"] = a.row_scale_bytes;
  return d;
}

PyAttentionSet Select(PyCache& c, kvc::SequenceId seq, int layer, const PyIndexQuery* query, bool gather) {
  kvc::AttentionSet set;
  std::vector<float> rows;
  Run([&]() -> absl::Status {
    absl::StatusOr<kvc::AttentionSet> s = c.get().SelectAttentionSet(seq, layer, query ? &query->query : nullptr);
    if (!s.ok()) return s.status();
    set = *std::move(s);
    if (!gather) return absl::OkStatus();
    rows.resize(set.rows.size() * kvc::kHeadDim);
    return kvc::GatherAttentionRows(set, absl::MakeSpan(rows));
  });
  PyAttentionSet out;
  out.position = set.position;
  const py::ssize_t n = static_cast<py::ssize_t>(set.rows.size());
  out.indices = ToArray(std::move(set.indices));
  out.window_indices = ToArray(std::move(set.window_indices));
  out.compressed_indices = ToArray(std::move(set.compressed_indices));
  out.rows = gather ? py::object(ToArray(std::move(rows), {n, static_cast<py::ssize_t>(kvc::kHeadDim)})) : py::none();
  return out;
}

PyPositionSets SelectPositions(PyCache& c, kvc::SequenceId seq, int layer, int64_t first, int64_t count,
                               const std::optional<std::vector<const PyIndexQuery*>>& queries) {
  std::vector<const kvc::IndexQuery*> q;
  if (queries) {
    for (const PyIndexQuery* query : *queries) q.push_back(query == nullptr ? nullptr : &query->query);
  }
  kvc::PositionSets sets = Get([&] { return c.get().SelectAttentionSets(seq, layer, first, count, q); });
  PyPositionSets out;
  out.first = sets.first;
  out.count = sets.count();
  out.window_offsets = ToArray(std::move(sets.window_offsets));
  out.window_positions = ToArray(std::move(sets.window_positions));
  out.window_indices = ToArray(std::move(sets.window_indices));
  out.compressed_offsets = ToArray(std::move(sets.compressed_offsets));
  out.entries = ToArray(std::move(sets.entries));
  out.compressed_indices = ToArray(std::move(sets.compressed_indices));
  return out;
}

py::array IndexScores(PyCache& c, kvc::SequenceId seq, int layer, const PyIndexQuery& query) {
  const kvc::ModelSpec& spec = c.get().spec();
  if (layer >= 0 && layer < static_cast<int>(spec.layers.size()) &&
      spec.layers[static_cast<size_t>(layer)].kind != kvc::LayerKind::kCsa) {
    RaiseInvalid(absl::StrCat("index_scores: layer ", layer, " is a ",
                              kvc::LayerKindName(spec.layers[static_cast<size_t>(layer)].kind), " layer, not CSA"));
  }
  std::vector<float> scores;
  Run([&]() -> absl::Status { return c.get().SelectAttentionSet(seq, layer, &query.query, &scores).status(); });
  return ToArray(std::move(scores));
}

PyIndexQuery PrepareIndexQuery(PyCache& c, int64_t position, py::handle q_raw, py::handle weights) {
  const py::array q = CheckedArray(q_raw, "q_raw", {Elem::kUint16, {-1, kvc::kIndexDim}});
  const py::array w = CheckedArray(weights, "weights", {Elem::kFloat32, {q.shape(0)}});
  const auto qs = absl::MakeConstSpan(static_cast<const kvc::Bf16*>(q.data()), static_cast<size_t>(q.size()));
  const auto ws = absl::MakeConstSpan(static_cast<const float*>(w.data()), static_cast<size_t>(w.size()));
  PyIndexQuery out;
  Run([&] { return c.get().PrepareIndexQuery(position, qs, ws, &out.query); });
  return out;
}

py::dict PrefixUsageDict(const kvc::PrefixUsage& u) {
  py::dict d;
  d["limit_bytes"] = u.limit_bytes;
  d["cached_bytes"] = u.cached_bytes;
  d["history_bytes"] = u.history_bytes;
  d["checkpoint_bytes"] = u.checkpoint_bytes;
  d["shared_bytes"] = u.shared_bytes;
  d["prefixes"] = u.prefixes;
  d["cached_tokens"] = u.cached_tokens;
  d["hits"] = u.hits;
  d["misses"] = u.misses;
  d["tokens_reused"] = u.tokens_reused;
  d["published"] = u.published;
  d["evictions"] = u.evictions;
  return d;
}

py::dict UsageDict(const kvc::CacheUsage& u) {
  py::dict components;
  for (int i = 0; i < kvc::kNumComponents; ++i) {
    py::dict d;
    d["used_bytes"] = u.components[i].used_bytes;
    d["reserved_bytes"] = u.components[i].reserved_bytes;
    d["pages"] = u.components[i].pages;
    components[kvc::ComponentName(static_cast<kvc::Component>(i))] = d;
  }
  py::dict d;
  d["used_bytes"] = u.used_bytes();
  d["reserved_bytes"] = u.reserved_bytes();
  d["history_limit_bytes"] = u.history_limit_bytes;
  d["state_limit_bytes"] = u.state_limit_bytes;
  d["sequences"] = u.sequences;
  d["open_steps"] = u.open_steps;
  d["deferred_pages"] = u.deferred_pages;
  d["epoch"] = u.epoch;
  d["completed_epoch"] = u.completed_epoch;
  d["prefix"] = PrefixUsageDict(u.prefix);
  d["components"] = components;
  return d;
}

py::dict SequenceUsageDict(const kvc::SequenceUsage& u) {
  py::dict components;
  for (int i = 0; i < kvc::kNumComponents; ++i) components[kvc::ComponentName(static_cast<kvc::Component>(i))] = u.bytes[i];
  py::dict d;
  d["total_bytes"] = u.total_bytes();
  d["shared_bytes"] = u.shared_bytes;
  d["components"] = components;
  return d;
}

py::dict SaveSnapshot(PyCache& c, py::handle path, const std::optional<std::vector<kvc::SequenceId>>& seqs,
                      bool incremental) {
  const std::string p = PathString(path);
  kvc::SaveOptions options;
  options.incremental = incremental;
  const kvc::SaveStats s = Get([&] {
    return seqs ? kvc::SaveSnapshot(c.get(), *seqs, p, options) : kvc::SaveCacheSnapshot(c.get(), p, options);
  });
  py::dict d;
  d["bytes_written"] = s.bytes_written;
  d["rows_written"] = s.rows_written;
  d["rows_reused"] = s.rows_reused;
  d["file_bytes"] = s.file_bytes;
  d["rewrote"] = s.rewrote;
  d["durable"] = s.durable;
  d["directory_sync"] = s.directory_sync.ok() ? py::object(py::none()) : py::object(py::str(std::string(s.directory_sync.message())));
  return d;
}

PyStepPlan PlanStep(PyCache& c, const std::vector<std::pair<kvc::SequenceId, int64_t>>& requests) {
  std::vector<kvc::StepRequest> batch;
  for (const auto& [seq, n] : requests) batch.push_back({seq, n});
  kvc::StepPlan plan = Get([&] { return c.get().PlanStep(batch); });
  PyStepPlan out;
  out.epoch = plan.epoch;
  out.seqs = ToArray(std::move(plan.seqs));
  out.first_position = ToArray(std::move(plan.first_position));
  out.new_tokens = ToArray(std::move(plan.new_tokens));
  out.copies = CopiesArray(plan.copies);
  out.abort_copies = CopiesArray(plan.abort_copies);
  out.slots = py::tuple(kvc::kNumStreams);
  for (int s = 0; s < kvc::kNumStreams; ++s) {
    out.slots[static_cast<size_t>(s)] =
        py::cast(PyStepSlots{ToArray(std::move(plan.slots[s].indptr)), ToArray(std::move(plan.slots[s].slots))});
  }
  return out;
}

py::object Fork(PyCache& c, kvc::SequenceId seq, bool return_copies) {
  if (!return_copies) return py::int_(Get([&] { return c.get().Fork(seq); }));
  std::vector<kvc::PageCopy> copies;
  const kvc::SequenceId child = Get([&] { return c.get().Fork(seq, &copies); });
  return py::make_tuple(child, CopiesArray(copies));
}

PyPrefixMatch ToPy(const kvc::Cache::PrefixMatch& m) { return {m.seq, m.tokens, m.shared_tokens}; }

py::object PublishPrefix(PyCache& c, kvc::SequenceId seq, const std::vector<uint64_t>& hashes, bool return_copies) {
  if (!return_copies) {
    Run([&] { return c.get().PublishPrefix(seq, hashes); });
    return py::none();
  }
  std::vector<kvc::PageCopy> copies;
  Run([&] { return c.get().PublishPrefix(seq, hashes, &copies); });
  return CopiesArray(copies);
}

py::object CreateFromPrefix(PyCache& c, const std::vector<uint64_t>& hashes, bool return_copies) {
  if (!return_copies) return py::cast(ToPy(Get([&] { return c.get().CreateSequenceFromPrefix(hashes); })));
  std::vector<kvc::PageCopy> copies;
  const kvc::Cache::PrefixMatch match = Get([&] { return c.get().CreateSequenceFromPrefix(hashes, &copies); });
  return py::make_tuple(ToPy(match), CopiesArray(copies));
}

std::string Repr(PyCache& c) {
  const kvc::ModelSpec& spec = c.get().spec();
  return absl::StrCat("<kvc.Cache ", spec.name, ": ", spec.layers.size(), " layers, ", c.get().Usage().sequences,
                      " sequences>");
}

// The keyword options of Cache(), Cache.from_config() and page_geometry().
#define KVC_PY_OPTION_ARGS                                                                                   \
  py::arg("history_bytes") = kvc::CacheOptions().history_bytes,                                              \
      py::arg("state_bytes") = kvc::CacheOptions().state_bytes,                                              \
      py::arg("rollback_depth") = kvc::CacheOptions().rollback_depth,                                        \
      py::arg("draft_slots") = kvc::CacheOptions().draft_slots,                                              \
      py::arg("rows_per_page") = kvc::CacheOptions().rows_per_page,                                          \
      py::arg("keys_per_page") = kvc::CacheOptions().keys_per_page,                                          \
      py::arg("page_manager") = kvc::CacheOptions().page_manager,                                            \
      py::arg("prefix_bytes") = kvc::CacheOptions().prefix_bytes,                                            \
      py::arg("prefix_block_tokens") = kvc::CacheOptions().prefix_block_tokens

}  // namespace

void BindCache(py::module_& m) {
  py::class_<PyIndexQuery>(m, "IndexQuery",
                           "A prepared lightning-indexer query (Cache.prepare_index_query): one token's, for every CSA layer.")
      .def_property_readonly("heads", [](const PyIndexQuery& q) { return q.query.heads(); });

  py::class_<PyAttentionSet>(m, "AttentionSet",
                             "What a layer's last position attends to (Cache.select): int32 index arrays, and the "
                             "dequantized rows when gathered.")
      .def_readonly("position", &PyAttentionSet::position, "the query's position: the layer's last token")
      .def_readonly("indices", &PyAttentionSet::indices,
                    "official index space: ring slots [0, window), then window + j for compressed entry j")
      .def_readonly("window_indices", &PyAttentionSet::window_indices,
                    "rows of the STREAM_WINDOW page array (page_id x rows_per_page + offset), oldest position first")
      .def_readonly("compressed_indices", &PyAttentionSet::compressed_indices,
                    "rows of the layer's STREAM_CSA_ROWS / STREAM_HCA_ROWS page array, ascending entries")
      .def_readonly("rows", &PyAttentionSet::rows, "float32 (n, 512) dequantized rows in `indices` order, or None");

  py::class_<PyPositionSets>(m, "PositionSets",
                             "What the queries at positions first .. first + count - 1 of a layer attend to "
                             "(Cache.select_positions): per query i, window rows "
                             "window_*[window_offsets[i]:window_offsets[i + 1]] and compressed rows "
                             "entries / compressed_indices[compressed_offsets[i]:compressed_offsets[i + 1]].")
      .def_readonly("first", &PyPositionSets::first, "the position of query 0")
      .def_readonly("count", &PyPositionSets::count)
      .def_readonly("window_offsets", &PyPositionSets::window_offsets, "int64 (count + 1,)")
      .def_readonly("window_positions", &PyPositionSets::window_positions, "int64: each query's window positions, oldest first")
      .def_readonly("window_indices", &PyPositionSets::window_indices,
                    "int32 rows of the STREAM_WINDOW page array, -1 for a position the ring no longer holds")
      .def_readonly("compressed_offsets", &PyPositionSets::compressed_offsets, "int64 (count + 1,)")
      .def_readonly("entries", &PyPositionSets::entries, "int64: each query's compressed entries, ascending")
      .def_readonly("compressed_indices", &PyPositionSets::compressed_indices,
                    "int32 rows of the layer's STREAM_CSA_ROWS / STREAM_HCA_ROWS page array");

  py::class_<PyPrefixMatch>(m, "PrefixMatch",
                            "What a prefix lookup found (Cache.create_sequence_from_prefix, Cache.lookup_prefix).")
      .def_readonly("seq", &PyPrefixMatch::seq, "the new sequence (0 from lookup_prefix)")
      .def_readonly("tokens", &PyPrefixMatch::tokens, "the restored prefix's length, a multiple of prefix_block_tokens (0: none)")
      .def_readonly("shared_tokens", &PyPrefixMatch::shared_tokens,
                    "tokens of the longest run of leading blocks whose history the cache holds (>= tokens)")
      .def("__repr__", [](const PyPrefixMatch& match) {
        return absl::StrCat("PrefixMatch(seq=", match.seq, ", tokens=", match.tokens, ", shared_tokens=",
                            match.shared_tokens, ")");
      });

  py::class_<PyDenseTables>(m, "DenseBlockTables", "Block tables of a batch, dense (Cache.batch_block_tables).")
      .def_readonly("max_blocks", &PyDenseTables::max_blocks)
      .def_readonly("ids", &PyDenseTables::ids, "int32 (batch, max_blocks): page k of sequence b, -1 past its pages")
      .def_readonly("blocks", &PyDenseTables::blocks, "int32 (batch,): pages per sequence")
      .def_readonly("rows", &PyDenseTables::rows, "int64 (batch,): rows per sequence (its longest layer's)");

  py::class_<PyCsrTables>(m, "CsrBlockTables", "Block tables of a batch as FlashInfer's paged layout (Cache.batch_block_tables_csr).")
      .def_readonly("indptr", &PyCsrTables::indptr, "int32 (batch + 1,)")
      .def_readonly("indices", &PyCsrTables::indices, "int32: the pages of sequence b are indices[indptr[b]:indptr[b + 1]]")
      .def_readonly("last_page_len", &PyCsrTables::last_page_len, "int32 (batch,): rows in each sequence's last page");

  py::class_<PyStepSlots>(m, "StepSlots",
                          "Rows a step writes in one stream (vLLM's slot_mapping): request b's are "
                          "slots[indptr[b]:indptr[b + 1]], each page_id x rows_per_page + offset in every layer's array; "
                          "-1: nothing to write.")
      .def_readonly("indptr", &PyStepSlots::indptr, "int32 (batch + 1,), empty when the model lacks the stream")
      .def_readonly("slots", &PyStepSlots::slots, "int64");

  py::class_<PyStepPlan>(m, "StepPlan", "A planned batch step (Cache.plan_step).")
      .def_readonly("epoch", &PyStepPlan::epoch, "the step's id, for commit_step / abort_step / complete_steps")
      .def_readonly("seqs", &PyStepPlan::seqs, "int64 (batch,): the requests' sequences")
      .def_readonly("first_position", &PyStepPlan::first_position, "int64 (batch,): each sequence's length when planned")
      .def_readonly("new_tokens", &PyStepPlan::new_tokens, "int64 (batch,)")
      .def_readonly("slots", &PyStepPlan::slots, "a StepSlots per stream (indexed by kvc.STREAM_*)")
      .def_readonly("copies", &PyStepPlan::copies,
                    "int32 (n, 3) page copies (stream, src, dst) to make, in every layer's array of the stream, "
                    "before writing the step (page-manager mode; empty when kvc writes)")
      .def_readonly("abort_copies", &PyStepPlan::abort_copies,
                    "int32 (n, 3): the copies that undo the step's writes, before abort_step (page-manager mode)")
      .def(
          "request_slots",
          [](const PyStepPlan& plan, int32_t stream, int64_t b) -> py::object {
            if (stream < 0 || stream >= kvc::kNumStreams) {
              RaiseInvalid(absl::StrCat("stream ", stream, " is not a Stream (0..", kvc::kNumStreams - 1, ")"));
            }
            const PyStepSlots& st = plan.slots[static_cast<size_t>(stream)].cast<const PyStepSlots&>();
            const py::array_t<int32_t> indptr = st.indptr;
            if (indptr.size() == 0) return st.slots;  // the model lacks the stream: empty
            if (b < 0 || b + 1 >= indptr.size()) {
              RaiseInvalid(absl::StrCat("request ", b, " is out of range (the step has ", indptr.size() - 1, ")"));
            }
            return st.slots[py::slice(indptr.at(b), indptr.at(b + 1), 1)];
          },
          py::arg("stream"), py::arg("b"), "slots[stream].slots of request b (a view)");

  py::class_<PyCache>(m, "Cache",
                      "kvc::Cache: sequences of DeepSeek-V4 KV rows in the engines' page layout (docs/python.md).")
      .def(py::init([](const std::string& model, int64_t history_bytes, int64_t state_bytes, int32_t rollback_depth,
                       int32_t draft_slots, int32_t rows_per_page, int32_t keys_per_page, bool page_manager,
                       int64_t prefix_bytes, int32_t prefix_block_tokens, py::handle params, py::handle engine_arrays) {
             return MakeCache(kvc::ModelSpec::Preset(model), {history_bytes, state_bytes, rollback_depth, draft_slots, rows_per_page, keys_per_page, page_manager, prefix_bytes,
                               prefix_block_tokens},
                              params, engine_arrays);
           }),
           py::arg("model"), py::kw_only(), KVC_PY_OPTION_ARGS, py::arg("params") = py::none(), py::arg("engine_arrays") = py::none(),
           "A cache for a preset model (\"v4-flash\", \"v4-pro\"). Options as kvc::CacheOptions; params: one entry per "
           "layer (None or a dict of float32 compressor_ape, compressor_norm_weight, indexer_ape, indexer_norm_weight), "
           "copied; engine_arrays: {(layer, stream): writable uint8 array (num_pages, page_bytes)} of engine memory for "
           "the page arrays, kept alive by the cache, or in page-manager mode (address, bytes) (device memory: never "
           "dereferenced). page_manager=True: kvc keeps ids, tables, forks and rollback and never touches a page byte "
           "(needs draft_slots >= rollback_depth).")
      .def_static(
          "from_config",
          [](py::handle path, bool include_mtp, int64_t history_bytes, int64_t state_bytes, int32_t rollback_depth,
             int32_t draft_slots, int32_t rows_per_page, int32_t keys_per_page, bool page_manager, int64_t prefix_bytes,
             int32_t prefix_block_tokens, py::handle params, py::handle engine_arrays) {
            absl::StatusOr<kvc::ModelSpec> spec;
            const std::string p = PathString(path);
            {
              py::gil_scoped_release release;
              spec = kvc::ModelSpec::FromHuggingFaceConfigFile(p, include_mtp);
            }
            return MakeCache(std::move(spec), {history_bytes, state_bytes, rollback_depth, draft_slots, rows_per_page, keys_per_page, page_manager, prefix_bytes,
                               prefix_block_tokens},
                             params, engine_arrays);
          },
          py::arg("path"), py::kw_only(), py::arg("include_mtp") = false, KVC_PY_OPTION_ARGS,
          py::arg("params") = py::none(), py::arg("engine_arrays") = py::none(),
          "A cache for the model of a Hugging Face config.json (DeepSeek-V4 keys); options as Cache().")
      .def("__repr__", &Repr)
      .def_property_readonly("num_layers", &PyCache::num_layers)
      .def_property_readonly("model_name", [](PyCache& c) { return c.get().spec().name; })
      .def_property_readonly("layer_kinds",
                             [](PyCache& c) {
                               std::vector<int> kinds;
                               for (const kvc::LayerSpec& l : c.get().spec().layers) kinds.push_back(static_cast<int>(l.kind));
                               return kinds;
                             },
                             "kvc.LAYER_WINDOW / LAYER_CSA / LAYER_HCA of each layer")
      .def("compress_ratio",
           [](PyCache& c, int layer) {
             if (layer < 0 || layer >= c.num_layers()) RaiseInvalid(absl::StrCat("layer ", layer, " is out of range (0..", c.num_layers() - 1, ")"));
             return kvc::CompressRatio(c.get().spec().layers[static_cast<size_t>(layer)].kind);
           },
           py::arg("layer"), "tokens per compressed entry of the layer: 0 (window-only), 4 (CSA) or 128 (HCA)")
      .def_property_readonly("window", [](PyCache& c) { return c.get().spec().window; })
      .def_property_readonly("max_context", [](PyCache& c) { return c.get().spec().max_context; })
      .def_property_readonly("index_topk", [](PyCache& c) { return c.get().spec().index_topk; })
      .def_property_readonly("index_heads", [](PyCache& c) { return c.get().spec().index_heads; })
      .def_property_readonly("rollback_depth", [](PyCache& c) { return c.get().options().rollback_depth; })
      .def_property_readonly("draft_slots", [](PyCache& c) { return c.get().options().draft_slots; })
      .def_property_readonly("page_manager", [](PyCache& c) { return c.get().options().page_manager; })
      .def(
          "create_sequence", [](PyCache& c) { return Get([&] { return c.get().CreateSequence(); }); },
          "A new, empty sequence id (allocates its state pages).")
      .def("fork", &Fork, py::arg("seq"), py::kw_only(), py::arg("return_copies") = false,
           "A new sequence equal to seq: history pages shared, state copied. return_copies=True (required in "
           "page-manager mode) returns (id, copies): int32 (n, 3) page copies (stream, src, dst) the engine makes "
           "before it reads or writes the child.")
      .def("plan_step", &PlanStep, py::arg("requests"),
           "Plans a batch step: requests is a sequence of (seq, new_tokens). Reserves every page the step writes, "
           "all or nothing (kvc.Error RESOURCE_EXHAUSTED); returns a kvc.StepPlan. Then append every layer (kvc "
           "writes) or write through plan.slots after plan.copies (page-manager mode), and commit_step or abort_step.")
      .def(
          "commit_step", [](PyCache& c, uint64_t epoch) { Run([&] { return c.get().CommitStep(epoch); }); },
          py::arg("epoch"), "Every layer of every sequence of the step advanced by its new_tokens.")
      .def(
          "abort_step", [](PyCache& c, uint64_t epoch) { Run([&] { return c.get().AbortStep(epoch); }); },
          py::arg("epoch"),
          "Every sequence of the step back to its planned length, every row as it was (page-manager mode: after "
          "the engine made plan.abort_copies, if it wrote).")
      .def(
          "complete_steps", [](PyCache& c, uint64_t epoch) { return Get([&] { return c.get().CompleteSteps(epoch); }); },
          py::arg("epoch"),
          "The device finished every step up to epoch: pages freed meanwhile become reusable (page-manager mode). "
          "Returns how many page ids did.")
      .def(
          "truncate", [](PyCache& c, kvc::SequenceId seq, int64_t length) { Run([&] { return c.get().Truncate(seq, length); }); },
          py::arg("seq"), py::arg("length"), "Rolls seq back to `length` tokens in every layer (>= rollback_floor(seq)).")
      .def(
          "free", [](PyCache& c, kvc::SequenceId seq) { Run([&] { return c.get().Free(seq); }); }, py::arg("seq"),
          "Releases the sequence's pages; its id is never reused.")
      .def("length", &Length, py::arg("seq"), py::arg("layer") = py::none(),
           "Tokens of `layer`; with no layer, the sequence's length (kvc.Error FAILED_PRECONDITION mid-step, when its "
           "layers differ).")
      .def(
          "rollback_floor", [](PyCache& c, kvc::SequenceId seq) { return Get([&] { return c.get().RollbackFloor(seq); }); },
          py::arg("seq"), "The smallest length truncate(seq, ...) accepts.")
      .def("append", &Append, py::arg("seq"), py::arg("layer"), py::arg("position"), py::arg("rows"), py::kw_only(),
           py::arg("compressor_kv") = py::none(), py::arg("compressor_score") = py::none(),
           py::arg("indexer_kv") = py::none(), py::arg("indexer_score") = py::none(),
           "Appends tokens [position, position + n) to `layer`: rows (n, 512) float32 (rounded to bf16, RNE) or uint16 "
           "(bf16 bits); on compressed layers with parameters, the projections as float32 arrays (n, 1024) CSA / (n, 512) "
           "HCA, indexer (n, 256) CSA.")
      .def("append_rows", &AppendRows, py::arg("seq"), py::arg("layer"), py::arg("stream"), py::arg("first"), py::arg("rows"),
           "Ready-made rows for a layer whose compressor runs in the engine: uint8 (n, 584) rows (STREAM_CSA_ROWS, "
           "STREAM_HCA_ROWS) or (n, 68) keys (STREAM_CSA_KEYS), stored byte for byte; first == stream_rows().")
      .def(
          "append_compressed_rows",
          [](PyCache& c, kvc::SequenceId seq, int layer, int64_t first, py::handle rows) {
            AppendBf16History(c, seq, layer, first, rows, false);
          },
          py::arg("seq"), py::arg("layer"), py::arg("first"), py::arg("rows"),
          "Compressed entries (n, 512) float32 or uint16 of a layer without kvc's compressor; kvc quantizes them.")
      .def(
          "append_index_keys",
          [](PyCache& c, kvc::SequenceId seq, int layer, int64_t first, py::handle keys) {
            AppendBf16History(c, seq, layer, first, keys, true);
          },
          py::arg("seq"), py::arg("layer"), py::arg("first"), py::arg("keys"),
          "Index keys (n, 128) float32 or uint16 (after RoPE, before the Hadamard) of such a CSA layer.")
      .def(
          "stream_rows",
          [](PyCache& c, kvc::SequenceId seq, int layer, int32_t stream) {
            return Get([&] { return c.get().StreamRows(seq, layer, ToStream(stream)); });
          },
          py::arg("seq"), py::arg("layer"), py::arg("stream"),
          "Rows the layer stores in the stream: the ring's valid slots (window), else the rows appended.")
      .def("read_window", &ReadWindow, py::arg("seq"), py::arg("layer"),
           "The layer's window ring dequantized: uint16 (window, 512) bf16 bits, by slot; unwritten slots zero.")
      .def("read_rows", &ReadRows, py::arg("seq"), py::arg("layer"), py::arg("stream"),
           "A contiguous copy of the stored rows: uint8 (n, 584) or (n, 68); the window stream gives every ring slot.")
      .def("layer_pages", &LayerPages, py::arg("layer"), py::arg("stream"),
           "The (layer, stream) page array, zero-copy: a read-only kvc.PageView (numpy.uint8, (num_pages, page_bytes)) "
           "over the cache's memory, valid while the view exists (it keeps the cache alive), showing later writes; "
           "exports DLPack.")
      .def("page_array", &PageArrayDict, py::arg("layer"), py::arg("stream"),
           "The page array's address and geometry (base is an int, for kernels that take pointers).")
      .def(
          "rows_per_page", [](PyCache& c, int32_t stream) { return GeometryOf(c.geometry, stream).rows_per_page; },
          py::arg("stream"))
      .def(
          "page_geometry", [](PyCache& c, int32_t stream) { return GeometryDict(GeometryOf(c.geometry, stream)); },
          py::arg("stream"), "page_bytes, rows_per_page, row_data_bytes, row_scale_bytes and the layers having the stream.")
      .def(
          "block_table",
          [](PyCache& c, kvc::SequenceId seq, int32_t stream) {
            return ToArray(Get([&] { return c.get().BlockTable(seq, ToStream(stream)); }));
          },
          py::arg("seq"), py::arg("stream"),
          "int32 page ids of the stream in row order (row r: page ids[r // rows_per_page]), the same in every layer.")
      .def(
          "batch_block_tables",
          [](PyCache& c, const std::vector<kvc::SequenceId>& seqs, int32_t stream) {
            kvc::DenseBlockTables t = Get([&] { return c.get().BatchBlockTables(seqs, ToStream(stream)); });
            PyDenseTables out;
            out.max_blocks = t.max_blocks;
            out.ids = ToArray(std::move(t.ids), {static_cast<py::ssize_t>(seqs.size()), static_cast<py::ssize_t>(t.max_blocks)});
            out.blocks = ToArray(std::move(t.blocks));
            out.rows = ToArray(std::move(t.rows));
            return out;
          },
          py::arg("seqs"), py::arg("stream"))
      .def(
          "batch_block_tables_csr",
          [](PyCache& c, const std::vector<kvc::SequenceId>& seqs, int32_t stream) {
            kvc::CsrBlockTables t = Get([&] { return c.get().BatchBlockTablesCsr(seqs, ToStream(stream)); });
            PyCsrTables out;
            out.indptr = ToArray(std::move(t.indptr));
            out.indices = ToArray(std::move(t.indices));
            out.last_page_len = ToArray(std::move(t.last_page_len));
            return out;
          },
          py::arg("seqs"), py::arg("stream"), "Refuses STREAM_WINDOW (ring slots are not a paged prefix).")
      .def("prepare_index_query", &PrepareIndexQuery, py::arg("position"), py::arg("q_raw"), py::arg("weights"),
           "The index query of the token at `position`: q_raw uint16 (heads, 128) bf16 bits (wq_b's output, before "
           "RoPE; kvc.to_bf16 rounds float32), weights float32 (heads,).")
      .def("select", &Select, py::arg("seq"), py::arg("layer"), py::arg("query") = nullptr, py::kw_only(),
           py::arg("gather") = false,
           "What the query at the layer's last position attends to (the query is required on CSA layers): a "
           "kvc.AttentionSet of int32 index arrays; gather=True also dequantizes the rows.")
      .def("select_positions", &SelectPositions, py::arg("seq"), py::arg("layer"), py::arg("first"), py::arg("count"),
           py::arg("queries") = py::none(),
           "The attention sets of positions [first, first + count) of the layer in one call (a verify step's drafts, a "
           "prefill chunk): a kvc.PositionSets of CSR index arrays. queries: one IndexQuery per position (each prepared "
           "at its position), required on CSA layers. Page-manager mode: window and HCA layers only.")
      .def_property_readonly("prefix_block_tokens", [](PyCache& c) { return c.get().PrefixBlockTokens(); },
                             "B: a prefix of n blocks is tokens [0, n x B)")
      .def("publish_prefix", &PublishPrefix, py::arg("seq"), py::arg("block_hashes"), py::kw_only(),
           py::arg("return_copies") = false,
           "The first len(block_hashes) blocks of seq become reusable under the engine's chain hashes (hash i names "
           "tokens [0, (i + 1) x B)), until evicted. return_copies=True (required in page-manager mode) returns the "
           "checkpoint's page copies, int32 (n, 3), which the engine makes before the sequence's next step writes.")
      .def("create_sequence_from_prefix", &CreateFromPrefix, py::arg("block_hashes"), py::kw_only(),
           py::arg("return_copies") = false,
           "A new sequence holding the longest published prefix of block_hashes (history shared, ring and compressor "
           "state from its checkpoint), or an empty one: a kvc.PrefixMatch. return_copies=True (required in "
           "page-manager mode) returns (match, copies): the page copies the engine makes before it uses the sequence.")
      .def(
          "lookup_prefix",
          [](PyCache& c, const std::vector<uint64_t>& hashes) {
            kvc::Cache::PrefixMatch match;
            {
              py::gil_scoped_release release;
              match = c.get().LookupPrefix(hashes);
            }
            return ToPy(match);
          },
          py::arg("block_hashes"), "What create_sequence_from_prefix would restore now (seq 0); creates and counts nothing.")
      .def("index_scores", &IndexScores, py::arg("seq"), py::arg("layer"), py::arg("query"),
           "float32 index scores of every visible compressed entry of a CSA layer.")
      .def("usage", [](PyCache& c) { return UsageDict(c.get().Usage()); })
      .def(
          "sequence_usage",
          [](PyCache& c, kvc::SequenceId seq) { return SequenceUsageDict(Value(c.get().Usage(seq))); }, py::arg("seq"))
      .def("save_snapshot", &SaveSnapshot, py::arg("path"), py::arg("seqs") = py::none(), py::kw_only(),
           py::arg("incremental") = true,
           "Saves `seqs` (default: every live sequence) to `path`; incremental appends only what is new. Returns the "
           "save's statistics.")
      .def(
          "restore_snapshot",
          [](PyCache& c, py::handle path) {
            const std::string p = PathString(path);
            return Get([&] { return kvc::RestoreSnapshot(c.get(), p); });
          },
          py::arg("path"), "Restores every sequence of the snapshot as new sequences; returns their ids in order.");

  m.def(
      "page_geometry",
      [](py::handle model, bool include_mtp, int64_t history_bytes, int64_t state_bytes, int32_t rollback_depth,
         int32_t draft_slots, int32_t rows_per_page, int32_t keys_per_page, bool page_manager, int64_t prefix_bytes,
         int32_t prefix_block_tokens) {
        const kvc::ModelSpec spec = Value(SpecOf(model, include_mtp));
        const std::vector<kvc::StreamGeometry> geometry = Value(kvc::Cache::PageGeometry(
            spec, ToOptions({history_bytes, state_bytes, rollback_depth, draft_slots, rows_per_page, keys_per_page, page_manager, prefix_bytes,
                               prefix_block_tokens})));
        py::list out;
        for (const kvc::StreamGeometry& g : geometry) out.append(GeometryDict(g));
        return out;
      },
      py::arg("model"), py::kw_only(), py::arg("include_mtp") = false, KVC_PY_OPTION_ARGS,
      "Each stream's page geometry (a list indexed by stream) before any cache exists, to size engine_arrays: "
      "model is a preset name or a config.json path.");
}

}  // namespace kvc_python
