"""Multi-host for real: three hosts built as Linux network namespaces on a bridge, a Ray cluster
across them, and replicas whose ranks span two hosts, talking gloo over the veth links.

The rest of the suite's "multi-node" clusters (`ray.cluster_utils.Cluster`) share one network
stack and one address. Here each host has its own interface and address (10.213.77.1-3 on a
bridge that lives in a namespace of its own; nothing outside these namespaces is contacted), so
the rendezvous store, gloo's connections and Ray's traffic really cross an interface. Needs root
(CI runs as root) and `ip`; without them the test is skipped and says why.

The scenario: `tpserve serve` (in host A, Ray head) with 2 replicas of TP 2 placed strict_spread;
each replica's ranks on two hosts, backend gloo (never shm across hosts); greedy output through
both replicas equals the in-process TP 1 engine's. Then the host that only one replica uses loses
every process (its raylet and rank, SIGKILL, the whole machine gone) while both replicas stream:
the streams of the lost replica resume on the other one and finish with the undisturbed output.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SUBNET = "10.213.77"
PROMPTS = ["The capital of France is", "Water boils at"]
MAX_TOKENS = 48

CLIENT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from cluster.client import Client
prompts, max_tokens = json.loads(sys.argv[3]), int(sys.argv[4])
with Client(sys.argv[2], timeout=300) as c:
    info = c.model_info()
    print(json.dumps({"placement": {r.replica_id: [k.node_ip for k in r.ranks] for r in info.replicas}}), flush=True)
    streams = [c.stream(p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True).start() for p in prompts]
    firsts = [next(s) for s in streams]  # both replicas are decoding
    print(json.dumps({"replicas": [s.replica_id for s in streams]}), flush=True)
    sys.stdin.readline()  # the test takes a host away, then says go on
    out = []
    for s, first in zip(streams, firsts):
        deltas = [first, *s]
        out.append({"tokens": [t for d in deltas for t in d.token_ids], "finish": deltas[-1].finish_reason})
    print(json.dumps({"results": out}), flush=True)
"""


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60)


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs the `ip` tool (iproute2)"
    probe = f"tpprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """Three namespaces A, B, C joined by veth pairs to a bridge in a fourth; torn down whole."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.switch = f"tps{tag}"
        self.names = {h: f"tp{h}{tag}" for h in "ABC"}
        self.ips = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate("ABC")}

    def up(self) -> None:
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for h, ns in self.names.items():
            _sh("ip", "netns", "add", ns)
            host_end, switch_end = f"v{ns}"[:15], f"s{ns}"[:15]
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", switch_end)
            _sh("ip", "link", "set", host_end, "netns", ns)
            _sh("ip", "link", "set", switch_end, "netns", self.switch)
            _sh("ip", "-n", self.switch, "link", "set", switch_end, "master", "br0")
            _sh("ip", "-n", self.switch, "link", "set", switch_end, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.ips[h]}/24", "dev", host_end)
            _sh("ip", "-n", ns, "link", "set", host_end, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def run(self, host: str, *cmd: str, env: dict, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[host], *cmd], env=env, cwd=ROOT, **kw)

    def kill_all(self, host: str) -> int:
        """SIGKILL every process in the host's namespace: the machine is gone."""
        pids = _sh("ip", "netns", "pids", self.names[host], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def down(self) -> None:
        for h in self.names:
            self.kill_all(h)
        time.sleep(0.5)
        for ns in [*self.names.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _ray_start(hosts: Hosts, host: str, env: dict, *args: str) -> None:
    proc = hosts.run(host, str(BIN / "ray"), "start", f"--node-ip-address={hosts.ips[host]}",
                     "--disable-usage-stats", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"ray start on host {host} failed:\n{out[-2000:]}"


@pytest.fixture(scope="module")
def cluster():
    why = _why_no_namespaces()
    if why is not None:
        pytest.skip(why)
    hosts = Hosts()
    # short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes
    tmp = Path(tempfile.mkdtemp(prefix="tpmh", dir="/tmp"))
    # Ray's own token auth, with a token of this test's; RAY_ADDRESS unset so nothing joins the
    # session's test cluster by accident.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_worker_niceness="0")
    server = None
    try:
        hosts.up()
        head = f"{hosts.ips['A']}:6380"
        _ray_start(hosts, "A", env, "--head", "--port=6380", "--num-cpus=2", f"--temp-dir={tmp / 'ray'}",
                   "--include-dashboard=false")
        for h in "BC":
            _ray_start(hosts, h, env, f"--address={head}", "--num-cpus=1")
        cfg = tmp / "multihost.yaml"
        cfg.write_text(
            f"model: {{path: smollm2-135m-instruct}}\n"
            f"ray: {{address: '{head}'}}\n"
            "parallel: {tensor_parallel_size: 2, replicas: 2, placement: strict_spread}\n"
            "device: {type: cpu}\n"
            "engine: {max_model_len: 256, max_batch_size: 4, max_tokens_per_step: 128, kv_cache_tokens: 2048,\n"
            "         collective_timeout_s: 10}\n"
            "server: {host: 127.0.0.1, port: 0, rebuild_failed_replicas: false}\n")
        log = open(tmp / "serve.log", "w+")
        server = hosts.run("A", sys.executable, "-m", "cluster.cli", "serve", str(cfg), env=env, stdout=log,
                           stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        address = None
        while address is None:
            assert server.poll() is None, f"the server exited:\n{Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start:\n{Path(log.name).read_text()[-3000:]}"
            time.sleep(0.5)
            found = re.search(r"serving .* on (127\.0\.0\.1:\d+)", Path(log.name).read_text())
            address = found and found.group(1)
        yield hosts, env, address, Path(log.name)
    finally:
        if server is not None:
            server.kill()
        hosts.down()
        shutil.rmtree(tmp, ignore_errors=True)


def test_replicas_span_hosts_over_gloo_and_fail_over_when_a_host_is_lost(cluster, smollm2_dir):
    from engine_util import greedy, make_engine, run
    from worker.engine import Request

    hosts, env, address, log = cluster
    engine = make_engine(smollm2_dir)  # the reference: TP 1, in this process
    want = [run(engine, [Request("ref", engine.tokenizer.encode(p).ids, greedy(MAX_TOKENS, ignore_eos=True))])
            ["ref"].token_ids for p in PROMPTS]

    client = hosts.run("A", sys.executable, "-c", CLIENT, str(ROOT), address, json.dumps(PROMPTS), str(MAX_TOKENS),
                       env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        placement = {int(k): v for k, v in json.loads(client.stdout.readline())["placement"].items()}
        for replica, ips in placement.items():  # one rank per host, two hosts per replica
            assert len(set(ips)) == 2 and set(ips) <= set(hosts.ips.values()), placement
        text = log.read_text()
        assert len(re.findall(r"replica \d ready: 2 ranks on \[.*\], backend gloo", text)) == 2, text[-2000:]
        replicas = json.loads(client.stdout.readline())["replicas"]
        assert sorted(replicas) == [0, 1]

        # the host only one replica uses (never A: the head, the server and the client live there)
        uses = {h: [r for r, ips in placement.items() if ip in ips] for h, ip in hosts.ips.items()}
        lost = next(h for h in "BC" if len(uses[h]) == 1)
        assert hosts.kill_all(lost) > 0
        client.stdin.write("go\n")
        client.stdin.flush()
        line = client.stdout.readline()
        assert line, f"the client failed: {client.stderr.read()[-3000:]}"
        results = json.loads(line)["results"]
    finally:
        client.kill()
    for got, expect in zip(results, want):
        assert got["tokens"] == expect and got["finish"] == "length"
    assert re.search(rf"replica {uses[lost][0]} \(generation 0\) taken out of routing", log.read_text())
