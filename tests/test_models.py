"""Our Llama / Qwen2 / Qwen3 forward equals transformers' on tiny random-weight models (fp32, CPU)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.attention.base import ForwardBatch
from minisgl_backend.kernels import Target, choose_layer_ops
from minisgl_backend.models import load_model, read_arch_config
from minisgl_backend.models.hf_config import arch_config_from_dict
from minisgl_backend.tools.make_tiny_model import make_tiny_model

ATOL = 1e-4
PROMPTS = ["What is the capital of France?", "def add(a, b):\n    return a + b\n" * 3]
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


class SdpaBackend:
    """Minimal AttentionBackend without a KV cache: every request's tokens are its whole
    sequence; causal SDPA with GQA per request."""

    def prepare(self, layout: BatchLayout) -> None:
        assert layout.seq_lens_cpu == layout.extend_lens_cpu, "no cached prefix in this backend"
        self.lens = layout.extend_lens_cpu

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        outs = []
        for qi, ki, vi in zip(q.split(self.lens), k.split(self.lens), v.split(self.lens)):
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), is_causal=True, enable_gqa=True
            )
            outs.append(o.transpose(0, 1).reshape(qi.shape[0], -1))
        return torch.cat(outs)


def run_ours(model, seqs: list[torch.Tensor], all_positions: bool = False) -> torch.Tensor:
    """Forward a batch of whole sequences; logits of every token or of each last token."""
    lens = [len(s) for s in seqs]
    lens_t = torch.tensor(lens)
    layout = BatchLayout(
        is_decode=False, rows=torch.arange(len(seqs)), seq_lens=lens_t, extend_lens=lens_t,
        out_loc=torch.zeros(sum(lens), dtype=torch.int64), seq_lens_cpu=lens, extend_lens_cpu=lens,
    )
    attn = SdpaBackend()
    attn.prepare(layout)
    positions = torch.cat([torch.arange(n) for n in lens])
    last = torch.arange(sum(lens)) if all_positions else torch.cumsum(lens_t, 0) - 1
    with torch.no_grad():
        return model(torch.cat(seqs), positions, ForwardBatch(attn=attn, last_token_indices=last))


def hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0]


def encode(path: str, text: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    return torch.tensor(AutoTokenizer.from_pretrained(path)(text)["input_ids"])


CASES = {
    "llama-kv2": dict(arch="llama", num_kv_heads=2),
    "llama-kv1-tied": dict(arch="llama", num_kv_heads=1, tie_word_embeddings=True),
    "llama-llama3rope": dict(arch="llama", num_kv_heads=2, rope_scaling=LLAMA3_ROPE),
    "llama-linearrope": dict(arch="llama", num_kv_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-bias": dict(arch="llama", num_kv_heads=2, extra_config={"attention_bias": True, "mlp_bias": True}),
    "qwen2-kv2-tied": dict(arch="qwen2", num_kv_heads=2, tie_word_embeddings=True),
    "qwen2-kv1": dict(arch="qwen2", num_kv_heads=1),
    "qwen3-kv2": dict(arch="qwen3", num_kv_heads=2),
    "qwen3-kv1-tied": dict(arch="qwen3", num_kv_heads=1, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_model(str(root / name), seed=i, **kw) for i, (name, kw) in enumerate(CASES.items())}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tiny_models, case):
    path = tiny_models[case]
    cpu = Target(torch.device("cpu"), torch.float32, torch.float32, read_arch_config(path).head_dim)
    model = load_model(path, torch.float32, "cpu", choose_layer_ops("auto", cpu))  # the engine's CPU ops
    seqs = [encode(path, p) for p in PROMPTS]
    refs = [hf_logits(path, s) for s in seqs]
    for seq, ref in zip(seqs, refs):
        ours = run_ours(model, [seq], all_positions=True)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # both requests in one flattened batch: one row per request, its last token
    batched = run_ours(model, seqs)
    torch.testing.assert_close(batched, torch.stack([r[-1] for r in refs]), atol=ATOL, rtol=0)
    assert len(set(refs[1].argmax(-1).tolist())) > 3, "tiny model should not predict a constant token"


def test_model_properties(tiny_models):
    model = load_model(tiny_models["qwen3-kv1-tied"], torch.float32, "cpu")
    assert (model.num_layers, model.head_dim, model.num_kv_heads_per_rank) == (2, 16, 1)
    assert model.arch.qk_norm and model.arch.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == ((4 + 2 * 1) * 16, 64)
    assert model.arch.eos_token_ids == [0]  # <|endoftext|> of the tiny tokenizer


def test_greedy_is_stable_and_varied(tiny_models):
    """Well separated logits: the top-1 margin dwarfs float noise, and the argmax varies."""
    path = tiny_models["llama-kv2"]
    ref = hf_logits(path, encode(path, PROMPTS[1]))
    top2 = ref.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert len(set(ref.argmax(-1).tolist())) > len(ref) // 4


def test_sharded_checkpoint_loads(tmp_path):
    kw = dict(arch="qwen2", num_kv_heads=2, seed=5)
    single = make_tiny_model(str(tmp_path / "single"), **kw)
    sharded = make_tiny_model(str(tmp_path / "sharded"), max_shard_size="60KB", **kw)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    seq = encode(single, PROMPTS[0])
    a = run_ours(load_model(single, torch.float32, "cpu"), [seq], all_positions=True)
    b = run_ours(load_model(sharded, "float32", "cpu"), [seq], all_positions=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_unsupported_architecture(tiny_models, tmp_path):
    path = _copy(tiny_models["llama-kv2"], tmp_path / "m")
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        load_model(path, torch.float32, "cpu")


def test_missing_tensor_is_named(tiny_models, tmp_path):
    path = _copy(tiny_models["llama-kv2"], tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*" + re.escape(str(tmp_path))):
        load_model(path, torch.float32, "cpu")


def test_wrong_shape_is_reported(tiny_models, tmp_path):
    path = _copy(tiny_models["llama-kv2"], tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"].t().contiguous()
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"down_proj\.weight.*shape \(128, 64\), expected \(64, 128\)"):
        load_model(path, torch.float32, "cpu")


def test_no_weights_or_config(tiny_models, tmp_path):
    path = _copy(tiny_models["llama-kv2"], tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(path, torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_extra_tensors_are_ignored(tiny_models, tmp_path):
    path = _copy(tiny_models["llama-kv2"], tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, weights)
    load_model(path, torch.float32, "cpu")


BASE = dict(
    architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)


def test_config_v4_rope_format():
    arch = arch_config_from_dict(
        {**BASE, "rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [2, 3]},
        {"eos_token_id": [3, 7]},
    )
    assert arch.rope_theta == 5000.0 and arch.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert arch.eos_token_ids == [2, 3, 7] and arch.head_dim == 16
    assert not arch.attention_bias and not arch.qk_norm


def test_config_v5_rope_format():
    arch = arch_config_from_dict(
        {**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32, "eos_token_id": 1,
         "rope_parameters": {"rope_theta": 1e6, "rope_type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}},
    )
    assert arch.rope_theta == 1e6 and arch.rope_scaling == LLAMA3_ROPE
    assert arch.head_dim == 32 and arch.qk_norm and arch.eos_token_ids == [1]
    plain = arch_config_from_dict({**BASE, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain.rope_theta == 1e4 and plain.rope_scaling is None
    qwen2 = arch_config_from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.attention_bias and not qwen2.o_proj_bias


def test_config_rejects_unsupported_rope_and_sliding_window():
    with pytest.raises(ValueError, match="yarn"):
        arch_config_from_dict({**BASE, "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="sliding"):
        arch_config_from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
                               "sliding_window": 128, "max_position_embeddings": 4096})


def test_read_arch_config_from_folder(tiny_models):
    arch = read_arch_config(tiny_models["llama-llama3rope"])
    assert arch.architecture == "LlamaForCausalLM" and arch.rope_scaling == LLAMA3_ROPE
    assert arch.vocab_size == 512 and arch.num_key_value_heads == 2 and arch.eos_token_ids == [0]
