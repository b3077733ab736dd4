// The small-batch operations of a decode step, for float32 and bfloat16 on CPU.
//
// A decode step has a handful of rows (one per sequence), so it is bound by streaming the weights
// once and by the fixed cost of each operator call, not by arithmetic:
//
//   small_linear   y = x W^T (+ b) for a few rows of x: each thread streams its own contiguous
//                  share of W exactly once; every loaded 8-float piece of W meets up to two rows of x
//                  in registers, and the rows of x stay in L1.
//   add_rms_norm   the residual add and the RMS norm after it, one pass, two outputs.
//   rope_          the rotary embedding of q or k (the two-halves convention), in place.
//   silu_mul       silu(gate) * up over the fused [gate | up] projection.
//
// Each replaces several aten calls of a few microseconds each; a 30-layer model makes about 25
// per layer per step. The elementwise formulas follow the order torch's own kernels round in.
//
// bfloat16: weights are widened to float32 as they stream in (a shift: bfloat16 is the top half of
// a float32), every sum runs in float32, and each result is rounded to bfloat16 (to nearest even)
// where the torch operators of transformers' modules round theirs, so outputs stay as close to
// transformers' as its own bfloat16 run is. The code is plain C++ with GCC vector extensions,
// built with -march=native on the machine that runs it (tpkernels/native.py), so it uses the widest
// vectors that CPU has (AVX2 or AVX-512); add_rms_norm, rope_ and silu_mul have 16-lane paths of
// their own on AVX-512, with AVX512-BF16's rounding instruction where the CPU has it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>
#include "library.h"
#include "vec8.h"

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }

template <typename T> inline T from_f(float v) { return T(v); }  // bfloat16: round to nearest even

// v rounded to T and back: what a torch operator on T tensors does to each result.
template <typename T> inline float round_to(float v) { return to_f(from_f<T>(v)); }

inline float hsum(v8 v) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// s[c * R + r] = x_c . w_r for R consecutive rows of W and C rows of x (x in float32).
template <int R, int C, typename TW>
inline void dot_tile(const float* x, int64_t xs, const TW* w, int64_t k, float* s) {
  v8 acc[R][C] = {};
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    v8 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = load8(x + c * xs + j);
    for (int r = 0; r < R; ++r) {
      const v8 wv = load8(w + r * k + j);
      for (int c = 0; c < C; ++c) acc[r][c] += wv * xv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float t = hsum(acc[r][c]);
      for (int64_t jj = j; jj < k; ++jj) t += x[c * xs + jj] * to_f(w[r * k + jj]);
      s[c * R + r] = t;
    }
}

// out[i, 0:R] = x_i . w_{0:R} (+ b) for every row i of x, two rows of x at a time.
template <int R, typename T>
inline void weight_rows(const float* x, int64_t xs, int64_t m, const T* w, int64_t k,
                        const T* b, T* o, int64_t os) {
  float s[R * 2];
  int64_t i = 0;
  for (; i < m; i += 2) {
    const int C = i + 2 <= m ? 2 : 1;
    if (C == 2) dot_tile<R, 2>(x + i * xs, xs, w, k, s);
    else dot_tile<R, 1>(x + i * xs, xs, w, k, s);
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) o[(i + c) * os + r] = from_f<T>(b ? s[c * R + r] + to_f(b[r]) : s[c * R + r]);
  }
}

template <typename T>
void small_linear_impl(const float* xp, int64_t xs, int64_t m, int64_t k, const T* wp, int64_t n,
                       const T* bp, T* op, int64_t os) {
  // Work unit: 8 rows of W (measured 5-10 % faster than 4 here, 2 was slower still).
  // parallel_for hands each thread one contiguous range of them.
  at::parallel_for(0, (n + 7) / 8, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * 8;
      if (r0 + 8 <= n) {
        weight_rows<8>(xp, xs, m, wp + r0 * k, k, bp ? bp + r0 : nullptr, op + r0, os);
      } else {
        for (int64_t r = r0; r < n; ++r) weight_rows<1>(xp, xs, m, wp + r * k, k, bp ? bp + r : nullptr, op + r, os);
      }
    }
  });
}

void small_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  at::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, "x (m, k), w (n, k), out (m, n)");
  const auto dt = w.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && x.scalar_type() == dt && out.scalar_type() == dt,
              "small_linear: x, w and out all float32 or all bfloat16");
  TORCH_CHECK(x.size(1) == w.size(1) && out.size(0) == x.size(0) && out.size(1) == w.size(0), "shape mismatch");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && w.is_contiguous(), "rows must be contiguous");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == dt && bias->is_contiguous() && bias->numel() == w.size(0),
                "bias (n,) of w's dtype");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0), os = out.stride(0);
  if (dt == at::kFloat) {
    small_linear_impl<float>(x.data_ptr<float>(), x.stride(0), m, k, w.data_ptr<float>(), n,
                             bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), os);
    return;
  }
  // A few rows of x, widened to float32 once: W is what streams, x stays in L1.
  std::vector<float> xf(m * k);
  const bf16* xb = x.data_ptr<bf16>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) xf[i * k + j] = to_f(xb[i * x.stride(0) + j]);
  small_linear_impl<bf16>(xf.data(), k, m, k, w.data_ptr<bf16>(), n,
                          bias.has_value() ? bias->data_ptr<bf16>() : nullptr, out.data_ptr<bf16>(), os);
}

// 8 floats rounded to T and back (see round_to), and stored as T.
template <typename T> inline v8 round8(v8 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {  // NaN cannot arise here (finite inputs)
    return (v8)(bf16_round_bits((u32x8)v) & 0xffff0000u);
  }
}
inline void store8(float* o, v8 v) { *reinterpret_cast<v8*>(o) = v; }
inline void store8(bf16* o, v8 v) {  // v already holds bfloat16 values: keep the top halves
  *reinterpret_cast<u16x8*>(o) = __builtin_convertvector((u32x8)v >> 16, u16x8);
}

#if defined(__AVX512F__)
// The elementwise kernels below run 16 lanes at a time where the build has AVX-512, then 8, then
// one, the same formula at each width.
//
// 16 values, bfloat16 widened in one instruction and a shift. vec8.h's load16 compiles to two
// 8-lane widenings and an insert; the decode attention ran faster with that, these loops slower
// (512 rows of the Llama's norm 1.4x, of its rotation 1.3x, two Zen 4 cores).
inline v16 from_bf16_bits(__m256i h) { return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16); }
inline v16 widen16(const float* p) { return load16(p); }
inline v16 widen16(const bf16* p) { return from_bf16_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// round8 at 16 lanes, and store16, which rounds as it stores. With AVX512-BF16 one instruction
// rounds 16 floats to bfloat16 (to nearest even, as round8 does); the integer rounding took most
// of silu_mul's time.
template <typename T> inline v16 round16(v16 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#if defined(__AVX512BF16__)
    const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
    return from_bf16_bits(reinterpret_cast<const __m256i&>(h));
#else
    return (v16)(bf16_round_bits((u32x16)v) & 0xffff0000u);
#endif
  }
}
inline void store16(float* o, v16 v) { *reinterpret_cast<v16*>(o) = v; }
inline void store16(bf16* o, v16 v) {  // v rounded to bfloat16 and stored
#if defined(__AVX512BF16__)
  const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), reinterpret_cast<const __m256i&>(h));
#else
  *reinterpret_cast<u16x16*>(o) = __builtin_convertvector((u32x16)round16<bf16>(v) >> 16, u16x16);
#endif
}
// vec8.h's e^x, its 2^n applied by vscalefps (which also takes care of the range: e^x overflows
// to infinity above 88.7 and goes to 0 below -103, where exp16 clamps to [-87, 88]) and n rounded
// by vrndscaleps: the same n, r and polynomial, so the same value for every x in [-87, 88], in 6
// fewer instructions. silu_mul spends most of its time here (512 rows of the Llama's 1536, Zen 4:
// 1.2-1.3x faster than with exp16).
inline v16 exp16_scaled(v16 x) {
  const v16 n = (v16)_mm512_roundscale_ps((__m512)(x * 1.44269504f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (v16)_mm512_scalef_ps((__m512)exp_reduced(x, n), (__m512)n);
}
inline float hsum16(v16 v) { return _mm512_reduce_add_ps((__m512)v); }
#endif

constexpr int64_t ROWS_PER_TASK = 32;  // a decode step's few rows stay on one thread: a thread costs more

// residual = x + delta; out = residual * rsqrt(mean(residual^2) + eps) * weight, row by row.
template <typename T>
void add_rms_norm_impl(const T* xp, const T* dp, const T* wp, float e, T* rp, T* op, int64_t m, int64_t h) {
  at::parallel_for(0, m, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const T *xi = xp + i * h, *di = dp + i * h;
    T *ri = rp + i * h, *oi = op + i * h;
    // sums of squares in 16 lanes, then 8, then the scalar tail, then the 8 lanes in order (the
    // compiler's own vectorisation of the scalar loop left bfloat16's conversions scalar: 2x slower on AVX2)
    int64_t j = 0;
    float ss = 0.f;
#if defined(__AVX512F__)
    v16 acc16 = {};
    for (; j + 16 <= h; j += 16) {
      const v16 v = round16<T>(widen16(xi + j) + widen16(di + j));
      store16(ri + j, v);
      acc16 += v * v;
    }
    ss += hsum16(acc16);
#endif
    v8 acc = {};
    for (; j + 8 <= h; j += 8) {
      const v8 v = round8<T>(load8(xi + j) + load8(di + j));
      store8(ri + j, v);
      acc += v * v;
    }
    for (; j < h; ++j) {
      const float v = round_to<T>(to_f(xi[j]) + to_f(di[j]));
      ri[j] = from_f<T>(v);
      ss += v * v;
    }
    ss += hsum(acc);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + e);
    j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= h; j += 16) store16(oi + j, widen16(wp + j) * round16<T>(widen16(ri + j) * inv));
#endif
    for (; j + 8 <= h; j += 8) store8(oi + j, round8<T>(load8(wp + j) * round8<T>(load8(ri + j) * inv)));
    for (; j < h; ++j) oi[j] = from_f<T>(to_f(wp[j]) * round_to<T>(to_f(ri[j]) * inv));
  }
  });
}

void add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps,
                  at::Tensor residual, at::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && delta.sizes() == x.sizes() && residual.sizes() == x.sizes() && out.sizes() == x.sizes(),
              "x, delta, residual, out: (m, hidden)");
  const auto dt = x.scalar_type();
  const at::Tensor* all[] = {&x, &delta, &weight, &residual, &out};
  for (const at::Tensor* t : all)
    TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && t->scalar_type() == dt && t->is_contiguous(),
                "add_rms_norm: contiguous, all float32 or all bfloat16");
  TORCH_CHECK(weight.numel() == x.size(1), "weight (hidden,)");
  const int64_t m = x.size(0), h = x.size(1);
  const float e = static_cast<float>(eps);
  if (dt == at::kFloat)
    add_rms_norm_impl<float>(x.data_ptr<float>(), delta.data_ptr<float>(), weight.data_ptr<float>(), e,
                             residual.data_ptr<float>(), out.data_ptr<float>(), m, h);
  else
    add_rms_norm_impl<bf16>(x.data_ptr<bf16>(), delta.data_ptr<bf16>(), weight.data_ptr<bf16>(), e,
                            residual.data_ptr<bf16>(), out.data_ptr<bf16>(), m, h);
}

template <typename T>
void rope_impl(T* xp, const T* cp, const T* sp, int64_t m, int64_t heads, int64_t half, int64_t s0, int64_t s1) {
  at::parallel_for(0, m, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i)
    for (int64_t hd = 0; hd < heads; ++hd) {
      T* a = xp + i * s0 + hd * s1;
      T* b = a + half;
      const T *c = cp + i * half, *s = sp + i * half;
      int64_t j = 0;
#if defined(__AVX512F__)
      for (; j + 16 <= half; j += 16) {
        const v16 x1 = widen16(a + j), x2 = widen16(b + j), cj = widen16(c + j), sj = widen16(s + j);
        store16(a + j, round16<T>(x1 * cj) - round16<T>(x2 * sj));
        store16(b + j, round16<T>(x2 * cj) + round16<T>(x1 * sj));
      }
#endif
      for (; j + 8 <= half; j += 8) {
        const v8 x1 = load8(a + j), x2 = load8(b + j), cj = load8(c + j), sj = load8(s + j);
        store8(a + j, round8<T>(round8<T>(x1 * cj) - round8<T>(x2 * sj)));
        store8(b + j, round8<T>(round8<T>(x2 * cj) + round8<T>(x1 * sj)));
      }
      for (; j < half; ++j) {
        const float x1 = to_f(a[j]), x2 = to_f(b[j]), cj = to_f(c[j]), sj = to_f(s[j]);
        a[j] = from_f<T>(round_to<T>(x1 * cj) - round_to<T>(x2 * sj));
        b[j] = from_f<T>(round_to<T>(x2 * cj) + round_to<T>(x1 * sj));
      }
    }
  });
}

// x (m, heads, d), last dim contiguous: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], in place;
// cos and sin hold one row of d/2 per token.
void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x (m, heads, d) with contiguous heads");
  const auto dt = x.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && cos.scalar_type() == dt && sin.scalar_type() == dt,
              "rope_: x, cos and sin all float32 or all bfloat16");
  const int64_t m = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  TORCH_CHECK(d % 2 == 0 && cos.numel() == m * half && sin.numel() == m * half && cos.is_contiguous() &&
              sin.is_contiguous(), "cos, sin: (m, d/2) contiguous");
  if (dt == at::kFloat)
    rope_impl<float>(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), m, heads, half,
                     x.stride(0), x.stride(1));
  else
    rope_impl<bf16>(x.data_ptr<bf16>(), cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), m, heads, half,
                    x.stride(0), x.stride(1));
}

// Rows in parallel, 16 values at a time with exp16_scaled where the build has AVX-512, else 8 with exp8
// (a scalar libm exp per value made this the slowest elementwise step of a prefill; 8 lanes with
// integer bfloat16 rounding still ran 1.7x torch's silu and mul in bfloat16).
template <typename T>
void silu_mul_impl(const T* gp, int64_t gs, T* op, int64_t m, int64_t f) {
  at::parallel_for(0, m, ROWS_PER_TASK, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T *g = gp + i * gs, *u = g + f;
      T* o = op + i * f;
      int64_t j = 0;
#if defined(__AVX512F__)
      for (; j + 16 <= f; j += 16) {
        const v16 gj = widen16(g + j);
        store16(o + j, round16<T>(gj / (1.f + exp16_scaled(-gj))) * widen16(u + j));
      }
#endif
      for (; j + 8 <= f; j += 8) {
        const v8 gj = load8(g + j);
        store8(o + j, round8<T>(round8<T>(gj / (1.f + exp8(-gj))) * load8(u + j)));
      }
      for (; j < f; ++j) {
        const float gj = to_f(g[j]);
        o[j] = from_f<T>(round_to<T>(gj / (1.f + std::exp(-gj))) * to_f(u[j]));
      }
    }
  });
}

// gu (m, 2f) = [gate | up] -> out (m, f) = silu(gate) * up.
void silu_mul(const at::Tensor& gu, at::Tensor out) {
  TORCH_CHECK(gu.dim() == 2 && out.dim() == 2 && gu.size(1) == 2 * out.size(1) && gu.size(0) == out.size(0),
              "gu (m, 2f), out (m, f)");
  const auto dt = gu.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && out.scalar_type() == dt && gu.stride(1) == 1 &&
              out.is_contiguous(), "silu_mul: float32 or bfloat16 with contiguous rows");
  const int64_t m = gu.size(0), f = out.size(1), gs = gu.stride(0);
  if (dt == at::kFloat)
    silu_mul_impl<float>(gu.data_ptr<float>(), gs, out.data_ptr<float>(), m, f);
  else
    silu_mul_impl<bf16>(gu.data_ptr<bf16>(), gs, out.data_ptr<bf16>(), m, f);
}

// q (m, hq, d), k and v (m, hkv, d), heads contiguous; the caches (hkv, blocks, block_size * d)
// contiguous, so token slot s of head h is row h * slots + s of a (hkv * slots, d) view. Rotates q
// and k in place (when cos and sin are given, as rope_), then copies each token's k and v rows to
// its slot: one call where rope_ twice and two index_copy_ were four, with their views.
void rope_and_cache_(at::Tensor q, at::Tensor k, const at::Tensor& v, const std::optional<at::Tensor>& cos,
                     const std::optional<at::Tensor>& sin, const at::Tensor& slots, at::Tensor k_cache,
                     at::Tensor v_cache) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "rope_and_cache_: k, v (m, kv_heads, d) with contiguous heads");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && k_cache.size(0) == k.size(1) && k_cache.size(2) % k.size(2) == 0,
              "rope_and_cache_: caches (kv_heads, blocks, block_size * d), contiguous");
  TORCH_CHECK(k_cache.scalar_type() == k.scalar_type() && v_cache.scalar_type() == k.scalar_type() &&
              v.scalar_type() == k.scalar_type(), "rope_and_cache_: k, v and the caches share a dtype");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && slots.scalar_type() == at::kLong &&
              slots.is_contiguous(), "rope_and_cache_: slots (m,) int64");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "rope_and_cache_: cos and sin together");
  const int64_t m = k.size(0), hkv = k.size(1), d = k.size(2);
  const int64_t nslots = k_cache.size(1) * (k_cache.size(2) / d);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < m; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < nslots, "rope_and_cache_: slot ", sp[t], " outside the cache's ", nslots);
  if (cos.has_value()) {
    rope_(q, *cos, *sin);
    rope_(k, *cos, *sin);
  }
  const int64_t es = k.element_size(), bytes = d * es;
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < hkv; ++h) {
        std::memcpy(kc + (h * nslots + sp[t]) * bytes, kp + (t * k.stride(0) + h * k.stride(1)) * es, bytes);
        std::memcpy(vc + (h * nslots + sp[t]) * bytes, vp + (t * v.stride(0) + h * v.stride(1)) * es, bytes);
      }
  });
}

// out[i] = the first index of the largest value of row i: torch.argmax's answer for rows without
// NaN, in one vectorised pass (torch's CPU argmax took 1.8 ms for 64 rows of a 49152-word
// vocabulary, its amax 0.15 ms). Each lane keeps the first index where its maximum occurs; the
// lanes then settle ties by the smaller index.
// Greedy: -1 instead for a row whose maximum is not a finite number (a NaN anywhere in it, +inf, or
// nothing above -inf), the rows a sampler cannot pick from; NaN is seen as it goes (v != v).
template <bool Greedy, typename T>
void argmax_impl(const T* xp, int64_t xs, int64_t m, int64_t n, int64_t* op) {
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* x = xp + i * xs;
      v8 best = v8{} - std::numeric_limits<float>::infinity();
      i8 at = {}, idx = {0, 1, 2, 3, 4, 5, 6, 7}, nan = {};
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {
        const v8 v = load8(x + j);
        const i8 gt = v > best;
        best = gt ? v : best;
        at = gt ? idx : at;
        idx += 8;
        if constexpr (Greedy) nan |= v != v;
      }
      float bv = best[0];
      int64_t bi = at[0];
      for (int l = 1; l < 8; ++l)
        if (best[l] > bv || (best[l] == bv && at[l] < bi)) bv = best[l], bi = at[l];
      for (; j < n; ++j) {  // later indices than any lane's: only a strictly larger value wins
        const float v = to_f(x[j]);
        if (v > bv) bv = v, bi = j;
        if constexpr (Greedy) nan[0] |= v != v;
      }
      if constexpr (Greedy) {
        bool bad = !std::isfinite(bv);
        for (int l = 0; l < 8; ++l) bad = bad || nan[l];
        if (bad) bi = -1;
      }
      op[i] = bi;
    }
  });
}

// x (m, n) float32 or bfloat16, rows contiguous -> out (m,) int64.
template <bool Greedy>
void argmax_rows(const at::Tensor& x, at::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && out.dim() == 1 && out.size(0) == x.size(0) &&
              out.scalar_type() == at::kLong && out.is_contiguous(), "argmax_rows: x (m, n) rows contiguous, out (m,) int64");
  TORCH_CHECK(x.size(1) < (int64_t{1} << 31), "argmax_rows: rows of fewer than 2^31 values");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "argmax_rows: float32 or bfloat16");
  if (dt == at::kFloat)
    argmax_impl<Greedy, float>(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), out.data_ptr<int64_t>());
  else
    argmax_impl<Greedy, bf16>(x.data_ptr<bf16>(), x.stride(0), x.size(0), x.size(1), out.data_ptr<int64_t>());
}

}  // namespace

TPSERVE_LIBRARY_FRAGMENT(TPSERVE_NS, m) {
  m.def("small_linear(Tensor x, Tensor w, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps, Tensor(a!) residual, Tensor(b!) out) -> ()");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor gu, Tensor(a!) out) -> ()");
  // 16 where this build has the AVX-512 paths (silu_mul's among them), else 8
  m.def("vector_lanes() -> int", []() -> int64_t {
#if defined(__AVX512F__)
    return 16;
#else
    return 8;
#endif
  });
  m.def("argmax_rows(Tensor x, Tensor(a!) out) -> ()");
  m.def("greedy_rows(Tensor x, Tensor(a!) out) -> ()");
  m.def("rope_and_cache_(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor? cos, Tensor? sin, Tensor slots, "
        "Tensor(c!) k_cache, Tensor(d!) v_cache) -> ()");
}

TPSERVE_LIBRARY_IMPL(TPSERVE_NS, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_", &rope_);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_rows", &argmax_rows<false>);
  m.impl("greedy_rows", &argmax_rows<true>);
  m.impl("rope_and_cache_", &rope_and_cache_);
}
