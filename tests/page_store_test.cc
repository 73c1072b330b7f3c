// PageStore's own contracts that the cache tests cannot see from outside:
// freshly granted pages of kvc's arrays are mapped at the grant (one
// MADV_POPULATE_WRITE per layer), not page-faulted in by the writes after it.
#include "src/page_store.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "kvc/cache.h"
#include "kvc/model_spec.h"

namespace kvc::cache_internal {
namespace {

struct Residency {
  int64_t resident = 0;
  int64_t spanned = 0;  // OS pages holding the range
};

// Which OS pages holding [p, p + bytes) are resident.
Residency ResidentPages(const uint8_t* p, int64_t bytes) {
  const uintptr_t os_page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p) & ~(os_page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
  std::vector<unsigned char> in_core((end - begin + os_page - 1) / os_page);
  EXPECT_EQ(::mincore(reinterpret_cast<void*>(begin), end - begin, in_core.data()), 0);
  Residency r;
  r.spanned = static_cast<int64_t>(in_core.size());
  for (const unsigned char c : in_core) r.resident += c & 1;
  return r;
}

// Whether this kernel maps a range on MADV_POPULATE_WRITE (Linux >= 5.14).
bool KernelPopulates() {
  const size_t bytes = 1 << 16;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  const bool ok = ::madvise(p, bytes, MADV_POPULATE_WRITE) == 0;
  ::munmap(p, bytes);
  return ok;
}

TEST(PageStore, GrantedPagesAreMappedBeforeAnyWriteAndReadAsZero) {
  if (!KernelPopulates()) GTEST_SKIP() << "this kernel refuses MADV_POPULATE_WRITE (before Linux 5.14): pages fault in on write";
  const ModelSpec spec = ModelSpec::V4Flash();
  CacheOptions options;
  options.history_bytes = int64_t{1} << 30;
  absl::StatusOr<std::unique_ptr<PageStore>> store = PageStore::Create(spec, options);
  ASSERT_TRUE(store.ok()) << store.status();
  const int s = static_cast<int>(Stream::kCsaRows);
  const int64_t page_bytes = (*store)->spec(s).page_bytes;
  const int32_t layer = (*store)->spec(s).layers.front();
  std::vector<PageId> ids;
  ASSERT_TRUE((*store)->Allocate(s, 1, &ids).ok());  // id 0 (a partly shared OS page follows)
  const int64_t far = 64;  // ids 64..95: OS pages no other granted id touches
  const uint8_t* untouched = (*store)->Page(s, layer, static_cast<PageId>(far));
  ASSERT_EQ(ResidentPages(untouched, 32 * page_bytes).resident, 0) << "a page not yet granted is already mapped";
  ASSERT_TRUE((*store)->Allocate(s, far + 32 - 1, &ids).ok());
  ASSERT_EQ(ids.back(), static_cast<PageId>(far + 31));
  const Residency granted = ResidentPages(untouched, 32 * page_bytes);
  EXPECT_EQ(granted.resident, granted.spanned);
  // In every layer of the stream, and still zero.
  for (const int32_t l : (*store)->spec(s).layers) {
    const uint8_t* p = (*store)->Page(s, l, static_cast<PageId>(far));
    const Residency r = ResidentPages(p, 32 * page_bytes);
    EXPECT_EQ(r.resident, r.spanned) << "layer " << l;
    for (int64_t i = 0; i < 32 * page_bytes; ++i) ASSERT_EQ(p[i], 0) << "layer " << l << " byte " << i;
  }
}

}  // namespace
}  // namespace kvc::cache_internal
