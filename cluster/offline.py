"""Batch inference without a server, on the same replicas the server uses.

    from cluster.offline import LLM
    from worker.sampling import SamplingParams

    llm = LLM("smollm2-135m-instruct", tensor_parallel_size=2)
    for out in llm.generate(["The capital of France is"], SamplingParams(max_tokens=16)):
        print(out.text)
    llm.shutdown()

`LLM(config)` takes a `DeploymentConfig` (e.g. from `load_config`), or a model alias/path plus
overrides as `DeploymentConfig.for_model` accepts them.

Like the gRPC front end, this is a boundary: `generate` checks every sampling parameter against
its range (`SamplingParams.validate`) and raises ValueError before anything reaches an engine,
which trusts what it gets.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import ray

from cluster.config import DeploymentConfig
from cluster.controller import Controller
from cluster.model_store import load_tokenizer
from worker.engine import FinishReason, Request, RequestOutput
from worker.sampling import SamplingParams


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop: str | int | None = None
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.token_ids
        self.text += out.text
        self.logprobs += out.logprobs or []
        if out.finished:
            self.finish_reason, self.stop, self.error = out.finish_reason, out.stop, out.error


class LLM:
    def __init__(self, model: str | DeploymentConfig, **overrides):
        cfg = model if isinstance(model, DeploymentConfig) else DeploymentConfig.for_model(model, **overrides)
        self.controller = Controller(cfg)
        self.controller.start()
        self.tokenizer = load_tokenizer(self.controller.model_path)
        self._ids = itertools.count()

    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """One completion per prompt, in order. Prompts are text or token ids."""
        params = params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        limit = self.controller.cfg.engine.max_tokens_per_request
        for sp in set(per_prompt):
            sp.validate(vocab_size=self.controller.model.vocab_size, max_tokens_limit=limit)
        requests = [Request(f"offline-{next(self._ids)}", self._encode(p), sp)
                    for p, sp in zip(prompts, per_prompt)]
        results = {r.request_id: Completion(r.request_id, r.prompt_token_ids) for r in requests}
        replicas = self.controller.replicas
        shares = [requests[i::len(replicas)] for i in range(len(replicas))]
        threads = [threading.Thread(target=self._run, args=(rep, share, results))
                   for rep, share in zip(replicas, shares) if share]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [results[r.request_id] for r in requests]

    def engine_stats(self) -> list[dict]:
        return ray.get([r.head.stats.remote() for r in self.controller.replicas])

    def shutdown(self) -> None:
        self.controller.shutdown()

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids")
            return self.tokenizer.encode(prompt).ids
        return list(prompt)

    @staticmethod
    def _run(replica, requests: list[Request], results: dict) -> None:
        ray.get(replica.head.submit.remote(requests))
        pending = {r.request_id for r in requests}
        while pending:
            polled = ray.get(replica.head.poll.remote(1.0))
            for out in polled.outputs:
                results[out.request_id].add(out)
                if out.finished:
                    pending.discard(out.request_id)
            if polled.failure and pending:
                for rid in pending:
                    results[rid].finish_reason, results[rid].error = FinishReason.ERROR, polled.failure
                return

