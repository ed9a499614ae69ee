// The core's CPU thread pool. One pool per process, sized from APHRODITE_NUM_THREADS or the CPUs
// this process may run on. The calling thread takes part in the work; nested parallel regions
// run serially on the thread that reached them.
#pragma once

#include <cstdint>
#include <functional>

namespace aphrodite {

int num_threads();
// Changes the pool size (>= 1). Safe while other threads run parallel regions: they finish on
// the pool they started on.
void set_num_threads(int n);

// Runs fn(task) for task in [0, num_tasks) across the pool and returns when all are done.
// The first exception thrown by a task is rethrown here after all tasks stopped.
void parallel_run(std::int64_t num_tasks, const std::function<void(std::int64_t)>& fn);

// Splits [begin, end) into contiguous chunks of at least `grain` items, one or more per thread,
// and calls fn(chunk_begin, chunk_end) for each.
void parallel_for(std::int64_t begin, std::int64_t end, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& fn);

}  // namespace aphrodite
