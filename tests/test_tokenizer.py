"""The RQ-KMeans tokenizer: recovers a planted residual hierarchy, balances clusters,
and writes an index the LETTER loader reads back."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import bench.records
from bench.__main__ import main
from bench.data import load_dataset
from bench.data.tokenizer import balanced_assign, codebook_report, cooccurrence_vectors, letter_index_text, rq_kmeans


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
    (tmp_path / "Toy.index.json").write_text(letter_index_text(items, codes))
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


def test_a_tokenization_killed_while_writing_leaves_the_earlier_one_whole(tmp_path, capsys, monkeypatch):
    """Ctrl-C once the new interactions are written, as the index is being written: the
    folder keeps the earlier pair of files, byte for byte, and no temporary file."""
    out = tmp_path / "tok"
    args = ["tokenize", "--dataset", "synthetic", "--levels", "2", "--balanced", "--out-dir", str(out)]
    assert main([*args, "--codes", "32"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    calls = []

    def interrupted_second_time(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(bench.records, "share_like_a_new_file", interrupted_second_time)
    assert main([*args, "--codes", "16", "--users", "2000"]) == 130  # other users, other SIDs
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


@pytest.mark.parametrize(
    "vectors, fragment",
    [
        (np.zeros((5, 3)), "expected one row per item ([600, dim]), got shape [5, 3]"),
        (np.zeros((700, 3)), "expected one row per item ([600, dim]), got shape [700, 3]"),
        (np.zeros((600, 0)), "expected one row per item ([600, dim]), got shape [600, 0]"),
        (np.full((600, 3), 3e38, dtype=np.float32), "values up to 3e+38; scale the vectors"),
    ],
    ids=["too few rows", "too many rows", "no columns", "too large"],
)
def test_tokenize_refuses_bad_vectors(tmp_path, capsys, vectors, fragment):
    np.save(tmp_path / "v.npy", vectors)
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
    assert fragment in capsys.readouterr().err


def letter_folder(folder, items=120, users=100):
    """A LETTER dataset `Small` with unique SIDs and random interactions."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    index = {str(i): [f"<a_{i % 12}>", f"<b_{i // 12}>"] for i in range(items)}
    inter = {str(u): [str(i) for i in rng.integers(0, items, 6)] for u in range(users)}
    (folder / "Small.index.json").write_text(json.dumps(index))
    (folder / "Small.inter.json").write_text(json.dumps(inter))
    return {path: path.read_bytes() for path in folder.iterdir()}


def tokenize(*flags):
    return main(["tokenize", "--dataset", "small", "--levels", "2", "--codes", "4", *map(str, flags)])


def test_tokenize_refuses_the_datasets_own_folder(tmp_path, capsys):
    good = tmp_path / "good"
    before = letter_folder(good)
    assert tokenize("--data-dir", good, "--out-dir", f"{good}/.") == 2
    assert capsys.readouterr().err == f"error: --out-dir {good} is the dataset's own folder; choose another folder\n"
    assert tokenize("--inter", good / "Small.inter.json", "--out-dir", good) == 2
    assert {path: path.read_bytes() for path in good.iterdir()} == before


def test_tokenize_refuses_a_folder_of_another_dataset_and_rewrites_its_own(tmp_path, capsys):
    letter_folder(tmp_path / "good")
    other = tmp_path / "other"
    other.mkdir()
    (other / "Beauty.index.json").write_text("{}")
    assert tokenize("--data-dir", tmp_path / "good", "--out-dir", other) == 2
    assert capsys.readouterr().err == (
        f"error: --out-dir {other} holds another dataset (Beauty.index.json), which would sit beside Small's files; "
        "choose another folder\n"
    )
    assert [p.name for p in other.iterdir()] == ["Beauty.index.json"]
    out = tmp_path / "out"
    for _ in range(2):  # a folder of its own earlier tokenization is rewritten
        assert tokenize("--data-dir", tmp_path / "good", "--out-dir", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Small.index.json", "Small.inter.json"]


def test_tokenize_refuses_an_unwritable_out_dir(tmp_path, capsys, monkeypatch):
    before = letter_folder(tmp_path / "good")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):  # root writes anywhere: fail as the system would for others

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "mkdir", refuse)
    assert tokenize("--data-dir", tmp_path / "good", "--out-dir", locked / "sub") == 2
    assert capsys.readouterr().err == (
        f"error: cannot write to --out-dir {locked / 'sub'} (Permission denied); choose a folder you may write to\n"
    )
    assert {path: path.read_bytes() for path in (tmp_path / "good").iterdir()} == before


def test_cooccurrence_vectors_warn_nothing():
    # torch warns once per process, so a fresh one: an earlier test may have had the warning already
    code = "from bench.data.tokenizer import cooccurrence_vectors; cooccurrence_vectors([[0, 1, 2, 3, 0, 1]] * 3, 4, 2)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and done.stderr == ""


@pytest.mark.parametrize("codes, rule", [(4, ["--collisions", "extra_level"]), (40, [])])
def test_tokenize_advises_a_command_that_loads(tmp_path, capsys, codes, rule):
    letter_folder(tmp_path / "good")
    out = tmp_path / "out"
    assert tokenize("--data-dir", tmp_path / "good", "--out-dir", out, "--codes", codes) == 0
    advice = capsys.readouterr().out.splitlines()[-1]
    assert advice == " ".join(["use it with: python -m bench run --dataset small-rq --data-dir", str(out), *rule])
    assert main(["data", *advice.split()[7:]]) == 0
    if rule:
        assert main(["data", "--dataset", "small-rq", "--data-dir", str(out)]) == 2
        assert "use the collision rule 'extra_level'" in capsys.readouterr().err


def test_tokenize_inter_refuses_an_index_file(tmp_path, capsys):
    good = tmp_path / "good"
    letter_folder(good)
    (tmp_path / "Renamed.inter.json").write_bytes((good / "Small.index.json").read_bytes())
    assert tokenize("--inter", good / "Small.index.json", "--out-dir", tmp_path / "o") == 2
    assert tokenize("--inter", tmp_path / "Renamed.inter.json", "--out-dir", tmp_path / "o") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {good / 'Small.index.json'}: --inter takes an interactions file, <Name>.inter.json "
        "(user id -> item ids)",
        f"error: {tmp_path / 'Renamed.inter.json'}: user '0' has item '<a_0>', a SID token; --inter takes the "
        "interactions (<Name>.inter.json), not the index",
    ]
    assert not (tmp_path / "o").exists()


def test_tokenize_inter_orders_item_ids_of_digits_int_cannot_read_as_text(tmp_path, capsys):
    """'²' is a digit to str.isdigit but no number to int(): it sorts with the other names."""
    inter = tmp_path / "Sup.inter.json"
    inter.write_text(json.dumps({"u1": ["10", "²", "2"], "u2": ["2", "10", "²"], "u3": ["²", "2", "10", "2"]}))
    assert tokenize("--inter", inter, "--dataset", "sup", "--codes", 2, "--levels", 2, "--out-dir", tmp_path / "o") == 0
    assert list(json.loads((tmp_path / "o" / "Sup.index.json").read_text())) == ["2", "10", "²"]


def test_tokenize_takes_float16_vectors_without_a_warning(tmp_path):
    letter_folder(tmp_path / "good")
    np.save(tmp_path / "v.npy", np.random.default_rng(0).random((120, 4)).astype(np.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning on stderr, before: 1e15 cast to float16
        code = tokenize("--data-dir", tmp_path / "good", "--vectors", tmp_path / "v.npy", "--out-dir", tmp_path / "o")
    assert code == 0


def test_tokenize_refuses_vectors_that_are_not_npy(tmp_path, capsys):
    letter_folder(tmp_path / "good")
    (tmp_path / "v.txt").write_text("0.1 0.2\n")
    assert tokenize("--data-dir", tmp_path / "good", "--vectors", tmp_path / "v.txt", "--out-dir", tmp_path / "o") == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'v.txt'}: not a .npy array of numbers; save the item vectors with numpy.save\n"
    )
