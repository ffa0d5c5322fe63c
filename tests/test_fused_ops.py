"""Which implementation of the decoder's elementwise ops a model gets (`kernels.choose_layer_ops`),
and the torch reference semantics that the fused kernels must match (the kernels themselves:
tests/test_gpu.py)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from minisgl_backend import kernels
from minisgl_backend.kernels import Target, choose_layer_ops
from minisgl_backend.models.flashinfer_ops import FlashInferOps
from minisgl_backend.models.torch_ops import TorchOps


def _target(device: str, dtype: torch.dtype, kv_dtype: torch.dtype | None = None, head_dim: int = 64) -> Target:
    return Target(torch.device(device), dtype, kv_dtype or dtype, head_dim)


def test_cpu_gets_the_compiled_ops_in_float32_else_torch_and_never_imports_flashinfer():
    from minisgl_backend.cpu import cpu_library
    from minisgl_backend.models.cpu_ops import CpuOps

    want = CpuOps if cpu_library() is not None else TorchOps
    assert isinstance(choose_layer_ops("auto", _target("cpu", torch.float32)), want)
    assert isinstance(choose_layer_ops("auto", _target("cpu", torch.bfloat16)), TorchOps)
    assert isinstance(choose_layer_ops("torch", _target("cpu", torch.float32)), TorchOps)
    assert "flashinfer" not in sys.modules


def test_cpu_without_the_compiled_library_gets_the_torch_ops(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_library", lambda: None)  # e.g. no C compiler
    assert isinstance(choose_layer_ops("auto", _target("cpu", torch.float32)), TorchOps)


def test_cuda_without_flashinfer_or_in_float32_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(kernels, "flashinfer_import_problem", lambda: "flashinfer is not importable: no module")
    assert kernels.fused_ops_problem(_target("cuda", torch.bfloat16)) == "flashinfer is not importable: no module"
    assert isinstance(choose_layer_ops("auto", _target("cuda", torch.bfloat16)), TorchOps)
    monkeypatch.setattr(kernels, "flashinfer_import_problem", lambda: None)
    assert "float32" in kernels.fused_ops_problem(_target("cuda", torch.float32))
    assert isinstance(choose_layer_ops("auto", _target("cuda:0", torch.float32)), TorchOps)


@pytest.fixture
def fake_flashinfer(monkeypatch):
    """A stand-in flashinfer package whose kernels record their calls (the real one needs CUDA)."""
    calls = []
    pkg = types.ModuleType("flashinfer")
    norm, rope, act = (types.ModuleType(f"flashinfer.{n}") for n in ("norm", "rope", "activation"))

    def no_options(kwargs):  # flashinfer's own defaults: no keyword beyond the kernel's inputs
        assert not kwargs, kwargs
        return ()

    norm.rmsnorm = (lambda x, w, eps, out=None, **kw: calls.append(("rmsnorm", tuple(x.shape), out is x,
                                                                     *no_options(kw))) or x)
    norm.fused_add_rmsnorm = (lambda x, r, w, eps, **kw: calls.append(("fused_add_rmsnorm", tuple(x.shape),
                                                                       *no_options(kw))))
    rope.apply_rope_with_cos_sin_cache_inplace = (
        lambda pos, q, k, head, cache, is_neox: calls.append(("rope", tuple(q.shape), tuple(k.shape), head, is_neox)))
    act.silu_and_mul = (lambda x, **kw: calls.append(("silu_and_mul", tuple(x.shape), *no_options(kw)))
                        or x[..., : x.shape[-1] // 2])
    pkg.norm, pkg.rope, pkg.activation = norm, rope, act
    for name, mod in (("flashinfer", pkg), ("flashinfer.norm", norm), ("flashinfer.rope", rope),
                      ("flashinfer.activation", act)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_cuda_half_precision_gets_flashinfer_kernels(fake_flashinfer, monkeypatch):
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    monkeypatch.setattr(kernels, "gpu_capability", lambda index: (9, 0))
    for dtype in (torch.float16, torch.bfloat16):
        ops = choose_layer_ops("auto", _target("cuda:0", dtype))
        assert isinstance(ops, FlashInferOps) and ops.needs_cos_sin_cache and ops.fused_prologue


def test_the_prologue_kernel_is_chosen_where_it_can_run(fake_flashinfer, monkeypatch):
    """The Triton prologue beside flashinfer's ops: triton installed, a power-of-two head size, the
    model's dtype or fp8 in the KV cache, and e4m3 only from sm_89 on."""
    monkeypatch.setattr(kernels, "triton_installed", lambda: True)
    monkeypatch.setattr(kernels, "gpu_capability", lambda index: (8, 0))
    bf16 = torch.bfloat16
    assert kernels.prologue_problem(_target("cuda:0", bf16)) is None
    assert kernels.prologue_problem(_target("cuda:0", bf16, torch.float8_e5m2)) is None, "an fp8 KV cache"
    assert "sm_89" in kernels.prologue_problem(_target("cuda:0", bf16, torch.float8_e4m3fn))
    assert "power of two" in kernels.prologue_problem(_target("cuda:0", bf16, head_dim=96))
    assert "dtype" in kernels.prologue_problem(_target("cuda:0", bf16, torch.float16))
    assert not choose_layer_ops("auto", _target("cuda:0", bf16, head_dim=96)).fused_prologue
    monkeypatch.setattr(kernels, "triton_installed", lambda: False)
    assert kernels.prologue_problem(_target("cuda:0", bf16)) == "triton is not installed"
    ops = choose_layer_ops("auto", _target("cuda:0", bf16))
    assert isinstance(ops, FlashInferOps) and not ops.fused_prologue


def test_flashinfer_ops_call_one_kernel_each_on_strided_views(fake_flashinfer):
    ops = FlashInferOps()
    qkv = torch.randn(3, (4 + 2 + 2) * 8)
    q = qkv[:, :32].view(3, 4, 8)  # strided views into the qkv output, as the attention layer makes
    k = qkv[:, 32:48].view(3, 2, 8)
    cache = torch.randn(16, 8)
    rq, rk = ops.apply_rope(q, k, ops.rope_inputs(types.SimpleNamespace(cos_sin_cache=cache), torch.arange(3)))
    assert rq is q and rk is k  # rotated in place
    x, res, w = torch.randn(3, 8), torch.randn(3, 8), torch.ones(8)
    out, new_res = ops.add_rms_norm(x, res, w, 1e-6)
    assert out is x and new_res is res  # the kernel writes both in place
    ops.rms_norm(q, torch.ones(8), 1e-6)
    assert ops.rms_norm_over(k, torch.ones(8), 1e-6) is k
    assert ops.silu_and_mul(torch.randn(3, 16)).shape == (3, 8)
    assert fake_flashinfer == [("rope", (3, 32), (3, 16), 8, True), ("fused_add_rmsnorm", (3, 8)),
                               ("rmsnorm", (3, 4, 8), False), ("rmsnorm", (3, 2, 8), True),
                               ("silu_and_mul", (3, 16))]


def test_model_built_for_cuda_bf16_wires_the_fused_ops_into_every_layer(fake_flashinfer, tmp_path):
    from minisgl_backend.models.hf_config import read_arch_config
    from minisgl_backend.models.llama import LlamaForCausalLM
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    arch = read_arch_config(make_tiny_model(str(tmp_path), arch="qwen3", num_layers=2))
    ops = choose_layer_ops("auto", _target("cuda", torch.bfloat16, head_dim=arch.head_dim))
    model = LlamaForCausalLM(arch, torch.bfloat16, ops)  # built on the CPU
    norms = [m for m in model.modules() if hasattr(m, "ops")]
    assert norms and all(isinstance(m.ops, FlashInferOps) for m in norms)
    table = model.model.rotary_emb.cos_sin_cache
    assert table.shape == (arch.max_position_embeddings, arch.head_dim) and table.dtype == torch.float32
    freqs = 5.0 * model.model.rotary_emb.inv_freq
    torch.testing.assert_close(table[5], torch.cat((freqs.cos(), freqs.sin())))


def test_torch_add_rms_norm_is_add_then_norm():
    ops = TorchOps()
    x, res, w = torch.randn(4, 16), torch.randn(4, 16), torch.rand(16)
    out, new_res = ops.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(new_res, res + x)
    assert torch.equal(out, ops.rms_norm(res + x, w, 1e-5))
    ref = (res + x) * torch.rsqrt((res + x).pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(out, ref)


def test_torch_silu_and_mul_and_rope_reference():
    ops = TorchOps()
    x = torch.randn(3, 10)
    torch.testing.assert_close(ops.silu_and_mul(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])
    rotary = types.SimpleNamespace(inv_freq=torch.tensor([1.0, 0.1]), dtype=torch.float32)
    q, k = torch.randn(2, 3, 4), torch.randn(2, 1, 4)
    rq, rk = ops.apply_rope(q, k, ops.rope_inputs(rotary, torch.tensor([0, 7])))
    qkv = torch.cat((q, k, torch.randn(2, 1, 4)), dim=1).flatten(1)  # q, k adjacent: rotated jointly
    jq, jk = ops.apply_rope(qkv[:, :12].view(2, 3, 4), qkv[:, 12:16].view(2, 1, 4),
                            ops.rope_inputs(rotary, torch.tensor([0, 7])))
    assert torch.equal(jq, rq) and torch.equal(jk, rk)
    assert torch.equal(rq[0], q[0]) and torch.equal(rk[0], k[0])  # position 0 is the identity
    # bit for bit the HF formula x * cos + rotate_half(x) * sin
    freqs = torch.tensor([0.0, 7.0])[:, None] * rotary.inv_freq
    cos, sin = torch.cat((freqs, freqs), -1).cos()[:, None], torch.cat((freqs, freqs), -1).sin()[:, None]
    half = lambda x: torch.cat((-x[..., 2:], x[..., :2]), -1)  # noqa: E731
    assert torch.equal(rq, q * cos + half(q) * sin) and torch.equal(rk, k * cos + half(k) * sin)
    angle = 7 * rotary.inv_freq
    x1, x2 = q[1, :, :2], q[1, :, 2:]
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), -1)
    torch.testing.assert_close(rq[1], expected)


def _prologue_args():
    qkv = torch.randn(3, (4 + 2 + 2) * 8, dtype=torch.bfloat16)
    q, k, v = (t.view(3, -1, 8) for t in qkv.split_with_sizes([32, 16, 16], -1))
    pool = torch.zeros(16, 2, 8, dtype=torch.bfloat16)
    rope = (torch.arange(3), torch.zeros(16, 8))
    return (q, k, v, None, None, 1e-6, rope, pool, pool.clone(), torch.arange(3))


def test_prologue_kernel_failing_at_first_use_falls_back_to_separate_kernels(fake_flashinfer):
    """A Triton kernel that cannot compile on this GPU must not take the server down: the first
    call's failure switches the layers to the separate kernels (logged); a later failure, after
    the kernel ran once, is a bug and raises."""

    def broken(*args):
        raise RuntimeError("PTX JIT compilation failed")

    ops = FlashInferOps(broken)
    assert ops.fused_prologue
    assert ops.attention_prologue(*_prologue_args()) is None and not ops.fused_prologue

    calls = []
    state = {"kernel": lambda *a: calls.append(1) or a[0].clone()}
    ops = FlashInferOps(lambda *a: state["kernel"](*a))
    assert ops.attention_prologue(*_prologue_args()) is not None and calls == [1]
    state["kernel"] = broken
    with pytest.raises(RuntimeError):
        ops.attention_prologue(*_prologue_args())
