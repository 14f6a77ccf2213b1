"""The embedded default dataset: generated from a seed, no files.

Items sit in a hierarchy (category -> subcategory -> item) that their SIDs follow, and
only a small share of the code space holds real items, so the verifier has work to do.
A user has a favourite category; the next item is, with probability `follow`, one of
three fixed successors of the last item (same category), otherwise a popular item of
the favourite category. A model that reads the history can learn both rules;
popularity alone cannot, which is what makes the dataset a fair smoke test.
"""
from __future__ import annotations

import numpy as np

CODEBOOK = (16, 16, 32)   # level sizes: 10 of 16 categories, 6 of 16 subcategory codes each


def generate(seed: int = 0, users: int = 3000, categories: int = 10, subcategories: int = 6,
             items: int = 600, min_len: int = 5, max_len: int = 20, follow: float = 0.75):
    """-> (item ids, SID codes [items][3], user ids, sequences of item ids)."""
    rng = np.random.default_rng(seed)
    category = rng.integers(0, categories, size=items)
    # each category uses `subcategories` of the level-2 codes, chosen at random
    sub_codes = np.stack([rng.choice(CODEBOOK[1], subcategories, replace=False) for _ in range(categories)])
    sub = sub_codes[category, rng.integers(0, subcategories, size=items)]
    leaf = rng.integers(0, CODEBOOK[2], size=items)
    codes = [[int(c), int(s), int(t)] for c, s, t in zip(category, sub, leaf)]

    popularity = rng.zipf(1.3, size=items).astype(float)
    popularity = np.minimum(popularity, 50.0)
    by_category = [np.flatnonzero(category == c) for c in range(categories)]

    def popular_in(c: int) -> int:
        pool = by_category[c]
        weights = popularity[pool] / popularity[pool].sum()
        return int(rng.choice(pool, p=weights))

    successors = np.array([[popular_in(category[i]) for _ in range(3)] for i in range(items)])
    successor_p = np.array([0.6, 0.25, 0.15])

    sequences = []
    taste_p = np.bincount(category, minlength=categories) / items
    for _ in range(users):
        taste = int(rng.choice(categories, p=taste_p))
        length = int(min(max_len, min_len + rng.geometric(0.15) - 1))
        seq = [popular_in(taste)]
        while len(seq) < length:
            if rng.random() < follow:
                seq.append(int(successors[seq[-1], rng.choice(3, p=successor_p)]))
            else:
                seq.append(popular_in(taste))
        sequences.append([str(i) for i in seq])
    item_ids = [str(i) for i in range(items)]
    user_ids = [str(u) for u in range(users)]
    return item_ids, codes, user_ids, sequences
