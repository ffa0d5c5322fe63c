"""The CUDA graph census (engine/graph_census.py) on a stand-in driver: node and edge types, and
the straight-line test that decides whether a graph can launch in constant time. The real driver
queries run in the `gpu` tests."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from minisgl_backend.engine.graph_census import CudaDriver, census, census_of, instantiate_kept

KERNEL, MEMCPY, MEMSET = 0, 1, 2


class FakeDriver:
    def __init__(self, types: list[int], edges: list[tuple[int, int, int]]) -> None:
        self.types = {100 + i: t for i, t in enumerate(types)}
        self._edges = [(100 + a, 100 + b, kind) for a, b, kind in edges]

    def nodes(self, graph):
        assert graph == 7
        return list(self.types)

    def node_type(self, node):
        return self.types[node]

    def edges(self, graph):
        return self._edges


def chain(n: int, kind: int = 0) -> list[tuple[int, int, int]]:
    return [(i, i + 1, kind) for i in range(n - 1)]


def test_a_chain_of_kernels_is_a_straight_line():
    got = census(7, FakeDriver([KERNEL] * 5, chain(5)))
    assert got == {"nodes": 5, "node_types": {"kernel": 5}, "edges": 4, "edge_types": {"default": 4},
                   "max_dependencies": 1, "max_dependents": 1, "straight_line": True}


def test_a_memcpy_node_is_counted_and_a_chain_with_it_is_still_a_line():
    got = census(7, FakeDriver([KERNEL, KERNEL, MEMCPY, KERNEL], chain(4)))
    assert got["node_types"] == {"kernel": 3, "memcpy": 1} and got["straight_line"]


@pytest.mark.parametrize("edges,why", [
    ([(0, 1, 0), (0, 2, 0), (1, 3, 0), (2, 3, 0)], "a fork and a join"),
    ([(0, 1, 0), (2, 3, 0)], "two chains"),
])
def test_forks_and_separate_chains_are_not_a_straight_line(edges, why):
    got = census(7, FakeDriver([KERNEL] * 4, edges))
    assert not got["straight_line"], why


def test_programmatic_edges_are_reported():
    got = census(7, FakeDriver([KERNEL] * 3, [(0, 1, 1), (1, 2, 0)]))
    assert got["edge_types"] == {"programmatic": 1, "default": 1} and got["straight_line"]


def test_census_of_a_graph_without_its_template_is_an_error_entry_not_an_exception():
    class NoTemplate:
        def raw_cuda_graph(self):
            raise RuntimeError("keep_graph must be True")

    assert census_of(NoTemplate(), FakeDriver([], [])) == {"error": "RuntimeError: keep_graph must be True"}
    assert census_of(type("G", (), {"raw_cuda_graph": lambda self: 7})(), FakeDriver([KERNEL], [])) == {
        "nodes": 1, "node_types": {"kernel": 1}, "edges": 0, "edge_types": {}, "max_dependencies": 0,
        "max_dependents": 0, "straight_line": True}


def test_only_a_graph_that_kept_its_template_is_instantiated_at_capture():
    class Graph:
        def __init__(self, kept):
            self.instantiated = 0
            if kept:
                self.kept_template = True

        def instantiate(self):
            self.instantiated += 1

    kept, plain = Graph(True), Graph(False)
    instantiate_kept(kept)
    instantiate_kept(plain)
    assert (kept.instantiated, plain.instantiated) == (1, 0)


FAKE_LIBCUDA = r"""
#include <stddef.h>
#include <stdint.h>
/* three nodes, 11 (kernel) -> 12 (memcpy) -> 13 (kernel): a programmatic edge, then a default one */
int cuGraphGetNodes(void *graph, void **out, size_t *count) {
    if (graph != (void *)5) return 400;
    if (out) { out[0] = (void *)11; out[1] = (void *)12; out[2] = (void *)13; }
    *count = 3;
    return 0;
}
int cuGraphNodeGetType(void *node, int *kind) { *kind = node == (void *)12 ? 1 : 0; return 0; }
int cuGraphGetEdges_v2(void *graph, void **from, void **to, uint8_t *data, size_t *count) {
    if (from) {
        from[0] = (void *)11; to[0] = (void *)12;
        from[1] = (void *)12; to[1] = (void *)13;
        for (int i = 0; i < 16; ++i) data[i] = 0;
        data[2] = 1; /* edge 0's type byte; edge 1's is data[8 + 2] */
        data[8] = 7; data[9] = 7; /* edge 1's ports: nonzero, so a wrong stride reads them as the type */
    }
    *count = 2;
    return 0;
}
"""


LEGACY_EDGES = r"""
int cuGraphGetEdges(void *graph, void **from, void **to, size_t *count) {
    if (from) { from[0] = (void *)11; to[0] = (void *)12; from[1] = (void *)12; to[1] = (void *)13; }
    *count = 2;
    return 0;
}
"""


def _build(tmp_path, source: str) -> str:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    (tmp_path / "fake.c").write_text(source)
    subprocess.run([compiler, "-shared", "-fPIC", str(tmp_path / "fake.c"), "-o", str(tmp_path / "libfake.so")],
                   check=True)
    return str(tmp_path / "libfake.so")


def test_the_driver_queries_through_ctypes(tmp_path):
    """CudaDriver against a stand-in libcuda built here: the two-call protocol (count, then fill)
    and the edge type read from the third byte of each 8-byte CUgraphEdgeData."""
    driver = CudaDriver(_build(tmp_path, FAKE_LIBCUDA))
    assert census(5, driver) == {"nodes": 3, "node_types": {"kernel": 2, "memcpy": 1}, "edges": 2,
                                 "edge_types": {"programmatic": 1, "default": 1}, "max_dependencies": 1,
                                 "max_dependents": 1, "straight_line": True}
    assert [kind for _, _, kind in driver.edges(5)] == [1, 0], "each edge's type at offset 2 of its 8 bytes"
    with pytest.raises(RuntimeError, match="cuGraphGetNodes failed with CUresult 400"):
        driver.nodes(6)


def test_a_driver_without_the_v2_edge_query_reports_edges_of_unknown_type(tmp_path):
    legacy = FAKE_LIBCUDA[:FAKE_LIBCUDA.index("int cuGraphGetEdges_v2")] + LEGACY_EDGES
    got = census(5, CudaDriver(_build(tmp_path, legacy)))
    assert got["edges"] == 2 and got["edge_types"] == {"unknown": 2} and got["straight_line"]
