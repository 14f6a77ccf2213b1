"""Leave-one-out splits (RecBole/TIGER convention).

For a user with items i_1 .. i_n in time order: test target i_n with history
i_1 .. i_{n-1}; valid target i_{n-1} with history i_1 .. i_{n-2}; training targets are
i_2 .. i_{n-2}, each with the items before it as history. Histories keep their last
`max_history` items. Training examples are windows of up to max_history + 1 items so
that one forward pass scores every target in the window; a window's first item is
context only, and windows of a long user overlap by exactly that one item, so every
training prefix is a target exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.data.catalog import Catalog
from bench.errors import BenchError

SPLITS = ("valid", "test")


@dataclass
class RecData:
    name: str
    catalog: Catalog
    user_ids: list[str]
    sequences: list[list[int]]  # item indices per user, time order
    source: str  # folder, download cache, or generator settings
    checksums: dict = field(default_factory=dict)
    dropped_users: int = 0  # users with fewer than 3 items (no train/valid/test)
    generator: dict = field(default_factory=dict)  # synthetic shape settings given (items, users, ...)

    def describe(self) -> dict:
        lengths = np.array([len(s) for s in self.sequences])
        return {
            "dataset": self.name,
            "source": self.source,
            "users": len(self.sequences),
            "dropped_users_under_3_items": self.dropped_users,
            "interactions": int(lengths.sum()),
            "history_length": {
                "min": int(lengths.min()),
                "median": float(np.median(lengths)),
                "max": int(lengths.max()),
            },
            "training_prefixes": int(np.clip(lengths - 3, 0, None).sum()),
            **self.catalog.describe(),
        }


def train_windows(data: RecData, max_history: int = 20, per_target: bool = False) -> list[list[int]]:
    """Windows of <= max_history + 1 items from each user's training part items[:-2].

    per_target: one window per training target instead (its history and itself), for
    models that cannot score every prefix of a window in one pass (encoder-decoders)."""
    windows = []
    for seq in data.sequences:
        train = seq[:-2]
        if per_target:
            windows += [train[max(0, end - max_history - 1) : end] for end in range(2, len(train) + 1)]
            continue
        end = len(train)
        while end >= 2:
            windows.append(train[max(0, end - max_history - 1) : end])
            end -= max_history
    return windows


def eval_examples(
    data: RecData,
    split: str,
    max_history: int = 20,
    limit_users: int | None = None,
    sample_users: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """One example per user: the history before the split's target item (the last
    `max_history` of them), every item before it (`seen`, which --exclude-history drops
    from the lists) and the target; of every user, the first `limit_users`, or
    `sample_users` drawn without replacement by `seed` (in the split's order; RunSettings
    refuses both at once)."""
    if split not in SPLITS:
        raise BenchError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    cut = 1 if split == "test" else 2
    users = range(len(data.sequences)) if limit_users is None else range(min(limit_users, len(data.sequences)))
    if sample_users is not None and sample_users < len(data.sequences):
        users = np.sort(np.random.default_rng(seed).choice(len(data.sequences), sample_users, replace=False)).tolist()
    examples = []
    for u in users:
        seq = data.sequences[u]
        seen = seq[: len(seq) - cut]
        examples.append({"user": u, "history": seen[-max_history:], "seen": seen, "target": seq[len(seq) - cut]})
    return examples


def item_popularity(data: RecData) -> np.ndarray:
    """Count of each item in the training parts (items[:-2]) of all users."""
    counts = np.zeros(data.catalog.num_items, dtype=np.int64)
    for seq in data.sequences:
        np.add.at(counts, seq[:-2], 1)
    return counts
