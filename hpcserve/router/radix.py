"""A compressed radix tree over recent prompts, shared by all workers, each node tagged with the workers
("tenants") that recently served a prompt passing through it. Used by the cache_aware policy.

Edges hold whole substrings, so a lookup costs one C-level ``startswith`` per branching point, not one
Python step per character. Memory is bounded: past ``max_chars`` the least recently used leaves go.
"""

from __future__ import annotations

import heapq
from typing import Container


class _Node:
    __slots__ = ("edge", "children", "tenants", "parent")

    def __init__(self, edge: str, parent: "_Node | None") -> None:
        self.edge = edge
        self.children: dict[str, _Node] = {}
        self.tenants: dict[str, int] = {}  # tenant -> logical time of last use
        self.parent = parent


def _common_len(edge: str, text: str, pos: int) -> int:
    """Length of the common prefix of ``edge`` and ``text[pos:]`` by binary search on C compares."""
    lo, hi = 0, min(len(edge), len(text) - pos)
    if text.startswith(edge[:hi], pos):
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], pos):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    def __init__(self, max_chars: int = 8_000_000) -> None:
        self.root = _Node("", None)
        self.max_chars = max_chars
        self.total_chars = 0
        self.sizes: dict[str, int] = {}  # chars per tenant: a proxy for how much cache it holds
        self._clock = 0

    def match(self, text: str, allowed: Container[str]) -> tuple[int, str | None]:
        """Longest prefix of ``text`` held by an allowed tenant: (matched chars, tenant) or (0, None)."""
        node = self.root
        pos = 0
        n = len(text)
        path: list[tuple[_Node, int]] = []
        while pos < n:
            child = node.children.get(text[pos])
            if child is None:
                break
            edge = child.edge
            if text.startswith(edge, pos):
                pos += len(edge)
                path.append((child, pos))
                node = child
                continue
            path.append((child, pos + _common_len(edge, text, pos)))
            break
        for node, matched in reversed(path):  # tenants shrink going down: take the deepest usable node
            best, best_t = None, -1
            for tenant, t in node.tenants.items():
                if t > best_t and tenant in allowed:
                    best, best_t = tenant, t
            if best is not None:
                return matched, best
        return 0, None

    def insert(self, text: str, tenant: str) -> None:
        self._clock += 1
        now = self._clock
        sizes = self.sizes
        if tenant not in sizes:
            sizes[tenant] = 0
        node = self.root
        pos = 0
        n = len(text)
        while pos < n:
            key = text[pos]
            child = node.children.get(key)
            if child is None:
                leaf = _Node(text[pos:], node)
                leaf.tenants[tenant] = now
                node.children[key] = leaf
                sizes[tenant] += n - pos
                self.total_chars += n - pos
                break
            edge = child.edge
            if not text.startswith(edge, pos):
                cut = _common_len(edge, text, pos)
                mid = _Node(edge[:cut], node)
                mid.tenants = dict(child.tenants)
                node.children[key] = mid
                child.edge = edge[cut:]
                child.parent = mid
                mid.children[child.edge[0]] = child
                child, edge = mid, mid.edge
            tenants = child.tenants
            if tenant not in tenants:
                sizes[tenant] += len(edge)
            tenants[tenant] = now
            pos += len(edge)
            node = child
        if self.total_chars > self.max_chars:
            self.evict(int(self.max_chars * 0.9))

    def _remove_leaf(self, node: _Node) -> None:
        for tenant in node.tenants:
            self.sizes[tenant] -= len(node.edge)
        self.total_chars -= len(node.edge)
        parent = node.parent
        del parent.children[node.edge[0]]

    def evict(self, target_chars: int) -> None:
        """Drop least recently used leaves until the tree holds at most ``target_chars``."""
        heap: list[tuple[int, int, _Node]] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                heap.append((max(node.tenants.values(), default=0), id(node), node))
        heapq.heapify(heap)
        while heap and self.total_chars > target_chars:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._remove_leaf(node)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (max(parent.tenants.values(), default=0), id(parent), parent))

    def remove_tenant(self, tenant: str) -> None:
        """Forget a worker everywhere (it left); nodes nobody holds any more are pruned."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            for child in list(node.children.values()):
                if child.tenants.pop(tenant, None) is not None and not child.tenants:
                    self._drop_subtree(child)
                else:
                    stack.append(child)
        self.sizes.pop(tenant, None)

    def _drop_subtree(self, node: _Node) -> None:
        stack = [node]
        while stack:
            cur = stack.pop()
            stack.extend(cur.children.values())
            self.total_chars -= len(cur.edge)
            for t in cur.tenants:
                if t in self.sizes:
                    self.sizes[t] -= len(cur.edge)
        del node.parent.children[node.edge[0]]
