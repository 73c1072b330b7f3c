// The kvc Python module (`kvc._kvc`, re-exported by the package `kvc`):
// errors, argument checks, constants, and the functions that need no cache
// (row codecs, footprints, snapshot inspection). The cache is in cache.cc.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvc/footprint.h"
#include "kvc/kvc.h"
#include "kvc/number_formats.h"
#include "kvc/row_formats.h"
#include "kvc/row_kernels.h"
#include "kvc/snapshot.h"
#include "python/binding.h"

namespace kvc_python {

PyObject* g_error_type = nullptr;

void Raise(const absl::Status& status) {
  py::object type = py::reinterpret_borrow<py::object>(g_error_type);
  // kvc's messages may quote bytes that are not UTF-8 (a path): replace them.
  const absl::string_view text = status.message();
  PyObject* message = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace");
  if (message == nullptr) throw py::error_already_set();
  py::object error = type(py::reinterpret_steal<py::str>(message));
  error.attr("code") = absl::StatusCodeToString(status.code());
  error.attr("errno") = kvc::FileSystemErrno(status);
  PyErr_SetObject(g_error_type, error.ptr());
  throw py::error_already_set();
}

void RaiseInvalid(const std::string& message) { Raise(absl::InvalidArgumentError(message)); }

namespace {

const char* ElemName(Elem elem) {
  switch (elem) {
    case Elem::kFloat32: return "float32";
    case Elem::kUint16: return "uint16";
    case Elem::kUint8: return "uint8";
    case Elem::kInt32: return "int32";
    case Elem::kInt64: return "int64";
  }
  return "?";
}

bool HasElem(py::handle obj, Elem elem) {
  switch (elem) {
    case Elem::kFloat32: return py::isinstance<py::array_t<float>>(obj);
    case Elem::kUint16: return py::isinstance<py::array_t<uint16_t>>(obj);
    case Elem::kUint8: return py::isinstance<py::array_t<uint8_t>>(obj);
    case Elem::kInt32: return py::isinstance<py::array_t<int32_t>>(obj);
    case Elem::kInt64: return py::isinstance<py::array_t<int64_t>>(obj);
  }
  return false;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::vector<std::string> dims;
  for (const int64_t d : shape) dims.push_back(d < 0 ? "n" : std::to_string(d));
  return "(" + absl::StrJoin(dims, ", ") + (dims.size() == 1 ? ",)" : ")");
}

std::string Given(py::handle obj) {
  if (!py::isinstance<py::array>(obj)) return std::string("a ") + Py_TYPE(obj.ptr())->tp_name;
  const py::array a = py::reinterpret_borrow<py::array>(obj);
  std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
  std::string layout;
  if (!(a.flags() & py::array::c_style)) layout += "non-contiguous ";
  if (!(py::detail::array_proxy(a.ptr())->flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) layout += "unaligned ";
  if (!a.writeable()) layout += "read-only ";
  return absl::StrCat("a ", layout, std::string(py::str(a.dtype())), " array of shape ", ShapeText(shape));
}

bool Aligned(const py::array& a) {
  return (py::detail::array_proxy(a.ptr())->flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0;
}

[[noreturn]] void RaiseMalformed(py::handle obj, const char* name, const std::string& expected) {
  throw py::value_error(absl::StrCat(name, ": expected ", expected, "; got ", Given(obj)));
}

bool ShapeMatches(const py::array& a, const std::vector<int64_t>& shape) {
  if (a.ndim() != static_cast<py::ssize_t>(shape.size())) return false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] >= 0 && a.shape(static_cast<py::ssize_t>(i)) != shape[i]) return false;
  }
  return true;
}

}  // namespace

py::array CheckedArray(py::handle obj, const char* name, const ArraySpec& spec, bool writable) {
  const std::string expected = absl::StrCat("a C-contiguous", writable ? ", writable" : "", " numpy.",
                                            ElemName(spec.elem), " array of shape ", ShapeText(spec.shape));
  if (!py::isinstance<py::array>(obj) || !HasElem(obj, spec.elem)) RaiseMalformed(obj, name, expected);
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!ShapeMatches(a, spec.shape) || !(a.flags() & py::array::c_style) || !Aligned(a) ||
      (writable && !a.writeable())) {
    RaiseMalformed(obj, name, expected);
  }
  return a;
}

py::array CheckedBf16Rows(py::handle obj, const char* name, int64_t width) {
  const std::string expected = absl::StrCat("a C-contiguous numpy.float32 (rounded to bf16) or numpy.uint16 (bf16 bits)",
                                            " array of shape (n, ", width, ")");
  if (!py::isinstance<py::array>(obj) || !(HasElem(obj, Elem::kFloat32) || HasElem(obj, Elem::kUint16))) {
    RaiseMalformed(obj, name, expected);
  }
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!ShapeMatches(a, {-1, width}) || !(a.flags() & py::array::c_style) || !Aligned(a)) {
    RaiseMalformed(obj, name, expected);
  }
  return a;
}

Bf16Source SourceOf(const py::array& rows) {
  return {rows.data(), static_cast<int64_t>(rows.size()), HasElem(rows, Elem::kFloat32)};
}

absl::Span<const kvc::Bf16> Bf16Source::Values(std::vector<kvc::Bf16>* storage) const {
  const size_t n = static_cast<size_t>(count);
  if (!is_float32) return absl::MakeConstSpan(static_cast<const kvc::Bf16*>(data), n);
  const float* in = static_cast<const float*>(data);
  storage->resize(n);
  for (size_t i = 0; i < n; ++i) (*storage)[i] = kvc::ToBf16(in[i]);
  return *storage;
}

std::string PathString(py::handle path) {
  // os.fsencode: str (surrogate-escaped bytes included), bytes or os.PathLike -> the file system's bytes.
  const py::bytes encoded = py::module_::import("os").attr("fsencode")(path);
  return encoded;
}

namespace {

// --- row codecs ------------------------------------------------------------

py::array ToBf16(py::handle values) {
  if (!py::isinstance<py::array_t<float>>(values)) {
    RaiseMalformed(values, "values", "a C-contiguous numpy.float32 array (any shape)");
  }
  const py::array a = py::reinterpret_borrow<py::array>(values);
  if (!(a.flags() & py::array::c_style) || !Aligned(a)) {
    RaiseMalformed(values, "values", "a C-contiguous numpy.float32 array (any shape)");
  }
  std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
  py::array_t<uint16_t> out(shape);
  const float* in = static_cast<const float*>(a.data());
  uint16_t* o = out.mutable_data();
  const py::ssize_t n = a.size();
  {
    py::gil_scoped_release release;
    for (py::ssize_t i = 0; i < n; ++i) o[i] = kvc::Bf16BitsFromF32(in[i]);
  }
  return std::move(out);
}

py::array FromBf16(py::handle bits) {
  if (!py::isinstance<py::array_t<uint16_t>>(bits)) {
    RaiseMalformed(bits, "bits", "a C-contiguous numpy.uint16 array (any shape)");
  }
  const py::array a = py::reinterpret_borrow<py::array>(bits);
  if (!(a.flags() & py::array::c_style) || !Aligned(a)) {
    RaiseMalformed(bits, "bits", "a C-contiguous numpy.uint16 array (any shape)");
  }
  std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
  py::array_t<float> out(shape);
  const uint16_t* in = static_cast<const uint16_t*>(a.data());
  float* o = out.mutable_data();
  const py::ssize_t n = a.size();
  {
    py::gil_scoped_release release;
    for (py::ssize_t i = 0; i < n; ++i) o[i] = kvc::F32FromBf16Bits(in[i]);
  }
  return std::move(out);
}

// Quantizes n bf16 rows of `width` values into n contiguous rows of `format`.
py::array Quantize(py::handle rows, kvc::RowFormat format, int64_t width) {
  const py::array a = CheckedBf16Rows(rows, "rows", width);
  const int64_t n = a.shape(0);
  const kvc::RowFormatInfo& f = kvc::FormatInfo(format);
  py::array_t<uint8_t> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(f.row_bytes)});
  const Bf16Source source = SourceOf(a);
  uint8_t* o = out.mutable_data();
  absl::Status status;
  {
    py::gil_scoped_release release;
    std::vector<kvc::Bf16> storage;
    const absl::Span<const kvc::Bf16> values = source.Values(&storage);
    const kvc::PackedRows packed = kvc::ContiguousRows(format, o, n);
    status = format == kvc::RowFormat::kKvFp8 ? kvc::QuantizeKvRows(values, packed) : kvc::QuantizeIndexKeys(values, packed);
  }
  Check(status);
  return std::move(out);
}

py::array Dequantize(py::handle rows, kvc::RowFormat format, int64_t width) {
  const kvc::RowFormatInfo& f = kvc::FormatInfo(format);
  const py::array a = CheckedArray(rows, "rows", {Elem::kUint8, {-1, f.row_bytes}});
  const int64_t n = a.shape(0);
  py::array_t<float> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(width)});
  const uint8_t* in = static_cast<const uint8_t*>(a.data());
  float* o = out.mutable_data();
  absl::Status status;
  {
    py::gil_scoped_release release;
    const kvc::ConstPackedRows packed = kvc::ContiguousRows(format, in, n);
    const absl::Span<float> values(o, static_cast<size_t>(n * width));
    status = format == kvc::RowFormat::kKvFp8 ? kvc::DequantizeKvRows(packed, values) : kvc::DequantizeIndexKeys(packed, values);
  }
  Check(status);
  return std::move(out);
}

// --- footprints ------------------------------------------------------------

// Whole bytes, as kvc-footprint --json writes them: an integer below 2^63,
// else the double (huge models at 2^40 tokens).
py::object Bytes(double b) {
  if (b < 0x1p63) return py::int_(static_cast<int64_t>(std::llround(b)));
  return py::float_(b);
}

// One row of kvc-footprint --json (tools/kvc_footprint.cc), key for key.
py::dict FootprintRow(const kvc::FootprintModel& m, int64_t tokens, const kvc::FootprintModel* baseline) {
  const std::vector<double> parts = m.ComponentBytes(tokens);
  py::dict components;
  for (size_t i = 0; i < m.per_token.size(); ++i) components[py::str(m.per_token[i].name)] = Bytes(parts[i]);
  for (const kvc::FootprintComponent& c : m.per_sequence) components[py::str(c.name)] = Bytes(c.bytes);
  py::dict row;
  row["model"] = m.name;
  row["tokens"] = tokens;
  row["bytes_per_token"] = m.BytesPerToken();
  row["total_bytes"] = Bytes(m.TotalBytes(tokens));
  row["per_sequence_constant_bytes"] = Bytes(m.ConstantBytes());
  row["components"] = components;
  if (baseline != nullptr) {
    row["baseline"] = baseline->name;
    row["ratio_to_baseline"] = m.TotalBytes(tokens) / baseline->TotalBytes(tokens);
  }
  return row;
}

int64_t CheckedTokens(py::handle t) {
  if (!py::isinstance<py::int_>(t) || py::isinstance<py::bool_>(t)) {
    throw py::value_error(absl::StrCat("tokens: expected a positive int up to 2^40; got a ", Py_TYPE(t.ptr())->tp_name));
  }
  const py::int_ value = py::reinterpret_borrow<py::int_>(t);
  const bool in_range = value >= py::int_(1) && value <= py::int_(int64_t{1} << 40);
  if (!in_range) throw py::value_error("tokens: expected a positive int up to 2^40; got " + std::string(py::str(t)));
  return value.cast<int64_t>();
}

py::object Footprint(const std::string& model, py::handle tokens, const std::optional<std::string>& baseline,
                     const std::string& format) {
  if (format != "fp8" && format != "bf16") throw py::value_error("format: expected \"fp8\" or \"bf16\"; got \"" + format + "\"");
  const kvc::StorageFormat storage = format == "bf16" ? kvc::StorageFormat::kBf16 : kvc::StorageFormat::kFp8;
  const kvc::FootprintModel m = Value(kvc::FootprintByName(model, storage));
  std::unique_ptr<kvc::FootprintModel> base;
  if (baseline) {
    // As kvc-footprint: the baseline in its default (fp8) format.
    base = std::make_unique<kvc::FootprintModel>(Value(kvc::FootprintByName(*baseline, kvc::StorageFormat::kFp8)));
  }
  if (py::isinstance<py::int_>(tokens)) return FootprintRow(m, CheckedTokens(tokens), base.get());
  if (!py::isinstance<py::sequence>(tokens) || py::isinstance<py::str>(tokens)) {
    throw py::value_error(absl::StrCat("tokens: expected an int or a sequence of ints; got a ", Py_TYPE(tokens.ptr())->tp_name));
  }
  py::list rows;
  for (const py::handle t : tokens) rows.append(FootprintRow(m, CheckedTokens(t), base.get()));
  return std::move(rows);
}

// --- snapshot inspection ---------------------------------------------------

py::dict InfoDict(const kvc::SnapshotInfo& info) {
  py::list sequences;
  for (const kvc::SnapshotSequenceInfo& s : info.sequences) {
    py::list layers;
    for (const kvc::SnapshotLayerInfo& l : s.layers) {
      py::dict layer;
      layer["length"] = l.length;
      layer["rollback_floor"] = l.rollback_floor;
      layer["compressed_rows"] = l.compressed_rows;
      layer["index_keys"] = l.index_keys;
      layers.append(layer);
    }
    py::dict seq;
    seq["saved_id"] = s.saved_id;
    seq["layers"] = layers;
    sequences.append(seq);
  }
  py::dict d;
  d["format_version"] = info.format_version;
  d["model_name"] = info.model_name;
  d["layer_kinds"] = info.layer_kinds;
  d["rollback_depth"] = info.rollback_depth;
  d["model_fingerprint"] = info.model_fingerprint;
  d["saves"] = info.saves;
  d["file_bytes"] = info.file_bytes;
  d["live_bytes"] = info.live_bytes;
  d["unfinished_bytes"] = info.unfinished_bytes;
  d["blocks"] = info.blocks;
  d["blocks_verified"] = info.blocks_verified;
  d["sequences"] = sequences;
  return d;
}

template <typename Read>
py::dict Inspect(py::handle path, Read read) {
  const std::string p = PathString(path);
  absl::StatusOr<kvc::SnapshotInfo> info;
  {
    py::gil_scoped_release release;
    info = read(p);
  }
  return InfoDict(Value(std::move(info)));
}

}  // namespace

void BindTools(py::module_& m) {
  m.def("to_bf16", &ToBf16, py::arg("values"),
        "float32 values (any shape) -> their bf16 bit patterns as uint16, rounded to nearest even "
        "(kvc's rounding: NaN stays NaN, overflow becomes inf).");
  m.def("from_bf16", &FromBf16, py::arg("bits"), "bf16 bit patterns (uint16, any shape) -> float32, exactly.");
  m.def(
      "quantize_kv_rows", [](py::handle rows) { return Quantize(rows, kvc::RowFormat::kKvFp8, kvc::kHeadDim); },
      py::arg("rows"),
      "KV rows (n, 512), float32 (rounded to bf16) or uint16 (bf16 bits) -> uint8 (n, 584): kvc's 584-byte FP8 rows "
      "(576 data bytes, then 8 scale bytes), the bytes append_rows takes.");
  m.def(
      "dequantize_kv_rows", [](py::handle rows) { return Dequantize(rows, kvc::RowFormat::kKvFp8, kvc::kHeadDim); },
      py::arg("rows"), "uint8 (n, 584) rows -> float32 (n, 512).");
  m.def(
      "quantize_index_keys", [](py::handle keys) { return Quantize(keys, kvc::RowFormat::kIndexFp4, kvc::kIndexDim); },
      py::arg("keys"),
      "Index keys (n, 128) after RoPE, float32 (rounded to bf16) or uint16 -> uint8 (n, 68) FP4 keys (Hadamard, "
      "E2M1 codes, then 4 scale bytes).");
  m.def(
      "dequantize_index_keys", [](py::handle keys) { return Dequantize(keys, kvc::RowFormat::kIndexFp4, kvc::kIndexDim); },
      py::arg("keys"), "uint8 (n, 68) keys -> float32 (n, 128) (in the Hadamard domain).");
  m.def("footprint", &Footprint, py::arg("model"), py::arg("tokens") = int64_t{1} << 20, py::arg("baseline") = py::none(),
        py::arg("format") = "fp8",
        "The KV-cache memory of `model` at `tokens` context: the dict `kvc-footprint --json` prints for it (one "
        "dict for an int, a list for a sequence of ints). model: v4-pro, v4-flash, deepseek-v3.2, deepseek-v3, "
        "llama3-70b, mha:L:H:D[:B], gqa:L:H:D[:B] or a config.json path; format: fp8 or bf16 (V4 models).");
  m.def(
      "snapshot_info", [](py::handle path) { return Inspect(path, [](const std::string& p) { return kvc::ReadSnapshotInfo(p); }); },
      py::arg("path"), "What a snapshot file holds (checksums of its commit and model blocks only).");
  m.def(
      "verify_snapshot", [](py::handle path) { return Inspect(path, [](const std::string& p) { return kvc::VerifySnapshot(p); }); },
      py::arg("path"), "snapshot_info, after checking every block's checksum; kvc.Error (DATA_LOSS) naming the first bad one.");
}

}  // namespace kvc_python

PYBIND11_MODULE(_kvc, m) {
  namespace py = pybind11;
  m.doc() = "kvc: the DeepSeek-V4 KV cache (see the package kvc and docs/python.md)";
  kvc_python::g_error_type = PyErr_NewException("kvc.Error", PyExc_Exception, nullptr);
  if (kvc_python::g_error_type == nullptr) throw py::error_already_set();
  m.attr("Error") = py::handle(kvc_python::g_error_type);  // the module keeps a reference too

  m.attr("STREAM_WINDOW") = static_cast<int>(kvc::Stream::kWindow);
  m.attr("STREAM_CSA_ROWS") = static_cast<int>(kvc::Stream::kCsaRows);
  m.attr("STREAM_CSA_KEYS") = static_cast<int>(kvc::Stream::kCsaKeys);
  m.attr("STREAM_HCA_ROWS") = static_cast<int>(kvc::Stream::kHcaRows);
  m.attr("STREAM_CSA_STATE") = static_cast<int>(kvc::Stream::kCsaState);
  m.attr("STREAM_CSA_INDEXER_STATE") = static_cast<int>(kvc::Stream::kCsaIndexerState);
  m.attr("STREAM_HCA_STATE") = static_cast<int>(kvc::Stream::kHcaState);
  m.attr("NUM_STREAMS") = kvc::kNumStreams;
  m.attr("MAX_DRAFT_SLOTS") = kvc::kMaxDraftSlots;
  m.attr("LAYER_WINDOW") = static_cast<int>(kvc::LayerKind::kWindow);
  m.attr("LAYER_CSA") = static_cast<int>(kvc::LayerKind::kCsa);
  m.attr("LAYER_HCA") = static_cast<int>(kvc::LayerKind::kHca);
  m.attr("HEAD_DIM") = kvc::kHeadDim;
  m.attr("INDEX_DIM") = kvc::kIndexDim;
  m.attr("KV_ROW_BYTES") = kvc::FormatInfo(kvc::RowFormat::kKvFp8).row_bytes;
  m.attr("INDEX_KEY_BYTES") = kvc::FormatInfo(kvc::RowFormat::kIndexFp4).row_bytes;
  m.attr("SNAPSHOT_FORMAT_VERSION") = kvc::kSnapshotFormatVersion;

  kvc_python::BindTools(m);
  kvc_python::BindCache(m);
}
