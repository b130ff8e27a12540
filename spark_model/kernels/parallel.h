// Spreading units of work over XLA's intra-op thread pool, from inside an FFI handler.
//
// The calling thread claims units from a shared counter like any helper, and then waits only
// for units that some thread has already claimed. It never waits for a helper to *start*:
// XLA may run several custom calls at once on the same pool, and a caller spinning until
// its scheduled helper gets a thread could wait on a pool whose threads all spin the same
// way. A helper that starts late finds no unit left and returns without touching the
// caller's frame (the counters live in a shared_ptr the helper owns a copy of).

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace spark {

struct UnitCounter {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Runs fn(u) for u in [0, n_units) on up to `workers` threads (the caller included).
template <class Fn>
void parallel_units(xla::ffi::ThreadPool& pool, int64_t n_units, int64_t workers, Fn&& fn) {
  workers = std::clamp<int64_t>(workers, 1, std::max<int64_t>(n_units, 1));
  if (workers <= 1) {
    for (int64_t u = 0; u < n_units; ++u) fn(u);
    return;
  }
  auto counter = std::make_shared<UnitCounter>();
  auto* body = &fn;
  auto drain = [counter, body, n_units] {
    for (int64_t u = counter->next.fetch_add(1); u < n_units; u = counter->next.fetch_add(1)) {
      (*body)(u);
      counter->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < workers; ++t) {
    auto task = drain;  // each helper owns a copy (and a reference to the counters)
    pool.Schedule(std::move(task));
  }
  drain();
  while (counter->done.load(std::memory_order_acquire) < n_units) std::this_thread::yield();
}

}  // namespace spark
