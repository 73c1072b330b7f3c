// Batch row kernels: quantize / dequantize KV rows and index keys with SIMD,
// dispatched at run time to the best target the CPU supports (Highway).
//
// Every kernel gives exactly the bits of its scalar reference in
// reference_codecs.h, on every target (tested).
//
// Errors. Shapes, strides, pointers and row indices are checked before
// anything is written: a bad argument returns kInvalidArgument (kOutOfRange
// for row indices) and writes nothing. Values are checked row by row, fused
// into the kernel (a separate pass would stream the input from DRAM twice): a
// row or key holding ±inf or NaN (the FP8/FP4 block rules are defined for
// finite values only), a KV-row NoPE value with |x| >= 248 x 2^120 (bf16
// 0x7F78 and up: its E4M3 code would round to 256 at scale 2^120, which
// reads back as 2^128 = infinity; kMaxKvNopeBf16Bits), or an index-key value
// with |x| > 2^120 (its Hadamard sums could overflow fp32; real keys are
// O(1)), returns kInvalidArgument
// naming the row and dim; the rows before it have been written, it and all
// rows after it have not. Callers that need all-or-nothing (the cache)
// quantize into memory they have not yet published.
#ifndef KVC_ROW_KERNELS_H_
#define KVC_ROW_KERNELS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvc/number_formats.h"
#include "kvc/row_formats.h"

namespace kvc {

// ---------------------------------------------------------------------------
// KV rows: 512-dim bf16 <-> 584-byte FP8 rows (RowFormat::kKvFp8).

// Quantizes out.count rows; `in` holds out.count * 512 bf16 values, row-major.
// Cost per row: one read of its 1 KiB from memory (block maxima and the
// finiteness check), a second from L1 (encode), 584 B written. Allocates
// nothing.
absl::Status QuantizeKvRows(absl::Span<const Bf16> in, PackedRows out);

// Dequantizes in.count rows into `out` (in.count * 512 values, row-major).
// Exact: values are E4M3 codes times powers of two. Any byte pattern is
// accepted (NaN codes and 255 scale bytes give NaN).
absl::Status DequantizeKvRows(ConstPackedRows in, absl::Span<Bf16> out);
absl::Status DequantizeKvRows(ConstPackedRows in, absl::Span<float> out);

// Dequantizes rows in[rows[0]], in[rows[1]], ... into consecutive 512-value
// rows of `out` (rows.size() * 512 values). kOutOfRange if an index is
// outside [0, in.count).
absl::Status GatherDequantizeKvRows(ConstPackedRows in, absl::Span<const int64_t> rows,
                                    absl::Span<Bf16> out);
absl::Status GatherDequantizeKvRows(ConstPackedRows in, absl::Span<const int64_t> rows,
                                    absl::Span<float> out);

// ---------------------------------------------------------------------------
// Index keys and prepared index queries: 128-dim bf16 -> Hadamard-128, bf16,
// FP4 -> 68-byte keys (RowFormat::kIndexFp4).

// Quantizes out.count keys; `in` holds out.count * 128 bf16 values.
absl::Status QuantizeIndexKeys(absl::Span<const Bf16> in, PackedRows out);

// Dequantizes in.count keys into `out` (in.count * 128 fp32 values). Exact.
absl::Status DequantizeIndexKeys(ConstPackedRows in, absl::Span<float> out);

// Checks rows of `dims` bf16 values (dims a multiple of 64) for ±inf/NaN
// without writing anything: kInvalidArgument naming `what`, the first bad row
// and dim. Reads each value once (SIMD). For callers that must validate a
// whole batch before changing anything.
absl::Status CheckFiniteRows(absl::Span<const Bf16> values, int dims, const char* what);

// Checks 512-value KV rows for exactly what QuantizeKvRows refuses (see
// above), without writing anything: kInvalidArgument naming the row and dim.
absl::Status CheckKvRows(absl::Span<const Bf16> values, const char* what);

// The same for fp32 values in rows of `width` (e.g. compressor projections).
absl::Status CheckFiniteF32(absl::Span<const float> values, int64_t width, const char* what);

// ---------------------------------------------------------------------------
// SIMD targets.

// The Highway targets (HWY_AVX3_DL, HWY_AVX2, ...) that kvc was compiled for
// and this CPU supports, best first. Tests run every kernel on each of them
// via hwy::SetSupportedTargetsForTest.
std::vector<int64_t> SimdTargets();

// Name of the target the kernels dispatch to right now (e.g. "AVX3_DL").
std::string ActiveSimdTargetName();

// Name of any Highway target bit, e.g. for test names.
std::string SimdTargetName(int64_t target);

}  // namespace kvc

#endif  // KVC_ROW_KERNELS_H_
