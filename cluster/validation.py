"""Front-end request checking: protobuf requests in, checked domain objects out.

    validator = RequestValidator.for_checkpoint(model_path, Limits.from_config(cfg, vocab_size))
    job = validator.generate(request)      # a GenerateRequest -> GenerateJob, or InvalidRequest
    job.prompt_token_ids, job.params       # token ids, a worker.sampling.SamplingParams
    validator.tokenize(request)            # TokenizeRequest -> Tokenized (same tokenization)

Every field of a request is checked here, before anything reaches a replica; the engine's own
checks are a last guard only. A bad field raises `InvalidRequest`, whose message starts with the
field's path and states the limit, e.g.

    sampling.temperature must be a finite number in [0, 2], got nan
    prompt has 600 tokens; the limit is max_model_len - 1 = 511 (one position is left to generate)

Decisions (documented in the proto where they are visible to clients):

* ``max_tokens`` is checked against ``max_tokens_per_request``; prompt + max_tokens beyond
  ``max_model_len`` is clamped, not rejected: generation ends with reason LENGTH when the context
  is full (the engine caps each sequence's budget at the room its prompt leaves).
* A prompt may use at most ``max_model_len - 1`` tokens, so that one token can be generated.
* Chat roles must be one of `CHAT_ROLES`; the conversation is rendered with the checkpoint's own
  chat template (a sandboxed Jinja environment, ``add_generation_prompt=True``) and encoded without
  adding special tokens, since the template writes them itself.
* Invalid UTF-8 in a string field is caught while the message is parsed (`parse_message`), so the
  client gets INVALID_ARGUMENT naming the field rather than a generic deserialization failure.

Cost: every request is rejected in time linear in its size, cheap checks first. Sizes and counts
(request id, stop strings, chat messages and their bytes, prompt bytes, token-id counts) are
checked before anything that costs more per byte (rendering a chat, tokenizing, per-id loops),
and varints on the wire walk are at most 10 bytes. What still costs real time, rendering a chat
template or tokenizing a long prompt, is `heavy`: the front end runs it off the event loop.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import jinja2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cluster.api import tpserve_pb2 as pb
from cluster.model_store import load_tokenizer
from worker.sampling import SamplingParams, SamplingParamsError

CHAT_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 256  # when SamplingParams.max_tokens is unset (capped by the request limit)
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 128
MAX_CHAT_MESSAGES = 256
MAX_VARINT_BYTES = 10  # a 64-bit varint takes at most 10 bytes on the wire
HEAVY_TEXT_CHARS = 2048  # prompts longer than this are tokenized off the event loop
HEAVY_TOKEN_IDS = 4096  # likewise for token-id lists


class InvalidRequest(ValueError):
    """A request field outside its limits. ``str()`` starts with the field path."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field

    @classmethod
    def from_sampling(cls, err: SamplingParamsError) -> "InvalidRequest":
        """SamplingParams.validate's message already starts with the field name."""
        message = str(err)
        label, _, problem = message.partition(" ")
        return cls(f"sampling.{label}", problem)


class Unsupported(Exception):
    """An input kind the served model cannot take (chat without a chat template)."""


@dataclass(frozen=True)
class Limits:
    """What the server accepts; reported to clients in ModelInfoResponse.limits."""

    vocab_size: int
    max_model_len: int
    max_tokens_per_request: int
    max_batch_size: int
    max_waiting_requests: int
    max_stop_strings: int
    max_stop_string_length: int
    max_stop_token_ids: int = MAX_STOP_TOKEN_IDS
    max_logprobs: int = MAX_LOGPROBS
    max_chat_messages: int = MAX_CHAT_MESSAGES

    @property
    def default_max_tokens(self) -> int:
        return min(DEFAULT_MAX_TOKENS, self.max_tokens_per_request)

    @property
    def max_detokenize_ids(self) -> int:
        return self.max_model_len

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> "Limits":
        """From a resolved DeploymentConfig (engine lengths filled in)."""
        e, s = cfg.engine, cfg.server
        return cls(vocab_size=vocab_size, max_model_len=e.max_model_len,
                   max_tokens_per_request=e.max_tokens_per_request, max_batch_size=e.max_batch_size,
                   max_waiting_requests=s.max_queued_requests, max_stop_strings=s.max_stop_strings,
                   max_stop_string_length=s.max_stop_string_length)


@dataclass(frozen=True)
class GenerateJob:
    """A checked generation request, ready for the router."""

    request_id: str  # the client's id, or one the server assigned
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Tokenized:
    token_ids: list[int]
    tokens: list[str]  # vocabulary strings, one per id
    rendered_prompt: str  # the chat template's output; "" for plain text


# --- parsing: bytes -> message, with invalid UTF-8 reported by field -------------------------


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not parse; the validator rejects it."""

    field: str
    problem: str


def parse_message(message_class):
    """A gRPC request deserializer that never raises: a bad message becomes `Malformed`, which
    `RequestValidator.check_parsed` turns into INVALID_ARGUMENT (a raising deserializer would
    give the client a bare INTERNAL)."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as err:
            path = _bad_utf8_field(message_class.DESCRIPTOR, data)
            if path is not None:
                return Malformed(path, "is not valid UTF-8 (text fields must be UTF-8)")
            return Malformed("request", f"is not a valid {message_class.DESCRIPTOR.full_name}: {err}")

    return parse


def _bad_utf8_field(descriptor, data: bytes, prefix: str = "") -> str | None:
    """Path of the first string field holding invalid UTF-8, walking the wire format; None when
    there is none (or the bytes are broken in another way)."""
    try:
        for number, wire_type, value in _wire_fields(data):
            field = descriptor.fields_by_number.get(number)
            if field is None or wire_type != 2:
                continue
            path = f"{prefix}{field.name}"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return path
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _bad_utf8_field(field.message_type, value, f"{path}.")
                if found is not None:
                    return found
    except (IndexError, ValueError):
        return None
    return None


def _wire_fields(data: bytes):
    """(field number, wire type, payload) of each field; payload is bytes for wire type 2."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos: pos + size], pos + size
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos: pos + size], pos + size
            if pos > len(data):
                raise ValueError("truncated field")
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        yield number, wire_type, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position). At most MAX_VARINT_BYTES bytes are read: a longer run of
    continuation bytes is malformed, and following it would cost quadratic time."""
    value = shift = 0
    for pos in range(pos, min(pos + MAX_VARINT_BYTES, len(data))):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + 1
        shift += 7
    raise ValueError("varint too long or truncated")


# --- chat templates ----------------------------------------------------------------------------


class ChatTemplate:
    """The checkpoint's chat template, rendered in a sandbox as Hugging Face does."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent,
                                                                      ensure_ascii=False)
        env.globals["raise_exception"] = _raise_template_error
        self._template = env.from_string(source)
        self._special_tokens = special_tokens  # bos_token, eos_token, ... as the template names them

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "ChatTemplate | None":
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: use the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if source is None and (path / "chat_template.jinja").exists():
            source = (path / "chat_template.jinja").read_text()
        if not source:
            return None
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        tokens = {n: _token_text(config[n]) for n in names if config.get(n) is not None}
        return cls(source, tokens)

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         **self._special_tokens)
        except jinja2.TemplateError as err:
            raise InvalidRequest("chat", f"was rejected by the model's chat template: {err}") from None


def _token_text(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _raise_template_error(message: str):
    raise jinja2.TemplateError(message)


# --- the validator -------------------------------------------------------------------------------


class RequestValidator:
    """Checks requests against `Limits` and turns their input into token ids."""

    def __init__(self, tokenizer, chat_template: ChatTemplate | None, limits: Limits):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.limits = limits
        # A prompt of more UTF-8 bytes than this cannot fit max_model_len tokens (every token
        # covers at most this many bytes), so it is rejected before paying for tokenization.
        longest = max(len(t.encode()) for t in tokenizer.get_vocab(with_added_tokens=True))
        self.max_prompt_bytes = longest * limits.max_model_len
        self._token_texts: dict[int, str] = {}

    @classmethod
    def for_checkpoint(cls, path: str | Path, limits: Limits) -> "RequestValidator":
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise FileNotFoundError(f"{path} has no tokenizer.json; the server needs one")
        return cls(tokenizer, ChatTemplate.from_checkpoint(path), limits)

    # -- requests -----------------------------------------------------------------------------
    def generate(self, request: pb.GenerateRequest | Malformed) -> GenerateJob:
        """Raise `InvalidRequest` (or `Unsupported`) unless every field is within limits."""
        request = self.check_parsed(request)
        request_id = self._request_id(request.request_id)
        params = self.sampling(request.sampling)
        prompt = self._prompt(request)
        return GenerateJob(request_id, prompt, params)

    def tokenize(self, request: pb.TokenizeRequest | Malformed) -> Tokenized:
        request = self.check_parsed(request)
        kind = request.WhichOneof("input")
        if kind == "text":
            ids, rendered = self._encode_text(request.text, "text"), ""
        elif kind == "chat":
            rendered = self._render_chat(request.chat)
            ids = self._encode(rendered, "chat", special_tokens=False)
        else:
            raise InvalidRequest("input", "must be set: give text or chat")
        return Tokenized(ids, [self.tokenizer.id_to_token(i) or "" for i in ids], rendered)

    def detokenize(self, request: pb.DetokenizeRequest | Malformed) -> str:
        request = self.check_parsed(request)
        limit = self.limits.max_detokenize_ids
        if len(request.token_ids) > limit:
            raise InvalidRequest("token_ids", f"has {len(request.token_ids)} ids; at most "
                                 f"max_detokenize_ids = {limit} are allowed")
        self._check_token_ids(request.token_ids, "token_ids", allow_empty=True)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return self.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (for logprobs); cached, there are vocab_size of them."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id],
                                                                       skip_special_tokens=False)
        return text

    @staticmethod
    def check_parsed(request):
        if isinstance(request, Malformed):
            raise InvalidRequest(request.field, request.problem)
        return request

    @staticmethod
    def heavy(request) -> bool:
        """Whether checking `request` may take real time (a chat to render, a long text to
        tokenize, a long id list): the front end then checks it off the event loop."""
        if isinstance(request, pb.DetokenizeRequest):
            return len(request.token_ids) > HEAVY_TOKEN_IDS
        if not isinstance(request, (pb.GenerateRequest, pb.TokenizeRequest)):
            return False
        kind = request.WhichOneof("input")
        if kind == "chat":
            return True
        if kind in ("prompt", "text"):
            return len(getattr(request, kind)) > HEAVY_TEXT_CHARS
        return kind == "prompt_token_ids" and len(request.prompt_token_ids.ids) > HEAVY_TOKEN_IDS

    # -- fields -------------------------------------------------------------------------------
    def _request_id(self, request_id: str) -> str:
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest("request_id", f"must have at most {MAX_REQUEST_ID_CHARS} "
                                 f"characters, got {len(request_id)}")
        return request_id or f"req-{uuid.uuid4().hex[:16]}"

    def sampling(self, sp: pb.SamplingParams) -> SamplingParams:
        """The proto's SamplingParams, defaults applied, checked against the limits."""
        lim = self.limits
        self._check_stops(list(sp.stop), len(sp.stop_token_ids))
        if sp.top_k > lim.vocab_size:
            raise InvalidRequest("sampling.top_k", f"must be in [0, vocab_size {lim.vocab_size}] "
                                 f"(0 disables it), got {sp.top_k}")
        params = SamplingParams(
            max_tokens=sp.max_tokens if sp.HasField("max_tokens") else lim.default_max_tokens,
            min_tokens=sp.min_tokens,
            temperature=sp.temperature if sp.HasField("temperature") else 1.0,
            top_k=sp.top_k,
            top_p=sp.top_p if sp.HasField("top_p") else 1.0,
            min_p=sp.min_p,
            repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
            presence_penalty=sp.presence_penalty,
            frequency_penalty=sp.frequency_penalty,
            seed=sp.seed if sp.HasField("seed") else None,
            stop=tuple(sp.stop),
            stop_token_ids=tuple(sp.stop_token_ids),
            ignore_eos=sp.ignore_eos,
            logprobs=sp.logprobs,
            include_stop_str_in_output=sp.include_stop_str_in_output,
            skip_special_tokens=sp.skip_special_tokens if sp.HasField("skip_special_tokens") else True,
        )
        try:  # the ranges live in one place, SamplingParams.validate
            params.validate(vocab_size=lim.vocab_size, max_tokens_limit=lim.max_tokens_per_request,
                            max_logprobs=lim.max_logprobs)
        except SamplingParamsError as err:
            raise InvalidRequest.from_sampling(err) from None
        return params

    def _check_stops(self, stops: list[str], num_stop_ids: int) -> None:
        lim = self.limits
        if len(stops) > lim.max_stop_strings:
            raise InvalidRequest("sampling.stop", f"has {len(stops)} strings; at most "
                                 f"max_stop_strings = {lim.max_stop_strings} are allowed")
        for i, stop in enumerate(stops):
            if not stop or len(stop) > lim.max_stop_string_length:
                raise InvalidRequest(f"sampling.stop[{i}]", f"must have 1 to max_stop_string_length "
                                     f"= {lim.max_stop_string_length} characters, got {len(stop)}")
        if num_stop_ids > lim.max_stop_token_ids:
            raise InvalidRequest("sampling.stop_token_ids", f"has {num_stop_ids} ids; at most "
                                 f"max_stop_token_ids = {lim.max_stop_token_ids} are allowed")

    def _prompt(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "prompt":
            ids = self._encode_text(request.prompt, "prompt")
        elif kind == "chat":
            ids = self._encode(self._render_chat(request.chat), "chat", special_tokens=False)
        elif kind == "prompt_token_ids":
            self._check_prompt_length(len(request.prompt_token_ids.ids), kind)  # before the per-id pass
            ids = self._check_token_ids(request.prompt_token_ids.ids, "prompt_token_ids.ids")
        else:
            raise InvalidRequest("input", "must be set: give prompt, chat or prompt_token_ids")
        self._check_prompt_length(len(ids), kind)
        return ids

    def _check_prompt_length(self, n: int, field: str) -> None:
        limit = self.limits.max_model_len - 1
        if n > limit:
            raise InvalidRequest(field, f"has {n} tokens; the limit is max_model_len - 1 = {limit} "
                                 "(one position is left to generate)")

    def _encode_text(self, text: str, field: str) -> list[int]:
        if not text:
            raise InvalidRequest(field, "must not be empty")
        size = len(text.encode())
        if size > self.max_prompt_bytes:
            raise InvalidRequest(field, f"has {size} bytes, more than max_model_len = "
                                 f"{self.limits.max_model_len} tokens can hold")
        return self._encode(text, field, special_tokens=True)

    def _encode(self, text: str, field: str, *, special_tokens: bool) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=special_tokens).ids
        if not ids:
            raise InvalidRequest(field, "tokenizes to no tokens")
        return ids

    def _render_chat(self, chat: pb.ChatInput) -> str:
        if self.chat_template is None:
            raise Unsupported("this model has no chat template: send prompt or prompt_token_ids")
        n, limit = len(chat.messages), self.limits.max_chat_messages
        if not n:
            raise InvalidRequest("chat.messages", "must not be empty")
        if n > limit:
            raise InvalidRequest("chat.messages", f"has {n} messages; at most max_chat_messages = {limit} "
                                 "are allowed")
        size = sum(len(m.content.encode()) for m in chat.messages)
        if size > self.max_prompt_bytes:
            raise InvalidRequest("chat.messages", f"have {size} bytes of content, more than "
                                 f"max_model_len = {self.limits.max_model_len} tokens can hold")
        for i, message in enumerate(chat.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(f"chat.messages[{i}].role", f"must be one of "
                                     f"{', '.join(CHAT_ROLES)}, got {message.role!r}")
        text = self.chat_template.render([{"role": m.role, "content": m.content} for m in chat.messages])
        if len(text.encode()) > self.max_prompt_bytes:
            raise InvalidRequest("chat", f"renders to more than max_model_len = "
                                 f"{self.limits.max_model_len} tokens can hold")
        return text

    def _check_token_ids(self, ids, field: str, *, allow_empty: bool = False) -> list[int]:
        """Callers check the count first; this is one pass (max) unless an id is out of range."""
        ids = list(ids)
        if not ids and not allow_empty:
            raise InvalidRequest(field, "must not be empty")
        vocab = self.limits.vocab_size
        if ids and max(ids) >= vocab:
            i = next(i for i, token_id in enumerate(ids) if token_id >= vocab)
            raise InvalidRequest(f"{field}[{i}]", f"must be below vocab_size {vocab}, got {ids[i]}")
        return ids

