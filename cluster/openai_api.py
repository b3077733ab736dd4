"""OpenAI-compatible HTTP API, served next to the gRPC one from the same router, validation,
admission, tokens and metrics.

    app = build_app(servicer, router, model_name, security, metrics)   # a FastAPI application
    # cluster/server.py runs it with uvicorn on the server's event loop (the `http:` section)

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed
as server-sent events ending in ``data: [DONE]`` when ``stream`` is true), ``GET /health`` (200
only while every replica serves), ``GET /metrics`` (Prometheus text) and FastAPI's own
``/openapi.json`` and ``/docs``.

Each request is turned into the `tpserve.v1` GenerateRequest it means and checked by the same
`RequestValidator` as a gRPC call, so limits and messages are the same; field names in errors are
OpenAI's (``temperature``, not ``sampling.temperature``). Errors have OpenAI's JSON shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field (naming it), 401 for a
missing or wrong bearer token, 404 for a model this server does not serve, 429 when admission is
full, 503 with no healthy replica, 504 past ``server.request_timeout_s``, 500 when the engine
failed the request.

Beyond OpenAI's fields, ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens`` and
``ignore_eos`` are taken as vLLM takes them (the openai client's ``extra_body``).

``n`` > 1 runs n requests; with a ``seed``, choice i uses seed + i, so every choice is
reproducible and they differ from each other. ``logprobs`` (completions: an int, the number of
alternatives; chat: a bool plus ``top_logprobs``) reports the sampled token's log-probability
and the alternatives. Finish reasons: ``length``, ``stop`` (a stop string, a stop token or EOS)
and ``abort`` (the server shut down while the request ran).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.api import tpserve_pb2 as pb
from cluster.frontend import FINISH_WORD
from cluster.router import EngineError, Overloaded, ReplicaUnavailable, RequestHandle, RequestTimeout
from cluster.validation import InvalidRequest, Unsupported
from worker.engine import RequestOutput

MAX_N = 16  # choices per request

# our field names (validation messages) -> OpenAI's
FIELDS = {"sampling.max_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p",
          "sampling.top_k": "top_k", "sampling.min_p": "min_p", "sampling.min_tokens": "min_tokens",
          "sampling.repetition_penalty": "repetition_penalty",
          "sampling.presence_penalty": "presence_penalty", "sampling.frequency_penalty": "frequency_penalty",
          "sampling.seed": "seed", "sampling.stop": "stop", "sampling.logprobs": "logprobs",
          "prompt": "prompt", "chat": "messages", "prompt_token_ids": "prompt"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.kind, self.param, self.code))


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _openai_field(field: str) -> str:
    if field in FIELDS:
        return FIELDS[field]
    for ours, theirs in FIELDS.items():
        if field.startswith(ours + "["):  # sampling.stop[1] -> stop[1]
            return theirs + field[len(ours):]
    return field.removeprefix("sampling.")


def as_openai_error(err: Exception) -> OpenAIError:
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, InvalidRequest):
        field = _openai_field(err.field)
        problem = str(err).removeprefix(err.field).lstrip()
        return OpenAIError(400, f"{field} {problem}", "invalid_request_error", field)
    if isinstance(err, Unsupported):
        return OpenAIError(400, str(err), "invalid_request_error")
    if isinstance(err, Overloaded):
        return OpenAIError(429, str(err), "rate_limit_error", code="rate_limit_exceeded")
    if isinstance(err, ReplicaUnavailable):
        return OpenAIError(503, str(err), "service_unavailable")
    if isinstance(err, RequestTimeout):
        return OpenAIError(504, str(err), "timeout")
    if isinstance(err, EngineError):
        return OpenAIError(500, str(err), "server_error")
    return OpenAIError(500, f"internal error: {type(err).__name__}: {err}", "server_error")


# --- request bodies --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of OpenAI's we do not use are accepted

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # beyond OpenAI's fields, as vLLM accepts them (the openai client's `extra_body`)
    top_k: int = Field(0, ge=0)
    min_p: float = 0.0
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# --- the application -------------------------------------------------------------------------

_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"],
                             "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                            "param": {"type": ["string", "null"]},
                                            "code": {"type": ["string", "null"]}}}}}}}}
# What the OpenAPI document says each endpoint may answer (FastAPI's 422 is never sent: a body
# that does not parse gets 400, OpenAI's status for it).
GENERATE_RESPONSES = {
    200: {"description": "the result; with stream=true, server-sent events",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **{code: {"description": what, **_ERROR} for code, what in (
        (400, "a bad field (param names it)"), (401, "a missing or wrong bearer token"),
        (404, "a model this server does not serve"), (429, "admission is full"),
        (500, "the engine failed the request"), (503, "no healthy replica"),
        (504, "server.request_timeout_s passed"))},
}


def build_app(servicer, router, model_name: str, token_check=None, open_health: bool = True,
              metrics=None) -> FastAPI:
    """`servicer`: the gRPC servicer whose validation and checks we share; `token_check(token)`:
    True for a known bearer token, None when the server asks for none."""
    app = FastAPI(title="tpserve OpenAI-compatible API", version="1",
                  description="OpenAI-compatible completions and chat completions served by tpserve.")
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        """FastAPI's own refusals (a body that is not JSON, an unknown path or method) in OpenAI's
        shape too."""
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(status_code=err.status_code, content=error_body(str(err.detail), kind),
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return JSONResponse(status_code=400, content=error_body(
            f"{param or 'body'}: {first.get('msg', 'invalid request body')}", "invalid_request_error", param))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        open_path = request.url.path == "/health" and open_health
        if token_check is not None and not open_path:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token_check(token.strip()):
                return JSONResponse(status_code=401, content=error_body(
                    "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                    "authentication_error", code="invalid_api_key"))
        return await call_next(request)

    auth_only = {401: GENERATE_RESPONSES[401]}

    @app.get("/health", response_class=PlainTextResponse,
             responses={503: {"description": "not every replica serves", "content": {"text/plain": {}}},
                        **auth_only})
    async def health():
        if router.serving:
            return PlainTextResponse("ok")
        return PlainTextResponse("not serving", status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=auth_only)
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(metrics.registry) if metrics is not None else b""
        return PlainTextResponse(body.decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=auth_only)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tpserve"}]}

    @app.post("/v1/completions", responses=GENERATE_RESPONSES)
    async def completions(body: CompletionRequest):
        _check_model(body.model, model_name)
        prompts = _prompts(body.prompt)
        logprobs = body.logprobs
        requests = [(i * body.n + j, _generate_request(body, j, logprobs or 0, prompt=p))
                    for i, p in enumerate(prompts) for j in range(body.n)]
        return await _run(servicer, router, body, requests, "text_completion", "cmpl",
                          lambda outs: _completion_logprobs(outs, servicer.token_text) if logprobs is not None
                          else None, chat=False)

    @app.post("/v1/chat/completions", responses=GENERATE_RESPONSES)
    async def chat(body: ChatRequest):
        _check_model(body.model, model_name)
        if body.max_tokens is None and body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        top = body.top_logprobs or 0
        wanted = max(top, 1) if body.logprobs else 0
        messages = [pb.ChatMessage(role=m.role, content=_content(m.content, i)) for i, m in enumerate(body.messages)]
        requests = [(j, _generate_request(body, j, wanted, chat=messages)) for j in range(body.n)]
        return await _run(servicer, router, body, requests, "chat.completion", "chatcmpl",
                          lambda outs: _chat_logprobs(outs, servicer.token_text, top) if body.logprobs else None,
                          chat=True)

    return app


def _check_model(asked: str, served: str) -> None:
    if asked != served:
        raise OpenAIError(404, f"the model {asked!r} does not exist here; this server serves {served!r}",
                          "invalid_request_error", "model", "model_not_found")


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError(400, "prompt must not be empty", "invalid_request_error", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)  # a batch: strings or lists of token ids


def _content(content, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise OpenAIError(400, f"messages[{index}].content: only text parts are supported, got "
                              f"{part.get('type')!r}", "invalid_request_error", f"messages[{index}].content")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _generate_request(body: _Sampling, choice: int, logprobs: int, *, prompt=None, chat=None) -> pb.GenerateRequest:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = pb.SamplingParams(stop=stop, presence_penalty=body.presence_penalty,
                                 frequency_penalty=body.frequency_penalty, logprobs=logprobs, top_k=body.top_k,
                                 min_p=body.min_p, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos)
    if body.repetition_penalty is not None:
        sampling.repetition_penalty = body.repetition_penalty
    if body.max_tokens is not None:
        sampling.max_tokens = body.max_tokens
    if body.temperature is not None:
        sampling.temperature = body.temperature
    if body.top_p is not None:
        sampling.top_p = body.top_p
    if body.seed is not None:
        sampling.seed = body.seed + choice
    request = pb.GenerateRequest(sampling=sampling)
    if chat is not None:
        request.chat.messages.extend(chat)
    elif isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    return request


async def _submit_all(servicer, router, requests) -> list[tuple[int, RequestHandle]]:
    handles = []
    try:
        for index, request in requests:
            handles.append((index, await servicer.admit(request)))
    except BaseException:
        for _, handle in handles:
            router.release(handle)
        raise
    return handles


async def _run(servicer, router, body, requests, kind: str, prefix: str, logprobs_of, *, chat: bool):
    try:
        handles = await _submit_all(servicer, router, requests)
    except Exception as err:  # noqa: BLE001 - every error becomes its OpenAI status
        raise as_openai_error(err) from None
    rid, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(router, handles, rid, created, body.model, kind, logprobs_of, chat, usage,
                                         body.n), media_type="text/event-stream")
    try:
        results = await asyncio.gather(*(h.all() for _, h in handles))
    except Exception as err:  # noqa: BLE001
        raise as_openai_error(err) from None
    finally:
        for _, handle in handles:
            router.release(handle)
    choices, completion_tokens = [], 0
    for (index, _), outs in zip(handles, results):
        text = "".join(o.text for o in outs)
        choice: dict[str, Any] = {"index": index, "finish_reason": FINISH_WORD.get(outs[-1].finish_reason, "stop"),
                                  "logprobs": logprobs_of(outs)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
        completion_tokens += outs[-1].num_output_tokens
    prompt_tokens = _prompt_tokens(handles, body.n)
    return {"id": rid, "object": kind, "created": created, "model": body.model,
            "choices": sorted(choices, key=lambda c: c["index"]),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _prompt_tokens(handles, n: int) -> int:
    """Each prompt counts once, however many choices (n) it has."""
    return sum(h.num_prompt_tokens for i, h in handles if i % n == 0)


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream(router, handles, rid, created, model, kind, logprobs_of, chat: bool, include_usage: bool,
                  n: int):
    """Server-sent events: the choices' deltas as they come, then usage (when asked), then [DONE].
    An error after the stream began is sent as an error event (the status line went out already)."""
    chunk_kind = f"{kind}.chunk" if chat else kind
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle):
        try:
            while True:
                outs = await handle.next()
                await queue.put((index, outs, None))
                if outs[-1].finished:
                    return
        except Exception as err:  # noqa: BLE001 - reported in the stream
            await queue.put((index, None, err))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in handles]
    completion_tokens = 0
    try:
        if chat:
            yield _sse({"id": rid, "object": chunk_kind, "created": created, "model": model,
                        "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None, "logprobs": None} for i, _ in handles]})
        remaining = len(handles)
        while remaining:
            index, outs, err = await queue.get()
            if err is not None:
                e = as_openai_error(err)
                yield _sse(error_body(e.message, e.kind, e.param, e.code))
                return
            last = outs[-1]
            text = "".join(o.text for o in outs)
            choice: dict[str, Any] = {"index": index, "logprobs": logprobs_of(outs),
                                      "finish_reason": FINISH_WORD.get(last.finish_reason) if last.finished else None}
            if chat:
                choice["delta"] = {"content": text} if text or not last.finished else {}
            else:
                choice["text"] = text
            payload = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            yield _sse(payload)
            if last.finished:
                remaining -= 1
                completion_tokens += last.num_output_tokens
        if include_usage:
            prompt_tokens = _prompt_tokens(handles, n)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            yield _sse({"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [],
                        "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for _, handle in handles:
            router.release(handle)


# --- logprobs -----------------------------------------------------------------------------------


def _lps(outs: list[RequestOutput]):
    return [lp for o in outs for lp in (o.logprobs or []) if lp is not None]


def _completion_logprobs(outs, text_of) -> dict:
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for lp in _lps(outs):
        piece = text_of(lp.token_id)
        tokens.append(piece)
        token_logprobs.append(lp.logprob)
        top.append({text_of(t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(outs, text_of, top_n: int) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = text_of(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top[:top_n]]}
                        for lp in _lps(outs)]}

