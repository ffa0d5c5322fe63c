"""CUDA graphs for decode batches: capture the model forward (and logits) once per batch size,
replay it with the batch copied into static input buffers.

What is captured: `forward_fn(input_ids, positions, fwd) -> logits [bs, vocab]` (the model's
forward, `fwd = ForwardBatch(attn, last_token_indices)`; its logits are cast to float32 in the
copy into the static buffer, one kernel), including the attention
backend's per-layer `forward()` (K/V store + flashinfer decode kernel). Sampling is not captured:
it runs eagerly on the returned logits.

Padding: a batch of `bs` requests runs the graph of the smallest captured size >= bs. The extra
requests are dummies that cannot touch real ones: their length is 1, their token id and position
are 0, their page-table row is the spare row and their K/V go to the spare slot. Both come from
`minisgl_backend.kvcache`: `PageTable.spare_row` (never handed to a request, its one position
mapped to the spare slot) and `KVCache.spare_slot` (a page past the scheduler's pool).

Memory: every captured graph shares one memory pool (captured largest first, so the smaller
graphs fit in what the largest one reserved). The logits of a replay land in one static buffer
[max_bs, vocab] float32: they stay valid until the next replay (stream-ordered), which is all
sampling needs.

The attention backend must provide the hooks of `GraphAttentionHooks` (FlashInferBackend does).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.attention.base import ForwardBatch

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor, torch.Tensor, ForwardBatch], torch.Tensor]


class GraphAttentionHooks(Protocol):
    def init_cuda_graph(self, max_bs: int) -> None: ...

    def prepare_for_capture(self, bs: int, layout: BatchLayout) -> None: ...

    def prepare_for_replay(self, bs: int, layout: BatchLayout) -> None: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor: ...


def supports_cuda_graph(attn: object) -> bool:
    return all(callable(getattr(attn, name, None))
               for name in ("init_cuda_graph", "prepare_for_capture", "prepare_for_replay"))


# ---------------------------------------------------------------------------- sizes and padding


def graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_bs`, and `max_bs` itself."""
    if max_bs < 1:
        return []
    sizes = {s for s in (1, 2, 4, 8) if s <= max_bs}
    sizes.update(range(16, max_bs + 1, 8))
    sizes.add(max_bs)
    return sorted(sizes)


def pick_graph_bs(bs: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size that holds `bs` requests (sizes sorted ascending), or None."""
    if bs < 1:
        return None
    i = bisect.bisect_left(sizes, bs)
    return sizes[i] if i < len(sizes) else None


@dataclass
class StaticDecodeInputs:
    """The graph's input buffers, sized for the largest captured batch (all on one device)."""

    input_ids: torch.Tensor  # [max_bs] int64
    positions: torch.Tensor  # [max_bs] int64
    out_loc: torch.Tensor  # [max_bs] int64 KV slot of each new token
    rows: torch.Tensor  # [max_bs] int64 page-table row of each request
    seq_lens: torch.Tensor  # [max_bs] int64 positions after this step
    extend_lens: torch.Tensor  # [max_bs] int64, all ones
    last_token_indices: torch.Tensor  # [max_bs] int64, arange: one logit row per request

    @classmethod
    def allocate(cls, max_bs: int, device: torch.device | str) -> "StaticDecodeInputs":
        z = lambda: torch.zeros(max_bs, dtype=torch.int64, device=device)  # noqa: E731
        return cls(z(), z(), z(), z(), torch.ones(max_bs, dtype=torch.int64, device=device),
                   torch.ones(max_bs, dtype=torch.int64, device=device),
                   torch.arange(max_bs, dtype=torch.int64, device=device))

    @property
    def max_bs(self) -> int:
        return self.input_ids.shape[0]

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, out_loc: torch.Tensor,
             rows: torch.Tensor, seq_lens: torch.Tensor, padded_bs: int, spare_row: int,
             spare_slot: int) -> None:
        """Copy a real batch of bs requests into [:bs] and dummies into [bs:padded_bs] (device ops only)."""
        bs = input_ids.shape[0]
        if not 1 <= bs <= padded_bs <= self.max_bs:
            raise ValueError(f"need 1 <= bs ({bs}) <= padded_bs ({padded_bs}) <= max_bs ({self.max_bs})")
        for buf, src, pad in ((self.input_ids, input_ids, 0), (self.positions, positions, 0),
                              (self.out_loc, out_loc, spare_slot), (self.rows, rows, spare_row),
                              (self.seq_lens, seq_lens, 1)):
            if src.shape[0] != bs:
                raise ValueError(f"inputs of {src.shape[0]} rows for a batch of {bs}")
            buf[:bs].copy_(src, non_blocking=True)
            buf[bs:padded_bs].fill_(pad)

    def fill_dummy(self, bs: int, spare_row: int, spare_slot: int) -> None:
        """Every request a dummy: the batch used to capture."""
        self.input_ids[:bs].fill_(0)
        self.positions[:bs].fill_(0)
        self.out_loc[:bs].fill_(spare_slot)
        self.rows[:bs].fill_(spare_row)
        self.seq_lens[:bs].fill_(1)

    def layout(self, padded_bs: int, seq_lens_cpu: Sequence[int], rows_cpu: Sequence[int] | None = None,
               spare_row: int = 0) -> BatchLayout:
        """The padded decode layout over these buffers; `seq_lens_cpu` (and `rows_cpu`, the host
        copy of the rows, when known) are the real requests' (the dummies: length 1 on `spare_row`)."""
        pad = padded_bs - len(seq_lens_cpu)
        if pad < 0 or (rows_cpu is not None and len(rows_cpu) != len(seq_lens_cpu)):
            raise ValueError(f"{len(seq_lens_cpu)} requests do not fit a graph of {padded_bs}")
        s = slice(0, padded_bs)
        rows_host = None if rows_cpu is None else list(rows_cpu) + [spare_row] * pad
        return BatchLayout(True, self.rows[s], self.seq_lens[s], self.extend_lens[s], self.out_loc[s],
                           list(seq_lens_cpu) + [1] * pad, [1] * padded_bs, rows_host)


# ---------------------------------------------------------------------------- runner


class CudaGraphRunner:
    """Captures `forward_fn` for decode batches of `graph_batch_sizes(max_bs)` requests."""

    def __init__(self, forward_fn: ForwardFn, attn: GraphAttentionHooks, *, max_bs: int, vocab_size: int,
                 spare_row: int, spare_slot: int,
                 device: torch.device | str, stream: torch.cuda.Stream | None = None,
                 batch_sizes: Sequence[int] | None = None) -> None:
        self.forward_fn = forward_fn
        self.attn = attn
        self.device = torch.device(device)
        self.sizes = sorted(set(batch_sizes)) if batch_sizes is not None else graph_batch_sizes(max_bs)
        if not self.sizes or self.sizes[0] < 1:
            raise ValueError(f"no valid batch size to capture: {self.sizes}")
        self.max_bs = self.sizes[-1]
        self.vocab_size = vocab_size
        self.spare_row, self.spare_slot = spare_row, spare_slot
        self.stream = stream
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.inputs = StaticDecodeInputs.allocate(self.max_bs, self.device)
        self.logits = torch.zeros(self.max_bs, vocab_size, dtype=torch.float32, device=self.device)

    def can_run(self, batch_size: int) -> bool:
        return bool(self.graphs) and 1 <= batch_size <= self.max_bs

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one shared memory pool."""
        self.attn.init_cuda_graph(self.max_bs)
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        stream = self.stream if self.stream is not None else torch.cuda.Stream(self.device)
        for bs in sorted(self.sizes, reverse=True):
            self.inputs.fill_dummy(bs, self.spare_row, self.spare_slot)
            layout = self.inputs.layout(bs, [], [], self.spare_row)
            self.attn.prepare_for_capture(bs, layout)
            fwd = ForwardBatch(self.attn, self.inputs.last_token_indices[:bs])
            ids, pos = self.inputs.input_ids[:bs], self.inputs.positions[:bs]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm up (lazy inits, kernel loads) outside the graph
                self.logits[:bs].copy_(self.forward_fn(ids, pos, fwd))
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                self.logits[:bs].copy_(self.forward_fn(ids, pos, fwd))
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured CUDA graphs for decode batch sizes %s (%.1f MiB)", self.sizes, used / 2**20)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Run a decode batch (bs <= max_bs) through its graph; returns float32 logits [bs, vocab],
        valid until the next replay."""
        bs = len(layout.seq_lens_cpu)
        padded = pick_graph_bs(bs, self.sizes)
        if padded is None or padded not in self.graphs:
            raise ValueError(f"no captured graph holds a batch of {bs}")
        self.inputs.fill(input_ids, positions, layout.out_loc, layout.rows, layout.seq_lens,
                         padded, self.spare_row, self.spare_slot)
        rows_cpu = layout.rows_cpu if layout.rows_cpu is not None else layout.rows.tolist()
        self.attn.prepare_for_replay(padded, self.inputs.layout(padded, layout.seq_lens_cpu, rows_cpu,
                                                                self.spare_row))
        self.graphs[padded].replay()
        return self.logits[:bs]

    def close(self) -> None:
        """Drop the graphs (before tearing down NCCL, whose communicators they reference)."""
        self.graphs.clear()
        self.pool = None


def build_graph_runner(config, forward_fn: ForwardFn, attn: object, *, vocab_size: int, spare_row: int, spare_slot: int, max_running_requests: int,
                       device: torch.device | str, stream: torch.cuda.Stream | None = None) -> CudaGraphRunner | None:
    """A captured runner, or None where graphs are off: `config.graph.enable_cuda_graph` false,
    not on CUDA, or an attention backend without the graph hooks (the torch one)."""
    graph_cfg = config.graph
    if not graph_cfg.enable_cuda_graph or torch.device(device).type != "cuda" or not supports_cuda_graph(attn):
        return None
    max_bs = min(graph_cfg.cuda_graph_max_bs, max_running_requests)
    if max_bs < 1:
        return None
    runner = CudaGraphRunner(forward_fn, attn, max_bs=max_bs, vocab_size=vocab_size, spare_row=spare_row, spare_slot=spare_slot, device=device, stream=stream)
    runner.capture()
    return runner
