// No C++ exception crosses the C API: an allocation that fails inside an
// entry point comes back as KVC_ERR_RESOURCE_EXHAUSTED with a message, not
// as std::bad_alloc unwinding into C (where it would abort the process).
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvc/kvc.h"

namespace {

#if defined(__SANITIZE_ADDRESS__)
#define KVC_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVC_TEST_ASAN 1
#endif
#endif

#ifndef KVC_TEST_ASAN  // ASan reserves more address space than any limit this test can set
// Bytes of address space this process uses now (/proc/self/statm, in pages).
int64_t AddressSpaceBytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  long pages = 0;
  if (f == nullptr || std::fscanf(f, "%ld", &pages) != 1) pages = 0;
  if (f != nullptr) std::fclose(f);
  return static_cast<int64_t>(pages) * ::sysconf(_SC_PAGESIZE);
}

// In a child process: sequences holding ~13 MB of window rings, then a
// snapshot save under an address-space limit a few MB above what the process
// uses, so the save's buffers cannot be allocated. Exit status: 0 when the
// call returned KVC_ERR_RESOURCE_EXHAUSTED naming the function, 1 for any
// other return, 2 when an exception escaped it.
int SaveUnderAddressSpaceLimit() {
  kvc_options options;
  kvc_options_default(&options);
  kvc_cache* cache = nullptr;
  if (kvc_cache_create("v4-flash", &options, &cache) != KVC_OK) return 1;
  int32_t layers = 0;
  if (kvc_cache_num_layers(cache, &layers) != KVC_OK) return 1;
  std::vector<uint16_t> rows(128 * KVC_HEAD_DIM, 0x3F80);  // bf16 1.0
  std::vector<kvc_seq> seqs(4);
  for (kvc_seq& seq : seqs) {
    if (kvc_seq_create(cache, &seq) != KVC_OK) return 1;
    for (int32_t layer = 0; layer < layers; ++layer) {
      if (kvc_seq_append(cache, seq, layer, 0, rows.data(), 128) != KVC_OK) return 1;
    }
  }
  const std::string path = ::testing::TempDir() + "kvc_c_api_exceptions_" + std::to_string(::getpid()) + ".kvcsnap";
  struct rlimit limit;
  ::getrlimit(RLIMIT_AS, &limit);
  limit.rlim_cur = static_cast<rlim_t>(AddressSpaceBytes() + (int64_t{2} << 20));
  if (::setrlimit(RLIMIT_AS, &limit) != 0) return 1;
  int code = 0;
  try {
    code = kvc_snapshot_save(cache, seqs.data(), seqs.size(), path.c_str(), 0);
  } catch (...) {
    return 2;
  }
  std::remove(path.c_str());
  const bool named = std::strstr(kvc_last_error(), "kvc_snapshot_save") != nullptr;
  std::fprintf(stderr, "code %d: %s\n", code, kvc_last_error());
  return code == KVC_ERR_RESOURCE_EXHAUSTED && named ? 0 : 1;
}
#endif

TEST(CApiExceptions, AllocationFailureIsACodeNotAnException) {
#ifdef KVC_TEST_ASAN
  GTEST_SKIP() << "AddressSanitizer reserves more address space than any limit this test can set";
#else
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) ::_exit(SaveUnderAddressSpaceLimit());
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  EXPECT_NE(WEXITSTATUS(status), 2) << "std::bad_alloc escaped kvc_snapshot_save";
  EXPECT_EQ(WEXITSTATUS(status), 0);
#endif
}

}  // namespace
