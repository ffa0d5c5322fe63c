"""GPU-only checks (skipped without CUDA by conftest): flashinfer attention, CUDA graphs, overlap.

flashinfer's kernels are built for head_dim 64 / 128 / 256, so the tiny model here has
hidden_size 256 over 4 heads (head_dim 64), unlike the CPU tests' head_dim 16.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.attention.torch_backend import TorchAttentionBackend
from minisgl_backend.attention.base import ForwardBatch
from minisgl_backend.kvcache import KVCache

pytestmark = pytest.mark.gpu

DTYPE = torch.bfloat16


def _page_table(seq_lens, page_size, num_pages, width, seed):
    """Whole pages of consecutive slots with shuffled page ids (one spare row at the end). The
    last page is never handed out: it is the spare page that pads CUDA-graph batches."""
    rng = random.Random(seed)
    pages = list(range(num_pages - 1))
    rng.shuffle(pages)
    table = torch.zeros(len(seq_lens) + 1, width, dtype=torch.int32)
    for row, length in enumerate(seq_lens):
        n = -(-length // page_size)
        mine = torch.tensor([pages.pop() for _ in range(n)])
        table[row, :n * page_size] = (mine[:, None] * page_size + torch.arange(page_size)).flatten().int()
    return table.cuda()


def _setup(seq_lens, extend, page_size, hq, hkv, dim, seed=0):
    torch.manual_seed(seed)
    width = -(-max(seq_lens) // page_size) * page_size
    num_pages = len(seq_lens) * width // page_size + 2
    table = _page_table(seq_lens, page_size, num_pages, width, seed)
    cache = KVCache(1, num_pages, page_size, hkv, dim, DTYPE, torch.device("cuda"))
    cache.k[0].normal_()
    cache.v[0].normal_()
    rows = list(range(len(seq_lens)))[::-1]
    lens, ext = [seq_lens[r] for r in rows], [extend[r] for r in rows]
    out_loc = torch.cat([table[r, s - e:s].long() for r, s, e in zip(rows, lens, ext)])
    is_decode = all(e == 1 for e in ext)
    dev = lambda x: torch.tensor(x, device="cuda")  # noqa: E731
    layout = BatchLayout(is_decode, dev(rows), dev(lens), dev(ext), out_loc, lens, ext)
    n = sum(ext)
    qkv = (torch.randn(n, hq, dim, device="cuda", dtype=DTYPE), torch.randn(n, hkv, dim, device="cuda", dtype=DTYPE),
           torch.randn(n, hkv, dim, device="cuda", dtype=DTYPE))
    return table, cache, layout, qkv


def _clone(cache):
    twin = copy.copy(cache)
    twin.k, twin.v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    return twin


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("tensor_cores", [False, True])
@pytest.mark.parametrize("kind", ["decode", "prefill_prefix"])
def test_flashinfer_matches_torch_backend(page_size, tensor_cores, kind):
    from minisgl_backend.attention.flashinfer_backend import FlashInferBackend

    hq, hkv, dim = 8, 2, 128
    seq_lens = [1, 17, 33, 64, 100]
    extend = [1] * 5 if kind == "decode" else [1, 9, 33, 16, 3]  # cached prefix = seq - extend
    table, cache, layout, (q, k, v) = _setup(seq_lens, extend, page_size, hq, hkv, dim)
    ref_cache = _clone(cache)
    ref = TorchAttentionBackend(ref_cache, table)
    ref.prepare(layout)
    expected = ref.forward(q, k, v, 0)
    fi = FlashInferBackend(cache, table, hq, hkv, dim, DTYPE, "cuda", max_batch_size=8,
                           use_tensor_cores=tensor_cores)
    fi.prepare(layout)
    got = fi.forward(q, k, v, 0)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(cache.k[0], ref_cache.k[0]) and torch.equal(cache.v[0], ref_cache.v[0])


def test_graph_runner_replay_matches_eager():
    """A one-layer attention 'model' captured by CudaGraphRunner gives the eager logits,
    for batches padded to a larger captured size."""
    from minisgl_backend.attention.flashinfer_backend import FlashInferBackend
    from minisgl_backend.engine.graph import CudaGraphRunner

    hq, hkv, dim, page_size, vocab = 4, 2, 64, 16, 32
    seq_lens = [5, 40, 17]
    table, cache, layout, _ = _setup(seq_lens, [1, 1, 1], page_size, hq, hkv, dim, seed=1)
    # like the engine's extra page past the scheduler's pool: _page_table never hands it out
    spare_row, spare_slot = table.shape[0] - 1, cache.spare_slot
    table[spare_row, 0] = spare_slot  # as PageTable maps its spare row
    emb = torch.randn(vocab, hq * dim, device="cuda", dtype=DTYPE)
    wk = torch.randn(hq * dim, hkv * dim, device="cuda", dtype=DTYPE) / dim
    head = torch.randn(hq * dim, vocab, device="cuda", dtype=DTYPE) / dim

    def forward_fn(ids, pos, fwd: ForwardBatch):
        x = emb[ids] + pos[:, None].to(DTYPE) / 64
        q = x.view(-1, hq, dim)
        kv = (x @ wk).view(-1, hkv, dim)
        out = fwd.attn.forward(q, kv, kv.contiguous(), 0)
        return (out[fwd.last_token_indices] @ head).float()

    attn = FlashInferBackend(cache, table, hq, hkv, dim, DTYPE, "cuda", max_batch_size=8)
    runner = CudaGraphRunner(forward_fn, attn, max_bs=8, vocab_size=vocab,
                             spare_row=spare_row, spare_slot=spare_slot, device="cuda")
    runner.capture()
    assert runner.sizes == [1, 2, 4, 8] and runner.can_run(3)
    ids = torch.tensor([3, 7, 11], device="cuda")
    pos = layout.seq_lens - 1
    with torch.inference_mode():
        attn.prepare(layout)
        eager = forward_fn(ids, pos, ForwardBatch(attn, torch.arange(3, device="cuda")))
        replayed = runner.replay(ids, pos, layout).clone()
        torch.cuda.synchronize()
    torch.testing.assert_close(replayed, eager, atol=2e-2, rtol=2e-2)
    runner.close()


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-gpu")), arch="llama", hidden_size=256,
                           num_heads=4, num_kv_heads=2, intermediate_size=256)


PROMPTS = ["Hello", "The capital of France is", "1 2 3 4 5 6 7 8 9 10", "Once upon a time, in a land far away"]


def _generate(path, **settings):
    from minisgl_backend import LLM, SamplingParams

    llm = LLM(path, device="cuda", dtype="bfloat16", page_size=16, max_total_tokens=8192,
              attention_backend="flashinfer", cuda_graph_max_bs=16, **settings)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0))
    return [o["token_ids"] for o in outs]


def test_cuda_graph_generation_equals_eager(gpu_model):
    eager = _generate(gpu_model, enable_cuda_graph=False, enable_overlap=False)
    graph = _generate(gpu_model, enable_cuda_graph=True, enable_overlap=False)
    assert all(len(t) > 0 for t in eager)
    assert graph == eager


def test_overlap_loop_equals_normal_loop_on_gpu(gpu_model):
    normal = _generate(gpu_model, enable_cuda_graph=True, enable_overlap=False)
    overlap = _generate(gpu_model, enable_cuda_graph=True, enable_overlap=True)
    assert overlap == normal
