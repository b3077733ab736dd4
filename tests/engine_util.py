"""An in-process, single-rank engine over a checkpoint, and a loop that runs requests to the end."""

from __future__ import annotations

import torch

from cluster.model_store import load_tokenizer
from sharding.arch import ModelConfig
from sharding.group import TPGroup
from sharding.plan import ShardingPlan
from worker.engine import Engine, Request
from worker.runner import ModelRunner
from worker.sampling import SamplingParams


class Done:
    """A request's accumulated outputs."""

    def __init__(self):
        self.token_ids, self.text, self.logprobs = [], "", []
        self.finish_reason = self.stop = self.error = None

    def add(self, out):
        self.token_ids += out.token_ids
        self.text += out.text
        self.logprobs += out.logprobs or []
        if out.finished:
            self.finish_reason, self.stop, self.error = out.finish_reason, out.stop, out.error


def make_engine(path, *, num_blocks=512, block_size=16, max_batch_size=64,
                max_tokens_per_step=512, max_model_len=2048, prefix_caching=True) -> Engine:
    torch.set_num_threads(2)
    cfg = ModelConfig.from_dir(path)
    plan = ShardingPlan.build(cfg, 1)
    runner, _ = ModelRunner.load(path, cfg, plan.ranks[0], TPGroup.single(), dtype="float32",
                                 num_blocks=num_blocks, block_size=block_size,
                                 max_positions=max_model_len)
    return Engine(runner, tokenizer=load_tokenizer(path), eos_token_ids=cfg.eos_token_ids,
                  vocab_size=cfg.vocab_size, max_batch_size=max_batch_size,
                  max_tokens_per_step=max_tokens_per_step, max_model_len=max_model_len,
                  num_blocks=num_blocks, prefix_caching=prefix_caching)


def run(engine: Engine, requests: list[Request], on_step=None) -> dict[str, Done]:
    """Submits everything, steps until all requests finished. `on_step(engine)` after each step."""
    done = {r.request_id: Done() for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_work:
        for out in engine.step():
            done[out.request_id].add(out)
        if on_step is not None:
            on_step(engine)
    return done


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
