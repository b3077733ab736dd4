"""The tpserve.v1 gRPC contract: committed stubs are fresh, import cleanly and describe
the service we mean to serve."""

from __future__ import annotations

import os
import pickle
import re
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cluster.api import tpserve_pb2 as pb
from cluster.api import tpserve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent

# RPC name -> (client streaming, server streaming, request type, response type)
EXPECTED_RPCS = {
    "Generate": (False, True, "GenerateRequest", "GenerateResponse"),
    "GenerateUnary": (False, False, "GenerateRequest", "GenerateResult"),
    "Tokenize": (False, False, "TokenizeRequest", "TokenizeResponse"),
    "Detokenize": (False, False, "DetokenizeRequest", "DetokenizeResponse"),
    "ModelInfo": (False, False, "ModelInfoRequest", "ModelInfoResponse"),
}


def _protobuf_version(pb2_source: bytes) -> str:
    match = re.search(rb"^# Protobuf Python Version: (\S+)$", pb2_source, re.MULTILINE)
    return match.group(1).decode() if match else "unknown"


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) generates stubs")
    from cluster import protogen

    fresh = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in protogen.generate(tmp_path)}
    committed = {p.relative_to(protogen.API_DIR).as_posix(): p.read_bytes()
                 for p in [*protogen.API_DIR.iterdir(), *(protogen.API_DIR / "kserve").iterdir()] if p.is_file()}
    stale = sorted(n for n in set(fresh) | set(committed) if fresh.get(n) != committed.get(n))
    if stale:
        hint = "the stubs in cluster/api/ are stale: run `python -m cluster.protogen`"
        fresh_v = _protobuf_version(fresh.get("tpserve_pb2.py", b""))
        committed_v = _protobuf_version(committed.get("tpserve_pb2.py", b""))
        if fresh_v != committed_v:
            hint += (
                f" (or install the grpcio-tools they were made with: committed stubs are "
                f"from protoc for protobuf {committed_v}, the installed one makes {fresh_v})"
            )
        pytest.fail(f"{hint}; differing files: {', '.join(stale)}")


def test_generation_is_deterministic(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) generates stubs")
    from cluster import protogen

    first = {p.relative_to(tmp_path / "a").as_posix(): p.read_bytes() for p in protogen.generate(tmp_path / "a")}
    second = {p.relative_to(tmp_path / "b").as_posix(): p.read_bytes() for p in protogen.generate(tmp_path / "b")}
    assert first == second
    assert set(first) == {
        "__init__.py", "tpserve_pb2.py", "tpserve_pb2.pyi", "tpserve_pb2_grpc.py",
        "kserve/__init__.py", "kserve/grpc_service_pb2.py", "kserve/grpc_service_pb2_grpc.py",
        "kserve/model_config_pb2.py",
    }


def test_kserve_stubs_live_in_their_own_descriptor_pool():
    """Triton's client registers the same file names in protobuf's default pool; ours must not."""
    from google.protobuf import descriptor_pool

    from cluster.api import kserve
    from cluster.api.kserve import grpc_service_pb2 as kv

    assert kv.DESCRIPTOR.pool is kserve.POOL and kserve.POOL is not descriptor_pool.Default()
    assert kv.ModelInferRequest.DESCRIPTOR.file.pool is kserve.POOL
    assert kv.ModelInferRequest.__module__ == "cluster.api.kserve.grpc_service_pb2"


def test_stubs_live_in_cluster_api():
    assert pb_grpc.tpserve_dot_v1_dot_tpserve__pb2 is pb
    assert pb.GenerateRequest.__module__ == "cluster.api.tpserve_pb2"


def test_generate_request_round_trips():
    request = pb.GenerateRequest(
        request_id="req-1",
        chat=pb.ChatInput(
            messages=[
                pb.ChatMessage(role="system", content="You are terse."),
                pb.ChatMessage(role="user", content="Name a prime."),
            ]
        ),
        sampling=pb.SamplingParams(
            max_tokens=32,
            temperature=0.0,
            top_k=40,
            top_p=0.9,
            seed=1234,
            stop=["\n\n"],
            stop_token_ids=[2],
            logprobs=3,
            skip_special_tokens=False,
        ),
    )
    decoded = pb.GenerateRequest.FromString(request.SerializeToString())

    assert decoded == request
    assert decoded.WhichOneof("input") == "chat"
    assert [m.role for m in decoded.chat.messages] == ["system", "user"]
    sampling = decoded.sampling
    # `optional` fields tell an explicit zero/false from "unset".
    assert sampling.HasField("temperature") and sampling.temperature == 0.0
    assert sampling.HasField("skip_special_tokens") and not sampling.skip_special_tokens
    assert sampling.HasField("seed") and sampling.seed == 1234
    assert not sampling.HasField("repetition_penalty")
    assert list(sampling.stop) == ["\n\n"] and list(sampling.stop_token_ids) == [2]
    assert pickle.loads(pickle.dumps(decoded)) == request


def test_input_is_a_oneof():
    request = pb.GenerateRequest(prompt="Hello")
    request.prompt_token_ids.ids.extend([1, 2, 3])
    assert request.WhichOneof("input") == "prompt_token_ids"
    assert not request.HasField("prompt")


def test_descriptor_names_and_rpcs():
    assert pb.DESCRIPTOR.name == "tpserve/v1/tpserve.proto"
    assert pb.DESCRIPTOR.package == "tpserve.v1"
    service = pb.DESCRIPTOR.services_by_name["TPServe"]
    assert service.full_name == "tpserve.v1.TPServe"

    rpcs = {
        m.name: (
            m.client_streaming,
            m.server_streaming,
            m.input_type.name,
            m.output_type.name,
        )
        for m in service.methods
    }
    assert rpcs == EXPECTED_RPCS


def test_finish_reasons():
    assert pb.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"
    assert {pb.FinishReason.Name(v) for v in pb.FinishReason.values()} == {
        "FINISH_REASON_UNSPECIFIED",
        "FINISH_REASON_LENGTH",
        "FINISH_REASON_STOP",
        "FINISH_REASON_EOS",
        "FINISH_REASON_CANCELLED",
    }


class _EchoServicer(pb_grpc.TPServeServicer):
    """Streams the prompt back one character per message."""

    def Generate(self, request, context):
        yield pb.GenerateResponse(
            start=pb.GenerateStart(request_id=request.request_id, prompt_tokens=1)
        )
        for i, ch in enumerate(request.prompt):
            yield pb.GenerateResponse(text=ch, token_ids=[i])
        yield pb.GenerateResponse(
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=1, completion_tokens=len(request.prompt)),
        )


def test_stubs_serve_over_grpc():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TPServeServicer_to_server(_EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TPServeStub(channel)
            stream = list(
                stub.Generate(pb.GenerateRequest(request_id="r", prompt="abc"), timeout=10)
            )
            assert stream[0].start.request_id == "r"
            assert "".join(m.text for m in stream) == "abc"
            assert stream[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert stream[-1].usage.completion_tokens == 3

            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)


# -- one environment with the clients users install beside us -----------------------------------


def test_the_server_and_a_triton_client_share_one_environment():
    """`pip install tpserve tritonclient[grpc]`: the test environment is exactly that (tritonclient
    pins protobuf < 7), and both sides import and work in it."""
    import google.protobuf
    import tritonclient.grpc as triton

    import cluster.server  # noqa: F401 - the whole serving side, health and reflection included

    assert int(google.protobuf.__version__.split(".")[0]) == 6
    request = triton.InferInput("text_input", [1], "BYTES")
    assert request.name() == "text_input"
    assert pb.GenerateRequest.FromString(pb.GenerateRequest(prompt="hi").SerializeToString()).prompt == "hi"


def test_the_stubs_run_on_protobuf_7(tmp_path):
    """The other end of the range: protobuf 7 (what a plain `pip install tpserve` gets), in a
    subprocess that finds it first on its path."""
    import subprocess
    import sys

    target = tmp_path / "pb7"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "--no-deps", "--target", str(target), "protobuf>=7,<8"], capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"protobuf 7 could not be installed here: {pip.stderr.strip()[-300:]}")
    code = ("import google.protobuf, grpc; from grpc_health.v1 import health_pb2; "
            "from cluster.api import tpserve_pb2 as pb, tpserve_pb2_grpc; "
            "r = pb.GenerateRequest(prompt='hi', sampling=pb.SamplingParams(max_tokens=3)); "
            "assert pb.GenerateRequest.FromString(r.SerializeToString()) == r; "
            "print(google.protobuf.__version__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith("7.")
