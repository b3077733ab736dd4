"""Replicas on Ray: TP = 2 batch invariance, and a local multi-node cluster (three raylets on
one machine) with a replica spanning nodes and two replicas on different nodes."""

from __future__ import annotations

import platform

import pytest

from cluster.config import DeploymentConfig
from cluster.offline import LLM
from worker.engine import FinishReason
from worker.sampling import SamplingParams

TEXTS = [
    "The capital of France is", "Once upon a time", "def add(a, b):", "List three colors:",
    "The quick brown fox jumps over the lazy dog. " * 3, "Water boils at", "In 1492,",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Translate to French: good morning", "import numpy as np\n", "A haiku about the sea:",
    "The largest planet in our solar system is", "Q: What is 2 + 2?\nA:",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit " * 4, "Hello",
    "Photosynthesis is the process by which",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def config(path, **over):
    base = dict(tensor_parallel_size=2, max_batch_size=16, max_tokens_per_step=256,
                max_model_len=512, kv_cache_tokens=8192, type="cpu", collective_timeout_s=4)
    return DeploymentConfig.for_model(path, **{**base, **over})


@pytest.fixture(scope="module")
def tp2(ray_cluster, smollm2_dir):
    llm = LLM(config(smollm2_dir))
    yield llm
    llm.shutdown()


def test_tp2_concurrent_equals_alone(tp2):
    together = tp2.generate(TEXTS, GREEDY)
    for text, batched in zip(TEXTS, together):
        (alone,) = tp2.generate([text], GREEDY)
        assert batched.token_ids == alone.token_ids, text
        assert batched.finish_reason is FinishReason.LENGTH and len(alone.token_ids) == 12
    assert "Paris" in together[0].text


def test_tp2_seeded_sampling_alone_and_under_load(tp2):
    seeded = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7 + i, ignore_eos=True)
              for i in range(3)]
    solo = [tp2.generate([TEXTS[i]], seeded[i])[0].token_ids for i in range(3)]
    params = seeded + [SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)] * 10
    mixed = tp2.generate(TEXTS[:3] + TEXTS[3:13], params)
    assert [m.token_ids for m in mixed[:3]] == solo


def test_idle_replica_outlives_its_collective_timeout(tp2):
    """Peers wait for the next step plan in a collective with a 4 s timeout; rank 0's idle
    heartbeat keeps that wait bounded and the replica alive through a longer pause."""
    import time

    time.sleep(6)
    (out,) = tp2.generate([TEXTS[0]], GREEDY)
    assert out.finish_reason is FinishReason.LENGTH and out.error is None
    assert tp2.controller.replicas[0].backend == "shm"


def test_shared_memory_ranks_are_pinned_to_cores_of_their_own(tp2):
    import ray

    (replica,) = tp2.controller.replicas
    cpus = [ray.get(a.node_info.remote())["cpus"] for a in replica.ranks]
    assert all(len(c) == 1 for c in cpus) and cpus[0] != cpus[1]


def test_cpu_ranks_start_with_glibc_asked_for_huge_pages(tp2):
    from worker import host_memory

    (replica,) = tp2.controller.replicas
    expected = bool(host_memory.rank_environment())  # glibc on Linux, TPSERVE_MALLOC=keep
    assert [n["started_with_rank_environment"] for n in replica.nodes] == [expected, expected]
    assert expected or platform.libc_ver()[0] != "glibc"


def test_replica_spanning_nodes(ray_cluster, smollm2_dir, tp2):
    llm = LLM(config(smollm2_dir, placement="strict_spread", address="auto"))
    try:
        (replica,) = llm.controller.replicas
        assert len({n["node_id"] for n in replica.nodes}) == 2, "one rank per node"
        assert replica.backend == "gloo"  # shared memory cannot cross hosts
        spanning = llm.generate(TEXTS[:4], GREEDY)
        packed = tp2.generate(TEXTS[:4], GREEDY)
        assert [c.token_ids for c in spanning] == [c.token_ids for c in packed]
    finally:
        llm.shutdown()


def test_two_replicas_on_different_nodes(ray_cluster, smollm2_dir, tp2):
    llm = LLM(config(smollm2_dir, replicas=2, address="auto"))
    try:
        a, b = llm.controller.replicas
        nodes_a = {n["node_id"] for n in a.nodes}
        nodes_b = {n["node_id"] for n in b.nodes}
        assert len(nodes_a) == len(nodes_b) == 1 and nodes_a != nodes_b
        outs = llm.generate(TEXTS[:6], GREEDY)  # alternates over the two replicas
        ref = tp2.generate(TEXTS[:6], GREEDY)
        assert [c.token_ids for c in outs] == [c.token_ids for c in ref]
        served = [s["timings"]["steps"] for s in llm.engine_stats()]
        assert all(n > 0 for n in served), "both replicas ran steps"
    finally:
        llm.shutdown()


def test_an_embedded_ray_starts_its_workers_with_the_rank_environment(monkeypatch, smollm2_dir):
    """Ray's workers inherit an embedded Ray's environment: given the rank environment at
    ray.init, the rank actors need no runtime_env, whose worker processes Ray would start anew."""
    import os

    import ray

    from cluster.controller import Controller
    from worker import host_memory

    monkeypatch.delenv("TPSERVE_MALLOC", raising=False)
    monkeypatch.setenv("RAY_worker_niceness", "0")  # what _connect_ray sets: restored after the test
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")  # the operator's, kept
    env = host_memory.rank_environment()
    if not env:
        pytest.skip("no rank environment off glibc")
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(env=dict(os.environ), address=kw.get("address")))
    embedded = Controller(config(smollm2_dir), cuda_available=False)
    assert embedded._runtime_env() == {"env_vars": env}  # before Ray is up
    embedded._connect_ray(embedded.cfg)
    assert seen["address"] is None and seen["env"]["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"  # this process's own, restored
    assert embedded._runtime_env() is None
    joined = Controller(config(smollm2_dir, address="auto"), cuda_available=False)
    joined._connect_ray(joined.cfg)  # a cluster started elsewhere: its workers do not have it
    assert seen["address"] == "auto" and joined._runtime_env() == {"env_vars": env}


def test_ranks_whose_memory_does_not_fit_their_node_fail_at_start_naming_the_fields(smollm2_dir):
    """The KV cache's pages come in after the replica is ready: a cache too large for the node
    must fail the start with the fields to change, not wake the OOM killer later."""
    from cluster.controller import Controller, DeploymentError

    c = Controller(config(smollm2_dir, kv_cache_tokens=65536), cuda_available=False)

    def node(node_id, gib):
        return {"node_id": node_id, "mem_available_bytes": int(gib * (1 << 30))}

    # rank 0 holds 2 of the 3 KV heads: 1.9 GiB of cache, rank 1 0.9 GiB, plus the weights
    c._check_host_memory(0, [node("a" * 16, 8), node("a" * 16, 8)])
    c._check_host_memory(0, [node("a" * 16, 2.5), node("b" * 16, 2.5)])  # one rank per node: fits
    with pytest.raises(DeploymentError, match=r"^replica 0: its ranks on node aaaaaaaa need 3\.\d GiB of memory "
                                              r"\(KV cache 2\.8 GiB, set by engine\.kv_cache_tokens or "
                                              r"engine\.kv_cache_memory; weights 0\.\d GiB\), and the node has "
                                              r"2\.5 GiB available$"):
        c._check_host_memory(0, [node("a" * 16, 2.5), node("a" * 16, 2.5)])
    c._check_host_memory(0, [{"node_id": "c" * 16, "mem_available_bytes": None}] * 2)  # not Linux: no check
