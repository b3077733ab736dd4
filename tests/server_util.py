"""A tpserve server running in a background thread of the test process, on the session's Ray.

    with ServerThread(config(smollm2_dir)) as srv:
        Client(srv.address).generate("Hello", max_tokens=4)
        srv.server.controller.replicas        # the live replicas, e.g. to find a rank's pid

The server gets its own event loop in its own thread, exactly as `tpserve serve` runs it on the
main thread; tests talk to it only through real gRPC channels (and, for fault injection, through
the controller's view of the replicas).
"""

from __future__ import annotations

import asyncio
import threading

from cluster.config import DeploymentConfig
from cluster.server import Server

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


def config(path: str, **over) -> DeploymentConfig:
    """A small TP = 2 deployment on the test Ray cluster, serving on free ports of 127.0.0.1."""
    base = dict(tensor_parallel_size=2, max_batch_size=64, max_tokens_per_step=256, max_model_len=512,
                kv_cache_tokens=8192, type="cpu", address="auto", collective_timeout_s=10,
                host="127.0.0.1", port=0, metrics_port=0)
    return DeploymentConfig.for_model(path, **{**base, **over})


class ServerThread:
    def __init__(self, cfg: DeploymentConfig):
        self.server = Server(cfg)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tpserve-test-server",
                                        daemon=True)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def start(self) -> "ServerThread":
        self.server.start_cluster()
        self._thread.start()
        try:
            self._run(self.server.start(), START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            if self._thread.is_alive():
                self._run(self.server.stop(grace_s=1.0), STOP_TIMEOUT_S)
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(STOP_TIMEOUT_S)
        finally:
            self.server.shutdown_cluster()

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
