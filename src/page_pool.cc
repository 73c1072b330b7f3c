#include "kvc/page_pool.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <utility>

#include "absl/numeric/bits.h"
#include "absl/strings/str_cat.h"
#include "kvc/status.h"

namespace kvc {
namespace {

int64_t RoundUp(int64_t bytes, int64_t to) { return (bytes + to - 1) / to * to; }

uint8_t* AlignUp(uint8_t* p) {
  const uintptr_t misalignment = reinterpret_cast<uintptr_t>(p) % kPageAlignment;
  return p == nullptr || misalignment == 0 ? p : p + (kPageAlignment - misalignment);
}

// Bytes of `region` usable as aligned pages.
int64_t UsableBytes(absl::Span<uint8_t> region) {
  if (region.data() == nullptr) return 0;
  const int64_t usable = static_cast<int64_t>(region.size()) - (AlignUp(region.data()) - region.data());
  return usable > 0 ? usable / kPageAlignment * kPageAlignment : 0;
}

}  // namespace

Arena::Arena(std::string name, int64_t limit_bytes)
    : name_(std::move(name)), limit_(limit_bytes > 0 ? limit_bytes : 0), region_(nullptr) {}

Arena::Arena(std::string name, absl::Span<uint8_t> region)
    : name_(std::move(name)), limit_(UsableBytes(region)), region_(AlignUp(region.data())) {}

Arena::~Arena() {
  std::lock_guard<std::mutex> lock(mu_);
  for (uint8_t* block : owned_) std::free(block);
}

absl::StatusOr<uint8_t*> Arena::Allocate(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (bytes <= 0 || bytes % kPageAlignment != 0) {
    return absl::InvalidArgumentError(absl::StrCat(name_, " arena: bad request of ", bytes, " bytes"));
  }
  if (bytes > limit_ - reserved_) {
    return absl::ResourceExhaustedError(absl::StrCat(name_, " arena: ", bytes, " more bytes needed, ",
                                                     limit_ - reserved_, " of ", limit_, " left"));
  }
  uint8_t* block = nullptr;
  if (region_ != nullptr) {
    block = region_ + reserved_;
  } else {
    block = static_cast<uint8_t*>(std::aligned_alloc(kPageAlignment, static_cast<size_t>(bytes)));
    if (block == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat(name_, " arena: the system refused ", bytes, " bytes"));
    }
    owned_.push_back(block);
  }
  reserved_ += bytes;
  return block;
}

int64_t Arena::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reserved_;
}

PagePool::PagePool(std::string name, int64_t page_bytes, Arena* arena)
    : name_(std::move(name)),
      page_bytes_(RoundUp(page_bytes > 0 ? page_bytes : 1, kPageAlignment)),
      arena_(arena),
      max_pages_(std::min<int64_t>(arena->limit_bytes() / page_bytes_, std::numeric_limits<PageId>::max())) {}

namespace {

// Grows v's capacity geometrically to at least `size` (amortised O(1) per element).
template <typename T>
void ReserveGeometric(std::vector<T>& v, size_t size) {
  if (v.capacity() < size) v.reserve(std::max(size, 2 * v.capacity()));
}

}  // namespace

absl::Status PagePool::Reserve(int64_t fresh, int64_t n, std::vector<PageId>* out) {
  try {
    for (int64_t id = created_; id < created_ + fresh;) {  // segments of the new ids
      const int segment = SegmentOf(id);
      auto& table = segments_[static_cast<size_t>(segment)];
      if (table == nullptr) table.reset(new uint8_t*[static_cast<size_t>(int64_t{kFirstSegmentPages} << segment)]);
      id = SegmentStart(segment + 1);
    }
    ReserveGeometric(refcount_, static_cast<size_t>(created_ + fresh));
    ReserveGeometric(free_, static_cast<size_t>(created_ + fresh));
    out->reserve(out->size() + static_cast<size_t>(n));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(name_, ": the system refused memory for the table of ", created_ + fresh, " pages"));
  }
  return absl::OkStatus();
}

absl::Status PagePool::Allocate(int64_t n, std::vector<PageId>* out) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat(name_, ": cannot allocate ", n, " pages"));
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t from_free = std::min(n, static_cast<int64_t>(free_.size()));
  const int64_t fresh = n - from_free;
  // Division, not multiplication: n may be anything.
  if (fresh > max_pages_ - created_ || fresh > arena_->available_bytes() / page_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        name_, ": needs ", n, " pages of ", page_bytes_, " B; ", free_.size(), " free, ", created_, " of at most ",
        max_pages_, " created, and the ", arena_->name(), " arena has ", arena_->available_bytes(), " of ",
        arena_->limit_bytes(), " bytes left"));
  }
  KVC_RETURN_IF_ERROR(Reserve(fresh, n, out));
  if (fresh > 0) {  // one block for all fresh pages: all or nothing
    absl::StatusOr<uint8_t*> block = arena_->Allocate(fresh * page_bytes_);
    if (!block.ok()) return absl::ResourceExhaustedError(absl::StrCat(name_, ": ", block.status().message()));
    // Cannot fail from here on: every table has room (Reserve).
    for (int64_t i = 0; i < fresh; ++i) {
      Slot(created_ + i) = *block + i * page_bytes_;
      refcount_.push_back(0);
      free_.push_back(static_cast<PageId>(created_ + i));
    }
    created_ += fresh;
  }
  for (int64_t i = 0; i < n; ++i) {
    const PageId id = free_.back();
    free_.pop_back();
    refcount_[static_cast<size_t>(id)] = 1;
    std::memset(Data(id), 0, static_cast<size_t>(page_bytes_));
    out->push_back(id);
  }
  used_ += n;
  return absl::OkStatus();
}

bool PagePool::CanAllocate(int64_t n) const {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t fresh = n - static_cast<int64_t>(free_.size());
  return n >= 0 && (fresh <= 0 || (fresh <= max_pages_ - created_ && fresh <= arena_->available_bytes() / page_bytes_));
}

void PagePool::Ref(PageId id) {
  std::lock_guard<std::mutex> lock(mu_);
  ++refcount_[static_cast<size_t>(id)];
}

void PagePool::Unref(PageId id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (--refcount_[static_cast<size_t>(id)] == 0) {
    free_.push_back(id);
    --used_;
  }
}

int32_t PagePool::RefCount(PageId id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return refcount_[static_cast<size_t>(id)];
}

PoolStats PagePool::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return PoolStats{page_bytes_, used_, static_cast<int64_t>(free_.size())};
}

}  // namespace kvc
