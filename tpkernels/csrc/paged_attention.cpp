// Decode attention read straight from the paged KV cache: no gather copy.
//
// One query token per sequence. For sequence i and KV head h, the G = q_heads / kv_heads query
// heads that share h are scored against every cached key of the sequence, block by block as its
// block table lists them, then softmax-weighted V is summed. K and V are read once per (i, h),
// which is what the step's attention costs at best: it is memory-bound.
//
// Cache layout (see worker/kv_cache.py): (kv_heads, num_blocks, block_size * head_dim); the rows
// of one block of one head are contiguous. Computation is in float32 whatever the storage dtype.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "library.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Blocks of a sequence lie anywhere in the cache, so the hardware prefetcher stalls at each
// block boundary; fetching the next block's row while this one is used hides that latency.
template <typename T>
inline void prefetch_row(const T* p, int64_t d) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < d * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(c + o);
}

// Calls fn(t, row) for the cached tokens t = start .. L-1 of one sequence and KV head, in order;
// `head` is that head's first block and `table` the sequence's block table. Each token's row in
// the next block is prefetched while this block's row is used.
template <typename T, typename Fn>
inline void for_each_row(const T* head, const int64_t* table, int64_t bs, int64_t d, int64_t start,
                         int64_t L, Fn&& fn) {
  for (int64_t t = start; t < L;) {
    const int64_t b = t / bs, stop = std::min(L, (b + 1) * bs);
    const T* block = head + table[b] * bs * d;
    const T* next = stop < L ? head + table[b + 1] * bs * d : nullptr;
    for (; t < stop; ++t) {
      if (next) prefetch_row(next + (t % bs) * d, d);
      fn(t, block + (t % bs) * d);
    }
  }
}

typedef float v8 __attribute__((vector_size(32), aligned(4)));  // unaligned 8-float loads and stores
typedef int32_t i8 __attribute__((vector_size(32)));

// e^x for 8 values x <= 0 at once (scores minus their maximum), to ~2 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, 2^n put in the exponent bits. A scalar
// libm expf per score cost more than the rest of the kernel (2.4 ms of a 64-sequence, 600-token
// step at 24 GB/s).
inline v8 exp8(v8 x) {
  x = x < -87.f ? -87.f : x;  // e^-87 ~ 1.6e-38: below that everything rounds away anyway
  const v8 t = x * 1.44269504f;  // x / ln2
  const v8 n = (t + 12582912.f) - 12582912.f;  // t rounded to nearest by the 1.5 * 2^23 trick
  const v8 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 in two parts: exact n * hi
  v8 p = r * (1.f / 720.f) + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const i8 e = (__builtin_convertvector(n, i8) + 127) << 23;
  return p * (v8)e;
}

// s[j] = e^(s[j] - m) for j < span; returns their sum.
inline float exp_shift_sum(float* s, int64_t span, float m) {
  float sum = 0.f;
  int64_t j = 0;
  for (; j + 8 <= span; j += 8) {
    v8 e = exp8(*reinterpret_cast<v8*>(s + j) - m);
    *reinterpret_cast<v8*>(s + j) = e;
    for (int l = 0; l < 8; ++l) sum += e[l];
  }
  for (; j < span; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }

typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

inline v8 load8(const c10::BFloat16* p) {  // widened: a bfloat16 is the top half of a float32
  const u16x8 h = *reinterpret_cast<const u16x8*>(p);
  return (v8)(__builtin_convertvector(h, u32x8) << 16);
}

inline float hsum8(v8 v) {
  v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

// The register-blocked path, for head sizes of whole 8-float vectors and up to 8 query heads per
// KV head: the G query vectors stay in registers while each key row streams by once, and the
// weighted V sum keeps G x 4 vectors of accumulators in registers, a quarter of a 128-dim row (half
// of a 64-dim one) per pass, instead of loading and storing them for every cached token.
template <int D, int G, typename T>
void blocked_scores(const float* qf, const T* kh, const int64_t* table, int64_t bs, int64_t start,
                    int64_t L, float* scores, int64_t span) {
  constexpr int V = D / 8;
  v8 q[G][V];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) q[g][i] = load8(qf + g * D + 8 * i);
  for_each_row(kh, table, bs, D, start, L, [&](int64_t t, const T* kr) {
    v8 kv[V];
    for (int i = 0; i < V; ++i) kv[i] = load8(kr + 8 * i);
    for (int g = 0; g < G; ++g) {
      v8 a = q[g][0] * kv[0];
      for (int i = 1; i < V; ++i) a += q[g][i] * kv[i];
      scores[g * span + t - start] = hsum8(a);
    }
  });
}

template <int D, int G, typename T>
void blocked_weighted_sum(const float* scores, int64_t span, const T* vh, const int64_t* table, int64_t bs,
                          int64_t start, int64_t L, float* acc) {
  constexpr int V = D / 8, C = 4;
  for (int c0 = 0; c0 < V; c0 += C) {
    v8 a[G][C] = {};
    for_each_row(vh, table, bs, D, start, L, [&](int64_t t, const T* vr) {
      v8 vv[C];
      for (int c = 0; c < C; ++c) vv[c] = load8(vr + 8 * (c0 + c));
      for (int g = 0; g < G; ++g) {
        const float p = scores[g * span + t - start];
        for (int c = 0; c < C; ++c) a[g][c] += p * vv[c];
      }
    });
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < C; ++c) *reinterpret_cast<v8*>(acc + g * D + 8 * (c0 + c)) = a[g][c];
  }
}

// Runs fn(std::integral_constant<int, G>) for G in 1..8; false for larger groups.
template <typename Fn>
inline bool with_group(int64_t G, Fn&& fn) {
  switch (G) {
    case 1: fn(std::integral_constant<int, 1>{}); return true;
    case 2: fn(std::integral_constant<int, 2>{}); return true;
    case 3: fn(std::integral_constant<int, 3>{}); return true;
    case 4: fn(std::integral_constant<int, 4>{}); return true;
    case 5: fn(std::integral_constant<int, 5>{}); return true;
    case 6: fn(std::integral_constant<int, 6>{}); return true;
    case 7: fn(std::integral_constant<int, 7>{}); return true;
    case 8: fn(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

template <int64_t D, typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  if constexpr (D > 0) d = D;
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t x = 0; x < d; ++x) s += q[x] * static_cast<float>(k[x]);
  return s;
}

template <int64_t D, typename T>
inline void axpy(float p, const T* v, float* acc, int64_t d) {
  if constexpr (D > 0) d = D;
#pragma omp simd
  for (int64_t x = 0; x < d; ++x) acc[x] += p * static_cast<float>(v[x]);
}

template <int64_t D, typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t window,
                   at::Tensor& out) {
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = k_cache.size(0), num_blocks = k_cache.size(1);
  const int64_t bs = k_cache.size(2) / d, G = hq / hkv;
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t ts0 = tables.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, n * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * d), acc(G * d), scores;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / hkv, h = w % hkv;
      const int64_t L = lp[i];
      const int64_t start = window > 0 ? std::max<int64_t>(0, L - window) : 0;
      const int64_t span = L - start;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t x = 0; x < d; ++x)
          qf[g * d + x] = static_cast<float>(qp[i * qs0 + (h * G + g) * qs1 + x]) * sc;
      scores.resize(G * span);
      const T* kh = kp + h * num_blocks * bs * d;
      const T* vh = vp + h * num_blocks * bs * d;
      const int64_t* table = tp + i * ts0;
      // scores[g * span + (t - start)] = q_g . k_t
      constexpr bool blocked = D > 0 && D % 32 == 0 && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>);
      bool done = false;
      if constexpr (blocked)
        done = with_group(G, [&](auto g) {
          blocked_scores<D, decltype(g)::value>(qf.data(), kh, table, bs, start, L, scores.data(), span);
        });
      if (!done)
        for_each_row(kh, table, bs, d, start, L, [&](int64_t t, const T* kr) {
          for (int64_t g = 0; g < G; ++g) scores[g * span + t - start] = dot<D>(&qf[g * d], kr, d);
        });
      std::vector<float> denom(G);
      for (int64_t g = 0; g < G; ++g) {
        float* s = &scores[g * span];
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < span; ++j) m = std::max(m, s[j]);
        denom[g] = exp_shift_sum(s, span, m);
      }
      if constexpr (blocked)
        if (done)
          with_group(G, [&](auto g) {
            blocked_weighted_sum<D, decltype(g)::value>(scores.data(), span, vh, table, bs, start, L, acc.data());
          });
      if (!done) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for_each_row(vh, table, bs, d, start, L, [&](int64_t t, const T* vr) {
          for (int64_t g = 0; g < G; ++g) axpy<D>(scores[g * span + t - start], vr, &acc[g * d], d);
        });
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / denom[g];
        T* o = op + i * os0 + (h * G + g) * os1;
        for (int64_t x = 0; x < d; ++x) o[x] = static_cast<T>(acc[g * d + x] * inv);
      }
    }
  });
}

void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            double scale, int64_t window, at::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_cache.dim() == 3, "q, out (n, heads, d); cache (kv_heads, blocks, row)");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && out.scalar_type() == q.scalar_type() &&
              v_cache.scalar_type() == q.scalar_type(), "q, cache and out must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block tables and context lengths must be int64");
  TORCH_CHECK(block_tables.stride(1) == 1 && context_lens.is_contiguous(), "tables rows must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.size(2) % q.size(2) == 0, "cache row must hold whole head_dim vectors");
  TORCH_CHECK(out.size(0) == q.size(0) && block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0),
              "one table and one length per query token");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    switch (q.size(2)) {  // the common head sizes get fully unrolled loops
      case 64: decode_kernel<64, scalar_t>(q, k_cache, v_cache, block_tables, context_lens, scale, window, out); break;
      case 128: decode_kernel<128, scalar_t>(q, k_cache, v_cache, block_tables, context_lens, scale, window, out); break;
      default: decode_kernel<0, scalar_t>(q, k_cache, v_cache, block_tables, context_lens, scale, window, out);
    }
  });
}

}  // namespace

TPSERVE_LIBRARY(TPSERVE_NS, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window, Tensor(a!) out) -> ()");
}

TPSERVE_LIBRARY_IMPL(TPSERVE_NS, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
