// The shared-memory all-reduce (see shm_all_reduce.h; the segment layout and the protocol are
// described in sharding/shm.py, and every constant below mirrors one there).

#include "shm_all_reduce.h"
#include "library.h"
#include "vec8.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <thread>
#include <type_traits>

namespace tpserve_shm {
namespace {

constexpr int64_t kHeaderWords = 256 / 8;
constexpr int64_t kCtlWords = 512 / 8;
constexpr int64_t kPosted = 0, kDone = 1, kState = 2;
constexpr int64_t kMeta = 8, kMetaWords = 16;  // metadata of buffer b: words kMeta + b * kMetaWords...
constexpr int64_t kClosed = 2, kAborted = 3;

constexpr int kSpinBurst = 32;
constexpr auto kPureSpin = std::chrono::microseconds(5);
constexpr auto kProbe = std::chrono::milliseconds(5);
constexpr auto kSleepMin = std::chrono::microseconds(20);
constexpr auto kSleepMax = std::chrono::milliseconds(1);

// sharding/shm.py's _DTYPES, whose index + 1 is a dtype's code in the segment.
constexpr const char* kDtypeNames[] = {"torch.float32", "torch.float16", "torch.bfloat16", "torch.float64",
                                       "torch.int64",   "torch.int32",   "torch.int16",    "torch.int8",
                                       "torch.uint8",   "torch.bool"};

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    case at::kDouble: return 4;
    default: return 0;
  }
}

std::string dtype_name(int64_t code) {
  return code >= 1 && code <= 10 ? kDtypeNames[code - 1] : "dtype code " + std::to_string(code);
}

// Start time of pid (clock ticks since boot, field 22 of /proc/<pid>/stat), or nothing when it is
// gone or a zombie: sharding.shm.proc_start_time.
std::optional<int64_t> proc_start_time(int64_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat", std::ios::binary);
  if (!f) return std::nullopt;
  std::string raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const size_t close = raw.rfind(')');
  if (close == std::string::npos || close + 2 > raw.size()) return std::nullopt;
  const char* p = raw.c_str() + close + 2;
  if (*p == 'Z' || *p == 'X' || *p == 'x') return std::nullopt;
  for (int field = 3; field < 22; ++field) {  // p is at field 3 (state); skip to field 22
    p = std::strchr(p, ' ');
    if (p == nullptr) return std::nullopt;
    ++p;
  }
  return std::strtoll(p, nullptr, 10);
}

// bfloat16 <-> float32 on the bits, as c10::BFloat16 converts (round to nearest even, NaN to the
// quiet 0x7FC0), written so that the compiler vectorizes the loops below; through c10::BFloat16
// the sum ran element by element, slower than the Python communicator's torch ops.
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t rounded = static_cast<uint16_t>(bf16_round_bits(u) >> 16);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : rounded;
}

// out[i] = bf16(float(s[0][i]) + float(s[1][i]) + ...), summed in rank order in float32.
void sum_bf16(uint16_t* out, const uint16_t* const* s, int64_t world, int64_t n) {
  if (world == 2) {
    const uint16_t* a = s[0];
    const uint16_t* b = s[1];
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16_bits(bf16_bits_to_float(a[i]) + bf16_bits_to_float(b[i]));
    return;
  }
  constexpr int64_t kChunk = 512;
  float acc[kChunk];
  for (int64_t off = 0; off < n; off += kChunk) {
    const int64_t m = std::min(kChunk, n - off);
    for (int64_t i = 0; i < m; ++i) acc[i] = bf16_bits_to_float(s[0][off + i]);
    for (int64_t j = 1; j < world; ++j)
      for (int64_t i = 0; i < m; ++i) acc[i] += bf16_bits_to_float(s[j][off + i]);
    for (int64_t i = 0; i < m; ++i) out[off + i] = float_to_bf16_bits(acc[i]);
  }
}

#ifdef __F16C__
// float16, two ranks: eight at a time with the F16C conversions (round to nearest even, as
// c10::Half); returns how many it summed (a multiple of 8), the rest goes element by element.
int64_t sum_f16_pairs(uint16_t* out, const uint16_t* a, const uint16_t* b, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
    const __m256 y = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_add_ps(x, y), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return i;
}
#endif

class Step {
 public:
  Step(const Channel& ch, int64_t k, double timeout_s) : ch_(ch), k_(k), timeout_s_(timeout_s) {}

  int64_t* word(int64_t rank, int64_t field) const {
    return reinterpret_cast<int64_t*>(ch_.base) + kHeaderWords + rank * kCtlWords + field;
  }
  static int64_t load(const int64_t* w) { return __atomic_load_n(w, __ATOMIC_ACQUIRE); }
  static void store(int64_t* w, int64_t v) { __atomic_store_n(w, v, __ATOMIC_RELEASE); }

  [[noreturn]] void fail(const char* kind, const std::string& message) const {
    store(word(ch_.rank, kState), kAborted);  // peers fail fast too
    throw std::runtime_error(std::string("tpserve-shm:") + kind + ":" + message);
  }

  // sharding.shm.ShmCommunicator._peer_problem
  std::optional<std::string> peer_problem(int64_t first) const {
    for (int64_t i = -1; i < ch_.world; ++i) {
      const int64_t j = i < 0 ? first : i;
      if (j == ch_.rank || (i >= 0 && j == first)) continue;
      const int64_t state = load(word(j, kState));
      if (state == kAborted) return "rank " + std::to_string(j) + " aborted after an error";
      if (state == kClosed) return "rank " + std::to_string(j) + " closed its communicator";
      const auto [pid, start] = ch_.pids[j];
      if (proc_start_time(pid) != std::optional<int64_t>(start))
        return "rank " + std::to_string(j) + " (pid " + std::to_string(pid) + ") has exited";
    }
    return std::nullopt;
  }

  // Until rank `peer`'s `field` reaches `target`: spin, then yield between bursts, then sleep with
  // growing intervals; probe the peers every few ms; give up at the deadline
  // (ShmCommunicator._wait).
  void wait(int64_t peer, int64_t field, int64_t target) const {
    const int64_t* w = word(peer, field);
    if (load(w) >= target) return;
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const auto yield_at = start + kPureSpin;
    const auto sleep_at = start + std::chrono::nanoseconds(ch_.spin_ns);
    auto probe_at = start + kProbe;
    const bool forever = !(timeout_s_ < 1e9);
    const auto deadline = start + std::chrono::nanoseconds(forever ? 0 : static_cast<int64_t>(timeout_s_ * 1e9));
    auto delay = std::chrono::nanoseconds(kSleepMin);
    while (true) {
      for (int i = 0; i < kSpinBurst; ++i) {
        if (load(w) >= target) return;
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      const auto now = clock::now();
      if (now >= probe_at) {
        const auto problem = peer_problem(peer);
        if (problem && load(w) < target)  // re-read: a peer may have posted just before it left
          fail("PeerDied", ch_.who + ": all_reduce (step " + std::to_string(k_) + ") waiting for rank " +
                               std::to_string(peer) + ": " + *problem);
        probe_at = now + kProbe;
      }
      if (!forever && now >= deadline) {
        const int64_t seen = load(w);
        if (seen >= target) return;
        char secs[32];
        std::snprintf(secs, sizeof secs, "%g", timeout_s_);
        fail("CollectiveTimeout", ch_.who + ": all_reduce (step " + std::to_string(k_) + ") timed out after " + secs +
                                      " s waiting for rank " + std::to_string(peer) + " (its counter is " +
                                      std::to_string(seen) + ", need " + std::to_string(target) +
                                      "); did it skip or reorder a collective?");
      }
      if (now >= sleep_at) {
        std::this_thread::sleep_for(delay);
        delay = std::min<std::chrono::nanoseconds>(delay * 2, kSleepMax);
      } else if (now >= yield_at) {
        sched_yield();
      }
    }
  }

  char* slot(int64_t b, int64_t r) const {
    return ch_.base + ch_.data_offset + (b * ch_.world + r) * ch_.capacity;
  }

  // Step k of an all-reduce on n elements at `data` (ShmCommunicator._all_reduce_step).
  template <typename T>
  void all_reduce(T* data, int64_t n, int64_t code) const {
    const int64_t b = k_ & 1, me = ch_.rank, world = ch_.world;
    for (int64_t j = 0; j < world; ++j)  // nobody still reads buffer b from step k - 2
      if (j != me) wait(j, kDone, k_ - 2);
    const int64_t signature = n * 16 + code;
    store(word(me, kMeta + b * kMetaWords), signature);
    std::memcpy(slot(b, me), data, n * sizeof(T));
    store(word(me, kPosted), k_);
    for (int64_t j = 0; j < world; ++j)
      if (j != me) wait(j, kPosted, k_);
    for (int64_t j = 0; j < world; ++j) {
      const int64_t theirs = load(word(j, kMeta + b * kMetaWords));
      if (j != me && theirs != signature)
        fail("ValueError", "all_reduce: rank " + std::to_string(me) + " passed " + std::to_string(n) + " x " +
                               dtype_name(code) + ", rank " + std::to_string(j) + " passed " +
                               std::to_string(theirs / 16) + " x " + dtype_name(theirs % 16));
    }
    // In rank order on every rank, so that all get the very same sums; 16-bit floats are summed in
    // float32 and rounded once, as the Python communicator does.
    // bfloat16 slots are read as their bits (sum_bf16); the pointers are typed so from the start,
    // since reading typed pointers through a cast of their array broke the aliasing rules (the
    // optimizer loaded them before they were set: a crash at once).
    using Elem = std::conditional_t<std::is_same_v<T, c10::BFloat16>, uint16_t, T>;
    std::vector<const Elem*> s(world);
    for (int64_t j = 0; j < world; ++j) s[j] = reinterpret_cast<const Elem*>(slot(b, j));
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      for (int64_t i = 0; i < n; ++i) data[i] = s[0][i] + s[1][i];
      for (int64_t j = 2; j < world; ++j)
        for (int64_t i = 0; i < n; ++i) data[i] += s[j][i];
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      sum_bf16(reinterpret_cast<uint16_t*>(data), s.data(), world, n);
    } else {
      int64_t i = 0;
#ifdef __F16C__
      if (world == 2) i = sum_f16_pairs(reinterpret_cast<uint16_t*>(data), reinterpret_cast<const uint16_t*>(slot(b, 0)),
                                        reinterpret_cast<const uint16_t*>(slot(b, 1)), n);
#endif
      for (; i < n; ++i) {
        float acc = static_cast<float>(s[0][i]);
        for (int64_t j = 1; j < world; ++j) acc += static_cast<float>(s[j][i]);
        data[i] = T(acc);
      }
    }
    store(word(me, kDone), k_);
  }

 private:
  const Channel& ch_;
  const int64_t k_;
  const double timeout_s_;
};

template <typename T>
int64_t all_reduce_typed(const Channel& ch, at::Tensor& t, int64_t step, double timeout_s, int64_t code) {
  T* data = t.data_ptr<T>();
  const int64_t numel = t.numel(), chunk = ch.capacity / static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < numel; off += chunk) {
    Step(ch, ++step, timeout_s).all_reduce(data + off, std::min(chunk, numel - off), code);
  }
  return step;
}

}  // namespace

Channel Channel::from(at::IntArrayRef d, const std::string& who) {
  TORCH_CHECK(d.size() >= 6 && d[2] >= 1 && static_cast<int64_t>(d.size()) == 6 + 2 * d[2],
              "shm channel: [address, rank, world, capacity, data offset, spin ns, (pid, start) per rank]");
  Channel ch;
  ch.base = reinterpret_cast<char*>(d[0]);
  ch.rank = d[1], ch.world = d[2], ch.capacity = d[3], ch.data_offset = d[4], ch.spin_ns = d[5];
  TORCH_CHECK(ch.base != nullptr && 0 <= ch.rank && ch.rank < ch.world && ch.capacity >= 16,
              "shm channel: bad descriptor");
  for (int64_t j = 0; j < ch.world; ++j) ch.pids.emplace_back(d[6 + 2 * j], d[7 + 2 * j]);
  ch.who = who;
  return ch;
}

int64_t all_reduce(const Channel& ch, at::Tensor& t, int64_t step, double timeout_s) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "shm all_reduce: need a contiguous CPU tensor");
  if (ch.world == 1 || t.numel() == 0) return step;
  const int64_t code = dtype_code(t.scalar_type());
  switch (t.scalar_type()) {
    case at::kFloat: return all_reduce_typed<float>(ch, t, step, timeout_s, code);
    case at::kDouble: return all_reduce_typed<double>(ch, t, step, timeout_s, code);
    case at::kBFloat16: return all_reduce_typed<c10::BFloat16>(ch, t, step, timeout_s, code);
    case at::kHalf: return all_reduce_typed<c10::Half>(ch, t, step, timeout_s, code);
    default: TORCH_CHECK(false, "shm all_reduce: unsupported dtype ", t.scalar_type());
  }
}

}  // namespace tpserve_shm

namespace {

int64_t shm_all_reduce_(at::Tensor t, at::IntArrayRef channel, c10::string_view who, double timeout_s,
                        int64_t step) {
  const auto ch = tpserve_shm::Channel::from(channel, std::string(who));
  return tpserve_shm::all_reduce(ch, t, step, timeout_s);
}

}  // namespace

TPSERVE_LIBRARY_FRAGMENT(TPSERVE_NS, m) {
  m.def("shm_all_reduce_(Tensor(a!) t, int[] channel, str who, float timeout_s, int step) -> int");
}

TPSERVE_LIBRARY_IMPL(TPSERVE_NS, CPU, m) { m.impl("shm_all_reduce_", &shm_all_reduce_); }
