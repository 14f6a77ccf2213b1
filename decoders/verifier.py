"""The model-free verifier: which SIDs and SID prefixes belong to real items.

The valid prefixes form a trie; here it is held as tensors (the idea of STATIC, arXiv
2602.22647), so that masking a level of a batched beam search is one gather:

- the nodes of depth l are the distinct valid prefixes of length l (the root is node
  0 of depth 0), numbered in the order of (parent node, code);
- a level whose table fits (nodes x codes <= `dense_limit` entries) is a dense table
  [nodes, C_l] of child node ids (-1: no such child): the mask of a beam is the row of
  its node, its child the entry of the chosen code;
- a deeper, sparser level keeps each node's children padded to the level's largest
  branching (ELL form) [nodes, max children] of codes and of child ids: the mask is one
  scatter of that row.

Full SIDs also live in a Python hash set of mixed-radix integers
(code = sum_l t_l * prod_{j<l} C_j) for single lookups (`is_valid`).
"""

from __future__ import annotations

import math

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
        self.levels_built: list[tuple[torch.Tensor, ...]] = []  # per level: (table,) dense or (codes, ids) sparse
        self.nodes_per_level: list[int] = []  # nodes of depth l, l = 0 .. L-1
        node = torch.zeros(len(sids), dtype=torch.long)  # every item's prefix node at the current depth
        nodes = 1
        for level, size in enumerate(self.codebook_sizes):
            self.nodes_per_level.append(nodes)
            edge, child = torch.unique(node * size + sids[:, level], return_inverse=True)  # (parent, code) pairs
            ids = torch.arange(len(edge), dtype=torch.int32)
            if nodes * size <= dense_limit:
                table = torch.full((nodes * size,), -1, dtype=torch.int32)
                table[edge] = ids
                self.levels_built.append((table.view(nodes, size),))
            else:
                parent, code = edge // size, edge % size
                count = torch.bincount(parent, minlength=nodes)
                rank = torch.arange(len(edge)) - (torch.cumsum(count, 0) - count)[parent]  # place among siblings
                width = int(count.max())
                codes = torch.full((nodes, width), size, dtype=torch.long)  # `size`: padding, dropped by the mask
                children = torch.full((nodes, width), -1, dtype=torch.int32)
                codes[parent, rank], children[parent, rank] = code, ids
                self.levels_built.append((codes, children))
            node, nodes = child, len(edge)
        self.valid_sids = set(self.encode(sids).tolist())

    @property
    def table_bytes(self) -> int:
        """Memory of the trie's tensors."""
        return sum(t.numel() * t.element_size() for level in self.levels_built for t in level)

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
        """nodes [M] of depth `level` (-1: invalid), codes [M] -> child node ids [M] (-1: no such child)."""
        tables = self._tables(nodes.device)[level]
        known = (nodes >= 0) & (codes >= 0) & (codes < self.codebook_sizes[level])
        row, code = nodes.clamp(min=0), codes.clamp(0, self.codebook_sizes[level] - 1)
        if len(tables) == 1:
            found = tables[0][row, code].long()
        else:
            siblings = tables[0][row]  # [M, width]
            hit = siblings == code.unsqueeze(-1)
            found = tables[1][row].gather(1, hit.int().argmax(1, keepdim=True)).squeeze(1).long()
            found = found.masked_fill(~hit.any(1), -1)
        return found.masked_fill(~known, -1)

    def nodes_of(self, prefixes: torch.Tensor) -> torch.Tensor:
        """[..., l] prefixes -> [...] their node ids of depth l (-1: not a valid prefix)."""
        shape = prefixes.shape[:-1]
        flat = prefixes.reshape(shape.numel(), prefixes.shape[-1])
        nodes = torch.zeros(shape.numel(), dtype=torch.long, device=prefixes.device)  # the root
        for level in range(flat.shape[1]):
            nodes = self.child(nodes, flat[:, level], level)
        return nodes.view(shape)

    def child_mask(self, nodes: torch.Tensor, level: int) -> torch.Tensor:
        """nodes [M] of depth `level` (-1: invalid) -> bool [M, C_level]: the codes that
        extend each node's prefix to a valid one (one gather, or one scatter when sparse)."""
        tables = self._tables(nodes.device)[level]
        row = nodes.clamp(min=0)
        if len(tables) == 1:
            mask = tables[0][row] >= 0
        else:
            size = self.codebook_sizes[level]
            mask = torch.zeros(len(nodes), size + 1, dtype=torch.bool, device=nodes.device)
            mask = mask.scatter_(1, tables[0][row], True)[:, :size]
        return mask & (nodes >= 0).unsqueeze(-1)

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
