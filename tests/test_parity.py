"""Tensor-parallel forward against Hugging Face transformers, the reference implementation.

Random small models of every supported architecture are built with transformers' config classes
and saved with save_pretrained; each is run at TP = 1, 2, 3 and 4 (one process per rank, gloo),
and must match transformers' float32 logits for every prompt position within 1e-4, then produce
the same 32 greedy tokens. The cases cover uneven head splits, TP above the KV heads, vocabularies
not divisible by TP, tied and untied embeddings, QKV/MLP biases, fused checkpoint tensors, a
sliding window, Llama-3 and linear rope scaling, sharded checkpoints and bf16/fp16 checkpoints.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tp_harness import run_tp

NEW_TOKENS = 32
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [88], list(range(10, 40)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]]

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    # 9 q / 3 kv heads like SmolLM2: 6+3 on 2 ranks, 3 per rank on 3, KV replicated on 4;
    # vocab 101 divides by none of 2, 3, 4; MLP width 100 splits 34/33/33; bf16 checkpoint.
    "llama3-uneven": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        hidden_size=72, head_dim=8, intermediate_size=100, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=101, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE), torch.bfloat16, None),
    # Multi-query attention: TP > KV heads everywhere; tied; attention and MLP biases;
    # linear rope scaling; a checkpoint sharded into several files.
    "llama-mqa-tied-bias": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        hidden_size=64, head_dim=16, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=96, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        torch.float32, "60KB"),
    "qwen2-qkv-bias": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=103, tie_word_embeddings=True), torch.float16, None),
    # A 5-token sliding window, shorter than most prompts.
    "mistral-window": (tf.MistralConfig, tf.MistralForCausalLM, dict(
        hidden_size=64, head_dim=8, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=97, sliding_window=5,
        tie_word_embeddings=False), torch.float32, None),
    # Fused qkv_proj and gate_up_proj tensors, split per part.
    "phi3-fused": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, vocab_size=90, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2), torch.float32, None),
    # Conv1D weights, fused c_attn, learned positions, LayerNorm, GELU; 6 heads on 4 ranks: 2+2+1+1.
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(
        n_embd=48, n_layer=2, n_head=6, n_positions=128, vocab_size=101,
        bos_token_id=0, eos_token_id=0), torch.float32, None),
}


def reference(model, prompts, new_tokens):
    """transformers' logits for each prompt and its greedy continuation (full recompute per token)."""
    logits, tokens = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(model(ids).logits[0].float())
            for _ in range(new_tokens):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            tokens.append(ids[0, len(p):].tolist())
    return logits, tokens


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, reference logits, reference tokens)."""
    out = {}
    for name, (config_cls, model_cls, kwargs, dtype, shard) in CASES.items():
        torch.manual_seed(0)
        cfg = config_cls(initializer_range=0.2, max_position_embeddings=128, **kwargs) \
            if config_cls is not tf.GPT2Config else config_cls(initializer_range=0.2, **kwargs)
        model = model_cls(cfg).eval()
        path = tmp_path_factory.mktemp(name)
        save = model.to(dtype)
        save.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
        # The reference runs in float32 on exactly the weights the checkpoint holds.
        ref_model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
        out[name] = (str(path), *reference(ref_model, PROMPTS, NEW_TOKENS))
    return out


@pytest.fixture(scope="module")
def results(checkpoints):
    """(tp, name) -> harness result; one spawned group per TP size runs all checkpoints."""
    names = list(CASES)
    jobs = [(checkpoints[n][0], PROMPTS, "float32") for n in names]
    runs = {}

    def get(tp, name):
        if tp not in runs:
            runs[tp] = dict(zip(names, run_tp(jobs, tp, NEW_TOKENS)))
        return runs[tp][name]

    return get


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(checkpoints, results, name, tp):
    _, ref_logits, ref_tokens = checkpoints[name]
    got = results(tp, name)
    for i, (mine, ref) in enumerate(zip(got["logits"], ref_logits)):
        assert mine.shape == ref.shape
        err = (mine - ref).abs().max().item()
        assert err < 1e-4, f"{name} tp={tp} prompt {i}: max |Δlogit| = {err:.2e}"
    assert got["tokens"] == ref_tokens, f"{name} tp={tp}: greedy tokens differ"


@pytest.mark.parametrize("tp", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_rank_bytes_match_plan(results, name, tp):
    got = results(tp, name)["bytes"]
    assert sorted(got) == list(range(tp))
    for rank, (loaded, planned) in got.items():
        assert loaded == planned, f"{name} tp={tp} rank {rank}: loaded {loaded} B, plan says {planned} B"


@pytest.mark.parametrize("tp", [2, 3])
def test_shared_memory_backend_matches_transformers(checkpoints, tp):
    """The same forward with the shared-memory communicator instead of gloo."""
    names = ["llama3-uneven", "gpt2"]
    jobs = [(checkpoints[n][0], PROMPTS, "float32") for n in names]
    for name, got in zip(names, run_tp(jobs, tp, NEW_TOKENS, backend="shm")):
        _, ref_logits, ref_tokens = checkpoints[name]
        err = max((m - r).abs().max().item() for m, r in zip(got["logits"], ref_logits))
        assert err < 1e-4, f"{name} tp={tp} shm: max |Δlogit| = {err:.2e}"
        assert got["tokens"] == ref_tokens


@pytest.mark.parametrize("tp,names", [(1, list(CASES)), (2, ["llama3-uneven", "mistral-window"])])
def test_cuda_kernels_match_transformers(checkpoints, tp, names):
    """Every architecture through the Triton kernels that CUDA runs (here on CPU tensors, under
    Triton's interpreter, which is slow: 8 tokens, not 32): fused norms, rope with the cache
    write, silu·up, paged decode attention (sliding window included), at TP = 1, and at TP = 2
    with uneven heads per rank."""
    new_tokens = 8  # the 1-token prompt fills three KV blocks of the harness's 4 tokens
    jobs = [(checkpoints[n][0], PROMPTS, "float32") for n in names]
    for name, got in zip(names, run_tp(jobs, tp, new_tokens, runner_options={"kernels": "triton"})):
        _, ref_logits, ref_tokens = checkpoints[name]
        err = max((m - r).abs().max().item() for m, r in zip(got["logits"], ref_logits))
        assert err < 1e-4, f"{name} tp={tp} triton: max |Δlogit| = {err:.2e}"
        assert got["tokens"] == [t[:new_tokens] for t in ref_tokens], f"{name} tp={tp} triton: greedy tokens differ"
