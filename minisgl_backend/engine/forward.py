"""What a model's forward receives besides token ids and positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisgl_backend.attention.base import AttentionBackend


@dataclass
class ForwardBatch:
    attn: AttentionBackend  # already prepared for this batch
    last_token_indices: torch.Tensor  # [B] int64: rows of the flattened tokens whose logits are wanted
