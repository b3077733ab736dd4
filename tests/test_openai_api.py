"""The OpenAI-compatible HTTP API through the official `openai` client, against a running server
(one TP 1 replica on the session's Ray): completions and chat, streamed and not, usage,
logprobs, stop, seeds, n, every error status, bearer tokens, health, metrics, the OpenAPI
document, and greedy output equal to tpserve.v1's for the same prompt."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from cluster.client import Client
from server_util import ServerThread, config

MODEL = "smollm2-135m-instruct"
TOKEN = "http-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def srv(ray_cluster, smollm2_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("openai") / "tokens"
    tokens.write_text(TOKEN + "\n")
    cfg = config(smollm2_dir, tensor_parallel_size=1, max_batch_size=8, max_concurrent_requests=6,
                 auth_token_file=str(tokens), http={"enabled": True, "port": 0})
    with ServerThread(cfg) as server:
        yield server


@pytest.fixture(scope="module")
def api(srv):
    with openai.OpenAI(base_url=srv.server.http_address + "/v1", api_key=TOKEN, max_retries=0, timeout=120) as c:
        yield c


def _get(srv, path: str, token: str | None = TOKEN):
    req = urllib.request.Request(srv.server.http_address + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_models_lists_the_served_model(api):
    assert [m.id for m in api.models.list().data] == [MODEL]


def test_greedy_completion_equals_the_grpc_api(srv, api):
    prompt = "The capital of France is"
    out = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    with Client(srv.address, timeout=60, token=TOKEN) as c:
        ours = c.generate(prompt, max_tokens=12, temperature=0.0)
    assert out.choices[0].text == ours.text and out.choices[0].finish_reason == ours.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ours.prompt_tokens, ours.completion_tokens)
    assert out.usage.total_tokens == ours.prompt_tokens + ours.completion_tokens


def test_chat_streamed_and_not_give_the_same_text_with_usage(srv, api):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=16, temperature=0)
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    with Client(srv.address, timeout=60, token=TOKEN) as c:
        ours = c.generate(messages=messages, max_tokens=16, temperature=0.0)
    assert text == ours.text and whole.usage.prompt_tokens == ours.prompt_tokens


def test_stop_and_logprobs(api):
    out = api.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0,
                                 stop=[" 6"], logprobs=2)
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and " 6" not in choice.text and "5" in choice.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_seed_reproduces_and_n_gives_distinct_choices(api):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=7)
    a, b = api.completions.create(**kw), api.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    many = api.completions.create(n=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == a.choices[0].text  # choice 0 keeps the seed itself
    assert len({c.text for c in many.choices}) == 3
    assert many.usage.prompt_tokens == a.usage.prompt_tokens  # the prompt counts once


def test_errors_have_openais_shape_and_status(srv, api):
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=MODEL, prompt="Hi", temperature=7)
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == "temperature" and "temperature" in body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user"}], max_tokens=0)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model="gpt-4", prompt="Hi")
    assert err.value.body["code"] == "model_not_found"
    with openai.OpenAI(base_url=srv.server.http_address + "/v1", api_key="wrong-token-0123456789",
                       max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    # admission: 6 requests at most (max_concurrent_requests); the 7th gets 429
    streams = [api.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=200, stream=True,
                                      extra_body={"ignore_eos": True}) for i in range(6)]
    firsts = [next(iter(s)) for s in streams]
    assert all(f.choices for f in firsts)
    with pytest.raises(openai.RateLimitError):
        api.completions.create(model=MODEL, prompt="one more", max_tokens=2)
    for s in streams:
        s.close()  # the server notices the closed connections and frees their slots
    deadline = time.monotonic() + 20
    while True:  # none of it hurt the server
        try:
            assert api.completions.create(model=MODEL, prompt="Hello", max_tokens=2).usage.completion_tokens == 2
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the closed streams kept their admission slots"
            time.sleep(0.2)


def test_health_metrics_and_openapi(srv):
    assert _get(srv, "/health", token=None) == (200, "ok")  # open, like gRPC health, by default
    status, text = _get(srv, "/metrics")
    assert status == 200 and "tpserve_generation_tokens_total" in text
    assert _get(srv, "/metrics", token=None)[0] == 401
    status, text = _get(srv, "/openapi.json")
    paths = json.loads(text)["paths"]
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)
