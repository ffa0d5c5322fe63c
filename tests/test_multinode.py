"""Multi-node tensor parallelism on one machine: each "node" is a process tree of its own that
reaches the others only through TCP on its own loopback address (node 0: tritonserver on
127.0.0.1, node 1: `python -m minisgl_backend.node` on 127.0.0.2, node 2 on 127.0.0.3), gloo on CPU.

Served over 2 and 3 nodes, the greedy output equals TP=1's token for token; structured output and
cancellation work across nodes; a node that is killed or goes silent ends the requests in flight
with an error and takes the model out of service, leaving no process on any node; a node that
never joins, or runs another model or other settings, fails the load with a message naming it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jsonschema
import pytest

from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.distributed.fingerprint import fingerprint_mismatch, node_fingerprint
from minisgl_backend.ports import free_ports
from minisgl_backend.testing.nodes import NodeProcess
from minisgl_backend.testing.triton import GrpcStream, grpc_inputs, parse_metric
from minisgl_backend.triton.repository import make_model_repository

ADDRS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
COMMON = {"device": "cpu", "dtype": "float32", "max_total_tokens": 4096, "page_size": 16,
          "max_running_requests": 32, "cpu_threads": 1}
PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5"]
GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
LONG = {"max_tokens": 3000, "temperature": 0.0, "ignore_eos": True}
# model name -> (tp_size, nnodes, tiny model kwargs)
SERVED = {"mn2": (2, 2, dict(arch="llama", num_kv_heads=2)),
          "mn4": (4, 2, dict(arch="qwen3", num_kv_heads=2)),
          "mn3": (3, 3, dict(arch="llama", num_heads=6, num_kv_heads=3, hidden_size=96, intermediate_size=192))}


def _settings(tp: int, nnodes: int, port: int, **extra) -> dict[str, object]:
    """Node 0's settings."""
    return {**COMMON, "tp_size": tp, "nnodes": nnodes, "dist_init_addr": f"{ADDRS[0]}:{port}",
            "node_addr": ADDRS[0], **extra}


def _scheduler_pids(model_path: str) -> list[int]:
    """Scheduler processes serving `model_path`, on any node."""
    out = subprocess.run(["pgrep", "-af", "minisgl_backend.launch"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if f'"{model_path}"' in line]


# ---------------------------------------------------------------- without tritonserver


@pytest.mark.parametrize("settings,message", [
    (dict(tp_size=3, nnodes=2, dist_init_addr="h:1"), "tp_size 3 does not divide over nnodes 2"),
    (dict(tp_size=2, nnodes=2), "nnodes=2 needs dist_init_addr=HOST:PORT"),
    (dict(tp_size=2, nnodes=2, dist_init_addr="head"), "dist_init_addr must be HOST:PORT"),
    (dict(tp_size=2, nnodes=2, dist_init_addr="h:1", node_rank=2), "node_rank must be in [0, nnodes=2)"),
    (dict(master_addr="10.0.0.1"), "'master_addr' was removed: use dist_init_addr=HOST:PORT"),
])
def test_bad_multinode_settings_are_named(tiny_llama, settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        EngineConfig.from_flat(model_path=tiny_llama, **settings)


def test_fingerprint_names_the_first_difference(tiny_model_factory):
    base = dict(nnodes=2, tp_size=2, dist_init_addr="h:1", **COMMON)
    llama = tiny_model_factory("llama", num_kv_heads=2)
    node0 = node_fingerprint(EngineConfig.from_flat(model_path=llama, **base))
    # node-local settings may differ
    local = EngineConfig.from_flat(model_path=llama, **{**base, "node_rank": 1, "node_addr": "10.0.0.2",
                                                        "cpu_threads": 4, "node_timeout_s": 9})
    assert fingerprint_mismatch(node0, node_fingerprint(local), 1) is None
    other = EngineConfig.from_flat(model_path=llama, **{**base, "page_size": 32})
    assert fingerprint_mismatch(node0, node_fingerprint(other), 1) == "node 1 has page_size=32, node 0 has 16"
    deeper = EngineConfig.from_flat(model_path=tiny_model_factory("llama", num_kv_heads=2, num_layers=3), **base)
    assert fingerprint_mismatch(node0, node_fingerprint(deeper), 2) == (
        "node 2's model differs from node 0's: config.json has num_hidden_layers=3 on node 2, 2 on node 0")


def test_a_second_process_as_the_same_node_is_refused(tiny_llama):
    """The handshake in-process: two processes claim node 1; the second is refused at once, the
    first is admitted once node 0 has compared the fingerprints."""
    import threading

    from minisgl_backend.distributed.cluster import ClusterHost, ClusterMember, NodeRefused
    from minisgl_backend.distributed.store import key

    (port,) = free_ports(1)
    host = ClusterHost(EngineConfig.from_flat(model_path=tiny_llama, **_settings(2, 2, port)))
    member_config = EngineConfig.from_flat(model_path=tiny_llama, **{**_settings(2, 2, port), "node_rank": 1})
    first, second = ClusterMember(member_config), ClusterMember(member_config)
    admitted: list[str] = []
    joining = threading.Thread(target=lambda: (first.join("a"), admitted.append("first")))
    try:
        joining.start()
        deadline = time.monotonic() + 30
        while host.store.add(key("joined", 1), 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(NodeRefused, match="another process already joined as node 1"):
            second.join("b")
        host.admit()
        joining.join(30)
        assert admitted == ["first"]
        assert host.failure() is None
    finally:
        first.stop()
        second.stop()
        host.close()


def test_node_started_alone_waits_then_gives_up(tiny_llama, tmp_path):
    (port,) = free_ports(1)
    node = NodeProcess(tiny_llama, 1, 2, f"127.0.0.1:{port}", ADDRS[1], {**COMMON, "tp_size": 2,
                                                                         "node_join_timeout_s": 1},
                       tmp_path / "node1.log")
    try:
        assert node.wait(60) == 2, node.log()
    finally:
        node.stop()
    assert f"node 0's store at 127.0.0.1:{port} did not answer within 1 s" in node.log()


def test_node_exits_when_node0_dies(tiny_llama, tmp_path):
    """Node 0 (here an offline `LLM` in a process of its own) is killed: node 1 loses its store,
    kills its ranks and exits; nothing of either node is left."""
    import sys

    (port,) = free_ports(1)
    settings = _settings(2, 2, port)
    node1 = NodeProcess(tiny_llama, 1, 2, f"{ADDRS[0]}:{port}", ADDRS[1], {**COMMON, "tp_size": 2},
                        tmp_path / "node1.log")
    node0 = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom minisgl_backend import LLM\n"
                              f"llm = LLM({tiny_llama!r}, **{settings!r})\nprint('ready', flush=True)\n"
                              "time.sleep(600)"], stdout=subprocess.PIPE, start_new_session=True, text=True)
    try:
        assert node0.stdout.readline().strip() == "ready"
        assert len(_scheduler_pids(tiny_llama)) == 2
        os.killpg(node0.pid, signal.SIGKILL)
        node0.wait(30)
        assert node1.wait(60) == 1, node1.log()
        assert node1.wait_gone(30) == []
        assert "lost node 0" in node1.log() or "stopped answering" in node1.log(), node1.log()
    finally:
        node1.stop()
        if node0.poll() is None:
            os.killpg(node0.pid, signal.SIGKILL)
            node0.wait(10)
    deadline = time.monotonic() + 10
    while _scheduler_pids(tiny_llama) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _scheduler_pids(tiny_llama) == [], "no scheduler process may outlive its node"


@pytest.mark.parametrize("case", ["model", "setting"])
def test_mismatched_node_is_refused(tiny_model_factory, tmp_path, case):
    """Node 1 runs another model, or another page_size: node 0's start fails naming the
    difference before any rank starts, and node 1 exits with the same message."""
    from minisgl_backend.distributed.cluster import NodeRefused
    from minisgl_backend.frontend import Frontend

    llama = tiny_model_factory("llama", num_kv_heads=2)
    if case == "model":
        model, extra = tiny_model_factory("llama", num_kv_heads=2, num_layers=3), {}
        expected = "node 1's model differs from node 0's: config.json has num_hidden_layers=3 on node 1, 2 on node 0"
    else:
        model, extra = llama, {"page_size": 32}
        expected = "node 1 has page_size=32, node 0 has 16"
    (port,) = free_ports(1)
    node1 = NodeProcess(model, 1, 2, f"{ADDRS[0]}:{port}", ADDRS[1], {**COMMON, "tp_size": 2, **extra},
                        tmp_path / "node1.log")
    try:
        with pytest.raises(NodeRefused, match=re.escape(expected)):
            Frontend(EngineConfig.from_flat(model_path=llama, **_settings(2, 2, port)))
        assert node1.wait(60) == 2 and expected in node1.log(), node1.log()
    finally:
        node1.stop()
    assert _scheduler_pids(llama) == [] and _scheduler_pids(model) == []


# ---------------------------------------------------------------- through tritonserver


class Cluster:
    """One tritonserver (node 0 of every model, explicit model control) and the other nodes."""

    def __init__(self, server, repo, paths: dict[str, str], ports: dict[str, int], nodes: dict[str, list]) -> None:
        self.server, self.repo, self.paths, self.ports, self.nodes = server, repo, paths, ports, nodes

    def load(self, name: str) -> tuple[int, str]:
        """POST the repository API's load of `name`: (HTTP status, body)."""
        req = urllib.request.Request(f"http://{self.server.http_url}/v2/repository/models/{name}/load",
                                     data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()


@pytest.fixture(scope="module")
def cluster(triton_server_factory, tiny_model_factory, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    paths = {name: tiny_model_factory(**kw) for name, (_, _, kw) in SERVED.items()}
    ports = dict(zip(list(SERVED) + ["absent"], free_ports(len(SERVED) + 1)))
    repo = work / "repo"
    for name, (tp, nnodes, _) in SERVED.items():
        make_model_repository(repo, {"model_path": paths[name], **_settings(tp, nnodes, ports[name])}, model_name=name)
    make_model_repository(repo, {"model_path": paths["mn2"], **_settings(3, 3, ports["absent"],
                                                                        node_join_timeout_s=3)}, model_name="absent")
    nodes: dict[str, list[NodeProcess]] = {}
    try:
        # the other nodes start first: they wait for node 0
        for name, (tp, nnodes, _) in SERVED.items():
            nodes[name] = [NodeProcess(paths[name], r, nnodes, f"{ADDRS[0]}:{ports[name]}", ADDRS[r],
                                       {**COMMON, "tp_size": tp}, work / f"{name}-node{r}.log")
                           for r in range(1, nnodes)]
        loads = [f"--load-model={name}" for name in SERVED]
        with triton_server_factory("multinode", {name: {} for name in SERVED}, repository=repo,
                                   extra_args=["--model-control-mode=explicit", *loads]) as srv:
            yield Cluster(srv, repo, paths, ports, nodes)
        # the server unloaded every model that was still loaded: their nodes exit cleanly
        for name, group in nodes.items():
            for node in group:
                if node.proc.returncode is None:
                    assert node.wait(60) == 0, node.log()
    finally:
        for group in nodes.values():
            for node in group:
                node.stop()
    for group in nodes.values():
        for node in group:
            assert "resource leak" not in node.log(), node.log()


def _generate(srv, model: str, prompts: list[str], params: dict) -> dict[str, dict]:
    client = GrpcStream(srv.grpc_url, model=model)
    try:
        for i, prompt in enumerate(prompts):
            client.send(f"r{i}", grpc_inputs(prompt, stream=True, return_num_output_tokens=True), parameters=params)
        return client.collect([f"r{i}" for i in range(len(prompts))])
    finally:
        client.close()


@pytest.mark.triton
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(SERVED))
def test_greedy_over_nodes_equals_tp1(cluster, name):
    from minisgl_backend import LLM, SamplingParams

    assert cluster.server.model_ready(name)
    with LLM(cluster.paths[name], **COMMON) as tp1:
        reference = tp1.generate(PROMPTS, SamplingParams(**GREEDY))
    got = _generate(cluster.server, name, PROMPTS, GREEDY)
    for i, ref in enumerate(reference):
        out = got[f"r{i}"]
        assert out["error"] is None, out["error"]
        assert "".join(out["texts"]) == ref["text"]
        # a streamed response counts its own tokens
        count = sum(int(o["num_output_tokens"][0]) for o in out["outputs"] if "num_output_tokens" in o)
        assert count == len(ref["token_ids"]) == GREEDY["max_tokens"]


@pytest.mark.triton
@pytest.mark.timeout(600)
def test_structured_output_over_nodes(cluster):
    from minisgl_backend import LLM, SamplingParams

    schema = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer"}},
              "required": ["kind", "age"]}
    cases = [({"choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
             ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
             ({"json": schema}, lambda t: jsonschema.validate(json.loads(t), schema) is None)]
    sampling = [{"max_tokens": 48, "temperature": 1.0, "seed": 7 + i, "structured_outputs": c}
                for i, (c, _) in enumerate(cases)]
    with LLM(cluster.paths["mn4"], **COMMON) as tp1:
        reference = tp1.generate(["Hello there"] * len(cases), [SamplingParams(**s) for s in sampling])
    client = GrpcStream(cluster.server.grpc_url, model="mn4")
    try:
        for i, body in enumerate(sampling):
            client.send(f"s{i}", grpc_inputs("Hello there", stream=True, exclude_input_in_output=True,
                                             sampling_parameters=json.dumps(body)))
        got = client.collect([f"s{i}" for i in range(len(cases))])
    finally:
        client.close()
    for i, (_, check) in enumerate(cases):
        text = "".join(got[f"s{i}"]["texts"])
        assert got[f"s{i}"]["error"] is None and check(text), (i, text, got[f"s{i}"]["error"])
        assert text == reference[i]["text"]


@pytest.mark.triton
@pytest.mark.timeout(600)
def test_cancellation_over_nodes_frees_every_page(cluster):
    srv = cluster.server
    labels = {"model": "mn2", "finish_reason": "abort"}
    aborted_before = srv.metric("minisgl_requests_total", labels)
    client = GrpcStream(srv.grpc_url, model="mn2")
    for i in range(3):
        client.send(f"long{i}", grpc_inputs(PROMPTS[i], stream=True), parameters=LONG)
    client.wait_started([f"long{i}" for i in range(3)])
    client.close(cancel=True)
    deadline = time.monotonic() + 30
    while srv.metric("minisgl_requests_total", labels) < aborted_before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert srv.metric("minisgl_requests_total", labels) == aborted_before + 3
    srv.wait_idle()
    text = srv.metrics_text()
    assert parse_metric(text, "minisgl_kv_pages", {"model": "mn2", "state": "locked"}) == 0
    got = _generate(srv, "mn2", PROMPTS[:1], GREEDY)  # still serving, over both nodes
    assert got["r0"]["error"] is None


def _stream_then(cluster, name: str, action) -> dict[str, dict]:
    """Start long streams on `name`, run `action()` once they run, collect what they end with."""
    clients = [GrpcStream(cluster.server.grpc_url, model=name) for _ in range(2)]  # errors carry no id: one each
    try:
        for i, client in enumerate(clients):
            client.send(f"long{i}", grpc_inputs("a b c", stream=True), parameters=LONG)
        for i, client in enumerate(clients):
            client.wait_started([f"long{i}"])
        action()
        got = {}
        for i, client in enumerate(clients):
            got.update(client.collect([f"long{i}"], timeout=60))
        return got
    finally:
        for client in clients:
            client.close()


def _wait_unloaded(cluster, name: str) -> None:
    deadline = time.monotonic() + 60
    while (cluster.server.model_ready(name) or _scheduler_pids(cluster.paths[name])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not cluster.server.model_ready(name), "a model whose group failed must not report ready"
    assert _scheduler_pids(cluster.paths[name]) == [], "no scheduler process may be left on any node"


@pytest.mark.triton
@pytest.mark.timeout(600)
def test_silent_node_ends_requests_and_the_group(cluster):
    """Node 1 stops answering (SIGSTOP: its connections stay open, like a host that lost the
    network): its heartbeat stops, node 0 fails the requests and unloads; once node 1 runs
    again it finds the group gone and exits, its ranks with it."""
    (node,) = cluster.nodes["mn4"]
    got = _stream_then(cluster, "mn4", lambda: node.signal(signal.SIGSTOP))
    try:
        assert all("node 1 stopped answering" in str(r["error"]) for r in got.values()), got
        deadline = time.monotonic() + 60
        while cluster.server.model_ready("mn4") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not cluster.server.model_ready("mn4")
    finally:
        node.signal(signal.SIGCONT)
    assert node.wait(60) == 1, node.log()
    assert node.wait_gone(30) == [], "node 1's ranks must exit with it"
    _wait_unloaded(cluster, "mn4")


@pytest.mark.triton
@pytest.mark.timeout(600)
def test_killed_node_ends_requests_and_leaves_nothing(cluster):
    (node,) = cluster.nodes["mn2"]
    got = _stream_then(cluster, "mn2", lambda: node.signal(signal.SIGKILL))
    assert all(r["error"] and "engine failure" in str(r["error"]) for r in got.values()), got
    _wait_unloaded(cluster, "mn2")
    assert node.wait_gone(30) == []
    assert cluster.server.model_ready("mn3"), "the other models keep serving"
    assert _generate(cluster.server, "mn3", PROMPTS[:1], GREEDY)["r0"]["error"] is None


@pytest.mark.triton
@pytest.mark.timeout(600)
def test_node_that_never_joins_fails_the_load(cluster, tmp_path):
    """nnodes=3, node 1 joins, node 2 never starts: the load fails naming node 2, node 1 exits."""
    node1 = NodeProcess(cluster.paths["mn2"], 1, 3, f"{ADDRS[0]}:{cluster.ports['absent']}", ADDRS[1],
                        {**COMMON, "tp_size": 3}, tmp_path / "absent-node1.log")
    try:
        status, body = cluster.load("absent")
        assert status == 400, body
        assert "node 2 (node_rank) did not join within 3 s" in body, body
        assert node1.wait(60) == 2, node1.log()
        assert "node 2 (node_rank) did not join" in node1.log()
    finally:
        node1.stop()
    assert _scheduler_pids(cluster.paths["mn2"]) == []
