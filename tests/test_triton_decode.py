"""Paged decode attention in Triton (`attention/triton_decode.py`): the kernels run in Triton's
interpreter on the CPU against a torch reference, and compile for sm_90; the backend's dispatch
to them is checked on the stand-in flashinfer."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from minisgl_backend import kernels
from minisgl_backend.attention.triton_decode import MAX_SPLITS, num_splits, paged_decode_attention
from minisgl_backend.kernels import Target, triton_installed
from tests.triton_interpreter import ROOT, TESTS, run_interpreted


def decode_case(lens, num_q_heads, num_kv_heads, head_dim, dtype, seed=0, width=80):
    """A page table whose rows hold shuffled KV slots, pools of random K/V, one query per request
    (rows in a shuffled order, one spare row)."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = len(lens) * width + 8
    perm = torch.randperm(num_slots, generator=gen)
    table = torch.zeros(len(lens) + 1, width, dtype=torch.int32)
    for r in range(len(lens)):
        table[r] = perm[r * width:(r + 1) * width].int()
    k_pool = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    rows = torch.randperm(len(lens), generator=gen)
    seq_lens = torch.tensor([lens[r] for r in rows.tolist()])
    q = torch.randn(len(lens), num_q_heads, head_dim, generator=gen).to(dtype)
    return q, k_pool, v_pool, table, rows, seq_lens


def reference_decode(q, k_pool, v_pool, table, rows, seq_lens):
    group = q.shape[1] // k_pool.shape[1]
    outs = []
    for i, (row, n) in enumerate(zip(rows.tolist(), seq_lens.tolist())):
        slots = table[row, :n].long()
        k = k_pool[slots].float().repeat_interleave(group, dim=1)
        v = v_pool[slots].float().repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[i].float(), k) / math.sqrt(q.shape[2]), dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", p, v))
    return torch.stack(outs)


def test_split_count_fills_the_gpu_and_stays_bounded():
    assert num_splits(1, 8, 132) == MAX_SPLITS
    assert num_splits(4, 8, 132) == 9
    assert num_splits(64, 8, 132) == 1 and num_splits(256, 8, 132) == 1
    with pytest.raises(ValueError):
        paged_decode_attention(*decode_case([3], 4, 2, 16, torch.float16), splits=MAX_SPLITS + 1)


def _target(head_dim, dtype, kv_dtype=None):
    return Target(torch.device("cpu"), dtype, kv_dtype or dtype, head_dim)


def test_the_kernel_is_chosen_only_where_it_can_run(monkeypatch):
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    assert kernels.triton_decode_problem(_target(128, torch.bfloat16)) is None
    assert "power of two" in kernels.triton_decode_problem(_target(96, torch.bfloat16))
    assert "dtype" in kernels.triton_decode_problem(_target(128, torch.float32))
    assert kernels.triton_decode_problem(_target(128, torch.bfloat16, torch.float8_e4m3fn)) is None, "fp8 KV"
    assert "KV cache dtype" in kernels.triton_decode_problem(_target(128, torch.bfloat16, torch.float16))
    monkeypatch.setattr(kernels, "triton_installed", lambda: False)
    assert "triton" in kernels.triton_decode_problem(_target(128, torch.bfloat16))


_INTERPRETED = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_triton_decode import decode_case, reference_decode
    from minisgl_backend.attention.triton_decode import paged_decode_attention
    for dtype, tol in ((torch.float16, 2e-3),):
        for hq, hkv, dim in ((4, 2, 16), (8, 2, 64), (4, 4, 32)):
            for splits in (1, 3, 16):
                case = decode_case([1, 5, 37, 70], hq, hkv, dim, dtype, seed=splits)
                got = paged_decode_attention(*case, splits=splits)
                want = reference_decode(*case)
                assert got.dtype == dtype and got.shape == want.shape
                torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    for pool_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # kv_cache_dtype fp8: widened on load
        q, k_pool, v_pool, *rest = decode_case([1, 5, 37, 70], 8, 2, 64, torch.float16, seed=4)
        case = (q, k_pool.to(pool_dtype), v_pool.to(pool_dtype), *rest)
        for splits in (1, 3):
            got = paged_decode_attention(*case, splits=splits)
            torch.testing.assert_close(got.float(), reference_decode(*case), atol=2e-3, rtol=2e-3)
    print("interpreted decode ok")
""")


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
def test_kernels_in_the_interpreter_match_the_reference():
    """Lengths 1..70 over 1, 3 and 16 splits (empty splits included: a length-1 request with 16),
    grouped query heads 1, 2 and 4 per KV head, in fp16. (Triton 3.6's interpreter gets `tl.dot`
    on bf16 operands wrong; bf16 is checked compiled, on the GPU, against flashinfer:
    tests/test_gpu.py.)"""
    assert "interpreted decode ok" in run_interpreted(_INTERPRETED.format(tests=TESTS))


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
@pytest.mark.parametrize("splits,pool", [(1, "bf16"), (4, "bf16"), (1, "fp8e4nv"), (4, "fp8e5")])
def test_kernels_compile_for_hopper_without_a_gpu(splits, pool):
    """Both kernels lowered to sm_90 cubins (bf16, Qwen3-0.6B's heads; the KV pools bf16 or fp8),
    as at their first launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minisgl_backend.attention.triton_decode import BLOCK_N, decode_kernels

    split_kernel, merge_kernel = decode_kernels()
    ptr = lambda t: f"*{t}"  # noqa: E731
    signature = {"q_ptr": ptr("bf16"), "k_pool_ptr": ptr(pool), "v_pool_ptr": ptr(pool),
                 "slot_table_ptr": ptr("i32"), "rows_ptr": ptr("i64"), "seq_lens_ptr": ptr("i64"),
                 "part_out_ptr": ptr("fp32"), "part_lse_ptr": ptr("fp32"), "out_ptr": ptr("bf16"),
                 "table_width": "i32", "sm_scale": "fp32", "num_splits": "i32"}
    constants = {"NUM_KV_HEADS": 8, "GROUP": 2, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_N": BLOCK_N,
                 "SPLIT": splits > 1}
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(fn=split_kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert len(compiled.asm["cubin"]) > 1000
    assert "mma" in compiled.asm["ptx"], "the two products run on tensor cores"
    assert "cp.async" in compiled.asm["ptx"], "the position loop is software-pipelined"
    merge_sig = {"part_out_ptr": ptr("fp32"), "part_lse_ptr": ptr("fp32"), "out_ptr": ptr("bf16"),
                 "num_splits": "i32"}
    merge_consts = {"HEAD_DIM": 128, "SPLITS_PAD": MAX_SPLITS}
    merge_sig.update({name: "constexpr" for name in merge_consts})
    merged = triton.compile(ASTSource(fn=merge_kernel, signature=merge_sig, constexprs=merge_consts),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    assert len(merged.asm["cubin"]) > 500


_ENGINE = textwrap.dedent("""
    import sys, types, torch
    sys.path.insert(0, {root!r})
    import minisgl_backend.kernels as kernels
    from tests.test_flashinfer_metadata import _FakeDecode, _FakeEvent, _FakePrefill
    from minisgl_backend import LLM, SamplingParams

    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper, module.BatchPrefillWithPagedKVCacheWrapper = _FakeDecode, _FakePrefill
    sys.modules["flashinfer"] = module
    kernels.flashinfer_attention_problem = lambda target: None  # the stand-in runs on the CPU
    torch.cuda.Event = _FakeEvent
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [3] * 19, [20, 21]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for kv_cache_dtype in ("auto", "fp8"):
        outs = {{}}
        for name, settings in (("triton", dict(attention_backend="flashinfer", decode_attention="triton")),
                               ("torch", dict(attention_backend="torch"))):
            llm = LLM({model!r}, device="cpu", dtype="float16", page_size=4, max_total_tokens=256,
                      layer_ops="torch", kv_cache_dtype=kv_cache_dtype, **settings)
            engine = llm.scheduler.engine
            assert (name == "triton") == (getattr(engine.attn, "decode_kernel", None) == "triton")
            assert engine.kv_cache.k[0].dtype == (torch.float16 if kv_cache_dtype == "auto" else torch.float8_e4m3fn)
            outs[name] = [o["token_ids"] for o in llm.generate(prompts, params)]
            llm.shutdown()
        assert outs["triton"] == outs["torch"], (kv_cache_dtype, outs)
    print("engine decode ok", outs["triton"])
""")


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
def test_engine_decodes_through_the_triton_kernel_like_the_torch_backend(tmp_path):
    """The whole engine in fp16 with decode_attention=triton (prefill on the flashinfer stand-in,
    every decode step in the Triton kernel, interpreted) generates the torch backend's tokens, with
    the model's dtype in the KV cache and with fp8."""
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    model = make_tiny_model(str(tmp_path / "tiny"), arch="llama", hidden_size=64, num_heads=4, num_kv_heads=2)
    assert "engine decode ok" in run_interpreted(_ENGINE.format(root=ROOT, model=model))
