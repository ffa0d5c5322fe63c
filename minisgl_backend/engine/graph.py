"""CUDA graphs for decode batches: capture the decode step once per batch size, replay it with
the batch's indices copied into one static input buffer.

What is captured, for a graph of `bs` requests (`StaticDecodeInputs` holds its inputs):
  - the input ids and the new tokens' KV slots, gathered from the page table's token pool and slot
    table at each request's cell (row * width + position);
  - `forward_fn(input_ids, positions, fwd) -> logits [bs, vocab]` (the model's forward, `fwd =
    ForwardBatch(attn, last_token_indices)`), including the attention backend's per-layer kernels;
    the logits are copied (by a kernel) into one static buffer [max_bs, vocab] in the model's dtype;
  - greedy sampling: each row's argmax, written into the token pool at the cell that receives the
    request's next id. A batch that samples otherwise (temperature, penalties, a grammar mask...)
    samples eagerly from the logits and writes its ids over those.
So a greedy decode step costs the host one copy in (the indices), the attention backend's plan,
one graph launch, and one copy out (the ids).

With LoRA adapters served, the graph also runs the LoRA kernels, which read each row's adapter
slot from a static buffer (-1: the base model, the dummies' value), copied in with the indices.

Speculative verify steps need no graphs of their own: a request's last token and its d drafts are
d + 1 decode rows of the same page-table row at consecutive positions (`ScheduledReq.rows`), so a
step of decode and verify rows replays the graph of its row count like any decode batch.

Padding: a batch of `bs` requests runs the graph of the smallest captured size >= bs. The extra
requests are dummies that cannot touch real ones: their page-table row is the spare row, whose
one position maps to the KV cache's spare slot (`PageTable.spare_row`, `KVCache.spare_slot`, a page
past the scheduler's pool); their length is 1, their position 0, and their sampled id goes to the
spare row's last cell (`PageTable.dump_cell`, never read).

Memory: every captured graph shares one memory pool (captured largest first, so the smaller
graphs fit in what the largest one reserved). The logits and greedy ids of a replay stay valid
until the next replay (stream-ordered), which is all sampling needs.

The attention backend must provide the hooks of `GraphAttentionHooks` (FlashInferBackend does).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.attention.base import ForwardBatch
from minisgl_backend.engine.graph_census import census_of, instantiate_kept, new_graph
from minisgl_backend.engine.metadata import HostBatchIndices
from minisgl_backend.kvcache.staging import HostStaging

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
    """The graph's inputs. `packed` is one int64 buffer that the host fills with ONE copy per step:
    for a graph of `bs` requests, its first 5 * bs values are five rows of bs (`FIELDS`): each
    request's token cell (row * table width + position, where the graph reads the input id and
    the KV slot), position, page-table row, length after the step, and the cell that receives its
    sampled id. `out_loc` is written inside the graph (the gathered KV slots)."""

    packed: torch.Tensor  # [5 * max_bs] int64
    out_loc: torch.Tensor  # [max_bs] int64 KV slot of each new token (written by the graph)
    extend_lens: torch.Tensor  # [max_bs] int64, all ones
    last_token_indices: torch.Tensor  # [max_bs] int64, arange: one logit row per request
    _views: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    FIELDS = ("token_cells", "positions", "rows", "seq_lens", "sampled_cells")

    @classmethod
    def allocate(cls, max_bs: int, device: torch.device | str) -> "StaticDecodeInputs":
        return cls(torch.zeros(len(cls.FIELDS) * max_bs, dtype=torch.int64, device=device),
                   torch.zeros(max_bs, dtype=torch.int64, device=device),
                   torch.ones(max_bs, dtype=torch.int64, device=device),
                   torch.arange(max_bs, dtype=torch.int64, device=device))

    @property
    def max_bs(self) -> int:
        return self.out_loc.shape[0]

    def views(self, bs: int) -> dict[str, torch.Tensor]:
        """The five rows of a graph of `bs` requests, by name (views into `packed`, made once per size)."""
        views = self._views.get(bs)
        if views is None:
            views = self._views[bs] = {name: self.packed[i * bs:(i + 1) * bs] for i, name in enumerate(self.FIELDS)}
        return views

    @staticmethod
    def host_values(host: HostBatchIndices, padded_bs: int, pad: Sequence[int]) -> np.ndarray:
        """A decode batch's five rows, each padded to `padded_bs` with its `pad` value, flat."""
        bs = host.rows.shape[0]
        if not (host.is_uniform_decode and 1 <= bs <= padded_bs):
            raise ValueError(f"a decode batch of {bs} requests does not fit a graph of {padded_bs}")
        out = np.empty((len(pad), padded_bs), dtype=np.int64)
        for i, values in enumerate((host.token_flat, host.positions, host.rows, host.seq_lens, host.sampled_flat)):
            out[i, :bs] = values
            out[i, bs:] = pad[i]
        return out.reshape(-1)

    def layout(self, padded_bs: int, seq_lens_cpu: Sequence[int], rows_cpu: Sequence[int] | None = None,
               spare_row: int = 0) -> BatchLayout:
        """The padded decode layout over these buffers; `seq_lens_cpu` (and `rows_cpu`, the host
        copy of the rows, when known) are the real requests' (the dummies: length 1 on `spare_row`)."""
        pad = padded_bs - len(seq_lens_cpu)
        if pad < 0 or padded_bs > self.max_bs or (rows_cpu is not None and len(rows_cpu) != len(seq_lens_cpu)):
            raise ValueError(f"{len(seq_lens_cpu)} requests do not fit a graph of {padded_bs}")
        v = self.views(padded_bs)
        rows_host = None if rows_cpu is None else list(rows_cpu) + [spare_row] * pad
        return BatchLayout(True, v["rows"], v["seq_lens"], self.extend_lens[:padded_bs], self.out_loc[:padded_bs],
                           list(seq_lens_cpu) + [1] * pad, [1] * padded_bs, rows_host)


@dataclass
class GraphStepOutput:
    logits: torch.Tensor  # [bs, vocab] in the model's dtype, valid until the next replay
    greedy_ids: torch.Tensor  # [bs] int64 argmax of each row, already in the token pool
    sampled_cells: torch.Tensor  # [bs] int64 token-pool cells of the next ids (to write other ids over them)


# ---------------------------------------------------------------------------- runner


class CudaGraphRunner:
    """Captures the decode step for batches of `graph_batch_sizes(max_bs)` requests.

    `token_pool` / `slot_table` are the page table's flattened token ids and KV slots (the graph
    gathers from them and writes the greedy ids into the token pool); `spare_row` pads, its first
    cell `spare_row * table_width` maps to the spare slot, `dump_cell` receives the dummies' ids.
    """

    def __init__(self, forward_fn: ForwardFn, attn: GraphAttentionHooks, *, max_bs: int, vocab_size: int,
                 token_pool: torch.Tensor, slot_table: torch.Tensor, table_width: int, spare_row: int,
                 dump_cell: int, logits_dtype: torch.dtype, device: torch.device | str,
                 stream: torch.cuda.Stream | None = None, batch_sizes: Sequence[int] | None = None,
                 lora=None) -> None:
        self.forward_fn = forward_fn
        self.lora = lora  # the engine's DeviceLora, when adapters are served
        self.attn = attn
        self.device = torch.device(device)
        self.sizes = sorted(set(batch_sizes)) if batch_sizes is not None else graph_batch_sizes(max_bs)
        if not self.sizes or self.sizes[0] < 1:
            raise ValueError(f"no valid batch size to capture: {self.sizes}")
        self.max_bs = self.sizes[-1]
        self.vocab_size = vocab_size
        self.token_pool, self.slot_table = token_pool.view(-1), slot_table.view(-1)
        self.spare_row = spare_row
        # what a dummy request holds in each of StaticDecodeInputs.FIELDS
        self.pad = (spare_row * table_width, 0, spare_row, 1, dump_cell)
        self.stream = stream
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.inputs = StaticDecodeInputs.allocate(self.max_bs, self.device)
        self.logits = torch.zeros(self.max_bs, vocab_size, dtype=logits_dtype, device=self.device)
        self.greedy_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=self.device)
        self.lora_slots = torch.full((self.max_bs,), -1, dtype=torch.int64, device=self.device)

    def can_run(self, batch_size: int) -> bool:
        return bool(self.graphs) and 1 <= batch_size <= self.max_bs

    def _step(self, bs: int) -> None:
        """What a graph of `bs` requests runs: gathers, forward, logits, greedy ids into the pool."""
        v = self.inputs.views(bs)
        input_ids = self.token_pool[v["token_cells"]]
        self.inputs.out_loc[:bs].copy_(self.slot_table[v["token_cells"]])
        lora = self.lora.graph_batch(self.lora_slots[:bs]) if self.lora is not None else None
        fwd = ForwardBatch(self.attn, self.inputs.last_token_indices[:bs], lora)
        logits = self.forward_fn(input_ids, v["positions"], fwd)
        # an elementwise kernel, not copy_(): a same-dtype copy_ is a memcpy node, and a graph that
        # is not all kernel nodes may lose CUDA 12.6+'s constant-time launch (graph_census.py)
        torch.mul(logits, 1, out=self.logits[:bs])
        torch.argmax(logits, dim=1, out=self.greedy_ids[:bs])
        self.token_pool.index_put_((v["sampled_cells"],), self.greedy_ids[:bs])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one shared memory pool."""
        self.attn.init_cuda_graph(self.max_bs)
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        stream = self.stream if self.stream is not None else torch.cuda.Stream(self.device)
        for bs in sorted(self.sizes, reverse=True):
            dummies = np.repeat(np.asarray(self.pad, dtype=np.int64), bs)
            self.inputs.packed[:dummies.shape[0]].copy_(torch.from_numpy(dummies))
            self.attn.prepare_for_capture(bs, self.inputs.layout(bs, [], [], self.spare_row))
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm up (lazy inits, kernel loads) outside the graph
                self._step(bs)
            torch.cuda.synchronize(self.device)
            graph = new_graph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                self._step(bs)
            instantiate_kept(graph)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured CUDA graphs for decode batch sizes %s (%.1f MiB)", self.sizes, used / 2**20)

    def replay(self, host: HostBatchIndices, staging: HostStaging,
               lora_slots: Sequence[int] | None = None) -> GraphStepOutput:
        """Run a decode batch (bs <= max_bs, indices built on the host) through its graph;
        `lora_slots`: each row's adapter slot, when adapters are served."""
        bs = host.rows.shape[0]
        padded = pick_graph_bs(bs, self.sizes)
        if padded is None or padded not in self.graphs:
            raise ValueError(f"no captured graph holds a batch of {bs}")
        values = StaticDecodeInputs.host_values(host, padded, self.pad)
        staging.copy_into(self.inputs.packed[:values.shape[0]], values)
        if self.lora is not None:
            slots = np.full(padded, -1, dtype=np.int64)
            slots[:bs] = lora_slots
            staging.copy_into(self.lora_slots[:padded], slots)
        self.attn.prepare_for_replay(padded, self.inputs.layout(padded, host.seq_lens.tolist(), host.rows.tolist(),
                                                                self.spare_row))
        self.graphs[padded].replay()
        return GraphStepOutput(self.logits[:bs], self.greedy_ids[:bs], self.inputs.views(padded)["sampled_cells"][:bs])

    def census(self, bs: int) -> dict:
        """The captured graph of `bs` requests: its nodes and edges by type, and whether it is a
        straight line (`graph_census.census`)."""
        return census_of(self.graphs[bs])

    def close(self) -> None:
        """Drop the graphs (before tearing down NCCL, whose communicators they reference)."""
        self.graphs.clear()
        self.pool = None


def build_graph_runner(config, forward_fn: ForwardFn, attn: object, *, vocab_size: int, page_table,
                       logits_dtype: torch.dtype, max_running_requests: int, device: torch.device | str,
                       stream: torch.cuda.Stream | None = None, lora=None) -> CudaGraphRunner | None:
    """A captured runner, or None where graphs are off: `config.graph.enable_cuda_graph` false,
    not on CUDA, or an attention backend without the graph hooks (the torch one). `page_table`
    is the engine's `PageTable`."""
    graph_cfg = config.graph
    if not graph_cfg.enable_cuda_graph or torch.device(device).type != "cuda" or not supports_cuda_graph(attn):
        return None
    max_bs = min(graph_cfg.cuda_graph_max_bs, max_running_requests)
    if max_bs < 1:
        return None
    runner = CudaGraphRunner(forward_fn, attn, max_bs=max_bs, vocab_size=vocab_size,
                             token_pool=page_table.tokens, slot_table=page_table.slots,
                             table_width=page_table.width, spare_row=page_table.spare_row,
                             dump_cell=page_table.dump_cell, logits_dtype=logits_dtype, device=device, stream=stream,
                             lora=lora)
    runner.capture()
    return runner
