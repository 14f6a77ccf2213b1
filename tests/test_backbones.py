"""Every backbone trains; every decoder runs on every generative backbone or refuses
with the documented line."""

import pytest
import torch
from conftest import random_batch, random_model, training_losses

from bench.errors import BenchError
from bench.latency import count_calls
from bench.settings import ModelSettings
from decoders import REGISTRY, build_decoder, full_rank, plan
from models import objectives, sasrec
from models.backbones import BACKBONES, backbone_kind, build_backbone, parameter_count
from models.module import SidRecommender

GENERATIVE = ["qwen-tiny", "llama-tiny", "t5-tiny"]


@pytest.mark.parametrize(
    "backbone,objective,options",
    [(b, o, {}) for b in GENERATIVE for o in ("ntp", "nezha")]
    + [
        ("qwen-tiny", "nezha", {"transition": "gru"}),
        ("qwen-tiny", "nezha", {"transition": "none", "placeholders": False}),
        ("t5-tiny", "nezha", {"placeholders": False}),
        ("t5-tiny", "ntp", {"encoder": "causal"}),
        ("t5-tiny", "nezha", {"encoder": "causal"}),
        ("sasrec-tiny", "next_item", {}),
        ("sasrec-tiny", "next_item", {"item_scores": "separate"}),
        ("sasrec-tiny", "next_item", {"repeat_bias": True}),
        ("llama-tiny", "medusa", {}),
    ],
)
def test_each_backbone_and_objective_trains_and_its_loss_falls(catalog, backbone, objective, options):
    model = random_model(objective, catalog, seed=5, backbone=backbone, dropout=0.0, **options)
    losses = training_losses(model, objective)
    assert losses[-1] < (0.8 if objective == "medusa" else 0.7) * losses[0]  # medusa: heads only


def models_for(catalog, backbone, seed=0):
    models = {
        "ntp": random_model("ntp", catalog, seed=seed, backbone=backbone),
        "nezha": random_model("nezha", catalog, seed=seed, backbone=backbone),
        "popularity": torch.arange(catalog.num_items),
    }
    if backbone_kind(backbone) == "decoder-only":
        models["draft"] = random_model("ntp", catalog, seed=seed + 1, backbone=backbone.split("-")[0] + "-micro")
        medusa = random_model("medusa", catalog, seed=seed, backbone=backbone)
        medusa.lm.load_state_dict(models["ntp"].lm.state_dict())
        models["medusa"] = medusa
    return models


@pytest.mark.parametrize("backbone", GENERATIVE)
def test_every_decoder_runs_on_every_generative_backbone_or_refuses(catalog, backbone):
    models = models_for(catalog, backbone)
    batch = random_batch(catalog, users=4, seed=1)
    expected = build_decoder("beam", catalog, 5, models).decode(batch)
    for name, cls in sorted(REGISTRY.items()):
        if name == "full_rank":
            continue
        if cls.backbone_kinds and backbone_kind(backbone) not in cls.backbone_kinds:
            with pytest.raises(BenchError, match=f"decoder '{name}' cannot run on {backbone}.*only a decoder-only"):
                plan(name, ModelSettings(backbone=backbone))
            continue
        decoder = build_decoder(name, catalog, 5, models)
        with count_calls(decoder.backbone_core) as calls:
            result = decoder.decode(batch)
        width = 1 if name == "greedy" else 5
        assert result.sids.shape == (4, width, catalog.levels), name
        if name in ("hf_beam", "speculative"):
            assert torch.equal(result.sids, expected.sids), name
            torch.testing.assert_close(result.scores, expected.scores, atol=1e-4, rtol=1e-4)
        if name == "greedy":
            assert torch.equal(result.sids[:, 0], build_decoder("beam", catalog, 1, models).decode(batch).sids[:, 0])
        expected_calls = {
            "nezha": 1,
            "medusa": 2,
            "popularity": 0,
            "greedy": catalog.levels,
            "beam": catalog.levels,
            "hf_beam": catalog.levels,
        }
        if name in expected_calls:
            assert calls[0] == expected_calls[name], name


@pytest.mark.parametrize("item_scores,repeat_bias", [("tied", False), ("separate", False), ("tied", True)])
def test_full_rank_scores_every_item_in_one_call(catalog, item_scores, repeat_bias):
    model = random_model("next_item", catalog, seed=2, backbone="sasrec-tiny", item_scores=item_scores)
    batch = random_batch(catalog, users=5, seed=2)
    if repeat_bias:
        plain = build_decoder("full_rank", catalog, 7, {"next_item": model}).decode(batch)
        model = with_repeat_bias(model, -0.3)
    decoder = build_decoder("full_rank", catalog, 7, {"next_item": model})
    with count_calls(decoder.backbone_core) as calls:
        result = decoder.decode(batch)
    assert calls[0] == 1
    items = catalog.items_of(result.sids)
    with torch.no_grad():
        scores = torch.log_softmax(model.lm.item_scores(batch.items, batch.items_mask)[:, -1], -1)
    top = scores.topk(7)
    assert torch.equal(items, top.indices)
    torch.testing.assert_close(result.scores, top.values)
    if repeat_bias:  # the offset reached the decoder's scores
        assert not torch.allclose(result.scores, plain.scores)


def test_separate_item_scores_are_a_table_of_their_own_and_tied_ones_the_input_embeddings(catalog):
    tied = random_model("next_item", catalog, seed=2, backbone="sasrec-tiny").lm
    separate = random_model("next_item", catalog, seed=2, backbone="sasrec-tiny", item_scores="separate").lm
    embeddings = tied.core.wte.weight  # [1 + N, d]: row 0 is PAD
    assert tied.item_table().data_ptr() == embeddings[1:].data_ptr()
    assert separate.item_table().shape == (catalog.num_items, separate.hidden_size)
    assert all(separate.item_table().data_ptr() != p.data_ptr() for p in separate.core.parameters())
    assert parameter_count(separate) == parameter_count(tied) + catalog.num_items * tied.hidden_size


def with_repeat_bias(model, offset: float):
    """The item model with a repeat bias whose offset (REPEAT_SCALE x the parameter) is `offset`."""
    biased = random_model("next_item", model.catalog, backbone="sasrec-tiny", repeat_bias=True)
    biased.load_state_dict({**model.state_dict(), "lm.repeat_bias": torch.tensor(offset / sasrec.REPEAT_SCALE)})
    return biased


def held(items: torch.Tensor, start: int, count: int, causal: bool) -> torch.Tensor:
    """history_entries scattered onto zeros: how often each item of the block is offset."""
    index, weight = sasrec.history_entries(items, start, count, causal)
    return torch.zeros(*index.shape[:-1], count).scatter_add_(-1, index, weight.float())


def test_history_entries_mark_each_item_a_position_has_read_once_on_a_hand_made_batch():
    items = torch.tensor([[3, 1, 3, 0], [0, 2, 4, 2]])  # item index + 1; 0 = PAD (right and left); repeats
    assert held(items, 0, 5, causal=True).tolist() == [
        [[0, 0, 1, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 0, 0]],
        [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 0, 1, 0], [0, 1, 0, 1, 0]],
    ]
    # items 1 and 2 (ids 2 and 3) of the whole history: a block of the catalogue
    assert held(items, 1, 2, causal=False).tolist() == [[0, 1], [1, 0]]


def test_repeat_bias_offsets_exactly_the_items_a_position_has_read(catalog):
    plain = random_model("next_item", catalog, seed=4, backbone="sasrec-tiny")
    biased = with_repeat_bias(plain, -2.5)
    items = torch.tensor([[5, 9, 5, 0], [0, 0, 7, 2]])
    mask = (items > 0).long()
    with torch.no_grad():
        difference = biased.lm.item_scores(items, mask) - plain.lm.item_scores(items, mask)  # [2, 4, N]
    expected = torch.zeros_like(difference)
    for row, position, item in [(0, 0, 4), (0, 1, 4), (0, 1, 8), (0, 2, 4), (0, 2, 8), (0, 3, 4), (0, 3, 8)]:
        expected[row, position, item] = -2.5
    for position, item in [(2, 6), (3, 6), (3, 1)]:
        expected[1, position, item] = -2.5
    torch.testing.assert_close(difference, expected)


def test_repeat_bias_falls_where_nobody_takes_an_item_twice(catalog):
    """The loss's gradient pushes the offset down when no target is in its own history
    (and up when every one is)."""
    torch.manual_seed(4)  # at its initial scale: random_model's peaked scores would leave no gradient
    model = SidRecommender.for_catalog("next_item", ModelSettings(backbone="sasrec-tiny", repeat_bias=True), catalog)
    batch = model.collate([[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]])
    objectives.loss("next_item", model.train(), batch).backward()
    assert model.lm.repeat_bias.grad > 0
    model.zero_grad()
    batch = model.collate([[0, 0, 0], [4, 4, 4, 4]])  # every target read before
    objectives.loss("next_item", model.train(), batch).backward()
    assert model.lm.repeat_bias.grad < 0


@pytest.mark.parametrize("repeat_bias", [False, True])
def test_full_rank_in_blocks_of_items_equals_scoring_all_at_once(catalog, monkeypatch, repeat_bias):
    """A large catalogue is scored a block at a time; the top-K and the log-probabilities stay."""
    model = random_model("next_item", catalog, seed=3, backbone="sasrec-tiny")
    if repeat_bias:  # strong enough to move the top-K
        model = with_repeat_bias(model, -3.0)
    batch = random_batch(catalog, users=5, seed=3)
    decoder = build_decoder("full_rank", catalog, 7, {"next_item": model})
    whole = decoder.decode(batch)
    monkeypatch.setattr(full_rank, "SCORES_PER_BLOCK", 5 * 13)  # blocks of 13 items, the last one shorter
    blocks = decoder.decode(batch)
    assert torch.equal(blocks.sids, whole.sids)
    torch.testing.assert_close(blocks.scores, whole.scores)
    if repeat_bias:  # the offset changed the lists, in every block
        unbiased = random_model("next_item", catalog, seed=3, backbone="sasrec-tiny")
        plain = build_decoder("full_rank", catalog, 7, {"next_item": unbiased})
        assert not torch.equal(plain.decode(batch).sids, blocks.sids)


def test_sid_decoders_refuse_the_item_model_and_full_rank_refuses_sid_models():
    with pytest.raises(BenchError, match="decoder 'beam' cannot run on sasrec-small"):
        plan("beam", ModelSettings(backbone="sasrec-small"))
    _, _, requests = plan("full_rank", ModelSettings(backbone="qwen-small"))
    assert requests["next_item"].settings.backbone == "sasrec-small"  # --item-backbone
    with pytest.raises(BenchError, match="unknown backbone 'gpt-small'"):
        plan("beam", ModelSettings(backbone="gpt-small"))


def test_objective_and_backbone_pairings_are_checked(catalog):
    with pytest.raises(BenchError, match="trains only with objective next_item"):
        random_model("ntp", catalog, backbone="sasrec-tiny")
    with pytest.raises(BenchError, match="needs an item-embedding backbone"):
        random_model("next_item", catalog, backbone="qwen-tiny")
    with pytest.raises(BenchError, match="Medusa heads need a decoder-only backbone"):
        random_model("medusa", catalog, backbone="t5-tiny")


@pytest.mark.parametrize(
    "name,hidden,layers,params", [("qwen3-0.6b", 1024, 28, 440e6), ("llama-3.2-1b", 2048, 16, 970e6)]
)
def test_presets_are_shaped_like_the_real_models(name, hidden, layers, params):
    with torch.device("meta"):
        model = build_backbone(name, vocab_size=1000, max_positions=256)
    assert model.lm.config.hidden_size == hidden and model.lm.config.num_hidden_layers == layers
    assert abs(parameter_count(model) - params) / params < 0.1  # all but the embedding of a real vocabulary
    assert name in BACKBONES
