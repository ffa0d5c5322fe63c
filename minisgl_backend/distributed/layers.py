"""Tensor-parallel layers (Megatron style) whose weights are loaded shard by shard.

Every parameter carries a `weight_loader(param, source, shard_id=None)`. `source` is a
`WeightSource`: it knows the checkpoint tensor's full shape and reads only the slice asked
for (`narrow`), so a rank never materialises the full weight of a split matrix.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minisgl_backend.distributed.parallel_state import all_gather_last_dim, all_reduce, get_tp_rank, get_tp_size


class WeightSource(Protocol):
    """One checkpoint tensor, read lazily."""

    name: str

    @property
    def shape(self) -> tuple[int, ...]: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...

    def load(self) -> torch.Tensor: ...


class TensorSource:
    """A `WeightSource` over a tensor already in memory (tests, tied weights)."""

    def __init__(self, tensor: torch.Tensor, name: str = "<tensor>") -> None:
        self.tensor, self.name = tensor, name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.tensor.narrow(dim, start, length)

    def load(self) -> torch.Tensor:
        return self.tensor


def check_shape(source: WeightSource, expected: Sequence[int]) -> None:
    if tuple(source.shape) != tuple(expected):
        raise ValueError(f"tensor {source.name!r} has shape {tuple(source.shape)}, expected {tuple(expected)}")


def default_weight_loader(param: nn.Parameter, source: WeightSource, shard_id: object = None) -> None:
    """Replicated parameter: the checkpoint tensor must match it exactly."""
    check_shape(source, param.shape)
    param.data.copy_(source.load())


def _new_param(*shape: int, dtype: torch.dtype | None, loader: Callable) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) must be divisible by tp_size ({d})")
    return n // d


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary is split in contiguous ranges, one per rank.

    Every rank holds `ceil(vocab / tp)` rows (the last shard zero-padded); ids outside a rank's
    range look up zeros there and the all-reduce sums the one real row.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.shard_size = -(-num_embeddings // self.tp_size)
        self.vocab_start = min(self.tp_rank * self.shard_size, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.shard_size, num_embeddings)
        self.weight = _new_param(self.shard_size, embedding_dim, dtype=dtype, loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: object = None) -> None:
        check_shape(source, (self.num_embeddings, self.embedding_dim))
        n = self.vocab_end - self.vocab_start
        if n:
            param.data[:n].copy_(source.narrow(0, self.vocab_start, n))
        param.data[n:].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        mask = (ids >= self.vocab_start) & (ids < self.vocab_end)
        out = F.embedding((ids - self.vocab_start).masked_fill(~mask, 0), self.weight)
        out = out.masked_fill(~mask.unsqueeze(-1), 0)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded over the vocabulary like the embedding; returns full-vocab logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = F.linear(x, self.weight)
        if self.tp_size == 1:
            return logits
        return all_gather_last_dim(logits)[..., : self.num_embeddings]


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks.

    `output_sizes` lists the sub-matrices merged into one weight (e.g. gate and up); each is
    split separately, so a rank holds [gate shard; up shard] and `shard_id` (an index into
    `output_sizes`) says which sub-matrix a checkpoint tensor fills.
    """

    def __init__(
        self, input_size: int, output_sizes: Sequence[int], bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size, self.output_sizes = input_size, list(output_sizes)
        # per sub-matrix: (offset in the local weight, rows on this rank, first row in the checkpoint)
        self.shards = self._plan_shards()
        out_local = sum(rows for _, rows, _ in self.shards)
        self.weight = _new_param(out_local, input_size, dtype=dtype, loader=self.weight_loader)
        self.bias = _new_param(out_local, dtype=dtype, loader=self.weight_loader) if bias else None

    def _plan_shards(self) -> list[tuple[int, int, int]]:
        shards, offset = [], 0
        for size in self.output_sizes:
            rows = _divide(size, self.tp_size, "output size")
            shards.append((offset, rows, self.tp_rank * rows))
            offset += rows
        return shards

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: int | None = None) -> None:
        if shard_id is None:
            if len(self.shards) != 1:
                raise ValueError(f"{source.name!r}: a merged layer needs a shard_id")
            shard_id = 0
        offset, rows, start = self.shards[shard_id]
        full = (self.output_sizes[shard_id],) + tuple(param.shape[1:])
        check_shape(source, full)
        param.data.narrow(0, offset, rows).copy_(source.narrow(0, start, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Merged q/k/v projection split by heads (`shard_id` "q", "k" or "v").

    Query heads are split evenly. KV heads are split when there are at least `tp_size` of
    them; otherwise they are replicated: rank r holds kv head `r * num_kv_heads // tp_size`,
    the one its query heads attend with.
    """

    SHARD_IDS = {"q": 0, "k": 1, "v": 2}

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        tp = get_tp_size()
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        self.num_heads_local = _divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) and tp_size ({tp}) must divide one another")
        self.num_kv_heads_local = max(1, num_kv_heads // tp)
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias=bias, dtype=dtype)

    def _plan_shards(self) -> list[tuple[int, int, int]]:
        q_rows = self.num_heads_local * self.head_dim
        kv_rows = self.num_kv_heads_local * self.head_dim
        kv_start = self.tp_rank * self.num_kv_heads // self.tp_size * self.head_dim
        return [(0, q_rows, self.tp_rank * q_rows), (q_rows, kv_rows, kv_start), (q_rows + kv_rows, kv_rows, kv_start)]

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: int | str | None = None) -> None:
        if isinstance(shard_id, str):
            shard_id = self.SHARD_IDS[shard_id]
        super().weight_loader(param, source, shard_id)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks; partial sums are all-reduced,
    then the bias is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_local = _divide(input_size, self.tp_size, "input size")
        self.weight = _new_param(output_size, self.input_size_local, dtype=dtype, loader=self.weight_loader)
        self.bias = _new_param(output_size, dtype=dtype, loader=default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: object = None) -> None:
        check_shape(source, (self.output_size, self.input_size))
        n = self.input_size_local
        param.data.copy_(source.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor, add_partial: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """`add_partial(y)` adds to this rank's partial sum in place before the all-reduce (a LoRA
        delta over this rank's input columns)."""
        if self.tp_size == 1 and add_partial is None:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if add_partial is not None:
            add_partial(y)
        if self.tp_size > 1:
            y = all_reduce(y)
        return y if self.bias is None else y + self.bias
