// Decode attention read straight from the paged KV cache: no gather copy.
//
// One query token per sequence. For sequence i and KV head h, the G = q_heads / kv_heads query
// heads that share h are scored against every cached key of the sequence, block by block as its
// block table lists them, then softmax-weighted V is summed. K and V are read once per (i, h),
// which is what the step's attention costs at best: it is memory-bound. On AVX-512 they stream
// side by side in one pass, the softmax taken online (`avx512_online`).
//
// Rows that see the same cached keys -- the rows of a prefill chunk, decodes that share a prompt
// prefix -- are cut into tiles (`plan_tiles`), and each tile reads its shared keys once for all
// its rows (`avx512_tile`; without AVX-512, `v8_tile`); each row's own keys after those go the
// row-by-row way, and the two softmax parts are merged by their maxima and sums.
//
// Cache layout (see worker/kv_cache.py): (kv_heads, num_blocks, block_size * head_dim); the rows
// of one block of one head are contiguous. Computation is in float32 whatever the storage dtype.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include "library.h"
#include "parallel.h"
#include "vec8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
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

// Where tokens t0 .. t0 + K - 1 lie in one block (with 16-token blocks: every chunk from 0), the
// offset in elements of t0's cache row from its head's first block; -1 where they do not.
template <int K = 16>
inline int64_t block_run_offset(const int64_t* table, int64_t bs, int64_t d, int64_t t0) {
  const int64_t r = t0 % bs;
  return r + K <= bs ? (table[t0 / bs] * bs + r) * d : -1;
}

// The cache rows of tokens t0 .. t0 + n - 1 (n <= K) of one sequence and KV head; the rest of the
// K point at the first one, so a short last chunk is computed whole and only n results are kept.
template <int K = 16, typename T>
inline void chunk_rows(const T* head, const int64_t* table, int64_t bs, int64_t d, int64_t t0, int n,
                       const T** rows) {
  if (const int64_t off = block_run_offset<K>(table, bs, d, t0); off >= 0) {
    for (int j = 0; j < K; ++j) rows[j] = head + off + (j < n ? j : 0) * d;
    return;
  }
  int64_t b = t0 / bs, r = t0 % bs;
  const T* block = head + table[b] * bs * d;
  for (int j = 0; j < n; ++j) {
    rows[j] = block + r * d;
    if (++r == bs && j + 1 < n) {
      r = 0;
      block = head + table[++b] * bs * d;
    }
  }
  for (int j = n; j < K; ++j) rows[j] = rows[0];
}

// A tile's online softmax over one chunk of K keys, lane by lane (Vec: a vector of K lanes, Exp its
// e^x): s[j] holds key j's scores (j < n) and becomes its probability e^(s[j] - m'), 0 for j >= n,
// where m' is the running maximum with this chunk; l, the running sum, and m become those after the
// chunk. Returns e^(m - m'), the factor the tile's accumulators must be rescaled by.
template <int K, typename Vec, Vec (*Exp)(Vec)>
inline Vec softmax_chunk(Vec* s, int n, Vec& m, Vec& l) {
  Vec mc = s[0];
  for (int j = 1; j < n; ++j) mc = mc > s[j] ? mc : s[j];
  const Vec mn = m > mc ? m : mc;
  const Vec cr = Exp(m - mn);
  Vec ps = Vec{};
  for (int j = 0; j < K; ++j) {
    s[j] = j < n ? Exp(s[j] - mn) : Vec{};
    ps += s[j];
  }
  l = l * cr + ps;
  m = mn;
  return cr;
}

#if defined(__AVX512F__)
// The AVX-512 path, for head sizes of whole 16-float vectors and up to 8 query heads per KV head.
// Keys go 16 at a time: each of the 16 dot products with one query head leaves a vector of 16
// partial sums, and `sum16` folds those 16 vectors into one vector of their 16 sums (15 adds and
// 30 permutes, where summing each vector on its own would cost 16 x 4 shuffles and adds and 16
// scalar stores).
// (v16, load16, exp16: vec8.h)
inline v16 splat16(float x) { return (v16)_mm512_set1_ps(x); }  // (v16{} + x cost an add per use)

// x holds the partial sums of K keys, S = 16 / K lanes each; so does y. The result holds the 2K
// keys, x's then y's, in S / 2 lanes each: every key's two halves added. Lane p of the result
// takes lane pick(p) of the pair (x, y) (0-15: x, 16-31: y) and adds lane pick(p) + S / 2.
template <int K>
constexpr int pick(int p) {
  constexpr int S = 16 / K, H = S / 2;
  const int seg = p / H, within = p % H;
  return (seg < K ? seg * S : 16 + (seg - K) * S) + within;
}
template <int K, size_t... P>
inline v16 fold(v16 x, v16 y, std::index_sequence<P...>) {
  return __builtin_shufflevector(x, y, pick<K>(P)...) + __builtin_shufflevector(x, y, (pick<K>(P) + 8 / K)...);
}
inline v16 sum16(v16* a) {  // lane j of the result: the sum of a[j]'s 16 lanes
  constexpr auto I = std::make_index_sequence<16>{};
  for (int j = 0; j < 8; ++j) a[j] = fold<1>(a[2 * j], a[2 * j + 1], I);
  for (int j = 0; j < 4; ++j) a[j] = fold<2>(a[2 * j], a[2 * j + 1], I);
  for (int j = 0; j < 2; ++j) a[j] = fold<4>(a[2 * j], a[2 * j + 1], I);
  return fold<8>(a[0], a[1], I);
}

// The keys and values of tokens t0 .. t1 - 1 of one sequence and KV head (K and V caches share a
// layout, so one block-table walk serves both), every cache line of them prefetched into L2 (the
// T1 hint), not L1: on two Zen 4 cores, 48 bfloat16 decode rows over 30 layers' caches (contexts
// of 50-750 tokens, far beyond L3) took 0.75-0.80x the time they took with the T0 hint, the same
// at 16, 32, 48, 64 or 128 tokens ahead; L1's few miss buffers, held by prefetches, had been
// stalling the loads the arithmetic waits for.
template <typename T>
__attribute__((always_inline)) inline void prefetch_kv(const T* kh, const T* vh, const int64_t* table, int64_t bs,
                                                       int64_t d, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1;) {
    const int64_t b = t / bs, stop = std::min(t1, (b + 1) * bs);
    const int64_t off = (table[b] * bs + t % bs) * d;
    const char* k = reinterpret_cast<const char*>(kh + off);
    const char* v = reinterpret_cast<const char*>(vh + off);
    const int64_t bytes = (stop - t) * d * static_cast<int64_t>(sizeof(T));
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(k + o, 0, 2), __builtin_prefetch(v + o, 0, 2);
    t = stop;
  }
}

// The lanes j >= n of v set to x.
inline v16 mask_tail(v16 v, int n, float x) {
  for (int j = n; j < 16; ++j) v[j] = x;
  return v;
}

// The single-pass kernels below prefetch the next chunk's keys and values while they use this
// one's. A longer lead was slower: a standalone copy of the float32 loop over 400 sequences of 435
// keys in contiguous blocks, one Zen 5 core, took 14.7 ns a key one chunk ahead, 17.0 at four
// chunks and 20.0 at sixteen.
constexpr int64_t KV_AHEAD = 16;

// Calls chunk(c, n, full) for the 16-token chunks c = 0, 16, ... of tokens start .. start + span - 1
// of one sequence and KV head (n tokens each, `full` a std::true_type for the whole ones and a
// std::false_type for a short last one), prefetching each chunk's keys and values KV_AHEAD
// tokens before it is used.
template <typename T, typename Chunk>
__attribute__((always_inline)) inline void stream_chunks(const T* kh, const T* vh, const int64_t* table, int64_t bs,
                                                         int64_t d, int64_t start, int64_t span, Chunk&& chunk) {
  prefetch_kv(kh, vh, table, bs, d, start, start + std::min(KV_AHEAD, span));
  int64_t c = 0;
  for (; c + 16 <= span; c += 16) {
    if (c + KV_AHEAD < span)
      prefetch_kv(kh, vh, table, bs, d, start + c + KV_AHEAD, start + std::min(span, c + KV_AHEAD + 16));
    chunk(c, 16, std::true_type{});
  }
  if (c < span) chunk(c, static_cast<int>(span - c), std::false_type{});
}

// The online softmax's running maximum is raised only when a score passes it by more than this
// (natural log units), so most chunks skip the horizontal maximum and the accumulators' rescale:
// probabilities stay at most e^8 relative to the maximum used, far inside float32's range, and the
// final division cancels whatever maximum was used.
constexpr float MAX_SLACK = 8.f;

// Updates one query head's running maximum m, its lane sums l and accumulators a (N vectors) for a
// chunk's scores s (lanes past the chunk's end already -inf) and returns the chunk's probabilities.
template <int N, typename Acc>
__attribute__((always_inline)) inline v16 online_update(v16 s, float& m, v16& l, Acc* a) {
  const __m512 sv = reinterpret_cast<const __m512&>(s);
  if (__builtin_expect(_mm512_cmp_ps_mask(sv, _mm512_set1_ps(m + MAX_SLACK), _CMP_GT_OQ) != 0, 0)) {
    const float top = _mm512_reduce_max_ps(sv);
    const v16 cr = exp16(splat16(m - top));  // 0 at the first chunk (m = -inf)
    for (int i = 0; i < N; ++i) a[i] = reinterpret_cast<const Acc&>(cr) * a[i];
    l *= cr;
    m = top;
  }
  return exp16(s - m);
}

// One pass over the keys and values together (online softmax): per 16-key chunk, the G heads'
// scores, the running maximum and sums, then the chunk's value rows added in with their
// probabilities. A two-pass kernel (all scores, then all values) read the keys and the values as
// two streams one after the other; in the mixed workload's decode steps (one Zen 5 core, float32)
// this one spent 6 % less time. The query heads' accumulators stay in registers throughout. Rows
// of a chunk come from `chunk_rows`, or, for a float32 chunk inside one block, as one address plus
// j rows (with the cache warm, 15 % faster: the 16 addresses had been spilled and reloaded for
// every head); `full` chunks skip the tail masking.
template <int D, int G, typename T>
void avx512_online(const float* qf, const T* kh, const T* vh, const int64_t* table, int64_t bs, int64_t start,
                   int64_t L, float* acc, float* denom, float* mxo) {
  constexpr int V = D / 16;
  const int64_t span = L - start;
  const float inf = std::numeric_limits<float>::infinity();
  v16 q[G][V], a[G][V], lsum[G];
  float m[G];
  for (int g = 0; g < G; ++g) {
    for (int i = 0; i < V; ++i) q[g][i] = load16(qf + g * D + 16 * i), a[g][i] = v16{};
    lsum[g] = v16{};
    m[g] = -inf;
  }
  alignas(64) float p[G][16];
  float kbuf[std::is_same_v<T, float> ? 1 : 16 * D];  // bfloat16 keys widened once per chunk
  const T* rows[16];
  const float* kr[16];
  // The chunk's scores and value sums, key j's row at krow(j) and its value row at vrow(j).
  auto compute = [&](int n, auto full, auto krow, auto vrow) {
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      // Each head reads the chunk's keys from L1 again: left to itself the compiler loads them once
      // for all heads and spills the 16 x V vectors to the stack, which cost more.
      __asm__ volatile("" ::: "memory");
      v16 part[16];
      for (int j = 0; j < 16; ++j) {
        part[j] = q[g][0] * load16(krow(j));
        for (int i = 1; i < V; ++i) part[j] += q[g][i] * load16(krow(j) + 16 * i);
      }
      v16 s = sum16(part);
      if constexpr (!decltype(full)::value) s = mask_tail(s, n, -inf);
      v16 e = online_update<V>(s, m[g], lsum[g], a[g]);
      if constexpr (!decltype(full)::value) e = mask_tail(e, n, 0.f);
      lsum[g] += e;
      *reinterpret_cast<v16*>(p[g]) = e;
    }
    for (int j = 0; j < (decltype(full)::value ? 16 : n); ++j) {
      v16 vv[V];
      for (int i = 0; i < V; ++i) vv[i] = load16(vrow(j) + 16 * i);
      for (int g = 0; g < G; ++g) {
        const v16 pj = splat16(p[g][j]);
        for (int i = 0; i < V; ++i) a[g][i] += pj * vv[i];
      }
    }
  };
  auto chunk = [&](int64_t c, int n, auto full) {
    if constexpr (std::is_same_v<T, float> && decltype(full)::value) {
      // the 16 rows side by side in one block: one address for all
      if (const int64_t off = block_run_offset(table, bs, D, start + c); off >= 0) {
        const float* k0 = kh + off;
        const float* v0 = vh + off;
        compute(n, full, [k0](int j) { return k0 + j * D; }, [v0](int j) { return v0 + j * D; });
        return;
      }
    }
    chunk_rows(kh, table, bs, D, start + c, n, rows);
    if constexpr (std::is_same_v<T, float>) {
      for (int j = 0; j < 16; ++j) kr[j] = rows[j];
    } else {
      for (int j = 0; j < 16; ++j) {
        for (int i = 0; i < V; ++i) *reinterpret_cast<v16*>(kbuf + j * D + 16 * i) = load16(rows[j] + 16 * i);
        kr[j] = kbuf + j * D;
      }
    }
    compute(n, full, [&kr](int j) { return kr[j]; }, [&](int j) { return vh + (rows[j] - kh); });
  };
  stream_chunks(kh, vh, table, bs, D, start, span, chunk);
  for (int g = 0; g < G; ++g) {
    for (int i = 0; i < V; ++i) *reinterpret_cast<v16*>(acc + g * D + 16 * i) = a[g][i];
    denom[g] = _mm512_reduce_add_ps(reinterpret_cast<const __m512&>(lsum[g]));
    mxo[g] = m[g];
  }
}

// A tile's V sums keep each lane's accumulators (`vectors` registers a lane) in registers for a
// block of lanes at a time: at most 6 lanes, as many as fit beside one value row and a broadcast
// probability, and at least one (wide heads spill, as they did before blocks).
constexpr int lane_block_most(int vectors) { return std::max(1, std::min(6, (31 - vectors) / vectors)); }

// Runs fn.template operator()<B>(q0) over blocks of B lanes starting at q0 that cover the nq lanes
// exactly: the fewest blocks of at most Most lanes, as even as they go. 16 lanes of 4 vectors go
// 6 + 5 + 5, where blocks of 5 computed 20 lanes: on one Zen 5 core the V sums alone ran ~20 %
// faster (data in L1), and 64 float32 decodes on a 512-token shared prefix, 8 q / 4 kv heads,
// 0.58 -> 0.54-0.56 ms a layer (bfloat16 0.41-0.42 -> 0.40-0.41).
template <int Most, typename Fn>
inline void lane_blocks(int nq, Fn&& fn) {
  static_assert(Most >= 1 && Most <= 6);
  const int nb = (nq + Most - 1) / Most;
  for (int b = 0, q0 = 0; b < nb; ++b) {
    const int size = nq / nb + (b < nq % nb);
    switch (size) {
      case 1: fn.template operator()<1>(q0); break;
      case 2: if constexpr (Most >= 2) fn.template operator()<2>(q0); break;
      case 3: if constexpr (Most >= 3) fn.template operator()<3>(q0); break;
      case 4: if constexpr (Most >= 4) fn.template operator()<4>(q0); break;
      case 5: if constexpr (Most >= 5) fn.template operator()<5>(q0); break;
      case 6: if constexpr (Most >= 6) fn.template operator()<6>(q0); break;
    }
    q0 += size;
  }
}

// A tile's scores for one chunk: s[j] = sum over x of qt[x] * row(j)[x] for its 16 keys j. Where
// the 16 rows lie side by side in one block, row(j) is one address plus j rows, and every load is
// a broadcast folded into its multiply-add; the tile path spent ~4 % less time on a 64-row decode
// step sharing a 512-token prefix (one Zen 5 core) than with the 16 addresses held apart.
template <int D, typename Row>
__attribute__((always_inline)) inline void tile_scores(const float* qt, Row row, v16* s) {
  for (int j = 0; j < 16; ++j) s[j] = v16{};
  for (int x = 0; x < D; ++x) {
    const v16 q = load16(qt + 16 * x);
    for (int j = 0; j < 16; ++j) s[j] += q * splat16(row(j)[x]);
  }
}

// Several rows that see the same keys: the rows of one prefill chunk (each sees the chunk's
// context up to its own position, so all see the context before the first), and decodes whose
// block tables begin with the same blocks (a prompt prefix the prefix cache shares). A tile holds
// up to 16 query vectors -- R rows x G query heads of one KV head, one per vector lane -- and
// reads each of the shared keys once for all of them, where the row-by-row path above reads it
// once per row. Every step is a vertical vector operation: key j's scores for all lanes are the
// sum over x of qt[x] * k_j[x] (qt: the tile's queries transposed, a vector per head dimension;
// k_j[x] broadcast), the softmax runs online per lane (running maximum m and sum l, the
// accumulators rescaled when m grows), and the weighted V sum broadcasts each lane's probability
// against the value row. bfloat16 keys and values are widened to float32 once per 16-key chunk.
// Leaves, per lane, acc (lane-major, D values each, not yet divided by l), m and l.
template <int D, typename T>
void avx512_tile(const float* qt, int nq, const T* kh, const T* vh, const int64_t* table, int64_t bs, int64_t S,
                 float* kbuf, float* vbuf, float* pbuf, float* acc, v16& m, v16& l) {
  constexpr int V = D / 16;
  const float inf = std::numeric_limits<float>::infinity();
  m = splat16(-inf);
  l = v16{};
  std::fill(acc, acc + nq * D, 0.f);
  alignas(64) float corr[16];
  const T* krows[16];
  const T* vrows[16];
  const float* kr[16];
  const float* vr[16];
  for (int64_t c = 0; c < S; c += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, S - c));
    chunk_rows(kh, table, bs, D, c, n, krows);
    chunk_rows(vh, table, bs, D, c, n, vrows);
    if constexpr (std::is_same_v<T, float>) {
      for (int j = 0; j < 16; ++j) kr[j] = krows[j], vr[j] = vrows[j];
    } else {
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i < V; ++i) {
          *reinterpret_cast<v16*>(kbuf + j * D + 16 * i) = load16(krows[j] + 16 * i);
          *reinterpret_cast<v16*>(vbuf + j * D + 16 * i) = load16(vrows[j] + 16 * i);
        }
        kr[j] = kbuf + j * D, vr[j] = vbuf + j * D;
      }
      for (int j = n; j < 16; ++j) kr[j] = kr[0], vr[j] = vr[0];
    }
    v16 s[16];
    if (std::is_same_v<T, float> && n == 16 && c % bs + 16 <= bs)  // 16 rows side by side
      tile_scores<D>(qt, [k0 = kr[0]](int j) { return k0 + j * D; }, s);
    else
      tile_scores<D>(qt, [&kr](int j) { return kr[j]; }, s);
    *reinterpret_cast<v16*>(corr) = softmax_chunk<16, v16, exp16>(s, n, m, l);
    for (int j = 0; j < n; ++j) *reinterpret_cast<v16*>(pbuf + 16 * j) = s[j];
    lane_blocks<lane_block_most(V)>(nq, [&]<int QB>(int q0) {
      v16 a[QB][V];
      for (int b = 0; b < QB; ++b) {
        const v16 f = splat16(corr[q0 + b]);
        for (int i = 0; i < V; ++i) a[b][i] = load16(acc + (q0 + b) * D + 16 * i) * f;
      }
      for (int j = 0; j < n; ++j) {
        v16 vv[V];
        for (int i = 0; i < V; ++i) vv[i] = load16(vr[j] + 16 * i);
        for (int b = 0; b < QB; ++b) {
          const v16 p = splat16(pbuf[16 * j + q0 + b]);
          for (int i = 0; i < V; ++i) a[b][i] += p * vv[i];
        }
      }
      for (int b = 0; b < QB; ++b)
        for (int i = 0; i < V; ++i) *reinterpret_cast<v16*>(acc + (q0 + b) * D + 16 * i) = a[b][i];
    });
  }
}
#endif

#if !defined(__AVX512F__)
// Without AVX-512 (AVX2 + FMA; SSE where a build targets x86-64-v2) the tiles run on 8-float
// vectors (`v8_tile`). With 16 vector registers instead of 32 a lane's accumulators do not fit
// beside the others': they stay in L1, loaded, updated and stored once per 8-key chunk. Before
// it, every row of a prefill chunk read all its keys again, row by row; on a Zen 3 (two threads,
// a 512-row chunk of one sequence, rows seeing 1 to 512 keys, head size 64, alternating builds in
// one process) 8 q / 4 kv heads took 0.67-0.71x the time in float32 and 0.58-0.61x in bfloat16,
// 9 q / 3 kv 0.81x and 0.66x. Single rows keep the two-pass register-blocked kernel above: a
// one-pass (online) version at 8 lanes read the cache of 31 decodes of 520 tokens 20-27 % slower
// (3.2 against 2.8 ms a layer in float32), both memory-bound; prefetching the next chunk inside
// the tiles, or the next tile's queries, did not help.
inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }

// The largest divisor of V that is at most `most`.
constexpr int columns(int V, int most) {
  for (int c = std::min(V, most); c > 1; --c)
    if (V % c == 0) return c;
  return 1;
}

// avx512_tile on 8-lane vectors: a tile's 16 lanes (R rows x G query heads of one KV head) as H = 2
// vectors, or one where it has at most 8 lanes; 8 keys a chunk. Key j's scores for all lanes are
// H vertical vectors, sums over x of qt[x] times key j's x broadcast; 8 / H keys at a time, so
// that their 8 accumulators, the H query vectors and a broadcast fit AVX2's 16 registers (each
// broadcast then feeds H multiply-adds). Then, lane by lane, the weighted V sum with that lane's
// D / 8 accumulators (at most 8 a pass) in registers and the value rows read from L1 as the
// multiply-adds' memory operands. bfloat16 keys and values are widened once per chunk. Leaves,
// per lane, acc (lane-major, D values each, not yet divided by l), m and l (16 floats each).
template <int D, int H, typename T>
void v8_tile(const float* qt, int nq, const T* kh, const T* vh, const int64_t* table, int64_t bs, int64_t S,
             float* kbuf, float* vbuf, float* pbuf, float* acc, float* mo, float* lo) {
  constexpr int V = D / 8, C = columns(V, 8), J = 8 / H;
  const float inf = std::numeric_limits<float>::infinity();
  v8 m[H], l[H];
  for (int h = 0; h < H; ++h) m[h] = splat8(-inf), l[h] = v8{};
  std::fill(acc, acc + nq * D, 0.f);
  alignas(32) float corr[16];
  const T* krows[8];
  const T* vrows[8];
  const float* kr[8];
  const float* vr[8];
  for (int64_t c = 0; c < S; c += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, S - c));
    chunk_rows<8>(kh, table, bs, D, c, n, krows);
    chunk_rows<8>(vh, table, bs, D, c, n, vrows);
    if constexpr (std::is_same_v<T, float>) {
      for (int j = 0; j < 8; ++j) kr[j] = krows[j], vr[j] = vrows[j];
    } else {
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i < V; ++i) {
          *reinterpret_cast<v8*>(kbuf + j * D + 8 * i) = load8(krows[j] + 8 * i);
          *reinterpret_cast<v8*>(vbuf + j * D + 8 * i) = load8(vrows[j] + 8 * i);
        }
        kr[j] = kbuf + j * D, vr[j] = vbuf + j * D;
      }
      for (int j = n; j < 8; ++j) kr[j] = kr[0], vr[j] = vr[0];
    }
    v8 s[H][8];
    auto scores = [&](auto row) {
      for (int j0 = 0; j0 < 8; j0 += J) {
        v8 t[J][H] = {};
        for (int x = 0; x < D; ++x) {
          v8 q[H];
          for (int h = 0; h < H; ++h) {
            q[h] = load8(qt + 16 * x + 8 * h);
#if defined(__AVX__)  // kept in a register: GCC had folded it into its 4 multiply-adds, 4 loads (4-16 % slower)
            __asm__("" : "+x"(q[h]));
#endif
          }
          for (int j = 0; j < J; ++j) {
            const v8 k = splat8(row(j0 + j)[x]);
            for (int h = 0; h < H; ++h) t[j][h] += q[h] * k;
          }
        }
        for (int j = 0; j < J; ++j)
          for (int h = 0; h < H; ++h) s[h][j0 + j] = t[j][h];
      }
    };
    if (std::is_same_v<T, float> && n == 8 && c % bs + 8 <= bs)  // 8 rows side by side
      scores([k0 = kr[0]](int j) { return k0 + j * D; });
    else
      scores([&kr](int j) { return kr[j]; });
    for (int h = 0; h < H; ++h) {
      *reinterpret_cast<v8*>(corr + 8 * h) = softmax_chunk<8, v8, exp8>(s[h], n, m[h], l[h]);
      for (int j = 0; j < n; ++j) *reinterpret_cast<v8*>(pbuf + 16 * j + 8 * h) = s[h][j];
    }
    for (int b = 0; b < nq; ++b) {
      const v8 f = splat8(corr[b]);
      float* ab = acc + b * D;
      for (int c0 = 0; c0 < V; c0 += C) {
        v8 a[C];
        for (int i = 0; i < C; ++i) a[i] = load8(ab + 8 * (c0 + i)) * f;
        for (int j = 0; j < n; ++j) {
          const v8 p = splat8(pbuf[16 * j + b]);
          for (int i = 0; i < C; ++i) a[i] += p * load8(vr[j] + 8 * (c0 + i));
        }
        for (int i = 0; i < C; ++i) *reinterpret_cast<v8*>(ab + 8 * (c0 + i)) = a[i];
      }
    }
  }
  for (int h = 0; h < H; ++h)
    for (int x = 0; x < 8; ++x) mo[8 * h + x] = m[h][x], lo[8 * h + x] = l[h][x];
}
#endif

#if defined(__AVX512BF16__)
// bfloat16 caches on CPUs with AVX512-BF16: `vdpbf16ps` multiplies pairs of bfloat16 and adds both
// products into a float32 lane, so keys are dotted with q as stored (no widening, half the
// instructions) and the V sum takes two cached tokens per instruction: their rows interleaved
// word by word, against their two probabilities rounded to bfloat16, as torch's own CPU attention
// rounds them before its P.V product. Scores, softmax and sums stay float32.
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }
inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }

// avx512_online for bfloat16 caches with AVX512-BF16: q . k takes pairs of head dimensions per
// `vdpbf16ps` (keys as stored, q as given, the scale applied to the sums), and the value rows go two
// tokens per `vdpbf16ps`, interleaved word by word, against their probabilities rounded to bfloat16.
template <int D, int G>
void avx512bf16_online(const c10::BFloat16* q0, int64_t qs1, float sc, const c10::BFloat16* kh,
                       const c10::BFloat16* vh, const int64_t* table, int64_t bs, int64_t start, int64_t L,
                       float* acc, float* denom, float* mxo) {
  using T = c10::BFloat16;
  constexpr int W = D / 32;  // 32-value groups of a head
  const int64_t span = L - start;
  const float inf = std::numeric_limits<float>::infinity();
  __m512i q[G][W];
  __m512 a[G][2 * W];  // group w's unpacklo half at 2 w, unpackhi at 2 w + 1
  v16 lsum[G];
  float m[G];
  for (int g = 0; g < G; ++g) {
    for (int i = 0; i < W; ++i) q[g][i] = load512(q0 + g * qs1 + 32 * i);
    for (int i = 0; i < 2 * W; ++i) a[g][i] = _mm512_setzero_ps();
    lsum[g] = v16{};
    m[g] = -inf;
  }
  alignas(64) uint16_t pb[G][16];  // the chunk's probabilities, bfloat16 bits; 0 past its end
  const T* rows[16];
  // The chunk's scores and value sums, key j's row at krow(j) and its value row at vrow(j).
  auto compute = [&](int n, auto full, auto krow, auto vrow) {
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      __asm__ volatile("" ::: "memory");  // keys reloaded per head (see avx512_online)
      v16 part[16];
      for (int j = 0; j < 16; ++j) {
        __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(q[g][0]), as_bh(load512(krow(j))));
        for (int i = 1; i < W; ++i) t = _mm512_dpbf16_ps(t, as_bh(q[g][i]), as_bh(load512(krow(j) + 32 * i)));
        part[j] = reinterpret_cast<v16&>(t);
      }
      v16 s = sum16(part) * sc;
      if constexpr (!decltype(full)::value) s = mask_tail(s, n, -inf);
      v16 e = online_update<2 * W>(s, m[g], lsum[g], a[g]);
      if constexpr (!decltype(full)::value) e = mask_tail(e, n, 0.f);
      lsum[g] += e;
      const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<const __m512&>(e));
      std::memcpy(pb[g], &h, 32);
    }
    const int stop = decltype(full)::value ? 16 : n;
    for (int j = 0; j < stop; j += 2) {
      const T* r0 = vrow(j);
      const T* r1 = j + 1 < stop ? vrow(j + 1) : r0;  // an odd last token's partner: probability 0
      __m512i lo[W], hi[W];
      for (int i = 0; i < W; ++i) {
        const __m512i x0 = load512(r0 + 32 * i), x1 = load512(r1 + 32 * i);
        lo[i] = _mm512_unpacklo_epi16(x0, x1);
        hi[i] = _mm512_unpackhi_epi16(x0, x1);
      }
      for (int g = 0; g < G; ++g) {
        uint32_t pp;
        std::memcpy(&pp, pb[g] + j, 4);
        const __m512bh pj = as_bh(_mm512_set1_epi32(static_cast<int>(pp)));
        for (int i = 0; i < W; ++i) {
          a[g][2 * i] = _mm512_dpbf16_ps(a[g][2 * i], as_bh(lo[i]), pj);
          a[g][2 * i + 1] = _mm512_dpbf16_ps(a[g][2 * i + 1], as_bh(hi[i]), pj);
        }
      }
    }
  };
  auto chunk = [&](int64_t c, int n, auto full) {
    if (const int64_t off = block_run_offset(table, bs, D, start + c); off >= 0) {
      // the chunk inside one block: one address for its rows (a short last chunk scores the
      // block's rows after its end too, masked; its V sum stops at n)
      const T* k0 = kh + off;
      const T* v0 = vh + off;
      compute(n, full, [k0](int j) { return k0 + j * D; }, [v0](int j) { return v0 + j * D; });
      return;
    }
    chunk_rows(kh, table, bs, D, start + c, n, rows);
    compute(n, full, [&rows](int j) { return rows[j]; }, [&](int j) { return vh + (rows[j] - kh); });
  };
  stream_chunks(kh, vh, table, bs, D, start, span, chunk);
  // Lane l of half h of group w holds value 32 w + 8 (l / 4) + 4 h + l % 4 (the unpack order).
  for (int g = 0; g < G; ++g) {
    for (int w = 0; w < W; ++w)
      for (int h = 0; h < 2; ++h) {
        alignas(64) float lanes[16];
        _mm512_store_ps(lanes, a[g][2 * w + h]);
        for (int l = 0; l < 16; ++l) acc[g * D + 32 * w + 8 * (l / 4) + 4 * h + l % 4] = lanes[l];
      }
    denom[g] = _mm512_reduce_add_ps(reinterpret_cast<const __m512&>(lsum[g]));
    mxo[g] = m[g];
  }
}

// acc + q . (the pair at p, in every lane): the pair's load folded into the instruction as an
// embedded broadcast, where GCC emits a vpbroadcastd before each `vdpbf16ps`. With the keys of a
// chunk inside one block addressed as one pointer plus j rows (the 16 pointers held apart had
// spilled), a 512-row prefill chunk's attention on two Zen 4 cores took 0.93-0.94x the time.
inline __m512 dpbf16_broadcast(__m512 acc, __m512bh q, const c10::BFloat16* p) {
  __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(q), "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}

// avx512_tile for bfloat16 caches with AVX512-BF16: as the row-by-row bfloat16 path does, q . k
// takes pairs of head dimensions per `vdpbf16ps` (the tile's queries transposed into pairs, qt2;
// each key's pair broadcast), and the V sum takes pairs of keys, their rows interleaved once per
// chunk, against each lane's two probabilities rounded to bfloat16. Same outputs as avx512_tile:
// per lane, acc (D values, in order), m and l; `vpair` and `pacc` are its scratch.
template <int D>
void avx512bf16_tile(const uint32_t* qt2, int nq, float sc, const c10::BFloat16* kh, const c10::BFloat16* vh,
                     const int64_t* table, int64_t bs, int64_t S, uint32_t* ppair, __m512i* vpair, float* pacc,
                     float* acc, v16& m, v16& l) {
  using T = c10::BFloat16;
  constexpr int W = D / 32;  // 32-value groups of a head
  const float inf = std::numeric_limits<float>::infinity();
  m = splat16(-inf);
  l = v16{};
  std::fill(pacc, pacc + nq * D, 0.f);  // lane-major; each lane's D values in unpack order
  alignas(64) float corr[16];
  const T* krows[16];
  const T* vrows[16];
  for (int64_t c = 0; c < S; c += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, S - c));
    chunk_rows(vh, table, bs, D, c, n, vrows);
    __m512 s[16];
    for (int j = 0; j < 16; ++j) s[j] = _mm512_setzero_ps();
    auto scores = [&](auto row) {
      for (int x = 0; x < D / 2; ++x) {
        const __m512bh q = as_bh(load512(qt2 + 16 * x));
        for (int j = 0; j < 16; ++j) s[j] = dpbf16_broadcast(s[j], q, row(j) + 2 * x);
      }
    };
    if (const int64_t off = block_run_offset(table, bs, D, c); off >= 0) {
      // (a short last chunk scores the block's rows after its end too: softmax_chunk drops them)
      const T* k0 = kh + off;
      scores([k0](int j) { return k0 + j * D; });
    } else {
      chunk_rows(kh, table, bs, D, c, n, krows);
      scores([&krows](int j) { return krows[j]; });
    }
    v16 sv[16];
    for (int j = 0; j < 16; ++j) sv[j] = reinterpret_cast<v16&>(s[j]) * sc;
    *reinterpret_cast<v16*>(corr) = softmax_chunk<16, v16, exp16>(sv, n, m, l);
    alignas(64) uint16_t pb[16][16];  // [key][lane], bfloat16 bits; keys past n: probability 0
    for (int j = 0; j < 16; ++j) {
      const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<const __m512&>(sv[j]));
      std::memcpy(pb[j], &h, 32);
    }
    for (int jp = 0; jp < 8; ++jp)
      for (int lane = 0; lane < 16; ++lane)
        ppair[jp * 16 + lane] = pb[2 * jp][lane] | static_cast<uint32_t>(pb[2 * jp + 1][lane]) << 16;
    const int pairs = (n + 1) / 2;
    for (int jp = 0; jp < pairs; ++jp)
      for (int i = 0; i < W; ++i) {
        const __m512i x0 = load512(vrows[2 * jp] + 32 * i), x1 = load512(vrows[2 * jp + 1] + 32 * i);
        vpair[(jp * W + i) * 2] = _mm512_unpacklo_epi16(x0, x1);
        vpair[(jp * W + i) * 2 + 1] = _mm512_unpackhi_epi16(x0, x1);
      }
    lane_blocks<lane_block_most(2 * W)>(nq, [&]<int QB>(int q0) {
      __m512 a[QB][W][2];
      for (int b = 0; b < QB; ++b) {
        const __m512 f = _mm512_set1_ps(corr[q0 + b]);
        for (int i = 0; i < W; ++i)
          for (int h = 0; h < 2; ++h) a[b][i][h] = _mm512_mul_ps(_mm512_loadu_ps(pacc + (q0 + b) * D + 32 * i + 16 * h), f);
      }
      for (int jp = 0; jp < pairs; ++jp)
        for (int b = 0; b < QB; ++b) {
          const __m512bh p = as_bh(_mm512_set1_epi32(static_cast<int>(ppair[jp * 16 + q0 + b])));
          for (int i = 0; i < W; ++i)
            for (int h = 0; h < 2; ++h) a[b][i][h] = _mm512_dpbf16_ps(a[b][i][h], as_bh(vpair[(jp * W + i) * 2 + h]), p);
        }
      for (int b = 0; b < QB; ++b)
        for (int i = 0; i < W; ++i)
          for (int h = 0; h < 2; ++h) _mm512_storeu_ps(pacc + (q0 + b) * D + 32 * i + 16 * h, a[b][i][h]);
    });
  }
  // Lane l of half h of group w holds value 32 w + 8 (l / 4) + 4 h + l % 4 (the unpack order).
  for (int q = 0; q < nq; ++q)
    for (int w = 0; w < W; ++w)
      for (int h = 0; h < 2; ++h)
        for (int x = 0; x < 16; ++x) acc[q * D + 32 * w + 8 * (x / 4) + 4 * h + x % 4] = pacc[q * D + 32 * w + 16 * h + x];
}
#endif

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

template <typename T>
inline void store_out(T* o, int64_t os1, const float* acc, const float* denom, int64_t G, int64_t d) {
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.f / denom[g];
    for (int64_t x = 0; x < d; ++x) o[g * os1 + x] = static_cast<T>(acc[g * d + x] * inv);
  }
}

// The dtypes and head sizes the tiles serve: whole vectors (16 floats with AVX-512, else 8) of
// float32 or bfloat16.
template <int64_t D, typename T>
constexpr bool tiled_path() {
#if defined(__AVX512F__)
  constexpr int64_t W = 16;
#else
  constexpr int64_t W = 8;
#endif
  return D > 0 && D % W == 0 && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>);
}

// A run of consecutive rows whose first `shared` keys are the same cached tokens (shared == 0: a
// single row, served on its own).
struct Tile {
  int64_t row, rows, shared;
};

constexpr int64_t MIN_SHARED = 32;  // fewer shared keys than this: rows go one by one

// Cuts the rows into tiles of up to `most` consecutive rows, each as long as its rows share at
// least MIN_SHARED keys: the shortest context of the tile, cut to the blocks their tables agree on.
inline std::vector<Tile> plan_tiles(int64_t n, int64_t most, const int64_t* tp, int64_t ts0, const int64_t* lp,
                                    int64_t bs) {
  std::vector<Tile> tiles;
  for (int64_t i = 0; i < n;) {
    int64_t shared = lp[i], r = 1;
    for (; r < most && i + r < n; ++r) {
      const int64_t* a = tp + i * ts0;
      const int64_t* b = tp + (i + r) * ts0;
      const int64_t want = std::min(shared, lp[i + r]);
      int64_t same = 0;
      while (same * bs < want && a[same] == b[same]) ++same;
      const int64_t s = std::min(want, same * bs);
      if (s < MIN_SHARED) break;
      shared = s;
    }
    tiles.push_back({i, r, r > 1 ? shared : 0});
    i += r;
  }
  return tiles;
}

constexpr int64_t ITEM_RUNS_PER_THREAD = 8;

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

  // Tiles where the rows may share keys (no window: a window's keys differ row by row).
  const bool tiled = tiled_path<D, T>() && window <= 0 && G <= 8;
  std::vector<Tile> tiles;
  if (tiled) {
    tiles = plan_tiles(n, 16 / G, tp, ts0, lp, bs);
  } else {
    tiles.reserve(n);
    for (int64_t i = 0; i < n; ++i) tiles.push_back({i, 1, 0});
  }
  const int64_t nt = static_cast<int64_t>(tiles.size());

  struct Scratch {
    std::vector<float> qf, acc, denom, mx, scores, qt, kbuf, vbuf, pbuf, tacc;
    std::vector<uint32_t> qt2, ppair;  // AVX512-BF16 tiles: bfloat16 pairs
#if defined(__AVX512BF16__)
    std::vector<__m512i> vpair;
#endif
  };

  // Row i, KV head h, keys start .. L-1: the G heads' unnormalised sums in w.acc, their softmax
  // denominators in w.denom and score maxima in w.mx.
  auto partial = [&](Scratch& w, int64_t i, int64_t h, int64_t start) {
    const int64_t L = lp[i];
    const int64_t span = L - start;
    const T* kh = kp + h * num_blocks * bs * d;
    const T* vh = vp + h * num_blocks * bs * d;
    const int64_t* table = tp + i * ts0;
#if defined(__AVX512BF16__)
    if constexpr (D > 0 && D % 32 == 0 && std::is_same_v<T, c10::BFloat16>) {
      if (with_group(G, [&](auto g) {
            avx512bf16_online<D, decltype(g)::value>(qp + i * qs0 + h * G * qs1, qs1, sc, kh, vh, table, bs, start, L,
                                                     w.acc.data(), w.denom.data(), w.mx.data());
          }))
        return;
    }
#endif
    for (int64_t g = 0; g < G; ++g)  // the other paths take q scaled, in float32
      for (int64_t x = 0; x < d; ++x)
        w.qf[g * d + x] = static_cast<float>(qp[i * qs0 + (h * G + g) * qs1 + x]) * sc;
#if defined(__AVX512F__)
    if constexpr (D > 0 && D % 16 == 0 && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>)) {
      if (with_group(G, [&](auto g) {
            avx512_online<D, decltype(g)::value>(w.qf.data(), kh, vh, table, bs, start, L, w.acc.data(),
                                                 w.denom.data(), w.mx.data());
          }))
        return;
    }
#endif
    w.scores.resize(G * span + 16);  // the paths below score all keys before the values
    float* scores = w.scores.data();
    float* acc = w.acc.data();
    // scores[g * span + (t - start)] = q_g . k_t
    constexpr bool blocked = D > 0 && D % 32 == 0 && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>);
    bool done = false;
    if constexpr (blocked)
      done = with_group(G, [&](auto g) {
        blocked_scores<D, decltype(g)::value>(w.qf.data(), kh, table, bs, start, L, scores, span);
      });
    if (!done)
      for_each_row(kh, table, bs, d, start, L, [&](int64_t t, const T* kr) {
        for (int64_t g = 0; g < G; ++g) scores[g * span + t - start] = dot<D>(&w.qf[g * d], kr, d);
      });
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + g * span;
      float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < span; ++j) m = std::max(m, s[j]);
      w.denom[g] = exp_shift_sum(s, span, m);
      w.mx[g] = m;
    }
    if constexpr (blocked)
      if (done)
        with_group(G, [&](auto g) {
          blocked_weighted_sum<D, decltype(g)::value>(scores, span, vh, table, bs, start, L, acc);
        });
    if (!done) {
      std::fill(acc, acc + G * d, 0.f);
      for_each_row(vh, table, bs, d, start, L, [&](int64_t t, const T* vr) {
        for (int64_t g = 0; g < G; ++g) axpy<D>(scores[g * span + t - start], vr, &acc[g * d], d);
      });
    }
  };

  // Head-major order: the rows of one KV head run together, so keys they share stay in cache.
  // Items claimed in small runs (parallel.h), about ITEM_RUNS_PER_THREAD a thread: their costs
  // differ with the context lengths, and a claim costs a cache line passed between cores.
  const int64_t items = hkv * nt;
  parallel_claims(items, std::max<int64_t>(1, items / (ITEM_RUNS_PER_THREAD * at::get_num_threads())),
                  [&](auto& claim) {
    Scratch w;
    w.qf.resize(G * d), w.acc.resize(G * d), w.denom.resize(G), w.mx.resize(G);
    for (int64_t begin, end; claim(begin, end);)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / nt;
      const Tile& tile = tiles[item % nt];
      if (tile.shared == 0) {
        const int64_t i = tile.row, L = lp[i];
        partial(w, i, h, window > 0 ? std::max<int64_t>(0, L - window) : 0);
        store_out(op + i * os0 + h * G * os1, os1, w.acc.data(), w.denom.data(), G, d);
        continue;
      }
      if constexpr (tiled_path<D, T>()) {
        if (w.qt.empty()) {
          w.qt.assign(16 * d, 0.f), w.kbuf.resize(36 * d), w.vbuf.resize(16 * d);
          w.pbuf.assign(16 * 16, 0.f), w.tacc.resize(16 * d);
        }
        const int nq = static_cast<int>(tile.rows * G);
#if defined(__AVX512F__)
        v16 m, l;
#else
        alignas(32) float m[16], l[16];
#endif
        bool done = false;
#if defined(__AVX512BF16__)
        if constexpr (D % 32 == 0 && std::is_same_v<T, c10::BFloat16>) {
          if (w.qt2.empty()) w.qt2.resize(16 * d / 2), w.ppair.assign(8 * 16 + 16, 0u), w.vpair.resize(8 * d / 16);
          std::fill(w.qt2.begin(), w.qt2.end(), 0u);
          for (int64_t r = 0; r < tile.rows; ++r)
            for (int64_t g = 0; g < G; ++g) {
              const T* src = qp + (tile.row + r) * qs0 + (h * G + g) * qs1;
              for (int64_t x = 0; x < d / 2; ++x) std::memcpy(&w.qt2[x * 16 + r * G + g], src + 2 * x, 4);
            }
          avx512bf16_tile<D>(w.qt2.data(), nq, sc, kp + h * num_blocks * bs * d, vp + h * num_blocks * bs * d,
                             tp + tile.row * ts0, bs, tile.shared, w.ppair.data(), w.vpair.data(), w.kbuf.data(),
                             w.tacc.data(), m, l);
          done = true;
        }
#endif
        if (!done) {
          std::fill(w.qt.begin(), w.qt.end(), 0.f);
          for (int64_t r = 0; r < tile.rows; ++r)
            for (int64_t g = 0; g < G; ++g) {
              const T* src = qp + (tile.row + r) * qs0 + (h * G + g) * qs1;
              for (int64_t x = 0; x < d; ++x) w.qt[x * 16 + r * G + g] = static_cast<float>(src[x]) * sc;
            }
#if defined(__AVX512F__)
          avx512_tile<D, T>(w.qt.data(), nq, kp + h * num_blocks * bs * d, vp + h * num_blocks * bs * d,
                            tp + tile.row * ts0, bs, tile.shared, w.kbuf.data(), w.vbuf.data(), w.pbuf.data(),
                            w.tacc.data(), m, l);
#else
          auto run = [&](auto halves) {
            v8_tile<D, decltype(halves)::value, T>(w.qt.data(), nq, kp + h * num_blocks * bs * d,
                                                   vp + h * num_blocks * bs * d, tp + tile.row * ts0, bs, tile.shared,
                                                   w.kbuf.data(), w.vbuf.data(), w.pbuf.data(), w.tacc.data(), m, l);
          };
          if (nq <= 8)
            run(std::integral_constant<int, 1>{});
          else
            run(std::integral_constant<int, 2>{});
#endif
        }
        for (int64_t r = 0; r < tile.rows; ++r) {
          const int64_t i = tile.row + r;
          const bool tail = lp[i] > tile.shared;  // its own keys after the shared ones
          if (tail) partial(w, i, h, tile.shared);
          T* o = op + i * os0 + h * G * os1;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t lane = r * G + g;
            const float* ta = w.tacc.data() + lane * d;
            float a = 1.f, b = 0.f;  // weights of the tile's part and of the tail's
            if (tail) {
              const float top = std::max(m[lane], w.mx[g]);
              a = std::exp(m[lane] - top), b = std::exp(w.mx[g] - top);
            }
            const float inv = 1.f / (l[lane] * a + (tail ? w.denom[g] * b : 0.f));
            for (int64_t x = 0; x < d; ++x)
              o[g * os1 + x] = static_cast<T>((ta[x] * a + (tail ? w.acc[g * d + x] * b : 0.f)) * inv);
          }
        }
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

