// Row formats of the V4 KV cache: one table of facts, and non-owning views of
// where rows live in memory.
//
// A stored row has two parts: a *data* part (low-precision codes, then any
// dims kept as raw bf16) and a *scale* part (UE8M0 bytes, one per block, plus
// padding). Standalone rows keep the two parts together (data then scales);
// the engines' paged layout (FlashMLA, vLLM, SGLang) puts the data parts of a
// page's rows first and the scale parts after them as a footer. A
// PackedRowsView describes either with two pointers and two strides, so every
// kernel works on both without copies. Bit-level details: docs/formats.md.
#ifndef KVC_ROW_FORMATS_H_
#define KVC_ROW_FORMATS_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kvc {

// Dimensions of a V4 attention row (spec §1): one 512-dim KV head whose last
// 64 dims carry RoPE; the indexer's keys and queries are 128-dim.
constexpr int kHeadDim = 512;
constexpr int kRopeDim = 64;
constexpr int kNopeDim = kHeadDim - kRopeDim;  // 448
constexpr int kIndexDim = 128;

// The largest |bf16| bit pattern a KV row's quantized (NoPE) dims can hold:
// at the largest block scale a finite bf16 needs (2^120), |x| >= 248 * 2^120
// (0x7F78) rounds to the E4M3 code 256, and 256 * 2^120 = 2^128 reads back
// as infinity. RoPE dims are stored as bf16 and may be any finite value.
constexpr uint16_t kMaxKvNopeBf16Bits = 0x7F77;
constexpr uint16_t kMaxFiniteBf16Bits = 0x7F7F;

// Stable numbering: values are stored in snapshots and exposed in the C API.
// Never reuse a number.
enum class RowFormat : uint8_t {
  kKvFp8 = 0,      // 584-byte KV row: 448 E4M3 + 64 bf16 + 7 UE8M0 + 1 pad
  kIndexFp4 = 1,   // 68-byte index key: 128 packed E2M1 + 4 UE8M0
  kKvBf16 = 2,     // 1024-byte KV row, all bf16 (uncompressed baseline)
  kIndexBf16 = 3,  // 256-byte index key, all bf16 (uncompressed baseline)
};

struct RowFormatInfo {
  RowFormat format;
  const char* name;
  int32_t dims;            // elements per row
  int32_t quantized_dims;  // leading dims stored as codes (the rest: raw bf16)
  int32_t code_bits;       // bits per code (8 for E4M3, 4 for E2M1; 0: none)
  int32_t block_size;      // elements per UE8M0 scale byte (0: no scales)
  int32_t data_bytes;      // codes + raw bf16 dims
  int32_t scale_bytes;     // UE8M0 bytes + padding
  int32_t row_bytes;       // data_bytes + scale_bytes
};

// Indexed by RowFormat.
constexpr RowFormatInfo kRowFormatTable[] = {
    {RowFormat::kKvFp8, "kv_fp8", kHeadDim, kNopeDim, 8, 64, 576, 8, 584},
    {RowFormat::kIndexFp4, "index_fp4", kIndexDim, kIndexDim, 4, 32, 64, 4, 68},
    {RowFormat::kKvBf16, "kv_bf16", kHeadDim, 0, 0, 0, 2 * kHeadDim, 0, 2 * kHeadDim},
    {RowFormat::kIndexBf16, "index_bf16", kIndexDim, 0, 0, 0, 2 * kIndexDim, 0, 2 * kIndexDim},
};

constexpr const RowFormatInfo& FormatInfo(RowFormat format) {
  return kRowFormatTable[static_cast<int>(format)];
}

namespace internal {
constexpr bool FormatIsConsistent(const RowFormatInfo& f, int index) {
  return static_cast<int>(f.format) == index &&
         f.row_bytes == f.data_bytes + f.scale_bytes &&
         f.data_bytes == f.quantized_dims * f.code_bits / 8 + 2 * (f.dims - f.quantized_dims) &&
         (f.block_size == 0 ? f.scale_bytes == 0
                            : f.quantized_dims % f.block_size == 0 &&
                                  f.scale_bytes >= f.quantized_dims / f.block_size);
}
}  // namespace internal
static_assert(internal::FormatIsConsistent(kRowFormatTable[0], 0), "kv_fp8 row facts");
static_assert(internal::FormatIsConsistent(kRowFormatTable[1], 1), "index_fp4 row facts");
static_assert(internal::FormatIsConsistent(kRowFormatTable[2], 2), "kv_bf16 row facts");
static_assert(internal::FormatIsConsistent(kRowFormatTable[3], 3), "index_bf16 row facts");

// The same facts as packed structs, for code that reads single rows.
struct KvRowFp8 {
  uint8_t nope_codes[kNopeDim];   // E4M3, dims 0..447
  uint8_t rope_bf16[2 * kRopeDim];  // bf16 little-endian, dims 448..511
  uint8_t scales[kNopeDim / 64];  // UE8M0, one per 64-dim block
  uint8_t padding;                // always written as 0
};
static_assert(sizeof(KvRowFp8) == 584, "KV row is 584 bytes");
static_assert(sizeof(KvRowFp8) == FormatInfo(RowFormat::kKvFp8).row_bytes, "table");

struct IndexKeyFp4 {
  uint8_t codes[kIndexDim / 2];  // E2M1 pairs: element 2k low nibble, 2k+1 high
  uint8_t scales[kIndexDim / 32];  // UE8M0, one per 32 elements
};
static_assert(sizeof(IndexKeyFp4) == 68, "index key is 68 bytes");
static_assert(sizeof(IndexKeyFp4) == FormatInfo(RowFormat::kIndexFp4).row_bytes, "table");

// Bytes of a page of `rows` rows in the engines' layout (data parts, then
// the scale footer): KV pages are padded to a multiple of 576 bytes, as
// FlashMLA requires; other formats to a multiple of 64 (docs/layout.md).
constexpr int64_t PageBytes(RowFormat format, int64_t rows) {
  const int64_t align = format == RowFormat::kKvFp8 ? 576 : 64;
  return (rows * FormatInfo(format).row_bytes + align - 1) / align * align;
}
static_assert(PageBytes(RowFormat::kKvFp8, 64) == 37440, "64 KV rows: 37,376 B padded to 65 x 576");
static_assert(PageBytes(RowFormat::kIndexFp4, 64) == 4352, "64 index keys");

// Non-owning view of `count` rows of one format. Row i's data part starts at
// data + i * data_stride and its scale part at scales + i * scale_stride
// (strides in bytes). Trivially copyable; Byte is uint8_t or const uint8_t.
template <typename Byte>
struct PackedRowsView {
  static_assert(std::is_same<std::remove_const_t<Byte>, uint8_t>::value, "byte views only");

  Byte* data = nullptr;
  Byte* scales = nullptr;
  int64_t data_stride = 0;
  int64_t scale_stride = 0;
  int64_t count = 0;

  Byte* row_data(int64_t i) const { return data + i * data_stride; }
  Byte* row_scales(int64_t i) const { return scales + i * scale_stride; }

  // Rows [first, first + n) of this view. Requires 0 <= first, first + n <= count.
  PackedRowsView Slice(int64_t first, int64_t n) const {
    return {row_data(first), row_scales(first), data_stride, scale_stride, n};
  }

  // A mutable view converts to a read-only one.
  operator PackedRowsView<const uint8_t>() const {  // NOLINT(google-explicit-constructor)
    return {data, scales, data_stride, scale_stride, count};
  }
};

using PackedRows = PackedRowsView<uint8_t>;
using ConstPackedRows = PackedRowsView<const uint8_t>;

// `count` whole rows back to back (row_bytes each, data part then scales).
template <typename Byte>
PackedRowsView<Byte> ContiguousRows(RowFormat format, Byte* base, int64_t count) {
  const RowFormatInfo& f = FormatInfo(format);
  return {base, base + f.data_bytes, f.row_bytes, f.row_bytes, count};
}

// One page in the engines' layout: the data parts of `rows_per_page` rows back
// to back, then their scale parts back to back as a footer.
template <typename Byte>
PackedRowsView<Byte> PageFooterRows(RowFormat format, Byte* page, int64_t rows_per_page) {
  const RowFormatInfo& f = FormatInfo(format);
  return {page, page + rows_per_page * f.data_bytes, f.data_bytes, f.scale_bytes,
          rows_per_page};
}

// Copies from.count rows of `format` into `to` (to.count >= from.count),
// whatever the layouts of the two views (contiguous rows, engine pages).
inline void CopyRows(RowFormat format, ConstPackedRows from, PackedRows to) {
  const RowFormatInfo& f = FormatInfo(format);
  for (int64_t i = 0; i < from.count; ++i) {
    std::memcpy(to.row_data(i), from.row_data(i), static_cast<size_t>(f.data_bytes));
    std::memcpy(to.row_scales(i), from.row_scales(i), static_cast<size_t>(f.scale_bytes));
  }
}

}  // namespace kvc

#endif  // KVC_ROW_FORMATS_H_
