// Where kvc runs work that can run in parallel. kvc never starts a thread of
// its own: a call runs on its caller's thread unless the engine hands kvc an
// Executor (CacheOptions::executor, or the executor argument of a function),
// and then kvc runs independent tasks through it and nothing else.
//
// An engine with its own thread pool implements Executor over it; one
// without can take ThreadPoolExecutor(n), a oneTBB task arena of n slots
// (the calling thread and at most n - 1 oneTBB worker threads).
//
// Every result kvc computes through an executor is bit-identical to the
// single-threaded result, whatever the concurrency: tasks write disjoint
// outputs and nothing is reduced across tasks in a thread-dependent order.
#ifndef KVC_EXECUTOR_H_
#define KVC_EXECUTOR_H_

#include <cstdint>
#include <memory>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"

namespace kvc {

class Executor {
 public:
  virtual ~Executor() = default;

  // How many tasks may run at once (>= 1): kvc sizes its tasks by it.
  virtual int concurrency() const = 0;

  // Runs task(0) .. task(count - 1), each exactly once, on at most
  // concurrency() threads at a time (the calling thread may be one of them),
  // in any order, and returns when all have finished. count >= 0. kvc's tasks
  // do not throw and do not block on one another. It may be called from
  // several threads at once, and from inside one of its own tasks (a cache
  // call from an engine's worker): it must not deadlock then, e.g. run the
  // nested tasks on the calling thread.
  virtual void ParallelFor(int64_t count, absl::FunctionRef<void(int64_t)> task) = 0;
};

// Runs every task on the calling thread, in order (what kvc does when given
// no executor).
Executor& InlineExecutor();

// A oneTBB task arena of `threads` slots, 1..1024: ParallelFor runs the
// tasks on the calling thread and up to threads - 1 oneTBB worker threads
// (created by oneTBB when first needed, shared with any other arena in the
// process, never more than the arenas ask for). Nested ParallelFor calls
// join the same arena. kInvalidArgument for a thread count out of range.
absl::StatusOr<std::unique_ptr<Executor>> ThreadPoolExecutor(int threads);

// The executor to use for `executor` (nullptr: InlineExecutor()).
inline Executor& ExecutorOrInline(Executor* executor) { return executor != nullptr ? *executor : InlineExecutor(); }

}  // namespace kvc

#endif  // KVC_EXECUTOR_H_
