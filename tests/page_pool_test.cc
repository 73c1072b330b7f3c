#include "kvc/page_pool.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvc {
namespace {

using ::testing::HasSubstr;

TEST(PagePool, PagesAreZeroedAlignedAndReused) {
  Arena arena("state", 10 * 4096);
  PagePool pool("ring", 4000, &arena);  // rounded up to 4032
  EXPECT_EQ(pool.page_bytes(), 4032);
  std::vector<PageId> pages;
  ASSERT_TRUE(pool.Allocate(3, &pages).ok());
  for (PageId id : pages) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(pool.Data(id)) % kPageAlignment, 0u);
    for (int64_t i = 0; i < pool.page_bytes(); ++i) ASSERT_EQ(pool.Data(id)[i], 0);
    std::memset(pool.Data(id), 0xEE, static_cast<size_t>(pool.page_bytes()));
  }
  pool.Unref(pages[1]);
  std::vector<PageId> again;
  ASSERT_TRUE(pool.Allocate(1, &again).ok());
  EXPECT_EQ(again[0], pages[1]);  // from the free list, not the arena
  EXPECT_EQ(pool.Data(again[0])[17], 0);  // and zeroed again
  EXPECT_EQ(arena.reserved_bytes(), 3 * 4032);
}

TEST(PagePool, ExhaustionNamesThePoolAndChangesNothing) {
  Arena arena("history", 5 * 1024);
  PagePool pool("compressed rows", 1024, &arena);
  std::vector<PageId> pages;
  ASSERT_TRUE(pool.Allocate(4, &pages).ok());
  const PoolStats before = pool.Stats();
  const absl::Status status = pool.Allocate(2, &pages);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(status.message()), HasSubstr("compressed rows"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("history arena"));
  EXPECT_EQ(pages.size(), 4u);
  EXPECT_EQ(pool.Stats().used_pages, before.used_pages);
  EXPECT_EQ(pool.Stats().free_pages, before.free_pages);
  EXPECT_FALSE(pool.CanAllocate(2));
  EXPECT_TRUE(pool.CanAllocate(1));
}

TEST(PagePool, CarvesPagesFromAnEngineRegion) {
  std::vector<uint8_t> region(3 * 1024 + 100);
  Arena arena("engine", absl::MakeSpan(region));
  EXPECT_LE(arena.limit_bytes(), 3 * 1024 + 64);
  PagePool pool("keys", 1024, &arena);
  std::vector<PageId> pages;
  ASSERT_TRUE(pool.Allocate(3, &pages).ok());
  for (PageId id : pages) {
    EXPECT_GE(pool.Data(id), region.data());
    EXPECT_LE(pool.Data(id) + 1024, region.data() + region.size());
  }
  EXPECT_EQ(pool.Allocate(1, &pages).code(), absl::StatusCode::kResourceExhausted);
}

// Random allocate / share / release against a model of reference counts.
TEST(PagePool, RandomOperationsKeepCountsAndNeverLeak) {
  Arena arena("prop", 64 * 256);
  PagePool a("a", 256, &arena), b("b", 512, &arena);
  std::mt19937 rng(42);
  std::map<std::pair<PagePool*, PageId>, int> model;  // live page -> refs
  for (int step = 0; step < 20000; ++step) {
    PagePool* pool = rng() % 2 ? &a : &b;
    const int op = static_cast<int>(rng() % 3);
    if (op == 0) {
      std::vector<PageId> got;
      const int64_t n = 1 + rng() % 3;
      const bool could = pool->CanAllocate(n);
      const absl::Status s = pool->Allocate(n, &got);
      ASSERT_EQ(s.ok(), could);
      if (s.ok()) {
        for (PageId id : got) {
          ASSERT_EQ(model.count({pool, id}), 0u) << "handed out a live page";
          model[{pool, id}] = 1;
        }
      } else {
        ASSERT_TRUE(got.empty());
      }
    } else if (!model.empty()) {
      auto it = model.begin();
      std::advance(it, static_cast<long>(rng() % model.size()));
      PagePool* owner = it->first.first;
      if (op == 1) {
        owner->Ref(it->first.second);
        ++it->second;
      } else {
        owner->Unref(it->first.second);
        if (--it->second == 0) model.erase(it);
      }
    }
    if (step % 997 == 0) {
      for (const auto& [key, refs] : model) ASSERT_EQ(key.first->RefCount(key.second), refs);
    }
  }
  // used = live pages; used + free = everything ever taken from the arena.
  int64_t live_a = 0, live_b = 0;
  for (const auto& [key, refs] : model) (key.first == &a ? live_a : live_b) += 1;
  EXPECT_EQ(a.Stats().used_pages, live_a);
  EXPECT_EQ(b.Stats().used_pages, live_b);
  EXPECT_EQ(a.Stats().reserved_bytes() + b.Stats().reserved_bytes(), arena.reserved_bytes());
  for (const auto& [key, refs] : model) {
    for (int r = 0; r < refs; ++r) key.first->Unref(key.second);
  }
  EXPECT_EQ(a.Stats().used_pages + b.Stats().used_pages, 0);
}


// Resident memory of this process (bytes), from /proc/self/statm.
int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// A pool's tables grow with the pages it hands out, never with the limit:
// "no limit" (INT64_MAX) with 64-byte pages costs nothing until used.
TEST(PagePool, BookkeepingGrowsWithUseNotWithTheLimit) {
  Arena arena("history", INT64_MAX);
  const int64_t before = ResidentBytes();
  PagePool pool("tiny", 64, &arena);
  EXPECT_LT(ResidentBytes() - before, 1 << 20);
  // Pages keep their addresses and contents while the tables grow.
  std::vector<PageId> ids;
  std::vector<uint8_t*> where;
  for (int i = 0; i < 5000; ++i) {
    ASSERT_TRUE(pool.Allocate(1 + i % 3, &ids).ok());
    while (where.size() < ids.size()) {
      uint8_t* page = pool.Data(ids[where.size()]);
      std::memset(page, static_cast<int>(where.size() % 251), 64);
      where.push_back(page);
    }
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    ASSERT_EQ(pool.Data(ids[i]), where[i]);
    ASSERT_EQ(pool.Data(ids[i])[63], i % 251);
    ASSERT_EQ(pool.RefCount(ids[i]), 1);
  }
  // Requests no arena could meet are refused, not overflowed.
  const size_t held = ids.size();
  EXPECT_EQ(pool.Allocate(INT64_MAX / 2, &ids).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool.Allocate(int64_t{1} << 40, &ids).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool.Allocate(-1, &ids).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ids.size(), held);
  EXPECT_FALSE(pool.CanAllocate(INT64_MAX / 2));
  EXPECT_EQ(pool.Stats().used_pages, static_cast<int64_t>(held));
}

}  // namespace
}  // namespace kvc
