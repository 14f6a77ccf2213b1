"""Top-K metrics for leave-one-out evaluation (one held-out item per user).

Recall@k: 1 if the held-out item is among the first k recommendations, else 0.
NDCG@k:   1 / log2(rank + 1) with rank the 1-based position of the held-out item if
          rank <= k, else 0 (the ideal DCG is 1: there is one relevant item).
Both are averaged over users. A vectorised form of torchmetrics' RetrievalRecall and
RetrievalNormalizedDCG (tests check they agree); an item absent from the list counts 0.
Their uncertainty: a percentile bootstrap over users (Bootstrap), paired when two
decoders are compared on the same users.
"""

from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)
METRIC_NAMES = tuple(f"recall@{k}" for k in RECALL_KS) + tuple(f"ndcg@{k}" for k in NDCG_KS)


def target_ranks(ranked_items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ranked_items [B, K] item indices best first (-1 = none), targets [B] -> [B] 1-based
    rank of the target, or 0 when it is not in the list."""
    hits = ranked_items == targets.unsqueeze(1)
    positions = torch.arange(1, ranked_items.shape[1] + 1, device=ranked_items.device)
    first = torch.where(hits, positions, ranked_items.shape[1] + 1).min(dim=1).values
    return torch.where(hits.any(dim=1), first, torch.zeros_like(first))


def drop_seen(
    ranked_items: torch.Tensor, seen: torch.Tensor, seen_mask: torch.Tensor, rows_at_once: int = 4096
) -> torch.Tensor:
    """ranked_items [B, K] (-1 = none), seen [B, S] the items each user interacted with
    before the target (pad_rows: seen_mask [B, S] 1 on real entries) -> [B, K]: each list
    without its seen items, the rest moved up in order and -1 after them (an item the
    user has is never recommended again, as RecBole's full-sort evaluation of
    non-sequential models has it)."""
    out = ranked_items.clone()
    for rows in torch.split(torch.arange(len(out)), rows_at_once):  # bounds the [b, K, S] comparison
        chunk = out[rows]  # [b, K]
        hit = (chunk.unsqueeze(-1) == seen[rows].unsqueeze(1)) & seen_mask[rows].bool().unsqueeze(1)
        dropped = hit.any(-1)  # [b, K]
        order = dropped.to(torch.int8).argsort(dim=1, stable=True)  # kept first, in their order
        out[rows] = chunk.gather(1, order).masked_fill(dropped.gather(1, order), -1)
    return out


def per_user(ranks: torch.Tensor, name: str) -> torch.Tensor:
    """ranks [N] from target_ranks -> [N] float64 values of one metric ("recall@10",
    "ndcg@10") per user, whose mean is the metric."""
    kind, k = name.split("@")
    ranks = ranks.double()
    inside = (ranks > 0) & (ranks <= int(k))
    if kind == "recall":
        return inside.double()
    return torch.where(inside, 1.0 / torch.log2(ranks.clamp(min=1) + 1), torch.zeros_like(ranks))


def ranking_metrics(ranks: torch.Tensor, k_max: int) -> dict[str, float | None]:
    """ranks [N] from target_ranks -> mean Recall/NDCG at every cut-off <= k_max (None above)."""
    return {
        name: float(per_user(ranks, name).mean()) if int(name.split("@")[1]) <= k_max else None for name in METRIC_NAMES
    }


def ranks_from_hits(hits: dict, users: int) -> torch.Tensor:
    """A record's sparse hits {"users": [...], "ranks": [...]} -> ranks [users] (0 = missed)."""
    ranks = torch.zeros(users, dtype=torch.long)
    ranks[torch.tensor(hits["users"], dtype=torch.long)] = torch.tensor(hits["ranks"], dtype=torch.long)
    return ranks


class Bootstrap:
    """Percentile bootstrap over users. One set of resamples (users drawn with
    replacement) serves every interval of a run, so the interval of the difference of
    two decoders' per-user values is a paired bootstrap: both are resampled on the same
    users."""

    def __init__(self, users: int, resamples: int = 1000, seed: int = 0):
        self.index = np.random.default_rng(seed).integers(0, users, size=(resamples, users), dtype=np.int32)

    def interval(self, values, level: float = 0.95) -> tuple[float, float]:
        """values [N] per user -> (low, high) of the mean's `level` interval."""
        values = np.asarray(values, dtype=np.float64)
        means = np.concatenate([values[rows].mean(1) for rows in np.array_split(self.index, 20)])
        low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
        return float(low), float(high)
