"""The deployment config: the shipped files parse, defaults apply, and every bad file is refused
with one line naming the file, the field path and the offending value."""

import dataclasses
from pathlib import Path

import pytest

from cluster.config import (
    ConfigError,
    DeploymentConfig,
    check_against_model,
    load_config,
    parse_config,
    parse_yaml,
    resolve,
)
from sharding.arch import ModelConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# 4 query heads in 2 KV groups, 2048 positions (the from_hf default).
TINY_MODEL = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


def tiny_model() -> ModelConfig:
    return ModelConfig.from_hf(TINY_MODEL)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


# --- the shipped configs ---


def test_default_yaml_parses_with_its_values():
    cfg = load_config(CONFIGS / "default.yaml")
    assert cfg.model.path == "smollm2-135m-instruct"
    assert cfg.model.name == "smollm2-135m-instruct"  # derived from the path
    assert cfg.model.dtype == "auto"
    assert cfg.device.type == "cpu"
    assert cfg.parallel.tensor_parallel_size == 2
    assert cfg.parallel.replicas == 1
    assert cfg.ray.address is None
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 50051)
    assert cfg.source == str(CONFIGS / "default.yaml")


def test_multinode_yaml_parses():
    cfg = load_config(CONFIGS / "multinode.yaml")
    assert cfg.ray.address == "auto"
    assert cfg.parallel.replicas == 2
    assert cfg.parallel.tensor_parallel_size == 2
    assert cfg.parallel.placement == "spread"
    assert cfg.engine.kv_cache_memory == 512 * 2**20
    assert cfg.device.threads_per_rank == 2  # from cpus_per_rank


def test_defaults_apply_to_a_minimal_config():
    cfg = parse_config({"model": {"path": "/models/SmolLM2-135M/"}})
    assert cfg.model.name == "SmolLM2-135M"
    assert cfg.parallel == dataclasses.replace(cfg.parallel, tensor_parallel_size=1, replicas=1,
                                               placement="pack")
    assert cfg.ray.namespace == "tpserve"
    assert (cfg.device.type, cfg.device.backend, cfg.device.threads_per_rank) == ("auto", "auto", 1)
    e = cfg.engine
    assert (e.max_batch_size, e.max_tokens_per_step, e.block_size) == (64, 512, None)  # by device
    assert e.max_model_len is None and e.kv_cache_tokens is None
    assert e.collective_timeout_s == 30.0 and e.prefix_caching is True
    assert e.kv_cache_populate == "background"
    assert cfg.server.metrics_port is None and cfg.server.max_queued_requests == 256


def test_security_and_connection_defaults():
    s = parse_config({"model": {"path": "m"}}).server
    assert (s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file) == (None, None, None)
    assert (s.auth_token_file, s.auth_token_env) == (None, None)
    assert (s.health_without_token, s.reflection_without_token) == (True, False)
    assert (s.max_concurrent_streams, s.keepalive_time_s, s.keepalive_timeout_s) == (256, 60, 20)
    ages = (s.max_connection_idle_s, s.max_connection_age_s, s.max_connection_age_grace_s)
    assert ages == (300, None, None)
    assert (s.client_keepalive_min_time_s, s.client_keepalive_without_calls) == (30, True)
    shipped = load_config(CONFIGS / "default.yaml").server  # shows every server default but one
    assert shipped == dataclasses.replace(s, metrics_port=9400)


def test_tokens_without_tls_on_a_loopback_host_and_tls_with_mutual_auth():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        parse_config({"model": {"path": "m"}, "server": {"host": host, "auth_token_env": "TOKEN"}})
    s = parse_config({"model": {"path": "m"}, "server": {
        "host": "0.0.0.0", "tls_cert_file": "s.pem", "tls_key_file": "s.key",
        "tls_client_ca_file": "ca.pem", "auth_token_file": "tokens", "max_connection_age_s": 3600,
        "max_connection_age_grace_s": 60}}).server
    assert (s.tls_client_ca_file, s.max_connection_age_grace_s) == ("ca.pem", 60)


def test_empty_sections_take_defaults():
    cfg = parse_yaml("model:\n  path: m\nray:\nserver:\n")
    assert cfg.ray.namespace == "tpserve" and cfg.server.port == 50051


def test_objects_are_frozen():
    cfg = load_config(CONFIGS / "default.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel.tensor_parallel_size = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.engine = None


def test_to_dict_is_plain_and_round_trips():
    cfg = load_config(CONFIGS / "default.yaml")
    d = cfg.to_dict()
    assert list(d) == ["model", "parallel", "ray", "device", "engine", "server", "http"]
    assert d["parallel"]["tensor_parallel_size"] == 2
    assert parse_config(d) == cfg


def test_for_model_takes_sections_and_flat_fields():
    cfg = DeploymentConfig.for_model("smollm2-135m-instruct", tensor_parallel_size=2,
                                     engine={"max_batch_size": 8}, type="cpu")
    assert cfg.parallel.tensor_parallel_size == 2
    assert cfg.engine.max_batch_size == 8 and cfg.engine.max_tokens_per_step == 512
    assert cfg.device.type == "cpu"
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel_size: must be a positive"):
        DeploymentConfig.for_model("m", tensor_parallel_size=0)
    with pytest.raises(ConfigError, match=r"tensor_paralel_size: unknown section"):
        DeploymentConfig.for_model("m", tensor_paralel_size=2)


def test_memory_sizes_and_kv_blocks():
    sizes = {"2GiB": 2 * 2**30, "512MiB": 512 * 2**20, "1.5GB": 1_500_000_000, "4096": 4096, 4096: 4096}
    for text, size in sizes.items():
        assert parse_config({"model": {"path": "m"}, "engine": {"kv_cache_memory": text}}
                            ).engine.kv_cache_memory == size
    cfg = parse_config({"model": {"path": "m"}, "engine": {"kv_cache_tokens": 33, "max_model_len": 20,
                                                           "block_size": 16}})
    from cluster.controller import kv_cache_blocks
    assert kv_cache_blocks(cfg, tiny_model(), None) == 3  # 33 tokens round up to 3 blocks of 16


def test_resolve_fills_every_auto():
    cfg = parse_config({"model": {"path": "m"}, "parallel": {"tensor_parallel_size": 2}})
    cpu = resolve(cfg, tiny_model(), cuda_available=False)
    # On CPU the backend stays "auto": the controller picks shm or gloo once ranks are placed.
    assert (cpu.device.type, cpu.model.dtype, cpu.device.backend) == ("cpu", "float32", "auto")
    assert cpu.engine.max_model_len == 2048 and cpu.engine.max_tokens_per_request == 2048
    gpu = resolve(cfg, tiny_model(), cuda_available=True)
    assert (gpu.device.type, gpu.model.dtype, gpu.device.backend) == ("cuda", "bfloat16", "nccl")
    assert (cpu.engine.block_size, gpu.engine.block_size) == (128, 16)  # null: by device
    eight = parse_config({"model": {"path": "m"}, "engine": {"block_size": 8}})
    assert resolve(eight, tiny_model(), cuda_available=False).engine.block_size == 8
    gloo = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, backend="gloo"))
    assert resolve(gloo, tiny_model(), cuda_available=False).device.backend == "gloo"
    # CUDA graphs: on for one-rank CUDA replicas, off elsewhere unless asked for
    assert (cpu.engine.cuda_graphs, gpu.engine.cuda_graphs) == ("off", "off")
    one = parse_config({"model": {"path": "m"}})
    assert resolve(one, tiny_model(), cuda_available=True).engine.cuda_graphs == "on"
    assert resolve(one, tiny_model(), cuda_available=False).engine.cuda_graphs == "off"
    on = parse_config({"model": {"path": "m"}, "parallel": {"tensor_parallel_size": 2},
                       "engine": {"cuda_graphs": "on"}})
    assert resolve(on, tiny_model(), cuda_available=True).engine.cuda_graphs == "on"  # with nccl


@pytest.mark.parametrize("fields,cuda,message", [
    ({"engine": {"cuda_graphs": "on"}}, False, "engine.cuda_graphs: needs device.type cuda (it is cpu), got 'on'"),
    ({"engine": {"cuda_graphs": "on"}, "parallel": {"tensor_parallel_size": 2}, "device": {"backend": "gloo"}},
     True, "engine.cuda_graphs: at tensor_parallel_size 2 needs device.backend nccl"),
    ({"engine": {"cuda_graphs": "sometimes"}}, True, "engine.cuda_graphs: must be one of"),
])
def test_cuda_graphs_errors_name_the_field(fields, cuda, message):
    with pytest.raises(ConfigError) as info:
        resolve(parse_config({"model": {"path": "m"}, **fields}), tiny_model(), cuda_available=cuda)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_check_against_model_accepts_uneven_tp():
    cfg = parse_config({"model": {"path": "m"}, "parallel": {"tensor_parallel_size": 3}})
    check_against_model(cfg, tiny_model())  # 4 heads over 3 ranks: split unevenly, not refused


# --- broken configs: (yaml text, field path in the message, shown bad value) ---

BROKEN = {
    "string for a flag": ("model: {path: m}\nserver:\n  rebuild_failed_replicas: yes please\n",
                          "server.rebuild_failed_replicas", "must be true or false, got 'yes please'"),
    "missing model.path": ("model:\n  dtype: auto\n", "model.path", "missing required field"),
    "missing model section": ("parallel:\n  replicas: 1\n", "model.path", "missing required field"),
    "string for int": ("model: {path: m}\nparallel:\n  tensor_parallel_size: two\n",
                       "parallel.tensor_parallel_size", "must be a positive integer, got 'two'"),
    "bool for int": ("model: {path: m}\nparallel:\n  replicas: true\n",
                     "parallel.replicas", "got True"),
    "float for int": ("model: {path: m}\nengine:\n  block_size: 16.0\n",
                      "engine.block_size", "got 16.0"),
    "list for mapping": ("model: {path: m}\nparallel: [1, 2]\n", "parallel", "got [1, 2]"),
    "int for string": ("model:\n  path: 123\n", "model.path", "got 123"),
    "zero tp": ("model: {path: m}\nparallel:\n  tensor_parallel_size: 0\n",
                "parallel.tensor_parallel_size", "got 0"),
    "negative batch": ("model: {path: m}\nengine:\n  max_batch_size: -4\n",
                       "engine.max_batch_size", "got -4"),
    "negative timeout": ("model: {path: m}\nengine:\n  collective_timeout_s: -1.5\n",
                         "engine.collective_timeout_s", "got -1.5"),
    "port too large": ("model: {path: m}\nserver:\n  port: 70000\n", "server.port", "got 70000"),
    "unknown top-level key": ("model: {path: m}\nparalel:\n  replicas: 2\n",
                              "paralel", "did you mean 'parallel'?"),
    "unknown nested key": ("model: {path: m}\nparallel:\n  tensor_paralel_size: 2\n",
                           "parallel.tensor_paralel_size", "did you mean 'tensor_parallel_size'?"),
    "bad enum": ("model:\n  path: m\n  dtype: fp16\n", "model.dtype",
                 "must be one of auto, float32, bfloat16, float16"),
    "bad placement": ("model: {path: m}\nparallel:\n  placement: packed\n", "parallel.placement",
                      "got 'packed'"),
    "yaml syntax error": ("model:\n  path: m\n parallel: [1,\n", None, "line 3"),
    "duplicate key": ("model:\n  path: m\n  path: n\n", None, "duplicate key 'path'"),
    "empty file": ("", "model.path", "the file is empty"),
    "top level a list": ("- model\n- parallel\n", None, "top level must be a mapping of sections"),
    "both kv cache fields": ("model: {path: m}\nengine:\n  kv_cache_tokens: 4096\n"
                             "  kv_cache_memory: 2GiB\n", "engine.kv_cache_memory",
                             "got 2147483648"),
    "bad kv_cache_populate": ("model: {path: m}\nengine:\n  kv_cache_populate: eager\n",
                              "engine.kv_cache_populate", "got 'eager'"),
    "bad memory string": ("model: {path: m}\nengine:\n  kv_cache_memory: 2 gigs\n",
                          "engine.kv_cache_memory", "got '2 gigs'"),
    "batch over step budget": ("model: {path: m}\nengine:\n  max_tokens_per_step: 32\n",
                               "engine.max_tokens_per_step", "max_batch_size (64)"),
    "kv cache below one sequence": ("model: {path: m}\nengine:\n  max_model_len: 4096\n"
                                    "  kv_cache_tokens: 1024\n", "engine.kv_cache_tokens",
                                    "got 1024"),
    "nccl on cpu": ("model: {path: m}\ndevice:\n  type: cpu\n  backend: nccl\n",
                    "device.backend", "got 'nccl'"),
    "bad ray address": ("model: {path: m}\nray:\n  address: headnode\n", "ray.address",
                        "got 'headnode'"),
    "num_cpus with an address": ("model: {path: m}\nray:\n  address: auto\n  num_cpus: 4\n",
                                 "ray.num_cpus", "got 4"),
    "too few embedded cpus": ("model: {path: m}\nparallel: {tensor_parallel_size: 2, replicas: 2}\n"
                              "ray:\n  num_cpus: 3\n", "ray.num_cpus", "= 4 CPUs, got 3"),
    "strict_spread on one node": ("model: {path: m}\nparallel:\n  tensor_parallel_size: 2\n"
                                  "  placement: strict_spread\n", "parallel.placement",
                                  "got 'strict_spread'"),
    "metrics on the gRPC port": ("model: {path: m}\nserver: {port: 9000, metrics_port: 9000}\n",
                                 "server.metrics_port", "got 9000"),
    # security and connection limits (the files themselves are read at server start:
    # tests/test_security.py)
    "cert without key": ("model: {path: m}\nserver:\n  tls_cert_file: s.pem\n", "server.tls_cert_file",
                         "needs server.tls_key_file too (give both or neither), got 's.pem'"),
    "key without cert": ("model: {path: m}\nserver:\n  tls_key_file: s.key\n", "server.tls_key_file",
                         "needs server.tls_cert_file too"),
    "client CA without TLS": ("model: {path: m}\nserver:\n  tls_client_ca_file: ca.pem\n",
                              "server.tls_client_ca_file", "needs server.tls_cert_file"),
    "empty cert path": ("model: {path: m}\nserver:\n  tls_cert_file: ''\n  tls_key_file: k\n",
                        "server.tls_cert_file", "must be a non-empty string or null"),
    "tokens in clear over the network": ("model: {path: m}\nserver:\n  host: 0.0.0.0\n"
                                         "  auth_token_file: tokens\n", "server.auth_token_file",
                                         "tokens would cross the network in clear text"),
    "token env not a name": ("model: {path: m}\nserver:\n  auth_token_env: s3cr3t-t0ken!\n",
                             "server.auth_token_env", "must be the name of an environment variable"),
    "health flag not a bool": ("model: {path: m}\nserver:\n  health_without_token: open\n",
                               "server.health_without_token", "must be true or false, got 'open'"),
    "reflection flag not a bool": ("model: {path: m}\nserver:\n  reflection_without_token: 1\n",
                                   "server.reflection_without_token", "got 1"),
    "zero streams": ("model: {path: m}\nserver:\n  max_concurrent_streams: 0\n",
                     "server.max_concurrent_streams", "must be a positive integer, got 0"),
    "keepalive as text": ("model: {path: m}\nserver:\n  keepalive_time_s: 1m\n",
                          "server.keepalive_time_s", "must be a positive number, got '1m'"),
    "keepalive timeout zero": ("model: {path: m}\nserver:\n  keepalive_timeout_s: 0\n",
                               "server.keepalive_timeout_s", "got 0"),
    "negative idle": ("model: {path: m}\nserver:\n  max_connection_idle_s: -5\n",
                      "server.max_connection_idle_s", "must be a positive number or null, got -5"),
    "infinite age": ("model: {path: m}\nserver:\n  max_connection_age_s: .inf\n",
                     "server.max_connection_age_s", "got inf"),
    "grace without age": ("model: {path: m}\nserver:\n  max_connection_age_grace_s: 10\n",
                          "server.max_connection_age_grace_s", "only applies with server.max_connection_age_s"),
    "client ping interval zero": ("model: {path: m}\nserver:\n  client_keepalive_min_time_s: 0\n",
                                  "server.client_keepalive_min_time_s", "got 0"),
    "client pings flag": ("model: {path: m}\nserver:\n  client_keepalive_without_calls: sometimes\n",
                          "server.client_keepalive_without_calls", "got 'sometimes'"),
}


@pytest.mark.parametrize("text, field_path, shown", BROKEN.values(), ids=BROKEN.keys())
def test_broken_config_is_one_line_naming_field_and_value(tmp_path, text, field_path, shown):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_one_line(str(info.value), path, field_path, shown)


AGAINST_MODEL = {
    "tp above the heads": ("model: {path: m}\nparallel:\n  tensor_parallel_size: 8\n",
                           "parallel.tensor_parallel_size", "4 query heads", "got 8"),
    "max_model_len above positions": ("model: {path: m}\nengine:\n  max_model_len: 4096\n",
                                      "engine.max_model_len", "2048 positions", "got 4096"),
    "kv cache below the model's length": ("model: {path: m}\nengine:\n  kv_cache_tokens: 1000\n",
                                          "engine.kv_cache_tokens", "(2048)", "got 1000"),
}


@pytest.mark.parametrize("text, field_path, numbers, shown", AGAINST_MODEL.values(),
                         ids=AGAINST_MODEL.keys())
def test_config_that_does_not_fit_the_model(tmp_path, text, field_path, numbers, shown):
    path = write(tmp_path, text)
    cfg = load_config(path)  # fine on its own
    with pytest.raises(ConfigError) as info:
        check_against_model(cfg, tiny_model())
    message = str(info.value)
    assert_one_line(message, path, field_path, shown)
    assert numbers in message


def assert_one_line(message: str, path: Path, field_path: str | None, shown: str) -> None:
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    if field_path is not None:
        assert f": {field_path}" in message
    assert shown in message
    assert "Traceback" not in message


def test_unknown_key_without_a_close_match_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"path": "m"}, "server": {"zzz": 1}})
    assert str(info.value) == ("<string>: server.zzz: unknown field (known: host, port, "
                               "metrics_port, max_queued_requests, max_concurrent_requests, "
                               "max_stop_strings, max_stop_string_length, request_timeout_s, "
                               "rebuild_failed_replicas, max_request_retries, failover_wait_s, tls_cert_file, "
                               "tls_key_file, "
                               "tls_client_ca_file, auth_token_file, auth_token_env, "
                               "health_without_token, reflection_without_token, "
                               "max_concurrent_streams, keepalive_time_s, keepalive_timeout_s, "
                               "max_connection_idle_s, max_connection_age_s, "
                               "max_connection_age_grace_s, client_keepalive_min_time_s, "
                               "client_keepalive_without_calls)")


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "\n" not in str(info.value) and "nope.yaml" in str(info.value)


def test_resolve_refuses_cuda_without_a_gpu():
    cfg = parse_config({"model": {"path": "m"}, "device": {"type": "cuda"}})
    with pytest.raises(ConfigError, match=r"device.type: no CUDA device is visible, got 'cuda'"):
        resolve(cfg, tiny_model(), cuda_available=False)


def test_resolve_refuses_shm_once_auto_becomes_cuda():
    cfg = parse_config({"model": {"path": "m"}, "device": {"backend": "shm"}})
    with pytest.raises(ConfigError, match=r"device.backend: shm is for CPU ranks.*, got 'shm'"):
        resolve(cfg, tiny_model(), cuda_available=True)


def test_http_section():
    cfg = DeploymentConfig.for_model("m", http={"enabled": True, "port": 0}, port=50051)
    assert (cfg.http.enabled, cfg.http.port, cfg.http.host, cfg.server.port) == (True, 0, None, 50051)
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"path": "m"}, "http": {"enabled": True, "port": 50051}})
    assert str(info.value) == "<string>: http.port: must differ from server.port (50051) and server.metrics_port (None), got 50051"
    with pytest.raises(ConfigError, match="http.enabled: must be true or false"):
        parse_config({"model": {"path": "m"}, "http": {"enabled": "sometimes"}})
