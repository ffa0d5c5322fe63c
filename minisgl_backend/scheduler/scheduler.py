"""The scheduler of one TP rank: admits requests, builds batches, runs the engine, emits tokens.

Every rank runs the same deterministic schedule over the same messages (rank 0 receives them
and broadcasts), so only token ids ever cross process boundaries.
"""

from __future__ import annotations

import logging
import random
import time

from minisgl_backend.config import EngineConfig
from minisgl_backend.batch import Batch, Req, ScheduledReq
from minisgl_backend.messages import (AbortMsg, DropLoraMsg, ErrorKind, FinishReason, FlushCacheMsg, SchedulerInput,
                                      ShutdownMsg, StatsEvent, TokenEvent, TopLogprobs, UserMsg)
from minisgl_backend.engine.engine import Engine, ForwardResult
from minisgl_backend.engine.speculative import kept_ids
from minisgl_backend.grammar.manager import GrammarManager
from minisgl_backend.scheduler.adapters import AdapterResidency
from minisgl_backend.scheduler.cache import CacheManager
from minisgl_backend.scheduler.decode import DecodeManager
from minisgl_backend.scheduler.events import StepEvents
from minisgl_backend.scheduler.faults import NoResult, check_injected_fault, is_device_failure
from minisgl_backend.scheduler.io import SchedulerIO
from minisgl_backend.scheduler.policy import SchedulePolicy
from minisgl_backend.scheduler.prefill import PrefillManager
from minisgl_backend.scheduler.spec_cost import measure_step_cost
from minisgl_backend.scheduler.speculative import Speculator
from minisgl_backend.scheduler.table import TableManager
from minisgl_backend.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

InFlight = tuple[Batch, ForwardResult]
_STATS_INTERVAL_S = 0.05


class Scheduler:
    def __init__(self, config: EngineConfig, engine: Engine, io: SchedulerIO,
                 num_pages: int | None = None) -> None:
        self.config = config
        self.engine = engine
        self.io = io
        pages = num_pages if num_pages is not None else engine.num_pages  # TP: the minimum over ranks
        self.cache = CacheManager(pages, engine.kv_cache.page_size, engine.page_table.slots,
                                  config.cache.enable_prefix_cache)
        self.table = TableManager(engine.page_table)
        sc = config.scheduler
        self.policy = SchedulePolicy(sc.schedule_policy, self.cache, max_wait_steps=sc.max_wait_steps)
        self.adapters = (AdapterResidency(config.lora.max_loras, engine.load_lora)
                         if config.lora.enable_lora else None)
        self.prefill = PrefillManager(self.cache, self.table, sc.chunk_size, self.policy, self.adapters)
        self.decode = DecodeManager(self.cache)
        self.spec = Speculator(config.speculative)
        if self.spec.enabled:
            self.spec.cost = measure_step_cost(engine, self.cache, self.table, config.speculative.speculative_num_tokens)
            logger.info("speculative decoding: a decode step of one request takes %.2f ms, drafts add %s ms",
                        1e3 * self.spec.cost.one, [round(1e3 * t, 2) for t in self.spec.cost.extra[1:]])
        self._prefill_streak = 0  # prefill-only steps in a row while requests wait to decode
        self.context_len = min(engine.max_seq_len, pages * self.cache.page_size)
        self.eos_ids = engine.eos_ids
        self.vocab_size = engine.vocab_size
        self.reqs: dict[int, Req] = {}
        self.grammar = GrammarManager(lambda: load_tokenizer(config.model.model_path), engine.vocab_size,
                                      engine.eos_ids, config.device)
        self._rng = random.Random(config.seed)
        self._events = StepEvents()
        self._last_stats = 0.0
        self.stopped = False
        self.num_steps = 0
        self.num_retracted = 0
        self._was_idle = False

    # ------------------------------------------------------------ loops

    def run_forever(self) -> None:
        loop = self.overlap_loop if self.config.scheduler.enable_overlap else self.normal_loop
        loop()

    def normal_loop(self, until_idle: bool = False) -> None:
        """The serial reference: schedule, run, process, repeat."""
        while not self.stopped:
            self._receive(block=self.is_idle and not until_idle)
            if until_idle and self.is_idle:
                break
            batch = self._schedule_next_batch()
            if batch is not None:
                self._process(batch, self._launch(batch))
            self._flush_events()

    def overlap_loop(self, until_idle: bool = False) -> None:
        """Schedule and launch batch N+1 before processing batch N's results.

        On CUDA batch N still runs on the engine stream while the CPU does this; on CPU the same
        order runs serially. Retraction, grammar masks and drafts need host-side token ids, so
        they process N first (and so does a batch N that verified drafts: its requests' lengths
        are known only then).
        """
        last: InFlight | None = None
        while not self.stopped:
            self._receive(block=self.is_idle and last is None and not until_idle)
            if until_idle and self.is_idle and last is None:
                break
            if last is not None and self._needs_previous_tokens(last[0]):
                self._process(*last)
                last = None
            batch = self._schedule_next_batch()
            current = (batch, self._launch(batch)) if batch is not None else None
            if last is not None:
                self._process(*last)
            last = current
            self._flush_events()
        if last is not None:
            self._process(*last)
            self._flush_events()

    def _needs_previous_tokens(self, in_flight: Batch) -> bool:
        return (self.decode.needs_retraction() or self.grammar.needs_previous_tokens(in_flight)
                or self.spec.needs_previous_tokens(in_flight, self.decode.decodable()))

    def run_until_idle(self) -> None:
        """Serve what has been received until nothing is left (the offline API's driver)."""
        if self.config.scheduler.enable_overlap:
            self.overlap_loop(until_idle=True)
        else:
            self.normal_loop(until_idle=True)
        self._flush_events()

    def shutdown(self) -> None:
        """Close the IO and free the engine's memory, graphs and process group."""
        self.io.close()
        self.grammar.close()
        self.engine.shutdown()

    @property
    def is_idle(self) -> bool:
        return not self.prefill.has_work and not self.decode.running and not self.grammar.waiting

    # ------------------------------------------------------------ messages

    def _receive(self, block: bool) -> None:
        for msg in self.io.recv(block):
            self.handle(msg)
        self._admit_grammars()

    def handle(self, msg: SchedulerInput) -> None:
        if isinstance(msg, UserMsg):
            self._add_request(msg)
        elif isinstance(msg, AbortMsg):
            self.abort(msg.rid)
        elif isinstance(msg, FlushCacheMsg):
            self.cache.flush()
            self._emit_stats(force=True)
        elif isinstance(msg, DropLoraMsg):
            self.cache.drop_namespace(msg.lora_path)
            if self.adapters is not None:
                self.adapters.drop(msg.lora_path)
            self.engine.forget_lora(msg.lora_path)
            self._emit_stats(force=True)
        elif isinstance(msg, ShutdownMsg):
            self.stopped = True

    def _add_request(self, msg: UserMsg) -> None:
        error = self._validate(msg)
        if error is not None:
            kind, message = error
            self._events.append(TokenEvent(msg.rid, [], FinishReason.ERROR, error=message,
                                           error_kind=kind, num_input_tokens=len(msg.input_ids)))
            return
        seed = msg.params.seed if msg.params.seed is not None else self._rng.getrandbits(63)
        max_out = min(msg.params.max_tokens, self.context_len - len(msg.input_ids))
        req = Req(msg.rid, list(msg.input_ids), msg.params, seed, max_out, arrival_time=msg.arrival_time,
                  lora=msg.lora_path)
        self.reqs[msg.rid] = req
        if msg.params.structured_outputs is not None:
            self.grammar.add(req)  # waits off the queue until its grammar has compiled
        else:
            self.prefill.add(req)

    def _validate(self, msg: UserMsg) -> tuple[ErrorKind, str] | None:
        n = len(msg.input_ids)
        if msg.rid in self.reqs:
            return ErrorKind.INVALID, f"request id {msg.rid} is already in use"
        if n == 0:
            return ErrorKind.INVALID, "the prompt is empty: send at least one token"
        if msg.lora_path is not None and self.adapters is None:
            return ErrorKind.INVALID, "LoRA feature is not enabled."
        if n >= self.context_len:
            return ErrorKind.INVALID, (f"the prompt has {n} tokens but the context holds at most {self.context_len} "
                                       f"(prompt plus at least one output token): shorten the prompt")
        if len(self.prefill.pending) >= self.config.scheduler.max_pending_requests:
            return ErrorKind.OVERLOADED, (f"the server is overloaded: {len(self.prefill.pending)} requests are "
                                          f"already waiting (max_pending_requests); retry later")
        bad = [t for t in msg.input_ids if not 0 <= t < self.vocab_size]
        if bad:
            return ErrorKind.INVALID, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
        biased = [t for t in msg.params.logit_bias or {} if t >= self.vocab_size]
        if biased:
            return ErrorKind.INVALID, (f"sampling parameter 'logit_bias' names token id {biased[0]}, outside the "
                                       f"vocabulary [0, {self.vocab_size})")
        return None

    def abort(self, rid: int) -> None:
        req = self.reqs.get(rid)
        if req is None or req.finished:
            return
        self.prefill.remove(req)
        self.grammar.remove(req)
        self._finish(req)
        self._events.append(TokenEvent(rid, [], FinishReason.ABORT))
        self._release_if_done(req)

    # ------------------------------------------------------------ scheduling

    def _schedule_next_batch(self) -> Batch | None:
        self.policy.tick()
        if self.config.scheduler.enable_mixed_batches:
            return self._schedule_mixed()
        return self._schedule_prefill_first()

    def _schedule_mixed(self) -> Batch | None:
        """One decode token for every running request plus prefill chunks up to the step budget
        (chunked-prefill piggybacking). A step with any prefill is not a decode batch, so CUDA
        graphs serve only the pure-decode steps."""
        cfg = self.config.scheduler
        retracted = self._retract_if_needed()
        decode_items = self._schedule_decode()
        budget = cfg.prefill_budget
        if decode_items:
            budget = min(budget, cfg.step_token_budget - sum(it.end - it.start for it in decode_items))
        prefill_items = []
        if budget > 0 and not retracted:  # a retracted request must not be readmitted at once
            prefill_items = self.prefill.schedule(budget, len(self.decode.decodable()))
            self._start_decoding(prefill_items)
        items = decode_items + prefill_items
        return Batch(items, is_decode=not prefill_items) if items else None

    def _schedule_prefill_first(self) -> Batch | None:
        """Prefill while requests wait (bounded by the prefill budget), otherwise decode every
        running request; decode still runs at least every `max_prefill_steps_in_a_row` steps."""
        decodable = self.decode.decodable()
        if not decodable or self._prefill_streak < self.config.scheduler.max_prefill_steps_in_a_row:
            items = self.prefill.schedule(self.config.scheduler.prefill_budget, len(decodable))
            if items:
                self._prefill_streak = self._prefill_streak + 1 if decodable else 0
                self._start_decoding(items)
                return Batch(items, is_decode=False)
        self._prefill_streak = 0
        self._retract_if_needed()
        items = self._schedule_decode()
        return Batch(items, is_decode=True) if items else None

    def _schedule_decode(self) -> list[ScheduledReq]:
        """Every decodable request's next token; with speculation, drafts to verify, written into
        the token pool after the request's last token."""
        items = self.decode.schedule(self.spec.plan(self.decode.decodable()))
        for item in items:
            if item.drafts:
                self.table.write_tokens(item.req.row, item.start + 1, item.drafts)
        return items

    def _start_decoding(self, items: list[ScheduledReq]) -> None:
        for item in items:
            if item.samples:
                self.decode.add(item.req)

    def _retract_if_needed(self) -> bool:
        if not self.decode.needs_retraction():
            return False
        self._retract(self.decode.pick_victims())
        return True

    def _retract(self, victims: list[Req]) -> None:
        """Preempt the newest requests: their KV goes to the prefix cache, they wait in pending."""
        for req in victims:
            assert req.inflight == 0, "retracting a request whose results are still in flight"
            self.decode.remove(req)
            self._release_kv(req)
            req.cached_len = req.device_len = 0
            if req.grammar is not None:
                req.grammar.sync(req.output_ids)  # the matcher follows exactly the kept output ids
            self.prefill.add(req, front=True)
        self.num_retracted += len(victims)
        if victims:
            logger.info("retracted %d requests (KV pool full)", len(victims))

    def _launch(self, batch: Batch) -> ForwardResult:
        now = time.monotonic()
        for item in batch.items:
            item.req.inflight += 1
            if not item.req.first_scheduled_time:
                item.req.first_scheduled_time = now
        self.num_steps += 1
        try:
            return self._forward(batch)
        except Exception as exc:
            if is_device_failure(exc):
                raise
            return self._isolate_faults(batch, exc)

    def _forward(self, batch: Batch) -> ForwardResult:
        batch.grammar_mask = self.grammar.mask_for(batch)
        result = self.engine.forward(batch)
        check_injected_fault(batch, self.config.fault)  # after the model ran, as a sampling error would
        return result

    # ------------------------------------------------------------ per-request fault isolation

    def _isolate_faults(self, batch: Batch, exc: Exception) -> ForwardResult | NoResult:
        """Fail the requests whose work raises on its own; run the rest of the batch again.

        Re-running is safe: a forward over the same positions writes the same K/V and the same
        seeded samples. Every TP rank takes the same decision, because the exception comes from
        the requests' own (identical) inputs. If no request fails alone, or every one does, the
        engine itself is broken and the exception propagates (the model goes out of service).
        """
        items = batch.items
        failed = {0: exc} if len(items) == 1 else self._failing_alone(batch)
        if not failed or (len(items) > 1 and len(failed) == len(items)):
            raise exc
        for i, error in failed.items():
            self._fail_request(items[i], error)
        batch.items = [item for i, item in enumerate(items) if i not in failed]
        return self._forward(batch) if batch.items else NoResult()

    def _failing_alone(self, batch: Batch) -> dict[int, Exception]:
        failed: dict[int, Exception] = {}
        for i, item in enumerate(batch.items):
            try:
                self._forward(Batch([item], batch.is_decode))
            except Exception as exc:
                if is_device_failure(exc):
                    raise
                failed[i] = exc
        return failed

    def _fail_request(self, item: ScheduledReq, exc: Exception) -> None:
        """End one request with an INTERNAL error and free its KV like an abort."""
        req = item.req
        req.inflight -= 1
        req.cached_len = min(req.cached_len, item.start)  # this step's K/V is suspect: never cache it
        logger.error("request %d failed in the engine, the others go on: %s: %s", req.rid, type(exc).__name__, exc)
        self.prefill.remove(req)
        self._finish(req)
        self._events.append(TokenEvent(req.rid, [], FinishReason.ERROR, error_kind=ErrorKind.REQUEST,
                                       error=f"this request failed in the engine: {type(exc).__name__}: {exc}",
                                       num_input_tokens=len(req.input_ids)))
        self._release_if_done(req)

    # ------------------------------------------------------------ results

    def _process(self, batch: Batch, result: ForwardResult) -> None:
        ids, logprobs = result.wait()
        details = result.details
        prompt = details.prompt_logprobs() if details is not None else {}
        row = 0  # the item's first sampling row (a verify item has several)
        for item in batch.items:
            req = item.req
            req.inflight -= 1
            if row in prompt:
                req.prompt_logprobs += prompt[row][0]
                req.prompt_top += prompt[row][1]
            if item.samples and item.start < len(req.input_ids) and not req.finished and req.row >= 0:
                self.cache.share(req, req.input_ids[:req.cached_len])  # its prompt, for the requests after it
            if item.drafts:
                self._process_verified(item, ids, logprobs, details, row)
            elif item.samples and not req.finished:
                self._append_token(req, ids[row], *self._logprob_of(req, logprobs, details, row))
            self._release_if_done(req)
            row += item.num_rows
        self._emit_stats()

    def _process_verified(self, item: ScheduledReq, ids: list[int], logprobs: list[float] | None,
                          details, row: int) -> None:
        """Append the ids a verify item keeps, one by one (a stop, EOS or the length limit among
        them ends the request there), and roll back what was rejected."""
        req = item.req
        before = len(req.output_ids)
        if not req.finished:
            kept = kept_ids(item.drafts, ids[row:row + item.num_rows])
            self.spec.verified(req, len(item.drafts), len(kept) - 1)
            for j, token in enumerate(kept):
                self._append_token(req, token, *self._logprob_of(req, logprobs, details, row + j))
                if req.finished:
                    break
        self.decode.verified(item, len(req.output_ids) - before)

    @staticmethod
    def _logprob_of(req: Req, logprobs: list[float] | None, details, row: int) -> tuple[float | None,
                                                                                        TopLogprobs | None]:
        if not (req.params.logprobs and logprobs is not None):
            return None, None
        top = details.top(row, req.params.top_logprobs) if details is not None and details.ranks is not None else None
        return logprobs[row], top

    def _append_token(self, req: Req, token: int, logprob: float | None, top: TopLogprobs | None) -> None:
        if req.grammar is not None and not req.grammar.accept(token):
            self._end_rejected(req)
            return
        req.output_ids.append(token)
        reason = self._finish_reason(req, token)
        if reason is None and req.grammar is not None and req.grammar.is_terminated:
            reason = FinishReason.STOP
        self._events.token(req.rid, token, logprob, top)
        if len(req.output_ids) == 1:  # the request's start: what its metrics need
            queue_time = max(req.first_scheduled_time - req.arrival_time, 0.0) if req.arrival_time else 0.0
            asked = req.params.prompt_logprobs is not None
            self._events.append(TokenEvent(req.rid, [], num_input_tokens=len(req.input_ids),
                                           cached_tokens=req.matched_len, queue_time=queue_time,
                                           prompt_logprobs=req.prompt_logprobs if asked else None,
                                           prompt_top=req.prompt_top if asked else None))
        if reason is not None:
            self._events.append(TokenEvent(req.rid, [], reason))
            self._finish(req)

    def _end_rejected(self, req: Req) -> None:
        """The grammar refused the sampled token: min_tokens suppressed every token it allows. When
        that was EOS of a complete output, the output ends there (stop); the token is dropped."""
        first = not req.output_ids
        ok = req.grammar.can_end()
        self._events.append(TokenEvent(
            req.rid, [], FinishReason.STOP if ok else FinishReason.ERROR,
            error=None if ok else ("structured output: min_tokens suppresses every token the grammar allows "
                                   "next (stop_token_ids it needs); lower min_tokens"),
            error_kind=None if ok else ErrorKind.INVALID, num_input_tokens=len(req.input_ids) if first else 0))
        self._finish(req)

    def _admit_grammars(self) -> None:
        """Requests whose grammar compiled (on every rank) join the queue; bad constraints are answered."""
        idle = not self.prefill.has_work and not self.decode.running
        ready, failed = self.grammar.poll(idle)
        for req in ready:
            self.prefill.add(req)
        for f in failed:
            kind = ErrorKind.INVALID if f.client_error else ErrorKind.ENGINE
            self._events.append(TokenEvent(f.req.rid, [], FinishReason.ERROR, error=f.message, error_kind=kind,
                                           num_input_tokens=len(f.req.input_ids)))
            self._finish(f.req)
            self._release_if_done(f.req)

    def _finish_reason(self, req: Req, token: int) -> FinishReason | None:
        p = req.params
        if len(req.output_ids) >= p.min_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
                return FinishReason.STOP
        if len(req.output_ids) >= req.max_output_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Req) -> None:
        req.finished = True
        self.decode.remove(req)

    def _release_if_done(self, req: Req) -> None:
        if req.finished and req.inflight == 0 and req.rid in self.reqs:
            self._release_kv(req)
            del self.reqs[req.rid]

    def _release_kv(self, req: Req) -> None:
        if req.row < 0:
            return
        self.cache.release(req, req.all_ids[:req.cached_len])
        self.table.free_row(req.row)
        req.row = -1
        if self.adapters is not None:
            self.adapters.release(req)

    # ------------------------------------------------------------ events and accounting

    def _flush_events(self) -> None:
        if self.is_idle and not self.reqs and not self._was_idle:
            self._emit_stats(force=True)
            for problem in self.leaks():  # free + cached == pool when nothing runs: cheap to check
                logger.error("resource leak after drain: %s", problem)
        self._was_idle = self.is_idle and not self.reqs
        if self._events:
            self.io.send(self._events.take())

    def _emit_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < _STATS_INTERVAL_S:
            return
        self._last_stats = now
        self._events.append(self.stats())

    def stats(self) -> StatsEvent:
        c = self.cache.stats()
        return StatsEvent(running=len(self.decode.running), pending=len(self.prefill.pending),
                          total_pages=c.total_pages, free_pages=c.free_pages, cached_pages=c.cached_pages,
                          locked_pages=c.locked_pages, free_rows=self.table.free_rows,
                          total_rows=self.table.num_rows, cache_hit_tokens=c.hit_tokens,
                          cache_miss_tokens=c.miss_tokens, spec_verify_rows=self.spec.stats.verify_rows,
                          spec_draft_tokens=self.spec.stats.draft_tokens,
                          spec_accepted_tokens=self.spec.stats.accepted_tokens, **self._lora_stats())

    def _lora_stats(self) -> dict[str, int]:
        a = self.adapters
        if a is None:
            return {}
        requests = {path: (running, 0) for path, running in a.users().items()}
        for req in self.prefill.pending:
            if req.lora is not None:
                running, waiting = requests.get(req.lora, (0, 0))
                requests[req.lora] = (running, waiting + 1)
        return {"lora_resident": len(a.resident()), "lora_loads": a.loads, "lora_evictions": a.evictions,
                "lora_requests": requests}

    def leaks(self) -> list[str]:
        """What an idle scheduler still holds that it should not (empty when nothing leaks)."""
        c = self.cache.stats()
        problems = self.cache.integrity_problems(idle=True)
        if c.locked_pages or c.private_pages:
            problems.append(f"pages still held: locked={c.locked_pages} private={c.private_pages}")
        if self.table.free_rows != self.table.num_rows:
            problems.append(f"table rows still held: {self.table.num_rows - self.table.free_rows}")
        if self.reqs:
            problems.append(f"requests still tracked: {sorted(self.reqs)[:10]}")
        return problems

