"""The native kernels (tpkernels/csrc) on their own: decode attention against an independent float64
reference and against the torch path (gather + SDPA) inside `paged_attention` on mixed steps, and
the decode-sized float32 operations (matrix-vector product, add + RMS norm, rope, silu·up) against
float64 or the torch formulas.

The rest of the suite (parity with transformers, batch invariance) runs with the kernels on CPU;
these tests pin them down across dtypes, head sizes, GQA ratios, windows, strides and tails."""

from __future__ import annotations

import random

import pytest
import torch

from tpkernels import gemm, native
from worker.attention import AttentionMetadata, paged_attention
from worker.kv_cache import KVCache
from worker.step import StepInput

CPU = torch.device("cpu")


def test_kernel_is_built_here():
    # CI machines have a C++ compiler; without the kernel CPU decode falls back to the slow path.
    assert native.available(), native.unavailable_reason()


@pytest.fixture(scope="module", params=native.isas_here())
def kern(request):
    """The kernels built for each instruction set this CPU runs ("native", what serves, and each
    x86-64 level below it): the reference tests check every path this machine can execute."""
    return native.variant(request.param)


def test_every_instruction_set_here_is_a_separate_build():
    """Each level compiles to its own library under its own namespace, and the compiler's target is
    what it says: the SSE4.2 level has no AVX register in its machine code, the AVX2 and AVX-512
    levels use 256-bit registers and fused multiply-adds."""
    import shutil
    import subprocess

    isas = native.isas_here()
    assert isas[0] == native.NATIVE
    paths = {isa: native.library_path(isa) for isa in isas}
    assert len(set(paths.values())) == len(isas)
    assert len({native.namespace(isa) for isa in isas}) == len(isas)
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed")
    for isa in isas:
        ops = native.variant(isa)
        assert ops.isa == isa
        getattr(torch.ops, native.namespace(isa)).small_linear  # that build's library is loaded
        code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(paths[isa])], capture_output=True,
                              text=True, check=True).stdout
        if isa == "x86-64-v2":
            assert "%ymm" not in code and "%zmm" not in code
        if isa in ("x86-64-v3", "x86-64-v4"):
            assert "%ymm" in code and "vfmadd" in code


def _random_cache(num_blocks, bs, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(hkv, num_blocks, bs * d, generator=g).to(dtype)
    v = torch.randn(hkv, num_blocks, bs * d, generator=g).to(dtype)
    return k, v


def _reference(q, k, v, tables, lens, bs, scale, window):
    """float64, one sequence and one query head at a time, keys fetched token by token."""
    n, hq, d = q.shape
    hkv = k.shape[0]
    out = torch.empty(n, hq, d, dtype=torch.float64)
    kk = k.double().view(hkv, -1, bs, d)
    vv = v.double().view(hkv, -1, bs, d)
    for i in range(n):
        L = int(lens[i])
        first = max(0, L - window) if window else 0
        pos = torch.arange(first, L)
        blocks = tables[i][pos // bs]
        for h in range(hq):
            kvh = h // (hq // hkv)
            keys, vals = kk[kvh, blocks, pos % bs], vv[kvh, blocks, pos % bs]
            p = torch.softmax(keys @ q[i, h].double() * scale, dim=0)
            out[i, h] = p @ vals
    return out


CASES = [  # dtype, head_dim, q_heads, kv_heads, window
    (torch.float32, 64, 9, 3, None),
    (torch.float32, 64, 3, 1, 7),
    (torch.float32, 128, 8, 1, None),
    (torch.float32, 40, 4, 4, None),  # a head size without an unrolled kernel
    (torch.float32, 128, 4, 2, 33),
    (torch.bfloat16, 64, 9, 3, None),
    (torch.float16, 128, 8, 2, 20),
    (torch.float32, 64, 7, 1, None),  # AVX-512: the V sum in two passes of the head
    (torch.bfloat16, 128, 12, 2, 9),
]


@pytest.mark.parametrize("dtype,d,hq,hkv,window", CASES)
# 16-key chunks that match blocks, that straddle them, and several to a block (windows start mid-block)
@pytest.mark.parametrize("bs", [16, 5, 48])
def test_kernel_matches_reference(dtype, d, hq, hkv, window, bs, kern):
    n = 7
    lens = torch.tensor([1, 2, 15, 16, 17, 100, 255][:n], dtype=torch.int64)
    max_blocks = -(-int(lens.max()) // bs) + 2  # padding columns the kernel must not read
    num_blocks = max(160 * 16 // bs, n * max_blocks)
    rng = random.Random(d * 31 + hq)
    k, v = _random_cache(num_blocks, bs, hkv, d, dtype, seed=d + hq)
    ids = list(range(num_blocks))
    rng.shuffle(ids)  # blocks scattered over the cache, in no order
    tables = torch.tensor([ids[j * max_blocks:(j + 1) * max_blocks] for j in range(n)], dtype=torch.int64)
    # q as a strided view, the way the fused qkv projection's output slices it
    qkv = torch.randn(n, hq * d + 2 * hkv * d, generator=torch.Generator().manual_seed(3)).to(dtype)
    q = qkv[:, :hq * d].view(n, hq, d)
    out = torch.full((n, hq, d), float("nan"), dtype=dtype)
    scale = d ** -0.5
    kern.paged_decode_attention(q, k, v, tables, lens, scale, window, out)
    ref = _reference(q, k, v, tables, lens, bs, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (out.double() - ref).abs().max().item()
    assert err < tol, f"max abs error {err:.3g} (tolerance {tol})"


SHARING_CASES = [  # dtype, head_dim, q_heads, kv_heads: tiles of 16 // G rows, G up to 8
    (torch.float32, 64, 9, 3),
    (torch.float32, 64, 8, 4),
    (torch.float32, 128, 8, 1),
    (torch.float32, 80, 6, 3),
    (torch.bfloat16, 64, 9, 3),
    (torch.bfloat16, 128, 2, 2),
]


@pytest.mark.parametrize("dtype,d,hq,hkv", SHARING_CASES)
@pytest.mark.parametrize("bs", [16, 5])
def test_rows_that_share_keys_match_reference(dtype, d, hq, hkv, bs, kern):
    """Rows whose keys overlap, as the kernel's tiles take them: decodes whose tables begin with the
    same blocks (a shared prompt prefix; tails of 0 to 60 keys of their own), an unrelated row
    between, the rows of one prefill chunk (same table, each row one key longer), and rows sharing
    too few keys to tile."""
    rng = random.Random(d + hq + bs)
    nb, width = 400, 40
    k, v = _random_cache(nb, bs, hkv, d, dtype, seed=d + bs)
    ids = list(range(nb))
    rng.shuffle(ids)
    prefix = [ids.pop() for _ in range(96 // bs)]
    shared = len(prefix) * bs
    tables, lens = [], []

    def row(blocks, length):
        tables.append(blocks + [ids[-1]] * (width - len(blocks)))  # padding the kernel must not read
        lens.append(length)

    for tail in (0, 1, 5, 17, 40, 3, 0, 60, 9, 33, 2):
        row(prefix + [ids.pop() for _ in range(-(-tail // bs))], shared + tail)
    row([ids.pop() for _ in range(-(-150 // bs))], 150)
    seq = [ids.pop() for _ in range(-(-130 // bs))]
    for length in range(20, 131):
        row(list(seq), length)
    for tail in (4, 7):
        row(prefix[:2] + [ids.pop() for _ in range(-(-tail // bs))], 2 * bs + tail)
    tables, lens = torch.tensor(tables), torch.tensor(lens)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = torch.full_like(q, float("nan"))
    kern.paged_decode_attention(q, k, v, tables, lens, d ** -0.5, None, out)
    ref = _reference(q, k, v, tables, lens, bs, d ** -0.5, None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (out.double() - ref).abs().max().item()
    assert err < tol, f"max abs error {err:.3g} (tolerance {tol})"


@pytest.mark.parametrize("n_keys", [5, 16, 37])
def test_kernel_with_every_score_far_below_zero(n_keys, kern):
    # Scores of about -600: softmax must shift by their own maximum, not by zero (e^-600 is 0).
    k, v = _random_cache(8, 16, 1, 64, torch.float32, seed=1)
    u = torch.ones(64)
    k += 3 * u.repeat(16)  # every key near 3u
    q = (-25 * u).expand(1, 3, 64).contiguous()
    tables, lens = torch.tensor([[4, 1, 6]]), torch.tensor([n_keys])
    out = torch.empty_like(q)
    kern.paged_decode_attention(q, k, v, tables, lens, 0.125, None, out)
    ref = _reference(q, k, v, tables, lens, 16, 0.125, None)
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_kernel_single_token_is_its_value(kern):
    # One cached token: softmax of one score is 1, so the output is exactly that token's V.
    k, v = _random_cache(4, 16, 2, 64, torch.float32, seed=0)
    q = torch.randn(1, 4, 64)
    out = torch.empty_like(q)
    kern.paged_decode_attention(q, k, v, torch.tensor([[3]]), torch.tensor([1]), 0.125, None, out)
    expect = v.view(2, 4, 16, 64)[:, 3, 0]  # (kv_heads, d): block 3, slot 0
    assert torch.equal(out[0], expect.repeat_interleave(2, dim=0))


def _random_layer_cache(hkv, d, num_blocks, bs, torch_seed, shuffle_seed):
    """A one-layer float32 cache of random K/V, and its block ids in shuffled order to hand out."""
    torch.manual_seed(torch_seed)
    kv = KVCache(1, hkv, d, num_blocks, bs, torch.float32, CPU)
    kv.layers[0].k.normal_()
    kv.layers[0].v.normal_()
    free = list(range(num_blocks))
    random.Random(shuffle_seed).shuffle(free)
    return kv, free


def _torch_and_native(step, kv, hq, window, **build):
    """Random q, k, v for `step`, k and v written to the cache, through `paged_attention` without
    and with the native kernel: ([outputs], [metadata]), the torch path's first."""
    cache = kv.layers[0]
    hkv, d = cache.num_kv_heads, cache.head_dim
    n = step.num_tokens
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    cache.write(step.slot_mapping, k, v)
    outs, metas = [], []
    for kernel in (None, native.paged_decode_attention):
        meta = AttentionMetadata.build(step, kv.block_size, {window}, hkv, kv.blocks_per_head, CPU, kernel, **build)
        metas.append(meta)
        outs.append(paged_attention(q, k, v, cache, meta, window, d ** -0.5))
    return outs, metas


@pytest.mark.parametrize("hq,hkv,window", [(9, 3, None), (4, 2, 5)])
@pytest.mark.parametrize("paged_prefill", [False, True])
def test_paged_attention_native_equals_torch_path(hq, hkv, window, paged_prefill):
    """A step of six decodes and three prefill chunks (one of them with cached context, one long)
    through `paged_attention`, with and without the kernel, which takes the short cached chunk, or
    with `paged_prefill` every chunk: the outputs agree."""
    assert native.available()
    bs, num_blocks, d = 16, 96, 64
    kv, free = _random_layer_cache(hkv, d, num_blocks, bs, torch_seed=7, shuffle_seed=1)

    def table(tokens):
        return [free.pop() for _ in range(-(-tokens // bs))]

    seqs = []
    for cached in (3, 15, 16, 40, 77, 130):  # decodes: one new token after `cached`
        seqs.append(([1], cached, table(cached + 1)))
    seqs.append(([1] * 20, 0, table(20)))  # a fresh prefill
    seqs.append(([1] * 9, 37, table(46)))  # a later chunk of a long prompt
    seqs.append(([1] * 100, 0, table(100)))  # a prompt longer than the short-chunk limit
    step = StepInput.build(seqs, bs)
    outs, (plain, paged) = _torch_and_native(step, kv, hq, window, paged_prefill=paged_prefill)
    assert plain.paged_decodes is None and paged.paged_decodes is not None
    # the chunks SDPA still takes
    assert [c.stop - c.start for c in paged.prefills] == ([] if paged_prefill else [20, 100])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


def test_decodes_on_a_shared_prefix_are_grouped_for_the_kernels_tiles():
    """Decodes on two cached prompt prefixes, arriving interleaved (A B A B A), and one on its
    own: the paged rows put each prefix's decodes side by side, so the kernel can tile them, and
    the outputs still equal the torch path's. Rows already side by side stay in place."""
    assert native.available()
    bs, num_blocks, d, hq, hkv = 16, 96, 64, 8, 4
    kv, free = _random_layer_cache(hkv, d, num_blocks, bs, torch_seed=3, shuffle_seed=2)
    prefix = {"A": [free.pop() for _ in range(4)], "B": [free.pop() for _ in range(5)]}
    seqs, kinds = [], "ABABA"
    for j, kind in enumerate(kinds):
        cached = len(prefix[kind]) * bs + 3 + j  # the shared blocks, then a few tokens of its own
        seqs.append(([1], cached, prefix[kind] + [free.pop()]))
    seqs.append(([1], 40, [free.pop() for _ in range(3)]))
    step = StepInput.build(seqs, bs)
    outs, (_, meta) = _torch_and_native(step, kv, hq, None)
    assert meta.paged_decodes.tokens.tolist() == [0, 2, 4, 1, 3, 5]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)

    grouped = StepInput.build([seqs[i] for i in (0, 2, 4, 1, 3, 5)], bs)
    meta = AttentionMetadata.build(grouped, bs, {None}, hkv, kv.blocks_per_head, CPU, native.paged_decode_attention)
    assert meta.paged_decodes.tokens is None  # nothing to regroup: the rows are read in place


def _f64_linear(x, w, b):
    return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())


# -- the decode-sized float32 operations ------------------------------------------------------
@pytest.mark.parametrize("m,k,n,bias", [(1, 576, 960, False), (2, 576, 3072, True), (3, 1536, 577, False),
                                        (16, 64, 5, True), (3, 56, 9, False), (5, 37, 13, True)])
def test_small_linear_matches_float64(m, k, n, bias, kern):
    g = torch.Generator().manual_seed(m * 1000 + n)
    wide = torch.randn(m, k + 24, generator=g)
    x = wide[:, 8:8 + k]  # rows apart in memory, as a slice of a wider activation
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = kern.small_linear(x, w, b)
    ref = _f64_linear(x, w, b)
    # fp32 accumulation over k terms of size ~1: error grows like sqrt(k) ulps of the result
    tol = 4e-6 * k ** 0.5 * ref.abs().max().item() ** 0.5 + 1e-6
    assert (got.double() - ref).abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_packs_its_weight_once_and_every_size_matches_float64(dtype, monkeypatch):
    """By default a CPU product holds its weight in oneDNN's layout, and no plain copy, where oneDNN
    takes the dtype; inputs of every size take it and match a float64 product of the same
    (bf16-rounded) numbers."""
    from sharding.layers import Linear

    torch.manual_seed(0)
    w, b = torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype)
    lin = Linear(w, b)
    if dtype == torch.bfloat16 and gemm.bf16_is_slow():
        # oneDNN takes bfloat16 only with AVX512-BW/VL/DQ or AVX-NE-CONVERT. Elsewhere, with AVX2,
        # our packed kernel widens it as it streams it, at every size, from our own packing (only);
        # without, the weight stays plain: our GEMV for decode-sized inputs, float32 above
        if native.available() and native.packed_gemm_supported(dtype):
            assert (lin.small, lin.large) == ("packed", "packed") and not lin.weight.is_mkldnn
            assert torch.equal(lin.weight, gemm.packed_layout(w)) and lin.address == lin.weight.data_ptr()
            assert lin.outputs == 96
        else:
            assert (lin.small, lin.large) == ("native", "widened") and not lin.weight.is_mkldnn
    else:
        assert lin.large == "onednn" and lin.weight.is_mkldnn
        assert lin.small == ("packed" if _packed_gemm_here(w) else "onednn")
        monkeypatch.setenv("TPSERVE_GEMM", "onednn")  # oneDNN for every size
        assert Linear(w, b).small == "onednn"
        monkeypatch.delenv("TPSERVE_GEMM")
    for rows in (1, 2, gemm.PACKED_GEMM_MAX_ROWS, gemm.PACKED_GEMM_MAX_ROWS + 1, gemm.TINY_MAX_ROWS + 1, 48, 200):
        x = torch.randn(rows, 64).to(dtype)
        ref = _f64_linear(x, w, b)
        tol = 2e-5 if dtype == torch.float32 else 2e-2 * ref.abs().max().item()
        assert (lin(x).double() - ref).abs().max().item() < tol, rows


def _packed_gemm_here(w: torch.Tensor) -> bool:
    """Whether this build has the packed GEMM for w's dtype and oneDNN packs w as it reads."""
    return native.available() and native.packed_gemm_supported(w.dtype) and gemm.packed_as_gemm_reads(w, gemm.pack(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,bias", [(96, 64, True), (960, 576, False), (576, 1536, True), (16, 2, False)])
def test_packed_gemm_matches_float64(dtype, n, k, bias, kern):
    """Row counts that fill the row tiles and ones that split them unevenly (up to past the
    model's threshold), rows of x strided apart, outputs not a whole number of 64-blocks, with and
    without bias: against float64 on the same numbers. bfloat16 results are rounded once. Each
    row's sums run in the same order whatever rows come with it: the rows of a product equal the
    products of those rows alone, bit for bit."""
    if not kern.packed_gemm_supported(dtype):
        pytest.skip(f"the {kern.isa} build has no packed GEMM for {dtype}")
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    buf = gemm.packed_layout(w)  # a buffer of our own: independent of oneDNN
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 13, 48, gemm.PACKED_GEMM_MAX_ROWS + 3):
        x = torch.randn(m, k + 3, generator=g).to(dtype)[:, :k]  # rows k + 3 apart
        got = kern.packed_gemm(x, buf.data_ptr(), n, b)
        ref = _f64_linear(x, w, b)
        if dtype == torch.float32:
            tol = 4e-6 * k ** 0.5 * ref.abs().max().item() ** 0.5 + 1e-6
        else:  # rounding to bfloat16 (8 bits) dominates the float32 sum's error
            tol = 2 ** -8 * ref.abs().max().item() + 1e-3
        assert got.shape == (m, n) and got.dtype == dtype
        assert (got.double() - ref).abs().max().item() < tol, m
        for i in {0, m // 2, m - 1}:
            assert torch.equal(got[i], kern.packed_gemm(x[i:i + 1], buf.data_ptr(), n, b)[0]), (m, i)


def test_bfloat16_on_the_float32_kernel_is_its_result_rounded_as_torch_rounds(kern):
    """Builds without AVX512-BF16 run bfloat16 weights on the float32 kernel, widened as loaded, and
    round each sum as they store it: bit for bit the float32 kernel's sums on the widened numbers,
    rounded by torch. Sums exactly halfway between two bfloat16 values (257 between 256 and 258, 259
    between 258 and 260) go to the even one; NaN becomes the NaN torch's own conversion gives."""
    if not (kern.packed_gemm_supported(torch.bfloat16) and kern.vector_lanes() == 8):
        pytest.skip(f"the {kern.isa} build has no bfloat16 on the float32 kernel")
    g = torch.Generator().manual_seed(7)
    n, k = 96, 64
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    w[:16] = 0
    w[:16, :2] = 1  # outputs 0-15: x[0] + x[1]
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    b[:16] = 0
    x = torch.randn(13, k, generator=g).to(torch.bfloat16)
    x[0, :2] = torch.tensor([256.0, 1.0])
    x[1, :2] = torch.tensor([258.0, 1.0])
    x[2, 0] = float("nan")
    x[3, :2] = torch.tensor([float("inf"), float("-inf")])
    buf, buf32 = gemm.packed_layout(w), gemm.packed_layout(w.float())
    got = kern.packed_gemm(x, buf.data_ptr(), n, b)
    want = kern.packed_gemm(x.float(), buf32.data_ptr(), n, b.float()).to(torch.bfloat16)
    assert got[0, 0].item() == 256 and got[1, 0].item() == 260
    assert got[2].isnan().all() and got[3, :16].isnan().all()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.fixture
def threads():
    """Sets torch's thread count for the test; restores it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_work_handed_out_on_demand_covers_every_piece_once_at_any_thread_count(kern, threads):
    """The packed GEMM and decode attention hand their pieces of work to whichever thread is free
    (csrc/parallel.h): an attention of 40 sequences of unequal lengths (16 runs of items), a
    product of 64 blocks in 8 pieces and one of 9 blocks (576 outputs: at 20 rows on two threads,
    pieces of half a block, so two of them start half way through one; at one row, whole blocks),
    on one, two and three threads, write every output, with the same bits."""
    g = torch.Generator().manual_seed(5)
    hq, hkv, d, bs, n = 8, 4, 64, 16, 40
    lens = torch.randint(1, 300, (n,), generator=g)
    max_blocks = -(-300 // bs)
    k, v = _random_cache(n * max_blocks, bs, hkv, d, torch.float32, seed=6)
    tables = torch.randperm(n * max_blocks, generator=g).view(n, max_blocks)
    q = torch.randn(n, hq, d, generator=g)
    w = torch.randn(4096, 64, generator=g)
    w9 = torch.randn(576, 64, generator=g)
    packed = kern.packed_gemm_supported(torch.float32)
    bufs = [(gemm.packed_layout(w), w), (gemm.packed_layout(w9), w9)] if packed else []
    xs = [torch.randn(20, 64, generator=g), torch.randn(1, 64, generator=g)]
    results = []
    for count in (1, 2, 3):
        threads(count)
        out = torch.full((n, hq, d), float("nan"))
        kern.paged_decode_attention(q, k, v, tables, lens, d ** -0.5, None, out)
        assert not out.isnan().any()
        results.append([out] + [kern.packed_gemm(x, buf.data_ptr(), ww.shape[0], None) for buf, ww in bufs for x in xs])
    checks = [None] + [(x, ww) for _, ww in bufs for x in xs]  # the attention's output, then each product's
    for i, check in enumerate(checks):
        assert torch.equal(results[0][i], results[1][i]) and torch.equal(results[0][i], results[2][i]), i
        if check is not None:
            x, ww = check
            assert (results[0][i].double() - _f64_linear(x, ww, None)).abs().max().item() < 1e-3


def test_packed_gemm_refuses_what_it_cannot_read(kern):
    if not kern.packed_gemm_supported(torch.float32):
        pytest.skip(f"the {kern.isa} build has no packed GEMM")
    w = torch.randn(32, 64)
    buf = gemm.packed_layout(w)  # a buffer of our own: independent of oneDNN
    assert kern.packed_gemm(torch.randn(0, 64), buf.data_ptr(), 32, None).shape == (0, 32)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kern.packed_gemm(torch.randn(1, 64), buf.data_ptr(), 24, None)
    with pytest.raises(RuntimeError, match="no kernel for Double"):
        kern.packed_gemm(torch.randn(1, 64).double(), buf.data_ptr(), 32, None)
    with pytest.raises(RuntimeError, match="bias"):
        kern.packed_gemm(torch.randn(1, 64), buf.data_ptr(), 32, torch.zeros(32).double())


def test_each_build_has_the_packed_gemm_its_instructions_allow():
    flags = native._cpu_flags()
    for isa in native.isas_here():
        ops = native.variant(isa)
        # float32 needs AVX2 + FMA (8 lanes) or AVX-512 (16); bfloat16 AVX512-BF16 (`vdpbf16ps`) or
        # the 8-lane float32 kernel (widened as loaded), not AVX-512 without BF16: oneDNN has that
        avx2 = isa == "x86-64-v3" or (isa == native.NATIVE and {"avx2", "fma"} <= flags and "avx512f" not in flags)
        assert ops.packed_gemm_supported(torch.float32) == (isa != "x86-64-v2" if isa != native.NATIVE
                                                            else {"avx2", "fma"} <= flags), isa
        assert ops.packed_gemm_supported(torch.bfloat16) == (avx2 or (isa == native.NATIVE and "avx512_bf16" in flags)), isa
        lanes = ops.vector_lanes()
        assert lanes == {"x86-64-v2": 8, "x86-64-v3": 8, "x86-64-v4": 16}.get(isa, 16 if "avx512f" in flags else 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layout_check_reads_onednn_bytes_and_holds_only_where_the_kernel_agrees(dtype):
    """`packed_as_gemm_reads` compares oneDNN's packed bytes with our layout: where it holds, our
    kernel on oneDNN's own buffer gives oneDNN's products; shapes the kernel cannot take, and a packed
    weight of other numbers, are refused."""
    torch.manual_seed(3)
    assert not gemm.packed_as_gemm_reads(torch.randn(90, 576).to(dtype), gemm.pack(torch.randn(90, 576).to(dtype)))
    # oneDNN's layout depends on the shape and the CPU: with AVX2 it blocks 144-192 outputs by 16
    for n in (192, 320):
        w = torch.randn(n, 576).to(dtype)
        packed = gemm.pack(w)
        assert not gemm.packed_as_gemm_reads(w + 1, packed)  # the bytes are compared, not just the shape
        if gemm.packed_as_gemm_reads(w, packed):
            break
    else:
        pytest.skip("oneDNN packs these weights in another layout on this CPU")
    if not (native.available() and native.packed_gemm_supported(dtype)):
        pytest.skip("this CPU has no packed GEMM for this dtype")
    x = torch.randn(3, 576).to(dtype)
    ours = native.packed_gemm(x, gemm.packed_pointer(packed), n, None)
    theirs = gemm.onednn(x, packed, None)
    torch.testing.assert_close(ours, theirs, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-2)


def test_blas_keeps_plain_weights_with_the_gemv_for_decode_sized_inputs(monkeypatch):
    from sharding.layers import Linear

    monkeypatch.setenv("TPSERVE_GEMM", "blas")
    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    lin = Linear(w, b)
    assert (lin.small, lin.large) == ("native", "torch") and lin.weight is w
    for rows in (1, gemm.TINY_MAX_ROWS, gemm.TINY_MAX_ROWS + 1):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, b), atol=2e-5, rtol=0)
    big = torch.randn(gemm.TINY_MAX_ROWS + 1, 64)
    assert torch.equal(lin(big), torch.nn.functional.linear(big, w, b))  # BLAS itself


def test_gemm_choice_is_checked_and_what_onednn_cannot_take_stays_plain(monkeypatch):
    w = torch.randn(96, 64)
    assert gemm.pack(w.half()) is None  # no float16 packing: BLAS
    assert gemm.pack(torch.empty(0, 64)) is None
    monkeypatch.setenv("TPSERVE_GEMM", "sometimes")
    with pytest.raises(ValueError, match="TPSERVE_GEMM must be one of"):
        gemm.pack(w)


def test_the_models_kernel_choice_decides_its_products(smollm2_dir, monkeypatch):
    """One decision: every projection and the LM head take the model's `Kernels`. Both kernel sets
    pack every weight for oneDNN (torch's own), and only the native set runs our kernel on it for
    decode-sized inputs; with plain weights (TPSERVE_GEMM=blas) only the native set runs our GEMV,
    and a model built with kernels="torch" runs no native kernel."""
    from sharding.arch import ModelConfig
    from sharding.group import TPGroup
    from sharding.plan import ShardingPlan
    from tpkernels import Kernels
    from worker.runner import ModelRunner

    cfg = ModelConfig.from_dir(smollm2_dir)
    plan = ShardingPlan.build(cfg, 1).ranks[0]

    def products(kernels):
        runner, _ = ModelRunner.load(smollm2_dir, cfg, plan, TPGroup.single(), dtype="float32",
                                     num_blocks=4, block_size=16, kernels=kernels)
        m = runner.model
        out = [m.lm_head.linear]
        for layer in m.layers:
            out += [layer.attn.wqkv.linear, layer.attn.wo.linear, layer.mlp.w_in.linear, layer.mlp.w_out.linear]
        return {(p.small, p.large) for p in out}

    probe = torch.randn(576, 576)
    assert products("native") == {("packed" if _packed_gemm_here(probe) else "onednn", "onednn")}
    assert products("torch") == {("onednn", "onednn")}
    monkeypatch.setenv("TPSERVE_GEMM", "blas")
    assert products("native") == {("native", "torch")}
    assert products("torch") == {("torch", "torch")}

    w = torch.randn(96, 64)
    cpu = torch.device("cpu")
    assert Kernels.select(cpu, torch.float16, "native").matmul(w.half()).small == "torch"  # no fp16 GEMV
    assert Kernels.select(cpu, torch.float32, "native").matmul(w[:, ::2]).small == "torch"  # strided weight


def test_bfloat16_without_onednn_support_is_computed_in_float32(monkeypatch):
    """Where oneDNN has no bfloat16 (AVX2-only CPUs; forced here on any CPU), plain bfloat16
    weights are multiplied in float32 above the GEMV's sizes (by both kernel sets), and the result
    is the float64 product rounded once to bfloat16, give or take the rounding of float32 sums."""
    from tpkernels import Kernels

    monkeypatch.setenv("TPSERVE_GEMM", "blas")  # plain weights on any CPU
    monkeypatch.setattr(gemm, "bf16_is_slow", lambda: True)
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    fast = Kernels.select(cpu, torch.bfloat16, "torch").matmul(w, b)
    assert (fast.small, fast.large) == ("widened", "widened")
    assert Kernels.select(cpu, torch.float32, "torch").matmul(w.float()).large == "torch"
    if native.available():
        assert Kernels.select(cpu, torch.bfloat16, "native").matmul(w, b).large == "widened"
    monkeypatch.setattr(gemm, "bf16_is_slow", lambda: False)
    assert Kernels.select(cpu, torch.bfloat16, "torch").matmul(w, b).large == "torch"
    for rows in (gemm.TINY_MAX_ROWS + 1, 48):
        x = torch.randn(rows, 64, generator=g).bfloat16()
        got = fast(x)
        assert got.dtype == torch.bfloat16
        ref = _f64_linear(x, w, b)
        # within half a bfloat16 ulp of the exact result, plus float32 rounding
        assert ((got.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-4).all(), rows


def test_each_size_class_runs_its_own_kernel(monkeypatch):
    """Inputs of up to `small_rows` rows (TINY_MAX_ROWS unless given) run `small`, larger ones
    `large` (the kernels replaced by ones that say who ran)."""
    import tpkernels
    from tpkernels import Matmul

    for name, module, attr in (("native", native, "small_linear"), ("onednn", gemm, "onednn"),
                               ("torch", tpkernels.F, "linear"), ("packed", native, "packed_gemm"),
                               ("widened", gemm, "widened")):
        monkeypatch.setattr(module, attr, lambda x, w, b, *_, name=name: (name, x.shape[0]))
    monkeypatch.setattr(gemm, "packed_pointer", lambda w: 1234)
    for small, large in (("native", "torch"), ("onednn", "native"), ("torch", "onednn"), ("native", "widened")):
        m = Matmul(torch.zeros(96, 64), None, small=small, large=large)
        for rows, kernel in ((1, small), (gemm.TINY_MAX_ROWS, small), (gemm.TINY_MAX_ROWS + 1, large), (500, large)):
            assert m(torch.zeros(rows, 64)) == (kernel, rows)
    w = torch.zeros(96, 64)
    packed = gemm.pack(w)
    if packed is not None:  # oneDNN's packed bytes are found through it; a plain tensor's are its own
        assert Matmul(packed, None, "packed", "onednn", gemm.PACKED_GEMM_MAX_ROWS).address == 1234
    ours = gemm.packed_layout(w)
    assert Matmul(ours, None, "packed", "packed", outputs=96).address == ours.data_ptr()
    m = Matmul(w, None, "packed", "onednn", gemm.PACKED_GEMM_MAX_ROWS)
    assert m.address == w.data_ptr() and m.outputs == 96
    for rows, kernel in ((1, "packed"), (gemm.PACKED_GEMM_MAX_ROWS, "packed"), (gemm.PACKED_GEMM_MAX_ROWS + 1, "onednn")):
        assert m(torch.zeros(rows, 64)) == (kernel, rows)


ROWS = [5, 300]  # a decode step's rows; a prefill's, split over threads in tasks of 32 rows


@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm_matches_float64(rows, kern):
    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(rows, 576, generator=g), torch.randn(rows, 576, generator=g)
    w = torch.randn(576, generator=g)
    residual, out = kern.add_rms_norm(x, delta, w, 1e-5)
    s = x.double() + delta.double()
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert torch.equal(residual, x + delta)
    assert (out.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("h", [576, 589])  # whole 16-lane vectors; and 8-lane and scalar pieces after them
def test_add_rms_norm_in_bfloat16_rounds_where_torch_does(h, kern):
    """bfloat16: the residual is torch's bfloat16 sum bit for bit, and the output within two
    bfloat16 steps of the float64 norm of that residual (rounded to bfloat16 before the weight's
    product, as transformers' Llama takes it, and after: either rounding may land a step away)."""
    g = torch.Generator().manual_seed(4)
    x, delta, w = (torch.randn(*shape, generator=g).bfloat16() for shape in ((300, h), (300, h), (h,)))
    residual, out = kern.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(residual, x + delta)
    s = residual.double()
    normed = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16().double()
    ref = normed * w.double()
    assert ((out.double() - ref).abs() <= ref.abs() * 2.0 ** -6 + 1e-30).all()


@pytest.mark.parametrize("n", [3, 300])
@pytest.mark.parametrize("d", [64, 50])  # halves of 32: 16-lane pieces; of 25: 16-, 8-lane and scalar
def test_rope_in_place_on_a_strided_view_matches_the_torch_formula(n, d, kern):
    from tpkernels import apply_rope

    g = torch.Generator().manual_seed(2)
    h = 9
    qkv = torch.randn(n, (h + 6) * d, generator=g)
    q = qkv[:, :h * d].view(n, h, d)
    untouched = qkv[:, h * d:].clone()
    angles = torch.rand(n, 1, d // 2, generator=g) * 6.3
    expect = apply_rope(q.clone(), angles.cos(), angles.sin())
    kern.rope_(q, angles.cos(), angles.sin())
    torch.testing.assert_close(q, expect, atol=1e-6, rtol=0)
    assert torch.equal(qkv[:, h * d:], untouched)  # only q's columns were written


@pytest.mark.parametrize("rows", [4, 300])  # one thread's rows, and rows split between threads
@pytest.mark.parametrize("f", [1536, 1547])  # whole vectors; 16-, 8-lane and scalar pieces
def test_silu_mul_matches_float64(rows, f, kern):
    g = torch.Generator().manual_seed(3)
    gu = torch.randn(rows, 2 * f + 3, generator=g)[:, :2 * f] * 4  # rows strided, as a view gives them
    gu[0, :6] = torch.tensor([-200.0, -90.0, -87.5, 88.5, 95.0, 300.0])  # where e^-x leaves float range
    gate, up = gu.double().chunk(2, dim=-1)
    ref = gate * torch.sigmoid(gate) * up
    err = (kern.silu_mul(gu).double() - ref).abs()
    assert bool((err <= 1e-6 * ref.abs() + 1e-6).all()), err.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_rope", [True, False])
def test_rope_and_cache_equals_the_torch_ops(dtype, with_rope, kern):
    """The fused op leaves q, k and both caches as torch's rope and `LayerCache.write` do,
    on q, k, v viewed out of one fused projection; a slot outside the cache is refused, untouched."""
    from tpkernels import TORCH_OPS

    n, hq, hkv, d, bs, blocks = 37, 9, 3, 64, 16, 8
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype)
    angles = torch.rand(n, 1, 32, generator=g) * 6.3  # per token, broadcast over heads
    rope = (angles.cos().to(dtype), angles.sin().to(dtype)) if with_rope else None
    slots = torch.randperm(blocks * bs, generator=g)[:n]
    results = []
    for fused in (False, True):
        x = qkv.clone()
        q, k, v = x.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(n, hq, d), k.view(n, hkv, d), v.view(n, hkv, d)
        cache = KVCache(1, hkv, d, blocks, bs, dtype, CPU).layers[0]
        if fused:
            kern.rope_and_cache_(q, k, v, rope, slots, cache.k, cache.v)
        else:
            q, k = TORCH_OPS.rope_and_cache(q, k, v, rope, slots, cache)
        results.append((q, k, cache.k.clone(), cache.v.clone()))
    for want, got in zip(*results):  # float32 rotations may contract into FMAs: last-bit differences
        torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 0, rtol=0)
    bad = slots.clone()
    bad[5] = (blocks + 1) * bs  # one past the cache, pad block included
    before = cache.k.clone()
    with pytest.raises(RuntimeError, match="outside the cache"):
        kern.rope_and_cache_(q, k, v, rope, bad, cache.k, cache.v)
    assert torch.equal(cache.k, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [5, 8, 49152 + 3])  # no full vector, exactly one, many and a tail
def test_argmax_rows_is_torchs_first_index_of_the_maximum(dtype, n, kern):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n + 2, generator=g).to(dtype)[:, :n]  # rows strided, as cut logits are
    x[1] = -float("inf")  # nothing finite: index 0
    x[2, n - 1] = x[2, min(3, n - 1)] = 1e9  # a tie: the first wins
    x[3] = 2.0  # all equal
    x[4, n - 1] = 50.0  # the maximum in the scalar tail
    x[5, 0] = 50.0
    got = kern.argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [5, 8, 49152 + 3])
def test_greedy_rows_is_the_argmax_or_minus_one_where_the_maximum_is_not_finite(dtype, n, kern):
    """What greedy sampling may pick: the argmax of a row whose maximum is a finite number, -1
    for a row with a NaN (in the vectors or in the scalar tail), +inf, or nothing above -inf."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(9, n + 2, generator=g).to(dtype)[:, :n]
    x[1] = -float("inf")
    x[2, 0] = float("nan")
    x[3, n - 1] = float("nan")  # the tail when n is not a whole number of vectors
    x[4, n // 2] = float("inf")
    x[5, :] = -float("inf")
    x[5, n - 1] = 3.0  # one finite value: it
    x[6, n - 1] = -float("inf")  # -inf among finite values is no reason to refuse
    x[7, 1] = 1e30 if dtype == torch.float32 else 1e38  # large, finite
    got = kern.greedy_rows(x)
    finite = torch.isfinite(x.float().amax(-1))
    want = torch.where(finite, x.float().argmax(-1), torch.full_like(finite, -1, dtype=torch.int64))
    assert finite.tolist() == [True, False, False, False, False, True, True, True, True]
    assert got.dtype == torch.int64 and torch.equal(got, want)


# -- bfloat16 -------------------------------------------------------------------------------------------
BF16_STEP = 2.0 ** -7  # bfloat16 keeps 8 significant bits: one step of the format, relative


def _within_steps(got, ref, steps=1.0):
    return bool(((got.double() - ref.double()).abs() <= ref.double().abs() * steps * BF16_STEP + 1e-6).all())


@pytest.mark.parametrize("m,k,n,bias", [(1, 576, 960, False), (3, 1536, 577, True), (16, 56, 9, False)])
def test_small_linear_bf16_matches_float64(m, k, n, bias, kern):
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    got = kern.small_linear(x, w, b)
    assert got.dtype == torch.bfloat16
    ref = _f64_linear(x, w, b)
    # float32 sums of exact bfloat16 products, then one rounding to bfloat16
    err = (got.double() - ref).abs()
    assert bool((err <= ref.abs() * BF16_STEP + 4e-6 * k ** 0.5).all()), err.max()


@pytest.mark.parametrize("rows", ROWS)
def test_bf16_elementwise_operations_round_where_torch_rounds(rows, kern):
    from tpkernels import apply_rope

    g = torch.Generator().manual_seed(9)
    x, delta = (torch.randn(rows, 576, generator=g).bfloat16() for _ in range(2))
    w = torch.randn(576, generator=g).bfloat16()
    residual, out = kern.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(residual, x + delta)
    h = residual.float()
    hf = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()  # transformers' RMSNorm
    # The sum of squares may run in another order: where h·inv lies at a rounding boundary its
    # bfloat16 can differ by a step, and the product with w is rounded again (300 rows meet it).
    assert _within_steps(out, hf, steps=2)

    qkv = torch.randn(rows, 12 * 64, generator=g).bfloat16()
    q = qkv[:, :9 * 64].view(rows, 9, 64)
    angles = torch.rand(rows, 1, 32, generator=g) * 6.3
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    expect = apply_rope(q.clone(), cos, sin)
    kern.rope_(q, cos, sin)
    assert torch.equal(q, expect)

    for f in (1536, 1547):  # whole vectors; 16-, 8-lane and scalar pieces
        gu = (torch.randn(2, 2 * f, generator=g) * 4).bfloat16()
        gate, up = gu.chunk(2, dim=-1)
        assert _within_steps(kern.silu_mul(gu), torch.nn.functional.silu(gate) * up)


def test_bf16_decode_steps_run_the_native_operations():
    from tpkernels import Kernels, NativeOps, TorchOps

    kernels = Kernels.select(torch.device("cpu"), torch.bfloat16)
    assert isinstance(kernels.ops(1), NativeOps) and kernels.ops(1).silu_mul is not TorchOps.silu_mul
    large = kernels.ops(native.DECODE_MAX_ROWS + 1)  # ours; silu·up torch's where torch's is wider
    assert isinstance(large, NativeOps)
    wider = native.vector_lanes() < 16 and torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert (large.silu_mul is TorchOps.silu_mul) == wider


def test_bf16_model_with_the_machines_attention_path_is_within_1_5x_transformers_own_error(tmp_path, gpu_check):
    """bfloat16 end to end through the kernels that serve here: a random Llama with SmolLM2's head
    layout (head_dim 64, 9 q / 3 kv heads), so decode attention takes the widest path this CPU has
    (AVX512-BF16's dot products where present). Prompt and teacher-forced decode logits against
    transformers' float32 logits on the same weights: our error at most 1.5x transformers' own
    bfloat16 error (`make gpu-check` asks the same of the CUDA path)."""
    import transformers as tf

    gc = gpu_check
    cfg = tf.LlamaConfig(hidden_size=576, head_dim=64, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=512, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0, initializer_range=0.05)
    path = gc.save_random((cfg, tf.LlamaForCausalLM), tmp_path, "llama-d64", torch.bfloat16)
    tokens, ref = gc.hf_reference(path, gc.PROMPTS, 24, "cpu", torch.float32)
    seqs = [p + t[:-1] for p, t in zip(gc.PROMPTS, tokens)]
    theirs = gc.max_err(gc.hf_logits(path, seqs, "cpu", torch.bfloat16), ref)
    runner, _ = gc.load_runner(path, "cpu", "bfloat16")
    assert runner.model.kernels.decode_attention is native.paged_decode_attention
    ours = gc.max_err(gc.teacher_forced(runner, gc.PROMPTS, tokens), ref)
    print(f"bf16 max abs logit error: ours {ours:.4g}, transformers {theirs:.4g}, ratio {ours / theirs:.2f}")
    assert 0 < ours <= gc.BF16_FACTOR * theirs, f"bf16 max |dlogit| {ours:.3g} vs transformers' own {theirs:.3g}"


def test_prefill_attention_runs_on_the_paged_kernel_where_its_vector_paths_apply():
    from tpkernels import Kernels

    assert native.available()
    for dtype in (torch.float32, torch.bfloat16):
        kernels = Kernels.select(CPU, dtype, "native")
        assert kernels.paged_prefill(64) and kernels.paged_prefill(128) and not kernels.paged_prefill(40)
    assert not Kernels.select(CPU, torch.float16, "native").paged_prefill(64)
    assert not Kernels.select(CPU, torch.float32, "torch").paged_prefill(64)
