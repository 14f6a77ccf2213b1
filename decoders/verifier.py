"""The model-free verifier: which SIDs and SID prefixes belong to real items.

Each SID (t_1 .. t_L) is encoded as one integer in mixed radix,
code = sum_l t_l * prod_{j<l} C_j, so a prefix of length l has the same code as any
full SID that starts with it padded by zeros, and the children of a prefix are
``prefix_code + t * place_value[l]``. Full SIDs live in a Python hash set
(``is_valid``); for batched decoding the valid prefix codes of each length are kept
as sorted tensors and looked up with ``searchsorted`` (the tensor form of a set).
"""

from __future__ import annotations

import math

import torch


class Verifier:
    def __init__(self, sids: torch.Tensor, codebook_sizes: tuple[int, ...]):
        """sids: [N, L] codes per level of every real item."""
        if math.prod(codebook_sizes) >= 2**62:
            raise ValueError("SID space too large for 64-bit mixed-radix codes")
        self.codebook_sizes = tuple(int(c) for c in codebook_sizes)
        self.levels = len(self.codebook_sizes)
        self.place_values = [math.prod(self.codebook_sizes[:level]) for level in range(self.levels)]
        sids = sids.long().cpu()
        self._on_device: dict[torch.device, list[torch.Tensor]] = {}
        self._constants_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # prefix_codes[l]: sorted unique codes of all valid prefixes of length l+1
        self.prefix_codes = [torch.unique(self.encode(sids[:, : level + 1])) for level in range(self.levels)]
        self.valid_sids = set(self.prefix_codes[-1].tolist())

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

    def prefix_is_valid(self, codes: torch.Tensor, length: int) -> torch.Tensor:
        """codes: [...] mixed-radix codes of prefixes of the given length -> bool [...]."""
        table = self._tables(codes.device)[length - 1]
        idx = torch.searchsorted(table, codes).clamp(max=table.numel() - 1)
        return table[idx] == codes

    def child_mask(self, prefix_codes: torch.Tensor, level: int) -> torch.Tensor:
        """prefix_codes: [N] codes of prefixes of length `level` (0-based level of the
        next token) -> bool [N, C_level]: which next tokens keep the prefix valid."""
        tokens = torch.arange(self.codebook_sizes[level], device=prefix_codes.device)
        children = prefix_codes.unsqueeze(-1) + tokens * self.place_values[level]
        return self.prefix_is_valid(children, level + 1)

    def _tables(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = [t.to(device) for t in self.prefix_codes]
        return self._on_device[device]

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(codebook sizes [L], place values [L]) on `device`, built once per device."""
        if device not in self._constants_on:
            self._constants_on[device] = (
                torch.tensor(self.codebook_sizes, device=device),
                torch.tensor(self.place_values, dtype=torch.long, device=device),
            )
        return self._constants_on[device]
