"""Shared fixtures: the default model's converted checkpoint (converted once per machine).

Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter; it is chosen when a
kernel is defined, so the variable is set before any test module imports one."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cluster.model_store import DEFAULT_MODEL, resolve_model


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    return str(resolve_model(DEFAULT_MODEL))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster of three nodes (raylets) for the whole session: 2 CPUs each."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="tpserve-tests", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def gpu_check():
    """bench/gpu_check.py (`make gpu-check`) as a module: its checks, model builders and parity
    helpers, for the tests that drive them on CPU."""
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
