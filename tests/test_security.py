"""TLS, mutual TLS, bearer tokens, connection limits and loopback-only rendezvous, through real
channels on 127.0.0.1.

Most tests run against small gRPC servers built exactly as `Server.start` builds its own
(`grpc_server`, `listen`, the real servicer registration, health and reflection) around a stub
servicer, so they need no Ray and start in milliseconds. One real deployment (TLS and tokens,
TP = 2 on the session's Ray) checks the whole path: real Generate calls, the CLI, and that the
replica's rendezvous store and gloo listen on loopback only. Certificates are made with the
``openssl`` command.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster import cli
from cluster.api import tpserve_pb2 as pb
from cluster.auth import ServerSecurity
from cluster.client import AsyncClient, Client, TLSOptions, TPServeError, open_channel, read_token_file
from cluster.config import ConfigError, DeploymentConfig, ServerSettings
from cluster.frontend import add_to_server
from cluster.server import add_health_and_reflection, connection_options, grpc_server, listen
from server_util import ServerThread, config

TOKEN = "tok-0123456789abcdef-first"
OTHER_TOKEN = "tok-0123456789abcdef-second"  # the token file's second line
ENV_TOKEN = "tok-0123456789abcdef-from-env"
WRONG_TOKEN = "tok-0123456789abcdef-WRONG"
TOKEN_ENV = "TPSERVE_TEST_SERVER_TOKEN"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


# --- certificates and token files ----------------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(cwd: Path, name: str) -> None:
    _openssl(cwd, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
             "-days", "2")


def _leaf(cwd: Path, name: str, ca: str, extensions: str) -> None:
    (cwd / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{extensions}")
    _openssl(cwd, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca signs server (for 127.0.0.1 and localhost) and client; rogue-ca signs rogue-client."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "rogue-client", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    (d / "tokens").write_text(f"# tpserve tokens\n\n{TOKEN}\n  {OTHER_TOKEN}  \n")
    (d / "client-token").write_text(f"# mine\n{TOKEN}\n")
    (d / "wrong-token").write_text(f"{WRONG_TOKEN}\n")
    return d


def server_settings(**fields) -> ServerSettings:
    return DeploymentConfig.for_model("m", server={"host": "127.0.0.1", "port": 0, **fields}).server


def tls_fields(pki: Path, **more) -> dict:
    return dict(tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"), **more)


def ca(pki: Path, **more) -> TLSOptions:
    return TLSOptions(ca_file=str(pki / "ca.pem"), **more)


# --- a gRPC server with a stub servicer, built as Server.start builds the real one -----------------


class StubServicer:
    """Answers at once; a Generate whose prompt is "hold" stays open until `release` is set."""

    def __init__(self):
        self.running = 0  # Generate calls inside the handler now
        self.release = threading.Event()

    async def Generate(self, request, context):
        self.running += 1
        try:
            yield pb.GenerateResponse(start=pb.GenerateStart(request_id="stub-1"))
            while request.prompt == "hold" and not self.release.is_set():
                await asyncio.sleep(0.01)
            yield pb.GenerateResponse(text="ok", token_ids=[7], finish_reason=pb.FINISH_REASON_LENGTH,
                                      usage=pb.Usage(prompt_tokens=1, completion_tokens=1))
        finally:
            self.running -= 1

    async def GenerateUnary(self, request, context):
        return pb.GenerateResult(request_id="stub-2", text="ok", token_ids=[7],
                                 finish_reason=pb.FINISH_REASON_LENGTH,
                                 usage=pb.Usage(prompt_tokens=1, completion_tokens=1))

    async def Tokenize(self, request, context):
        return pb.TokenizeResponse(token_ids=[1, 2], count=2)

    async def Detokenize(self, request, context):
        return pb.DetokenizeResponse(text="hi")

    async def ModelInfo(self, request, context):
        return pb.ModelInfoResponse(model_name="stub")


class StubServer:
    """`grpc_server` + `listen` around a StubServicer, on its own event loop in a thread."""

    def __init__(self, settings: ServerSettings):
        self.security = ServerSecurity.load(settings)
        self.servicer = StubServicer()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.address = self._run(self._start(settings))

    async def _start(self, settings: ServerSettings) -> str:
        self.grpc = grpc_server(settings, self.security)
        add_to_server(self.servicer, self.grpc)
        status = health.aio.HealthServicer()
        add_health_and_reflection(self.grpc, status)
        address = listen(self.grpc, settings.host, settings.port, self.security.credentials)
        await self.grpc.start()
        await status.set("", health_pb2.HealthCheckResponse.SERVING)
        return address

    def close(self) -> None:
        self.servicer.release.set()
        self._run(self.grpc.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def tls_server(pki, monkeypatch_module):
    """TLS; tokens from a file and an environment variable; health open, reflection closed;
    two streams per connection."""
    monkeypatch_module.setenv(TOKEN_ENV, ENV_TOKEN)
    server = StubServer(server_settings(**tls_fields(pki), auth_token_file=str(pki / "tokens"),
                                        auth_token_env=TOKEN_ENV, max_concurrent_streams=2))
    yield server
    server.close()


@pytest.fixture(scope="module")
def mtls_server(pki):
    server = StubServer(server_settings(**tls_fields(pki, tls_client_ca_file=str(pki / "ca.pem"))))
    yield server
    server.close()


@pytest.fixture(scope="module")
def plaintext_token_server(pki):
    """No TLS (loopback), a token; the opposite exemptions: health closed, reflection open."""
    server = StubServer(server_settings(auth_token_file=str(pki / "tokens"),
                                        health_without_token=False, reflection_without_token=True))
    yield server
    server.close()


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def health_check(channel: grpc.Channel) -> str:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = stub.ServerReflectionInfo(iter([request]), timeout=5)
    return {s.name for s in response.list_services_response.service}


class ThreadedCalls:
    """Blocking calls, each in a thread of its own, started on entering the `with`."""

    def __init__(self, calls):
        self._results = [None] * len(calls)
        self._threads = [threading.Thread(target=self._run, args=(i, c), daemon=True)
                         for i, c in enumerate(calls)]

    def _run(self, i, call):
        self._results[i] = call()

    def results(self, timeout: float) -> list:
        for t in self._threads:
            t.join(timeout)
        return self._results

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        for t in self._threads:
            t.join(10)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# --- bearer tokens over TLS --------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, WRONG_TOKEN, TOKEN[:-1], TOKEN + "x"],
                         ids=["none", "wrong", "one character short", "one character more"])
def test_a_missing_or_wrong_token_is_unauthenticated(pki, tls_server, token):
    with Client(tls_server.address, timeout=5, tls=ca(pki), token=token or None) as client:
        for call in (lambda: client.generate("Hi"), lambda: list(client.stream("Hi")),
                     client.model_info, lambda: client.tokenize("Hi")):
            with pytest.raises(TPServeError) as err:
                call()
            assert err.value.code is UNAUTHENTICATED
            assert err.value.message in ("invalid bearer token", "missing bearer token (send "
                                         "metadata 'authorization: Bearer <token>')")
            assert not token or token not in err.value.message
    assert tls_server.servicer.running == 0


@pytest.mark.parametrize("header", [f"Basic {TOKEN}", TOKEN, f"Bearer{TOKEN}", "Bearer ",
                                    f"Bearer {TOKEN} {TOKEN}"],
                         ids=["basic scheme", "no scheme", "no space", "empty", "two tokens"])
def test_a_malformed_authorization_header_is_unauthenticated(pki, tls_server, header):
    with open_channel(tls_server.address, tls=ca(pki)) as channel:
        call = channel.unary_unary("/tpserve.v1.TPServe/ModelInfo",
                                   request_serializer=pb.ModelInfoRequest.SerializeToString,
                                   response_deserializer=pb.ModelInfoResponse.FromString)
        err = rpc_error(lambda: call(pb.ModelInfoRequest(), metadata=[("authorization", header)],
                                     timeout=5))
    assert (err.code(), err.details()) == (UNAUTHENTICATED, "invalid bearer token")


@pytest.mark.parametrize("token", [TOKEN, OTHER_TOKEN, ENV_TOKEN],
                         ids=["file line 1", "file line 2", "environment"])
def test_every_configured_token_is_served_unary_and_streaming(pki, tls_server, token):
    with Client(tls_server.address, timeout=5, tls=ca(pki), token=token) as client:
        assert client.generate("Hi").text == "ok"
        assert [d.text for d in client.stream("Hi")] == ["ok"]
        assert client.model_info().model_name == "stub"

    async def with_async_client():
        async with AsyncClient(tls_server.address, timeout=5, tls=ca(pki), token=token) as ac:
            return (await ac.generate("Hi")).text, [d.text async for d in ac.stream("Hi")]

    assert asyncio.run(with_async_client()) == ("ok", ["ok"])


def test_health_is_open_and_reflection_closed_by_default(pki, tls_server):
    with open_channel(tls_server.address, tls=ca(pki)) as channel:
        assert health_check(channel) == "SERVING"
        err = rpc_error(lambda: list_services(channel))
        assert err.code() is UNAUTHENTICATED
        unknown = channel.unary_unary("/no.such.Service/Method")
        assert rpc_error(lambda: unknown(b"", timeout=5)).code() is UNAUTHENTICATED  # no probing
    with open_channel(tls_server.address, tls=ca(pki), token=TOKEN) as channel:
        assert "tpserve.v1.TPServe" in list_services(channel)


def test_health_closed_and_reflection_open_when_configured(plaintext_token_server):
    address = plaintext_token_server.address
    with open_channel(address) as channel:
        assert rpc_error(lambda: health_check(channel)).code() is UNAUTHENTICATED
        assert "tpserve.v1.TPServe" in list_services(channel)
    with Client(address, timeout=5, token=TOKEN) as client:  # over loopback, without TLS
        assert client.health() == "SERVING" and client.generate("Hi").text == "ok"


# --- TLS and mutual TLS ----------------------------------------------------------------------------


def test_a_plaintext_client_fails_promptly_against_tls(tls_server):
    with Client(tls_server.address, timeout=10, token=TOKEN) as client:
        started = time.monotonic()
        with pytest.raises(TPServeError) as err:
            client.generate("Hi")
    assert err.value.code is UNAVAILABLE and time.monotonic() - started < 5


def test_a_server_signed_by_another_ca_is_not_trusted(pki, tls_server):
    with Client(tls_server.address, timeout=10, tls=TLSOptions(ca_file=str(pki / "rogue-ca.pem")),
                token=TOKEN) as client:
        with pytest.raises(TPServeError) as err:
            client.generate("Hi")
    assert err.value.code is UNAVAILABLE


def test_server_name_override(pki, tls_server):
    port = tls_server.address.rsplit(":", 1)[1]
    with Client(f"localhost:{port}", timeout=5, tls=ca(pki, server_name="localhost"), token=TOKEN) as c:
        assert c.generate("Hi").text == "ok"
    with Client(tls_server.address, timeout=5, tls=ca(pki, server_name="elsewhere.example"),
                token=TOKEN) as client:
        with pytest.raises(TPServeError) as err:
            client.generate("Hi")
    assert err.value.code is UNAVAILABLE


@pytest.mark.parametrize("who", ["no certificate", "signed by another CA"])
def test_mutual_tls_refuses_a_client_without_a_valid_certificate(pki, mtls_server, who):
    tls = ca(pki) if who == "no certificate" else ca(
        pki, cert_file=str(pki / "rogue-client.pem"), key_file=str(pki / "rogue-client.key"))
    with Client(mtls_server.address, timeout=10, tls=tls) as client:
        started = time.monotonic()
        with pytest.raises(TPServeError) as err:
            client.generate("Hi")
    assert err.value.code is UNAVAILABLE and time.monotonic() - started < 5


def test_mutual_tls_serves_a_client_certificate_signed_by_the_ca(pki, mtls_server):
    tls = ca(pki, cert_file=str(pki / "client.pem"), key_file=str(pki / "client.key"))
    with Client(mtls_server.address, timeout=5, tls=tls) as client:
        assert client.generate("Hi").text == "ok" and client.health() == "SERVING"


# --- connection limits ------------------------------------------------------------------------------


def test_max_concurrent_streams_per_connection(pki, tls_server):
    """Two streams per connection: a third call on the same channel waits for a free one."""
    servicer = tls_server.servicer
    servicer.release.clear()
    with Client(tls_server.address, timeout=10, tls=ca(pki), token=TOKEN) as client:
        held = [client.stream("hold") for _ in range(3)]
        with ThreadedCalls([lambda s=s: list(s) for s in held]) as calls:
            assert wait_for(lambda: servicer.running == 2, 5)
            time.sleep(0.3)
            assert servicer.running == 2  # not 3: the third stream is queued by HTTP/2
            servicer.release.set()
            assert [[d.text for d in r] for r in calls.results(10)] == [["ok"]] * 3


def test_connection_options_follow_the_config():
    options = dict(connection_options(server_settings(
        max_concurrent_streams=8, keepalive_time_s=30, keepalive_timeout_s=5.5,
        max_connection_idle_s=None, max_connection_age_s=600, max_connection_age_grace_s=30,
        client_keepalive_min_time_s=10, client_keepalive_without_calls=False)))
    assert options == {"grpc.so_reuseport": 0, "grpc.max_concurrent_streams": 8,
                       "grpc.keepalive_time_ms": 30_000, "grpc.keepalive_timeout_ms": 5_500,
                       "grpc.http2.min_ping_interval_without_data_ms": 10_000,
                       "grpc.keepalive_permit_without_calls": 0,
                       "grpc.max_connection_age_ms": 600_000, "grpc.max_connection_age_grace_ms": 30_000}
    defaults = dict(connection_options(server_settings()))
    assert defaults["grpc.max_connection_idle_ms"] == 300_000 and "grpc.max_connection_age_ms" not in defaults


# --- files and tokens the server cannot use: one line naming the field -----------------------------


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_encrypted_key_is_refused_without_a_prompt(pki, tmp_path):
    _openssl(tmp_path, "pkey", "-in", str(pki / "server.key"), "-aes256", "-passout", "pass:secret",
             "-out", "encrypted.key")
    fields = tls_fields(pki) | {"tls_key_file": str(tmp_path / "encrypted.key")}
    with pytest.raises(ConfigError) as err:
        ServerSecurity.load(server_settings(**fields))
    assert "server.tls_key_file: is not an unencrypted PEM private key" in str(err.value)


BAD_FILES = {  # name: (fields given the pki and tmp_path, field in the message, text in the message)
    "missing cert": (lambda p, t: tls_fields(p) | {"tls_cert_file": str(t / "nope.pem")},
                     "server.tls_cert_file", "cannot read the file: No such file or directory"),
    "key is a directory": (lambda p, t: tls_fields(p) | {"tls_key_file": str(t)},
                           "server.tls_key_file", "cannot read the file: Is a directory"),
    "cert not PEM": (lambda p, t: tls_fields(p) | {"tls_cert_file": _write(t, "c.pem", "hello")},
                     "server.tls_cert_file", "holds no PEM certificate"),
    "key of another cert": (lambda p, t: tls_fields(p) | {"tls_key_file": str(p / "client.key")},
                            "server.tls_key_file", "matching server.tls_cert_file"),
    "client CA not PEM": (lambda p, t: tls_fields(p, tls_client_ca_file=_write(t, "ca.pem", "x")),
                          "server.tls_client_ca_file", "holds no PEM certificate"),
    "missing client CA": (lambda p, t: tls_fields(p, tls_client_ca_file=str(t / "nope")),
                          "server.tls_client_ca_file", "cannot read the file"),
    "missing token file": (lambda p, t: {"auth_token_file": str(t / "nope")},
                           "server.auth_token_file", "cannot read the file"),
    "token file without tokens": (lambda p, t: {"auth_token_file": _write(t, "tok", "# none\n\n")},
                                  "server.auth_token_file", "holds no token"),
    "short token": (lambda p, t: {"auth_token_file": _write(t, "tok", f"{TOKEN}\nshort-secret\n")},
                    "server.auth_token_file", "line 2: a token must be 16 or more printable ASCII"),
    "token with a space": (lambda p, t: {"auth_token_file": _write(t, "tok", "a secret with blanks\n")},
                           "server.auth_token_file", "line 1: a token must be"),
    "unset token variable": (lambda p, t: {"auth_token_env": "TPSERVE_TEST_UNSET_VARIABLE"},
                             "server.auth_token_env", "not set or empty"),
}


@pytest.mark.parametrize("fields, field_path, problem", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_unusable_files_and_tokens_are_one_line_naming_the_field(pki, tmp_path, fields, field_path, problem):
    with pytest.raises(ConfigError) as err:
        ServerSecurity.load(server_settings(**fields(pki, tmp_path)), source="deploy.yaml")
    message = str(err.value)
    assert message.startswith(f"deploy.yaml: {field_path}: ") and problem in message, message
    assert "\n" not in message and "short-secret" not in message and "blanks" not in message


def test_short_token_in_the_environment(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "short-secret")
    with pytest.raises(ConfigError) as err:
        ServerSecurity.load(server_settings(auth_token_env=TOKEN_ENV))
    assert str(err.value) == (f"<config>: server.auth_token_env: the token in this variable must be 16 "
                              f"or more printable ASCII characters without spaces, got '{TOKEN_ENV}'")


def test_serve_refuses_a_bad_file_before_starting_anything(tmp_path, capsys):
    """`tpserve serve` reads the files before the model, Ray or the replicas: no Ray needed here."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {{path: no-such-model}}\nserver:\n  port: 0\n  metrics_port: null\n"
                   f"  tls_cert_file: {tmp_path}/nope.pem\n  tls_key_file: {tmp_path}/nope.key\n")
    started = time.monotonic()
    assert cli.main(["serve", str(bad)]) == 2
    assert capsys.readouterr().err == (f"{bad}: server.tls_cert_file: cannot read the file: No such "
                                       f"file or directory, got '{tmp_path}/nope.pem'\n")
    assert time.monotonic() - started < 5


def test_client_side_token_file(pki, tmp_path):
    assert read_token_file(str(pki / "client-token")) == TOKEN
    with pytest.raises(ValueError, match="exactly one token, found 2"):
        read_token_file(str(pki / "tokens"))
    with pytest.raises(ValueError, match="line 1: a token must be") as err:
        read_token_file(_write(tmp_path, "t", "short-secret\n"))
    assert "short-secret" not in str(err.value)


# --- one real deployment: TLS + tokens, TP = 2 on Ray ------------------------------------------------


@pytest.fixture(scope="module")
def secure_srv(ray_cluster, smollm2_dir, pki):
    cfg = config(smollm2_dir, **tls_fields(pki), auth_token_file=str(pki / "tokens"))
    with ServerThread(cfg) as server:
        yield server


def test_real_generate_needs_the_token(pki, secure_srv):
    with Client(secure_srv.address, timeout=60, tls=ca(pki)) as anonymous:
        for call in (lambda: anonymous.generate("Hi", max_tokens=2), lambda: list(anonymous.stream("Hi"))):
            with pytest.raises(TPServeError) as err:
                call()
            assert err.value.code is UNAUTHENTICATED
        assert anonymous.health() == "SERVING"  # open for load balancers
    with Client(secure_srv.address, timeout=60, tls=ca(pki), token=WRONG_TOKEN) as wrong:
        with pytest.raises(TPServeError) as err:
            wrong.generate("Hi", max_tokens=2)
        assert err.value.code is UNAUTHENTICATED and WRONG_TOKEN not in err.value.message
    with Client(secure_srv.address, timeout=60, tls=ca(pki), token=TOKEN) as client:
        unary = client.generate("The capital of France is", max_tokens=8, temperature=0)
        streamed = list(client.stream("The capital of France is", max_tokens=8, temperature=0))
        assert "Paris" in unary.text and "".join(d.text for d in streamed) == unary.text
    with open_channel(secure_srv.address, tls=ca(pki)) as channel:
        assert rpc_error(lambda: list_services(channel)).code() is UNAUTHENTICATED


def test_real_server_refuses_plaintext_promptly(secure_srv):
    with Client(secure_srv.address, timeout=10) as client:
        started = time.monotonic()
        with pytest.raises(TPServeError) as err:
            client.health()
    assert err.value.code is UNAVAILABLE and time.monotonic() - started < 5


def test_cli_with_tls_and_a_token(pki, secure_srv, capsys, monkeypatch):
    tls = ["--address", secure_srv.address, "--tls-ca", str(pki / "ca.pem")]
    assert cli.main(["generate", *tls, "--token-file", str(pki / "client-token"), "--json",
                     "--max-tokens", "3", "--ignore-eos", "Hello"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] == 3
    monkeypatch.setenv(cli.TOKEN_ENV, TOKEN)
    assert cli.main(["health", *tls]) == 0
    assert capsys.readouterr().out.startswith("SERVING\nreplica 0: healthy")
    monkeypatch.delenv(cli.TOKEN_ENV)
    assert cli.main(["generate", *tls, "Hello"]) == 1  # no token: UNAUTHENTICATED
    assert "UNAUTHENTICATED: missing bearer token" in capsys.readouterr().err
    assert cli.main(["generate", *tls, "--token-file", str(pki / "wrong-token"), "Hello"]) == 1
    assert capsys.readouterr().err.strip() == "tpserve generate: error: UNAUTHENTICATED: invalid bearer token"


def test_single_node_replica_rendezvous_listens_on_loopback_only(secure_srv):
    """The store listens on 127.0.0.1 (alone, TCPStore would take every interface) and gloo is
    bound to the loopback interface in every rank."""
    replica = secure_srv.server.controller.replicas[0]
    rank0 = replica.ranks[0]
    port = ray.get(rank0.__ray_call__.remote(lambda worker: worker._store.port))
    assert listening_addresses(port) == ["127.0.0.1"]
    ifnames = ray.get([a.__ray_call__.remote(lambda worker: os.environ.get("GLOO_SOCKET_IFNAME"))
                       for a in replica.ranks])
    assert ifnames == ["lo", "lo"]


def listening_addresses(port: int) -> list[str]:
    """The local addresses of the TCP sockets listening on `port` (this machine, any process)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                # the address as 32-bit words in host (little-endian) order
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
                found.append(str(ipaddress.ip_address(raw)))
    return found
