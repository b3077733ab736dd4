// The shared-memory all-reduce of sharding/shm.py, run from C++: the same segment, the same steps
// and counters, the same waiting policy and errors, so a rank can mix it freely with the Python
// communicator's own collectives (both advance one step counter; see ShmCommunicator.native).
//
// Why in C++: the decode stack (decode_stack.cpp) can run a whole step's blocks in one call at
// TP > 1 only if it can all-reduce between them itself. Called from Python on its own it costs
// about what the Python steps cost (a 4 KiB all-reduce between two pinned ranks: 7.2 us either
// way on the Zen 3 VM): there the call's own overhead dominates.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace tpserve_shm {

// One rank's view of a communicator's segment, from the integers ShmCommunicator._native_channel
// gives: [segment address, rank, world size, slot capacity (bytes), data offset (bytes), spin time
// (ns), then for each rank its pid and start time (its own included, unused)].
struct Channel {
  char* base = nullptr;
  int64_t rank = 0, world = 1, capacity = 0, data_offset = 0, spin_ns = 0;
  std::vector<std::pair<int64_t, int64_t>> pids;  // per rank: (pid, start time)
  std::string who;                                // "ShmCommunicator[<tag>] rank r/w", for messages

  static Channel from(at::IntArrayRef descriptor, const std::string& who);
};

// Sums t (contiguous CPU, float32 / float64 / bfloat16 / float16) over the ranks in place, in as
// many steps as the Python communicator takes (one per `capacity` bytes), starting after `step`;
// returns the last step done. On a dead or stuck peer or mismatched calls it marks this rank
// aborted in the segment and throws std::runtime_error("tpserve-shm:<Kind>:<message>"), Kind being
// PeerDied, CollectiveTimeout or ValueError (ShmCommunicator.native turns it into that exception).
int64_t all_reduce(const Channel& ch, at::Tensor& t, int64_t step, double timeout_s);

}  // namespace tpserve_shm
