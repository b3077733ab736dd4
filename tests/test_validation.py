"""Request checking at the front end, without a server: every bad field is rejected with its path
and its limit; good requests become the token ids and SamplingParams the engine gets."""

from __future__ import annotations

import math

import grpc
import pytest

from cluster.api import tpserve_pb2 as pb
from cluster.client import build_request, finish_name
from cluster.frontend import status_of
from cluster.router import AdmissionPolicy, EngineError, Overloaded, ReplicaUnavailable, RequestTimeout, _runs
from cluster.validation import (ChatTemplate, InvalidRequest, Limits, Malformed, RequestValidator,
                                Unsupported, parse_message)

LIMITS = Limits(vocab_size=49152, max_model_len=512, max_tokens_per_request=400, max_batch_size=8,
                max_waiting_requests=16, max_stop_strings=4, max_stop_string_length=16)


@pytest.fixture(scope="module")
def validator(smollm2_dir) -> RequestValidator:
    return RequestValidator.for_checkpoint(smollm2_dir, LIMITS)


def req(prompt="Hello", **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(**sampling))


def chat(*turns) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role=r, content=c) for r, c in turns]))


def ids(*token_ids) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=token_ids))


BAD = [  # (request, field, a piece of the message stating the limit)
    (req(""), "prompt", "must not be empty"),
    (pb.GenerateRequest(), "input", "give prompt, chat or prompt_token_ids"),
    (req("hello " * 600), "prompt", "max_model_len - 1 = 511"),
    (req("x" * 100_000), "prompt", "bytes, more than max_model_len = 512"),
    (ids(), "prompt_token_ids.ids", "must not be empty"),
    (ids(3, 49152), "prompt_token_ids.ids[1]", "below vocab_size 49152, got 49152"),
    (ids(*[7] * 512), "prompt_token_ids", "the limit is max_model_len - 1 = 511"),
    (req(max_tokens=0), "sampling.max_tokens", "[1, 400], got 0"),
    (req(max_tokens=401), "sampling.max_tokens", "[1, 400], got 401"),
    (req(max_tokens=8, min_tokens=9), "sampling.min_tokens", "[0, 8] (at most max_tokens)"),
    (req(temperature=math.nan), "sampling.temperature", "[0, 2], got nan"),
    (req(temperature=-1.0), "sampling.temperature", "[0, 2], got -1.0"),
    (req(temperature=3.0), "sampling.temperature", "[0, 2], got 3.0"),
    (req(top_p=0.0), "sampling.top_p", "(0, 1], got 0.0"),
    (req(top_p=1.25), "sampling.top_p", "(0, 1], got 1.25"),
    (req(top_p=math.nan), "sampling.top_p", "(0, 1], got nan"),
    (req(top_k=49153), "sampling.top_k", "[0, vocab_size 49152]"),
    (req(min_p=2.0), "sampling.min_p", "[0, 1], got 2.0"),
    (req(repetition_penalty=-1.0), "sampling.repetition_penalty", "[0.01, 2]"),
    (req(repetition_penalty=1e-38), "sampling.repetition_penalty", "[0.01, 2], got 9.99"),
    (req(repetition_penalty=math.inf), "sampling.repetition_penalty", "got inf"),
    (req(presence_penalty=2.5), "sampling.presence_penalty", "[-2, 2], got 2.5"),
    (req(frequency_penalty=-math.inf), "sampling.frequency_penalty", "[-2, 2], got -inf"),
    (req(stop=["a", "b", "c", "d", "e"]), "sampling.stop", "has 5 strings; at most max_stop_strings = 4"),
    (req(stop=["x" * 17]), "sampling.stop[0]", "1 to max_stop_string_length = 16 characters, got 17"),
    (req(stop=["ok", ""]), "sampling.stop[1]", "got 0"),
    (req(stop_token_ids=[2, 49152]), "sampling.stop_token_ids[1]", "below vocab_size 49152"),
    (req(stop_token_ids=[2] * 65), "sampling.stop_token_ids", "at most max_stop_token_ids = 64"),
    (req(logprobs=21), "sampling.logprobs", "[0, 20] (max_logprobs), got 21"),
    (chat(("user", "hi"), ("wizard", "boo")), "chat.messages[1].role", "one of system, user, assistant, tool, got 'wizard'"),
    (chat(("", "hi")), "chat.messages[0].role", "got ''"),
    (pb.GenerateRequest(chat=pb.ChatInput()), "chat.messages", "must not be empty"),
    (chat(("user", "word " * 600)), "chat", "max_model_len - 1 = 511"),
    (chat(*[("user", "hi")] * 257), "chat.messages", "has 257 messages; at most max_chat_messages = 256"),
    (chat(("user", "x" * 60_000), ("user", "y" * 60_000)), "chat.messages", "bytes of content, more than"),
    (pb.GenerateRequest(request_id="r" * 129, prompt="Hi"), "request_id", "at most 128 characters, got 129"),
]


@pytest.mark.parametrize("request_, field, limit", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_field_is_named_with_its_limit(validator, request_, field, limit):
    with pytest.raises(InvalidRequest) as err:
        validator.generate(request_)
    assert err.value.field == field
    assert str(err.value).startswith(field + " ") and limit in str(err.value)
    assert status_of(err.value) == (grpc.StatusCode.INVALID_ARGUMENT, str(err.value))


def test_defaults_of_an_empty_sampling_message(validator):
    job = validator.generate(pb.GenerateRequest(prompt="Hello world"))
    p = job.params
    assert job.prompt_token_ids == validator.tokenizer.encode("Hello world").ids
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (256, 1.0, 1.0, 0, 1.0)
    assert p.seed is None and p.skip_special_tokens is True and p.stop == () and p.logprobs == 0
    assert job.request_id.startswith("req-") and len(job.request_id) == 20


def test_explicit_values_reach_sampling_params(validator):
    job = validator.generate(req("Hi", max_tokens=400, temperature=0.0, top_p=0.5, top_k=40, seed=2**64 - 1,
                                 stop=["\n\n"], stop_token_ids=[2], skip_special_tokens=False, logprobs=20,
                                 min_tokens=3, ignore_eos=True))
    p = job.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (400, 0.0, 0.5, 40, 2**64 - 1)
    assert (p.stop, p.stop_token_ids, p.skip_special_tokens, p.logprobs) == (("\n\n",), (2,), False, 20)
    assert (p.min_tokens, p.ignore_eos) == (3, True)


def test_prompt_plus_max_tokens_beyond_the_context_is_clamped_not_rejected(validator):
    """The engine stops with LENGTH when the context is full (documented in the proto)."""
    job = validator.generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5] * 511),
                                                sampling=pb.SamplingParams(max_tokens=400)))
    assert len(job.prompt_token_ids) == 511 and job.params.max_tokens == 400


def test_default_max_tokens_follows_a_small_request_limit(smollm2_dir):
    small = RequestValidator.for_checkpoint(smollm2_dir, Limits(**{**LIMITS.__dict__, "max_tokens_per_request": 32}))
    assert small.generate(pb.GenerateRequest(prompt="Hi")).params.max_tokens == 32


def test_chat_is_rendered_with_the_model_template_without_extra_special_tokens(validator):
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Capital of France?")]
    job = validator.generate(chat(*turns))
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert job.prompt_token_ids == validator.tokenizer.encode(expected, add_special_tokens=False).ids
    tok = validator.tokenize(pb.TokenizeRequest(chat=pb.ChatInput(messages=chat(*turns).chat.messages)))
    assert tok.rendered_prompt == expected and tok.token_ids == job.prompt_token_ids
    assert tok.tokens[0] == "<|im_start|>"


def test_chat_template_matches_transformers(smollm2_dir, validator):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                {"role": "user", "content": "2+2?"}]
    ours = validator.chat_template.render(messages)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_template_errors_are_invalid_argument():
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be "
                            "from the user') }}{% endif %}{{ messages[0].content }}", {})
    assert template.render([{"role": "user", "content": "x"}]) == "x"
    with pytest.raises(InvalidRequest) as err:
        template.render([{"role": "system", "content": "x"}])
    assert err.value.field == "chat" and "first turn must be from the user" in str(err.value)


def test_sandbox_blocks_attribute_escapes():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(InvalidRequest):
        template.render([])


def test_chat_without_a_template_is_unsupported(smollm2_dir):
    v = RequestValidator(RequestValidator.for_checkpoint(smollm2_dir, LIMITS).tokenizer, None, LIMITS)
    with pytest.raises(Unsupported) as err:
        v.generate(chat(("user", "hi")))
    assert status_of(err.value)[0] is grpc.StatusCode.UNIMPLEMENTED


def test_tokenize_and_detokenize(validator):
    tok = validator.tokenize(pb.TokenizeRequest(text="Hello world"))
    assert tok.token_ids == [19556, 905] and tok.tokens == ["Hello", "Ġworld"] and tok.rendered_prompt == ""
    with pytest.raises(InvalidRequest, match="^input must be set"):
        validator.tokenize(pb.TokenizeRequest())
    assert validator.detokenize(pb.DetokenizeRequest(token_ids=[1, 19556, 905])) == "Hello world"
    assert validator.detokenize(pb.DetokenizeRequest(token_ids=[1, 19556], skip_special_tokens=False)) == "<|im_start|>Hello"
    with pytest.raises(InvalidRequest, match=r"^token_ids\[0\] must be below vocab_size 49152"):
        validator.detokenize(pb.DetokenizeRequest(token_ids=[50000]))
    assert validator.token_text(905) == " world"


# --- bytes that do not parse ------------------------------------------------------------------


def _field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize("raw, path", [
    (_field(2, b"\xff\xfe"), "prompt"),
    (_field(1, b"ok\xc3") + _field(2, b"hi"), "request_id"),
    (_field(3, _field(1, _field(1, b"user") + _field(2, b"\xed\xa0\x80"))), "chat.messages.content"),
    (_field(2, b"hi") + _field(5, _field(10, b"\x80stop")), "sampling.stop"),
])
def test_invalid_utf8_names_the_field(validator, raw, path):
    parsed = parse_message(pb.GenerateRequest)(raw)
    assert parsed == Malformed(path, "is not valid UTF-8 (text fields must be UTF-8)")
    with pytest.raises(InvalidRequest) as err:
        validator.generate(parsed)
    assert err.value.field == path


def test_truncated_bytes_are_invalid_argument_too(validator):
    parsed = parse_message(pb.GenerateRequest)(b"\x12\x10abc")
    assert isinstance(parsed, Malformed) and parsed.field == "request"
    with pytest.raises(InvalidRequest, match="^request is not a valid tpserve.v1.GenerateRequest"):
        validator.generate(parsed)
    assert parse_message(pb.GenerateRequest)(_field(2, "héllo".encode())).prompt == "héllo"


# --- the other pieces of the front end -----------------------------------------------------------


def test_status_codes_are_mapped_in_one_place():
    assert status_of(Overloaded("x"))[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(ReplicaUnavailable("x"))[0] is grpc.StatusCode.UNAVAILABLE
    assert status_of(RequestTimeout("x"))[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(EngineError("x"))[0] is grpc.StatusCode.INTERNAL
    assert status_of(KeyError("k")) == (grpc.StatusCode.INTERNAL, "internal error: KeyError: 'k'")


def test_admission_limit():
    assert AdmissionPolicy(8, 16).limit(2) == 32
    assert AdmissionPolicy(8, 16).limit(1) == 24  # a failed replica's batch slots are gone
    assert AdmissionPolicy(8, 16, max_concurrent_requests=10).limit(2) == 10
    assert "max_batch_size 8 × 2 healthy replicas + max_queued_requests 16" in AdmissionPolicy(8, 16).explain(2)


def test_sender_batches_keep_submit_abort_order():
    ops = [("submit", 1), ("submit", 2), ("abort", 1), ("submit", 3), ("abort", 2), ("abort", 3)]
    assert list(_runs(ops)) == [("submit", [1, 2]), ("abort", [1]), ("submit", [3]), ("abort", [2, 3])]


def test_client_request_building():
    r = build_request(messages=[{"role": "user", "content": "hi"}, ("assistant", "yo")], max_tokens=4,
                      temperature=None, stop="END")
    assert [m.role for m in r.chat.messages] == ["user", "assistant"]
    assert r.sampling.max_tokens == 4 and not r.sampling.HasField("temperature") and list(r.sampling.stop) == ["END"]
    assert list(build_request(token_ids=[1, 2]).prompt_token_ids.ids) == [1, 2]
    with pytest.raises(ValueError, match="exactly one"):
        build_request("a", token_ids=[1])
    with pytest.raises(TypeError, match="unknown sampling parameters"):
        build_request("a", temprature=0.5)
    assert finish_name(pb.FINISH_REASON_EOS) == "eos" and finish_name(0) is None and finish_name(99) is None


# --- cost: linear in the size of the input, cheap checks first -----------------------------------


@pytest.mark.parametrize("size", [400_000, 4 << 20])
def test_a_malformed_body_is_rejected_in_linear_time(validator, size):
    """b"\xff" * N used to cost O(N²) (a varint without a length cap built an ever larger int):
    400 KB took 4.8 s on the event loop. 4 MiB, the message limit, is now milliseconds."""
    import time

    t0 = time.perf_counter()
    parsed = parse_message(pb.ModelInfoRequest)(b"\xff" * size)
    elapsed = time.perf_counter() - t0
    assert isinstance(parsed, Malformed) and parsed.field == "request"
    assert elapsed < 0.2, f"{size} bytes took {elapsed:.2f} s"
    with pytest.raises(InvalidRequest):
        validator.check_parsed(parsed)


def test_counts_and_sizes_are_checked_before_rendering_or_tokenizing(validator, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("expensive work done for a request its size already rules out")

    monkeypatch.setattr(validator.chat_template, "render", boom)
    monkeypatch.setattr(validator.tokenizer, "encode", boom)
    for bad in (chat(*[("user", "hi")] * 10_000), chat(("user", "z" * 1_000_000)), req("x" * 1_000_000),
                ids(*range(1_000_000))):
        with pytest.raises(InvalidRequest):
            validator.generate(bad)
    with pytest.raises(InvalidRequest, match=r"^token_ids has 100000 ids; at most max_detokenize_ids = 512"):
        validator.detokenize(pb.DetokenizeRequest(token_ids=[1] * 100_000))


def test_heavy_requests_are_the_ones_to_check_off_the_event_loop():
    heavy = RequestValidator.heavy
    assert heavy(chat(("user", "hi")))
    assert heavy(req("x" * 5000)) and not heavy(req("Hello"))
    assert heavy(ids(*[1] * 5000)) and not heavy(ids(1, 2, 3))
    assert heavy(pb.TokenizeRequest(text="y" * 5000)) and not heavy(pb.TokenizeRequest(text="y"))
    assert heavy(pb.DetokenizeRequest(token_ids=[1] * 5000)) and not heavy(pb.DetokenizeRequest(token_ids=[1]))
    assert not heavy(pb.ModelInfoRequest()) and not heavy(Malformed("request", "bad"))
