// Paged storage: arenas and fixed-size page pools with reference counts.
//
// An Arena is the memory of one lifetime class ("history": append-only,
// shareable pages; "state": per-sequence, constant-size pages), either
// allocated by kvc on demand up to a byte limit or carved from a region the
// engine hands in. A PagePool hands out pages of one size from one arena,
// keeps freed pages on its own free list (pages never return to the arena),
// and counts references so forks can share pages. All methods are
// thread-safe; page addresses are stable for the pool's lifetime.
#ifndef KVC_PAGE_POOL_H_
#define KVC_PAGE_POOL_H_

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/numeric/bits.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvc {

// Alignment of every page (bytes); page sizes are multiples of it.
constexpr int64_t kPageAlignment = 64;

class Arena {
 public:
  // kvc allocates blocks on demand, up to `limit_bytes` in total.
  Arena(std::string name, int64_t limit_bytes);
  // Pages are carved from `region` (engine memory, which must outlive the
  // arena); the limit is its size, rounded down to the alignment.
  Arena(std::string name, absl::Span<uint8_t> region);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // `bytes` (a multiple of kPageAlignment) of memory aligned to it, or
  // kResourceExhausted naming the arena when the limit would be exceeded.
  absl::StatusOr<uint8_t*> Allocate(int64_t bytes);

  const std::string& name() const { return name_; }
  int64_t limit_bytes() const { return limit_; }
  int64_t reserved_bytes() const;  // handed out so far
  // Bytes still available for new pages.
  int64_t available_bytes() const { return limit_ - reserved_bytes(); }

 private:
  const std::string name_;
  const int64_t limit_;
  uint8_t* const region_;  // null: kvc allocates
  mutable std::mutex mu_;  // guards the members below
  int64_t reserved_ = 0;
  std::vector<uint8_t*> owned_;
};

using PageId = int32_t;
constexpr PageId kNoPage = -1;

struct PoolStats {
  int64_t page_bytes = 0;
  int64_t used_pages = 0;  // referenced at least once
  int64_t free_pages = 0;  // obtained from the arena, on the free list
  int64_t used_bytes() const { return used_pages * page_bytes; }
  int64_t reserved_bytes() const { return (used_pages + free_pages) * page_bytes; }
};

class PagePool {
 public:
  // `page_bytes` is rounded up to kPageAlignment. The pool can never hold
  // more than max_pages() pages. Constructing it allocates nothing: its
  // tables grow with the pages it hands out (a few bytes per page), so a huge
  // limit ("no limit") or tiny pages cost nothing until used.
  PagePool(std::string name, int64_t page_bytes, Arena* arena);
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  // Appends `n` new pages (reference count 1, zero-filled) to `out`: all or
  // nothing. kResourceExhausted naming the pool when the arena (or the
  // system, for the pool's own tables) cannot supply them; kInvalidArgument
  // for n < 0. Nothing changes on a refusal.
  absl::Status Allocate(int64_t n, std::vector<PageId>* out);
  // Whether Allocate(n) would succeed now (racy under concurrency; used for
  // error messages, not for correctness).
  bool CanAllocate(int64_t n) const;

  void Ref(PageId id);    // requires a live page
  void Unref(PageId id);  // frees the page when the last reference goes; allocates nothing
  int32_t RefCount(PageId id) const;

  // Requires an id this pool handed out. Lock-free: the tables it reads
  // never move.
  uint8_t* Data(PageId id) const { return Slot(id); }
  int64_t page_bytes() const { return page_bytes_; }
  // min(arena limit / page_bytes, 2^31 - 1): page ids are int32.
  int64_t max_pages() const { return max_pages_; }
  const std::string& name() const { return name_; }
  PoolStats Stats() const;

 private:
  // Page addresses live in segments that are never reallocated: segment s
  // holds the ids [64 (2^s - 1), 64 (2^(s+1) - 1)), allocated when its first
  // page is created. 26 segments cover every non-negative int32 id; the 27th
  // keeps the index in bounds for any 32-bit value.
  static constexpr uint32_t kFirstSegmentPages = 64;
  static constexpr int kSegments = 27;
  static int SegmentOf(int64_t id) {  // in [0, 26] for any id taken as uint32
    return 31 - absl::countl_zero(static_cast<uint32_t>(id) / kFirstSegmentPages + 1);
  }
  static int64_t SegmentStart(int segment) { return int64_t{kFirstSegmentPages} * ((int64_t{1} << segment) - 1); }
  // The table entry holding page `id`'s address.
  uint8_t*& Slot(int64_t id) const {
    const int segment = SegmentOf(id);
    return segments_[static_cast<size_t>(segment)][id - SegmentStart(segment)];
  }
  // Makes room in the tables for pages [created_, created_ + fresh) and in
  // `out` for `n` more ids, so that nothing after it can fail. Called with mu_ held.
  absl::Status Reserve(int64_t fresh, int64_t n, std::vector<PageId>* out);

  const std::string name_;
  const int64_t page_bytes_;
  Arena* const arena_;
  const int64_t max_pages_;
  std::array<std::unique_ptr<uint8_t*[]>, kSegments> segments_;  // written under mu_, read by Data()
  mutable std::mutex mu_;  // guards the members below
  std::vector<int32_t> refcount_;  // one per created page
  std::vector<PageId> free_;       // capacity >= created_: Unref never allocates
  int64_t created_ = 0;
  int64_t used_ = 0;
};

}  // namespace kvc

#endif  // KVC_PAGE_POOL_H_
