"""The offline API: `LLM(model).generate(prompts, params)` on the same scheduler as the server.

With tp_size 1 the scheduler runs in this process (driven until idle); with tp_size > 1 the
scheduler processes are started exactly as the Triton model starts them. Either way requests
go through the same `RequestRouter` as the server's.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from minisgl_backend.config import EngineConfig
from minisgl_backend.frontend import Frontend
from minisgl_backend.lora.registry import registry_for, unload_lora
from minisgl_backend.router import RequestRouter, StreamOutput
from minisgl_backend.sampling_params import SamplingParams

Prompt = str | list[int]


class _Collected:
    """Accumulates one request's stream into the dict that `generate` returns."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list = []
        self.prompt_logprobs: list[float] | None = None
        self.prompt_top: list | None = None
        self.last: StreamOutput | None = None
        self.done = threading.Event()

    def add(self, out: StreamOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or [])
        self.top_logprobs.extend(out.top_logprobs or [])
        if out.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top = out.prompt_logprobs, out.prompt_top
        self.last = out
        if out.finished:
            self.done.set()

    def result(self) -> dict[str, Any]:
        last = self.last
        return {"text": "".join(self.text), "token_ids": self.token_ids,
                "finish_reason": last.finish_reason.value if last and last.finish_reason else None,
                "error": last.error if last else "no output",
                "num_input_tokens": last.num_input_tokens if last else 0,
                "cached_tokens": last.cached_tokens if last else 0,
                "logprobs": self.logprobs or None, "top_logprobs": self.top_logprobs or None,
                "prompt_logprobs": self.prompt_logprobs, "prompt_top_logprobs": self.prompt_top}


class LLM:
    """`lora_modules`: {adapter name: PEFT folder} served with `enable_lora=True`; a request picks
    one with `SamplingParams(lora_name=...)`."""

    def __init__(self, model: str, lora_modules: dict[str, str] | None = None, **settings: Any) -> None:
        from minisgl_backend.tokenizer import load_tokenizer

        self.config = EngineConfig.from_flat(model_path=model, **settings)
        self.frontend: Frontend | None = None
        self.scheduler = None
        if self.config.parallel.tp_size > 1:
            self.frontend = Frontend(self.config, lora_modules=lora_modules)
            self.router = self.frontend.router
        else:
            from minisgl_backend.rank import build_scheduler
            from minisgl_backend.scheduler.io import LocalIO

            self.io = LocalIO(listener=lambda events: self.router.dispatch(events))
            self.scheduler = build_scheduler(self.config, 0, io_factory=lambda: self.io)
            self.router = RequestRouter(load_tokenizer(self.config.model.model_path), self.scheduler.context_len,
                                        self.io.put, detokenize_fault_seed=self.config.fault.inject_detokenize_fault_seed,
                                        lora=registry_for(self.config, lora_modules))
        self.tokenizer = self.router.tokenizer
        self.context_len = self.router.context_len

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[dict[str, Any]]:
        prompts = self._as_list(prompts)
        params_list = self._params_for(prompts, params)
        ids_list = [self.router.prepare(p) for p in prompts]  # every prompt checked before any is sent
        collected = [_Collected() for _ in ids_list]
        for ids, p, col in zip(ids_list, params_list, collected):
            self.router.submit(ids, p, col.add, stream=False)
        if self.scheduler is not None:
            self.scheduler.run_until_idle()
        for col in collected:
            col.done.wait()
        return [c.result() for c in collected]

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

    def load_lora(self, name: str, path: str) -> None:
        if self.router.lora is None:
            raise ValueError("LoRA feature is not enabled.")
        self.router.lora.add(name, path)

    def unload_lora(self, name: str) -> None:
        if self.frontend is not None:
            self.frontend.unload_lora(name)
        else:
            unload_lora(self.router, name, self.io.put)

    def shutdown(self) -> None:
        if self.frontend is not None:
            self.frontend.shutdown()
        elif self.scheduler is not None:
            self.scheduler.shutdown()
            self.scheduler = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
