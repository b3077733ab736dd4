"""The deployment config: one YAML file, read once into frozen, typed, validated objects.

    from cluster.config import DeploymentConfig, load_config, resolve
    from sharding.arch import ModelConfig

    cfg = load_config("configs/default.yaml")         # syntax, types, ranges, cross-field rules
    cfg.parallel.tensor_parallel_size                 # 2
    model = ModelConfig.from_dir(checkpoint_dir)
    cfg = resolve(cfg, model, cuda_available=False)   # check_against_model, then fill every "auto"

    cfg = DeploymentConfig.for_model("smollm2-135m-instruct", tensor_parallel_size=2,
                                     engine={"max_batch_size": 8})   # the same checks, no file

Every error is a `ConfigError` whose ``str()`` is one line naming the file and the field path:

    configs/bad.yaml: parallel.tensor_parallel_size: must be a positive integer, got 'two'

Rules that involve more than one field (documented here, enforced in `_check_cross_fields`):

* ``engine.kv_cache_tokens`` and ``engine.kv_cache_memory``: give at most one.
* ``engine.max_tokens_per_step >= engine.max_batch_size``: every running sequence decodes one
  token per step, so a full batch must fit in one step's token budget.
* ``engine.max_tokens_per_request <= engine.max_model_len`` and
  ``engine.kv_cache_tokens >= engine.max_model_len``: one full-length sequence must fit.
* ``device.backend``: nccl needs ``device.type: cuda``; shm is for CPU ranks only.
* ``engine.cuda_graphs: on`` needs ``device.type: cuda``, and NCCL when a replica has several
  ranks (gloo collectives cannot be captured in a graph).
* ``ray.num_cpus`` only applies to an embedded Ray (``ray.address: null``), and must cover
  replicas × tensor_parallel_size × cpus_per_rank, since an embedded Ray is one node.
* ``parallel.placement: strict_spread`` with more than one rank needs a multi-node cluster,
  so it cannot be used with an embedded Ray.
* ``server.metrics_port`` must differ from ``server.port`` (unless either is 0 = pick a free one).
* ``server.tls_cert_file`` and ``server.tls_key_file``: both or neither; ``server.tls_client_ca_file``
  only with them. Bearer tokens (``server.auth_token_file`` / ``server.auth_token_env``) without TLS
  only on a loopback ``server.host``. ``server.max_connection_age_grace_s`` only with
  ``server.max_connection_age_s``.

`check_against_model` adds the rules that need the checkpoint's config: the tensor-parallel size
must be able to split the model's heads, and ``engine.max_model_len`` must not exceed its
positions.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePath
from typing import Any, Callable, Mapping

import yaml

from sharding.arch import ModelConfig
from sharding.plan import PlanError, ShardingPlan

_NO_VALUE = object()  # "the error has no offending value to show" (e.g. a missing field)


class ConfigError(ValueError):
    """A bad deployment config. ``str()`` is one line: ``<file>: <field.path>: <problem>, got <value>``."""

    def __init__(self, field_path: str | None, problem: str, value: Any = _NO_VALUE,
                 source: str = "<config>"):
        super().__init__(field_path, problem)
        self.field_path, self.problem, self.value, self.source = field_path, problem, value, source

    def in_file(self, source: str) -> "ConfigError":
        return ConfigError(self.field_path, self.problem, self.value, source)

    def __str__(self) -> str:
        parts = [self.source, self.field_path, self.problem]
        line = ": ".join(p for p in parts if p)
        if self.value is not _NO_VALUE:
            line += f", got {_show(self.value)}"
        return " ".join(line.split())  # one line, whatever the parts contained


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- field checks: each takes the YAML value and returns the typed value or raises _Invalid ---


class _Invalid(Exception):
    """A value failed its field's check; the section builder adds the field path and value."""


Check = Callable[[Any], Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is not a 1


def _integer(low: int, high: int | None = None, what: str = "a positive integer") -> Check:
    def check(value):
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise _Invalid(f"must be {what}")
        return value
    return check


def _positive_number(value: Any) -> float:
    ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value) and value > 0
    if not ok:
        raise _Invalid("must be a positive number")
    return value  # an int stays an int, so messages show it as written


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("must be a non-empty string")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _one_of(*choices: str) -> Check:
    def check(value):
        if value not in choices:
            allowed = ", ".join(choices)
            raise _Invalid(f"must be one of {allowed}{_did_you_mean(value, choices)}")
        return value
    return check


def _optional(check: Check) -> Check:
    def optional(value):
        if value is None:
            return None
        try:
            return check(value)
        except _Invalid as err:
            raise _Invalid(f"{err} or null") from None
    return optional


_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def _memory_size(value: Any) -> int:
    """Bytes, from an integer byte count or a string like "2GiB", "512MiB", "1.5GB"."""
    if _is_int(value) and value > 0:
        return value
    match = _SIZE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if match and match[2] in _BYTE_UNITS | {"": 1}:
        size = int(float(match[1]) * _BYTE_UNITS.get(match[2], 1))
        if size > 0:
            return size
    raise _Invalid("must be a positive byte count or a size like '2GiB' or '512MiB' "
                   "(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")


_RAY_ADDRESS = re.compile(r"(ray://)?([\w.-]+|\[[0-9a-fA-F:.]+\]):(\d{1,5})")


def _ray_address(value: Any) -> str:
    if value == "auto":
        return value
    match = _RAY_ADDRESS.fullmatch(value) if isinstance(value, str) else None
    if not match or not 1 <= int(match[3]) <= 65535:
        raise _Invalid("must be 'auto', 'host:port' or 'ray://host:port'")
    return value


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise _Invalid("must be the name of an environment variable (letters, digits, _), "
                       "not the token itself")
    return value


_positive_int = _integer(1)
_count = _integer(0, what="a non-negative integer")
_port = _integer(0, 65535, what="a port number from 0 to 65535 (0 = pick a free port)")


def _field(check: Check, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"check": check})


# --- the sections ---


@dataclass(frozen=True)
class ModelSettings:
    path: str = _field(_text)  # a known alias or a Hugging Face checkpoint directory
    dtype: str = _field(_one_of("auto", "float32", "bfloat16", "float16"), "auto")
    name: str | None = _field(_optional(_text), None)  # None until parsed: path's last component


@dataclass(frozen=True)
class ParallelSettings:
    tensor_parallel_size: int = _field(_positive_int, 1)  # ranks per replica
    replicas: int = _field(_positive_int, 1)
    # pack: a replica's ranks on one node; spread: may span nodes; strict_spread: one node per rank
    placement: str = _field(_one_of("pack", "spread", "strict_spread"), "pack")


@dataclass(frozen=True)
class RaySettings:
    address: str | None = _field(_optional(_ray_address), None)  # None = embedded local Ray
    num_cpus: float | None = _field(_optional(_positive_number), None)  # embedded Ray only
    namespace: str = _field(_text, "tpserve")


@dataclass(frozen=True)
class DeviceSettings:
    type: str = _field(_one_of("auto", "cpu", "cuda"), "auto")
    backend: str = _field(_one_of("auto", "gloo", "nccl", "shm"), "auto")
    cpus_per_rank: float = _field(_positive_number, 1.0)  # Ray CPU resources per rank
    threads_per_rank: int | None = _field(_optional(_positive_int), None)  # parsed: never None
    gpus_per_rank: float = _field(_positive_number, 1.0)  # used when type is cuda
    pin_ranks: bool = _field(_flag, True)  # shm ranks: each on cores of its own


@dataclass(frozen=True)
class EngineSettings:
    max_batch_size: int = _field(_positive_int, 64)  # sequences running at once
    max_tokens_per_step: int = _field(_positive_int, 512)  # prefill chunks + decodes
    max_model_len: int | None = _field(_optional(_positive_int), None)  # None = model's positions
    # Tokens per KV-cache block. None: by device, 128 on CPU (vLLM's CPU default too: the CPU
    # attention kernel reads each block's run of tokens from one place, and longer runs read
    # faster from memory; 16 -> 128 gave 0-5 % more float32 tok/s on one Zen 5 core, more with
    # longer contexts), 16 on CUDA. Prefixes are shared in whole blocks.
    block_size: int | None = _field(_optional(_positive_int), None)
    kv_cache_tokens: int | None = _field(_optional(_positive_int), None)
    kv_cache_memory: int | None = _field(_optional(_memory_size), None)  # bytes per rank
    max_tokens_per_request: int | None = _field(_optional(_positive_int), None)  # None = max_model_len
    collective_timeout_s: float = _field(_positive_number, 30.0)
    # Decode steps replayed from CUDA graphs (worker/cuda_graphs.py). auto: on for CUDA replicas
    # of one rank; at TP > 1 with NCCL, "on" captures the collectives too (not yet verified on
    # a machine with several GPUs). Resolved to "on" or "off".
    cuda_graphs: str = _field(_one_of("auto", "on", "off"), "auto")
    # Full KV blocks are shared between requests whose tokens start alike (worker/kv_cache.py).
    prefix_caching: bool = _field(_flag, True)
    # When a CPU rank's KV cache pages are faulted in (worker/kv_cache.py, KVCache.populate).
    # background: the replica is ready first, then a thread at nice 19 faults them in (zeroing
    # them in torch.zeros took 1.3-3.5 s of a 2-core VM's ~23 s start-up); before_ready: all
    # of them before the replica reports ready; on_use: only when a step first writes them, so
    # the rank holds no more memory than it has used.
    kv_cache_populate: str = _field(_one_of("background", "before_ready", "on_use"), "background")


@dataclass(frozen=True)
class ServerSettings:
    host: str = _field(_text, "127.0.0.1")
    port: int = _field(_port, 50051)
    metrics_port: int | None = _field(_optional(_port), None)  # None = no metrics endpoint
    max_queued_requests: int = _field(_positive_int, 256)  # beyond it: RESOURCE_EXHAUSTED
    max_concurrent_requests: int | None = _field(_optional(_positive_int), None)
    max_stop_strings: int = _field(_count, 8)  # per request
    max_stop_string_length: int = _field(_positive_int, 64)  # characters per stop string
    request_timeout_s: float | None = _field(_optional(_positive_number), None)
    rebuild_failed_replicas: bool = _field(_flag, True)  # restart a replica whose rank died
    # A request whose replica fails moves to another (or the rebuilt) one and resumes where it
    # was, this many times; one more failure ends it with UNAVAILABLE.
    max_request_retries: int = _field(_count, 2)
    # How long such a request, or a new one, waits when every replica is down and being rebuilt.
    failover_wait_s: float = _field(_positive_number, 120.0)
    # TLS (cluster/auth.py reads and checks the files when the server is built, before the
    # cluster starts): the certificate chain and its key, both or neither; with a client CA,
    # clients must present a certificate it signed (mutual TLS).
    tls_cert_file: str | None = _field(_optional(_text), None)
    tls_key_file: str | None = _field(_optional(_text), None)
    tls_client_ca_file: str | None = _field(_optional(_text), None)
    # Bearer tokens: from a file (one a line) and/or an environment variable named here. With
    # either, every call needs `authorization: Bearer <token>`, except the services opened below.
    auth_token_file: str | None = _field(_optional(_text), None)
    auth_token_env: str | None = _field(_optional(_env_name), None)
    health_without_token: bool = _field(_flag, True)  # load balancers probe without a token
    reflection_without_token: bool = _field(_flag, False)
    # HTTP/2 connections (gRPC server options)
    max_concurrent_streams: int = _field(_positive_int, 256)  # calls at once per connection
    keepalive_time_s: float = _field(_positive_number, 60)  # ping a connection quiet this long
    keepalive_timeout_s: float = _field(_positive_number, 20)  # and close it if no answer by then
    max_connection_idle_s: float | None = _field(_optional(_positive_number), 300)  # no calls
    max_connection_age_s: float | None = _field(_optional(_positive_number), None)  # None = no limit
    max_connection_age_grace_s: float | None = _field(_optional(_positive_number), None)
    client_keepalive_min_time_s: float = _field(_positive_number, 30)  # faster pings: GOAWAY
    client_keepalive_without_calls: bool = _field(_flag, True)  # clients may ping idle connections


@dataclass(frozen=True)
class HttpSettings:
    """The OpenAI-compatible HTTP API (cluster/openai_api.py), served beside gRPC by the same
    process with the server section's TLS and tokens."""
    enabled: bool = _field(_flag, False)
    host: str | None = _field(_optional(_text), None)  # None = server.host
    port: int = _field(_port, 8000)  # 0 = pick a free one


@dataclass(frozen=True)
class DeploymentConfig:
    model: ModelSettings
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    ray: RaySettings = field(default_factory=RaySettings)
    device: DeviceSettings = field(default_factory=DeviceSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    source: str = field(default="<config>", compare=False)  # the file, for later error messages

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The sections as plain dicts (for logs and ModelInfo)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    @classmethod
    def for_model(cls, path: str, **overrides: Any) -> "DeploymentConfig":
        """Build a config in code. Each keyword is a section (a dict) or any field by its name:

            DeploymentConfig.for_model("smollm2-135m-instruct", tensor_parallel_size=2,
                                       engine={"max_batch_size": 8}, device_type="cpu")
        """
        raw: dict[str, Any] = {"model": {"path": path}}
        for key, value in overrides.items():
            section = key if key in _SECTIONS else _FIELD_SECTION.get(key)
            if section is None:
                raw[key] = value  # rejected below as an unknown section, with a suggestion
            elif key == section and isinstance(value, Mapping):
                raw[section] = {**raw.get(section, {}), **value}
            else:
                raw.setdefault(section, {})[key] = value
        return parse_config(raw, source="DeploymentConfig.for_model")


_SECTIONS: dict[str, type] = {
    "model": ModelSettings, "parallel": ParallelSettings, "ray": RaySettings,
    "device": DeviceSettings, "engine": EngineSettings, "server": ServerSettings, "http": HttpSettings,
}
# Field names are unique across sections, so `for_model` can take them flat; the one exception,
# http's host and port, stays with `server` (give `http={...}` for those).
_FIELD_SECTION: dict[str, str] = {}
for _section, _cls in _SECTIONS.items():
    for _f in fields(_cls):
        _FIELD_SECTION.setdefault(_f.name, _section)


# --- reading ---


def load_config(path: str | Path) -> DeploymentConfig:
    """Read and validate one deployment YAML file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(None, f"cannot read the config file: {err.strerror}", source=source) from None
    return parse_yaml(text, source)


def parse_yaml(text: str, source: str = "<string>") -> DeploymentConfig:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(None, _yaml_problem(err), source=source) from None
    if raw is None:
        raise ConfigError("model.path", "missing required field (the file is empty)", source=source)
    return parse_config(raw, source)


def parse_config(raw: Any, source: str = "<string>") -> DeploymentConfig:
    """Validate an already-parsed mapping (YAML's shape) into a `DeploymentConfig`."""
    try:
        cfg = _derive_defaults(_build_deployment(raw, source))
        _check_cross_fields(cfg)
    except ConfigError as err:
        raise err.in_file(source) from None
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key.value!r}", key.start_mark)
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _build_deployment(raw: Any, source: str) -> DeploymentConfig:
    if not isinstance(raw, Mapping):
        sections = ", ".join(_SECTIONS)
        raise ConfigError(None, f"the top level must be a mapping of sections ({sections})", raw)
    _reject_unknown(raw, _SECTIONS, prefix="", what="section")
    built = {name: _build_section(cls, raw.get(name), name) for name, cls in _SECTIONS.items()}
    return DeploymentConfig(**built, source=source)


def _build_section(cls: type, raw: Any, name: str) -> Any:
    if raw is None:  # `ray:` with every field commented out
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(name, "must be a mapping of fields", raw)
    section_fields = {f.name: f for f in fields(cls)}
    _reject_unknown(raw, section_fields, prefix=f"{name}.", what="field")
    values = {}
    for key, spec in section_fields.items():
        if key in raw:
            values[key] = _checked(spec, raw[key], f"{name}.{key}")
        elif spec.default is dataclasses.MISSING:
            raise ConfigError(f"{name}.{key}", "missing required field")
    return cls(**values)


def _checked(spec: dataclasses.Field, value: Any, path: str) -> Any:
    try:
        return spec.metadata["check"](value)
    except _Invalid as err:
        raise ConfigError(path, str(err), value) from None


def _reject_unknown(raw: Mapping, known: Mapping, prefix: str, what: str) -> None:
    for key in raw:
        if key not in known:
            hint = _did_you_mean(key, known) or f" (known: {', '.join(known)})"
            raise ConfigError(f"{prefix}{key}", f"unknown {what}{hint}")


def _did_you_mean(value: Any, choices) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- values derived from other fields, then rules across fields ---


def _derive_defaults(cfg: DeploymentConfig) -> DeploymentConfig:
    """Fill the defaults that depend on another field; the model and the hardware are not needed."""
    model, device = cfg.model, cfg.device
    if model.name is None:
        model = dataclasses.replace(model, name=PurePath(model.path).name or model.path)
    if device.threads_per_rank is None:
        device = dataclasses.replace(device, threads_per_rank=max(1, round(device.cpus_per_rank)))
    return dataclasses.replace(cfg, model=model, device=device)


def _check_cross_fields(cfg: DeploymentConfig) -> None:
    _check_engine(cfg.engine)
    _check_device(cfg.device)
    _check_ray(cfg)
    _check_server(cfg.server)
    _check_http(cfg.http, cfg.server)


def _check_engine(e: EngineSettings) -> None:
    if e.kv_cache_tokens is not None and e.kv_cache_memory is not None:
        raise ConfigError("engine.kv_cache_memory", "give at most one of engine.kv_cache_tokens "
                          f"({e.kv_cache_tokens}) and engine.kv_cache_memory", e.kv_cache_memory)
    if e.max_tokens_per_step < e.max_batch_size:
        raise ConfigError("engine.max_tokens_per_step", f"must be >= engine.max_batch_size "
                          f"({e.max_batch_size}): every running sequence decodes one token per step",
                          e.max_tokens_per_step)
    if e.max_model_len is not None:
        _check_fits_one_sequence(e, e.max_model_len, "engine.max_model_len")


def _check_fits_one_sequence(e: EngineSettings, max_model_len: int, origin: str) -> None:
    limit = f"{origin} ({max_model_len})"
    if e.max_tokens_per_request is not None and e.max_tokens_per_request > max_model_len:
        raise ConfigError("engine.max_tokens_per_request", f"must be <= {limit}",
                          e.max_tokens_per_request)
    if e.kv_cache_tokens is not None and e.kv_cache_tokens < max_model_len:
        raise ConfigError("engine.kv_cache_tokens",
                          f"must hold at least one full sequence of {limit} tokens", e.kv_cache_tokens)


def _check_device(d: DeviceSettings) -> None:
    if d.backend == "nccl" and d.type == "cpu":
        raise ConfigError("device.backend", "nccl needs device.type cuda (device.type is cpu)", d.backend)
    if d.backend == "shm" and d.type == "cuda":
        raise ConfigError("device.backend", "shm is for CPU ranks (device.type is cuda)", d.backend)


def _check_ray(cfg: DeploymentConfig) -> None:
    ray, p = cfg.ray, cfg.parallel
    if ray.address is not None and ray.num_cpus is not None:
        raise ConfigError("ray.num_cpus", "only applies to an embedded Ray "
                          f"(ray.address is {ray.address!r}, not null)", ray.num_cpus)
    needed = p.replicas * p.tensor_parallel_size * cfg.device.cpus_per_rank
    if ray.num_cpus is not None and ray.num_cpus < needed:
        raise ConfigError("ray.num_cpus", f"too few for replicas × tensor_parallel_size × "
                          f"cpus_per_rank = {p.replicas} × {p.tensor_parallel_size} × "
                          f"{cfg.device.cpus_per_rank:g} = {needed:g} CPUs", ray.num_cpus)
    if ray.address is None and p.placement == "strict_spread" and p.tensor_parallel_size > 1:
        raise ConfigError("parallel.placement", "strict_spread needs one node per rank, but an "
                          "embedded Ray is one node (set ray.address)", p.placement)


def _check_http(h: HttpSettings, s: ServerSettings) -> None:
    if h.enabled and h.port and (h.host or s.host) == s.host and h.port in (s.port, s.metrics_port):
        raise ConfigError("http.port", f"must differ from server.port ({s.port}) and server.metrics_port "
                          f"({s.metrics_port})", h.port)


def _check_server(s: ServerSettings) -> None:
    if s.metrics_port and s.metrics_port == s.port:
        raise ConfigError("server.metrics_port", f"must differ from server.port ({s.port})",
                          s.metrics_port)
    _check_tls(s)
    if s.max_connection_age_grace_s is not None and s.max_connection_age_s is None:
        raise ConfigError("server.max_connection_age_grace_s", "only applies with "
                          "server.max_connection_age_s", s.max_connection_age_grace_s)


def _check_tls(s: ServerSettings) -> None:
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        given, missing = (("tls_cert_file", "tls_key_file") if s.tls_key_file is None
                          else ("tls_key_file", "tls_cert_file"))
        raise ConfigError(f"server.{given}", f"needs server.{missing} too (give both or neither)",
                          getattr(s, given))
    if s.tls_client_ca_file is not None and s.tls_cert_file is None:
        raise ConfigError("server.tls_client_ca_file", "needs server.tls_cert_file and "
                          "server.tls_key_file (mutual TLS is TLS first)", s.tls_client_ca_file)
    tokens = s.auth_token_file is not None or s.auth_token_env is not None
    if tokens and s.tls_cert_file is None and not _is_loopback(s.host):
        name = "auth_token_file" if s.auth_token_file is not None else "auth_token_env"
        raise ConfigError(f"server.{name}", f"tokens would cross the network in clear text "
                          f"(server.host is {s.host!r}): set server.tls_cert_file and "
                          f"server.tls_key_file, or serve on a loopback host", getattr(s, name))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost
        return False


# --- against the model, and the last "auto"s ---


def check_against_model(cfg: DeploymentConfig, model: ModelConfig) -> None:
    """Raise ConfigError when the model cannot be served as configured."""
    try:
        _check_heads(cfg.parallel.tensor_parallel_size, model)
        _check_lengths(cfg.engine, model.max_positions)
    except ConfigError as err:
        raise err.in_file(cfg.source) from None


def _check_heads(tp: int, model: ModelConfig) -> None:
    try:
        ShardingPlan.build(model, tp)  # starts with partition_heads: every rank needs a head
    except PlanError as err:
        raise ConfigError("parallel.tensor_parallel_size", f"does not fit the model ({err})",
                          tp) from None


def _check_lengths(e: EngineSettings, max_positions: int) -> None:
    if e.max_model_len is None:  # the model's length applies, and one sequence of it must fit
        _check_fits_one_sequence(e, max_positions, "the model's max positions")
    elif e.max_model_len > max_positions:
        raise ConfigError("engine.max_model_len", f"exceeds the model's {max_positions} positions",
                          e.max_model_len)


def resolve(cfg: DeploymentConfig, model: ModelConfig, *, cuda_available: bool) -> DeploymentConfig:
    """Check `cfg` against the model and replace every "auto" / model-dependent null by its value."""
    check_against_model(cfg, model)
    device_type = cfg.device.type
    if device_type == "auto":
        device_type = "cuda" if cuda_available else "cpu"
    elif device_type == "cuda" and not cuda_available:
        raise ConfigError("device.type", "no CUDA device is visible", device_type, source=cfg.source)
    device = _resolve_backend(cfg.device, device_type)
    try:
        _check_device(device)  # an explicit backend may not suit the type "auto" became
        engine = _resolve_graphs(_resolve_lengths(cfg.engine, model.max_positions), device,
                                 cfg.parallel.tensor_parallel_size)
        if engine.block_size is None:
            engine = dataclasses.replace(engine, block_size=DEFAULT_BLOCK_SIZE[device_type])
    except ConfigError as err:
        raise err.in_file(cfg.source) from None
    return dataclasses.replace(cfg, model=_resolve_dtype(cfg.model, device_type), device=device,
                               engine=engine)


DEFAULT_BLOCK_SIZE = {"cpu": 128, "cuda": 16}  # engine.block_size when the config leaves it null


def _resolve_dtype(m: ModelSettings, device_type: str) -> ModelSettings:
    if m.dtype != "auto":
        return m
    return dataclasses.replace(m, dtype="bfloat16" if device_type == "cuda" else "float32")


def _resolve_backend(d: DeviceSettings, device_type: str) -> DeviceSettings:
    backend = d.backend
    if backend == "auto" and device_type == "cuda":
        backend = "nccl"
    # On CPU "auto" stays: the controller picks shm or gloo per replica once it knows whether
    # the replica's ranks landed on one host (a "spread" placement may still pack them).
    return dataclasses.replace(d, type=device_type, backend=backend)


def _resolve_graphs(e: EngineSettings, d: DeviceSettings, tp: int) -> EngineSettings:
    if e.cuda_graphs == "auto":
        return dataclasses.replace(e, cuda_graphs="on" if d.type == "cuda" and tp == 1 else "off")
    if e.cuda_graphs == "on" and d.type != "cuda":
        raise ConfigError("engine.cuda_graphs", f"needs device.type cuda (it is {d.type})", e.cuda_graphs)
    if e.cuda_graphs == "on" and tp > 1 and d.backend != "nccl":
        raise ConfigError("engine.cuda_graphs", f"at tensor_parallel_size {tp} needs device.backend "
                          f"nccl ({d.backend} collectives cannot be captured)", e.cuda_graphs)
    return e


def _resolve_lengths(e: EngineSettings, max_positions: int) -> EngineSettings:
    max_model_len = e.max_model_len or max_positions
    return dataclasses.replace(e, max_model_len=max_model_len,
                               max_tokens_per_request=e.max_tokens_per_request or max_model_len)
