"""The CPU's compiled paged attention (attention/cpu_kernels.py: decode rows and short extends)
against the independent paged reference, inside the torch backend, and end to end against the
pure-torch backend."""

from __future__ import annotations

import random
import types

import pytest
import torch

from minisgl_backend import LLM, SamplingParams
from minisgl_backend import kernels
from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.attention.cpu_kernels import PagedAttentionKernel
from minisgl_backend.attention.flashinfer_backend import build_paged_metadata, paged_view
from minisgl_backend.attention import torch_backend
from minisgl_backend.attention.torch_backend import TorchAttentionBackend, _KernelGroup
from minisgl_backend.config import ConfigError, EngineConfig, KernelConfig, ModelConfig
from minisgl_backend.kvcache import KVCache
from tests.test_flashinfer_metadata import make_page_table, paged_attention_from_metadata

KERNEL = kernels.cpu_attention_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler here")


def _batch(seq_lens, extend, page_size, hq, hkv, dim, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    width = -(-max(seq_lens) // page_size) * page_size
    num_pages = len(seq_lens) * width // page_size + 4
    table = make_page_table(seq_lens, page_size, num_pages, width, rng, shared_prefix_pages=1)
    cache = KVCache(1, num_pages, page_size, hkv, dim, torch.float32, torch.device("cpu"))
    cache.k[0].normal_()
    cache.v[0].normal_()
    rows = list(range(len(seq_lens)))
    rng.shuffle(rows)
    lens, ext = [seq_lens[r] for r in rows], [extend[r] for r in rows]
    out_loc = torch.cat([table[r, s - e:s].long() for r, s, e in zip(rows, lens, ext)])
    layout = BatchLayout(all(e == 1 for e in ext), torch.tensor(rows), torch.tensor(lens), torch.tensor(ext),
                         out_loc, lens, ext)
    n = sum(ext)
    qkv = torch.randn(n, hq + 2 * hkv, dim)  # q as the model hands it: a strided view of the qkv output
    return table, cache, layout, (qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:])


@pytest.fixture(scope="module")
def portable_kernel():
    """The kernel built without AVX-512: the paths a CPU without it (or an ARM one) runs."""
    import ctypes
    import platform

    from minisgl_backend.attention.cpu_kernels import kernel_of
    from minisgl_backend.cpu.build import build

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("-mno-avx512f is an x86 flag")
    return kernel_of(ctypes.CDLL(str(build(("-mno-avx512f",)))))


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("hq,hkv,dim", [(4, 2, 8), (8, 1, 16), (4, 4, 32), (8, 2, 64)])
@pytest.mark.parametrize("kind", ["decode", "mixed", "mixed_with_sdpa"])
@pytest.mark.parametrize("build", ["native", "portable"])
def test_kernel_backend_matches_the_paged_reference(page_size, hq, hkv, dim, kind, build, request, monkeypatch):
    seq_lens = [1, 7, 33, 64, 100, 5]
    extend = [1] * 6 if kind == "decode" else [1, 7, 1, 16, 1, 3]
    if kind == "mixed_with_sdpa":  # the 7- and 16-token extends go to SDPA, the others to the kernel
        monkeypatch.setattr(torch_backend, "KERNEL_MAX_EXTEND", 4)
    table, cache, layout, (q, k, v) = _batch(seq_lens, extend, page_size, hq, hkv, dim, seed=page_size + hq)
    kernel = KERNEL if build == "native" else request.getfixturevalue("portable_kernel")
    backend = TorchAttentionBackend(cache, table, kernel)
    backend.prepare(layout)
    kinds = [type(g) for g in backend._groups]
    assert kinds[0] is _KernelGroup and (len(kinds) > 1) == (kind == "mixed_with_sdpa")
    got = backend.forward(q, k, v, 0)  # stores k / v first, as every backend does
    md = build_paged_metadata(table, layout.rows, layout.seq_lens_cpu, layout.extend_lens_cpu, page_size)
    expected = paged_attention_from_metadata(q, paged_view(cache.k[0], page_size), paged_view(cache.v[0], page_size),
                                             md, page_size)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_kernel_and_gather_paths_agree_on_a_long_batch():
    seq_lens = [random.Random(i).randint(1, 700) for i in range(48)]
    table, cache, layout, (q, k, v) = _batch(seq_lens, [1] * 48, 16, 8, 2, 64, seed=7)
    outs = []
    for kernel in (None, KERNEL):
        backend = TorchAttentionBackend(cache, table, kernel)
        backend.prepare(layout)
        outs.append(backend.forward(q, k, v, 0))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["views_of_qkv", "contiguous", "float64"])
def test_kv_store_writes_what_the_indexed_store_writes(layout):
    table, cache, lay, (q, k, v) = _batch([5, 9, 17], [2, 9, 1], 4, 4, 2, 8, seed=3)
    if layout != "views_of_qkv":
        k, v = k.contiguous(), v.contiguous()
    if layout == "float64":
        k, v = k.double(), v.double()
    want = KVCache(1, cache.num_pages, 4, 2, 8, torch.float32, torch.device("cpu"))
    want.kv[0].copy_(cache.kv[0])
    want.store(0, lay.out_loc, k, v)
    wrote = KERNEL.store(cache.k[0], cache.v[0], lay.out_loc, k, v)
    assert wrote == (layout != "float64")  # a layout it does not take is left to the indexed store
    if wrote:
        assert torch.equal(cache.kv[0], want.kv[0])


def _backend(name, dtype=torch.float32):
    cache = KVCache(1, 8, 4, 2, 8, dtype, torch.device("cpu"))
    table = torch.zeros(3, 32, dtype=torch.int32)
    config = EngineConfig(model=ModelConfig(device="cpu", dtype=str(dtype).removeprefix("torch.")),
                          kernels=KernelConfig(attention_backend=name))
    choice = kernels.choose_kernels(config, types.SimpleNamespace(head_dim=8))
    return choice.make_attention(cache, table, num_qo_heads=4, num_kv_heads=2, max_batch_size=3)


def test_auto_and_cpu_pick_the_kernel_and_torch_stays_the_pure_reference():
    assert isinstance(_backend("auto").kernel, PagedAttentionKernel)
    assert isinstance(_backend("cpu").kernel, PagedAttentionKernel)
    assert _backend("torch").kernel is None
    assert _backend("auto", torch.bfloat16).kernel is None  # the kernel is float32 only


def test_cpu_backend_on_a_pool_it_cannot_read_is_a_config_error():
    with pytest.raises(ConfigError, match="float32 KV pool"):
        _backend("cpu", torch.bfloat16)


def test_greedy_generation_equals_the_pure_torch_backend(tiny_llama):
    prompts = [[3 + (i * 11 + j) % 90 for j in range(5 + 9 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = {}
    for name in ("torch", "cpu"):
        llm = LLM(tiny_llama, device="cpu", dtype="float32", attention_backend=name)
        assert (llm.scheduler.engine.attn.kernel is not None) == (name == "cpu")
        outputs[name] = [o["token_ids"] for o in llm.generate(prompts, params)]
        llm.shutdown()
    assert outputs["cpu"] == outputs["torch"]


def test_loading_the_kernel_leaves_the_process_floating_point_mode_alone():
    """Built with -ffast-math at compile time only: linked with it, gcc 12 would add
    crtfastmath.o, which flushes denormals to zero in the whole process on load."""
    import subprocess
    import sys

    code = ("import torch; from minisgl_backend.cpu import cpu_library; "
            "assert cpu_library() is not None; "
            "x = torch.tensor([1e-40], dtype=torch.float32) * 1.0; assert x.item() != 0.0, x")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_unusable_home_builds_the_kernel_in_the_temp_folder(tmp_path, monkeypatch):
    from minisgl_backend.cpu import build

    home = tmp_path / "home"
    home.write_text("a file, so no .cache can be made under it (even as root)")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    library = build.build()
    assert library.parent == tmp_path / "tmp" / "minisgl-kernels" and library.is_file()


def test_without_a_compiler_auto_falls_back_to_torch_and_cpu_is_a_config_error(monkeypatch, caplog):
    from minisgl_backend.cpu import build

    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setattr(kernels, "cpu_library", build.cpu_library.__wrapped__)  # uncached
    with caplog.at_level("WARNING"):
        assert _backend("auto").kernel is None
    assert "no C compiler" in caplog.text and "falls back to torch" in caplog.text
    with pytest.raises(ConfigError, match="did not build"):
        _backend("cpu")
