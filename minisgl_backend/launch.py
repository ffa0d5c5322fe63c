"""Entry point of a scheduler process: `python -m minisgl_backend.launch RANK SPEC_JSON`.

Connects to the group's store (tp_size > 1), builds the rank, reports readiness (or the
start-up error) to its parent, serves until a ShutdownMsg, then shuts the engine down. Started
by `processes.RankProcesses`, on node 0 for the frontend and on the other nodes by
`minisgl_backend.node`. SPEC: {"config": flat settings, "addrs": Addresses, "store": "HOST:PORT" | null}.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from typing import Any

import zmq

from minisgl_backend.config import EngineConfig
from minisgl_backend.messages import ErrorEvent, ReadyMsg, encode
from minisgl_backend.processes import freeze_startup_objects
from minisgl_backend.scheduler.io import Addresses, ZmqSchedulerIO

logger = logging.getLogger(__name__)


def scheduler_main(flat_config: dict[str, Any], rank: int, addrs: Addresses, store_addr: str | None) -> None:
    # Ctrl-C in a terminal signals the whole process group: the server must unload the model
    # (which stops this process with a ShutdownMsg), not find its engine dead mid-unload.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("MINISGL_LOG_LEVEL", "WARNING"),
                        format=f"[minisgl rank{rank}] %(levelname)s %(name)s: %(message)s")
    ctx = zmq.Context()
    ready = ctx.socket(zmq.PUSH)
    ready.setsockopt(zmq.LINGER, 2000)
    ready.connect(addrs.ready)
    try:
        scheduler = _start(flat_config, rank, addrs, store_addr, ready)
        freeze_startup_objects()
        _serve(scheduler, rank)
    finally:
        ctx.destroy(linger=2000)


def _start(flat_config: dict[str, Any], rank: int, addrs: Addresses, store_addr: str | None, ready: zmq.Socket):
    from minisgl_backend.config import split_host_port
    from minisgl_backend.distributed.store import connect_store
    from minisgl_backend.rank import build_scheduler, scheduler_info

    try:
        config = EngineConfig.from_flat(flat_config)
        store = None
        if store_addr is not None:
            store = connect_store(*split_host_port(store_addr), config.parallel.node_join_timeout_s)
        scheduler = build_scheduler(config, rank, io_factory=lambda: ZmqSchedulerIO(rank, addrs, config, store),
                                    store=store)
    except Exception as exc:  # report start-up failures to the parent instead of hanging it
        logger.error("scheduler rank %d failed to start: %s", rank, traceback.format_exc())
        ready.send(encode(ReadyMsg(rank, error=f"{type(exc).__name__}: {exc}")))
        raise SystemExit(1)
    ready.send(encode(ReadyMsg(rank, info=scheduler_info(scheduler))))
    return scheduler


def _serve(scheduler, rank: int) -> None:
    try:
        scheduler.run_forever()
    except Exception as exc:  # the engine broke: tell the frontend, which fails every request
        logger.error("scheduler rank %d failed: %s", rank, traceback.format_exc())
        scheduler.io.send([ErrorEvent(f"rank {rank}: {type(exc).__name__}: {exc}")])
        scheduler.io.close()
        raise SystemExit(1)
    scheduler.shutdown()  # a clean stop: free the KV pool, the graphs and the TP group


def _main(argv: list[str]) -> None:
    rank, spec = int(argv[1]), json.loads(argv[2])
    scheduler_main(spec["config"], rank, Addresses(**spec["addrs"]), spec.get("store"))


if __name__ == "__main__":
    _main(sys.argv)
