"""Evaluation batches: the history of each user as SID tokens, left-padded so that every
prompt ends at the same position (what batched KV-cache decoding needs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.data.catalog import PAD, Catalog


@dataclass
class Prompt:
    """What a decoder is given: the users' histories, never their targets."""

    history: torch.Tensor  # [B, T] SID tokens of the history items, left-padded with PAD
    mask: torch.Tensor  # [B, T] 1 on real tokens
    items: torch.Tensor  # [B, H] history item index + 1, left-padded with 0 (item-id models)
    items_mask: torch.Tensor  # [B, H]

    def to(self, device) -> "Prompt":
        return Prompt(*(t.to(device) for t in (self.history, self.mask, self.items, self.items_mask)))

    def __len__(self) -> int:
        return self.history.shape[0]


@dataclass
class EvalBatch:
    prompt: Prompt
    targets: torch.Tensor  # [B] item index of the held-out item; only the metrics read it

    def to(self, device) -> "EvalBatch":
        return EvalBatch(self.prompt.to(device), self.targets.to(device))

    def __len__(self) -> int:
        return len(self.prompt)


def collate_eval(examples: list[dict], catalog: Catalog) -> EvalBatch:
    """examples: dicts with 'user', 'history' (item indices) and 'target'."""
    histories = [torch.tensor(ex["history"], dtype=torch.long) for ex in examples]
    history, mask = pad_rows([catalog.item_tokens(h).flatten() for h in histories], left=True)
    items, items_mask = pad_rows([h + 1 for h in histories], left=True)
    targets = torch.tensor([ex["target"] for ex in examples], dtype=torch.long)
    return EvalBatch(Prompt(history, mask, items, items_mask), targets)


def pad_rows(rows: list[torch.Tensor], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length 1D tensors -> [B, T] padded with PAD (on the left or right), and the 0/1 mask."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out[i, span], mask[i, span] = row, 1
    return out, mask


def eval_batches(examples: list[dict], catalog: Catalog, batch_size: int) -> list[EvalBatch]:
    """Fixed batches in user order, built once so every decoder sees the same ones."""
    return [collate_eval(examples[i : i + batch_size], catalog) for i in range(0, len(examples), batch_size)]
