"""The catalogue: collision rules, token layout, SID -> item lookup, and the verifier
(the trie as tensors) against a brute-force set of prefixes and against the
sorted-codes verifier it replaced, on Beauty and on random catalogues."""

import itertools
import math
from pathlib import Path

import pytest
import torch

from bench.data import load_dataset
from bench.data.catalog import build_catalog
from bench.errors import BenchError
from decoders.verifier import DENSE_LIMIT, Verifier

BEAUTY_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "beauty"


@pytest.fixture(scope="module")
def beauty():
    return load_dataset("beauty", data_dir=str(BEAUTY_DIR))


# Items a..f; b and d share a's SID, f shares e's. Under prefix (0, 0) the last codes 1
# and 3 are taken, under (1, 0) only 1. Inferred codebook sizes: (2, 1, 4).
ITEMS = ["a", "b", "c", "d", "e", "f"]
CODES = [[0, 0, 1], [0, 0, 1], [0, 0, 3], [0, 0, 1], [1, 0, 1], [1, 0, 1]]


def toy_catalog(rule: str = "last_code"):
    return build_catalog("toy", ITEMS, CODES, rule=rule)


# ---------------------------------------------------------------- collision rules


def test_last_code_gives_later_items_the_smallest_free_last_code():
    catalog = toy_catalog()
    assert catalog.sids.tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 3], [0, 0, 2], [1, 0, 1], [1, 0, 0]]
    assert catalog.codebook_sizes == (2, 1, 4)
    assert catalog.collisions == 3
    assert catalog.collision_rule == "last_code"


def test_last_code_without_free_code_suggests_extra_level():
    with pytest.raises(BenchError) as info:
        build_catalog("toy", ["x", "y", "z"], [[0, 0], [0, 0], [0, 1]])  # last level has 2 codes, both used
    message = str(info.value)
    assert "SID [0, 0] is shared by 2 items" in message
    assert "extra_level" in message


def test_last_code_uses_the_given_codebook_size():
    catalog = build_catalog("toy", ["x", "y", "z"], [[0, 0], [0, 0], [0, 1]], codebook_sizes=(1, 3))
    assert catalog.sids.tolist() == [[0, 0], [0, 2], [0, 1]]


def test_extra_level_appends_the_rank_within_the_group():
    catalog = toy_catalog("extra_level")
    assert catalog.sids.tolist() == [[0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 3, 0], [0, 0, 1, 2], [1, 0, 1, 0], [1, 0, 1, 1]]
    assert catalog.codebook_sizes == (2, 1, 4, 3)
    assert catalog.collisions == 3
    assert catalog.describe()["levels"] == 4


def test_no_collisions_leaves_sids_unchanged():
    codes = [[0, 1], [1, 0], [1, 1]]
    for rule in ("last_code", "extra_level"):
        catalog = build_catalog("toy", ["x", "y", "z"], codes, rule=rule)
        assert catalog.collisions == 0
        assert catalog.sids[:, :2].tolist() == codes


def test_unknown_collision_rule():
    with pytest.raises(BenchError) as info:
        build_catalog("toy", ITEMS, CODES, rule="drop")
    assert "unknown collision rule 'drop'" in str(info.value)
    assert "last_code, extra_level" in str(info.value)


# ---------------------------------------------------------------- token layout and lookup


def test_token_layout():
    catalog = toy_catalog()  # sizes (2, 1, 4): tokens 1-2, 3, 4-7, placeholders 8-10
    assert catalog.offsets == (1, 3, 4)
    assert catalog.placeholder_tokens == (8, 9, 10)
    assert catalog.vocab_size == 11
    assert (catalog.levels, catalog.num_items) == (3, 6)


def test_item_tokens_keep_the_leading_shape():
    catalog = toy_catalog()
    tokens = catalog.item_tokens(torch.tensor([[0, 5], [2, 1]]))
    assert tokens.tolist() == [[[1, 3, 5], [2, 3, 4]], [[1, 3, 7], [1, 3, 4]]]


def test_items_of_maps_sids_back_to_items():
    catalog = toy_catalog()
    assert torch.equal(catalog.items_of(catalog.sids), torch.arange(6))
    sids = torch.tensor(
        [
            [[1, 0, 0], [1, 0, 3]],  # item f; a free code, no item
            [[-1, -1, -1], [0, -1, 1]],
        ]
    )  # no candidate; a row with a -1
    assert catalog.items_of(sids).tolist() == [[5, -1], [-1, -1]]


def test_items_of_rejects_out_of_range_codes():
    """Level 2 has one code, so (0, 1, 1) has the mixed-radix code of item d (0, 0, 2) and
    (2, 0, 0) that of item a (0, 0, 1); neither is a SID of the catalogue."""
    catalog = toy_catalog()
    assert catalog.items_of(torch.tensor([[0, 1, 1], [2, 0, 0]])).tolist() == [-1, -1]


# ---------------------------------------------------------------- verifier


SIZES = (5, 4, 3)  # place values 1, 5, 20


def test_encode_is_mixed_radix():
    verifier = Verifier(torch.tensor([[2, 3, 1]]), SIZES)
    assert verifier.place_values == [1, 5, 20]
    assert verifier.encode(torch.tensor([2, 3, 1])).item() == 2 + 3 * 5 + 1 * 20
    assert verifier.encode(torch.tensor([[2, 3], [4, 0]])).tolist() == [17, 4]  # prefixes: first levels only
    assert verifier.encode(torch.zeros(2, 2, 0, dtype=torch.long)).tolist() == [[0, 0], [0, 0]]


@pytest.fixture(scope="module")
def random_verifier():
    """20 distinct random SIDs out of the 60 of SIZES, and every prefix they have."""
    gen = torch.Generator().manual_seed(0)
    space = list(itertools.product(*map(range, SIZES)))
    sids = [space[i] for i in torch.randperm(len(space), generator=gen)[:20].tolist()]
    prefixes = {length: {sid[:length] for sid in sids} for length in range(len(SIZES) + 1)}
    return Verifier(torch.tensor(sids), SIZES), sids, prefixes


def all_tuples(length: int) -> list[tuple]:
    return list(itertools.product(*map(range, SIZES[:length])))


def test_is_valid_exactly_for_real_sids(random_verifier):
    verifier, sids, _ = random_verifier
    for sid in all_tuples(3):
        assert verifier.is_valid(sid) == (sid in sids), sid
    assert verifier.is_valid(torch.tensor(sids[0]))
    assert not verifier.is_valid(sids[0][:2])
    assert not verifier.is_valid(sids[0] + (0,))


def test_is_valid_rejects_out_of_range_codes(random_verifier):
    """A code beyond its level's codebook (or negative) must not alias onto a real SID."""
    verifier, sids, _ = random_verifier
    t1, t2, t3 = sids[0]
    aliases = [(t1 + 5, t2 - 1, t3), (t1 - 5, t2 + 1, t3), (t1, t2 + 4, t3 - 1), (t1 + 20 * t3, t2, 0)]
    aliases = [a for a in aliases if a != sids[0]]
    assert all(verifier.encode(torch.tensor(a)) == verifier.encode(torch.tensor(sids[0])) for a in aliases)
    assert [verifier.is_valid(a) for a in aliases] == [False] * len(aliases)


@pytest.mark.parametrize("dense_limit", [DENSE_LIMIT, 0], ids=["dense tables", "sparse rows"])
@pytest.mark.parametrize("length", [1, 2, 3])
def test_nodes_of_finds_exactly_the_valid_prefixes(random_verifier, length, dense_limit):
    _, sids, prefixes = random_verifier
    verifier = Verifier(torch.tensor(sids), SIZES, dense_limit=dense_limit)
    candidates = all_tuples(length)
    nodes = verifier.nodes_of(torch.tensor(candidates))
    assert (nodes >= 0).tolist() == [p in prefixes[length] for p in candidates]
    valid = nodes[nodes >= 0]
    assert sorted(valid.tolist()) == list(range(len(prefixes[length])))  # one node per valid prefix


@pytest.mark.parametrize("dense_limit", [DENSE_LIMIT, 0], ids=["dense tables", "sparse rows"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_child_mask_matches_brute_force(random_verifier, level, dense_limit):
    _, sids, prefixes = random_verifier
    verifier = Verifier(torch.tensor(sids), SIZES, dense_limit=dense_limit)
    parents = all_tuples(level)  # valid and invalid prefixes alike
    nodes = verifier.nodes_of(torch.tensor(parents, dtype=torch.long).reshape(len(parents), level))
    got = verifier.child_mask(nodes, level)
    expected = [[p + (t,) in prefixes[level + 1] for t in range(SIZES[level])] for p in parents]
    assert got.tolist() == expected


def test_verifier_works_for_any_leading_shape(random_verifier):
    verifier, _, _ = random_verifier
    prefixes = torch.tensor(all_tuples(2))  # 20 prefixes of length 2
    flat = verifier.nodes_of(prefixes)
    assert torch.equal(verifier.nodes_of(prefixes.view(2, 10, 2)), flat.view(2, 10))
    assert verifier.child_mask(flat, 2).shape == (20, 3)
    assert (flat >= 0).any() and not (flat >= 0).all()


def test_out_of_range_codes_lead_to_no_node(random_verifier):
    verifier, sids, _ = random_verifier
    t1, t2, _ = sids[0]
    bad = torch.tensor([[t1, SIZES[1]], [t1, -1], [-1, t2], [SIZES[0] + t1, t2]])
    assert verifier.nodes_of(bad).tolist() == [-1, -1, -1, -1]
    assert not verifier.child_mask(verifier.nodes_of(bad), 2).any()


def searchsorted_child_mask(sids: torch.Tensor, sizes: tuple, prefixes: torch.Tensor, level: int) -> torch.Tensor:
    """The verifier the trie replaced, as a reference: each length's valid prefix codes
    (mixed radix) sorted, every child looked up with searchsorted."""
    place = torch.tensor([math.prod(sizes[:j]) for j in range(len(sizes))])
    table = torch.unique((sids[:, : level + 1] * place[: level + 1]).sum(-1))
    children = (prefixes * place[:level]).sum(-1, keepdim=True) + torch.arange(sizes[level]) * place[level]
    index = torch.searchsorted(table, children).clamp(max=len(table) - 1)
    return table[index] == children


@pytest.mark.parametrize("dense_limit", [DENSE_LIMIT, 0], ids=["dense tables", "sparse rows"])
def test_trie_equals_the_searchsorted_verifier_on_every_beauty_prefix(beauty, dense_limit):
    """Every valid prefix of Beauty, and as many invalid ones (a valid prefix with its
    last code changed), give the same child masks as the sorted-codes verifier."""
    catalog = beauty.catalog
    verifier = Verifier(catalog.sids, catalog.codebook_sizes, dense_limit=dense_limit)
    generator = torch.Generator().manual_seed(0)
    for level in range(catalog.levels):
        valid = torch.unique(catalog.sids[:, :level], dim=0) if level else catalog.sids[:1, :0]  # [P, level]
        shifted = valid.clone()
        if level:
            shifted[:, -1] = torch.randint(0, catalog.codebook_sizes[level - 1], (len(valid),), generator=generator)
        prefixes = torch.cat([valid, shifted])
        expected = searchsorted_child_mask(catalog.sids, catalog.codebook_sizes, prefixes, level)
        assert torch.equal(verifier.child_mask(verifier.nodes_of(prefixes), level), expected), level
        assert (verifier.nodes_of(valid) >= 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_trie_equals_the_searchsorted_verifier_on_random_catalogues(seed):
    generator = torch.Generator().manual_seed(seed)
    sizes = tuple(int(c) for c in torch.randint(2, 12, (4,), generator=generator))
    sids = torch.stack([torch.randint(0, c, (300,), generator=generator) for c in sizes], 1)
    for dense_limit in (DENSE_LIMIT, 0, 200):  # 200: dense first levels, sparse below
        verifier = Verifier(sids, sizes, dense_limit=dense_limit)
        for level in range(len(sizes)):
            drawn = [torch.randint(0, c, (500, 1), generator=generator) for c in sizes[:level]]
            prefixes = torch.cat([torch.cat(drawn, 1) if level else sids[:500, :0], sids[:, :level]])
            expected = searchsorted_child_mask(sids, sizes, prefixes, level)
            assert torch.equal(verifier.child_mask(verifier.nodes_of(prefixes), level), expected)
