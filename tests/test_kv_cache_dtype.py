"""kv_cache_dtype: the KV cache in fp8 (e4m3 / e5m2) while the model runs in its own dtype. On the
CPU: the setting, the pool's bytes, the store, attention reading fp8 exactly as the same values in
float32, and a whole engine generating and freeing everything. The CUDA kernels' fp8 paths are
checked in test_triton_decode.py / test_attention_prologue.py (interpreter, sm_90 compile) and
test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.attention.torch_backend import TorchAttentionBackend
from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.kvcache import KVCache

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def test_the_setting_names_a_dtype_and_rejects_others(tiny_llama):
    assert EngineConfig.from_flat(model_path=tiny_llama, device="cpu").kv_dtype_name == "float32"
    assert EngineConfig.from_flat(model_path=tiny_llama, device="cpu", dtype="bfloat16").kv_dtype_name == "bfloat16"
    for name, dtype in FP8.items():
        assert EngineConfig.from_flat(model_path=tiny_llama, kv_cache_dtype=name).kv_dtype_name == str(dtype)[6:]
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2, got 'int8'"):
        EngineConfig.from_flat(model_path=tiny_llama, kv_cache_dtype="int8")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("layout", ["views_of_qkv", "separate"])
def test_store_writes_each_value_cast_to_fp8(dtype, layout):
    cache = KVCache(1, 4, 4, 2, 8, dtype, torch.device("cpu"))
    qkv = torch.randn(3, 4 * 8 * 2) * 3
    if layout == "views_of_qkv":  # k and v side by side, as the qkv output holds them
        k, v = qkv[:, 32:48].view(3, 2, 8), qkv[:, 48:].view(3, 2, 8)
    else:
        k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([9, 2, 14])
    cache.store(0, slots, k, v)
    assert torch.equal(cache.k[0][slots].view(torch.uint8), k.to(dtype).view(torch.uint8))
    assert torch.equal(cache.v[0][slots].view(torch.uint8), v.to(dtype).view(torch.uint8))
    assert int(cache.k[0].view(torch.uint8).count_nonzero()) == int(k.to(dtype).view(torch.uint8).count_nonzero())


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_values_past_the_fp8_range_saturate_instead_of_turning_nan(dtype):
    """torch < 2.12 casts an e4m3 value past 448 to NaN (e5m2 past 57344 to inf), which would
    poison every attention over that position; the store saturates, as the Triton kernels do."""
    cache = KVCache(1, 2, 4, 1, 4, dtype, torch.device("cpu"))
    big = torch.tensor([[[1e6, -1e6, 3.0, -0.5]]])
    cache.store(0, torch.tensor([5]), big, -big)
    limit = torch.finfo(dtype).max
    assert cache.k[0][5].float().tolist() == [[limit, -limit, 3.0, -0.5]]
    assert cache.v[0][5].float().tolist() == [[-limit, limit, -3.0, 0.5]]


def test_triton_kernels_take_e4m3_only_from_sm89(monkeypatch):
    from minisgl_backend import kernels

    monkeypatch.setattr(kernels, "gpu_capability", lambda index: (8, 0))
    cuda = torch.device("cuda", 0)
    assert "sm_89" in kernels.triton_fp8_problem(torch.float8_e4m3fn, cuda)
    assert kernels.triton_fp8_problem(torch.float8_e5m2, cuda) is None
    assert kernels.triton_fp8_problem(torch.float8_e4m3fn, "cpu") is None, "the interpreter converts anything"
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    target = kernels.Target(cuda, torch.bfloat16, torch.float8_e4m3fn, 128)
    assert "sm_89" in kernels.triton_decode_problem(target)
    assert "sm_89" in kernels.prologue_problem(target)
    monkeypatch.setattr(kernels, "gpu_capability", lambda index: (9, 0))
    assert kernels.triton_fp8_problem(torch.float8_e4m3fn, cuda) is None


def _attention(pool_dtype, k_new, v_new, k_old, v_old, q, decode: bool):
    """The torch backend over one page-table row: 6 cached positions plus the new tokens."""
    cache = KVCache(1, 4, 4, 2, 8, pool_dtype, torch.device("cpu"))
    table = torch.arange(16, dtype=torch.int32).view(1, 16)
    cache.k[0][:6], cache.v[0][:6] = k_old.to(pool_dtype), v_old.to(pool_dtype)
    n = k_new.shape[0]
    layout = BatchLayout(decode, torch.tensor([0]), torch.tensor([6 + n]), torch.tensor([n]),
                         torch.arange(6, 6 + n), [6 + n], [n])
    backend = TorchAttentionBackend(cache, table)
    backend.prepare(layout)
    return backend.forward(q, k_new, v_new, 0)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("new_tokens", [1, 3], ids=["decode", "extend"])
def test_attention_over_an_fp8_pool_equals_float32_over_the_same_values(dtype, new_tokens):
    torch.manual_seed(0)
    k_old, v_old = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    k_new, v_new = torch.randn(new_tokens, 2, 8), torch.randn(new_tokens, 2, 8)
    q = torch.randn(new_tokens, 4, 8)
    rounded = [t.to(dtype).float() for t in (k_new, v_new, k_old, v_old)]
    got = _attention(dtype, k_new, v_new, k_old, v_old, q, new_tokens == 1)
    want = _attention(torch.float32, *rounded, q, new_tokens == 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    full = _attention(torch.float32, k_new, v_new, k_old, v_old, q, new_tokens == 1)
    assert not torch.equal(got, full), "the cache really holds fp8"


def test_an_fp8_cache_holds_four_times_the_tokens_of_float32_and_leaks_nothing(tiny_llama):
    prompts = [[5, 6, 7, 8, 9, 10] * 4, [1, 2, 3], [5, 6, 7, 8, 9, 10] * 4 + [11]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    pages = {}
    for name in ("auto", "fp8"):
        llm = LLM(tiny_llama, device="cpu", kv_cache_dtype=name)
        engine = llm.scheduler.engine
        pages[name] = engine.num_pages
        outs = llm.generate(prompts[:2], params) + llm.generate(prompts[2:], params)
        assert [len(o["token_ids"]) for o in outs] == [10, 10, 10]
        if name == "fp8":
            assert engine.kv_cache.k[0].dtype == torch.float8_e4m3fn
            assert getattr(engine.attn, "kernel", None) is None, "the compiled kernel reads float32 pools only"
            assert llm.scheduler.cache.hit_tokens > 0, "the third prompt reuses the first one's cached pages"
        assert llm.scheduler.leaks() == []
        llm.scheduler.cache.flush()
        stats = llm.scheduler.stats()
        assert stats.free_pages == stats.total_pages and stats.free_rows == stats.total_rows
        llm.shutdown()
    assert pages["fp8"] == 4 * pages["auto"], "the CPU pool's byte budget, at 1 byte a value instead of 4"


def test_the_compiled_cpu_attention_refuses_an_fp8_pool(tiny_llama):
    with pytest.raises(ConfigError, match="float32 KV pool"):
        LLM(tiny_llama, device="cpu", kv_cache_dtype="fp8", attention_backend="cpu")


def test_tensor_parallel_ranks_with_fp8_caches_equal_one_rank(tiny_llama):
    """Each rank holds its KV heads in fp8: TP=2 generates what TP=1 does."""
    prompts = [[5, 6, 7, 8] * 5, [1, 2, 3]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = {}
    for tp in (1, 2):
        llm = LLM(tiny_llama, device="cpu", tp_size=tp, kv_cache_dtype="fp8")
        outs[tp] = [o["token_ids"] for o in llm.generate(prompts, params)]
        llm.shutdown()
    assert outs[2] == outs[1] and all(len(t) == 10 for t in outs[1])
