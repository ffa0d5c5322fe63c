"""A real tritonserver (from the nvidia-pytriton wheel) on free ports, and clients for it.

`TritonServer(repo).start()` runs `scripts/tritonserver` in its own process group, waits for
the model to be READY and, on `stop()`, sends SIGTERM, waits, then SIGKILLs whatever is left
of the group (Python-backend stubs, scheduler processes) so that nothing outlives a test run;
`shutdown_problems()` then says what was not clean about that stop. `GrpcStream` and
`grpc_inputs` speak the minisgl model's gRPC streaming contract; `parse_metric` reads the
metrics port's text.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from minisgl_backend.checkout import ROOT, TRITONSERVER_WRAPPER
from minisgl_backend.ports import answers_ok, free_ports
from minisgl_backend.procinfo import cmdline
from minisgl_backend.testing.procinfo import group_members
from minisgl_backend.triton.repository import MODEL_NAME as MODEL

TRITON_HOME = Path(os.environ.get("MINISGL_TRITON_HOME", ROOT / "build" / "triton"))


def triton_available() -> str | None:
    """None if a tritonserver is set up, else why not."""
    if not (TRITON_HOME / "env.sh").is_file():
        return f"{TRITON_HOME} is not set up (run 'make setup' or scripts/setup_triton.sh)"
    return None


class TritonServer:
    def __init__(self, model_repository: str | os.PathLike, log_path: str | os.PathLike,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.repo = str(model_repository)
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args or [])
        self.env = {**os.environ, **(env or {})}
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.graceful: bool | None = None
        self.leftovers: list[str] = []

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 300.0, models: tuple[str, ...] | list[str] = (MODEL,)) -> "TritonServer":
        """Start it and wait until each of `models` is READY (`timeout` for them all)."""
        self._shm_before = set(_shm_regions())
        self._log = open(self.log_path, "wb")
        cmd = [str(TRITONSERVER_WRAPPER), "--model-repository", self.repo, "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
               "--exit-timeout-secs", "15", *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=True, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        try:
            for model in models:
                self.wait_ready(max(deadline - time.monotonic(), 1.0), model)
        except Exception:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float, model: str = MODEL) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.model_ready(model):
                return
            time.sleep(0.5)
        raise TimeoutError(f"model {model} not READY after {timeout:.0f} s:\n{self.log_tail()}")

    def model_ready(self, model: str = MODEL) -> bool:
        """Whether Triton reports `model` READY now."""
        return answers_ok(f"http://{self.http_url}/v2/models/{model}/ready")

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self, timeout: float = 45.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own process group
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                self.graceful = True
            except subprocess.TimeoutExpired:
                self.graceful = False
            # what a clean unload left behind: none once tritonserver is gone (its stubs and their
            # scheduler processes get half a second to follow it)
            settle = time.monotonic() + 0.5
            while (leftovers := _group_cmdlines(pgid)) and time.monotonic() < settle:
                time.sleep(0.05)
            self.leftovers = leftovers
        try:
            os.killpg(pgid, signal.SIGKILL)  # stubs and scheduler processes still around
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None
        _remove_orphan_shm(set(_shm_regions()) - getattr(self, "_shm_before", set()))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def leak_lines(self) -> list[str]:
        """The lines of the server's log in which a scheduler reported a resource leak."""
        return [line for line in self.log_text().splitlines() if "resource leak" in line]

    def shutdown_problems(self, unloaded: tuple[str, ...] | list[str] = ()) -> list[str]:
        """What was not clean about the last `stop()` ([] when it was): SIGTERM did not end the
        server within the timeout, a process of its group outlived it, a model of `unloaded`
        did not log its unload, or a scheduler logged a resource leak."""
        problems = []
        if self.proc is not None or self.graceful is None:
            problems.append("the server was not stopped with SIGTERM")
        elif not self.graceful:
            problems.append("tritonserver did not exit within the timeout after SIGTERM")
        if self.leftovers:
            problems.append(f"processes of its group outlived it: {self.leftovers}")
        log = self.log_text()
        problems += [f"the log does not say \"successfully unloaded '{name}'\"" for name in unloaded
                     if f"successfully unloaded '{name}'" not in log]
        problems += [f"logged: {line}" for line in self.leak_lines()[:10]]
        return problems

    # ------------------------------------------------------------ helpers for tests

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        return parse_metric(self.metrics_text(), name, labels)

    def generate(self, payload: dict, stream: bool = False, timeout: float = 120.0) -> tuple[int, object]:
        """POST /generate (or /generate_stream); return (status, JSON body or list of SSE events)."""
        endpoint = "generate_stream" if stream else "generate"
        req = urllib.request.Request(f"http://{self.http_url}/v2/models/{MODEL}/{endpoint}",
                                     data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read().decode()
                status = resp.status
        except urllib.error.HTTPError as err:
            body, status = err.read().decode(), err.code
        if stream and status == 200:
            events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
            return status, events
        return status, json.loads(body) if body else None

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Wait until the gauges show an idle engine (nothing running or pending, no locked page,
        every page free or cached, KV usage 0); returns those gauges, or raises AssertionError
        with the gauges it saw last."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.metrics_text()
            gauges = {s: parse_metric(text, "minisgl_kv_pages", {"state": s})
                      for s in ("total", "free", "cached", "locked")}
            gauges["running"] = parse_metric(text, "minisgl_num_requests_running")
            gauges["pending"] = parse_metric(text, "minisgl_num_requests_pending")
            gauges["usage"] = parse_metric(text, "minisgl_kv_cache_usage_ratio")
            if (gauges["running"] == gauges["pending"] == gauges["locked"] == gauges["usage"] == 0
                    and gauges["free"] + gauges["cached"] == gauges["total"] > 0):
                return gauges
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine did not return to idle: {gauges}")
            time.sleep(0.2)


def _shm_regions() -> list[str]:
    try:
        return [n for n in os.listdir("/dev/shm") if n.startswith("triton_python_backend_shm_region_")]
    except OSError:
        return []


def _remove_orphan_shm(names: set[str]) -> None:
    """Unlink Python-backend shm regions that appeared during our run and nobody maps anymore
    (a stub killed with SIGKILL leaves its region behind)."""
    if not names:
        return
    mapped: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                for line in f:
                    if "triton_python_backend_shm_region_" in line:
                        mapped.add(line.rsplit("/", 1)[-1].split()[0])
        except OSError:
            continue
    for name in names - mapped:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


def _group_cmdlines(pgid: int) -> list[str]:
    """Command lines of the live processes in process group `pgid`."""
    return [cmdline(pid)[:200] for pid in group_members(pgid)]


def parse_metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name != name:
            continue
        found = dict(_split_labels(label_text.rstrip("}")))
        if labels and any(found.get(k) != v for k, v in labels.items()):
            continue
        total += float(value)
    return total


def _split_labels(text: str):
    for part in text.split(","):
        if "=" in part:
            key, _, value = part.partition("=")
            yield key.strip(), value.strip().strip('"')


# ------------------------------------------------------------ gRPC streaming helper


def grpc_inputs(text: str | bytes | None = None, **tensors) -> list:
    """InferInputs for the minisgl model: text_input plus any named tensors (numpy arrays or scalars)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    if text is not None:
        raw = text if isinstance(text, bytes) else text.encode()
        inp = grpcclient.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([raw], dtype=np.object_))
        inputs.append(inp)
    for name, value in tensors.items():
        if isinstance(value, str):
            value = np.array([value.encode()], dtype=np.object_)
        elif isinstance(value, bool):
            value = np.array([value], dtype=np.bool_)
        elif not isinstance(value, np.ndarray):
            raise TypeError(f"pass {name} as a numpy array")
        dtype = "BYTES" if value.dtype == np.object_ else np_to_triton_dtype(value.dtype)
        inp = grpcclient.InferInput(name, list(value.shape), dtype)
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    return inputs


class GrpcStream:
    """One gRPC bidirectional stream; requests are told apart by their request id."""

    def __init__(self, url: str, model: str = MODEL) -> None:
        import queue

        import tritonclient.grpc as grpcclient

        self.model = model
        self.client = grpcclient.InferenceServerClient(url)
        self.queue: "queue.Queue" = queue.Queue()
        self._seen: list = []  # (result, error) read by wait_started, still owed to collect
        self.client.start_stream(callback=lambda result, error: self.queue.put((result, error)))

    def send(self, request_id: str, inputs: list, parameters: dict | None = None) -> None:
        self.client.async_stream_infer(self.model, inputs, request_id=request_id, parameters=parameters,
                                       enable_empty_final_response=True)

    def wait_started(self, request_ids: list[str], timeout: float = 60.0) -> None:
        """Block until every id got a response (a stream is running); `collect` still sees them all."""
        import queue

        waiting, deadline = set(request_ids), time.monotonic() + timeout
        while waiting:
            try:
                result, error = self.queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"no response yet for {sorted(waiting)}") from None
            self._seen.append((result, error))
            waiting.discard(None if result is None else result.get_response().id)

    def collect(self, request_ids: list[str], timeout: float = 120.0) -> dict[str, dict]:
        """Wait until every id got its final response (or an error): {id: {texts, error, final, responses}}."""
        import queue

        pending = set(request_ids)
        out = {rid: {"texts": [], "error": None, "final": False, "responses": 0, "outputs": []} for rid in request_ids}
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no final response for {sorted(pending)}")
            try:
                result, error = self._seen.pop(0) if self._seen else self.queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if error is not None:
                rid = _error_request_id(error, pending)
                out[rid]["error"] = error
                out[rid]["responses"] += 1
                pending.discard(rid)
                continue
            response = result.get_response()
            rid = response.id
            entry = out.setdefault(rid, {"texts": [], "error": None, "final": False, "responses": 0, "outputs": []})
            entry["responses"] += 1
            if response.outputs:
                names = {o.name for o in response.outputs}
                values = {n: result.as_numpy(n) for n in names}
                entry["outputs"].append(values)
                if "text_output" in values:
                    entry["texts"].append(b"".join(values["text_output"].reshape(-1)).decode())
            if response.parameters.get("triton_final_response").bool_param:
                entry["final"] = True
                pending.discard(rid)
        return out

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _error_request_id(error, pending: set[str]) -> str:
    # stream errors do not carry the request id; tests that expect errors send one request at a time
    if len(pending) != 1:
        raise AssertionError(f"unexpected stream error with {len(pending)} requests pending: {error}")
    return next(iter(pending))
