"""Python clients of a tpserve server: `Client` (blocking) and `AsyncClient` (asyncio).

    from cluster.client import Client

    with Client("127.0.0.1:50051") as client:
        print(client.generate("The capital of France is", max_tokens=16, temperature=0).text)
        for delta in client.stream(messages=[{"role": "user", "content": "Hi!"}]):
            print(delta.text, end="", flush=True)
        client.health()                    # "SERVING"

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.generate("Hello", max_tokens=8)
        async for delta in client.stream("Hello"):
            ...

The input is exactly one of a prompt (text), ``messages`` (a chat: dicts with role and content,
rendered by the server with the model's chat template) or ``token_ids``. Sampling keywords are
the fields of tpserve.v1.SamplingParams (max_tokens, temperature, top_p, top_k, min_p, seed, stop,
stop_token_ids, ignore_eos, logprobs, ...); None leaves a field at the server's default. Every
failed call raises `TPServeError` with `.code` (a grpc.StatusCode) and `.message`.

A server with TLS and bearer tokens (see README, "Security"):

    tls = TLSOptions(ca_file="ca.pem")                      # + cert_file, key_file for mutual TLS
    with Client("server:50051", tls=tls, token=read_token_file("token")) as client: ...
    channel = open_channel("server:50051", tls=tls, token=token)        # for stubs of your own
    channel = open_channel("server:50051", tls=tls, token=token, aio=True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api import tpserve_pb2 as pb
from cluster.api import tpserve_pb2_grpc as pb_grpc
from cluster.auth import TOKEN_RULE, is_valid_token, parse_tokens

SAMPLING_FIELDS = tuple(pb.SamplingParams.DESCRIPTOR.fields_by_name)


class TPServeError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> "TPServeError":
        return cls(err.code(), err.details() or "")


@dataclass
class Delta:
    """Text and tokens produced since the previous delta; the last one has finish_reason."""

    text: str
    token_ids: list[int]
    logprobs: list = field(default_factory=list)  # tpserve.v1.TokenLogprob messages
    finish_reason: str | None = None  # "length" | "stop" | "eos" | "cancelled" on the last delta
    stop: str | int | None = None  # the stop string or stop token id that matched
    prompt_tokens: int | None = None  # on the last delta
    completion_tokens: int | None = None


@dataclass
class Completion:
    request_id: str
    replica_id: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop: str | int | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["logprobs"] = [_logprob_dict(lp) for lp in self.logprobs]
        d["usage"] = {"prompt_tokens": d.pop("prompt_tokens"),
                      "completion_tokens": d.pop("completion_tokens")}
        return d


@dataclass(frozen=True)
class TLSOptions:
    """TLS for a client; the files are PEM. `ca_file` verifies the server (None: the system's
    roots); `cert_file` and `key_file` are this client's certificate for mutual TLS;
    `server_name`, the name the server's certificate must carry when it is not the address's
    host (tests; a server reached by IP)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both a certificate file and a key file")
        return grpc.ssl_channel_credentials(root_certificates=_read_file(self.ca_file, "TLS CA"),
                                            private_key=_read_file(self.key_file, "TLS key"),
                                            certificate_chain=_read_file(self.cert_file, "TLS certificate"))


def open_channel(address: str, *, tls: TLSOptions | None = None, token: str | None = None,
                 aio: bool = False,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel | grpc.aio.Channel:
    """A grpc.Channel (a grpc.aio.Channel with `aio`) to a tpserve server: plaintext, or TLS
    with `tls`; with `token`, every call carries ``authorization: Bearer <token>``.

    gRPC sends a token only over TLS or a local connection: without `tls` it goes over loopback
    only (a channel to another host fails with UNAVAILABLE rather than send it in clear text)."""
    options = list(options)
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    kind = grpc.aio if aio else grpc
    if tls is None and token is None:
        return kind.insecure_channel(address, options=options)
    if tls is not None:
        credentials = tls.credentials()
    else:
        credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials,
                                                         grpc.access_token_call_credentials(token))
    return kind.secure_channel(address, credentials, options=options)


def read_token_file(path: str) -> str:
    """The one token in a file (blank lines and # comments ignored, as in a server's file)."""
    tokens = parse_tokens(_read_file(path, "token").decode("utf-8", "replace"))
    if len(tokens) != 1:
        raise ValueError(f"the token file {path} must hold exactly one token, found {len(tokens)}")
    (line, token), = tokens
    if not is_valid_token(token):  # the message names the line, never shows the token
        raise ValueError(f"the token file {path}, line {line}: a token must be {TOKEN_RULE}")
    return token


def _read_file(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"cannot read the {what} file {path}: {err.strerror or err}") from None


def build_request(prompt: str | None = None, *, messages=None, token_ids=None, request_id: str = "",
                  **sampling: Any) -> pb.GenerateRequest:
    """A GenerateRequest from Python values (see the module docstring)."""
    given = [name for name, v in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages, token_ids (got {given or 'none'})")
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling parameters {unknown}; known: {', '.join(SAMPLING_FIELDS)}")
    params = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    request = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**params))
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.chat.messages.extend(_chat_message(m) for m in messages)
    else:
        request.prompt_token_ids.ids.extend(token_ids)
    return request


def tokenize_request(text: str | None = None, messages=None) -> pb.TokenizeRequest:
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text, messages")
    if text is not None:
        return pb.TokenizeRequest(text=text)
    return pb.TokenizeRequest(chat=pb.ChatInput(messages=[_chat_message(m) for m in messages]))


def detokenize_request(token_ids, skip_special_tokens: bool | None = None) -> pb.DetokenizeRequest:
    request = pb.DetokenizeRequest(token_ids=token_ids)
    if skip_special_tokens is not None:
        request.skip_special_tokens = skip_special_tokens
    return request


def _chat_message(m) -> pb.ChatMessage:
    if isinstance(m, dict):
        return pb.ChatMessage(role=m["role"], content=m.get("content", ""))
    role, content = m
    return pb.ChatMessage(role=role, content=content)


def finish_name(reason: int) -> str | None:
    """FINISH_REASON_LENGTH -> "length"; UNSPECIFIED (and values this client does not know) -> None."""
    if reason == pb.FINISH_REASON_UNSPECIFIED or reason not in pb.FinishReason.values():
        return None
    return pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def _stop(msg) -> str | int | None:
    kind = msg.WhichOneof("matched_stop")
    return None if kind is None else getattr(msg, kind)


def to_delta(msg: pb.GenerateResponse) -> Delta:
    finished = msg.HasField("usage")
    return Delta(msg.text, list(msg.token_ids), list(msg.logprobs), finish_name(msg.finish_reason),
                 _stop(msg), msg.usage.prompt_tokens if finished else None,
                 msg.usage.completion_tokens if finished else None)


def to_completion(msg: pb.GenerateResult) -> Completion:
    return Completion(msg.request_id, msg.replica_id, msg.text, list(msg.token_ids),
                      finish_name(msg.finish_reason) or "unspecified", _stop(msg),
                      msg.usage.prompt_tokens, msg.usage.completion_tokens, list(msg.logprobs))


def _logprob_dict(lp) -> dict:
    return {"token_id": lp.token_id, "text": lp.text, "logprob": lp.logprob,
            "top_logprobs": [{"token_id": t.token_id, "text": t.text, "logprob": t.logprob}
                             for t in lp.top_logprobs]}


def _is_content(msg: pb.GenerateResponse) -> bool:
    return bool(msg.text or msg.token_ids or msg.finish_reason)


def _health_name(response) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# --- blocking ------------------------------------------------------------------------------------


class Stream:
    """Iterator of `Delta`s of one Generate call; `request_id` and `replica_id` are known after
    the first delta (or `start()`). `cancel()` aborts the request on the server."""

    def __init__(self, call):
        self._call = call
        self.request_id: str | None = None
        self.replica_id: int | None = None
        self.prompt_tokens: int | None = None

    def start(self) -> "Stream":
        """Wait for the server to admit the request (its first message)."""
        if self.request_id is None:
            self._take_start(self._next_message())
        return self

    def __iter__(self):
        return self

    def __next__(self) -> Delta:
        while True:
            msg = self._next_message()
            self._take_start(msg)
            if _is_content(msg):
                return to_delta(msg)

    def cancel(self) -> None:
        self._call.cancel()

    def _next_message(self) -> pb.GenerateResponse:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise TPServeError.from_rpc(err) from None

    def _take_start(self, msg) -> None:
        if msg.HasField("start"):
            s = msg.start
            self.request_id, self.replica_id, self.prompt_tokens = s.request_id, s.replica_id, s.prompt_tokens


class Client:
    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 tls: TLSOptions | None = None, token: str | None = None):
        self.address = address
        self.timeout = timeout  # default deadline of every call, in seconds; None = none
        self._channel = open_channel(address, tls=tls, token=token)
        self._stub = pb_grpc.TPServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Completion:
        request = build_request(prompt, **kwargs)
        return to_completion(self._call(self._stub.GenerateUnary, request, timeout))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Stream:
        request = build_request(prompt, **kwargs)
        return Stream(self._stub.Generate(request, timeout=timeout or self.timeout))

    def tokenize(self, text: str | None = None, *, messages=None, timeout=None) -> pb.TokenizeResponse:
        return self._call(self._stub.Tokenize, tokenize_request(text, messages), timeout)

    def detokenize(self, token_ids, *, skip_special_tokens: bool | None = None, timeout=None) -> str:
        request = detokenize_request(token_ids, skip_special_tokens)
        return self._call(self._stub.Detokenize, request, timeout).text

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfoResponse:
        return self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """"SERVING" or "NOT_SERVING" (grpc.health.v1 status name)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return _health_name(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise TPServeError.from_rpc(err) from None


# --- asyncio ------------------------------------------------------------------------------------


class AsyncStream:
    """Async iterator of `Delta`s of one Generate call (see `Stream`)."""

    def __init__(self, call):
        self._call = call
        self._messages = call.__aiter__()
        self.request_id: str | None = None
        self.replica_id: int | None = None
        self.prompt_tokens: int | None = None

    async def start(self) -> "AsyncStream":
        if self.request_id is None:
            self._take_start(await self._next_message())
        return self

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        while True:
            msg = await self._next_message()
            self._take_start(msg)
            if _is_content(msg):
                return to_delta(msg)

    def cancel(self) -> None:
        self._call.cancel()

    async def _next_message(self) -> pb.GenerateResponse:
        try:
            return await self._messages.__anext__()
        except grpc.RpcError as err:
            raise TPServeError.from_rpc(err) from None

    _take_start = Stream._take_start


class AsyncClient:
    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = None,
                 tls: TLSOptions | None = None, token: str | None = None):
        self.address = address
        self.timeout = timeout
        self._channel = open_channel(address, tls=tls, token=token, aio=True)
        self._stub = pb_grpc.TPServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Completion:
        request = build_request(prompt, **kwargs)
        return to_completion(await self._call(self._stub.GenerateUnary, request, timeout))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> AsyncStream:
        request = build_request(prompt, **kwargs)
        return AsyncStream(self._stub.Generate(request, timeout=timeout or self.timeout))

    async def tokenize(self, text: str | None = None, *, messages=None, timeout=None) -> pb.TokenizeResponse:
        return await self._call(self._stub.Tokenize, tokenize_request(text, messages), timeout)

    async def detokenize(self, token_ids, *, skip_special_tokens: bool | None = None, timeout=None) -> str:
        request = detokenize_request(token_ids, skip_special_tokens)
        return (await self._call(self._stub.Detokenize, request, timeout)).text

    async def model_info(self, *, timeout: float | None = None) -> pb.ModelInfoResponse:
        return await self._call(self._stub.ModelInfo, pb.ModelInfoRequest(), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                                    timeout)
        return _health_name(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise TPServeError.from_rpc(err) from None
