"""Logprobs beyond the sampled token's own: its rank and the most likely alternatives
(`top_logprobs`), and the logprobs of a request's prompt tokens (`prompt_logprobs`).

Prompt logprobs need the logits of every prompt position, not just the last: `LogitSelection`
says which rows of the flattened batch the model computes logits for (each row's last token,
plus every position of the rows that want prompt logprobs) in ascending order, so a selection
that covers every token needs no gather at all. Rows are `Batch.rows()`: a speculative verify
item is already one row per position, so it needs no selection of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from minisgl_backend.batch import ScheduledReq
from minisgl_backend.engine.sampling import logprob_details
from minisgl_backend.kvcache.staging import HostResults
from minisgl_backend.messages import TopLogprobs


@dataclass
class PromptRows:
    """One item's rows of the selection that predict prompt tokens."""

    item: int  # index of the item's row in the batch (`Batch.rows()`)
    rows: slice  # rows of the selected logits
    targets: list[int]  # the prompt token each row predicts
    k: int  # alternatives per position


@dataclass
class LogitSelection:
    token_indices: np.ndarray  # ascending indices into the batch's flattened tokens
    sample_rows: np.ndarray  # [B] the row of each item's last token within the selection
    prompt: list[PromptRows]

    @classmethod
    def build(cls, rows: Sequence[ScheduledReq], last_token: np.ndarray) -> "LogitSelection | None":
        """None when no row of the batch (`Batch.rows()`) wants prompt logprobs (the last tokens
        suffice)."""
        wanted = [_prompt_positions(item) for item in rows]
        if not any(hi > lo for lo, hi in wanted):
            return None
        indices, sample_rows, prompt = [], [], []
        first_tokens = last_token - np.array([it.end - it.start for it in rows]) + 1
        for i, (item, (lo, hi), first) in enumerate(zip(rows, wanted, first_tokens)):
            if hi > lo:
                start_row = len(indices)
                indices.extend(range(first + lo - item.start, first + hi - item.start))
                prompt.append(PromptRows(i, slice(start_row, len(indices)), item.req.input_ids[lo + 1:hi + 1],
                                         item.req.params.prompt_logprobs))
            if not indices or indices[-1] != last_token[i]:
                indices.append(int(last_token[i]))
            sample_rows.append(len(indices) - 1)
        return cls(np.asarray(indices, dtype=np.int64), np.asarray(sample_rows, dtype=np.int64), prompt)


def _prompt_positions(item) -> tuple[int, int]:
    """Positions [lo, hi) of this step whose logits score the next prompt token, for a request
    that asked prompt logprobs and has not had them yet (a retracted request resumes past them)."""
    req = item.req
    if req.params.prompt_logprobs is None:
        return 0, 0
    lo = max(item.start, len(req.prompt_logprobs))
    return lo, min(item.end, len(req.input_ids) - 1)


@dataclass
class LogprobDetails:
    """Ranks and alternatives of one step on the host (pinned copies on CUDA), read after the
    step's copy-done event: per sampled row, and per item that asked prompt logprobs."""

    top_k: int
    ranks: torch.Tensor | None = None  # [B]
    top_ids: torch.Tensor | None = None  # [B * top_k]
    top_logprobs: torch.Tensor | None = None
    prompt: list[PromptRows] | None = None
    prompt_values: list[torch.Tensor] | None = None  # per PromptRows: logprob, rank, ids, logprobs (flat)

    def top(self, row: int, k: int) -> TopLogprobs:
        """Row `row`'s rank and its `k` (<= the batch's `top_k`) most likely tokens."""
        start = row * self.top_k
        return TopLogprobs(int(self.ranks[row]), self.top_ids[start:start + k].tolist(),
                           self.top_logprobs[start:start + k].tolist())

    def prompt_logprobs(self) -> dict[int, tuple[list[float], list[TopLogprobs]]]:
        """item index -> (logprob of each predicted prompt token, its rank and alternatives)."""
        out = {}
        for rows, (lp, rank, ids, lps) in zip(self.prompt or [], _chunks(self.prompt_values or [], 4)):
            k = rows.k
            ids, lps = ids.tolist(), lps.tolist()
            tops = [TopLogprobs(int(r), ids[j * k:(j + 1) * k], lps[j * k:(j + 1) * k])
                    for j, r in enumerate(rank.tolist())]
            out[rows.item] = (lp.tolist(), tops)
        return out


def sampled_details(logits: torch.Tensor, ids: torch.Tensor, top_k: int,
                    results: HostResults | None) -> tuple[torch.Tensor, LogprobDetails]:
    """(logprob [B] on the device, the ranks and top-k on the host) of the sampled ids."""
    lp, rank, top_ids, top_lp = logprob_details(logits, ids, top_k)
    copy = results.copy if results is not None else (lambda t: t)
    return lp, LogprobDetails(top_k, copy(rank), copy(top_ids.reshape(-1)), copy(top_lp.reshape(-1)))


def add_prompt_details(details: LogprobDetails, selection: LogitSelection, logits: torch.Tensor,
                       results: HostResults | None) -> None:
    copy = results.copy if results is not None else (lambda t: t)
    values = []
    for rows in selection.prompt:
        targets = torch.tensor(rows.targets, dtype=torch.int64, device=logits.device)
        lp, rank, ids, lps = logprob_details(logits[rows.rows], targets, rows.k)
        values += [copy(lp), copy(rank), copy(ids.reshape(-1)), copy(lps.reshape(-1))]
    details.prompt, details.prompt_values = selection.prompt, values


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]
