"""The gRPC servicer of tpserve.v1.TPServe: protobuf in, checked domain objects to the router,
protobuf out. It converts and delegates; it decides nothing.

    servicer = TPServeServicer(router, validator, describe_model(controller, validator),
                               request_timeout_s=None, metrics=metrics)
    add_to_server(servicer, server)   # a grpc.aio server

Errors map to gRPC status codes in one place, `STATUS`; an unexpected exception becomes INTERNAL
with a one-line message (the traceback goes to the server log, never to the client).

Request lifetime: a request is admitted by `router.submit` and, whatever ends the call (its final
output, an error, the client cancelling or disconnecting, the client's deadline), the request is
aborted in its engine unless it already finished (`router.abort` is a no-op then), which frees its
KV blocks at the engine's next step. It counts against admission until its handler is done
writing (`router.release`), so streams nobody reads hold a slot, not an unbounded backlog.
``server.request_timeout_s`` applies to calls without a deadline of their own: the router
enforces it and ends the call with DEADLINE_EXCEEDED.

Checking a request that takes real time (a chat to render, a long prompt to tokenize:
`RequestValidator.heavy`) runs on a small thread pool, so the event loop keeps streaming; at most
`MAX_PENDING_CHECKS` such checks wait at once, beyond that a request gets RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import grpc

from cluster.api import tpserve_pb2 as pb
from cluster.router import (EngineError, Overloaded, ReplicaState, ReplicaUnavailable, RequestHandle,
                            RequestTimeout, Router)
from cluster.validation import InvalidRequest, RequestValidator, Unsupported, parse_message
from worker.engine import FinishReason, RequestOutput
from worker.sampling import MAX_ABS_PENALTY, MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY

log = logging.getLogger("tpserve.frontend")

CHECK_THREADS = 2
MAX_PENDING_CHECKS = 64

SERVICE = pb.DESCRIPTOR.services_by_name["TPServe"].full_name  # "tpserve.v1.TPServe"

# Every error a handler can meet, and the status the client gets for it.
STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ReplicaUnavailable: grpc.StatusCode.UNAVAILABLE,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    EngineError: grpc.StatusCode.INTERNAL,
}

FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
# The finish reasons as OpenAI's API and Triton's LLM backends word them.
FINISH_WORD = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop",
               FinishReason.CANCELLED: "abort"}


def status_of(err: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in STATUS.items():
        if isinstance(err, kind):
            return code, str(err)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


class TPServeServicer:
    def __init__(self, router: Router, validator: RequestValidator, model: pb.ModelInfoResponse,
                 *, request_timeout_s: float | None = None, metrics=None):
        self._router = router
        self._validator = validator
        self._model = model  # the static part of ModelInfo; replicas are added per call
        self._timeout_s = request_timeout_s
        self._metrics = metrics
        self._checks = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="tpserve-check")
        self._pending_checks = 0

    async def Generate(self, request, context):
        async with self.statuses(context):
            handle = await self._submit(request, context)
            try:
                yield start_message(handle)
                finished = False
                while not finished:
                    outputs = await handle.next()
                    finished = outputs[-1].finished
                    yield delta_message(outputs, handle, self._validator.token_text)
            finally:
                self._router.release(handle)

    async def GenerateUnary(self, request, context):
        async with self.statuses(context):
            handle = await self._submit(request, context)
            try:
                return result_message(await handle.all(), handle, self._validator.token_text)
            finally:
                self._router.release(handle)

    async def Tokenize(self, request, context):
        async with self.statuses(context):
            t = await self._check(self._validator.tokenize, request)
            return pb.TokenizeResponse(token_ids=t.token_ids, tokens=t.tokens, count=len(t.token_ids),
                                       rendered_prompt=t.rendered_prompt)

    async def Detokenize(self, request, context):
        async with self.statuses(context):
            return pb.DetokenizeResponse(text=await self._check(self._validator.detokenize, request))

    async def ModelInfo(self, request, context):
        async with self.statuses(context):
            self._validator.check_parsed(request)
            return model_info(self._model, self._router.replica_states())

    # -- helpers ------------------------------------------------------------------------------
    async def _submit(self, request, context) -> RequestHandle:
        # The server's timeout is for calls that set no deadline; gRPC ends the others itself.
        handle = await self.admit(request, has_deadline=context.time_remaining() is not None)
        # However the call ends (even a cancel while a response is being written), the request
        # leaves its engine and stops counting for admission; a no-op when already done.
        context.add_done_callback(lambda _: self._router.release(handle))
        return handle

    async def admit(self, request: pb.GenerateRequest, *, has_deadline: bool = False) -> RequestHandle:
        """Check `request` (off the loop when heavy) and submit it to the router: the one way in
        for every protocol (tpserve.v1 here, OpenAI HTTP, KServe v2). The caller `release`s the
        handle when its call is over. ``server.request_timeout_s`` applies when the call has no
        deadline of its own."""
        job = await self._check(self._validator.generate, request)
        return self._router.submit(job, None if has_deadline else self._timeout_s)

    @property
    def token_text(self):
        """token id -> its text, as logprobs report it."""
        return self._validator.token_text

    async def _check(self, check, request):
        """check(request) inline when it is cheap, else on the check threads (bounded)."""
        if not self._validator.heavy(request):
            return check(request)
        if self._pending_checks >= MAX_PENDING_CHECKS:
            raise Overloaded(f"{self._pending_checks} large requests are being checked already "
                             f"(at most {MAX_PENDING_CHECKS}); retry later")
        self._pending_checks += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._checks, check, request)
        finally:
            self._pending_checks -= 1

    def close(self) -> None:
        self._checks.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def statuses(self, context):
        """The one place where exceptions become gRPC statuses (KServe's ModelInfer uses it too)."""
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            code, message = status_of(err)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("request failed")
            if self._metrics is not None:
                self._metrics.request_error(code.name.lower())
            await context.abort(code, message)


def add_to_server(servicer: TPServeServicer, server) -> None:
    """Register the servicer with deserializers that turn undecodable requests (e.g. invalid
    UTF-8 in a string field) into INVALID_ARGUMENT naming the field, instead of a bare INTERNAL."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=parse_message(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateUnary": _unary(servicer.GenerateUnary, pb.GenerateRequest, pb.GenerateResult),
        "Tokenize": _unary(servicer.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
        "Detokenize": _unary(servicer.Detokenize, pb.DetokenizeRequest, pb.DetokenizeResponse),
        "ModelInfo": _unary(servicer.ModelInfo, pb.ModelInfoRequest, pb.ModelInfoResponse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _unary(method, request_class, response_class):
    return grpc.unary_unary_rpc_method_handler(method, request_deserializer=parse_message(request_class),
                                               response_serializer=response_class.SerializeToString)


# --- domain -> protobuf ------------------------------------------------------------------------


def start_message(handle: RequestHandle) -> pb.GenerateResponse:
    return pb.GenerateResponse(start=pb.GenerateStart(request_id=handle.request_id,
                                                      prompt_tokens=handle.num_prompt_tokens,
                                                      replica_id=handle.replica_id))


def delta_message(outputs: list[RequestOutput], handle: RequestHandle, token_text) -> pb.GenerateResponse:
    """One stream message for the deltas that arrived together; finish fields on the last."""
    msg = pb.GenerateResponse(text="".join(o.text for o in outputs),
                              token_ids=[t for o in outputs for t in o.token_ids],
                              logprobs=_logprobs(outputs, token_text))
    last = outputs[-1]
    if last.finished:
        _set_finish(msg, last, handle)
    return msg


def result_message(outputs: list[RequestOutput], handle: RequestHandle, token_text) -> pb.GenerateResult:
    msg = pb.GenerateResult(request_id=handle.request_id, replica_id=handle.replica_id,
                            text="".join(o.text for o in outputs),
                            token_ids=[t for o in outputs for t in o.token_ids],
                            logprobs=_logprobs(outputs, token_text))
    _set_finish(msg, outputs[-1], handle)
    return msg


def _set_finish(msg, last: RequestOutput, handle: RequestHandle) -> None:
    msg.finish_reason = FINISH[last.finish_reason]
    if isinstance(last.stop, str):
        msg.stop_string = last.stop
    elif isinstance(last.stop, int):
        msg.stop_token_id = last.stop
    msg.usage.prompt_tokens = handle.num_prompt_tokens
    msg.usage.completion_tokens = last.num_output_tokens


def _logprobs(outputs: list[RequestOutput], token_text) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(token_id=lp.token_id, text=token_text(lp.token_id), logprob=lp.logprob,
                        top_logprobs=[pb.Logprob(token_id=t, text=token_text(t), logprob=v)
                                      for t, v in lp.top])
        for o in outputs for lp in (o.logprobs or []) if lp is not None
    ]


def describe_model(controller, validator: RequestValidator) -> pb.ModelInfoResponse:
    """The parts of ModelInfo that do not change while serving."""
    cfg, model, lim = controller.cfg, controller.model, validator.limits
    config = json.loads((Path(controller.model_path) / "config.json").read_text())
    info = pb.ModelInfoResponse(
        model_name=cfg.model.name, model_path=str(controller.model_path),
        architecture=(config.get("architectures") or [model.model_type])[0],
        dtype=cfg.model.dtype, device=cfg.device.type,
        tensor_parallel_size=cfg.parallel.tensor_parallel_size, num_replicas=cfg.parallel.replicas,
        vocab_size=model.vocab_size, eos_token_ids=list(model.eos_token_ids),
        has_chat_template=validator.chat_template is not None, kv_block_size=cfg.engine.block_size,
        server_version=server_version(),
        limits=pb.Limits(max_model_len=lim.max_model_len, max_tokens_per_request=lim.max_tokens_per_request,
                         default_max_tokens=lim.default_max_tokens, max_batch_size=lim.max_batch_size,
                         max_waiting_requests=lim.max_waiting_requests,
                         max_stop_strings=lim.max_stop_strings,
                         max_stop_string_length=lim.max_stop_string_length,
                         max_stop_token_ids=lim.max_stop_token_ids, max_logprobs=lim.max_logprobs,
                         max_chat_messages=lim.max_chat_messages, max_prompt_bytes=validator.max_prompt_bytes,
                         max_detokenize_ids=lim.max_detokenize_ids, max_temperature=MAX_TEMPERATURE,
                         min_repetition_penalty=MIN_REPETITION_PENALTY,
                         max_repetition_penalty=MAX_REPETITION_PENALTY, max_abs_penalty=MAX_ABS_PENALTY),
    )
    if model.bos_token_id is not None:
        info.bos_token_id = model.bos_token_id
    return info


def model_info(static: pb.ModelInfoResponse, states: list[ReplicaState]) -> pb.ModelInfoResponse:
    info = pb.ModelInfoResponse()
    info.CopyFrom(static)
    info.replicas.extend(_replica_status(s) for s in states)
    return info


def _replica_status(s: ReplicaState) -> pb.ReplicaStatus:
    ranks = [pb.RankPlacement(rank=i, node_id=n.get("node_id", ""), node_ip=n.get("ip", ""),
                              device=n.get("device", "")) for i, n in enumerate(s.nodes)]
    return pb.ReplicaStatus(replica_id=s.replica_id, healthy=s.healthy, message=s.failure or "",
                            ranks=ranks, running_requests=s.stats.get("running", 0),
                            waiting_requests=s.stats.get("waiting", 0),
                            kv_blocks_used=s.stats.get("kv_blocks_used", 0),
                            kv_blocks_total=s.stats.get("kv_blocks_total", 0))


def server_version() -> str:
    try:
        return metadata.version("tpserve")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"
