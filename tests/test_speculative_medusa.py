"""Speculative decoding is lossless (equals beam) whatever the draft; Medusa with heads
that contain beam's choices equals beam in two backbone calls."""

import copy

import pytest
import torch
from conftest import random_batch, random_eval_batch, random_model, training_losses

from bench.data.batches import collate_eval
from bench.data.catalog import build_catalog
from bench.errors import BenchError
from bench.latency import count_calls
from decoders import build_decoder
from decoders.beam import beam_search
from decoders.full_rank import top_items
from decoders.speculative import item_tree


@pytest.fixture(scope="module")
def ntp(catalog):
    return random_model("ntp", catalog, seed=10)


class NegatedLM:
    """A draft that ranks codes the opposite way to the backbone: its drafts always miss."""

    def __init__(self, lm):
        self.lm, self.core = copy.deepcopy(lm), None

    def prefill(self, ids, mask):
        logits, state = self.lm.prefill(ids, mask)
        return -logits, state

    def extend(self, state, tokens):
        logits, state = self.lm.extend(state, tokens)
        return -logits, state

    def select(self, state, rows):
        return self.lm.select(state, rows)


class NegatedAfterTheFirstLevel(NegatedLM):
    """A draft that ranks the first level as the backbone does and the others the opposite
    way: its first level is accepted, its second always misses."""

    def prefill(self, ids, mask):
        return self.lm.prefill(ids, mask)


class AsModel:
    repeat_bias = None  # as a model trained without --repeat-bias

    def __init__(self, lm):
        self.lm = lm


def speculate(catalog, k, ntp, draft, batch, spec="speculative"):
    role = "next_item" if "draft=items" in spec else "draft"  # an item draft plays full_rank's role
    decoder = build_decoder(spec, catalog, k, {"ntp": ntp, role: draft})
    with count_calls(ntp.lm.core) as calls:
        result = decoder.decode(batch)
    return result, calls[0]


def assert_same(a, b):
    assert torch.equal(a.sids, b.sids)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-4)


def beam(catalog, k, ntp, batch, spec="beam"):
    return build_decoder(spec, catalog, k, {"ntp": ntp}).decode(batch)


def test_every_draft_accepted_when_the_draft_is_the_backbone(catalog, ntp):
    batch = random_batch(catalog, users=6, seed=1)
    result, calls = speculate(catalog, 5, ntp, copy.deepcopy(ntp), batch)
    assert_same(result, beam(catalog, 5, ntp, batch))
    assert calls == 1
    # levels 1 and 2 each check the backbone's 5 kept prefixes of 6 users: all drafted
    assert result.stats == {
        "accepted_levels": 6.0 * catalog.levels,
        "fallback_requests": 0.0,
        "backbone_beams_drafted": 60.0,
        "backbone_beams_checked": 60.0,
    }


def test_every_draft_rejected_still_equals_beam(catalog, ntp):
    batch = random_batch(catalog, users=6, seed=2)
    k = 2  # the negated draft's 2 level-1 codes are the backbone's 2 worst of 6
    result, calls = speculate(catalog, k, ntp, AsModel(NegatedLM(ntp.lm)), batch)
    assert_same(result, beam(catalog, k, ntp, batch))
    # only level 1 is accepted (from the prompt); its 2 kept prefixes per user are checked, none drafted,
    # and no later level is the backbone's own beam any more
    assert result.stats == {
        "accepted_levels": 6.0,
        "fallback_requests": 6.0,
        "backbone_beams_drafted": 0.0,
        "backbone_beams_checked": 12.0,
    }
    assert calls == 1 + catalog.levels - 1  # verification, the refed prefixes, the remaining steps


def test_a_miss_after_an_accepted_level_refeeds_the_longer_prefixes_and_still_equals_beam(catalog, ntp):
    batch = random_batch(catalog, users=6, seed=4)
    k = 2
    result, calls = speculate(catalog, k, ntp, AsModel(NegatedAfterTheFirstLevel(ntp.lm)), batch)
    assert_same(result, beam(catalog, k, ntp, batch))
    assert result.stats["accepted_levels"] == 6.0 * 2 and result.stats["fallback_requests"] == 6.0
    assert calls == 2  # verification, then the refed 2-code prefixes give the last level


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 4, 9])
def test_random_drafts_equal_beam(catalog, seed, k):
    backbone = random_model("ntp", catalog, seed=20 + seed)
    draft = random_model("ntp", catalog, seed=40 + seed, backbone="qwen-micro")
    batch = random_batch(catalog, users=7, seed=seed)
    result, _ = speculate(catalog, k, backbone, draft, batch)
    assert_same(result, beam(catalog, k, backbone, batch))


def test_sometimes_accepted_equals_beam(catalog, ntp):
    """A draft close to the backbone: some requests pass, some fall back."""
    draft = random_model("ntp", catalog, seed=10)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = random_batch(catalog, users=12, seed=3)
    result, _ = speculate(catalog, 4, ntp, draft, batch)
    assert_same(result, beam(catalog, 4, ntp, batch))
    assert 0 < result.stats["fallback_requests"] < 12


def test_a_wider_draft_beam_is_accepted_more_often_and_stays_lossless(catalog, ntp):
    draft = random_model("ntp", catalog, seed=10)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = random_batch(catalog, users=12, seed=3)
    narrow, _ = speculate(catalog, 3, ntp, draft, batch)
    wide, _ = speculate(catalog, 3, ntp, draft, batch, "speculative:draft_beam=12")
    assert_same(wide, beam(catalog, 3, ntp, batch))
    assert wide.stats["accepted_levels"] > narrow.stats["accepted_levels"]
    with pytest.raises(BenchError, match="draft_beam=2 is below K=3"):
        speculate(catalog, 3, ntp, draft, batch, "speculative:draft_beam=2")


def test_relaxed_acceptance_equals_beam_when_the_draft_is_the_backbone(catalog, ntp):
    batch = random_batch(catalog, users=6, seed=1)
    result, calls = speculate(catalog, 5, ntp, copy.deepcopy(ntp), batch, "speculative:accept=relaxed")
    assert_same(result, beam(catalog, 5, ntp, batch))
    assert calls == 1


@pytest.mark.parametrize("noise", [0.1, 0.5])
def test_relaxed_acceptance_keeps_one_backbone_pass_and_only_drafted_prefixes(catalog, ntp, noise):
    draft = random_model("ntp", catalog, seed=10)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn_like(p))
    batch = random_batch(catalog, users=12, seed=4)
    k = 4
    strict, _ = speculate(catalog, k, ntp, draft, batch)
    relaxed, calls = speculate(catalog, k, ntp, draft, batch, "speculative:accept=relaxed")
    assert calls == 1 and relaxed.stats["fallback_requests"] == 0
    trail = []
    beam_search(draft.lm, catalog, batch.history, batch.mask, k, False, trail)
    drafted = trail[catalog.levels - 2][0]  # [B, k, L-1] the draft's kept prefixes one level short of a SID
    for user in range(len(batch)):
        allowed = {tuple(p) for p in drafted[user].tolist()}
        assert {tuple(sid[:-1]) for sid in relaxed.sids[user].tolist()} <= allowed
    assert strict.stats["fallback_requests"] > 0  # the draft did miss, so relaxed had something to relax


def test_constrained_speculative_equals_constrained_beam(catalog, ntp):
    draft = random_model("ntp", catalog, seed=3, backbone="qwen-micro")
    batch = random_batch(catalog, users=6, seed=4)
    result, _ = speculate(catalog, 6, ntp, draft, batch, "speculative:constrained")
    assert_same(result, beam(catalog, 6, ntp, batch, "beam:constrained"))


def test_an_item_tree_holds_each_drafted_prefix_once_below_its_ancestors():
    """Items 3, 0, 1, 4 drafted on codebooks (2, 2, 2): depth 1 holds (0) and (1), depth 2
    (0,0), (1,0) and (1,1); blocks of 4 nodes, the rest padding that sees only itself."""
    sids = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 1, 1]])
    catalog = build_catalog("toy", [str(i) for i in range(5)], sids.tolist(), codebook_sizes=(2, 2, 2))
    tokens, tree_mask, codes = item_tree(catalog, sids[[3, 0, 1, 4]].unsqueeze(0))
    first, second = catalog.offsets[0], catalog.offsets[1]
    assert codes.tolist() == [[0, 1, -1, -1, 0, 1, 3, -1]]  # prefixes as mixed-radix integers
    assert tokens[0, [0, 1, 4, 5, 6]].tolist() == [first, first + 1, second, second, second + 1]
    sees = {node: tree_mask[0, node].nonzero().flatten().tolist() for node in range(8)}
    assert sees == {0: [0], 1: [1], 2: [2], 3: [3], 4: [0, 4], 5: [1, 5], 6: [1, 6], 7: [7]}


@pytest.fixture(scope="module")
def items_draft(catalog):
    return random_model("next_item", catalog, seed=5, backbone="sasrec-tiny")


def test_an_item_draft_is_lossless_and_every_item_drafted_accepts_every_level(catalog, ntp, items_draft):
    batch = random_batch(catalog, users=6, seed=4)
    few, _ = speculate(catalog, 4, ntp, items_draft, batch, "speculative:draft=items:draft_beam=8")
    assert_same(few, beam(catalog, 4, ntp, batch))
    assert few.stats["fallback_requests"] > 0
    spec = f"speculative:draft=items:draft_beam={catalog.num_items}:constrained"  # every real prefix drafted
    every, calls = speculate(catalog, 4, ntp, items_draft, batch, spec)
    assert_same(every, beam(catalog, 4, ntp, batch, "beam:constrained"))
    assert every.stats["fallback_requests"] == 0 and calls == 1


def test_relaxed_acceptance_with_an_item_draft_keeps_the_drafted_items_prefixes(catalog, ntp, items_draft):
    batch = random_batch(catalog, users=12, seed=6)
    relaxed, calls = speculate(catalog, 4, ntp, items_draft, batch, "speculative:draft=items:accept=relaxed")
    assert calls == 1
    _, drafted = top_items(items_draft.lm, batch, 4)  # [B, 4] the item model's best items
    for user, items in enumerate(drafted.tolist()):
        allowed = {tuple(catalog.sids[item, :-1].tolist()) for item in items}
        assert {tuple(sid[:-1]) for sid in relaxed.sids[user].tolist()} <= allowed
    spec = f"speculative:draft=items:draft_beam={catalog.num_items}:accept=relaxed:constrained"
    every, _ = speculate(catalog, 4, ntp, items_draft, batch, spec)  # every real prefix drafted: beam's own choice
    assert_same(every, beam(catalog, 4, ntp, batch, "beam:constrained"))
    with pytest.raises(BenchError, match=f"draft_beam=61 is above the catalogue's {catalog.num_items} items"):
        speculate(catalog, 4, ntp, items_draft, batch, "speculative:draft=items:draft_beam=61")


def agreement(result) -> float:
    return result.stats["backbone_beams_drafted"] / result.stats["backbone_beams_checked"]


def test_an_aligned_draft_learns_the_backbones_beams_and_stays_lossless(catalog):
    """Distilled along the backbone's beams on some histories, the draft keeps more of the
    backbone's beams on them (the teacher is first trained a little, so that it puts its
    mass on each level's codes as a trained model does)."""
    teacher = random_model("ntp", catalog, seed=10)
    training_losses(teacher, "ntp", steps=30)
    teacher.eval()
    gen = torch.Generator().manual_seed(0)  # the windows training_losses trains on
    windows = [torch.randint(0, catalog.num_items, (4,), generator=gen).tolist() for _ in range(16)]
    batch = collate_eval([{"user": u, "history": w[:-1], "target": w[-1]} for u, w in enumerate(windows)], catalog)
    draft = random_model("ntp", catalog, seed=41, backbone="qwen-micro")
    before, _ = speculate(catalog, 4, teacher, draft, batch.prompt)
    draft.distil_from(teacher)
    teacher_weights = {n: p.clone() for n, p in teacher.named_parameters()}
    losses = training_losses(draft, "ntp", steps=60)
    assert losses[-1] < 0.1 * losses[0]
    assert all(torch.equal(teacher_weights[n], p) for n, p in teacher.named_parameters())  # the teacher stays frozen
    assert not any(name.startswith("teacher") for name in draft.state_dict())  # checkpoints hold the draft only
    after, _ = speculate(catalog, 4, teacher, draft.eval(), batch.prompt)
    assert agreement(after) > agreement(before) + 0.1
    assert_same(after, beam(catalog, 4, teacher, batch.prompt))


def test_an_aligned_draft_asks_the_teacher_once_per_history(catalog, ntp, monkeypatch):
    """The teacher is frozen: its trees are searched in the first epoch and read back
    after, with the loss they give unchanged; past the cache's bound rows are recomputed."""
    from models import objectives

    gen = torch.Generator().manual_seed(5)
    windows = [torch.randint(0, catalog.num_items, (1 + n % 4,), generator=gen).tolist() + [0] for n in range(16)]
    searched = []
    tree_forward = ntp.lm.tree_forward
    monkeypatch.setattr(ntp.lm, "tree_forward", lambda *a: searched.append(a[0].shape[0]) or tree_forward(*a))

    def aligned_draft():
        draft = random_model("ntp", catalog, seed=41, backbone="qwen-micro")
        draft.distil_from(ntp)
        return draft.eval()

    draft = aligned_draft()
    first = objectives.loss("ntp", draft, draft.collate(windows[:8]))
    again = objectives.loss("ntp", draft, draft.collate(windows[:8]))
    assert searched == [8] and torch.equal(first, again)
    mixed = draft.collate(windows[4:12])  # 4 histories cached, 4 new
    assert torch.allclose(objectives.loss("ntp", draft, mixed), objectives.loss("ntp", aligned_draft(), mixed), atol=1e-6)
    assert searched == [8, 4, 8] and len(draft.teacher_cache) == 12
    tokens, tree_mask, codes, outcomes = next(iter(draft.teacher_cache.values()))
    monkeypatch.setattr(objectives, "TEACHER_CACHE_BYTES", 3 * sum(t.nbytes for t in (tokens, tree_mask, codes, *outcomes)))
    bounded = aligned_draft()
    assert torch.equal(objectives.loss("ntp", bounded, draft.collate(windows[:8])), first)
    assert len(bounded.teacher_cache) == 3


def test_an_aligned_draft_is_distilled_from_an_ntp_model_only(catalog, ntp):
    nezha = random_model("nezha", catalog, seed=3)
    with pytest.raises(BenchError, match="only a decoder-only NTP model is distilled"):
        random_model("ntp", catalog, seed=4, backbone="qwen-micro").distil_from(nezha)


@pytest.fixture(scope="module")
def medusa(catalog, ntp):
    model = random_model("medusa", catalog, seed=11)
    model.lm.load_state_dict(ntp.lm.state_dict())
    return model


class OracleHeads(torch.nn.Module):
    """Medusa heads that rank first the codes beam search keeps at each level."""

    def __init__(self, chosen):  # chosen[j]: [B, C_{j+1}] bool
        super().__init__()
        self.chosen = chosen

    def forward(self, hidden):
        return [c.float() * 10 - 5 for c in self.chosen]


def medusa_decode(catalog, k, model, batch, spec):
    decoder = build_decoder(spec, catalog, k, {"medusa": model})
    with count_calls(model.lm.core) as calls:
        result = decoder.decode(batch)
    return result, calls[0]


def test_medusa_with_an_oracle_head_equals_beam_in_two_calls(catalog, ntp, medusa):
    batch = random_batch(catalog, users=6, seed=5)
    k = 4
    trail = []
    expected = beam_search(ntp.lm, catalog, batch.history, batch.mask, k, False, trail)
    chosen = []
    for level in range(1, catalog.levels):
        kept = trail[level][0][:, :, level]  # [B, K] codes kept at this level
        chosen.append(torch.zeros(len(batch), catalog.codebook_sizes[level], dtype=torch.bool).scatter(1, kept, True))
    widths = [k] + [int(c.sum(1).max()) for c in chosen[:-1]] + [0]
    assert widths[1] < catalog.codebook_sizes[1]  # a real tree, not everything
    heads, medusa.medusa = medusa.medusa, OracleHeads(chosen)
    try:
        result, calls = medusa_decode(catalog, k, medusa, batch, "medusa:tree=" + "x".join(map(str, widths)))
    finally:
        medusa.medusa = heads
    assert calls == 2
    assert torch.equal(result.sids, expected[0])
    torch.testing.assert_close(result.scores, expected[1], atol=1e-4, rtol=1e-4)


def test_medusa_with_the_whole_tree_equals_beam(catalog, ntp, medusa):
    batch = random_batch(catalog, users=5, seed=6)
    sizes = "x".join(map(str, catalog.codebook_sizes))
    result, calls = medusa_decode(catalog, 7, medusa, batch, f"medusa:tree={sizes}")
    assert calls == 2
    assert_same(result, beam(catalog, 7, ntp, batch))


def test_medusa_with_untrained_heads_loses_candidates_not_calls(catalog, ntp, medusa):
    batch = random_batch(catalog, users=5, seed=7)
    narrow, calls = medusa_decode(catalog, 4, medusa, batch, "medusa:tree=4x1x0")
    assert calls == 2
    assert narrow.sids.shape == (5, 4, catalog.levels)
    full = beam(catalog, 4, ntp, batch)
    assert not torch.equal(narrow.sids, full.sids)
    assert (narrow.scores <= full.scores + 1e-4).all()  # beam's k-th best is never beaten by a subset


def test_medusa_options_are_checked(catalog, medusa):
    with pytest.raises(BenchError, match="has 2 widths"):
        build_decoder("medusa:tree=4x4", catalog, 4, {"medusa": medusa})
    with pytest.raises(BenchError, match="between 1 and 5"):
        build_decoder("medusa:tree=4x9x0", catalog, 4, {"medusa": medusa})
    with pytest.raises(BenchError, match="trained with mode 'frozen'"):
        build_decoder("medusa:mode=joint", catalog, 4, {"medusa": medusa})


@pytest.mark.parametrize("mode", ["frozen", "joint"])
def test_medusa_training_freezes_the_backbone_only_in_frozen_mode(catalog, mode):
    model = random_model("medusa", catalog, seed=12, medusa_mode=mode)
    before = {n: p.clone() for n, p in model.lm.named_parameters()}
    losses = training_losses(model, "medusa", steps=20)
    assert losses[-1] < 0.8 * losses[0]
    changed = any(not torch.equal(before[n], p) for n, p in model.lm.named_parameters())
    assert changed == (mode == "joint")
    model.eval().validation_step(random_eval_batch(catalog, users=4), 0)  # validates with the decoder of its own mode
    assert 0 <= float(model.val_recall.compute()) <= 1


def test_an_aligned_draft_is_trained_without_the_one_hot_settings_it_has_no_use_for():
    """Distilled on its backbone's distributions (a KL), an aligned draft takes neither
    the item teacher nor label smoothing nor the seen-item unlikelihood: the same draft
    whatever they are."""
    from bench.settings import ModelSettings
    from decoders import REGISTRY, parse_spec

    name, options = parse_spec("speculative:draft=aligned")
    plain = REGISTRY[name].requests(options, ModelSettings(backbone="qwen-micro", draft_backbone="qwen-micro"))
    smoothed = REGISTRY[name].requests(
        options,
        ModelSettings(backbone="qwen-micro", draft_backbone="qwen-micro", label_smoothing=0.1, seen_unlikelihood=0.5),
    )
    assert smoothed["ntp"].settings.label_smoothing == 0.1  # the backbone trains with them
    assert smoothed["ntp"].settings.seen_unlikelihood == 0.5
    assert smoothed["draft"].settings == plain["draft"].settings
    assert smoothed["draft"].settings.label_smoothing == 0.0
    assert smoothed["draft"].settings.seen_unlikelihood == 0.0
