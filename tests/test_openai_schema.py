"""schemathesis against the OpenAI-compatible API's own OpenAPI document, CI-sized: generated
requests to every endpoint (valid, boundary and invalid bodies), and every answer must be no 5xx,
a documented status with a documented content type, and match its schema. A server with small
limits (8 tokens a request) keeps the valid requests cheap."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from server_util import ServerThread, config


@pytest.fixture(scope="module")
def small_srv(ray_cluster, smollm2_dir):
    cfg = config(smollm2_dir, tensor_parallel_size=1, max_batch_size=8, max_model_len=128,
                 max_tokens_per_request=8, kv_cache_tokens=2048, http={"enabled": True, "port": 0})
    with ServerThread(cfg) as server:
        yield server


CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_is_documented_and_no_5xx(small_srv, mode):
    """(schemathesis's own pytest plugin does not run under this pytest, so the operations'
    strategies are driven with hypothesis directly.)"""
    schema = schemathesis.openapi.from_url(small_srv.server.http_address + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to get wrong in a GET without parameters

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            case.call_and_validate(checks=CHECKS, timeout=60)

        call()
    assert small_srv.server.router.serving  # nothing it sent took a replica down
