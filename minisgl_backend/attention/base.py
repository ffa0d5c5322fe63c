"""The attention interface every backend implements, the per-batch layout it is planned from, and
what a model's forward receives besides token ids and positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class BatchLayout:
    """Where each request of a batch sits in the KV cache (all tensors on the engine's device).

    Tokens of the batch are laid out request after request: request i contributes
    `extend_lens[i]` new tokens, the last `extend_lens[i]` of its `seq_lens[i]` positions.
    `page_table` rows map a position to a KV slot; slot // page_size is the page.
    """

    is_decode: bool
    rows: torch.Tensor  # [B] int64 page-table rows
    seq_lens: torch.Tensor  # [B] int64 total positions after this batch
    extend_lens: torch.Tensor  # [B] int64 new tokens in this batch
    out_loc: torch.Tensor  # [T] int64 KV slot that each new token's K/V is written to
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    rows_cpu: list[int] | None = None  # host copy of `rows` (metadata built without reading the device)


class AttentionBackend(Protocol):
    def prepare(self, layout: BatchLayout) -> None:
        """Plan once per batch; called before the model's forward."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the new tokens -> [T, Hq * D].

        Stores k/v into the KV cache at `layout.out_loc`, then attends causally over each
        request's whole sequence (cached prefix + new tokens) through the page table.
        """

    def kv_target(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k pool, v pool [slots, Hkv, D], slots [T]): where `forward` would store the new tokens'
        K/V; a caller that stores them itself (a fused kernel) then calls `attend`."""

    def attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        """`forward` without the store: the new tokens' K/V are already in the pool."""


@dataclass
class ForwardBatch:
    attn: AttentionBackend  # already prepared for this batch
    last_token_indices: torch.Tensor  # [B] int64: rows of the flattened tokens whose logits are wanted
    lora: Any = None  # a LoraBatch when the engine serves adapters: each token's adapter and their weights
