"""Top-K metrics for leave-one-out evaluation (one held-out item per user).

Recall@k: 1 if the held-out item is among the first k recommendations, else 0.
NDCG@k:   1 / log2(rank + 1) with rank the 1-based position of the held-out item if
          rank <= k, else 0 (the ideal DCG is 1: there is one relevant item).
Both are averaged over users. A vectorised form of torchmetrics' RetrievalRecall and
RetrievalNormalizedDCG (tests check they agree); an item absent from the list counts 0.
"""

from __future__ import annotations

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


def ranking_metrics(ranks: torch.Tensor, k_max: int) -> dict[str, float | None]:
    """ranks [N] from target_ranks -> mean Recall/NDCG at every cut-off <= k_max (None above)."""
    ranks = ranks.double()
    found = ranks > 0
    metrics: dict[str, float | None] = {}
    for k in RECALL_KS:
        metrics[f"recall@{k}"] = float((found & (ranks <= k)).double().mean()) if k <= k_max else None
    gain = torch.where(found, 1.0 / torch.log2(ranks.clamp(min=1) + 1), torch.zeros_like(ranks))
    for k in NDCG_KS:
        metrics[f"ndcg@{k}"] = float(torch.where(ranks <= k, gain, 0.0).mean()) if k <= k_max else None
    return metrics
