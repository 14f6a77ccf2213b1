"""The item catalogue: item -> SID, the token layout of the vocabulary, and the verifier.

Vocabulary layout (shared by every backbone and objective):
    0                      PAD
    offsets[l] + t         code t of level l (levels stacked one after another)
    placeholder_tokens[l]  NEZHA's <sp_{l+1}>, one per level
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.errors import BenchError
from decoders.verifier import Verifier

PAD = 0
COLLISION_RULES = ("last_code", "extra_level")
MAX_SIDS = 2**62  # the verifier's mixed-radix codes are 64-bit integers


def level_starts(codebook_sizes) -> tuple[int, ...]:
    """The first vocabulary token of each level's codes (after PAD)."""
    starts = [1]
    for size in codebook_sizes[:-1]:
        starts.append(starts[-1] + size)
    return tuple(starts)


@dataclass
class CatalogTensors:
    """The catalogue's small lookup tensors on one device, built once: a decode never
    turns a Python list into a tensor (no host-to-device copy inside the timed call)."""

    offsets: torch.Tensor  # [L] first vocabulary token of each level
    placeholder_tokens: torch.Tensor  # [L] NEZHA's <sp_1> .. <sp_L>
    sids: torch.Tensor  # [N, L] code per level of every item


@dataclass
class Catalog:
    name: str
    item_ids: list[str]  # external id of each item index
    sids: torch.Tensor  # [N, L] code per level, unique per item
    codebook_sizes: tuple[int, ...]
    collisions: int = 0  # items whose SID was changed to make it unique
    collision_rule: str = "last_code"
    verifier: Verifier = field(init=False, repr=False)

    def __post_init__(self):
        if math.prod(self.codebook_sizes) >= MAX_SIDS:
            raise BenchError(
                f"{self.name}: the SID code space {' x '.join(map(str, self.codebook_sizes))} (codes per level) "
                "is too large for 64-bit SID codes (2**62 at most); use fewer levels or smaller codebooks"
            )
        started = time.perf_counter()
        self.verifier = Verifier(self.sids, self.codebook_sizes)
        self.verifier_build_seconds = time.perf_counter() - started
        codes = self.verifier.encode(self.sids)
        self._sorted_codes, self._item_of_sorted = torch.sort(codes)
        self.offsets = level_starts(self.codebook_sizes)
        codes_end = self.offsets[-1] + self.codebook_sizes[-1]
        self.placeholder_tokens = tuple(range(codes_end, codes_end + self.levels))
        self.vocab_size = codes_end + self.levels
        self._on_device: dict[torch.device, CatalogTensors] = {}

    def on(self, device) -> CatalogTensors:
        """The lookup tensors on `device`, built the first time it is asked for."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = CatalogTensors(
                offsets=torch.tensor(self.offsets, device=device),
                placeholder_tokens=torch.tensor(self.placeholder_tokens, device=device),
                sids=self.sids.to(device),
            )
        return self._on_device[device]

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def code_space(self) -> int:
        """How many SIDs the codebooks can spell (valid or not)."""
        return math.prod(self.codebook_sizes)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def fingerprint(self) -> str:
        """Identifies the SID assignment: a checkpoint is only valid for the same one."""
        digest = hashlib.sha256(str(self.codebook_sizes).encode())
        digest.update(self.sids.numpy().astype("int64").tobytes())
        return digest.hexdigest()[:16]

    def item_tokens(self, items: torch.Tensor) -> torch.Tensor:
        """items: [...] item indices -> [..., L] vocabulary tokens of their SIDs."""
        tensors = self.on(items.device)
        return tensors.sids[items] + tensors.offsets

    def items_of(self, sids: torch.Tensor) -> torch.Tensor:
        """sids: [..., L] generated codes (-1 for no candidate) -> [...] item index, -1 if no real item."""
        in_range = self.verifier.in_range(sids)
        codes = self.verifier.encode(sids.clamp(min=0))
        sorted_codes = self._sorted_codes.to(sids.device)
        idx = torch.searchsorted(sorted_codes, codes).clamp(max=len(sorted_codes) - 1)
        found = (sorted_codes[idx] == codes) & in_range
        return torch.where(found, self._item_of_sorted.to(sids.device)[idx], torch.full_like(idx, -1))

    def describe(self) -> dict:
        used = [int(torch.unique(self.sids[:, level]).numel()) for level in range(self.levels)]
        return {
            "items": self.num_items,
            "levels": self.levels,
            "codebook_sizes": list(self.codebook_sizes),
            "codes_used_per_level": used,
            "collisions_resolved": self.collisions,
            "collision_rule": self.collision_rule,
            "valid_share_of_code_space": self.num_items / float(torch.tensor(self.codebook_sizes).prod()),
            "verifier": {
                "build_seconds": round(self.verifier_build_seconds, 3),
                "trie_bytes": self.verifier.table_bytes,
                "hash_set_bytes": self.verifier.hash_set_bytes,
                "bytes_per_item": round((self.verifier.table_bytes + self.verifier.hash_set_bytes) / self.num_items, 1),
            },
        }


def build_catalog(
    name: str,
    item_ids: list[str],
    codes: list[list[int]] | np.ndarray,
    rule: str = "last_code",
    codebook_sizes: tuple[int, ...] | None = None,
) -> Catalog:
    """Make SIDs unique with `rule` and wrap them in a Catalog.

    last_code:   the first item (in catalogue order) of a group sharing a SID keeps it,
                 each other one takes the smallest last-level code not used under the
                 same prefix; L stays as it is (the NEZHA paper's setting).
    extra_level: TIGER's rule: one more level whose code is the item's rank in its group.
    """
    if rule not in COLLISION_RULES:
        raise BenchError(f"unknown collision rule '{rule}'; choose one of {', '.join(COLLISION_RULES)}")
    sids = torch.as_tensor(np.asarray(codes), dtype=torch.long)  # [N, L]
    sizes = list(codebook_sizes or (sids.max(0).values + 1).tolist())
    if rule == "last_code" and math.prod(sizes) < MAX_SIDS:
        place = torch.tensor([math.prod(sizes[:level]) for level in range(len(sizes))])
        if torch.unique((sids * place).sum(-1)).numel() == len(sids):  # nothing to resolve: no Python loop
            return Catalog(name=name, item_ids=list(item_ids), sids=sids, codebook_sizes=tuple(sizes))
    codes = sids.tolist()
    groups: dict[tuple, list[int]] = defaultdict(list)
    for item, sid in enumerate(codes):
        groups[tuple(sid)].append(item)
    resolved = [list(sid) for sid in codes]
    changed = 0
    if rule == "extra_level":
        for members in groups.values():
            for rank, item in enumerate(members):
                resolved[item].append(rank)
        sizes.append(max(len(m) for m in groups.values()))
        changed = sum(len(m) - 1 for m in groups.values())
    else:
        used_last: dict[tuple, set[int]] = defaultdict(set)
        for sid in codes:
            used_last[tuple(sid[:-1])].add(sid[-1])
        for sid, members in groups.items():
            for item in members[1:]:
                taken = used_last[sid[:-1]]
                free = next((c for c in range(sizes[-1]) if c not in taken), None)
                if free is None:
                    raise BenchError(
                        f"{name}: SID {list(sid)} is shared by {len(members)} items and its prefix has no free "
                        "last-level code; use the collision rule 'extra_level'"
                    )
                taken.add(free)
                resolved[item][-1] = free
                changed += 1
    return Catalog(
        name=name,
        item_ids=list(item_ids),
        sids=torch.tensor(resolved, dtype=torch.long),
        codebook_sizes=tuple(sizes),
        collisions=changed,
        collision_rule=rule,
    )
