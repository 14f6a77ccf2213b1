"""The model-free verifier: which SIDs and SID prefixes belong to real items.

The valid prefixes form a trie; here it is held as tensors (the idea of STATIC, arXiv
2602.22647), so that masking a level of a batched beam search is one gather:

- the nodes of depth l are the distinct valid prefixes of length l (the root is node
  0 of depth 0), numbered in the order of (parent node, code);
- a level whose table fits (nodes x codes <= `dense_limit` entries) is a dense table
  [nodes + 1, C_l] of child node ids (-1: no such child; the last row stands for node
  -1, an invalid prefix) beside the same table as a bool mask of the missing children:
  the mask of a beam is the row of its node, its child the entry of the chosen code;
- a deeper, sparser level keeps each node's children padded to the level's largest
  branching (ELL form) [nodes + 1, max children] of codes and of child ids: the mask is one
  scatter of that row.

Decoders carry each beam's node along the search (decoders.base.ValidPrefixes), so a
level costs a gather for the mask and one for the chosen children, whatever L is. The
nodes of depth L are the real SIDs themselves: `leaf_sids` reads a full SID off its
node, so a search verified at every level need not carry its prefixes.

Full SIDs also live in a Python hash set of mixed-radix integers
(code = sum_l t_l * prod_{j<l} C_j) for single lookups (`is_valid`).
"""

from __future__ import annotations

import functools
import math
import sys

import torch

DENSE_LIMIT = 2**25  # entries of a level's dense table (int32: 128 MiB)


class Verifier:
    def __init__(self, sids: torch.Tensor, codebook_sizes: tuple[int, ...], dense_limit: int = DENSE_LIMIT):
        """sids: [N, L] codes per level of every real item."""
        if math.prod(codebook_sizes) >= 2**62:
            raise ValueError("SID space too large for 64-bit mixed-radix codes")
        self.codebook_sizes = tuple(int(c) for c in codebook_sizes)
        self.levels = len(self.codebook_sizes)
        self.place_values = [math.prod(self.codebook_sizes[:level]) for level in range(self.levels)]
        sids = sids.long().cpu()
        self._on_device: dict[torch.device, list[tuple[torch.Tensor, ...]]] = {}
        self._constants_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._leaves_on: dict[torch.device, torch.Tensor] = {}
        self.dense: list[bool] = []  # per level: a dense table (else padded sibling rows)
        self.levels_built: list[tuple[torch.Tensor, ...]] = []  # per level: (table, missing) dense or (codes, ids) sparse
        self.nodes_per_level: list[int] = []  # nodes of depth l, l = 0 .. L-1
        node = torch.zeros(len(sids), dtype=torch.long)  # every item's prefix node at the current depth
        nodes = 1
        for level, size in enumerate(self.codebook_sizes):
            self.nodes_per_level.append(nodes)
            edge, child = torch.unique(node * size + sids[:, level], return_inverse=True)  # (parent, code) pairs
            ids = torch.arange(len(edge), dtype=torch.int32)
            # one row more than nodes: node -1 (an invalid prefix) indexes it and finds no child
            if (nodes + 1) * size <= dense_limit:
                table = torch.full(((nodes + 1) * size,), -1, dtype=torch.int32).view(nodes + 1, size)
                table.view(-1)[edge] = ids
                self.levels_built.append((table, table < 0))
                self.dense.append(True)
            else:
                parent, code = edge // size, edge % size
                count = torch.bincount(parent, minlength=nodes)
                rank = torch.arange(len(edge)) - (torch.cumsum(count, 0) - count)[parent]  # place among siblings
                width = int(count.max())
                codes = torch.full((nodes + 1, width), size, dtype=torch.long)  # `size`: padding, dropped by the mask
                children = torch.full((nodes + 1, width), -1, dtype=torch.int32)
                codes[parent, rank], children[parent, rank] = code, ids
                self.levels_built.append((codes, children))
                self.dense.append(False)
            node, nodes = child, len(edge)
        self.leaf_sids = torch.full((nodes + 1, self.levels), -1, dtype=torch.long)  # [leaves + 1, L]; row -1: none
        self.leaf_sids[node] = sids
        self.valid_sids = set(self.encode(sids).tolist())

    @property
    def table_bytes(self) -> int:
        """Memory of the trie's tensors."""
        tensors = [t for level in self.levels_built for t in level] + [self.leaf_sids]
        return sum(t.numel() * t.element_size() for t in tensors)

    @functools.cached_property
    def hash_set_bytes(self) -> int:
        """Memory of the Python hash set of full SIDs: its table and its integers."""
        return sys.getsizeof(self.valid_sids) + sum(map(sys.getsizeof, self.valid_sids))

    def encode(self, sids: torch.Tensor) -> torch.Tensor:
        """[..., l] codes of the first l levels -> [...] mixed-radix integers."""
        place = self._constants(sids.device)[1][: sids.shape[-1]]
        return (sids.long() * place).sum(-1)

    def is_valid(self, sid) -> bool:
        """Whether a full SID (sequence of L codes) is a real item: one hash-set lookup."""
        sid = [int(t) for t in sid]
        if len(sid) != self.levels or any(not 0 <= t < size for t, size in zip(sid, self.codebook_sizes)):
            return False
        return sum(t * p for t, p in zip(sid, self.place_values)) in self.valid_sids

    def in_range(self, sids: torch.Tensor) -> torch.Tensor:
        """[..., l] codes -> bool [...]: every code lies inside its level's codebook."""
        sizes = self._constants(sids.device)[0][: sids.shape[-1]]
        return ((sids >= 0) & (sids < sizes)).all(-1)

    def child(self, nodes: torch.Tensor, codes: torch.Tensor, level: int) -> torch.Tensor:
        """nodes [...] of depth `level` (-1: invalid), codes [...] inside the level's
        codebook -> child node ids [...] (-1: no such child). One gather when dense."""
        tables = self._tables(nodes.device)[level]
        if self.dense[level]:
            return tables[0][nodes, codes]
        hit = tables[0][nodes] == codes.unsqueeze(-1)  # [..., width]: at most one sibling matches
        return (tables[1][nodes] + 1).mul(hit).sum(-1, dtype=torch.int32) - 1

    def nodes_of(self, prefixes: torch.Tensor) -> torch.Tensor:
        """[..., l] prefixes (any codes) -> [...] their node ids of depth l (-1: not a valid prefix)."""
        nodes = torch.zeros(prefixes.shape[:-1], dtype=torch.int32, device=prefixes.device)  # the root
        for level in range(prefixes.shape[-1]):
            codes = prefixes[..., level]
            inside = (codes >= 0) & (codes < self.codebook_sizes[level])
            found = self.child(nodes, codes.clamp(0, self.codebook_sizes[level] - 1), level)
            nodes = torch.where(inside, found, -1)
        return nodes

    def child_mask(self, nodes: torch.Tensor, level: int) -> torch.Tensor:
        """nodes [...] of depth `level` (-1: invalid) -> bool [..., C_level]: the codes
        that extend each node's prefix to a valid one."""
        return ~self.missing_children(nodes, level)

    def missing_children(self, nodes: torch.Tensor, level: int) -> torch.Tensor:
        """nodes [...] of depth `level` (-1: invalid) -> bool [..., C_level]: the codes
        that extend no node's prefix to a valid one, what a search masks (one gather, or
        one scatter when the level is sparse)."""
        tables = self._tables(nodes.device)[level]
        if self.dense[level]:
            return tables[1][nodes]
        size = self.codebook_sizes[level]
        rows = tables[0][nodes]  # [..., width] child codes, `size` = padding
        mask = torch.ones(*rows.shape[:-1], size + 1, dtype=torch.bool, device=nodes.device)
        return mask.scatter_(-1, rows, False)[..., :size]

    def sids_of(self, nodes: torch.Tensor) -> torch.Tensor:
        """nodes [...] of depth L (-1: none) -> their SIDs [..., L] (-1 codes for none)."""
        device = nodes.device
        if device not in self._leaves_on:
            self._leaves_on[device] = self.leaf_sids.to(device)
        return self._leaves_on[device][nodes]

    def _tables(self, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        if device not in self._on_device:
            self._on_device[device] = [tuple(t.to(device) for t in level) for level in self.levels_built]
        return self._on_device[device]

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(codebook sizes [L], place values [L]) on `device`, built once per device."""
        if device not in self._constants_on:
            self._constants_on[device] = (
                torch.tensor(self.codebook_sizes, device=device),
                torch.tensor(self.place_values, dtype=torch.long, device=device),
            )
        return self._constants_on[device]
