"""Attention on CUDA through flashinfer's paged-KV wrappers (flashinfer-python 0.7.x).

The KV pool of a layer, `k[layer]` / `v[layer]` of shape [num_pages * page_size, Hkv, D], is
viewed as flashinfer's NHD paged layout [num_pages, page_size, Hkv, D] (no copy), and handed
to the kernels as a `(k_cache, v_cache)` tuple. A request's pages are read off its page-table
row: page j holds positions [j * page_size, (j + 1) * page_size), and its page id is
`page_table[row, j * page_size] // page_size` (the scheduler writes whole, aligned pages).

One `plan()` per batch, in `prepare()`; every layer then only `run()`s:

- decode batches (one new token per request): `BatchDecodeWithPagedKVCacheWrapper`, with tensor
  cores when the GQA group is large (>= 4 query heads per KV head);
- everything else (prefill, chunked prefill, prefill on a cached prefix, mixed): the paged
  `BatchPrefillWithPagedKVCacheWrapper` with `causal=True`. The new tokens' K/V are stored into
  the pool first, so each request attends to its cached prefix and its new tokens through the
  same page list; flashinfer aligns the causal mask to the bottom right (query i of a request
  with q_len new tokens and kv_len positions sits at position kv_len - q_len + i).

CUDA graphs (decode only): `init_cuda_graph(max_bs)` allocates fixed indptr / indices /
last_page_len buffers shared by one decode wrapper per captured batch size
(`use_cuda_graph=True`); `prepare_for_capture(bs, layout)` plans that wrapper and makes it the
one `forward()` uses while the graph is captured; `prepare_for_replay(bs, layout)` re-plans it
(plan() copies the new metadata into the fixed buffers) right before `graph.replay()`.

With `decode_kernel="triton"` decode batches skip all of that: `attention/triton_decode.py`
reads the page table and the batch's rows / lengths on the device, so neither an eager decode
step nor a replayed graph plans anything on the host. Prefill stays on flashinfer.

`minisgl_backend.kernels` decides whether this backend (and which decode kernel) can serve the
model here; `import flashinfer` happens inside the constructor only: the package imports on a CPU
machine but none of its kernels run there. `build_paged_metadata` is plain torch and runs anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from minisgl_backend.attention import triton_decode
from minisgl_backend.attention.base import BatchLayout
from minisgl_backend.kvcache.staging import HostStaging
from minisgl_backend.kvcache import KVCache

# flashinfer's recommended float workspace (split-k partial results); its docs use 128 MiB.
DEFAULT_WORKSPACE_BYTES = 128 * 1024 * 1024
# Use the tensor-core (prefill-kernel) decode from this many query heads per KV head on.
TENSOR_CORE_MIN_GROUP = 4


# ---------------------------------------------------------------------------- metadata


@dataclass
class PagedMetadata:
    """flashinfer's CSR description of a batch over the paged KV pool.

    Index pointers and last-page lengths stay on the host (flashinfer's plan() reads them there;
    passing host tensors avoids a device->host sync); the page ids live on the page table's device.
    """

    qo_indptr: torch.Tensor  # [B + 1] int32, host: new tokens of request i are q[qo_indptr[i]:qo_indptr[i+1]]
    kv_indptr: torch.Tensor  # [B + 1] int32, host: pages of request i are kv_indices[kv_indptr[i]:kv_indptr[i+1]]
    kv_indices: torch.Tensor  # [kv_indptr[-1]] int32, device: page ids in position order
    kv_last_page_len: torch.Tensor  # [B] int32, host: entries used in each request's last page, in [1, page_size]
    seq_lens: torch.Tensor  # [B] int32, host: positions (cached + new) of each request

    @property
    def batch_size(self) -> int:
        return self.kv_last_page_len.shape[0]

    @property
    def num_pages(self) -> int:
        return int(self.kv_indptr[-1])


def _host_array(values: Sequence[int] | torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"{name} must be host values (a list or a CPU tensor): plan() reads them there")
        values = values.numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _indptr(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _host_i32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int32))


def build_paged_metadata(page_table: torch.Tensor, rows: Sequence[int] | torch.Tensor,
                         seq_lens: Sequence[int] | torch.Tensor, extend_lens: Sequence[int] | torch.Tensor,
                         page_size: int, staging: HostStaging | None = None, *,
                         host_i32: Callable[[np.ndarray], torch.Tensor] | None = None,
                         kv_indices_out: torch.Tensor | None = None) -> PagedMetadata:
    """CSR metadata of a batch: request i owns page-table row `rows[i]`, has `seq_lens[i]` positions
    after this batch, of which the last `extend_lens[i]` are new (the query tokens).

    All three are host values (a device `rows` is read back, which syncs: pass `BatchLayout.rows_cpu`).
    The arithmetic runs in numpy on the host; the device does one gather of the page ids through
    the flat page-table cells computed here, sent in one copy (`staging`). No repeat_interleave.
    `host_i32` turns the host arrays into int32 tensors (default: new ones; the backend passes
    its pinned ones); `kv_indices_out` (int32, on the device) receives the page ids in place.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    seq = _host_array(seq_lens, "seq_lens")
    ext = _host_array(extend_lens, "extend_lens")
    rows_h = _host_array(rows.cpu() if isinstance(rows, torch.Tensor) else rows, "rows")
    bsz = seq.shape[0]
    if ext.shape[0] != bsz or rows_h.shape[0] != bsz:
        raise ValueError(f"{rows_h.shape[0]} rows, {bsz} seq_lens and {ext.shape[0]} extend_lens")
    if bsz == 0:
        raise ValueError("empty batch")
    if (seq < 1).any() or (ext < 1).any() or (ext > seq).any():
        raise ValueError(f"need 1 <= extend_len <= seq_len, got seq_lens={seq.tolist()} extend_lens={ext.tolist()}")
    width = page_table.shape[1]
    if int(seq.max()) > width:
        raise ValueError(f"seq_len {int(seq.max())} exceeds the page table width {width}")

    num_pages = (seq + page_size - 1) // page_size
    kv_indptr = _indptr(num_pages)
    total = int(kv_indptr[-1])
    # flat page k belongs to request r(k) and is its page j(k): its first slot sits in table cell
    # rows[r] * width + j * page_size
    req_of_page = np.repeat(np.arange(bsz), num_pages)
    page_in_req = np.arange(total) - kv_indptr[:-1][req_of_page]
    cells = rows_h[req_of_page] * width + page_in_req * page_size
    cells_d = (staging.to_device(cells) if staging is not None
               else torch.from_numpy(cells).to(page_table.device, non_blocking=True))
    if kv_indices_out is not None:
        if total > kv_indices_out.shape[0]:
            raise ValueError(f"{total} pages do not fit a buffer of {kv_indices_out.shape[0]}")
        kv_indices = torch.index_select(page_table.view(-1), 0, cells_d, out=kv_indices_out[:total])
        if page_size > 1:
            kv_indices.div_(page_size, rounding_mode="floor")
    else:
        first_slot = page_table.view(-1)[cells_d]
        kv_indices = torch.div(first_slot, page_size, rounding_mode="floor").to(torch.int32)
    last_page_len = seq - (num_pages - 1) * page_size
    i32 = host_i32 or _host_i32
    return PagedMetadata(i32(_indptr(ext)), i32(kv_indptr), kv_indices, i32(last_page_len), i32(seq))


class PinnedPlanArrays:
    """The host int32 arrays of one plan() in pinned buffers reused from plan to plan, so that
    plan()'s copies of them to the device are plain DMA. The backend waits until the last plan's
    copies ran (`_before_plan`) before it writes the next plan's arrays (`start` numbers them
    anew); off CUDA they are ordinary tensors."""

    def __init__(self, cuda: bool, capacity: int = 1024) -> None:
        self._cuda, self._capacity = cuda, capacity
        self._bufs: list[torch.Tensor] = []
        self._used = 0

    def start(self) -> None:
        self._used = 0

    def __call__(self, a: np.ndarray) -> torch.Tensor:
        if not self._cuda:
            return _host_i32(a)
        i, n = self._used, a.shape[0]
        self._used += 1
        if i == len(self._bufs):
            self._bufs.append(torch.empty(0, dtype=torch.int32))
        if self._bufs[i].numel() < n:
            self._bufs[i] = torch.empty(max(n, self._capacity), dtype=torch.int32, pin_memory=True)
        out = self._bufs[i][:n]
        out.numpy()[:] = a
        return out


def paged_view(pool: torch.Tensor, page_size: int) -> torch.Tensor:
    """[num_pages * page_size, Hkv, D] slot pool -> flashinfer NHD pages [num_pages, page_size, Hkv, D] (a view)."""
    return pool.view(-1, page_size, pool.shape[1], pool.shape[2])


# ---------------------------------------------------------------------------- backend


class FlashInferBackend:
    """The AttentionBackend protocol (`prepare(layout)`, `forward(q, k, v, layer_id)`) on flashinfer."""

    def __init__(self, kv_cache: KVCache, page_table: torch.Tensor, num_qo_heads: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 max_batch_size: int, *, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                 use_tensor_cores: bool | None = None, decode_kernel: str = "flashinfer") -> None:
        if decode_kernel not in ("flashinfer", "triton"):
            raise ValueError(f"decode_kernel must be flashinfer or triton, got {decode_kernel!r}")
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        import flashinfer

        self._fi = flashinfer
        self.kv_cache = kv_cache
        self.page_table = page_table
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size = kv_cache.page_size
        self.dtype = dtype
        self.kv_dtype = kv_cache.k[0].dtype if kv_cache.k else dtype  # fp8: plan() picks kernels that widen it
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.staging = HostStaging(self.device)
        self._plan_arrays = PinnedPlanArrays(self.device.type == "cuda")
        self._no_indices = torch.empty(0, dtype=torch.int32, device=self.device)
        if use_tensor_cores is None:
            use_tensor_cores = num_qo_heads // num_kv_heads >= TENSOR_CORE_MIN_GROUP
        self.use_tensor_cores = use_tensor_cores

        # "Must be initialized to 0 for its first use" (BatchDecodeWithPagedKVCacheWrapper docs).
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        # fa2 explicitly: "auto" may pick fa3 (prefill, SM90) or cudnn (decode, SM100) whose
        # constraints differ; fa2 is what mini-sglang and sglang run by default.
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, kv_layout="NHD", backend="fa2")
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, kv_layout="NHD", use_tensor_cores=use_tensor_cores, backend="fa2")
        # Every wrapper allocates an 8 MiB int workspace plus an 8 MiB pinned staging copy; one
        # pair serves all, since every batch plans before it runs and runs on one stream.
        self._int_workspace = getattr(self.prefill_wrapper, "_int_workspace_buffer", None)
        self._pinned_int_workspace = getattr(self.prefill_wrapper, "_pin_memory_int_workspace_buffer", None)
        self._share_int_workspace(self.decode_wrapper)

        self._wrapper = None  # the wrapper planned for the current batch
        # or, with decode_kernel "triton", the current decode batch's (rows, seq_lens, splits)
        self.decode_kernel = decode_kernel
        self._sm_count = (torch.cuda.get_device_properties(self.device).multi_processor_count
                          if self.device.type == "cuda" else 132)
        self._triton_decode: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._out_loc: torch.Tensor | None = None
        self._plan_done: torch.cuda.Event | None = None

        # CUDA-graph state (init_cuda_graph)
        self.graph_max_bs = 0
        self._graph_wrappers: dict[int, object] = {}
        self._graph_indptr: torch.Tensor | None = None
        self._graph_indices: torch.Tensor | None = None
        self._graph_last_page_len: torch.Tensor | None = None

    # ------------------------------------------------------------ helpers

    def _share_int_workspace(self, wrapper) -> None:
        if self._int_workspace is None or self._pinned_int_workspace is None:
            return
        if hasattr(wrapper, "_int_workspace_buffer") and hasattr(wrapper, "_pin_memory_int_workspace_buffer"):
            wrapper._int_workspace_buffer = self._int_workspace
            wrapper._pin_memory_int_workspace_buffer = self._pinned_int_workspace

    def _paged_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (paged_view(self.kv_cache.k[layer_id], self.page_size),
                paged_view(self.kv_cache.v[layer_id], self.page_size))

    def _before_plan(self) -> None:
        # plan() writes its schedule into a pinned host buffer and queues an async copy to the
        # device; the next plan() must not overwrite that buffer before the copy ran (with the
        # overlap loop the host plans batch N+1 while the GPU may still be behind).
        if self._plan_done is not None:
            self._plan_done.synchronize()

    def _after_plan(self) -> None:
        if self._plan_done is None:
            self._plan_done = torch.cuda.Event()
        self._plan_done.record()

    def _plan_decode(self, wrapper, md: PagedMetadata, indices_in_place: bool = False) -> None:
        """`indices_in_place`: the page ids already sit in the graph's fixed indices buffer
        (`kv_indices_out`), so plan() is given none to copy there."""
        wrapper.plan(
            md.kv_indptr, self._no_indices if indices_in_place else md.kv_indices, md.kv_last_page_len,
            self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
            pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.kv_dtype,
            non_blocking=True, seq_lens=md.seq_lens,  # known here: plan() need not derive them
        )

    def _plan_prefill(self, md: PagedMetadata) -> None:
        self.prefill_wrapper.plan(
            qo_indptr=md.qo_indptr, paged_kv_indptr=md.kv_indptr, paged_kv_indices=md.kv_indices,
            paged_kv_last_page_len=md.kv_last_page_len,
            num_qo_heads=self.num_qo_heads, num_kv_heads=self.num_kv_heads,
            head_dim_qk=self.head_dim, page_size=self.page_size, causal=True,
            pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.kv_dtype,
            non_blocking=True,
        )

    def _metadata(self, layout: BatchLayout, kv_indices_out: torch.Tensor | None = None) -> PagedMetadata:
        """Call after `_before_plan()`: the pinned arrays of the last plan are rewritten here."""
        rows = layout.rows_cpu if layout.rows_cpu is not None else layout.rows
        self._plan_arrays.start()
        return build_paged_metadata(self.page_table, rows, layout.seq_lens_cpu, layout.extend_lens_cpu,
                                    self.page_size, self.staging, host_i32=self._plan_arrays,
                                    kv_indices_out=kv_indices_out)

    # ------------------------------------------------------------ protocol

    def _use_triton_decode(self, layout: BatchLayout) -> bool:
        """With decode_kernel "triton", a decode batch needs no plan: the kernel reads the rows
        and lengths on the device (a graph's static buffers when captured)."""
        if self.decode_kernel != "triton" or not layout.is_decode:
            return False
        bs = len(layout.seq_lens_cpu)
        self._triton_decode = (layout.rows, layout.seq_lens, triton_decode.num_splits(bs, self.num_kv_heads,
                                                                                      self._sm_count))
        self._wrapper = None
        self._out_loc = layout.out_loc
        return True

    def prepare(self, layout: BatchLayout) -> None:
        if self._use_triton_decode(layout):
            return
        self._triton_decode = None
        self._before_plan()
        md = self._metadata(layout)
        if layout.is_decode and all(n == 1 for n in layout.extend_lens_cpu):
            self._plan_decode(self.decode_wrapper, md)
            self._wrapper = self.decode_wrapper
        else:
            self._plan_prefill(md)
            self._wrapper = self.prefill_wrapper
        self._after_plan()
        self._out_loc = layout.out_loc

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        assert self._out_loc is not None, "prepare() must run before forward()"
        self.kv_cache.store(layer_id, self._out_loc, k, v)
        return self.attend(q, layer_id)

    def kv_target(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self._out_loc is not None, "prepare() must run before kv_target()"
        return self.kv_cache.k[layer_id], self.kv_cache.v[layer_id], self._out_loc

    def attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        if self._triton_decode is not None:
            rows, seq_lens, splits = self._triton_decode
            out = triton_decode.paged_decode_attention(q.contiguous(), self.kv_cache.k[layer_id],
                                                       self.kv_cache.v[layer_id], self.page_table, rows,
                                                       seq_lens, splits)
            return out.reshape(q.shape[0], self.num_qo_heads * self.head_dim)
        assert self._wrapper is not None, "prepare() must run before attend()"
        out = self._wrapper.run(q.contiguous(), self._paged_kv(layer_id))
        return out.reshape(q.shape[0], self.num_qo_heads * self.head_dim)

    # ------------------------------------------------------------ CUDA graphs

    def init_cuda_graph(self, max_bs: int) -> None:
        """Fixed metadata buffers for decode graphs of up to `max_bs` requests (call once)."""
        if self._graph_indptr is not None:
            raise RuntimeError("init_cuda_graph() was already called")
        pages_per_row = math.ceil(self.page_table.shape[1] / self.page_size)
        self.graph_max_bs = max_bs
        self._graph_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        self._graph_indices = torch.zeros(max_bs * pages_per_row, dtype=torch.int32, device=self.device)
        self._graph_last_page_len = torch.ones(max_bs, dtype=torch.int32, device=self.device)

    def _graph_wrapper(self, bs: int):
        if self._graph_indptr is None:
            raise RuntimeError("init_cuda_graph() must run before capturing")
        if not 1 <= bs <= self.graph_max_bs:
            raise ValueError(f"batch size {bs} is outside the graph buffers (1..{self.graph_max_bs})")
        wrapper = self._graph_wrappers.get(bs)
        if wrapper is None:
            wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, kv_layout="NHD", use_cuda_graph=True,
                use_tensor_cores=self.use_tensor_cores,
                paged_kv_indptr_buffer=self._graph_indptr[: bs + 1],
                paged_kv_indices_buffer=self._graph_indices,
                paged_kv_last_page_len_buffer=self._graph_last_page_len[:bs],
                backend="fa2",
            )
            self._share_int_workspace(wrapper)
            self._graph_wrappers[bs] = wrapper
        return wrapper

    def _check_graph_layout(self, bs: int, layout: BatchLayout) -> None:
        if len(layout.seq_lens_cpu) != bs or list(layout.extend_lens_cpu).count(1) != bs:
            raise ValueError(f"a graph of batch size {bs} needs a padded decode layout of {bs} requests")

    def prepare_for_capture(self, bs: int, layout: BatchLayout) -> None:
        """Plan the bs-wrapper on a dummy (padded) decode layout whose `out_loc` is the graph's
        static out_loc buffer; `forward()` then records that wrapper's kernels into the graph."""
        self._check_graph_layout(bs, layout)
        if self._use_triton_decode(layout):
            return
        wrapper = self._graph_wrapper(bs)
        self._plan_graph(wrapper, layout)
        self._wrapper = wrapper
        self._out_loc = layout.out_loc

    def prepare_for_replay(self, bs: int, layout: BatchLayout) -> None:
        """Re-plan the bs-wrapper for the real (padded) batch; plan() refills the fixed buffers."""
        self._check_graph_layout(bs, layout)
        if self._use_triton_decode(layout):  # nothing to plan: the graph reads its static rows / lengths
            return
        if bs not in self._graph_wrappers:
            raise RuntimeError(f"no graph was captured for batch size {bs}")
        self._plan_graph(self._graph_wrappers[bs], layout)

    def _plan_graph(self, wrapper, layout: BatchLayout) -> None:
        self._before_plan()
        self._plan_decode(wrapper, self._metadata(layout, self._graph_indices), indices_in_place=True)
        self._after_plan()
