// y = x W^T (+ b) for the m rows of a decode-sized step, reading W where oneDNN packed it.
//
// The weights stay in oneDNN's blocked layout (tpkernels/gemm.py packs each once, at load), which
// serves every input size. A decode step's product is small and its weight streams from memory:
// a oneDNN call costs ~10 us before it reads a byte (the default model's per-layer bfloat16
// weights take 14-75 us to stream), and from 16 to 64 rows it reached 400-680 GFLOP/s on two
// Zen 5 cores, where 48 rows ran at 830 with the weight in cache. This kernel reads
// the same packed bytes with no set-up, streams each block of W from memory once and runs its
// row tiles on it from cache. It is used only where gemm.py has checked, weight by weight, that
// the packed bytes are laid out as below (oneDNN picks its layout per CPU and version):
//
//   float32    [n / 64][k][64]         64 outputs side by side for each input index
//   bfloat16   [n / 64][k / 2][64][2]  the same with input indices in pairs (`vdpbf16ps` order)
//
// Each 64-output block is four 16-output groups, one vector register each (AVX-512; with AVX2,
// eight 8-output groups, see below). With AVX2 a bfloat16 weight (which oneDNN does not pack there:
// gemm.py packs it in the layout above) runs on the float32 kernel, widened as it is loaded, for
// every size of input: x and the bias are widened once per call, each sum rounded as it is stored. Threads claim runs of
// whole blocks as they go (`claimed_tiles`), so the cores stream disjoint parts of W once. The
// rows of x go in tiles of up to ROW_TILE: for each k-step the tile's rows are broadcast against
// the block's four loaded vectors, 4 x ROW_TILE accumulators in registers; while the tiles after
// the first reread the block from cache, the next block is fetched (`Ahead`). Sums are float32: bfloat16 products
// over k in order, as oneDNN's own kernel takes them (at one row the results matched its bit for
// bit), rounded to nearest even; float32 products in spans of k (`SPAN`). Each row's order is the
// same whatever rows come with it, so a row's result does not depend on the step's other rows.
//
// Measured on two Zen 5 cores against oneDNN on the same packed weights, the default model's 121
// products per step streamed from memory, alternating in one run (x.sum() read 47-51 GB/s),
// oneDNN's time over ours: bfloat16 1.20 at 1 row, 1.10 at 8, 1.28 at 16, 1.49 at 32, 1.38 at 48,
// 1.25 at 64, 1.12 at 128, 1.02 at 512; float32 1.06-1.13, 1.00, 1.14, 1.29, 1.25, 1.26, 1.02
// and 0.94 at 512 rows (prefill steps stay on oneDNN: gemm.PACKED_GEMM_MAX_ROWS). On an AVX2-only
// Zen 3 (no AVX-512, x.sum() 13-17 GB/s), the same test in float32 on one core: 1.51 at 1 row,
// 1.21 at 2, 1.02 at 4, 0.99 at 8, 1.08 at 16, 1.02 at 32, 0.96 at 64 and 128; on two: 1.69, 1.36,
// 1.14, 1.15, 1.07, 0.94, 1.06, 0.90 (run to run, +-10 %). One row ran at the x.sum() speed.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include "library.h"
#include "parallel.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>

namespace {

constexpr int64_t BLOCK = 64;  // outputs per packed block
constexpr int64_t GROUP = 16;  // outputs per vector register
constexpr int ROW_TILE = 6;    // rows of x per pass over a block: 6 x 4 accumulators fill the registers
constexpr int64_t STEP_BYTES = 256;  // packed bytes one k-step reads: a float32 input or a bfloat16 pair

// The next pass's bytes, fetched into L2 while this pass's row tiles run: the tiles after the
// first read this pass's groups from cache, so without it only the first tile streams from memory.
// Each tile fetches the k-steps i with i % every == phase, so the tiles share the work between
// them and each line is fetched once. A pass may cover part of a block (a piece of work can start
// or end half way through one): only its own lines of each k-step are fetched.
struct Ahead {
  const char* next;  // the next pass's first byte in k-step 0 (used only by kernels told to fetch)
  int64_t due, every;
  int64_t bytes;  // of each k-step's STEP_BYTES, the next pass's (whole cache lines)
  inline void step(int64_t i) {
    if (i == due) {
      for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(next + i * STEP_BYTES + l, _MM_HINT_T1);
      due += every;
    }
  }
};
// float32 sums run over spans of this many inputs, then the spans are added: one running sum over
// all of k (576-1536 terms here) rounded about twice as much as oneDNN's own float32 kernels, and
// the default model's logits moved ~2e-4 from transformers' instead of ~1e-4.
constexpr int64_t SPAN = 32;

#if defined(__AVX512F__)
#define TPSERVE_PACKED_F32 1
constexpr int64_t F32_LANES = 16;  // outputs per register: a block is four groups

// acc[r][c] for rows r < M of x and groups c < C of one block, from the group `w` points at.
template <int M, int C, bool Fetch>
inline void f32_groups(const float* w, int64_t k, const float* x, int64_t xs, const float* b, float* o,
                       int64_t os, Ahead ahead) {
  __m512 acc[M][C];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < k; j0 += SPAN) {
    __m512 part[M][C];
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < C; ++c) part[r][c] = _mm512_setzero_ps();
    for (int64_t j = j0; j < std::min(k, j0 + SPAN); ++j, w += BLOCK) {
      if constexpr (Fetch) ahead.step(j);
      __m512 wv[C];
      for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(w + c * GROUP);
      for (int r = 0; r < M; ++r) {
        const __m512 xv = _mm512_set1_ps(x[r * xs + j]);
        for (int c = 0; c < C; ++c) part[r][c] = _mm512_fmadd_ps(wv[c], xv, part[r][c]);
      }
    }
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_add_ps(acc[r][c], part[r][c]);
  }
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) {
      __m512 v = acc[r][c];
      if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + c * GROUP));
      _mm512_storeu_ps(o + r * os + c * GROUP, v);
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
#define TPSERVE_PACKED_F32 1
// float32 with AVX2: 8 outputs to a register, and only 16 registers. A block's 8 groups are one
// call; within it, each span of k runs over the groups a few at a time (`width`: M x width partial
// sums in registers), the first pass fetching a span ahead the lines the others will read. So the
// block is read front to back, a span (32 x 256 bytes) at a time. Without the fetch, 4 rows ran
// 1.4x slower; as passes over whole columns of the block (64 of every 256 bytes, all of k), 1.5x.
// The spans' sums wait in memory (`sums`): kept in registers next to the partial sums, they
// spilled inside the loop (128 rows ran 1.5x slower).
constexpr int64_t F32_LANES = 8;  // outputs per register: a block is eight groups

constexpr int64_t PREFETCH_STEPS = 32;  // how far ahead the first pass fetches for the others: one span
constexpr int64_t M1_AHEAD = 4;  // bfloat16 pair steps (1 KiB) a one-row product fetches ahead

// Rounds 8 float32 sums to bfloat16 and stores them as torch's vectorised conversion (`copy_`,
// `to`) does: to nearest even, every NaN as 0xffff.
inline void store_bf16(uint16_t* o, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xffff), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// Wide: the weight is bfloat16 in its pair layout ([n / 64][k / 2][64][2]), widened to float32 as
// it is loaded (a 32-byte load holds 8 outputs' weights for inputs j and j + 1: shifted left by 16,
// the first; masked, the second), x is float32 and everything else is the float32 kernel's, in
// the same order: its sums equal the float32 kernel's on the widened weight, bit for bit.
// Out: float32 sums stored as they are, or (uint16_t, with Wide) rounded to bfloat16 as they are
// stored.
template <int M, int C, bool Fetch, bool Wide = false, typename Out = float>
inline void f32_groups(const void* wp, int64_t k, const float* x, int64_t xs, const float* b, Out* o,
                       int64_t os, Ahead ahead) {
  constexpr int64_t G = F32_LANES;
  constexpr int width = M == 1 ? 8 : M <= 3 ? 4 : 2;
  alignas(32) float sums[M][C][G] = {};
  for (int64_t j0 = 0; j0 < k; j0 += SPAN) {
    const int64_t j1 = std::min(k, j0 + SPAN);
    auto pass = [&]<int C0, int W>() {  // groups [C0, C0 + W) over this span
      __m256 part[M][W];
      for (int r = 0; r < M; ++r)
        for (int c = 0; c < W; ++c) part[r][c] = _mm256_setzero_ps();
      if constexpr (!Wide) {
        const float* wj = static_cast<const float*>(wp) + j0 * BLOCK + C0 * G;
        for (int64_t j = j0; j < j1; ++j, wj += BLOCK) {
          if constexpr (Fetch && C0 == 0) ahead.step(j);
          if constexpr (C0 == 0 && W < C)  // the lines the later passes read, a few spans ahead
            for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(wj + PREFETCH_STEPS * BLOCK) + l * 64, _MM_HINT_T0);
          __m256 wv[W];
          for (int c = 0; c < W; ++c) wv[c] = _mm256_loadu_ps(wj + c * G);
          for (int r = 0; r < M; ++r) {
            const __m256 xv = _mm256_set1_ps(x[r * xs + j]);
            for (int c = 0; c < W; ++c) part[r][c] = _mm256_fmadd_ps(wv[c], xv, part[r][c]);
          }
        }
      } else {  // a step is a pair of inputs: 256 bytes of the block, as a float32 input's
        const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
        const uint16_t* wj = static_cast<const uint16_t*>(wp) + j0 * BLOCK + C0 * G * 2;
        for (int64_t j = j0; j < j1; j += 2, wj += 2 * BLOCK) {
          if constexpr (Fetch && C0 == 0) ahead.step(j / 2);
          if constexpr (C0 == 0 && W < C)
            for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(wj + PREFETCH_STEPS * BLOCK) + l * 64, _MM_HINT_T0);
          if constexpr (M == 1) {
            // One row (a batch-1 step) is bound by streaming W: each 32-byte load serves both
            // inputs of the pair, and the lines M1_AHEAD steps on are requested now (the hardware
            // prefetcher alone left bfloat16 at 1.4-1.7x the x.sum() time of as many bytes on a Zen 3). Keeping
            // all W widened vectors live first had spilled registers. Same sums, same order.
            for (int l = 0; l < (W * G * 4 + 63) / 64; ++l)  // this call's lines of the step only
              _mm_prefetch(reinterpret_cast<const char*>(wj + M1_AHEAD * 2 * BLOCK) + l * 64, _MM_HINT_T0);
            const __m256 x0 = _mm256_set1_ps(x[j]), x1 = _mm256_set1_ps(x[j + 1]);
            for (int c = 0; c < W; ++c) {
              const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + c * G * 2));
              part[0][c] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)), x0, part[0][c]);
              part[0][c] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(raw, high)), x1, part[0][c]);
            }
            continue;
          }
          __m256 wv[W];
          for (int c = 0; c < W; ++c)
            wv[c] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + c * G * 2)), 16));
          for (int r = 0; r < M; ++r) {
            const __m256 xv = _mm256_set1_ps(x[r * xs + j]);
            for (int c = 0; c < W; ++c) part[r][c] = _mm256_fmadd_ps(wv[c], xv, part[r][c]);
          }
          for (int c = 0; c < W; ++c)
            wv[c] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + c * G * 2)), high));
          for (int r = 0; r < M; ++r) {
            const __m256 xv = _mm256_set1_ps(x[r * xs + j + 1]);
            for (int c = 0; c < W; ++c) part[r][c] = _mm256_fmadd_ps(wv[c], xv, part[r][c]);
          }
        }
      }
      for (int r = 0; r < M; ++r)
        for (int c = 0; c < W; ++c)
          _mm256_store_ps(sums[r][C0 + c], _mm256_add_ps(_mm256_load_ps(sums[r][C0 + c]), part[r][c]));
    };
    [&]<int... I>(std::integer_sequence<int, I...>) {
      (pass.template operator()<I * width, std::min(width, C - I * width)>(), ...);
    }(std::make_integer_sequence<int, (C + width - 1) / width>{});
  }
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) {
      __m256 v = _mm256_load_ps(sums[r][c]);
      if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + c * G));
      if constexpr (std::is_same_v<Out, float>)
        _mm256_storeu_ps(o + r * os + c * G, v);
      else
        store_bf16(o + r * os + c * G, v);
    }
}
#define TPSERVE_PACKED_BF16_WIDE 1  // bfloat16 weights on the float32 kernel (no AVX512-BF16 here)
#endif

#if defined(__AVX512BF16__)
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

template <int M, int C, bool Fetch>
inline void bf16_groups(const uint16_t* w, int64_t k, const uint16_t* x, int64_t xs, const uint16_t* b,
                        uint16_t* o, int64_t os, Ahead ahead) {
  __m512 acc[M][C];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 2, w += 2 * BLOCK) {
    if constexpr (Fetch) ahead.step(j / 2);
    __m512i wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_si512(w + c * 2 * GROUP);
    for (int r = 0; r < M; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, x + r * xs + j, sizeof pair);  // x[j], x[j + 1]
      const __m512i xv = _mm512_set1_epi32(pair);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(wv[c]), as_bh(xv));
    }
  }
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) {
      __m512 v = acc[r][c];
      if (b)  // bfloat16 bias widened: the top half of a float32
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c * GROUP))), 16)));
      const __m256bh h = _mm512_cvtneps_pbh(v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + r * os + c * GROUP), reinterpret_cast<const __m256i&>(h));
    }
}
#endif

// Calls fn.template operator()<M, C, Fetch>(group, row, ahead) over this thread's groups [g0, g1)
// of Lanes outputs each, a block's worth (up to 64 / Lanes groups) at a time, and for each, over
// the m rows of x in tiles of up to ROW_TILE rows starting at `row`; Fetch says
// whether the kernel prefetches the block that holds the group after this pass's (`ahead`), which
// for the last pass is the first of the groups [after0, after1) this thread runs next (none: -1).
// `base` is the packed buffer, `block_bytes` one block's size.
template <int64_t Lanes, typename Fn>
inline void for_tiles(int64_t g0, int64_t g1, int64_t m, const char* base, int64_t block_bytes, Fn&& fn,
                      int64_t after0, int64_t after1) {
  constexpr int64_t per_block = BLOCK / Lanes;
  const int64_t tiles = (m + ROW_TILE - 1) / ROW_TILE;
  constexpr int64_t group_step_bytes = STEP_BYTES / per_block;  // a group's share of a k-step
  for (int64_t g = g0; g < g1;) {
    const int64_t c = std::min(per_block - g % per_block, g1 - g), gn = g + c;
    const int64_t a0 = gn < g1 ? gn : after0, a1 = gn < g1 ? g1 : after1;
    const char* next = a0 >= 0 ? base + a0 / per_block * block_bytes + a0 % per_block * group_step_bytes : nullptr;
    const int64_t next_bytes = std::min(per_block - a0 % per_block, a1 - a0) * group_step_bytes;
    for (int64_t t = 0; t < tiles; ++t) {
#if defined(__AVX512F__)
      // tiles as even as they go: 8 rows are 4 + 4, not 6 + 2
      const int64_t r0 = t * (m / tiles) + std::min(t, m % tiles), size = m / tiles + (t < m % tiles);
#else
      // AVX2: full tiles of 6 rows, the rest last. Its 4- and 5-row kernels ran well below the
      // 6-row one, so even tiles cost more than they saved: on a Zen 3, float32 (3072, 512), two
      // threads, 8 rows ran 1.2-1.4x faster as 6 + 2 than as 4 + 4, 20 rows 1.4x, 32 rows 1.3x.
      const int64_t r0 = t * ROW_TILE, size = std::min<int64_t>(ROW_TILE, m - r0);
#endif
      // A single tile streams the block as the hardware prefetcher fetches it, with no prefetch
      // code in its loop: the check alone cost a batch-1 step ~8 % in bfloat16.
      const bool fetch = tiles > 1 && next;
      const Ahead ahead{next, t, tiles, next_bytes};
      auto call = [&]<int M, int C>() {
        // else unreachable: c <= per_block, and 8-lane groups come in pairs (n % 16 == 0)
        if constexpr (C <= per_block && (Lanes != 8 || C % 2 == 0)) {
          if (fetch)
            fn.template operator()<M, C, true>(g, r0, ahead);
          else
            fn.template operator()<M, C, false>(g, r0, ahead);
        }
      };
      auto rows = [&](auto cols) {
        constexpr int C = decltype(cols)::value;
        switch (size) {
          case 1: call.template operator()<1, C>(); break;
          case 2: call.template operator()<2, C>(); break;
          case 3: call.template operator()<3, C>(); break;
          case 4: call.template operator()<4, C>(); break;
          case 5: call.template operator()<5, C>(); break;
          default: call.template operator()<6, C>(); break;
        }
      };
      switch (c) {
        case 1: rows(std::integral_constant<int, 1>{}); break;
        case 2: rows(std::integral_constant<int, 2>{}); break;
        case 3: rows(std::integral_constant<int, 3>{}); break;
        case 4: rows(std::integral_constant<int, 4>{}); break;
        case 5: rows(std::integral_constant<int, 5>{}); break;
        case 6: rows(std::integral_constant<int, 6>{}); break;
        case 7: rows(std::integral_constant<int, 7>{}); break;
        default: rows(std::integral_constant<int, 8>{}); break;
      }
    }
    g += c;
  }
}

// The offset, in elements, of group g's first weight in the packed buffer (`lanes` outputs per
// group, k inputs per block; `pair` = 2 for bfloat16's interleaved pairs).
inline int64_t group_offset(int64_t g, int64_t lanes, int64_t k, int64_t pair) {
  const int64_t groups_per_block = BLOCK / lanes;
  return (g / groups_per_block) * BLOCK * k + (g % groups_per_block) * lanes * pair;
}

// Groups per piece of work (parallel.h) for m rows: runs of whole blocks, or of half blocks (32
// outputs: whole cache lines of every k-step, so two threads never share a line) where the product
// is bound by arithmetic (more than one row tile); about PIECES_PER_THREAD pieces a thread, so a
// delayed thread's share is picked up by the others; the largest such run with which the threads
// still end together, within 5 %. At 31 rows, pieces of whole blocks left 9 blocks (SmolLM2's 576
// outputs) as 5 on one thread and 4 on the other; as 18 half blocks they split 9 and 9. A product
// that streams its weight (one tile) keeps whole blocks: with the two halves of a block on two
// threads at once, each core's prefetchers also fetched the other's lines, and at one row the 576-
// output products of SmolLM2 ran 1.6-2.3x slower (Zen 3, two threads).
constexpr int64_t PIECES_PER_THREAD = 4;
inline int64_t piece_groups(int64_t groups, int64_t lanes, int64_t m) {
  const int64_t per_unit = m > ROW_TILE ? BLOCK / 2 / lanes : BLOCK / lanes;
  const int64_t units = (groups + per_unit - 1) / per_unit, threads = at::get_num_threads();
  const int64_t even = (units + threads - 1) / threads, limit = even + even / 20;
  int64_t h = std::max<int64_t>(1, units / (PIECES_PER_THREAD * threads));
  for (; h > 1; --h) {  // the units the busiest thread runs, as pieces of h go round
    if (((units + h - 1) / h + threads - 1) / threads * h <= limit) break;
  }
  return h * per_unit;
}

// for_tiles over the pieces of [0, groups) this thread claims. Each piece is claimed one ahead, so
// the last pass over a piece fetches the first block of the next (`Ahead`) as it does within a
// piece; claimed only when needed, each piece's first block had come from memory while its first
// row tile waited: on a Zen 4, 30 layers of SmolLM2's bfloat16 products with cold weights took
// 0.76x the time at 16 rows, 0.80x at 32, 0.87x at 48 and 64 rows once claimed ahead. The price:
// a thread that loses its core holds up two pieces, not one.
template <int64_t Lanes, typename Fn>
inline void claimed_tiles(int64_t groups, int64_t m, const char* base, int64_t block_bytes, Fn&& fn) {
  parallel_claims(groups, piece_groups(groups, Lanes, m), [&](auto& claim) {
    int64_t g0, g1, n0 = -1, n1 = -1;
    for (bool have = claim(g0, g1); have; g0 = n0, g1 = n1) {
      have = claim(n0, n1);
      for_tiles<Lanes>(g0, g1, m, base, block_bytes, fn, have ? n0 : -1, have ? n1 : -1);
    }
  });
}

bool packed_gemm_supported(at::ScalarType dt) {
#if defined(__AVX512BF16__) || defined(TPSERVE_PACKED_BF16_WIDE)
  if (dt == at::kBFloat16) return true;
#endif
#if defined(TPSERVE_PACKED_F32)
  if (dt == at::kFloat) return true;
#endif
  return false;
}

// x (m, k), rows contiguous; w_ptr the packed weight of n outputs (n a multiple of 16; bfloat16: k
// even); out (m, n), rows contiguous.
void packed_gemm(const at::Tensor& x, int64_t w_ptr, int64_t n, const std::optional<at::Tensor>& bias,
                 at::Tensor out) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(packed_gemm_supported(dt), "packed_gemm: this build has no kernel for ", dt,
              " (float32 and bfloat16 need AVX2 and FMA)");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n,
              "packed_gemm: x (m, k), out (m, n)");
  TORCH_CHECK(out.scalar_type() == dt && x.stride(1) == 1 && out.stride(1) == 1, "packed_gemm: rows contiguous, one dtype");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(n % GROUP == 0 && (dt != at::kBFloat16 || k % 2 == 0), "packed_gemm: n a multiple of 16, k even");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == dt && bias->is_contiguous() && bias->numel() == n, "packed_gemm: bias (n,)");
  if (m == 0) return;
  const int64_t xs = x.stride(0), os = out.stride(0);
#if defined(TPSERVE_PACKED_F32)
  if (dt == at::kFloat) {
    constexpr int64_t G = F32_LANES;
    const int64_t groups = n / G;
    const float* w = reinterpret_cast<const float*>(w_ptr);
    const float* xp = x.data_ptr<float>();
    const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
    claimed_tiles<F32_LANES>(groups, m, reinterpret_cast<const char*>(w), BLOCK * k * 4, [&]<int M, int C, bool F>(int64_t g, int64_t r, Ahead a) {
      f32_groups<M, C, F>(w + group_offset(g, G, k, 1), k, xp + r * xs, xs, bp ? bp + g * G : nullptr,
                          op + r * os + g * G, os, a);
    });
    return;
  }
#endif
#if defined(TPSERVE_PACKED_BF16_WIDE)
  {  // bfloat16: x and the bias widened once, sums in float32, each result rounded as it is stored
    constexpr int64_t G = F32_LANES;
    const int64_t groups = n / G;
    const uint16_t* w = reinterpret_cast<const uint16_t*>(w_ptr);
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    const std::optional<at::Tensor> bf = bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
    const float* xp = xf.data_ptr<float>();
    const float* bp = bf.has_value() ? bf->data_ptr<float>() : nullptr;
    uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
    claimed_tiles<F32_LANES>(groups, m, reinterpret_cast<const char*>(w), BLOCK * k * 2, [&]<int M, int C, bool F>(int64_t g, int64_t r, Ahead a) {
      f32_groups<M, C, F, true>(w + group_offset(g, G, k, 2), k, xp + r * k, k, bp ? bp + g * G : nullptr,
                                op + r * os + g * G, os, a);
    });
  }
#endif
#if defined(__AVX512BF16__)
  const uint16_t* w = reinterpret_cast<const uint16_t*>(w_ptr);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const uint16_t* bp = bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->data_ptr<c10::BFloat16>()) : nullptr;
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const int64_t groups = n / GROUP;
  claimed_tiles<GROUP>(groups, m, reinterpret_cast<const char*>(w), BLOCK * k * 2, [&]<int M, int C, bool F>(int64_t g, int64_t r, Ahead a) {
    bf16_groups<M, C, F>(w + group_offset(g, GROUP, k, 2), k, xp + r * xs, xs, bp ? bp + g * GROUP : nullptr,
                         op + r * os + g * GROUP, os, a);
  });
#endif
}

}  // namespace

TPSERVE_LIBRARY_FRAGMENT(TPSERVE_NS, m) {
  m.def("packed_gemm(Tensor x, int w_ptr, int n, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("packed_gemm_supported(ScalarType dtype) -> bool", [](at::ScalarType dt) { return packed_gemm_supported(dt); });
}

TPSERVE_LIBRARY_IMPL(TPSERVE_NS, CPU, m) { m.impl("packed_gemm", &packed_gemm); }
