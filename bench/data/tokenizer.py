"""An item tokenizer of our own: residual k-means (RQ-KMeans) from item vectors to SIDs.

Level 1 clusters the item vectors into C codes; each next level clusters what is left
(the residual: vector minus its centroids so far). `balanced` caps every cluster at
ceil(N / C) items (greedy assignment by distance), which spreads items over the
codebook. Vectors come from a .npy file (row n = the catalogue's n-th item) or, for a catalogue
without text, from the interactions: a PPMI co-occurrence matrix of items within a few
steps of each other in users' TRAINING parts only (no valid/test leakage), factorised
by a truncated SVD, rows scaled to unit length.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from bench.data import letter
from bench.data.catalog import build_catalog
from bench.errors import BenchError


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 50, balanced: bool = False, restarts: int = 3):
    """x [N, D] -> centroids [k, D], assignment [N]: the best (least squared error) of
    `restarts` runs of k-means++ seeding and Lloyd iterations."""
    best = None
    for restart in range(restarts):
        centroids, assign = lloyd(x, k, seed * 1000 + restart, iters, balanced)
        error = float(((x - centroids[assign]) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, centroids, assign)
    return best[1], best[2]


def lloyd(x: torch.Tensor, k: int, seed: int, iters: int, balanced: bool):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, x.shape[0])
    centroids = x[torch.randint(0, x.shape[0], (1,), generator=gen)]
    nearest = torch.cdist(x, centroids).squeeze(1) ** 2
    while centroids.shape[0] < k:  # k-means++: far points are likelier seeds
        weights = nearest / nearest.sum() if nearest.sum() > 0 else torch.ones_like(nearest)
        pick = x[torch.multinomial(weights, 1, generator=gen)]
        centroids = torch.cat([centroids, pick])
        nearest = torch.minimum(nearest, torch.cdist(x, pick).squeeze(1) ** 2)
    assign = None
    for _ in range(iters):
        distance = torch.cdist(x, centroids)
        new = balanced_assign(distance, math.ceil(x.shape[0] / k)) if balanced else distance.argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0  # an empty cluster takes the worst-served point
        centroids = torch.where(empty[:, None], x[distance.min(1).values.argmax()], sums / counts.clamp(min=1)[:, None])
    return centroids, assign


def balanced_assign(distance: torch.Tensor, capacity: int) -> torch.Tensor:
    """distance [N, k] -> assignment [N] with at most `capacity` items per cluster.

    In rounds: every unassigned item proposes to its nearest cluster not yet tried; a
    cluster keeps its closest proposers up to its free capacity and turns the rest
    away. Items that run out of clusters stay -1 (only when capacity * k < N)."""
    n, k = distance.shape
    preference = distance.argsort(dim=1)  # [N, k] clusters, nearest first
    tried = torch.zeros(n, dtype=torch.long)
    assign = torch.full((n,), -1, dtype=torch.long)
    load = torch.zeros(k, dtype=torch.long)
    while True:
        waiting = ((assign < 0) & (tried < k)).nonzero().flatten()
        if len(waiting) == 0:
            return assign
        choice = preference[waiting, tried[waiting]]
        by_distance = distance[waiting, choice].argsort()
        by_cluster = choice[by_distance].argsort(stable=True)
        order = by_distance[by_cluster]  # proposals grouped by cluster, closest first
        sorted_choice = choice[order]
        first = torch.searchsorted(sorted_choice, sorted_choice, right=False)
        rank = torch.arange(len(order)) - first  # position among the cluster's proposers
        accepted = rank < (capacity - load[sorted_choice])
        assign[waiting[order[accepted]]] = sorted_choice[accepted]
        load += torch.bincount(sorted_choice[accepted], minlength=k)
        tried[waiting[order[~accepted]]] += 1


def rq_kmeans(vectors: np.ndarray, codebook_sizes: list[int], seed: int = 0, balanced: bool = False) -> np.ndarray:
    """[N, D] item vectors -> [N, L] codes, one residual k-means per level."""
    most = max(codebook_sizes)
    if most > len(vectors):
        raise BenchError(
            f"{most} codes per level for {len(vectors)} items: a level cannot use more codes than there are items; "
            f"choose --codes at most {len(vectors)}"
        )
    residual = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    codes = []
    for level, size in enumerate(codebook_sizes):
        centroids, assign = kmeans(residual, size, seed + level, balanced=balanced)
        codes.append(assign)
        residual = residual - centroids[assign]
    return torch.stack(codes, 1).numpy()


def cooccurrence_vectors(
    sequences: list[list[int]], num_items: int, dim: int = 64, window: int = 3, seed: int = 0
) -> np.ndarray:
    """Item vectors from interactions alone: truncated SVD of the PPMI matrix of items
    that follow each other within `window` steps in the training parts (items[:-2])."""
    pairs = []
    for seq in sequences:
        train = seq[:-2]
        for offset in range(1, window + 1):
            for a, b in zip(train, train[offset:]):
                pairs += [(a, b), (b, a)]
    if not pairs:
        raise BenchError("no item co-occurs with another in the training parts; pass item vectors with --vectors")
    index = torch.tensor(pairs).T
    ones = torch.ones(index.shape[1])
    counts = torch.sparse_coo_tensor(index, ones, (num_items, num_items), check_invariants=True).coalesce()
    rows, cols = counts.indices()
    values = counts.values()
    per_item = torch.zeros(num_items).index_add_(0, rows, values)
    total = values.sum()
    pmi = torch.log(values * total / (per_item[rows] * per_item[cols])).clamp(min=0)
    ppmi = torch.sparse_coo_tensor(counts.indices(), pmi, counts.shape, check_invariants=True).coalesce()
    torch.manual_seed(seed)
    u, s, _ = torch.svd_lowrank(ppmi, q=min(dim, num_items - 1), niter=4)
    vectors = u * s.sqrt()
    # unit length: direction carries the neighbourhood, length mostly the item's frequency
    return torch.nn.functional.normalize(vectors, dim=1).numpy()


def load_vectors(path: Path, num_items: int) -> np.ndarray:
    try:
        vectors = np.load(path)
    except OSError as exc:
        raise BenchError(f"{path}: not a readable .npy array ({exc})") from None
    except (ValueError, EOFError):  # numpy's message advises unpickling the file
        vectors = None
    if not isinstance(vectors, np.ndarray) or vectors.dtype.kind not in "fiu":
        raise BenchError(f"{path}: not a .npy array of numbers; save the item vectors with numpy.save")
    if vectors.ndim != 2 or vectors.shape[0] != num_items or vectors.shape[1] == 0:
        raise BenchError(f"{path}: expected one row per item ([{num_items}, dim]), got shape {list(vectors.shape)}")
    if not np.isfinite(vectors).all():
        raise BenchError(f"{path}: has NaN or infinite values")
    largest = float(np.abs(vectors).max())  # a float: 1e15 is beyond float16, whose vectors would warn of it
    if largest > 1e15:  # k-means squares them in float32 (3.4e38 at most)
        raise BenchError(f"{path}: values up to {largest:.3g}; scale the vectors (k-means squares them)")
    return vectors


def codebook_report(codes: np.ndarray, codebook_sizes: list[int]) -> dict:
    """Codebook use per level (share of codes used, perplexity) and the collision rate
    (share of items whose SID another item also has, before collisions are resolved)."""
    levels = []
    for level, size in enumerate(codebook_sizes):
        counts = np.bincount(codes[:, level], minlength=size)
        p = counts[counts > 0] / counts.sum()
        levels.append(
            {"codes": size, "used": int((counts > 0).sum()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}
        )
    _, inverse, group_sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    shared = group_sizes[inverse.ravel()] > 1
    return {
        "levels": levels,
        "items": int(len(codes)),
        "collision_rate": float(shared.mean()),
        "distinct_sids": int(len(group_sizes)),
    }


def read_interactions(path: Path) -> tuple[list[str], list[list[int]]]:
    """A <Name>.inter.json with the LETTER loader's checks -> item ids (numeric order) and
    user sequences of item positions."""
    if not path.name.endswith(".inter.json"):
        raise BenchError(f"{path}: --inter takes an interactions file, <Name>.inter.json (user id -> item ids)")
    users, sequences = letter.parse_interactions(path)
    for user, items in zip(users, sequences):
        token = next((i for i in items if letter.TOKEN.fullmatch(i)), None)
        if token:
            raise BenchError(
                f"{path}: user '{user}' has item '{token}', a SID token; --inter takes the interactions "
                "(<Name>.inter.json), not the index"
            )
    item_ids = sorted(
        {i for items in sequences for i in items}, key=lambda i: (not i.isdecimal(), int(i) if i.isdecimal() else 0, i)
    )
    position = {item: n for n, item in enumerate(item_ids)}
    return item_ids, [[position[i] for i in items] for items in sequences]


def check_out_dir(path: Path, source: Path | None, stem: str) -> None:
    """Refuse, before the clustering, an output folder that is a file (or lies below one),
    that we may not write, that is the dataset's own folder (its files would be replaced), or
    that holds another dataset's files (loading refuses a folder of two datasets)."""
    if source and path.resolve() == source.resolve():
        raise BenchError(f"--out-dir {path} is the dataset's own folder; choose another folder")
    if path.is_dir():
        ours = {f"{stem}.inter.json", f"{stem}.index.json"}
        others = sorted(p.name for p in (*path.glob("*.inter.json"), *path.glob("*.index.json")) if p.name not in ours)
        if others:
            raise BenchError(
                f"--out-dir {path} holds another dataset ({', '.join(others)}), which would sit beside "
                f"{stem}'s files; choose another folder"
            )
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise BenchError(f"{folder} is a file; --out-dir takes a folder (created if missing)")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise unwritable(path, os.strerror(errno.EACCES))
            return


def unwritable(path: Path, reason: str) -> BenchError:
    return BenchError(f"cannot write to --out-dir {path} ({reason}); choose a folder you may write to")


def needs_extra_level(item_ids: list[str], codes: np.ndarray) -> bool:
    """Whether the default collision rule (last_code) would refuse these SIDs when loaded."""
    try:
        build_catalog("tokenized", item_ids, codes)
    except BenchError:
        return True
    return False


def letter_index_text(item_ids: list[str], codes: np.ndarray) -> str:
    """The SIDs as a LETTER index file's JSON: item -> ["<a_12>", "<b_3>", ...]."""
    index = {
        item: [f"<{chr(ord('a') + level)}_{int(code)}>" for level, code in enumerate(row)]
        for item, row in zip(item_ids, codes)
    }
    return json.dumps(index)
