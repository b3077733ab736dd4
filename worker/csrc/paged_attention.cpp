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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
      for_each_row(kh, table, bs, d, start, L, [&](int64_t t, const T* kr) {
        for (int64_t g = 0; g < G; ++g) scores[g * span + t - start] = dot<D>(&qf[g * d], kr, d);
      });
      std::vector<float> denom(G);
      for (int64_t g = 0; g < G; ++g) {
        float* s = &scores[g * span];
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < span; ++j) m = std::max(m, s[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < span; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        denom[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_row(vh, table, bs, d, start, L, [&](int64_t t, const T* vr) {
        for (int64_t g = 0; g < G; ++g) axpy<D>(scores[g * span + t - start], vr, &acc[g * d], d);
      });
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

TORCH_LIBRARY(tpserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tpserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
