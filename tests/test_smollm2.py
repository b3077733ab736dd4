"""The real SmolLM2-135M-Instruct weights at TP = 1 and TP = 2 against transformers.

9 query heads and 3 KV heads over 2 ranks is the uneven split (6+3 heads) the design calls for.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from tp_harness import run_tp

NEW_TOKENS = 32
# Logits of this 30-layer model are of magnitude ~36. Our matrix products (oneDNN or BLAS for
# prompts, whichever is faster on the CPU; our own kernel for decode steps) sum in other orders than
# transformers' BLAS calls, all in float32: 2e-4 is 5e-6 of the logits.
TOLERANCE = 2e-4
TEXTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The tallest mountain in the world is",
    "def fibonacci(n):\n    ",
]


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    tok = Tokenizer.from_file(f"{smollm2_dir}/tokenizer.json")
    return [tok.encode(t).ids for t in TEXTS]


@pytest.fixture(scope="module")
def reference(smollm2_dir, prompts):
    """transformers' prompt logits, greedy continuation (past any EOS) and the logits of each
    decode step, recomputing the whole sequence every step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    logits, tokens, steps = [], [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model(ids).logits[0]
            logits.append(out)
            rows = []
            for _ in range(NEW_TOKENS - 1):
                ids = torch.cat([ids, out[-1].argmax().view(1, 1)], dim=1)
                out = model(ids).logits[0]
                rows.append(out[-1])
            tokens.append(ids[0, len(p):].tolist() + [int(out[-1].argmax())])
            steps.append(torch.stack(rows))
    return logits, tokens, steps


@pytest.mark.parametrize("tp", [1, 2])
def test_smollm2_matches_transformers(smollm2_dir, prompts, reference, tp):
    (got,) = run_tp([(smollm2_dir, prompts, "float32")], tp, NEW_TOKENS)
    ref_logits, ref_tokens, ref_steps = reference
    for i, (mine, ref) in enumerate(zip(got["logits"], ref_logits)):
        err = (mine - ref).abs().max().item()
        assert err < TOLERANCE, f"tp={tp} prompt {i}: max |Δlogit| = {err:.2e}"
    assert got["tokens"] == ref_tokens
    # Decode-sized products run on oneDNN, which rounds about twice as much as the BLAS calls
    # transformers makes (sharding/layers.py): measured up to 1.2e-4 here (BLAS alone: 7e-5),
    # on logits of magnitude ~36, i.e. ~3e-6 relative. The bound below is that noise level.
    for i, (mine, ref) in enumerate(zip(got["decode_logits"], ref_steps)):
        err = (mine - ref).abs().max().item()
        assert err < TOLERANCE, f"tp={tp} prompt {i}, decode steps: max |Δlogit| = {err:.2e}"
    for rank, (loaded, planned) in got["bytes"].items():
        assert loaded == planned, f"rank {rank}: loaded {loaded} B, plan {planned} B"
    tok = Tokenizer.from_file(f"{smollm2_dir}/tokenizer.json")
    assert "Paris" in tok.decode(got["tokens"][0])
