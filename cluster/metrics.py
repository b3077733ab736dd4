"""Prometheus metrics of the server, in a registry owned by one `Metrics` object.

    metrics = Metrics()
    metrics.first_token(replica_id=0, seconds=0.12)
    port = metrics.serve("127.0.0.1", 9400)     # GET http://127.0.0.1:9400/metrics; 0 = a free port
    metrics.close()

Every series is labelled by ``replica`` (the replica id), except error statuses, most of which
happen before a request has a replica. A request that ended before any replica took it (it waited
while every replica was being rebuilt) is counted under ``replica="none"``. Gauges of engine
state (running, waiting, KV-cache use) come from each replica's stats, refreshed about once a
second by the router; counters and histograms are updated as outputs arrive.

    tpserve_requests_running{replica}            sequences in the replica's running batch
    tpserve_requests_waiting{replica}            sequences queued in the replica's engine
    tpserve_kv_cache_usage_ratio{replica}        KV blocks used / KV blocks in the pool
    tpserve_prefix_cache_hit_ratio{replica}      prompt tokens found in the prefix cache / looked up
    tpserve_replica_healthy{replica}             1 while the replica takes requests
    tpserve_replica_failures_total{replica}      times the replica was taken out of routing
    tpserve_request_failovers_total{replica}     requests moved off the replica when it failed (each resumes elsewhere)
    tpserve_replica_restarts_total{replica}      times the replica was rebuilt and took requests again
    tpserve_prompt_tokens_total{replica}         prompt tokens of requests that started generating
    tpserve_generation_tokens_total{replica}     generated tokens
    tpserve_requests_finished_total{replica,reason}   length | stop | eos | cancelled | error | ...
    tpserve_request_errors_total{code}           gRPC status: invalid_argument | resource_exhausted | ...
    tpserve_time_to_first_token_seconds{replica} admission to the first generated token
    tpserve_inter_token_latency_seconds{replica} gap between consecutive generated tokens
    tpserve_e2e_request_latency_seconds{replica} admission to the final output
    tpserve_request_queue_time_seconds{replica}  arrival in the engine to first scheduled
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

NO_REPLICA = "none"  # the replica label of a request no replica ever took (the router's id -1)


def _label(replica_id: int) -> str:
    return str(replica_id) if replica_id >= 0 else NO_REPLICA

# Seconds. Spans a fast CPU decode step (~10 ms) to a long queued request (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("tpserve_requests_running", "Sequences in the running batch",
                             ["replica"], registry=r)
        self.waiting = Gauge("tpserve_requests_waiting", "Sequences queued in the engine",
                             ["replica"], registry=r)
        self.kv_usage = Gauge("tpserve_kv_cache_usage_ratio", "KV-cache blocks in use, 0 to 1",
                              ["replica"], registry=r)
        self.prefix_hits = Gauge("tpserve_prefix_cache_hit_ratio",
                                 "Tokens of admitted sequences found in the prefix cache, 0 to 1",
                                 ["replica"], registry=r)
        self.healthy = Gauge("tpserve_replica_healthy", "1 while the replica takes requests",
                             ["replica"], registry=r)
        self.failures = Counter("tpserve_replica_failures", "Times a replica was taken out of routing",
                                ["replica"], registry=r)
        self.failovers = Counter("tpserve_request_failovers", "Requests moved off a replica when it failed",
                                 ["replica"], registry=r)
        self.restarts = Counter("tpserve_replica_restarts", "Times a replica was rebuilt", ["replica"],
                                registry=r)
        self.prompt_tokens = Counter("tpserve_prompt_tokens", "Prompt tokens", ["replica"], registry=r)
        self.generation_tokens = Counter("tpserve_generation_tokens", "Generated tokens",
                                         ["replica"], registry=r)
        self.finished = Counter("tpserve_requests_finished", "Requests ended, by reason",
                                ["replica", "reason"], registry=r)
        self.errors = Counter("tpserve_request_errors", "Requests that ended with an error status",
                              ["code"], registry=r)
        self.ttft = self._histogram("tpserve_time_to_first_token_seconds", "Time to first token")
        self.itl = self._histogram("tpserve_inter_token_latency_seconds", "Inter-token latency")
        self.e2e = self._histogram("tpserve_e2e_request_latency_seconds", "End-to-end latency")
        self.queue_time = self._histogram("tpserve_request_queue_time_seconds", "Time queued in the engine")
        self._http = None

    def _histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, ["replica"], buckets=LATENCY_BUCKETS, registry=self.registry)

    # -- updates ------------------------------------------------------------------------------
    def replica_stats(self, replica_id: int, stats: dict) -> None:
        label = _label(replica_id)
        self.running.labels(label).set(stats.get("running", 0))
        self.waiting.labels(label).set(stats.get("waiting", 0))
        total = stats.get("kv_blocks_total") or 0
        self.kv_usage.labels(label).set(stats.get("kv_blocks_used", 0) / total if total else 0.0)
        queried = stats.get("prefix_cache_query_tokens") or 0
        self.prefix_hits.labels(label).set(stats.get("prefix_cache_hit_tokens", 0) / queried if queried else 0.0)

    def replica_health(self, replica_id: int, healthy: bool) -> None:
        self.healthy.labels(_label(replica_id)).set(1 if healthy else 0)

    def replica_failed(self, replica_id: int) -> None:
        self.failures.labels(_label(replica_id)).inc()
        self.replica_health(replica_id, False)

    def request_failover(self, replica_id: int) -> None:
        self.failovers.labels(_label(replica_id)).inc()

    def replica_restarted(self, replica_id: int) -> None:
        self.restarts.labels(_label(replica_id)).inc()
        self.replica_health(replica_id, True)

    def first_token(self, replica_id: int, seconds: float, prompt_tokens: int,
                    queued_s: float | None) -> None:
        label = _label(replica_id)
        self.ttft.labels(label).observe(seconds)
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        if queued_s is not None:
            self.queue_time.labels(label).observe(max(0.0, queued_s))

    def tokens(self, replica_id: int, count: int, gap_s: float | None) -> None:
        """`count` tokens arrived together, `gap_s` after the previous ones (None: the first)."""
        label = _label(replica_id)
        self.generation_tokens.labels(label).inc(count)
        if gap_s is not None and count:
            per_token = gap_s / count  # tokens batched in one delta share the gap
            for _ in range(count):
                self.itl.labels(label).observe(per_token)

    def request_finished(self, replica_id: int, reason: str, seconds: float) -> None:
        label = _label(replica_id)
        self.finished.labels(label, reason).inc()
        self.e2e.labels(label).observe(seconds)

    def request_error(self, code: str) -> None:
        self.errors.labels(code).inc()

    # -- endpoint -----------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
