"""Radix tree over token ids at page granularity: the prefix cache.

Every node holds a run of whole pages (its key is a multiple of `page_size` tokens). A node
with `lock_ref > 0` is in use by a running request and is never evicted; the others are
cached and evicted least-recently-used leaf first.

A `namespace` (a LoRA adapter's name) keeps its own subtree under the root: the same tokens under
two namespaces never share pages; eviction is one LRU over all of them.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class RadixNode:
    key: tuple[int, ...] = ()
    pages: list[int] = field(default_factory=list)
    parent: "RadixNode | None" = None
    children: dict[tuple[int, ...], "RadixNode"] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass
class MatchResult:
    node: RadixNode  # deepest matched node (the root when nothing matched)
    pages: list[int]
    num_tokens: int


class RadixTree:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.root = RadixNode()
        self.root.lock_ref = 1  # the root is never evicted
        self._clock = itertools.count(1)
        self.cached_pages = 0  # in the tree, unlocked: evictable
        self.locked_pages = 0  # in the tree, locked by running requests

    # ------------------------------------------------------------ lookup and insert

    def namespace_root(self, namespace: str | None) -> RadixNode:
        """The node under which `namespace`'s prefixes live (the root itself for None); made on
        first use, locked for good, with no pages: never evicted, never counted."""
        if namespace is None:
            return self.root
        key = ("namespace", namespace)
        node = self.root.children.get(key)
        if node is None:
            node = self.root.children[key] = RadixNode(parent=self.root, lock_ref=1)
        return node

    def match_prefix(self, tokens: list[int], namespace: str | None = None) -> MatchResult:
        node, pages, pos = self.namespace_root(namespace), [], 0
        tick = next(self._clock)
        while pos + self.page_size <= len(tokens):
            child = node.children.get(self._page_key(tokens, pos))
            if child is None:
                break
            shared = self._shared_pages(child.key, tokens, pos)
            if shared < len(child.pages):
                child = self._split(child, shared)
            child.last_access = tick
            pages.extend(child.pages)
            pos += len(child.key)
            node = child
        return MatchResult(node, pages, pos)

    def insert(self, tokens: list[int], pages: list[int], namespace: str | None = None) -> int:
        """Insert page-aligned `tokens` backed by `pages`; returns how many leading pages were
        already in the tree (the caller's copies of those are duplicates to free)."""
        assert len(tokens) == len(pages) * self.page_size
        match = self.match_prefix(tokens, namespace)
        existing = len(match.pages)
        if existing < len(pages):
            pos = match.num_tokens
            node = RadixNode(key=tuple(tokens[pos:]), pages=list(pages[existing:]), parent=match.node,
                             last_access=next(self._clock))
            match.node.children[self._page_key(tokens, pos)] = node
            self._count(node, +1)
        return existing

    # ------------------------------------------------------------ locking and eviction

    def lock(self, node: RadixNode) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self.cached_pages -= len(node.pages)
                self.locked_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node is not None and node is not self.root:
            assert node.lock_ref > 0, "unlock of an unlocked radix node"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.locked_pages -= len(node.pages)
                self.cached_pages += len(node.pages)
            node = node.parent

    def evict(self, num_pages: int, under: RadixNode | None = None) -> list[int]:
        """Remove unlocked leaves (of the subtree `under`, default all), least recently used
        first, until `num_pages` are freed."""
        heap = [(n.last_access, id(n), n) for n in self._evictable_leaves(under or self.root)]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_pages:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[self._page_key(list(node.key), 0)]
            freed.extend(node.pages)
            self.cached_pages -= len(node.pages)
            if parent is not self.root and parent.is_leaf and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def drop_namespace(self, namespace: str) -> list[int]:
        """Evict every unlocked page of `namespace` (its adapter was unloaded); the namespace goes
        once nothing of it is left."""
        node = self.root.children.get(("namespace", namespace))
        if node is None:
            return []
        freed = self.evict(self.cached_pages, under=node)
        if node.is_leaf and node.lock_ref == 1:
            del self.root.children[("namespace", namespace)]
        return freed

    def find_namespace(self, namespace: str | None) -> RadixNode | None:
        """`namespace_root` without making it (None when nothing was cached under it)."""
        return self.root if namespace is None else self.root.children.get(("namespace", namespace))

    @property
    def total_pages(self) -> int:
        return self.cached_pages + self.locked_pages

    def all_pages(self) -> list[int]:
        """Every page the tree holds (a walk of the whole tree: for checks, not hot paths)."""
        pages, stack = [], [self.root]
        while stack:
            node = stack.pop()
            pages.extend(node.pages)
            stack.extend(node.children.values())
        return pages

    # ------------------------------------------------------------ internals

    def _page_key(self, tokens: list[int] | tuple[int, ...], pos: int) -> tuple[int, ...]:
        return tuple(tokens[pos:pos + self.page_size])

    def _shared_pages(self, key: tuple[int, ...], tokens: list[int], pos: int) -> int:
        ps, shared = self.page_size, 0
        while shared < len(key) // ps and pos + (shared + 1) * ps <= len(tokens):
            lo = shared * ps
            if key[lo:lo + ps] != tuple(tokens[pos + lo:pos + lo + ps]):
                break
            shared += 1
        return shared

    def _split(self, node: RadixNode, num_pages: int) -> RadixNode:
        """Cut `node` after `num_pages` pages; returns the new upper part."""
        cut = num_pages * self.page_size
        upper = RadixNode(key=node.key[:cut], pages=node.pages[:num_pages], parent=node.parent,
                          lock_ref=node.lock_ref, last_access=node.last_access)
        upper.parent.children[self._page_key(node.key, 0)] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[num_pages:], upper
        upper.children[self._page_key(node.key, 0)] = node
        return upper

    def _count(self, node: RadixNode, sign: int) -> None:
        if node.lock_ref:
            self.locked_pages += sign * len(node.pages)
        else:
            self.cached_pages += sign * len(node.pages)

    def _evictable_leaves(self, top: RadixNode) -> list[RadixNode]:
        leaves, stack = [], [top]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not top and node.is_leaf and node.lock_ref == 0:
                leaves.append(node)
        return leaves
