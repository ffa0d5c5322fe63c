"""The compiled CPU layer ops (models/cpu_ops.py, cpu/csrc/layer_ops.c) against the torch
reference (TorchOps, numerically as in HF), in float32: strided views of a fused qkv output,
in-place semantics, the multi-threaded path (prefill sizes) and greedy generation."""

from __future__ import annotations

import types

import pytest
import torch

from minisgl_backend import LLM, SamplingParams
from minisgl_backend.config import ConfigError, EngineConfig
from minisgl_backend.cpu import cpu_library
from minisgl_backend.models.torch_ops import TorchOps
from minisgl_backend.models.layers import RotaryEmbedding

LIBRARY = cpu_library()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="no C compiler here")
REF = TorchOps()


@pytest.fixture(scope="module")
def ops():
    from minisgl_backend.models.cpu_ops import CpuOps

    return CpuOps(LIBRARY)


def _close(got, want):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 37, 3000], ids=["one", "decode", "prefill_threads"])
def test_rms_norm_and_add_rms_norm(ops, tokens):
    torch.manual_seed(tokens)
    x, res, w = torch.randn(tokens, 96), torch.randn(tokens, 96), torch.rand(96) + 0.5
    _close(ops.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6))
    want_out, want_res = REF.add_rms_norm(x, res, w, 1e-6)
    xc, rc = x.clone(), res.clone()
    got_out, got_res = ops.add_rms_norm(xc, rc, w, 1e-6)
    assert got_out.data_ptr() == xc.data_ptr() and got_res.data_ptr() == rc.data_ptr(), "in place"
    _close(got_res, want_res)
    _close(got_out, want_out)


def test_per_head_norm_on_views_of_the_qkv_output(ops):
    tokens, hq, hkv, dim = 37, 4, 2, 32
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim)
    q, k = qkv[:, :hq * dim].view(tokens, hq, dim), qkv[:, hq * dim:(hq + hkv) * dim].view(tokens, hkv, dim)
    w = torch.rand(dim) + 0.5
    got_q = ops.rms_norm(q, w, 1e-6)
    assert got_q.is_contiguous() and got_q.data_ptr() != q.data_ptr()
    _close(got_q, REF.rms_norm(q, w, 1e-6))
    want_k, v_before = REF.rms_norm(k, w, 1e-6), qkv[:, (hq + hkv) * dim:].clone()
    got_k = ops.rms_norm_over(k, w, 1e-6)
    assert got_k.data_ptr() == k.data_ptr()
    _close(got_k, want_k)
    assert torch.equal(qkv[:, (hq + hkv) * dim:], v_before), "v untouched"


@pytest.mark.parametrize("tokens", [5, 2000])
def test_silu_and_mul(ops, tokens):
    x = torch.randn(tokens, 2 * 80) * 4
    x[0, :3] = torch.tensor([-200.0, 200.0, 0.0])  # far past exp's range: finite, as torch
    _close(ops.silu_and_mul(x), REF.silu_and_mul(x))
    _close(ops.silu_and_mul(x[:, :100]), REF.silu_and_mul(x[:, :100]))  # strided rows


@pytest.mark.parametrize("contiguous", [False, True], ids=["views_of_qkv", "contiguous"])
@pytest.mark.parametrize("tokens", [7, 1500])
def test_rope_in_place(ops, contiguous, tokens):
    hq, hkv, dim = 4, 2, 32
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim)
    q, k = qkv[:, :hq * dim].view(tokens, hq, dim), qkv[:, hq * dim:(hq + hkv) * dim].view(tokens, hkv, dim)
    if contiguous:
        q, k = q.contiguous(), k.contiguous()
    v_before = qkv[:, (hq + hkv) * dim:].clone()
    positions = torch.randint(0, 4000, (tokens,))
    ref_rope = RotaryEmbedding(dim, 1e4, None, max_positions=4096, ops=REF)
    cpu_rope = RotaryEmbedding(dim, 1e4, None, max_positions=4096, ops=ops)
    want_q, want_k = ref_rope.apply(q.clone(), k.clone(), ref_rope.prepare(positions))
    got_q, got_k = cpu_rope.apply(q, k, cpu_rope.prepare(positions))
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr(), "rotated in place"
    torch.testing.assert_close(got_q, want_q, atol=2e-5, rtol=2e-5)  # cos / sin of positions up to 4000
    torch.testing.assert_close(got_k, want_k, atol=2e-5, rtol=2e-5)
    assert torch.equal(qkv[:, (hq + hkv) * dim:], v_before), "v untouched"


def test_layouts_the_kernels_do_not_take_go_to_torch(ops):
    x = torch.randn(6, 16, dtype=torch.float64)
    w = torch.rand(16, dtype=torch.float64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6))
    with pytest.raises(ValueError, match="float32"):
        rotary = types.SimpleNamespace(cos_sin_cache=torch.randn(8, 4))
        ops.apply_rope(torch.randn(2, 1, 4, dtype=torch.float64), torch.randn(2, 1, 4, dtype=torch.float64),
                       ops.rope_inputs(rotary, torch.tensor([0, 1])))


def test_greedy_generation_equals_the_torch_ops(tiny_llama):
    prompts = [[3 + (i * 13 + j) % 90 for j in range(4 + 11 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = {}
    for name in ("torch", "auto"):
        llm = LLM(tiny_llama, device="cpu", dtype="float32", layer_ops=name)
        assert llm.scheduler.engine.model.ops.name == ("torch" if name == "torch" else "cpu")
        outputs[name] = [o["token_ids"] for o in llm.generate(prompts, params)]
        llm.shutdown()
    assert outputs["auto"] == outputs["torch"]


def test_layer_ops_setting_is_validated(tiny_llama):
    with pytest.raises(ConfigError, match="layer_ops must be one of auto, torch, got 'fast'"):
        EngineConfig.from_flat(model_path=tiny_llama, layer_ops="fast")
