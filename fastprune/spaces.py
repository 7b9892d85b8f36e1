"""Channel spaces: union-find over tensor dimensions with product and concat structure.

Every traced tensor dimension is an *atom* of a known size.  Ops relate atoms: a residual
add makes two atoms the same space (``union``); a ``view`` that splits 4096 into 32 x 128
defines the atom as the product of two new atoms; a ``split`` of a fused projection
defines it as the concatenation of its pieces.  When two structures meet, they are refined
to a common one.  Where no common structure exists the atoms are *blocked*: never pruned.
"""

from __future__ import annotations

import math

import numpy as np


class Spaces:
    """Atoms with sizes, union-find, definitions (``prod``/``cat``) and flags."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: list[bool] = []
        self.flags: list[set[str]] = []
        self.defn: dict[int, tuple[str, list[int]]] = {}
        self.conflicts: list[str] = []
        self._layouts: dict[int, list] | None = None  # set by freeze(): layouts computed once

    def freeze(self) -> None:
        """No more atoms or relations: from now on each atom's :meth:`layout` is computed once."""
        self._layouts = {}

    def _check_open(self) -> None:
        if self._layouts is not None:
            raise RuntimeError("these spaces are frozen (the trace is over): nothing can be added or related")

    def new(self, size: int, blocked: bool = False) -> int:
        self._check_open()
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.blocked.append(blocked)
        self.flags.append(set())
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def block(self, a: int, why: str | None = None) -> None:
        self._check_open()
        self.blocked[self.find(a)] = True
        if why:
            self.conflicts.append(why)

    def flag(self, a: int, name: str) -> None:
        self.flags[self.find(a)].add(name)

    def union(self, a: int, b: int) -> None:
        self._check_open()
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.block(ra, f"size mismatch {self.size[ra]} vs {self.size[rb]}")
            self.block(rb)
            return
        self.parent[rb] = ra
        self.blocked[ra] = self.blocked[ra] or self.blocked[rb]
        self.flags[ra] |= self.flags[rb]
        da, db = self.defn.pop(ra, None), self.defn.pop(rb, None)
        if da is not None and db is not None:
            self.defn[ra] = da
            self._unify_defs(ra, da, db)
        elif da is not None or db is not None:
            self.defn[ra] = da if da is not None else db

    def define(self, a: int, kind: str, children: list[int]) -> None:
        """State that atom ``a`` is the product or concatenation of ``children``."""
        self._check_open()
        if kind == "prod":
            children = [c for c in children if self.size[self.find(c)] != 1]
        else:
            children = [c for c in children if self.size[self.find(c)] != 0]
        total = (math.prod if kind == "prod" else sum)(self.size[self.find(c)] for c in children)
        ra = self.find(a)
        if total != self.size[ra]:
            self.block(ra, f"{kind} of sizes does not match {self.size[ra]}")
            return
        if len(children) == 1:
            self.union(ra, children[0])
            return
        if not children:
            return
        existing = self.defn.get(ra)
        if existing is None:
            self.defn[ra] = (kind, list(children))
        else:
            self._unify_defs(ra, existing, (kind, list(children)))

    def _sizes(self, atoms: list[int]) -> list[int]:
        return [self.size[self.find(c)] for c in atoms]

    def _unify_defs(self, owner: int, d1: tuple[str, list[int]], d2: tuple[str, list[int]]) -> None:
        (k1, c1), (k2, c2) = d1, d2
        if k1 != k2:
            self._conflict(owner, c1 + c2, f"{k1} vs {k2} structure")
            return
        if self._sizes(c1) == self._sizes(c2):
            for x, y in zip(c1, c2):
                self.union(x, y)
            return
        if k1 == "prod":
            self._unify_products(owner, c1, c2)
        else:
            self._unify_concats(c1, c2)

    def _conflict(self, owner: int, atoms: list[int], why: str) -> None:
        self.block(owner, why)
        for c in atoms:
            self.block(c)

    def _unify_products(self, owner: int, c1: list[int], c2: list[int]) -> None:
        i = j = 0
        while i < len(c1) and j < len(c2):
            seg1, seg2 = [c1[i]], [c2[j]]
            p1, p2 = self.size[self.find(c1[i])], self.size[self.find(c2[j])]
            i, j = i + 1, j + 1
            while p1 != p2:
                if p1 < p2:
                    if i >= len(c1):
                        break
                    seg1.append(c1[i])
                    p1 *= self.size[self.find(c1[i])]
                    i += 1
                else:
                    if j >= len(c2):
                        break
                    seg2.append(c2[j])
                    p2 *= self.size[self.find(c2[j])]
                    j += 1
            if p1 != p2 or (len(seg1) > 1 and len(seg2) > 1):
                self._conflict(owner, seg1 + seg2, "incompatible factorisations")
            elif len(seg1) == 1 and len(seg2) == 1:
                self.union(seg1[0], seg2[0])
            elif len(seg1) == 1:
                self.define(seg1[0], "prod", seg2)
            else:
                self.define(seg2[0], "prod", seg1)

    def _split_at(self, atoms: list[int], cuts: set[int]) -> list[int]:
        """Refine concat pieces so that every offset in ``cuts`` is a piece boundary."""
        out, start = [], 0
        for c in atoms:
            n = self.size[self.find(c)]
            inner = sorted(x - start for x in cuts if start < x < start + n)
            if inner:
                edges = [0, *inner, n]
                subs = [self.new(b - a) for a, b in zip(edges, edges[1:])]
                self.define(c, "cat", subs)
                out.extend(subs)
            else:
                out.append(c)
            start += n
        return out

    def _unify_concats(self, c1: list[int], c2: list[int]) -> None:
        cuts = set(np.cumsum(self._sizes(c1)).tolist()) | set(np.cumsum(self._sizes(c2)).tolist())
        p1, p2 = self._split_at(c1, cuts), self._split_at(c2, cuts)
        for x, y in zip(p1, p2):
            self.union(x, y)

    # ------------------------------------------------------------ layout

    def layout(self, a: int) -> list[tuple[int, np.ndarray, int, bool, bool]]:
        """Leaves of atom ``a``: (leaf root, base indices of element 0, stride, blocked, inner).

        Element ``e`` of a leaf occupies ``base + e * stride`` in ``a``'s index space.  A leaf is
        blocked when it or any atom above it is blocked.  It is *inner* when it sits in a product
        after the first factor that is not wholly blocked (a head's ``head_dim``, or GQA's
        query-per-kv-head repeat): removing one of its indices would cut through every element
        of the leading factor.  The lists returned for frozen spaces are shared: do not modify them.
        """
        r = self.find(a)
        if self._layouts is not None:
            if (known := self._layouts.get(r)) is None:
                known = self._layouts[r] = self._layout(r)
            return known
        return self._layout(r)

    def _layout(self, r: int) -> list[tuple[int, np.ndarray, int, bool, bool]]:
        d = self.defn.get(r)
        blocked_here = self.blocked[r]
        if d is None:
            return [(r, np.zeros(1, dtype=np.int64), 1, blocked_here, False)]
        kind, children = d
        sizes = self._sizes(children)
        out = []
        if kind == "prod":
            parts = [self.layout(c) for c in children]
            lead = next((i for i, part in enumerate(parts) if not all(x[3] for x in part)), len(parts))
            for i, part in enumerate(parts):
                inner = math.prod(sizes[i + 1:])
                outer = math.prod(sizes[:i])
                span = sizes[i] * inner
                for leaf, base, stride, blk, inn in part:
                    new = (base[None, :, None] * inner + np.arange(inner)[None, None, :]
                           + (np.arange(outer) * span)[:, None, None]).reshape(-1)
                    out.append((leaf, np.sort(new), stride * inner, blk or blocked_here, inn or i > lead))
        else:
            offset = 0
            for c, n in zip(children, sizes):
                for leaf, base, stride, blk, inn in self.layout(c):
                    out.append((leaf, base + offset, stride, blk or blocked_here, inn))
                offset += n
        return out

    def descendants(self, a: int) -> set[int]:
        """Every root atom reachable from ``a`` through definitions (``a`` included)."""
        seen, todo = set(), [self.find(a)]
        while todo:
            r = todo.pop()
            if r in seen:
                continue
            seen.add(r)
            d = self.defn.get(r)
            if d is not None:
                todo.extend(self.find(c) for c in d[1])
        return seen
