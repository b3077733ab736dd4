"""The KServe v2 gRPC inference service (`inference.GRPCInferenceService`, proto/inference/) on
the same port as tpserve.v1, in the shape Triton's LLM backends use, so that tritonclient,
genai-perf and perf_analyzer reach tpserve without new code.

* Input: one BYTES tensor ``text_input`` (the prompt; shape [1] or [1, 1]).
* Sampling as request parameters: ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``,
  ``stop`` (a string, or a JSON list of strings), ``ignore_eos``, ``stream`` (ModelStreamInfer).
* Output: one BYTES tensor ``text_output``: the whole completion from ModelInfer; from
  ModelStreamInfer with ``stream`` true, each delta as it comes (decoupled), the last response
  marked with the parameter ``triton_final_response``.

Requests go through the same validation, admission and router as a tpserve.v1 Generate (this
converts, it decides nothing), and the same token check guards the service. Errors: ModelInfer
ends with the gRPC status tpserve.v1 would give; ModelStreamInfer puts the message in the
stream's ``error_message`` and goes on with the stream's next request, as Triton does. The other
RPCs of the service (repository, shared memory, statistics, ...) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import json
import struct

import grpc

from cluster.api import tpserve_pb2 as pb
from cluster.api.kserve import grpc_service_pb2 as kv
from cluster.api.kserve import grpc_service_pb2_grpc as kv_grpc
from cluster.frontend import FINISH_WORD, status_of
from cluster.validation import InvalidRequest

SERVICE = "inference.GRPCInferenceService"
INPUT, OUTPUT = "text_input", "text_output"


def _bytes_elements(raw: bytes) -> list[bytes]:
    """A BYTES tensor's raw form: each element is a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidRequest(INPUT, "raw BYTES contents are truncated")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise InvalidRequest(INPUT, "raw BYTES contents are truncated")
        out.append(raw[at + 4: at + 4 + n])
        at += 4 + n
    return out


def _serialize_bytes(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def _param(p: kv.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def to_generate_request(request: kv.ModelInferRequest) -> tuple[pb.GenerateRequest, bool]:
    """The tpserve.v1 request a KServe request means, and whether it asks to stream."""
    index = next((i for i, t in enumerate(request.inputs) if t.name == INPUT), None)
    if index is None:
        raise InvalidRequest("inputs", f"must contain the BYTES tensor {INPUT!r}")
    tensor = request.inputs[index]
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"inputs.{INPUT}", f"must have datatype BYTES, got {tensor.datatype!r}")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidRequest("raw_input_contents", "must hold one entry per input")
        elements = _bytes_elements(request.raw_input_contents[index])
    else:
        elements = list(tensor.contents.bytes_contents)
    if len(elements) != 1:
        raise InvalidRequest(f"inputs.{INPUT}", f"must hold exactly one prompt, got {len(elements)}")
    try:
        prompt = elements[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"inputs.{INPUT}", "must be UTF-8 text") from None
    params = {k: _param(v) for k, v in request.parameters.items()}
    sampling = pb.SamplingParams()
    for name in ("max_tokens", "top_k", "seed"):
        if params.get(name) is not None:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequest(f"parameters.{name}", f"must be a non-negative integer, got {value!r}")
            setattr(sampling, name, value)
    for name in ("temperature", "top_p"):
        if params.get(name) is not None:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"parameters.{name}", f"must be a number, got {value!r}")
            setattr(sampling, name, float(value))
    if params.get("ignore_eos") is not None:
        sampling.ignore_eos = bool(params["ignore_eos"])
    stop = params.get("stop")
    if stop is not None:
        if not isinstance(stop, str):
            raise InvalidRequest("parameters.stop", "must be a string or a JSON list of strings")
        try:
            stops = json.loads(stop) if stop.startswith("[") else [stop]
        except json.JSONDecodeError:
            stops = [stop]
        if not all(isinstance(s, str) for s in stops):
            raise InvalidRequest("parameters.stop", "must be a string or a JSON list of strings")
        sampling.stop.extend(stops)
    return pb.GenerateRequest(request_id=request.id, prompt=prompt, sampling=sampling), bool(params.get("stream"))


def _response(request: kv.ModelInferRequest, model_name: str, text: str, *, final: bool,
              finish: str | None = None, usage: tuple[int, int] | None = None) -> kv.ModelInferResponse:
    out = kv.ModelInferResponse(model_name=model_name, id=request.id)
    out.outputs.add(name=OUTPUT, datatype="BYTES", shape=[1])
    out.raw_output_contents.append(_serialize_bytes(text.encode("utf-8")))
    out.parameters["triton_final_response"].bool_param = final
    if finish is not None:
        out.parameters["finish_reason"].string_param = finish
    if usage is not None:
        out.parameters["prompt_tokens"].int64_param = usage[0]
        out.parameters["completion_tokens"].int64_param = usage[1]
    return out


class KServeServicer(kv_grpc.GRPCInferenceServiceServicer):
    def __init__(self, servicer, router, model_name: str, version: str):
        self._api = servicer  # the tpserve.v1 servicer: its validator and off-loop checks
        self._router = router
        self._model = model_name
        self._version = version

    # -- health and metadata ------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return kv.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return kv.ServerReadyResponse(ready=self._router.serving)

    async def ModelReady(self, request, context):
        return kv.ModelReadyResponse(ready=request.name == self._model and self._router.serving)

    async def ServerMetadata(self, request, context):
        return kv.ServerMetadataResponse(name="tpserve", version=self._version, extensions=[])

    async def ModelMetadata(self, request, context):
        await self._known_model(request.name, context)
        meta = kv.ModelMetadataResponse(name=self._model, versions=["1"], platform="tpserve")
        meta.inputs.add(name=INPUT, datatype="BYTES", shape=[1])
        meta.outputs.add(name=OUTPUT, datatype="BYTES", shape=[1])
        return meta

    # -- inference ----------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        await self._known_model(request.model_name, context)
        async with self._api.statuses(context):
            generate, _ = to_generate_request(request)
            text, finish, usage = "", None, None
            async for delta, finish, usage in self._generate(generate):
                text += delta
            return _response(request, self._model, text, final=True, finish=finish, usage=usage)

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            if request.model_name != self._model:
                yield kv.ModelStreamInferResponse(error_message=self._unknown(request.model_name))
                continue
            try:
                generate, stream = to_generate_request(request)
                text, finish, usage = "", None, None
                async for delta, finish, usage in self._generate(generate):
                    if stream and (delta or finish):
                        yield kv.ModelStreamInferResponse(infer_response=_response(
                            request, self._model, delta, final=finish is not None, finish=finish, usage=usage))
                    text += delta
                if not stream:
                    yield kv.ModelStreamInferResponse(infer_response=_response(
                        request, self._model, text, final=True, finish=finish, usage=usage))
            except Exception as err:  # noqa: BLE001 - reported in the stream, which goes on
                yield kv.ModelStreamInferResponse(error_message=status_of(err)[1])

    async def _generate(self, generate: pb.GenerateRequest):
        """(text delta, finish reason or None, (prompt, completion tokens) or None) as produced."""
        handle = await self._api.admit(generate)
        try:
            while True:
                outputs = await handle.next()
                last = outputs[-1]
                finish = FINISH_WORD.get(last.finish_reason) if last.finished else None
                usage = (handle.num_prompt_tokens, last.num_output_tokens) if last.finished else None
                yield "".join(o.text for o in outputs), finish, usage
                if last.finished:
                    return
        finally:
            self._router.release(handle)

    async def _known_model(self, name: str, context) -> None:
        if name != self._model:
            await context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(name))

    def _unknown(self, name: str) -> str:
        return f"model {name!r} is not served here; this server serves {self._model!r}"


def add_kserve_to_server(servicer: KServeServicer, server) -> None:
    kv_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
