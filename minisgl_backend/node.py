"""A node other than 0 of a multi-node group: `python -m minisgl_backend.node`.

    python -m minisgl_backend.node --node-rank 1 --nnodes 2 --dist-init-addr HEAD:29500 \\
        --model /models/m tp_size=4 page_size=16 ...

Joins node 0 (the Triton model, which serves the group's store at `dist_init_addr`), waiting for
it when started first; node 0 checks that this node runs the same model and the same settings.
Then it starts this node's ranks (tp_size / nnodes scheduler processes) and watches them until
the group ends: it exits 0 when node 0 unloaded the model and its ranks stopped cleanly, 1 when
a rank of it died, node 0 ended the group after a failure or went out of reach (its ranks are
killed first), 2 when it was refused or the group never formed. No tritonserver runs here.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time

from minisgl_backend.config import ConfigError, EngineConfig

logger = logging.getLogger("minisgl.node")

_WATCH_S = 0.1
_CLEAN_EXIT_GRACE_S = 30.0  # ranks told to stop by node 0 get this long to shut down themselves
EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


def parse_args(argv: list[str]) -> EngineConfig:
    parser = argparse.ArgumentParser(prog="python -m minisgl_backend.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-rank", type=int, required=True, help="this node's rank, 1 .. nnodes-1")
    parser.add_argument("--nnodes", type=int, required=True, help="nodes in the group, node 0 included")
    parser.add_argument("--dist-init-addr", required=True, help="HOST:PORT of node 0 (its dist_init_addr)")
    parser.add_argument("--model", required=True, help="the model folder (the same model as node 0's)")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                        help="engine settings, the same as node 0's (tp_size=4 page_size=16 ...)")
    args = parser.parse_args(argv)
    settings: dict[str, str] = {}
    for item in args.settings:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"settings are KEY=VALUE, got {item!r}")
        settings[name.strip()] = value
    for name in ("node_rank", "nnodes", "dist_init_addr", "model_path", "model"):
        if name in settings:
            parser.error(f"give {name} with its option (--node-rank, --nnodes, --dist-init-addr, --model)")
    try:
        config = EngineConfig.from_flat(settings, model_path=args.model, node_rank=args.node_rank,
                                        nnodes=args.nnodes, dist_init_addr=args.dist_init_addr)
    except ConfigError as exc:
        parser.error(str(exc))
    if config.parallel.node_rank == 0:
        parser.error("node 0 is the Triton model (make serve SETTINGS=\"nnodes=... node_rank=0 dist_init_addr=...\"); "
                     "this command runs the nodes 1 .. nnodes-1")
    return config


def run_node(config: EngineConfig) -> int:
    """Join, start the ranks, watch them; returns the exit code."""
    from minisgl_backend.distributed.cluster import ClusterMember, NodeRefused
    from minisgl_backend.processes import RankProcesses, join_host_port

    r = config.parallel.node_rank
    try:
        member = ClusterMember(config)
        member.join(socket.gethostname())
    except (NodeRefused, TimeoutError) as exc:
        logger.error("node %d: %s", r, exc)
        return EXIT_REFUSED
    logger.info("node %d admitted; starting ranks %s", r, list(config.parallel.local_ranks))
    ranks = RankProcesses(config, frontend=False)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    try:
        ranks.start(join_host_port(member.host, member.port))
        try:
            ranks.wait_ready(other_failure=lambda: _group_problem(member, stopping))
        except RuntimeError as exc:
            member.report("failed", f"{exc}")
            logger.error("node %d: %s", r, exc)
            return EXIT_FAILED
        logger.info("node %d: ranks %s ready", r, ranks.ranks)
        return _watch(member, ranks, stopping)
    finally:
        ranks.kill()
        ranks.close()
        member.stop()


def _group_problem(member, stopping: list[int]) -> str | None:
    if stopping:
        return f"stopped by signal {stopping[0]}"
    if (end := member.ended()) is not None:
        return f"node 0 ended the group: {end['reason']}"
    return member.lost()


def _watch(member, ranks, stopping: list[int]) -> int:
    """Until this node's ranks are gone: follow them, node 0's end of the group, its heartbeat."""
    r = member.node_rank
    while True:
        codes = ranks.exit_codes()
        if all(code == 0 for code in codes):
            member.report("done", "ok")
            logger.info("node %d: the group ended, ranks exited cleanly", r)
            return EXIT_OK
        failed = [(rank, code) for rank, code in zip(ranks.ranks, codes) if code not in (None, 0)]
        if failed:
            reason = ", ".join(f"rank {rank} exited with code {code}" for rank, code in failed)
            member.report("failed", reason)
            logger.error("node %d: %s", r, reason)
            return EXIT_FAILED
        end = member.ended()
        if end is not None:
            if end["clean"] and ranks.wait_exit(_CLEAN_EXIT_GRACE_S) and all(c == 0 for c in ranks.exit_codes()):
                continue  # reported above
            logger.error("node %d: node 0 ended the group: %s", r, end["reason"])
            member.report("done", "killed")
            return EXIT_FAILED
        problem = member.lost() or (f"stopped by signal {stopping[0]}" if stopping else None)
        if problem is not None:
            member.report("failed", problem)
            logger.error("node %d: %s; stopping its ranks", r, problem)
            return EXIT_FAILED
        time.sleep(_WATCH_S)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("MINISGL_LOG_LEVEL", "INFO"),
                        format="[minisgl node] %(levelname)s %(name)s: %(message)s")
    config = parse_args(sys.argv[1:] if argv is None else argv)
    code = run_node(config)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a heartbeat call stuck on a lost network must not hold the exit


if __name__ == "__main__":
    main()
