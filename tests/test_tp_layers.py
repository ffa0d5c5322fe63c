"""Tensor parallelism on CPU: 2 gloo processes load tiny models sharded and must give the
tp_size 1 logits; every rank holds only its shard of each split matrix."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from minisgl_backend.distributed import all_gather_last_dim, all_reduce, get_tp_rank, get_tp_size, init_tp
from minisgl_backend.attention.base import ForwardBatch
from minisgl_backend.models import load_model
from minisgl_backend.models.hf_config import arch_config_from_dict
from minisgl_backend.models.llama import LlamaForCausalLM
from minisgl_backend.ports import free_port

TP = 2
CASES = {
    "llama-kv1": dict(arch="llama", num_kv_heads=1),
    "llama-kv2-bias": dict(arch="llama", num_kv_heads=2, extra_config={"attention_bias": True, "mlp_bias": True}),
    "qwen3-kv1-tied": dict(arch="qwen3", num_kv_heads=1, tie_word_embeddings=True),
    "qwen3-kv2": dict(arch="qwen3", num_kv_heads=2),
    "qwen2-kv2-oddvocab-tied": dict(arch="qwen2", num_kv_heads=2, vocab_size=515, tie_word_embeddings=True),
}


class SdpaBackend:
    """One request, whole sequence, no KV cache: causal SDPA with GQA."""

    def prepare(self, layout) -> None:
        pass

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
        )
        return o.transpose(0, 1).reshape(q.shape[0], -1)


def forward_all(model, ids: torch.Tensor) -> torch.Tensor:
    n = len(ids)
    with torch.no_grad():
        return model(ids, torch.arange(n), ForwardBatch(attn=SdpaBackend(), last_token_indices=torch.arange(n)))


def token_ids(vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (24,), generator=gen)
    ids[[3, 7, 11]] = torch.tensor([0, vocab - 1, vocab // 2])  # both ends of both vocab shards
    return ids


def _worker(rank: int, port: int, paths: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    try:
        init_tp(rank, TP)
        result: dict = {"logits": {}, "shapes": {}, "collectives": None, "errors": []}
        for name, path in paths.items():
            model = load_model(path, torch.float32, "cpu")
            result["logits"][name] = forward_all(model, token_ids(model.arch.vocab_size))
            result["shapes"][name] = {n: tuple(p.shape) for n, p in model.named_parameters()}
            result["shapes"][name]["kv_heads_per_rank"] = model.num_kv_heads_per_rank
        x = torch.full((2, 3), float(rank + 1))
        result["collectives"] = (all_reduce(x.clone()), all_gather_last_dim(x), get_tp_rank(), get_tp_size())
        bad = arch_config_from_dict(dict(
            architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=48, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=1,
        ))
        try:
            with torch.device("meta"):
                LlamaForCausalLM(bad)
        except ValueError as e:
            result["errors"].append(str(e))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tp")
    paths = {name: make_tiny_model(str(root / name), seed=10 + i, **kw) for i, (name, kw) in enumerate(CASES.items())}
    mp.spawn(_worker, args=(free_port(), paths, str(root)), nprocs=TP, join=True)
    results = [torch.load(root / f"rank{r}.pt") for r in range(TP)]
    return paths, results


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_logits_equal_tp1(tp_run, case):
    paths, results = tp_run
    assert get_tp_size() == 1
    model = load_model(paths[case], torch.float32, "cpu")
    ref = forward_all(model, token_ids(model.arch.vocab_size))
    assert ref.shape[-1] == model.arch.vocab_size
    for r in range(TP):
        # only the summation order differs (sharded matmuls + all-reduce); the tiny models'
        # logits are O(1-10), so allow 1e-5 absolute plus 1e-5 relative
        torch.testing.assert_close(results[r]["logits"][case], ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(results[r]["logits"][case].argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("case", list(CASES))
def test_rank_holds_only_its_shards(tp_run, case):
    _, results = tp_run
    kw = CASES[case]
    hidden, inter, heads, head_dim, kv = 64, 128, 4, 16, kw["num_kv_heads"]
    vocab = kw.get("vocab_size", 512)
    kv_local = max(1, kv // TP)
    for r in range(TP):
        shapes = results[r]["shapes"][case]
        assert shapes["kv_heads_per_rank"] == kv_local
        assert shapes["model.embed_tokens.weight"] == (-(-vocab // TP), hidden)
        assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == ((heads // TP + 2 * kv_local) * head_dim, hidden)
        assert shapes["model.layers.0.self_attn.o_proj.weight"] == (hidden, heads // TP * head_dim)
        assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (2 * inter // TP, hidden)
        assert shapes["model.layers.0.mlp.down_proj.weight"] == (hidden, inter // TP)
        assert shapes["model.norm.weight"] == (hidden,)
        if kw.get("tie_word_embeddings"):
            assert "lm_head.weight" not in shapes  # shared with the embedding
        else:
            assert shapes["lm_head.weight"] == (-(-vocab // TP), hidden)
        if kw["arch"] == "qwen3":
            assert shapes["model.layers.0.self_attn.q_norm.weight"] == (head_dim,)
        if "extra_config" in kw:
            assert shapes["model.layers.0.self_attn.o_proj.bias"] == (hidden,)
            assert shapes["model.layers.0.mlp.down_proj.bias"] == (hidden,)


def test_collectives_and_head_divisibility(tp_run):
    _, results = tp_run
    for r in range(TP):
        reduced, gathered, rank, size = results[r]["collectives"]
        assert (rank, size) == (r, TP)
        torch.testing.assert_close(reduced, torch.full((2, 3), 3.0))
        torch.testing.assert_close(gathered, torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)], -1))
        assert any("num_attention_heads (3)" in e and "tp_size (2)" in e for e in results[r]["errors"])


def test_tp1_collectives_are_identity():
    x = torch.randn(3, 4)
    assert all_reduce(x) is x and all_gather_last_dim(x) is x
    with pytest.raises(ValueError):
        init_tp(2, 2)
