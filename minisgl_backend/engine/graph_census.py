"""What a captured CUDA graph holds: its nodes by type, its edges by type, and whether it is a
straight line.

The host cost of `cudaGraphLaunch` is the largest item of a decode step's host time. Since CUDA
12.6 a graph that is a straight line of kernel nodes launches in constant time; a memcpy or
memset node, a fork or a programmatic (PDL) edge may put a graph back on the per-node path. This
census says which of those a graph has, read through the CUDA driver API (libcuda) from the graph
template that `torch.cuda.CUDAGraph(keep_graph=True)` keeps (`raw_cuda_graph()`).
"""

from __future__ import annotations

import ctypes
from collections import Counter
from typing import Any, Protocol

# CUgraphNodeType
NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "child_graph", 5: "empty", 6: "wait_event",
              7: "event_record", 8: "ext_semaphores_signal", 9: "ext_semaphores_wait", 10: "mem_alloc",
              11: "mem_free", 12: "batch_mem_op", 13: "conditional"}
# CUgraphDependencyType (the `type` byte of CUgraphEdgeData)
EDGE_TYPES = {0: "default", 1: "programmatic", -1: "unknown"}
_EDGE_DATA_BYTES = 8  # CUgraphEdgeData: from_port, to_port, type, 5 reserved bytes


class GraphDriver(Protocol):
    def nodes(self, graph: int) -> list[int]: ...
    def node_type(self, node: int) -> int: ...
    def edges(self, graph: int) -> list[tuple[int, int, int]]: ...  # (from, to, edge type)


class CudaDriver:
    """The three graph queries, from libcuda.so.1."""

    def __init__(self, library: str = "libcuda.so.1") -> None:
        lib = ctypes.CDLL(library)
        p, size_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)
        self._get_nodes = lib.cuGraphGetNodes
        self._get_nodes.argtypes, self._get_nodes.restype = [p, p, size_p], ctypes.c_int
        self._get_type = lib.cuGraphNodeGetType
        self._get_type.argtypes, self._get_type.restype = [p, ctypes.POINTER(ctypes.c_int)], ctypes.c_int
        # the _v2 query (CUDA 12.3+) returns each edge's type; the older one does not (and fails
        # on an edge with data, such as a PDL edge)
        self._edge_types = hasattr(lib, "cuGraphGetEdges_v2")
        self._get_edges = lib.cuGraphGetEdges_v2 if self._edge_types else lib.cuGraphGetEdges
        self._get_edges.argtypes = [p, p, p, p, size_p] if self._edge_types else [p, p, p, size_p]
        self._get_edges.restype = ctypes.c_int

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with CUresult {status}")

    def nodes(self, graph: int) -> list[int]:
        count = ctypes.c_size_t(0)
        self._check(self._get_nodes(graph, None, ctypes.byref(count)), "cuGraphGetNodes")
        out = (ctypes.c_void_p * count.value)()
        self._check(self._get_nodes(graph, out, ctypes.byref(count)), "cuGraphGetNodes")
        return [int(n or 0) for n in out[:count.value]]

    def node_type(self, node: int) -> int:
        kind = ctypes.c_int(-1)
        self._check(self._get_type(node, ctypes.byref(kind)), "cuGraphNodeGetType")
        return kind.value

    def edges(self, graph: int) -> list[tuple[int, int, int]]:
        """(from, to, type) of every edge; the type is -1 where the driver cannot say."""
        count = ctypes.c_size_t(0)
        data_arg = (None,) if self._edge_types else ()
        self._check(self._get_edges(graph, None, None, *data_arg, ctypes.byref(count)), "cuGraphGetEdges")
        n = count.value
        src, dst = (ctypes.c_void_p * n)(), (ctypes.c_void_p * n)()
        data = (ctypes.c_uint8 * (_EDGE_DATA_BYTES * max(n, 1)))()
        data_arg = (data,) if self._edge_types else ()
        self._check(self._get_edges(graph, src, dst, *data_arg, ctypes.byref(count)), "cuGraphGetEdges")
        kind = (lambda i: data[i * _EDGE_DATA_BYTES + 2]) if self._edge_types else (lambda i: -1)  # noqa: E731
        return [(int(src[i] or 0), int(dst[i] or 0), kind(i)) for i in range(count.value)]


def census(graph: int, driver: GraphDriver) -> dict[str, Any]:
    """Nodes by type, edges by type, and the shape: `straight_line` when the nodes form one chain
    (each at most one dependency and one dependent, nodes - 1 edges)."""
    nodes = driver.nodes(graph)
    edges = driver.edges(graph)
    into, out_of = Counter(dst for _, dst, _ in edges), Counter(src for src, _, _ in edges)
    node_types = Counter(NODE_TYPES.get(driver.node_type(n), "unknown") for n in nodes)
    edge_types = Counter(EDGE_TYPES.get(kind, f"type_{kind}") for _, _, kind in edges)
    straight = (len(edges) == max(len(nodes) - 1, 0) and max(into.values(), default=0) <= 1
                and max(out_of.values(), default=0) <= 1)
    return {"nodes": len(nodes), "node_types": dict(node_types.most_common()), "edges": len(edges),
            "edge_types": dict(edge_types.most_common()), "max_dependencies": max(into.values(), default=0),
            "max_dependents": max(out_of.values(), default=0), "straight_line": straight}


def census_of(graph: Any, driver: GraphDriver | None = None) -> dict[str, Any]:
    """`census` of a `torch.cuda.CUDAGraph` captured with keep_graph=True, or {"error": why}."""
    try:
        handle = graph.raw_cuda_graph()
        return census(handle, driver if driver is not None else CudaDriver())
    except Exception as exc:  # a diagnostic: never fails what asked for it
        return {"error": f"{type(exc).__name__}: {exc}"}


def new_graph() -> Any:
    """A `torch.cuda.CUDAGraph` that keeps its template for `census_of` where this torch can (2.8+);
    call `instantiate_kept` after its capture."""
    import torch

    try:
        graph = torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:
        return torch.cuda.CUDAGraph()
    graph.kept_template = True
    return graph


def instantiate_kept(graph: Any) -> None:
    """A graph that kept its template is instantiated here, at capture time, not lazily by its
    first replay (a serving step)."""
    if getattr(graph, "kept_template", False) and hasattr(graph, "instantiate"):
        graph.instantiate()  # (a torch without it instantiates at the first replay)
