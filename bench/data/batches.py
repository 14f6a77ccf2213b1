"""Evaluation batches: the history of each user as SID tokens, left-padded so that every
prompt ends at the same position (what batched KV-cache decoding needs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.data.catalog import PAD, Catalog


@dataclass
class EvalBatch:
    history: torch.Tensor   # [B, T] SID tokens of the history items, left-padded with PAD
    mask: torch.Tensor      # [B, T] 1 on real tokens
    targets: torch.Tensor   # [B] item index of the held-out item
    users: torch.Tensor     # [B] user index

    def to(self, device) -> "EvalBatch":
        return EvalBatch(self.history.to(device), self.mask.to(device), self.targets.to(device), self.users.to(device))

    def __len__(self) -> int:
        return self.history.shape[0]


def collate_eval(examples: list[dict], catalog: Catalog) -> EvalBatch:
    """examples: dicts with 'user', 'history' (item indices) and 'target'."""
    rows = [catalog.item_tokens(torch.tensor(ex["history"], dtype=torch.long)).flatten() for ex in examples]
    width = max(len(r) for r in rows)
    history = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        history[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    targets = torch.tensor([ex["target"] for ex in examples], dtype=torch.long)
    users = torch.tensor([ex["user"] for ex in examples], dtype=torch.long)
    return EvalBatch(history, mask, targets, users)


def eval_batches(examples, catalog: Catalog, batch_size: int) -> list[EvalBatch]:
    """Fixed batches in user order, built once so every decoder sees the same ones."""
    rows = examples.to_list() if hasattr(examples, "to_list") else list(examples)
    return [collate_eval(rows[i: i + batch_size], catalog) for i in range(0, len(rows), batch_size)]
