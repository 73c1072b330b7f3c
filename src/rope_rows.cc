#include "src/rope_rows.h"

namespace kvc {

RopeRows::RopeRows(const RopeTable& table, int64_t first, int64_t end, int64_t step)
    : first_(first), end_(end), step_(step),
      cos_sin_(static_cast<size_t>(end > first ? (end - first + step - 1) / step * 64 : 0)) {
  for (int64_t p = first; p < end; p += step) table.At(p, &cos_sin_[static_cast<size_t>((p - first) / step * 64)]);
}

std::shared_ptr<const RopeRows> RopeMemo::Rows(int64_t first, int64_t end, int64_t step) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (last_ != nullptr && last_->Covers(first, end)) return last_;
  }
  auto rows = std::make_shared<const RopeRows>(table_, first, end, step);  // outside the lock
  if (step == 4) {
    std::lock_guard<std::mutex> lock(mu_);
    last_ = rows;
  }
  return rows;
}

}  // namespace kvc
