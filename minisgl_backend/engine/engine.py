"""The engine of one TP rank: model, KV pool, page table, token pool, forward and sampling."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from minisgl_backend.attention.base import BatchLayout, ForwardBatch
from minisgl_backend.batch import Batch, ScheduledReq
from minisgl_backend.config import EngineConfig
from minisgl_backend.distributed.group import destroy_distributed
from minisgl_backend.engine.graph import build_graph_runner
from minisgl_backend.engine.host_malloc import keep_freed_memory
from minisgl_backend.engine.logprobs import LogitSelection, LogprobDetails, add_prompt_details, sampled_details
from minisgl_backend.engine.sampling import PenaltyInputs, Sampler, SamplingTensors, argmax_rows, dense_logit_bias
from minisgl_backend.engine.metadata import DeviceBatchIndices, HostBatchIndices
from minisgl_backend.grammar.bitmask import apply_mask
from minisgl_backend.kernels import choose_kernels
from minisgl_backend.kvcache import KVCache, PageTable
from minisgl_backend.kvcache.staging import HostResults, HostStaging
from minisgl_backend.lora.device import DeviceLora
from minisgl_backend.models import load_model, read_arch_config
from minisgl_backend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_CPU_KV_BUDGET_BYTES = 1 << 30  # default KV pool on CPU when max_total_tokens is 0


@dataclass
class ForwardResult:
    next_ids: torch.Tensor  # [B] on the device
    # [B] host copy, valid once `ready` has fired; on CUDA a view of a pinned buffer that is
    # reused once this view is gone (`HostResults`)
    next_ids_host: torch.Tensor
    logprobs_host: torch.Tensor | None
    ready: torch.cuda.Event | None  # None on CPU: the copy is already done
    details: LogprobDetails | None = None  # ranks, alternatives, prompt logprobs (read after `wait`)

    def wait(self) -> tuple[list[int], list[float] | None]:
        if self.ready is not None:
            self.ready.synchronize()
        logprobs = self.logprobs_host.tolist() if self.logprobs_host is not None else None
        return self.next_ids_host.tolist(), logprobs


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype_name)
        self.kv_dtype = getattr(torch, config.kv_dtype_name)
        if self.device.type == "cpu":
            keep_freed_memory()  # the step's temporaries are not page-faulted in again every step
        torch.manual_seed(config.seed)
        self.kernels = choose_kernels(config, read_arch_config(config.model.model_path))
        self.model = load_model(config.model.model_path, self.dtype, self.device, self.kernels.layer_ops)
        self.arch = self.model.arch
        self.vocab_size = self.arch.vocab_size
        self.eos_ids = list(self.arch.eos_token_ids)
        self.max_seq_len = self._max_seq_len()
        self.kv_cache = KVCache(self.model.num_layers, self._size_kv_pool(), config.cache.page_size,
                                self.model.num_kv_heads_per_rank, self.model.head_dim, self.kv_dtype, self.device)
        self.page_table = PageTable(config.scheduler.max_running_requests, self.max_seq_len,
                                    self.kv_cache.page_size, self.kv_cache.spare_slot, self.device)
        self.attn = self.kernels.make_attention(self.kv_cache, self.page_table.slots,
                                                num_qo_heads=self.model.num_heads_per_rank,
                                                num_kv_heads=self.model.num_kv_heads_per_rank,
                                                max_batch_size=config.scheduler.max_running_requests)
        self.lora = DeviceLora(config.lora, self.arch, num_heads=self.model.num_heads_per_rank,
                               num_kv_heads=self.model.num_kv_heads_per_rank, dtype=self.dtype, device=self.device,
                               use_kernel=self.kernels.lora_kernel) if config.lora.enable_lora else None
        self.sampler = Sampler()
        self.staging = HostStaging(self.device)
        self.results = HostResults()
        # The engine stream runs batches; the scheduler enqueues its table writes on the default one.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.num_graph_steps = 0  # steps replayed as CUDA graphs
        self.num_graph_verify_steps = 0  # ... of which verified drafts
        self.graph_runner = build_graph_runner(
            config, self.model, self.attn, vocab_size=self.vocab_size, page_table=self.page_table,
            logits_dtype=self.dtype, max_running_requests=self.page_table.num_rows,
            device=self.device, stream=self.stream, lora=self.lora)

    @property
    def num_pages(self) -> int:
        return self.kv_cache.num_pages

    def load_lora(self, slot: int, path: str) -> None:
        """Put this rank's shard of the adapter at `path` into device slot `slot`."""
        self.lora.load(slot, path)

    def forget_lora(self, path: str) -> None:
        if self.lora is not None:
            self.lora.forget(path)

    def shutdown(self) -> None:
        """Free the CUDA graphs, the KV pool and the TP process group (the model unloads)."""
        if self.graph_runner is not None:
            self.graph_runner.close()
            self.graph_runner = None
        self.kv_cache.free()
        destroy_distributed()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------ sizing

    def _size_kv_pool(self) -> int:
        cfg = self.config.cache
        per_token = KVCache.bytes_per_token(self.model.num_layers, self.model.num_kv_heads_per_rank,
                                            self.model.head_dim, self.kv_dtype)
        if cfg.max_total_tokens:
            tokens = cfg.max_total_tokens
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            tokens = int(free * cfg.mem_fraction) // per_token
        else:
            tokens = _CPU_KV_BUDGET_BYTES // per_token
        page_size = cfg.page_size
        num_pages = tokens // page_size
        if num_pages < 1:
            raise ValueError(f"KV pool of {tokens} tokens holds no page of {page_size} tokens")
        logger.info("KV pool: %d pages x %d tokens (%.1f MiB, %s)", num_pages, page_size,
                    num_pages * page_size * per_token / 2**20, str(self.kv_dtype).removeprefix("torch."))
        return num_pages

    def _max_seq_len(self) -> int:
        limit = self.config.model.max_model_len or self.arch.max_position_embeddings
        return min(limit, self.arch.max_position_embeddings)

    # ------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, batch: Batch) -> ForwardResult:
        """Run one batch and sample; sampled ids are also written into the token pool.

        On CUDA everything runs on the engine stream, after what the scheduler stream has
        enqueued so far (page-table and token-pool writes), and returns without waiting.
        """
        with self._engine_stream():
            return self._forward(batch)

    def _forward(self, batch: Batch) -> ForwardResult:
        # one row per sampled position: a verify item's positions are decode rows of their own
        rows = batch.rows()
        ends, ext = [r.end for r in rows], [r.end - r.start for r in rows]
        table_rows = [r.req.row for r in rows]
        # ids sampled for a chunk that does not sample land in the dump cell (never read)
        host = HostBatchIndices.build(table_rows, [r.start for r in rows], ends, self.page_table.width,
                                      [r.samples for r in rows], self.page_table.dump_cell)
        if batch.is_decode and self.graph_runner is not None and self.graph_runner.can_run(len(rows)):
            return self._forward_graph(batch, rows, host)
        idx = DeviceBatchIndices.unpack(self.staging.to_device(host.pack()), len(rows))
        input_ids = self.page_table.tokens.view(-1)[idx.token_flat]
        out_loc = self.page_table.slots.view(-1)[idx.token_flat].long()
        self.attn.prepare(BatchLayout(batch.is_decode, idx.rows, idx.seq_lens, idx.extend_lens, out_loc,
                                      ends, ext, table_rows))
        selection = None if batch.is_decode else LogitSelection.build(rows, host.last_token)
        logit_rows = idx.last_token if selection is None else self.staging.to_device(selection.token_indices)
        lora = self.lora.batch(rows, self.staging) if self.lora is not None else None
        logits = self.model(input_ids, idx.positions, ForwardBatch(self.attn, logit_rows, lora)).float()
        selected = logits
        if selection is not None:
            logits = selected[self.staging.to_device(selection.sample_rows)]
        next_ids, logprobs, details = self._sample(batch, rows, logits)
        if selection is not None:
            details = details or LogprobDetails(0)
            add_prompt_details(details, selection, selected, self._pinned_results())
        # the next step reads its input ids from the token pool, so they never wait on the host
        self.page_table.tokens.view(-1)[idx.sampled_flat] = next_ids
        return self._copy_to_host(next_ids, logprobs, details)

    def _forward_graph(self, batch: Batch, rows: list[ScheduledReq], host: HostBatchIndices) -> ForwardResult:
        argmax = self._greedy_argmax_suffices(batch, rows)
        # the replay writes its argmax ids into the token pool, over the drafts a verify row's
        # penalties count: read the histories first
        penalties = None if argmax else self._penalty_inputs(rows)
        lora_slots = [r.req.lora_slot for r in rows] if self.lora is not None else None
        out = self.graph_runner.replay(host, self.staging, lora_slots)
        self.num_graph_steps += 1
        self.num_graph_verify_steps += batch.has_drafts
        if argmax:  # the graph's argmax, already in the token pool
            # the next replay overwrites it: on CUDA it is copied out first, elsewhere cloned
            ids = out.greedy_ids if self.device.type == "cuda" else out.greedy_ids.clone()
            return self._copy_to_host(ids, None, None)
        next_ids, logprobs, details = self._sample_rows(batch, rows, out.logits, penalties)
        self.page_table.tokens.view(-1)[out.sampled_cells] = next_ids
        return self._copy_to_host(next_ids, logprobs, details)

    @staticmethod
    def _greedy_argmax_suffices(batch: Batch, rows: list[ScheduledReq]) -> bool:
        """Every row takes its plain argmax: greedy, no penalty, logprob, grammar or min_tokens."""
        return batch.grammar_mask is None and all(r.end >= r.req.argmax_from for r in rows)

    def _engine_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    def _sample(self, batch: Batch, rows: list[ScheduledReq], logits: torch.Tensor):
        if self._greedy_argmax_suffices(batch, rows):  # no per-row sampling state to build
            return argmax_rows(logits), None, None
        return self._sample_rows(batch, rows, logits)

    def _sample_rows(self, batch: Batch, rows: list[ScheduledReq], logits: torch.Tensor,
                     penalties: PenaltyInputs | None = None):
        """Sampling with per-row state: temperature, penalties, logit bias, logprobs, min_tokens, a
        grammar mask. Returns (ids, logprobs or None, their ranks and alternatives or None).
        `penalties`: the rows' histories when read already (else from the token pool now)."""
        if batch.grammar_mask is not None:  # structured output: forbidden tokens -> -inf before any sampling step
            logits = apply_mask(logits, batch.grammar_mask)
        reqs = [r.req for r in rows]
        params = [r.params for r in reqs]
        steps = [row.end - len(r.input_ids) for row, r in zip(rows, reqs)]
        st = SamplingTensors.build(params, [r.seed for r in reqs], steps, self.device, self.staging)
        if st.need_penalties and penalties is None:
            penalties = self._penalty_inputs(rows)
        suppress = self._suppressed_ids(rows, steps)
        bias = dense_logit_bias([p.logit_bias for p in params], logits.shape[1], self.staging)
        ids = self.sampler.sample(logits, st, penalties, suppress_ids=suppress, bias=bias)
        if not st.need_logprobs:
            return ids, None, None
        top_k = max(p.top_logprobs for p in params if p.logprobs)
        logprobs, details = sampled_details(logits, ids, top_k, self._pinned_results())
        return ids, logprobs, details

    def _penalty_inputs(self, rows: list[ScheduledReq]) -> PenaltyInputs | None:
        """The rows' prompt and output ids (None when no row uses penalties). Outputs are read
        from the token pool, so that an id sampled by an in-flight batch counts, and so do the
        drafts before a verify row's position (they are its history if they are accepted)."""
        if not any(_has_penalties(r.req.params) for r in rows):
            return None
        prompts, outputs = [], []
        for it in rows:
            row, n_in = it.req.row, len(it.req.input_ids)
            prompts.append(self.page_table.tokens[row, :n_in])
            outputs.append(self.page_table.tokens[row, n_in:max(it.end, n_in)])
        pad = lambda seqs: torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=-1)  # noqa: E731
        return PenaltyInputs.build(pad(outputs), self.vocab_size, pad(prompts))

    def _suppressed_ids(self, rows: list[ScheduledReq], steps: list[int]) -> torch.Tensor | None:
        """EOS and stop ids may not end a request before its `min_tokens`."""
        out = []
        for it, step in zip(rows, steps):
            p = it.req.params
            if step < p.min_tokens:
                out.append(([] if p.ignore_eos else self.eos_ids) + list(p.stop_token_ids))
            else:
                out.append([])
        if not any(out):
            return None
        width = max(len(r) for r in out)
        padded = np.array([r + [-1] * (width - len(r)) for r in out], dtype=np.int64)
        return self.staging.to_device(padded.ravel()).view(len(out), width)

    def _pinned_results(self) -> HostResults | None:
        """Where device results are copied for the host on CUDA (None: on the CPU they are there)."""
        return self.results if self.device.type == "cuda" else None

    def _copy_to_host(self, next_ids: torch.Tensor, logprobs: torch.Tensor | None,
                      details: LogprobDetails | None) -> ForwardResult:
        if self.device.type != "cuda":
            return ForwardResult(next_ids, next_ids, logprobs, None, details)
        host_ids = self.results.copy(next_ids)
        host_lp = self.results.copy(logprobs) if logprobs is not None else None
        event = torch.cuda.Event()
        event.record(self.stream)
        return ForwardResult(next_ids, host_ids, host_lp, event, details)


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
