"""Property tests of the radix prefix cache and its page accounting."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisgl_backend.batch import Req
from minisgl_backend.sampling_params import SamplingParams
from minisgl_backend.scheduler.cache import CacheManager
from minisgl_backend.scheduler.radix import RadixTree

PAGE = 2
NUM_PAGES = 24


def _new_req(rid: int, tokens: list[int]) -> Req:
    return Req(rid, tokens, SamplingParams(max_tokens=1), seed=0, max_output_tokens=1, row=rid % 8)


def _check_accounting(cache: CacheManager, running: dict[int, Req]) -> None:
    s = cache.stats()
    assert s.free_pages + s.cached_pages + s.locked_pages + s.private_pages == s.total_pages
    held = [p for r in running.values() for p in r.pages[r.matched_len // PAGE:]]
    assert s.private_pages == len(held)
    free = cache._free
    assert len(set(free)) == len(free), "a page is on the free list twice"
    tree_pages = cache.tree.all_pages()
    assert not set(free) & set(tree_pages), "a page is both free and in the tree"
    assert not set(free) & set(held), "a page is both free and held by a request"
    assert len(set(tree_pages)) == len(tree_pages) == cache.tree.total_pages
    assert cache.integrity_problems(idle=not running) == []


ops = st.lists(st.tuples(st.sampled_from(["admit", "finish", "flush"]),
                         st.lists(st.integers(0, 2), min_size=1, max_size=14)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_page_accounting_survives_any_sequence(operations):
    table = torch.zeros(9, 64, dtype=torch.int32)
    cache = CacheManager(NUM_PAGES, PAGE, table)
    running: dict[int, Req] = {}
    for rid, (op, tokens) in enumerate(operations):
        if op == "admit" and len(running) < 8:
            req = _new_req(rid, tokens)
            cache.match_and_lock(req, tokens)
            assert not set(req.pages) & set(cache._free), "a match returned an evicted page"
            assert cache.tree.match_prefix(tokens[:-1]).num_tokens == req.matched_len
            need = cache.pages_for(len(tokens)) - req.num_pages
            if need <= cache.available_pages:
                cache.allocate(req, len(tokens))
                req.cached_len = len(tokens)
                running[rid] = req
            else:
                cache.release(req, [])
        elif op == "finish" and running:
            req = running.pop(min(running))
            cache.release(req, req.input_ids[:req.cached_len])
        elif op == "flush":
            cache.flush()
        _check_accounting(cache, running)
    for req in list(running.values()):
        cache.release(req, req.input_ids)
    running.clear()
    _check_accounting(cache, running)
    assert cache.tree.locked_pages == 0
    cache.flush()
    assert cache.free_pages == NUM_PAGES


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=16), min_size=1, max_size=12))
def test_match_returns_what_was_inserted(sequences):
    tree = RadixTree(PAGE)
    next_page = 0
    stored: dict[tuple[int, ...], list[int]] = {}
    for seq in sequences:
        aligned = seq[:len(seq) // PAGE * PAGE]
        match = tree.match_prefix(aligned)
        pages = match.pages + list(range(next_page, next_page + len(aligned) // PAGE - len(match.pages)))
        next_page += len(aligned) // PAGE - len(match.pages)
        assert tree.insert(aligned, pages) == len(match.pages)
        for i in range(1, len(aligned) // PAGE + 1):
            stored[tuple(aligned[:i * PAGE])] = pages[:i]
    for prefix, pages in stored.items():
        match = tree.match_prefix(list(prefix))
        assert match.num_tokens == len(prefix) and match.pages == pages


def test_lru_eviction_spares_locked_and_recent():
    tree = RadixTree(PAGE)
    tree.insert([1, 1, 2, 2], [0, 1])
    tree.insert([1, 1, 3, 3], [2, 3])
    tree.insert([4, 4], [4])
    locked = tree.match_prefix([1, 1, 2, 2])
    tree.lock(locked.node)
    tree.match_prefix([4, 4])  # touch: [1,1,3,3] is now the least recently used leaf
    assert tree.evict(1) == [3]
    assert sorted(tree.evict(10)) == [4]  # the rest is locked
    tree.unlock(locked.node)
    assert sorted(tree.evict(10)) == [0, 1]
    assert tree.total_pages == 0


def test_integrity_check_catches_double_free_and_shared_pages():
    table = torch.zeros(9, 64, dtype=torch.int32)
    cache = CacheManager(8, PAGE, table)
    req = _new_req(0, [1, 2, 3, 4, 5])
    cache.match_and_lock(req, req.input_ids)
    cache.allocate(req, 5)
    cache.release(req, req.input_ids[:4])
    assert cache.integrity_problems(idle=True) == []
    cache._free.append(cache._free[0])
    assert "a page is on the free list twice" in cache.integrity_problems(idle=True)
    cache._free.pop()
    cache._free.append(cache.tree.all_pages()[0])
    assert "a page is both free and in the radix tree" in cache.integrity_problems(idle=True)
    cache._free.pop()
    cache._free.pop()
    assert "with nothing running, some page is neither free nor cached" in cache.integrity_problems(idle=True)
    cache._free.append(cache.num_pages)  # an id past the pool's last page
    assert "a page id is outside the pool" in cache.integrity_problems(idle=False)


def test_namespaces_never_share_pages_and_evict_as_one_lru():
    tree = RadixTree(2)
    tokens = [1, 2, 3, 4]
    assert tree.insert(tokens, [10, 11]) == 0
    assert tree.insert(tokens, [20, 21], namespace="a") == 0, "the same tokens under an adapter are new"
    assert tree.match_prefix(tokens).pages == [10, 11]
    assert tree.match_prefix(tokens, namespace="a").pages == [20, 21]
    assert tree.match_prefix(tokens, namespace="b").pages == []
    assert tree.total_pages == 4 and sorted(tree.all_pages()) == [10, 11, 20, 21]
    match = tree.match_prefix(tokens, namespace="a")
    tree.lock(match.node)
    assert sorted(tree.evict(4)) == [10, 11], "a locked adapter prefix stays"
    tree.unlock(match.node)
    assert sorted(tree.evict(4)) == [20, 21] and tree.total_pages == 0
    assert tree.match_prefix(tokens, namespace="a").pages == []
