// A decode step's transformer blocks in one call: the same operators the Python layers run, in the
// same order on the same shapes, called from here instead of from Python.
//
// A batch-1 decode step of the default model calls about 300 operators; from Python each one costs
// a few microseconds of argument parsing, dispatch and reference counting on the thread that also
// drives the kernels' parallel regions, while the other threads spin. Measured on a Zen 5 core pair:
// a bfloat16 batch-1 step took 6.6 ms of forward against 4.4 ms of matrix products, and the main
// thread spent a third of its time outside our kernels. Here each operator is reached through
// the dispatcher (its handle looked up once) on tensors whose shapes are known in advance.
//
// The stack is built once per model and KV cache (`decode_stack_create`): the per-layer weights'
// addresses (packed, see packed_gemm.cpp), the norm weights, biases and cache tensors (kept alive
// by the stack), the sizes. It lives in the storage of a one-byte tensor whose deleter frees it,
// so the Python object that holds that tensor owns it. `decode_stack_run` runs every block on a
// step's embedded tokens and returns the residual stream as the Python loop leaves it: (x, delta).
//
// At tensor-parallel size > 1 each block's two row-parallel products (wo, w_out) are summed over the
// ranks by the shared-memory all-reduce (shm_all_reduce.h) on the communicator's segment, as
// RowParallelLinear does from Python: the same steps, so the ranks' other collectives (the
// embedding's all-reduce, the logits' gather) go on from Python after it.
//
// Llama-family blocks only (RMS norm, rotary embedding, gated silu MLP), and only steps whose every
// token is a decode row of the paged kernel; worker/model.py decides which steps come here.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include "library.h"
#include "shm_all_reduce.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

#define TPSERVE_STR2(x) #x
#define TPSERVE_STR(x) TPSERVE_STR2(x)

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string(TPSERVE_STR(TPSERVE_NS)) + "::" + name).c_str(), "")
      .typed<Fn>();
}

struct Layer {
  Tensor attn_norm, mlp_norm, k_cache, v_cache;
  OptTensor qkv_bias, o_bias, in_bias, out_bias;
  int64_t qkv, o, in, out;  // packed weights' addresses
  int64_t window;           // 0: none
};

struct Stack {
  std::vector<Layer> layers;
  int64_t hidden, hq, hkv, d, ffn;  // ffn: the gate-and-up product's outputs, 2 f
  double eps, scale;
  // Each handle's type is its kernel's C++ signature exactly, as registered.
  using Gemm = void(const Tensor&, int64_t, int64_t, const OptTensor&, Tensor);
  using AddNorm = void(const Tensor&, const Tensor&, const Tensor&, double, Tensor, Tensor);
  using RopeCache = void(Tensor, Tensor, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, Tensor,
                         Tensor);
  using Attention = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t,
                         Tensor);
  using SiluMul = void(const Tensor&, Tensor);
  c10::TypedOperatorHandle<Gemm> gemm = op<Gemm>("packed_gemm");
  c10::TypedOperatorHandle<AddNorm> add_norm = op<AddNorm>("add_rms_norm");
  c10::TypedOperatorHandle<RopeCache> rope_cache = op<RopeCache>("rope_and_cache_");
  c10::TypedOperatorHandle<Attention> attention = op<Attention>("paged_decode_attention");
  c10::TypedOperatorHandle<SiluMul> silu_mul = op<SiluMul>("silu_mul");

  // The Python blocks' residual stream: x + delta goes in (no delta before the first block), and
  // each residual add is fused with the norm after it.
  // `comm`: the ranks' shared-memory channel (nothing at one rank), its timeout and its last step;
  // returns the step the all-reduces reached.
  // Every block writes into the same few tensors, made once a step (the residual stream alternates
  // between two): allocating each block's ten outputs and six views anew cost a batch-1 step of
  // the default model 300 allocations.
  std::tuple<Tensor, Tensor, int64_t> run(Tensor x, const Tensor& cos, const Tensor& sin, const Tensor& slots,
                                          const Tensor& tables, const Tensor& lens,
                                          const tpserve_shm::Channel* comm, double timeout_s, int64_t step) const {
    const int64_t n = x.size(0);
    const int64_t q_out = hq * d, kv_out = hkv * d;
    const auto opts = x.options();
    Tensor stream[2] = {at::empty_like(x), at::empty_like(x)};
    int next = 0;  // the stream tensor the next residual add writes
    Tensor h;  // the first block's norm makes it (no delta there yet); every add-and-norm after writes into it
    Tensor qkv = at::empty({n, q_out + 2 * kv_out}, opts), att = at::empty({n, hq, d}, opts);
    Tensor o = at::empty({n, hidden}, opts), gu = at::empty({n, ffn}, opts), a = at::empty({n, ffn / 2}, opts);
    Tensor delta_out = at::empty({n, hidden}, opts);
    const Tensor q = qkv.narrow(1, 0, q_out).view({n, hq, d});
    const Tensor k = qkv.narrow(1, q_out, kv_out).view({n, hkv, d});
    const Tensor v = qkv.narrow(1, q_out + kv_out, kv_out).view({n, hkv, d});
    const Tensor att_rows = att.view({n, q_out});
    auto add_and_norm = [&](const Tensor& delta, const Tensor& weight) {
      add_norm.call(x, delta, weight, eps, stream[next], h);
      x = stream[next];
      next ^= 1;
    };
    Tensor delta;
    const OptTensor c = cos, s = sin;
    for (const Layer& l : layers) {
      if (!delta.defined())
        h = at::rms_norm(x, {hidden}, l.attn_norm, eps);
      else
        add_and_norm(delta, l.attn_norm);
      gemm.call(h, l.qkv, q_out + 2 * kv_out, l.qkv_bias, qkv);
      rope_cache.call(q, k, v, c, s, slots, l.k_cache, l.v_cache);
      attention.call(q, l.k_cache, l.v_cache, tables, lens, scale, l.window, att);
      gemm.call(att_rows, l.o, hidden, std::nullopt, o);
      if (comm) step = tpserve_shm::all_reduce(*comm, o, step, timeout_s);
      if (l.o_bias) o.add_(*l.o_bias);
      add_and_norm(o, l.mlp_norm);
      gemm.call(h, l.in, ffn, l.in_bias, gu);
      silu_mul.call(gu, a);
      gemm.call(a, l.out, hidden, std::nullopt, delta_out);
      if (comm) step = tpserve_shm::all_reduce(*comm, delta_out, step, timeout_s);
      if (l.out_bias) delta_out.add_(*l.out_bias);
      delta = delta_out;
    }
    return {x, delta, step};
  }
};

// tensors: per layer [attn_norm, mlp_norm, k_cache, v_cache, qkv_bias, o_bias, in_bias, out_bias]
// (biases may be None); addresses: per layer [qkv, o, in, out]; windows: per layer;
// sizes: [hidden, q_heads, kv_heads, head_dim, ffn].
Tensor decode_stack_create(const c10::List<OptTensor>& tensors, at::IntArrayRef addresses, at::IntArrayRef windows,
                           at::IntArrayRef sizes, double eps, double scale) {
  const int64_t L = static_cast<int64_t>(windows.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(tensors.size()) == 8 * L && static_cast<int64_t>(addresses.size()) == 4 * L &&
                  sizes.size() == 5,
              "decode_stack_create: 8 tensors and 4 addresses per layer, 5 sizes");
  auto st = std::make_unique<Stack>();
  st->hidden = sizes[0], st->hq = sizes[1], st->hkv = sizes[2], st->d = sizes[3], st->ffn = sizes[4];
  st->eps = eps, st->scale = scale;
  for (int64_t i = 0; i < L; ++i) {
    auto t = [&](int j) -> OptTensor { return tensors.get(8 * i + j); };
    for (int j = 0; j < 4; ++j) TORCH_CHECK(t(j).has_value(), "decode_stack_create: layer ", i, " lacks tensor ", j);
    st->layers.push_back({*t(0), *t(1), *t(2), *t(3), t(4), t(5), t(6), t(7), addresses[4 * i],
                          addresses[4 * i + 1], addresses[4 * i + 2], addresses[4 * i + 3], windows[i]});
  }
  Stack* raw = st.release();
  return at::from_blob(raw, {1}, [](void* p) { delete static_cast<Stack*>(p); }, at::TensorOptions().dtype(at::kByte));
}

// channel: ShmCommunicator._native_channel (empty at one rank), with who, timeout_s and step as
// in shm_all_reduce_.
std::tuple<Tensor, Tensor, int64_t> decode_stack_run(const Tensor& stack, const Tensor& x, const Tensor& cos,
                                                     const Tensor& sin, const Tensor& slots, const Tensor& tables,
                                                     const Tensor& lens, at::IntArrayRef channel, c10::string_view who,
                                                     double timeout_s, int64_t step) {
  TORCH_CHECK(stack.scalar_type() == at::kByte && stack.numel() == 1, "decode_stack_run: not a stack");
  const Stack* st = static_cast<const Stack*>(stack.data_ptr());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == st->hidden && x.is_contiguous(), "decode_stack_run: x (tokens, hidden)");
  if (channel.empty()) return st->run(x, cos, sin, slots, tables, lens, nullptr, timeout_s, step);
  const auto comm = tpserve_shm::Channel::from(channel, std::string(who));
  return st->run(x, cos, sin, slots, tables, lens, &comm, timeout_s, step);
}

}  // namespace

TPSERVE_LIBRARY_FRAGMENT(TPSERVE_NS, m) {
  m.def("decode_stack_create(Tensor?[] tensors, int[] addresses, int[] windows, int[] sizes, float eps, "
        "float scale) -> Tensor",
        &decode_stack_create);
  m.def("decode_stack_run(Tensor stack, Tensor x, Tensor cos, Tensor sin, Tensor slots, Tensor block_tables, "
        "Tensor context_lens, int[] channel, str who, float timeout_s, int step) -> (Tensor, Tensor, int)");
}

TPSERVE_LIBRARY_IMPL(TPSERVE_NS, CPU, m) { m.impl("decode_stack_run", &decode_stack_run); }
