// y = x W^T (+ b) for up to four rows of x, reading W where oneDNN packed it.
//
// The weights stay in oneDNN's blocked layout (tpkernels/gemm.py packs each once, at load), which
// serves every input size from a few rows up. For the one to four rows of a small decode step, a
// oneDNN call costs ~10 us before it reads a byte, on products that stream 0.5-4 MB of weight:
// a batch-1 step of the default model spends more than a tenth of its time there. This kernel reads
// the same packed bytes with no set-up. It is used only where gemm.py has checked, weight by weight,
// that the packed bytes are laid out as below (oneDNN picks its layout per CPU and version):
//
//   float32    [n / 64][k][64]         64 outputs side by side for each input index
//   bfloat16   [n / 64][k / 2][64][2]  the same with input indices in pairs (`vdpbf16ps` order)
//
// Each 64-output block is four 16-output groups, one vector register each. Threads take
// contiguous runs of groups, so both cores stream disjoint parts of W once; every loaded vector of W
// meets all rows of x (in registers, broadcast) before the next is loaded. Sums are float32:
// bfloat16 products over k in order, as oneDNN's own kernel takes them (at one row the results
// matched its bit for bit), rounded to nearest even; float32 products in spans of k (`SPAN`).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include "library.h"

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

constexpr int64_t BLOCK = 64;  // outputs per packed block
constexpr int64_t GROUP = 16;  // outputs per vector register
constexpr int MAX_ROWS = 4;
// float32 sums run over spans of this many inputs, then the spans are added: one running sum over
// all of k (576-1536 terms here) rounded about twice as much as oneDNN's own float32 kernels, and
// the default model's logits moved ~2e-4 from transformers' instead of ~1e-4.
constexpr int64_t SPAN = 32;

#if defined(__AVX512F__)
// acc[r][c] for rows r < M of x and groups c < C of one block, starting at group `first` of it.
template <int M, int C>
inline void f32_groups(const float* w, int64_t k, const float* x, int64_t xs, const float* b, float* o,
                       int64_t os) {
  __m512 acc[M][C];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < k; j0 += SPAN) {
    __m512 part[M][C];
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < C; ++c) part[r][c] = _mm512_setzero_ps();
    for (int64_t j = j0; j < std::min(k, j0 + SPAN); ++j, w += BLOCK) {
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
#endif

#if defined(__AVX512BF16__)
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

template <int M, int C>
inline void bf16_groups(const uint16_t* w, int64_t k, const uint16_t* x, int64_t xs, const uint16_t* b,
                        uint16_t* o, int64_t os) {
  __m512 acc[M][C];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += 2, w += 2 * BLOCK) {
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

// Calls fn.template operator()<M, C>(group) over this thread's groups [g0, g1), a block's worth
// (up to four groups) at a time, for the m rows of x.
template <typename Fn>
inline void for_groups(int64_t g0, int64_t g1, int m, Fn&& fn) {
  for (int64_t g = g0; g < g1;) {
    const int64_t c = std::min<int64_t>(BLOCK / GROUP - g % (BLOCK / GROUP), g1 - g);
    auto rows = [&](auto cols) {
      constexpr int C = decltype(cols)::value;
      switch (m) {
        case 1: fn.template operator()<1, C>(g); break;
        case 2: fn.template operator()<2, C>(g); break;
        case 3: fn.template operator()<3, C>(g); break;
        default: fn.template operator()<4, C>(g); break;
      }
    };
    switch (c) {
      case 1: rows(std::integral_constant<int, 1>{}); break;
      case 2: rows(std::integral_constant<int, 2>{}); break;
      case 3: rows(std::integral_constant<int, 3>{}); break;
      default: rows(std::integral_constant<int, 4>{}); break;
    }
    g += c;
  }
}

// The offset, in elements, of group g's first weight in the packed buffer (k inputs per block;
// `pair` = 2 for bfloat16's interleaved pairs).
inline int64_t group_offset(int64_t g, int64_t k, int64_t pair) {
  const int64_t groups_per_block = BLOCK / GROUP;
  return (g / groups_per_block) * BLOCK * k + (g % groups_per_block) * GROUP * pair;
}

bool packed_gemv_supported(at::ScalarType dt) {
#if defined(__AVX512BF16__)
  if (dt == at::kBFloat16) return true;
#endif
#if defined(__AVX512F__)
  if (dt == at::kFloat) return true;
#endif
  return false;
}

// x (m, k), rows contiguous; w_ptr the packed weight of n outputs (n a multiple of 16; bfloat16: k
// even); out (m, n), rows contiguous.
void packed_gemv(const at::Tensor& x, int64_t w_ptr, int64_t n, const std::optional<at::Tensor>& bias,
                 at::Tensor out) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(packed_gemv_supported(dt), "packed_gemv: this build has no kernel for ", dt,
              " (float32 needs AVX-512, bfloat16 AVX512-BF16)");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n,
              "packed_gemv: x (m, k), out (m, n)");
  TORCH_CHECK(out.scalar_type() == dt && x.stride(1) == 1 && out.stride(1) == 1, "packed_gemv: rows contiguous, one dtype");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m <= MAX_ROWS, "packed_gemv: at most ", MAX_ROWS, " rows, got ", m);
  TORCH_CHECK(n % GROUP == 0 && (dt != at::kBFloat16 || k % 2 == 0), "packed_gemv: n a multiple of 16, k even");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == dt && bias->is_contiguous() && bias->numel() == n, "packed_gemv: bias (n,)");
  if (m == 0) return;
  const int64_t groups = n / GROUP, xs = x.stride(0), os = out.stride(0);
  const int rows = static_cast<int>(m);
#if defined(__AVX512F__)
  if (dt == at::kFloat) {
    const float* w = reinterpret_cast<const float*>(w_ptr);
    const float* xp = x.data_ptr<float>();
    const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for_groups(g0, g1, rows, [&]<int M, int C>(int64_t g) {
        f32_groups<M, C>(w + group_offset(g, k, 1), k, xp, xs, bp ? bp + g * GROUP : nullptr, op + g * GROUP, os);
      });
    });
    return;
  }
#endif
#if defined(__AVX512BF16__)
  const uint16_t* w = reinterpret_cast<const uint16_t*>(w_ptr);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const uint16_t* bp = bias.has_value() ? reinterpret_cast<const uint16_t*>(bias->data_ptr<c10::BFloat16>()) : nullptr;
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for_groups(g0, g1, rows, [&]<int M, int C>(int64_t g) {
      bf16_groups<M, C>(w + group_offset(g, k, 2), k, xp, xs, bp ? bp + g * GROUP : nullptr, op + g * GROUP, os);
    });
  });
#endif
}

}  // namespace

TPSERVE_LIBRARY_FRAGMENT(TPSERVE_NS, m) {
  m.def("packed_gemv(Tensor x, int w_ptr, int n, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("packed_gemv_supported(ScalarType dtype) -> bool", [](at::ScalarType dt) { return packed_gemv_supported(dt); });
}

TPSERVE_LIBRARY_IMPL(TPSERVE_NS, CPU, m) { m.impl("packed_gemv", &packed_gemv); }
