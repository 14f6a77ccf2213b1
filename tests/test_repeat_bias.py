"""The NTP model's repeat bias (models/repeat.py): offsets exactly on the codes that
continue a prefix towards an item of the history, the same in training and in every
decoder that reads the model, and refused where a decoder would leave them out."""

from collections import defaultdict
from dataclasses import replace

import pytest
import torch
from conftest import random_model

from bench.data.batches import collate_eval, pad_rows
from bench.errors import BenchError
from bench.settings import ModelSettings
from decoders import build_decoder, plan
from models import objectives
from models.repeat import REPEAT_SCALE

OFFSETS = [0.7, -1.5, -4.0]  # per level, in logits: strong enough to move the lists


def with_offsets(model, offsets):
    """The NTP model `model` with a repeat bias of these offsets per level (in logits)."""
    biased = random_model("ntp", model.catalog, repeat_bias=True)
    state = {**model.state_dict(), "repeat_bias.per_level": torch.tensor(offsets) / REPEAT_SCALE}
    biased.load_state_dict(state)
    return biased.eval()


@pytest.fixture(scope="module")
def plain(catalog):
    return random_model("ntp", catalog, seed=5)


@pytest.fixture(scope="module")
def biased(plain):
    return with_offsets(plain, OFFSETS)


@pytest.fixture(scope="module")
def related(catalog):
    """Items that share their first code with another item, and pairs that share two."""
    by_prefix = defaultdict(list)
    for item, sid in enumerate(catalog.sids.tolist()):
        by_prefix[tuple(sid[:1])].append(item)
        by_prefix[tuple(sid[:2])].append(item)
    first = next(items for prefix, items in by_prefix.items() if len(prefix) == 1 and len(items) >= 3)
    siblings = next(items for prefix, items in by_prefix.items() if len(prefix) == 2 and len(items) >= 2)
    return first, siblings


def windows_of(related):
    (a, b, c, *_), (s, t, *_) = related
    # shared first codes, siblings (shared first two codes), an item taken twice, a window of one
    return [[a, s, b, t, a], [t, c], [s, s, b, t, c, s], [b]]


def prompt_of(catalog, histories):
    """What decoders get for these histories (left-padded)."""
    return collate_eval([{"user": u, "history": h, "target": 0} for u, h in enumerate(histories)], catalog).prompt


def test_training_offsets_are_exactly_those_of_a_hand_loop(catalog, biased, related):
    windows = windows_of(related)
    batch = biased.collate(windows)
    tokens, mask = batch["input_ids"], batch["attention_mask"]
    logits = torch.zeros(len(windows), tokens.shape[1], catalog.vocab_size)
    with torch.no_grad():
        biased.repeat_bias.add_to_window(logits, tokens, mask)
    expected = torch.zeros_like(logits)
    levels, sids = catalog.levels, catalog.sids.tolist()
    for row, items in enumerate(windows):
        for j in range(1, len(items)):
            target = sids[items[j]]
            for level in range(levels):
                codes = {sids[h][level] for h in items[:j] if sids[h][:level] == target[:level]}
                for code in codes:
                    expected[row, j * levels + level - 1, catalog.offsets[level] + code] = OFFSETS[level]
    torch.testing.assert_close(logits, expected)
    assert (expected != 0).sum() > 20  # the windows reach every level


def test_decode_offsets_are_exactly_those_of_a_hand_loop(catalog, biased, related):
    histories = windows_of(related)
    prompt = prompt_of(catalog, histories)
    repeats = biased.repeat_bias.for_prompt(prompt.history, prompt.mask)  # left-padded
    sids = catalog.sids.tolist()
    taken = {sids[h][0] for history in histories for h in history}
    outsider = next(item for item, sid in enumerate(sids) if sid[0] not in taken)  # continues towards no item
    for level in range(catalog.levels):
        beams = [[*h[:2], outsider] for h in (*histories[:3], histories[3] * 2)]
        prefixes = catalog.sids[torch.tensor(beams), :level]  # [4, 3, l]
        logits = torch.zeros(4, 3, catalog.vocab_size)
        repeats.add(logits, prefixes)
        expected = torch.zeros_like(logits)
        for user, history in enumerate(histories):
            for beam in range(3):
                prefix = prefixes[user, beam].tolist()
                for code in {sids[h][level] for h in history if sids[h][:level] == prefix}:
                    expected[user, beam, catalog.offsets[level] + code] = OFFSETS[level]
        torch.testing.assert_close(logits, expected)
        assert level == 0 or not logits[:, 2].any()


def test_beam_scores_are_the_training_pass_log_probabilities(catalog, biased, related):
    """Decoding and training define one distribution: each SID beam returns, appended to
    the history as one more item of a window, scores the same under the training pass."""
    histories = windows_of(related)
    prompt = prompt_of(catalog, histories)
    result = build_decoder("beam", catalog, 6, {"ntp": biased}).decode(prompt)
    levels = catalog.levels
    for user, history in enumerate(histories):
        for rank in range(6):
            items = catalog.item_tokens(torch.tensor(history)).flatten()
            tokens = torch.cat([items, result.sids[user, rank] + torch.tensor(catalog.offsets)])
            ids, mask = pad_rows([tokens])
            with torch.no_grad():
                logits = biased.repeat_bias.add_to_window(biased.lm.logits(ids, mask), ids, mask)
            log_probs = torch.log_softmax(logits[0].float(), -1)
            start = len(history) * levels - 1
            total = sum(log_probs[start + level, tokens[len(history) * levels + level]] for level in range(levels))
            assert float(total) == pytest.approx(float(result.scores[user, rank]), abs=1e-4)


@pytest.mark.parametrize("k,constrained", [(1, False), (5, False), (5, True), (12, True)])
def test_beam_equals_huggingface_generate_with_the_offsets(catalog, biased, related, k, constrained):
    histories = windows_of(related)
    prompt = prompt_of(catalog, histories)
    spec = ":constrained" if constrained else ""
    ours = build_decoder("beam" + spec, catalog, k, {"ntp": biased}).decode(prompt)
    theirs = build_decoder("hf_beam" + spec, catalog, k, {"ntp": biased}).decode(prompt)
    assert torch.equal(ours.sids, theirs.sids)
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=1e-4)
    if k == 1:
        greedy = build_decoder("greedy", catalog, 1, {"ntp": biased}).decode(prompt)
        assert torch.equal(greedy.sids, ours.sids)
        torch.testing.assert_close(greedy.scores, ours.scores)


def test_the_offsets_decide_whether_beam_returns_the_history(catalog, plain, related):
    """Raised at every level, each user's best item is one they took; lowered at the last,
    none of their items is in the lists."""
    histories = windows_of(related)
    prompt = prompt_of(catalog, histories)

    def taken(model) -> list[list[bool]]:
        result = build_decoder("beam:constrained", catalog, 8, {"ntp": model}).decode(prompt)
        items = catalog.items_of(result.sids)  # [B, K]
        return [[int(i) in history for i in row] for row, history in zip(items, histories)]

    assert all(row[0] for row in taken(with_offsets(plain, [30.0, 30.0, 30.0])))
    assert not any(any(row) for row in taken(with_offsets(plain, [0.0, 0.0, -30.0])))
    assert any(any(row) for row in taken(with_offsets(plain, [0.0, 0.0, 0.0])))  # the test can fail


def test_the_last_level_offset_falls_where_nobody_takes_an_item_again(catalog, related):
    """Its gradient pushes it down when targets only share a prefix with the history (and
    up when every target is an item of the history)."""
    (_, _, c, *_), (s, t, *_) = related
    torch.manual_seed(4)
    from models.module import SidRecommender

    model = SidRecommender.for_catalog("ntp", ModelSettings(backbone="qwen-tiny", repeat_bias=True), catalog)
    objectives.loss("ntp", model.train(), model.collate([[s, t], [t, s, c], [c, s, t]])).backward()
    assert model.repeat_bias.per_level.grad[-1] > 0
    model.zero_grad()
    objectives.loss("ntp", model.train(), model.collate([[s, s, s], [t, t], [c, c, c, c]])).backward()
    assert model.repeat_bias.per_level.grad[-1] < 0


@pytest.mark.parametrize("spec", ["speculative", "speculative:constrained", "speculative:draft_beam=12"])
def test_speculative_with_the_offsets_equals_beam_with_them(catalog, plain, biased, related, spec):
    """The draft adds its own offsets (another model, other values), the check and the
    fallback the backbone's: still exactly beam's lists."""
    draft = with_offsets(random_model("ntp", catalog, seed=6, backbone="qwen-tiny"), [-0.5, 2.0, -3.0])
    histories = windows_of(related)
    prompt = prompt_of(catalog, histories)
    reference = "beam:constrained" if "constrained" in spec else "beam"
    ours = build_decoder(spec, catalog, 5, {"ntp": biased, "draft": draft}).decode(prompt)
    theirs = build_decoder(reference, catalog, 5, {"ntp": biased}).decode(prompt)
    assert torch.equal(ours.sids, theirs.sids)
    torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-4, rtol=1e-4)
    assert ours.stats["fallback_requests"] > 0  # the fallback ran, with the offsets of its rows
    if spec == "speculative":  # the draft's own offsets shape its tree
        towards, away = with_offsets(plain, [0.0, 30.0, 0.0]), with_offsets(plain, [0.0, -30.0, 0.0])
        same = build_decoder(spec, catalog, 5, {"ntp": towards, "draft": towards}).decode(prompt)
        assert same.stats["fallback_requests"] == 0
        other = build_decoder(spec, catalog, 5, {"ntp": towards, "draft": away}).decode(prompt)
        assert other.stats["fallback_requests"] == len(histories)
        assert torch.equal(other.sids, same.sids)


def test_decoders_that_would_leave_the_offsets_out_refuse_the_model():
    settings = ModelSettings(backbone="qwen-tiny", draft_backbone="qwen-micro", repeat_bias=True)
    for spec in ("medusa", "speculative:draft=aligned"):
        with pytest.raises(BenchError, match=f"{spec} does not add the NTP model's repeat bias: .* --repeat-bias"):
            plan(spec, settings)
    for name in ("greedy", "beam", "hf_beam", "speculative", "nezha"):
        plan(name, settings)
    # an item model's repeat bias (the Beauty preset's) leaves the NTP model without one
    plan("medusa", ModelSettings(backbone="qwen-tiny", per_objective={"next_item": {"repeat_bias": True}}))
    with pytest.raises(BenchError, match="--repeat-bias trains on the NTP layout of a decoder-only backbone"):
        plan("beam", replace(settings, backbone="t5-tiny"))


def test_medusa_heads_refuse_a_backbone_trained_with_the_bias(catalog, biased, tmp_path):
    from types import SimpleNamespace

    from bench.settings import DataSettings
    from bench.train import train_model

    data, settings = SimpleNamespace(catalog=catalog), ModelSettings(backbone="qwen-tiny")
    with pytest.raises(BenchError, match="start them from an NTP model trained without --repeat-bias"):
        train_model(data, "medusa", settings, DataSettings(), tmp_path, init_from=biased)


def test_the_bias_names_its_own_ntp_model_and_no_other():
    from bench.data import load_dataset
    from bench.train import cache_key

    data, settings = load_dataset("synthetic"), ModelSettings(backbone="qwen-micro")
    biased = replace(settings, repeat_bias=True)
    assert cache_key("ntp", biased, data, 0) != cache_key("ntp", settings, data, 0)
    assert cache_key("nezha", biased, data, 0) == cache_key("nezha", settings, data, 0)
    assert cache_key("medusa", biased, data, 0) == cache_key("medusa", settings, data, 0)


def test_an_ntp_model_continues_one_with_the_bias_only_with_it_and_keeps_its_offsets(
    catalog, plain, biased, tmp_path, monkeypatch
):
    """bench train --objective ntp --init-from: the starting model's repeat bias must match;
    a biased one continues with its learned offsets, not zeros."""
    from types import SimpleNamespace

    from bench import train
    from bench.settings import DataSettings

    data, settings = SimpleNamespace(catalog=catalog), ModelSettings(backbone="qwen-tiny")
    with pytest.raises(BenchError, match="that NTP model was trained with --repeat-bias; continue it with the same"):
        train.train_model(data, "ntp", settings, DataSettings(), tmp_path, init_from=biased)
    with pytest.raises(BenchError, match="that NTP model was trained without --repeat-bias"):
        train.train_model(data, "ntp", replace(settings, repeat_bias=True), DataSettings(), tmp_path, init_from=plain)
    started = {}

    def stop(*_, **__):  # where training would begin: the model as it starts
        raise RuntimeError("stopped")

    monkeypatch.setattr(train, "train_windows", stop)
    original = train.build_model

    def keep(*args, **kwargs):
        started["model"] = original(*args, **kwargs)
        return started["model"]

    monkeypatch.setattr(train, "build_model", keep)
    with pytest.raises(RuntimeError, match="stopped"):
        train.train_model(data, "ntp", replace(settings, repeat_bias=True), DataSettings(), tmp_path, init_from=biased)
    assert torch.equal(started["model"].repeat_bias.per_level, biased.repeat_bias.per_level)  # OFFSETS, not zeros
