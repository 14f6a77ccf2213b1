"""The RQ-KMeans tokenizer: recovers a planted residual hierarchy, balances clusters,
and writes an index the LETTER loader reads back."""

import json
import math

import numpy as np
import pytest

from bench.__main__ import main
from bench.data import load_dataset
from bench.data.tokenizer import balanced_assign, codebook_report, cooccurrence_vectors, rq_kmeans, write_letter_index


def planted(seed=0, coarse=5, fine=4, per_group=6, dim=16):
    """x = A[a] + B[b] + noise: level 1 should find a, the residual level b."""
    rng = np.random.default_rng(seed)
    a = np.repeat(np.arange(coarse), fine * per_group)
    b = np.tile(np.repeat(np.arange(fine), per_group), coarse)
    x = rng.normal(0, 10, (coarse, dim))[a] + rng.normal(0, 2, (fine, dim))[b] + rng.normal(0, 0.05, (len(a), dim))
    return x, a, b


def same_partition(codes, labels):
    pairs = set(zip(codes.tolist(), labels.tolist()))
    return len(pairs) == len(set(codes.tolist())) == len(set(labels.tolist()))


def test_rq_kmeans_recovers_a_planted_hierarchy():
    x, a, b = planted()
    codes = rq_kmeans(x, [5, 4], seed=0)
    assert same_partition(codes[:, 0], a)
    assert same_partition(codes[:, 1], b)


def test_rq_kmeans_is_deterministic_for_a_seed():
    x, _, _ = planted(seed=1)
    assert np.array_equal(rq_kmeans(x, [5, 4, 3], seed=3), rq_kmeans(x, [5, 4, 3], seed=3))


def test_balanced_assignment_respects_the_capacity():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (40, 4)), rng.normal(5, 0.1, (8, 4))])  # one crowded blob
    codes = rq_kmeans(x, [4], seed=0, balanced=True)[:, 0]
    assert np.bincount(codes, minlength=4).max() <= math.ceil(48 / 4)
    unbalanced = rq_kmeans(x, [4], seed=0)[:, 0]
    assert np.bincount(unbalanced, minlength=4).max() > 12


def test_balanced_assign_fills_closest_pairs_first():
    import torch

    distance = torch.tensor([[0.0, 5.0], [1.0, 6.0], [2.0, 0.5]])
    assert balanced_assign(distance, capacity=2).tolist() == [0, 0, 1]
    assert balanced_assign(distance, capacity=1).tolist()[0] == 0


def test_codebook_report_counts_use_and_collisions():
    codes = np.array([[0, 1], [0, 1], [1, 0], [1, 1]])
    report = codebook_report(codes, [4, 2])
    assert report["collision_rate"] == 0.5 and report["distinct_sids"] == 3
    assert report["levels"][0]["used"] == 2
    assert report["levels"][0]["perplexity"] == pytest.approx(2.0)
    assert report["levels"][1]["perplexity"] == pytest.approx(
        math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    )


def test_written_index_loads_back_through_the_letter_loader(tmp_path):
    x, a, b = planted()
    codes = rq_kmeans(x, [5, 4, 8], seed=0)
    items = [str(i) for i in range(len(x))]
    write_letter_index(tmp_path / "Toy.index.json", items, codes)
    users = {str(u): [str((u * 7 + s) % len(x)) for s in range(5)] for u in range(30)}
    (tmp_path / "Toy.inter.json").write_text(json.dumps(users))
    data = load_dataset("toy", data_dir=tmp_path)
    assert data.catalog.item_ids == items
    assert data.catalog.codebook_sizes == tuple(int(c) + 1 for c in codes.max(0))
    unique = codebook_report(codes, [5, 4, 8])["collision_rate"] == 0
    kept = data.catalog.sids.numpy()
    assert np.array_equal(kept[:, :2], codes[:, :2])  # collisions only touch the last level
    assert unique == np.array_equal(kept, codes)


def test_cooccurrence_vectors_put_items_of_the_same_sessions_together():
    # items 0-4 always appear together, items 5-9 too
    sequences = [[0, 1, 2, 3, 4, 0, 1, 2] for _ in range(20)] + [[5, 6, 7, 8, 9, 5, 6, 7] for _ in range(20)]
    vectors = cooccurrence_vectors(sequences, 10, dim=4)
    similarity = vectors @ vectors.T
    assert similarity[0, 1:5].min() > similarity[0, 5:].max()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_tokenize_command_writes_a_dataset_that_runs(tmp_path, capsys):
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenize",
                "--dataset",
                "synthetic",
                "--levels",
                "2",
                "--codes",
                "32",
                "--balanced",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.split("\nuse it with")[0])
    assert report["items"] == 600 and len(report["levels"]) == 2 and 0 <= report["collision_rate"] <= 1
    assert all(level["used"] == 32 for level in report["levels"])  # balanced: every code in use
    data = load_dataset("synthetic-rq", data_dir=out, collisions="extra_level")
    assert data.catalog.levels == 3 and len(data.sequences) == 3000
    assert data.catalog.collisions == 600 - report["distinct_sids"]  # each shared SID keeps one item


def test_tokenize_refuses_bad_vectors(tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.zeros((5, 3)))
    assert (
        main(
            [
                "tokenize",
                "--dataset",
                "synthetic",
                "--vectors",
                str(tmp_path / "v.npy"),
                "--out-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "expected one row per item ([600, dim])" in capsys.readouterr().err
