// Shared helpers of the kvc Python module (python/*.cc): errors and NumPy
// argument checks. Not installed; not part of kvc's C++ API.
//
// The module's error rules (docs/python.md):
//   - a NumPy argument of the wrong type, dtype, shape, byte order,
//     alignment or memory layout raises ValueError before kvc is called;
//     arrays are never copied or converted to make them fit, except the
//     float32 -> bf16 rounding (RNE) of KV rows where a method says so;
//   - anything kvc refuses raises kvc.Error carrying kvc's message, its
//     absl status code name (`code`) and, for file-system failures, the
//     errno (`errno`, else 0). A refused call changes nothing.
#ifndef KVC_PYTHON_BINDING_H_
#define KVC_PYTHON_BINDING_H_

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvc/cache.h"

namespace kvc_python {

namespace py = pybind11;

// The kvc.Error exception type (created once by the module; never freed).
extern PyObject* g_error_type;

// Raises kvc.Error for a failed status.
[[noreturn]] void Raise(const absl::Status& status);
inline void Check(const absl::Status& status) {
  if (!status.ok()) Raise(status);
}
template <typename T>
T Value(absl::StatusOr<T> result) {
  if (!result.ok()) Raise(result.status());
  return *std::move(result);
}

// kvc.Error(INVALID_ARGUMENT) with `message`: for refusals the module makes
// itself that kvc would make the same way (a stream number out of range).
[[noreturn]] void RaiseInvalid(const std::string& message);

// What an array argument must be: its element type and shape. A dimension of
// -1 takes any size.
enum class Elem { kFloat32, kUint16, kUint8, kInt32, kInt64 };
struct ArraySpec {
  Elem elem;
  std::vector<int64_t> shape;
};

// `obj` as a NumPy array that is exactly `spec` (dtype in native byte order,
// shape), C-contiguous and aligned; ValueError naming `name` and what was
// given otherwise. `writable` also requires a writable array.
py::array CheckedArray(py::handle obj, const char* name, const ArraySpec& spec, bool writable = false);
// The same for KV-style rows whose dtype may be float32 (rounded to bf16 by
// the caller) or uint16 (bf16 bit patterns): shape (n, width).
py::array CheckedBf16Rows(py::handle obj, const char* name, int64_t width);

// The bf16 values of a CheckedBf16Rows array, taken with the GIL held;
// Values() may then run without it: it returns the array's own memory when
// it holds uint16, else the RNE rounding of its float32 values written to
// *storage. The array must stay alive (the caller holds it).
struct Bf16Source {
  const void* data = nullptr;
  int64_t count = 0;
  bool is_float32 = false;
  absl::Span<const kvc::Bf16> Values(std::vector<kvc::Bf16>* storage) const;
};
Bf16Source SourceOf(const py::array& rows);

// A NumPy array that owns `values` (moved, not copied), shaped `shape`
// (default: 1-D of values.size()).
template <typename T>
py::array_t<T> ToArray(std::vector<T> values, std::vector<py::ssize_t> shape = {}) {
  if (shape.empty()) shape = {static_cast<py::ssize_t>(values.size())};
  auto owned = std::make_unique<std::vector<T>>(std::move(values));
  const T* data = owned->data();
  py::capsule owner(owned.get(), [](void* p) { delete static_cast<std::vector<T>*>(p); });
  owned.release();  // the capsule owns it now
  if (data == nullptr) return py::array_t<T>(shape);  // empty: numpy allocates nothing of note
  return py::array_t<T>(shape, data, owner);
}

// os.fspath(path) as a std::string (str or bytes paths).
std::string PathString(py::handle path);

// The module's parts (python/*.cc).
void BindCache(py::module_& m);
void BindTools(py::module_& m);

}  // namespace kvc_python

#endif  // KVC_PYTHON_BINDING_H_
