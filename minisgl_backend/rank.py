"""Building the engine and scheduler of one TP rank, in whichever process runs it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from minisgl_backend.config import EngineConfig
from minisgl_backend.messages import SchedulerInfo
from minisgl_backend.scheduler.io import SchedulerIO
from minisgl_backend.scheduler.scheduler import Scheduler

if TYPE_CHECKING:
    from torch.distributed import Store


def build_scheduler(config: EngineConfig, rank: int, io_factory: Callable[[], SchedulerIO],
                    store: Store | None = None) -> Scheduler:
    """Engine + scheduler of global rank `rank`, TP group initialised first (through the group's
    `store`) when tp_size > 1."""
    import torch

    from minisgl_backend.distributed.group import init_distributed
    from minisgl_backend.engine.engine import Engine

    cores = _pin_rank(config, rank)
    if config.device == "cpu":
        default_threads = len(cores) if cores else max(1, (os.cpu_count() or 1) // config.parallel.ranks_per_node)
        torch.set_num_threads(config.parallel.cpu_threads or default_threads)
    num_pages_min = init_distributed(config, rank, store)
    engine = Engine(config)
    num_pages = num_pages_min(engine.num_pages)
    return Scheduler(config, engine, io_factory(), num_pages=num_pages)


def _pin_rank(config: EngineConfig, rank: int) -> tuple[int, ...]:
    """This rank's share of its node's `cpu_cores`, every thread of its process on it (those
    started later follow); () when no cores are set."""
    from minisgl_backend.cpu_affinity import parse_cpu_list, pin_process, rank_cores
    from minisgl_backend.distributed.group import local_rank

    if not config.parallel.cpu_cores:
        return ()
    cores = rank_cores(parse_cpu_list(config.parallel.cpu_cores), local_rank(config, rank),
                       config.parallel.ranks_per_node)
    pin_process(os.getpid(), cores)
    return cores


def scheduler_info(scheduler: Scheduler) -> SchedulerInfo:
    return SchedulerInfo(context_len=scheduler.context_len, vocab_size=scheduler.vocab_size,
                         num_pages=scheduler.cache.num_pages, page_size=scheduler.cache.page_size)
