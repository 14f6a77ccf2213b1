"""The embedded default dataset: generated from a seed, no files.

Items sit in a planted hierarchy (category -> subcategory -> item): each item has a
vector made of its category's centre, its subcategory's offset and a little noise,
and its SID comes from our own RQ-KMeans tokenizer over those vectors (codebooks of
16, 16 and 32 codes: 600 items in 8,192 combinations, so the verifier has work). A
user has a favourite category; the next item is, with probability `follow`, one of
three fixed successors of the last item (same category), otherwise a popular item of
the favourite category. A model that reads the history can learn both rules;
popularity alone cannot, which is what makes the dataset a fair smoke test.

`items=N` makes a catalogue of any size (up to 10^7 and beyond in minutes) for the
scaling sweeps: k-means over millions of vectors would take hours, so the SID is the
planted hierarchy itself, (category, subcategory, popularity rank inside the
subcategory), with about N^(1/3) categories and subcategories; unique by construction.
The users follow the same two rules, drawn for all users at once.
"""

from __future__ import annotations

import numpy as np

from bench.data.tokenizer import rq_kmeans

CODEBOOK = (16, 16, 32)
USERS = 3000  # users generated unless --users says otherwise


def item_vectors(rng: np.random.Generator, category: np.ndarray, subcategory: np.ndarray, dim: int = 8):
    """Centre of the category (scale 4) + offset of the subcategory (scale 1) + the item's own part (scale 1)."""
    centres = rng.normal(0, 4, (category.max() + 1, dim))
    offsets = rng.normal(0, 1, (category.max() + 1, subcategory.max() + 1, dim))
    return centres[category] + offsets[category, subcategory] + rng.normal(0, 1, (len(category), dim))


def generate(
    seed: int = 0,
    users: int = USERS,
    categories: int = 10,
    subcategories: int = 6,
    items: int = 600,
    min_len: int = 5,
    max_len: int = 20,
    follow: float = 0.75,
    sequence_length: int | None = None,
):
    """-> (item ids, SID codes [items][3], user ids, sequences of item ids).
    sequence_length: every user's number of items instead of min_len + a geometric draw."""
    rng = np.random.default_rng(seed)
    category = rng.integers(0, categories, size=items)
    subcategory = rng.integers(0, subcategories, size=items)
    codes = rq_kmeans(item_vectors(rng, category, subcategory), list(CODEBOOK), seed=seed).tolist()

    popularity = np.minimum(rng.zipf(1.3, size=items).astype(float), 50.0)
    by_category = [np.flatnonzero(category == c) for c in range(categories)]

    def popular_in(c: int) -> int:
        pool = by_category[c]
        return int(rng.choice(pool, p=popularity[pool] / popularity[pool].sum()))

    successors = np.array([[popular_in(category[i]) for _ in range(3)] for i in range(items)])
    successor_p = np.array([0.6, 0.25, 0.15])
    taste_p = np.bincount(category, minlength=categories) / items
    sequences = []
    for _ in range(users):
        taste = int(rng.choice(categories, p=taste_p))
        length = sequence_length or int(min(max_len, min_len + rng.geometric(0.15) - 1))
        seq = [popular_in(taste)]
        while len(seq) < length:
            if rng.random() < follow:
                seq.append(int(successors[seq[-1], rng.choice(3, p=successor_p)]))
            else:
                seq.append(popular_in(taste))
        sequences.append([str(i) for i in seq])
    return [str(i) for i in range(items)], codes, [str(u) for u in range(users)], sequences


def generate_scaled(
    seed: int, items: int, users: int = USERS, sequence_length: int | None = None, follow: float = 0.75
):
    """A catalogue of `items` with hierarchy SIDs and users drawn with numpy, no Python
    loop over items or users -> (SID codes [items, 3], codebook sizes, sequences [users] of
    item indices). Item and user ids are their indices."""
    rng = np.random.default_rng(seed)
    branching = max(4, round(items ** (1 / 3)))
    category = rng.integers(0, branching, size=items)
    group = category * branching + rng.integers(0, branching, size=items)  # (category, subcategory)
    popularity = np.minimum(rng.zipf(1.3, size=items).astype(float), 50.0)
    by_group = np.lexsort((-popularity, group))  # groups in order, most popular first inside each
    starts = np.searchsorted(group[by_group], np.arange(branching * branching))
    rank = np.empty(items, dtype=np.int64)
    rank[by_group] = np.arange(items) - starts[group[by_group]]
    codes = np.stack([group // branching, group % branching, rank], axis=1)
    sizes = (branching, branching, int(rank.max()) + 1)

    by_category = np.argsort(category, kind="stable")
    cumulative = np.cumsum(popularity[by_category])  # popularity mass, categories one after another
    bounds = np.concatenate([[0.0], cumulative])[np.searchsorted(category[by_category], np.arange(branching + 1))]

    def popular_in(c: np.ndarray) -> np.ndarray:
        """categories [...] -> an item of each, drawn by popularity."""
        mass = bounds[c] + rng.random(c.shape) * (bounds[c + 1] - bounds[c])
        return by_category[np.minimum(np.searchsorted(cumulative, mass, side="right"), items - 1)]

    successors = popular_in(np.repeat(category[:, None], 3, axis=1))  # [items, 3]
    taste = category[rng.integers(0, items, size=users)]  # a category in proportion to its items
    lengths = np.full(users, sequence_length) if sequence_length else np.minimum(20, 4 + rng.geometric(0.15, users))
    steps = np.empty((users, int(lengths.max())), dtype=np.int64)
    steps[:, 0] = popular_in(taste)
    for t in range(1, steps.shape[1]):
        follows = rng.random(users) < follow
        which = rng.choice(3, size=users, p=[0.6, 0.25, 0.15])
        steps[:, t] = np.where(follows, successors[steps[:, t - 1], which], popular_in(taste))
    return codes, sizes, [row[:n].tolist() for row, n in zip(steps, lengths)]
