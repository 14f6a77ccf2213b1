"""Decoders: equal outputs where they must be equal, one backbone call for NEZHA,
only real items where the verifier is on."""

import pytest
import torch
from conftest import random_batch, random_model

from bench.errors import BenchError
from bench.latency import count_calls
from decoders import REGISTRY, build_decoder, parse_spec


@pytest.fixture(scope="module")
def ntp(catalog):
    return random_model("ntp", catalog)


@pytest.fixture(scope="module")
def nezha(catalog):
    return random_model("nezha", catalog)


def decode(spec, catalog, k, models, batch):
    decoder = build_decoder(spec, catalog, k, models)
    with count_calls(decoder.backbone_core) as calls:
        result = decoder.decode(batch)
    return result, calls[0]


def valid_rows(catalog, sids):
    return torch.tensor([[catalog.verifier.is_valid(sid) for sid in row] for row in sids.tolist()])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_with_k1_equals_greedy(catalog, ntp, seed):
    batch = random_batch(catalog, seed=seed)
    greedy, _ = decode("greedy", catalog, 1, {"ntp": ntp}, batch)
    beam, _ = decode("beam", catalog, 1, {"ntp": ntp}, batch)
    assert torch.equal(greedy.sids, beam.sids)
    torch.testing.assert_close(greedy.scores, beam.scores)


@pytest.mark.parametrize("k,constrained", [(1, False), (5, False), (12, False), (5, True), (12, True)])
def test_beam_equals_huggingface_generate(catalog, ntp, k, constrained):
    batch = random_batch(catalog, users=5, seed=k)
    spec = ":constrained" if constrained else ""
    ours, calls = decode("beam" + spec, catalog, k, {"ntp": ntp}, batch)
    theirs, hf_calls = decode("hf_beam" + spec, catalog, k, {"ntp": ntp}, batch)
    assert ours.sids.shape == (5, k, catalog.levels)
    assert torch.equal(ours.sids, theirs.sids)
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=1e-4)
    assert calls == hf_calls == catalog.levels


@pytest.mark.parametrize("backbone,settings", [("llama-tiny", {}), ("t5-tiny", {}), ("t5-tiny", {"encoder": "causal"})])
@pytest.mark.parametrize("constrained", [False, True])
def test_beam_equals_huggingface_generate_on_the_other_backbones(catalog, backbone, settings, constrained):
    """Llama's beams share the prompt's cache (SharedPrompt), T5's copy it (CopiedCache);
    a causal T5 encoder masks the same way inside generate."""
    model = random_model("ntp", catalog, seed=4, backbone=backbone, **settings)
    batch = random_batch(catalog, users=5, seed=4)
    spec = ":constrained" if constrained else ""
    ours, _ = decode("beam" + spec, catalog, 8, {"ntp": model}, batch)
    theirs, _ = decode("hf_beam" + spec, catalog, 8, {"ntp": model}, batch)
    assert torch.equal(ours.sids, theirs.sids)
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "k,width,constrained,backbone",
    [(1, 4, False, None), (5, 9, False, None), (5, 12, True, None), (5, 9, True, "t5-tiny")],
)
def test_wider_beam_equals_huggingface_generate_with_as_many_beams(catalog, ntp, k, width, constrained, backbone):
    """beam:width=N keeps N beams before the last level and the best K at it, which is
    what generate(num_beams=N, num_return_sequences=K) returns (T5: beams on copied caches);
    it finds other lists than K beams do, and width=K is beam itself."""
    model = random_model("ntp", catalog, seed=4, backbone=backbone) if backbone else ntp
    batch = random_batch(catalog, users=5, seed=width)
    spec = f"{':constrained' if constrained else ''}:width={width}"
    ours, calls = decode("beam" + spec, catalog, k, {"ntp": model}, batch)
    theirs, _ = decode("hf_beam" + spec, catalog, k, {"ntp": model}, batch)
    assert ours.sids.shape == (5, k, catalog.levels)
    assert torch.equal(ours.sids, theirs.sids)
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=1e-4)
    assert calls == catalog.levels
    narrow, _ = decode("beam" + spec.replace(f"width={width}", f"width={k}"), catalog, k, {"ntp": model}, batch)
    default, _ = decode("beam" + spec.split(":width")[0], catalog, k, {"ntp": model}, batch)
    assert torch.equal(narrow.sids, default.sids)
    assert not torch.equal(ours.sids, default.sids)


def test_beam_as_wide_as_the_code_space_is_exhaustive(catalog, ntp):
    """With a width of every prefix before the last level, beam scores every SID: it
    returns the top-K of the backbone's joint log-probabilities over the whole code space."""
    batch = random_batch(catalog, users=2, seed=8)
    result, _ = decode("beam:width=30", catalog, 4, {"ntp": ntp}, batch)  # 6 x 5 prefixes of 2 codes
    grid = torch.cartesian_prod(*[torch.arange(s) for s in catalog.codebook_sizes])  # [240, L]
    levels = catalog.levels
    for user in range(2):
        history = batch.history[user][batch.mask[user].bool()]
        tokens = torch.cat([history.expand(len(grid), -1), grid + torch.tensor(catalog.offsets)], dim=1)
        with torch.no_grad():
            log_probs = torch.log_softmax(ntp.lm.logits(tokens, torch.ones_like(tokens)).float(), -1)
        steps = log_probs[:, len(history) - 1 : len(history) - 1 + levels]  # [240, L, V]
        joint = steps.gather(2, tokens[:, len(history) :].unsqueeze(-1)).squeeze(-1).sum(1)
        best = joint.topk(4)
        assert torch.equal(grid[best.indices], result.sids[user])
        torch.testing.assert_close(best.values, result.scores[user], atol=1e-4, rtol=1e-4)


def test_beam_width_below_k_or_beyond_the_prefixes_is_refused(catalog, ntp):
    with pytest.raises(BenchError, match="beam: width=3 is below K=5; it must be at least K"):
        build_decoder("beam:width=3", catalog, 5, {"ntp": ntp})
    with pytest.raises(BenchError, match="hf_beam: width=31 is above the 30 prefixes of the levels before the last"):
        build_decoder("hf_beam:width=31", catalog, 5, {"ntp": ntp})
    assert build_decoder("beam:width=30", catalog, 5, {"ntp": ntp}).options.width == 30
    assert build_decoder("beam", catalog, 5, {"ntp": ntp}).options.width == 5  # what records hold


def test_beams_share_the_prompt_cache_instead_of_copying_it(catalog, ntp):
    """After a beam search the cache still holds one row per user: the prompt once and
    K generated columns per decode step, never K copies of the prompt."""
    from decoders.beam import SharedPrompt, continue_beam

    batch, k = random_batch(catalog, users=5, seed=1), 6
    logits, state = ntp.lm.prefill(batch.history, batch.mask)
    steps = SharedPrompt(ntp.lm, state)
    prefixes = torch.zeros(5, 1, 0, dtype=torch.long)
    continue_beam(catalog, logits, steps, logits.new_zeros(5, 1), prefixes, k, constrained=False)
    keys = steps.state.cache.layers[0].keys  # [B, kv heads, T + K * (L - 1), head dim]
    assert keys.shape[0] == 5 and keys.shape[2] == batch.history.shape[1] + k * (catalog.levels - 1)


def test_beam_scores_are_sorted_sums_of_log_probs(catalog, ntp):
    batch = random_batch(catalog, users=3)
    result, _ = decode("beam", catalog, 8, {"ntp": ntp}, batch)
    assert torch.all(result.scores[:, :-1] >= result.scores[:, 1:])
    # rescoring the returned SIDs with one teacher-forced pass gives the same scores
    user = 0
    history = batch.history[user][batch.mask[user].bool()]
    for rank in range(8):
        tokens = result.sids[user, rank] + torch.tensor(catalog.offsets)
        ids = torch.cat([history, tokens]).unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(ntp.lm.logits(ids, torch.ones_like(ids)), -1)[0]
        total = sum(logp[len(history) - 1 + level, tokens[level]] for level in range(catalog.levels))
        assert float(total) == pytest.approx(float(result.scores[user, rank]), abs=1e-4)


def test_constrained_beam_returns_only_real_items(catalog, ntp):
    batch = random_batch(catalog, users=8, seed=3)
    result, _ = decode("beam:constrained", catalog, 10, {"ntp": ntp}, batch)
    assert valid_rows(catalog, result.sids).all()


def test_left_padding_does_not_change_results(catalog, ntp, nezha):
    batch = random_batch(catalog, users=6, seed=4)
    for spec, models in (("beam", {"ntp": ntp}), ("nezha", {"nezha": nezha})):
        together, _ = decode(spec, catalog, 4, models, batch)
        for user in range(len(batch)):
            keep = batch.mask[user].bool()
            keep_items = batch.items_mask[user].bool()
            alone = type(batch)(
                batch.history[user][keep][None],
                batch.mask[user][keep][None],
                batch.items[user][keep_items][None],
                batch.items_mask[user][keep_items][None],
            )
            single, _ = decode(spec, catalog, 4, models, alone)
            assert torch.equal(single.sids[0], together.sids[user]), spec
            torch.testing.assert_close(single.scores[0], together.scores[user], atol=1e-4, rtol=1e-4)


def test_nezha_calls_the_backbone_once_and_returns_real_items(catalog, nezha):
    batch = random_batch(catalog, users=8, seed=5)
    result, calls = decode("nezha", catalog, 10, {"nezha": nezha}, batch)
    assert calls == 1
    assert result.sids.shape == (8, 10, catalog.levels)
    assert valid_rows(catalog, result.sids).all()
    assert torch.all(result.scores[:, :-1] >= result.scores[:, 1:])


def test_nezha_without_verifier_can_hallucinate(catalog, nezha):
    batch = random_batch(catalog, users=8, seed=5)
    result, _ = decode("nezha:verifier=off", catalog, 10, {"nezha": nezha}, batch)
    # 60 items among 240 code combinations: an unguided head must leave the catalogue
    assert not valid_rows(catalog, result.sids).all()


def test_nezha_beam_ranks_by_head_scores(catalog, nezha):
    """Unconstrained head beam with a beam as wide as the code space is exhaustive:
    its best SID is the argmax of the head's joint score over all SIDs."""
    batch = random_batch(catalog, users=2, seed=6)
    result, _ = decode("nezha:verifier=off:head_beam=30", catalog, 3, {"nezha": nezha}, batch)  # 6 x 5 prefixes
    with torch.no_grad():
        h0_all, hp_all = nezha.lm.nezha_states(batch.history, batch.mask, torch.tensor(catalog.placeholder_tokens))
        grid = torch.cartesian_prod(*[torch.arange(s) for s in catalog.codebook_sizes])  # [240, 3]
        for user in range(2):
            h0 = h0_all[user].expand(len(grid), -1)
            hp = hp_all[user].expand(len(grid), -1, -1)
            logits = nezha.head.teacher_forced_logits(h0, hp, grid)
            joint = sum(torch.log_softmax(lg, -1).gather(1, grid[:, [lv]]).squeeze(1) for lv, lg in enumerate(logits))
            best = joint.topk(3)
            assert torch.equal(grid[best.indices], result.sids[user])
            torch.testing.assert_close(best.values, result.scores[user], atol=1e-4, rtol=1e-4)


def test_verified_nezha_ranks_the_real_items_by_head_scores(catalog, nezha):
    """Verified at every level with an exhaustive head beam, NEZHA returns the top-K of
    the catalogue's own SIDs by the head's joint score (read off the trie's leaves)."""
    batch = random_batch(catalog, users=2, seed=6)
    result, _ = decode("nezha:head_beam=30", catalog, 5, {"nezha": nezha}, batch)
    sids = catalog.sids  # [60, 3]
    with torch.no_grad():
        h0_all, hp_all = nezha.lm.nezha_states(batch.history, batch.mask, torch.tensor(catalog.placeholder_tokens))
        for user in range(2):
            h0, hp = h0_all[user].expand(len(sids), -1), hp_all[user].expand(len(sids), -1, -1)
            logits = nezha.head.teacher_forced_logits(h0, hp, sids)
            joint = sum(torch.log_softmax(lg, -1).gather(1, sids[:, [lv]]).squeeze(1) for lv, lg in enumerate(logits))
            best = joint.topk(5)
            assert torch.equal(sids[best.indices], result.sids[user])
            torch.testing.assert_close(best.values, result.scores[user], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["beam:constrained", "hf_beam:constrained", "nezha"])
def test_k_above_candidates_leaves_empty_slots(catalog, ntp, nezha, spec):
    batch = random_batch(catalog, users=2, seed=7)
    result, _ = decode(spec, catalog, catalog.num_items + 5, {"ntp": ntp, "nezha": nezha}, batch)
    empty = (result.sids < 0).all(-1)
    assert empty.sum(1).tolist() == [5, 5]
    assert torch.isinf(result.scores[empty]).all()
    assert valid_rows(catalog, result.sids[~empty].unsqueeze(0)).all()
    assert len({tuple(sid) for sid in result.sids[0][~empty[0]].tolist()}) == catalog.num_items


def test_decoder_specs_are_parsed_and_checked():
    name, options = parse_spec("beam:constrained")
    assert (name, options.constrained) == ("beam", True)
    name, options = parse_spec("nezha:verifier=last:head_beam=40")
    assert (name, options.verifier, options.head_beam, options.transition) == ("nezha", "last", 40, None)
    with pytest.raises(BenchError, match="unknown decoder 'bream'"):
        parse_spec("bream")
    with pytest.raises(BenchError, match="unknown option 'widht'"):
        parse_spec("beam:widht=3")
    with pytest.raises(BenchError, match="option 'head_beam' in 'nezha:head_beam=wide': 'wide' is not an integer"):
        parse_spec("nezha:head_beam=wide")
    with pytest.raises(BenchError, match="head_beam -1: must be at least 0"):
        parse_spec("nezha:head_beam=-1")
    with pytest.raises(BenchError, match="needs a value: nezha:verifier=VALUE"):
        parse_spec("nezha:verifier")


def test_an_option_value_named_none_is_that_value_not_unset():
    """transition=none is the ablation without a transition cell, not the model's own cell."""
    from bench.settings import ModelSettings

    _, options = parse_spec("nezha:transition=none")
    assert options.transition == "none"
    assert parse_spec("nezha:transition=null")[1].transition is None
    request = REGISTRY["nezha"].requests(options, ModelSettings(transition="rnn"))["nezha"]
    assert request.settings.transition == "none"


def test_nezha_options_are_checked(catalog, nezha):
    with pytest.raises(BenchError, match="'sometimes' is not one of every, last, off"):
        build_decoder("nezha:verifier=sometimes", catalog, 4, {"nezha": nezha})
    with pytest.raises(BenchError, match="'lstm' is not one of rnn, gru, none"):
        parse_spec("nezha:transition=lstm")
    with pytest.raises(BenchError, match="trained with transition=rnn"):
        build_decoder("nezha:transition=gru", catalog, 4, {"nezha": nezha})
    with pytest.raises(BenchError, match="below K"):
        build_decoder("nezha:head_beam=2", catalog, 4, {"nezha": nezha})
    with pytest.raises(BenchError, match="head_beam=31 is above the 30 prefixes of the levels before the last"):
        build_decoder("nezha:head_beam=31", catalog, 4, {"nezha": nezha})


def test_verifier_only_at_the_last_level_returns_no_invalid_sid_but_may_leave_slots_empty(catalog, nezha):
    batch = random_batch(catalog, users=40, seed=8)
    last, _ = decode("nezha:verifier=last", catalog, 1, {"nezha": nezha}, batch)
    every, _ = decode("nezha:verifier=every", catalog, 1, {"nezha": nezha}, batch)
    present = (last.sids >= 0).all(-1)
    assert valid_rows(catalog, last.sids.clamp(min=0))[present].all()
    assert (~present).sum() > 0 and (every.sids >= 0).all()


def test_wider_head_beam_never_finds_worse_candidates(catalog, nezha):
    batch = random_batch(catalog, users=8, seed=9)
    narrow, _ = decode("nezha:verifier=off", catalog, 3, {"nezha": nezha}, batch)
    wide, _ = decode("nezha:verifier=off:head_beam=30", catalog, 3, {"nezha": nezha}, batch)
    assert (wide.scores >= narrow.scores - 1e-5).all()
    assert (wide.scores > narrow.scores + 1e-5).any()


def test_transition_none_predicts_levels_independently(catalog):
    model = random_model("nezha", catalog, seed=3, transition="none")
    batch = random_batch(catalog, users=4, seed=10)
    result, _ = decode("nezha:verifier=off:transition=none", catalog, 1, {"nezha": model}, batch)
    with torch.no_grad():
        h0, hp = model.lm.nezha_states(batch.history, batch.mask, torch.tensor(catalog.placeholder_tokens))
        argmax = torch.stack(
            [model.head.level_logits(level, h0, hp[:, level]).argmax(-1) for level in range(catalog.levels)], dim=-1
        )
    assert torch.equal(result.sids[:, 0], argmax)


def test_without_placeholders_the_head_reads_the_last_history_state(catalog):
    model = random_model("nezha", catalog, seed=4, placeholders=False)
    batch = random_batch(catalog, users=4, seed=11)
    decoder = build_decoder("nezha:placeholders=off", catalog, 5, {"nezha": model})
    assert decoder.placeholder_tokens(batch.history.device) is None
    with torch.no_grad():
        h0, states = model.lm.nezha_states(batch.history, batch.mask, None)
        torch.testing.assert_close(h0, model.lm.hidden(batch.history, batch.mask)[:, -1])
    assert states is None
    result, calls = decode("nezha:placeholders=off", catalog, 5, {"nezha": model}, batch)
    assert calls == 1 and valid_rows(catalog, result.sids).all()
