"""Ranking metrics: hand-computed cases, agreement with torchmetrics, and bootstrap
intervals on hand-checked cases."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalNormalizedDCG, RetrievalRecall

from bench.data.batches import pad_rows
from bench.metrics import (
    METRIC_NAMES,
    NDCG_KS,
    RECALL_KS,
    Bootstrap,
    drop_seen,
    per_user,
    ranking_metrics,
    ranks_from_hits,
    target_ranks,
)


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


@pytest.mark.parametrize("rows_at_once", [1, 4096])
def test_drop_seen_moves_the_rest_up_in_order(rows_at_once):
    ranked = torch.tensor([[5, 3, 7, -1], [1, 2, 3, 4], [8, 9, -1, -1]])
    seen = pad_rows([torch.tensor(r, dtype=torch.long) for r in ([3, 11], [4, 1, 9], [])])  # user 3: none in the list
    out = drop_seen(ranked, *seen, rows_at_once=rows_at_once)
    assert out.tolist() == [[5, 7, -1, -1], [2, 3, -1, -1], [8, 9, -1, -1]]
    assert target_ranks(out, torch.tensor([7, 3, 9])).tolist() == [2, 2, 2]  # each moved up


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


# ---------------------------------------------------------------- intervals


def test_per_user_values_average_to_the_metrics():
    ranks = torch.tensor([1, 0, 3, 12, 2])
    assert per_user(ranks, "recall@10").tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert per_user(ranks, "ndcg@10").tolist() == pytest.approx([1.0, 0.0, 0.5, 0.0, 1 / math.log2(3)])
    assert ranking_metrics(ranks, 20)["ndcg@10"] == pytest.approx(float(per_user(ranks, "ndcg@10").mean()))


def test_hits_round_trip_to_ranks():
    assert ranks_from_hits({"users": [1, 4], "ranks": [3, 1]}, 6).tolist() == [0, 3, 0, 0, 1, 0]


def test_bootstrap_on_hand_checked_cases():
    # two users, values 0 and 1: a resample's mean is 0, 1/2 or 1 with chances 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles of 1000 resampled means are 0 and 1
    assert Bootstrap(2, seed=0).interval([0.0, 1.0]) == (0.0, 1.0)
    boot = Bootstrap(50, seed=1)
    assert boot.interval([0.25] * 50) == (0.25, 0.25)  # no spread, no interval
    same = torch.rand(50, generator=torch.Generator().manual_seed(0)).numpy()
    assert boot.interval(same - same) == (0.0, 0.0)  # paired: a decoder against itself differs by nothing


def test_bootstrap_interval_matches_the_normal_approximation_on_many_users():
    users, p = 20000, 0.1
    values = (np.random.default_rng(3).random(users) < p).astype(float)
    low, high = Bootstrap(users, seed=2).interval(values)
    mean, half = values.mean(), 1.96 * math.sqrt(values.mean() * (1 - values.mean()) / users)
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


def test_paired_bootstrap_separates_a_consistent_gain_that_unpaired_intervals_do_not():
    """Decoder B finds every user A finds plus 0.8% more: the unpaired intervals overlap,
    the paired interval of the difference excludes 0."""
    rng = np.random.default_rng(4)
    a = (rng.random(5000) < 0.08).astype(float)
    b = np.maximum(a, (rng.random(5000) < 0.008).astype(float))
    boot = Bootstrap(5000, seed=0)
    a_high, b_low = boot.interval(a)[1], boot.interval(b)[0]
    assert b_low < a_high  # overlapping: unpaired, no verdict
    low, high = boot.interval(b - a)
    assert 0 < low < high
