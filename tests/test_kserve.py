"""The KServe v2 gRPC service (inference.GRPCInferenceService) through Triton's own client,
tritonclient[grpc], on the tpserve.v1 port of a running server (one TP 1 replica): health and
metadata, ModelInfer and streaming ModelStreamInfer with the text_input / text_output shape of
Triton's LLM backends, greedy output equal to tpserve.v1's, and errors that hurt nothing."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from cluster.client import Client
from server_util import ServerThread, config

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def srv(ray_cluster, smollm2_dir):
    with ServerThread(config(smollm2_dir, tensor_parallel_size=1, max_batch_size=8)) as server:
        yield server


@pytest.fixture(scope="module")
def kc(srv):
    client = triton.InferenceServerClient(url=srv.address)
    yield client
    client.close()


def _text_input(prompt: str) -> triton.InferInput:
    tensor = triton.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    return tensor


def test_health_and_metadata(kc):
    assert kc.is_server_live() and kc.is_server_ready()
    assert kc.is_model_ready(MODEL) and not kc.is_model_ready("other")
    assert kc.get_server_metadata().name == "tpserve"
    meta = kc.get_model_metadata(MODEL)
    assert [(t.name, t.datatype) for t in meta.inputs] == [("text_input", "BYTES")]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("text_output", "BYTES")]


def test_infer_equals_the_tpserve_api(srv, kc):
    result = kc.infer(MODEL, [_text_input(PROMPT)], parameters={"max_tokens": 12, "temperature": 0.0})
    text = result.as_numpy("text_output")[0].decode()
    with Client(srv.address, timeout=60) as c:
        ours = c.generate(PROMPT, max_tokens=12, temperature=0.0)
    assert text == ours.text
    params = result.get_response().parameters
    assert params["completion_tokens"].int64_param == ours.completion_tokens
    assert params["finish_reason"].string_param == ours.finish_reason


def test_stream_infer_sends_deltas_then_a_final_response(srv, kc):
    got: queue.Queue = queue.Queue()
    kc.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        kc.async_stream_infer(MODEL, [_text_input(PROMPT)],
                              parameters={"stream": True, "max_tokens": 12, "temperature": 0.0})
        deltas = []
        while True:
            result, error = got.get(timeout=60)
            assert error is None, error
            deltas.append(result.as_numpy("text_output")[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        kc.async_stream_infer(MODEL, [_text_input(PROMPT)], parameters={"temperature": 9.0})
        result, error = got.get(timeout=60)  # an error in the stream, which goes on
        assert result is None and "temperature" in str(error)
        kc.async_stream_infer(MODEL, [_text_input(PROMPT)], parameters={"max_tokens": 12, "temperature": 0.0})
        result, error = got.get(timeout=60)  # not streamed: one response, the whole text
        whole = result.as_numpy("text_output")[0].decode()
    finally:
        kc.stop_stream()
    with Client(srv.address, timeout=60) as c:
        expect = c.generate(PROMPT, max_tokens=12, temperature=0.0).text
    assert len(deltas) > 1 and "".join(deltas) == whole == expect


def test_errors_are_statuses_and_the_server_goes_on(kc):
    with pytest.raises(InferenceServerException) as err:
        kc.infer(MODEL, [_text_input(PROMPT)], parameters={"temperature": 9.0})
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "temperature" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        kc.infer("gpt-4", [_text_input(PROMPT)])
    assert "NOT_FOUND" in str(err.value.status())
    bad = triton.InferInput("prompt", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"x"], dtype=object))
    with pytest.raises(InferenceServerException, match="text_input"):
        kc.infer(MODEL, [bad])
    result = kc.infer(MODEL, [_text_input("Hello")], parameters={"max_tokens": 2})
    assert result.get_response().parameters["completion_tokens"].int64_param == 2
