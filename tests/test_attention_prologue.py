"""The fused attention prologue (q/k RMSNorm, rope, K/V store in one kernel) against the same
steps run one by one: the compiled C version (CpuOps) directly and through generation, and the
Triton kernel (the CUDA one) in Triton's interpreter on CPU tensors."""

from __future__ import annotations

import textwrap

import pytest
import torch

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.cpu import cpu_library
from minisgl_backend.kernels import triton_installed
from minisgl_backend.models.attention_prologue import layout_problem
from minisgl_backend.models.torch_ops import TorchOps
from tests.triton_interpreter import TESTS, run_interpreted

LIBRARY = cpu_library()
needs_compiler = pytest.mark.skipif(LIBRARY is None, reason="no C compiler here")
REF = TorchOps()


def qkv_views(tokens: int, hq: int, hkv: int, dim: int, dtype=torch.float32, seed: int = 0):
    """q / k / v as the attention layer makes them: strided views of one fused qkv output."""
    torch.manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim).to(dtype)
    q, k, v = qkv.split_with_sizes([hq * dim, hkv * dim, hkv * dim], dim=-1)
    return qkv, q.view(tokens, hq, dim), k.view(tokens, hkv, dim), v.view(tokens, hkv, dim)


def cos_sin_table(dim: int, positions: int = 512) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(positions).float()[:, None] * inv_freq
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def separate_steps(q, k, v, q_w, k_w, eps, positions, table, k_pool, v_pool, slots):
    """The reference: norm, rope and store one by one, in float32 (the table is the flashinfer /
    C layout: cos half, then sin half), rounded to the activation dtype after the norm and at the end."""
    half = q.shape[-1] // 2
    cos, sin = table[positions, :half][:, None, :], table[positions, half:][:, None, :]

    def norm(x, w):
        if w is None:
            return x
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)

    def rope(x):
        x1, x2 = x.float()[..., :half], x.float()[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    k_pool, v_pool = k_pool.clone(), v_pool.clone()
    k_pool[slots], v_pool[slots] = rope(norm(k, k_w)).to(k_pool.dtype), v.to(v_pool.dtype)
    return rope(norm(q, q_w)), k_pool, v_pool


def _case(qk_norm: bool, tokens: int, dtype=torch.float32, hq=4, hkv=2, dim=32):
    qkv, q, k, v = qkv_views(tokens, hq, hkv, dim, dtype, seed=tokens)
    weights = (torch.rand(dim).to(dtype) + 0.5, torch.rand(dim).to(dtype) + 0.5) if qk_norm else (None, None)
    positions = torch.randint(0, 512, (tokens,))
    slots = torch.randperm(4 * tokens + 8)[:tokens]
    k_pool = torch.randn(4 * tokens + 8, hkv, dim).to(dtype)
    v_pool = torch.randn(4 * tokens + 8, hkv, dim).to(dtype)
    return qkv, q, k, v, weights, positions, slots, k_pool, v_pool


@needs_compiler
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qwen3_norms", "llama_no_norm"])
@pytest.mark.parametrize("tokens", [1, 37, 3000], ids=["one", "decode", "prefill_threads"])
def test_compiled_prologue_equals_the_separate_steps(qk_norm, tokens):
    from minisgl_backend.models.cpu_ops import CpuOps

    qkv, q, k, v, (q_w, k_w), positions, slots, k_pool, v_pool = _case(qk_norm, tokens)
    table, qkv_before = cos_sin_table(32), qkv.clone()
    want_q, want_k, want_v = separate_steps(q, k, v, q_w, k_w, 1e-6, positions, table, k_pool, v_pool, slots)
    got_q = CpuOps(LIBRARY).attention_prologue(q, k, v, q_w, k_w, 1e-6, (positions, table), k_pool, v_pool, slots)
    assert got_q is not None and got_q.is_contiguous() and got_q.shape == q.shape
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_pool, want_k, atol=1e-5, rtol=1e-5)  # other slots untouched too
    assert torch.equal(v_pool, want_v)
    assert torch.equal(qkv, qkv_before), "the qkv output is read, never written"


@needs_compiler
def test_compiled_prologue_declines_what_it_cannot_take():
    from minisgl_backend.models.cpu_ops import CpuOps

    _, q, k, v, (q_w, k_w), positions, slots, k_pool, v_pool = _case(True, 5)
    rope = (positions, cos_sin_table(32))
    ops = CpuOps(LIBRARY)
    heads_apart = q.transpose(0, 1).contiguous().transpose(0, 1)  # [T, H, D] with the token dim innermost-but-one
    assert ops.attention_prologue(heads_apart, k, v, q_w, k_w, 1e-6, rope, k_pool, v_pool, slots) is None
    assert ops.attention_prologue(q.double(), k, v, q_w, k_w, 1e-6, rope, k_pool, v_pool, slots) is None
    assert REF.attention_prologue(q, k, v, q_w, k_w, 1e-6, rope, k_pool, v_pool, slots) is None


@needs_compiler
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generation_with_the_fused_prologue_equals_separate_steps(tiny_model_factory, arch, monkeypatch):
    from minisgl_backend.models.cpu_ops import CpuOps

    path = tiny_model_factory(arch, num_kv_heads=2)
    calls = []
    kernel = CpuOps.attention_prologue
    prompts = [[3 + (i * 7 + j) % 100 for j in range(4 + 5 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = {}
    for fuse in (True, False):  # False: the prologue declines every call, so the steps run apart
        calls.clear()
        monkeypatch.setattr(CpuOps, "attention_prologue",
                            lambda self, *a: calls.append(1) or (kernel(self, *a) if fuse else None))
        llm = LLM(path, page_size=4)
        outputs[fuse] = [o["token_ids"] for o in llm.generate(prompts, params)]
        llm.shutdown()
        assert calls, "the layers offer every prologue to the kernel"
    assert all(len(t) == 12 for t in outputs[True])
    assert outputs[True] == outputs[False]


def test_layout_problem_names_the_view_the_kernel_cannot_take():
    _, q, k, v = qkv_views(3, 4, 2, 32, torch.bfloat16)
    assert layout_problem(q, k, v) is None
    assert "strides" in layout_problem(q.transpose(0, 1).contiguous().transpose(0, 1), k, v)
    assert "strides" in layout_problem(q[..., :24], k[..., :24], v[..., :24])
    assert "shape" in layout_problem(q.flatten(1), k, v)


_INTERPRETED = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_attention_prologue import _case, cos_sin_table, separate_steps
    from minisgl_backend.models.attention_prologue import attention_prologue
    for dtype, tol in ((torch.float16, 1e-3), (torch.bfloat16, 3e-2)):
        for qk_norm in (True, False):
            for tokens, dim in ((1, 16), (9, 64)):
                qkv, q, k, v, (q_w, k_w), pos, slots, k_pool, v_pool = _case(qk_norm, tokens, dtype, dim=dim)
                table = cos_sin_table(dim)
                want = separate_steps(q, k, v, q_w, k_w, 1e-6, pos, table, k_pool, v_pool, slots)
                got_q = attention_prologue(q, k, v, q_w, k_w, 1e-6, pos, table, k_pool, v_pool, slots)
                for got, ref in zip((got_q, k_pool, v_pool), want):
                    # bf16: the interpreter rounds float32 -> bf16 its own way (one step at most)
                    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
                assert got_q.is_contiguous()
    # kv_cache_dtype fp8: the pools take k (rotated, rounded to fp16 first) and v cast to fp8
    for pool_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        qkv, q, k, v, (q_w, k_w), pos, slots, k_pool, v_pool = _case(True, 9, torch.float16, dim=64)
        k_pool, v_pool = k_pool.to(pool_dtype), v_pool.to(pool_dtype)
        table = cos_sin_table(64)
        want = separate_steps(q, k, v, q_w, k_w, 1e-6, pos, table, k_pool, v_pool, slots)
        got_q = attention_prologue(q, k, v, q_w, k_w, 1e-6, pos, table, k_pool, v_pool, slots)
        torch.testing.assert_close(got_q.float(), want[0].float(), atol=1e-3, rtol=1e-3)
        for got, ref in ((k_pool, want[1]), (v_pool, want[2])):
            # Triton 3.6's interpreter converts to fp8 its own way (a value just under a power of
            # two that rounds up comes out halved; ties away from zero): the GPU test checks the
            # bits, this one that every value went to its slot and head, rotated
            got, ref = got.float(), ref.float()
            assert (got == ref).float().mean() > 0.9
            tiny = (got - ref).abs() <= 4e-3  # around fp8's smallest subnormals
            within_2x = (got * ref > 0) & (got.abs() <= 2 * ref.abs()) & (ref.abs() <= 2 * got.abs())
            assert bool((tiny | within_2x).all())
    print("interpreted kernel ok")
""")


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
def test_triton_kernel_in_the_interpreter_equals_the_separate_steps():
    """The CUDA kernel's code, run by Triton's interpreter on the CPU (set before triton is
    imported, hence a fresh process)."""
    assert "interpreted kernel ok" in run_interpreted(_INTERPRETED.format(tests=TESTS), timeout=300)


@pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
@pytest.mark.parametrize("qk_norm,pool", [(True, "bf16"), (False, "bf16"), (True, "fp8e4nv")],
                         ids=["qwen3_norms", "llama_no_norm", "fp8_kv_cache"])
def test_triton_kernel_compiles_for_hopper_without_a_gpu(qk_norm, pool):
    """The compiled path (not the interpreter): Triton lowers the kernel to a cubin for sm_90 with
    its bundled ptxas, as it will at the first launch on an H100 / H200."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minisgl_backend.models.attention_prologue import prologue_kernel

    ptr = lambda t: f"*{t}"  # noqa: E731
    signature = {"q_ptr": ptr("bf16"), "k_ptr": ptr("bf16"), "v_ptr": ptr("bf16"), "q_stride": "i32",
                 "k_stride": "i32", "v_stride": "i32", "q_weight_ptr": ptr("bf16"), "k_weight_ptr": ptr("bf16"),
                 "eps": "fp32", "positions_ptr": ptr("i64"), "cos_sin_ptr": ptr("fp32"), "q_out_ptr": ptr("bf16"),
                 "k_pool_ptr": ptr(pool), "v_pool_ptr": ptr(pool), "slots_ptr": ptr("i64")}
    constants = {"NUM_Q_HEADS": 16, "NUM_KV_HEADS": 8, "HEAD_DIM": 128, "HALF": 64, "HAS_NORM": qk_norm,
                 "KV_LIMIT": 448.0 if pool == "fp8e4nv" else 0.0}
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(fn=prologue_kernel(), signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    assert len(compiled.asm["cubin"]) > 1000
    assert compiled.asm["ptx"].count("st.global") >= 4  # q or k (two halves) and v
