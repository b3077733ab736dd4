"""`worker.model.DecodeStack`: a decode step's blocks in one native call (tpkernels/csrc/decode_stack.cpp)
give the Python blocks' logits bit for bit."""

from __future__ import annotations

import pytest
import torch

from tpkernels import native
from worker import model as model_module


def _stack_here(dtype: torch.dtype) -> bool:
    return native.available() and native.packed_gemm_supported(dtype)


def _random_model(tf, variant: str):
    """SmolLM2's shapes (the packed kernel reads oneDNN's packing of them), two layers: with every
    bias Llama allows, or Mistral's sliding window (shorter than the prompts)."""
    common = dict(hidden_size=576, head_dim=64, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=512, max_position_embeddings=2048, rope_theta=100000.0,
                  initializer_range=0.05)
    if variant == "biases":
        return tf.LlamaConfig(attention_bias=True, mlp_bias=True, **common), tf.LlamaForCausalLM
    return tf.MistralConfig(sliding_window=6, **common), tf.MistralForCausalLM


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["biases", "window"])
def test_decode_stack_gives_the_python_blocks_logits_bit_for_bit(tmp_path, gpu_check, dtype, variant, monkeypatch):
    import transformers as tf

    if not _stack_here(getattr(torch, dtype)):
        pytest.skip(f"no packed {dtype} kernel on this CPU: the stack never runs here")
    gc = gpu_check
    path = gc.save_random(_random_model(tf, variant), tmp_path, variant, getattr(torch, dtype))
    runner, _ = gc.load_runner(path, "cpu", dtype)
    model = runner.model
    assert model.stack_possible
    g = torch.Generator().manual_seed(1)
    biases = [b for layer in model.layers for b in (layer.attn.wqkv.linear.bias, layer.attn.wo.bias,
                                                      layer.mlp.w_in.linear.bias, layer.mlp.w_out.bias)]
    assert all(b is not None for b in biases) == (variant == "biases")
    for b in (b for b in biases if b is not None):  # transformers starts them at zero, which would hide a missed one
        b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    sizes = []  # the rows of each step the stack ran
    run = native.decode_stack_run
    monkeypatch.setattr(model_module.native, "decode_stack_run", lambda stack, x, *rest: sizes.append(x.shape[0])
                        or run(stack, x, *rest))
    continuations = [torch.randint(0, 512, (7,), generator=g).tolist() for _ in gc.PROMPTS]
    stacked = gc.teacher_forced(runner, gc.PROMPTS, continuations)
    # the prompts' step too: the paged kernel takes a prefill a row per token (no gather, no SDPA),
    # where the op set of steps that size is wholly ours (without AVX-512 silu·up is torch's there)
    prompts = [sum(map(len, gc.PROMPTS))] if model.kernels.fused_large.all_native else []
    assert sizes == prompts + [len(gc.PROMPTS)] * 6
    model.stack_possible = False
    plain = gc.teacher_forced(runner, gc.PROMPTS, continuations)
    assert len(sizes) == len(prompts) + 6
    for a, b in zip(stacked, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_stack_at_two_ranks_gives_the_python_blocks_logits_bit_for_bit(tmp_path, gpu_check, dtype,
                                                                              monkeypatch):
    """Two ranks over the shared-memory communicator, 9 query heads split 6 + 3 (kv 2 + 1), every
    bias Llama allows (each row-parallel bias goes in after the all-reduce): the stack all-reduces
    in the communicator's steps, between the embedding's all-reduce and the logits' gather that
    Python runs, and gives the same logits and tokens as the Python blocks, bit for bit."""
    import transformers as tf

    from tests.tp_harness import run_tp

    if not _stack_here(getattr(torch, dtype)):
        pytest.skip(f"no packed {dtype} kernel on this CPU: the stack never runs here")
    gc = gpu_check
    cfg, cls = _random_model(tf, "biases")
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):  # transformers starts them at zero, which would hide a misplaced one
                p.copy_(torch.randn(p.shape) * 0.1)
    path = tmp_path / "biases"
    hf.to(getattr(torch, dtype)).save_pretrained(path)
    jobs = [(str(path), gc.PROMPTS, dtype)]
    (stacked,) = run_tp(jobs, 2, new_tokens=8, backend="shm")
    monkeypatch.setenv("TPSERVE_DECODE_STACK", "0")  # the ranks are spawned: they read it at start
    (plain,) = run_tp(jobs, 2, new_tokens=8, backend="shm")
    # every decode step (and the prompts' step where its op set is wholly ours), on both ranks
    assert stacked["stack_steps"][0] == stacked["stack_steps"][1] in (7, 8)
    assert plain["stack_steps"] == {0: 0, 1: 0}
    assert stacked["tokens"] == plain["tokens"]
    for a, b in zip(stacked["decode_logits"] + stacked["logits"], plain["decode_logits"] + plain["logits"]):
        assert torch.equal(a, b)


def test_a_model_without_shared_memory_collectives_or_packed_products_keeps_the_python_blocks(smollm2_dir,
                                                                                               monkeypatch):
    """The stack all-reduces only on the shared-memory communicator, and calls the packed kernel for
    every product."""
    from sharding.arch import ModelConfig
    from sharding.plan import ShardingPlan
    from worker.model import DecodeStack

    cfg = ModelConfig.from_dir(smollm2_dir)
    plan = ShardingPlan.build(cfg, 1).ranks[0]

    class Model:  # what DecodeStack.possible reads
        def __init__(self, world_size, small, shm=None):
            self.kernels = type("K", (), {"name": "native"})()
            self.group = type("G", (), {"world_size": world_size, "shm": shm})()
            self.cfg, self.plan, self.rope, self.pos_embed = cfg, plan, object(), None
            self._small = small

        def _matmuls(self):
            return [type("M", (), {"small": self._small})()]

    assert DecodeStack.possible(Model(1, "packed"))
    assert not DecodeStack.possible(Model(2, "packed"))  # gloo or NCCL
    assert DecodeStack.possible(Model(2, "packed", shm=object()))
    assert not DecodeStack.possible(Model(1, "onednn"))
    monkeypatch.setenv("TPSERVE_DECODE_STACK", "0")
    assert not DecodeStack.possible(Model(1, "packed"))
