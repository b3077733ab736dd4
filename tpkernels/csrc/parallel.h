// Work handed out on demand to torch's threads, for the kernels whose pieces are many and costly.
//
// at::parallel_for gives each thread one contiguous range, fixed before any of them starts, and
// returns when the slowest is done. That is a poor fit in two cases this project meets every step:
// - the pieces differ in cost (decode attention: one sequence's context is 30 tokens, the next
//   one's 700), so one thread works while the other waits;
// - a thread loses its core for a while (on a serving machine: Ray's threads, the gRPC front end,
//   the driver), and every other thread waits at the end for its whole range. On two cores a
//   background load of 2.4 % of the machine cost the in-process engine 9 % of its throughput.
// Here each thread takes the next piece when it finishes one, so a slow or delayed thread holds up
// at most the piece it is on (and one more, where a kernel claims a piece ahead to prefetch it).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace {

// Runs worker(claim) once on each of torch's threads (up to one per piece), where claim(begin, end)
// takes the next unclaimed piece of [0, n) -- `grain` indices, the last maybe fewer -- and returns
// false once none is left. A worker sets up what it needs (scratch memory) once, then claims until
// the work runs out. Pieces are handed out in increasing order. On one thread, or inside a parallel
// region, the caller's thread runs the one worker.
template <typename Worker>
inline void parallel_claims(int64_t n, int64_t grain, const Worker& worker) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t pieces = (n + grain - 1) / grain;
  std::atomic<int64_t> next{0};
  auto claim = [&](int64_t& begin, int64_t& end) {
    const int64_t p = next.fetch_add(1, std::memory_order_relaxed);
    if (p >= pieces) return false;
    begin = p * grain, end = std::min(n, begin + grain);
    return true;
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), pieces);
  if (threads <= 1 || at::in_parallel_region()) {
    worker(claim);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(claim); });
}

}  // namespace
