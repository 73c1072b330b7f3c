// Internal to kvc (not installed): the compressed RoPE's (cos, sin) rows at
// window starts, computed once per chunk of positions and shared by every
// layer that appends that chunk. RopeTable::At costs 32 sincos per row, and
// each CSA and HCA layer needs the same rows (HCA's window starts are a
// subset of CSA's: multiples of 128 among the multiples of 4).
#ifndef KVC_SRC_ROPE_ROWS_H_
#define KVC_SRC_ROPE_ROWS_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "kvc/compressor.h"

namespace kvc {

// The rows of positions first, first + step, ... below end (step 4 covers
// every window start from a window start on; a compressor's ratio, its own).
class RopeRows {
 public:
  RopeRows(const RopeTable& table, int64_t first, int64_t end, int64_t step = 4);
  bool Covers(int64_t first, int64_t end) const { return step_ == 4 && first_ <= first && end <= end_; }
  // The 64 floats of RopeTable::At(position), for a covered position.
  const float* At(int64_t position) const { return &cos_sin_[static_cast<size_t>((position - first_) / step_ * 64)]; }

 private:
  int64_t first_, end_, step_;
  std::vector<float> cos_sin_;
};

// The last rows asked for, kept for the next layer's Append of the same
// chunk. Thread-safe; a caller holds its rows as long as it needs them.
class RopeMemo {
 public:
  explicit RopeMemo(const RopeTable& table) : table_(table) {}
  // Rows covering the window starts of a compressor of ratio `step` (4 or
  // 128) in [first, end), first a multiple of step: the memo's if it covers
  // them, else computed; rows of every multiple of 4 (CSA's) are kept.
  std::shared_ptr<const RopeRows> Rows(int64_t first, int64_t end, int64_t step);

 private:
  const RopeTable& table_;
  std::mutex mu_;
  std::shared_ptr<const RopeRows> last_;  // guarded by mu_
};

}  // namespace kvc

#endif  // KVC_SRC_ROPE_ROWS_H_
