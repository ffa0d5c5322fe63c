"""Per-step index arrays built on the host (numpy) and shipped in one copy; host staging; the
metadata paths that must never read the device (rows_cpu) or call repeat_interleave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minisgl_backend.engine.graph import StaticDecodeInputs
from minisgl_backend.engine.metadata import DeviceBatchIndices, HostBatchIndices
from minisgl_backend.kvcache.staging import HostStaging


def _reference(rows, starts, ends, width):
    positions = [p for s, e in zip(starts, ends) for p in range(s, e)]
    tok_rows = [r for r, s, e in zip(rows, starts, ends) for _ in range(s, e)]
    return positions, [r * width + p for r, p in zip(tok_rows, positions)]


@pytest.mark.parametrize("case", ["decode", "prefill", "mixed"])
def test_host_indices_match_a_per_token_reference(case):
    rows = [5, 0, 3]
    starts, ends = {"decode": ([9, 1, 30], [10, 2, 31]), "prefill": ([0, 0, 4], [7, 3, 20]),
                    "mixed": ([9, 0, 30], [10, 12, 31])}[case]
    width = 64
    host = HostBatchIndices.build(rows, starts, ends, width, samples=[True, case != "mixed", True], dump_cell=999)
    positions, flat = _reference(rows, starts, ends, width)
    assert host.positions.tolist() == positions and host.token_flat.tolist() == flat
    assert host.extend_lens.tolist() == [e - s for s, e in zip(starts, ends)]
    assert host.last_token.tolist() == (np.cumsum(host.extend_lens) - 1).tolist()
    assert host.is_uniform_decode == (case == "decode")
    expect_sampled = [r * width + e for r, e in zip(rows, ends)]
    if case == "mixed":
        expect_sampled[1] = 999  # a chunk that does not sample writes to the dump cell
    assert host.sampled_flat.tolist() == expect_sampled
    dev = DeviceBatchIndices.unpack(torch.from_numpy(host.pack()), len(rows))
    assert dev.rows.tolist() == rows and dev.seq_lens.tolist() == list(ends)
    assert dev.positions.tolist() == positions and dev.token_flat.tolist() == flat
    assert dev.last_token.tolist() == host.last_token.tolist()
    assert dev.sampled_flat.tolist() == expect_sampled


def test_host_indices_reject_empty_requests():
    with pytest.raises(ValueError, match="new token"):
        HostBatchIndices.build([0, 1], [3, 4], [4, 4], 16)
    with pytest.raises(ValueError):
        HostBatchIndices.build([], [], [], 16)


def test_staging_on_cpu_wraps_without_copy():
    a = np.arange(6, dtype=np.int64)
    t = HostStaging("cpu").to_device(a)
    assert t.tolist() == a.tolist() and t.data_ptr() == a.ctypes.data


def test_graph_layout_carries_host_rows_padded_with_the_spare_row():
    st = StaticDecodeInputs.allocate(8, "cpu")
    layout = st.layout(4, [5, 10, 3], [7, 1, 2], spare_row=9)
    assert layout.rows_cpu == [7, 1, 2, 9] and layout.seq_lens_cpu == [5, 10, 3, 1]
    assert st.layout(2, [1, 1]).rows_cpu is None
    with pytest.raises(ValueError):
        st.layout(4, [5, 10, 3], [7, 1])


def test_engine_steps_run_without_repeat_interleave(tmp_path, monkeypatch):
    """Prefill and decode steps run with torch.repeat_interleave poisoned."""
    from minisgl_backend import LLM, SamplingParams
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    llm = LLM(make_tiny_model(str(tmp_path)), device="cpu", dtype="float32", page_size=4, max_total_tokens=512)
    engine = llm.scheduler.engine
    real_forward = engine.forward
    calls = []

    def guarded(batch):
        def forbidden(*a, **k):
            raise AssertionError("host-side repeat_interleave in a step")
        with monkeypatch.context() as m:
            m.setattr(torch, "repeat_interleave", forbidden)
            m.setattr(torch.Tensor, "repeat_interleave", forbidden)
            result = real_forward(batch)
        calls.append(batch.is_decode)
        return result

    engine.forward = guarded
    outs = llm.generate([[5, 6, 7, 8, 9], [3, 4]], SamplingParams(max_tokens=4, temperature=0))
    assert [len(o["token_ids"]) for o in outs] == [4, 4]
    assert False in calls and True in calls


def test_kv_store_writes_an_adjacent_pair_at_once_and_equals_two_writes():
    from minisgl_backend.kvcache import KVCache

    a = KVCache(2, 8, 4, 2, 8, torch.float32, torch.device("cpu"))
    b = KVCache(2, 8, 4, 2, 8, torch.float32, torch.device("cpu"))
    qkv = torch.randn(5, (4 + 2 + 2) * 8)
    k, v = qkv[:, 32:48].view(5, 2, 8), qkv[:, 48:].view(5, 2, 8)  # v's heads follow k's
    loc = torch.tensor([3, 17, 9, 30, 0])
    with torch.profiler.profile() as prof:
        a.store(1, loc, k, v)
    writes = [e.name for e in prof.events() if e.name in ("aten::index_put_", "aten::_index_put_impl_")]
    assert writes.count("aten::index_put_") == 1, writes
    b.store(1, loc, k.contiguous(), v.contiguous())  # not adjacent: two writes
    assert torch.equal(a.k[1], b.k[1]) and torch.equal(a.v[1], b.v[1])
    assert torch.equal(a.k[1][loc], k) and torch.equal(a.v[1][loc], v)
    assert a.k[1].is_contiguous() and a.v[1].is_contiguous()
    assert not a.k[0].any()


def test_host_results_reuse_a_buffer_only_once_its_view_is_gone():
    """The scheduler reads a step's ids a step later, fault isolation drops results unread, and a
    benchmark may hold one longer: a buffer is handed out again only when nothing can read it."""
    import gc

    from minisgl_backend.kvcache.staging import HostResults

    results = HostResults(capacity=8, pin=False)
    held = results.copy(torch.arange(4))
    others = [results.copy(torch.full((4,), i)) for i in range(20)]  # more steps than any ring
    assert held.tolist() == [0, 1, 2, 3], "a result still held is never overwritten"
    dropped = {t.data_ptr() for t in others}
    assert len(dropped) == 20 and held.data_ptr() not in dropped
    del others
    gc.collect()
    again = results.copy(torch.tensor([7, 8]))
    assert again.tolist() == [7, 8] and again.data_ptr() in dropped, "a dropped result's buffer is reused"
    assert results.copy(torch.arange(20)).tolist() == list(range(20)), "larger than every free buffer"
    assert results.copy(torch.tensor([0.5])).dtype == torch.float32, "pooled per dtype"
