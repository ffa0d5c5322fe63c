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
from minisgl_backend.models.torch_ops import LayerOps, TorchOps


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArchConfig, layer_id: int, dtype: torch.dtype, ops: LayerOps,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_id, self.head_dim = layer_id, arch.head_dim
        self.rotary = [rotary]  # shared with the model, not a sub-module of every layer
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
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, ops)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype, ops)
        self.qk_norm = arch.qk_norm
        self.ops = ops

    def forward(self, x: torch.Tensor, rope: object, fwd: ForwardBatch) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        if fwd.lora is not None:
            for module, offset in (("q", 0), ("k", q_size), ("v", q_size + kv_size)):
                fwd.lora.add(qkv, x, self.layer_id, module, offset)
        q, k, v = qkv.split_with_sizes([q_size, kv_size, kv_size], dim=-1)  # torch.split without its Python wrapper
        # views into the qkv output (no copy): the K/V store and the kernels read them strided
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.ops.fused_prologue:
            fused_q = self._fused_prologue(q, k, v, rope, fwd)
            if fused_q is not None:
                return self._output(fwd.attn.attend(fused_q, self.layer_id), fwd)
        if self.qk_norm:  # per-head RMSNorm: the same op over [T, H, D]
            # q gets its own (contiguous) tensor; k is normed in place, so it stays beside v and
            # the K/V store is one write
            q, k = self.q_norm(q), self.k_norm.forward_over(k)
        q, k = self.rotary[0].apply(q, k, rope)
        return self._output(fwd.attn.forward(q, k, v, self.layer_id), fwd)

    def _output(self, attn: torch.Tensor, fwd: ForwardBatch) -> torch.Tensor:
        if fwd.lora is None:
            return self.o_proj(attn)
        return self.o_proj(attn, add_partial=fwd.lora.partial(attn, self.layer_id, "o"))

    def _fused_prologue(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: object,
                        fwd: ForwardBatch) -> torch.Tensor | None:
        """q/k norm, rope and the K/V store in one kernel; None where the ops or the backend
        cannot (the steps then run one by one)."""
        kv_target = getattr(fwd.attn, "kv_target", None)
        if kv_target is None:
            return None
        k_pool, v_pool, slots = kv_target(self.layer_id)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else (None, None, 0.0)
        return self.ops.attention_prologue(q, k, v, *norms, rope, k_pool, v_pool, slots)


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArchConfig, layer_id: int, dtype: torch.dtype, ops: LayerOps) -> None:
        super().__init__()
        inter = arch.intermediate_size
        self.layer_id = layer_id
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [inter, inter], bias=arch.mlp_bias, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, arch.hidden_size, bias=arch.mlp_bias, dtype=dtype)
        self.act = SiluAndMul(ops)

    def forward(self, x: torch.Tensor, lora: object = None) -> torch.Tensor:
        if lora is None:
            return self.down_proj(self.act(self.gate_up_proj(x)))
        gate_up = self.gate_up_proj(x)
        lora.add(gate_up, x, self.layer_id, "gate", 0)
        lora.add(gate_up, x, self.layer_id, "up", gate_up.shape[1] // 2)
        h = self.act(gate_up)
        return self.down_proj(h, add_partial=lora.partial(h, self.layer_id, "down"))


class LlamaDecoderLayer(nn.Module):
    """Carries (h, residual) like sglang: each norm adds the pending residual first, so the add
    and the norm are one kernel where the ops fuse them."""

    def __init__(self, arch: ModelArchConfig, layer_id: int, dtype: torch.dtype, ops: LayerOps,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_id, dtype, ops, rotary)
        self.mlp = LlamaMLP(arch, layer_id, dtype, ops)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, ops)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, ops)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, rope: object,
                fwd: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(branch output, residual stream); the layer's true output is their sum."""
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.add_forward(h, residual)
        h = self.self_attn(h, rope, fwd)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h, fwd.lora), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype, ops: LayerOps) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling,
                                          max_positions=arch.max_position_embeddings, dtype=dtype, ops=ops)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, i, dtype, ops, self.rotary_emb)
                                    for i in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                fwd: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(branch output, residual) of the last layer for every token, [T, hidden] each; the
        hidden state before the final norm is their sum (residual None when there are no layers)."""
        h, residual = self.embed_tokens(input_ids), None
        rope = self.rotary_emb.prepare(positions)
        for layer in self.layers:
            h, residual = layer(h, residual, rope, fwd)
        return h, residual

    def final_norm(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.norm(h) if residual is None else self.norm.add_forward(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids [T], positions [T], fwd) -> logits [B, vocab]` (in the model's dtype:
    the caller casts, the CUDA graph straight into its float32 buffer) for the rows
    `fwd.last_token_indices` of the flattened batch."""

    # HF sub-module name -> (our merged parameter's sub-module, shard id)
    stacked_params = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype = torch.float32,
                 ops: LayerOps | None = None) -> None:
        super().__init__()
        tp = get_tp_size()
        self.ops = ops or TorchOps()
        if arch.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads ({arch.num_attention_heads}) must be divisible by tp_size ({tp})")
        self.arch = arch
        self.model = LlamaModel(arch, dtype, self.ops)
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
        h, residual = self.model(input_ids, positions, fwd)
        last = fwd.last_token_indices
        # every request has >= 1 token, so B last tokens among B tokens are all of them, in order
        # (a decode step): no gather
        if last.shape[0] != h.shape[0]:
            h, residual = h[last], None if residual is None else residual[last]
        return self.lm_head(self.model.final_norm(h, residual))
