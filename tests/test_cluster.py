"""`make serve-cluster`: three replicas behind sglang-router, with real processes.

One cluster per module (`scripts/serve_cluster.sh`, tiny random Llama, a 2,048-token KV pool per
replica, an API key, the router on round_robin), plus a cache_aware sglang-router started here
with the same flags in front of the same replicas. The tests run in file order: the last two
kill a replica's tritonserver and stop the whole cluster.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time

import httpx
import pytest

from minisgl_backend.testing.cluster import ExtraRouter, ServeCluster, router_sent, router_workers
from minisgl_backend.testing.procinfo import descendants

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.usefixtures("require_triton")]

MODEL = "minisgl"
KEY = "sk-cluster-test"
REPLICAS = 3
SETTINGS = "max_total_tokens=2048 page_size=16 max_running_requests=16"
WORDS = ("alpha river stone cloud quiet maple orbit lantern copper meadow signal harbor velvet summit ember "
         "willow canyon prism thistle marble").split()


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    serve = ServeCluster(tiny_llama, tmp_path_factory.mktemp("cluster"), replicas=REPLICAS, policy="round_robin",
                         settings=SETTINGS, api_key=KEY)
    serve.start(timeout=400)
    yield serve
    serve.cleanup()


@pytest.fixture(scope="module")
def http() -> httpx.Client:
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def chat(http: httpx.Client, base_url: str, messages: list[dict], max_tokens: int = 4) -> dict:
    resp = http.post(f"{base_url}/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    return resp.json()


def total(cluster: ServeCluster, name: str, labels: dict[str, str] | None = None) -> float:
    return sum(r.metric(name, labels) for r in cluster.replicas)


def test_the_router_serves_the_model_by_name(cluster, http):
    models = http.get(f"{cluster.router_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert router_workers(cluster.router_url) == {r.openai_url: True for r in cluster.replicas}
    answer = chat(http, cluster.router_url, [{"role": "user", "content": "hello"}])
    assert answer["model"] == MODEL and answer["usage"]["completion_tokens"] == 4
    assert "serve-cluster: READY" in cluster.text()


def test_api_key_through_the_router(cluster):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = httpx.post(f"{cluster.router_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "invalid_api_key"  # the replica's answer, in OpenAI's shape
    ok = httpx.post(f"{cluster.router_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                    timeout=60)
    assert ok.status_code == 200
    for replica in cluster.replicas:  # the probes stay open
        for path in ("/health", "/metrics", "/get_load", "/server_info", "/model_info"):
            assert httpx.get(f"{replica.openai_url}{path}", timeout=30).status_code == 200, path


# ---------------------------------------------------------------- cache-aware routing


def system_prompts(seed: int, count: int = 6) -> list[str]:
    """`count` distinct system prompts of 512+ tokens (checked in the test)."""
    rng = random.Random(seed)
    return [f"You are assistant {seed}-{c}. " + " ".join(rng.choice(WORDS) for _ in range(140)) for c in range(count)]


def run_conversations(http: httpx.Client, base_url: str, seed: int, turns: int = 6) -> list[tuple[list[dict], str]]:
    """One client per system prompt, all at once: each sends its conversation's turns one after
    another (each turn carries the conversation so far), after a random pause, so that the turns
    of different conversations arrive in a random order. Each request's messages and answer."""
    systems = system_prompts(seed)
    done: list[tuple[list[dict], str]] = []
    together = threading.Barrier(len(systems))
    errors: list[BaseException] = []

    def client(c: int) -> None:
        rng = random.Random(seed * 100 + c)
        history = [{"role": "system", "content": systems[c]}]
        try:
            together.wait(60)  # the first turns arrive together
            for turn in range(turns):
                history.append({"role": "user", "content": f"Question {turn}: tell me about {rng.choice(WORDS)}."})
                messages = list(history)
                text = chat(http, base_url, messages)["choices"][0]["message"]["content"]
                history.append({"role": "assistant", "content": text})
                done.append((messages, text))
                time.sleep(rng.uniform(0, 0.05))
        except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(systems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    assert len(done) == len(systems) * turns
    return done


def measured(cluster: ServeCluster, run) -> tuple[list, float, float]:
    """Run `run()`; (its result, cache-hit tokens and prompt tokens it added over the replicas)."""
    before_requests = total(cluster, "minisgl_requests_total")
    hits, prompt = total(cluster, "minisgl_cache_hit_tokens_total"), total(cluster, "minisgl_prompt_tokens_total")
    result = run()
    deadline = time.monotonic() + 30  # counters reach Triton with the watcher's next flush
    while total(cluster, "minisgl_requests_total") < before_requests + len(result):
        assert time.monotonic() < deadline, "the replicas' request counters did not catch up"
        time.sleep(0.2)
    return (result, total(cluster, "minisgl_cache_hit_tokens_total") - hits,
            total(cluster, "minisgl_prompt_tokens_total") - prompt)


def test_cache_aware_routing_hits_the_cache_more_with_the_same_outputs(cluster, http, tmp_path, tiny_llama):
    """Six 512+-token system prompts, six turns each, six clients at once: through the cluster's
    round_robin router, then (other prompts of the same shapes) through a cache_aware router over
    the same replicas. Each replica's pool holds about two conversations: cache_aware keeps each
    conversation on one replica (the first turns, arriving together, spread by load), round_robin
    spreads every one over all three."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert min(len(tokenizer.encode(s)) for s in system_prompts(1) + system_prompts(2)) >= 512

    round_robin, rr_hits, rr_prompt = measured(cluster, lambda: run_conversations(http, cluster.router_url, 1))
    with ExtraRouter([r.openai_url for r in cluster.replicas], "cache_aware", tmp_path / "router.log") as router:
        cache_aware, ca_hits, ca_prompt = measured(cluster, lambda: run_conversations(http, router.url, 2))
    report = {"round_robin": {"hit_tokens": rr_hits, "prompt_tokens": rr_prompt},
              "cache_aware": {"hit_tokens": ca_hits, "prompt_tokens": ca_prompt}}
    print(json.dumps(report))
    assert rr_prompt > 0 and ca_prompt > 0
    assert ca_hits >= 1.5 * rr_hits, report
    # every greedy answer equals one replica's own for the same messages
    single = cluster.replicas[0].openai_url
    for messages, text in round_robin + cache_aware:
        assert chat(http, single, messages)["choices"][0]["message"]["content"] == text


# ---------------------------------------------------------------- disconnects, a dead replica


def _busy_replica(cluster: ServeCluster, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, replica in enumerate(cluster.replicas):
            if replica.metric("minisgl_num_requests_running") > 0:
                return i
        time.sleep(0.1)
    raise AssertionError("no replica shows the request as running")


def test_a_client_that_disconnects_through_the_router_frees_the_pages(cluster, http):
    """Mid-stream, and while waiting for a whole answer: the router drops its upstream connection,
    the replica's frontend cancels its gRPC stream, the engine aborts the request."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long story"}], "max_tokens": 1500,
            "ignore_eos": True}
    raw = json.dumps(body).encode()
    port = int(cluster.router_url.rsplit(":", 1)[1])
    for stream in (True, False):
        for replica in cluster.replicas:
            _wait_idle(replica)
        aborted = total(cluster, "minisgl_requests_total", {"finish_reason": "abort"})
        if stream:
            with http.stream("POST", f"{cluster.router_url}/v1/chat/completions", json={**body, "stream": True}) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                for _ in range(3):
                    next(lines)
                busy = cluster.replicas[_busy_replica(cluster)]
        else:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
                busy = cluster.replicas[_busy_replica(cluster)]
        deadline = time.monotonic() + 30
        while total(cluster, "minisgl_requests_total", {"finish_reason": "abort"}) <= aborted:
            assert time.monotonic() < deadline, f"the Triton request was not cancelled (stream={stream})"
            time.sleep(0.2)
        _wait_idle(busy)


def _wait_idle(replica, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (replica.metric("minisgl_num_requests_running") or replica.metric("minisgl_kv_pages", {"state": "locked"})
           or replica.metric("minisgl_kv_cache_usage_ratio")):
        assert time.monotonic() < deadline, "the replica did not return to idle"
        time.sleep(0.2)


def _request(http: httpx.Client, url: str, content: str, stream: bool, results: dict, key: str,
             started: threading.Event) -> None:
    """One chat completion: its finish reason, or the error that ended it, and how long it took.
    `started` is set once a stream's first text arrived (before that, sglang-router retries a
    request whose replica fails on another one, and the client never sees the failure)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "ignore_eos": True, "stream": stream,
            "max_tokens": 1800 if stream else 64}  # a stream and a whole answer fit one replica's pool
    begun = time.monotonic()
    try:
        with http.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as resp:
            if not stream:
                started.set()
            if resp.status_code != 200:
                results[key] = ("status", resp.status_code, resp.read().decode()[:300])
            elif not stream:
                results[key] = ("finished", json.loads(resp.read())["choices"][0]["finish_reason"])
            else:
                outcome = ("cut", "the stream ended without a finish reason or an error")
                for line in resp.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                        started.set()
                    if "error" in event:
                        outcome = ("error", event["error"]["message"])
                    elif event.get("choices") and event["choices"][0].get("finish_reason"):
                        outcome = ("finished", event["choices"][0]["finish_reason"])
                results[key] = outcome
    except httpx.HTTPError as exc:
        results[key] = ("transport", repr(exc))
    results[key] += (round(time.monotonic() - begun, 2),)
    started.set()


def test_a_killed_replica_fails_its_requests_clearly_is_avoided_and_rejoins(cluster, http):
    """Three streams (round_robin: one per replica), then three whole answers in flight, then
    SIGKILL to the tritonserver of the replica that runs the newest stream: every request ends
    within the timeout with its answer or a clear error (that stream an error event); the router
    takes the replica out, serves around it, and takes it back once the cluster supervisor
    restarted it."""
    results: dict[str, tuple] = {}
    threads = []

    def launch(key: str, stream: bool) -> threading.Event:
        started = threading.Event()
        threads.append(threading.Thread(target=_request, args=(http, cluster.router_url, key, stream, results, key,
                                                               started)))
        threads[-1].start()
        return started

    for k in range(2 * REPLICAS):  # short requests first: whatever the earlier tests left in the router settles
        chat(http, cluster.router_url, [{"role": "user", "content": f"before {k}"}], max_tokens=1)
    urls = [r.openai_url for r in cluster.replicas]
    where: list[int] = []
    for k in range(REPLICAS):  # one after another; where each went, by the router's own counts
        before = router_sent(cluster.router_metrics_url, urls)
        assert launch(f"stream{k}", True).wait(60), "a stream did not start"
        after = router_sent(cluster.router_metrics_url, urls)
        where.append(next(i for i in range(REPLICAS) if after[i] > before[i]))
    assert sorted(where) == list(range(REPLICAS)), f"round_robin put the streams on replicas {where}"
    victim = where[-1]  # its stream began last: the most of it is still to be generated
    server = next(pid for pid, _, cmd in descendants(cluster.proc.pid)
                  if "bin/tritonserver" in cmd and f"--http-port {cluster.replicas[victim].http} " in cmd)
    for k in range(REPLICAS):
        launch(f"whole{k}", False)
    time.sleep(0.1)
    os.kill(server, signal.SIGKILL)
    for t in threads:
        t.join(150)
        assert not t.is_alive(), f"a request hangs: {results}"
    print(json.dumps(results))
    outcomes = [v[0] for v in results.values()]
    assert len(outcomes) == 2 * REPLICAS and set(outcomes) <= {"finished", "error", "status"}, results
    assert results[f"stream{REPLICAS - 1}"][0] == "error", results
    assert "failed while streaming" in results[f"stream{REPLICAS - 1}"][1], results
    assert all(results[f"stream{k}"][0] == "finished" for k in range(REPLICAS - 1)), results

    victim_url = cluster.replicas[victim].openai_url
    deadline = time.monotonic() + 60
    while router_workers(cluster.router_url).get(victim_url, True):
        assert time.monotonic() < deadline, "the router still counts the dead replica as healthy"
        time.sleep(0.2)
    for k in range(6):  # the router sends around it
        chat(http, cluster.router_url, [{"role": "user", "content": f"while one is down {k}"}])

    cluster.wait_for(f"replica {victim} READY again", 240)
    assert f"restarting replica {victim} (1/3)" in cluster.text()
    deadline = time.monotonic() + 60
    while not router_workers(cluster.router_url).get(victim_url):
        assert time.monotonic() < deadline, "the router did not take the restarted replica back"
        time.sleep(0.2)
    reference = chat(http, cluster.replicas[0].openai_url, [{"role": "user", "content": "after the restart"}])
    answers = [chat(http, cluster.router_url, [{"role": "user", "content": "after the restart"}]) for _ in range(6)]
    assert {a["choices"][0]["message"]["content"] for a in answers} == {reference["choices"][0]["message"]["content"]}
    assert cluster.replicas[victim].metric("minisgl_requests_total") >= 1, "round_robin sends to it again"


def test_ctrl_c_stops_every_process_and_frees_every_port(cluster):
    cluster.tree = descendants(cluster.proc.pid)
    assert len([p for p in cluster.tree if "bin/tritonserver" in p[2]]) == REPLICAS
    assert any(cmd.startswith("sglang::router") for _, _, cmd in cluster.tree)
    started = time.monotonic()
    cluster.stop(signal.SIGINT, group=True)
    cluster.wait_all_gone(timeout=40)
    assert time.monotonic() - started < 40
    assert "signal SIGINT: stopping the router and 3 replicas" in cluster.text()
    for i in range(REPLICAS):
        assert "successfully unloaded 'minisgl'" in cluster.replica_log(i), cluster.replica_log(i)[-2000:]
