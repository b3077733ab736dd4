"""Builds and runs the tpserve server: replicas on Ray, the gRPC API, health, reflection, metrics.

    tpserve serve configs/default.yaml      # the CLI; `run(cfg)` below

    server = Server(cfg)
    server.start_cluster(progress)          # blocking: Ray up, replicas placed, loaded, warmed up
    await server.start()                    # on the serving event loop: router, gRPC, metrics
    server.address                          # e.g. "127.0.0.1:50051" (port 0 in the config = a free one)
    await server.stop(grace_s=5)            # NOT_SERVING, drain for grace_s, CANCELLED for the rest
    server.shutdown_cluster()

One gRPC port serves `tpserve.v1.TPServe`, the standard `grpc.health.v1.Health` (SERVING for ""
and "tpserve.v1.TPServe" exactly while every replica can generate) and server reflection, so
generic tools (grpcurl, grpc_cli) can call the API without our stubs. Prometheus metrics are
served on ``server.metrics_port`` when it is set.

TLS (mutual with a client CA) and bearer tokens come from the config through `ServerSecurity`
(cluster/auth.py), read when the `Server` is built, before the cluster starts. The HTTP/2 limits
(streams per connection, keepalive, idle and age of connections) are `connection_options`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import sys

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.auth import ServerSecurity
from cluster.config import DeploymentConfig, ServerSettings
from cluster.controller import Controller
from cluster.frontend import SERVICE, TPServeServicer, add_to_server, describe_model, server_version
from cluster.kserve import KServeServicer, add_kserve_to_server
from cluster.metrics import Metrics
from cluster.openai_api import build_app
from cluster.router import AdmissionPolicy, Router
from cluster.validation import Limits, RequestValidator

DEFAULT_GRACE_S = 5.0
FINAL_MESSAGE_GRACE_S = 2.0  # after the router closed: time for handlers to send their last message
HEALTH_SERVICES = ("", SERVICE)  # "" is the server as a whole


class ServeError(RuntimeError):
    """The server could not start (e.g. its port is taken); the message says why."""


class Server:
    def __init__(self, cfg: DeploymentConfig, controller: Controller | None = None):
        self.security = ServerSecurity.load(cfg.server, cfg.source)  # a bad file fails in seconds
        self.controller = controller or Controller(cfg)  # resolves and checks cfg against the model
        self.cfg = self.controller.cfg
        self.metrics = Metrics()
        self.address: str | None = None
        self.metrics_port: int | None = None
        self.router: Router | None = None
        self._grpc: grpc.aio.Server | None = None
        self._servicer: TPServeServicer | None = None
        self._http: _HttpServer | None = None
        self._http_task: asyncio.Future | None = None
        self.http_address: str | None = None  # the OpenAI-compatible API, when http.enabled
        self._health: health.aio.HealthServicer | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ----------------------------------------------------------------------------
    def start_cluster(self, progress=None) -> None:
        """`progress(replica_id, done, total)` is called while weights load."""
        self.controller.start(progress=progress)

    async def start(self) -> None:
        """Router, gRPC server (API, health, reflection) and metrics endpoint, on this loop."""
        s = self.cfg.server
        validator = RequestValidator.for_checkpoint(
            self.controller.model_path, Limits.from_config(self.cfg, self.controller.model.vocab_size))
        self._health = health.aio.HealthServicer()
        self.router = Router(self.controller, AdmissionPolicy.from_config(self.cfg), self.metrics,
                             on_health=self._health_changed, rebuild=s.rebuild_failed_replicas,
                             max_retries=s.max_request_retries, wait_s=s.failover_wait_s)
        self.router.start(asyncio.get_running_loop())
        self._servicer = TPServeServicer(self.router, validator, describe_model(self.controller, validator),
                                         request_timeout_s=s.request_timeout_s, metrics=self.metrics)
        self._grpc = grpc_server(s, self.security)
        add_to_server(self._servicer, self._grpc)
        kserve = KServeServicer(self._servicer, self.router, self.cfg.model.name, server_version())
        add_kserve_to_server(kserve, self._grpc)  # KServe v2 on the same port
        add_health_and_reflection(self._grpc, self._health)
        self.address = listen(self._grpc, s.host, s.port, self.security.credentials)
        await self._grpc.start()
        await self._set_health(self.router.serving)
        if self.cfg.http.enabled:
            await self._start_http()
        if s.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
            except OSError as err:
                raise ServeError(f"server.metrics_port: cannot listen on {s.host}:{s.metrics_port}: "
                                 f"{err.strerror or err}") from None

    async def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Health goes NOT_SERVING and new requests get UNAVAILABLE; requests in flight get
        `grace_s` to finish, the rest end with finish reason CANCELLED; then gRPC stops."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.router is not None:
            await self.router.close(grace_s)
        if self._grpc is not None:
            await self._grpc.stop(FINAL_MESSAGE_GRACE_S)
        if self._http is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, FINAL_MESSAGE_GRACE_S + 5)
        if self._servicer is not None:
            self._servicer.close()
        self.metrics.close()

    def shutdown_cluster(self) -> None:
        self.controller.shutdown()

    # -- helpers ------------------------------------------------------------------------------
    async def _start_http(self) -> None:
        """The OpenAI-compatible API on uvicorn, on this event loop, with the gRPC side's TLS
        files and tokens."""
        h, s = self.cfg.http, self.cfg.server
        host = h.host or s.host
        app = build_app(self._servicer, self.router, self.cfg.model.name, self.security.token_check,
                        open_health=s.health_without_token, metrics=self.metrics)
        sock = bind_socket("http.port", host, h.port)
        tls = {}
        if s.tls_cert_file is not None:
            tls = dict(ssl_certfile=s.tls_cert_file, ssl_keyfile=s.tls_key_file)
            if s.tls_client_ca_file is not None:
                tls.update(ssl_ca_certs=s.tls_client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=FINAL_MESSAGE_GRACE_S, **tls)
        self._http = _HttpServer(config)
        self._http_task = asyncio.ensure_future(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises what stopped it
                raise ServeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        self.http_address = f"{'https' if tls else 'http'}://{host}:{port}"

    def _health_changed(self, serving: bool) -> None:
        """Called on the loop by the router; the task is kept until done (the loop holds only a
        weak reference to it)."""
        task = asyncio.ensure_future(self._set_health(serving))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in HEALTH_SERVICES:
            await self._health.set(service, status)


class _HttpServer(uvicorn.Server):
    """uvicorn's server without its signal handling: `tpserve serve` handles SIGINT and SIGTERM
    itself and stops the HTTP side with the rest."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def grpc_server(s: ServerSettings, security: ServerSecurity) -> grpc.aio.Server:
    """A gRPC server with no services yet: the connection limits of `s`, the token check of
    `security`."""
    return grpc.aio.server(options=connection_options(s), interceptors=security.interceptors)


def connection_options(s: ServerSettings) -> list[tuple[str, int]]:
    """gRPC core's channel arguments for the HTTP/2 limits of the config's server section."""
    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options = [
        ("grpc.so_reuseport", 0),  # a port another process holds is an error, not shared
        ("grpc.max_concurrent_streams", s.max_concurrent_streams),
        ("grpc.keepalive_time_ms", ms(s.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(s.keepalive_timeout_s)),
        # client pings more often than this (without data between) earn strikes, then GOAWAY
        ("grpc.http2.min_ping_interval_without_data_ms", ms(s.client_keepalive_min_time_s)),
        ("grpc.keepalive_permit_without_calls", int(s.client_keepalive_without_calls)),
    ]
    for name, seconds in (("grpc.max_connection_idle_ms", s.max_connection_idle_s),
                          ("grpc.max_connection_age_ms", s.max_connection_age_s),
                          ("grpc.max_connection_age_grace_ms", s.max_connection_age_grace_s)):
        if seconds is not None:  # None: gRPC's default, no limit
            options.append((name, ms(seconds)))
    return options


def add_health_and_reflection(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)


def listen(server: grpc.aio.Server, host: str, port: int,
           credentials: grpc.ServerCredentials | None) -> str:
    """Bind `host:port` (0 = a free port), over TLS when `credentials` are given; the address."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    address = f"{shown}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise ServeError(f"cannot listen on {address}: {err}") from None
    if bound == 0:
        raise ServeError(f"cannot listen on {address}")
    return f"{shown}:{bound}"


class LoadProgress:
    """One tqdm bar per replica on stderr while its ranks load their weights."""

    def __init__(self):
        self._bars = {}

    def __call__(self, replica_id: int, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._bars.get(replica_id)
        if bar is None:
            bar = self._bars[replica_id] = tqdm(total=total, desc=f"replica {replica_id} weights",
                                                unit="tensor", file=sys.stderr, leave=True)
        bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def run(cfg: DeploymentConfig, *, grace_s: float = DEFAULT_GRACE_S) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully and release the cluster."""
    check_ports_free(cfg.server, cfg.http)  # fail before spending a minute on starting replicas
    server = Server(cfg)
    try:
        progress = LoadProgress()
        try:
            server.start_cluster(progress)
        finally:
            progress.close()
        asyncio.run(_serve_until_signal(server, grace_s))
    finally:
        server.shutdown_cluster()


def check_ports_free(s, h=None) -> None:
    """Raise ServeError when server.port, server.metrics_port or http.port is already taken."""
    ports = [("server.port", s.host, s.port), ("server.metrics_port", s.host, s.metrics_port)]
    if h is not None and h.enabled:
        ports.append(("http.port", h.host or s.host, h.port))
    for name, host, port in ports:
        if port:  # not none, nor 0 = any free port
            bind_socket(name, host, port).close()


def bind_socket(name: str, host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (TIME_WAIT is fine, as for gRPC); ServeError naming the
    config field `name` when it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise ServeError(f"{name}: cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


async def _serve_until_signal(server: Server, grace_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        c = server.cfg
        metrics = f"; metrics on http://{c.server.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        if server.http_address:
            metrics += f"; OpenAI-compatible HTTP on {server.http_address}/v1"
        print(f"tpserve: serving {c.model.name} on {server.address} ({c.parallel.replicas} × TP "
              f"{c.parallel.tensor_parallel_size}, {c.device.type}; {server.security.description})"
              f"{metrics}", file=sys.stderr, flush=True)
        await stop.wait()
        print(f"tpserve: stopping (up to {grace_s:g} s for requests in flight)", file=sys.stderr, flush=True)
    finally:
        await server.stop(grace_s)
