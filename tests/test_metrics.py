"""Ranking metrics: hand-computed cases, and agreement with torchmetrics."""

import math

import pytest
import torch
from torchmetrics.retrieval import RetrievalNormalizedDCG, RetrievalRecall

from bench.metrics import METRIC_NAMES, NDCG_KS, RECALL_KS, ranking_metrics, target_ranks


def test_target_ranks_hit_miss_and_padding():
    ranked = torch.tensor(
        [
            [5, 2, 7],  # target 5 at rank 1
            [1, 9, 3],  # target 3 at rank 3
            [4, 6, 8],  # target 0 absent
            [8, -1, -1],  # target 8 at rank 1, then padding
            [-1, -1, -1],
        ]
    )  # no candidate at all
    targets = torch.tensor([5, 3, 0, 8, 2])
    assert target_ranks(ranked, targets).tolist() == [1, 3, 0, 1, 0]


def test_ranking_metrics_hand_computed():
    # ranks 1, 3, 7, 15 have NDCG gains 1/log2(2), 1/log2(4), 1/log2(8), 1/log2(16) = 1, 1/2, 1/3, 1/4
    metrics = ranking_metrics(torch.tensor([1, 3, 7, 15, 0]), k_max=20)
    assert set(metrics) == set(METRIC_NAMES)
    expected = {
        "recall@1": 1 / 5,
        "recall@5": 2 / 5,
        "recall@10": 3 / 5,
        "recall@20": 4 / 5,
        "ndcg@5": (1 + 1 / 2) / 5,
        "ndcg@10": (1 + 1 / 2 + 1 / 3) / 5,
        "ndcg@20": (1 + 1 / 2 + 1 / 3 + 1 / 4) / 5,
    }
    assert metrics == pytest.approx(expected, abs=1e-12)


def test_ndcg_of_rank_r_is_one_over_log2_r_plus_1():
    for r in range(1, 21):
        metrics = ranking_metrics(torch.tensor([r]), k_max=20)
        assert metrics["ndcg@20"] == pytest.approx(1 / math.log2(r + 1), abs=1e-12)
        assert metrics["ndcg@5"] == (pytest.approx(1 / math.log2(r + 1), abs=1e-12) if r <= 5 else 0.0)
        assert metrics["recall@10"] == (1.0 if r <= 10 else 0.0)


@pytest.mark.parametrize(
    "k_max,present",
    [
        (1, {"recall@1"}),
        (5, {"recall@1", "recall@5", "ndcg@5"}),
        (10, {"recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"}),
        (20, set(METRIC_NAMES)),
    ],
)
def test_cutoffs_above_k_max_are_none(k_max, present):
    metrics = ranking_metrics(torch.tensor([1, 0, 0]), k_max=k_max)
    assert {name for name, value in metrics.items() if value is not None} == present
    assert metrics["recall@1"] == pytest.approx(1 / 3, abs=1e-12)


def random_rankings(users: int = 300, items: int = 100, k: int = 20, seed: int = 0):
    """Ranked lists of distinct items, some shorter than k (padded with -1); the held-out
    item is in the list for about 60 % of the users."""
    gen = torch.Generator().manual_seed(seed)
    ranked = torch.full((users, k), -1, dtype=torch.long)
    targets = torch.empty(users, dtype=torch.long)
    for u in range(users):
        order = torch.randperm(items, generator=gen)
        length = int(torch.randint(k // 2, k + 1, (1,), generator=gen))
        ranked[u, :length] = order[:length]
        in_list = torch.rand(1, generator=gen).item() < 0.6
        targets[u] = order[int(torch.randint(0, length, (1,), generator=gen))] if in_list else order[length]
    return ranked, targets


def torchmetrics_value(metric_cls, k: int, ranked: torch.Tensor, targets: torch.Tensor) -> float:
    """Each user's list as one query: descending scores, target = (item == held-out item)."""
    metric = metric_cls(top_k=k, empty_target_action="neg")
    for user, (row, target) in enumerate(zip(ranked, targets)):
        row = row[row >= 0]
        preds = torch.arange(len(row), 0, -1, dtype=torch.float)
        metric.update(preds, row == target, indexes=torch.full_like(row, user))
    return float(metric.compute())


def test_metrics_equal_torchmetrics():
    ranked, targets = random_rankings()
    ranks = target_ranks(ranked, targets)
    assert 0.4 < float((ranks > 0).double().mean()) < 0.8  # hits and misses both present
    ours = ranking_metrics(ranks, k_max=20)
    for k in RECALL_KS:
        assert ours[f"recall@{k}"] == pytest.approx(torchmetrics_value(RetrievalRecall, k, ranked, targets), abs=1e-6)
    for k in NDCG_KS:
        assert ours[f"ndcg@{k}"] == pytest.approx(
            torchmetrics_value(RetrievalNormalizedDCG, k, ranked, targets), abs=1e-6
        )
