"""--seen-unlikelihood: the NTP loss's term against regenerating an item the user took."""

import math

import pytest
import torch

from conftest import random_model
from models import objectives

WINDOWS = [[3, 17, 42, 8], [11, 2], [5, 9, 40]]


def joint_log_prob(model, catalog, history: list[int], item: int) -> torch.Tensor:
    """log p(item's whole SID | history) by a plain causal pass over history + the item."""
    context = catalog.item_tokens(torch.tensor(history)).flatten()
    sid = catalog.item_tokens(torch.tensor([item]))[0]
    tokens = torch.cat([context, sid])
    log_probs = torch.log_softmax(model.lm.logits(tokens[None], torch.ones(1, len(tokens)))[0].float(), -1)
    return sum(log_probs[len(context) - 1 + level, sid[level]] for level in range(catalog.levels))


def drawn_items(catalog, batch) -> list[int]:
    """The item of each target's group, read back from its tokens."""
    by_tokens = {tuple(catalog.item_tokens(torch.tensor([i]))[0].tolist()): i for i in range(catalog.num_items)}
    return [by_tokens[tuple(t.tolist())] for t in batch["seen_tokens"]]


def test_each_target_draws_an_item_from_the_window_before_it(catalog):
    torch.manual_seed(0)
    batch = objectives.collate_ntp(WINDOWS * 20, catalog, seen=True)
    drawn = drawn_items(catalog, batch)
    targets = [(window, j) for window in WINDOWS * 20 for j in range(1, len(window))]
    assert len(drawn) == len(targets)
    assert all(item in window[:j] for item, (window, j) in zip(drawn, targets))
    assert {item for item, (window, j) in zip(drawn, targets) if window == WINDOWS[0] and j == 3} == {3, 17, 42}
    torch.manual_seed(0)
    assert drawn_items(catalog, objectives.collate_ntp(WINDOWS * 20, catalog, seen=True)) == drawn  # seeded


def test_the_groups_score_each_drawn_item_as_a_plain_pass_after_its_history(catalog):
    """log p(s | history) read off the one pass over window and groups equals the
    probability a plain causal pass over the history followed by s's SID gives, and the
    window's logits are the plain pass's."""
    model = random_model("ntp", catalog, seed=3, backbone="qwen-micro", seen_unlikelihood=0.5)
    torch.manual_seed(1)
    batch = model.collate(WINDOWS)
    with torch.no_grad():
        logits, group_hidden = objectives.seen_layout_pass(model, batch)
        found = objectives.seen_log_probs(model, logits, group_hidden, batch)
        plain = model.lm.logits(batch["input_ids"], batch["attention_mask"])
        targets = [(w, j) for w in WINDOWS for j in range(1, len(w))]
        expected = torch.stack(
            [joint_log_prob(model, catalog, w[:j], item) for (w, j), item in zip(targets, drawn_items(catalog, batch))]
        )
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], plain[real], atol=1e-5, rtol=1e-5)  # the window's part is untouched
    torch.testing.assert_close(found, expected, atol=1e-4, rtol=1e-5)


def test_the_loss_adds_the_weighted_unlikelihood_of_the_drawn_items(catalog, monkeypatch):
    """loss = ntp loss + W x mean(-log(1 - p(s))): checked with the probabilities fixed,
    since a random model gives a whole SID about (1 / V)^L."""
    model = random_model("ntp", catalog, seed=3, backbone="qwen-micro", seen_unlikelihood=0.5)
    torch.manual_seed(1)
    batch = model.collate(WINDOWS)
    count = len(batch["seen_rows"])
    probabilities = torch.linspace(0.1, 0.8, count)
    monkeypatch.setattr(objectives, "seen_log_probs", lambda *_: probabilities.log())
    with torch.no_grad():
        total = objectives.ntp_loss(model, batch)
        plain = objectives.ntp_loss(model, objectives.collate_ntp(WINDOWS, catalog))
    term = sum(-math.log(1 - p) for p in probabilities.tolist()) / count
    torch.testing.assert_close(total, plain + 0.5 * torch.tensor(term), atol=1e-5, rtol=1e-5)


def test_training_with_the_term_teaches_a_copying_model_not_to_regenerate_seen_items(catalog):
    """A model first taught to copy (windows of one item repeated) gives the items of a
    history most of its mass; a few steps on windows of distinct items take that mass
    away far faster with the term than the one-hot loss alone does."""
    repeats = [[item] * 3 for item in range(0, 60, 6)]
    distinct = [[item, item + 1, item + 2] for item in range(0, 57, 6)]

    def seen_mass(model, batch) -> float:
        with torch.no_grad():
            log_p = objectives.seen_log_probs(model.eval(), *objectives.seen_layout_pass(model, batch), batch)
        return float(log_p.exp().mean())

    def steps(model, batch, count: int) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(count):
            optimizer.zero_grad()
            objectives.ntp_loss(model.train(), batch).backward()
            optimizer.step()

    copying = random_model("ntp", catalog, seed=3, backbone="qwen-micro", dropout=0.0)
    steps(copying, objectives.collate_ntp(repeats, catalog), 40)
    torch.manual_seed(2)
    batch = objectives.collate_ntp(distinct, catalog, seen=True)
    masses = {}
    for weight in (0.0, 5.0):
        model = random_model("ntp", catalog, seed=3, backbone="qwen-micro", dropout=0.0, seen_unlikelihood=weight)
        model.load_state_dict(copying.state_dict())
        before = seen_mass(model, batch)
        steps(model, batch, 5)
        masses[weight] = (before, seen_mass(model, batch))
    assert masses[0.0][0] > 0.3  # it copies
    assert masses[5.0][1] < masses[0.0][1] / 4


def test_a_model_without_the_setting_collates_no_groups(catalog):
    assert "seen_input_ids" not in random_model("ntp", catalog, backbone="qwen-micro").collate(WINDOWS)
