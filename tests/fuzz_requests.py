"""Requests for fuzzing every RPC of tpserve.v1.TPServe, shared by tests/test_request_of_death.py
(a CI-sized sample) and bench/fuzz_server.py (tens of thousands against a live server).

* `requests()`: hypothesis strategies over every field of every request message, extremes
  included: NaN and infinities, float32 edges, the largest uint32/uint64, empty and huge strings,
  odd Unicode, too many and too long repeated fields, every `input` oneof and none;
* `mutate(data, rng)`: byte-level damage to a valid serialized request (flips, truncation,
  splices, runs of 0xff, invalid UTF-8, two requests back to back so that several members of a
  oneof arrive);
* `call_raw(channel, rpc, data, timeout_s)`: sends raw bytes to an RPC and returns the status.

Every answer must be OK or one of `DOCUMENTED` (the statuses the proto promises); anything else
(INTERNAL, UNKNOWN, UNAVAILABLE from a failed replica) is a bug.
"""

from __future__ import annotations

import random

import grpc
from hypothesis import strategies as st

from cluster.api import tpserve_pb2 as pb

SERVICE = "/tpserve.v1.TPServe/"
RPCS = {  # name -> (request class, server-streaming?)
    "Generate": (pb.GenerateRequest, True),
    "GenerateUnary": (pb.GenerateRequest, False),
    "Tokenize": (pb.TokenizeRequest, False),
    "Detokenize": (pb.DetokenizeRequest, False),
    "ModelInfo": (pb.ModelInfoRequest, False),
}
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED}

UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
EDGE_FLOATS = [0.0, -0.0, 1e-45, 1e-38, 1e-5, 0.01, 0.5, 1.0, 2.0, 2.0000002, 3.4e38, -3.4e38]
ODD_TEXT = ["", " ", "\x00", "\n" * 50, "é", "\u202e", "\ud7ff", "\U0001f600" * 10, "<|im_end|>", "{{ 7*7 }}",
            "{% for x in range(10**9) %}{% endfor %}"]


def _floats():
    return st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from(EDGE_FLOATS)


def _uint32(small: int = 64):
    return st.integers(0, small) | st.sampled_from([0, 1, 2**16, 2**31, UINT32_MAX]) | st.integers(0, UINT32_MAX)


def _text(max_size: int = 64):
    return st.text(max_size=max_size) | st.sampled_from(ODD_TEXT) | st.text(min_size=2000, max_size=6000)


def _optional(strategy):
    return st.none() | strategy


@st.composite
def _message(draw, cls, fields: dict):
    """cls(**fields) with each field drawn from its strategy, None meaning unset."""
    values = {name: draw(strategy) for name, strategy in fields.items()}
    return cls(**{k: v for k, v in values.items() if v is not None})


def sampling_params():
    return _message(pb.SamplingParams, dict(
        max_tokens=_optional(_uint32(20)), temperature=_optional(_floats()), top_k=_optional(_uint32()),
        top_p=_optional(_floats()), min_p=_optional(_floats()), repetition_penalty=_optional(_floats()),
        presence_penalty=_optional(_floats()), frequency_penalty=_optional(_floats()),
        seed=_optional(st.integers(0, UINT64_MAX)),
        stop=_optional(st.lists(_text(24), max_size=12)),
        stop_token_ids=_optional(st.lists(_uint32(50_000), max_size=70)),
        ignore_eos=_optional(st.booleans()), logprobs=_optional(_uint32(25)),
        include_stop_str_in_output=_optional(st.booleans()), skip_special_tokens=_optional(st.booleans()),
        min_tokens=_optional(_uint32(20)),
    ))


def sampling_in_range():
    """Values inside the documented ranges, edges included: what reaches the engine and tests
    its numbers (tiny temperatures, the strongest penalties, one-token nuclei, ...)."""
    def unit(lo, hi):  # the message stores float32: 0.01 arrives as float32(0.01)
        return st.floats(lo, hi) | st.sampled_from([lo, hi])

    return _message(pb.SamplingParams, dict(
        max_tokens=_optional(st.integers(1, 16)), temperature=_optional(unit(0.0, 2.0) | st.just(1.5e-5)),
        top_k=_optional(st.integers(0, 49_152)), top_p=_optional(st.floats(1e-6, 1.0)),
        min_p=_optional(unit(0.0, 1.0)), repetition_penalty=_optional(unit(0.01, 2.0)),
        presence_penalty=_optional(unit(-2.0, 2.0)), frequency_penalty=_optional(unit(-2.0, 2.0)),
        seed=_optional(st.integers(0, UINT64_MAX)), stop=_optional(st.lists(st.text(min_size=1, max_size=8), max_size=3)),
        stop_token_ids=_optional(st.lists(st.integers(0, 49_151), max_size=4)), ignore_eos=_optional(st.booleans()),
        logprobs=_optional(st.integers(0, 20)), include_stop_str_in_output=_optional(st.booleans()),
        skip_special_tokens=_optional(st.booleans()), min_tokens=st.just(0),
    ))


def _chat():
    role = st.sampled_from(["system", "user", "assistant", "tool", "wizard", ""])
    message = _message(pb.ChatMessage, dict(role=role, content=_optional(_text(200))))
    return st.builds(pb.ChatInput, messages=st.lists(message, max_size=8) | st.lists(message, min_size=257,
                                                                                         max_size=300))


def _token_ids():
    return st.builds(pb.TokenIds, ids=st.lists(_uint32(49_151), max_size=200) | st.lists(_uint32(100), min_size=600,
                                                                                       max_size=700))


@st.composite
def generate_requests(draw):
    kind = draw(st.sampled_from(["prompt", "chat", "prompt_token_ids", None]))
    sampling = draw(_optional(sampling_params() | sampling_in_range() | sampling_in_range()))
    fields = {"request_id": draw(_optional(_text(140))), "sampling": sampling}
    if kind == "prompt":
        fields["prompt"] = draw(_text(300) | st.text(min_size=1, max_size=200))
    elif kind == "chat":
        fields["chat"] = draw(_chat())
    elif kind == "prompt_token_ids":
        fields["prompt_token_ids"] = draw(_token_ids())
    return pb.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})


@st.composite
def tokenize_requests(draw):
    kind = draw(st.sampled_from(["text", "chat", None]))
    if kind is None:
        return pb.TokenizeRequest()
    return pb.TokenizeRequest(**{kind: draw(_text(300) if kind == "text" else _chat())})


def detokenize_requests():
    return _message(pb.DetokenizeRequest, dict(
        token_ids=st.lists(_uint32(49_151), max_size=300) | st.lists(_uint32(10), min_size=3000, max_size=3200),
        skip_special_tokens=_optional(st.booleans())))


def requests():
    """(rpc name, request message) over every RPC."""
    return st.one_of(
        st.tuples(st.sampled_from(["Generate", "GenerateUnary"]), generate_requests()),
        st.tuples(st.just("Tokenize"), tokenize_requests()),
        st.tuples(st.just("Detokenize"), detokenize_requests()),
        st.tuples(st.just("ModelInfo"), st.just(pb.ModelInfoRequest())),
    )


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three kinds of damage to a serialized request."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if kind == 0 and data:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:  # truncate
            del data[rng.randrange(len(data)):]
        elif kind == 2:  # a run of continuation bytes: an endless varint
            at = rng.randrange(len(data) + 1)
            data[at:at] = b"\xff" * rng.choice([11, 100, 10_000])
        elif kind == 3:  # invalid UTF-8 inside a string field
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.choice([b"\x12\x02\xff\xfe", b"\x0a\x03\xed\xa0\x80", b"\x1a\x04\x12\x02\xc3\x28"])
        elif kind == 4:  # random bytes spliced in
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 32))
        elif kind == 5:  # the request twice: both oneof members may arrive, the last wins
            data.extend(bytes(data))
        else:  # an absurd length prefix
            at = rng.randrange(len(data) + 1)
            data[at:at] = b"\x12\xff\xff\xff\xff\x0f"
    return bytes(data)


def call_raw(channel: grpc.Channel, rpc: str, data: bytes, timeout_s: float) -> tuple[grpc.StatusCode, str]:
    """(status, details) of one call with raw request bytes; a stream is read to its end."""
    _, streaming = RPCS[rpc]
    try:
        if streaming:
            for _ in channel.unary_stream(SERVICE + rpc)(data, timeout=timeout_s):
                pass
        else:
            channel.unary_unary(SERVICE + rpc)(data, timeout=timeout_s)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""
