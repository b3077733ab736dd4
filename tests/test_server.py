"""End to end through real gRPC channels to running clusters on the session's Ray.

Two deployments: `srv`, one TP = 2 replica shared by most tests, and `pair`, two TP = 2 replicas
with a small admission queue, a short request timeout and a short collective timeout, for the
overload, timeout and killed-worker tests (the kill test runs last: it leaves a replica dead).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster import cli
from cluster.api import tpserve_pb2 as pb
from cluster.client import AsyncClient, Client, TPServeError
from server_util import ServerThread, config

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0.0)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def srv(ray_cluster, smollm2_dir):
    with ServerThread(config(smollm2_dir)) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv):
    with Client(srv.address, timeout=60) as c:
        yield c


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2):
    """The first truthy value of predicate() within timeout_s, else None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return None


def kv_blocks_used(client: Client) -> list[int]:
    return [r.kv_blocks_used for r in client.model_info().replicas]


# --- answers ------------------------------------------------------------------------------------


def test_chat_prompt_answered_sensibly(client):
    result = client.generate(messages=CHAT, max_tokens=32, **GREEDY)
    assert "Paris" in result.text
    assert result.finish_reason in ("eos", "length") and result.completion_tokens == len(result.token_ids)
    assert result.prompt_tokens == client.tokenize(messages=CHAT).count


@pytest.mark.parametrize("inputs", [{"messages": CHAT}, {"prompt": "Once upon a time"}])
def test_stream_equals_unary_for_greedy(client, inputs):
    params = dict(max_tokens=24, logprobs=2, **GREEDY, **inputs)
    unary = client.generate(**params)
    stream = client.stream(**params)
    deltas = list(stream)
    assert stream.request_id and stream.replica_id == unary.replica_id == 0
    assert "".join(d.text for d in deltas) == unary.text
    assert [t for d in deltas for t in d.token_ids] == unary.token_ids
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    last = deltas[-1]
    assert (last.finish_reason, last.completion_tokens) == (unary.finish_reason, unary.completion_tokens)
    streamed_lp = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in streamed_lp] == unary.token_ids
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in streamed_lp)
    # greedy: the sampled token is the most likely one
    assert all(lp.top_logprobs[0].token_id == lp.token_id for lp in unary.logprobs)


def test_stop_string_and_stop_token(client):
    free = client.generate("The capital of France is", max_tokens=12, ignore_eos=True, **GREEDY)
    word = next(w for w in free.text.split() if len(w) > 3)
    cut = client.generate("The capital of France is", max_tokens=12, stop=[word], **GREEDY)
    assert (cut.finish_reason, cut.stop) == ("stop", word)
    assert cut.text == free.text[: free.text.index(word)]
    token = free.token_ids[2]
    by_id = client.generate("The capital of France is", max_tokens=12, stop_token_ids=[token], **GREEDY)
    assert (by_id.finish_reason, by_id.stop) == ("stop", token)
    assert by_id.token_ids == free.token_ids[:3]


def test_request_id_is_echoed(client):
    assert client.generate("Hi", max_tokens=1, request_id="my-id-7").request_id == "my-id-7"
    assert client.generate("Hi", max_tokens=1).request_id.startswith("req-")


def test_tokenize_detokenize_and_model_info(client, srv):
    tok = client.tokenize(messages=CHAT)
    assert tok.rendered_prompt.startswith("<|im_start|>system\n")
    assert tok.rendered_prompt.endswith("<|im_start|>assistant\n")
    assert tok.count == len(tok.token_ids) == len(tok.tokens) and tok.tokens[0] == "<|im_start|>"
    assert client.detokenize(client.tokenize("Hello world").token_ids) == "Hello world"
    info = client.model_info()
    assert (info.architecture, info.tensor_parallel_size, info.num_replicas) == ("LlamaForCausalLM", 2, 1)
    assert (info.dtype, info.device, info.vocab_size) == ("float32", "cpu", 49152)
    assert list(info.eos_token_ids) == [2] and info.has_chat_template and info.kv_block_size == 128  # CPU default
    assert (info.limits.max_model_len, info.limits.max_batch_size, info.limits.max_waiting_requests) == (512, 64, 256)
    (replica,) = info.replicas
    assert replica.healthy and [r.rank for r in replica.ranks] == [0, 1]
    assert replica.kv_blocks_total == srv.server.controller.num_blocks


# --- load, cancellation, deadlines -----------------------------------------------------------


def test_200_concurrent_streams_all_complete(client):
    async def one(ac: AsyncClient, i: int):
        stream = ac.stream(f"Request number {i} says", request_id=f"load-{i}", max_tokens=8,
                           ignore_eos=True, **GREEDY)
        deltas = [d async for d in stream]
        return stream.request_id, [t for d in deltas for t in d.token_ids], deltas[-1]

    async def main():
        async with AsyncClient(client.address, timeout=120) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(200)))

    started = time.monotonic()
    results = asyncio.run(main())
    assert sorted(r[0] for r in results) == sorted(f"load-{i}" for i in range(200))
    assert all(len(tokens) == 8 and last.finish_reason == "length" and last.completion_tokens == 8
               for _, tokens, last in results)
    assert time.monotonic() - started < 90
    assert wait_for(lambda: kv_blocks_used(client) == [0], 5)


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_cancel_mid_stream_frees_kv_blocks(client, how):
    own = Client(client.address, timeout=60)
    stream = own.stream("Tell me a long story.", max_tokens=500, ignore_eos=True, **GREEDY)
    received = 0
    for delta in stream:  # read until the stats show this request's blocks
        received += len(delta.token_ids)
        if received >= 4 and kv_blocks_used(client)[0] > 0:
            break
    assert received < 500
    if how == "cancel":
        stream.cancel()
        with pytest.raises(TPServeError) as err:
            list(stream)
        assert err.value.code is grpc.StatusCode.CANCELLED
    own.close()  # a client that goes away closes its connection
    assert wait_for(lambda: kv_blocks_used(client) == [0], 5), "KV blocks still in use"
    assert client.model_info().replicas[0].running_requests == 0


def test_client_deadline_aborts_the_request(client):
    started = time.monotonic()
    with pytest.raises(TPServeError) as err:
        client.generate("Count to one thousand:", max_tokens=500, ignore_eos=True, timeout=1.5)
    assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert wait_for(lambda: kv_blocks_used(client) == [0], 5)


# --- bad input ------------------------------------------------------------------------------------


def req(**fields) -> pb.GenerateRequest:
    sampling = fields.pop("sampling", {})
    fields.setdefault("prompt", "Hello")
    return pb.GenerateRequest(**fields, sampling=pb.SamplingParams(**sampling))


def chat(*messages) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role=r, content=c)
                                                          for r, c in messages]))


BAD = [  # (id, request, text the error must contain: the field, then the limit)
    ("empty prompt", req(prompt=""), ["prompt", "empty"]),
    ("no input", pb.GenerateRequest(), ["input", "prompt, chat or prompt_token_ids"]),
    ("prompt too long", req(prompt="hello " * 600), ["prompt", "max_model_len - 1 = 511"]),
    ("prompt bytes far too long", req(prompt="x" * 200_000), ["prompt", "max_model_len = 512"]),
    ("empty token ids", pb.GenerateRequest(prompt_token_ids=pb.TokenIds()), ["prompt_token_ids.ids", "empty"]),
    ("token id out of vocab", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 49152])),
     ["prompt_token_ids.ids[1]", "vocab_size 49152"]),
    ("token ids too long", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5] * 512)),
     ["prompt_token_ids", "511"]),
    ("max_tokens 0", req(sampling=dict(max_tokens=0)), ["sampling.max_tokens", "[1, 512]"]),
    ("max_tokens too big", req(sampling=dict(max_tokens=513)), ["sampling.max_tokens", "[1, 512]"]),
    ("min_tokens above max", req(sampling=dict(max_tokens=4, min_tokens=5)), ["sampling.min_tokens", "[0, 4]"]),
    ("temperature NaN", req(sampling=dict(temperature=math.nan)), ["sampling.temperature", "[0, 2]"]),
    ("temperature negative", req(sampling=dict(temperature=-0.5)), ["sampling.temperature", "[0, 2]"]),
    ("temperature above 2", req(sampling=dict(temperature=2.5)), ["sampling.temperature", "[0, 2]"]),
    ("temperature inf", req(sampling=dict(temperature=math.inf)), ["sampling.temperature", "finite"]),
    ("top_p 0", req(sampling=dict(top_p=0.0)), ["sampling.top_p", "(0, 1]"]),
    ("top_p above 1", req(sampling=dict(top_p=1.5)), ["sampling.top_p", "(0, 1]"]),
    ("top_p NaN", req(sampling=dict(top_p=math.nan)), ["sampling.top_p", "(0, 1]"]),
    ("top_k above vocab", req(sampling=dict(top_k=50_000)), ["sampling.top_k", "vocab_size 49152"]),
    ("min_p above 1", req(sampling=dict(min_p=1.5)), ["sampling.min_p", "[0, 1]"]),
    ("repetition_penalty 0", req(sampling=dict(repetition_penalty=0.0)), ["sampling.repetition_penalty", "[0.01, 2]"]),
    ("presence_penalty inf", req(sampling=dict(presence_penalty=math.inf)), ["sampling.presence_penalty", "[-2, 2]"]),
    ("frequency_penalty -3", req(sampling=dict(frequency_penalty=-3.0)), ["sampling.frequency_penalty", "[-2, 2]"]),
    ("too many stop strings", req(sampling=dict(stop=[f"s{i}" for i in range(9)])), ["sampling.stop", "max_stop_strings = 8"]),
    ("stop string too long", req(sampling=dict(stop=["x" * 65])), ["sampling.stop[0]", "max_stop_string_length = 64"]),
    ("empty stop string", req(sampling=dict(stop=["ok", ""])), ["sampling.stop[1]", "1 to max_stop_string_length"]),
    ("stop token out of vocab", req(sampling=dict(stop_token_ids=[60_000])), ["sampling.stop_token_ids[0]", "vocab_size 49152"]),
    ("too many stop tokens", req(sampling=dict(stop_token_ids=[7] * 65)), ["sampling.stop_token_ids", "max_stop_token_ids = 64"]),
    ("logprobs too many", req(sampling=dict(logprobs=21)), ["sampling.logprobs", "[0, 20]"]),
    ("unknown chat role", chat(("user", "hi"), ("robot", "beep")), ["chat.messages[1].role", "system, user, assistant, tool"]),
    ("empty role", chat(("", "hi")), ["chat.messages[0].role", "system, user"]),
    ("empty chat", pb.GenerateRequest(chat=pb.ChatInput()), ["chat.messages", "empty"]),
    ("chat too long", chat(("user", "word " * 600)), ["chat", "max_model_len - 1 = 511"]),
    ("request_id too long", req(request_id="r" * 129), ["request_id", "128"]),
]


@pytest.mark.parametrize("request_, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(client, request_, expected):
    stub_call = client._stub.GenerateUnary  # the raw stub: the client would refuse some of these
    with pytest.raises(grpc.RpcError) as err:
        stub_call(request_, timeout=30)
    assert err.value.code() is INVALID, err.value.details()
    details = err.value.details()
    assert details.startswith(expected[0]) and all(e in details for e in expected), details
    assert client.generate("Hello", max_tokens=2).completion_tokens >= 1


def test_bad_input_on_the_stream_too(client):
    with pytest.raises(TPServeError) as err:
        list(client.stream("Hello", temperature=math.nan))
    assert err.value.code is INVALID and err.value.message.startswith("sampling.temperature")


@pytest.mark.parametrize("raw, field", [
    (b"\x12\x02\xff\xfe", "prompt"),  # GenerateRequest.prompt (field 2) = bytes ff fe
    (b"\x1a\x0c\x0a\x0a\x0a\x04user\x12\x02\xc3\x28", "chat.messages.content"),
    (b"\x0a\x01\x80\x12\x02hi", "request_id"),
])
def test_invalid_utf8_is_invalid_argument(client, srv, raw, field):
    with grpc.insecure_channel(srv.address) as channel:
        call = channel.unary_unary("/tpserve.v1.TPServe/GenerateUnary",
                                   request_serializer=lambda b: b,
                                   response_deserializer=pb.GenerateResult.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(raw, timeout=10)
    assert err.value.code() is INVALID
    assert err.value.details() == f"{field} is not valid UTF-8 (text fields must be UTF-8)"
    assert client.generate("Hello", max_tokens=1).completion_tokens == 1


def test_chat_without_template_is_unimplemented_in_mapping():
    from cluster.frontend import status_of
    from cluster.validation import Unsupported

    assert status_of(Unsupported("no template"))[0] is grpc.StatusCode.UNIMPLEMENTED
    assert status_of(KeyError("x"))[0] is grpc.StatusCode.INTERNAL


# --- health, reflection, metrics, CLI -------------------------------------------------------------


def test_standard_health_check(srv):
    with grpc.insecure_channel(srv.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tpserve.v1.TPServe"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_lets_a_generic_client_call_the_api(srv):
    """List the services, fetch the schema, and call ModelInfo with no generated stubs."""
    with grpc.insecure_channel(srv.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        def ask(**request):
            (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]),
                                                    timeout=10)
            return response

        services = {s.name for s in ask(list_services="").list_services_response.service}
        assert {"tpserve.v1.TPServe", "grpc.health.v1.Health"} <= services
        files = ask(file_containing_symbol="tpserve.v1.TPServe").file_descriptor_response.file_descriptor_proto
        pool = descriptor_pool.DescriptorPool()  # a fresh pool: nothing of ours is imported into it
        for blob in files:
            pool.Add(descriptor_pb2.FileDescriptorProto.FromString(blob))
        method = pool.FindServiceByName("tpserve.v1.TPServe").methods_by_name["ModelInfo"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary("/tpserve.v1.TPServe/ModelInfo", request_serializer=request_cls.SerializeToString,
                                   response_deserializer=response_cls.FromString)
        info = call(request_cls(), timeout=10)
    assert info.architecture == "LlamaForCausalLM" and info.tensor_parallel_size == 2


def test_prometheus_metrics(srv, client):
    client.generate("Hello", max_tokens=3, ignore_eos=True)
    with pytest.raises(TPServeError):
        client.generate("")

    def scrape():
        text = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    m = wait_for(lambda: (lambda s: s if 'tpserve_kv_cache_usage_ratio{replica="0"}' in s else None)(scrape()), 5)
    assert m is not None
    assert m['tpserve_prompt_tokens_total{replica="0"}'] > 0
    assert m['tpserve_generation_tokens_total{replica="0"}'] >= 3
    assert m['tpserve_request_errors_total{code="invalid_argument"}'] >= 1
    assert m['tpserve_replica_healthy{replica="0"}'] == 1
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert m[f'tpserve_{name}_count{{replica="0"}}'] > 0, name
    assert 'tpserve_requests_running{replica="0"}' in m and 'tpserve_requests_waiting{replica="0"}' in m
    assert m['tpserve_requests_finished_total{reason="length",replica="0"}'] > 0
    assert 0 <= m['tpserve_prefix_cache_hit_ratio{replica="0"}'] <= 1


def test_cli_generate_and_health(srv, capsys):
    assert cli.main(["generate", "--address", srv.address, "--json", "--max-tokens", "5",
                     "--temperature", "0", "--ignore-eos", "The capital of France is"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 5
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 5}
    assert cli.main(["generate", "--address", srv.address, "--chat", "--max-tokens", "24",
                     "--temperature", "0", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert cli.main(["health", "--address", srv.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "SERVING" and lines[1].startswith("replica 0: healthy (2 ranks on node")
    assert cli.main(["generate", "--address", srv.address, "--temperature", "9", "Hi"]) == 2
    assert capsys.readouterr().err.strip() == ("tpserve generate: error: INVALID_ARGUMENT: "
                                               "sampling.temperature must be a finite number in [0, 2], got 9.0")


def test_cli_serve_bad_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: smollm2-135m-instruct\nserver:\n  port: 99999\n")
    assert cli.main(["serve", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"{bad}: server.port: must be a port number from 0 to 65535 (0 = pick a free port), got 99999\n"


def test_a_replica_with_a_killed_rank_is_rebuilt_and_serves_again(srv):
    """rebuild_failed_replicas (on by default): out of routing at once, back within a minute. A
    stream that was running waits for the rebuild and resumes there: its output is the undisturbed
    one. A stream whose deadline passes meanwhile ends with DEADLINE_EXCEEDED."""
    prompt = "Write a list of ten fruits:"
    with Client(srv.address, timeout=120) as c:
        undisturbed = c.generate(prompt, max_tokens=40, ignore_eos=True, **GREEDY)
        stream = c.stream(prompt, max_tokens=40, ignore_eos=True, **GREEDY).start()
        hurried = c.stream("Count to one thousand:", max_tokens=400, ignore_eos=True, timeout=4, **GREEDY).start()
        first, _ = next(stream), next(hurried)
        victim = srv.server.controller.replicas[0]
        old_pids = {n["pid"] for n in victim.nodes}
        os.kill(victim.nodes[1]["pid"], signal.SIGKILL)
        assert wait_for(lambda: c.health() == "NOT_SERVING", 10)
        with pytest.raises(TPServeError) as err:
            list(hurried)
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        rest = list(stream)  # waits for the rebuild, then resumes
        assert first.token_ids + [t for d in rest for t in d.token_ids] == undisturbed.token_ids
        assert first.text + "".join(d.text for d in rest) == undisturbed.text
        assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 40
        assert wait_for(lambda: c.health() == "SERVING", 90)
        rebuilt = srv.server.controller.replicas[0]
        assert not old_pids & {n["pid"] for n in rebuilt.nodes}, "fresh processes"
        (state,) = c.model_info().replicas
        assert state.healthy
        assert "Paris" in c.generate("The capital of France is", max_tokens=8, **GREEDY).text
        assert srv.server.metrics.registry.get_sample_value("tpserve_request_failovers_total",
                                                           {"replica": "0"}) >= 1


# --- two replicas: overload, timeout, a killed worker ----------------------------------------------


@pytest.fixture(scope="module")
def pair(ray_cluster, smollm2_dir, srv):
    cfg = config(smollm2_dir, replicas=2, max_batch_size=4, max_tokens_per_step=64, max_queued_requests=4,
                 collective_timeout_s=5, request_timeout_s=8, rebuild_failed_replicas=False)
    with ServerThread(cfg) as server:
        yield server


def test_admission_queue_rejects_the_excess(pair):
    """Capacity is max_batch_size 4 × 2 replicas + max_queued_requests 4 = 12 in flight. Each
    request is decided by its stream's first message and is long (500 tokens), so no admitted one
    can finish, and free its place, before all 40 are decided, however fast the replicas run (with
    8-token requests a fast run let some finish early and admitted 24)."""
    async def one(ac: AsyncClient, i: int):
        stream = ac.stream(f"Item {i}:", max_tokens=500, ignore_eos=True, **GREEDY)
        try:
            return await stream.start()
        except TPServeError as err:
            return err

    async def main():
        async with AsyncClient(pair.address, timeout=60) as ac:
            results = await asyncio.gather(*(one(ac, i) for i in range(40)))
            admitted = [r for r in results if not isinstance(r, TPServeError)]
            # the running ones (a batch of 4 on each replica) each produce a token; the queued 4
            # cannot start before a running one ends
            tokens = {asyncio.ensure_future(s.__anext__()): s for s in admitted}
            produced, deadline = set(), time.monotonic() + 30
            while len(produced) < 8 and time.monotonic() < deadline:
                done, _ = await asyncio.wait(set(tokens) - produced, timeout=1,
                                             return_when=asyncio.FIRST_COMPLETED)
                produced |= done
            late, _ = await asyncio.wait(set(tokens) - produced, timeout=1)  # none of the queued starts
            running = [tokens[t] for t in produced | late]
            for t in tokens:
                t.cancel()
            for s in admitted:
                s.cancel()
            return results, admitted, running

    results, admitted, running = asyncio.run(main())
    rejected = [r for r in results if isinstance(r, TPServeError)]
    assert all(r.code is grpc.StatusCode.RESOURCE_EXHAUSTED for r in rejected), rejected[:1]
    assert "max_queued_requests 4" in rejected[0].message
    assert len(admitted) == 12 and len(rejected) == 28
    assert len(running) == 8 and {s.replica_id for s in running} == {0, 1}
    with Client(pair.address, timeout=30) as c:  # the places are free again once the aborts land
        assert wait_for(lambda: kv_blocks_used(c) == [0, 0], 10)
        assert c.generate("Hello", max_tokens=2).completion_tokens == 2


def test_server_request_timeout_applies_to_calls_without_a_deadline_only(pair):
    """request_timeout_s (8 s) ends a call that set no deadline; a call with a deadline of its
    own (here 60 s) runs on past it."""
    with Client(pair.address) as c, Client(pair.address, timeout=60) as patient:
        own_deadline = patient.stream("Write a long story.", max_tokens=500, ignore_eos=True).start()
        started = time.monotonic()
        with pytest.raises(TPServeError) as err:
            list(c.stream("Write a long essay.", max_tokens=500, ignore_eos=True))
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "request_timeout_s (8 s)" in err.value.message
        assert 7.5 < time.monotonic() - started < 12
        while time.monotonic() - started < 9.5:  # still streaming past the server's timeout
            assert next(own_deadline).finish_reason is None
        own_deadline.cancel()
        assert wait_for(lambda: kv_blocks_used(c) == [0, 0], 5)


def test_a_killed_workers_requests_resume_on_the_other_replica(pair):
    """Two replicas, rank 1 of replica 0 killed while four streams run, two greedy and two seeded:
    none fails, each output equals its undisturbed one, usage included; the other replica serves
    on."""
    prompts = [f"Story {i}:" for i in range(4)]
    params = [GREEDY, dict(temperature=0.8, top_p=0.95, seed=11), dict(temperature=0.8, seed=12), GREEDY]
    with Client(pair.address, timeout=120) as c:
        undisturbed = [c.generate(p, max_tokens=64, ignore_eos=True, **kw) for p, kw in zip(prompts, params)]
        streams = [c.stream(p, max_tokens=64, ignore_eos=True, **kw).start() for p, kw in zip(prompts, params)]
        assert sorted(s.replica_id for s in streams) == [0, 0, 1, 1]  # least outstanding work
        firsts = [next(s) for s in streams]  # every request is decoding
        victim = pair.server.controller.replicas[0]
        os.kill(victim.nodes[1]["pid"], signal.SIGKILL)  # rank 1 of replica 0
        for s, first, want in zip(streams, firsts, undisturbed):
            rest = list(s)
            assert first.token_ids + [t for d in rest for t in d.token_ids] == want.token_ids, s.replica_id
            assert first.text + "".join(d.text for d in rest) == want.text
            assert (rest[-1].finish_reason, rest[-1].completion_tokens, rest[-1].prompt_tokens) == \
                   ("length", 64, want.prompt_tokens)
        value = pair.server.metrics.registry.get_sample_value
        assert value("tpserve_request_failovers_total", {"replica": "0"}) == 2
        assert wait_for(lambda: c.health() == "NOT_SERVING", 5)  # replica 0 is not rebuilt here
        (dead, alive) = c.model_info().replicas
        assert not dead.healthy and dead.message and alive.healthy
        results = [c.generate("Hello", max_tokens=4, ignore_eos=True) for _ in range(4)]
        assert all(r.replica_id == 1 and len(r.token_ids) == 4 for r in results)


def test_shutdown_ends_streams_with_cancelled(pair):
    with Client(pair.address, timeout=60) as c:
        stream = c.stream("A long story:", max_tokens=400, ignore_eos=True).start()
        next(stream)
        pair._run(pair.server.stop(grace_s=0.5), 30)
        last = list(stream)[-1]
        assert last.finish_reason == "cancelled" and last.completion_tokens >= 1
        with pytest.raises(TPServeError) as err:
            c.generate("Hello", max_tokens=2, timeout=5)
        assert err.value.code is grpc.StatusCode.UNAVAILABLE
