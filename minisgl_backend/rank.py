"""Building the engine and scheduler of one TP rank, in whichever process runs it."""

from __future__ import annotations

import os
from typing import Callable

from minisgl_backend.config import EngineConfig
from minisgl_backend.messages import SchedulerInfo
from minisgl_backend.scheduler.io import SchedulerIO
from minisgl_backend.scheduler.scheduler import Scheduler


def build_scheduler(config: EngineConfig, rank: int, io_factory: Callable[[], SchedulerIO]) -> Scheduler:
    """Engine + scheduler of one rank, TP group initialised first when tp_size > 1."""
    import torch

    from minisgl_backend.distributed.group import init_distributed
    from minisgl_backend.engine.engine import Engine

    if config.device == "cpu":
        torch.set_num_threads(config.parallel.cpu_threads or max(1, (os.cpu_count() or 1) // config.parallel.tp_size))
    num_pages_min = init_distributed(config, rank)
    engine = Engine(config)
    num_pages = num_pages_min(engine.num_pages)
    return Scheduler(config, engine, io_factory(), num_pages=num_pages)


def scheduler_info(scheduler: Scheduler) -> SchedulerInfo:
    return SchedulerInfo(context_len=scheduler.context_len, vocab_size=scheduler.vocab_size,
                         num_pages=scheduler.cache.num_pages, page_size=scheduler.cache.page_size)
