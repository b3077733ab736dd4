// 8-float vectors (GCC vector extensions), and 16-float ones where the build has AVX-512, with the
// few operations on them that both kernel files use: loads that widen bfloat16, and a vectorised
// e^x. -march=native maps them onto the widest instructions the CPU has.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4)));  // unaligned 8-float loads and stores
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }

inline v8 load8(const c10::BFloat16* p) {  // widened: a bfloat16 is the top half of a float32
#if defined(__AVX2__)
  // GCC 12 (-march=native on a Zen 3) split the generic form below into two 4-lane widenings, a
  // byte shift and an insert: six instructions for what one widening load and a shift do.
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (v8)_mm256_slli_epi32(w, 16);
#else
  const u16x8 h = *reinterpret_cast<const u16x8*>(p);
  return (v8)(__builtin_convertvector(h, u32x8) << 16);
#endif
}

// Float32 bits u -> the same bits with the top 16 rounded to nearest even (the low 16 left for the
// caller to drop): bfloat16's rounding, for a uint32_t or a vector of them. NaN is the caller's
// to handle (torch's scalar conversion makes it 0x7FC0, its vectorised one 0xFFFF); infinities
// and overflow to them come out right.
template <typename U>
__attribute__((always_inline)) inline U bf16_round_bits(U u) {
  return u + 0x7fffu + ((u >> 16) & 1u);
}

// e^(x - n ln2) for n = x / ln2 rounded to nearest: r = x - n ln2 (|r| <= ln2 / 2), then e^r by
// its degree-6 Taylor polynomial. Lane by lane for a float vector V.
template <typename V>
__attribute__((always_inline)) inline V exp_reduced(V x, V n) {
  const V r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 in two parts: exact n * hi
  V p = r * (1.f / 720.f) + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  return p * r + 1.f;
}

// e^x for every lane of a float vector V (I: the int32 vector of as many lanes), to ~2 ulp:
// x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, 2^n put in the
// exponent bits. x is clamped to [-87, 88]: e^-87 ~ 1.6e-38, below which everything rounds away
// anyway, and e^88 is the largest power whose 2^n still fits a float's exponent. A scalar libm
// expf per value cost more than the rest of the attention kernel (2.4 ms of a 64-sequence,
// 600-token step at 24 GB/s). exp8, and exp16 below where the build has AVX-512.
template <typename V, typename I>
__attribute__((always_inline)) inline V exp_lanes(V x) {
  x = x < -87.f ? -87.f : x;
  x = x > 88.f ? 88.f : x;
  const V t = x * 1.44269504f;  // x / ln2
  const V n = (t + 12582912.f) - 12582912.f;  // t rounded to nearest by the 1.5 * 2^23 trick
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  return exp_reduced(x, n) * (V)e;
}

inline v8 exp8(v8 x) { return exp_lanes<v8, i8>(x); }

#if defined(__AVX512F__)
// The same at 16 lanes, for the AVX-512 paths.
typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned 16-float loads and stores
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline v16 load16(const c10::BFloat16* p) {
  const u16x16 h = *reinterpret_cast<const u16x16*>(p);
  return (v16)(__builtin_convertvector(h, u32x16) << 16);
}

inline v16 exp16(v16 x) { return exp_lanes<v16, i16v>(x); }
#endif

}  // namespace
