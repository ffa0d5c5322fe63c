"""Llama-family decoder: Llama / Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Tokens of a batch are flattened to [T, hidden]; attention goes through the engine's
`AttentionBackend` (`fwd.attn`), which owns the KV cache. Parameter names mirror the HF
checkpoint except for the merged `qkv_proj` and `gate_up_proj` (see `stacked_params`).
"""

from __future__ import annotations

import torch
from torch import nn

from minisgl_backend.attention.base import ForwardBatch
from minisgl_backend.distributed.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from minisgl_backend.distributed.parallel_state import get_tp_size
from minisgl_backend.models.hf_config import ModelArchConfig
from minisgl_backend.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul



class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArchConfig, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_id, self.head_dim = layer_id, arch.head_dim
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_key_value_heads,
            bias=arch.attention_bias, dtype=dtype,
        )
        self.num_heads = self.qkv_proj.num_heads_local
        self.num_kv_heads = self.qkv_proj.num_kv_heads_local
        self.o_proj = RowParallelLinear(
            arch.num_attention_heads * arch.head_dim, arch.hidden_size, bias=arch.o_proj_bias, dtype=dtype
        )
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)
        self.qk_norm = arch.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fwd: ForwardBatch) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim).contiguous()
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        return self.o_proj(fwd.attn.forward(q, k, v, self.layer_id))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        inter = arch.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [inter, inter], bias=arch.mlp_bias, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, arch.hidden_size, bias=arch.mlp_bias, dtype=dtype)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchConfig, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_id, dtype)
        self.mlp = LlamaMLP(arch, dtype)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fwd: ForwardBatch) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, fwd)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, dtype) for i in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fwd: ForwardBatch) -> torch.Tensor:
        """Hidden states of every token, before the final norm: [T, hidden]."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions)
        for layer in self.layers:
            h = layer(h, cos, sin, fwd)
        return h


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids [T], positions [T], fwd) -> float32 logits [B, vocab]` for the rows
    `fwd.last_token_indices` of the flattened batch."""

    # HF sub-module name -> (our merged parameter's sub-module, shard id)
    stacked_params = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        tp = get_tp_size()
        if arch.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads ({arch.num_attention_heads}) must be divisible by tp_size ({tp})")
        self.arch = arch
        self.model = LlamaModel(arch, dtype)
        attn = self.model.layers[0].self_attn if self.model.layers else None
        self._heads_per_rank = arch.num_attention_heads // tp
        self._kv_heads_per_rank = attn.num_kv_heads if attn else max(1, arch.num_key_value_heads // tp)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, dtype=dtype)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return self.arch.num_hidden_layers

    @property
    def head_dim(self) -> int:
        return self.arch.head_dim

    @property
    def num_heads_per_rank(self) -> int:
        return self._heads_per_rank

    @property
    def num_kv_heads_per_rank(self) -> int:
        return self._kv_heads_per_rank

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fwd: ForwardBatch) -> torch.Tensor:
        h = self.model(input_ids, positions, fwd)
        h = self.model.norm(h[fwd.last_token_indices])
        return self.lm_head(h).float()
