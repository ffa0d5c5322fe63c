"""`make serve-cluster` refuses to start, with a message naming the cause, and leaves nothing
running: a port that is taken, a router that is not installed, a replica that never becomes
ready. Plus the pure parts of the cluster supervisor (port checks, arguments, the router's flags).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from minisgl_backend.checkout import ROOT
from minisgl_backend.cluster import RouterSpec, parse_args
from minisgl_backend.ports import port_is_free
from minisgl_backend.testing.cluster import ServeCluster, TreeSampler, cluster_ports, expand_ports
from minisgl_backend.triton.supervise import port_problems


def test_port_problems_name_the_port_and_its_user():
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        busy = held.getsockname()[1]
        free = cluster_ports(1)["HTTP_PORT"]
        problems = port_problems([(free, "a"), (busy, "replica 1's OpenAI frontend"), (free, "b")])
    assert problems == [f"port {free} is given twice: a and b",
                        f"port {busy} (replica 1's OpenAI frontend) is already in use: stop what holds it or "
                        "choose another port"]


def test_arguments_and_router_flags():
    args = parse_args(["--model-repository", "r", "--replicas", "2", "--policy", "power_of_two", "--", "--log-verbose=1"])
    assert args.replicas == 2 and args.policy == "power_of_two" and args.triton_args == ["--log-verbose=1"]
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", "r", "--replicas", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", "r", "--policy", "fastest"])
    cmd = RouterSpec(["http://a:1", "http://b:2"], 30000, 29000, "cache_aware", health_check_interval=3).command("py")
    from sglang_router.launch_router import parse_router_args  # the router's own parser takes them

    parsed = parse_router_args(cmd[3:])
    assert parsed.worker_urls == ["http://a:1", "http://b:2"] and parsed.policy == "cache_aware"
    assert parsed.health_check_interval_secs == 3 and parsed.cb_timeout_duration_secs == 6
    assert parsed.port == 30000 and parsed.prometheus_port == 29000


@pytest.mark.triton
def test_a_port_in_use_stops_make_serve_cluster(tiny_llama, tmp_path):
    layout = cluster_ports(2)
    ports = {k: str(v) for k, v in layout.items()}
    taken = layout["OPENAI_PORT"] + 1  # replica 1's OpenAI frontend
    with socket.socket() as held:
        held.bind(("0.0.0.0", taken))
        held.listen()
        run = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.minisgl-setup", "-o", "build/triton/env.sh",
                              "serve-cluster", f"MODEL={tiny_llama}", "REPLICAS=2", f"CLUSTER_LOG_DIR={tmp_path}",
                              *(f"{k}={v}" for k, v in ports.items())],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert f"port {taken} (replica 1's OpenAI frontend) is already in use" in out, out
    assert "starting replica" not in out and not list(tmp_path.glob("replica-*.log")), "nothing may start"
    assert all(port_is_free(p) for p in expand_ports(layout, 2))


def test_a_router_that_is_not_installed_stops_serve_cluster(tmp_path):
    layout = cluster_ports(1)
    blocked = ("import sys; sys.modules['sglang_router'] = None; "  # as if the package were missing
               "from minisgl_backend.cluster import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", blocked, "--model-repository", str(ROOT / "model_repository"),
                          "--replicas", "1", "--http-port", str(layout["HTTP_PORT"]),
                          "--grpc-port", str(layout["GRPC_PORT"]), "--metrics-port", str(layout["METRICS_PORT"]),
                          "--openai-port", str(layout["OPENAI_PORT"]), "--router-port", str(layout["ROUTER_PORT"]),
                          "--router-metrics-port", str(layout["ROUTER_METRICS_PORT"]), "--log-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "the router is not installed: no module 'sglang_router'" in run.stdout
    assert "make setup" in run.stdout and "sglang-router==0.3.2" in run.stdout
    assert "starting replica" not in run.stdout and not list(tmp_path.glob("replica-*.log"))


@pytest.mark.triton
def test_a_replica_that_never_becomes_ready_stops_serve_cluster(tiny_llama, tmp_path, require_triton):
    cluster = ServeCluster(tiny_llama, tmp_path, replicas=2, settings="max_total_tokens=1024",
                           env={"READY_TIMEOUT": "1"})
    try:
        cluster.launch()
        with TreeSampler(cluster.proc.pid) as sampler:
            code = cluster.wait_exit(120)
        out = cluster.text()
        assert code == 1, out
        assert "before it was ready; the end of" in out and "model not ready after 1 s" in out, out
        assert "sglang-router on port" not in out, "the router starts only after every replica is ready"
        assert any("bin/tritonserver" in cmd for cmd in sampler.seen.values()), "the replicas did start"
        assert sampler.alive() == [], "processes outlived serve-cluster"
        assert all(port_is_free(p) for p in cluster.ports)
    finally:
        cluster.cleanup()


@pytest.mark.triton
def test_sigterm_while_replicas_start_stops_every_process(tiny_llama, tmp_path, require_triton):
    """SIGTERM to the cluster supervisor alone (as systemd or Kubernetes stop it) while its
    replicas load: it stops them (each replica's supervisor stops its tritonserver), and nothing
    outlives it. (Ctrl-C to a serving cluster: tests/test_cluster.py.)"""
    cluster = ServeCluster(tiny_llama, tmp_path, replicas=2, settings="max_total_tokens=1024")
    try:
        cluster.launch()
        with TreeSampler(cluster.proc.pid) as sampler:
            deadline = time.monotonic() + 60
            while sum("bin/tritonserver" in cmd for cmd in list(sampler.seen.values())) < 2:
                assert time.monotonic() < deadline and cluster.proc.poll() is None, cluster.text()
                time.sleep(0.1)
            cluster.stop(signal.SIGTERM)
            code = cluster.wait_exit(60)
        assert code == 128 + signal.SIGTERM, cluster.text()
        assert "signal SIGTERM: stopping the router and 2 replicas" in cluster.text()
        assert sampler.alive() == [], "processes outlived serve-cluster"
        assert all(port_is_free(p) for p in cluster.ports)
    finally:
        cluster.cleanup()
