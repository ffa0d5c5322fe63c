"""LoRA building blocks: PEFT folders read and sharded per rank, device slots and their LRU
residency, the batched delta (torch runs, and the Triton kernels in Triton's interpreter)."""

from __future__ import annotations

import json

import pytest
import torch

from minisgl_backend.lora.adapter import AdapterError, check_adapter, load_adapter
from minisgl_backend.lora.apply import LoraBatch, token_runs
from minisgl_backend.lora.slots import LoraSlots, SlotTable
from minisgl_backend.models.hf_config import read_arch_config
from tests.triton_interpreter import run_interpreted


def make_peft_adapter(base: str, out, targets: list[str], rank: int = 4, alpha: int = 8, seed: int = 0,
                      rslora: bool = False) -> str:
    """A PEFT LoRA adapter of `base` with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                        lora_dropout=0.0, use_rslora=rslora)
    get_peft_model(model, config).save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def adapter_path(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("lora") / "a",
                             ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                             rank=4, alpha=16, rslora=True)


def _delta(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x @ a.T) @ b.T


def test_tp_shards_add_up_to_the_whole_adapter(tiny_llama, adapter_path):
    arch = read_arch_config(tiny_llama)
    whole = load_adapter("a", adapter_path, arch, max_rank=8)
    shards = [load_adapter("a", adapter_path, arch, max_rank=8, tp_rank=r, tp_size=2) for r in range(2)]
    assert whole.rank == 4 and whole.modules == {"q", "k", "v", "o", "gate", "up", "down"}
    torch.manual_seed(1)
    for (layer, module), (a, b) in whole.weights.items():
        x = torch.randn(3, a.shape[1])
        full = _delta(a, b, x)
        if module in ("o", "down"):  # row parallel: each rank's columns of A, partial sums
            n = a.shape[1] // 2
            parts = [_delta(*s.weights[(layer, module)], x[:, r * n:(r + 1) * n]) for r, s in enumerate(shards)]
            assert torch.allclose(parts[0] + parts[1], full, atol=1e-5)
        else:  # column parallel: each rank's rows of the output
            parts = [_delta(*s.weights[(layer, module)], x) for s in shards]
            assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_scaling_is_folded_into_b(tiny_llama, adapter_path):
    from safetensors.torch import load_file

    raw = load_file(f"{adapter_path}/adapter_model.safetensors")
    key = next(k for k in raw if "layers.0.self_attn.q_proj.lora_B" in k)
    adapter = load_adapter("a", adapter_path, read_arch_config(tiny_llama), max_rank=8)
    assert torch.allclose(adapter.weights[(0, "q")][1], raw[key] * (16 / 4 ** 0.5))  # rsLoRA: alpha / sqrt(r)


def test_bad_adapters_say_why(tiny_llama, adapter_path, tmp_path):
    arch = read_arch_config(tiny_llama)
    for read in (load_adapter, check_adapter):  # check_adapter: shapes only, as registration does
        with pytest.raises(AdapterError, match="max_lora_rank is 2"):
            read("a", adapter_path, arch, max_rank=2)
    check_adapter("a", adapter_path, arch, max_rank=8)
    wrong = read_arch_config(tiny_llama)
    wrong.hidden_size += 8
    with pytest.raises(AdapterError, match="does not fit the base model"):
        check_adapter("a", adapter_path, wrong, max_rank=8)
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load_adapter("a", str(tmp_path), arch, max_rank=8)
    config = json.loads(open(f"{adapter_path}/adapter_config.json").read())
    for change, message in (({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias='none'"),
                            ({"peft_type": "IA3"}, "IA3 adapter")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterError, match=message):
            load_adapter("a", str(tmp_path), arch, max_rank=8)


def test_slot_table_loads_on_first_use_and_evicts_the_least_recent_idle_adapter():
    loaded = []
    table = SlotTable(2, lambda slot, name: loaded.append((slot, name)))
    busy: set[str] = set()
    assert table.slot_for("a", busy.__contains__) == 0 and table.slot_for("b", busy.__contains__) == 1
    assert table.slot_for("a", busy.__contains__) == 0  # resident: no load, now most recent
    assert table.slot_for("c", busy.__contains__) == 1  # evicts b, the least recently used
    busy.update({"a", "c"})
    assert table.slot_for("b", busy.__contains__) is None, "every slot is busy: the request waits"
    busy.discard("a")
    assert table.slot_for("b", busy.__contains__) == 0
    assert loaded == [(0, "a"), (1, "b"), (1, "c"), (0, "b")] and table.evictions == 2


def test_runs_and_the_torch_delta_follow_each_tokens_slot():
    token_slots, runs = token_runs([1, -1, 0, 0, 2, 2], [3, 2, 1, 4, 1, 1])
    assert token_slots == [1] * 3 + [-1] * 2 + [0] * 5 + [2] * 2 and runs == [(0, 3, 1), (5, 10, 0), (10, 12, 2)]
    torch.manual_seed(0)
    slots = LoraSlots(a={(0, "q"): torch.randn(3, 4, 6)}, b={(0, "q"): torch.randn(3, 5, 4)})
    x, y = torch.randn(12, 6), torch.zeros(12, 7)
    LoraBatch(slots, torch.tensor(token_slots), runs).add(y, x, 0, "q", offset=2)
    for t, slot in enumerate(token_slots):
        want = torch.zeros(5) if slot < 0 else _delta(slots.a[(0, "q")][slot], slots.b[(0, "q")][slot], x[t:t + 1])[0]
        assert torch.allclose(y[t, 2:], want, atol=1e-5) and not y[t, :2].any()


def test_the_triton_kernels_equal_the_torch_runs():
    script = """
import torch
from minisgl_backend.lora.apply import LoraBatch, token_runs
from minisgl_backend.lora.slots import LoraSlots
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16):
    slots = LoraSlots(a={(0, "q"): torch.randn(3, 8, 40).to(dtype)}, b={(0, "q"): torch.randn(3, 70, 8).to(dtype)})
    token_slots, runs = token_runs([1, -1, 0, 0, 2], [3, 2, 1, 4, 2])
    x, y = torch.randn(len(token_slots), 40).to(dtype), torch.randn(len(token_slots), 75).to(dtype)
    ref, out = y.clone().float(), y.clone()
    exact = LoraSlots(a={k: v.float() for k, v in slots.a.items()}, b={k: v.float() for k, v in slots.b.items()})
    LoraBatch(exact, torch.tensor(token_slots), runs).add(ref, x.float(), 0, "q", offset=5)
    LoraBatch(slots, torch.tensor(token_slots), runs, use_kernel=True).add(out, x, 0, "q", offset=5)
    print(dtype, float((ref - out.float()).abs().max() / ref.abs().max()))
"""
    errors = [float(line.split()[-1]) for line in run_interpreted(script).strip().splitlines()]
    assert errors[0] < 1e-6 and errors[1] < 2e-3
