"""The offline API: `LLM(model).generate(prompts, params)` on the same scheduler as the server.

With tp_size 1 the scheduler runs in this process (driven until idle); with tp_size > 1 the
scheduler processes are started exactly as the Triton model starts them.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from minisgl_backend.config import EngineConfig
from minisgl_backend.messages import AbortMsg, TokenEvent, UserMsg
from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.frontend import Frontend, RequestStream, StreamOutput, check_prompt, tokenize_prompt
from minisgl_backend.launch import build_scheduler
from minisgl_backend.scheduler.io import LocalIO
from minisgl_backend.tokenizer import load_tokenizer

Prompt = str | list[int]


class _Collected:
    """Accumulates one request's stream into the dict that `generate` returns."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.last: StreamOutput | None = None
        self.done = threading.Event()

    def add(self, out: StreamOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or [])
        self.last = out
        if out.finished:
            self.done.set()

    def result(self) -> dict[str, Any]:
        last = self.last
        return {"text": "".join(self.text), "token_ids": self.token_ids,
                "finish_reason": last.finish_reason if last else None,
                "error": last.error if last else "no output",
                "num_input_tokens": last.num_input_tokens if last else 0,
                "cached_tokens": last.cached_tokens if last else 0,
                "logprobs": self.logprobs or None}


class LLM:
    def __init__(self, model: str, **settings: Any) -> None:
        self.config = EngineConfig.from_flat(model_path=model, **settings)
        self.tokenizer = load_tokenizer(self.config.model.model_path)
        self._next_rid = 1
        self.frontend: Frontend | None = None
        if self.config.parallel.tp_size > 1:
            self.frontend = Frontend(self.config)
            self.context_len = self.frontend.context_len
        else:
            self.io = LocalIO(listener=self._on_events)
            self.scheduler = build_scheduler(self.config, 0, io_factory=lambda: self.io)
            self.context_len = self.scheduler.context_len
        self._streams: dict[int, tuple[RequestStream, _Collected]] = {}

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[dict[str, Any]]:
        prompts = self._as_list(prompts)
        params_list = self._params_for(prompts, params)
        ids_list = [tokenize_prompt(self.tokenizer, p) for p in prompts]
        for ids in ids_list:
            check_prompt(ids, self.context_len)
        if self.frontend is not None:
            return self._generate_remote(ids_list, params_list)
        collected = []
        for ids, p in zip(ids_list, params_list):
            rid, self._next_rid = self._next_rid, self._next_rid + 1
            col = _Collected()
            self._streams[rid] = (RequestStream(rid, self.tokenizer, ids, p), col)
            self.io.put(UserMsg(rid, ids, p))
            collected.append(col)
        self.scheduler.run_until_idle()
        return [c.result() for c in collected]

    def _generate_remote(self, ids_list: list[list[int]], params_list: list[SamplingParams]) -> list[dict]:
        assert self.frontend is not None
        collected = [_Collected() for _ in ids_list]
        for ids, p, col in zip(ids_list, params_list, collected):
            self.frontend.submit(ids, p, col.add)
        for col in collected:
            col.done.wait()
        return [c.result() for c in collected]

    def _on_events(self, events: list) -> None:
        for event in events:
            if not isinstance(event, TokenEvent) or event.rid not in self._streams:
                continue
            stream, col = self._streams[event.rid]
            out = stream.on_event(event)
            if out is None:
                continue
            col.add(out)
            if out.finished:
                del self._streams[event.rid]
                if stream.stop_hit:
                    self.io.put(AbortMsg(event.rid))

    @staticmethod
    def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)

    @staticmethod
    def _params_for(prompts: list[Prompt], params) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in prompts]
        if isinstance(params, SamplingParams):
            return [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        return list(params)

    def shutdown(self) -> None:
        if self.frontend is not None:
            self.frontend.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
