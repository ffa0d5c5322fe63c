"""The nodes of a multi-node group: joining, the agreement check, heartbeats, the group's end.

Node 0 (`ClusterHost`, in the frontend that serves the store) and every other node
(`ClusterMember`, in `python -m minisgl_backend.node`) talk only through the store's keys:

    node/R     node R's fingerprint (settings + model), written when it joins
    joined/R   how many processes joined as node R (a second one is refused)
    verdict    "ok", or "refused: why", written by node 0 once every node joined (or it gave up)
    seen/R     node R read the verdict (a refusing node 0 keeps the store up until then)
    hb/R       node R's heartbeat counter, bumped every node_timeout_s / 5
    failed/R   why node R gave up (a rank of it died or failed to start)
    done/R     node R's ranks all exited cleanly
    end        {"clean": bool, "reason": str}: node 0 ended the group (unload, or a failure)

Ranks start only after the verdict, so no rank waits in a collective for a node that is still
being checked. A node counts as lost when its heartbeat stops for `node_timeout_s`: that covers a
host that dies or loses the network without closing its connections.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from minisgl_backend.config import EngineConfig
from minisgl_backend.distributed.fingerprint import fingerprint_mismatch, node_fingerprint
from minisgl_backend.distributed.store import connect_store, key, read, serve_store

logger = logging.getLogger(__name__)

VERDICT, END = key("verdict"), key("end")
_POLL_S = 0.1


class NodeRefused(RuntimeError):
    """Node 0 refused this node, or the group could not form."""


def heartbeat_interval(config: EngineConfig) -> float:
    return config.parallel.node_timeout_s / 5


class ClusterHost:
    """Node 0's side: serves the store, admits the other nodes, watches them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        par = config.parallel
        host, port = par.init_address()
        self.store = serve_store(host, port, par.node_join_timeout_s)
        self.host, self.port = host, self.store.port
        self.others = list(range(1, par.nnodes))
        self._beats: dict[int, tuple[int, float]] = {}
        self._last_check = 0.0
        self._last_watch = time.monotonic()
        self._ended = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def admit(self) -> None:
        """Wait until every other node joined, check that each agrees with this one, and let them
        start their ranks. Raises NodeRefused naming the nodes that never joined or the first
        difference."""
        if not self.others:
            return
        par = self.config.parallel
        joined = self._wait_for_nodes(par.node_join_timeout_s)
        mine = node_fingerprint(self.config)
        problems = [p for r in self.others if (p := fingerprint_mismatch(mine, joined[r], r))]
        if problems:
            self._refuse("; ".join(problems))
        self.store.set(VERDICT, "ok")
        now = time.monotonic()
        self._beats = {r: (self._heartbeat(r), now) for r in self.others}
        self._last_watch = now

    def _wait_for_nodes(self, timeout_s: float) -> dict[int, dict[str, Any]]:
        joined: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            for r in self.others:
                if r not in joined and (value := read(self.store, key("node", r))) is not None:
                    joined[r] = json.loads(value)
                    logger.info("node %d joined from %s", r, joined[r].get("host", "?"))
            missing = [r for r in self.others if r not in joined]
            if not missing:
                return {r: v["fingerprint"] for r, v in joined.items()}
            if time.monotonic() > deadline:
                nodes = ", ".join(map(str, missing))
                par = self.config.parallel
                self._refuse(f"node{'s' if len(missing) > 1 else ''} {nodes} (node_rank) did not join within "
                             f"{timeout_s:g} s: start `python -m minisgl_backend.node --node-rank R --nnodes "
                             f"{par.nnodes} --dist-init-addr {self.address} --model DIR tp_size={par.tp_size} ...` "
                             f"on each, with the same settings")
            time.sleep(_POLL_S)

    def _refuse(self, message: str, grace_s: float = 5.0) -> None:
        """Refuse every node that joined (they exit with `message`) and raise; the store stays up
        until they read it (at most `grace_s`)."""
        self.store.set(VERDICT, "refused: " + message)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(read(self.store, key("node", r)) is not None
                                                  and read(self.store, key("seen", r)) is None for r in self.others):
            time.sleep(_POLL_S)
        raise NodeRefused(message)

    def _heartbeat(self, r: int) -> int:
        return int(self.store.add(key("hb", r), 0))

    def failure(self) -> str | None:
        """Why the group cannot go on (a node reported a failure, or its heartbeat stopped), or None."""
        now = time.monotonic()
        if not self._beats or self._ended or now - self._last_check < _POLL_S:
            return None
        self._last_check = now
        for r in self.others:
            reason = read(self.store, key("failed", r))
            if reason is not None:
                return f"node {r} failed: {reason}"
        if now - self._last_watch > self.config.parallel.node_timeout_s / 2:
            # this thread did not look for a while: a heartbeat it missed is no evidence
            self._beats = {r: (count, now) for r, (count, _) in self._beats.items()}
        self._last_watch = now
        timeout = self.config.parallel.node_timeout_s
        for r in self.others:
            count, since = self._beats[r]
            current = self._heartbeat(r)
            if current != count:
                self._beats[r] = (current, now)
            elif now - since > timeout:
                return f"node {r} stopped answering: no heartbeat for {timeout:g} s (its host or network is down)"
        return None

    def end(self, clean: bool, reason: str) -> None:
        """Tell the other nodes the group is over; with `clean` their ranks exit on their own
        (they received the ShutdownMsg), otherwise the nodes kill them."""
        if self._ended or not self.others:
            return
        self._ended = True
        try:
            self.store.set(END, json.dumps({"clean": clean, "reason": reason}))
        except Exception:
            logger.exception("could not tell the other nodes that the group ended")

    def wait_done(self, timeout_s: float) -> list[int]:
        """Wait until every other node reported that its ranks exited; returns those that did not."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = [r for r in self.others if read(self.store, key("done", r)) is None
                       and read(self.store, key("failed", r)) is None]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(_POLL_S)

    def close(self) -> None:
        self.end(False, "node 0 closed the group")
        self.store = None  # the server stops with its last reference


class ClusterMember:
    """A node other than 0: joins node 0's store, waits for the verdict, sends heartbeats."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        par = config.parallel
        self.node_rank = par.node_rank
        self.host, self.port = par.init_address()
        self.store = connect_store(self.host, self.port, par.node_join_timeout_s)
        self._beat_store: dist.TCPStore | None = None
        self._last_ok = time.monotonic()
        self._last_watch = time.monotonic()
        self._error: str | None = None
        self._end: dict[str, Any] | None = None
        self._stop = threading.Event()

    def join(self, host_name: str) -> None:
        """Register with node 0, start the heartbeat, wait for the verdict; NodeRefused if refused."""
        par = self.config.parallel
        if self.store.add(key("joined", self.node_rank), 1) > 1:
            raise NodeRefused(f"another process already joined as node {self.node_rank} at {self.host}:{self.port}")
        self.store.set(key("node", self.node_rank),
                       json.dumps({"host": host_name, "fingerprint": node_fingerprint(self.config)}))
        self._start_heartbeat()
        try:
            self.store.wait([VERDICT], timedelta(seconds=par.node_join_timeout_s))
            verdict = self.store.get(VERDICT).decode()
            self.store.set(key("seen", self.node_rank), "1")
        except Exception as exc:
            raise NodeRefused(f"node 0 at {self.host}:{self.port} gave no verdict within "
                              f"{par.node_join_timeout_s:g} s ({str(exc).strip().splitlines()[0]})") from None
        if verdict != "ok":
            raise NodeRefused(verdict.removeprefix("refused: "))

    def _start_heartbeat(self) -> None:
        # a store client of its own: a call stuck on a lost network must not hold the others' lock
        self._beat_store = connect_store(self.host, self.port, self.config.parallel.node_join_timeout_s)
        threading.Thread(target=self._beat, name="minisgl-node-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        interval = heartbeat_interval(self.config)
        hb = key("hb", self.node_rank)
        while not self._stop.wait(interval):
            try:
                self._beat_store.add(hb, 1)
                if self._end is None and (value := read(self._beat_store, END)) is not None:
                    self._end = json.loads(value)
                self._last_ok = time.monotonic()
            except Exception as exc:
                self._error = f"lost node 0 at {self.host}:{self.port}: {str(exc).strip().splitlines()[0]}"
                return

    def lost(self) -> str | None:
        """Why node 0 is out of reach (its store failed, or answered nothing for node_timeout_s)."""
        if self._error is not None:
            return self._error
        now = time.monotonic()
        timeout = self.config.parallel.node_timeout_s
        if now - self._last_watch > timeout / 2:
            self._last_ok = max(self._last_ok, now - heartbeat_interval(self.config))  # we were not watching
        self._last_watch = now
        if now - self._last_ok > timeout:
            return f"node 0 at {self.host}:{self.port} stopped answering for {timeout:g} s"
        return None

    def ended(self) -> dict[str, Any] | None:
        """Node 0's end of the group ({"clean", "reason"}), once seen."""
        return self._end

    def report(self, name: str, value: str, timeout_s: float = 2.0) -> None:
        """Set failed/R or done/R; gives up after `timeout_s` (node 0 may be out of reach)."""
        def write() -> None:
            try:
                self.store.set(key(name, self.node_rank), value)
            except Exception:
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(timeout_s)

    def stop(self) -> None:
        self._stop.set()
