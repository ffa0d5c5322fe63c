"""From the frontend's `StreamOutput`s to Triton responses (as plain numpy dicts).

No `triton_python_backend_utils` here: the adapter wraps each `Reply` into an
`InferenceResponse`. Semantics follow Triton's vLLM backend:

* streaming: one response per new piece of text (pieces with no text yet are held back and
  merged into the next one), the last carries the FINAL flag; the prompt is never included;
  ``num_output_tokens`` counts the tokens of this response (their sum is the total).
* non-streaming: exactly one response, FINAL, with the whole text; the prompt is prepended
  unless ``exclude_input_in_output`` is true.
* ``finish_reason``, ``num_input_tokens``, ``num_output_tokens``, ``logprobs`` are sent only
  when the matching ``return_*`` switch is true; ``finish_reason`` is "" until the last response.
* ``logprobs``: one float per token of the response; when the sampling parameters asked
  ``logprobs`` as a count, vLLM's shape instead: per token ``{token id: {"logprob", "rank",
  "decoded_token"}}`` holding the sampled token and that many most likely ones.
* ``prompt_logprobs`` (an extension): with the sampling parameter ``prompt_logprobs`` (a count),
  the first response carries the prompt's tokens in the same shape, ``null`` for the first.
* a request that ends in "abort" (cancelled) gets a CANCELLED error, one in "error" an INTERNAL
  error; both FINAL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from minisgl_backend.messages import ErrorKind, FinishReason, TopLogprobs
from minisgl_backend.router import StreamOutput
from minisgl_backend.triton.parsing import ParsedRequest


@dataclass
class Reply:
    outputs: dict[str, np.ndarray] | None  # None: an error reply
    final: bool
    error_code: str | None = None  # "CANCELLED", "INTERNAL", "INVALID_ARG", "UNAVAILABLE"
    error_message: str | None = None


# the engine's error kinds -> Triton error codes
_ERROR_CODES = {ErrorKind.INVALID: "INVALID_ARG", ErrorKind.OVERLOADED: "UNAVAILABLE", ErrorKind.ENGINE: "INTERNAL",
                ErrorKind.REQUEST: "INTERNAL"}


def error_reply(code: str, message: str) -> Reply:
    return Reply(None, True, code, message)


def string_tensor(value: str) -> np.ndarray:
    return np.array([value.encode("utf-8")], dtype=np.object_)


class ResponseAssembler:
    """Per-request state: what was already sent, what is held back."""

    def __init__(self, request: ParsedRequest, prompt_echo: str | None = None,
                 decode_token: Callable[[int], str] = str) -> None:
        self.request = request
        self.prompt_echo = prompt_echo if prompt_echo is not None else (
            request.prompt if isinstance(request.prompt, str) else "")
        self.decode_token = decode_token
        self._text: list[str] = []  # held back (streaming) or everything (non-streaming)
        self._logprobs: list[Any] = []  # floats, or vLLM-shaped dicts
        self._prompt_logprobs: list[Any] | None = None
        self._tokens_reported = 0
        self.num_output_tokens = 0
        self.num_input_tokens = 0
        self.done = False

    def on_output(self, out: StreamOutput) -> list[Reply]:
        """Feed one StreamOutput; return the replies to send now (zero or one)."""
        if self.done:
            return []
        self.num_output_tokens = max(self.num_output_tokens, int(out.num_output_tokens or 0))
        self.num_input_tokens = int(out.num_input_tokens or 0)
        if out.text:
            self._text.append(out.text)
        if out.logprobs:
            self._logprobs.extend(self._logprob_entries(out.token_ids, out.logprobs, out.top_logprobs))
        if out.prompt_logprobs is not None:
            ids = out.prompt_token_ids or []
            self._prompt_logprobs = [None] + self._vllm_entries(ids[1:], out.prompt_logprobs, out.prompt_top)
        if not out.finished:
            if self.request.stream and self._text:
                return [self._data_reply(final=False, reason="")]
            return []
        self.done = True
        reason = out.finish_reason or FinishReason.STOP
        if reason is FinishReason.ABORT:
            return [error_reply("CANCELLED", "the request was cancelled")]
        if reason is FinishReason.ERROR:
            code = _ERROR_CODES.get(out.error_kind, "INTERNAL")
            return [error_reply(code, out.error or "the engine failed to serve this request")]
        return [self._data_reply(final=True, reason=reason.value)]

    def _data_reply(self, final: bool, reason: str) -> Reply:
        req = self.request
        text = "".join(self._text)
        if not req.stream and not req.exclude_input_in_output:
            text = self.prompt_echo + text
        outputs = {"text_output": string_tensor(text)}
        if req.return_finish_reason:
            outputs["finish_reason"] = string_tensor(reason)
        if req.return_num_input_tokens:
            outputs["num_input_tokens"] = np.array([self.num_input_tokens], dtype=np.uint32)
        if req.return_num_output_tokens:
            count = self.num_output_tokens - self._tokens_reported if req.stream else self.num_output_tokens
            outputs["num_output_tokens"] = np.array([max(count, 0)], dtype=np.uint32)
        if req.return_logprobs:
            outputs["logprobs"] = string_tensor(json.dumps(self._logprobs))
        if self._prompt_logprobs is not None:
            outputs["prompt_logprobs"] = string_tensor(json.dumps(self._prompt_logprobs))
        self._tokens_reported = self.num_output_tokens
        self._text, self._logprobs, self._prompt_logprobs = [], [], None
        return Reply(outputs, final)

    def _logprob_entries(self, ids: list[int], logprobs: list[float], top: list[TopLogprobs] | None) -> list[Any]:
        if not self.request.vllm_logprobs:
            return [float(x) for x in logprobs]
        return self._vllm_entries(ids, logprobs, top)

    def _vllm_entries(self, ids: list[int], logprobs: list[float], top: list[TopLogprobs] | None) -> list[dict]:
        """Per token {id: {"logprob", "rank", "decoded_token"}}: the token itself, then the most likely."""
        entries = []
        for j, (token, logprob) in enumerate(zip(ids, logprobs)):
            at = top[j] if top and j < len(top) else None
            entry = {str(token): self._vllm_logprob(token, logprob, at.rank if at else None)}
            for rank, (alt, alt_lp) in enumerate(zip(at.ids, at.logprobs) if at else (), start=1):
                entry.setdefault(str(alt), self._vllm_logprob(alt, alt_lp, rank))
            entries.append(entry)
        return entries

    def _vllm_logprob(self, token: int, logprob: float, rank: int | None) -> dict:
        return {"logprob": float(logprob), "rank": rank, "decoded_token": self.decode_token(token)}
