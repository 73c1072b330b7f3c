#include "kvc/executor.h"

#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"

namespace kvc {
namespace {

class Inline final : public Executor {
 public:
  int concurrency() const override { return 1; }
  void ParallelFor(int64_t count, absl::FunctionRef<void(int64_t)> task) override {
    for (int64_t i = 0; i < count; ++i) task(i);
  }
};

// One oneTBB arena; each task is its own range element (kvc's tasks are
// coarse: a slice of keys or tokens), scheduled by work stealing.
class TbbExecutor final : public Executor {
 public:
  explicit TbbExecutor(int threads) : threads_(threads), arena_(threads) {}
  int concurrency() const override { return threads_; }
  void ParallelFor(int64_t count, absl::FunctionRef<void(int64_t)> task) override {
    if (count <= 0) return;
    if (count == 1 || threads_ == 1) {
      for (int64_t i = 0; i < count; ++i) task(i);
      return;
    }
    arena_.execute([&] {
      tbb::parallel_for(tbb::blocked_range<int64_t>(0, count, 1), [&](const tbb::blocked_range<int64_t>& range) {
        for (int64_t i = range.begin(); i < range.end(); ++i) task(i);
      }, tbb::simple_partitioner());
    });
  }

 private:
  int threads_;
  tbb::task_arena arena_;
};

}  // namespace

Executor& InlineExecutor() {
  static Inline* const executor = new Inline;
  return *executor;
}

absl::StatusOr<std::unique_ptr<Executor>> ThreadPoolExecutor(int threads) {
  if (threads < 1 || threads > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("ThreadPoolExecutor: ", threads, " threads; expected 1..1024"));
  }
  return std::unique_ptr<Executor>(new TbbExecutor(threads));
}

}  // namespace kvc
