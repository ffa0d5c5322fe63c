"""CPU checks of the GPU fast path's pure parts: flashinfer's paged metadata and CUDA-graph padding."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.attention.flashinfer_backend import PagedMetadata, build_paged_metadata, paged_view
from minisgl_backend.attention.torch_backend import TorchAttentionBackend
from minisgl_backend.engine.graph import (
    CudaGraphRunner,
    StaticDecodeInputs,
    graph_batch_sizes,
    pick_graph_bs,
    supports_cuda_graph,
)
from minisgl_backend.kvcache import KVCache

# ---------------------------------------------------------------------------- helpers


def make_page_table(seq_lens, page_size, num_pages, width, rng, shared_prefix_pages=0):
    """A table the way CacheManager writes it: whole pages of consecutive slots, random page ids,
    optionally the first pages shared by every row (a radix-cache prefix). Row r belongs to
    request r; one spare row at the end."""
    table = torch.zeros(len(seq_lens) + 1, width, dtype=torch.int32)
    pages = list(range(num_pages))
    rng.shuffle(pages)
    shared, free = pages[:shared_prefix_pages], pages[shared_prefix_pages:]
    for row, length in enumerate(seq_lens):
        n = -(-length // page_size)
        mine = shared[:n] + [free.pop() for _ in range(n - min(n, len(shared)))]
        slots = (torch.tensor(mine, dtype=torch.int64)[:, None] * page_size + torch.arange(page_size)).flatten()
        table[row, :min(len(slots), width)] = slots[:width].to(torch.int32)
    return table


def reference_metadata(table, rows, seq_lens, extend_lens, page_size):
    qo, kv, idx, last = [0], [0], [], []
    for row, length, ext in zip(rows, seq_lens, extend_lens):
        n = math.ceil(length / page_size)
        idx += [int(table[row, j * page_size]) // page_size for j in range(n)]
        kv.append(kv[-1] + n)
        qo.append(qo[-1] + ext)
        last.append(length - (n - 1) * page_size)
    return qo, kv, idx, last


def assert_matches_reference(md: PagedMetadata, table, rows, seq_lens, extend_lens, page_size):
    qo, kv, idx, last = reference_metadata(table, rows, seq_lens, extend_lens, page_size)
    assert md.qo_indptr.tolist() == qo
    assert md.kv_indptr.tolist() == kv
    assert md.kv_indices.tolist() == idx
    assert md.kv_last_page_len.tolist() == last
    assert md.seq_lens.tolist() == list(seq_lens)
    for t in (md.qo_indptr, md.kv_indptr, md.kv_indices, md.kv_last_page_len, md.seq_lens):
        assert t.dtype == torch.int32
    for t in (md.qo_indptr, md.kv_indptr, md.kv_last_page_len, md.seq_lens):
        assert t.device.type == "cpu"
    assert md.batch_size == len(rows) and md.num_pages == kv[-1]
    assert all(1 <= n <= page_size for n in md.kv_last_page_len.tolist())
    # the pages, read in order and cut at seq_len, are exactly the slots the table maps to
    for i, (row, length) in enumerate(zip(rows, seq_lens)):
        pages = md.kv_indices[md.kv_indptr[i]:md.kv_indptr[i + 1]].long()
        slots = (pages[:, None] * page_size + torch.arange(page_size)).flatten()[:length]
        assert torch.equal(slots, table[row, :length].long())


def random_batch(rng, page_size, batch_size, decode, max_len=70):
    seq_lens = [rng.randint(1, max_len) for _ in range(batch_size)]
    if decode:
        extend = [1] * batch_size
    else:
        extend = [rng.randint(1, s) for s in seq_lens]  # prefix = s - e cached tokens
    return seq_lens, extend


# ---------------------------------------------------------------------------- build_paged_metadata


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("seed", range(4))
def test_metadata_matches_reference(page_size, decode, seed):
    rng = random.Random(seed * 100 + page_size)
    bsz = rng.randint(1, 9)
    seq_lens, extend = random_batch(rng, page_size, bsz, decode)
    width = -(-max(seq_lens) // page_size) * page_size + page_size
    table = make_page_table(seq_lens, page_size, num_pages=bsz * width // page_size + 8, width=width, rng=rng,
                            shared_prefix_pages=rng.choice([0, 2]))
    rows = list(range(bsz))
    rng.shuffle(rows)  # batch order differs from row order
    row_lens = [seq_lens[r] for r in rows]
    row_ext = [extend[r] for r in rows]
    md = build_paged_metadata(table, torch.tensor(rows), row_lens, row_ext, page_size)
    assert_matches_reference(md, table, rows, row_lens, row_ext, page_size)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_last_page_len_edges(page_size):
    """seq_len a multiple of page_size -> a full last page; one past it -> a new page of 1."""
    seq_lens = [1, page_size, page_size + 1, 2 * page_size, 3 * page_size - 1 if page_size > 1 else 3]
    extend = [1, page_size, 1, page_size, 2]
    rng = random.Random(7)
    width = 4 * page_size
    table = make_page_table(seq_lens, page_size, num_pages=64, width=width, rng=rng)
    rows = list(range(len(seq_lens)))
    md = build_paged_metadata(table, rows, seq_lens, extend, page_size)
    assert_matches_reference(md, table, rows, seq_lens, extend, page_size)
    expect_last = [s - (math.ceil(s / page_size) - 1) * page_size for s in seq_lens]
    assert md.kv_last_page_len.tolist() == expect_last
    assert md.kv_last_page_len.tolist()[1] == page_size  # exactly one full page
    assert md.kv_last_page_len.tolist()[3] == page_size  # two full pages


def test_prefill_with_cached_prefix_shares_pages():
    """Two requests on the same cached prefix pages: both page lists start with the shared pages."""
    page_size, rng = 4, random.Random(3)
    seq_lens, extend = [13, 10], [5, 2]  # 8 cached tokens each
    table = make_page_table(seq_lens, page_size, num_pages=32, width=16, rng=rng, shared_prefix_pages=2)
    md = build_paged_metadata(table, [0, 1], seq_lens, extend, page_size)
    assert_matches_reference(md, table, [0, 1], seq_lens, extend, page_size)
    first = md.kv_indices[0:4].tolist()
    second = md.kv_indices[4:7].tolist()
    assert first[:2] == second[:2]
    assert md.qo_indptr.tolist() == [0, 5, 7]


def test_host_tensor_inputs_and_errors():
    table = make_page_table([5, 3], 2, num_pages=16, width=8, rng=random.Random(0))
    md = build_paged_metadata(table, torch.tensor([1, 0]), torch.tensor([3, 5]), torch.tensor([1, 1]), 2)
    assert_matches_reference(md, table, [1, 0], [3, 5], [1, 1], 2)
    with pytest.raises(ValueError):
        build_paged_metadata(table, [0], [3], [4], 2)  # extend > seq
    with pytest.raises(ValueError):
        build_paged_metadata(table, [0], [0], [0], 2)  # empty request
    with pytest.raises(ValueError):
        build_paged_metadata(table, [0, 1], [3], [1], 2)  # rows / lengths mismatch
    with pytest.raises(ValueError):
        build_paged_metadata(table, [0], [9], [1], 2)  # longer than the table
    with pytest.raises(ValueError):
        build_paged_metadata(table, [], [], [], 2)


# ---------------------------------------------------------------------------- semantics


def paged_attention_from_metadata(q, k_pages, v_pages, md: PagedMetadata, page_size):
    """What flashinfer computes from the metadata: each request attends to its pages cut at
    seq_len, causal mask aligned to the bottom right."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    outs = []
    for i in range(md.batch_size):
        pages = md.kv_indices[md.kv_indptr[i]:md.kv_indptr[i + 1]].long()
        length = (len(pages) - 1) * page_size + int(md.kv_last_page_len[i])
        # an fp8 cache (kv_cache_dtype) is widened to q's dtype, as flashinfer's kernels load it
        keys = k_pages[pages].reshape(-1, *k_pages.shape[2:])[:length].to(q.dtype)
        vals = v_pages[pages].reshape(-1, *v_pages.shape[2:])[:length].to(q.dtype)
        group = num_heads // keys.shape[1]
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
        qi = q[md.qo_indptr[i]:md.qo_indptr[i + 1]]
        n_new = qi.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qi, keys) / math.sqrt(head_dim)
        q_pos = length - n_new + torch.arange(n_new)
        scores = scores.masked_fill(torch.arange(length)[None, :] > q_pos[:, None], float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals))
    return torch.cat(outs).reshape(q.shape[0], num_heads * head_dim)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_metadata_semantics_match_torch_backend(page_size, decode):
    """The metadata + NHD page view give the torch reference backend's attention (fp32, CPU)."""
    rng = random.Random(page_size)
    seq_lens, extend = random_batch(rng, page_size, 4, decode, max_len=40)
    check_torch_backend_against_metadata(rng, page_size, seq_lens, extend, [2, 0, 3, 1])


def test_prefill_rows_of_very_different_lengths_attend_in_groups():
    """Rows with extends are grouped by key length (no row padded past twice its own): the
    groups, decode rows beside them and cached prefixes still give the reference attention."""
    rng = random.Random(7)
    seq_lens, extend = [90, 6, 40, 23, 11, 70, 33], [90, 6, 1, 20, 11, 1, 9]  # rows 2 and 5 decode
    backend = check_torch_backend_against_metadata(rng, 4, seq_lens, extend, [3, 0, 6, 2, 5, 1, 4])
    sizes = sorted(g.shape[0] for g in backend._groups)
    assert sizes == [1, 2, 2, 2], sizes  # decode pair; prefill 90 | 33 23 | 11 6


def check_torch_backend_against_metadata(rng, page_size, seq_lens, extend, rows):
    torch.manual_seed(page_size)
    bsz, hq, hkv, dim = len(seq_lens), 4, 2, 8
    decode = all(e == 1 for e in extend)
    width = -(-max(seq_lens) // page_size) * page_size
    num_pages = bsz * width // page_size + 4
    table = make_page_table(seq_lens, page_size, num_pages, width, rng, shared_prefix_pages=1)
    cache = KVCache(1, num_pages, page_size, hkv, dim, torch.float32, torch.device("cpu"))
    cache.k[0].normal_()
    cache.v[0].normal_()
    lens, ext = [seq_lens[r] for r in rows], [extend[r] for r in rows]
    out_loc = torch.cat([table[r, s - e:s].long() for r, s, e in zip(rows, lens, ext)])
    layout = BatchLayout(decode, torch.tensor(rows), torch.tensor(lens), torch.tensor(ext), out_loc, lens, ext)
    n_tok = sum(ext)
    q, k, v = torch.randn(n_tok, hq, dim), torch.randn(n_tok, hkv, dim), torch.randn(n_tok, hkv, dim)
    ref = TorchAttentionBackend(cache, table)
    ref.prepare(layout)
    expected = ref.forward(q, k, v, 0)  # also stores k/v at out_loc
    md = build_paged_metadata(table, layout.rows, lens, ext, page_size)
    got = paged_attention_from_metadata(q, paged_view(cache.k[0], page_size), paged_view(cache.v[0], page_size),
                                        md, page_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return ref


def test_paged_view_is_a_view():
    pool = torch.arange(6 * 4 * 2 * 3, dtype=torch.float32).reshape(24, 2, 3)
    pages = paged_view(pool, 4)
    assert pages.shape == (6, 4, 2, 3) and pages.data_ptr() == pool.data_ptr()
    assert torch.equal(pages[2, 1], pool[2 * 4 + 1])


# ---------------------------------------------------------------------------- CUDA-graph padding


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    sizes = graph_batch_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256 and len(sizes) == 35
    assert graph_batch_sizes(0) == []


def test_pick_graph_bs():
    sizes = graph_batch_sizes(40)
    assert [pick_graph_bs(b, sizes) for b in (1, 2, 3, 5, 8, 9, 17, 33, 40)] == [1, 2, 4, 8, 8, 16, 24, 40, 40]
    assert pick_graph_bs(41, sizes) is None
    assert pick_graph_bs(0, sizes) is None


def _decode_indices(rows, lens, width):
    from minisgl_backend.engine.metadata import HostBatchIndices

    return HostBatchIndices.build(rows, [n - 1 for n in lens], lens, width)


def test_static_inputs_pack_one_copy_padded_with_dummies():
    st = StaticDecodeInputs.allocate(8, "cpu")
    st.packed.fill_(-7)  # stale values from an earlier, larger batch
    host = _decode_indices([5, 0, 2], [5, 10, 3], width=16)
    pad = (9 * 16, 0, 9, 1, 9 * 16 + 15)  # spare cell, position, spare row, length 1, dump cell
    values = StaticDecodeInputs.host_values(host, 4, pad)
    st.packed[:values.shape[0]] = torch.from_numpy(values)
    v = st.views(4)
    assert v["token_cells"].tolist() == [5 * 16 + 4, 9, 2 * 16 + 2, 144]
    assert v["positions"].tolist() == [4, 9, 2, 0]
    assert v["rows"].tolist() == [5, 0, 2, 9]
    assert v["seq_lens"].tolist() == [5, 10, 3, 1]
    assert v["sampled_cells"].tolist() == [5 * 16 + 5, 10, 2 * 16 + 3, 159]
    assert st.packed[20:].tolist() == [-7] * 20  # beyond the padded size: untouched
    layout = st.layout(4, [5, 10, 3])
    assert layout.is_decode and layout.seq_lens_cpu == [5, 10, 3, 1] and layout.extend_lens_cpu == [1] * 4
    assert layout.rows.tolist() == [5, 0, 2, 9] and layout.out_loc.data_ptr() == st.out_loc.data_ptr()
    assert st.last_token_indices[:4].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        StaticDecodeInputs.host_values(host, 2, pad)  # 3 requests in a graph of 2
    with pytest.raises(ValueError):  # a prefill chunk is no decode batch
        StaticDecodeInputs.host_values(_decode_indices([1], [4], 16).__class__.build([1], [0], [4], 16), 4, pad)
    with pytest.raises(ValueError):
        st.layout(2, [1, 1, 1])


def test_padded_layout_metadata_reads_the_spare_page():
    """Dummies (spare row, length 1) read exactly one page: the spare one."""
    page_size, num_pages = 4, 10
    table = make_page_table([6, 9], page_size, num_pages, width=12, rng=random.Random(1))
    spare_row, spare_slot = 2, num_pages * page_size  # the engine's extra page
    table[spare_row, 0] = spare_slot
    st = StaticDecodeInputs.allocate(4, "cpu")
    values = StaticDecodeInputs.host_values(_decode_indices([0, 1], [6, 9], 12), 4, (spare_row * 12, 0, spare_row, 1, 35))
    st.packed[:values.shape[0]] = torch.from_numpy(values)
    layout = st.layout(4, [6, 9])
    md = build_paged_metadata(table, layout.rows, layout.seq_lens_cpu, layout.extend_lens_cpu, page_size)
    assert_matches_reference(md, table, [0, 1, 2, 2], [6, 9, 1, 1], [1] * 4, page_size)
    assert md.kv_indices[-2:].tolist() == [num_pages, num_pages]
    assert md.kv_last_page_len[-2:].tolist() == [1, 1]


def test_metadata_writes_page_ids_in_place_and_through_the_host_converter():
    page_size = 4
    table = make_page_table([6, 9, 13], page_size, 12, width=16, rng=random.Random(2))
    rows, lens, ext = [2, 0, 1], [13, 6, 9], [1, 1, 1]
    expected = build_paged_metadata(table, rows, lens, ext, page_size)
    out = torch.full((32,), -1, dtype=torch.int32)
    seen = []
    md = build_paged_metadata(table, rows, lens, ext, page_size, kv_indices_out=out,
                              host_i32=lambda a: seen.append(a.copy()) or torch.from_numpy(a.astype(np.int32)))
    n = expected.num_pages
    assert md.kv_indices.data_ptr() == out.data_ptr() and md.kv_indices.tolist() == expected.kv_indices.tolist()
    assert out[n:].tolist() == [-1] * (32 - n), "nothing written past the batch's pages"
    assert len(seen) == 4 and md.kv_indptr.tolist() == expected.kv_indptr.tolist()
    with pytest.raises(ValueError):
        build_paged_metadata(table, rows, lens, ext, page_size, kv_indices_out=out[:n - 1])


def test_pinned_plan_arrays_reuse_their_buffers_plan_after_plan():
    from minisgl_backend.attention.flashinfer_backend import PinnedPlanArrays

    on_cpu = PinnedPlanArrays(cuda=False)
    on_cpu.start()
    assert on_cpu(np.array([1, 2, 3])).tolist() == [1, 2, 3]
    arrays = PinnedPlanArrays(cuda=True)
    arrays._bufs = [torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)]  # as if pinned
    arrays.start()
    a, b = arrays(np.array([4, 5])), arrays(np.array([6, 7, 8]))
    assert a.dtype == torch.int32 and a.tolist() == [4, 5] and b.tolist() == [6, 7, 8]
    arrays.start()  # the next plan rewrites the same buffers in the same order
    c = arrays(np.array([9]))
    assert c.data_ptr() == a.data_ptr() and c.tolist() == [9]


class _FakeHooks:
    def __init__(self):
        self.calls = []

    def init_cuda_graph(self, max_bs):
        self.calls.append(("init", max_bs))

    def prepare_for_capture(self, bs, layout):
        self.calls.append(("capture", bs))

    def prepare_for_replay(self, bs, layout):
        self.calls.append(("replay", bs, layout.rows.tolist(), layout.seq_lens_cpu, layout.out_loc.tolist()))

    def forward(self, q, k, v, layer_id):
        raise AssertionError("not called on CPU")


class _StepOnCpu:
    """Stands in for a captured graph: a replay runs what the graph captured, `_step`, eagerly."""

    def __init__(self, runner, bs):
        self.runner, self.bs = runner, bs

    def replay(self):
        self.runner._step(self.bs)


def test_page_table_maps_the_spare_row_to_the_spare_page():
    from minisgl_backend.kvcache import KVCache, PageTable

    cache = KVCache(1, 10, 4, 1, 8, torch.float32, torch.device("cpu"))
    assert cache.spare_slot == 40 and cache.k[0].shape[0] == 44, "one page past the pool"
    table = PageTable(num_rows=4, max_seq_len=30, page_size=4, spare_slot=cache.spare_slot, device="cpu")
    assert table.spare_row == 4 and table.slots.shape == (5, 32) and table.tokens.shape == (5, 32)
    assert table.slots[4, 0] == 40, "the spare row's first position maps to the spare slot"


def test_runner_replay_pads_gathers_and_writes_greedy_ids_on_cpu():
    from minisgl_backend.kvcache import PageTable
    from minisgl_backend.kvcache.staging import HostStaging

    vocab = 50
    table = PageTable(num_rows=4, max_seq_len=11, page_size=4, spare_slot=40, device="cpu")
    table.slots[:4] = torch.arange(4 * table.width, dtype=torch.int32).view(4, -1) + 100
    table.tokens[:4] = torch.arange(4 * table.width).view(4, -1) % 7
    hooks = _FakeHooks()

    def forward_fn(ids, pos, fwd):  # the argmax of row i is (3 * id + pos) % vocab
        logits = torch.zeros(ids.shape[0], vocab)
        logits[torch.arange(ids.shape[0]), (3 * ids + pos) % vocab] = 1.0
        return logits[fwd.last_token_indices]

    runner = CudaGraphRunner(forward_fn, hooks, max_bs=8, vocab_size=vocab, token_pool=table.tokens,
                             slot_table=table.slots, table_width=table.width, spare_row=table.spare_row,
                             dump_cell=table.dump_cell, logits_dtype=torch.float32, device="cpu")
    assert runner.sizes == [1, 2, 4, 8] and not runner.can_run(1), "nothing captured yet"
    runner.graphs = {bs: _StepOnCpu(runner, bs) for bs in runner.sizes}
    assert runner.can_run(8) and not runner.can_run(9) and not runner.can_run(0)
    rows, lens = [3, 1, 0], [7, 2, 5]
    ids = [int(table.tokens[r, n - 1]) for r, n in zip(rows, lens)]
    out = runner.replay(_decode_indices(rows, lens, table.width), HostStaging("cpu"))
    want = [(3 * i + n - 1) % vocab for i, n in zip(ids, lens)]
    assert out.logits.shape == (3, vocab) and out.logits.argmax(1).tolist() == want
    assert out.greedy_ids.tolist() == want
    assert [int(table.tokens[r, n]) for r, n in zip(rows, lens)] == want, "greedy ids land in the token pool"
    assert out.sampled_cells.tolist() == [r * table.width + n for r, n in zip(rows, lens)]
    slots = [int(table.slots[r, n - 1]) for r, n in zip(rows, lens)]
    assert hooks.calls[-1][:4] == ("replay", 4, rows + [table.spare_row], lens + [1])
    assert runner.inputs.out_loc[:4].tolist() == slots + [40], "KV slots gathered in the graph, dummies: spare"
    assert not supports_cuda_graph(TorchAttentionBackend(KVCache(1, 2, 4, 1, 8, torch.float32,
                                                                 torch.device("cpu")), table.slots))
    assert supports_cuda_graph(hooks)


# ---------------------------------------------------------------------------- FlashInferBackend on a stand-in


class _FakeWrapperBase:
    """Mimics flashinfer 0.7.2's wrapper contract (constructor / plan keywords, CUDA-graph buffer
    rules, NHD (k, v) tuple) and computes what the kernels would from the planned metadata."""

    PLAN_KWARGS: frozenset = frozenset()

    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, backend="auto"):
        assert kv_layout == "NHD" and backend == "fa2"
        self._float_workspace_buffer = float_workspace_buffer
        self._int_workspace_buffer = torch.empty(16, dtype=torch.uint8)
        self._pin_memory_int_workspace_buffer = torch.empty(16, dtype=torch.uint8)
        self.use_cuda_graph = use_cuda_graph
        self.num_plans = 0

    def _store(self, qo_indptr, indptr, indices, last_page_len, kwargs, page_size, causal):
        assert set(kwargs) <= self.PLAN_KWARGS, set(kwargs) - self.PLAN_KWARGS
        for t in (qo_indptr, indptr, last_page_len):
            assert t.dtype == torch.int32 and t.device.type == "cpu", "host int32 metadata"
        assert indices.dtype == torch.int32
        if self.use_cuda_graph:
            assert len(last_page_len) == self._fixed_bs, "batch size is fixed in cuda graph mode"
            assert len(indices) <= len(self._indices_buf)
            self._indptr_buf.copy_(indptr)
            self._last_buf.copy_(last_page_len)
            self._indices_buf[:len(indices)].copy_(indices)
        else:
            self._indptr_buf, self._indices_buf, self._last_buf = indptr.clone(), indices.clone(), last_page_len.clone()
        self._qo_indptr, self._page_size, self._causal = qo_indptr.clone(), page_size, causal
        self._dtypes = (kwargs.get("q_data_type"), kwargs.get("kv_data_type"))
        self.num_plans += 1

    def run(self, q, paged_kv_cache, **kwargs):
        assert not kwargs, kwargs
        self.run_kwargs = kwargs
        k_pages, v_pages = paged_kv_cache
        assert k_pages.dim() == 4 and k_pages.shape[1] == self._page_size, "NHD [pages, page_size, Hkv, D]"
        assert q.dtype == self._dtypes[0] and k_pages.dtype == self._dtypes[1]
        indptr, last = self._indptr_buf.clone(), self._last_buf.clone()
        md = PagedMetadata(self._qo_indptr, indptr, self._indices_buf[:int(indptr[-1])], last, last)
        out = paged_attention_from_metadata(q, k_pages, v_pages, md, self._page_size)
        return out.view(q.shape[0], q.shape[1], q.shape[2])


class _FakeDecode(_FakeWrapperBase):
    PLAN_KWARGS = frozenset({"pos_encoding_mode", "q_data_type", "kv_data_type", "non_blocking", "seq_lens"})

    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None,
                 backend="auto", jit_args=None):
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend)
        if use_cuda_graph:
            self._fixed_bs = len(paged_kv_last_page_len_buffer)
            assert len(paged_kv_indptr_buffer) == self._fixed_bs + 1
            self._indptr_buf, self._indices_buf = paged_kv_indptr_buffer, paged_kv_indices_buffer
            self._last_buf = paged_kv_last_page_len_buffer
        self.use_tensor_cores = use_tensor_cores

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kwargs):
        bsz = len(last_page_len)
        if kwargs.get("seq_lens") is not None:  # must be what flashinfer would derive (get_seq_lens)
            derived = (indptr[1:] - indptr[:-1] - 1) * page_size + last_page_len
            assert kwargs["seq_lens"].device.type == "cpu" and kwargs["seq_lens"].tolist() == derived.tolist()
        self._store(torch.arange(bsz + 1, dtype=torch.int32), indptr, indices, last_page_len, kwargs, page_size, False)

    def run(self, q, paged_kv_cache, **kwargs):
        assert q.shape[0] == len(self._last_buf), "decode: one query per request"
        return super().run(q, paged_kv_cache, **kwargs)


class _FakePrefill(_FakeWrapperBase):
    PLAN_KWARGS = frozenset({"qo_indptr", "paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len",
                             "num_qo_heads", "num_kv_heads", "head_dim_qk", "page_size", "causal",
                             "pos_encoding_mode", "q_data_type", "kv_data_type", "non_blocking"})

    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, backend="auto", **_):
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend)

    def plan(self, **kwargs):
        assert kwargs["causal"] is True
        self._store(kwargs["qo_indptr"], kwargs["paged_kv_indptr"], kwargs["paged_kv_indices"],
                    kwargs["paged_kv_last_page_len"], kwargs, kwargs["page_size"], True)


class _FakeEvent:
    """torch.cuda.Event on a CPU machine: the stand-in's plan() copies are already done."""

    def __init__(self):
        self.recorded = 0

    def record(self, stream=None):
        self.recorded += 1

    def synchronize(self):
        assert self.recorded, "synchronize() before record()"


@pytest.fixture
def fake_flashinfer(monkeypatch):
    import sys
    import types

    import minisgl_backend.attention.flashinfer_backend as fib

    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper = _FakeDecode
    module.BatchPrefillWithPagedKVCacheWrapper = _FakePrefill
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    return fib


def _backend_case(page_size, decode, seed, hq=4, hkv=2, dim=8):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    bsz = 5
    seq_lens, extend = random_batch(rng, page_size, bsz, decode, max_len=40)
    width = -(-max(seq_lens) // page_size) * page_size
    num_pages = bsz * width // page_size + 2
    table = make_page_table(seq_lens, page_size, num_pages - 1, width, rng, shared_prefix_pages=1)
    cache = KVCache(2, num_pages, page_size, hkv, dim, torch.float32, torch.device("cpu"))
    for t in cache.k + cache.v:
        t.normal_()
    rows = [3, 1, 4, 0, 2]
    lens, ext = [seq_lens[r] for r in rows], [extend[r] for r in rows]
    out_loc = torch.cat([table[r, s - e:s].long() for r, s, e in zip(rows, lens, ext)])
    layout = BatchLayout(decode, torch.tensor(rows), torch.tensor(lens), torch.tensor(ext), out_loc, lens, ext)
    n = sum(ext)
    qkv = [(torch.randn(n, hq, dim), torch.randn(n, hkv, dim), torch.randn(n, hkv, dim)) for _ in range(2)]
    return table, cache, layout, qkv


def _clone_cache(cache):
    import copy

    twin = copy.copy(cache)
    twin.kv = [t.clone() for t in cache.kv]
    twin.k, twin.v = [t[0] for t in twin.kv], [t[1] for t in twin.kv]
    return twin


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_backend_on_stand_in_matches_torch_backend(fake_flashinfer, page_size, decode):
    table, cache, layout, qkv = _backend_case(page_size, decode, seed=page_size)
    ref_cache = _clone_cache(cache)
    ref = TorchAttentionBackend(ref_cache, table)
    fi = fake_flashinfer.FlashInferBackend(cache, table, 4, 2, 8, torch.float32, "cpu", max_batch_size=8)
    ref.prepare(layout)
    fi.prepare(layout)
    assert fi._wrapper is (fi.decode_wrapper if decode else fi.prefill_wrapper)
    assert fi.decode_wrapper._int_workspace_buffer is fi.prefill_wrapper._int_workspace_buffer, "shared"
    for layer, (q, k, v) in enumerate(qkv):  # one plan, every layer runs
        torch.testing.assert_close(fi.forward(q, k, v, layer), ref.forward(q, k, v, layer), atol=1e-5, rtol=1e-5)
        assert torch.equal(cache.k[layer], ref_cache.k[layer]) and torch.equal(cache.v[layer], ref_cache.v[layer])
    assert fi._wrapper.num_plans == 1


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_backend_leaves_flashinfers_launch_options_at_their_defaults(fake_flashinfer, decode):
    table, cache, layout, qkv = _backend_case(4, decode, seed=5)
    fi = fake_flashinfer.FlashInferBackend(cache, table, 4, 2, 8, torch.float32, "cpu", max_batch_size=8)
    fi.prepare(layout)
    fi.forward(*qkv[0], 0)
    assert fi._wrapper.run_kwargs == {}


@pytest.mark.parametrize("page_size", [1, 16])
def test_backend_graph_hooks_on_stand_in(fake_flashinfer, page_size):
    """capture plans a dummy batch into the fixed buffers; replay re-plans the real padded batch."""
    table, cache, layout, qkv = _backend_case(page_size, True, seed=11)
    spare_row, spare_slot = table.shape[0] - 1, cache.spare_slot
    table[spare_row, 0] = spare_slot
    fi = fake_flashinfer.FlashInferBackend(cache, table, 4, 2, 8, torch.float32, "cpu", max_batch_size=8)
    fi.init_cuda_graph(8)
    st = StaticDecodeInputs.allocate(8, "cpu")
    st.packed[:40] = torch.tensor([spare_row * table.shape[1], 0, spare_row, 1, 0]).repeat_interleave(8)
    st.out_loc.fill_(spare_slot)  # what the graph gathers for dummies
    fi.prepare_for_capture(8, st.layout(8, [1] * 8))
    graph_wrapper = fi._wrapper
    assert graph_wrapper.use_cuda_graph and graph_wrapper is not fi.decode_wrapper
    q, k, v = qkv[0]
    pad = lambda t: torch.cat([t, t.new_zeros(3, *t.shape[1:])])  # noqa: E731
    fi.forward(pad(q), pad(k), pad(v), 0)  # the capture run: dummies write the spare slot only
    lens = layout.seq_lens_cpu
    values = StaticDecodeInputs.host_values(_decode_indices(layout.rows.tolist(), lens, table.shape[1]), 8,
                                            (spare_row * table.shape[1], 0, spare_row, 1, 0))
    st.packed[:40] = torch.from_numpy(values)
    st.out_loc[:5] = layout.out_loc
    padded = st.layout(8, layout.seq_lens_cpu)
    fi.prepare_for_replay(8, padded)
    assert graph_wrapper.num_plans == 2 and fi._wrapper is graph_wrapper
    ref = TorchAttentionBackend(_clone_cache(cache), table)
    ref.prepare(layout)
    expected = ref.forward(q, k, v, 0)
    got = fi.forward(pad(q), pad(k), pad(v), 0)[:5]  # what a replay computes, from the refilled buffers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        fi.prepare_for_replay(4, padded)  # layout of 8 for a graph of 4
    with pytest.raises(RuntimeError):
        fi.prepare_for_replay(4, st.layout(4, [1] * 4))  # never captured


def test_build_graph_runner_off_on_cpu_and_when_disabled(tiny_llama):
    from minisgl_backend.config import EngineConfig
    from minisgl_backend.engine.graph import build_graph_runner

    hooks = _FakeHooks()
    from minisgl_backend.kvcache import PageTable

    table = PageTable(num_rows=2, max_seq_len=8, page_size=4, spare_slot=8, device="cpu")
    kwargs = dict(vocab_size=4, page_table=table, logits_dtype=torch.float32, max_running_requests=2)
    config = EngineConfig.from_flat(model_path=tiny_llama)
    assert build_graph_runner(config, None, hooks, device="cpu", **kwargs) is None
    config = EngineConfig.from_flat(model_path=tiny_llama, enable_cuda_graph=False)
    assert build_graph_runner(config, None, hooks, device="cuda", **kwargs) is None
    assert hooks.calls == []


class _EagerGraphHooks:
    """The graph hooks over the engine's torch backend: a 'replay' then runs the captured step
    eagerly on the CPU (with `_StepOnCpu`), through the engine's real graph path."""

    def __init__(self, attn):
        self.attn = attn

    def init_cuda_graph(self, max_bs):
        pass

    def prepare_for_capture(self, bs, layout):
        self.attn.prepare(layout)

    def prepare_for_replay(self, bs, layout):
        self.attn.prepare(layout)

    def __getattr__(self, name):  # forward / kv_target / attend
        return getattr(self.attn, name)


def _with_graph_runner_on_cpu(llm, max_bs=8):
    engine = llm.scheduler.engine
    table = engine.page_table
    runner = CudaGraphRunner(engine.model, _EagerGraphHooks(engine.attn), max_bs=max_bs, vocab_size=engine.vocab_size,
                             token_pool=table.tokens, slot_table=table.slots, table_width=table.width,
                             spare_row=table.spare_row, dump_cell=table.dump_cell, logits_dtype=engine.dtype,
                             device="cpu")
    runner.graphs = {bs: _StepOnCpu(runner, bs) for bs in runner.sizes}
    engine.graph_runner = runner
    return runner


def test_engine_graph_path_equals_eager_for_every_kind_of_sampling(tiny_llama):
    """The engine's decode-graph path (padded static inputs, in-graph gathers, the graph's argmax
    in the token pool, eager sampling over the graph's logits for the other rows) on the CPU:
    the same tokens and logprobs as the eager path, for plain greedy batches and for batches
    that mix greedy, logprobs, min_tokens and seeded temperature sampling."""
    from minisgl_backend import LLM, SamplingParams

    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [3] * 7, [20, 21], [30, 31, 32, 33]]
    greedy = [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)] * len(prompts)
    mixed = [SamplingParams(max_tokens=9, temperature=0),
             SamplingParams(max_tokens=9, temperature=0, logprobs=True),
             SamplingParams(max_tokens=9, temperature=0, min_tokens=6),
             SamplingParams(max_tokens=9, temperature=0.8, seed=11),
             SamplingParams(max_tokens=9, temperature=0, repetition_penalty=1.3)]
    results = {}
    for use_graph in (False, True):
        llm = LLM(tiny_llama, device="cpu", dtype="float32", page_size=4, max_total_tokens=512,
                  enable_prefix_cache=False)
        runner = _with_graph_runner_on_cpu(llm) if use_graph else None
        replays = []
        if runner is not None:
            real = runner.replay
            runner.replay = lambda host, staging, *lora: (replays.append(host.rows.shape[0])
                                                           or real(host, staging, *lora))
        results[use_graph] = [llm.generate(prompts, greedy), llm.generate(prompts, mixed)]
        if runner is not None:
            assert replays and max(replays) == 5, "the decode steps ran as 'graphs' (5 requests in a graph of 8)"
        llm.shutdown()
    for eager, graph in zip(results[False], results[True]):
        assert [o["token_ids"] for o in graph] == [o["token_ids"] for o in eager]
        for g, e in zip(graph, eager):
            assert (g["logprobs"] is None) == (e["logprobs"] is None)
            if e["logprobs"] is not None:
                assert g["logprobs"] == pytest.approx(e["logprobs"], abs=1e-5)


@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_decode_kernel_plans_nothing_and_reads_the_page_table(fake_flashinfer, monkeypatch, page_size):
    """decode_kernel "triton": decode batches (eager, captured, replayed) go to the Triton kernel
    with the layout's device rows / lengths and the page table, and plan() never runs for them;
    prefill still plans flashinfer. (The kernel itself: tests/test_triton_decode.py; here a torch
    stand-in with its signature.)"""
    from minisgl_backend.attention import triton_decode
    from tests.test_triton_decode import reference_decode

    calls = []

    def stand_in(q, k_pool, v_pool, slot_table, rows, seq_lens, splits):
        calls.append((rows, seq_lens, splits))
        return reference_decode(q, k_pool, v_pool, slot_table, rows, seq_lens).to(q.dtype)

    monkeypatch.setattr(triton_decode, "paged_decode_attention", stand_in)
    table, cache, layout, qkv = _backend_case(page_size, True, seed=7)
    ref_cache = _clone_cache(cache)
    ref = TorchAttentionBackend(ref_cache, table)
    fi = fake_flashinfer.FlashInferBackend(cache, table, 4, 2, 8, torch.float32, "cpu", max_batch_size=8,
                                           decode_kernel="triton")
    ref.prepare(layout)
    fi.prepare(layout)
    for layer, (q, k, v) in enumerate(qkv):
        torch.testing.assert_close(fi.forward(q, k, v, layer), ref.forward(q, k, v, layer), atol=1e-5, rtol=1e-5)
        assert torch.equal(cache.k[layer], ref_cache.k[layer]), "K/V stored as before"
    assert fi.decode_wrapper.num_plans == 0 and [c[2] for c in calls] == [triton_decode.num_splits(5, 2, 132)] * 2
    assert calls[0][0] is layout.rows and calls[0][1] is layout.seq_lens
    fi.init_cuda_graph(8)
    st = StaticDecodeInputs.allocate(8, "cpu")
    fi.prepare_for_capture(8, st.layout(8, [1] * 8))
    fi.prepare_for_replay(8, st.layout(8, [3] * 8))
    assert fi._graph_wrappers == {} and fi._triton_decode[0] is st.views(8)["rows"]
    _, _, prefill, _ = _backend_case(page_size, False, seed=8)
    fi.prepare(prefill)
    assert fi._triton_decode is None and fi.prefill_wrapper.num_plans == 1
    with pytest.raises(ValueError):
        fake_flashinfer.FlashInferBackend(cache, table, 4, 2, 8, torch.float32, "cpu", max_batch_size=8,
                                          decode_kernel="nope")
